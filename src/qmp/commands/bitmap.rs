//! The block-dirty-bitmap-* commands, as transaction actions: each single
//! command is a one-action transaction, so its rules and its undo live in
//! one place. The bitmap rules themselves (names, granularity, busy,
//! read-only, inconsistent, merge sizes) and their texts are in
//! src/bitmap; this file decides which rule applies when, in qemu's order.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::transaction::{self, Action};
use crate::bitmap::set::{lock, BusyClaim, SharedBitmap};
use crate::bitmap::{
    check_name, check_name_not_empty, default_granularity, granularity_shift, Checks, DirtyBitmap,
};
use crate::block::node::Node;
use crate::block::BlockNode;
use crate::daemon::Daemon;
use crate::qmp::error::{QmpError, QmpResult};

#[derive(Deserialize, Clone)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct AddArgs {
    node: String,
    name: String,
    granularity: Option<u64>,
    persistent: Option<bool>,
    disabled: Option<bool>,
}

/// A merge or export source: a bitmap of the same node, or any node's.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum Source {
    Local(String),
    External(BitmapRef),
}

#[derive(Deserialize)]
struct MergeArgs {
    node: String,
    target: String,
    bitmaps: Vec<Source>,
}

fn parse<T: for<'de> Deserialize<'de>>(v: Value) -> QmpResult<T> {
    // The schema has checked the shape; this only fails on a schema bug.
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

/// Finds `name` on node `node`, with the texts of qemu's bitmap lookup.
pub fn lookup(d: &Daemon, node: &str, name: &str) -> QmpResult<(Arc<Node>, SharedBitmap)> {
    let n = d
        .find_node(node)
        .ok_or_else(|| QmpError::generic(format!("Node '{node}' not found")))?;
    let b = n
        .bitmaps()
        .get(name)
        .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found")))?;
    Ok((n, b))
}

/// Builds the action for a transaction `type`.
pub fn action(kind: &str, data: Value) -> QmpResult<Box<dyn Action>> {
    Ok(match kind {
        "block-dirty-bitmap-add" => Box::new(Add {
            args: parse(data)?,
            added: None,
        }),
        "block-dirty-bitmap-remove" => Box::new(Remove {
            args: parse(data)?,
            found: None,
            removed_from: None,
        }),
        "block-dirty-bitmap-clear" => Box::new(Clear {
            args: parse(data)?,
            backup: None,
            undo: true,
        }),
        "block-dirty-bitmap-enable" => Box::new(Toggle {
            args: parse(data)?,
            enable: true,
            before: None,
            node: None,
        }),
        "block-dirty-bitmap-disable" => Box::new(Toggle {
            args: parse(data)?,
            enable: false,
            before: None,
            node: None,
        }),
        "block-dirty-bitmap-merge" => Box::new(Merge {
            args: parse(data)?,
            backup: None,
            undo: true,
            merged_into: None,
        }),
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{other}'"
            )))
        }
    })
}

/// A single bitmap command: a transaction of one action.
pub fn command(d: &Daemon, name: &str, args: Map<String, Value>) -> QmpResult<Value> {
    transaction::run(d, vec![action(name, Value::Object(args))?])?;
    Ok(json!({}))
}

pub fn sha256(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let r: BitmapRef = parse(Value::Object(args))?;
    let (_, b) = lookup(d, &r.node, &r.name)?;
    let hash = lock(&b).sha256();
    Ok(json!({ "sha256": hash }))
}

/// x-tidemark-bitmap-store: a store point now (tidemark's): the node's
/// persistent bitmaps are written to its image, still in use, and its
/// intent log keeps only the zones written since.
pub fn store_point(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let name = args.get("node").and_then(Value::as_str).unwrap_or("");
    let node = d.node(name)?;
    node.store_point()
        .map_err(|e| QmpError::generic(format!("Could not store the bitmaps of '{name}': {e}")))?;
    Ok(json!({}))
}

struct Add {
    args: AddArgs,
    added: Option<Arc<Node>>,
}

