//! block-commit (qemu's block/commit.c and blockdev.c's qmp_block_commit).
//! Committing the active layer is a mirror into the base (see mirror.rs);
//! committing a layer below it copies what the layers from `top` down to
//! the base hold into the base, then the overlay of `top` takes the base
//! as its backing (in the graph and its header) and the committed layers
//! leave the graph. Guest writes go to the overlay meanwhile, never to
//! the layers being committed, so nothing races the copy.
//!
//! The base is made writable for the job and read-only again after it.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::copy::{depth_of, Layers, Policies};
use super::{CommonArgs, JobCtl, JobDriver, JobFailure, JobType, OnError};
use crate::block::copy::{copy_range, CopyError, Zeroes};
use crate::block::filter::{Filter, FilterKind};
use crate::block::link::{ChildRole, Root};
use crate::block::node::Node;
use crate::block::open::Driver;
use crate::block::BlockNode;
use crate::daemon::{BlockOp, Daemon};
use crate::qmp::commands::block::reopen_with_file;
use crate::qmp::error::{QmpError, QmpResult};

/// block-commit's arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommitArgs {
    #[serde(flatten)]
    pub common: CommonArgs,
    pub device: String,
    pub base_node: Option<String>,
    pub base: Option<String>,
    pub top_node: Option<String>,
    pub top: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: Option<bool>,
    pub on_error: Option<String>,
    pub filter_node_name: Option<String>,
}

/// commit_run's unit of work (COMMIT_BUFFER_SIZE).
const CHUNK: u64 = 512 << 10;

/// What block-commit decided to run.
pub enum CommitJob {
    /// `top` is the active layer: a mirror into the base.
    Active(super::mirror::Mirror),
    Intermediate(Commit),
}

pub struct Commit {
    top: Arc<Node>,
    base: Arc<Node>,
    layers: Layers,
    filter: Arc<Node>,
    /// The layers from `top` down to the base (they leave the graph).
    dropped: Vec<Arc<Node>>,
    backing_name: String,
    backing_format: Option<String>,
    policies: Policies,
    base_was_ro: bool,
    /// The overlays of `top` (their backing changes at the end).
    overlays: Vec<Arc<Node>>,
    /// The job's handles on the top (it reads) and the base (it writes).
    root: Mutex<Option<(Arc<Root>, Arc<Root>)>>,
}

fn chain_error(name: &str) -> QmpError {
    QmpError::generic(format!("'{name}' is not in this backing file chain"))
}

/// Checks as qemu's qmp_block_commit, in its order, and sets the job up.
pub fn prepare(d: &Daemon, a: &CommitArgs) -> QmpResult<CommitJob> {
    let Some(device) = d.find_node(&a.device) else {
        return Err(QmpError {
            class: "DeviceNotFound",
            desc: format!("Device '{}' not found", a.device),
        });
    };
    if !d.is_root_node(&device) {
        return Err(QmpError::generic("Need a root block node"));
    }
    d.check_op(&device, BlockOp::CommitSource)?;
    let top = match (&a.top_node, &a.top) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'top-node' and 'top' are mutually exclusive",
            ))
        }
        (Some(name), None) => {
            let t = d.lookup(None, Some(name))?;
            if depth_of(&device, &t).is_none() {
                return Err(chain_error(name));
            }
            Some(t)
        }
        (None, Some(file)) => {
            if device
                .filename()
                .is_some_and(|p| p.to_str() == Some(file.as_str()))
            {
                Some(device.clone())
            } else {
                super::stream::find_backing_image(&device, file)
            }
        }
        (None, None) => Some(device.clone()),
    };
    let Some(top) = top else {
        return Err(QmpError::generic(format!(
            "Top image file {} not found",
            a.top.as_deref().unwrap_or("NULL")
        )));
    };
    let base = match (&a.base_node, &a.base) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'base-node' and 'base' are mutually exclusive",
            ))
        }
        (Some(name), None) => {
            let b = d.lookup(None, Some(name))?;
            if depth_of(&top, &b).is_none() {
                return Err(chain_error(name));
            }
            b
        }
        (None, Some(file)) => super::stream::find_backing_image(&top, file).ok_or_else(|| {
            QmpError::generic(format!("Can't find '{file}' in the backing chain"))
        })?,
        (None, None) => bottom_of(&top),
    };
    let between = super::stream::between(&top, Some(&base));
    for n in std::iter::once(&top).chain(&between) {
        if !Arc::ptr_eq(n, &base) {
            d.check_op(n, BlockOp::CommitTarget)?;
        }
    }
    if Arc::ptr_eq(&top, &base) {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    let on_error = OnError::parse(a.on_error.as_deref());
    if Arc::ptr_eq(&top, &device) {
        if a.backing_file.is_some() {
            return Err(QmpError::generic(
                "'backing-file' specified, but 'top' is the active layer",
            ));
        }
        let m = super::mirror::active_commit(d, top, base, on_error, a.filter_node_name.clone())?;
        return Ok(CommitJob::Active(m));
    }
    intermediate(d, a, top, base, between, on_error).map(CommitJob::Intermediate)
}

