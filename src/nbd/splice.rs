//! Read data that goes from the page cache to the socket without being
//! copied by us: a pool thread moves the pages into a pipe (splice, which
//! may wait on the disk), the reply writer moves them on to the socket
//! (which never waits on the disk: the pages are already there). On a
//! sparse pull that is most of the server's CPU (see benches/README.md).
//!
//! Pipes are kept for reuse, and their number is bounded, so descriptors
//! and pinned pages stay within what the budget already allows; when none
//! is to be had the read is simply copied.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rustix::io::Errno;
use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice};
use rustix::pipe::{PipeFlags, SpliceFlags};

use crate::block::{BlockNode, BlockResult};

/// Data chunks shorter than this are copied: the pipe costs more than the
/// copy (measured: 64 KiB chunks spliced take a third off a sparse pull).
pub const SPLICE_MIN: u64 = 64 << 10;
/// Pipes alive at once (two descriptors each), pooled or holding data.
const MAX_PIPES: usize = 256;
/// Empty pipes kept for reuse.
const POOL_MAX: usize = 32;
/// The largest pipe asked for: the default `/proc/sys/fs/pipe-max-size`.
const PIPE_MAX: usize = 1 << 20;
/// One read spread over more pipes than this is copied instead.
const PIPES_PER_READ: usize = 64;

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    size: usize,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);

impl Pipe {
    /// An empty pipe from the pool or a new one, grown towards `want`
    /// bytes (pages: an unaligned read spans one more); `None` when the
    /// pipe count is at its bound or pipes cannot be made.
    fn take(want: usize) -> Option<Pipe> {
        let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut pipe = match pooled {
            Some(p) => p,
            None => Pipe::new()?,
        };
        let want = (want + 8192).next_power_of_two().min(PIPE_MAX);
        if pipe.size < want {
            // Refused past the user's pipe limits: a smaller pipe still serves.
            if let Ok(size) = fcntl_setpipe_size(&pipe.w, want) {
                pipe.size = size;
            }
        }
        Some(pipe)
    }

    fn new() -> Option<Pipe> {
        if LIVE.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
            Ok((r, w)) => {
                let size = fcntl_getpipe_size(&w).unwrap_or(4096);
                Some(Pipe { r, w, size })
            }
            Err(_) => {
                LIVE.fetch_sub(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Back to the pool once empty; closed if the pool is full.
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Data waiting in a pipe for the socket.
pub struct Piped {
    pipe: Option<Pipe>,
    left: usize,
}

impl Piped {
    pub fn len(&self) -> usize {
        self.left
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// Moves what the (non-blocking) socket takes: the bytes moved, or
    /// AGAIN when it is full. Pages that went away under the pipe (an
    /// outside write invalidated them) cannot be sent: IO.
    pub fn send_to(&mut self, socket: BorrowedFd<'_>) -> Result<usize, Errno> {
        let Some(pipe) = &self.pipe else {
            return Ok(0);
        };
        let n = splice(
            &pipe.r,
            None,
            socket,
            None,
            self.left,
            SpliceFlags::NONBLOCK,
        )?;
        if n == 0 {
            return Err(Errno::IO);
        }
        self.left -= n;
        if self.left == 0 {
            if let Some(p) = self.pipe.take() {
                p.give_back();
            }
        }
        Ok(n)
    }

    /// Appends the data to `out` (for writers that cannot splice: TLS).
    /// The pages are in memory: reading them never waits on the disk.
    pub fn read_into(mut self, out: &mut Vec<u8>) -> Result<(), Errno> {
        let Some(pipe) = self.pipe.take() else {
            return Ok(());
        };
        let end = out.len() + self.left;
        out.reserve(self.left);
        while out.len() < end {
            match rustix::io::read(&pipe.r, rustix::buffer::spare_capacity(out)) {
                Ok(0) => return Err(Errno::IO),
                Ok(_) => {}
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        // The pipe held exactly this reply's data: it is empty now.
        pipe.give_back();
        Ok(())
    }
}

/// `len` bytes of `node` at `offset` in pipes, in order; `None` when the
/// node cannot move its pages or pipes are short: then copy the data.
pub fn read(node: &dyn BlockNode, offset: u64, len: usize) -> BlockResult<Option<Vec<Piped>>> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        if out.len() == PIPES_PER_READ {
            return Ok(None);
        }
        let Some(pipe) = Pipe::take(len - done) else {
            return Ok(None);
        };
        let n = match node.read_to_pipe(pipe.w.as_fd(), offset + done as u64, len - done) {
            Ok(Some(n)) if n > 0 => n,
            // Nothing moved: the pipe is still empty.
            Ok(_) => {
                pipe.give_back();
                return Ok(None);
            }
            // A pipe holding part of the data is closed, not reused.
            Err(e) => return Err(e),
        };
        out.push(Piped {
            pipe: Some(pipe),
            left: n,
        });
        done += n;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::file::FileNode;

    #[test]
    fn unaligned_reads_past_eof_come_out_whole_and_pipes_are_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..(3 << 20) + 100).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let node = FileNode::open(&path, true).expect("open");
        // Unaligned, across pipes, and past EOF into the sector padding.
        let (off, len) = (4095u64, (3 << 20) - 4095 + 412);
        let pipes = read(&node, off, len).expect("read").expect("pipes");
        let mut out = Vec::new();
        for p in pipes {
            p.read_into(&mut out).expect("drain");
        }
        let mut want = data[off as usize..].to_vec();
        want.resize(len, 0);
        assert_eq!(out.len(), want.len());
        assert!(out == want, "the piped data differs");
        let live = LIVE.load(Ordering::Relaxed);
        let again = read(&node, 0, 4096).expect("read").expect("pipes");
        assert_eq!(
            LIVE.load(Ordering::Relaxed),
            live,
            "a pooled pipe is reused"
        );
        drop(again);
    }
}
