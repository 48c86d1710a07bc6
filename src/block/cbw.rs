//! The copy-before-write filter (qemu's copy-before-write with its
//! block-copy state): inserted above a backup's source, it copies the old
//! data of every cluster a write is about to change to the target first,
//! so the target ends up equal to the source at the instant the filter
//! went in. The backup job copies the remaining clusters through the same
//! [`CopyBeforeWrite::copy_cluster`], so a cluster is copied exactly once
//! whichever side gets there first.
//!
//! Concurrency: the map of clusters still to copy, and of those being
//! copied now, sits behind one mutex held only to decide; the copy itself
//! (a read of the source, a write of the target) runs outside it, and a
//! write to a cluster being copied waits for that copy to end.
//!
//! As a node of its own (blockdev-add, qemu's fleecing) the filter also
//! offers the point-in-time view a `snapshot-access` node reads
//! ([`SnapshotView`]): a cluster still in the source is read from there
//! (held like a copy, so no write changes it meanwhile), a copied one
//! from the target. `on-cbw-error=break-snapshot` lets guest writes go on
//! when a copy fails, and the view fails from then on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::copy::CopyError;
use super::link::{Active, Child, ChildRole};
use super::node::Node;
use super::{BlockNode, BlockResult, DepthExtent, Extent, ZeroFlags};
use crate::bitmap::DirtyBitmap;

struct CopyMap {
    /// One bit per cluster: still to be copied.
    todo: DirtyBitmap,
    /// One bit per cluster: readable through the view (qemu's access
    /// bitmap: the `bitmap` option's clusters, or all).
    access: DirtyBitmap,
    /// Clusters being copied (or read through the view) right now.
    busy: HashSet<u64>,
}

/// qapi's OnCbwError: what a failed copy before a guest write breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCbwError {
    #[default]
    BreakGuestWrite,
    BreakSnapshot,
}

/// The point-in-time view a copy-before-write node offers (read by
/// `snapshot-access`).
pub trait SnapshotView: Send + Sync {
    fn snapshot_read(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;
    fn snapshot_status(&self, offset: u64, len: u64) -> BlockResult<Extent>;
    fn snapshot_discard(&self, offset: u64, len: u64) -> BlockResult<()>;
}

/// Told why, once, when a guarded view breaks.
pub type OnBreak = Arc<dyn Fn(&str) + Send + Sync>;

/// A backup session's guard on its scratch (tidemark's): the snapshot
/// breaks, rather than a guest write failing, when a copy fails or would
/// take the target past `quota` bytes; `on_break` hears of it once.
#[derive(Clone, Default)]
pub struct Guard {
    pub quota: Option<u64>,
    pub on_break: Option<OnBreak>,
    /// The copy unit (0: the backup's default). Smaller than qemu's 64 KiB
    /// for a session's own scratch: a small guest write then costs the
    /// scratch only a small copy.
    pub cluster: u64,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("quota", &self.quota)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// Why the view broke (`CopyBeforeWrite::broken`).
const INTACT: u8 = 0;
const COPY_FAILED: u8 = 1;
const OVER_QUOTA: u8 = 2;

pub struct CopyBeforeWrite {
    source: Arc<Child>,
    target: Arc<Child>,
    cluster: u64,
    map: Mutex<CopyMap>,
    copied_cv: Condvar,
    /// Bytes copied so far, by either side (the job's progress).
    copied: AtomicU64,
    /// Cleared when the job ends: writes then pass straight through.
    active: AtomicBool,
    /// Write the target compressed, in clusters of this size (0: plain).
    compress: u64,
    on_error: OnCbwError,
    /// A copy failed under break-snapshot (or the quota was reached): the
    /// view is gone. One of INTACT, COPY_FAILED, OVER_QUOTA.
    broken: AtomicU8,
    guard: Guard,
    /// Bytes the copies in flight or done will have written to the target
    /// (what the quota counts).
    charged: AtomicU64,
}

impl CopyBeforeWrite {
    /// A filter over `source` copying to `target` the clusters of
    /// `cluster` bytes set in `todo` (a bitmap of that granularity over
    /// the source's size).
    pub fn new(
        source: Arc<Node>,
        target: Arc<Node>,
        todo: DirtyBitmap,
        compress: bool,
    ) -> CopyBeforeWrite {
        let compress = if compress {
            target.compressed_cluster()
        } else {
            0
        };
        CopyBeforeWrite {
            cluster: todo.granularity(),
            source: Child::new(ChildRole::Filtered, source),
            target: Child::new(ChildRole::Target, target),
            map: Mutex::new(CopyMap {
                access: todo.clone(),
                todo,
                busy: HashSet::new(),
            }),
            copied_cv: Condvar::new(),
            copied: AtomicU64::new(0),
            active: AtomicBool::new(true),
            compress,
            on_error: OnCbwError::default(),
            broken: AtomicU8::new(INTACT),
            guard: Guard::default(),
            charged: AtomicU64::new(0),
        }
    }

