//! What the jobs that move data between layers share (stream, commit,
//! mirror): how far a base lies below a node, which bytes are allocated
//! above it, a copy of one range from node to node, and qemu's error
//! policy around one step of work.

use std::sync::Arc;

use super::{ErrorDecision, IoOp, JobCtl, JobFailure, OnError};
use crate::block::copy::{CopyError, Side};
use crate::block::node::Node;
use crate::block::{BlockError, BlockNode, BlockResult, ErrorKind};

/// The most a job copies in one step: large enough for sequential I/O
/// to stream, small enough that pauses, cancels and the rate limit act
/// promptly.
pub const STEP: u64 = 1 << 20;

/// qemu's strerror text for a block error, as jobs report it.
pub fn strerror(e: &BlockError) -> String {
    match e.kind {
        ErrorKind::Io | ErrorKind::Corrupt => "Input/output error",
        ErrorKind::NoSpace => "No space left on device",
        ErrorKind::Permission => "Operation not permitted",
        ErrorKind::NotSupported => "Operation not supported",
        ErrorKind::Invalid => "Invalid argument",
    }
    .to_owned()
}

/// The layers from `top` down to `base` in `top`'s chain, as allocation
/// depths count them (`top` is 1); `None` if `base` is not below `top`.
pub fn depth_of(top: &Arc<Node>, base: &Arc<Node>) -> Option<u32> {
    let mut depth = 1;
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        if Arc::ptr_eq(&l, base) {
            return Some(depth);
        }
        depth += 1;
        layer = l.below();
        if depth > crate::block::chain::MAX_CHAIN_DEPTH as u32 + 2 {
            break;
        }
    }
    None
}

/// Which layers of a chain a job copies from, by allocation depth below
/// its top node (1 = the top itself).
#[derive(Debug, Clone, Copy)]
pub struct Layers {
    /// The first depth that counts (2 to skip the top itself: stream; 0:
    /// every byte, allocated or not: a full mirror).
    pub from: u32,
    /// The depth of the base, which no longer counts; 0: no base, every
    /// layer counts.
    pub base: u32,
}

impl Layers {
    /// From `offset`, how many bytes (at most `len`) share one answer to
    /// "allocated in the layers that count", and that answer.
    pub fn allocated(&self, top: &Node, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        let e = top.allocation_depth(offset, len)?;
        let counts = e.depth >= self.from && (self.base == 0 || e.depth < self.base);
        Ok((counts, e.len.clamp(1, len)))
    }
}

/// The job's error policies (on-error; mirror's on-source-error and
/// on-target-error).
#[derive(Debug, Clone, Copy)]
pub struct Policies {
    pub source: OnError,
    pub target: OnError,
}

impl Policies {
    pub fn both(p: OnError) -> Policies {
        Policies {
            source: p,
            target: p,
        }
    }

    /// Runs one step of work, handling its errors as qemu's
    /// block_job_error_action: `Ok(false)` done, `Ok(true)` the job should
    /// stop, `Err` the job fails. A step stopped on an error is tried again
    /// once the job is resumed; with `ignore` it is tried again too (after
    /// a pause point, so the job can still be paused or cancelled).
    pub fn step(
        &self,
        ctl: &JobCtl,
        mut work: impl FnMut() -> Result<(), CopyError>,
    ) -> Result<bool, JobFailure> {
        loop {
            let e = match work() {
                Ok(()) => return Ok(false),
                Err(e) => e,
            };
            let (policy, op) = match e.side {
                Side::Source => (self.source, IoOp::Read),
                Side::Target => (self.target, IoOp::Write),
            };
            let nospace = e.error.kind == ErrorKind::NoSpace;
            match ctl.error_action(policy, op, nospace) {
                ErrorDecision::Fail if ctl.is_cancelled() => return Ok(true),
                ErrorDecision::Fail => return Err(JobFailure(strerror(&e.error))),
                ErrorDecision::Ignore => {
                    if ctl.pause_point() {
                        return Ok(true);
                    }
                }
                ErrorDecision::Retry => {}
            }
        }
    }
}
