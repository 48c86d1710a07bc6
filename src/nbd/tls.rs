//! The server's side of STARTTLS: the TLS handshake on a connection whose
//! plaintext options ended in STARTTLS, then the authorization check, as
//! qemu makes it: a client whose verified certificate the authorization
//! object refuses is dropped right after the handshake, before any option
//! inside TLS.

use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
use tokio_openssl::SslStream;

use crate::tls::{peer_dn, TlsCreds};

/// Encrypted bytes gathered before a send.
const SEND_BUFFER: usize = 256 << 10;

/// Decides whether a client whose certificate names this distinguished name
/// may go on; `Err` says why not, for the log. The daemon builds it from
/// the server's `tls-authz`.
pub type Authorizer = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A server's TLS settings.
#[derive(Clone)]
pub struct TlsServer {
    pub creds: Arc<TlsCreds>,
    pub authz: Option<Authorizer>,
}

impl TlsServer {
    /// The TLS handshake over `stream`, and the authorization check.
    ///
    /// openssl writes each record (16 KiB at most) as it makes it; a buffer
    /// under it turns a batch of replies into a few large sends, flushed
    /// when the reply writer has written what it had (and by openssl after
    /// each handshake flight).
    pub async fn accept<S>(&self, stream: S) -> Result<SslStream<BufWriter<S>>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = self.creds.session(None)?;
        let stream = BufWriter::with_capacity(SEND_BUFFER, stream);
        let mut tls = SslStream::new(ssl, stream).map_err(|e| format!("TLS session: {e}"))?;
        Pin::new(&mut tls)
            .accept()
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        // As qemu 10: only a verified client certificate is checked; PSK
        // users and x509 without verify-peer are not.
        if let (Some(authz), Some(dn)) = (&self.authz, peer_dn(tls.ssl())) {
            authz(&dn)?;
        }
        Ok(tls)
    }
}
