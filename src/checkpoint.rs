//! Checkpoints kept in the image. A checkpoint is a persistent recording
//! bitmap of its name in the top layers of a disk's chain (libvirt's
//! model: qemu-img sees ordinary bitmaps) plus a record of it (name,
//! creation time, parent checkpoint) in the image itself: a qcow2 header
//! extension of tidemark's, which qemu keeps when it rewrites the header.
//! So the checkpoint list survives restarts, failover and other tools,
//! where libvirt keeps it in XML beside the image.
//!
//! A disk's checkpoints are the records of every layer of its chain (the
//! one written into the layer that was on top when it was made); a chain
//! is valid for a checkpoint by libvirt's four rules.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bitmap::set::lock;
use crate::bitmap::DirtyBitmap;
use crate::block::node::Node;
use crate::block::BlockNode;
use crate::qmp::error::{QmpError, QmpResult};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub name: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub parent: Option<String>,
    /// The backup session that made it and has not yet ended with
    /// success (the first phase of its commit). A record still pending
    /// when the image is opened again is one a crash cut short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// What the image stores: versioned, so a later layout can tell.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    version: u32,
    checkpoints: Vec<Checkpoint>,
}

const VERSION: u32 = 1;

fn read(layer: &Node) -> Vec<Checkpoint> {
    let Some(bytes) = layer.checkpoint_record() else {
        return Vec::new();
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(r) => r.checkpoints,
        Err(e) => {
            tracing::warn!(node = layer.name(), error = %e, "unreadable checkpoint record ignored");
            Vec::new()
        }
    }
}

fn write(layer: &Node, checkpoints: Vec<Checkpoint>) -> QmpResult<()> {
    let record = match checkpoints.is_empty() {
        true => None,
        false => Some(
            serde_json::to_vec(&Record {
                version: VERSION,
                checkpoints,
            })
            .map_err(|e| QmpError::generic(format!("checkpoint record: {e}")))?,
        ),
    };
    layer.set_checkpoint_record(record).map_err(|e| {
        QmpError::generic(format!(
            "Could not write the checkpoints of '{}': {}",
            layer.name(),
            e.context
        ))
    })
}

/// The layers of `disk`'s chain, top first.
fn layers(disk: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut out = Vec::new();
    let mut layer = Some(disk.clone());
    while let Some(l) = layer {
        layer = l.below();
        out.push(l);
        if out.len() > crate::block::chain::MAX_CHAIN_DEPTH {
            break;
        }
    }
    out
}

/// The disk's checkpoints, oldest first (from every layer's record).
pub fn all(disk: &Arc<Node>) -> Vec<Checkpoint> {
    let mut out: Vec<Checkpoint> = Vec::new();
    for l in layers(disk).iter().rev() {
        for c in read(l) {
            if !out.iter().any(|x| x.name == c.name) {
                out.push(c);
            }
        }
    }
    out
}

