//! Pull-backup sessions, tidemark's extension (`x-tidemark-backup-begin`,
//! `-end`, `x-tidemark-query-backups`): one call builds, for one or
//! several disks at once, what libvirt's pull sequence builds with a dozen
//! commands, and one call takes it down. Each step is a QMP command,
//! run here in libvirt's order:
//!
//! 1. a qcow2 scratch per disk (or a node the caller gives);
//! 2. one transaction: the new checkpoint bitmap on each disk, a disabled
//!    `backup-<disk>` bitmap on each scratch merged from the old
//!    checkpoint in every layer that has it, and `blockdev-backup
//!    sync=none` into each scratch (the point in time);
//! 3. a `snapshot-access` node over each backup's copy-before-write
//!    filter (qemu's newer fleecing), exported read-only with its bitmap.
//!
//! The export reads through the filter's view rather than the scratch
//! itself, so the session can guard its scratch: a copy that fails or
//! would pass the quota breaks the view (reads fail with EIO,
//! `X_TIDEMARK_BACKUP_BROKEN`) and the guest's write goes on.
//!
//! The new checkpoint is committed in two phases: its record says
//! `pending` until the session ends with success. Ending with failure, a
//! lease running out, a broken snapshot, or a restart that finds the
//! record still pending (a crash) takes it back: since every checkpoint
//! bitmap keeps recording, the old one still covers every write since it
//! was made, and nothing is lost for the next incremental. Either way the
//! jobs, exports, scratch nodes and files go.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::bitmap::set::lock;
use crate::block::BlockNode;
use crate::daemon::Daemon;
use crate::qmp::error::{QmpError, QmpResult};

