//! block-stream (qemu's block/stream.c): the data of the layers between a
//! node and its base (or all of them) is copied into the node, then the
//! node's backing becomes the base, in the header and in the graph, and
//! the layers in between leave the graph.
//!
//! A copy-on-read filter sits above the node while the job runs; guest
//! writes pass through it holding their range, and the job copies a range
//! only while holding it and after checking again that the node still
//! lacks those bytes, so a copy never overwrites a newer guest write.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::copy::{depth_of, Layers, Policies};
use super::{CommonArgs, JobCtl, JobDriver, JobFailure, JobType, OnError};
use crate::block::copy::{copy_range, CopyError, Zeroes};
use crate::block::filter::{Filter, FilterKind};
use crate::block::link::Root;
use crate::block::node::Node;
use crate::block::open::Driver;
use crate::block::BlockNode;
use crate::daemon::{BlockOp, Daemon};
use crate::qmp::error::{QmpError, QmpResult};

/// block-stream's arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StreamArgs {
    #[serde(flatten)]
    pub common: CommonArgs,
    pub device: String,
    pub base: Option<String>,
    pub base_node: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: Option<bool>,
    pub bottom: Option<String>,
    pub on_error: Option<String>,
    pub filter_node_name: Option<String>,
}

/// stream_run's unit of work (STREAM_CHUNK).
const CHUNK: u64 = 512 << 10;

pub struct Stream {
    /// The node streamed into.
    top: Arc<Node>,
    /// Its new backing (`None`: the whole chain is streamed).
    base: Option<Arc<Node>>,
    layers: Layers,
    filter: Arc<Node>,
    guard: Arc<Filter>,
    /// The layers that leave the graph (blocked while the job runs).
    between: Vec<Arc<Node>>,
    backing_name: Option<String>,
    backing_format: Option<String>,
    policies: Policies,
    /// The top was read-only and is made writable for the job.
    was_read_only: bool,
    root: Mutex<Option<Arc<Root>>>,
}

/// The base named by `base` (a file name in the chain), `base-node`, or
/// the layer below `bottom`, with qemu's checks and texts.
fn find_base(d: &Daemon, a: &StreamArgs, top: &Arc<Node>) -> QmpResult<Option<Arc<Node>>> {
    let both = |x: &str, y: &str| {
        QmpError::generic(format!(
            "'{x}' and '{y}' cannot be specified at the same time"
        ))
    };
    if a.base.is_some() && a.base_node.is_some() {
        return Err(both("base", "base-node"));
    }
    if a.base.is_some() && a.bottom.is_some() {
        return Err(both("base", "bottom"));
    }
    if a.bottom.is_some() && a.base_node.is_some() {
        return Err(both("bottom", "base-node"));
    }
    if let Some(file) = &a.base {
        return find_backing_image(top, file)
            .map(Some)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{file}' in the backing chain")));
    }
    if let Some(name) = &a.base_node {
        let base = d.lookup(None, Some(name))?;
        if Arc::ptr_eq(&base, top) || depth_of(top, &base).is_none() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is not a backing image of '{}'",
                a.device
            )));
        }
        return Ok(Some(base));
    }
    if let Some(name) = &a.bottom {
        let bottom = d.lookup(None, Some(name))?;
        if d.driver_of(name).is_some_and(Driver::is_filter) {
            return Err(QmpError::generic(format!(
                "Node '{name}' is a filter, use a non-filter node as 'bottom'"
            )));
        }
        if depth_of(top, &bottom).is_none() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is not in a chain starting from '{}'",
                a.device
            )));
        }
        return Ok(bottom.below());
    }
    Ok(None)
}

/// The layer below `top` whose image file is `file` (qemu's
/// bdrv_find_backing_image).
pub fn find_backing_image(top: &Arc<Node>, file: &str) -> Option<Arc<Node>> {
    let mut layer = top.below();
    while let Some(l) = layer {
        if l.filename().is_some_and(|p| p.to_str() == Some(file)) {
            return Some(l);
        }
        layer = l.below();
    }
    None
}

/// The layers strictly between `top` and `base` (all below `top` without
/// a base).
pub fn between(top: &Arc<Node>, base: Option<&Arc<Node>>) -> Vec<Arc<Node>> {
    let mut out = Vec::new();
    let mut layer = top.below();
    while let Some(l) = layer {
        if base.is_some_and(|b| Arc::ptr_eq(b, &l)) {
            break;
        }
        layer = l.below();
        out.push(l);
    }
    out
}

