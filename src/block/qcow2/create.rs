//! New images with the layout `qemu-img create` gives them: header in
//! cluster 0, refcount table from cluster 1, refcount blocks after it, then
//! the L1 table (the file ends right after the L1 entries).

use std::fs::OpenOptions;
use std::path::Path;

use super::header::*;
use super::resolve_backing;
use crate::block::lock::{ImageLock, LockMode};
use crate::block::open::{probe, Format};
use crate::block::{BlockError, BlockResult};

/// What `qemu-img create -f qcow2` takes (the subset tidemark supports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Default 65536; a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// `compat=0.10` (version 2) when true, else `compat=1.1` (version 3).
    pub compat_v2: bool,
    pub backing_file: Option<String>,
    /// "raw" or "qcow2"; probed from the backing file when `None`.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            compat_v2: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Creates (or truncates and rewrites) a qcow2 image at `path`.
pub fn create_qcow2(path: &Path, opts: &CreateOptions) -> BlockResult<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(BlockError::invalid(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {})",
            cs
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let (size, backing_format) = backing_facts(path, opts)?;
    let size = size.ok_or_else(|| BlockError::invalid("Image size must be given"))?;
    if size % 512 != 0 {
        return Err(BlockError::invalid(
            "Image size must be a multiple of 512 bytes",
        ));
    }
    let l2_entries = cs / 8;
    let l1_size = size.div_ceil(cs).div_ceil(l2_entries);
    let l1_bytes = l1_size * 8;
    if l1_bytes > super::meta::MAX_L1_BYTES {
        return Err(BlockError::invalid(format!(
            "Image size {} is too large for a cluster size of {}",
            size, cs
        )));
    }
    let l1_clusters = l1_bytes.div_ceil(cs);
    // Refcount blocks and table must cover all of the metadata (fixed point).
    let epb = cs * 8 / 16;
    let (mut rt, mut nb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + nb + l1_clusters;
        let nb2 = total.div_ceil(epb);
        let rt2 = (nb2 * 8).div_ceil(cs);
        if (nb2, rt2) == (nb, rt) {
            break;
        }
        (nb, rt) = (nb2, rt2);
    }
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = rb_off + nb * cs;
    let total = 1 + rt + nb + l1_clusters;

    let mut header = Header {
        version: if opts.compat_v2 { 2 } else { 3 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: 4,
        header_length: if opts.compat_v2 {
            V2_HEADER_LEN
        } else {
            V3_HEADER_LEN + 8
        },
        compression_type: 0,
        extra_fields: if opts.compat_v2 {
            Vec::new()
        } else {
            vec![0; 8]
        },
        extensions: Vec::new(),
        backing_file: opts.backing_file.clone(),
    };
    if let Some(fmt) = backing_format {
        header.extensions.push(Extension {
            kind: EXT_BACKING_FORMAT,
            data: fmt.into_bytes(),
        });
    }
    if !opts.compat_v2 {
        header.extensions.push(Extension {
            kind: EXT_FEATURE_TABLE,
            data: default_feature_table(),
        });
    }
    let head = header.serialize()?;

    let mut img = vec![0u8; (l1_off + l1_bytes) as usize];
    img[..head.len()].copy_from_slice(&head);
    for i in 0..nb {
        let at = (rt_off + i * 8) as usize;
        img[at..at + 8].copy_from_slice(&(rb_off + i * cs).to_be_bytes());
    }
    for c in 0..total {
        let at = (rb_off + c * 2) as usize;
        img[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    write_new_file(path, &img)
}

/// The virtual size (given, or the backing file's) and the backing format
/// to record.
fn backing_facts(path: &Path, opts: &CreateOptions) -> BlockResult<(Option<u64>, Option<String>)> {
    let Some(name) = &opts.backing_file else {
        return Ok((opts.size, None));
    };
    let full = resolve_backing(path, name);
    let format = match opts.backing_format.as_deref() {
        Some("raw") => Format::Raw,
        Some("qcow2") => Format::Qcow2,
        Some(other) => {
            return Err(BlockError::not_supported(format!(
                "Unknown backing format '{}'",
                other
            )))
        }
        None => probe(&full)?,
    };
    let size = match opts.size {
        Some(s) => Some(s),
        None => {
            let node = crate::block::chain::open_chain(&full, Some(format), true)?;
            Some(node.size())
        }
    };
    Ok((size, Some(format.name().to_string())))
}

/// Creates (or truncates) a raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> BlockResult<()> {
    use std::os::unix::fs::FileExt;
    let f = open_locked(path)?;
    f.set_len(size)
        .map_err(|e| BlockError::io(format!("Could not resize '{}'", path.display()), e))?;
    // qemu allocates the first block of a new raw image (so later opens can
    // probe the alignment); its map then starts with 4 KiB of data.
    let first = vec![0u8; size.min(4096) as usize];
    f.write_all_at(&first, 0)
        .map_err(|e| BlockError::io(format!("Could not write '{}'", path.display()), e))
}

fn open_locked(path: &Path) -> BlockResult<std::fs::File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| BlockError::io(format!("Could not create '{}'", path.display()), e))?;
    ImageLock::acquire(&f, path, LockMode::Write)?;
    f.set_len(0)
        .map_err(|e| BlockError::io(format!("Could not truncate '{}'", path.display()), e))?;
    Ok(f)
}

fn write_new_file(path: &Path, bytes: &[u8]) -> BlockResult<()> {
    use std::os::unix::fs::FileExt;
    let f = open_locked(path)?;
    f.write_all_at(bytes, 0)
        .and_then(|_| f.sync_all())
        .map_err(|e| BlockError::io(format!("Could not write '{}'", path.display()), e))
}
