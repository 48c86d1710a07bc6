//! Jobs over QMP: blockdev-backup, drive-backup (also as transaction
//! actions), the job-* and block-job-* verbs, query-jobs and
//! query-block-jobs. The rules live in crate::job; this file finds the
//! job or nodes a command names and words the errors as qemu does.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::transaction::Action;
use crate::block::node::Node;
use crate::block::BlockNode;
use crate::daemon::Daemon;
use crate::job::backup::{self, BackupArgs, SyncMode};
use crate::job::commit::{CommitArgs, CommitJob};
use crate::job::mirror::MirrorArgs;
use crate::job::stream::StreamArgs;
use crate::job::{CommonArgs, Job, JobDriver, JobTxn};
use crate::qmp::error::{QmpError, QmpResult};

fn arg<'a>(args: &'a Map<String, Value>, k: &str) -> &'a str {
    args.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The job a verb command names: job-* by `id` ("Job not found");
/// block-job-* by `device`, or `id` for finalize and dismiss, with qemu's
/// DeviceNotActive class.
fn named_job(d: &Daemon, command: &str, args: &Map<String, Value>) -> QmpResult<Arc<Job>> {
    let block = command.starts_with("block-job-");
    let key = if block && !command.ends_with("finalize") && !command.ends_with("dismiss") {
        "device"
    } else {
        "id"
    };
    let id = arg(args, key);
    d.job(id).ok_or_else(|| {
        if block {
            QmpError {
                class: "DeviceNotActive",
                desc: format!("Block job '{id}' not found"),
            }
        } else {
            QmpError::generic("Job not found")
        }
    })
}

pub fn query_jobs(d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(Value::Array(d.jobs().iter().map(|j| j.info()).collect()))
}

pub fn query_block_jobs(d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(Value::Array(
        d.jobs().iter().map(|j| j.block_info()).collect(),
    ))
}

/// The job verbs, in both their job-* and block-job-* forms: one rule
/// each, in crate::job. block-job-cancel's `force` only matters to jobs
/// that become ready.
pub fn verb(d: &Daemon, command: &str, args: Map<String, Value>) -> QmpResult<Value> {
    let job = named_job(d, command, &args)?;
    let verb = command.rsplit_once("job-").map_or("", |(_, v)| v);
    match verb {
        "pause" => job.user_pause()?,
        "resume" => job.user_resume()?,
        // job-cancel always forces, as qemu's; block-job-cancel only with
        // `force` (a ready mirror otherwise ends without its pivot).
        "cancel" => {
            let block = command.starts_with("block-job-");
            let force = !block || args.get("force").and_then(Value::as_bool) == Some(true);
            if block && !force && job.user_paused() {
                return Err(QmpError::generic(format!(
                    "The block job for device '{}' is currently paused",
                    job.id
                )));
            }
            job.cancel(d, force)?
        }
        "complete" => job.complete()?,
        "finalize" => job.finalize(d)?,
        "dismiss" => job.dismiss(d)?,
        "set-speed" => job.set_speed(args.get("speed").and_then(Value::as_i64).unwrap_or(0))?,
        _ => {
            return Err(QmpError::command_not_found(format!(
                "The command {command} has not been found"
            )))
        }
    }
    Ok(json!({}))
}

fn parse_backup(data: Value) -> QmpResult<BackupArgs> {
    serde_json::from_value(data).map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

/// A backup being set up: blockdev-backup and drive-backup, alone or in a
/// transaction. `prepare` builds the job (state `created`), `commit`
/// starts it, `abort` takes it down again.
pub struct BackupAction {
    kind: &'static str,
    args: BackupArgs,
    txn: Option<Arc<JobTxn>>,
    job: Option<Arc<Job>>,
}

impl BackupAction {
    pub fn new(kind: &'static str, data: Value) -> QmpResult<BackupAction> {
        Ok(BackupAction {
            kind,
            args: parse_backup(data)?,
            txn: None,
            job: None,
        })
    }

    /// Under a backup session's scratch guard (tidemark's; no QMP form).
    pub fn guarded(mut self, guard: crate::block::cbw::Guard) -> BackupAction {
        self.args.guard = Some(guard);
        self
    }

    /// Joins the jobs of a `grouped` transaction.
    pub fn join(&mut self, txn: &Arc<JobTxn>) {
        self.txn = Some(txn.clone());
    }

    /// drive-backup's target: the image created (unless `mode=existing`)
    /// and opened as an implicit node, as qemu's drive_backup_prepare.
    fn drive_target(&mut self, d: &Daemon, source: &Arc<Node>) -> QmpResult<Arc<Node>> {
        let a = &mut self.args;
        let existing = a.mode.as_deref() == Some("existing");
        let mut backing = None;
        if a.sync == SyncMode::Top {
            backing = source.below();
            if backing.is_none() {
                a.sync = SyncMode::Full;
            }
        }
        if a.sync == SyncMode::None {
            // Fleecing: the target reads through to the live source.
            backing = Some(source.clone());
        }
        let format = match &a.format {
            Some(f) => Some(f.clone()),
            None if existing => None,
            None => Some(
                d.driver_of(source.name())
                    .map(|k| k.name())
                    .unwrap_or("raw")
                    .to_owned(),
            ),
        };
        let path = Path::new(&a.target);
        if let (false, Some(f)) = (existing, &format) {
            let backing = backing.as_ref().filter(|_| f == "qcow2");
            super::block::create_image(d, path, f, source.size(), backing)?;
        }
        let mut extra = Map::new();
        if a.sync == SyncMode::None {
            extra.insert("backing".into(), json!(source.name()));
        }
        super::block::open_image_node(d, path, format.as_deref(), extra)
    }
}

impl Action for BackupAction {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let da = d
            .arc()
            .ok_or_else(|| QmpError::generic("The daemon is shutting down"))?;
        let source = d.node(&self.args.device)?;
        let (target, own) = if self.kind == "drive-backup" {
            (self.drive_target(d, &source)?, true)
        } else {
            (d.node(&self.args.target)?, false)
        };
        let (driver, args) =
            match backup::prepare(d, self.args.clone(), source, target.clone(), own) {
                Ok(p) => p,
                Err(e) => {
                    if own {
                        d.delete_implicit(&target);
                    }
                    return Err(e);
                }
            };
        let txn = self.txn.clone().unwrap_or_default();
        self.job = Some(Job::build(&da, &args.common, Box::new(driver), &txn)?);
        Ok(())
    }

    fn commit(&mut self, _d: &Daemon) {
        if let Some(job) = &self.job {
            if let Err(e) = job.start(true) {
                tracing::error!(job = %job.id, error = %e, "could not start the job");
            }
        }
    }

    fn abort(&mut self, d: &Daemon) {
        if let Some(job) = self.job.take() {
            job.abort_unstarted(d);
        }
    }

    fn join_group(&mut self, txn: &Arc<JobTxn>) -> bool {
        self.join(txn);
        true
    }
}

