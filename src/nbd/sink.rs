//! Where replies go: the socket, written directly by the thread that
//! finished the request.
//!
//! Handing each reply to an async writer task costs a thread wake-up per
//! request; at tens of thousands of requests a second that is most of the
//! cost. So the blocking-pool thread that produced a reply writes it
//! itself, with a non-blocking write. Replies queue behind the one being
//! written, so they never interleave and no thread waits for another.
//! When the socket is full, the rest of the queue goes to an async task
//! that waits for room: a client that stops reading holds its own budget
//! (each queued reply keeps its in-flight permit), never a pool thread.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::Shutdown;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;

use super::budget::Charge;

/// How long the queue may wait for the client to make room, without any
/// progress, before the connection is declared dead.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// A reply waiting to be written, with the budget it holds until then.
struct Pending {
    buf: Vec<u8>,
    written: usize,
    _charge: Charge,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// Someone (a pool thread or the drain task) is writing the queue.
    writing: bool,
    dead: bool,
}

pub struct ReplySink {
    fd: AsyncFd<OwnedFd>,
    queue: Mutex<Queue>,
    rt: Handle,
}

enum Progress {
    Done,
    Full,
    Dead,
}

impl ReplySink {
    /// Wraps a duplicate of the connection's (non-blocking) socket. Must be
    /// called inside the runtime.
    pub fn new(socket: impl AsFd) -> io::Result<Arc<ReplySink>> {
        let fd = rustix::io::fcntl_dupfd_cloexec(socket, 0)?;
        // SAFETY: the OwnedFd is ours alone, valid, and neither closed nor
        // replaced while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE)? };
        Ok(Arc::new(ReplySink {
            fd,
            queue: Mutex::new(Queue::default()),
            rt: Handle::current(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one reply and, unless someone else is writing, writes the
    /// queue until it is empty or the socket is full. Never blocks.
    pub fn send(self: &Arc<Self>, buf: Vec<u8>, mut charge: Charge) {
        // Every request gets a reply: an empty one would be none at all.
        debug_assert!(!buf.is_empty(), "an empty reply");
        charge.settle(buf.len());
        let mut q = self.lock();
        if q.dead {
            return;
        }
        q.pending.push_back(Pending {
            buf,
            written: 0,
            _charge: charge,
        });
        if q.writing {
            return;
        }
        q.writing = true;
        drop(q);
        if let Progress::Full = self.write_queue() {
            let me = self.clone();
            self.rt.spawn(async move { me.drain().await });
        }
    }

    /// Writes queued replies until the queue is empty (and gives up the
    /// writer role), the socket is full (keeps it), or the socket died.
    fn write_queue(&self) -> Progress {
        let mut q = self.lock();
        loop {
            let Some(head) = q.pending.front_mut() else {
                q.writing = false;
                return Progress::Done;
            };
            match rustix::io::write(self.fd.get_ref(), &head.buf[head.written..]) {
                Ok(n) => {
                    head.written += n;
                    if head.written == head.buf.len() {
                        q.pending.pop_front();
                    }
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Progress::Full,
                Err(e) => {
                    tracing::debug!(error = %e, "reply not sent");
                    self.kill(&mut q);
                    return Progress::Dead;
                }
            }
        }
    }

    /// Holds the writer role until the queue is empty, waiting for room.
    async fn drain(self: Arc<Self>) {
        loop {
            let ready = tokio::time::timeout(STALL_LIMIT, self.fd.writable()).await;
            let mut guard = match ready {
                Ok(Ok(g)) => g,
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!("client stopped reading replies");
                    self.kill(&mut self.lock());
                    return;
                }
            };
            match self.write_queue() {
                Progress::Done | Progress::Dead => return,
                Progress::Full => guard.clear_ready(),
            }
        }
    }

    /// The client is gone: nothing more will be written.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Drops everything queued (returning its budget) and shuts the socket
    /// down both ways, so the reading side of the connection ends too.
    fn kill(&self, q: &mut Queue) {
        q.dead = true;
        q.writing = false;
        q.pending.clear();
        let _ = rustix::net::shutdown(self.fd.get_ref(), Shutdown::Both);
    }
}
