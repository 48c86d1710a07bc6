//! Carrying out a validated request against the export's node. Runs on the
//! NBD I/O threads (see [`super::workers`]): everything here may wait on
//! the disk, except [`try_inline`], which runs on the async reader.

use super::budget::CONN_SHARE;
use super::context::Descriptor;
use super::export::Export;
use super::proto::*;
use super::reply::{Reply, ReplyTo};
use super::splice::{self, SPLICE_MIN};
use crate::block::node::Node;
use crate::block::{BlockError, BlockNode, ErrorKind, Extent, ZeroFlags, STATE_ZERO};

/// Reads this long or longer (chunked, without DF) send the ranges the
/// node reports as zeroes as hole chunks, as qemu does for every read:
/// nbdcopy reads 256 KiB even over a 64 KiB data extent, and sending those
/// holes as data made a sparse pull move four times the bytes. Shorter
/// reads are sent whole, where a hole saves less than finding it costs (an
/// lseek on raw files). See proto/nbd.md.
pub const SPARSE_READ_MIN: u64 = 128 << 10;

/// The NBD error code for a block-layer failure.
pub fn errno_of(e: &BlockError) -> u32 {
    match e.kind {
        ErrorKind::Io | ErrorKind::Corrupt => EIO,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::NotSupported => ENOTSUP,
        ErrorKind::Invalid => EINVAL,
        ErrorKind::Permission => EPERM,
    }
}

fn fail(to: &ReplyTo, e: BlockError) -> Vec<u8> {
    tracing::warn!(error = %e, "request failed");
    to.error(errno_of(&e), &e.to_string())
}

/// A command that has passed validation, with what it needs to run.
pub enum Command {
    Read {
        len: u64,
        df: bool,
    },
    Write {
        data: Vec<u8>,
        fua: bool,
    },
    WriteZeroes {
        len: u64,
        flags: ZeroFlags,
        fua: bool,
    },
    Trim {
        len: u64,
        fua: bool,
    },
    Flush,
    Cache {
        len: u64,
    },
    BlockStatus {
        len: u64,
        req_one: bool,
        ids: Vec<u32>,
    },
}

pub fn execute(export: &Export, to: ReplyTo, cmd: Command) -> Reply {
    if let Command::BlockStatus { len, req_one, ids } = cmd {
        // Each context enters the node itself (entering twice from one
        // thread could wait on a graph change that waits on us).
        return block_status(export, to, len, req_one, &ids).into();
    }
    // Inside the node for the whole request: a graph change waits for it.
    let node = export.root.get();
    let node: &Node = &node;
    let off = to.offset;
    let done = |r: Result<(), BlockError>| match r {
        Ok(()) => to.ok().into(),
        Err(e) => fail(&to, e).into(),
    };
    match cmd {
        Command::Read { len, df } => read(node, to, len, df),
        Command::Write { data, fua } => done(node.write_at(&data, off, fua)),
        Command::WriteZeroes { len, flags, fua } => {
            done(node.write_zeroes(off, len, flags).and_then(|_| {
                if fua {
                    node.flush()
                } else {
                    Ok(())
                }
            }))
        }
        Command::Trim { len, fua } => {
            done(
                node.discard(off, len)
                    .and_then(|_| if fua { node.flush() } else { Ok(()) }),
            )
        }
        Command::Flush => done(node.flush()),
        Command::Cache { len } => done(node.cache(off, len)),
        Command::BlockStatus { .. } => to.error(EINVAL, "unreachable").into(),
    }
}

/// Largest request carried out on the reader's own thread when the node can
/// do it without waiting: beyond this the copy itself is worth a pool thread.
pub const INLINE_MAX: u64 = 256 << 10;

/// The most a read reply of `len` bytes adds to its data.
pub const READ_OVERHEAD: usize = 64;

/// Reads longer than this, in structured mode and without DF, are answered
/// in pieces of [`READ_PIECE`] bytes, each charged and sent on its own.
pub const STREAM_MIN: u64 = 2 * READ_PIECE;
pub const READ_PIECE: u64 = 1 << 20;

/// Whether a read is answered in pieces (see [`read_piece`]).
pub fn streamed(mode: Mode, len: u64, df: bool) -> bool {
    mode != Mode::Simple && !df && len > STREAM_MIN
}

/// The reply to `len` bytes of a streamed read at `pos`: its chunks, the
/// last piece's carrying DONE, or an error chunk that ends the reply.
pub fn read_piece(
    export: &Export,
    to: &ReplyTo,
    pos: u64,
    len: u64,
    last: bool,
) -> Result<Reply, Vec<u8>> {
    let node = export.root.get();
    read_part(&node, to, pos, len, false, last)
}