/// Records a new checkpoint (its bitmap is already on the top layer),
/// child of the newest one; `pending` names the session that must still
/// commit it.
pub fn record(disk: &Arc<Node>, name: &str, pending: Option<&str>) -> QmpResult<()> {
    let parent = all(disk).last().map(|c| c.name.clone());
    let mut own = read(disk);
    own.push(Checkpoint {
        name: name.to_owned(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        parent,
        pending: pending.map(str::to_owned),
    });
    write(disk, own)
}

/// The second phase: checkpoint `name` is no longer pending.
pub fn commit(disk: &Arc<Node>, name: &str) -> QmpResult<()> {
    for l in layers(disk) {
        let mut own = read(&l);
        let Some(c) = own
            .iter_mut()
            .find(|c| c.name == name && c.pending.is_some())
        else {
            continue;
        };
        c.pending = None;
        write(&l, own)?;
    }
    Ok(())
}

/// Checkpoints of `disk` still pending: made by sessions that never
/// ended (the daemon died meanwhile).
pub fn pending(disk: &Arc<Node>) -> Vec<String> {
    all(disk)
        .into_iter()
        .filter(|c| c.pending.is_some())
        .map(|c| c.name)
        .collect()
}

/// Drops the record of `name` from every layer; its children take its
/// parent.
pub fn forget(disk: &Arc<Node>, name: &str) -> QmpResult<()> {
    let parent = all(disk)
        .into_iter()
        .find(|c| c.name == name)
        .and_then(|c| c.parent);
    for l in layers(disk) {
        let own = read(&l);
        if !own
            .iter()
            .any(|c| c.name == name || c.parent.as_deref() == Some(name))
        {
            continue;
        }
        let kept = own
            .into_iter()
            .filter(|c| c.name != name)
            .map(|mut c| {
                if c.parent.as_deref() == Some(name) {
                    c.parent = parent.clone();
                }
                c
            })
            .collect();
        write(&l, kept)?;
    }
    Ok(())
}

/// libvirt's rules for using checkpoint `name` of `disk`: the top layer
/// has the bitmap, the layers that have it are contiguous, each copy is
/// recording and persistent, none is inconsistent. Returns those layers.
pub fn validate(disk_name: &str, disk: &Arc<Node>, name: &str) -> QmpResult<Vec<Arc<Node>>> {
    let broken = |rule: &str| {
        QmpError::generic(format!(
            "Checkpoint '{name}' of disk '{disk_name}' is broken: {rule}"
        ))
    };
    let all = layers(disk);
    let with: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].bitmaps().get(name).is_some())
        .collect();
    if with.first() != Some(&0) {
        if with.is_empty() {
            return Err(QmpError::generic(format!(
                "Checkpoint '{name}' not found on disk '{disk_name}'"
            )));
        }
        return Err(broken("the top layer has no bitmap of its name"));
    }
    if with.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(broken("the layers holding its bitmap are not contiguous"));
    }
    for &i in &with {
        let l = &all[i];
        let Some(b) = l.bitmaps().get(name) else {
            continue;
        };
        let b = lock(&b);
        if b.state.inconsistent {
            return Err(broken(&format!(
                "its bitmap in '{}' is inconsistent",
                l.name()
            )));
        }
        if !b.state.recording || !b.state.persistent {
            return Err(broken(&format!(
                "its bitmap in '{}' is not recording and persistent",
                l.name()
            )));
        }
    }
    Ok(with.into_iter().map(|i| all[i].clone()).collect())
}

/// Bytes written since checkpoint `name`: its bitmaps of every layer.
pub fn dirty_bytes(layers: &[Arc<Node>], name: &str) -> u64 {
    let mut union: Option<DirtyBitmap> = None;
    for l in layers {
        let Some(b) = l.bitmaps().get(name) else {
            continue;
        };
        let b = lock(&b);
        match &mut union {
            None => union = Some(b.clone()),
            Some(u) => {
                let _ = u.merge(&b);
            }
        }
    }
    union.map_or(0, |u| u.count())
}

/// The list for x-tidemark-query-checkpoints.
pub fn describe(disk_name: &str, disk: &Arc<Node>) -> Value {
    let list: Vec<Value> = all(disk)
        .iter()
        .map(|c| {
            let with: Vec<Arc<Node>> = layers(disk)
                .into_iter()
                .filter(|l| l.bitmaps().get(&c.name).is_some())
                .collect();
            let names: Vec<&str> = with.iter().map(|l| l.name()).collect();
            let mut v = json!({
                "name": c.name, "created": c.created, "layers": names,
                "dirty-bytes": dirty_bytes(&with, &c.name),
                "valid": validate(disk_name, disk, &c.name).is_ok(),
            });
            if let Some(p) = &c.parent {
                v["parent"] = json!(p);
            }
            if let Some(s) = &c.pending {
                v["pending"] = json!(s);
            }
            v
        })
        .collect();
    json!({ "node": disk_name, "checkpoints": list })
}

/// The layers of `disk` whose bitmap `name` goes with the checkpoint.
pub fn layers_with(disk: &Arc<Node>, name: &str) -> Vec<Arc<Node>> {
    layers(disk)
        .into_iter()
        .filter(|l| l.bitmaps().get(name).is_some())
        .collect()
}
