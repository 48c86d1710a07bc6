//! TLS credentials, as qemu's `tls-creds-x509` and `tls-creds-psk` objects
//! hold them: the files of a credentials directory, read once when the
//! object is made, turned into an openssl context. Every connection gets a
//! session from it ([`TlsCreds::session`]); the NBD server and client wrap
//! their socket in it with tokio-openssl.
//!
//! What qemu (gnutls) and openssl disagree on is settled here, once: the
//! text of a peer's identity ([`peer_identity`]) and the priority string.

mod identity;
mod psk;
mod x509;

use std::path::{Path, PathBuf};

use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslOptions, SslVersion};

pub use identity::peer_identity;
pub use psk::PskOptions;
pub use x509::X509Options;

/// Which side of a connection the credentials are for (QCryptoTLSCredsEndpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Client,
    Server,
}

impl Endpoint {
    pub fn parse(s: &str) -> Option<Endpoint> {
        match s {
            "client" => Some(Endpoint::Client),
            "server" => Some(Endpoint::Server),
            _ => None,
        }
    }
}

/// Loaded credentials: an openssl context for one endpoint.
pub struct TlsCreds {
    endpoint: Endpoint,
    ctx: SslContext,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl TlsCreds {
    pub fn x509(o: &X509Options) -> Result<TlsCreds, String> {
        x509::load(o)
    }

    pub fn psk(o: &PskOptions) -> Result<TlsCreds, String> {
        psk::load(o)
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// A session for one new connection. A client names the server it
    /// expects (`hostname`): its certificate must be for that name.
    pub fn session(&self, hostname: Option<&str>) -> Result<Ssl, String> {
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| format!("TLS session: {e}"))?;
        if self.endpoint == Endpoint::Client {
            if let Some(h) = hostname {
                let param = ssl.param_mut();
                match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => param.set_ip(ip),
                    Err(_) => param.set_host(h),
                }
                .map_err(|e| format!("TLS hostname '{h}': {e}"))?;
                if h.parse::<std::net::IpAddr>().is_err() {
                    ssl.set_hostname(h).map_err(|e| format!("TLS SNI: {e}"))?;
                }
            }
        }
        Ok(ssl)
    }
}

/// The path of a credentials file, which must be readable (qemu's check
/// and text). `None` for an optional file that is absent.
fn cred_file(dir: &Path, name: &str, required: bool) -> Result<Option<PathBuf>, String> {
    let path = dir.join(name);
    match std::fs::File::open(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {}: {}",
            path.display(),
            crate::qmp::error::strip_os_error(&e.to_string())
        )),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "Cannot read {}: {}",
            path.display(),
            crate::qmp::error::strip_os_error(&e.to_string())
        )
    })
}

/// What every context shares, whatever its credentials: TLS 1.2 at least,
/// no renegotiation (a client cannot make the server redo a handshake),
/// read-ahead (one read per burst of records, not two per record), and the
/// versions the gnutls priority string allows.
fn base_context(endpoint: Endpoint, priority: Option<&str>) -> Result<SslContextBuilder, String> {
    let method = match endpoint {
        Endpoint::Client => openssl::ssl::SslMethod::tls_client(),
        Endpoint::Server => openssl::ssl::SslMethod::tls_server(),
    };
    let mut b = SslContextBuilder::new(method).map_err(|e| format!("TLS context: {e}"))?;
    b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_read_ahead(true);
    let (min, max) = versions(priority.unwrap_or(""));
    b.set_min_proto_version(min)
        .and_then(|_| b.set_max_proto_version(max))
        .map_err(|e| format!("TLS versions: {e}"))?;
    Ok(b)
}

/// The protocol versions a gnutls priority string leaves enabled. Only its
/// `-VERS-TLS1.x` items mean anything to openssl; the rest (NORMAL,
/// @SYSTEM, cipher choices) keep openssl's defaults.
fn versions(priority: &str) -> (Option<SslVersion>, Option<SslVersion>) {
    let off = |v: &str| priority.split(':').any(|t| t == format!("-VERS-TLS{v}"));
    let min = if off("1.2") && !off("1.3") {
        SslVersion::TLS1_3
    } else {
        SslVersion::TLS1_2
    };
    let max = if off("1.3") {
        SslVersion::TLS1_2
    } else {
        SslVersion::TLS1_3
    };
    (Some(min), Some(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_versions() {
        assert_eq!(
            versions("NORMAL"),
            (Some(SslVersion::TLS1_2), Some(SslVersion::TLS1_3))
        );
        assert_eq!(
            versions("NORMAL:-VERS-TLS1.3"),
            (Some(SslVersion::TLS1_2), Some(SslVersion::TLS1_2))
        );
        assert_eq!(
            versions("NORMAL:-VERS-TLS1.2"),
            (Some(SslVersion::TLS1_3), Some(SslVersion::TLS1_3))
        );
    }
}