    /// Under a session's guard: break-snapshot, with its quota.
    pub fn guarded(mut self, guard: Guard) -> CopyBeforeWrite {
        self.on_error = OnCbwError::BreakSnapshot;
        self.guard = guard;
        self
    }

    /// Whether the view broke.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire) != INTACT
    }

    /// With `on-cbw-error`.
    pub fn on_error(mut self, on_error: OnCbwError) -> CopyBeforeWrite {
        self.on_error = on_error;
        self
    }

    fn view_broken(&self) -> BlockResult<()> {
        match self.broken.load(Ordering::Acquire) {
            INTACT => Ok(()),
            // qemu: EACCES, which its NBD server sends as EINVAL.
            COPY_FAILED => Err(super::BlockError::invalid(
                "the snapshot is broken: a copy before a write failed",
            )),
            // A session's reader sees an I/O error, as for a lost disk.
            _ => Err(super::BlockError::new(
                super::ErrorKind::Io,
                "the snapshot is broken: its scratch quota was reached",
            )),
        }
    }

    /// Waits until no copy runs in `[first, last]`, then claims the
    /// clusters still in the source (returns them), so no write changes
    /// them while the view reads them.
    fn hold_for_view(&self, first: u64, last: u64) -> BlockResult<Vec<u64>> {
        let mut g = self.lock();
        loop {
            if (first..=last).any(|c| g.busy.contains(&c)) {
                g = self.copied_cv.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if (first..=last).any(|c| !g.access.is_dirty(c * self.cluster)) {
                return Err(outside_view());
            }
            let held: Vec<u64> = (first..=last)
                .filter(|&c| g.todo.is_dirty(c * self.cluster))
                .collect();
            for &c in &held {
                g.busy.insert(c);
            }
            return Ok(held);
        }
    }

    fn release(&self, held: &[u64]) {
        let mut g = self.lock();
        for c in held {
            g.busy.remove(c);
        }
        drop(g);
        self.copied_cv.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, CopyMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn src(&self) -> Active<'_> {
        self.source.get()
    }

    /// Bytes copied so far.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Acquire)
    }

    /// Bytes still to copy.
    pub fn remaining(&self) -> u64 {
        self.lock().todo.count()
    }

    /// A copy of what is still to copy (qemu merges it back into a
    /// bitmap-mode=always bitmap when the backup failed).
    pub fn todo(&self) -> DirtyBitmap {
        self.lock().todo.clone()
    }

    /// Ends the filter's work: writes pass straight through from now on.
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        self.copied_cv.notify_all();
    }

    /// Claims clusters from `first` on that are still to copy and that
    /// nobody copies now, up to `max` of them in one run. Returns how many.
    fn claim(&self, g: &mut CopyMap, first: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max {
            let c = first + n;
            if !g.todo.is_dirty(c * self.cluster) || g.busy.contains(&c) {
                break;
            }
            g.busy.insert(c);
            n += 1;
        }
        n
    }

    /// Copies the claimed run `[first, first + n)`, then releases it.
    fn copy_claimed(&self, first: u64, n: u64) -> Result<u64, CopyError> {
        let r = self
            .charge(n * self.cluster)
            .and_then(|()| self.copy_now(first * self.cluster, n * self.cluster));
        let mut g = self.lock();
        for c in first..first + n {
            g.busy.remove(&c);
        }
        if r.is_ok() {
            // In range: the clusters came from the map itself.
            let _ = g.todo.reset_range(first * self.cluster, n * self.cluster);
        }
        drop(g);
        self.copied_cv.notify_all();
        if let Ok(bytes) = r {
            self.copied.fetch_add(bytes, Ordering::AcqRel);
        }
        r
    }

    /// Counts `len` target bytes against the quota, or refuses them.
    fn charge(&self, len: u64) -> Result<(), CopyError> {
        let Some(quota) = self.guard.quota else {
            return Ok(());
        };
        let before = self.charged.fetch_add(len, Ordering::AcqRel);
        if before.saturating_add(len) > quota {
            self.charged.fetch_sub(len, Ordering::AcqRel);
            let e = super::BlockError::new(
                super::ErrorKind::NoSpace,
                format!("the scratch quota of {quota} bytes is reached"),
            );
            return Err(CopyError::target(e));
        }
        Ok(())
    }

