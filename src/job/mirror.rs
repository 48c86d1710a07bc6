//! Mirror (qemu's block/mirror.c), and active commit, which is a mirror of
//! the active layer into its base: a mirror_top filter goes above the
//! source, the job copies every dirty range to the target, and the filter
//! keeps the job's own dirty bitmap current with the writes clients make
//! meanwhile (copy-mode `background`), or writes them to the target too
//! before they complete (`write-blocking`). Once nothing is dirty the job
//! is READY; job-complete then drains every user of the filter, copies
//! what is still dirty, and moves them onto the target (for commit, the
//! base) in one step. A cancel once ready does the same final copy but
//! keeps the users on the source: the target is a copy of that instant.
//!
//! Ordering: a guest write marks its range dirty only after it reached the
//! source, and the job clears a range before it reads it, both while
//! holding the range in the filter, so every write is either in what the
//! job read or dirty again afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use super::backup::SyncMode;
use super::copy::{depth_of, Layers, Policies};
use super::{CommonArgs, Finish, JobCtl, JobDriver, JobFailure, JobType, JobWaker, OnError};
use crate::bitmap::DirtyBitmap;
use crate::block::copy::{copy_range, CopyError, Zeroes};
use crate::block::filter::{Filter, FilterKind, WriteOp, WriteWatcher};
use crate::block::link::Root;
use crate::block::node::Node;
use crate::block::open::Driver;
use crate::block::{BlockNode, BlockResult};
use crate::daemon::{BlockOp, Daemon};
use crate::qmp::error::{QmpError, QmpResult};

/// blockdev-mirror's and drive-mirror's arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MirrorArgs {
    #[serde(flatten)]
    pub common: CommonArgs,
    pub device: String,
    pub target: String,
    pub replaces: Option<String>,
    pub sync: SyncMode,
    pub granularity: Option<i64>,
    pub buf_size: Option<i64>,
    pub on_source_error: Option<String>,
    pub on_target_error: Option<String>,
    pub filter_node_name: Option<String>,
    pub copy_mode: Option<CopyMode>,
    /// drive-mirror: the target image's format, node name, creation mode.
    pub format: Option<String>,
    pub node_name: Option<String>,
    pub mode: Option<String>,
    pub unmap: Option<bool>,
}

/// qapi's MirrorCopyMode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    Background,
    WriteBlocking,
}

fn panicked() -> crate::block::BlockError {
    crate::block::BlockError::new(crate::block::ErrorKind::Io, "a copy thread panicked")
}

/// Parts of a range copied at once (qemu keeps up to 16 requests in
/// flight; two threads already overlap reading and writing).
const LANES: usize = 2;

/// qemu's default copy buffer (DEFAULT_MIRROR_BUF_SIZE).
const DEFAULT_BUF_SIZE: u64 = 16 << 20;

/// The longest a ready job with nothing to copy sleeps; new writes and
/// verbs wake it at once.
const IDLE: Duration = Duration::from_secs(60);

/// What the filter does with a guest write for the job.
struct Watch {
    dirty: Arc<Mutex<DirtyBitmap>>,
    mode: CopyMode,
    target: Arc<Node>,
    /// Wakes the job (idle once ready) when there is new work.
    waker: Arc<Mutex<Option<JobWaker>>>,
}

