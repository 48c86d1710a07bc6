//! A named node of the block graph: a format driver plus the dirty bitmaps
//! that watch it. Every write through a `Node` marks the node's recording
//! bitmaps before it reaches the driver, so no acknowledged write can be
//! missing from a bitmap; when a persistent bitmap records it, the write's
//! zones are made durable in the image's intent log first, so not even a
//! crash mid-write loses it (qcow2/intent.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::link::{Child, ChildRole};
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};
use crate::bitmap::set::{lock_all, BitmapSet, SharedBitmap};
use crate::bitmap::DirtyBitmap;

pub struct Node {
    name: String,
    driver: Arc<dyn BlockNode>,
    bitmaps: Arc<BitmapSet>,
    /// Set by a store point: the stored bitmaps read as clean on disk, so
    /// before the next write changes the image they must be marked in use
    /// again, or a crash would leave stale bitmaps that look trustworthy.
    stored_clean: AtomicBool,
    /// Serialises that re-marking, so no write overtakes it.
    remark: Mutex<()>,
    /// One store (a store point or a clean store) at a time.
    storing: Mutex<()>,
}

impl Node {
    /// Wraps `driver`, loading the bitmaps its image stores.
    pub fn open(name: impl Into<String>, driver: Arc<dyn BlockNode>) -> BlockResult<Node> {
        let bitmaps = load_set(driver.as_ref())?;
        Ok(Node {
            name: name.into(),
            driver,
            bitmaps: Arc::new(bitmaps),
            stored_clean: AtomicBool::new(false),
            remark: Mutex::new(()),
            storing: Mutex::new(()),
        })
    }

    /// The child in `role`, as the graph is now.
    pub fn child(&self, role: ChildRole) -> Option<Arc<Node>> {
        self.driver
            .children()
            .into_iter()
            .find(|c| c.role == role)
            .map(|c| c.node())
    }

    /// The node below this one in the chain qemu's exports search for
    /// bitmaps: the backing layer, or what a filter filters.
    pub fn below(&self) -> Option<Arc<Node>> {
        self.child(ChildRole::Backing)
            .or_else(|| self.child(ChildRole::Filtered))
    }

    /// A bitmap by name, looked up as qemu's exports do: this node first,
    /// then down the chain of the live graph.
    pub fn find_bitmap(&self, name: &str) -> Option<SharedBitmap> {
        if let Some(b) = self.bitmaps.get(name) {
            return Some(b);
        }
        let mut layer = self.below();
        while let Some(l) = layer {
            if let Some(b) = l.bitmaps.get(name) {
                return Some(b);
            }
            layer = l.below();
        }
        None
    }

