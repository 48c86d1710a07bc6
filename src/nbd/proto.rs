//! The NBD wire format, for both sides: magics, numbers, and the encoding of
//! every header. Values and layouts follow the NBD protocol document
//! (doc/proto.md, with the extended-headers extension) — nothing here knows
//! about images.

/// "NBDMAGIC": first word of the newstyle greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": greeting word and option-request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

pub fn is_rep_err(rep: u32) -> bool {
    rep & REP_ERR != 0
}

// NBD_REP_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const REQUEST_LEN: usize = 28;
pub const EXT_REQUEST_LEN: usize = 32;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXT_REPLY_LEN: usize = 32;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Errors (values are fixed by the protocol, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Block size constraints we advertise: qemu's (1, 4 KiB, 32 MiB).
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 32 << 20;
/// Most descriptors sent in one block-status chunk (qemu: 1 MiB / 8).
pub const MAX_EXTENTS: usize = (1 << 20) / 8;

/// Which headers the transmission phase uses; fixed by negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

/// A transmission-phase request header, either size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Parses a header of `mode`'s size. `None` when the magic is wrong: the
    /// stream cannot be resynchronised after that.
    pub fn parse(buf: &[u8], mode: Mode) -> Option<Request> {
        let magic = be32(buf, 0);
        let mut r = Request {
            flags: be16(buf, 4),
            kind: be16(buf, 6),
            cookie: be64(buf, 8),
            offset: be64(buf, 16),
            length: 0,
        };
        if mode == Mode::Extended {
            if magic != EXT_REQUEST_MAGIC {
                return None;
            }
            r.length = be64(buf, 24);
        } else {
            if magic != REQUEST_MAGIC {
                return None;
            }
            r.length = be32(buf, 24) as u64;
        }
        Some(r)
    }

    /// Appends the header in `mode`'s size (client side).
    pub fn encode(&self, mode: Mode, out: &mut Vec<u8>) {
        let ext = mode == Mode::Extended;
        put32(
            out,
            if ext {
                EXT_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            },
        );
        put16(out, self.flags);
        put16(out, self.kind);
        put64(out, self.cookie);
        put64(out, self.offset);
        if ext {
            put64(out, self.length);
        } else {
            put32(out, self.length as u32);
        }
    }
}

pub fn header_len(mode: Mode) -> usize {
    if mode == Mode::Extended {
        EXT_REQUEST_LEN
    } else {
        REQUEST_LEN
    }
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    put32(out, SIMPLE_REPLY_MAGIC);
    put32(out, error);
    put64(out, cookie);
}

/// Appends a structured (or, in extended mode, extended) chunk header for a
/// payload of `len` bytes. `offset` is the request's offset: extended
/// headers carry it, as qemu sends it.
pub fn chunk_header(
    out: &mut Vec<u8>,
    mode: Mode,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: usize,
) {
    if mode == Mode::Extended {
        put32(out, EXT_REPLY_MAGIC);
        put16(out, flags);
        put16(out, kind);
        put64(out, cookie);
        put64(out, offset);
        put64(out, len as u64);
    } else {
        put32(out, STRUCTURED_REPLY_MAGIC);
        put16(out, flags);
        put16(out, kind);
        put64(out, cookie);
        put32(out, len as u32);
    }
}

pub fn chunk_header_len(mode: Mode) -> usize {
    if mode == Mode::Extended {
        EXT_REPLY_LEN
    } else {
        STRUCTURED_REPLY_LEN
    }
}

/// The human name of a command, for logs and error messages.
pub fn cmd_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "<unknown>",
    }
}

/// The name qemu's server gives a command in its error messages.
pub fn qemu_cmd_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "<unknown>",
    }
}

// Big-endian helpers. Callers check lengths before reading.

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

pub fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Reads big-endian fields from an option payload, failing softly on
/// truncation so that a short option becomes NBD_REP_ERR_INVALID, never a
/// panic.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.remaining() < n {
            return None;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Some(s)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| be16(b, 0))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| be32(b, 0))
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| be64(b, 0))
    }

    /// A 32-bit length followed by that many bytes of UTF-8.
    pub fn string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.blob()?).ok()
    }

    /// A length-prefixed string whose bytes need not be UTF-8.
    pub fn blob(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_in_both_sizes() {
        for mode in [Mode::Structured, Mode::Extended] {
            let r = Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 7,
                offset: 1 << 40,
                length: 4096,
            };
            let mut buf = Vec::new();
            r.encode(mode, &mut buf);
            assert_eq!(buf.len(), header_len(mode));
            assert_eq!(Request::parse(&buf, mode), Some(r));
        }
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut buf = vec![0u8; EXT_REQUEST_LEN];
        buf[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        assert_eq!(Request::parse(&buf, Mode::Extended), None);
    }

    #[test]
    fn cursor_fails_softly_on_truncation() {
        let mut c = Cursor::new(&[0, 0, 0, 9, b'a']);
        assert_eq!(c.string(), None);
    }
}
