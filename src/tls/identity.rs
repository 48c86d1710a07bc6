//! The identity a client proved, as qemu's authorization objects see it:
//! its x509 certificate's distinguished name printed as gnutls prints it
//! (`gnutls_x509_crt_get_dn`): the subject's entries in certificate order,
//! `C=GB,O=Example,CN=client`, with RFC 4514 escapes.

use openssl::ssl::{SslRef, SslVerifyMode};
use openssl::x509::X509NameRef;

/// The DN of the peer's certificate, if one was asked for and verified.
pub fn peer_dn(ssl: &SslRef) -> Option<String> {
    if !ssl
        .ssl_context()
        .verify_mode()
        .contains(SslVerifyMode::PEER)
    {
        return None;
    }
    ssl.peer_certificate()
        .map(|c| distinguished_name(c.subject_name()))
}

pub fn distinguished_name(name: &X509NameRef) -> String {
    let mut out = String::new();
    for e in name.entries() {
        if !out.is_empty() {
            out.push(',');
        }
        let nid = e.object().nid();
        match nid.short_name() {
            // gnutls's LDAP name for PKCS#9 emailAddress.
            Ok("emailAddress") => out.push_str("EMAIL"),
            Ok(s) => out.push_str(s),
            Err(_) => out.push_str(&e.object().to_string()),
        }
        out.push('=');
        match e.data().to_string() {
            Ok(v) => escape(&v, &mut out),
            Err(_) => out.push_str(&String::from_utf8_lossy(e.data().as_slice())),
        }
    }
    out
}

/// RFC 4514 escaping of one attribute value.
fn escape(v: &str, out: &mut String) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_rfc4514() {
        let mut s = String::new();
        escape("#a, b ", &mut s);
        assert_eq!(s, "\\#a\\, b\\ ");
    }

    #[test]
    fn entries_in_certificate_order() {
        let mut b = openssl::x509::X509NameBuilder::new().expect("builder");
        b.append_entry_by_text("C", "GB").expect("C");
        b.append_entry_by_text("O", "Tidemark Tests").expect("O");
        b.append_entry_by_text("CN", "client").expect("CN");
        let n = b.build();
        assert_eq!(distinguished_name(&n), "C=GB,O=Tidemark Tests,CN=client");
    }
}