impl Watch {
    fn mark(&self, offset: u64, len: u64) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let _ = d.set_range(offset, len);
        drop(d);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl WriteWatcher for Watch {
    fn written(&self, op: &WriteOp<'_>, offset: u64, len: u64) -> BlockResult<()> {
        if self.mode == CopyMode::Background {
            self.mark(offset, len);
            return Ok(());
        }
        let t = &self.target;
        let r = match op {
            WriteOp::Data(buf) => t.write_at(buf, offset, false),
            WriteOp::Zeroes(flags) => t.write_zeroes(offset, len, *flags),
            WriteOp::Discard => t.discard(offset, len),
        };
        if r.is_err() {
            // The job copies it again.
            self.mark(offset, len);
            return Ok(());
        }
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        // Whole granules the write covered are in sync now.
        let g = d.granularity();
        let start = offset.div_ceil(g) * g;
        let end = (offset + len) / g * g;
        if end > start {
            let _ = d.reset_range(start, end - start);
        }
        Ok(())
    }
}

/// A target drive-mirror created and opened for the job: closed unless
/// the job pivots to it, and given `backing` then (qemu opens it without
/// one and attaches the source's chain at the pivot).
pub struct OwnTarget {
    pub backing: Option<Arc<Node>>,
}

/// What the job's users move onto when it completes.
pub struct Pivot {
    /// The node replaced (the source, or `replaces`).
    pub replaced: Arc<Node>,
    /// The target's backing at the pivot (drive-mirror): `Some(None)`
    /// none, `Some(Some(n))` n; `None` leaves it as it is.
    pub target_backing: Option<Option<Arc<Node>>>,
    /// Nodes that leave the graph after the pivot (active commit: the top
    /// and the layers above the base).
    pub dropped: Vec<Arc<Node>>,
}

/// The ways a mirror job is set up.
pub struct MirrorSetup {
    pub job_type: JobType,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub layers: Option<Layers>,
    pub granularity: u64,
    pub buf_size: u64,
    pub mode: CopyMode,
    pub policies: Policies,
    pub filter_name: Option<String>,
    pub pivot: Pivot,
    /// A target the job opened (drive-mirror), closed unless pivoted to.
    pub own_target: bool,
    /// The target was read-only and made writable for the job (commit).
    pub target_was_ro: bool,
    /// Nodes blocked while the job runs, besides filter and target.
    pub also_blocks: Vec<Arc<Node>>,
}

pub struct Mirror {
    job_type: JobType,
    source: Arc<Node>,
    target: Arc<Node>,
    filter: Arc<Node>,
    guard: Arc<Filter>,
    dirty: Arc<Mutex<DirtyBitmap>>,
    buf_size: u64,
    policies: Policies,
    pivot: Pivot,
    own_target: bool,
    target_was_ro: bool,
    also_blocks: Vec<Arc<Node>>,
    /// How the work ended: 0 not yet / failed, else a [`Finish`].
    finished: AtomicU8,
    /// Bytes copied (the job's offset; its len adds what is dirty).
    copied: AtomicU64,
    waker: Arc<Mutex<Option<JobWaker>>>,
    mode: CopyMode,
    /// Set once nothing was dirty (the job became ready).
    converged: AtomicBool,
    /// The job's handles on the filter and on the target (it writes there).
    root: Mutex<Option<(Arc<Root>, Arc<Root>)>>,
}

/// Marks what a mirror must copy from the start: the bytes of the layers
/// that count (none for sync=none).
fn mark_initial(
    source: &Node,
    layers: Option<Layers>,
    dirty: &Mutex<DirtyBitmap>,
) -> QmpResult<()> {
    let Some(layers) = layers else {
        return Ok(());
    };
    let size = source.size();
    let mut at = 0;
    while at < size {
        let (counts, n) = layers
            .allocated(source, at, size - at)
            .map_err(|e| QmpError::generic(e.context))?;
        if counts {
            dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_range(at, n)?;
        }
        at += n;
    }
    Ok(())
}

/// Sets a mirror up: the filter above the source with its watcher, then
/// the job's bitmap (in that order: a write either finished before the
/// filter went in, and the scan sees it, or the filter marks it). The
/// caller creates and starts the job.
pub fn setup(d: &Daemon, s: MirrorSetup) -> QmpResult<Mirror> {
    let dirty = Arc::new(Mutex::new(DirtyBitmap::anonymous(
        s.source.size(),
        s.granularity,
    )?));
    let guard = Arc::new(Filter::new(FilterKind::MirrorTop, s.source.clone()));
    let filter = d.insert_filter(
        &s.source,
        s.filter_name.as_deref(),
        Driver::MirrorTop,
        guard.clone(),
        false,
    )?;
    let waker = Arc::new(Mutex::new(None));
    guard.watch(Some(Arc::new(Watch {
        dirty: dirty.clone(),
        mode: s.mode,
        target: s.target.clone(),
        waker: waker.clone(),
    })));
    if let Err(e) = mark_initial(&s.source, s.layers, &dirty) {
        guard.watch(None);
        d.remove_filter(&filter, &s.source);
        return Err(e);
    }
    let root = (
        d.new_root(filter.clone(), false),
        d.new_root(s.target.clone(), true),
    );
    d.relock();
    Ok(Mirror {
        job_type: s.job_type,
        source: s.source,
        target: s.target,
        filter,
        guard,
        dirty,
        buf_size: s.buf_size,
        policies: s.policies,
        pivot: s.pivot,
        own_target: s.own_target,
        target_was_ro: s.target_was_ro,
        also_blocks: s.also_blocks,
        finished: AtomicU8::new(0),
        copied: AtomicU64::new(0),
        waker,
        mode: s.mode,
        converged: AtomicBool::new(false),
        root: Mutex::new(Some(root)),
    })
}

impl Mirror {
    /// qemu's `actively-synced`: in write-blocking mode, once converged,
    /// every write reaches the target before it completes.
    fn actively_synced(&self) -> bool {
        self.mode == CopyMode::WriteBlocking && self.converged.load(Ordering::SeqCst)
    }

