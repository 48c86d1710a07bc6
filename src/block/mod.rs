//! The block layer: what an image *is* to the rest of tidemark.
//!
//! A [`BlockNode`] is synchronous and thread-safe: positioned reads and writes
//! with internal locking, so many requests (from many NBD connections) may be
//! in flight at once. The async fronts never call it on a tokio worker; they
//! hand the call to a thread that may wait (the NBD I/O threads, or tokio's
//! blocking pool for the control plane), except for the `try_*_nowait`
//! calls, which never wait.
//!
//! Formats (raw, qcow2) and filters (copy-before-write) all implement the same
//! trait, so a protocol server never knows which one it is talking to.

pub mod cbw;
pub mod chain;
pub mod copy;
pub mod error;
pub mod file;
pub mod filter;
pub mod io_trace;
pub mod link;
pub mod lock;
pub mod node;
pub mod open;
pub mod qcow2;
pub mod range_lock;
pub mod raw;
pub mod snapshot_access;

// Test and benchmark drivers (qemu's null-co and blkdebug).
pub mod blkdebug;
pub mod null;

pub use error::{BlockError, BlockResult, ErrorKind};

use crate::bitmap::DirtyBitmap;

/// `base:allocation` bit: the range is not allocated (reads come from a
/// backing layer or are zero).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// One run of bytes with the same allocation status, starting where the
/// query started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// `STATE_HOLE | STATE_ZERO` bits, exactly as NBD's `base:allocation`.
    pub flags: u32,
}

/// Which layer of a chain holds a range: 0 = nowhere (unallocated),
/// 1 = the top image, 2 = its backing file, ... (`qemu:allocation-depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthExtent {
    pub len: u64,
    pub depth: u32,
}

/// What a format layer is about to do to its `file` child, told to the
/// child first (qemu's BLKDBG_EVENT): only `blkdebug` listens, to inject
/// errors where qemu's iotests inject them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugEvent {
    /// A guest data read (qemu's `read_aio`).
    ReadAio,
    /// A guest data write (qemu's `write_aio`).
    WriteAio,
}

/// How a write-zeroes request may be carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) instead of written with zeroes
    /// (NBD: NO_HOLE not set).
    pub may_unmap: bool,
    /// Fail with [`ErrorKind::NotSupported`] rather than fall back to writing
    /// zero buffers (NBD_CMD_FLAG_FAST_ZERO).
    pub fast: bool,
}

