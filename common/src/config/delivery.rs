//! `[dns]` and `[delivery]`: how qmgr finds and talks to other mail
//! servers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The DNS servers qmgr asks (MX, A, AAAA).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers as `ip:port`; empty: those of `/etc/resolv.conf`.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Seconds to wait for one answer.
    #[serde(default = "default_dns_timeout")]
    pub timeout: u64,
    /// Tries per query and server.
    #[serde(default = "default_dns_attempts")]
    pub attempts: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: default_dns_timeout(),
            attempts: default_dns_attempts(),
        }
    }
}

fn default_dns_timeout() -> u64 {
    5
}
fn default_dns_attempts() -> usize {
    2
}

/// TLS on an outgoing SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when the server offers it, else plaintext (RFC 3207 is
    /// opportunistic; Postfix's "may").
    #[default]
    May,
    /// STARTTLS or no delivery (Postfix's "encrypt"); the certificate is
    /// not verified.
    Required,
    /// TLS from the first byte (RFC 8314), for a relay host on port 465.
    Implicit,
}

/// Remote delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Port of other domains' MX hosts.
    #[serde(default = "default_remote_port")]
    pub remote_port: u16,
    /// Outgoing SMTP sessions at once, over all destinations.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds to wait for a TCP connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// Connections open at once to one destination (domain or relay host).
    #[serde(default = "default_max_connections_per_destination")]
    pub max_connections_per_destination: usize,
    /// Recipients sent in one transaction.
    #[serde(default = "default_max_recipients_per_transaction")]
    pub max_recipients_per_transaction: usize,
    /// Seconds an idle connection stays open for the next message to the
    /// same destination.
    #[serde(default = "default_connection_cache_time")]
    pub connection_cache_time: u64,
    /// TLS for MX delivery (`implicit` is for relay hosts only).
    #[serde(default)]
    pub tls: TlsPolicy,
    /// Per destination domain settings.
    #[serde(default)]
    pub domains: BTreeMap<String, DomainPolicy>,
    /// Send everything not local through this host instead of MX lookup.
    #[serde(default)]
    pub relay: Option<RelayConfig>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            remote_port: default_remote_port(),
            max_connections: default_max_connections(),
            connect_timeout: default_connect_timeout(),
            max_connections_per_destination: default_max_connections_per_destination(),
            max_recipients_per_transaction: default_max_recipients_per_transaction(),
            connection_cache_time: default_connection_cache_time(),
            tls: TlsPolicy::default(),
            domains: BTreeMap::new(),
            relay: None,
        }
    }
}

impl DeliveryConfig {
    /// The TLS policy for mail to `domain` (lowercase).
    pub fn tls_for(&self, domain: &str) -> TlsPolicy {
        self.domains
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .and_then(|(_, p)| p.tls)
            .unwrap_or(self.tls)
    }
}

fn default_remote_port() -> u16 {
    25
}
fn default_max_connections() -> usize {
    100
}
fn default_connect_timeout() -> u64 {
    30
}
fn default_max_connections_per_destination() -> usize {
    20
}
fn default_max_recipients_per_transaction() -> usize {
    50
}
fn default_connection_cache_time() -> u64 {
    2
}

/// Settings for mail to one domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// Overrides `delivery.tls`.
    #[serde(default)]
    pub tls: Option<TlsPolicy>,
}

/// A relay host (smarthost).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Host name (its A/AAAA records, no MX lookup) or IP address.
    pub host: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: TlsPolicy,
    /// File holding `username:password` for AUTH; readable by qmgr and
    /// nobody else.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
}

fn default_relay_port() -> u16 {
    25
}
