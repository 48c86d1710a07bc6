//! Jobs: QEMU's job model (job.c, blockjob.c), once. A job kind (backup,
//! stream, commit, mirror) is a [`JobDriver`] plugged into the same state
//! machine, verbs, transactions and events.
//!
//! Threads and locks: a job's work runs on its own thread and never holds
//! the daemon's command lock; it only asks its [`JobCtl`] at pause points
//! whether to pause, sleep (rate limit) or stop. Everything that changes
//! shared state when a job ends (bitmaps, the graph) runs with the command
//! lock held, as a QMP command would: from the job's thread when it
//! finishes, or from the command (job-finalize, job-cancel of a finished
//! job) that moves it on. A job's own mutex is never held while the
//! command lock is taken, nor across I/O.

pub mod backup;
pub mod commit;
pub mod copy;
pub mod mirror;
pub mod state;
pub mod stream;

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tracing::warn;

pub use state::{JobStatus, JobVerb};

use crate::daemon::Daemon;
use crate::event::EventKind;
use crate::qmp::error::{QmpError, QmpResult};

/// qapi's JobType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    Commit,
    Stream,
    Mirror,
    Backup,
}

impl JobType {
    pub fn name(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
        }
    }
}

/// How a job that became ready was asked to end (qemu's job-complete, or
/// block-job-cancel without force once ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// job-complete: pivot onto the copy.
    Complete,
    /// A cancel once ready: stop with the copy consistent, no pivot; the
    /// job still ends as completed, as in qemu.
    KeepSource,
}

/// What a job does on an I/O error (qapi's BlockdevOnError).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    #[default]
    Report,
    Ignore,
    Enospc,
    Stop,
    Auto,
}

impl OnError {
    pub fn parse(s: Option<&str>) -> OnError {
        match s {
            Some("ignore") => OnError::Ignore,
            Some("enospc") => OnError::Enospc,
            Some("stop") => OnError::Stop,
            Some("auto") => OnError::Auto,
            _ => OnError::Report,
        }
    }
}

/// Which side of a copy failed (BLOCK_JOB_ERROR's `operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

/// What the job does after an error, as decided by its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDecision {
    /// Fail the job.
    Fail,
    /// Go on as if the operation had succeeded.
    Ignore,
    /// The job paused (and has been resumed, or cancelled): try again.
    Retry,
}

/// A job's failure: qemu reports the errno's text ("Input/output error").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure(pub String);

/// A kind of job: the work, and what it does when its transaction commits
/// or aborts. `commit`, `abort` and `clean` run with the command lock held.
pub trait JobDriver: Send + Sync + 'static {
    fn job_type(&self) -> JobType;

    /// The job proper, on the job's thread. Calls the control's pause
    /// points; returns when done, failed or cancelled.
    fn run(&self, ctl: &JobCtl) -> Result<(), JobFailure>;

    /// The job succeeded, and so did its whole transaction.
    fn commit(&self, _d: &Daemon) {}

    /// The job (or another of its transaction) failed or was cancelled.
    fn abort(&self, _d: &Daemon) {}

    /// After commit or abort: undo what the job set up (filters, claims).
    fn clean(&self, _d: &Daemon) {}

    /// Fields of the job's kind in query-block-jobs (a mirror's
    /// `actively-synced`).
    fn block_info_extra(&self) -> Option<serde_json::Map<String, Value>> {
        None
    }

    /// Checks made once the job exists (qemu attaches a mirror's target
    /// after creating the job: a refusal then still shows the job's
    /// `created` and `null`).
    fn check_created(&self, _d: &Daemon) -> QmpResult<()> {
        Ok(())
    }

    /// Whether the job can become ready and take job-complete.
    fn can_complete(&self) -> bool {
        false
    }

    /// Bytes of work when the job is created (its `len` from the start).
    fn total(&self) -> u64 {
        0
    }

    /// The nodes the job works on: qemu blocks every other operation on
    /// them while the job exists.
    fn blocks(&self) -> Vec<Arc<crate::block::node::Node>> {
        Vec::new()
    }

    /// Bytes of work in all now, when the work grows as the job runs (a
    /// mirror's: what it copied plus what is dirty).
    fn total_now(&self) -> Option<u64> {
        None
    }

    /// Bytes done now, when the driver counts them itself (work done on
    /// other threads, such as a filter's copies, counts at once).
    fn done(&self) -> Option<u64> {
        None
    }
}

