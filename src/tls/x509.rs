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

use super::{base_context, cred_file, creds, optional_cred_file, CredFile, Endpoint, TlsCreds};

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
    let own = |name| match own_required {
        true => cred_file(&o.dir, name).map(Some),
        false => optional_cred_file(&o.dir, name),
    };
    let ca_file = cred_file(&o.dir, "ca-cert.pem")?;
    let crl_file = optional_cred_file(&o.dir, "ca-crl.pem")?;
    let cert_file = own(cert_name)?;
    let key_file = own(key_name)?;
    let dh_file = match o.endpoint {
        Endpoint::Server => optional_cred_file(&o.dir, "dh-params.pem")?,
        Endpoint::Client => None,
    };

    let ca_path = &ca_file.path;
    let cas = X509::stack_from_pem(&ca_file.data)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("Unable to import CA certificate list {}", ca_path.display()))?;
    let crl = match &crl_file {
        Some(f) => Some(X509Crl::from_pem(&f.data).map_err(|e| {
            format!(
                "Unable to load CA revocation list {}: {e}",
                f.path.display()
            )
        })?),
        None => None,
    };
    let own = match (&cert_file, &key_file) {
        (Some(c), Some(k)) => Some((load_chain(c)?, load_key(k, o.key_password.as_deref())?)),
        _ => None,
    };
    if let (Some((chain, key)), Some(c), Some(k)) = (&own, &cert_file, &key_file) {
        let (c, k) = (&c.path, &k.path);
        if !chain[0].public_key().is_ok_and(|p| p.public_eq(key)) {
            return Err(format!(
                "Cannot load certificate '{}' & key '{}': The certificate and the given key do not match.",
                c.display(),
                k.display()
            ));
        }
        if o.sanity_check {
            sanity_check(&chain[0], &cas, c, ca_path)?;
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
    if let Some(f) = &dh_file {
        let dh = Dh::params_from_pem(&f.data)
            .map_err(|e| format!("Unable to load DH parameters {}: {e}", f.path.display()))?;
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

fn load_chain(file: &CredFile) -> Result<Vec<X509>, String> {
    let path = &file.path;
    let chain = X509::stack_from_pem(&file.data)
        .map_err(|e| format!("Unable to load certificate {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "Unable to load certificate {}: no certificate found",
            path.display()
        ));
    }
    Ok(chain)
}

fn load_key(file: &CredFile, password: Option<&[u8]>) -> Result<PKey<Private>, String> {
    let (path, pem) = (&file.path, &file.data);
    match password {
        Some(p) => PKey::private_key_from_pem_passphrase(pem, p),
        None => PKey::private_key_from_pem(pem),
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
