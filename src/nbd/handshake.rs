//! The fixed-newstyle handshake, server side: one function per option.
//!
//! The handshake ends in one of three ways: the client picks an export
//! (GO or EXPORT_NAME) and we move to transmission, the client aborts, or
//! the client breaks the protocol and we close. An option we do not know,
//! or one that is malformed, gets an error reply and the haggling goes on.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::context::{select, MetaContext};
use super::export::{Export, ExportTable};
use super::proto::*;

/// Largest option payload we read into memory; larger ones are drained and
/// refused, absurd ones end the connection.
const MAX_OPTION: u32 = 64 << 10;
const MAX_DRAINED_OPTION: u32 = 16 << 20;

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no credentials: STARTTLS is refused.
    Off,
    /// Every option but STARTTLS is refused until the client starts TLS.
    Required,
    /// The options now travel inside TLS.
    Established,
}

/// How the plaintext part of a handshake ended.
pub enum Outcome {
    Export(Negotiated),
    /// The client asked for TLS and was told yes: the caller runs the TLS
    /// handshake, then [`negotiate_tls`] goes on inside it.
    StartTls(Resume),
}

/// What the client said before TLS that still holds after it.
pub struct Resume {
    no_zeroes: bool,
}

/// The outcome of a successful handshake.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub mode: Mode,
    /// Selected context IDs, in ID order.
    pub contexts: Vec<u32>,
}

/// Why the handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeEnd {
    #[error("client aborted the handshake")]
    Aborted,
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

type Result<T> = std::result::Result<T, HandshakeEnd>;

fn violation<T>(msg: impl Into<String>) -> Result<T> {
    Err(HandshakeEnd::Violation(msg.into()))
}

struct Haggle<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
    exports: &'a ExportTable,
    tls: Tls,
    mode: Mode,
    no_zeroes: bool,
    /// The last SET_META_CONTEXT: which export it named and what it chose.
    selection: Option<(String, Vec<u32>)>,
}

/// Runs the server side of the handshake on a fresh connection; `tls` is
/// [`Tls::Off`] or [`Tls::Required`].
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &ExportTable,
    tls: Tls,
) -> Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    put64(&mut greeting, NBDMAGIC);
    put64(&mut greeting, IHAVEOPT);
    put16(&mut greeting, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    w.write_all(&greeting).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return violation(format!("unknown client flags {client_flags:#x}"));
    }
    let mut h = Haggle {
        r,
        w,
        exports,
        tls,
        mode: Mode::Simple,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        selection: None,
    };
    loop {
        if tls == Tls::Required {
            if h.before_tls().await? {
                return Ok(Outcome::StartTls(Resume {
                    no_zeroes: h.no_zeroes,
                }));
            }
        } else if let Some(done) = h.option().await? {
            return Ok(Outcome::Export(done));
        }
    }
}

