//! `authz-simple` and `authz-list`: who may use a TLS-protected service,
//! by the identity the client proved (see tls/identity.rs).

use std::ffi::CString;

/// An authorization object.
#[derive(Debug, Clone)]
pub enum Authz {
    /// Exactly one identity is allowed.
    Simple { identity: String },
    /// The first matching rule decides; `allow` when none matches.
    List { allow: bool, rules: Vec<Rule> },
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub allow: bool,
    /// `format=glob`: fnmatch(3) without flags, as qemu matches.
    pub glob: bool,
}

impl Authz {
    pub fn allows(&self, identity: &str) -> bool {
        match self {
            Authz::Simple { identity: id } => id == identity,
            Authz::List { allow, rules } => rules
                .iter()
                .find(|r| r.matches(identity))
                .map_or(*allow, |r| r.allow),
        }
    }
}

impl Rule {
    fn matches(&self, identity: &str) -> bool {
        if !self.glob {
            return self.pattern == identity;
        }
        let (Ok(p), Ok(s)) = (CString::new(self.pattern.as_str()), CString::new(identity)) else {
            return false;
        };
        // SAFETY: both are valid NUL-terminated strings that outlive the call.
        unsafe { libc::fnmatch(p.as_ptr(), s.as_ptr(), 0) == 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_decides() {
        let list = Authz::List {
            allow: false,
            rules: vec![
                Rule {
                    pattern: "CN=bad*".into(),
                    allow: false,
                    glob: true,
                },
                Rule {
                    pattern: "CN=*".into(),
                    allow: true,
                    glob: true,
                },
            ],
        };
        assert!(list.allows("CN=good"));
        assert!(!list.allows("CN=badly"));
        assert!(!list.allows("O=x"));
        let simple = Authz::Simple {
            identity: "CN=a".into(),
        };
        assert!(simple.allows("CN=a") && !simple.allows("CN=a,O=b"));
    }
}
