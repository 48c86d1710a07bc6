//! The raw format: its bytes are those of its `file` child. Writes go
//! through the child node, which marks the child's own dirty bitmaps too.
//! The raw format may be read-only over a writable child.

use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use super::link::{Active, Child, ChildRole};
use super::node::Node;
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};

pub struct RawFormat {
    file: Arc<Child>,
    read_only: AtomicBool,
}

impl RawFormat {
    pub fn new(file: Arc<Node>, read_only: bool) -> RawFormat {
        let read_only = read_only || file.read_only();
        RawFormat {
            file: Child::new(ChildRole::File, file),
            read_only: AtomicBool::new(read_only),
        }
    }

    fn child(&self) -> Active<'_> {
        self.file.get()
    }

    fn writable(&self) -> BlockResult<()> {
        if self.read_only() {
            return Err(BlockError::new(ErrorKind::Permission, "Node is read-only"));
        }
        Ok(())
    }
}

impl BlockNode for RawFormat {
    fn size(&self) -> u64 {
        self.child().size()
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if !read_only && self.child().read_only() {
            return Err(BlockError::new(
                ErrorKind::Permission,
                "the file node is read-only",
            ));
        }
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.file.clone()]
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.child().filename()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.child().allocated_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let child = self.child();
        child.debug_event(super::DebugEvent::ReadAio);
        child.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.writable()?;
        let child = self.child();
        child.debug_event(super::DebugEvent::WriteAio);
        child.write_at(buf, offset, fua)
    }

    fn read_append(&self, out: &mut Vec<u8>, offset: u64, len: usize) -> BlockResult<()> {
        let child = self.child();
        child.debug_event(super::DebugEvent::ReadAio);
        child.read_append(out, offset, len)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.child().try_read_nowait(buf, offset)
    }

    fn pipe_reads(&self) -> bool {
        self.child().pipe_reads()
    }

    // No debug event: a child that injects errors cannot move pages, and
    // the read_at that follows reports it.
    fn read_to_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> BlockResult<Option<usize>> {
        self.child().read_to_pipe(pipe, offset, len)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        !self.read_only() && self.child().try_write_nowait(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.writable()?;
        self.child().write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        self.child().discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.child().flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.child().block_status(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.child().allocation_depth(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.child().cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.child().discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn cluster_size(&self) -> u64 {
        self.child().cluster_size()
    }
}