/// The rest of a handshake after STARTTLS, inside TLS: the options start
/// afresh (nothing the client said in plaintext counts but its flags).
pub async fn negotiate_tls<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &ExportTable,
    resume: Resume,
) -> Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut h = Haggle {
        r,
        w,
        exports,
        tls: Tls::Established,
        mode: Mode::Simple,
        no_zeroes: resume.no_zeroes,
        selection: None,
    };
    loop {
        if let Some(done) = h.option().await? {
            return Ok(done);
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Haggle<'_, R, W> {
    /// An option's header: the option and its payload length.
    async fn head(&mut self) -> Result<(u32, u32)> {
        let mut head = [0u8; 16];
        self.r.read_exact(&mut head).await?;
        if be64(&head, 0) != IHAVEOPT {
            return violation("bad option magic");
        }
        let (opt, len) = (be32(&head, 8), be32(&head, 12));
        debug!(option = opt_name(opt), len, tls = ?self.tls, "option");
        Ok((opt, len))
    }

    /// One option while TLS is required, answered as qemu does; true when
    /// the client may start TLS now.
    async fn before_tls(&mut self) -> Result<bool> {
        let (opt, len) = self.head().await?;
        // No reply can follow EXPORT_NAME: the connection ends.
        if opt == OPT_EXPORT_NAME {
            return violation(format!("Option {opt:#x} not permitted before TLS"));
        }
        if len > MAX_DRAINED_OPTION {
            return violation(format!("option of {len} bytes"));
        }
        self.drain(len).await?;
        if opt == OPT_STARTTLS {
            if len != 0 {
                let msg = "option 'starttls' has unexpected length";
                self.reply_err(opt, REP_ERR_INVALID, msg).await?;
                return violation(msg);
            }
            self.reply(opt, REP_ACK, &[]).await?;
            return Ok(true);
        }
        let msg = format!("Option {opt:#x} not permitted before TLS");
        self.reply_err(opt, REP_ERR_TLS_REQD, &msg).await?;
        if opt == OPT_ABORT {
            return Err(HandshakeEnd::Aborted);
        }
        Ok(false)
    }

    /// Reads and answers one option; `Some` when it ends the handshake.
    async fn option(&mut self) -> Result<Option<Negotiated>> {
        let (opt, len) = self.head().await?;
        if opt == OPT_EXPORT_NAME {
            return self.export_name(len).await.map(Some);
        }
        if len > MAX_OPTION {
            if len > MAX_DRAINED_OPTION {
                return violation(format!("option of {len} bytes"));
            }
            self.drain(len).await?;
            let msg = format!("option length {len} is too large");
            self.reply_err(opt, REP_ERR_TOO_BIG, &msg).await?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.r.read_exact(&mut data).await?;
        match opt {
            OPT_ABORT => {
                // Best effort: the client may already have gone.
                let _ = self.reply(opt, REP_ACK, &[]).await;
                Err(HandshakeEnd::Aborted)
            }
            OPT_LIST => self.list(opt, &data).await.map(|_| None),
            OPT_STARTTLS => {
                if !data.is_empty() {
                    return self.invalid_len(opt).await;
                }
                if self.tls == Tls::Established {
                    self.reply_err(opt, REP_ERR_INVALID, "TLS already enabled")
                        .await?;
                } else {
                    self.reply_err(opt, REP_ERR_POLICY, "TLS not configured")
                        .await?;
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info(opt, &data).await,
            OPT_STRUCTURED_REPLY => self
                .set_mode(opt, &data, Mode::Structured)
                .await
                .map(|_| None),
            OPT_EXTENDED_HEADERS => self
                .set_mode(opt, &data, Mode::Extended)
                .await
                .map(|_| None),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, &data).await.map(|_| None)
            }
            _ => {
                let msg = format!("Unsupported option {opt:#x} ({})", opt_name(opt));
                self.reply_err(opt, REP_ERR_UNSUP, &msg).await?;
                Ok(None)
            }
        }
    }

    async fn drain(&mut self, mut len: u32) -> Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        while len > 0 {
            let n = (len as usize).min(buf.len());
            self.r.read_exact(&mut buf[..n]).await?;
            len -= n as u32;
        }
        Ok(())
    }

    async fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
        let mut out = Vec::with_capacity(20 + data.len());
        put64(&mut out, OPT_REPLY_MAGIC);
        put32(&mut out, opt);
        put32(&mut out, kind);
        put32(&mut out, data.len() as u32);
        out.extend_from_slice(data);
        self.w.write_all(&out).await?;
        // Only the final reply of an option needs to reach the client now.
        if kind == REP_ACK || is_rep_err(kind) {
            self.w.flush().await?;
        }
        Ok(())
    }

    async fn reply_err(&mut self, opt: u32, kind: u32, msg: &str) -> Result<()> {
        debug!(option = opt_name(opt), msg, "option refused");
        self.reply(opt, kind, msg.as_bytes()).await
    }

    async fn invalid_len<T>(&mut self, opt: u32) -> Result<Option<T>> {
        let msg = format!("{} with unexpected payload", opt_name(opt));
        self.reply_err(opt, REP_ERR_INVALID, &msg).await?;
        Ok(None)
    }

    async fn list(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        if !data.is_empty() {
            return self.invalid_len::<()>(opt).await.map(|_| ());
        }
        for e in self.exports.all() {
            let mut d = Vec::new();
            put32(&mut d, e.name.len() as u32);
            d.extend_from_slice(e.name.as_bytes());
            if let Some(desc) = &e.description {
                d.extend_from_slice(desc.as_bytes());
            }
            self.reply(opt, REP_SERVER, &d).await?;
        }
        self.reply(opt, REP_ACK, &[]).await
    }

    async fn set_mode(&mut self, opt: u32, data: &[u8], mode: Mode) -> Result<()> {
        if !data.is_empty() {
            return self.invalid_len::<()>(opt).await.map(|_| ());
        }
        if self.mode == Mode::Extended {
            let (kind, msg) = if mode == Mode::Extended {
                (REP_ERR_INVALID, "extended headers already negotiated")
            } else {
                (
                    REP_ERR_EXT_HEADER_REQD,
                    "extended headers already negotiated",
                )
            };
            return self.reply_err(opt, kind, msg).await;
        }
        if self.mode == mode {
            return self
                .reply_err(opt, REP_ERR_INVALID, "structured reply already negotiated")
                .await;
        }
        self.mode = mode;
        self.reply(opt, REP_ACK, &[]).await
    }

    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.get(name)
    }

    async fn info(&mut self, opt: u32, data: &[u8]) -> Result<Option<Negotiated>> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut reqs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            Some((name, reqs))
        })();
        let Some((name, reqs)) = parsed.filter(|_| c.remaining() == 0) else {
            let msg = format!("{} with malformed payload", opt_name(opt));
            self.reply_err(opt, REP_ERR_INVALID, &msg).await?;
            return Ok(None);
        };
        if name.len() > MAX_STRING {
            self.reply_err(opt, REP_ERR_INVALID, "export name too long")
                .await?;
            return Ok(None);
        }
        let Some(export) = self.lookup(name) else {
            let msg = format!("export '{name}' not present");
            self.reply_err(opt, REP_ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        };
        if reqs.contains(&INFO_NAME) {
            let mut d = Vec::new();
            put16(&mut d, INFO_NAME);
            d.extend_from_slice(export.name.as_bytes());
            self.reply(opt, REP_INFO, &d).await?;
        }
        // qemu sends the description whenever there is one, asked or not.
        if let Some(desc) = &export.description {
            let mut d = Vec::new();
            put16(&mut d, INFO_DESCRIPTION);
            d.extend_from_slice(desc.as_bytes());
            self.reply(opt, REP_INFO, &d).await?;
        }
        // Block sizes are sent whether asked for or not, as qemu does.
        let mut d = Vec::new();
        put16(&mut d, INFO_BLOCK_SIZE);
        put32(&mut d, MIN_BLOCK);
        put32(&mut d, PREFERRED_BLOCK);
        put32(&mut d, MAX_BLOCK);
        self.reply(opt, REP_INFO, &d).await?;
        let mut d = Vec::new();
        put16(&mut d, INFO_EXPORT);
        put64(&mut d, export.size());
        put16(&mut d, export.flags(self.mode));
        self.reply(opt, REP_INFO, &d).await?;
        self.reply(opt, REP_ACK, &[]).await?;
        if opt == OPT_INFO {
            return Ok(None);
        }
        Ok(Some(self.finish(export)))
    }

    async fn export_name(&mut self, len: u32) -> Result<Negotiated> {
        if len as usize > MAX_STRING {
            return violation("export name too long");
        }
        let mut name = vec![0u8; len as usize];
        self.r.read_exact(&mut name).await?;
        if self.mode == Mode::Extended {
            return violation("NBD_OPT_EXPORT_NAME after extended headers");
        }
        let name = String::from_utf8_lossy(&name);
        let Some(export) = self.lookup(&name) else {
            return violation(format!("export '{name}' not present"));
        };
        let mut d = Vec::with_capacity(134);
        put64(&mut d, export.size());
        put16(&mut d, export.flags(self.mode));
        if !self.no_zeroes {
            d.extend_from_slice(&[0u8; 124]);
        }
        self.w.write_all(&d).await?;
        self.w.flush().await?;
        Ok(self.finish(export))
    }

    /// Enters transmission: the context selection counts only if it named
    /// this export.
    fn finish(&mut self, export: Arc<Export>) -> Negotiated {
        let contexts = match self.selection.take() {
            Some((name, ids)) if name == export.name => ids,
            _ => Vec::new(),
        };
        Negotiated {
            export,
            mode: self.mode,
            contexts,
        }
    }

    async fn meta_context(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection, even when it fails.
            self.selection = None;
        }
        // Only selecting needs structured replies; listing is harmless (qemu).
        if set && self.mode < Mode::Structured {
            let msg = format!(
                "request option '{}' when structured reply is not negotiated",
                opt_name(opt)
            );
            return self.reply_err(opt, REP_ERR_INVALID, &msg).await;
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.blob()?);
            }
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed.filter(|_| c.remaining() == 0) else {
            let msg = format!("{} with malformed payload", opt_name(opt));
            return self.reply_err(opt, REP_ERR_INVALID, &msg).await;
        };
        if name.len() > MAX_STRING || queries.iter().any(|q| q.len() > MAX_STRING) {
            return self
                .reply_err(opt, REP_ERR_INVALID, "string too long")
                .await;
        }
        let Some(export) = self.lookup(name) else {
            let msg = format!("export '{name}' not present");
            return self.reply_err(opt, REP_ERR_UNKNOWN, &msg).await;
        };
        let ids = select(&export.contexts, &queries, !set);
        for &id in &ids {
            let Some(ctx): Option<&dyn MetaContext> = export.contexts.get(id) else {
                continue;
            };
            let mut d = Vec::new();
            // LIST replies carry no usable ID; qemu sends 0.
            put32(&mut d, if set { id } else { 0 });
            d.extend_from_slice(ctx.name());
            self.reply(opt, REP_META_CONTEXT, &d).await?;
        }
        if set {
            self.selection = Some((name.to_owned(), ids));
        }
        self.reply(opt, REP_ACK, &[]).await
    }
}
