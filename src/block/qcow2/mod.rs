//! qcow2 images (docs/interop/qcow2.txt), versions 2 and 3.
//!
//! - header.rs: header and extensions, parsed and written back;
//! - io.rs: positioned file I/O with errors that name file and offset;
//! - tables.rs: what an L1/L2 entry means; cache.rs: bounded table cache;
//! - refcount.rs: refcounts and the cluster allocator; meta.rs: the L1/L2
//!   state behind the node's mutex, and the metadata write-back order;
//! - read.rs, write.rs, status.rs: the [`BlockNode`] operations;
//! - compress.rs: compressed clusters; create.rs: new images;
//! - bitmaps/: the persistent dirty bitmaps extension.
//!
//! Concurrency: metadata sits behind one mutex, held only for table
//! lookups and updates (and the rare metadata I/O: table loads, evictions,
//! frees); data I/O happens outside it. An allocating write claims its
//! guest clusters (`allocating`) and writes the new clusters' data without
//! the lock. Operations that free clusters take `free_lock` exclusively so
//! no in-flight read or write can touch a cluster while it is freed and
//! handed out again. Reads and in-place overwrites whose tables are cached
//! are served on the async worker when nothing needs waiting for.

pub mod bitmaps;
mod cache;
pub mod compress;
pub mod create;
pub mod header;
pub mod intent;
pub(crate) mod io;
pub(crate) mod meta;
mod read;
mod refcount;
mod status;
pub mod tables;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use self::header::*;
use self::io::HostFile;
use self::meta::Meta;
use self::tables::Geometry;
use super::file::FileNode;
use super::link::{Child, ChildRole};
use super::node::Node;
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};

pub struct Qcow2Node {
    /// The `file` child: the image file, through its node.
    f: HostFile,
    meta: Mutex<Meta>,
    /// The bitmap directory as on disk; locked after `meta`, never before.
    stored: Mutex<bitmaps::Stored>,
    free_lock: RwLock<()>,
    /// Guest clusters (in cluster units) whose allocation is in progress:
    /// an allocating write holds them from finding them without data until
    /// its L2 entries point at the new clusters, so no other write
    /// allocates them meanwhile (one of the two would be lost). Locked
    /// after `meta`; nothing waits for `meta` while holding it.
    allocating: super::range_lock::RangeLock,
    /// The `backing` child; swapped whole only when a backing is attached
    /// or removed (a snapshot's overlay, a full stream). Requests clone the
    /// edge and hold its link, so a swap drains the old edge first.
    backing: RwLock<Option<Arc<Child>>>,
    read_only: AtomicBool,
    /// Virtual size; grows with [`Qcow2Node::grow_to`].
    size: AtomicU64,
    geo: Geometry,
    compression: u8,
    header: Header,
    /// The intent log of the image's persistent bitmaps.
    intent: intent::IntentLog,
    /// What the log recovered at open: bitmap name, bytes added.
    recovered: Mutex<Vec<(String, u64)>>,
    /// Whether the image looks metadata-preallocated (see status.rs).
    prealloc: OnceLock<bool>,
}

impl Qcow2Node {
    /// Opens a qcow2 image file (and a `file` node for it) without its
    /// backing file; the chain opener attaches that with
    /// [`Qcow2Node::attach_backing`].
    pub fn open(path: &Path, read_only: bool) -> BlockResult<Qcow2Node> {
        let file = Node::open("", Arc::new(FileNode::open(path, read_only)?))?;
        Self::open_on(Arc::new(file), read_only)
    }

    /// Opens read-only without taking the image locks, as qemu-img's `-U`
    /// (force share): for looking at an image another process has open,
    /// e.g. its bitmaps marked in use. What it reads may be changing.
    pub fn open_force_share(path: &Path) -> BlockResult<Qcow2Node> {
        let file = Node::open("", Arc::new(FileNode::open_force_share(path)?))?;
        Self::open_on(Arc::new(file), true)
    }

