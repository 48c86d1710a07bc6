//! The backup job (qemu's block/backup.c): a copy-before-write filter goes
//! above the source, so the target becomes the source as it was when the
//! job started; the job copies every cluster the sync mode selects that
//! guest writes have not made the filter copy first.
//!
//! Bitmaps (qemu's table): the job owns its bitmap (busy, frozen) while it
//! runs, and an anonymous successor on the node records the writes made
//! meanwhile. At the end, with `on-success` after a success, or `always`,
//! the bitmap becomes the successor (what changed during the job);
//! `always` after a failure adds back what was not copied; `never`, or a
//! failure, merges the successor in, so no bit is lost.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::copy::{strerror, STEP};
use super::{ErrorDecision, IoOp, JobCtl, JobDriver, JobFailure, JobType, OnError};
use crate::bitmap::set::{lock, BusyClaim, SharedBitmap};
use crate::bitmap::DirtyBitmap;
use crate::block::cbw::CopyBeforeWrite;
use crate::block::copy::Side;
use crate::block::link::Root;
use crate::block::node::Node;
use crate::block::{BlockNode, ErrorKind};
use crate::daemon::{BlockOp, Daemon};
use crate::qmp::error::{QmpError, QmpResult};

/// qemu's MirrorSyncMode, as backup takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