    /// Switches the node between read-only and read-write. Going
    /// read-only stores the persistent bitmaps first, as qemu does, so the
    /// image is left clean; going read-write marks them in use again.
    pub fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if read_only == self.read_only() {
            return Ok(());
        }
        if read_only {
            self.store_bitmaps()?;
            self.driver.reopen(true)?;
        } else {
            self.driver.reopen(false)?;
            self.stored_clean.store(false, Ordering::SeqCst);
        }
        // qemu marks the image's (persistent) bitmaps read-only with it.
        for b in self.bitmaps.all() {
            let mut b = crate::bitmap::set::lock(&b);
            if b.state.persistent {
                b.state.readonly = read_only;
            }
        }
        Ok(())
    }

    /// Whether a new persistent bitmap `name` could be stored in this
    /// node's image, with qemu's error texts.
    pub fn can_store_bitmap(&self, name: &str, granularity: u64) -> BlockResult<()> {
        self.driver
            .can_store_bitmap(name, granularity)
            .map_err(|e| {
                let context = if e.kind == ErrorKind::NotSupported {
                    format!(
                        "Can't store persistent bitmaps to {}: {}",
                        self.name, e.context
                    )
                } else {
                    format!(
                        "Can't make bitmap '{name}' persistent in '{}': {}",
                        self.name, e.context
                    )
                };
                BlockError { context, ..e }
            })
    }

    /// Stores the persistent bitmaps in the image (a clean close, or an
    /// explicit store point), then flushes.
    ///
    /// The bitmaps are copied under their locks and stored from the
    /// copies, so no bitmap lock is held across the store's I/O (hundreds
    /// of MiB for a large disk at a fine granularity) and writes, which
    /// mark the bitmaps on the NBD reader's thread, never wait for it. A
    /// write that marks them after the copy finds `stored_clean` set (it
    /// is set before the copy, and writers look after they mark), waits
    /// on `remark` until the store is on disk, and marks the stored
    /// bitmaps in use again before it changes the image.
    pub fn store_bitmaps(&self) -> BlockResult<()> {
        let _one = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        if self.driver.read_only() {
            return self.driver.flush();
        }
        let remark = self.remark.lock().unwrap_or_else(|p| p.into_inner());
        self.stored_clean.store(true, Ordering::SeqCst);
        let copies = self.persistent_copies(|| {});
        let refs: Vec<&DirtyBitmap> = copies.iter().collect();
        if let Err(e) = self.driver.store_bitmaps(&refs) {
            // The image keeps its old directory, in use: nothing to re-mark.
            self.stored_clean.store(false, Ordering::SeqCst);
            return Err(e);
        }
        drop(remark);
        self.driver.flush()
    }

    /// A store point of a writable image: the persistent bitmaps are
    /// copied under their locks (the only pause writes see), the intent
    /// log starts a new epoch at that instant, and the copies are stored
    /// (still in use) while writes go on; the log then forgets the zones
    /// the copies cover.
    /// Nothing without an intent log (qemu's semantics: bitmaps reach
    /// the image when it closes).
    pub fn store_point(&self) -> BlockResult<()> {
        let _one = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.driver.logs_intents() {
            return Ok(());
        }
        // Even with no persistent bitmap left: the image may still list
        // one just removed.
        let copies = self.persistent_copies(|| self.driver.intent_new_epoch());
        let refs: Vec<&DirtyBitmap> = copies.iter().collect();
        self.driver.store_point(&refs)
    }

    /// Copies of the persistent bitmaps, all taken at one instant (under
    /// their locks, through `lock_all`), at which `at_copy` also runs. The
    /// locks are released before this returns: the copies are what the
    /// caller writes out.
    fn persistent_copies(&self, at_copy: impl FnOnce()) -> Vec<DirtyBitmap> {
        let all = self.bitmaps.all();
        let guards = lock_all(&all);
        let copies = guards
            .iter()
            .filter(|b| b.state.persistent)
            .map(|b| (**b).clone())
            .collect();
        at_copy();
        copies
    }

    /// Before a write changes the image: marks `[offset, offset + len)` in
    /// the recording bitmaps; then, after a clean store, marks the stored
    /// bitmaps in use again (once, as a read-write open does; looked at
    /// after the marking, see [`Node::store_bitmaps`]); then, if a
    /// persistent bitmap records the range, makes its zones durable in
    /// the intent log (after the marking: see qcow2/intent.rs on epochs).
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        let persistent = self.bitmaps.mark(offset, len);
        if self.stored_clean.load(Ordering::SeqCst) {
            let _g = self.remark.lock().unwrap_or_else(|p| p.into_inner());
            if self.stored_clean.load(Ordering::SeqCst) {
                self.driver.mark_bitmaps_in_use()?;
                self.stored_clean.store(false, Ordering::SeqCst);
            }
        }
        if persistent {
            self.driver.intent_mark(&[(offset, len)])?;
        }
        Ok(())
    }

    /// Puts the zones of byte `ranges` into the intent log, as writes
    /// there would (bits a merge gave a recording persistent bitmap).
    pub fn cover(&self, ranges: &[(u64, u64)]) -> BlockResult<()> {
        self.driver.intent_mark(ranges)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bitmaps(&self) -> &Arc<BitmapSet> {
        &self.bitmaps
    }

    pub fn driver(&self) -> &Arc<dyn BlockNode> {
        &self.driver
    }
}

