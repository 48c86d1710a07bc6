//! Building replies: simple or chunked, in the header size the connection
//! negotiated. Every reply is one [`Reply`], so the writer sends it whole.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use super::proto::*;
use super::splice::Piped;

/// The request a reply answers: what every header needs.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    pub mode: Mode,
    pub cookie: u64,
    pub offset: u64,
    /// The reply writer can move read data from pipes (a plain socket).
    pub splice: bool,
}

impl ReplyTo {
    /// A successful reply without data: a simple reply, or in extended mode
    /// (where simple replies are not allowed) a final NONE chunk.
    pub fn ok(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(EXT_REPLY_LEN);
        if self.mode == Mode::Extended {
            self.chunk(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        } else {
            simple_reply(&mut out, 0, self.cookie);
        }
        out
    }

    /// An error reply: a structured error chunk carrying `msg` where
    /// negotiated, else a simple reply with the code.
    pub fn error(&self, errno: u32, msg: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self.mode == Mode::Simple {
            simple_reply(&mut out, errno, self.cookie);
            return out;
        }
        let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
        self.chunk(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len());
        put32(&mut out, errno);
        put16(&mut out, msg.len() as u16);
        out.extend_from_slice(msg);
        out
    }

    /// Appends a chunk header for a payload of `len` bytes.
    pub fn chunk(&self, out: &mut Vec<u8>, flags: u16, kind: u16, len: usize) {
        chunk_header(out, self.mode, flags, kind, self.cookie, self.offset, len);
    }
}

/// A reply ready for the wire: bytes, and read data that may still be in
/// pipes (see [`super::splice`]), written in order.
pub struct Reply {
    parts: VecDeque<Part>,
    /// Bytes of the front part already written.
    written: usize,
    /// Some of it is on the wire: the rest must follow before anything else.
    started: bool,
}

enum Part {
    Bytes(Vec<u8>),
    Pipe(Piped),
}

impl From<Vec<u8>> for Reply {
    fn from(buf: Vec<u8>) -> Reply {
        Reply {
            parts: VecDeque::from([Part::Bytes(buf)]),
            written: 0,
            started: false,
        }
    }
}

impl Reply {
    pub fn new() -> Reply {
        Reply {
            parts: VecDeque::new(),
            written: 0,
            started: false,
        }
    }

    pub fn push_bytes(&mut self, b: Vec<u8>) {
        if !b.is_empty() {
            self.parts.push_back(Part::Bytes(b));
        }
    }

    pub fn push_pipe(&mut self, p: Piped) {
        self.parts.push_back(Part::Pipe(p));
    }

    /// Its length on the wire.
    pub fn len(&self) -> usize {
        let all: usize = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Bytes(b) => b.len(),
                Part::Pipe(p) => p.len(),
            })
            .sum();
        all - self.written
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether part of it has been written.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Writes to a non-blocking socket until all is out (`Ok`), the socket
    /// is full (AGAIN) or fails.
    pub fn write_to(&mut self, socket: BorrowedFd<'_>) -> Result<(), Errno> {
        while let Some(part) = self.parts.front_mut() {
            let done = match part {
                Part::Bytes(b) => {
                    if self.written < b.len() {
                        self.written += rustix::io::write(socket, &b[self.written..])?;
                        self.started = true;
                    }
                    self.written == b.len()
                }
                Part::Pipe(p) => {
                    if !p.is_empty() {
                        p.send_to(socket)?;
                        self.started = true;
                    }
                    p.is_empty()
                }
            };
            if done {
                self.parts.pop_front();
                self.written = 0;
            }
        }
        Ok(())
    }

    /// All of it as one buffer, for writers that cannot splice (TLS).
    pub fn into_bytes(self) -> Result<Vec<u8>, Errno> {
        let mut parts = self.parts.into_iter();
        let mut out = match parts.next() {
            Some(Part::Bytes(mut b)) => {
                b.drain(..self.written);
                b
            }
            Some(Part::Pipe(p)) => {
                let mut b = Vec::new();
                p.read_into(&mut b)?;
                b
            }
            None => return Ok(Vec::new()),
        };
        for part in parts {
            match part {
                Part::Bytes(b) => out.extend_from_slice(&b),
                Part::Pipe(p) => p.read_into(&mut out)?,
            }
        }
        Ok(out)
    }
}

impl Default for Reply {
    fn default() -> Reply {
        Reply::new()
    }
}