impl SyncMode {
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Top => "top",
            SyncMode::Full => "full",
            SyncMode::None => "none",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// qemu's BitmapSyncMode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

impl BitmapMode {
    pub fn name(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

/// The arguments blockdev-backup and drive-backup share (qapi's
/// BackupCommon), plus drive-backup's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupArgs {
    #[serde(flatten)]
    pub common: super::CommonArgs,
    pub device: String,
    pub target: String,
    pub sync: SyncMode,
    pub bitmap: Option<String>,
    pub bitmap_mode: Option<BitmapMode>,
    pub compress: Option<bool>,
    pub on_source_error: Option<String>,
    pub on_target_error: Option<String>,
    pub filter_node_name: Option<String>,
    pub discard_source: Option<bool>,
    pub x_perf: Option<serde_json::Value>,
    /// drive-backup: the target image's format.
    pub format: Option<String>,
    /// drive-backup: `existing` or `absolute-paths`.
    pub mode: Option<String>,
    /// A backup session's scratch guard (never from QMP).
    #[serde(skip)]
    pub guard: Option<crate::block::cbw::Guard>,
}

/// qemu's default copy unit (block-copy's BLOCK_COPY_CLUSTER_SIZE_DEFAULT).
const DEFAULT_CLUSTER: u64 = 64 << 10;

struct BitmapUse {
    bitmap: SharedBitmap,
    /// Holds the bitmap busy until the job ends.
    claim: Mutex<Option<BusyClaim>>,
    successor: SharedBitmap,
    mode: BitmapMode,
}

/// A backup job's driver.
pub struct Backup {
    source: Arc<Node>,
    filter: Arc<Node>,
    cbw: Arc<CopyBeforeWrite>,
    sync: SyncMode,
    bitmap: Option<BitmapUse>,
    on_source_error: OnError,
    on_target_error: OnError,
    /// The job's handle on the filter, dropped when the job ends.
    root: Mutex<Option<Arc<Root>>>,
    target: Arc<Node>,
    /// A target drive-backup opened for the job, closed with it.
    own_target: Option<Arc<Node>>,
}

/// Checks the arguments as qemu's do_backup_common, in its order, and
/// returns the bitmap mode to use (incremental is bitmap + on-success).
fn check_args(a: &mut BackupArgs) -> QmpResult<()> {
    if matches!(a.sync, SyncMode::Bitmap | SyncMode::Incremental) && a.bitmap.is_none() {
        return Err(QmpError::generic(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            a.sync.name()
        )));
    }
    if a.sync == SyncMode::Incremental {
        if a.bitmap_mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
            return Err(QmpError::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        a.sync = SyncMode::Bitmap;
        a.bitmap_mode = Some(BitmapMode::OnSuccess);
    }
    if a.bitmap.is_none() && a.bitmap_mode.is_some() {
        return Err(QmpError::generic(
            "Cannot specify bitmap sync mode without a bitmap",
        ));
    }
    Ok(())
}

/// The bitmap checks of do_backup_common that need the bitmap itself.
fn check_bitmap(a: &BackupArgs, source: &Node) -> QmpResult<Option<(SharedBitmap, BitmapMode)>> {
    let Some(name) = &a.bitmap else {
        return Ok(None);
    };
    let b = source
        .bitmaps()
        .get(name)
        .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' could not be found")))?;
    let Some(mode) = a.bitmap_mode else {
        return Err(QmpError::generic(
            "Bitmap sync mode must be given when providing a bitmap",
        ));
    };
    lock(&b).check(crate::bitmap::Checks::ALLOW_RO)?;
    if a.sync == SyncMode::None {
        return Err(QmpError::generic(format!(
            "sync mode '{}' does not produce meaningful bitmap outputs",
            a.sync.name()
        )));
    }
    if mode == BitmapMode::Never && a.sync != SyncMode::Bitmap {
        return Err(QmpError::generic(format!(
            "Bitmap sync mode '{}' has no meaningful effect when combined with sync mode '{}'",
            mode.name(),
            a.sync.name()
        )));
    }
    if mode != BitmapMode::Never {
        lock(&b).check(crate::bitmap::Checks::DEFAULT)?;
    }
    Ok(Some((b, mode)))
}

/// The clusters the job must copy, by sync mode.
fn initial_todo(
    sync: SyncMode,
    source: &Node,
    bitmap: Option<&SharedBitmap>,
    cluster: u64,
) -> QmpResult<DirtyBitmap> {
    let size = source.size();
    let mut todo = DirtyBitmap::anonymous(size, cluster)?;
    match sync {
        // The job copies nothing itself, but every cluster is the filter's
        // to copy before a write changes it.
        SyncMode::None | SyncMode::Full => todo.set_range(0, size)?,
        SyncMode::Bitmap | SyncMode::Incremental => {
            if let Some(b) = bitmap {
                todo.merge(&lock(b))?;
            }
        }
        SyncMode::Top => {
            // Only what the top layer itself holds.
            let mut pos = 0;
            while pos < size {
                let e = source.allocation_depth(pos, size - pos)?;
                let n = e.len.clamp(1, size - pos);
                if e.depth == 1 {
                    todo.set_range(pos, n)?;
                }
                pos += n;
            }
        }
    }
    Ok(todo)
}

/// Sets up a backup of `source` into `target` (both graph nodes): checks,
/// the bitmap's successor, the copy-before-write filter put above the
/// source (every parent and export moves onto it). The caller creates and
/// starts the job. `own_target` is closed with the job (drive-backup).
pub fn prepare(
    d: &Daemon,
    mut a: BackupArgs,
    source: Arc<Node>,
    target: Arc<Node>,
    own_target: bool,
) -> QmpResult<(Backup, BackupArgs)> {
    check_args(&mut a)?;
    let bitmap = check_bitmap(&a, &source)?;
    if Arc::ptr_eq(&source, &target) {
        return Err(QmpError::generic("Source and target cannot be the same"));
    }
    d.check_op(&source, BlockOp::BackupSource)?;
    d.check_op(&target, BlockOp::BackupTarget)?;
    let compress = a.compress == Some(true);
    if compress && target.compressed_cluster() == 0 {
        return Err(QmpError::generic(format!(
            "Compression is not supported for this drive {}",
            target.name()
        )));
    }
    if source.size() != target.size() {
        return Err(QmpError::generic(
            "Source and target image have different sizes",
        ));
    }
    if let Some(n) = &a.filter_node_name {
        d.check_new_node_name(n)
            .map_err(|e| QmpError::generic(format!("Could not create node: {}", e.desc)))?;
    }
    let cluster = match a.guard.as_ref().map_or(0, |g| g.cluster) {
        0 => DEFAULT_CLUSTER,
        unit => unit,
    }
    .max(target.cluster_size());
    let todo = initial_todo(a.sync, &source, bitmap.as_ref().map(|(b, _)| b), cluster)?;
    let bitmap = match bitmap {
        Some((b, mode)) => {
            let claim = BusyClaim::take(&b)?;
            let (size, granularity, recording) = {
                let g = lock(&b);
                (g.size(), g.granularity(), g.state.recording)
            };
            let mut succ = DirtyBitmap::anonymous(size, granularity)?;
            succ.state.recording = recording;
            let successor = source.bitmaps().add_anonymous(succ);
            lock(&b).state.frozen = true;
            Some(BitmapUse {
                bitmap: b,
                claim: Mutex::new(Some(claim)),
                successor,
                mode,
            })
        }
        None => None,
    };
    let cbw = CopyBeforeWrite::new(source.clone(), target.clone(), todo, compress);
    let cbw = Arc::new(match a.guard.clone() {
        Some(guard) => cbw.guarded(guard),
        None => cbw,
    });
    let filter = d.insert_filter(
        &source,
        a.filter_node_name.as_deref(),
        crate::block::open::Driver::CopyBeforeWrite,
        cbw.clone(),
        false,
    )?;
    let root = d.new_root(filter.clone(), false);
    let backup = Backup {
        source,
        filter,
        cbw,
        sync: a.sync,
        bitmap,
        on_source_error: OnError::parse(a.on_source_error.as_deref()),
        on_target_error: OnError::parse(a.on_target_error.as_deref()),
        root: Mutex::new(Some(root)),
        own_target: own_target.then(|| target.clone()),
        target,
    };
    Ok((backup, a))
}

impl Backup {
    /// The next step of the copy, handling errors by policy. `Ok(None)`:
    /// nothing left; `Ok(Some(stop))`: a step done, and whether to stop.
    fn step(&self, ctl: &JobCtl, from: &mut u64) -> Result<Option<bool>, JobFailure> {
        loop {
            let Some(r) = self.cbw.copy_next(from, STEP) else {
                return Ok(None);
            };
            let e = match r {
                Ok(_) => return Ok(Some(false)),
                Err(e) => e,
            };
            let (policy, op) = match e.side {
                Side::Source => (self.on_source_error, IoOp::Read),
                Side::Target => (self.on_target_error, IoOp::Write),
            };
            let nospace = e.error.kind == ErrorKind::NoSpace;
            match ctl.error_action(policy, op, nospace) {
                ErrorDecision::Fail if ctl.is_cancelled() => {
                    // Cancelled while stopped on the error: as in qemu,
                    // the step that was going on is tried once more.
                    let _ = self.cbw.copy_next(from, STEP);
                    return Ok(Some(true));
                }
                ErrorDecision::Fail => return Err(JobFailure(strerror(&e.error))),
                // qemu tries again (the cluster is still to copy), after
                // a pause point so the job can still be paused or stopped.
                ErrorDecision::Ignore => {
                    if ctl.pause_point() {
                        return Ok(Some(true));
                    }
                }
                ErrorDecision::Retry => {}
            }
        }
    }