/// The extents one block-status context may report and the largest reply
/// that makes: `ids` chunks, together within a connection's share.
pub fn block_status_bound(mode: Mode, ids: usize, req_one: bool) -> (usize, usize) {
    let ids = ids.max(1);
    let (head, entry) = match mode {
        Mode::Extended => (chunk_header_len(mode) + 8, 16),
        _ => (chunk_header_len(mode) + 4, 8),
    };
    let fit = (CONN_SHARE / ids).saturating_sub(head) / entry;
    let max = if req_one {
        1
    } else {
        MAX_EXTENTS.min(fit).max(1)
    };
    (max, ids * (head + max * entry))
}

/// Carries out `cmd` at once if the node can do it without waiting (data
/// in the page cache); `None` means it must go to the I/O threads.
pub fn try_inline(export: &Export, to: &ReplyTo, cmd: &Command) -> Option<Reply> {
    match cmd {
        Command::Read { len, df } if *len > 0 && *len <= INLINE_MAX => {
            let node = export.root.try_get()?;
            if on_pool(&node, to, *len) {
                return None;
            }
            // Where the holes are must be known without waiting, else the
            // pool finds them.
            let runs = if sparse(to, *len, *df) {
                zero_runs(to.offset, *len, |at, n| {
                    node.try_block_status_nowait(at, n).ok_or(())
                })
                .ok()?
            } else {
                None
            };
            let runs = runs.unwrap_or_else(|| vec![(to.offset, *len, false)]);
            // RWF_NOWAIT reads need initialised room: zero-filled here.
            let fill = |_: &mut Reply, head: &mut Vec<u8>, at, n| {
                let from = head.len();
                head.resize(from + n, 0);
                node.try_read_nowait(&mut head[from..], at)
                    .then_some(())
                    .ok_or(())
            };
            read_reply(to, &runs, true, fill).ok()
        }
        Command::Write { data, fua: false } if data.len() as u64 <= INLINE_MAX => export
            .root
            .try_get()?
            .try_write_nowait(data, to.offset)
            .then(|| to.ok().into()),
        _ => None,
    }
}