/// qapi's BlockDeviceIoStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum IoStatus {
    #[default]
    Ok,
    Failed,
    NoSpace,
}

struct Inner {
    status: JobStatus,
    /// Requests to pause (the user's, an error's); the job pauses at its
    /// next pause point while this is above zero.
    pause_count: u32,
    user_paused: bool,
    /// Sitting in a pause point (qemu's `paused`).
    paused: bool,
    /// Sleeping for the rate limit (not `busy`, as qemu reports it).
    sleeping: bool,
    cancelled: bool,
    /// Set by job-complete, or by a soft cancel of a ready job.
    finish: Option<Finish>,
    /// New work arrived for an idle job (see [`JobWaker`]).
    kicked: bool,
    /// The driver's clean-up ran: the job no longer holds its nodes.
    cleaned: bool,
    speed: u64,
    current: u64,
    total: u64,
    auto_finalize: bool,
    auto_dismiss: bool,
    /// Set when the work has returned.
    ret: Option<Result<(), JobFailure>>,
    io_status: IoStatus,
    /// The rate limit's account: bytes charged since an instant. The next
    /// step may start once they are paid for at the current speed (each
    /// step is charged after it is done, so the first goes at once; a new
    /// speed applies to what is already charged, as qemu's ratelimit).
    charged: (Instant, u64),
}

/// Jobs that finish together (a transaction with completion-mode
/// `grouped`); a job alone is a group of one, as in qemu.
#[derive(Default)]
pub struct JobTxn {
    jobs: Mutex<Vec<Weak<Job>>>,
}

impl JobTxn {
    pub fn new() -> Arc<JobTxn> {
        Arc::new(JobTxn::default())
    }