    /// The bitmap's bits when the job ends, by qemu's table.
    fn settle_bitmap(&self, ok: bool) {
        let Some(u) = &self.bitmap else {
            return;
        };
        let sync = (ok || u.mode == BitmapMode::Always) && u.mode != BitmapMode::Never;
        let succ = lock(&u.successor).clone();
        let mut b = lock(&u.bitmap);
        if sync {
            b.clear();
        }
        // Same size and granularity: cannot fail.
        let _ = b.merge_bits(&succ);
        if sync && !ok {
            let _ = b.merge_bits(&self.cbw.todo());
        }
        b.state.frozen = false;
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn run(&self, ctl: &JobCtl) -> Result<(), JobFailure> {
        let mut reported = 0;
        let mut report = |ctl: &JobCtl| {
            let now = self.cbw.copied();
            let stop = ctl.progress(now - reported);
            reported = now;
            stop
        };
        if self.sync == SyncMode::None {
            // Fleecing: only the filter copies; the job runs until
            // cancelled.
            while !ctl.idle(std::time::Duration::from_millis(200)) {
                if report(ctl) {
                    break;
                }
            }
            return Ok(());
        }
        let mut from = 0;
        while let Some(stop) = self.step(ctl, &mut from)? {
            if stop || report(ctl) {
                return Ok(());
            }
        }
        report(ctl);
        Ok(())
    }

    fn commit(&self, _d: &Daemon) {
        self.settle_bitmap(true);
    }

    fn total(&self) -> u64 {
        self.cbw.remaining()
    }

    fn blocks(&self) -> Vec<Arc<Node>> {
        vec![self.filter.clone(), self.target.clone()]
    }

    fn done(&self) -> Option<u64> {
        Some(self.cbw.copied())
    }

    fn abort(&self, _d: &Daemon) {
        self.settle_bitmap(false);
    }

    fn clean(&self, d: &Daemon) {
        self.cbw.deactivate();
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(root);
        d.remove_filter(&self.filter, &self.source);
        if let Some(u) = &self.bitmap {
            self.source.bitmaps().remove_shared(&u.successor);
            u.claim.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        if let Some(t) = &self.own_target {
            d.delete_implicit(t);
        }
        d.relock();
    }
}