fn read(node: &Node, to: ReplyTo, len: u64, df: bool) -> Reply {
    // An empty read still answers with a chunk once chunks are negotiated
    // (qemu's NONE chunk), not with a simple reply.
    if len == 0 && to.mode != Mode::Simple {
        let mut out = Vec::with_capacity(EXT_REPLY_LEN);
        to.chunk(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        return out.into();
    }
    read_part(node, &to, to.offset, len, df, true).unwrap_or_else(|e| e.into())
}

/// The chunks for `len` bytes at `pos` (a whole read, or a piece of one),
/// DONE on the last only when `last`; an error reply on failure. Holes
/// are answered as OFFSET_HOLE chunks, without touching their pages.
fn read_part(
    node: &Node,
    to: &ReplyTo,
    pos: u64,
    len: u64,
    df: bool,
    last: bool,
) -> Result<Reply, Vec<u8>> {
    let runs = if sparse(to, len, df) {
        // Status is an optimisation: on error, just read it all.
        zero_runs(pos, len, |at, n| node.block_status(at, n)).unwrap_or(None)
    } else {
        None
    };
    let runs = runs.unwrap_or_else(|| vec![(pos, len, false)]);
    let fill =
        |reply: &mut Reply, head: &mut Vec<u8>, at, n| append_data(node, to, reply, head, at, n);
    read_reply(to, &runs, last, fill).map_err(|e| fail(to, e))
}

/// The reply to a read (or a piece of one) made of `runs`: a hole chunk
/// for each zero run, and for each data run its header, then its data as
/// `fill(reply, head, at, n)` puts it after the headers in `head` (not yet
/// in `reply`); DONE on the last chunk only when `last`.
fn read_reply<E>(
    to: &ReplyTo,
    runs: &[(u64, u64, bool)],
    last: bool,
    mut fill: impl FnMut(&mut Reply, &mut Vec<u8>, u64, usize) -> Result<(), E>,
) -> Result<Reply, E> {
    let mut reply = Reply::new();
    // Headers not yet followed by their data.
    let mut head = Vec::new();
    let end = runs.len() - 1;
    for (i, &(at, n, zero)) in runs.iter().enumerate() {
        let flags = if last && i == end { REPLY_FLAG_DONE } else { 0 };
        if zero {
            to.chunk(&mut head, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            put64(&mut head, at);
            put32(&mut head, n as u32);
            continue;
        }
        if to.mode == Mode::Simple {
            simple_reply(&mut head, 0, to.cookie);
        } else {
            to.chunk(&mut head, flags, REPLY_TYPE_OFFSET_DATA, 8 + n as usize);
            put64(&mut head, at);
        }
        fill(&mut reply, &mut head, at, n as usize)?;
    }
    reply.push_bytes(head);
    Ok(reply)
}

/// Whether `len` bytes of data go through pipes (see [`splice`]).
fn splices(node: &Node, to: &ReplyTo, len: u64) -> bool {
    to.splice && len >= SPLICE_MIN && node.pipe_reads()
}

/// Whether a read's holes are sent as hole chunks.
fn sparse(to: &ReplyTo, len: u64, df: bool) -> bool {
    to.mode != Mode::Simple && !df && len >= SPARSE_READ_MIN
}

/// Whether a read skips the no-wait path for the pool: to move its data
/// through pipes (filling one may wait on the disk; its holes are found
/// there too).
fn on_pool(node: &Node, to: &ReplyTo, len: u64) -> bool {
    to.splice && node.pipe_reads() && len >= SPARSE_READ_MIN
}

/// Puts `head` and then `n` bytes of data at `at` into `reply`: the pages
/// moved through pipes where the writer and the node can, else read into
/// the buffer after `head` (never zero-filled first: read_append).
fn append_data(
    node: &Node,
    to: &ReplyTo,
    reply: &mut Reply,
    head: &mut Vec<u8>,
    at: u64,
    n: usize,
) -> Result<(), BlockError> {
    if splices(node, to, n as u64) {
        if let Some(pipes) = splice::read(node, at, n)? {
            reply.push_bytes(std::mem::take(head));
            for p in pipes {
                reply.push_pipe(p);
            }
            return Ok(());
        }
    }
    // Exactly the room needed: read_append may fill all spare capacity.
    let mut buf = Vec::with_capacity(head.len() + n);
    buf.append(head);
    node.read_append(&mut buf, at, n)?;
    reply.push_bytes(buf);
    Ok(())
}

/// (offset, length, reads-as-zero) of each run of a read.
type Runs = Vec<(u64, u64, bool)>;

/// `[pos, pos + len)` as (offset, length, reads-as-zero) runs, as
/// `status(at, left)` reports them; `Ok(None)` when it is all data: then
/// one data chunk is best.
fn zero_runs<E>(
    pos: u64,
    len: u64,
    mut status: impl FnMut(u64, u64) -> Result<Extent, E>,
) -> Result<Option<Runs>, E> {
    let mut runs: Runs = Vec::new();
    let end = pos + len;
    let mut at = pos;
    while at < end {
        let e = status(at, end - at)?;
        let n = e.len.clamp(1, end - at);
        let zero = e.flags & STATE_ZERO != 0;
        match runs.last_mut() {
            Some((_, l, z)) if *z == zero => *l += n,
            _ => runs.push((at, n, zero)),
        }
        at += n;
    }
    let all_data = runs.len() == 1 && !runs[0].2;
    Ok((!all_data).then_some(runs))
}

fn block_status(export: &Export, to: ReplyTo, len: u64, req_one: bool, ids: &[u32]) -> Vec<u8> {
    let (max, _) = block_status_bound(to.mode, ids.len(), req_one);
    // A bitmap of another (larger) node is cut to the export, as qemu.
    let len = len.min(export.size().saturating_sub(to.offset));
    let mut out = Vec::new();
    let mut descs: Vec<Descriptor> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let Some(ctx) = export.contexts.get(id) else {
            return to.error(EINVAL, "unknown context");
        };
        descs.clear();
        if let Err(e) = ctx.extents(to.offset, len, max, &mut descs) {
            return fail(&to, e);
        }
        let flags = if i + 1 == ids.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if to.mode == Mode::Extended {
            to.chunk(
                &mut out,
                flags,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                8 + 16 * descs.len(),
            );
            put32(&mut out, id);
            put32(&mut out, descs.len() as u32);
            for d in &descs {
                put64(&mut out, d.len);
                put64(&mut out, d.flags);
            }
        } else {
            to.chunk(
                &mut out,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                4 + 8 * descs.len(),
            );
            put32(&mut out, id);
            for d in &descs {
                // Compact requests are at most 4 GiB - 1, so lengths fit.
                put32(&mut out, d.len.min(u32::MAX as u64) as u32);
                put32(&mut out, d.flags as u32);
            }
        }
    }
    out
}
