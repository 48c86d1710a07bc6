//! The image file as the qcow2 driver sees it: its `file` child, with
//! errors that name the file and the offset. A read that runs past the end
//! of the file is a corrupt image, not a short read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::block::link::{Active, Child, ChildRole};
use crate::block::node::Node;
use crate::block::{BlockError, BlockNode, BlockResult, ZeroFlags, STATE_HOLE};

pub struct HostFile {
    pub child: Arc<Child>,
    pub path: PathBuf,
    /// The file's length as last seen; the qcow2 driver is its only writer
    /// (the image locks see to that), so its own writes keep this current.
    len: AtomicU64,
}

impl HostFile {
    pub fn new(file: Arc<Node>) -> BlockResult<Self> {
        let path = file.filename().unwrap_or_default();
        let len = file.file_length()?;
        Ok(HostFile {
            child: Child::new(ChildRole::File, file),
            path,
            len: AtomicU64::new(len),
        })
    }

    fn node(&self) -> Active<'_> {
        self.child.get()
    }

    fn grew_to(&self, end: u64) {
        self.len.fetch_max(end, Ordering::AcqRel);
    }

    pub fn len(&self) -> BlockResult<u64> {
        let len = self.node().file_length()?;
        self.len.store(len, Ordering::Release);
        Ok(len)
    }

    /// Reads exactly `buf.len()` bytes; `what` names the structure read.
    pub fn read(&self, buf: &mut [u8], off: u64, what: &str) -> BlockResult<()> {
        let end = off.saturating_add(buf.len() as u64);
        if end > self.len.load(Ordering::Acquire) && end > self.len()? {
            return Err(BlockError::corrupt(format!(
                "'{}': {} at offset {} (+{} bytes) lies past the end of the file",
                self.path.display(),
                what,
                off,
                buf.len()
            )));
        }
        self.node().read_at(buf, off).map_err(|e| BlockError {
            context: format!(
                "Could not read {} at offset {} of '{}': {}",
                what,
                off,
                self.path.display(),
                e.context
            ),
            ..e
        })
    }

    /// Reads what exists of the range and zero-fills the rest (for
    /// compressed data whose last sector may end past EOF).
    pub fn read_partial(&self, buf: &mut [u8], off: u64) -> BlockResult<()> {
        self.node().read_at(buf, off)
    }

    pub fn write(&self, buf: &[u8], off: u64, what: &str) -> BlockResult<()> {
        self.node()
            .write_at(buf, off, false)
            .map_err(|e| BlockError {
                context: format!(
                    "Could not write {} at offset {} of '{}': {}",
                    what,
                    off,
                    self.path.display(),
                    e.context
                ),
                ..e
            })?;
        self.grew_to(off + buf.len() as u64);
        Ok(())
    }

    /// Reads `buf` at `off` only if that needs no waiting (a graph change
    /// in progress or a page-cache miss both say no): for the async
    /// worker's fast path. False: nothing usable was read.
    pub fn try_read_nowait(&self, buf: &mut [u8], off: u64) -> bool {
        self.nowait(off, buf.len(), |n| n.try_read_nowait(buf, off))
    }

    /// Writes `buf` at `off` inside the file only if that needs no
    /// waiting. False: use [`HostFile::write`] (which may rewrite the same
    /// bytes: harmless).
    pub fn try_write_nowait(&self, buf: &[u8], off: u64) -> bool {
        self.nowait(off, buf.len(), |n| n.try_write_nowait(buf, off))
    }

    /// `io` on the file node, for `len` bytes at `off` inside the file,
    /// if the node can be entered without waiting.
    fn nowait(&self, off: u64, len: usize, io: impl FnOnce(&Node) -> bool) -> bool {
        let end = off.saturating_add(len as u64);
        end <= self.len.load(Ordering::Acquire) && self.child.link.try_get().is_some_and(|n| io(&n))
    }

    /// Whether the file holds data (true) or a hole (false) at `off`, and
    /// for how many bytes of `len` that lasts. Past EOF is a hole. Errors
    /// count as data: this only refines block status, as in qemu.
    pub fn data_run(&self, off: u64, len: u64) -> (bool, u64) {
        if off >= self.len.load(Ordering::Acquire) {
            return (false, len);
        }
        match self.node().block_status(off, len) {
            Ok(e) => (e.flags & STATE_HOLE == 0, e.len.clamp(1, len)),
            Err(_) => (true, len),
        }
    }

    /// Allocates `[off, off + len)` as zeroes (extending the file), if the
    /// filesystem can do that without writing them; false if it cannot.
    pub fn zero_range(&self, off: u64, len: u64) -> bool {
        let flags = ZeroFlags {
            may_unmap: false,
            fast: true,
        };
        let done = self.node().write_zeroes(off, len, flags).is_ok();
        if done {
            self.grew_to(off + len);
        }
        done
    }

    /// Deallocates a range of the host file (best effort: only space is
    /// at stake, the range is free in the image).
    pub fn punch(&self, off: u64, len: u64) {
        let _ = self.node().discard(off, len);
    }

    /// Tells the file node what comes next (see [`crate::block::DebugEvent`]).
    pub fn debug_event(&self, event: crate::block::DebugEvent) {
        self.node().debug_event(event);
    }

    pub fn sync(&self) -> BlockResult<()> {
        self.node().flush()
    }

    /// Bytes the file occupies on the host.
    pub fn allocated(&self) -> Option<u64> {
        self.node().allocated_size()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
