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
/// pipes (see [`super::splice`]), written in order. Most replies are one
/// buffer, which costs no allocation beyond it.
#[derive(Default)]
pub struct Reply {
    /// Written first: a whole reply, or the head of one.
    head: Vec<u8>,
    /// Bytes of `head` already written.
    written: usize,
    /// What follows `head`, in order.
    rest: VecDeque<Part>,
    /// Some of it is on the wire: the rest must follow before anything else.
    started: bool,
}

enum Part {
    /// Bytes, and how many of them are written.
    Bytes(Vec<u8>, usize),
    Pipe(Piped),
}

impl From<Vec<u8>> for Reply {
    fn from(head: Vec<u8>) -> Reply {
        Reply {
            head,
            ..Reply::default()
        }
    }
}

impl Reply {
    pub fn new() -> Reply {
        Reply::default()
    }

    pub fn push_bytes(&mut self, b: Vec<u8>) {
        if self.head.is_empty() && self.rest.is_empty() {
            self.head = b;
        } else if !b.is_empty() {
            self.rest.push_back(Part::Bytes(b, 0));
        }
    }

    pub fn push_pipe(&mut self, p: Piped) {
        self.rest.push_back(Part::Pipe(p));
    }

    /// Its length on the wire (what is left of it).
    pub fn len(&self) -> usize {
        let rest: usize = self
            .rest
            .iter()
            .map(|p| match p {
                Part::Bytes(b, at) => b.len() - at,
                Part::Pipe(p) => p.len(),
            })
            .sum();
        self.head.len() - self.written + rest
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
        while self.written < self.head.len() {
            self.written += rustix::io::write(socket, &self.head[self.written..])?;
            self.started = true;
        }
        while let Some(part) = self.rest.front_mut() {
            match part {
                Part::Bytes(b, at) => {
                    while *at < b.len() {
                        *at += rustix::io::write(socket, &b[*at..])?;
                        self.started = true;
                    }
                }
                Part::Pipe(p) => {
                    while !p.is_empty() {
                        p.send_to(socket)?;
                        self.started = true;
                    }
                }
            }
            self.rest.pop_front();
        }
        Ok(())
    }

    /// All of it as one buffer, for writers that cannot splice (TLS).
    pub fn into_bytes(self) -> Result<Vec<u8>, Errno> {
        let mut out = self.head;
        out.drain(..self.written);
        for part in self.rest {
            match part {
                Part::Bytes(b, at) => out.extend_from_slice(&b[at..]),
                Part::Pipe(p) => p.read_into(&mut out)?,
            }
        }
        Ok(out)
    }
}
