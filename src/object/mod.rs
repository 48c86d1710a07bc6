//! qemu's user-creatable objects (QOM's /objects): what `object-add`,
//! `object-del` and `--object` make and remove. tidemark has the ones a
//! TLS-protected NBD server needs: `secret`, `tls-creds-x509`,
//! `tls-creds-psk`, `authz-simple` and `authz-list`.
//!
//! As in qemu, a user holds an object by reference: the NBD server keeps
//! the credentials it started with even after `object-del`, while an
//! authorization object is looked up by id at each connection, so deleting
//! it denies every new client.

pub mod authz;
pub mod secret;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};

use crate::qmp::error::{QmpError, QmpResult};
use crate::tls::{Endpoint, PskOptions, TlsCreds, X509Options};
use authz::{Authz, Rule};
use secret::{Secret, SecretOptions};

/// One object.
#[derive(Debug, Clone)]
pub enum Object {
    Secret(Arc<Secret>),
    TlsCreds(Arc<TlsCreds>),
    Authz(Arc<Authz>),
}

/// Every object, in creation order.
#[derive(Default)]
pub struct Objects {
    table: Mutex<Vec<(String, Object)>>,
}

fn err(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

/// qemu's rule for ids: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

impl Objects {
    fn lock(&self) -> MutexGuard<'_, Vec<(String, Object)>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Object> {
        self.lock()
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, o)| o.clone())
    }

    /// `object-add`: `args` is an ObjectOptions the schema accepted. Files
    /// are read here, so a command that succeeds has loaded everything.
    pub fn add(&self, args: &Map<String, Value>) -> QmpResult<()> {
        let s = |k: &str| args.get(k).and_then(Value::as_str);
        let id = s("id").unwrap_or_default();
        if !id_wellformed(id) {
            return Err(err("Parameter 'id' expects an identifier"));
        }
        // Every container has a property `type`: qemu cannot add it either.
        if id == "type" || self.get(id).is_some() {
            return Err(err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let object = match s("qom-type").unwrap_or_default() {
            "secret" => Object::Secret(Arc::new(self.secret_from(args)?)),
            "tls-creds-x509" => Object::TlsCreds(Arc::new(self.x509_from(args)?)),
            "tls-creds-psk" => Object::TlsCreds(Arc::new(psk_from(args)?)),
            "authz-simple" => Object::Authz(Arc::new(Authz::Simple {
                identity: s("identity").unwrap_or_default().to_owned(),
            })),
            "authz-list" => Object::Authz(Arc::new(authz_list_from(args))),
            // In qsd's schema, but not built into it (nor into tidemark).
            "authz-pam" => return Err(err("invalid object type: authz-pam")),
            other => {
                return Err(err(format!(
                    "Parameter 'qom-type' does not accept value '{other}'"
                )))
            }
        };
        // Loading ran unlocked, but commands run one at a time (the
        // daemon's command lock): the id is still free.
        self.lock().push((id.to_owned(), object));
        Ok(())
    }

    /// `object-del`. Users that hold the object keep it (see the module
    /// comment), as qemu lets them.
    pub fn del(&self, id: &str) -> QmpResult<()> {
        let mut t = self.lock();
        let i = t
            .iter()
            .position(|(i, _)| i == id)
            .ok_or_else(|| err(format!("object '{id}' not found")))?;
        t.remove(i);
        Ok(())
    }

    /// Credentials for a TLS server (nbd-server-start's `tls-creds`).
    pub fn server_creds(&self, id: &str) -> QmpResult<Arc<TlsCreds>> {
        let creds = self.creds(id)?;
        if creds.endpoint() != Endpoint::Server {
            return Err(err("Expected TLS credentials for a server endpoint"));
        }
        Ok(creds)
    }

    fn creds(&self, id: &str) -> QmpResult<Arc<TlsCreds>> {
        match self.get(id) {
            Some(Object::TlsCreds(c)) => Ok(c),
            Some(_) => Err(err(format!("Object with id '{id}' is not TLS credentials"))),
            None => Err(err(format!("No TLS credentials with id '{id}'"))),
        }
    }

    /// Whether the authorization object `id` lets the client whose
    /// certificate names `dn` in; `Err` says why not, in qemu's words.
    pub fn authorize(&self, id: &str, dn: &str) -> Result<(), String> {
        match self.get(id) {
            Some(Object::Authz(a)) if a.allows(dn) => Ok(()),
            Some(Object::Authz(_)) => Err(format!("TLS x509 authz check for {dn} is denied")),
            _ => Err(format!("Cannot find QAuthZ object ID {id}")),
        }
    }

    fn secret(&self, id: &str) -> QmpResult<Arc<Secret>> {
        match self.get(id) {
            Some(Object::Secret(s)) => Ok(s),
            Some(_) => Err(err(format!("Object with id '{id}' is not a secret"))),
            None => Err(err(format!("No secret with id '{id}'"))),
        }
    }

    fn secret_from(&self, args: &Map<String, Value>) -> QmpResult<Secret> {
        let s = |k: &str| args.get(k).and_then(Value::as_str);
        let key = s("keyid").map(|k| self.secret(k)).transpose()?;
        Secret::load(&SecretOptions {
            data: s("data"),
            file: s("file"),
            base64: s("format") == Some("base64"),
            key: key.as_deref().map(|k| (k, s("iv"))),
        })
        .map_err(err)
    }

    fn x509_from(&self, args: &Map<String, Value>) -> QmpResult<TlsCreds> {
        let b = |k: &str, default: bool| args.get(k).and_then(Value::as_bool).unwrap_or(default);
        let password = match args.get("passwordid").and_then(Value::as_str) {
            Some(id) => Some(self.secret(id)?.data.clone()),
            None => None,
        };
        TlsCreds::x509(&X509Options {
            dir: creds_dir(args)?,
            endpoint: endpoint(args),
            verify_peer: b("verify-peer", true),
            priority: args
                .get("priority")
                .and_then(Value::as_str)
                .map(str::to_owned),
            sanity_check: b("sanity-check", true),
            key_password: password,
        })
        .map_err(err)
    }
}

fn psk_from(args: &Map<String, Value>) -> QmpResult<TlsCreds> {
    let s = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
    if endpoint(args) == Endpoint::Server && s("username").is_some() {
        return Err(err("username should not be set when endpoint=server"));
    }
    TlsCreds::psk(&PskOptions {
        dir: creds_dir(args)?,
        endpoint: endpoint(args),
        username: s("username"),
        priority: s("priority"),
    })
    .map_err(err)
}

/// qemu's default endpoint is the client.
fn endpoint(args: &Map<String, Value>) -> Endpoint {
    args.get("endpoint")
        .and_then(Value::as_str)
        .and_then(Endpoint::parse)
        .unwrap_or(Endpoint::Client)
}

fn creds_dir(args: &Map<String, Value>) -> QmpResult<PathBuf> {
    args.get("dir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .ok_or_else(|| err("Missing 'dir' property value"))
}

fn authz_list_from(args: &Map<String, Value>) -> Authz {
    let allow = |v: Option<&Value>| v.and_then(Value::as_str) == Some("allow");
    let rules = args
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| Rule {
            pattern: r
                .get("match")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            allow: allow(r.get("policy")),
            glob: r.get("format").and_then(Value::as_str) == Some("glob"),
        })
        .collect();
    Authz::List {
        allow: allow(args.get("policy")),
        rules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_identifiers() {
        assert!(id_wellformed("tls0") && id_wellformed("a-b.c_d"));
        assert!(!id_wellformed("1bad") && !id_wellformed("") && !id_wellformed("a b"));
    }
}
