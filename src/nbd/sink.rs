//! Where replies go: the socket, written directly by the thread that
//! finished the request.
//!
//! Handing each reply to an async writer task costs a thread wake-up per
//! request; at tens of thousands of requests a second that is most of the
//! cost. So on a plain socket the thread that produced a reply (an I/O
//! thread, or the reader for a request done inline) writes it itself, with
//! a non-blocking write. Replies queue behind
//! the one being written, so they never interleave and no thread waits for
//! another. When the socket is full, the rest of the queue goes to an async
//! task that waits for room: a client that stops reading holds its own
//! budget (each queued reply keeps its in-flight permit), never an I/O
//! thread. Read data may wait in pipes (see [`super::splice`]): moving it
//! on to the socket is as non-blocking as a write. A block-status reply
//! goes ahead of replies not yet begun ([`ReplySink::send_first`]).
//!
//! A TLS connection cannot be written that way: its records are made by
//! one openssl session, which the reading side shares. There a writer task
//! owns the write half and takes whatever has queued each time it wakes,
//! so a burst of replies costs one wake-up.
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::Shutdown;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::budget::Charge;
use super::reply::Reply;

/// How long the queue may wait for the client to make room, without any
/// progress, before the connection is declared dead.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// The send buffer asked for on a unix socket; the kernel doubles it, to
/// 2 MiB: a connection's whole share of replies (see [`super::budget`])
/// goes in one write. The default (208 KiB) is less than one 256 KiB read
/// reply, and a unix socket wakes its writer only once the client has read
/// three quarters of it: writer and client take turns instead of running
/// side by side, and several connections on a few cores spend their time
/// switching between them. Measured on 2 cores, a 1 GiB pull (nbdcopy to
/// null) over 2 connections: 0.44 s before, 0.35 s after (medians of 6),
/// server CPU 0.43 to 0.35 s, context switches about halved on both sides.
/// The cost: a client that stops reading pins up to 2 MiB in the kernel
/// besides its share. TCP keeps the kernel's own sizing (setting a size
/// turns autotuning off).
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// A reply waiting to be written, with the budget it holds until then.
struct Pending {
    reply: Reply,
    _charge: Charge,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// Someone (an I/O thread, the drain task, the writer task) is writing
    /// the queue, or has been told to.
    writing: bool,
    dead: bool,
    /// The connection is over: the writer task ends once the queue is out.
    closed: bool,
}

pub struct ReplySink {
    out: Out,
    queue: Mutex<Queue>,
    rt: Handle,
}

enum Out {
    /// A plain socket, written by whoever has a reply (see above).
    Socket(AsyncFd<OwnedFd>),
    /// A stream only its writer task writes; this wakes it.
    Task(Notify),
}

enum Progress {
    Done,
    Full,
    Dead,
}

/// Asks for [`UNIX_SEND_BUFFER`] on a unix socket; best effort (the
/// default works, only slower).
fn widen_send_buffer(socket: BorrowedFd<'_>) {
    use rustix::net::{sockopt, AddressFamily};
    if sockopt::socket_domain(socket).ok() != Some(AddressFamily::UNIX) {
        return;
    }
    if let Err(e) = sockopt::set_socket_send_buffer_size(socket, UNIX_SEND_BUFFER) {
        tracing::debug!(error = %e, "could not widen the socket's send buffer");
    }
}

impl ReplySink {
    /// Wraps a duplicate of the connection's (non-blocking) socket. Must be
    /// called inside the runtime.
    pub fn new(socket: impl AsFd) -> io::Result<Arc<ReplySink>> {
        let fd = rustix::io::fcntl_dupfd_cloexec(socket, 0)?;
        widen_send_buffer(fd.as_fd());
        // SAFETY: the OwnedFd is ours alone, valid, and neither closed nor
        // replaced while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE)? };
        Ok(Arc::new(ReplySink {
            out: Out::Socket(fd),
            queue: Mutex::new(Queue::default()),
            rt: Handle::current(),
        }))
    }

