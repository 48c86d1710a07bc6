//! One connection in the transmission phase.
//!
//! The reader (this task) owns the socket's read side: it frames requests,
//! validates them, and carries out at once those the node can do without
//! waiting ([`try_inline`]); the rest go to the daemon's I/O threads (see
//! [`super::workers`]). The thread that finishes a request writes its
//! reply straight to the socket (see [`super::sink`]). Requests therefore
//! run concurrently and may complete out of order. Each holds a slot and
//! memory from the budget (see [`super::budget`]) until its reply is
//! written; long reads are answered in pieces by a task of their own, so
//! they hold little at a time.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::debug;

use super::budget::{Charge, ConnBudget, Pool};
use super::exec::{
    block_status_bound, execute, read_piece, streamed, try_inline, Command, READ_OVERHEAD,
    READ_PIECE,
};
use super::export::Export;
use super::handshake::Negotiated;
use super::proto::*;
use super::reply::{Reply, ReplyTo};
use super::request::{block_status_payload, payload_len, validate, Refusal};
use super::sink::ReplySink;
use super::workers::Workers;
use crate::block::ZeroFlags;

/// A payload this large is not drained for a refusal: the client is broken.
const MAX_DRAIN: u64 = 64 << 20;
const BUF_SIZE: usize = 128 << 10;

/// Serves requests until the client disconnects, breaks the protocol, or
/// `shutdown` fires; in-flight requests always finish and are answered.
pub async fn run<R>(
    r: R,
    sink: Arc<ReplySink>,
    neg: Negotiated,
    pool: &Pool,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    // Dropped last: the connection counts until every request is answered.
    let _attached = neg.export.attach();
    let mut closed = neg.export.closed();
    let mut conn = Conn {
        r: BufReader::with_capacity(BUF_SIZE, r),
        export: neg.export,
        mode: neg.mode,
        contexts: neg.contexts,
        budget: Arc::new(pool.connection()),
        sink,
    };
    let result = tokio::select! {
        r = conn.serve() => r,
        _ = shutdown.wait_for(|stop| *stop) => Ok(()),
        _ = closed.wait_for(|c| *c) => Ok(()),
    };
    // Wait for every in-flight request: each holds a slot until answered.
    conn.budget.idle().await;
    conn.sink.close();
    result
}

struct Conn<R> {
    r: BufReader<R>,
    export: Arc<Export>,
    mode: Mode,
    contexts: Vec<u32>,
    budget: Arc<ConnBudget>,
    sink: Arc<ReplySink>,
}

enum Next {
    Continue,
    Disconnect,
}

/// The memory a request needs from its header alone: a write its payload,
/// a read its reply (a streamed read charges its pieces itself), a block
/// status its largest reply.
fn cost(req: &Request, plen: u64, mode: Mode, contexts: usize) -> usize {
    let kept = if plen <= MAX_BLOCK as u64 { plen } else { 0 };
    let reply = match req.kind {
        CMD_READ if req.length > MAX_BLOCK as u64 => 0,
        CMD_READ if streamed(mode, req.length, req.flags & CMD_FLAG_DF != 0) => 0,
        CMD_READ => req.length + READ_OVERHEAD as u64,
        CMD_BLOCK_STATUS => {
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            block_status_bound(mode, contexts, one).1 as u64
        }
        _ => 0,
    };
    (kept + reply) as usize
}

/// Answers a long read piece by piece: each piece is charged, read on an
/// I/O thread and queued on its own, so a client that stops reading
/// stalls this task on its own share, not the I/O threads.
async fn stream_read(
    export: Arc<Export>,
    budget: Arc<ConnBudget>,
    sink: Arc<ReplySink>,
    to: ReplyTo,
    len: u64,
    slot: OwnedSemaphorePermit,
) {
    let end = to.offset + len;
    let mut pos = to.offset;
    let mut slot = Some(slot);
    while pos < end {
        let n = (end - pos).min(READ_PIECE);
        let last = pos + n == end;
        let Some(mut charge) = budget.charge(n as usize + READ_OVERHEAD).await else {
            return;
        };
        if sink.is_dead() {
            return;
        }
        let ex = export.clone();
        let piece = Workers::global()
            .run(move || read_piece(&ex, &to, pos, n, last))
            .await;
        let (buf, done) = match piece {
            Some(Ok(buf)) => (buf, last),
            Some(Err(err)) => (err.into(), true),
            None => (to.error(EIO, "read failed").into(), true),
        };
        if done {
            if let Some(s) = slot.take() {
                charge = charge.with_slot(s);
            }
        }
        sink.send(buf, charge);
        if done {
            return;
        }
        pos += n;
    }
}

