//! Pull-backup sessions, tidemark's extension (`x-tidemark-backup-begin`,
//! `-end`, `x-tidemark-query-backups`): one call builds, for one or
//! several disks at once, what libvirt's pull sequence builds with a dozen
//! commands, and one call takes it down. Each step is the QMP command
//! libvirt would send, run here in the same order:
//!
//! 1. a qcow2 scratch per disk, with the live disk as its backing;
//! 2. one transaction: the new checkpoint bitmap on each disk, a disabled
//!    `backup-<disk>` bitmap on each scratch merged from the old
//!    checkpoint in every layer that has it, and `blockdev-backup
//!    sync=none` into each scratch (the point in time);
//! 3. a read-only export of each scratch with its bitmap.
//!
//! Ending with `success: false` removes the new checkpoint again: since
//! every checkpoint bitmap keeps recording, the old one still covers
//! every write since it was made, and nothing is lost for the next
//! incremental. Either way the jobs, exports, scratch nodes and files go.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::block::BlockNode;
use crate::daemon::Daemon;
use crate::qmp::error::{QmpError, QmpResult};

/// One disk of a session.
struct Disk {
    node: String,
    scratch_node: String,
    /// A scratch file tidemark made (deleted at the end).
    scratch_file: Option<PathBuf>,
    job: String,
    export: String,
    bitmap: Option<String>,
    size: u64,
    dirty: u64,
}

struct Session {
    id: String,
    checkpoint: Option<String>,
    disks: Vec<Disk>,
}

/// The open sessions.
#[derive(Default)]
pub struct Sessions(Mutex<Vec<Session>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DiskArgs {
    node: String,
    /// A scratch file to create (default: one in the temp directory).
    scratch: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct BeginArgs {
    id: String,
    disks: Vec<DiskArgs>,
    incremental: Option<String>,
    checkpoint: Option<String>,
    /// Seconds without a client after which the session ends as failed.
    lease: Option<u32>,
}

fn parse<T: serde::de::DeserializeOwned>(args: Map<String, Value>) -> QmpResult<T> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

pub fn begin(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a: BeginArgs = parse(args)?;
    if d.sessions().lock().iter().any(|s| s.id == a.id) {
        return Err(QmpError::generic(format!(
            "Backup session '{}' already exists",
            a.id
        )));
    }
    if a.disks.is_empty() {
        return Err(QmpError::generic(
            "A backup session needs at least one disk",
        ));
    }
    let mut disks: Vec<Disk> = Vec::new();
    let mut checkpointed = false;
    let built = prepare(d, &a, &mut disks, &mut checkpointed);
    if let Err(e) = built {
        undo(d, &disks);
        if let (true, Some(c)) = (checkpointed, &a.checkpoint) {
            drop_checkpoint(d, &disks, c);
        }
        return Err(e);
    }
    let reply = disks
        .iter()
        .map(|k| {
            json!({
                "node": k.node, "export": k.export, "uri": d.nbd_uri(&k.export),
                "bitmap": k.bitmap, "size": k.size, "dirty-bytes": k.dirty,
            })
        })
        .collect::<Vec<_>>();
    if let (Some(secs), Some(da)) = (a.lease, d.arc()) {
        watch_lease(&da, a.id.clone(), Duration::from_secs(secs.into()));
    }
    d.sessions().lock().push(Session {
        id: a.id,
        checkpoint: a.checkpoint,
        disks,
    });
    Ok(json!({ "disks": reply }))
}

/// Builds every disk's part; what was built is in `disks` for [`undo`].
fn prepare(
    d: &Daemon,
    a: &BeginArgs,
    disks: &mut Vec<Disk>,
    checkpointed: &mut bool,
) -> QmpResult<()> {
    d.nbd_max_connections()?;
    let mut actions = Vec::new();
    for k in &a.disks {
        let node = d.node(&k.node)?;
        let merge_from: Vec<String> = match &a.incremental {
            Some(c) => crate::checkpoint::validate(&k.node, &node, c)?
                .iter()
                .map(|l| l.name().to_owned())
                .collect(),
            None => Vec::new(),
        };
        let file = k.scratch.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "tidemark-{}-{}-{}.scratch.qcow2",
                std::process::id(),
                a.id,
                k.node
            ))
        });
        let path = file.as_path();
        if k.scratch.is_some() && path.exists() {
            return Err(QmpError::generic(format!(
                "Scratch file '{}' already exists",
                path.display()
            )));
        }
        super::block::create_image(d, path, "qcow2", node.size(), None)?;
        let mut extra = Map::new();
        extra.insert("backing".into(), json!(node.name()));
        let scratch = match super::block::open_image_node(d, path, Some("qcow2"), extra) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let name = format!("{}-{}", a.id, k.node);
        let bitmap = a.incremental.as_ref().map(|_| format!("backup-{}", k.node));
        disks.push(Disk {
            node: k.node.clone(),
            scratch_node: scratch.name().to_owned(),
            scratch_file: Some(file.clone()),
            job: format!("backup-{name}"),
            export: name,
            bitmap: bitmap.clone(),
            size: node.size(),
            dirty: node.size(),
        });
        if let Some(c) = &a.checkpoint {
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": node.name(), "name": c, "persistent": true, "disabled": false}}));
        }
        if let (Some(b), Some(c)) = (&bitmap, &a.incremental) {
            let mut add = json!({"node": scratch.name(), "name": b, "persistent": false,
                                 "disabled": true});
            if let Some(x) = node.bitmaps().get(c) {
                add["granularity"] = json!(crate::bitmap::set::lock(&x).granularity());
            }
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": add}));
            let sources: Vec<Value> = merge_from
                .iter()
                .map(|l| json!({"node": l, "name": c}))
                .collect();
            actions.push(json!({"type": "block-dirty-bitmap-merge",
                "data": {"node": scratch.name(), "target": b, "bitmaps": sources}}));
        }
        actions.push(json!({"type": "blockdev-backup",
            "data": {"device": node.name(), "job-id": format!("backup-{}-{}", a.id, k.node),
                     "target": scratch.name(), "sync": "none"}}));
    }
    let txn = json!({ "actions": actions });
    super::transaction::transaction(d, txn.as_object().cloned().unwrap_or_default())?;
    *checkpointed = true;
    if let Some(c) = &a.checkpoint {
        for k in disks.iter() {
            crate::checkpoint::record(&d.node(&k.node)?, c)?;
        }
    }
    for k in disks.iter_mut() {
        let mut export = json!({"type": "nbd", "id": k.export, "node-name": k.scratch_node,
            "name": k.export, "writable": false});
        if let Some(b) = &k.bitmap {
            export["bitmaps"] = json!([b]);
            k.dirty = d
                .find_node(&k.scratch_node)
                .and_then(|n| n.bitmaps().get(b))
                .map_or(0, |x| crate::bitmap::set::lock(&x).count());
        }
        super::export::block_export_add(d, export.as_object().cloned().unwrap_or_default())?;
    }
    Ok(())
}