fn load_set(driver: &dyn BlockNode) -> BlockResult<BitmapSet> {
    let set = BitmapSet::new();
    for b in driver.load_bitmaps()? {
        let name = b.name().to_owned();
        set.add(b).map_err(|e| {
            BlockError::corrupt(format!("bitmap '{name}' stored twice: {}", e.message))
        })?;
    }
    Ok(set)
}

impl BlockNode for Node {
    fn size(&self) -> u64 {
        self.driver.size()
    }

    fn read_only(&self) -> bool {
        self.driver.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.driver.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.before_write(offset, buf.len() as u64)?;
        self.driver.write_at(buf, offset, fua)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.driver.try_read_nowait(buf, offset)
    }

    fn read_append(&self, out: &mut Vec<u8>, offset: u64, len: usize) -> BlockResult<()> {
        self.driver.read_append(out, offset, len)
    }

    fn pipe_reads(&self) -> bool {
        self.driver.pipe_reads()
    }

    fn read_to_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> BlockResult<Option<usize>> {
        self.driver.read_to_pipe(pipe, offset, len)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        // A write that needs I/O before it (in-use marking, an intent
        // zone) takes the slow path. Marking first keeps the rule; if the
        // fast path declines, the slow path marks the same range again,
        // which changes nothing.
        let len = buf.len() as u64;
        let persistent = self.bitmaps.mark(offset, len);
        // Looked at after the marking, as in before_write.
        if self.stored_clean.load(Ordering::SeqCst) {
            return false;
        }
        if persistent && !self.driver.intent_ready(offset, len) {
            return false;
        }
        self.driver.try_write_nowait(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.before_write(offset, len)?;
        self.driver.write_zeroes(offset, len, flags)
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.before_write(offset, buf.len() as u64)?;
        self.driver.write_compressed(buf, offset)
    }

    fn compressed_cluster(&self) -> u64 {
        self.driver.compressed_cluster()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.before_write(offset, len)?;
        self.driver.discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.driver.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.driver.block_status(offset, len)
    }

    fn try_block_status_nowait(&self, offset: u64, len: u64) -> Option<Extent> {
        self.driver.try_block_status_nowait(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.driver.allocation_depth(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.driver.cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.driver.discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }

    fn children(&self) -> Vec<Arc<Child>> {
        self.driver.children()
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> BlockResult<()> {
        self.driver.set_backing(backing)
    }

    fn snapshot(&self) -> Option<&dyn super::cbw::SnapshotView> {
        self.driver.snapshot()
    }

    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> BlockResult<()> {
        self.driver.change_backing_file(name, format)
    }

    fn backing_file(&self) -> Option<String> {
        self.driver.backing_file()
    }

    fn image_info(&self) -> Option<serde_json::Value> {
        self.driver.image_info()
    }

    fn checkpoint_record(&self) -> Option<Vec<u8>> {
        self.driver.checkpoint_record()
    }

    fn set_checkpoint_record(&self, record: Option<Vec<u8>>) -> BlockResult<()> {
        self.driver.set_checkpoint_record(record)
    }

    fn debug_event(&self, event: super::DebugEvent) {
        self.driver.debug_event(event)
    }

    fn set_image_locks(&self, mode: Option<super::lock::LockMode>) -> BlockResult<()> {
        self.driver.set_image_locks(mode)
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.driver.filename()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.driver.allocated_size()
    }

    fn file_length(&self) -> BlockResult<u64> {
        self.driver.file_length()
    }

    fn cluster_size(&self) -> u64 {
        self.driver.cluster_size()
    }
}
