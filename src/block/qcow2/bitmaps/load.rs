//! Reading the bitmaps extension. At open the directory and every table
//! are read and checked (so a corrupt directory fails the open with a
//! clear error, as in qemu, before anything is written); the bits are read
//! when the node asks for its bitmaps.

use std::collections::HashSet;

use super::dir::{parse_directory, DirEntry};
use super::ext::{BitmapsExt, AUTOCLEAR_BITMAPS};
use super::table::{decode, Cluster};
use super::{Stored, StoredBitmap};
use crate::bitmap::DirtyBitmap;
use crate::block::qcow2::header::{Header, EXT_BITMAPS};
use crate::block::qcow2::io::HostFile;
use crate::block::{BlockError, BlockResult};

/// Whether the header carries a bitmaps extension that a program without
/// bitmap support left stale (autoclear bit clear): qemu ignores it.
pub fn is_stale(header: &Header) -> bool {
    header.extension(EXT_BITMAPS).is_some() && header.autoclear & AUTOCLEAR_BITMAPS == 0
}

/// Bytes of bitmap data for a disk of `size` at `granularity_bits`, and
/// the clusters (table entries) that takes.
pub fn data_geometry(size: u64, granularity_bits: u8, cluster_size: u64) -> (u64, u64) {
    let bytes = size.div_ceil(1u64 << granularity_bits).div_ceil(8);
    (bytes, bytes.div_ceil(cluster_size))
}

/// Reads and checks the directory and tables named by the header.
pub fn check_directory(f: &HostFile, header: &Header) -> BlockResult<Stored> {
    let Some(data) = header.extension(EXT_BITMAPS) else {
        return Ok(Stored::default());
    };
    if is_stale(header) {
        tracing::warn!(
            "'{}': a program lacking bitmap support modified this file, so all bitmaps \
             are now considered inconsistent",
            f.path.display()
        );
        return Ok(Stored::default());
    }
    let cs = header.cluster_size();
    let ext = BitmapsExt::parse(data, cs)?;
    let file_len = f.len()?;
    let mut raw = vec![0u8; ext.directory_size as usize];
    // Like qemu, bytes past EOF within the last cluster read as zeroes;
    // a directory beyond that is outside the file.
    if ext.directory_offset.saturating_add(ext.directory_size) > file_len.div_ceil(cs) * cs {
        return Err(BlockError::corrupt(format!(
            "bitmap directory at offset {} (+{} bytes) lies past the end of the file",
            ext.directory_offset, ext.directory_size
        )));
    }
    f.read_partial(&mut raw, ext.directory_offset)?;
    let entries = parse_directory(&raw, ext.nb_bitmaps)?;
    check_tables_apart(&entries, cs, file_len)?;
    let mut names = HashSet::new();
    let mut bitmaps = Vec::with_capacity(entries.len());
    for entry in entries {
        entry.check(cs)?;
        if !names.insert(entry.name.clone()) {
            return Err(BlockError::corrupt(format!(
                "Broken bitmap directory: bitmap '{}' is stored twice",
                entry.name
            )));
        }
        let (_, clusters) = data_geometry(header.size, entry.granularity_bits, cs);
        if u64::from(entry.table_size) != clusters {
            return Err(BlockError::corrupt(format!(
                "Could not read bitmap '{}' from image: Invalid argument (its table has {} \
                 entries, a disk of {} bytes needs {})",
                entry.name, entry.table_size, header.size, clusters
            )));
        }
        let mut raw = vec![0u8; entry.table_size as usize * 8];
        f.read(&mut raw, entry.table_offset, "bitmap table")
            .map_err(|e| BlockError {
                context: format!("bitmap '{}': {}", entry.name, e.context),
                ..e
            })?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        for &e in &table {
            decode(e, cs, file_len, &entry.name)?;
        }
        let inconsistent = entry.in_use() || entry.unusable_extra_data();
        bitmaps.push(StoredBitmap {
            entry,
            table,
            inconsistent,
        });
    }
    Ok(Stored {
        ext: Some(ext),
        bitmaps,
    })
}