/// A disk image as the protocol servers see it.
pub trait BlockNode: Send + Sync + 'static {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// True when the node was opened without write access.
    fn read_only(&self) -> bool;

    /// Fills `buf` from `offset`. The range lies inside the node (callers check).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;

    /// Writes `buf` at `offset`; with `fua`, the data is stable when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()>;

    /// Makes `len` bytes from `offset` read as zero.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()>;

    /// Says the range is no longer needed. Afterwards it may read as anything
    /// the format allows (for us: zeroes or the backing data).
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()>;

    /// Makes every completed write stable.
    fn flush(&self) -> BlockResult<()>;

    /// The allocation status of the first run at `offset`, at most `len`
    /// bytes long (and at least 1 byte when `len > 0`).
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent>;

    /// [`BlockNode::block_status`] only if that needs no waiting (the
    /// mapping in memory); `None`: not known without waiting.
    fn try_block_status_nowait(&self, _offset: u64, _len: u64) -> Option<Extent> {
        None
    }

    /// The chain depth of the first run at `offset`, at most `len` bytes long.
    /// A single-layer node is depth 1 where allocated, 0 where a hole.
    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        let e = self.block_status(offset, len)?;
        let depth = if e.flags & STATE_HOLE != 0 { 0 } else { 1 };
        Ok(DepthExtent { len: e.len, depth })
    }

    /// Fills `buf` from `offset` only if that needs no waiting (the data is
    /// in the page cache). False means "not done": use [`BlockNode::read_at`]
    /// on a thread that may wait. Lets async callers skip a thread hand-off.
    fn try_read_nowait(&self, _buf: &mut [u8], _offset: u64) -> bool {
        false
    }

    /// Reads `len` bytes at `offset` onto the end of `out`, as
    /// [`BlockNode::read_at`] does, for callers that have not zeroed the
    /// room: a node that can read into spare capacity skips the zero-fill.
    /// On error `out` holds an unspecified prefix of the data.
    fn read_append(&self, out: &mut Vec<u8>, offset: u64, len: usize) -> BlockResult<()> {
        let at = out.len();
        out.resize(at + len, 0);
        self.read_at(&mut out[at..], offset)
    }

    /// Whether [`BlockNode::read_to_pipe`] can move this node's data.
    fn pipe_reads(&self) -> bool {
        false
    }

    /// Moves up to `len` bytes at `offset` into `pipe` (non-blocking) by
    /// reference to the page cache, not by copy: `Some(n)` with `n < len`
    /// when the pipe is full; `None` (nothing moved) when this node cannot.
    /// The pipe holds the cached pages themselves: a write to the range
    /// before the pipe is drained may show through, so only a reader that
    /// no write is ordered against (an NBD read reply) may use it.
    fn read_to_pipe(
        &self,
        _pipe: std::os::fd::BorrowedFd<'_>,
        _offset: u64,
        _len: usize,
    ) -> BlockResult<Option<usize>> {
        Ok(None)
    }

    /// Writes `buf` at `offset` only if that needs no waiting; false means
    /// nothing was written and [`BlockNode::write_at`] must be used.
    fn try_write_nowait(&self, _buf: &[u8], _offset: u64) -> bool {
        false
    }

    /// A hint that the range will be read soon (NBD_CMD_CACHE).
    fn cache(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }

    /// Whether discarded ranges are guaranteed to read back as zeroes.
    fn discard_zeroes(&self) -> bool {
        false
    }

    /// A short name of the format, as `qemu-img info` prints it ("raw", "qcow2").
    fn format_name(&self) -> &'static str;

    /// The cluster size of the format, 0 when it has none (raw); the
    /// default bitmap granularity derives from it.
    fn cluster_size(&self) -> u64 {
        0
    }

    /// The node's child edges (file, backing, ...): the graph's edges live
    /// here, in the driver that uses them, and nowhere else.
    fn children(&self) -> Vec<std::sync::Arc<link::Child>> {
        Vec::new()
    }

    /// The point-in-time view this node offers (a copy-before-write
    /// filter), for `snapshot-access`.
    fn snapshot(&self) -> Option<&dyn cbw::SnapshotView> {
        None
    }

    /// Attaches, replaces or removes the `backing` child (a snapshot's
    /// overlay, the end of a stream or commit), draining the old edge.
    /// Only formats with a backing file have one.
    fn set_backing(&self, _backing: Option<std::sync::Arc<node::Node>>) -> BlockResult<()> {
        Err(BlockError::not_supported(format!(
            "the {} driver has no backing file",
            self.format_name()
        )))
    }

    /// Rewrites the backing file name and format the image stores.
    fn change_backing_file(&self, _name: Option<&str>, _format: Option<&str>) -> BlockResult<()> {
        Err(BlockError::not_supported(format!(
            "the {} driver has no backing file",
            self.format_name()
        )))
    }

    /// The backing file name the image stores, as stored.
    fn backing_file(&self) -> Option<String> {
        None
    }

    /// tidemark's checkpoint record kept in the image (see
    /// crate::checkpoint), where the format has room for one.
    fn checkpoint_record(&self) -> Option<Vec<u8>> {
        None
    }

    /// Replaces (or removes) the image's checkpoint record, durably.
    fn set_checkpoint_record(&self, _record: Option<Vec<u8>>) -> BlockResult<()> {
        Err(BlockError::not_supported(format!(
            "the {} format cannot keep checkpoints",
            self.format_name()
        )))
    }

    /// Switches between read-only and read-write without closing (qemu's
    /// reopen), taking or dropping what writing needs (image locks, the
    /// in-use marks of stored bitmaps).
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if read_only == self.read_only() {
            return Ok(());
        }
        Err(BlockError::not_supported(format!(
            "the {} driver cannot be reopened",
            self.format_name()
        )))
    }

    /// Writes `buf` compressed at `offset` (one whole cluster, where the
    /// format can; see [`BlockNode::compressed_cluster`]).
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> BlockResult<()> {
        Err(BlockError::not_supported("Compression is not supported"))
    }

    /// The unit of compressed writes, 0 when the format has none.
    fn compressed_cluster(&self) -> u64 {
        0
    }

    /// A parent's announcement of what it is about to do (see
    /// [`DebugEvent`]); nodes other than `blkdebug` ignore it.
    fn debug_event(&self, _event: DebugEvent) {}

    /// Sets the image locks to what the node's users need now (qemu
    /// derives them from the permissions of the node's parents): write
    /// locks while some user may write, read locks while some user reads,
    /// none without users. Only nodes that hold a host file have locks.
    fn set_image_locks(&self, _mode: Option<lock::LockMode>) -> BlockResult<()> {
        Ok(())
    }

    /// Format details as `qemu-img info --output=json` gives them
    /// (cluster size, format-specific data, backing names), read at open.
    fn image_info(&self) -> Option<serde_json::Value> {
        None
    }

    /// The host file at the bottom of this node (qemu's `filename`).
    fn filename(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Bytes the storage really occupies on the host (qemu's `actual-size`).
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// The exact length of the storage in bytes (a host file's length);
    /// [`BlockNode::size`] for everything else.
    fn file_length(&self) -> BlockResult<u64> {
        Ok(self.size())
    }

    /// The dirty bitmaps stored in the image, loaded when it is opened. A
    /// bitmap found in use (not cleanly stored) comes back inconsistent.
    fn load_bitmaps(&self) -> BlockResult<Vec<DirtyBitmap>> {
        Ok(Vec::new())
    }

    /// Whether a new persistent bitmap `name` could be stored in this image;
    /// the error says why not, in qemu's words. A format that stores no
    /// bitmaps at all answers `NotSupported` (the node words the message).
    fn can_store_bitmap(&self, _name: &str, _granularity: u64) -> BlockResult<()> {
        Err(BlockError::not_supported("Operation not supported"))
    }

    /// Marks the stored bitmaps in use on disk (they are about to change),
    /// as a read-write open does; needed again after a store point.
    fn mark_bitmaps_in_use(&self) -> BlockResult<()> {
        Ok(())
    }

    /// Before persistent recording bitmaps gain byte `ranges` (a write, a
    /// merge): makes their zones durable in the image's intent log (qcow2;
    /// see qcow2/intent.rs). Nothing for formats without one.
    fn intent_mark(&self, _ranges: &[(u64, u64)]) -> BlockResult<()> {
        Ok(())
    }

    /// Whether a write to the range needs no [`BlockNode::intent_mark`]
    /// I/O (the fast path may go ahead).
    fn intent_ready(&self, _offset: u64, _len: u64) -> bool {
        true
    }

    /// A store point copied the bitmaps (they are still locked): a new
    /// epoch of the intent log starts.
    fn intent_new_epoch(&self) {}

    /// Whether the image keeps an intent log (qcow2, writable, the log on):
    /// only then do store points happen while it is open.
    fn logs_intents(&self) -> bool {
        false
    }

    /// Whether the intent log has marks a store point would clear.
    fn intent_marked(&self) -> bool {
        false
    }

    /// A store point: writes `bitmaps` as the stored bitmaps, still in
    /// use (the image stays open for writing), and clears the intent log
    /// of the epochs they cover.
    fn store_point(&self, bitmaps: &[&DirtyBitmap]) -> BlockResult<()> {
        self.store_bitmaps(bitmaps)
    }

    /// Bitmaps the intent log recovered when the image was opened: name
    /// and the bytes recovery added to what was stored.
    fn recovered_bitmaps(&self) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// Writes `bitmaps` as the image's stored bitmaps (replacing what was
    /// there), marked as cleanly stored.
    fn store_bitmaps(&self, bitmaps: &[&DirtyBitmap]) -> BlockResult<()> {
        if bitmaps.is_empty() {
            return Ok(());
        }
        Err(BlockError::not_supported(format!(
            "the {} format cannot store bitmaps",
            self.format_name()
        )))
    }
}
