//! NBD client side: fixed-newstyle handshake with GO, structured replies or
//! extended headers, metadata contexts, and the transmission commands. One
//! request at a time; callers that want a pipeline open several clients.
//! With TLS credentials the client starts TLS before any other option, as
//! qemu's does. Used by tests now and by the pull client later.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio_openssl::SslStream;

use super::context::Descriptor;
use super::proto::*;
use crate::tls::TlsCreds;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused a request or option; `errno` is the NBD code
    /// (for options, the NBD_REP_ERR_* value).
    #[error("server error {errno}: {msg}")]
    Server { errno: u32, msg: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

type Result<T> = std::result::Result<T, ClientError>;

fn protocol<T>(msg: impl Into<String>) -> Result<T> {
    Err(ClientError::Protocol(msg.into()))
}

/// What to ask for during the handshake.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub export: String,
    /// Ask for extended headers (falls back to structured replies).
    pub extended_headers: bool,
    /// Contexts to select with SET_META_CONTEXT.
    pub meta_contexts: Vec<String>,
    /// Require TLS, with these client credentials.
    pub tls: Option<ClientTls>,
}

/// A client's TLS: credentials with endpoint=client, and the name the
/// server's certificate must carry (qemu's `tls-hostname`; none checked
/// when `None`, as qemu over a unix socket).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub creds: Arc<TlsCreds>,
    pub hostname: Option<String>,
}