    /// A sink whose replies a task writes to `w` (the write half of a TLS
    /// stream). `socket` is the connection's descriptor, shut down when
    /// the client stops reading; `w` keeps it open. Must be called inside
    /// the runtime; [`ReplySink::close`] ends the task.
    pub fn with_writer<W>(w: W, socket: RawFd) -> Arc<ReplySink>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // SAFETY: `w` owns the descriptor and is alive here.
        widen_send_buffer(unsafe { BorrowedFd::borrow_raw(socket) });
        let sink = Arc::new(ReplySink {
            out: Out::Task(Notify::new()),
            queue: Mutex::new(Queue::default()),
            rt: Handle::current(),
        });
        sink.rt.spawn(sink.clone().write_task(w, socket));
        sink
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one reply and, unless someone else is writing, writes the
    /// queue until it is empty or the socket is full. Never blocks.
    pub fn send(self: &Arc<Self>, reply: impl Into<Reply>, charge: Charge) {
        self.queue(reply.into(), charge, false)
    }

    /// As [`ReplySink::send`], but ahead of the queued replies not yet
    /// begun: for a small reply the client waits on before it asks for
    /// more (block status, while read data fills the socket). Replies may
    /// come in any order; the chunks of one reply may not, so never for a
    /// piece of a streamed read.
    pub fn send_first(self: &Arc<Self>, reply: impl Into<Reply>, charge: Charge) {
        self.queue(reply.into(), charge, true)
    }

    fn queue(self: &Arc<Self>, reply: Reply, mut charge: Charge, first: bool) {
        // Every request gets a reply: an empty one would be none at all.
        debug_assert!(!reply.is_empty(), "an empty reply");
        charge.settle(reply.len());
        let mut q = self.lock();
        if q.dead {
            return;
        }
        let p = Pending {
            reply,
            _charge: charge,
        };
        if first {
            let begun = q.pending.front().is_some_and(|h| h.reply.started());
            q.pending.insert(usize::from(begun), p);
        } else {
            q.pending.push_back(p);
        }
        if q.writing {
            return;
        }
        q.writing = true;
        drop(q);
        let fd = match &self.out {
            Out::Socket(fd) => fd,
            Out::Task(wake) => return wake.notify_one(),
        };
        if let Progress::Full = self.write_queue(fd) {
            let me = self.clone();
            self.rt.spawn(async move { me.drain().await });
        }
    }

    /// The connection is done: once what is queued is written, the writer
    /// task (if any) says goodbye to the client and ends.
    pub fn close(&self) {
        self.lock().closed = true;
        if let Out::Task(wake) = &self.out {
            wake.notify_one();
        }
    }

    /// The writer of a stream sink: writes every reply queued since it
    /// last looked, in order, until closed or the client is gone.
    async fn write_task<W: AsyncWrite + Unpin>(self: Arc<Self>, mut w: W, socket: RawFd) {
        let Out::Task(wake) = &self.out else {
            return;
        };
        loop {
            let batch = {
                let mut q = self.lock();
                if q.pending.is_empty() {
                    q.writing = false;
                    if q.closed || q.dead {
                        break;
                    }
                    None
                } else {
                    Some(std::mem::take(&mut q.pending))
                }
            };
            let Some(batch) = batch else {
                wake.notified().await;
                continue;
            };
            // Each reply's budget returns once it is written (`p` drops);
            // the flush sends what the stream still buffers. Either may
            // wait for the client, never longer than the stall limit.
            let mut sent = true;
            for p in batch {
                // Never piped (see splices), but a pipe would be read out.
                let Ok(buf) = p.reply.into_bytes() else {
                    sent = false;
                    break;
                };
                sent = matches!(
                    tokio::time::timeout(STALL_LIMIT, w.write_all(&buf)).await,
                    Ok(Ok(()))
                );
                if !sent {
                    break;
                }
            }
            if !sent
                || !matches!(
                    tokio::time::timeout(STALL_LIMIT, w.flush()).await,
                    Ok(Ok(()))
                )
            {
                tracing::debug!("reply not sent");
                // SAFETY: `w` owns the socket and is alive here.
                let fd = unsafe { BorrowedFd::borrow_raw(socket) };
                self.kill(&mut self.lock(), fd);
                return;
            }
        }
        let _ = tokio::time::timeout(STALL_LIMIT, w.shutdown()).await;
    }

