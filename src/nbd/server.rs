//! Listening sockets and connection lifecycle: accept, enforce the
//! connection limit, run handshake then session, and on shutdown stop
//! accepting, let sessions finish their in-flight requests, and clean up.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::budget::Pool;
use super::export::ExportTable;
use super::handshake::{negotiate, negotiate_tls, HandshakeEnd, Negotiated, Outcome, Tls};
use super::session;
use super::sink::ReplySink;
use super::tls::TlsServer;
use crate::accept::AcceptBackoff;

/// A client that has not finished the handshake (TLS included) by then is
/// dropped (qemu's default handshake limit).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Address {
    Unix(PathBuf),
    /// `host:port`; IPv6 hosts in brackets.
    Tcp(String),
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound server socket, not yet accepting. Binding is separate so a caller
/// knows the socket exists (and can report errors) before it serves.
pub struct NbdServer {
    listeners: Vec<Listener>,
    exports: ExportTable,
    max_connections: Option<usize>,
    pool: Pool,
    tls: Option<TlsServer>,
}

/// What every connection of a server shares.
#[derive(Clone)]
struct Shared {
    exports: ExportTable,
    pool: Pool,
    tls: Option<Arc<TlsServer>>,
}

impl NbdServer {
    /// With `tls`, every client must start TLS before anything else.
    pub async fn bind(
        addrs: &[Address],
        exports: ExportTable,
        max_connections: Option<usize>,
        pool: Pool,
        tls: Option<TlsServer>,
    ) -> io::Result<NbdServer> {
        let mut listeners = Vec::new();
        for a in addrs {
            listeners.push(match a {
                Address::Unix(p) => Listener::Unix(bind_unix(p)?, p.clone()),
                Address::Tcp(hp) => {
                    let l = TcpListener::bind(hp.as_str()).await.map_err(|e| {
                        io::Error::new(e.kind(), format!("Failed to listen on {hp}: {e}"))
                    })?;
                    Listener::Tcp(l)
                }
            });
        }
        Ok(NbdServer {
            listeners,
            exports,
            max_connections,
            pool,
            tls,
        })
    }

    /// The TCP addresses actually bound (useful with port 0).
    pub fn tcp_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(t) => t.local_addr().ok(),
                Listener::Unix(..) => None,
            })
            .collect()
    }

    /// Accepts and serves until `shutdown` becomes true, then waits for the
    /// open connections to finish and removes unix sockets.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let limit = Arc::new(Semaphore::new(
            self.max_connections.unwrap_or(Semaphore::MAX_PERMITS),
        ));
        let shared = Shared {
            exports: self.exports,
            pool: self.pool,
            tls: self.tls.map(Arc::new),
        };
        let mut acceptors = JoinSet::new();
        let mut paths = Vec::new();
        for l in self.listeners {
            if let Listener::Unix(_, p) = &l {
                paths.push(p.clone());
            }
            acceptors.spawn(accept_loop(
                l,
                shared.clone(),
                limit.clone(),
                shutdown.clone(),
            ));
        }
        while acceptors.join_next().await.is_some() {}
        for p in paths {
            let _ = std::fs::remove_file(&p);
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    // A stale socket from a dead server is replaced, as qemu does.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("Failed to bind socket to {}: {e}", path.display()),
        )
    })
}

async fn accept_loop(
    listener: Listener,
    shared: Shared,
    limit: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut stop = shutdown.clone();
    let mut backoff = AcceptBackoff::new("nbd");
    loop {
        // At the limit we stop accepting: new clients wait in the backlog
        // until a slot frees, as with qemu's max-connections.
        let permit = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(s) => {
                backoff.accepted();
                s
            }
            Err(e) => {
                drop(permit);
                if let Some(wait) = backoff.failed(&e) {
                    // A connection that ends frees a descriptor: retry then.
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep(wait) => {}
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
                continue;
            }
        };
        let shared = shared.clone();
        let stop = shutdown.clone();
        conns.spawn(async move {
            match stream {
                Stream::Unix(s) => connection(s, &shared, stop).await,
                Stream::Tcp(s) => connection(s, &shared, stop).await,
            }
            drop(permit);
        });
    }
    while conns.join_next().await.is_some() {}
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> io::Result<Stream> {
    match l {
        Listener::Unix(u, _) => u.accept().await.map(|(s, _)| Stream::Unix(s)),
        Listener::Tcp(t) => {
            let (s, _) = t.accept().await?;
            // Replies are small and latency-bound: never wait to coalesce.
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }
    }
}

/// One connection from accept to close: the handshake, bounded in time
/// (TLS included), then transmission.
async fn connection<S>(mut s: S, shared: &Shared, stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
{
    let deadline = Instant::now() + HANDSHAKE_LIMIT;
    let tls = if shared.tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    let outcome = {
        let (mut r, mut w) = tokio::io::split(&mut s);
        bounded(deadline, negotiate(&mut r, &mut w, &shared.exports, tls)).await
    };
    match (outcome, &shared.tls) {
        // The reply path (a second descriptor) exists only once the
        // handshake chose an export: an idle client costs one.
        (Some(Outcome::Export(neg)), _) => {
            let sink = ReplySink::new(&s);
            serve_conn(neg, s, sink, &shared.pool, stop).await
        }
        (Some(Outcome::StartTls(resume)), Some(server)) => {
            let socket = s.as_fd().as_raw_fd();
            let tls = match tokio::time::timeout_at(deadline, server.accept(s)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return info!(error = %e, "TLS client refused"),
                Err(_) => return debug!("TLS handshake timed out"),
            };
            let (mut r, mut w) = tokio::io::split(tls);
            let exports = &shared.exports;
            let Some(neg) = bounded(deadline, negotiate_tls(&mut r, &mut w, exports, resume)).await
            else {
                return;
            };
            let sink = ReplySink::with_writer(w, socket);
            serve_conn(neg, r, Ok(sink), &shared.pool, stop).await
        }
        _ => {}
    }
}

/// A handshake step that must end by `deadline`; `None` when it did not
/// end in what the caller wanted.
async fn bounded<T>(
    deadline: Instant,
    step: impl std::future::Future<Output = Result<T, HandshakeEnd>>,
) -> Option<T> {
    match tokio::time::timeout_at(deadline, step).await {
        Ok(Ok(n)) => Some(n),
        Ok(Err(HandshakeEnd::Aborted)) => None,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            None
        }
        Err(_) => {
            debug!("handshake timed out");
            None
        }
    }
}

/// The transmission phase of one connection, until it closes.
async fn serve_conn<R>(
    neg: Negotiated,
    r: R,
    sink: io::Result<Arc<ReplySink>>,
    pool: &Pool,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
{
    let sink = match sink {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not set up the reply path");
            return;
        }
    };
    info!(export = %neg.export.name, mode = ?neg.mode, "client connected");
    if let Err(e) = session::run(r, sink, neg, pool, shutdown).await {
        debug!(error = %e, "connection ended");
    }
}
