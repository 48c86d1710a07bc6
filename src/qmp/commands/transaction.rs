//! `transaction`: a group of actions that all happen or none does.
//!
//! Every action has four steps, as qemu's: `prepare` does the work in a way
//! that can be undone; after every action prepared, each `commit`s in
//! order; if one fails to prepare, those already prepared `abort` in
//! reverse order, restoring exactly what they changed. `clean` runs last
//! either way. The single bitmap commands are one-action transactions, so
//! each rule has one home. Jobs (blockdev-backup) plug in by implementing
//! [`Action`] and adding a line to [`parse_action`].

use serde_json::{Map, Value};

use std::sync::Arc;

use super::bitmap;
use super::job::BackupAction;
use super::snapshot::{SnapshotAction, SnapshotKind};
use crate::daemon::Daemon;
use crate::job::JobTxn;
use crate::qmp::error::{QmpError, QmpResult};

pub trait Action: Send {
    /// The action's name, as in the `type` member.
    fn kind(&self) -> &'static str;
    fn prepare(&mut self, d: &Daemon) -> QmpResult<()>;
    /// Told before `prepare` whether an abort may follow (false for a group
    /// of one), so an action may skip saving state it would never restore.
    fn set_undo_needed(&mut self, _needed: bool) {}
    fn commit(&mut self, _d: &Daemon) {}
    fn abort(&mut self, _d: &Daemon) {}
    fn clean(&mut self, _d: &Daemon) {}
    /// After every action committed: make what changed durable where a
    /// crash would otherwise lose it (a bitmap change and the intent log).
    fn after_commit(&mut self, _d: &Daemon) {}
    /// Joins the jobs of a `grouped` transaction; false for actions that
    /// start no job (qemu then refuses the property).
    fn join_group(&mut self, _txn: &Arc<JobTxn>) -> bool {
        false
    }
}

/// Runs actions as one transaction.
pub fn run(d: &Daemon, mut actions: Vec<Box<dyn Action>>) -> QmpResult<()> {
    // As qemu's qmp_transaction: no client request between the actions.
    let _quiet = d.quiesce();
    let mut prepared = 0;
    let mut failure = None;
    let undo = actions.len() > 1;
    for a in actions.iter_mut() {
        a.set_undo_needed(undo);
        match a.prepare(d) {
            Ok(()) => prepared += 1,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    match failure {
        None => {
            actions.iter_mut().for_each(|a| a.commit(d));
            actions.iter_mut().for_each(|a| a.after_commit(d));
        }
        Some(_) => actions[..prepared]
            .iter_mut()
            .rev()
            .for_each(|a| a.abort(d)),
    }
    actions.iter_mut().for_each(|a| a.clean(d));
    failure.map_or(Ok(()), Err)
}

/// The `abort` action: always fails to prepare, so tests and clients can
/// prove the rollback.
struct AbortAction;

impl Action for AbortAction {
    fn kind(&self) -> &'static str {
        "abort"
    }

    fn prepare(&mut self, _d: &Daemon) -> QmpResult<()> {
        Err(QmpError::generic("Transaction aborted using Abort action"))
    }
}

pub fn parse_action(v: &Value) -> QmpResult<Box<dyn Action>> {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    Ok(match kind {
        "abort" => Box::new(AbortAction),
        "blockdev-backup" => Box::new(BackupAction::new("blockdev-backup", data)?),
        "drive-backup" => Box::new(BackupAction::new("drive-backup", data)?),
        "blockdev-snapshot-sync" => Box::new(SnapshotAction::new(SnapshotKind::Sync, data)?),
        "blockdev-snapshot" => Box::new(SnapshotAction::new(SnapshotKind::Existing, data)?),
        _ => bitmap::action(kind, data)?,
    })
}

/// The `transaction` command (arguments already checked by the schema).
pub fn transaction(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let actions = args
        .get("actions")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let grouped = args
        .get("properties")
        .and_then(|p| p.get("completion-mode"))
        .and_then(Value::as_str)
        == Some("grouped");
    let mut actions = actions
        .iter()
        .map(parse_action)
        .collect::<QmpResult<Vec<_>>>()?;
    if grouped {
        // The jobs end together; qemu refuses the property for any
        // action that starts no job, naming the first.
        let txn = JobTxn::new();
        for a in actions.iter_mut() {
            if !a.join_group(&txn) {
                return Err(QmpError::generic(format!(
                    "Action '{}' does not support transaction property completion-mode = grouped",
                    a.kind()
                )));
            }
        }
    }
    run(d, actions)?;
    Ok(Value::Object(Map::new()))
}
