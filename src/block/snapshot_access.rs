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
    /// Over `file`, which must offer a view (a copy-before-write node).
    pub fn new(file: Arc<Node>) -> BlockResult<SnapshotAccess> {
        if file.snapshot().is_none() {
            return Err(BlockError::invalid(format!(
                "'{}' is not a copy-before-write node",
                file.name()
            )));
        }
        Ok(SnapshotAccess {
            file: Child::new(ChildRole::File, file),
        })
    }

    fn child(&self) -> Active<'_> {
        self.file.get()
    }

    fn read_only_error() -> BlockError {
        BlockError::new(ErrorKind::Permission, "Node is read-only")
    }
}

/// The child's view, or the error for a child that lost it.
fn view<'a>(child: &'a Active<'_>) -> BlockResult<&'a dyn super::cbw::SnapshotView> {
    child
        .snapshot()
        .ok_or_else(|| BlockError::invalid("the child offers no snapshot"))
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