    fn dirty_count(&self) -> u64 {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).count()
    }

    /// Copies one range: held against guest writes, cleared, read from the
    /// source, written to the target. A failed copy leaves it dirty.
    fn copy(&self, offset: u64, len: u64, buf: &mut Vec<u8>, from: &Node) -> Result<(), CopyError> {
        let _held = self.guard.hold(offset, len);
        {
            let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let _ = d.reset_range(offset, len);
        }
        let r = copy_range(from, &*self.target, offset, len, buf, Zeroes::JOBS);
        if r.is_ok() {
            self.copied.fetch_add(len, Ordering::SeqCst);
        }
        if r.is_err() {
            let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let _ = d.set_range(offset, len);
        }
        r
    }

    /// The dirty ranges from `cursor` on (wrapping once), up to
    /// `buf_size` bytes in all, cut into pieces for the lanes.
    fn next_batch(&self, cursor: u64) -> Vec<(u64, u64)> {
        let d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let size = d.size();
        let piece = (self.buf_size / LANES as u64).div_ceil(d.granularity()) * d.granularity();
        let mut out = Vec::new();
        let mut total = 0;
        let mut at = cursor;
        let mut wrapped = false;
        while total < self.buf_size {
            let Some((start, len)) = d.next_dirty_area(at, size) else {
                if wrapped || cursor == 0 {
                    break;
                }
                wrapped = true;
                at = 0;
                continue;
            };
            if wrapped && start >= cursor {
                break;
            }
            let len = len.min(self.buf_size - total);
            let mut p = start;
            while p < start + len {
                let n = piece.min(start + len - p);
                out.push((p, n));
                p += n;
            }
            total += len;
            at = start + len;
        }
        out
    }

