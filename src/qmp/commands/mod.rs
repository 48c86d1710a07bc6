//! QMP commands, one file per family; [`execute`] is the one dispatcher.
//! Arguments reach a command already checked against proto/qmp-schema.json.

pub mod bitmap;
pub mod block;
pub mod export;
pub mod job;
pub mod misc;
pub mod object;
pub mod session;
pub mod snapshot;
pub mod transaction;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::daemon::Daemon;
use crate::qmp::error::{QmpError, QmpResult};

type SyncCommand = fn(&Daemon, Map<String, Value>) -> QmpResult<Value>;

/// Commands that only touch memory and open files: run on the blocking
/// pool, so a slow disk never stalls a tokio worker.
fn sync_command(name: &str) -> Option<SyncCommand> {
    Some(match name {
        "query-version" => misc::query_version,
        "query-commands" => misc::query_commands,
        "query-qmp-schema" => misc::query_qmp_schema,
        "quit" => misc::quit,
        "object-add" => object::object_add,
        "object-del" => object::object_del,
        "blockdev-add" => block::blockdev_add,
        "blockdev-del" => block::blockdev_del,
        "blockdev-reopen" => block::blockdev_reopen,
        "x-tidemark-insert-filter" => block::insert_filter,
        "x-tidemark-remove-filter" => block::remove_filter,
        "query-named-block-nodes" => block::query_named_block_nodes,
        "query-block" => block::query_block,
        "block-dirty-bitmap-add" => |d, a| bitmap::command(d, "block-dirty-bitmap-add", a),
        "block-dirty-bitmap-remove" => |d, a| bitmap::command(d, "block-dirty-bitmap-remove", a),
        "block-dirty-bitmap-clear" => |d, a| bitmap::command(d, "block-dirty-bitmap-clear", a),
        "block-dirty-bitmap-enable" => |d, a| bitmap::command(d, "block-dirty-bitmap-enable", a),
        "block-dirty-bitmap-disable" => |d, a| bitmap::command(d, "block-dirty-bitmap-disable", a),
        "block-dirty-bitmap-merge" => |d, a| bitmap::command(d, "block-dirty-bitmap-merge", a),
        "x-debug-block-dirty-bitmap-sha256" => bitmap::sha256,
        "transaction" => transaction::transaction,
        "block-export-add" => export::block_export_add,
        "block-export-del" => export::block_export_del,
        "query-block-exports" => export::query_block_exports,
        "nbd-server-add" => export::nbd_server_add,
        "nbd-server-remove" => export::nbd_server_remove,
        "blockdev-backup" => job::blockdev_backup,
        "drive-backup" => job::drive_backup,
        "blockdev-snapshot-sync" => snapshot::blockdev_snapshot_sync,
        "blockdev-snapshot" => snapshot::blockdev_snapshot,
        "block-stream" => job::block_stream,
        "x-tidemark-backup-begin" => session::begin,
        "x-tidemark-backup-end" => session::end,
        "x-tidemark-query-backups" => session::query,
        "x-tidemark-query-checkpoints" => session::query_checkpoints,
        "x-tidemark-bitmap-store" => bitmap::store_point,
        "x-tidemark-checkpoint-remove" => session::remove_checkpoint,
        "block-commit" => job::block_commit,
        "blockdev-mirror" => job::blockdev_mirror,
        "drive-mirror" => job::drive_mirror,
        "query-jobs" => job::query_jobs,
        "query-block-jobs" => job::query_block_jobs,
        "job-pause" => |d, a| job::verb(d, "job-pause", a),
        "job-resume" => |d, a| job::verb(d, "job-resume", a),
        "job-cancel" => |d, a| job::verb(d, "job-cancel", a),
        "job-complete" => |d, a| job::verb(d, "job-complete", a),
        "job-finalize" => |d, a| job::verb(d, "job-finalize", a),
        "job-dismiss" => |d, a| job::verb(d, "job-dismiss", a),
        "block-job-pause" => |d, a| job::verb(d, "block-job-pause", a),
        "block-job-resume" => |d, a| job::verb(d, "block-job-resume", a),
        "block-job-cancel" => |d, a| job::verb(d, "block-job-cancel", a),
        "block-job-complete" => |d, a| job::verb(d, "block-job-complete", a),
        "block-job-finalize" => |d, a| job::verb(d, "block-job-finalize", a),
        "block-job-dismiss" => |d, a| job::verb(d, "block-job-dismiss", a),
        "block-job-set-speed" => |d, a| job::verb(d, "block-job-set-speed", a),
        _ => return None,
    })
}

/// Runs a command whose arguments the schema accepted. Commands run one at
/// a time across all monitors (see [`Daemon::command_lock`]).
pub async fn execute(d: &Arc<Daemon>, name: &str, args: Map<String, Value>) -> QmpResult<Value> {
    let _serial = d.command_lock.lock().await;
    d.check_open()?;
    let result = match name {
        "nbd-server-start" => export::nbd_server_start(d, args).await,
        "nbd-server-stop" => export::nbd_server_stop(d, args).await,
        _ => {
            let f = sync_command(name).ok_or_else(|| {
                QmpError::command_not_found(format!("The command {name} has not been found"))
            })?;
            let d = d.clone();
            tokio::task::spawn_blocking(move || f(&d, args))
                .await
                .map_err(|e| QmpError::generic(format!("command failed: {e}")))?
        }
    };
    // Nodes the command left without users go, as qemu's last unref.
    let d = d.clone();
    let _ = tokio::task::spawn_blocking(move || d.prune()).await;
    result
}
