//! Carrying out a validated request against the export's node. Runs on the
//! blocking pool: everything here may wait on the disk.

use super::context::Descriptor;
use super::export::Export;
use super::proto::*;
use super::reply::ReplyTo;
use crate::block::{BlockError, ErrorKind, ZeroFlags, STATE_ZERO};

/// Reads shorter than this are sent as plain data: asking the node for holes
/// costs more than it saves (qemu asks for every read; see proto/nbd.md).
pub const SPARSE_READ_MIN: u64 = 64 << 10;

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

pub fn execute(export: &Export, to: ReplyTo, cmd: Command) -> Vec<u8> {
    let node = &export.node;
    let off = to.offset;
    let done = |r: Result<(), BlockError>| match r {
        Ok(()) => to.ok(),
        Err(e) => fail(&to, e),
    };
    match cmd {
        Command::Read { len, df } => read(export, to, len, df),
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
        Command::BlockStatus { len, req_one, ids } => block_status(export, to, len, req_one, &ids),
    }
}

fn read(export: &Export, to: ReplyTo, len: u64, df: bool) -> Vec<u8> {
    let node = &export.node;
    if to.mode == Mode::Simple {
        let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN + len as usize);
        simple_reply(&mut out, 0, to.cookie);
        out.resize(SIMPLE_REPLY_LEN + len as usize, 0);
        return match node.read_at(&mut out[SIMPLE_REPLY_LEN..], to.offset) {
            Ok(()) => out,
            Err(e) => fail(&to, e),
        };
    }
    if len == 0 {
        return to.ok();
    }
    // Where holes are worth finding, ask the node; otherwise one data run.
    let mut runs = Vec::new();
    if !df && len >= SPARSE_READ_MIN {
        let mut pos = to.offset;
        let end = to.offset + len;
        while pos < end {
            match node.block_status(pos, end - pos) {
                Ok(e) => {
                    let n = e.len.clamp(1, end - pos);
                    let zero = e.flags & STATE_ZERO != 0;
                    match runs.last_mut() {
                        Some((_, l, z)) if *z == zero => *l += n,
                        _ => runs.push((pos, n, zero)),
                    }
                    pos += n;
                }
                // Status is an optimisation: fall back to reading it all.
                Err(_) => {
                    runs = vec![(to.offset, len, false)];
                    break;
                }
            }
        }
    } else {
        runs.push((to.offset, len, false));
    }
    let hdr = chunk_header_len(to.mode);
    let data_bytes: u64 = runs.iter().filter(|r| !r.2).map(|r| r.1).sum();
    let mut out = Vec::with_capacity(runs.len() * (hdr + 12) + data_bytes as usize);
    let last = runs.len() - 1;
    for (i, &(pos, n, zero)) in runs.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if zero {
            to.chunk(&mut out, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            put64(&mut out, pos);
            put32(&mut out, n as u32);
        } else {
            to.chunk(&mut out, flags, REPLY_TYPE_OFFSET_DATA, 8 + n as usize);
            put64(&mut out, pos);
            let at = out.len();
            out.resize(at + n as usize, 0);
            if let Err(e) = node.read_at(&mut out[at..], pos) {
                return fail(&to, e);
            }
        }
    }
    out
}

fn block_status(export: &Export, to: ReplyTo, len: u64, req_one: bool, ids: &[u32]) -> Vec<u8> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut out = Vec::new();
    let mut descs: Vec<Descriptor> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let Some(ctx) = export.contexts.get(id as usize) else {
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