/// Takes down what a session built: exports, jobs, scratch nodes, files.
/// Takes a session's new checkpoint back: its bitmaps and its records.
fn drop_checkpoint(d: &Daemon, disks: &[Disk], name: &str) {
    for k in disks {
        let Some(disk) = d.find_node(&k.node) else {
            continue;
        };
        let removed = remove_bitmaps(d, &crate::checkpoint::layers_with(&disk, name), name)
            .and_then(|_| crate::checkpoint::forget(&disk, name));
        if let Err(e) = removed {
            tracing::error!(disk = %k.node, checkpoint = name, error = %e.desc, "could not take the checkpoint back");
        }
    }
}

fn undo(d: &Daemon, disks: &[Disk]) {
    for k in disks {
        let _ = d.delete_export(&k.export, false, true);
        if let Some(job) = d.job(&k.job) {
            job.cancel_and_wait(d);
        }
    }
    d.prune();
    for k in disks {
        if let Some(f) = &k.scratch_file {
            if d.find_node(&k.scratch_node).is_none() {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// How often a lease is looked at.
const LEASE_TICK: Duration = Duration::from_millis(200);

/// Ends session `id` as failed once no client has been connected to any
/// of its exports for `lease` (a vendor's agent that died does not keep
/// its checkpoint, nor the scratch space). A timer on its own thread; the
/// check and the end run under the command lock, as a command would.
fn watch_lease(d: &Arc<Daemon>, id: String, lease: Duration) {
    let d = Arc::downgrade(d);
    let spawned = std::thread::Builder::new()
        .name(format!("lease {id}"))
        .spawn(move || {
            let mut idle_since = Instant::now();
            loop {
                std::thread::sleep(LEASE_TICK);
                let Some(d) = d.upgrade() else {
                    return;
                };
                let _serial = d.command_lock.blocking_lock();
                if d.check_open().is_err() {
                    return;
                }
                let exports: Option<Vec<String>> = {
                    let all = d.sessions().lock();
                    all.iter()
                        .find(|s| s.id == id)
                        .map(|s| s.disks.iter().map(|k| k.export.clone()).collect())
                };
                let Some(exports) = exports else {
                    return;
                };
                if exports.iter().any(|e| d.export_clients(e) > 0) {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= lease {
                    let args = json!({"id": id, "success": false});
                    if end(&d, args.as_object().cloned().unwrap_or_default()).is_ok() {
                        d.prune();
                        d.emit(crate::event::EventKind::XTidemarkBackupExpired { id });
                    }
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not watch a session's lease");
    }
}

#[derive(Deserialize)]
struct EndArgs {
    id: String,
    success: bool,
}

pub fn end(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a: EndArgs = parse(args)?;
    let session = {
        let mut all = d.sessions().lock();
        let Some(i) = all.iter().position(|s| s.id == a.id) else {
            return Err(QmpError::generic(format!(
                "Backup session '{}' not found",
                a.id
            )));
        };
        all.remove(i)
    };
    undo(d, &session.disks);
    if !a.success {
        // The old checkpoints kept recording: dropping the new one loses
        // nothing.
        if let Some(c) = &session.checkpoint {
            drop_checkpoint(d, &session.disks, c);
        }
    }
    Ok(json!({}))
}

pub fn query(d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    let all = d.sessions().lock();
    let list: Vec<Value> = all
        .iter()
        .map(|s| {
            let disks: Vec<Value> = s
                .disks
                .iter()
                .map(|k| {
                    let used = d
                        .find_node(&k.scratch_node)
                        .and_then(|n| n.allocated_size())
                        .unwrap_or(0);
                    json!({"node": k.node, "export": k.export, "uri": d.nbd_uri(&k.export),
                           "bitmap": k.bitmap, "size": k.size, "dirty-bytes": k.dirty,
                           "scratch-bytes": used})
                })
                .collect();
            json!({"id": s.id, "checkpoint": s.checkpoint, "disks": disks})
        })
        .collect();
    Ok(Value::Array(list))
}

/// x-tidemark-query-checkpoints: a disk's checkpoints, oldest first.
pub fn query_checkpoints(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let name = args.get("node").and_then(Value::as_str).unwrap_or("");
    let disk = d.node(name)?;
    Ok(crate::checkpoint::describe(name, &disk))
}

/// x-tidemark-checkpoint-remove: the checkpoint's bitmap goes from every
/// layer that has it (read-only layers are made writable for that, as
/// libvirt does), and its record with it; its children take its parent.
pub fn remove_checkpoint(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let node = args.get("node").and_then(Value::as_str).unwrap_or("");
    let name = args.get("name").and_then(Value::as_str).unwrap_or("");
    let disk = d.node(node)?;
    let known = crate::checkpoint::all(&disk).iter().any(|c| c.name == name);
    let layers = crate::checkpoint::layers_with(&disk, name);
    if !known && layers.is_empty() {
        return Err(QmpError::generic(format!(
            "Checkpoint '{name}' not found on disk '{node}'"
        )));
    }
    remove_bitmaps(d, &layers, name)?;
    crate::checkpoint::forget(&disk, name)?;
    Ok(json!({}))
}

/// Removes bitmap `name` from `layers` in one transaction, read-only
/// layers reopened read-write meanwhile.
fn remove_bitmaps(
    d: &Daemon,
    layers: &[std::sync::Arc<crate::block::node::Node>],
    name: &str,
) -> QmpResult<()> {
    let mut reopened = Vec::new();
    let mut result = Ok(());
    for l in layers.iter().filter(|l| l.read_only()) {
        if let Err(e) = super::block::reopen_with_file(d, l, false, &mut reopened) {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        let actions: Vec<Value> = layers
            .iter()
            .map(|l| json!({"type": "block-dirty-bitmap-remove", "data": {"node": l.name(), "name": name}}))
            .collect();
        let txn = json!({ "actions": actions });
        result = super::transaction::transaction(d, txn.as_object().cloned().unwrap_or_default())
            .map(|_| ());
    }
    for (l, before) in reopened.into_iter().rev() {
        let _ = l.reopen(before);
    }
    d.relock();
    result
}