/// The connection under the protocol: the socket, or TLS over it.
enum Link<S> {
    Plain(S),
    Tls(SslStream<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Link<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Link::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Link<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Link::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_flush(cx),
            Link::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An open connection in the transmission phase.
pub struct NbdClient<S> {
    io: BufReader<Link<S>>,
    mode: Mode,
    size: u64,
    flags: u16,
    contexts: Vec<(u32, String)>,
    cookie: u64,
}

impl NbdClient<tokio::net::UnixStream> {
    pub async fn connect_unix(path: &Path, opts: &ConnectOptions) -> Result<Self> {
        let s = tokio::net::UnixStream::connect(path).await?;
        Self::handshake(s, opts).await
    }
}

impl NbdClient<tokio::net::TcpStream> {
    pub async fn connect_tcp(addr: &str, opts: &ConnectOptions) -> Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut opts = opts.clone();
        if let Some(t) = opts.tls.as_mut() {
            // As qemu: the server's certificate is checked against the host
            // connected to, unless another name is given.
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            t.hostname.get_or_insert_with(|| host.to_owned());
        }
        Self::handshake(s, &opts).await
    }
}

/// One option reply: its type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// Reads the greeting and answers it: the start of every session.
    async fn greet(stream: S) -> Result<Self> {
        let mut io = BufReader::new(Link::Plain(stream));
        if io.read_u64().await? != NBDMAGIC || io.read_u64().await? != IHAVEOPT {
            return protocol("not a fixed-newstyle NBD server");
        }
        let sflags = io.read_u16().await?;
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return protocol("server is not fixed-newstyle");
        }
        let cflags = FLAG_C_FIXED_NEWSTYLE | (sflags & FLAG_NO_ZEROES) as u32;
        io.get_mut().write_u32(cflags).await?;
        Ok(NbdClient {
            io,
            mode: Mode::Simple,
            size: 0,
            flags: 0,
            contexts: Vec::new(),
            cookie: 0,
        })
    }

    pub async fn handshake(stream: S, opts: &ConnectOptions) -> Result<Self> {
        let mut c = Self::greet(stream).await?;
        if let Some(tls) = &opts.tls {
            c = c.start_tls(tls).await?;
        }
        if opts.extended_headers && c.simple_option(OPT_EXTENDED_HEADERS).await? {
            c.mode = Mode::Extended;
        }
        if c.mode == Mode::Simple && c.simple_option(OPT_STRUCTURED_REPLY).await? {
            c.mode = Mode::Structured;
        }
        if !opts.meta_contexts.is_empty() {
            let queries: Vec<&str> = opts.meta_contexts.iter().map(String::as_str).collect();
            c.contexts = c
                .meta_context(OPT_SET_META_CONTEXT, &opts.export, &queries)
                .await?;
        }
        c.go(&opts.export).await?;
        Ok(c)
    }

    /// STARTTLS, then the TLS handshake: every later byte is inside TLS.
    async fn start_tls(mut self, tls: &ClientTls) -> Result<Self> {
        self.send_option(OPT_STARTTLS, &[]).await?;
        let r = self.option_reply(OPT_STARTTLS).await?;
        if r.kind != REP_ACK {
            return Err(Self::option_error(&r));
        }
        // Nothing follows the ACK until we speak TLS: nothing is buffered.
        let Link::Plain(socket) = self.io.into_inner() else {
            return protocol("TLS started twice");
        };
        let tls_error = |e: String| ClientError::Protocol(format!("TLS handshake failed: {e}"));
        let ssl = tls
            .creds
            .session(tls.hostname.as_deref())
            .map_err(tls_error)?;
        let mut stream = SslStream::new(ssl, socket).map_err(|e| tls_error(e.to_string()))?;
        Pin::new(&mut stream)
            .connect()
            .await
            .map_err(|e| tls_error(e.to_string()))?;
        self.io = BufReader::new(Link::Tls(stream));
        Ok(self)
    }

    async fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut out = Vec::with_capacity(16 + data.len());
        put64(&mut out, IHAVEOPT);
        put32(&mut out, opt);
        put32(&mut out, data.len() as u32);
        out.extend_from_slice(data);
        let w = self.io.get_mut();
        w.write_all(&out).await?;
        w.flush().await?;
        Ok(())
    }

    async fn option_reply(&mut self, opt: u32) -> Result<OptReply> {
        if self.io.read_u64().await? != OPT_REPLY_MAGIC {
            return protocol("bad option reply magic");
        }
        if self.io.read_u32().await? != opt {
            return protocol("option reply for another option");
        }
        let kind = self.io.read_u32().await?;
        let len = self.io.read_u32().await?;
        if len as usize > MAX_BLOCK as usize {
            return protocol("option reply too large");
        }
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await?;
        Ok(OptReply { kind, data })
    }

    fn option_error(r: &OptReply) -> ClientError {
        ClientError::Server {
            errno: r.kind,
            msg: String::from_utf8_lossy(&r.data).into_owned(),
        }
    }

    /// An option without payload answered by a lone ACK; `false` if refused.
    async fn simple_option(&mut self, opt: u32) -> Result<bool> {
        self.send_option(opt, &[]).await?;
        let r = self.option_reply(opt).await?;
        Ok(r.kind == REP_ACK)
    }

    /// LIST or SET_META_CONTEXT; returns (id, name) pairs.
    async fn meta_context(
        &mut self,
        opt: u32,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>> {
        let mut d = Vec::new();
        put32(&mut d, export.len() as u32);
        d.extend_from_slice(export.as_bytes());
        put32(&mut d, queries.len() as u32);
        for q in queries {
            put32(&mut d, q.len() as u32);
            d.extend_from_slice(q.as_bytes());
        }
        self.send_option(opt, &d).await?;
        let mut out = Vec::new();
        loop {
            let r = self.option_reply(opt).await?;
            match r.kind {
                REP_ACK => return Ok(out),
                REP_META_CONTEXT if r.data.len() >= 4 => {
                    let name = String::from_utf8_lossy(&r.data[4..]).into_owned();
                    out.push((be32(&r.data, 0), name));
                }
                k if is_rep_err(k) => return Err(Self::option_error(&r)),
                _ => return protocol("unexpected meta context reply"),
            }
        }
    }

    async fn go(&mut self, export: &str) -> Result<()> {
        let mut d = Vec::new();
        put32(&mut d, export.len() as u32);
        d.extend_from_slice(export.as_bytes());
        put16(&mut d, 1);
        put16(&mut d, INFO_BLOCK_SIZE);
        self.send_option(OPT_GO, &d).await?;
        loop {
            let r = self.option_reply(OPT_GO).await?;
            match r.kind {
                REP_ACK => break,
                REP_INFO if r.data.len() >= 12 && be16(&r.data, 0) == INFO_EXPORT => {
                    self.size = be64(&r.data, 2);
                    self.flags = be16(&r.data, 10);
                }
                REP_INFO => {}
                k if is_rep_err(k) => return Err(Self::option_error(&r)),
                _ => return protocol("unexpected GO reply"),
            }
        }
        if self.flags & FLAG_HAS_FLAGS == 0 {
            return protocol("server sent no export flags");
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The contexts the server selected, as (ID, name).
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64> {
        self.cookie += 1;
        let req = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut out = Vec::with_capacity(EXT_REQUEST_LEN + payload.len());
        req.encode(self.mode, &mut out);
        out.extend_from_slice(payload);
        let w = self.io.get_mut();
        w.write_all(&out).await?;
        w.flush().await?;
        Ok(self.cookie)
    }

    /// Reads one reply chunk (or simple reply) for `cookie`; returns
    /// (flags, type, payload). A simple reply comes back as a final
    /// NONE chunk, or an error.
    async fn chunk(&mut self, cookie: u64, simple_data: usize) -> Result<(u16, u16, Vec<u8>)> {
        let magic = self.io.read_u32().await?;
        let (flags, kind, got, len) = match magic {
            SIMPLE_REPLY_MAGIC => {
                let err = self.io.read_u32().await?;
                let got = self.io.read_u64().await?;
                if got != cookie {
                    return protocol("reply for another request");
                }
                if err != 0 {
                    return Err(ClientError::Server {
                        errno: err,
                        msg: String::new(),
                    });
                }
                let mut data = vec![0u8; simple_data];
                self.io.read_exact(&mut data).await?;
                return Ok((REPLY_FLAG_DONE, REPLY_TYPE_NONE, data));
            }
            STRUCTURED_REPLY_MAGIC if self.mode == Mode::Structured => {
                let flags = self.io.read_u16().await?;
                let kind = self.io.read_u16().await?;
                let got = self.io.read_u64().await?;
                let len = self.io.read_u32().await? as u64;
                (flags, kind, got, len)
            }
            EXT_REPLY_MAGIC if self.mode == Mode::Extended => {
                let flags = self.io.read_u16().await?;
                let kind = self.io.read_u16().await?;
                let got = self.io.read_u64().await?;
                let _offset = self.io.read_u64().await?;
                let len = self.io.read_u64().await?;
                (flags, kind, got, len)
            }
            _ => return protocol(format!("bad reply magic {magic:#x}")),
        };
        if got != cookie {
            return protocol("reply for another request");
        }
        if len > MAX_BLOCK as u64 + 1024 {
            return protocol("reply chunk too large");
        }
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await?;
        if kind == REPLY_TYPE_ERROR || kind == REPLY_TYPE_ERROR_OFFSET {
            if data.len() < 6 {
                return protocol("short error chunk");
            }
            let n = (be16(&data, 4) as usize).min(data.len() - 6);
            return Err(ClientError::Server {
                errno: be32(&data, 0),
                msg: String::from_utf8_lossy(&data[6..6 + n]).into_owned(),
            });
        }
        Ok((flags, kind, data))
    }

    /// Sends a command without reply data and waits for its completion.
    async fn command(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<()> {
        let cookie = self.send(kind, flags, offset, length, payload).await?;
        loop {
            let (f, _, _) = self.chunk(cookie, 0).await?;
            if f & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
        }
    }

    pub async fn read(&mut self, offset: u64, len: u32, flags: u16) -> Result<Vec<u8>> {
        let cookie = self.send(CMD_READ, flags, offset, len as u64, &[]).await?;
        if self.mode == Mode::Simple {
            let (_, _, data) = self.chunk(cookie, len as usize).await?;
            return Ok(data);
        }
        let mut buf = vec![0u8; len as usize];
        loop {
            let (f, kind, data) = self.chunk(cookie, 0).await?;
            match kind {
                REPLY_TYPE_OFFSET_DATA if data.len() >= 8 => {
                    let at = be64(&data, 0).wrapping_sub(offset) as usize;
                    let n = data.len() - 8;
                    let Some(dst) = buf.get_mut(at..at.saturating_add(n)) else {
                        return protocol("data chunk outside the request");
                    };
                    dst.copy_from_slice(&data[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE if data.len() == 12 => {
                    let at = be64(&data, 0).wrapping_sub(offset) as usize;
                    let n = be32(&data, 8) as usize;
                    let Some(dst) = buf.get_mut(at..at.saturating_add(n)) else {
                        return protocol("hole chunk outside the request");
                    };
                    dst.fill(0);
                }
                REPLY_TYPE_NONE => {}
                _ => return protocol(format!("unexpected read chunk type {kind}")),
            }
            if f & REPLY_FLAG_DONE != 0 {
                return Ok(buf);
            }
        }
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        self.command(CMD_WRITE, flags, offset, data.len() as u64, data)
            .await
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u64, flags: u16) -> Result<()> {
        self.command(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .await
    }

    pub async fn trim(&mut self, offset: u64, len: u64, flags: u16) -> Result<()> {
        self.command(CMD_TRIM, flags, offset, len, &[]).await
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.command(CMD_FLUSH, 0, 0, 0, &[]).await
    }

    pub async fn cache(&mut self, offset: u64, len: u64) -> Result<()> {
        self.command(CMD_CACHE, 0, offset, len, &[]).await
    }

    /// Block status for every selected context: (context ID, descriptors).
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        flags: u16,
    ) -> Result<Vec<(u32, Vec<Descriptor>)>> {
        let cookie = self.send(CMD_BLOCK_STATUS, flags, offset, len, &[]).await?;
        let mut out = Vec::new();
        loop {
            let (f, kind, data) = self.chunk(cookie, 0).await?;
            let mut c = Cursor::new(&data);
            let parsed = match kind {
                REPLY_TYPE_BLOCK_STATUS => (|| {
                    let id = c.u32()?;
                    let mut d = Vec::new();
                    while c.remaining() >= 8 {
                        d.push(Descriptor {
                            len: c.u32()? as u64,
                            flags: c.u32()? as u64,
                        });
                    }
                    Some((id, d))
                })(),
                REPLY_TYPE_BLOCK_STATUS_EXT => (|| {
                    let id = c.u32()?;
                    let n = c.u32()?;
                    let mut d = Vec::new();
                    for _ in 0..n {
                        d.push(Descriptor {
                            len: c.u64()?,
                            flags: c.u64()?,
                        });
                    }
                    Some((id, d))
                })(),
                REPLY_TYPE_NONE => None,
                _ => return protocol(format!("unexpected block status chunk type {kind}")),
            };
            match parsed {
                Some(p) if c.remaining() == 0 => out.push(p),
                None if kind == REPLY_TYPE_NONE => {}
                _ => return protocol("malformed block status chunk"),
            }
            if f & REPLY_FLAG_DONE != 0 {
                return Ok(out);
            }
        }
    }

    /// Ends the session politely (NBD_CMD_DISC) and waits for the close.
    pub async fn disconnect(mut self) -> Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[]).await?;
        let mut rest = Vec::new();
        self.io.read_to_end(&mut rest).await?;
        Ok(())
    }
}

/// Lists a server's exports (NBD_OPT_LIST) as (name, description).
pub async fn list_exports<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
) -> Result<Vec<(String, String)>> {
    let mut c = NbdClient::greet(stream).await?;
    c.send_option(OPT_LIST, &[]).await?;
    let mut out = Vec::new();
    loop {
        let r = c.option_reply(OPT_LIST).await?;
        match r.kind {
            REP_ACK => break,
            REP_SERVER => {
                let mut cur = Cursor::new(&r.data);
                let Some(name) = cur.string() else {
                    return protocol("malformed NBD_REP_SERVER");
                };
                let desc = cur.bytes(cur.remaining()).unwrap_or_default();
                out.push((name.to_owned(), String::from_utf8_lossy(desc).into_owned()));
            }
            k if is_rep_err(k) => return Err(NbdClient::<S>::option_error(&r)),
            _ => return protocol("unexpected LIST reply"),
        }
    }
    c.send_option(OPT_ABORT, &[]).await?;
    Ok(out)
}
