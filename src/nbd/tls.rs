//! The server's side of STARTTLS: the TLS handshake on a connection whose
//! plaintext options ended in STARTTLS, then the authorization check, as
//! qemu makes it: a client the authorization object refuses is dropped
//! right after the handshake, before any option inside TLS.

use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

use crate::tls::{peer_identity, TlsCreds};

/// Decides whether a client identity (x509 distinguished name or PSK
/// username; `None` when the client proved none) may go on. `Err` says why
/// not, for the log. The daemon builds it from the server's `tls-authz`.
pub type Authorizer = Arc<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// A server's TLS settings.
#[derive(Clone)]
pub struct TlsServer {
    pub creds: Arc<TlsCreds>,
    pub authz: Option<Authorizer>,
}

impl TlsServer {
    /// The TLS handshake over `stream`, and the authorization check.
    pub async fn accept<S>(&self, stream: S) -> Result<SslStream<S>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = self.creds.session(None)?;
        let mut tls = SslStream::new(ssl, stream).map_err(|e| format!("TLS session: {e}"))?;
        Pin::new(&mut tls)
            .accept()
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        if let Some(authz) = &self.authz {
            authz(peer_identity(tls.ssl()).as_deref())?;
        }
        Ok(tls)
    }
}