    /// Copies a batch on [`LANES`] threads at once (one reads while another
    /// writes), each taking every LANES-th piece. A failed piece stays
    /// dirty; the caller copies it again under the error policy.
    fn copy_lanes(&self, batch: &[(u64, u64)], bufs: &mut [Vec<u8>]) -> Result<(), CopyError> {
        let lanes = bufs.len();
        std::thread::scope(|s| {
            let handles: Vec<_> = bufs
                .iter_mut()
                .enumerate()
                .map(|(i, buf)| {
                    s.spawn(move || {
                        for &(at, n) in batch.iter().skip(i).step_by(lanes) {
                            self.copy(at, n, buf, &self.source)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CopyError::source(panicked())))
                })
                .collect::<Result<Vec<()>, CopyError>>()
                .map(|_| ())
        })
    }

    /// Copies everything still dirty (under the final drain: no guest
    /// write runs meanwhile). Reads the replaced node itself: the edges
    /// above it are drained, and filters change no data.
    fn sync_rest(&self) -> Result<(), CopyError> {
        let mut buf = Vec::new();
        loop {
            let batch = self.next_batch(0);
            if batch.is_empty() {
                return Ok(());
            }
            for (start, len) in batch {
                self.copy(start, len, &mut buf, &self.pivot.replaced)?;
            }
        }
    }

    fn finished(&self) -> Option<Finish> {
        match self.finished.load(Ordering::SeqCst) {
            1 => Some(Finish::Complete),
            2 => Some(Finish::KeepSource),
            _ => None,
        }
    }
}

impl JobDriver for Mirror {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn block_info_extra(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        if self.job_type != JobType::Mirror {
            return None;
        }
        let mut m = serde_json::Map::new();
        m.insert("actively-synced".into(), self.actively_synced().into());
        Some(m)
    }

    /// qemu's blk_insert_bs of the target: a client of the target (an
    /// export) does not share writing with the job.
    fn check_created(&self, d: &Daemon) -> QmpResult<()> {
        let mine = self.root.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !d.has_root_besides(&self.target, mine.as_ref().map(|(_, t)| t)) {
            return Ok(());
        }
        let t = self.target.name();
        Err(QmpError::generic(format!(
            "Permission conflict on node '{t}': permissions 'consistent read, write' are both required by an unnamed block device (uses node '{t}' as 'root' child) and unshared by an unnamed block device (uses node '{t}' as 'root' child)."
        )))
    }

    fn total(&self) -> u64 {
        self.dirty_count()
    }

    fn total_now(&self) -> Option<u64> {
        Some(self.copied.load(Ordering::SeqCst) + self.dirty_count())
    }

    fn done(&self) -> Option<u64> {
        Some(self.copied.load(Ordering::SeqCst))
    }

    fn blocks(&self) -> Vec<Arc<Node>> {
        let mut v = vec![
            self.filter.clone(),
            self.source.clone(),
            self.target.clone(),
        ];
        v.extend(self.also_blocks.iter().cloned());
        v
    }

    fn run(&self, ctl: &JobCtl) -> Result<(), JobFailure> {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctl.waker());
        if self.source.size() != self.target.size() {
            return Err(JobFailure(
                "Source and target image have different sizes".into(),
            ));
        }
        let mut bufs = vec![Vec::new(); LANES];
        let mut cursor = 0;
        loop {
            if ctl.is_cancelled() {
                return Ok(());
            }
            let remaining = self.dirty_count();
            if let Some(f) = ctl.finish() {
                // The rest is copied under the final drain.
                if remaining <= self.buf_size {
                    let code = if f == Finish::Complete { 1 } else { 2 };
                    self.finished.store(code, Ordering::SeqCst);
                    return Ok(());
                }
            }
            if remaining == 0 {
                if !self.converged.load(Ordering::SeqCst) {
                    // As qemu: the target is flushed before the job says
                    // it is ready (the pivot then only moves users).
                    let flush = || self.target.flush().map_err(CopyError::target);
                    if self.policies.step(ctl, flush)? {
                        return Ok(());
                    }
                    self.converged.store(true, Ordering::SeqCst);
                }
                ctl.ready();
                if ctl.finish().is_none() && ctl.idle(IDLE) {
                    return Ok(());
                }
                continue;
            }
            let batch = self.next_batch(cursor);
            let Some(&(last, last_len)) = batch.last() else {
                continue;
            };
            if self.copy_lanes(&batch, &mut bufs).is_err() {
                // What failed is dirty again: copy it alone, by policy.
                for &(at, n) in &batch {
                    if self
                        .policies
                        .step(ctl, || self.copy(at, n, &mut bufs[0], &self.source))?
                    {
                        return Ok(());
                    }
                }
            }
            cursor = last + last_len;
            if ctl.progress(batch.iter().map(|&(_, n)| n).sum()) {
                return Ok(());
            }
        }
    }

