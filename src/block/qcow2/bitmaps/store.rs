//! Writing the bitmaps extension.
//!
//! Crash safety comes from ordering: new data clusters, tables and the
//! directory are written and their refcounts made stable first; then one
//! header write switches to them; only then are the old clusters freed. A
//! crash at any point leaves either the old or the new directory, at worst
//! with leaked clusters (which `qemu-img check -r` reclaims), never a
//! directory that points at freed space.

use super::dir::{serialize_directory, DirEntry};
use super::ext::{BitmapsExt, AUTOCLEAR_BITMAPS};
use super::load::data_geometry;
use super::table::{encode, Cluster};
use super::{
    Stored, StoredBitmap, FLAG_AUTO, FLAG_EXTRA_DATA_COMPATIBLE, FLAG_IN_USE, MAX_BITMAPS,
    MAX_DIRECTORY_SIZE, MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE, TYPE_DIRTY_TRACKING,
};
use crate::bitmap::name::{c_bytes, c_len};
use crate::bitmap::DirtyBitmap;
use crate::block::qcow2::header::{Header, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_FEATURE_TABLE};
use crate::block::qcow2::io::HostFile;
use crate::block::qcow2::meta::Meta;
use crate::block::{BlockError, BlockResult};

/// Puts the bitmaps extension where qemu writes it (after the feature
/// table, else after the backing format), or removes it.
pub fn set_extension(header: &mut Header, ext: Option<BitmapsExt>) {
    let Some(ext) = ext else {
        header.set_extension(EXT_BITMAPS, None);
        header.autoclear &= !AUTOCLEAR_BITMAPS;
        return;
    };
    header.autoclear |= AUTOCLEAR_BITMAPS;
    if header.extension(EXT_BITMAPS).is_some() {
        header.set_extension(EXT_BITMAPS, Some(ext.serialize()));
        return;
    }
    let after = [EXT_FEATURE_TABLE, EXT_BACKING_FORMAT]
        .iter()
        .find_map(|k| header.extensions.iter().position(|e| e.kind == *k))
        .map_or(0, |i| i + 1);
    header.extensions.insert(
        after,
        crate::block::qcow2::header::Extension {
            kind: EXT_BITMAPS,
            data: ext.serialize(),
        },
    );
}

/// Sets `in_use` on every stored bitmap (a read-write open): the
/// directory is rewritten in place, same size, and synced.
pub fn mark_in_use(f: &HostFile, stored: &mut Stored) -> BlockResult<()> {
    let Some(ext) = stored.ext else {
        return Ok(());
    };
    if stored.bitmaps.iter().all(|b| b.entry.in_use()) {
        return Ok(());
    }
    for b in &mut stored.bitmaps {
        b.entry.flags |= FLAG_IN_USE;
    }
    let raw = serialize_directory(stored.bitmaps.iter().map(|b| &b.entry));
    f.write(&raw, ext.directory_offset, "bitmap directory")?;
    f.sync()
}

/// Refuses a bitmap whose data would exceed qemu's table or data limits
/// (qemu would then refuse to open the image).
pub fn check_size(size: u64, granularity: u64, cluster_size: u64) -> BlockResult<()> {
    let bits = granularity.trailing_zeros() as u8;
    let (_, clusters) = data_geometry(size, bits, cluster_size);
    if clusters > MAX_TABLE_SIZE || clusters.saturating_mul(cluster_size) > MAX_PHYS_SIZE {
        return Err(BlockError::invalid(
            "Too much space will be occupied by the bitmap. Use larger granularity",
        ));
    }
    Ok(())
}

