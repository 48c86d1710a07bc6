//! A deliberately dumb NBD client over a raw socket: the tests write every
//! handshake and request byte themselves (NetworkBlockDevice/nbd doc/proto.md),
//! so they can also write the wrong ones.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_READ_ONLY: u16 = 1 << 1;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_DF: u16 = 4;
pub const CMD_FLAG_REQ_ONE: u16 = 8;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

pub const MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// One reply to an option.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub rep_type: u32,
    pub data: Vec<u8>,
}

/// The outcome of one transmission-phase request, all chunks gathered.
#[derive(Debug, Default)]
pub struct Outcome {
    /// 0 on success, else the first error the server reported.
    pub error: u32,
    /// Whether the reply was a simple reply (vs structured chunks).
    pub simple: bool,
    /// (chunk type, payload) of each structured chunk, in arrival order.
    pub chunks: Vec<(u16, Vec<u8>)>,
    /// Data of a simple read reply, if the caller asked for it.
    pub data: Vec<u8>,
}

/// What `Conn::closed_by_server` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// EOF (or reset) after these bytes.
    Closed(Vec<u8>),
    /// The read timed out: the server kept the connection open.
    StillOpen(Vec<u8>),
}

pub struct Conn {
    pub s: UnixStream,
    next_cookie: u64,
}