impl Action for Add {
    fn kind(&self) -> &'static str {
        "block-dirty-bitmap-add"
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let a = &self.args;
        // qemu's order: an empty name before the node, the name's length
        // after the driver's own checks of a persistent bitmap.
        check_name_not_empty(&a.name)?;
        let node = d.node(&a.node)?;
        // The image's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB for
        // formats without clusters (raw, file), as qemu.
        let granularity = a
            .granularity
            .unwrap_or_else(|| default_granularity(node.cluster_size()));
        granularity_shift(granularity)?;
        let persistent = a.persistent.unwrap_or(false);
        if persistent {
            // The driver decides, and the node words it as qemu does.
            node.can_store_bitmap(&a.name, granularity)?;
        }
        check_name(&a.name)?;
        let mut bitmap = DirtyBitmap::new(&a.name, node.size(), granularity)?;
        bitmap.state.persistent = persistent;
        bitmap.state.recording = !a.disabled.unwrap_or(false);
        node.bitmaps().add(bitmap)?;
        self.added = Some(node);
        Ok(())
    }

    fn abort(&mut self, _d: &Daemon) {
        if let Some(node) = self.added.take() {
            node.bitmaps().remove(&self.args.name);
        }
    }

    /// A new persistent bitmap is in the image at once.
    fn after_commit(&mut self, _d: &Daemon) {
        if let (Some(node), Some(true)) = (&self.added, self.args.persistent) {
            durable(node, |n| n.store_point());
        }
    }
}

/// `make` makes a bitmap change of `node` durable where an intent log is
/// kept (the log covers writes; adds, removals, enables and merges need
/// this; without a log both calls do nothing).
fn durable(node: &Node, make: impl FnOnce(&Node) -> crate::block::BlockResult<()>) {
    if let Err(e) = make(node) {
        tracing::error!(node = node.name(), error = %e, "a bitmap change could not be made durable");
    }
}

struct Remove {
    args: BitmapRef,
    /// Busy until commit, so a later action of the same transaction
    /// cannot use a bitmap that is about to go.
    found: Option<(Arc<Node>, BusyClaim)>,
    removed_from: Option<Arc<Node>>,
}

impl Action for Remove {
    fn kind(&self) -> &'static str {
        "block-dirty-bitmap-remove"
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let (node, b) = lookup(d, &self.args.node, &self.args.name)?;
        // Removing is the one thing an inconsistent bitmap allows.
        lock(&b).check(Checks {
            busy: true,
            readonly: true,
            inconsistent: false,
        })?;
        self.found = Some((node, BusyClaim::take(&b)?));
        Ok(())
    }

    fn commit(&mut self, _d: &Daemon) {
        if let Some((node, claim)) = self.found.take() {
            drop(claim);
            node.bitmaps().remove(&self.args.name);
            self.removed_from = Some(node);
        }
    }

    /// Gone from the image too, or a crash would bring it back.
    fn after_commit(&mut self, _d: &Daemon) {
        if let Some(node) = self.removed_from.take() {
            durable(&node, |n| n.store_point());
        }
    }

    fn abort(&mut self, _d: &Daemon) {
        // Dropping the claim makes the bitmap usable again.
        self.found = None;
    }
}

/// Restores a bitmap's bits to `backup`, keeping any write that marked it
/// after the backup was taken (a write is never lost from a bitmap).
fn restore(b: &SharedBitmap, backup: &DirtyBitmap, keep_current: bool) {
    let mut g = lock(b);
    let state = g.state;
    let current = keep_current.then(|| g.clone());
    *g = backup.clone();
    g.state = state;
    if let Some(c) = current {
        // Same size and granularity: cannot fail.
        let _ = g.merge_bits(&c);
    }
}

struct Clear {
    args: BitmapRef,
    backup: Option<(SharedBitmap, DirtyBitmap)>,
    /// False when no later action can fail (a group of one): then the bits
    /// are not copied for an abort that cannot happen.
    undo: bool,
}

impl Action for Clear {
    fn kind(&self) -> &'static str {
        "block-dirty-bitmap-clear"
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let (_, b) = lookup(d, &self.args.node, &self.args.name)?;
        let backup = {
            let mut g = lock(&b);
            g.check(Checks::DEFAULT)?;
            let backup = self.undo.then(|| g.clone());
            g.clear();
            backup
        };
        self.backup = backup.map(|k| (b, k));
        Ok(())
    }

    fn set_undo_needed(&mut self, needed: bool) {
        self.undo = needed;
    }

    fn abort(&mut self, _d: &Daemon) {
        if let Some((b, backup)) = self.backup.take() {
            // After a clear, the current bits are exactly the writes since.
            restore(&b, &backup, true);
        }
    }
}

struct Toggle {
    args: BitmapRef,
    enable: bool,
    before: Option<(SharedBitmap, bool)>,
    node: Option<Arc<Node>>,
}

