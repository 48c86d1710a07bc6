//! Where replies go: the socket, written directly by the thread that
//! finished the request.
//!
//! Handing each reply to an async writer task costs a thread wake-up per
//! request; at tens of thousands of requests a second that is most of the
//! cost. Instead the blocking-pool thread that produced a reply writes it
//! whole, under a lock so replies never interleave. The socket stays
//! non-blocking (tokio owns it), so a full socket buffer is waited out with
//! poll(2), bounded so that a client that stops reading cannot pin a thread
//! forever.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::Shutdown;

/// How long a reply may wait for the client to make room, without any
/// progress, before the connection is declared dead.
const STALL_LIMIT: Duration = Duration::from_secs(60);

pub struct ReplySink {
    fd: OwnedFd,
    lock: Mutex<()>,
}

impl ReplySink {
    /// Wraps a duplicate of the connection's socket.
    pub fn new(socket: impl AsFd) -> io::Result<ReplySink> {
        let fd = rustix::io::fcntl_dupfd_cloexec(socket, 0)?;
        Ok(ReplySink {
            fd,
            lock: Mutex::new(()),
        })
    }

    /// Writes one whole reply. Blocks: call it from the blocking pool.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut off = 0;
        while off < buf.len() {
            match rustix::io::write(&self.fd, &buf[off..]) {
                Ok(n) => off += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => self.wait_writable()?,
                Err(e) => return Err(self.dead(e.into())),
            }
        }
        Ok(())
    }

    fn wait_writable(&self) -> io::Result<()> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::OUT)];
        let limit = Timespec {
            tv_sec: STALL_LIMIT.as_secs() as i64,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&limit)) {
            Ok(0) => Err(self.dead(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading replies",
            ))),
            Ok(_) | Err(Errno::INTR) => Ok(()),
            Err(e) => Err(self.dead(e.into())),
        }
    }

    /// Shuts the socket down both ways, so the reader side ends too.
    fn dead(&self, e: io::Error) -> io::Error {
        let _ = rustix::net::shutdown(&self.fd, Shutdown::Both);
        e
    }
}
