//! Filters: nodes that pass every request to the one node they filter.
//! qemu's jobs put one above the node they work on (mirror_top for mirror
//! and active commit, commit_top for commit, copy-on-read for stream), and
//! tidemark has a plain one as a test hook for graph changes.
//!
//! A job filter does two things for its job: every write holds its byte
//! range in the filter's [`RangeLock`] while it runs, so the job's copy of
//! the same bytes ([`Filter::hold`]) never interleaves with it; and a
//! [`WriteWatcher`] the job installs sees each write after it reached the
//! filtered node, with the range still held (a mirror marks the bytes
//! dirty, or writes them to its target at once).

use std::sync::{Arc, RwLock};

use super::link::{Active, Child, ChildRole};
use super::node::Node;
use super::range_lock::{RangeGuard, RangeLock};
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};
use crate::block::open::Driver;

/// Which filter: the driver name queries show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    Passthrough,
    MirrorTop,
    CommitTop,
    CopyOnRead,
}

impl FilterKind {
    pub fn driver(self) -> Driver {
        match self {
            FilterKind::Passthrough => Driver::Passthrough,
            FilterKind::MirrorTop => Driver::MirrorTop,
            FilterKind::CommitTop => Driver::CommitTop,
            FilterKind::CopyOnRead => Driver::CopyOnRead,
        }
    }
}

/// A write as it reached the filtered node.
pub enum WriteOp<'a> {
    Data(&'a [u8]),
    Zeroes(ZeroFlags),
    Discard,
}

/// What a job does with each write through its filter.
pub trait WriteWatcher: Send + Sync {
    /// Called after the write succeeded, with its range held.
    fn written(&self, op: &WriteOp<'_>, offset: u64, len: u64) -> BlockResult<()>;
}

pub struct Filter {
    kind: FilterKind,
    child: Arc<Child>,
    ranges: RangeLock,
    watcher: RwLock<Option<Arc<dyn WriteWatcher>>>,
}

impl Filter {
    pub fn new(kind: FilterKind, child: Arc<Node>) -> Filter {
        Filter {
            kind,
            child: Child::new(ChildRole::Filtered, child),
            ranges: RangeLock::default(),
            watcher: RwLock::new(None),
        }
    }

    pub fn kind(&self) -> FilterKind {
        self.kind
    }

    fn child(&self) -> Active<'_> {
        self.child.get()
    }

    /// Installs (or with `None` removes) the job's watcher.
    pub fn watch(&self, w: Option<Arc<dyn WriteWatcher>>) {
        *self.watcher.write().unwrap_or_else(|p| p.into_inner()) = w;
    }

    fn watcher(&self) -> Option<Arc<dyn WriteWatcher>> {
        self.watcher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Holds `[offset, offset + len)` against writes through the filter
    /// (the job's copy of those bytes). Blocks.
    pub fn hold(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.ranges.lock(offset, len)
    }

    fn writable(&self) -> BlockResult<()> {
        if self.read_only() {
            return Err(BlockError::new(ErrorKind::Permission, "Node is read-only"));
        }
        Ok(())
    }

    /// A write: the range held, the filtered node written, the watcher told.
    fn write(&self, op: WriteOp<'_>, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.writable()?;
        let _held = self.ranges.lock(offset, len);
        let child = self.child();
        match op {
            WriteOp::Data(buf) => child.write_at(buf, offset, fua)?,
            WriteOp::Zeroes(flags) => child.write_zeroes(offset, len, flags)?,
            WriteOp::Discard => child.discard(offset, len)?,
        }
        drop(child);
        match self.watcher() {
            Some(w) => w.written(&op, offset, len),
            None => Ok(()),
        }
    }
}

impl BlockNode for Filter {
    fn size(&self) -> u64 {
        self.child().size()
    }

    /// A filter is what its child is; commit_top is always read-only
    /// (qemu opens it so: nothing writes through it).
    fn read_only(&self) -> bool {
        self.kind == FilterKind::CommitTop || self.child().read_only()
    }

    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.child.clone()]
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.child().filename()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.child().allocated_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.child().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.write(WriteOp::Data(buf), offset, buf.len() as u64, fua)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.child().try_read_nowait(buf, offset)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        // Only the plain filter: a job's must hold the range (may block).
        self.kind == FilterKind::Passthrough
            && !self.read_only()
            && self.child().try_write_nowait(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.write(WriteOp::Zeroes(flags), offset, len, false)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write(WriteOp::Discard, offset, len, false)
    }

    fn flush(&self) -> BlockResult<()> {
        self.child().flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.child().block_status(offset, len)
    }

    fn try_block_status_nowait(&self, offset: u64, len: u64) -> Option<Extent> {
        self.child().try_block_status_nowait(offset, len)
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
        self.kind.driver().name()
    }

    fn cluster_size(&self) -> u64 {
        self.child().cluster_size()
    }
}
