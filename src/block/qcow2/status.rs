//! Allocation status through the chain, as qemu reports it over NBD.
//!
//! `base:allocation`: data and compressed clusters are data (0); zero
//! clusters read as zero and are not data (HOLE|ZERO); unallocated ranges
//! take the status of the backing node, or HOLE|ZERO without one (or past
//! its end). `qemu:allocation-depth`: 1 where this layer holds the range
//! (data or zero clusters), the backing node's depth + 1 below that, 0 where
//! no layer does; past the end of a shorter backing file, that backing's
//! depth.
//!
//! Like qemu, an image that looks metadata-preallocated (far more clusters
//! in use than the host file has blocks for) also asks the host file, and
//! reports data clusters over holes in it as data that reads as zero (ZERO).
//! The guess is made once, at the first query, as qemu does. Adjacent runs with the same answer are merged.

use super::io::HostFile;
use super::tables::Mapping;
use super::Qcow2Node;
use crate::block::{
    BlockError, BlockNode, BlockResult, DepthExtent, Extent, STATE_HOLE, STATE_ZERO,
};

/// Runs merged by one call at most, so a single query stays cheap on huge
/// fragmented images (the caller asks again for the rest).
const MAX_STEPS: usize = 1 << 16;

impl Qcow2Node {
    fn clamp(&self, offset: u64, len: u64) -> BlockResult<u64> {
        if offset >= self.vsize() || len == 0 {
            return Err(BlockError::invalid(format!(
                "block status at {} (+{}) is outside the image ({})",
                offset,
                len,
                self.vsize()
            )));
        }
        Ok(len.min(self.vsize() - offset))
    }

    fn map_run(&self, at: u64, max: u64) -> BlockResult<(Mapping, u64)> {
        let mut meta = self.lock_meta()?;
        meta.mapping(&self.f, at, max)
    }

    /// [`Qcow2Node::map_run`] without waiting: `None` if the metadata
    /// lock is taken or the table is not in memory.
    fn map_run_nowait(&self, at: u64, max: u64) -> Option<(Mapping, u64)> {
        self.meta_nowait(at, max)?.mapping(&self.f, at, max).ok()
    }

    /// qemu's heuristic: count clusters in use (up to the end of the file)
    /// against the blocks the host file really has; well above that means
    /// metadata preallocation.
    fn looks_preallocated(&self) -> BlockResult<bool> {
        if let Some(&v) = self.prealloc.get() {
            return Ok(v);
        }
        let cs = self.geo.cluster_size();
        let real = self.f.allocated().unwrap_or(0) / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end = self.f.len()?.div_ceil(cs);
        let mut meta = self.lock_meta()?;
        let used = meta.refs.count_used(&self.f, end, threshold)?;
        drop(meta);
        Ok(*self.prealloc.get_or_init(|| used >= threshold))
    }

