//! The client side of TLS: the rustls configuration (ring provider) and the
//! certificate verifier of `--tls-insecure`.
//!
//! loadgen has no trust store (the workspace has no root certificate crate),
//! so it only talks TLS with `--tls-insecure`: any certificate is accepted,
//! but the handshake signatures are verified as usual, so the client does
//! the work of a real one apart from checking the chain.

use std::fmt;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

/// What the client needs for every TLS handshake of the run.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: TlsConnector,
    /// The name sent in SNI (none for an IP address).
    pub server_name: ServerName<'static>,
}

impl TlsClient {
    /// A client for `server` (HOST:PORT) that accepts any certificate.
    /// Session resumption is off: every connection does a full handshake,
    /// as many distinct clients would.
    pub fn insecure(server: &str) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AcceptAnyCertificate {
            provider: Arc::clone(&provider),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: server_name(server)?,
        })
    }
}

/// The TLS server name of `server`, HOST:PORT (`[v6]:PORT` for IPv6).
fn server_name(server: &str) -> Result<ServerName<'static>> {
    let (host, _port) = server
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--server {server:?}: no port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_owned())
        .map_err(|e| anyhow!("--server {server:?}: {host:?} is no TLS server name: {e}"))
}

/// Accepts every certificate chain; checks the handshake signatures with
/// the provider's algorithms.
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for AcceptAnyCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptAnyCertificate")
    }
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1:465"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:587"),
            Ok(ServerName::IpAddress(_))
        ));
        let dns = server_name("mail.example.test:587").expect("valid");
        assert_eq!(dns.to_str(), "mail.example.test");
        assert!(server_name("mail.example.test").is_err(), "no port");
        assert!(server_name("bad name:25").is_err());
    }

    #[test]
    fn insecure_client_builds() {
        let client = TlsClient::insecure("localhost:465").expect("client");
        assert_eq!(client.server_name.to_str(), "localhost");
    }
}
