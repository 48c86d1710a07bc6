//! One connection in the transmission phase.
//!
//! The reader (this task) owns the socket's read half: it frames requests,
//! validates them, and hands each to the blocking pool. Each finished
//! request yields one reply buffer, which goes to a writer task that owns
//! the write half. Requests therefore run concurrently and may complete out
//! of order; a semaphore bounds how much work and memory one client holds.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::debug;

use super::exec::{execute, Command};
use super::export::Export;
use super::handshake::Negotiated;
use super::proto::*;
use super::reply::ReplyTo;
use super::request::{block_status_payload, payload_len, validate, Refusal};
use crate::block::ZeroFlags;

/// Budget of one connection, in units of one request plus one per MiB of
/// payload: at most this many requests, or ~this many MiB, in flight.
const INFLIGHT_UNITS: u32 = 128;
/// A payload this large is not drained for a refusal: the client is broken.
const MAX_DRAIN: u64 = 64 << 20;
const BUF_SIZE: usize = 256 << 10;

fn units(len: u64) -> u32 {
    1 + (len >> 20).min(INFLIGHT_UNITS as u64 / 2) as u32
}

/// Serves requests until the client disconnects, breaks the protocol, or
/// `shutdown` fires; in-flight requests always finish and are answered.
pub async fn run<R, W>(
    r: R,
    w: W,
    neg: Negotiated,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(write_replies(w, rx));
    let mut conn = Conn {
        r: BufReader::with_capacity(BUF_SIZE, r),
        export: neg.export,
        mode: neg.mode,
        contexts: neg.contexts,
        budget: Arc::new(Semaphore::new(INFLIGHT_UNITS as usize)),
        tx,
    };
    let result = tokio::select! {
        r = conn.serve() => r,
        _ = shutdown.wait_for(|stop| *stop) => Ok(()),
    };
    // Wait for every in-flight request: each holds budget until answered.
    let _ = conn.budget.acquire_many(INFLIGHT_UNITS).await;
    drop(conn);
    let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    result.and(written)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(BUF_SIZE, w);
    while let Some(buf) = rx.recv().await {
        w.write_all(&buf).await?;
        // Coalesce replies that are already waiting; flush when idle.
        while let Ok(buf) = rx.try_recv() {
            w.write_all(&buf).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

struct Conn<R> {
    r: BufReader<R>,
    export: Arc<Export>,
    mode: Mode,
    contexts: Vec<u32>,
    budget: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

enum Next {
    Continue,
    Disconnect,
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
        }
    }

    fn send(&self, buf: Vec<u8>) {
        // The writer only goes away when the socket is dead; the reader
        // finds out on its next read.
        let _ = self.tx.send(buf);
    }

    fn refuse(&self, req: &Request, r: Refusal) {
        debug!(cmd = cmd_name(req.kind), errno = r.errno, msg = %r.msg, "request refused");
        self.send(self.reply_to(req).error(r.errno, &r.msg));
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
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(units(plen.min(MAX_BLOCK as u64)))
            .await;
        let Ok(permit) = permit else {
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
                    self.refuse(&req, r);
                    return Ok(Next::Continue);
                }
            }
        }
        if req.kind != CMD_WRITE && req.kind != CMD_BLOCK_STATUS && plen > 0 {
            self.refuse(
                &req,
                Refusal {
                    errno: EINVAL,
                    msg: "unexpected payload".into(),
                },
            );
            return Ok(Next::Continue);
        }
        if let Err(r) = validate(&req, effect, &self.export, self.mode, self.contexts.len()) {
            self.refuse(&req, r);
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
        let export = self.export.clone();
        let to = self.reply_to(&req);
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let reply = execute(&export, to, cmd);
            let _ = tx.send(reply);
            drop(permit);
        });
        Ok(Next::Continue)
    }
}