/// Why a new persistent bitmap `name` cannot be stored, in qemu's words.
pub fn check_can_store(
    header: &Header,
    stored_count: usize,
    dir_size: u64,
    name: &str,
    granularity: u64,
) -> BlockResult<()> {
    if header.version < 3 {
        return Err(BlockError::invalid(
            "Cannot store dirty bitmaps in qcow2 v2 files",
        ));
    }
    if c_len(name) > MAX_NAME_SIZE {
        return Err(BlockError::invalid(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        )));
    }
    check_size(header.size, granularity, header.cluster_size())?;
    if stored_count >= MAX_BITMAPS as usize {
        return Err(BlockError::invalid(
            "Maximum number of persistent bitmaps is already reached",
        ));
    }
    if dir_size + (24 + c_len(name) as u64).div_ceil(8) * 8 > MAX_DIRECTORY_SIZE {
        return Err(BlockError::invalid(
            "Not enough space in the bitmap directory",
        ));
    }
    Ok(())
}

/// How a store leaves the bitmaps: `Clean` (a close: `in_use` clear), or
/// `InUse` (a store point of an image that stays open for writing: the
/// flag stays, so a crash still reads as one to qemu). `header` makes the
/// last changes to the header that switches the directory (the intent
/// log's map goes with it).
pub struct StoreMode<'a> {
    pub in_use: bool,
    pub header: &'a mut dyn FnMut(&mut Header),
}