/// Every table must lie in the file and in clusters of its own, checked
/// before any is read: the tables are kept in memory, so this bounds them
/// by the file's length. (qemu reads a table per bitmap as it loads it, so
/// a directory of 65535 entries naming one large table has it read 65535
/// times; qemu's own `check` counts such shared clusters as corrupt.)
fn check_tables_apart(entries: &[DirEntry], cs: u64, file_len: u64) -> BlockResult<()> {
    let end_of_file = file_len.div_ceil(cs) * cs;
    let mut spans = Vec::with_capacity(entries.len());
    for e in entries {
        let len = (u64::from(e.table_size) * 8).div_ceil(cs) * cs;
        if e.table_offset.saturating_add(len) > end_of_file {
            return Err(BlockError::corrupt(format!(
                "bitmap '{}': bitmap table at offset {} (+{len} bytes) lies past the end \
                 of the file",
                e.name, e.table_offset
            )));
        }
        spans.push((e.table_offset, len, &e.name));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((a_off, a_len, a), (b_off, _, b)) = (w[0], w[1]);
        if a_off + a_len > b_off {
            return Err(BlockError::corrupt(format!(
                "Broken bitmap directory: the tables of bitmaps '{a}' and '{b}' share \
                 clusters (at offset {b_off:#x})"
            )));
        }
    }
    Ok(())
}

/// The in-memory bitmap for a stored one. In use on disk (not stored
/// cleanly), or with extra data qemu may not ignore, it comes back
/// inconsistent with no bits read: it can only be removed.
pub fn load_bitmap(
    f: &HostFile,
    header: &Header,
    stored: &StoredBitmap,
    read_only: bool,
) -> BlockResult<DirtyBitmap> {
    let e = &stored.entry;
    let mut b = DirtyBitmap::stored(&e.name, header.size, e.granularity())
        .map_err(|err| BlockError::corrupt(format!("bitmap '{}': {}", e.name, err.message)))?;
    b.state.persistent = true;
    b.state.recording = e.auto();
    b.state.readonly = read_only;
    if stored.inconsistent {
        b.mark_inconsistent();
        return Ok(b);
    }
    read_bits(f, header, stored, &mut b)?;
    Ok(b)
}

/// A stored bitmap's bits as they are on disk, in use or not (the intent
/// log's recovery starts from them).
pub fn load_forced(
    f: &HostFile,
    header: &Header,
    stored: &StoredBitmap,
) -> BlockResult<DirtyBitmap> {
    let clean = StoredBitmap {
        inconsistent: false,
        ..stored.clone()
    };
    load_bitmap(f, header, &clean, false)
}

fn read_bits(
    f: &HostFile,
    header: &Header,
    stored: &StoredBitmap,
    b: &mut DirtyBitmap,
) -> BlockResult<()> {
    let e = &stored.entry;
    let cs = header.cluster_size();
    let (bytes, _) = data_geometry(header.size, e.granularity_bits, cs);
    let file_len = f.len()?;
    let mut buf = vec![0u8; cs as usize];
    for (i, &t) in stored.table.iter().enumerate() {
        let at = i as u64 * cs;
        let n = cs.min(bytes - at);
        let granule = at * 8;
        let r = match decode(t, cs, file_len, &e.name)? {
            Cluster::Zeros => Ok(()),
            Cluster::Ones => b.deserialize_fill(granule, n, true),
            Cluster::Data(off) => {
                let chunk = &mut buf[..n as usize];
                // Checked to lie within the file (its last cluster may be short).
                f.read_partial(chunk, off)?;
                b.deserialize_range(granule, chunk)
            }
        };
        r.map_err(|err| BlockError::corrupt(format!("bitmap '{}': {}", e.name, err.message)))?;
    }
    Ok(())
}