    /// The job's step: copies the next run (up to `max_bytes`) still to
    /// copy at or after `*from`, skipping clusters a guest write copies
    /// now. `None` when nothing is left from there.
    pub fn copy_next(&self, from: &mut u64, max_bytes: u64) -> Option<Result<u64, CopyError>> {
        let max = (max_bytes / self.cluster).max(1);
        let (first, n) = {
            let mut g = self.lock();
            loop {
                let size = g.todo.size();
                let start = from.saturating_mul(self.cluster).min(size);
                let (off, _) = g.todo.next_dirty_area(start, size)?;
                let c = off / self.cluster;
                let n = self.claim(&mut g, c, max);
                if n > 0 {
                    break (c, n);
                }
                // Being copied by a guest write: go on after it.
                *from = c + 1;
            }
        };
        *from = first;
        Some(self.copy_claimed(first, n))
    }

    /// Copies every cluster of `[first, last]` the target still needs,
    /// waiting for those another thread is copying.
    fn copy_clusters(&self, first: u64, last: u64) -> Result<(), CopyError> {
        let mut c = first;
        while c <= last {
            let n = {
                let mut g = self.lock();
                loop {
                    if !g.todo.is_dirty(c * self.cluster) {
                        break 0;
                    }
                    if !g.busy.contains(&c) {
                        break self.claim(&mut g, c, last - c + 1);
                    }
                    g = self.copied_cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            };
            if n == 0 {
                c += 1;
                continue;
            }
            self.copy_claimed(c, n)?;
            c += n;
        }
        Ok(())
    }

    /// Copies `[off, off + len)` (clipped to the source), zero runs as
    /// zeroes. Returns the bytes copied.
    fn copy_now(&self, off: u64, len: u64) -> Result<u64, CopyError> {
        let src = self.src();
        let len = len.min(src.size().saturating_sub(off));
        let dst = self.target.get();
        if self.compress > 0 {
            return self.copy_compressed(&src, &dst, off, len).map(|_| len);
        }
        let zeroes = super::copy::Zeroes {
            detect: false,
            unmap: true,
        };
        super::copy::copy_range(&**src, &**dst, off, len, &mut Vec::new(), zeroes)?;
        Ok(len)
    }

    /// The copy with `compress`: every target cluster of the span read,
    /// then written compressed (or as zeroes when it is all zero).
    fn copy_compressed(&self, src: &Node, dst: &Node, off: u64, len: u64) -> Result<(), CopyError> {
        let mut buf = vec![0u8; len as usize];
        src.read_at(&mut buf, off).map_err(CopyError::source)?;
        let target = CopyError::target;
        for (i, piece) in buf.chunks(self.compress as usize).enumerate() {
            let at = off + i as u64 * self.compress;
            if piece.iter().all(|&b| b == 0) {
                let flags = ZeroFlags {
                    may_unmap: false,
                    fast: false,
                };
                dst.write_zeroes(at, piece.len() as u64, flags)
                    .map_err(target)?;
            } else {
                dst.write_compressed(piece, at).map_err(target)?;
            }
        }
        Ok(())
    }

    /// Before a write to `[off, off + len)`: copies the clusters it
    /// touches that the target still needs.
    fn before_write(&self, off: u64, len: u64) -> BlockResult<()> {
        if len == 0 || !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        // break-guest-write (qemu's default): the write fails rather than
        // the backup losing the old data; break-snapshot: the write goes
        // on and the view is gone.
        match self.copy_clusters(off / self.cluster, (off + len - 1) / self.cluster) {
            Ok(()) => Ok(()),
            Err(e) if self.on_error == OnCbwError::BreakGuestWrite => Err(e.error),
            Err(e) => {
                tracing::warn!(error = %e.error, "copy-before-write failed: the snapshot is broken");
                let why = match e.error.kind {
                    super::ErrorKind::NoSpace if self.guard.quota.is_some() => OVER_QUOTA,
                    _ => COPY_FAILED,
                };
                let first = self
                    .broken
                    .compare_exchange(INTACT, why, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                self.deactivate();
                if let (true, Some(hook)) = (first, &self.guard.on_break) {
                    hook(&e.error.context);
                }
                Ok(())
            }
        }
    }
}

/// qemu's EINVAL for a part of the disk the view does not hold (outside
/// the `bitmap`, or discarded).
fn outside_view() -> super::BlockError {
    super::BlockError::invalid("outside the snapshot's bitmap")
}

impl SnapshotView for CopyBeforeWrite {
    fn snapshot_read(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.view_broken()?;
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / self.cluster, (offset + len - 1) / self.cluster);
        let held = self.hold_for_view(first, last)?;
        let r = (|| {
            // One read per run of clusters on the same side.
            let mut at = offset;
            while at < offset + len {
                let c = at / self.cluster;
                let in_source = held.contains(&c);
                let mut end = ((c + 1) * self.cluster).min(offset + len);
                while end < offset + len && held.contains(&(end / self.cluster)) == in_source {
                    end = (end + self.cluster).min(offset + len);
                }
                let part = &mut buf[(at - offset) as usize..(end - offset) as usize];
                if in_source {
                    self.src().read_at(part, at)?;
                } else {
                    self.target.get().read_at(part, at)?;
                }
                at = end;
            }
            Ok(())
        })();
        self.release(&held);
        r?;
        self.view_broken()
    }

    fn snapshot_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.view_broken()?;
        let c = offset / self.cluster;
        let end = ((c + 1) * self.cluster).min(offset + len);
        let (in_source, readable) = {
            let g = self.lock();
            (
                g.todo.is_dirty(c * self.cluster),
                g.access.is_dirty(c * self.cluster),
            )
        };
        if !readable {
            return Err(outside_view());
        }
        let e = match in_source {
            true => self.src().block_status(offset, end - offset)?,
            false => self.target.get().block_status(offset, end - offset)?,
        };
        Ok(Extent {
            len: e.len.clamp(1, end - offset),
            flags: e.flags,
        })
    }

