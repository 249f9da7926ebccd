//! Mail addresses as the MTA handles them: `local@domain`.

use std::fmt;

/// RFC 5321 4.5.3.1.1 and 4.5.3.1.2: 64 octets of local part, 255 of domain.
const MAX_LOCAL_LEN: usize = 64;
const MAX_DOMAIN_LEN: usize = 255;

/// Why a string is not a usable address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address has no @domain")]
    NoDomain,
    #[error("address has an empty local part")]
    EmptyLocal,
    #[error("local part is longer than 64 octets")]
    LocalTooLong,
    #[error("domain is not a valid host name")]
    BadDomain,
    #[error(
        "address contains a control character, a space, or one of ()<>[]:;@\\,\" outside quotes"
    )]
    BadCharacter,
}

/// A mailbox address. The domain is stored lower-cased; the local part keeps
/// its case for display, while [`Address::key`] folds it for lookups, as
/// Postfix and Dovecot do by default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    local: String,
    domain: String,
}

impl Address {
    /// Parse `local@domain` (no angle brackets). The last `@` splits, so a
    /// quoted local part that contained `@` still parses.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.chars().any(|c| c.is_control() || c == ' ') {
            return Err(AddressError::BadCharacter);
        }
        let (local, domain) = s.rsplit_once('@').ok_or(AddressError::NoDomain)?;
        if local.is_empty() {
            return Err(AddressError::EmptyLocal);
        }
        // RFC 5321 4.1.2: a local part is a quoted string or atoms, and
        // atoms hold none of RFC 5322's specials. Dots are not checked: a
        // leading, trailing or doubled dot is common in the wild.
        let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
        if !quoted && local.contains(['(', ')', '<', '>', '[', ']', ':', ';', '@', '\\', ',', '"'])
        {
            return Err(AddressError::BadCharacter);
        }
        if local.len() > MAX_LOCAL_LEN {
            return Err(AddressError::LocalTooLong);
        }
        let domain = normalize_domain(domain).ok_or(AddressError::BadDomain)?;
        Ok(Address {
            local: local.to_string(),
            domain,
        })
    }

    /// Build from parts already known to be valid (a domain from our list).
    pub fn from_parts(local: &str, domain: &str) -> Result<Address, AddressError> {
        Self::parse(&format!("{local}@{domain}"))
    }

    /// The local part as written.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The lower-cased domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The case-folded form used to look the address up.
    pub fn key(&self) -> String {
        format!("{}@{}", self.local.to_lowercase(), self.domain)
    }

    /// Whether the address needs SMTPUTF8 (RFC 6531) to be transmitted.
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// Split plus-addressing: with delimiter `+`, `user+tag@d` gives
    /// `(user@d, Some("tag"))`. An empty delimiter turns this off.
    pub fn without_tag(&self, delimiter: &str) -> (Address, Option<String>) {
        if !delimiter.is_empty() {
            if let Some((user, tag)) = self.local.split_once(delimiter) {
                if !user.is_empty() {
                    let base = Address {
                        local: user.to_string(),
                        domain: self.domain.clone(),
                    };
                    return (base, Some(tag.to_string()));
                }
            }
        }
        (self.clone(), None)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Lower-case and check a domain: dot-separated labels of letters, digits,
/// hyphens (or any non-ASCII for internationalized names, RFC 6531), or an
/// address literal in brackets.
pub fn normalize_domain(domain: &str) -> Option<String> {
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
        return None;
    }
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        // RFC 5321 4.1.3 address literals: [192.0.2.1] or [IPv6:2001:db8::1].
        let valid = match literal.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => literal.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        return valid.then(|| domain.to_string());
    }
    let ok = domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    });
    ok.then(|| domain.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_folds() {
        let a = Address::parse("John.Doe@Example.ORG").unwrap();
        assert_eq!(a.local(), "John.Doe");
        assert_eq!(a.domain(), "example.org");
        assert_eq!(a.key(), "john.doe@example.org");
        assert_eq!(a.to_string(), "John.Doe@example.org");
    }

    #[test]
    fn refuses_bad_addresses() {
        assert_eq!(Address::parse("nodomain"), Err(AddressError::NoDomain));
        assert_eq!(Address::parse("@x.org"), Err(AddressError::EmptyLocal));
        assert_eq!(Address::parse("a@-x.org"), Err(AddressError::BadDomain));
        assert_eq!(Address::parse("a@x..org"), Err(AddressError::BadDomain));
        assert_eq!(Address::parse("a b@x.org"), Err(AddressError::BadCharacter));
        for bad in [
            "m:x@x.org",
            "robot>,<v@x.org",
            "a;b@x.org",
            "a\\b@x.org",
            "v@x.org:$5$@x.org",
        ] {
            assert_eq!(
                Address::parse(bad),
                Err(AddressError::BadCharacter),
                "{bad}"
            );
        }
        // Quoted local parts keep their specials; atext stays allowed.
        assert!(Address::parse("\"a@b\"@x.org").is_ok());
        assert!(Address::parse("!#$%&'*+-/=?^_`{|}~.a@x.org").is_ok());
        assert_eq!(Address::parse("a@[../x]"), Err(AddressError::BadDomain));
        assert!(Address::parse("a@[192.0.2.1]").is_ok());
        assert!(Address::parse("a@[IPv6:2001:db8::1]").is_ok());
        assert_eq!(
            Address::parse(&format!("{}@x.org", "a".repeat(65))),
            Err(AddressError::LocalTooLong)
        );
    }

    #[test]
    fn utf8_addresses() {
        let a = Address::parse("jürgen@Bücher.example").unwrap();
        assert_eq!(a.domain(), "bücher.example");
        assert!(!a.is_ascii());
    }

    #[test]
    fn plus_addressing() {
        let a = Address::parse("alice+lists@x.org").unwrap();
        let (base, tag) = a.without_tag("+");
        assert_eq!(base.to_string(), "alice@x.org");
        assert_eq!(tag.as_deref(), Some("lists"));
        assert_eq!(a.without_tag("").1, None);
        let leading = Address::parse("+x@x.org").unwrap();
        assert_eq!(leading.without_tag("+").1, None);
    }
}