    /// The job succeeded: the final copy under the drain, then the pivot
    /// (job-complete) or not (a cancel once ready).
    fn commit(&self, d: &Daemon) {
        let Some(finish) = self.finished() else {
            return;
        };
        // The watcher stays until the filter has no users left: a write
        // that passes it before the drain must still be mirrored.
        let mut synced = Ok(());
        let to = match finish {
            Finish::Complete => &self.target,
            Finish::KeepSource => &self.source,
        };
        if finish == Finish::Complete {
            // Before any client write reaches the target: a partial
            // cluster written there copies the rest from this backing.
            if let Some(b) = &self.pivot.target_backing {
                if let Err(e) = d.set_backing(&self.target, b.clone()) {
                    tracing::error!(error = %e.desc, "mirror: could not set the target's backing");
                }
            }
        }
        if finish == Finish::Complete && !Arc::ptr_eq(&self.pivot.replaced, &self.source) {
            // `replaces`: the filter goes, and the replaced node's users
            // move onto the target, in one drain.
            d.replace_nodes_with(
                &[(&self.filter, &self.source), (&self.pivot.replaced, to)],
                || synced = self.sync_rest(),
            );
        } else {
            d.replace_nodes_with(&[(&self.filter, to)], || synced = self.sync_rest());
        }
        if let Err(e) = synced {
            tracing::error!(error = %e.error, "mirror: the final copy failed");
        }
        if finish == Finish::Complete {
            for n in &self.pivot.dropped {
                d.delete_implicit(n);
            }
        }
    }

    fn clean(&self, d: &Daemon) {
        self.guard.watch(None);
        drop(self.root.lock().unwrap_or_else(|p| p.into_inner()).take());
        if d.in_use(&self.filter) {
            // Failed or cancelled: the users stay on the source.
            d.replace_node(&self.filter, &self.source);
        }
        d.forget_node(&self.filter);
        let pivoted = self.finished() == Some(Finish::Complete);
        if !pivoted {
            if self.own_target {
                d.delete_implicit(&self.target);
            } else if self.target_was_ro {
                let _ = crate::qmp::commands::block::reopen_with_file(
                    d,
                    &self.target,
                    true,
                    &mut Vec::new(),
                );
            }
        }
        d.relock();
    }
}

/// qemu's checks of granularity and buf-size; the granularity to use
/// (default: the target's cluster size, within [4K, 64K]... as qemu's
/// bdrv_get_default_bitmap_granularity).
pub fn check_sizes(a: &MirrorArgs, target: &Node) -> QmpResult<(u64, u64)> {
    let granularity = match a.granularity {
        Some(g) if g != 0 => {
            if !(512..=64 << 20).contains(&g) {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            if g & (g - 1) != 0 {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a power of 2",
                ));
            }
            g as u64
        }
        _ => target.cluster_size().clamp(4096, 65536),
    };
    let buf_size = match a.buf_size {
        Some(b) if b < 0 => {
            return Err(QmpError::generic("Invalid parameter 'buf-size'"));
        }
        Some(b) if b > 0 => (b as u64).max(granularity),
        _ => DEFAULT_BUF_SIZE,
    };
    Ok((granularity, buf_size))
}