    fn members(&self) -> Vec<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

pub struct Job {
    pub id: String,
    pub job_type: JobType,
    driver: Box<dyn JobDriver>,
    inner: Mutex<Inner>,
    wake: Condvar,
    txn: Arc<JobTxn>,
    daemon: Weak<Daemon>,
}

/// How a job is created (the common QMP arguments).
pub struct JobOptions {
    pub id: String,
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

/// The arguments every block job command takes (qemu's job-id, speed,
/// auto-finalize, auto-dismiss).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommonArgs {
    pub job_id: Option<String>,
    pub speed: Option<i64>,
    pub auto_finalize: Option<bool>,
    pub auto_dismiss: Option<bool>,
}

/// Wakes an idle job when new work arrives (a mirror's filter saw a write).
#[derive(Clone)]
pub struct JobWaker(Weak<Job>);

impl JobWaker {
    pub fn wake(&self) {
        if let Some(job) = self.0.upgrade() {
            job.lock().kicked = true;
            job.wake.notify_all();
        }
    }
}

/// The job's side of its control: pause points, progress, rate limit.
pub struct JobCtl {
    job: Arc<Job>,
}

/// The longest a rate-limited job sleeps before it looks again.
const MAX_NAP: Duration = Duration::from_secs(3600);

impl Job {
    /// Creates a job in state `created` (its event goes out now), in
    /// `txn`. Checks the id as qemu does.
    pub fn create(
        d: &Arc<Daemon>,
        opts: JobOptions,
        driver: Box<dyn JobDriver>,
        txn: &Arc<JobTxn>,
    ) -> QmpResult<Arc<Job>> {
        check_new_id(d, &opts.id)?;
        let total = driver.total();
        let job = Arc::new(Job {
            id: opts.id,
            job_type: driver.job_type(),
            driver,
            inner: Mutex::new(Inner {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                paused: false,
                sleeping: false,
                cancelled: false,
                finish: None,
                kicked: false,
                cleaned: false,
                speed: opts.speed,
                current: 0,
                total,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
                ret: None,
                io_status: IoStatus::Ok,
                charged: (Instant::now(), 0),
            }),
            wake: Condvar::new(),
            txn: txn.clone(),
            daemon: Arc::downgrade(d),
        });
        txn.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&job));
        d.add_job(job.clone());
        job.transition(&mut job.lock(), JobStatus::Created);
        Ok(job)
    }

    /// Creates the job for a driver whose setup is done, as qemu's
    /// block_job_create: the id checked (qemu falls back to the device's
    /// name, which a storage daemon's node does not have: "Invalid job ID
    /// ''"), then the speed. A refused job undoes its driver's setup.
    pub fn build(
        d: &Arc<Daemon>,
        args: &CommonArgs,
        driver: Box<dyn JobDriver>,
        txn: &Arc<JobTxn>,
    ) -> QmpResult<Arc<Job>> {
        let id = args.job_id.clone().unwrap_or_default();
        if let Err(e) = check_new_id(d, &id) {
            driver.abort(d);
            driver.clean(d);
            return Err(e);
        }
        let speed = args.speed.unwrap_or(0);
        let opts = JobOptions {
            id,
            speed: speed.max(0) as u64,
            auto_finalize: args.auto_finalize.unwrap_or(true),
            auto_dismiss: args.auto_dismiss.unwrap_or(true),
        };
        let job = Job::create(d, opts, driver, txn)?;
        if let Err(e) = job.driver.check_created(d) {
            job.refuse(d);
            return Err(e);
        }
        if speed < 0 {
            // qemu sets the speed on the new job, which refuses it.
            job.refuse(d);
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        Ok(job)
    }

    /// Starts the work on its own thread (state `running` at once, as
    /// qemu's job_start). A job started inside a transaction then sees the
    /// end of the transaction's drain, which pauses and resumes it:
    /// clients see that pair, so `in_transaction` sends it too.
    pub fn start(self: &Arc<Job>, in_transaction: bool) -> QmpResult<()> {
        {
            let mut g = self.lock();
            self.transition(&mut g, JobStatus::Running);
            if in_transaction {
                self.transition(&mut g, JobStatus::Paused);
                self.transition(&mut g, JobStatus::Running);
            }
        }
        let job = self.clone();
        std::thread::Builder::new()
            .name(format!("job {}", self.id))
            .spawn(move || job.thread())
            .map(|_| ())
            .map_err(|e| QmpError::generic(format!("Could not start job: {e}")))
    }

    fn thread(self: Arc<Job>) {
        // No pause point before the first step: as in qemu, a pause or a
        // cancel takes effect once the first step has landed.
        let ctl = JobCtl { job: self.clone() };
        let result = self.driver.run(&ctl);
        // The work has returned: a command waiting for that (see
        // [`Job::cancel_and_wait`]) may move the job on itself.
        self.lock().ret = Some(result);
        self.wake.notify_all();
        let Some(d) = self.daemon.upgrade() else {
            return;
        };
        let _serial = d.command_lock.blocking_lock();
        self.advance(&d);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, kind: EventKind) {
        if let Some(d) = self.daemon.upgrade() {
            d.emit(kind);
        }
    }

    /// Moves to `to`, with its JOB_STATUS_CHANGE event.
    fn transition(&self, inner: &mut Inner, to: JobStatus) {
        if !inner.status.may_become(to) {
            warn!(job = %self.id, from = inner.status.name(), to = to.name(), "job transition outside qemu's table");
        }
        let changed = inner.status != to;
        inner.status = to;
        if changed {
            self.emit(EventKind::JobStatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
    }

    /// Whether the job works on `node` (see [`JobDriver::blocks`]): until
    /// its driver has cleaned up (qemu drops a job's blockers with its
    /// filter), not while it waits to be dismissed.
    pub fn blocks(&self, node: &Arc<crate::block::node::Node>) -> bool {
        !self.lock().cleaned && self.driver.blocks().iter().any(|n| Arc::ptr_eq(n, node))
    }

    /// The nodes the job works on (its driver's, see [`JobDriver::blocks`]).
    pub fn nodes(&self) -> Vec<Arc<crate::block::node::Node>> {
        self.driver.blocks()
    }

    /// The driver's clean-up, once.
    fn clean(&self, d: &Daemon) {
        self.driver.clean(d);
        self.lock().cleaned = true;
    }

    /// Paused by job-pause (not yet resumed).
    pub fn user_paused(&self) -> bool {
        self.lock().user_paused
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// qemu's refusal for a verb the job's state does not accept.
    pub fn check_verb(&self, verb: JobVerb) -> QmpResult<()> {
        let status = self.lock().status;
        if verb.allowed_in(status) {
            return Ok(());
        }
        Err(QmpError::generic(format!(
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            self.id,
            status.name(),
            verb.name()
        )))
    }

    /// job-pause / block-job-pause.
    pub fn user_pause(&self) -> QmpResult<()> {
        self.check_verb(JobVerb::Pause)?;
        let mut g = self.lock();
        if g.user_paused {
            return Err(QmpError::generic("Job is already paused"));
        }
        g.user_paused = true;
        g.pause_count += 1;
        // A job sleeping for its rate limit pauses at once.
        self.wake.notify_all();
        Ok(())
    }

    /// job-resume / block-job-resume.
    pub fn user_resume(&self) -> QmpResult<()> {
        {
            let g = self.lock();
            if !g.user_paused || g.pause_count == 0 {
                return Err(QmpError::generic("Can't resume a job that was not paused"));
            }
        }
        self.check_verb(JobVerb::Resume)?;
        let mut g = self.lock();
        g.user_paused = false;
        g.pause_count -= 1;
        g.io_status = IoStatus::Ok;
        self.wake.notify_all();
        Ok(())
    }

    /// block-job-set-speed.
    pub fn set_speed(&self, speed: i64) -> QmpResult<()> {
        self.check_verb(JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        let mut g = self.lock();
        g.speed = speed as u64;
        self.wake.notify_all();
        Ok(())
    }

    /// job-complete / block-job-complete: a ready job pivots and ends.
    pub fn complete(&self) -> QmpResult<()> {
        self.check_verb(JobVerb::Complete)?;
        let mut g = self.lock();
        if g.cancelled || g.finish.is_some() || !self.driver.can_complete() {
            return Err(QmpError::generic(format!(
                "The active block job '{}' cannot be completed",
                self.id
            )));
        }
        g.finish = Some(Finish::Complete);
        self.wake.notify_all();
        Ok(())
    }

    /// job-cancel / block-job-cancel. A running job stops at its next
    /// pause point; a finished one (waiting, pending) aborts with its
    /// transaction now. Without `force`, a ready job (mirror) instead ends
    /// normally without its pivot, as qemu's soft cancel. Call with the
    /// command lock held.
    pub fn cancel(&self, d: &Daemon, force: bool) -> QmpResult<()> {
        self.check_verb(JobVerb::Cancel)?;
        {
            let mut g = self.lock();
            let ready = matches!(g.status, JobStatus::Ready | JobStatus::Standby);
            if !force && ready && self.driver.can_complete() {
                g.finish = Some(Finish::KeepSource);
                if g.user_paused {
                    g.user_paused = false;
                    g.pause_count = g.pause_count.saturating_sub(1);
                }
                self.wake.notify_all();
                return Ok(());
            }
        }
        self.request_cancel();
        if self.lock().ret.is_some() {
            self.advance(d);
        }
        Ok(())
    }

    /// Cancels (forced) and waits until the work has returned, then ends
    /// the job with its transaction, all within the calling command (which
    /// holds the command lock): the job's nodes are released when it
    /// returns.
    pub fn cancel_and_wait(&self, d: &Daemon) {
        self.request_cancel();
        let mut g = self.lock();
        g.pause_count = 0;
        g.user_paused = false;
        self.wake.notify_all();
        while g.ret.is_none() {
            g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        self.advance(d);
    }

    fn request_cancel(&self) {
        let mut g = self.lock();
        g.cancelled = true;
        self.wake.notify_all();
    }

    /// job-finalize: a pending transaction commits. Call with the command
    /// lock held.
    pub fn finalize(&self, d: &Daemon) -> QmpResult<()> {
        self.check_verb(JobVerb::Finalize)?;
        finish_txn(d, &self.txn.members(), true);
        Ok(())
    }

    /// Drops a job refused right after creation (a bad speed): `null`.
    pub fn refuse(&self, d: &Daemon) {
        self.driver.abort(d);
        self.clean(d);
        self.transition(&mut self.lock(), JobStatus::Null);
        d.remove_job(&self.id);
    }

    /// Takes down a job that never started (its transaction aborted): as
    /// qemu, no completion event, only the states.
    pub fn abort_unstarted(&self, d: &Daemon) {
        self.lock().cancelled = true;
        self.driver.abort(d);
        self.clean(d);
        let mut g = self.lock();
        self.transition(&mut g, JobStatus::Aborting);
        self.transition(&mut g, JobStatus::Concluded);
        if g.auto_dismiss {
            self.transition(&mut g, JobStatus::Null);
            drop(g);
            d.remove_job(&self.id);
        }
    }

    /// job-dismiss: a concluded job goes away.
    pub fn dismiss(&self, d: &Daemon) -> QmpResult<()> {
        self.check_verb(JobVerb::Dismiss)?;
        self.transition(&mut self.lock(), JobStatus::Null);
        d.remove_job(&self.id);
        Ok(())
    }

    /// Moves a job whose work has returned (or that was cancelled after
    /// it) on with its transaction. Call with the command lock held.
    fn advance(&self, d: &Daemon) {
        if matches!(self.status(), JobStatus::Concluded | JobStatus::Null) {
            // Already moved on (by a command that waited for the work).
            return;
        }
        let members = self.txn.members();
        let failed = members.iter().any(|j| {
            let g = j.lock();
            g.cancelled || matches!(g.ret, Some(Err(_)))
        });
        if failed {
            for j in &members {
                let mut g = j.lock();
                if g.ret.is_none() {
                    // The others stop too; each comes back here when done.
                    g.cancelled = true;
                    j.wake.notify_all();
                } else if !matches!(
                    g.status,
                    JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
                ) {
                    j.transition(&mut g, JobStatus::Aborting);
                }
            }
            if members.iter().all(|j| j.lock().ret.is_some()) {
                // A member whose work returned meanwhile (its thread sets
                // that before it waits for the command lock) aborts too.
                for j in &members {
                    let mut g = j.lock();
                    if !matches!(
                        g.status,
                        JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
                    ) {
                        j.transition(&mut g, JobStatus::Aborting);
                    }
                }
                finish_txn(d, &members, false);
            }
            return;
        }
        {
            let mut g = self.lock();
            if g.status == JobStatus::Running || g.status == JobStatus::Ready {
                self.transition(&mut g, JobStatus::Waiting);
            }
        }
        if !members.iter().all(|j| j.lock().ret.is_some()) {
            return;
        }
        let mut all_auto = true;
        for j in &members {
            let mut g = j.lock();
            if g.status == JobStatus::Waiting {
                j.transition(&mut g, JobStatus::Pending);
                if !g.auto_finalize {
                    j.emit(EventKind::BlockJobPending {
                        job_type: j.job_type,
                        id: j.id.clone(),
                    });
                }
            }
            all_auto &= g.auto_finalize;
        }
        if all_auto {
            finish_txn(d, &members, true);
        }
    }

    /// Bytes done, as queries and events report them.
    fn current(&self, g: &Inner) -> u64 {
        self.driver.done().unwrap_or(g.current)
    }

    /// qemu's `busy`: doing I/O now. Not while paused or sleeping; nor
    /// when a rate-limited job has finished a step it has not yet charged
    /// (it sleeps next: qemu charges a step before it is done with it).
    fn busy(&self, g: &Inner) -> bool {
        let unreported = self.current(g).saturating_sub(g.current);
        let about_to_sleep = g.speed > 0 && unreported > 0;
        !g.paused && !g.sleeping && !g.status.is_completed() && !about_to_sleep
    }

    /// Bytes of work in all, as queries and events report them.
    fn len(&self, g: &Inner) -> u64 {
        self.driver.total_now().unwrap_or(g.total)
    }

    /// The job as query-jobs lists it.
    pub fn info(&self) -> Value {
        let g = self.lock();
        let mut v = json!({
            "current-progress": self.current(&g),
            "status": g.status,
            "total-progress": self.len(&g),
            "type": self.job_type,
            "id": self.id,
        });
        if let Some(e) = error_text(&g) {
            v["error"] = json!(e);
        }
        v
    }

    /// The job as query-block-jobs lists it.
    pub fn block_info(&self) -> Value {
        let g = self.lock();
        let io_status = match g.io_status {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        };
        let mut v = json!({
            "auto-finalize": g.auto_finalize,
            "io-status": io_status,
            "device": self.id,
            "auto-dismiss": g.auto_dismiss,
            "busy": self.busy(&g),
            "len": self.len(&g),
            "offset": self.current(&g),
            "status": g.status,
            "paused": g.pause_count > 0,
            "speed": g.speed,
            "ready": matches!(g.status, JobStatus::Ready | JobStatus::Standby),
            "type": self.job_type,
        });
        if let Some(e) = error_text(&g) {
            v["error"] = json!(e);
        }
        if let (Value::Object(m), Some(extra)) = (&mut v, self.driver.block_info_extra()) {
            m.extend(extra);
        }
        v
    }
}

/// The `error` queries show: the failure, or qemu's text for a cancel.
fn error_text(g: &Inner) -> Option<String> {
    match &g.ret {
        Some(Err(JobFailure(e))) => Some(e.clone()),
        _ if g.cancelled && g.status.is_completed() => Some("Operation canceled".into()),
        _ => None,
    }
}

/// Ends every job of a transaction once all have returned: `ok` commits,
/// else everything aborts; then their completion events, `concluded`, and
/// (with auto-dismiss) `null`.
fn finish_txn(d: &Daemon, members: &[Arc<Job>], ok: bool) {
    for j in members {
        if ok {
            j.driver.commit(d);
        } else {
            j.driver.abort(d);
        }
    }
    for j in members {
        j.clean(d);
    }
    d.prune();
    for j in members {
        let mut g = j.lock();
        if matches!(g.status, JobStatus::Concluded | JobStatus::Null) {
            continue;
        }
        let (speed, len, offset) = (g.speed, j.len(&g), j.current(&g));
        let error = match &g.ret {
            Some(Err(JobFailure(e))) => Some(e.clone()),
            _ => None,
        };
        if !ok && g.cancelled && error.is_none() {
            j.emit(EventKind::BlockJobCancelled {
                job_type: j.job_type,
                device: j.id.clone(),
                len,
                offset,
                speed,
            });
        } else {
            j.emit(EventKind::BlockJobCompleted {
                job_type: j.job_type,
                device: j.id.clone(),
                len,
                offset,
                speed,
                error,
            });
        }
        j.transition(&mut g, JobStatus::Concluded);
        if g.auto_dismiss {
            j.transition(&mut g, JobStatus::Null);
            drop(g);
            d.remove_job(&j.id);
        }
    }
}

/// Whether `id` may name a new job, with qemu's texts.
pub fn check_new_id(d: &Daemon, id: &str) -> QmpResult<()> {
    check_id(id)?;
    if d.job(id).is_some() {
        return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
    }
    Ok(())
}

/// qemu's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
fn check_id(id: &str) -> QmpResult<()> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
    }
    Ok(())
}

impl JobCtl {
    pub fn is_cancelled(&self) -> bool {
        self.job.lock().cancelled
    }

    /// How the job was asked to end once ready, if it was.
    pub fn finish(&self) -> Option<Finish> {
        self.job.lock().finish
    }

    /// The job has converged: state `ready`, then BLOCK_JOB_READY.
    pub fn ready(&self) {
        let job = &self.job;
        let mut g = job.lock();
        if g.status != JobStatus::Running {
            return;
        }
        job.transition(&mut g, JobStatus::Ready);
        // Converged: nothing to do until new writes come (qemu reports the
        // ready job idle from the moment it says so).
        g.sleeping = true;
        let (len, offset, speed) = (job.len(&g), job.current(&g), g.speed);
        job.emit(EventKind::BlockJobReady {
            job_type: job.job_type,
            device: job.id.clone(),
            len,
            offset,
            speed,
        });
    }

    /// Where the job may pause: waits while a pause is requested (state
    /// `paused`, or `standby` when ready), unless it is cancelled. Returns
    /// whether the job should stop.
    pub fn pause_point(&self) -> bool {
        self.unpaused(self.job.lock()).cancelled
    }

    /// The pause itself, with the job's lock held on return, so a caller
    /// that sleeps next (the rate limit) is never seen running but idle.
    fn unpaused<'a>(&'a self, mut g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        let job = &self.job;
        if g.pause_count > 0 && !g.cancelled {
            let before = g.status;
            let paused_state = if before == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            job.transition(&mut g, paused_state);
            g.paused = true;
            while g.pause_count > 0 && !g.cancelled {
                g = job.wake.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.paused = false;
            job.transition(&mut g, before);
        }
        g
    }

    /// Adds `done` bytes to the progress and, with a speed limit, sleeps
    /// so the job keeps to it (waking early to pause or stop). Returns
    /// whether the job should stop.
    pub fn progress(&self, done: u64) -> bool {
        let job = &self.job;
        let mut g = job.lock();
        g.current += done;
        if g.speed > 0 && done > 0 {
            if Instant::now() >= paid_at(&g) {
                g.charged = (Instant::now(), 0);
            }
            g.charged.1 += done;
        }
        loop {
            if g.cancelled {
                return true;
            }
            if g.pause_count > 0 {
                // Paused while owing: after the pause the debt remains.
                g = self.unpaused(g);
                continue;
            }
            let now = Instant::now();
            let due = paid_at(&g);
            if g.speed == 0 || now >= due {
                return false;
            }
            g.sleeping = true;
            g = job
                .wake
                .wait_timeout(g, (due - now).min(MAX_NAP))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            g.sleeping = false;
        }
    }

    /// Adds `done` bytes of work that copied nothing: progress without a
    /// charge to the rate limit (qemu's stream and commit skip them free).
    pub fn skipped(&self, done: u64) {
        self.job.lock().current += done;
    }

    /// A handle that wakes the job from [`JobCtl::idle`].
    pub fn waker(&self) -> JobWaker {
        JobWaker(Arc::downgrade(&self.job))
    }

    /// Waits (not busy, as qemu's idle job) until new work arrives (a
    /// [`JobWaker`]), a verb (cancel, complete, pause: pausing here), or
    /// `limit`; returns whether the job should stop.
    pub fn idle(&self, limit: Duration) -> bool {
        let job = &self.job;
        let mut g = job.lock();
        if !g.kicked && !g.cancelled && g.pause_count == 0 && g.finish.is_none() {
            g.sleeping = true;
            g = job
                .wake
                .wait_timeout(g, limit)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            g.sleeping = false;
        }
        g.kicked = false;
        drop(g);
        self.pause_point()
    }

    /// An I/O error, handled by `policy` (qemu's block_job_error_action):
    /// the BLOCK_JOB_ERROR event, then fail, ignore, or pause (the job
    /// stops here until resumed or cancelled) and retry.
    pub fn error_action(&self, policy: OnError, op: IoOp, nospace: bool) -> ErrorDecision {
        let action = match policy {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Stop => "stop",
            OnError::Enospc | OnError::Auto if nospace => "stop",
            OnError::Enospc | OnError::Auto => "report",
        };
        let job = &self.job;
        job.emit(EventKind::BlockJobError {
            device: job.id.clone(),
            operation: match op {
                IoOp::Read => "read",
                IoOp::Write => "write",
            },
            action,
        });
        match action {
            "ignore" => ErrorDecision::Ignore,
            "stop" => {
                {
                    let mut g = job.lock();
                    g.io_status = if nospace {
                        IoStatus::NoSpace
                    } else {
                        IoStatus::Failed
                    };
                    if !g.user_paused {
                        g.user_paused = true;
                        g.pause_count += 1;
                    }
                }
                if self.pause_point() {
                    ErrorDecision::Fail
                } else {
                    ErrorDecision::Retry
                }
            }
            _ => ErrorDecision::Fail,
        }
    }
}

/// When the bytes charged to the rate limit are paid for.
fn paid_at(g: &Inner) -> Instant {
    if g.speed == 0 {
        return g.charged.0;
    }
    let secs = (g.charged.1 as f64 / g.speed as f64).min(1e9);
    g.charged.0 + Duration::from_secs_f64(secs)
}

/// Stops every job and waits until each has ended (daemon exit). Called
/// without the command lock: ending jobs take it.
pub fn cancel_all(d: &Daemon) {
    let jobs = d.jobs();
    for j in &jobs {
        j.request_cancel();
        let mut g = j.lock();
        g.pause_count = 0;
        g.user_paused = false;
        j.wake.notify_all();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for j in &jobs {
        let mut g = j.lock();
        while g.ret.is_none() && Instant::now() < deadline {
            let (ng, _) = j
                .wake
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner());
            g = ng;
        }
    }
}