    /// Opens the qcow2 image stored in `file` (its `file` child).
    pub fn open_on(file: Arc<Node>, read_only: bool) -> BlockResult<Qcow2Node> {
        if !read_only && file.read_only() {
            return Err(BlockError::new(
                ErrorKind::Permission,
                "Block node is read-only",
            ));
        }
        let f = HostFile::new(file)?;
        let path = f.path.clone();
        let path = path.as_path();
        let file_len = f.len()?;
        let mut first = vec![0u8; file_len.min(1 << MAX_CLUSTER_BITS) as usize];
        f.read_partial(&mut first, 0)?;
        let ctx = |e: BlockError| {
            let named = format!("'{}'", path.display());
            if e.context.starts_with(&named) {
                return e;
            }
            BlockError {
                context: format!("{named}: {}", e.context),
                ..e
            }
        };
        // Not a qcow2 at all: qemu's text alone, as its QMP gives it.
        let header =
            Header::parse(&first).map_err(|e| if e.context == NOT_QCOW2 { e } else { ctx(e) })?;
        check_features(&header, read_only).map_err(ctx)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            version: header.version,
            extended_l2: header.incompatible & INCOMPAT_EXTL2 != 0,
        };
        // Checked before anything is written: a corrupt directory fails
        // the open and leaves the image as it was.
        let stored = bitmaps::check_directory(&f, &header).map_err(ctx)?;
        let meta = Meta::load(&f, header.clone(), geo).map_err(ctx)?;
        let node = Qcow2Node {
            f,
            meta: Mutex::new(meta),
            stored: Mutex::new(stored),
            free_lock: RwLock::new(()),
            allocating: super::range_lock::RangeLock::default(),
            backing: RwLock::new(None),
            read_only: AtomicBool::new(true),
            size: AtomicU64::new(header.size),
            geo,
            compression: header.compression_type,
            intent: intent::IntentLog::new(header.size, header.cluster_size()),
            recovered: Mutex::new(Vec::new()),
            header,
            prealloc: OnceLock::new(),
        };
        if !read_only {
            node.become_writable().map_err(ctx)?;
        }
        Ok(node)
    }

    /// What a writer does first (at a read-write open, or a reopen
    /// read-write): recovers the bitmaps a crash left in use if the
    /// intent log covers them; clears the autoclear bits it does not know,
    /// a stale bitmaps extension (the spec's rule for writers; qemu drops
    /// stale bitmaps too) and a stale intent log; then marks the stored
    /// bitmaps in use.
    fn become_writable(&self) -> BlockResult<()> {
        check_features(&self.header, false)?;
        let mut meta = self.lock_meta()?;
        self.recover_from_log(&mut meta)?;
        let known = match intent::enabled() {
            true => KNOWN_AUTOCLEAR | intent::AUTOCLEAR_INTENT,
            false => KNOWN_AUTOCLEAR,
        };
        let stale = bitmaps::load::is_stale(&meta.header);
        // Whatever log recovery left is not current (qemu wrote the image,
        // or it is unreadable, or there was nothing to recover).
        let old_log = meta.header.extension(intent::EXT_TIDEMARK_INTENT).is_some();
        // The bitmaps about to be marked in use need a fresh log first.
        let install = intent::enabled()
            && meta.header.version >= 3
            && !stale
            && !self.lock_stored()?.bitmaps.is_empty();
        if meta.header.autoclear & !known != 0 || stale || old_log || install {
            meta.header.autoclear &= known & !intent::AUTOCLEAR_INTENT;
            meta.header
                .set_own_extension(intent::EXT_TIDEMARK_INTENT, None);
            let mut stored = self.lock_stored()?;
            if stale {
                bitmaps::store::set_extension(&mut meta.header, None);
                *stored = bitmaps::Stored::default();
            }
            if install {
                let mut disk = self.intent.lock_disk();
                self.intent.reset(&mut disk);
                disk.untrusted = stored.inconsistent_names();
                let payload = disk.combined(self.intent.shift);
                meta.header
                    .set_own_extension(intent::EXT_TIDEMARK_INTENT, Some(payload.encode()));
                meta.header.autoclear |= intent::AUTOCLEAR_INTENT;
                disk.installed = true;
            }
            let bytes = meta.header.serialize()?;
            self.f.write(&bytes, 0, "header")?;
            self.f.sync()?;
        }
        let mut stored = self.lock_stored()?;
        bitmaps::store::mark_in_use(&self.f, &mut stored)?;
        drop(stored);
        drop(meta);
        self.read_only.store(false, Ordering::Release);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// The header as it is now (the backing name and the size change
    /// while the image is open).
    pub fn header(&self) -> Header {
        match self.meta.lock() {
            Ok(m) => m.header.clone(),
            Err(_) => self.header.clone(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.f.path
    }

    /// The node holding the image file.
    pub fn file_node(&self) -> Arc<Node> {
        self.f.child.node()
    }

    /// The backing file name resolved as qemu does: relative names are
    /// relative to the directory of this image.
    pub fn backing_path(&self) -> Option<PathBuf> {
        self.header()
            .backing_file
            .map(|name| resolve_backing(&self.f.path, &name))
    }

    pub fn backing_format(&self) -> Option<String> {
        self.header().backing_format()
    }

    /// The backing node as it is now.
    pub fn below_node(&self) -> Option<Arc<Node>> {
        self.backing().map(|c| c.node())
    }

    /// The backing edge as it is now.
    pub(crate) fn backing(&self) -> Option<Arc<Child>> {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Attaches, replaces or removes the backing node in the graph (not
    /// in the header: see [`Qcow2Node::rewrite_backing_name`]). Requests
    /// inside the old backing finish first. Blocks: not on an async worker.
    pub fn attach_backing(&self, backing: Option<Arc<Node>>) {
        let old = self.backing();
        match (&old, backing) {
            (Some(c), Some(b)) => c.link.write().set(b),
            (None, None) => {}
            (_, b) => {
                let _drained = old.as_ref().map(|c| c.link.write());
                *self.backing.write().unwrap_or_else(|p| p.into_inner()) =
                    b.map(|b| Child::new(ChildRole::Backing, b));
            }
        }
    }

    /// Changes the header with `change` and writes it back, synced before
    /// it returns (the metadata it points at first).
    fn rewrite_header(&self, change: impl FnOnce(&mut Header)) -> BlockResult<()> {
        self.check_writable()?;
        let mut meta = self.lock_meta()?;
        let mut h = meta.header.clone();
        change(&mut h);
        let bytes = h.serialize()?;
        meta.write_back(&self.f)?;
        self.f.write(&bytes, 0, "header")?;
        self.f.sync()?;
        meta.header = h;
        Ok(())
    }

    /// Rewrites the backing file name and format in the header (qemu's
    /// bdrv_change_backing_file).
    fn rewrite_backing_name(&self, name: Option<&str>, format: Option<&str>) -> BlockResult<()> {
        if name.is_some_and(|n| n.len() > MAX_BACKING_NAME as usize) {
            return Err(BlockError::invalid("Backing file name too long"));
        }
        self.rewrite_header(|h| {
            h.backing_file = name.map(str::to_owned);
            h.set_extension(
                EXT_BACKING_FORMAT,
                name.and(format).map(|f| f.as_bytes().to_vec()),
            );
        })
    }

    fn vsize(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the virtual size (like `qemu-img resize` without shrinking),
    /// moving the L1 table to a larger one when it no longer covers it.
    pub fn grow_to(&self, new_size: u64) -> BlockResult<()> {
        self.check_writable()?;
        let _guard = self
            .free_lock
            .write()
            .map_err(|_| BlockError::corrupt("qcow2 free lock poisoned"))?;
        let old = self.vsize();
        if new_size < old {
            return Err(BlockError::not_supported(
                "shrinking a qcow2 image is not supported",
            ));
        }
        if !new_size.is_multiple_of(512) {
            return Err(BlockError::invalid(
                "the new size must be a multiple of 512 bytes",
            ));
        }
        let mut meta = self.lock_meta()?;
        if meta.corrupt {
            return Err(BlockError::corrupt(
                "the image was found corrupt; writes are refused",
            ));
        }
        if new_size != old && !self.stored_bitmaps().is_empty() {
            // Stored bitmap tables are sized for the old size; qemu resizes
            // the bitmaps with the image, which needs the node's in-memory
            // bitmaps. Until that exists, refuse rather than leave tables
            // that no longer match (the image would not open again).
            return Err(BlockError::not_supported(
                "resizing an image with persistent dirty bitmaps is not supported yet",
            ));
        }
        let needed = new_size
            .div_ceil(self.geo.cluster_size())
            .div_ceil(self.geo.l2_entries());
        if needed > meta.l1.len() as u64 {
            let r = meta.grow_l1(&self.f, needed);
            if let Err(e) = &r {
                self.signal_corruption(&mut meta, e);
            }
            r?;
        }
        meta.write_back(&self.f)?;
        self.f.sync()?;
        self.f.write(&new_size.to_be_bytes(), 24, "header")?;
        self.f.sync()?;
        meta.header.size = new_size;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn lock_meta(&self) -> BlockResult<MutexGuard<'_, Meta>> {
        self.meta
            .lock()
            .map_err(|_| BlockError::new(ErrorKind::Io, "qcow2 metadata lock poisoned"))
    }

    fn check_writable(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Err(BlockError::new(
                ErrorKind::Permission,
                format!("'{}' is opened read-only", self.f.path.display()),
            ));
        }
        Ok(())
    }

    /// Marks the image corrupt on disk (v3) after corruption was found
    /// while writing, as qemu does; later writes are refused.
    fn signal_corruption(&self, meta: &mut Meta, err: &BlockError) {
        if err.kind != ErrorKind::Corrupt || meta.corrupt {
            return;
        }
        meta.corrupt = true;
        tracing::error!(
            "'{}': {}; the image is marked corrupt",
            self.f.path.display(),
            err
        );
        if !self.is_read_only() && self.geo.version >= 3 {
            let bits = (meta.header.incompatible | INCOMPAT_CORRUPT).to_be_bytes();
            let _ = self
                .f
                .write(&bits, 72, "header")
                .and_then(|_| self.f.sync());
        }
    }
}

/// Joins a backing file name to the directory of the image that names it,
/// unless it is absolute (qemu's rule for relative backing names).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    // qemu's path_has_protocol: "json:{...}", "nbd:..." stay as written.
    let has_protocol = name
        .find([':', '/', '\\'])
        .is_some_and(|i| name.as_bytes()[i] == b':');
    if p.is_absolute() || has_protocol {
        return p.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_owned(),
    }
}

fn check_features(h: &Header, read_only: bool) -> BlockResult<()> {
    if h.crypt_method != 0 {
        return Err(BlockError::not_supported(
            "encrypted qcow2 images are not supported",
        ));
    }
    let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
    let unknown = h.incompatible & !known;
    if unknown != 0 {
        let names: Vec<String> = (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| h.feature_name(0, b))
            .collect();
        return Err(BlockError::not_supported(format!(
            "Unsupported qcow2 feature(s): {}",
            names.join(", ")
        )));
    }
    let ct = h.compression_type;
    let has_ct = h.incompatible & INCOMPAT_COMPRESSION != 0;
    if (has_ct && ct != compress::TYPE_ZSTD) || (!has_ct && ct != 0) {
        return Err(BlockError::corrupt(format!(
            "compression type {} does not match the compression type feature bit",
            ct
        )));
    }
    if h.incompatible & INCOMPAT_EXTL2 != 0 && h.cluster_bits < 14 {
        return Err(BlockError::corrupt(
            "extended L2 entries need a cluster size of at least 16 KiB",
        ));
    }
    if read_only {
        return Ok(());
    }
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(BlockError::corrupt(
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 {
        return Err(BlockError::new(
            ErrorKind::Permission,
            "the image is dirty (lazy refcounts were in use); tidemark does not repair \
             refcounts: run 'qemu-img check -r all' first, or open it read-only",
        ));
    }
    if h.incompatible & INCOMPAT_EXTL2 != 0 {
        return Err(BlockError::not_supported(
            "images with extended L2 entries (subclusters) can only be opened read-only",
        ));
    }
    if h.nb_snapshots != 0 {
        return Err(BlockError::not_supported(
            "images with internal snapshots can only be opened read-only",
        ));
    }
    Ok(())
}

impl BlockNode for Qcow2Node {
    fn size(&self) -> u64 {
        self.vsize()
    }

    fn read_only(&self) -> bool {
        self.is_read_only()
    }

    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if read_only == self.is_read_only() {
            return Ok(());
        }
        if read_only {
            // The node above stores its bitmaps first (they are its own);
            // here only the metadata must reach the disk.
            self.flush()?;
            self.read_only.store(true, Ordering::Release);
            return Ok(());
        }
        if self.f.child.get().read_only() {
            return Err(BlockError::new(
                ErrorKind::Permission,
                format!("'{}': the file node is read-only", self.f.path.display()),
            ));
        }
        self.become_writable()
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> BlockResult<()> {
        self.attach_backing(backing);
        Ok(())
    }

    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> BlockResult<()> {
        self.rewrite_backing_name(name, format)
    }

    fn backing_file(&self) -> Option<String> {
        self.header().backing_file
    }

    fn checkpoint_record(&self) -> Option<Vec<u8>> {
        self.header()
            .extension(EXT_TIDEMARK_CHECKPOINTS)
            .map(<[u8]>::to_vec)
    }

    fn set_checkpoint_record(&self, record: Option<Vec<u8>>) -> BlockResult<()> {
        self.rewrite_header(|h| h.set_own_extension(EXT_TIDEMARK_CHECKPOINTS, record))
    }

    fn children(&self) -> Vec<Arc<Child>> {
        std::iter::once(self.f.child.clone())
            .chain(self.backing())
            .collect()
    }

    fn filename(&self) -> Option<PathBuf> {
        Some(self.f.path.clone())
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.write_compressed_cluster(buf, offset)
    }

    fn compressed_cluster(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn image_info(&self) -> Option<serde_json::Value> {
        let info = crate::info::qcow2_info(
            self,
            self.f.path.display().to_string(),
            self.allocated_size().unwrap_or(0),
        );
        serde_json::to_value(info).ok()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.f.allocated()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.read_range(buf, offset)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.read_nowait(buf, offset)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        self.write_nowait(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.write_range(buf, offset)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.zero_range(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.discard_range(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let mut meta = self.lock_meta()?;
        meta.write_back(&self.f)?;
        drop(meta);
        self.f.sync()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.status(offset, len)
    }

    fn try_block_status_nowait(&self, offset: u64, len: u64) -> Option<Extent> {
        self.status_nowait(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.depth(offset, len)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn load_bitmaps(&self) -> BlockResult<Vec<crate::bitmap::DirtyBitmap>> {
        self.load_stored_bitmaps()
    }

    fn can_store_bitmap(&self, name: &str, granularity: u64) -> BlockResult<()> {
        self.check_can_store(name, granularity)
    }

    fn store_bitmaps(&self, bitmaps: &[&crate::bitmap::DirtyBitmap]) -> BlockResult<()> {
        self.store_bitmaps_at(bitmaps, false)
    }

    fn mark_bitmaps_in_use(&self) -> BlockResult<()> {
        self.mark_stored_in_use()
    }

    fn intent_mark(&self, ranges: &[(u64, u64)]) -> BlockResult<()> {
        self.log_write(ranges)
    }

    fn intent_ready(&self, offset: u64, len: u64) -> bool {
        !intent::enabled() || self.intent.is_durable(offset, len)
    }

    fn intent_new_epoch(&self) {
        self.log_new_epoch();
    }

    fn logs_intents(&self) -> bool {
        intent::enabled() && !self.is_read_only()
    }

    fn intent_marked(&self) -> bool {
        self.intent.any_marked()
    }

    fn store_point(&self, bitmaps: &[&crate::bitmap::DirtyBitmap]) -> BlockResult<()> {
        self.store_bitmaps_at(bitmaps, true)
    }

    fn recovered_bitmaps(&self) -> Vec<(String, u64)> {
        self.recovered.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Qcow2Node {
    /// The last reference may drop anywhere, a tokio worker included (an
    /// NBD session ending, a task dropping a root): the flush then runs
    /// through `block_in_place`, which hands the worker's other tasks to
    /// another thread first, so no worker blocks on it. On other threads
    /// (the blocking pool, the CLI) it just runs. The daemon's close path
    /// stores and flushes on a blocking thread before this.
    fn drop(&mut self) {
        if self.is_read_only() {
            return;
        }
        let flush = || {
            if let Err(e) = self.flush() {
                tracing::error!("'{}': flush on close failed: {}", self.f.path.display(), e);
            }
        };
        match tokio::runtime::Handle::try_current() {
            // A current-thread runtime has no other thread to hand its
            // tasks to (block_in_place would panic there): tests only.
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(flush)
            }
            _ => flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::create::{create_qcow2, CreateOptions};
    use super::*;
    use crate::block::{STATE_HOLE, STATE_ZERO};

    fn new_image(dir: &Path, size: u64, cluster_size: u64) -> PathBuf {
        let path = dir.join("t.qcow2");
        let opts = CreateOptions {
            size: Some(size),
            cluster_size,
            ..Default::default()
        };
        create_qcow2(&path, &opts).expect("create");
        path
    }

    #[test]
    fn compressed_clusters_read_back_and_refuse_overwriting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 4 << 20, 65536);
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        {
            let node = Qcow2Node::open(&path, false).expect("open");
            node.write_compressed(&data, 65536)
                .expect("compressed write");
            let e = node
                .write_compressed(&data, 65536)
                .expect_err("allocated already");
            assert_eq!(e.context, "Compression can't overwrite anything");
            // Incompressible data goes in as a plain cluster.
            let noise: Vec<u8> = (0..65536u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            node.write_compressed(&noise, 3 * 65536)
                .expect("plain write");
        }
        let node = Qcow2Node::open(&path, true).expect("reopen");
        let mut buf = vec![0u8; 65536];
        node.read_at(&mut buf, 65536).expect("read");
        assert_eq!(buf, data);
    }

    #[test]
    fn writes_read_back_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 8 << 20, 4096);
        {
            let node = Qcow2Node::open(&path, false).expect("open");
            node.write_at(&[0xab; 10_000], 4000, false).expect("write");
            node.write_at(&[0xcd; 100], 5000, false).expect("overwrite");
        }
        let node = Qcow2Node::open(&path, true).expect("reopen");
        let mut buf = vec![0u8; 16_000];
        node.read_at(&mut buf, 0).expect("read");
        assert!(buf[..4000].iter().all(|&b| b == 0));
        assert!(buf[4000..5000].iter().all(|&b| b == 0xab));
        assert!(buf[5000..5100].iter().all(|&b| b == 0xcd));
        assert!(buf[5100..14_000].iter().all(|&b| b == 0xab));
        assert!(buf[14_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn zeroes_and_discards_become_zero_clusters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 1 << 20, 4096);
        let node = Qcow2Node::open(&path, false).expect("open");
        node.write_at(&[1; 65536], 0, false).expect("write");
        node.write_zeroes(4096, 8192, ZeroFlags::default())
            .expect("zero");
        node.discard(16384, 4096).expect("discard");
        let e = node.block_status(0, 1 << 20).expect("status");
        assert_eq!(
            e,
            Extent {
                len: 4096,
                flags: 0
            }
        );
        let e = node.block_status(4096, 1 << 20).expect("status");
        assert_eq!(e.len, 8192);
        assert_eq!(e.flags, STATE_HOLE | STATE_ZERO);
        let mut buf = vec![9u8; 4096];
        node.read_at(&mut buf, 16384).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        let d = node.allocation_depth(65536, 1 << 20).expect("depth");
        assert_eq!(
            d,
            DepthExtent {
                len: (1 << 20) - 65536,
                depth: 0
            }
        );
    }

    #[test]
    fn empty_terabyte_image_maps_in_one_extent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 1 << 40, 65536);
        let node = Qcow2Node::open(&path, true).expect("open");
        let e = node.block_status(0, 1 << 40).expect("status");
        assert_eq!(
            e,
            Extent {
                len: 1 << 40,
                flags: STATE_HOLE | STATE_ZERO
            }
        );
    }

    /// Seeded mutation of headers and tables: every outcome is a value or
    /// an error, never a panic (overflow checks are on in tests).
    #[test]
    fn mutated_images_never_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 4 << 20, 4096);
        {
            let node = Qcow2Node::open(&path, false).expect("open");
            node.write_at(&[5; 20_000], 3000, false).expect("write");
            node.write_zeroes(65536, 8192, ZeroFlags::default())
                .expect("zero");
        }
        let pristine = std::fs::read(&path).expect("read image");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; 4 << 20];
        for _ in 0..300 {
            let mut img = pristine.clone();
            for _ in 0..1 + rnd() % 4 {
                // Mostly the header and the first tables, sometimes anywhere.
                let span = if rnd() % 4 == 0 { img.len() } else { 5 * 4096 };
                let at = (rnd() % span.min(img.len()) as u64) as usize;
                let val = rnd();
                let n = 1 + (val % 8) as usize;
                for (i, b) in val.to_be_bytes()[..n].iter().enumerate() {
                    if let Some(t) = img.get_mut(at + i) {
                        *t = *b;
                    }
                }
            }
            if rnd() % 8 == 0 {
                img.truncate((rnd() % img.len() as u64) as usize);
            }
            std::fs::write(&path, &img).expect("write image");
            for ro in [true, false] {
                let Ok(node) = Qcow2Node::open(&path, ro) else {
                    continue;
                };
                let size = node.size().min(buf.len() as u64);
                let _ = node.read_at(&mut buf[..size as usize], 0);
                let mut at = 0;
                while at < size {
                    match node.block_status(at, size - at) {
                        Ok(e) => at += e.len,
                        Err(_) => break,
                    }
                }
                if !ro && size > 70_000 {
                    let _ = node.write_at(&[1; 5000], 60_000, false);
                    let _ = node.discard(0, 65536);
                    let _ = node.write_zeroes(4096, 10_000, ZeroFlags::default());
                    let _ = node.flush();
                }
            }
        }
    }

    #[test]
    fn read_only_nodes_refuse_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 1 << 20, 65536);
        let node = Qcow2Node::open(&path, true).expect("open");
        let e = node.write_at(&[1], 0, false).expect_err("read-only");
        assert_eq!(e.kind, ErrorKind::Permission);
    }

    #[test]
    fn out_of_range_requests_are_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 1 << 20, 65536);
        let node = Qcow2Node::open(&path, false).expect("open");
        let mut buf = [0u8; 16];
        let e = node.read_at(&mut buf, (1 << 20) - 8).expect_err("past end");
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(node.discard(u64::MAX - 4, 8).is_err());
    }

    /// Threads writing disjoint pieces of the same new clusters at once
    /// (copy-on-write from a backing file), while others read and
    /// overwrite: every piece lands, the rest reads as the backing file,
    /// and nothing leaks (each cluster is allocated once).
    #[test]
    fn concurrent_allocating_writes_to_one_cluster_keep_every_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_path = dir.path().join("base.raw");
        let base_data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base_path, &base_data).expect("base");
        let path = new_image(dir.path(), 8 << 20, 65536);
        let node = Qcow2Node::open(&path, false).expect("open");
        let base = Node::open(
            "base",
            Arc::new(super::super::file::FileNode::open(&base_path, true).expect("base node")),
        )
        .expect("base node");
        node.attach_backing(Some(Arc::new(base)));
        const PIECE: usize = 4096;
        const THREADS: usize = 8;
        // Round by round, every thread writes its pieces of the same new
        // cluster at once: piece t and t + THREADS of 16.
        let barrier = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (node, barrier) = (&node, &barrier);
                s.spawn(move || {
                    let mut buf = [0u8; PIECE];
                    for c in 0..32 {
                        barrier.wait();
                        for k in [c * 16 + t, c * 16 + t + THREADS] {
                            buf.fill(1 + (k % 200) as u8);
                            node.write_at(&buf, (k * PIECE) as u64, false)
                                .expect("write");
                            let mut back = [0u8; PIECE];
                            if node.try_read_nowait(&mut back, (k * PIECE) as u64) {
                                assert_eq!(back, buf, "piece {k} reads back without waiting");
                            }
                        }
                    }
                });
            }
        });
        let mut all = vec![0u8; 8 << 20];
        node.read_at(&mut all, 0).expect("read all");
        for k in 0..(2 << 20) / PIECE {
            let want = 1 + (k % 200) as u8;
            assert!(
                all[k * PIECE..(k + 1) * PIECE].iter().all(|&b| b == want),
                "piece {k}"
            );
        }
        assert_eq!(&all[2 << 20..], &base_data[2 << 20..]);
        // One allocation per cluster: header, L1, refcount table and
        // block, one L2 table, 32 data clusters.
        let mut meta = node.lock_meta().expect("meta");
        let used = (0..64u64)
            .filter(|&c| meta.refs.get(&node.f, c).unwrap_or(0) > 0)
            .count();
        drop(meta);
        assert!(used <= 5 + 32, "{used} clusters in use");
    }

    /// The no-wait paths serve cached mappings: an overwrite and a read
    /// of allocated clusters, a read of zero and unallocated ones.
    #[test]
    fn nowait_paths_serve_what_is_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = new_image(dir.path(), 4 << 20, 65536);
        let node = Qcow2Node::open(&path, false).expect("open");
        node.write_at(&[7u8; 65536], 65536, false)
            .expect("allocate");
        node.write_zeroes(3 * 65536, 65536, ZeroFlags::default())
            .expect("zero");
        // Filesystems without RWF_NOWAIT for buffered writes (ext4) say no.
        if !node.try_write_nowait(&[9u8; 4096], 65536 + 4096) {
            node.write_at(&[9u8; 4096], 65536 + 4096, false)
                .expect("overwrite");
        }
        // Not allocated: an allocation is never done without waiting.
        assert!(!node.try_write_nowait(&[9u8; 4096], 2 * 65536));
        let mut buf = vec![1u8; 4 * 65536];
        // The page cache may say no; when it says yes, it is right.
        if node.try_read_nowait(&mut buf, 0) {
            assert!(buf[..65536].iter().all(|&b| b == 0));
            assert!(buf[65536..65536 + 4096].iter().all(|&b| b == 7));
            assert!(buf[65536 + 4096..65536 + 8192].iter().all(|&b| b == 9));
            assert!(buf[3 * 65536..].iter().all(|&b| b == 0));
        }
        let mut buf = vec![1u8; 4096];
        node.read_at(&mut buf, 65536 + 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 9));
        // The tables are in memory now: status answers without waiting,
        // and as the waiting path does, run by run.
        node.block_status(0, 1)
            .expect("status: the heuristic is made");
        for at in [0, 65536, 2 * 65536, 3 * 65536] {
            let len = (4 << 20) - at;
            let want = node.block_status(at, len).expect("status");
            assert_eq!(node.try_block_status_nowait(at, len), Some(want), "at {at}");
        }
        // Not while an allocation holds the metadata lock.
        let meta = node.meta.lock().expect("meta");
        assert_eq!(node.try_block_status_nowait(0, 65536), None);
        drop(meta);
    }
}
