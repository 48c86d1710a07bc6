//! A pass-through filter: every request goes unchanged to the `file`
//! child. It is the smallest node that can be inserted above a live node
//! (the test hook for graph replacement, and the shape later filters such
//! as copy-before-write take).

use std::sync::Arc;

use super::link::{Active, Child, ChildRole};
use super::node::Node;
use super::{BlockNode, BlockResult, DepthExtent, Extent, ZeroFlags};

pub struct Passthrough {
    filtered: Child,
}

impl Passthrough {
    pub fn new(child: Arc<Node>) -> Passthrough {
        Passthrough {
            filtered: Child::new(ChildRole::Filtered, child),
        }
    }

    fn child(&self) -> Active<'_> {
        self.filtered.get()
    }
}

impl BlockNode for Passthrough {
    fn size(&self) -> u64 {
        self.child().size()
    }

    fn read_only(&self) -> bool {
        self.child().read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.child().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.child().write_at(buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.child().write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
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

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.child().try_read_nowait(buf, offset)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        self.child().try_write_nowait(buf, offset)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.child().cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.child().discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        "x-tidemark-passthrough"
    }

    fn cluster_size(&self) -> u64 {
        self.child().cluster_size()
    }

    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        // Read-only follows the filtered node.
        Ok(())
    }

    fn children(&self) -> Vec<&Child> {
        vec![&self.filtered]
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.child().filename()
    }
}
