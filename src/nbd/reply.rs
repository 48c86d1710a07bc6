//! Building replies: simple or chunked, in the header size the connection
//! negotiated. Every reply is one buffer, so the writer sends it whole.

use super::proto::*;

/// The request a reply answers: what every header needs.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    pub mode: Mode,
    pub cookie: u64,
    pub offset: u64,
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
