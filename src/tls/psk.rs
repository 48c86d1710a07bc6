//! `tls-creds-psk`: `dir/keys.psk`, lines of `username:hexkey` (qemu's and
//! gnutls's psktool format). A server knows every user in the file; a
//! client presents one (`username`, default `qemu`).

use std::collections::HashMap;
use std::path::PathBuf;

use openssl::error::ErrorStack;

use super::{base_context, cred_file, creds, Endpoint, TlsCreds};

/// A `tls-creds-psk` object's properties.
#[derive(Debug, Clone)]
pub struct PskOptions {
    pub dir: PathBuf,
    pub endpoint: Endpoint,
    pub username: Option<String>,
    pub priority: Option<String>,
}

/// qemu's username when none is given.
const DEFAULT_USER: &str = "qemu";

/// Cipher suites for TLS 1.2: the PSK key exchanges gnutls clients offer
/// (qemu and libnbd add +ECDHE-PSK:+DHE-PSK:+PSK to their priority).
const PSK_CIPHERS: &str = "ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL";

pub(super) fn load(o: &PskOptions) -> Result<TlsCreds, String> {
    let file = cred_file(&o.dir, "keys.psk")?;
    // A server reads the file per handshake in qemu, so a bad one fails
    // its clients, not the object; a client's must parse now.
    let keys = match (parse_keys(&file.data), o.endpoint) {
        (Some(k), _) => k,
        (None, Endpoint::Server) => HashMap::new(),
        (None, Endpoint::Client) => {
            return Err("Cannot set PSK client credentials: Error in parsing.".into())
        }
    };
    let mut b = base_context(o.endpoint, o.priority.as_deref())?;
    b.set_cipher_list(PSK_CIPHERS)
        .map_err(|e| format!("TLS ciphers: {e}"))?;
    match o.endpoint {
        Endpoint::Server => {
            b.set_psk_server_callback(move |_ssl, identity, out| {
                let key = identity
                    .and_then(|id| std::str::from_utf8(id).ok())
                    .and_then(|id| keys.get(id));
                // An unknown user gets no key: the handshake fails.
                Ok(key.map_or(0, |k| copy_key(k, out)))
            });
        }
        Endpoint::Client => {
            let user = o
                .username
                .clone()
                .unwrap_or_else(|| DEFAULT_USER.to_owned());
            let key = keys.get(&user).cloned().ok_or_else(|| {
                format!(
                    "Username {user} not found in PSK file {}",
                    file.path.display()
                )
            })?;
            b.set_psk_client_callback(move |_ssl, _hint, identity, out| {
                let id = user.as_bytes();
                if id.len() >= identity.len() {
                    return Err(ErrorStack::get());
                }
                identity[..id.len()].copy_from_slice(id);
                identity[id.len()] = 0;
                Ok(copy_key(&key, out))
            });
        }
    }
    Ok(creds(o.endpoint, b.build(), o.priority.as_deref()))
}

fn copy_key(key: &[u8], out: &mut [u8]) -> usize {
    if key.len() > out.len() {
        return 0;
    }
    out[..key.len()].copy_from_slice(key);
    key.len()
}

/// The users and keys of a keys.psk; `None` if it does not parse.
fn parse_keys(data: &[u8]) -> Option<HashMap<String, Vec<u8>>> {
    let text = String::from_utf8_lossy(data);
    let mut keys = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (user, hex) = line.rsplit_once(':')?;
        keys.insert(user.to_owned(), unhex(hex)?);
    }
    Some(keys)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys() {
        assert_eq!(unhex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
