//! qemu's `snapshot-access` driver: a read-only node over a
//! copy-before-write node that shows its point-in-time view (what the
//! disk held when the filter went in), for a fleecing export. A discard
//! tells the filter the client is done with those clusters.

use std::sync::Arc;

use super::link::{Active, Child, ChildRole};
use super::node::Node;
use super::{BlockError, BlockNode, BlockResult, ErrorKind, Extent, ZeroFlags};

pub struct SnapshotAccess {
    file: Arc<Child>,
}

impl SnapshotAccess {
    /// Over `file`, which should offer a view (a copy-before-write node);
    /// over anything else, as in qemu, every request fails.
    pub fn new(file: Arc<Node>) -> BlockResult<SnapshotAccess> {
        Ok(SnapshotAccess {
            file: Child::new(ChildRole::File, file),
        })
    }

    fn child(&self) -> Active<'_> {
        self.file.get()
    }

    /// qemu's snapshot-access refuses writes with ENOTSUP.
    fn read_only_error() -> BlockError {
        BlockError::new(
            ErrorKind::NotSupported,
            "snapshot-access nodes take no writes",
        )
    }
}

/// The child's view, or the error for a child that lost it.
fn view<'a>(child: &'a Active<'_>) -> BlockResult<&'a dyn super::cbw::SnapshotView> {
    child
        .snapshot()
        .ok_or_else(|| BlockError::not_supported("the child offers no snapshot"))
}

impl BlockNode for SnapshotAccess {
    fn size(&self) -> u64 {
        self.child().size()
    }

    /// As qemu shows it; writes are refused all the same.
    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let child = self.child();
        view(&child)?.snapshot_read(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> BlockResult<()> {
        Err(Self::read_only_error())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BlockResult<()> {
        Err(Self::read_only_error())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let child = self.child();
        view(&child)?.snapshot_discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let child = self.child();
        view(&child)?.snapshot_status(offset, len)
    }

    /// The view is one layer of its own (qemu: all of it `local`).
    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<super::DepthExtent> {
        let size = self.size();
        if offset >= size {
            return Err(BlockError::invalid("offset past the end"));
        }
        Ok(super::DepthExtent {
            len: len.min(size - offset),
            depth: 1,
        })
    }

    fn format_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn cluster_size(&self) -> u64 {
        self.child().cluster_size()
    }

    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.file.clone()]
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.child().filename()
    }
}