/// A store whose clusters are allocated and whose bytes are ready, not
/// yet written ([`prepare`], [`write`], [`switch`]): the bytes go out
/// without the metadata lock, so guest I/O does not wait for them.
pub struct Prepared {
    new: Vec<StoredBitmap>,
    /// Old entries kept as they are (inconsistent bitmaps).
    kept: Vec<usize>,
    /// Clusters taken for the new tables, data and directory.
    fresh: Vec<(u64, u64)>,
    /// What to write where.
    writes: Vec<(u64, Vec<u8>, &'static str)>,
    ext: Option<BitmapsExt>,
    /// Nothing to store and nothing stored: no header change.
    noop: bool,
}

/// Writes `bitmaps` as the image's whole bitmap directory, all under the
/// caller's metadata lock (at open). An inconsistent bitmap keeps its old
/// entry and clusters exactly as found (still in use), as qemu does.
pub fn store(
    f: &HostFile,
    meta: &mut Meta,
    stored: &mut Stored,
    bitmaps: &[&DirtyBitmap],
    mode: StoreMode<'_>,
) -> BlockResult<()> {
    let p = prepare(f, meta, stored, bitmaps, mode.in_use)?;
    if let Err(e) = write(f, &p) {
        abandon(f, meta, p);
        return Err(e);
    }
    let old = switch(f, meta, stored, p, mode.header)?;
    f.sync()?;
    finish(f, meta, old)
}

/// Checks, lays out and allocates a store of `bitmaps` (under the
/// metadata lock; no data written yet).
pub fn prepare(
    f: &HostFile,
    meta: &mut Meta,
    stored: &Stored,
    bitmaps: &[&DirtyBitmap],
    in_use: bool,
) -> BlockResult<Prepared> {
    let mut p = Prepared {
        new: Vec::with_capacity(bitmaps.len()),
        kept: Vec::new(),
        fresh: Vec::new(),
        writes: Vec::new(),
        ext: None,
        noop: bitmaps.is_empty() && stored.ext.is_none(),
    };
    if p.noop {
        return Ok(p);
    }
    if meta.header.version < 3 {
        return Err(BlockError::invalid(
            "Cannot store dirty bitmaps in qcow2 v2 files",
        ));
    }
    if bitmaps.len() > MAX_BITMAPS as usize {
        return Err(BlockError::invalid(format!(
            "Cannot store more than {MAX_BITMAPS} persistent bitmaps"
        )));
    }
    let cs = meta.geo.cluster_size();
    let res = (|| {
        for b in bitmaps {
            let old = stored.bitmaps.iter().position(|s| s.entry.name == b.name());
            if b.state.inconsistent {
                if let Some(i) = old {
                    p.kept.push(i);
                    p.new.push(stored.bitmaps[i].clone());
                }
                continue;
            }
            let old = old.map(|i| &stored.bitmaps[i].entry);
            let mut sb = lay_out_bitmap(f, meta, b, old, &mut p.fresh, &mut p.writes)?;
            if in_use {
                sb.entry.flags |= FLAG_IN_USE;
            }
            p.new.push(sb);
        }
        let raw = serialize_directory(p.new.iter().map(|b| &b.entry));
        if raw.len() as u64 > MAX_DIRECTORY_SIZE {
            return Err(BlockError::invalid(
                "Not enough space in the bitmap directory",
            ));
        }
        if !p.new.is_empty() {
            let clusters = (raw.len() as u64).div_ceil(cs);
            let off = meta.alloc(f, clusters)?;
            p.fresh.push((off, clusters * cs));
            p.ext = Some(BitmapsExt {
                nb_bitmaps: p.new.len() as u32,
                directory_size: raw.len() as u64,
                directory_offset: off,
            });
            p.writes.push((off, raw, "bitmap directory"));
        }
        Ok(())
    })();
    // The new clusters' refcounts go out now; [`write`]'s flush makes
    // them stable with the data.
    match res.and_then(|()| meta.write_back(f)) {
        Ok(()) => Ok(p),
        Err(e) => {
            abandon(f, meta, p);
            Err(e)
        }
    }
}

/// Writes a prepared store's bytes and flushes them with their refcounts
/// (no lock needed: nothing refers to these clusters yet).
pub fn write(f: &HostFile, p: &Prepared) -> BlockResult<()> {
    for (off, data, what) in &p.writes {
        f.write(data, *off, what)?;
    }
    if p.noop {
        return Ok(());
    }
    f.sync()
}

/// Gives back a prepared store's clusters (it will not happen).
pub fn abandon(f: &HostFile, meta: &mut Meta, p: Prepared) {
    for (off, len) in p.fresh {
        let _ = meta.refs.free_range(f, off, len);
    }
}

/// What a switch replaced: freed by [`finish`] once the new header is
/// on disk (freed earlier, the clusters could be reused while a crash
/// would still find the old directory pointing at them).
pub struct Replaced {
    old: Stored,
    kept: Vec<usize>,
    /// Whether a header was written (nothing to store: none).
    pub switched: bool,
}

/// Switches the image to a written, flushed store (under the metadata
/// lock): one header write, with `header`'s last changes, not flushed
/// (the caller flushes without the lock, then calls [`finish`]).
pub fn switch(
    f: &HostFile,
    meta: &mut Meta,
    stored: &mut Stored,
    p: Prepared,
    header: &mut dyn FnMut(&mut Header),
) -> BlockResult<Replaced> {
    if p.noop {
        return Ok(Replaced {
            old: Stored::default(),
            kept: Vec::new(),
            switched: false,
        });
    }
    let res = (|| {
        // A refcount table that moved since must be stable before the
        // header names it (rare: the write made at prepare covers the rest).
        let moved = meta.refs.table_offset != meta.header.refcount_table_offset;
        meta.write_back(f)?;
        if moved {
            f.sync()?;
        }
        let mut h = meta.header.clone();
        h.refcount_table_offset = meta.refs.table_offset;
        h.refcount_table_clusters = meta.refs.table_clusters;
        set_extension(&mut h, p.ext);
        header(&mut h);
        let bytes = h.serialize()?;
        Ok((h, bytes))
    })();
    let h = match res {
        Ok((h, bytes)) => {
            // The point of no return: once the header write was attempted,
            // the new clusters may be referenced, so a failure leaks them
            // rather than freeing them.
            f.write(&bytes, 0, "header")?;
            h
        }
        Err(e) => {
            // Give back what we took; the old directory is still current.
            abandon(f, meta, p);
            return Err(e);
        }
    };
    meta.header = h;
    let old = std::mem::replace(
        stored,
        Stored {
            ext: p.ext,
            bitmaps: p.new,
        },
    );
    Ok(Replaced {
        old,
        kept: p.kept,
        switched: true,
    })
}

/// After the new header is flushed: frees the old directory's clusters.
pub fn finish(f: &HostFile, meta: &mut Meta, r: Replaced) -> BlockResult<()> {
    free_old(f, meta, &r.old, &r.kept)?;
    // No sync of its own: losing these refcount drops in a crash only
    // leaks the old clusters, and the caller's flush makes them stable.
    meta.write_back(f)
}

/// Lays out one bitmap: its data clusters (all-zero clusters become 0
/// entries, as qemu stores them) and its table, allocated and queued in
/// `writes`; returns its new directory entry.
fn lay_out_bitmap(
    f: &HostFile,
    meta: &mut Meta,
    b: &DirtyBitmap,
    old: Option<&DirEntry>,
    fresh: &mut Vec<(u64, u64)>,
    writes: &mut Vec<(u64, Vec<u8>, &'static str)>,
) -> BlockResult<StoredBitmap> {
    if c_len(b.name()) > MAX_NAME_SIZE {
        return Err(BlockError::invalid(format!(
            "Can't store bitmap '{}': Name length exceeds maximum ({MAX_NAME_SIZE} characters)",
            b.name()
        )));
    }
    let cs = meta.geo.cluster_size();
    check_size(b.size(), b.granularity(), cs).map_err(|e| BlockError {
        context: format!("Can't store bitmap '{}': {}", b.name(), e.context),
        ..e
    })?;
    let gbits = b.granularity_shift() as u8;
    let (bytes, clusters) = data_geometry(b.size(), gbits, cs);
    let mut table = Vec::with_capacity(clusters as usize);
    for i in 0..clusters {
        let at = i * cs;
        let granule = at * 8;
        if b.is_range_zero(granule, cs * 8) {
            table.push(encode(Cluster::Zeros));
            continue;
        }
        let n = cs.min(bytes - at);
        let mut data = b
            .serialize_range(granule, n)
            .map_err(|e| BlockError::invalid(e.message))?;
        data.resize(cs as usize, 0);
        let off = meta.alloc(f, 1)?;
        fresh.push((off, cs));
        writes.push((off, data, "bitmap data"));
        table.push(encode(Cluster::Data(off)));
    }
    let mut raw = Vec::with_capacity(table.len() * 8);
    for t in &table {
        raw.extend_from_slice(&t.to_be_bytes());
    }
    let tclusters = (raw.len() as u64).div_ceil(cs).max(1);
    raw.resize((tclusters * cs) as usize, 0);
    let table_offset = meta.alloc(f, tclusters)?;
    fresh.push((table_offset, tclusters * cs));
    writes.push((table_offset, raw, "bitmap table"));
    let mut flags = if b.state.recording { FLAG_AUTO } else { 0 };
    // Extra data the entry had (known compatible, or it would be
    // inconsistent) is kept as it was.
    let extra_data = old.map(|o| o.extra_data.clone()).unwrap_or_default();
    if !extra_data.is_empty() {
        flags |= FLAG_EXTRA_DATA_COMPATIBLE;
    }
    Ok(StoredBitmap {
        entry: DirEntry {
            table_offset,
            table_size: clusters as u32,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: gbits,
            name: b.name().to_owned(),
            // A name read from disk goes back as the bytes it was read
            // from, which need not be qemu's bytes for the shown name.
            name_bytes: old.map_or_else(|| c_bytes(b.name()), |o| o.name_bytes.clone()),
            extra_data,
        },
        table,
        inconsistent: false,
    })
}

/// Frees the clusters of the previous directory and of every bitmap not in
/// `kept` (inconsistent bitmaps whose clusters live on).
fn free_old(f: &HostFile, meta: &mut Meta, old: &Stored, kept: &[usize]) -> BlockResult<()> {
    let cs = meta.geo.cluster_size();
    if let Some(ext) = old.ext {
        meta.refs
            .free_range(f, ext.directory_offset, ext.directory_size.max(1))?;
    }
    for (i, b) in old.bitmaps.iter().enumerate() {
        if kept.contains(&i) {
            continue;
        }
        for &t in &b.table {
            let off = super::table::data_offset(t);
            if off != 0 {
                meta.refs.free_range(f, off, cs)?;
            }
        }
        let tbytes = u64::from(b.entry.table_size) * 8;
        meta.refs
            .free_range(f, b.entry.table_offset, tbytes.max(1))?;
    }
    Ok(())
}