    /// Writes queued replies until the queue is empty (and gives up the
    /// writer role), the socket is full (keeps it), or the socket died.
    fn write_queue(&self, fd: &AsyncFd<OwnedFd>) -> Progress {
        let mut q = self.lock();
        loop {
            let Some(head) = q.pending.front_mut() else {
                q.writing = false;
                return Progress::Done;
            };
            match head.reply.write_to(fd.get_ref().as_fd()) {
                Ok(()) => {
                    q.pending.pop_front();
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Progress::Full,
                Err(e) => {
                    tracing::debug!(error = %e, "reply not sent");
                    self.kill(&mut q, fd.get_ref().as_fd());
                    return Progress::Dead;
                }
            }
        }
    }

    /// Holds the writer role until the queue is empty, waiting for room.
    async fn drain(self: Arc<Self>) {
        let Out::Socket(fd) = &self.out else {
            return;
        };
        loop {
            let ready = tokio::time::timeout(STALL_LIMIT, fd.writable()).await;
            let mut guard = match ready {
                Ok(Ok(g)) => g,
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!("client stopped reading replies");
                    self.kill(&mut self.lock(), fd.get_ref().as_fd());
                    return;
                }
            };
            match self.write_queue(fd) {
                Progress::Done | Progress::Dead => return,
                Progress::Full => guard.clear_ready(),
            }
        }
    }

    /// Whether replies may carry read data in pipes: only a plain socket
    /// takes them without a copy.
    pub fn splices(&self) -> bool {
        matches!(self.out, Out::Socket(_))
    }

    /// The client is gone: nothing more will be written.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Drops everything queued (returning its budget) and shuts the socket
    /// down both ways, so the reading side of the connection ends too.
    fn kill(&self, q: &mut Queue, socket: BorrowedFd<'_>) {
        q.dead = true;
        q.writing = false;
        q.pending.clear();
        let _ = rustix::net::shutdown(socket, Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::file::FileNode;
    use crate::nbd::budget::{Pool, MIN_POOL};
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_sent_first_overtakes_only_replies_not_begun() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![b'a'; 1 << 20]).expect("write");
        let node = FileNode::open(&path, true).expect("open");
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let sink = ReplySink::new(&ours).expect("sink");
        // Far less than a reply (set after the sink's own size): the first
        // one is begun, not finished.
        rustix::net::sockopt::set_socket_send_buffer_size(&ours, 64 << 10).expect("sndbuf");
        let budget = Pool::new(MIN_POOL).connection();
        let charge = || budget.charge(0);

        let mut first = Reply::new();
        first.push_bytes(b"A".to_vec());
        let pipes = crate::nbd::splice::read(&node, 0, 1 << 20)
            .expect("read")
            .expect("pipes");
        for p in pipes {
            first.push_pipe(p);
        }
        sink.send(first, charge().await.expect("charge"));
        sink.send(vec![b'B'; 1 << 20], charge().await.expect("charge"));
        sink.send_first(b"C".to_vec(), charge().await.expect("charge"));

        let total = 1 + (1 << 20) + (1 << 20) + 1;
        let got = tokio::task::spawn_blocking(move || {
            let mut v = vec![0u8; total];
            theirs.read_exact(&mut v).map(|_| v)
        })
        .await
        .expect("join")
        .expect("read");
        assert_eq!(got[0], b'A');
        assert!(got[1..1 + (1 << 20)].iter().all(|&b| b == b'a'));
        assert_eq!(got[1 + (1 << 20)], b'C', "C goes ahead of B, not into A");
        assert!(got[2 + (1 << 20)..].iter().all(|&b| b == b'B'));
    }
}
