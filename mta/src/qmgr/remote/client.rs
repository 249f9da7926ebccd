//! The SMTP client's I/O: one connection to one server, reading replies
//! and writing commands with the timeouts of RFC 5321 4.5.3.2.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::tls::TlsSummary;
use rustls_pki_types::ServerName;
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// RFC 5321 4.5.3.2: initial 220 message, MAIL and RCPT: 5 minutes (also
/// used for EHLO, STARTTLS, AUTH and RSET).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// RFC 5321 4.5.3.2.4: DATA initiation, 2 minutes.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(120);
/// RFC 5321 4.5.3.2.5: each data block, 3 minutes.
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(180);
/// RFC 5321 4.5.3.2.6: the reply to the final dot, 10 minutes.
pub const FINAL_TIMEOUT: Duration = Duration::from_secs(600);
/// QUIT is a courtesy; nobody waits long for its answer.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest reply read (an EHLO reply is a few hundred bytes).
const MAX_REPLY: usize = 64 * 1024;

/// A byte stream: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a connection is no longer usable.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("connection closed by the server {0}")]
    Closed(&'static str),
    #[error("malformed reply {0}: {1}")]
    BadReply(&'static str, String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// One SMTP connection.
pub struct Connection {
    stream: Box<dyn Io>,
    /// Bytes read but not yet parsed (pipelined replies).
    pending: Vec<u8>,
}

impl Connection {
    /// Open a TCP connection to `addr`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Connection, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("connecting"))??;
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream: Box::new(stream),
            pending: Vec::new(),
        })
    }

    /// Start TLS over the connection (after `220` to STARTTLS, or at once
    /// for implicit TLS). `name` is sent as SNI when it is a host name.
    pub async fn start_tls(
        self,
        connector: &TlsConnector,
        name: &str,
    ) -> Result<(Self, Option<TlsSummary>), ClientError> {
        if !self.pending.is_empty() {
            // RFC 3207 5: nothing may precede the handshake; a server that
            // sent more than its 220 is injecting plaintext.
            return Err(ClientError::BadReply(
                "to STARTTLS",
                "data after the 220 reply".into(),
            ));
        }
        let server_name = ServerName::try_from(name.to_string())
            .unwrap_or_else(|_| ServerName::try_from("invalid").expect("valid DNS name"));
        let tls =
            tokio::time::timeout(COMMAND_TIMEOUT, connector.connect(server_name, self.stream))
                .await
                .map_err(|_| ClientError::Timeout("in the TLS handshake"))?
                .map_err(ClientError::Tls)?;
        let summary = TlsSummary::of(tls.get_ref().1);
        let conn = Connection {
            stream: Box::new(tls),
            pending: Vec::new(),
        };
        Ok((conn, summary))
    }

    /// Write `bytes` and flush.
    pub async fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| ClientError::Timeout("sending"))??;
        Ok(())
    }

    /// Read one (possibly multi-line) reply; also returns its raw bytes.
    pub async fn reply(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<(Response<String>, Vec<u8>), ClientError> {
        let mut receiver = ResponseReceiver::default();
        let mut raw = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.pending.is_empty() {
                let mut bytes = self.pending.iter();
                let parsed = receiver.parse(&mut bytes);
                let used = self.pending.len() - bytes.as_slice().len();
                raw.extend(self.pending.drain(..used));
                match parsed {
                    Ok(reply) => return Ok((reply, raw)),
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => return Err(ClientError::BadReply(what, e.to_string())),
                }
            }
            if raw.len() > MAX_REPLY {
                return Err(ClientError::BadReply(what, "reply too long".into()));
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| ClientError::Timeout(what))??;
            if n == 0 {
                return Err(ClientError::Closed(what));
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Send a command line and read its reply.
    pub async fn command(
        &mut self,
        line: &str,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Response<String>, ClientError> {
        self.send(line.as_bytes(), timeout).await?;
        Ok(self.reply(timeout, what).await?.0)
    }
}

/// TLS for outgoing connections: encryption against passive eavesdropping
/// without certificate checks, as opportunistic STARTTLS is (RFC 7435;
/// Postfix's "may" and "encrypt" levels verify nothing either, since MX
/// host certificates are rarely valid for the name looked up).
pub fn unverified_connector() -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Accepts any certificate, yet checks the handshake signatures, so the
/// session is still bound to the key the server presented.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
