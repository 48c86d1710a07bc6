//! External snapshots: blockdev-snapshot-sync (tidemark creates and opens
//! the overlay) and blockdev-snapshot (the overlay is a node the user
//! added with `backing: null`), alone or as transaction actions, as qemu's
//! external_snapshot_action. `prepare` puts the overlay above the node
//! (every export and parent moves onto it); `commit` makes the old layer
//! read-only (its persistent bitmaps are stored and become read-only with
//! it) and carries the disk's checkpoints onto the overlay; `abort` takes
//! the overlay off again.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::transaction::Action;
use crate::block::node::Node;
use crate::block::open::Driver;
use crate::block::BlockNode;
use crate::daemon::{BlockOp, Daemon};
use crate::qmp::error::{QmpError, QmpResult};

/// Which command.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// blockdev-snapshot-sync
    Sync,
    /// blockdev-snapshot
    Existing,
}

pub struct SnapshotAction {
    kind: SnapshotKind,
    args: Map<String, Value>,
    /// Set once prepared: the old layer and its overlay.
    done: Option<(Arc<Node>, Arc<Node>)>,
    /// The overlay was opened by this action (closed again on abort).
    opened: bool,
}

fn text(args: &Map<String, Value>, k: &str) -> Option<String> {
    args.get(k).and_then(Value::as_str).map(str::to_owned)
}

impl SnapshotAction {
    pub fn new(kind: SnapshotKind, data: Value) -> QmpResult<SnapshotAction> {
        let Value::Object(args) = data else {
            return Err(QmpError::generic("Invalid parameter type for 'data'"));
        };
        Ok(SnapshotAction {
            kind,
            args,
            done: None,
            opened: false,
        })
    }

    /// The node to snapshot: `device` or `node-name` (sync), `node`.
    fn old_node(&self, d: &Daemon) -> QmpResult<Arc<Node>> {
        match self.kind {
            SnapshotKind::Sync => d.lookup(
                text(&self.args, "device").as_deref(),
                text(&self.args, "node-name").as_deref(),
            ),
            SnapshotKind::Existing => d.node(&text(&self.args, "node").unwrap_or_default()),
        }
    }

    /// blockdev-snapshot-sync's overlay: the image created (unless
    /// `mode=existing`) with the old layer as its backing file, opened
    /// without a backing of its own.
    fn create_overlay(&mut self, d: &Daemon, old: &Arc<Node>) -> QmpResult<Arc<Node>> {
        let file = text(&self.args, "snapshot-file").unwrap_or_default();
        let node_name = text(&self.args, "snapshot-node-name");
        let format = text(&self.args, "format").unwrap_or_else(|| "qcow2".into());
        let existing = self.args.get("mode").and_then(Value::as_str) == Some("existing");
        if self.args.contains_key("node-name") && node_name.is_none() {
            return Err(QmpError::generic("New overlay node-name missing"));
        }
        if let Some(n) = &node_name {
            if d.find_node(n).is_some() {
                return Err(QmpError::generic("New overlay node-name already in use"));
            }
        }
        let path = Path::new(&file);
        if !existing {
            super::block::create_image(d, path, &format, old.size(), Some(old))?;
        }
        // qemu opens the overlay with the old layer's flags.
        let mut extra = Map::new();
        extra.insert("backing".into(), Value::Null);
        extra.insert("read-only".into(), json!(old.read_only()));
        if let Some(n) = &node_name {
            extra.insert("node-name".into(), json!(n));
        }
        let overlay = super::block::open_image_node(d, path, Some(&format), extra)?;
        self.opened = true;
        Ok(overlay)
    }

    /// qemu's checks of the overlay before it goes in.
    fn check_overlay(&self, d: &Daemon, overlay: &Arc<Node>) -> QmpResult<()> {
        if d.in_use(overlay) {
            return Err(QmpError::generic("The overlay is already in use"));
        }
        if d.driver_of(overlay.name()) != Some(Driver::Qcow2) {
            return Err(QmpError::generic(
                "The overlay does not support backing images",
            ));
        }
        if overlay.below().is_some() {
            return Err(QmpError::generic("The overlay already has a backing image"));
        }
        Ok(())
    }