impl Conn {
    pub fn new(s: UnixStream) -> Conn {
        Conn {
            s,
            next_cookie: 0x7d3e_0000_0000_0001,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to server");
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes from server: {e}"));
        v
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Read the server's greeting; return its handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let magic = self.recv(16);
        assert_eq!(&magic, b"NBDMAGICIHAVEOPT", "server greeting");
        self.u16()
    }

    pub fn client_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes());
    }

    /// Greeting plus client flags FIXED_NEWSTYLE | NO_ZEROES.
    pub fn start(&mut self) {
        let hflags = self.greeting();
        assert_eq!(
            hflags & 3,
            3,
            "server must offer FIXED_NEWSTYLE and NO_ZEROES"
        );
        self.client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    /// Send an option header with `declared_len` and then `data` (which may
    /// be shorter or longer than declared, on purpose).
    pub fn option_with_len(&mut self, opt: u32, declared_len: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&declared_len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        self.option_with_len(opt, data.len() as u32, data);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let magic = self.u64();
        assert_eq!(magic, OPT_REPLY_MAGIC, "option reply magic");
        let option = self.u32();
        let rep_type = self.u32();
        let len = self.u32();
        assert!(len <= 64 * 1024, "option reply of {len} bytes");
        let data = self.recv(len as usize);
        OptReply {
            option,
            rep_type,
            data,
        }
    }

    /// NBD_OPT_STRUCTURED_REPLY, which must be acked.
    pub fn structured_replies(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        let r = self.opt_reply();
        assert_eq!(
            (r.option, r.rep_type),
            (OPT_STRUCTURED_REPLY, REP_ACK),
            "STRUCTURED_REPLY reply: {r:?}"
        );
    }

    /// NBD_OPT_SET_META_CONTEXT for `name` on `export`; returns the replies
    /// before the final ACK.
    pub fn set_meta_context(&mut self, export: &str, names: &[&str]) -> Vec<OptReply> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for n in names {
            d.extend_from_slice(&(n.len() as u32).to_be_bytes());
            d.extend_from_slice(n.as_bytes());
        }
        self.option(OPT_SET_META_CONTEXT, &d);
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            if r.rep_type == REP_ACK {
                return out;
            }
            assert_eq!(r.rep_type, REP_META_CONTEXT, "SET_META_CONTEXT reply {r:?}");
            out.push(r);
        }
    }

    /// Send NBD_OPT_GO (or INFO) for `export`, requesting BLOCK_SIZE info, and
    /// collect replies up to the final one (ACK or an error).
    pub fn go_replies(&mut self, opt: u32, export: &str) -> Vec<OptReply> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.option(opt, &d);
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, opt, "reply to option {opt} names {}", r.option);
            let last = r.rep_type == REP_ACK || r.rep_type & REP_FLAG_ERROR != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// NBD_OPT_GO that must succeed; returns (size, transmission flags).
    pub fn go(&mut self, export: &str) -> (u64, u16) {
        let replies = self.go_replies(OPT_GO, export);
        let last = replies.last().unwrap();
        assert_eq!(last.rep_type, REP_ACK, "GO {export:?} failed: {replies:?}");
        let mut export_info = None;
        for r in &replies {
            if r.rep_type == REP_INFO && r.data.len() >= 2 {
                let kind = u16::from_be_bytes([r.data[0], r.data[1]]);
                if kind == INFO_EXPORT {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                    let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                    export_info = Some((size, flags));
                }
            }
        }
        export_info.unwrap_or_else(|| panic!("GO reply without NBD_INFO_EXPORT: {replies:?}"))
    }

    /// Full handshake: flags, structured replies, GO. Returns (size, flags).
    pub fn open(&mut self, export: &str) -> (u64, u16) {
        self.start();
        self.structured_replies();
        self.go(export)
    }

    pub fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// Read one whole reply (a simple reply, or structured chunks up to DONE)
    /// for `cookie`. For a simple reply to a successful read, `simple_read_len`
    /// bytes of data follow and are read into `data`.
    pub fn reply(&mut self, cookie: u64, simple_read_len: usize) -> Outcome {
        let mut out = Outcome::default();
        loop {
            let magic = self.u32();
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = self.u32();
                    let c = self.u64();
                    assert_eq!(c, cookie, "simple reply cookie");
                    out.simple = true;
                    out.error = error;
                    if error == 0 && simple_read_len > 0 {
                        out.data = self.recv(simple_read_len);
                    }
                    return out;
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = self.u16();
                    let typ = self.u16();
                    let c = self.u64();
                    let len = self.u32();
                    assert_eq!(c, cookie, "structured reply cookie");
                    assert!(len <= MAX_BLOCK + 1024, "structured chunk of {len} bytes");
                    let payload = self.recv(len as usize);
                    if (typ == REPLY_TYPE_ERROR || typ == REPLY_TYPE_ERROR_OFFSET) && out.error == 0
                    {
                        assert!(payload.len() >= 6, "error chunk too short: {payload:?}");
                        out.error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                        assert_ne!(out.error, 0, "error chunk with error 0");
                    }
                    out.chunks.push((typ, payload));
                    if flags & REPLY_FLAG_DONE != 0 {
                        return out;
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    /// Send one request (with `payload` for writes) and read its reply.
    pub fn call(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> Outcome {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.request(flags, typ, cookie, offset, len);
        self.send(payload);
        let read_len = if typ == CMD_READ { len as usize } else { 0 };
        self.reply(cookie, read_len)
    }

    /// A read that must succeed; returns the bytes (assembled from chunks).
    pub fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let out = self.call(0, CMD_READ, offset, len, &[]);
        assert_eq!(out.error, 0, "read {offset}+{len} failed: {out:?}");
        if out.simple {
            return out.data;
        }
        let mut buf = vec![0xeeu8; len as usize];
        let mut covered = 0u64;
        for (typ, p) in &out.chunks {
            match *typ {
                REPLY_TYPE_OFFSET_DATA => {
                    let off = u64::from_be_bytes(p[0..8].try_into().unwrap());
                    let data = &p[8..];
                    let start = (off - offset) as usize;
                    buf[start..start + data.len()].copy_from_slice(data);
                    covered += data.len() as u64;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let off = u64::from_be_bytes(p[0..8].try_into().unwrap());
                    let hlen = u32::from_be_bytes(p[8..12].try_into().unwrap());
                    let start = (off - offset) as usize;
                    buf[start..start + hlen as usize].fill(0);
                    covered += u64::from(hlen);
                }
                REPLY_TYPE_NONE => {}
                t => panic!("unexpected chunk type {t} in read reply"),
            }
        }
        assert_eq!(covered, u64::from(len), "read chunks cover the request");
        buf
    }

    /// Wait (up to the socket's read timeout) for the server to close the
    /// connection; collect whatever it sent before.
    pub fn ending(&mut self) -> Ending {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return Ending::Closed(got),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() > 1 << 20 {
                        return Ending::StillOpen(got);
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ending::Closed(got),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return Ending::StillOpen(got)
                }
                Err(e) => panic!("reading from server: {e}"),
            }
        }
    }
}