    /// The client is done with these clusters: they leave the view, and
    /// nothing needs copying there any more.
    fn snapshot_discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let first = offset.div_ceil(self.cluster) * self.cluster;
        let end = (offset + len) / self.cluster * self.cluster;
        if end <= first {
            return Ok(());
        }
        let mut g = self.lock();
        let _ = g.access.reset_range(first, end - first);
        let _ = g.todo.reset_range(first, end - first);
        Ok(())
    }
}

impl BlockNode for CopyBeforeWrite {
    fn size(&self) -> u64 {
        self.src().size()
    }

    fn read_only(&self) -> bool {
        self.src().read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.src().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.before_write(offset, buf.len() as u64)?;
        self.src().write_at(buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.before_write(offset, len)?;
        self.src().write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.before_write(offset, len)?;
        self.src().discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.src().flush()?;
        self.target.get().flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.src().block_status(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.src().allocation_depth(offset, len)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.src().try_read_nowait(buf, offset)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.src().cache(offset, len)
    }

    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn cluster_size(&self) -> u64 {
        self.src().cluster_size()
    }

    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.source.clone(), self.target.clone()]
    }

    fn snapshot(&self) -> Option<&dyn SnapshotView> {
        Some(self)
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.src().filename()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::file::FileNode;

    fn file_node(dir: &std::path::Path, name: &str, fill: u8) -> Arc<Node> {
        let path = dir.join(name);
        std::fs::write(&path, vec![fill; 1 << 20]).expect("write");
        let f = FileNode::open(&path, false).expect("open");
        Arc::new(Node::open(name, Arc::new(f)).expect("node"))
    }

    #[test]
    fn the_target_gets_the_data_from_before_each_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = file_node(dir.path(), "src", 0xaa);
        let target = file_node(dir.path(), "tgt", 0);
        let mut todo = DirtyBitmap::anonymous(1 << 20, 65536).expect("bitmap");
        todo.set_range(0, 1 << 20).expect("set");
        let cbw = CopyBeforeWrite::new(source.clone(), target.clone(), todo, false);
        // A guest write: cluster 3's old data goes to the target first.
        cbw.write_at(&[0xbb; 100], 3 * 65536 + 10, false)
            .expect("write");
        assert_eq!(cbw.copied(), 65536);
        let mut buf = vec![0u8; 65536];
        target.read_at(&mut buf, 3 * 65536).expect("read");
        assert!(buf.iter().all(|&b| b == 0xaa));
        // The job copies the rest, skipping what is done.
        let mut from = 0;
        while let Some(r) = cbw.copy_next(&mut from, 1 << 20) {
            r.expect("copy");
        }
        assert_eq!(cbw.remaining(), 0);
        assert_eq!(cbw.copied(), 1 << 20);
        let mut all = vec![0u8; 1 << 20];
        target.read_at(&mut all, 0).expect("read");
        assert!(
            all.iter().all(|&b| b == 0xaa),
            "target is the source before the write"
        );
        source.read_at(&mut buf, 3 * 65536).expect("read");
        assert_eq!(&buf[10..110], &[0xbb; 100][..]);
        // After the job, writes pass straight through.
        cbw.deactivate();
        cbw.write_at(&[0xcc; 10], 0, false).expect("write");
        target.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf[0], 0xaa);
    }
}
