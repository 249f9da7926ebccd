//! TLS for the servers: the rustls configuration from the PEM files named
//! in the config (ring provider), the bounded handshake, and what a
//! `Received:` header says of a connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificate: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("{path}: cannot read private key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{cert} and {key} do not belong together: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The bytes of a certificate chain and its key, as read from their PEM
/// files (by a daemon at start, or by `master` for a reload, see
/// [`crate::tls_handoff`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        write!(f, "Pem({} + {} bytes)", self.cert.len(), self.key.len())
    }
}

/// Largest certificate chain or key file accepted (a chain is a few KiB).
pub const MAX_PEM_FILE: usize = 256 * 1024;

/// Read the certificate and key files named in `config`.
pub fn read_pem(config: &TlsConfig) -> Result<Pem, TlsError> {
    let read = |path: &Path| -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PEM_FILE as u64 + 1).read_to_end(&mut bytes))
            .map_err(|e| e.to_string())?;
        if bytes.len() > MAX_PEM_FILE {
            return Err(format!("larger than {MAX_PEM_FILE} bytes"));
        }
        Ok(bytes)
    };
    let cert = read(&config.cert).map_err(|reason| TlsError::Certificate {
        path: config.cert.clone(),
        reason,
    })?;
    let key = read(&config.key).map_err(|reason| TlsError::Key {
        path: config.key.clone(),
        reason,
    })?;
    Ok(Pem { cert, key })
}

/// A rustls server configuration for the certificate chain and key in
/// `pem` (read from the files of `config`, which errors name), with safe
/// default protocol versions (TLS 1.2 and 1.3).
pub fn server_config_from_pem(
    config: &TlsConfig,
    pem: &Pem,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert, key) = (&config.cert, &config.key);
    let cert_err = |reason: String| TlsError::Certificate {
        path: cert.clone(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE section".into()));
    }
    let private = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| TlsError::Key {
        path: key.clone(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mismatch = |reason: String| TlsError::Mismatch {
        cert: cert.clone(),
        key: key.clone(),
        reason,
    };
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| mismatch(e.to_string()))?;
    Ok(Arc::new(server))
}

/// The rustls server configuration for the files named in `config`.
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_from_pem(config, &read_pem(config)?)
}

/// The acceptor for the certificate and key in `config`.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    server_config(config).map(TlsAcceptor::from)
}

/// The acceptor for `pem`, the contents of the files named in `config`.
pub fn acceptor_from_pem(config: &TlsConfig, pem: &Pem) -> Result<TlsAcceptor, TlsError> {
    server_config_from_pem(config, pem).map(TlsAcceptor::from)
}

/// The TLS handshake on an accepted connection, bounded in time; None
/// (logged at debug level with `protocol`) when it fails.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    protocol: &str,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!("{protocol} TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("{protocol} TLS handshake timed out");
            None
        }
    }
}

/// The negotiated protocol version and cipher suite, as Postfix writes
/// them in `Received:` (`TLSv1.3`, `TLS_AES_256_GCM_SHA384`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    pub version: String,
    pub cipher: String,
}

impl std::fmt::Display for TlsSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} with cipher {}", self.version, self.cipher)
    }
}

impl TlsSummary {
    /// What `connection` (server or client side) negotiated (None before
    /// the handshake ends).
    pub fn of(connection: &rustls::CommonState) -> Option<TlsSummary> {
        let version = match connection.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
            other => format!("{other:?}"),
        };
        let suite = format!("{:?}", connection.negotiated_cipher_suite()?.suite());
        // rustls prefixes its TLS 1.3 suites with TLS13_; the IANA names
        // (RFC 8446 B.4) start with TLS_.
        let cipher = match suite.strip_prefix("TLS13_") {
            Some(rest) => format!("TLS_{rest}"),
            None => suite,
        };
        Some(TlsSummary { version, cipher })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = TlsConfig {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        let e = server_config(&config).unwrap_err().to_string();
        assert!(e.contains("cert.pem: cannot read certificate"), "{e}");
        std::fs::write(&config.cert, "not pem").unwrap();
        std::fs::write(&config.key, "not pem").unwrap();
        let e = server_config(&config).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }
}