/// A mirror's job from its QMP arguments, once source and target are
/// known (blockdev-mirror; drive-mirror after it opened the target).
pub fn prepare(
    d: &Daemon,
    a: &MirrorArgs,
    source: Arc<Node>,
    target: Arc<Node>,
    own_target: Option<OwnTarget>,
) -> QmpResult<Mirror> {
    if matches!(a.sync, SyncMode::Bitmap | SyncMode::Incremental) {
        return Err(QmpError::generic(format!(
            "Sync mode '{}' not supported",
            a.sync.name()
        )));
    }
    d.check_op(&source, BlockOp::MirrorSource)?;
    d.check_op(&target, BlockOp::MirrorTarget)?;
    if Arc::ptr_eq(&source, &target) {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    let replaced = match &a.replaces {
        Some(name) => {
            let r = d.find_node(name).ok_or_else(|| {
                QmpError::generic(format!("Failed to find node with node-name='{name}'"))
            })?;
            d.check_op(&r, BlockOp::Replace)?;
            if !filters_down_to(d, &source, &r) {
                return Err(QmpError::generic(format!(
                    "Cannot replace '{name}' by a node mirrored from '{}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
                    a.device
                )));
            }
            r
        }
        None => source.clone(),
    };
    let (granularity, buf_size) = check_sizes(a, &target)?;
    // sync=full copies what any layer holds, or the whole disk when the
    // target must be zeroed too (blockdev-mirror: qemu's zero_target);
    // top only what the top layer holds. Targets of another size fail the
    // job once it runs, as in qemu.
    let layers = match a.sync {
        _ if source.size() != target.size() => None,
        SyncMode::None => None,
        SyncMode::Top => Some(Layers { from: 1, base: 2 }),
        _ if own_target.is_none() => Some(Layers { from: 0, base: 0 }),
        _ => Some(Layers { from: 1, base: 0 }),
    };
    let setup_args = MirrorSetup {
        job_type: JobType::Mirror,
        source,
        target,
        layers,
        granularity,
        buf_size,
        mode: a.copy_mode.unwrap_or(CopyMode::Background),
        policies: Policies {
            source: OnError::parse(a.on_source_error.as_deref()),
            target: OnError::parse(a.on_target_error.as_deref()),
        },
        filter_name: a.filter_node_name.clone(),
        pivot: Pivot {
            replaced,
            target_backing: own_target.as_ref().map(|o| o.backing.clone()),
            dropped: Vec::new(),
        },
        own_target: own_target.is_some(),
        target_was_ro: false,
        also_blocks: Vec::new(),
    };
    setup(d, setup_args)
}

/// Whether `to` is `from`, or below it through filters only (qemu's
/// bdrv_recurse_can_replace).
fn filters_down_to(d: &Daemon, from: &Arc<Node>, to: &Arc<Node>) -> bool {
    let mut n = Some(from.clone());
    while let Some(x) = n {
        if Arc::ptr_eq(&x, to) {
            return true;
        }
        if !d.driver_of(x.name()).is_some_and(Driver::is_filter) {
            return false;
        }
        n = x.child(crate::block::link::ChildRole::Filtered);
    }
    false
}

/// An active commit of `top` into `base` (qemu's commit_active_start).
pub fn active_commit(
    d: &Daemon,
    top: Arc<Node>,
    base: Arc<Node>,
    on_error: OnError,
    filter_name: Option<String>,
) -> QmpResult<Mirror> {
    let base_depth =
        depth_of(&top, &base).ok_or_else(|| QmpError::generic("base not in the chain"))?;
    let between = super::stream::between(&top, Some(&base));
    let target_was_ro = base.read_only();
    if target_was_ro {
        crate::qmp::commands::block::reopen_with_file(d, &base, false, &mut Vec::new())?;
    }
    let mut dropped = vec![top.clone()];
    dropped.extend(between.iter().cloned());
    let granularity = base.cluster_size().clamp(4096, 65536);
    let s = MirrorSetup {
        job_type: JobType::Commit,
        source: top.clone(),
        target: base,
        layers: Some(Layers {
            from: 1,
            base: base_depth,
        }),
        granularity,
        buf_size: DEFAULT_BUF_SIZE,
        mode: CopyMode::Background,
        policies: Policies::both(on_error),
        filter_name,
        pivot: Pivot {
            replaced: top,
            target_backing: None,
            dropped,
        },
        own_target: false,
        target_was_ro,
        also_blocks: between,
    };
    setup(d, s)
}