    pub(super) fn status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let len = self.clamp(offset, len)?;
        let (len, flags) = merge(len, |done| self.status_one(offset + done, len - done))?;
        Ok(extent(len, flags))
    }

    /// [`Qcow2Node::status`] only if nothing needs waiting for: the tables
    /// in memory, the metadata lock free, and the same down the chain.
    /// `None`: ask [`Qcow2Node::status`] on a thread that may wait.
    pub(super) fn status_nowait(&self, offset: u64, len: u64) -> Option<Extent> {
        let len = self.clamp(offset, len).ok()?;
        let step = |done| self.status_one_nowait(offset + done, len - done).ok_or(());
        let (len, flags) = merge(len, step).ok()?;
        Some(extent(len, flags))
    }

    fn status_one(&self, at: u64, max: u64) -> BlockResult<(u32, u64)> {
        let (m, n) = self.map_run(at, max)?;
        let prealloc = matches!(m, Mapping::Data { .. }) && self.looks_preallocated()?;
        let below = || {
            let Some(c) = self.backing() else {
                return Ok(None);
            };
            let b = c.get();
            if at >= b.size() {
                return Ok(None);
            }
            b.block_status(at, n.min(b.size() - at)).map(Some)
        };
        classify(m, n, prealloc, &self.f, below)
    }

    fn status_one_nowait(&self, at: u64, max: u64) -> Option<(u32, u64)> {
        let (m, n) = self.map_run_nowait(at, max)?;
        // A preallocated image asks the host file (lseek), which may wait.
        if matches!(m, Mapping::Data { .. }) && *self.prealloc.get()? {
            return None;
        }
        // Err(()): the answer would need waiting.
        let below = || {
            let edge = self.backing.try_read().map_err(|_| ())?;
            let Some(c) = edge.as_ref() else {
                return Ok(None);
            };
            let b = c.link.try_get().ok_or(())?;
            if at >= b.size() {
                return Ok(None);
            }
            b.try_block_status_nowait(at, n.min(b.size() - at))
                .map(Some)
                .ok_or(())
        };
        classify(m, n, false, &self.f, below).ok()
    }

    pub(super) fn depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        let len = self.clamp(offset, len)?;
        let (len, depth) = merge(len, |done| self.depth_one(offset + done, len - done))?;
        Ok(DepthExtent {
            len,
            depth: depth.unwrap_or(0),
        })
    }

    fn depth_one(&self, at: u64, max: u64) -> BlockResult<(u32, u64)> {
        let (m, n) = self.map_run(at, max)?;
        Ok(match m {
            Mapping::Unallocated => match self.backing().as_ref().map(|c| c.get()) {
                Some(b) if at < b.size() => {
                    let e = b.allocation_depth(at, n.min(b.size() - at))?;
                    let d = if e.depth == 0 { 0 } else { e.depth + 1 };
                    (d, e.len.clamp(1, n))
                }
                // qemu: the zeroes a short backing file reads past its end
                // count as allocated in that backing layer.
                Some(_) => (2, n),
                None => (0, n),
            },
            _ => (1, n),
        })
    }
}

/// Merges the runs `step(done)` reports from the start of a `len`-byte
/// range while their values agree (at most [`MAX_STEPS`] of them): how
/// far that goes, and the value (`None` for an empty range).
fn merge<E>(
    len: u64,
    mut step: impl FnMut(u64) -> Result<(u32, u64), E>,
) -> Result<(u64, Option<u32>), E> {
    let mut done = 0;
    let mut value = None;
    for _ in 0..MAX_STEPS {
        if done >= len {
            break;
        }
        let (v, n) = step(done)?;
        if value.is_some_and(|prev| prev != v) {
            break;
        }
        value = Some(v);
        done += n;
    }
    Ok((done, value))
}

fn extent(len: u64, flags: Option<u32>) -> Extent {
    Extent {
        len,
        flags: flags.unwrap_or(STATE_HOLE | STATE_ZERO),
    }
}

/// The `base:allocation` flags of `n` bytes mapped as `m`, and how many
/// of them share those flags; `below` asks the backing node (`None`: no
/// backing there).
fn classify<E>(
    m: Mapping,
    n: u64,
    prealloc: bool,
    f: &HostFile,
    below: impl FnOnce() -> Result<Option<Extent>, E>,
) -> Result<(u32, u64), E> {
    Ok(match m {
        Mapping::Data { host, .. } if prealloc => match f.data_run(host, n) {
            (true, run) => (0, run.max(1)),
            (false, run) => (STATE_ZERO, run.max(1)),
        },
        Mapping::Data { .. } => (0, n),
        Mapping::Compressed { .. } => (0, n),
        Mapping::Zero { .. } => (STATE_HOLE | STATE_ZERO, n),
        Mapping::Unallocated => match below()? {
            Some(e) => (e.flags, e.len.clamp(1, n)),
            None => (STATE_HOLE | STATE_ZERO, n),
        },
    })
}
