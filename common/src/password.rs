//! Password hashes in Dovecot's `{SCHEME}hash` notation.
//!
//! New hashes are Argon2id. Hashes written by `doveadm pw` in the schemes
//! ARGON2ID, ARGON2I, SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT and CRYPT (when
//! the crypt string is one of those) verify as they are, so a passwd-file
//! migrates without resetting passwords.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Why a stored hash cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("unsupported password scheme `{0}`")]
    UnsupportedScheme(String),
    #[error("malformed {0} hash")]
    Malformed(&'static str),
}

/// Hash `password` for storage, as `{ARGON2ID}$argon2id$v=19$...`.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters and a generated salt cannot fail");
    format!("{{ARGON2ID}}{hash}")
}

/// Check `password` against a stored `{SCHEME}hash`. A hash without a scheme
/// prefix is taken as CRYPT, as Dovecot's passwd-file default does.
pub fn verify_password(stored: &str, password: &str) -> Result<bool, HashError> {
    let (scheme, hash) = split_scheme(stored);
    match scheme.to_ascii_uppercase().as_str() {
        "ARGON2ID" | "ARGON2I" => verify_argon2(hash),
        "SHA512-CRYPT" | "SHA256-CRYPT" | "BLF-CRYPT" | "CRYPT" => verify_crypt(hash),
        other => Err(HashError::UnsupportedScheme(other.to_string())),
    }
    .map(|verify| verify(password))
}

/// Check that a stored hash is one this module can verify, without a
/// password; used when loading the user database.
pub fn check_hash_format(stored: &str) -> Result<(), HashError> {
    verify_password(stored, "").map(|_| ())
}

fn split_scheme(stored: &str) -> (&str, &str) {
    if let Some(rest) = stored.strip_prefix('{') {
        if let Some((scheme, hash)) = rest.split_once('}') {
            return (scheme, hash);
        }
    }
    ("CRYPT", stored)
}

type Verifier<'a> = Box<dyn Fn(&str) -> bool + 'a>;

fn verify_argon2(hash: &str) -> Result<Verifier<'_>, HashError> {
    let parsed = PasswordHash::new(hash).map_err(|_| HashError::Malformed("ARGON2"))?;
    Ok(Box::new(move |pw: &str| {
        Argon2::default()
            .verify_password(pw.as_bytes(), &parsed)
            .is_ok()
    }))
}

/// crypt(3) strings, told apart by their `$id$` prefix.
fn verify_crypt(hash: &str) -> Result<Verifier<'_>, HashError> {
    if hash.starts_with("$6$") {
        if hash.split('$').count() < 4 {
            return Err(HashError::Malformed("SHA512-CRYPT"));
        }
        Ok(Box::new(move |pw: &str| {
            sha_crypt::sha512_check(pw, hash).is_ok()
        }))
    } else if hash.starts_with("$5$") {
        if hash.split('$').count() < 4 {
            return Err(HashError::Malformed("SHA256-CRYPT"));
        }
        Ok(Box::new(move |pw: &str| {
            sha_crypt::sha256_check(pw, hash).is_ok()
        }))
    } else if ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| hash.starts_with(p))
    {
        if hash.len() != 60 {
            return Err(HashError::Malformed("BLF-CRYPT"));
        }
        Ok(Box::new(move |pw: &str| {
            bcrypt::verify(pw, hash).unwrap_or(false)
        }))
    } else if hash.starts_with("$argon2") {
        verify_argon2(hash)
    } else {
        Err(HashError::UnsupportedScheme(
            "CRYPT (only $6$, $5$, $2y$ and $argon2 crypt strings)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_hash_roundtrip() {
        let h = hash_password("s3cret");
        assert!(h.starts_with("{ARGON2ID}$argon2id$"));
        assert!(verify_password(&h, "s3cret").unwrap());
        assert!(!verify_password(&h, "s3cret ").unwrap());
    }

    // Made by glibc crypt(3) (what `doveadm pw -s SHA512-CRYPT` calls).
    const SHA512: &str = "{SHA512-CRYPT}$6$W/MY2D5gaNqmKsBi$hEcBydFyl7TJ2xbqS1dQM6i3.PYt42xEPKvODP3jqpabrSqnYW.EPVwbpt8j.cWipkavDMiA.1LPYi6Zdj8wo/";
    // Made by libxcrypt's bcrypt with the $2y$ prefix Dovecot writes.
    const BLF: &str = "{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuOQiyCxlgf/oeuTqixKmWdcYUh4Hjl0a";

    #[test]
    fn sha512_crypt_from_crypt3() {
        assert!(verify_password(SHA512, "secret").unwrap());
        assert!(!verify_password(SHA512, "Secret").unwrap());
    }

    #[test]
    fn bcrypt_from_crypt3() {
        assert!(verify_password(BLF, "secret").unwrap());
        assert!(!verify_password(BLF, "secreT").unwrap());
    }

    #[test]
    fn bare_crypt_string_is_crypt() {
        let bare = SHA512.trim_start_matches("{SHA512-CRYPT}");
        assert!(verify_password(bare, "secret").unwrap());
    }

    /// Made by Dovecot 2.3's `doveadm pw -s <SCHEME> -p 'dovecot secret'`.
    const DOVEADM: [&str; 5] = [
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$TCntwAnoaf7MhCENASBORw$0K7RSbEcOMrM6W6+uWwO8hWSRPvJ9tQrauxvu8DL6Zc",
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$WgjmP5pwL0hpsEfooMUIgQ$LBwB1M2zbRKOZLOPjKt14fJB/j8NGj+3jRsS0MsBpNs",
        "{SHA512-CRYPT}$6$RNxocVGa4Zu84AnG$2UULxXCZ7nxc0uGY7164mxBEJagHNobvALIP5qxJQYf4tBtOppQrxnFAbs4sKXtl/ybddu/NsyXmwS0nTBq8d/",
        "{SHA256-CRYPT}$5$kd7T/blnNghEc21k$Y6iF2srRKarasrAMyJ3dJ3TBByqSC.9XX8JSJQOuab8",
        "{BLF-CRYPT}$2y$05$AGvWzS5dj4vKX8CvRQlzDeoV/uL4LxMXPrN2VBScuD8mHgHqcf7AW",
    ];

    #[test]
    fn hashes_made_by_doveadm_verify() {
        for stored in DOVEADM {
            assert!(
                verify_password(stored, "dovecot secret").unwrap(),
                "{stored}"
            );
            assert!(
                !verify_password(stored, "dovecot secreT").unwrap(),
                "{stored}"
            );
        }
    }

    #[test]
    fn unknown_or_broken_schemes_are_errors() {
        assert!(matches!(
            verify_password("{MD5}abc", "x"),
            Err(HashError::UnsupportedScheme(_))
        ));
        assert!(check_hash_format("{BLF-CRYPT}$2y$05$short").is_err());
        assert!(check_hash_format("{ARGON2ID}nonsense").is_err());
        assert!(check_hash_format(SHA512).is_ok());
    }
}
