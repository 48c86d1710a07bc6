//! The raw format over a child node: bytes pass through unchanged. It exists
//! so the block graph has qemu's shape (a `raw` node on top of a `file`
//! node): writes through it go through the child `Node`, which marks the
//! child's own dirty bitmaps too, and the format node can be read-only over
//! a writable child.

use std::sync::Arc;

use super::node::Node;
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};

pub struct RawFormat {
    child: Arc<Node>,
    read_only: bool,
}

impl RawFormat {
    pub fn new(child: Arc<Node>, read_only: bool) -> RawFormat {
        let read_only = read_only || child.read_only();
        RawFormat { child, read_only }
    }

    fn writable(&self) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::new(ErrorKind::Permission, "Node is read-only"));
        }
        Ok(())
    }
}

impl BlockNode for RawFormat {
    fn size(&self) -> u64 {
        self.child.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.child.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.writable()?;
        self.child.write_at(buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.writable()?;
        self.child.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        self.child.discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.child.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.child.block_status(offset, len)
    }

    /// A raw image has no backing layer: every byte belongs to it (depth
    /// 1), holes in the host file included, as qemu reports for raw.
    fn allocation_depth(&self, _offset: u64, len: u64) -> BlockResult<DepthExtent> {
        Ok(DepthExtent { len, depth: 1 })
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.child.cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.child.discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }
}
