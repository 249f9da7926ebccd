//! What the IMAP and POP3 servers share: settings a reload replaces, the
//! user directory, the login throttle, connection limits, the shutdown
//! signal, and the TLS handshake.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use common::config::Config;
use common::login::LoginThrottle;
use common::net::{accept_loop, ConnectionLimiter, ConnectionSlot};
use common::recipients::DirectoryCache;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::login::LoginPolicy;

/// Settings that a reload replaces.
pub struct Settings {
    pub config: Config,
    pub tls: Option<TlsAcceptor>,
}

impl Settings {
    /// What a new session may do.
    pub fn login_policy(&self) -> LoginPolicy {
        LoginPolicy {
            hostname: self.config.hostname.clone(),
            allow_plaintext_auth: self.config.maildird.allow_plaintext_auth,
            tls_available: self.tls.is_some(),
        }
    }
}

/// The state one protocol's sessions share.
pub struct Access {
    settings: RwLock<Arc<Settings>>,
    pub directory: Arc<DirectoryCache>,
    pub throttle: LoginThrottle,
    connections: ConnectionLimiter,
    pub shutdown: watch::Receiver<bool>,
}

impl Access {
    /// Shared state for `config`; `tls` is the acceptor for STARTTLS/STLS
    /// and the implicit-TLS ports.
    pub fn new(
        config: Config,
        tls: Option<TlsAcceptor>,
        directory: Arc<DirectoryCache>,
        shutdown: watch::Receiver<bool>,
    ) -> Access {
        let limits = &config.maildird.limits;
        let throttle = LoginThrottle::new(
            limits.max_auth_failures,
            limits.max_account_auth_failures,
            Duration::from_secs(limits.auth_failure_window),
            Duration::from_secs(limits.login_cache_ttl),
        );
        Access {
            settings: RwLock::new(Arc::new(Settings { config, tls })),
            directory,
            throttle,
            connections: ConnectionLimiter::default(),
            shutdown,
        }
    }

    /// Replace the settings and certificate (SIGHUP); open sessions keep
    /// theirs.
    pub fn reload(&self, config: Config, tls: Option<TlsAcceptor>) {
        let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
        *s = Arc::new(Settings { config, tls });
    }

    /// The settings now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sessions now open.
    pub fn active_sessions(&self) -> usize {
        self.connections.active()
    }

    /// Count a new connection against the configured limits (the slot is
    /// given back when dropped), or refuse it: with `refusal` on a plain
    /// port, in silence on an implicit-TLS one (nothing goes out in clear).
    pub async fn admit(
        &self,
        stream: &mut TcpStream,
        ip: IpAddr,
        settings: &Settings,
        implicit_tls: bool,
        refusal: &[u8],
    ) -> Option<ConnectionSlot<'_>> {
        let limits = &settings.config.maildird.limits;
        let admitted = self.connections.admit(
            ip,
            limits.max_connections,
            limits.max_connections_per_client,
        );
        match admitted {
            Ok(slot) => {
                let _ = stream.set_nodelay(true);
                Some(slot)
            }
            Err(_) => {
                if !implicit_tls {
                    let _ = stream.write_all(refusal).await;
                }
                None
            }
        }
    }

    /// Accept connections until shutdown, handing each to `connection`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        connection: impl FnMut(TcpStream, SocketAddr),
    ) {
        accept_loop(listener, self.shutdown.clone(), connection).await;
    }
}

/// The TLS handshake with the acceptor of `settings`; None (logged) when
/// there is none or it fails.
pub async fn handshake(
    stream: TcpStream,
    settings: &Settings,
    protocol: &str,
) -> Option<TlsStream<TcpStream>> {
    let acceptor = settings.tls.as_ref()?;
    common::tls::handshake(acceptor, stream, protocol).await
}