impl<R: AsyncRead + Unpin> Conn<R> {
    async fn serve(&mut self) -> io::Result<()> {
        let hlen = header_len(self.mode);
        let mut head = [0u8; EXT_REQUEST_LEN];
        loop {
            match self.r.read_exact(&mut head[..hlen]).await {
                Ok(_) => {}
                // A client that closes between requests is just leaving.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let Some(req) = Request::parse(&head[..hlen], self.mode) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad request magic",
                ));
            };
            if let Next::Disconnect = self.request(req).await? {
                return Ok(());
            }
        }
    }

    fn reply_to(&self, req: &Request) -> ReplyTo {
        ReplyTo {
            mode: self.mode,
            cookie: req.cookie,
            offset: req.offset,
            splice: self.sink.splices(),
        }
    }

    /// Runs `work` on an I/O thread, which sends the reply it makes; the
    /// charge returns to the budget once the reply is on the wire.
    fn spawn<T: Into<Reply>>(&self, charge: Charge, work: impl FnOnce() -> T + Send + 'static) {
        let sink = self.sink.clone();
        Workers::global().submit(move || sink.send(work(), charge));
    }

    fn refuse(&self, req: &Request, charge: Charge, r: Refusal) {
        debug!(cmd = cmd_name(req.kind), errno = r.errno, msg = %r.msg, "request refused");
        let reply = self.reply_to(req).error(r.errno, &r.msg);
        self.sink.send(reply, charge);
    }

    async fn drain(&mut self, mut n: u64) -> io::Result<()> {
        let mut sink = [0u8; 8192];
        while n > 0 {
            let k = n.min(sink.len() as u64) as usize;
            self.r.read_exact(&mut sink[..k]).await?;
            n -= k as u64;
        }
        Ok(())
    }

    async fn request(&mut self, req: Request) -> io::Result<Next> {
        let plen = payload_len(&req, self.mode);
        if req.kind == CMD_DISC {
            return Ok(Next::Disconnect);
        }
        // The length the command acts on; block status may carry it in a payload.
        let mut effect = if req.kind == CMD_WRITE {
            plen
        } else {
            req.length
        };
        let mut ids = self.contexts.clone();
        let mut payload = Vec::new();
        let small_enough = plen <= MAX_BLOCK as u64;
        let Some(slot) = self.budget.slot().await else {
            return Ok(Next::Disconnect);
        };
        let bytes = cost(&req, plen, self.mode, self.contexts.len());
        let Some(charge) = self.budget.charge(bytes).await else {
            return Ok(Next::Disconnect);
        };
        if plen > 0 {
            if !small_enough {
                if plen > MAX_DRAIN {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "payload too large",
                    ));
                }
                self.drain(plen).await?;
            } else {
                payload.resize(plen as usize, 0);
                self.r.read_exact(&mut payload).await?;
            }
        }
        if req.kind == CMD_BLOCK_STATUS && plen > 0 {
            match block_status_payload(&payload, &self.contexts) {
                Ok((len, chosen)) => {
                    effect = len;
                    ids = chosen;
                }
                Err(r) => {
                    self.refuse(&req, charge.with_slot(slot), r);
                    return Ok(Next::Continue);
                }
            }
        }
        if req.kind != CMD_WRITE && req.kind != CMD_BLOCK_STATUS && plen > 0 {
            let r = Refusal {
                errno: EINVAL,
                msg: "unexpected payload".into(),
            };
            self.refuse(&req, charge.with_slot(slot), r);
            return Ok(Next::Continue);
        }
        if let Err(r) = validate(&req, effect, &self.export, self.mode, self.contexts.len()) {
            self.refuse(&req, charge.with_slot(slot), r);
            return Ok(Next::Continue);
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let cmd = match req.kind {
            CMD_READ => Command::Read {
                len: effect,
                df: req.flags & CMD_FLAG_DF != 0,
            },
            CMD_WRITE => Command::Write { data: payload, fua },
            CMD_WRITE_ZEROES => Command::WriteZeroes {
                len: effect,
                flags: ZeroFlags {
                    may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                    fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                },
                fua,
            },
            CMD_TRIM => Command::Trim { len: effect, fua },
            CMD_FLUSH => Command::Flush,
            CMD_CACHE => Command::Cache { len: effect },
            CMD_BLOCK_STATUS => Command::BlockStatus {
                len: effect,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
                ids,
            },
            // validate() refuses every other command.
            _ => return Ok(Next::Continue),
        };
        let to = self.reply_to(&req);
        if let Command::Read { len, df } = cmd {
            self.export.note_read(len);
            if streamed(self.mode, len, df) {
                // Its pieces are charged as they are read.
                drop(charge);
                let (export, budget) = (self.export.clone(), self.budget.clone());
                let sink = self.sink.clone();
                tokio::spawn(stream_read(export, budget, sink, to, len, slot));
                return Ok(Next::Continue);
            }
        }
        let charge = charge.with_slot(slot);
        if let Some(reply) = try_inline(&self.export, &to, &cmd) {
            self.sink.send(reply, charge);
            return Ok(Next::Continue);
        }
        let export = self.export.clone();
        if let Command::BlockStatus { .. } = cmd {
            // Its reply goes ahead of read data already queued: a client
            // like nbdcopy asks for the next extents before reading on.
            let sink = self.sink.clone();
            Workers::global().submit(move || sink.send_first(execute(&export, to, cmd), charge));
            return Ok(Next::Continue);
        }
        self.spawn(charge, move || execute(&export, to, cmd));
        Ok(Next::Continue)
    }
}
