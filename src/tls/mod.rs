//! TLS credentials, as qemu's `tls-creds-x509` and `tls-creds-psk` objects
//! hold them: the files of a credentials directory, read once when the
//! object is made, turned into an openssl context. Every connection gets a
//! session from it ([`TlsCreds::session`]); the NBD server and client wrap
//! their socket in it with tokio-openssl.
//!
//! What qemu (gnutls) and openssl disagree on is settled here, once: the
//! text of a peer's identity ([`peer_identity`]) and the priority string.

mod identity;
mod priority;
mod psk;
mod x509;

use std::path::{Path, PathBuf};

use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslOptions};

pub use identity::peer_dn;
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
    /// A priority string gnutls would refuse: every session fails.
    bad_priority: Option<String>,
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
        if let Some(e) = &self.bad_priority {
            return Err(e.clone());
        }
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| format!("TLS session: {e}"))?;
        if self.endpoint == Endpoint::Client {
            if let Some(h) = hostname {
                // An address is checked against the certificate's IP
                // names; a name also goes out as SNI.
                let checked = match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => ssl.param_mut().set_ip(ip),
                    Err(_) => ssl
                        .param_mut()
                        .set_host(h)
                        .and_then(|_| ssl.set_hostname(h)),
                };
                checked.map_err(|e| format!("TLS hostname '{h}': {e}"))?;
            }
        }
        Ok(ssl)
    }
}

/// A credentials file, read once.
struct CredFile {
    path: PathBuf,
    data: Vec<u8>,
}

/// Reads credentials file `name` of `dir`, which must be readable
/// (qemu's check and text).
fn cred_file(dir: &Path, name: &str) -> Result<CredFile, String> {
    read_cred(dir, name).map_err(|(_, e)| e)
}

/// [`cred_file`] for a file that may be absent.
fn optional_cred_file(dir: &Path, name: &str) -> Result<Option<CredFile>, String> {
    match read_cred(dir, name) {
        Ok(f) => Ok(Some(f)),
        Err((std::io::ErrorKind::NotFound, _)) => Ok(None),
        Err((_, e)) => Err(e),
    }
}

fn read_cred(dir: &Path, name: &str) -> Result<CredFile, (std::io::ErrorKind, String)> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(data) => Ok(CredFile { path, data }),
        Err(e) => Err((
            e.kind(),
            format!(
                "Unable to access credentials {}: {}",
                path.display(),
                crate::qmp::error::strip_os_error(&e.to_string())
            ),
        )),
    }
}

/// Credentials from a built context: a priority string gnutls would
/// refuse is kept to fail the sessions, as qemu fails them.
fn creds(endpoint: Endpoint, ctx: SslContext, priority: Option<&str>) -> TlsCreds {
    TlsCreds {
        endpoint,
        ctx,
        bad_priority: priority.and_then(|p| priority::check(p).err()),
    }
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
    let (min, max) = priority::versions(priority.unwrap_or(""));
    b.set_min_proto_version(min)
        .and_then(|_| b.set_max_proto_version(max))
        .map_err(|e| format!("TLS versions: {e}"))?;
    Ok(b)
}