    /// qemu's bdrv_append refuses a chain that would loop.
    fn check_cycle(&self, old: &Arc<Node>, overlay: &Arc<Node>) -> QmpResult<()> {
        let mut n = Some(old.clone());
        while let Some(x) = n {
            if Arc::ptr_eq(&x, overlay) {
                return Err(QmpError::generic(format!(
                    "Making '{}' a backing child of '{}' would create a cycle",
                    old.name(),
                    overlay.name()
                )));
            }
            n = x.below();
        }
        Ok(())
    }
}

impl Action for SnapshotAction {
    fn kind(&self) -> &'static str {
        match self.kind {
            SnapshotKind::Sync => "blockdev-snapshot-sync",
            SnapshotKind::Existing => "blockdev-snapshot",
        }
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let old = self.old_node(d)?;
        d.check_op(&old, BlockOp::Snapshot)?;
        if !old.read_only() {
            old.flush()
                .map_err(|e| QmpError::generic(format!("I/O error: {}", e.context)))?;
        }
        let overlay = match self.kind {
            SnapshotKind::Sync => self.create_overlay(d, &old)?,
            SnapshotKind::Existing => d.node(&text(&self.args, "overlay").unwrap_or_default())?,
        };
        let appended = self
            .check_overlay(d, &overlay)
            .and_then(|_| self.check_cycle(&old, &overlay))
            .and_then(|_| d.append_overlay(&old, &overlay))
            .and_then(|_| d.refresh_locks());
        if let Err(e) = appended {
            if self.opened {
                d.remove_overlay(&old, &overlay);
                d.delete_implicit(&overlay);
            }
            return Err(e);
        }
        self.done = Some((old, overlay));
        Ok(())
    }

    fn commit(&mut self, d: &Daemon) {
        if let Some((old, overlay)) = &self.done {
            carry_checkpoints(d, old, overlay);
            // As qemu: best effort, the snapshot stands either way.
            let _ = super::block::reopen_with_file(d, old, true, &mut Vec::new());
            d.relock();
        }
    }

    fn abort(&mut self, d: &Daemon) {
        if let Some((old, overlay)) = self.done.take() {
            d.remove_overlay(&old, &overlay);
            if self.opened {
                d.delete_implicit(&overlay);
            }
            d.relock();
        }
    }
}

/// libvirt's recipe for a checkpoint across a snapshot, done for the
/// disk's recorded checkpoints (tidemark's; images without a record are
/// left as qemu leaves them): a recording persistent bitmap of each
/// checkpoint's name on the overlay, so the chain stays valid for it.
/// Names already on the overlay (the caller's own bitmap-add in the same
/// transaction) are left alone. Best effort, as the commit it is part of.
fn carry_checkpoints(d: &Daemon, old: &Arc<Node>, overlay: &Arc<Node>) {
    if overlay.read_only() {
        return;
    }
    for c in crate::checkpoint::all(old) {
        let Some(b) = old.bitmaps().get(&c.name) else {
            continue;
        };
        let (granularity, usable) = {
            let b = crate::bitmap::set::lock(&b);
            let s = &b.state;
            (
                b.granularity(),
                s.recording && s.persistent && !s.inconsistent,
            )
        };
        if !usable || overlay.bitmaps().get(&c.name).is_some() {
            continue;
        }
        let add = json!({"node": overlay.name(), "name": c.name, "persistent": true,
                         "granularity": granularity});
        let added = super::bitmap::action("block-dirty-bitmap-add", add).and_then(|mut a| {
            a.prepare(d)?;
            a.commit(d);
            a.after_commit(d);
            a.clean(d);
            Ok(())
        });
        if let Err(e) = added {
            tracing::error!(checkpoint = %c.name, overlay = overlay.name(), error = %e.desc,
                "could not carry the checkpoint onto the snapshot");
        }
    }
}

pub fn blockdev_snapshot_sync(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a = SnapshotAction::new(SnapshotKind::Sync, Value::Object(args))?;
    super::transaction::run(d, vec![Box::new(a)])?;
    Ok(json!({}))
}

pub fn blockdev_snapshot(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let a = SnapshotAction::new(SnapshotKind::Existing, Value::Object(args))?;
    super::transaction::run(d, vec![Box::new(a)])?;
    Ok(json!({}))
}