/// One disk of a session.
struct Disk {
    node: String,
    scratch_node: String,
    /// A scratch file tidemark made (deleted at the end); `None` for a
    /// scratch node the caller gave (kept, its bitmap removed).
    scratch_file: Option<PathBuf>,
    job: String,
    /// The snapshot-access node the export reads.
    view: Option<String>,
    export: String,
    bitmap: Option<String>,
    size: u64,
    dirty: u64,
    /// Bytes allocated in the disk at the begin.
    allocated: u64,
    quota: Option<u64>,
    /// Why the snapshot broke, once it has.
    broken: Arc<Mutex<Option<String>>>,
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
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct DiskArgs {
    node: String,
    /// A scratch file to create (default: one in the temp directory).
    scratch: Option<PathBuf>,
    /// An existing node to use as the scratch instead.
    scratch_node: Option<String>,
    /// Most bytes the scratch may take.
    quota: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
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
    for (i, k) in a.disks.iter().enumerate() {
        if a.disks[..i].iter().any(|o| o.node == k.node) {
            return Err(QmpError::generic(format!(
                "Disk '{}' is given twice",
                k.node
            )));
        }
        if k.scratch.is_some() && k.scratch_node.is_some() {
            return Err(QmpError::generic(format!(
                "Disk '{}': give 'scratch' or 'scratch-node', not both",
                k.node
            )));
        }
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

/// The checkpoint to start from must not be held by a job: a backup
/// running from it would hand its bits to a successor meanwhile.
fn check_not_busy(disk: &str, layers: &[Arc<crate::block::node::Node>], c: &str) -> QmpResult<()> {
    for l in layers {
        if l.bitmaps().get(c).is_some_and(|b| lock(&b).state.busy) {
            return Err(QmpError::generic(format!(
                "Checkpoint '{c}' of disk '{disk}' is in use by a block job"
            )));
        }
    }
    Ok(())
}

/// Default scratch files: `tidemark-PID-ID-DISK.scratch.qcow2` in the
/// temp directory, so a later daemon can tell a dead one's leftovers.
const SCRATCH_PREFIX: &str = "tidemark-";
const SCRATCH_SUFFIX: &str = ".scratch.qcow2";

/// Deletes the default scratch files of daemons that died mid-session (a
/// crash cannot delete them; their checkpoints are taken back when the
/// disks are opened again). Run at start.
pub fn sweep_stale_scratch() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SCRATCH_PREFIX)
            .filter(|_| name.ends_with(SCRATCH_SUFFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(pid, 0) sends nothing; it only asks whether the
        // process exists (EPERM: it does, as another user's).
        let alive = pid > 0
            && (unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
        if !alive {
            tracing::info!(file = %e.path().display(), "removing the scratch file of a daemon that died");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The cluster size of a scratch the session makes, and its copy unit: a
/// 4 KiB guest write then costs the scratch 16 KiB where qemu's 64 KiB
/// unit costs 64 KiB.
const SCRATCH_CLUSTER: u64 = 16 << 10;

/// The scratch of one disk: a node the caller gave (of the disk's size),
/// or a qcow2 file made for the session.
fn scratch_for(
    d: &Daemon,
    a: &BeginArgs,
    k: &DiskArgs,
    size: u64,
) -> QmpResult<(Arc<crate::block::node::Node>, Option<PathBuf>)> {
    if let Some(name) = &k.scratch_node {
        let s = d.node(name)?;
        if s.size() != size {
            return Err(QmpError::generic(format!(
                "Scratch node '{name}' has {} bytes; disk '{}' needs {size}",
                s.size(),
                k.node
            )));
        }
        return Ok((s, None));
    }
    let file = k.scratch.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "{SCRATCH_PREFIX}{}-{}-{}{SCRATCH_SUFFIX}",
            std::process::id(),
            a.id,
            k.node
        ))
    });
    if k.scratch.is_some() && file.exists() {
        return Err(QmpError::generic(format!(
            "Scratch file '{}' already exists",
            file.display()
        )));
    }
    let opts = crate::block::qcow2::create::CreateOptions {
        size: Some(size),
        cluster_size: SCRATCH_CLUSTER,
        ..Default::default()
    };
    crate::block::qcow2::create::create_qcow2(&file, &opts)?;
    match super::block::open_image_node(d, &file, Some("qcow2"), Map::new()) {
        Ok(s) => Ok((s, Some(file))),
        Err(e) => {
            let _ = std::fs::remove_file(&file);
            Err(e)
        }
    }
}

/// Builds every disk's part; what was built is in `disks` for [`undo`].
fn prepare(
    d: &Daemon,
    a: &BeginArgs,
    disks: &mut Vec<Disk>,
    checkpointed: &mut bool,
) -> QmpResult<()> {
    d.nbd_max_connections()?;
    let mut actions: Vec<Box<dyn super::transaction::Action>> = Vec::new();
    let mut add = |v: Value| -> QmpResult<()> {
        actions.push(super::transaction::parse_action(&v)?);
        Ok(())
    };
    let mut backups = Vec::new();
    for k in &a.disks {
        let node = d.node(&k.node)?;
        let merge_from: Vec<String> = match &a.incremental {
            Some(c) => {
                let layers = crate::checkpoint::validate(&k.node, &node, c)?;
                check_not_busy(&k.node, &layers, c)?;
                layers.iter().map(|l| l.name().to_owned()).collect()
            }
            None => Vec::new(),
        };
        let (scratch, scratch_file) = scratch_for(d, a, k, node.size())?;
        let name = format!("{}-{}", a.id, k.node);
        let bitmap = a.incremental.as_ref().map(|_| format!("backup-{}", k.node));
        let broken = Arc::new(Mutex::new(None));
        disks.push(Disk {
            node: k.node.clone(),
            scratch_node: scratch.name().to_owned(),
            scratch_file,
            job: format!("backup-{name}"),
            view: None,
            export: name,
            bitmap: bitmap.clone(),
            size: node.size(),
            dirty: node.size(),
            allocated: allocated_bytes(&node),
            quota: k.quota,
            broken: broken.clone(),
        });
        if let Some(c) = &a.checkpoint {
            add(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": node.name(), "name": c, "persistent": true, "disabled": false}}))?;
        }
        if let (Some(b), Some(c)) = (&bitmap, &a.incremental) {
            let mut bitmap_add = json!({"node": scratch.name(), "name": b, "persistent": false,
                                        "disabled": true});
            if let Some(x) = node.bitmaps().get(c) {
                bitmap_add["granularity"] = json!(lock(&x).granularity());
            }
            add(json!({"type": "block-dirty-bitmap-add", "data": bitmap_add}))?;
            let sources: Vec<Value> = merge_from
                .iter()
                .map(|l| json!({"node": l, "name": c}))
                .collect();
            add(json!({"type": "block-dirty-bitmap-merge",
                "data": {"node": scratch.name(), "target": b, "bitmaps": sources}}))?;
        }
        backups.push((
            json!({"device": node.name(), "job-id": format!("backup-{}-{}", a.id, k.node),
                   "target": scratch.name(), "sync": "none"}),
            guard(d, &a.id, k, broken),
        ));
    }
    for (args, guard) in backups {
        let backup = super::job::BackupAction::new("blockdev-backup", args)?.guarded(guard);
        actions.push(Box::new(backup));
    }
    super::transaction::run(d, actions)?;
    *checkpointed = true;
    if let Some(c) = &a.checkpoint {
        for k in disks.iter() {
            crate::checkpoint::record(&d.node(&k.node)?, c, Some(&a.id))?;
        }
    }
    for k in disks.iter_mut() {
        let view = open_view(d, &k.job)?;
        k.view = Some(view.clone());
        let mut export = json!({"type": "nbd", "id": k.export, "node-name": view,
            "name": k.export, "writable": false});
        if let Some(b) = &k.bitmap {
            export["bitmaps"] = json!([{"node": k.scratch_node, "name": b}]);
            k.dirty = d
                .find_node(&k.scratch_node)
                .and_then(|n| n.bitmaps().get(b))
                .map_or(0, |x| lock(&x).count());
        }
        super::export::block_export_add(d, export.as_object().cloned().unwrap_or_default())?;
    }
    Ok(())
}

/// The scratch guard of one disk: break-snapshot, with the disk's quota;
/// a break is remembered for the query and announced.
fn guard(
    d: &Daemon,
    id: &str,
    k: &DiskArgs,
    broken: Arc<Mutex<Option<String>>>,
) -> crate::block::cbw::Guard {
    let daemon = d.arc().map(|a| Arc::downgrade(&a));
    let (id, node) = (id.to_owned(), k.node.clone());
    let on_break = move |reason: &str| {
        *broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
        tracing::warn!(session = %id, disk = %node, reason, "backup snapshot broken");
        if let Some(d) = daemon.as_ref().and_then(std::sync::Weak::upgrade) {
            d.emit(crate::event::EventKind::XTidemarkBackupBroken {
                id: id.clone(),
                node: node.clone(),
                reason: reason.to_owned(),
            });
        }
    };
    crate::block::cbw::Guard {
        quota: k.quota,
        on_break: Some(Arc::new(on_break)),
        cluster: SCRATCH_CLUSTER,
    }
}

/// A snapshot-access node over the copy-before-write filter of backup
/// job `job`; returns its name.
fn open_view(d: &Daemon, job: &str) -> QmpResult<String> {
    let filter = d
        .job(job)
        .and_then(|j| j.nodes().into_iter().find(|n| n.snapshot().is_some()))
        .ok_or_else(|| QmpError::generic(format!("Backup job '{job}' has no filter")))?;
    let opts = json!({"driver": "snapshot-access", "file": filter.name()});
    let view = super::block::open_implicit(d, opts.as_object().unwrap_or(&Map::new()))?;
    Ok(view.name().to_owned())
}

/// Bytes of `disk` that hold data (what a full pull reads).
fn allocated_bytes(disk: &crate::block::node::Node) -> u64 {
    let (size, mut at, mut total) = (disk.size(), 0, 0);
    while at < size {
        let Ok(e) = disk.block_status(at, size - at) else {
            return total;
        };
        let n = e.len.clamp(1, size - at);
        if e.flags & crate::block::STATE_HOLE == 0 {
            total += n;
        }
        at += n;
    }
    total
}

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

/// Takes down what a session built: exports, views, jobs, scratch nodes
/// (a given one loses its bitmap) and files.
fn undo(d: &Daemon, disks: &[Disk]) {
    for k in disks {
        let _ = d.delete_export(&k.export, false, true);
    }
    // The views go before their filters do.
    d.prune();
    for k in disks {
        if let Some(job) = d.job(&k.job) {
            job.cancel_and_wait(d);
        }
        if let (None, Some(b)) = (&k.scratch_file, &k.bitmap) {
            if let Some(s) = d.find_node(&k.scratch_node) {
                s.bitmaps().remove(b);
            }
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
/// its checkpoint, nor the scratch space). A timer (`Daemon::every`); the
/// check and the end run under the command lock, as a command would.
fn watch_lease(d: &Arc<Daemon>, id: String, lease: Duration) {
    let mut idle_since = Instant::now();
    d.every(format!("lease {id}"), LEASE_TICK, move |d| {
        let exports: Option<Vec<String>> = {
            let all = d.sessions().lock();
            all.iter()
                .find(|s| s.id == id)
                .map(|s| s.disks.iter().map(|k| k.export.clone()).collect())
        };
        let Some(exports) = exports else {
            return false;
        };
        if exports.iter().any(|e| d.export_clients(e) > 0) {
            idle_since = Instant::now();
            return true;
        }
        if idle_since.elapsed() < lease {
            return true;
        }
        let args = json!({"id": id, "success": false});
        if end(d, args.as_object().cloned().unwrap_or_default()).is_ok() {
            d.prune();
            d.emit(crate::event::EventKind::XTidemarkBackupExpired { id: id.clone() });
        }
        false
    });
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
        if a.success {
            if let Some((k, why)) = all[i].disks.iter().find_map(|k| Some((k, broken(k)?))) {
                return Err(QmpError::generic(format!(
                    "Backup session '{}' cannot succeed: the snapshot of disk '{}' broke ({why}); end it with success false",
                    a.id, k.node
                )));
            }
        }
        all.remove(i)
    };
    undo(d, &session.disks);
    let Some(c) = &session.checkpoint else {
        return Ok(json!({}));
    };
    if a.success {
        for k in &session.disks {
            if let Some(disk) = d.find_node(&k.node) {
                crate::checkpoint::commit(&disk, c)?;
            }
        }
    } else {
        // The old checkpoints kept recording: dropping the new one loses
        // nothing.
        drop_checkpoint(d, &session.disks, c);
    }
    Ok(json!({}))
}

fn broken(k: &Disk) -> Option<String> {
    k.broken.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
                    let mut v = json!({"node": k.node, "export": k.export,
                        "uri": d.nbd_uri(&k.export), "bitmap": k.bitmap, "size": k.size,
                        "dirty-bytes": k.dirty, "allocated-bytes": k.allocated,
                        "read-bytes": d.export_read_bytes(&k.export),
                        "clients": d.export_clients(&k.export), "scratch-bytes": used,
                        "state": if broken(k).is_some() { "broken" } else { "active" }});
                    if let Some(q) = k.quota {
                        v["scratch-quota"] = json!(q);
                    }
                    if let Some(why) = broken(k) {
                        v["broken"] = json!(why);
                    }
                    v
                })
                .collect();
            json!({"id": s.id, "checkpoint": s.checkpoint, "disks": disks})
        })
        .collect();
    Ok(Value::Array(list))
}

/// Takes back the checkpoints of `disk` that a session left pending: the
/// daemon stopped (crashed) before the session ended, so the backup
/// never completed. Run when a disk is opened.
pub fn roll_back_pending(d: &Daemon, disk: &Arc<crate::block::node::Node>) {
    if disk.read_only() {
        return;
    }
    for name in crate::checkpoint::pending(disk) {
        tracing::warn!(disk = disk.name(), checkpoint = %name, "a backup session never ended: its checkpoint is taken back");
        let removed = remove_bitmaps(d, &crate::checkpoint::layers_with(disk, &name), &name)
            .and_then(|_| crate::checkpoint::forget(disk, &name));
        if let Err(e) = removed {
            tracing::error!(disk = disk.name(), checkpoint = %name, error = %e.desc, "could not take the checkpoint back");
        }
    }
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
