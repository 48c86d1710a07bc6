//! `tls-creds-x509`: the files qemu reads from `dir`.
//!
//! | file | server | client |
//! |---|---|---|
//! | ca-cert.pem | required | required |
//! | ca-crl.pem | optional | optional |
//! | server-cert.pem, server-key.pem | required | – |
//! | client-cert.pem, client-key.pem | – | optional |
//! | dh-params.pem | optional | – |

use std::path::PathBuf;
use std::sync::Arc;

use openssl::dh::Dh;
use openssl::pkey::{PKey, Private};
use openssl::ssl::SslVerifyMode;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{CrlStatus, X509Crl, X509};

use super::{base_context, cred_file, creds, read, Endpoint, TlsCreds};

/// A `tls-creds-x509` object's properties.
#[derive(Debug, Clone)]
pub struct X509Options {
    pub dir: PathBuf,
    pub endpoint: Endpoint,
    /// A server asks clients for a certificate it can verify (qemu's
    /// default); a client always verifies the server's.
    pub verify_peer: bool,
    pub priority: Option<String>,
    /// Check our own certificates when loading them, as qemu does.
    pub sanity_check: bool,
    /// The private key's passphrase (the `passwordid` secret).
    pub key_password: Option<Vec<u8>>,
}

pub(super) fn load(o: &X509Options) -> Result<TlsCreds, String> {
    let (cert_name, key_name, own_required) = match o.endpoint {
        Endpoint::Server => ("server-cert.pem", "server-key.pem", true),
        Endpoint::Client => ("client-cert.pem", "client-key.pem", false),
    };
    // qemu's order of checks, so the first missing file is the one named.
    let ca_path = cred_file(&o.dir, "ca-cert.pem", true)?.unwrap_or_default();
    let crl_path = cred_file(&o.dir, "ca-crl.pem", false)?;
    let cert_path = cred_file(&o.dir, cert_name, own_required)?;
    let key_path = cred_file(&o.dir, key_name, own_required)?;
    let dh_path = match o.endpoint {
        Endpoint::Server => cred_file(&o.dir, "dh-params.pem", false)?,
        Endpoint::Client => None,
    };

    let cas = X509::stack_from_pem(&read(&ca_path)?)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("Unable to import CA certificate list {}", ca_path.display()))?;
    let crl = match &crl_path {
        Some(p) => Some(
            X509Crl::from_pem(&read(p)?)
                .map_err(|e| format!("Unable to load CA revocation list {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let own = match (&cert_path, &key_path) {
        (Some(c), Some(k)) => Some((load_chain(c)?, load_key(k, o.key_password.as_deref())?)),
        _ => None,
    };
    if let (Some((chain, key)), Some(c), Some(k)) = (&own, &cert_path, &key_path) {
        if !chain[0].public_key().is_ok_and(|p| p.public_eq(key)) {
            return Err(format!(
                "Cannot load certificate '{}' & key '{}': The certificate and the given key do not match.",
                c.display(),
                k.display()
            ));
        }
        if o.sanity_check {
            sanity_check(&chain[0], &cas, c, &ca_path)?;
        }
    }

    let mut b = base_context(o.endpoint, o.priority.as_deref())?;
    let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
    for ca in &cas {
        store
            .add_cert(ca.clone())
            .map_err(|e| format!("Unable to load CA certificate: {e}"))?;
    }
    b.set_cert_store(store.build());
    if let Some((chain, key)) = &own {
        b.set_certificate(&chain[0])
            .and_then(|_| {
                chain[1..]
                    .iter()
                    .try_for_each(|c| b.add_extra_chain_cert(c.clone()))
            })
            .and_then(|_| b.set_private_key(key))
            .map_err(|e| format!("Unable to load certificate and key: {e}"))?;
    }
    if let Some(p) = &dh_path {
        let dh = Dh::params_from_pem(&read(p)?)
            .map_err(|e| format!("Unable to load DH parameters {}: {e}", p.display()))?;
        b.set_tmp_dh(&dh).map_err(|e| e.to_string())?;
    }
    let verify = match o.endpoint {
        Endpoint::Server if o.verify_peer => {
            SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
        }
        Endpoint::Server => SslVerifyMode::NONE,
        Endpoint::Client => SslVerifyMode::PEER,
    };
    let crl = crl.map(Arc::new);
    b.set_verify_callback(verify, move |ok, ctx| {
        // A revoked certificate anywhere in the chain fails it.
        let revoked = match (&crl, ctx.current_cert()) {
            (Some(crl), Some(cert)) => {
                matches!(crl.get_by_cert(&cert.to_owned()), CrlStatus::Revoked(_))
            }
            _ => false,
        };
        ok && !revoked
    });
    Ok(creds(o.endpoint, b.build(), o.priority.as_deref()))
}

fn load_chain(path: &std::path::Path) -> Result<Vec<X509>, String> {
    let chain = X509::stack_from_pem(&read(path)?)
        .map_err(|e| format!("Unable to load certificate {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "Unable to load certificate {}: no certificate found",
            path.display()
        ));
    }
    Ok(chain)
}

fn load_key(path: &std::path::Path, password: Option<&[u8]>) -> Result<PKey<Private>, String> {
    let pem = read(path)?;
    match password {
        Some(p) => PKey::private_key_from_pem_passphrase(&pem, p),
        None => PKey::private_key_from_pem(&pem),
    }
    .map_err(|e| format!("Unable to load private key {}: {e}", path.display()))
}

/// qemu's load-time checks of its own certificate: in its validity period
/// and issued by one of the CAs (its texts).
fn sanity_check(
    cert: &X509,
    cas: &[X509],
    path: &std::path::Path,
    ca_path: &std::path::Path,
) -> Result<(), String> {
    let name = path.display();
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(|e| e.to_string())?;
    if cert.not_after() < now {
        return Err(format!("The certificate {name} has expired"));
    }
    if cert.not_before() > now {
        return Err(format!("The certificate {name} is not yet active"));
    }
    let signed = cas.iter().any(|ca| {
        ca.public_key()
            .is_ok_and(|k| cert.verify(&k).unwrap_or(false))
    });
    if !signed {
        return Err(format!(
            "Our own certificate {name} failed validation against {}: \
             The certificate hasn't got a known issuer",
            ca_path.display()
        ));
    }
    Ok(())
}