pub fn blockdev_backup(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a = BackupAction::new("blockdev-backup", Value::Object(args))?;
    super::transaction::run(d, vec![Box::new(a)])?;
    Ok(json!({}))
}

pub fn drive_backup(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a = BackupAction::new("drive-backup", Value::Object(args))?;
    super::transaction::run(d, vec![Box::new(a)])?;
    Ok(json!({}))
}

fn parse<T: serde::de::DeserializeOwned>(args: Map<String, Value>) -> QmpResult<T> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

/// Creates and starts a job whose driver is set up (a job alone: its own
/// transaction).
fn start_job(d: &Daemon, common: &CommonArgs, driver: Box<dyn JobDriver>) -> QmpResult<Value> {
    let da = d
        .arc()
        .ok_or_else(|| QmpError::generic("The daemon is shutting down"))?;
    let job = Job::build(&da, common, driver, &JobTxn::new())?;
    job.start(false)?;
    Ok(json!({}))
}

pub fn block_stream(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a: StreamArgs = parse(args)?;
    let driver = crate::job::stream::prepare(d, &a)?;
    start_job(d, &a.common, Box::new(driver))
}

pub fn block_commit(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a: CommitArgs = parse(args)?;
    match crate::job::commit::prepare(d, &a)? {
        CommitJob::Active(m) => start_job(d, &a.common, Box::new(m)),
        CommitJob::Intermediate(c) => start_job(d, &a.common, Box::new(c)),
    }
}

pub fn blockdev_mirror(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a: MirrorArgs = parse(args)?;
    let source = d.root_node(&a.device)?;
    let target = d.node(&a.target)?;
    let driver = crate::job::mirror::prepare(d, &a, source, target, None)?;
    start_job(d, &a.common, Box::new(driver))
}

/// drive-mirror: the target image created (unless `mode=existing`) as
/// qemu's qmp_drive_mirror does, opened without a backing, and given the
/// source's chain when the job pivots to it.
pub fn drive_mirror(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a: MirrorArgs = parse(args)?;
    let source = d.root_node(&a.device)?;
    let existing = a.mode.as_deref() == Some("existing");
    // What the target's chain continues with: the source itself (sync
    // none), the layer below it (top), or nothing (full).
    let backing = match a.sync {
        SyncMode::None => Some(source.clone()),
        SyncMode::Top => source.below(),
        _ => None,
    };
    let format = a.format.clone().unwrap_or_else(|| {
        d.driver_of(source.name())
            .map(|k| k.name())
            .unwrap_or("raw")
            .to_owned()
    });
    let path = Path::new(&a.target);
    if !existing {
        let create_backing = backing.as_ref().filter(|_| format == "qcow2");
        super::block::create_image(d, path, &format, source.size(), create_backing)?;
    }
    let mut extra = Map::new();
    extra.insert("backing".into(), Value::Null);
    if let Some(n) = &a.node_name {
        extra.insert("node-name".into(), json!(n));
    }
    let target = super::block::open_image_node(d, path, Some(&format), extra)?;
    let own = crate::job::mirror::OwnTarget { backing };
    let driver = match crate::job::mirror::prepare(d, &a, source, target.clone(), Some(own)) {
        Ok(m) => m,
        Err(e) => {
            d.delete_implicit(&target);
            return Err(e);
        }
    };
    start_job(d, &a.common, Box::new(driver))
}