/// Sets up a stream of `a.device`: checks, the filter. The caller creates
/// and starts the job.
pub fn prepare(d: &Daemon, a: &StreamArgs) -> QmpResult<Stream> {
    let top = d.node(&a.device)?;
    let base = find_base(d, a, &top)?;
    let between = between(&top, base.as_ref());
    d.check_op(&top, BlockOp::Stream)?;
    for n in &between {
        d.check_op(n, BlockOp::Stream)?;
    }
    if base.is_none() && a.backing_file.is_some() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let was_read_only = top.read_only();
    if was_read_only {
        crate::qmp::commands::block::reopen_with_file(d, &top, false, &mut Vec::new())?;
    }
    let layers = Layers {
        from: 2,
        base: base.as_ref().and_then(|b| depth_of(&top, b)).unwrap_or(0),
    };
    let backing_name = base.as_ref().map(|b| {
        a.backing_file
            .clone()
            .unwrap_or_else(|| crate::qmp::commands::block::qemu_filename(d, b))
    });
    let backing_format = base
        .as_ref()
        .and_then(|b| d.driver_of(b.name()))
        .map(|k| k.name().to_owned());
    let guard = Arc::new(Filter::new(FilterKind::CopyOnRead, top.clone()));
    let filter = d.insert_filter(
        &top,
        a.filter_node_name.as_deref(),
        Driver::CopyOnRead,
        guard.clone(),
        false,
    )?;
    let root = d.new_root(filter.clone(), false);
    Ok(Stream {
        top,
        base,
        layers,
        filter,
        guard,
        between,
        backing_name,
        backing_format,
        policies: Policies::both(OnError::parse(a.on_error.as_deref())),
        was_read_only,
        root: Mutex::new(Some(root)),
    })
}

impl Stream {
    /// Copies what `[offset, offset + len)` still lacks in the top, with
    /// the range held against guest writes; returns the bytes copied.
    fn populate(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<u64, CopyError> {
        let _held = self.guard.hold(offset, len);
        let mut at = offset;
        let mut copied = 0;
        while at < offset + len {
            let (copy, n) = self
                .layers
                .allocated(&self.top, at, offset + len - at)
                .map_err(CopyError::source)?;
            if copy {
                copy_range(&*self.top, &*self.top, at, n, buf, Zeroes::JOBS)?;
                copied += n;
            }
            at += n;
        }
        Ok(copied)
    }
}

impl JobDriver for Stream {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn total(&self) -> u64 {
        // qemu: nothing to do (and no length) without a backing.
        match self.top.below() {
            Some(_) => self.top.size(),
            None => 0,
        }
    }

    fn blocks(&self) -> Vec<Arc<Node>> {
        let mut v = vec![self.top.clone(), self.filter.clone()];
        v.extend(self.between.iter().cloned());
        v
    }

    fn run(&self, ctl: &JobCtl) -> Result<(), JobFailure> {
        let size = self.total();
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < size {
            let n = CHUNK.min(size - offset);
            let mut copied = 0;
            let stop = self.policies.step(ctl, || {
                copied = self.populate(offset, n, &mut buf)?;
                Ok(())
            })?;
            ctl.skipped(n - copied);
            if stop || ctl.progress(copied) {
                return Ok(());
            }
            offset += n;
        }
        Ok(())
    }

    fn commit(&self, d: &Daemon) {
        // qemu: the graph first, then the header.
        if let Err(e) = d.rewrite_backing(
            &self.top,
            self.base.clone(),
            self.backing_name.as_deref(),
            self.backing_format.as_deref(),
        ) {
            tracing::error!(node = self.top.name(), error = %e.desc, "stream: could not change the backing");
        }
        if let Some(first) = self.between.first() {
            d.delete_implicit(first);
        }
    }

    fn clean(&self, d: &Daemon) {
        drop(self.root.lock().unwrap_or_else(|p| p.into_inner()).take());
        d.remove_filter(&self.filter, &self.top);
        if self.was_read_only {
            let _ =
                crate::qmp::commands::block::reopen_with_file(d, &self.top, true, &mut Vec::new());
        }
        d.relock();
    }
}