impl Action for Toggle {
    fn kind(&self) -> &'static str {
        if self.enable {
            "block-dirty-bitmap-enable"
        } else {
            "block-dirty-bitmap-disable"
        }
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let (node, b) = lookup(d, &self.args.node, &self.args.name)?;
        let before = {
            let mut g = lock(&b);
            g.check(Checks::ALLOW_RO)?;
            let before = g.state.recording;
            g.state.recording = self.enable;
            before
        };
        self.before = Some((b, before));
        self.node = Some(node);
        Ok(())
    }

    fn abort(&mut self, _d: &Daemon) {
        if let Some((b, before)) = self.before.take() {
            lock(&b).state.recording = before;
        }
    }

    /// A bitmap stored as disabled gets no zones at recovery: once it
    /// records again, the image must say so.
    fn after_commit(&mut self, _d: &Daemon) {
        let persistent = self
            .before
            .as_ref()
            .is_some_and(|(b, was)| !was && lock(b).state.persistent);
        if let (true, true, Some(node)) = (self.enable, persistent, &self.node) {
            durable(node, |n| n.store_point());
        }
    }
}

/// Resolves a merge or export source relative to `node`.
pub fn source(d: &Daemon, node: &Arc<Node>, s: &Source) -> QmpResult<SharedBitmap> {
    match s {
        Source::Local(name) => node
            .bitmaps()
            .get(name)
            .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found"))),
        Source::External(r) => lookup(d, &r.node, &r.name).map(|(_, b)| b),
    }
}

struct Merge {
    args: MergeArgs,
    backup: Option<(SharedBitmap, DirtyBitmap)>,
    /// As in [`Clear`]: no copy when no abort can follow.
    undo: bool,
    /// The node and target, for [`Action::after_commit`].
    merged_into: Option<(Arc<Node>, SharedBitmap)>,
}

impl Action for Merge {
    fn kind(&self) -> &'static str {
        "block-dirty-bitmap-merge"
    }

    fn set_undo_needed(&mut self, needed: bool) {
        self.undo = needed;
    }

    fn prepare(&mut self, d: &Daemon) -> QmpResult<()> {
        let (node, target) = lookup(d, &self.args.node, &self.args.target)?;
        // The target's checks come first, then each source's in order
        // (qemu's order, checked against qemu-storage-daemon).
        lock(&target).check(Checks::DEFAULT)?;
        let merged = match self.args.bitmaps.as_slice() {
            // One source: OR it straight into the target (merge_bits checks
            // the sizes before it changes anything).
            [one] => {
                let src = source(d, &node, one)?;
                if Arc::ptr_eq(&src, &target) {
                    return Ok(());
                }
                let pair = [src, target.clone()];
                let mut guards = crate::bitmap::set::lock_all(&pair);
                let [src, g] = guards.as_mut_slice() else {
                    return Ok(());
                };
                src.check(Checks::ALLOW_RO)?;
                if src.size() != g.size() {
                    // Same text as a failed merge, nothing changed.
                    return g.merge_bits(src).map_err(Into::into);
                }
                let backup = self.undo.then(|| g.clone());
                g.merge_bits(src)?;
                backup
            }
            // Several: OR them into a scratch bitmap first, so a source that
            // fails leaves the target untouched; then the scratch in one step.
            many => {
                let mut scratch = {
                    let g = lock(&target);
                    DirtyBitmap::anonymous(g.size(), g.granularity())?
                };
                for s in many {
                    let src = source(d, &node, s)?;
                    if Arc::ptr_eq(&src, &target) {
                        continue;
                    }
                    scratch.merge(&lock(&src))?;
                }
                let mut g = lock(&target);
                let backup = self.undo.then(|| g.clone());
                g.merge_bits(&scratch)?;
                backup
            }
        };
        self.merged_into = Some((node, target.clone()));
        self.backup = merged.map(|b| (target, b));
        Ok(())
    }

    /// Merged bits are not writes: a recording persistent target's dirty
    /// zones go into the intent log; a disabled one gets no zones at
    /// recovery, so it is stored.
    fn after_commit(&mut self, _d: &Daemon) {
        let Some((node, target)) = self.merged_into.take() else {
            return;
        };
        let (persistent, recording, ranges) = {
            let g = lock(&target);
            let ranges: Vec<(u64, u64)> = match g.state.recording {
                true => g.dirty_extents(0, g.size()).collect(),
                false => Vec::new(),
            };
            (g.state.persistent, g.state.recording, ranges)
        };
        match (persistent, recording) {
            (false, _) => {}
            (true, true) => durable(&node, |n| n.cover(&ranges)),
            (true, false) => durable(&node, |n| n.store_point()),
        }
    }

    fn abort(&mut self, _d: &Daemon) {
        if let Some((b, backup)) = self.backup.take() {
            // The merged-in bits cannot be told apart from new writes, so
            // the target goes back to exactly its bits before the merge.
            restore(&b, &backup, false);
        }
    }
}
