//! DKIM signing (RFC 6376) of mail our users send: every key found for
//! the From domain in `<paths.dkim_keys>/<domain>/<selector>.pem` signs
//! (an RSA and an Ed25519 key give two signatures, RFC 8463 3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use mail_auth::AuthenticatedMessage;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

/// The header fields signed (RFC 6376 5.4.1). From is listed twice so a
/// second From cannot be added later (oversigning, RFC 6376 8.15); a
/// listed field the message lacks is signed as absent.
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct KeyError {
    pub path: PathBuf,
    pub reason: String,
}

/// The signers, by domain (lowercase).
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Vec<DkimSigner<DkimKey, Done>>>,
}

impl Signers {
    /// Load every key under `dir` (a missing directory: no keys). A key
    /// that cannot be used is logged and left out: mail still flows,
    /// unsigned for that selector, and the daemon does not stop.
    pub fn load(dir: &Path) -> Signers {
        let mut problems = Vec::new();
        let signers = Self::load_keys(dir, &mut problems);
        for e in problems {
            tracing::error!("DKIM key not used: {e}");
        }
        signers
    }

    fn load_keys(dir: &Path, problems: &mut Vec<KeyError>) -> Signers {
        let mut signers = Signers::default();
        let error = |path: &Path, reason: String| KeyError {
            path: path.to_path_buf(),
            reason,
        };
        let domains = match std::fs::read_dir(dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return signers,
            Err(e) => {
                problems.push(error(dir, e.to_string()));
                return signers;
            }
        };
        for domain in domains.filter_map(Result::ok) {
            let domain = domain.path();
            let Some(name) = domain.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !domain.is_dir() || name.starts_with('.') {
                continue;
            }
            let name = name.to_ascii_lowercase();
            let keys = match std::fs::read_dir(&domain) {
                Ok(k) => k,
                Err(e) => {
                    problems.push(error(&domain, e.to_string()));
                    continue;
                }
            };
            let mut paths: Vec<PathBuf> = keys
                .filter_map(|k| k.ok().map(|k| k.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "pem"))
                .collect();
            paths.sort();
            for path in paths {
                let selector = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                let key = match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| load_key(&pem))
                {
                    Ok(k) => k,
                    Err(e) => {
                        problems.push(error(&path, e));
                        continue;
                    }
                };
                let signer = DkimSigner::from_key(key)
                    .domain(name.clone())
                    .selector(selector)
                    .headers(SIGNED_HEADERS.iter().copied());
                signers
                    .by_domain
                    .entry(name.clone())
                    .or_default()
                    .push(signer);
            }
        }
        signers
    }

    /// Whether there is no key at all.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The DKIM-Signature fields (CRLF-ended) for `message` (as stored,
    /// CRLF), from the keys of its From domain, if `may_sign` allows its
    /// From address; empty when there are none.
    pub fn sign(&self, message: &[u8], may_sign: impl Fn(&str) -> bool) -> String {
        if self.by_domain.is_empty() {
            return String::new();
        }
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            return String::new();
        };
        let from = parsed.from();
        let Some((_, domain)) = from.rsplit_once('@') else {
            return String::new();
        };
        let Some(signers) = self.by_domain.get(&domain.to_ascii_lowercase()) else {
            return String::new();
        };
        // Every From address, not just the first: a second one must not
        // ride on a signature the sender may have (RFC 6376 8.15).
        if let Some(other) = parsed.froms().iter().find(|f| !may_sign(f)) {
            tracing::info!("not signing for <{other}>: not an address of the sender");
            return String::new();
        }
        let mut out = String::new();
        for signer in signers {
            match signer.sign(message) {
                Ok(signature) => out.push_str(&signature.to_header()),
                Err(e) => tracing::error!("DKIM signing for {domain} failed: {e}"),
            }
        }
        out
    }
}

/// An RSA (2048 to 4096 bits, as ring signs) or Ed25519 private key from
/// PEM (PKCS#8, or PKCS#1 for RSA).
fn load_key(pem: &[u8]) -> Result<DkimKey, String> {
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))?;
    if let PrivateKeyDer::Pkcs8(p8) = &der {
        if let Ok(key) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
            return Ok(DkimKey::Ed25519(key));
        }
    }
    RsaKey::<Sha256>::from_key_der(der)
        .map(DkimKey::Rsa)
        .map_err(|e| format!("not a usable RSA or Ed25519 key: {e}"))
}
