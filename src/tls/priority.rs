//! gnutls priority strings (`priority=` of the credentials objects), read
//! as far as openssl can follow them. qemu hands the string to gnutls when
//! a session starts, so a string gnutls rejects fails every client, not the
//! object; [`check`] finds such strings by gnutls's grammar: a keyword
//! (`NORMAL`, `@SYSTEM`, ...) then `:`-separated `+NAME`, `-NAME`, `!NAME`
//! or `%FLAG` items. Of the items only the protocol versions mean anything
//! to openssl ([`versions`]); the rest keep openssl's defaults.

use openssl::ssl::SslVersion;

const KEYWORDS: &[&str] = &[
    "NORMAL",
    "PERFORMANCE",
    "SECURE",
    "SECURE128",
    "SECURE192",
    "SECURE256",
    "SUITEB128",
    "SUITEB192",
    "LEGACY",
    "PFS",
    "NONE",
];

/// The families of gnutls algorithm names an item may name.
const ITEM_PREFIXES: &[&str] = &[
    "VERS-",
    "SIGN-",
    "GROUP-",
    "CURVE-",
    "CTYPE-",
    "COMP-",
    "AES-",
    "CAMELLIA-",
    "CHACHA20",
    "3DES",
    "ARCFOUR",
    "GOST",
    "NULL",
    "SHA",
    "MD5",
    "AEAD",
    "UMAC",
    "STREEBOG",
    "MAC-ALL",
    "CIPHER-ALL",
    "KX-ALL",
    "RSA",
    "DHE-",
    "ECDHE-",
    "PSK",
    "SRP",
    "ANON-",
    "VKO-",
];

/// Whether gnutls would take `priority`; the error names what it would not.
pub fn check(priority: &str) -> Result<(), String> {
    let mut items = priority.split(':');
    let first = items.next().unwrap_or_default();
    let keyword_ok = first.starts_with('@') || KEYWORDS.contains(&first);
    let bad = std::iter::once(first)
        .filter(|_| !keyword_ok)
        .chain(items.filter(|item| !item_ok(item)))
        .next();
    match bad {
        Some(b) => Err(format!(
            "Unable to set TLS session priority {priority}: The request is invalid. ('{b}')"
        )),
        None => Ok(()),
    }
}

fn item_ok(item: &str) -> bool {
    if let Some(flag) = item.strip_prefix('%') {
        return !flag.is_empty();
    }
    let Some(name) = item.strip_prefix(['+', '-', '!']) else {
        return false;
    };
    ITEM_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The protocol versions a priority string leaves enabled: TLS 1.2 and 1.3
/// unless `-VERS-TLS1.x` takes one away.
pub fn versions(priority: &str) -> (Option<SslVersion>, Option<SslVersion>) {
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
    fn gnutls_grammar() {
        assert!(check("NORMAL").is_ok());
        assert!(check("@SYSTEM").is_ok());
        assert!(check("NORMAL:-VERS-TLS1.3:+ECDHE-PSK:%COMPAT").is_ok());
        assert!(check("NORMAL:+BOGUS").is_err());
        assert!(check("BOGUS").is_err());
    }

    #[test]
    fn versions_follow_vers_items() {
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