/// The lowest layer of `top`'s chain (qemu's bdrv_find_base): `top`
/// itself without a backing.
fn bottom_of(top: &Arc<Node>) -> Arc<Node> {
    let mut layer = top.clone();
    while let Some(next) = layer.below() {
        layer = next;
    }
    layer
}

fn intermediate(
    d: &Daemon,
    a: &CommitArgs,
    top: Arc<Node>,
    base: Arc<Node>,
    between: Vec<Arc<Node>>,
    on_error: OnError,
) -> QmpResult<Commit> {
    let base_depth = depth_of(&top, &base).unwrap_or(0);
    let base_was_ro = base.read_only();
    if base_was_ro {
        reopen_with_file(d, &base, false, &mut Vec::new())?;
    }
    let guard = Arc::new(Filter::new(FilterKind::CommitTop, top.clone()));
    let filter = match d.insert_filter(
        &top,
        a.filter_node_name.as_deref(),
        Driver::CommitTop,
        guard,
        false,
    ) {
        Ok(f) => f,
        Err(e) => {
            if base_was_ro {
                let _ = reopen_with_file(d, &base, true, &mut Vec::new());
            }
            return Err(e);
        }
    };
    let overlays = d.parents_by(&filter, ChildRole::Backing);
    let root = (
        d.new_root(top.clone(), false),
        d.new_root(base.clone(), true),
    );
    d.relock();
    let backing_name = a
        .backing_file
        .clone()
        .unwrap_or_else(|| crate::qmp::commands::block::qemu_filename(d, &base));
    let backing_format = d.driver_of(base.name()).map(|k| k.name().to_owned());
    let mut dropped = vec![top.clone()];
    dropped.extend(between);
    Ok(Commit {
        top,
        base,
        layers: Layers {
            from: 1,
            base: base_depth,
        },
        filter,
        dropped,
        backing_name,
        backing_format,
        policies: Policies::both(on_error),
        base_was_ro,
        overlays,
        root: Mutex::new(Some(root)),
    })
}

impl JobDriver for Commit {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn total(&self) -> u64 {
        self.top.size()
    }

    fn blocks(&self) -> Vec<Arc<Node>> {
        let mut v = vec![self.filter.clone(), self.base.clone()];
        v.extend(self.dropped.iter().cloned());
        v.extend(self.overlays.iter().cloned());
        v
    }

    fn run(&self, ctl: &JobCtl) -> Result<(), JobFailure> {
        let size = self.top.size();
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < size {
            let want = CHUNK.min(size - offset);
            let mut found = (false, want);
            let stop = self.policies.step(ctl, || {
                found = self
                    .layers
                    .allocated(&self.top, offset, want)
                    .map_err(CopyError::source)?;
                if found.0 {
                    copy_range(
                        &*self.top,
                        &*self.base,
                        offset,
                        found.1,
                        &mut buf,
                        Zeroes::JOBS,
                    )?;
                }
                Ok(())
            })?;
            let (copied, n) = found;
            let stop = stop
                || if copied {
                    ctl.progress(n)
                } else {
                    ctl.skipped(n);
                    ctl.progress(0)
                };
            if stop {
                return Ok(());
            }
            offset += n;
        }
        self.base
            .flush()
            .map_err(|e| JobFailure(super::copy::strerror(&e)))
    }

    /// The overlays of `top` (parents of its filter through `backing`)
    /// take the base, in the graph and in their headers.
    fn commit(&self, d: &Daemon) {
        for overlay in d.parents_by(&self.filter, ChildRole::Backing) {
            let was_ro = overlay.read_only();
            if was_ro {
                let _ = overlay.driver().reopen(false);
            }
            if let Err(e) = d.rewrite_backing(
                &overlay,
                Some(self.base.clone()),
                Some(&self.backing_name),
                self.backing_format.as_deref(),
            ) {
                tracing::error!(node = overlay.name(), error = %e.desc, "commit: could not change the backing");
            }
            if was_ro {
                let _ = overlay.driver().reopen(true);
            }
        }
    }

    fn clean(&self, d: &Daemon) {
        drop(self.root.lock().unwrap_or_else(|p| p.into_inner()).take());
        if d.in_use(&self.filter) {
            d.replace_node(&self.filter, &self.top);
        }
        d.forget_node(&self.filter);
        if !d.in_use(&self.top) {
            d.delete_implicit(&self.top);
        }
        if self.base_was_ro {
            let _ = reopen_with_file(d, &self.base, true, &mut Vec::new());
        }
        d.relock();
    }
}
