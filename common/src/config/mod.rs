//! The one configuration file, `mailsrv.toml`.
//!
//! Loading validates everything: unknown keys, wrong types and bad values are
//! reported with the file, the line and the dotted key, for example
//! `/etc/mailsrv/mailsrv.toml:12: smtpd.listen: invalid socket address syntax`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

mod checks;
mod delivery;

pub use checks::{
    CheckAction, ChecksConfig, ClamdConfig, DnsList, GreylistConfig, ScanFailure, ScannerAddress,
    SpamdConfig,
};
pub use delivery::{DeliveryConfig, DnsConfig, DomainPolicy, RelayConfig, TlsPolicy};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mailsrv/mailsrv.toml";

/// Environment variable that overrides [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "MAILSRV_CONFIG";

/// A configuration problem, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Fully qualified name of this host, used in banners and `Received:`.
    pub hostname: String,
    /// Filesystem locations.
    pub paths: Paths,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The SMTP receiver.
    pub smtpd: SmtpdConfig,
    /// The queue manager.
    #[serde(default)]
    pub qmgr: QmgrConfig,
    /// Address handling shared by smtpd and qmgr.
    #[serde(default)]
    pub addresses: AddressConfig,
    /// The name servers qmgr asks.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Delivery to other mail servers.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Sender authentication checks of incoming mail.
    #[serde(default)]
    pub checks: ChecksConfig,
    /// TLS certificate and key.
    pub tls: TlsConfig,
    /// The IMAP and POP3 server.
    #[serde(default)]
    pub maildird: MaildirdConfig,
    /// The system users the daemons drop to when started as root. Absent:
    /// every daemon runs as whoever starts it.
    #[serde(default)]
    pub privileges: Option<PrivilegesConfig>,
}

/// Who each daemon runs as after it has bound its ports and read its key
/// (when started as root).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegesConfig {
    /// Runs smtpd; owns the spool.
    #[serde(default = "default_spool_user")]
    pub spool_user: String,
    /// Runs qmgr (local delivery) and maildird; owns the mail store.
    #[serde(default = "default_store_user")]
    pub store_user: String,
    /// May read the user database, the config, the tables and the TLS key;
    /// every daemon gets it as a supplementary group.
    #[serde(default = "default_secret_group")]
    pub secret_group: String,
    /// The group `sendmail` is installed setgid to: it may write into the
    /// maildrop and nothing else, so any local user can queue mail
    /// (Postfix's postdrop). qmgr gets it to read what is dropped.
    #[serde(default = "default_maildrop_group")]
    pub maildrop_group: String,
}

fn default_spool_user() -> String {
    "mailsrv".into()
}
fn default_store_user() -> String {
    "vmail".into()
}
fn default_maildrop_group() -> String {
    "mailsrv-drop".into()
}
fn default_secret_group() -> String {
    "mailkeys".into()
}

/// Where state lives. Relative paths are taken relative to the directory of
/// the configuration file, so an installation made by `mailctl init` can move.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    /// Queue directory (incoming, active, deferred, hold, corrupt, maildrop).
    pub spool: PathBuf,
    /// Root of the mail store: the Maildir of `u@d` is `<mail_root>/d/u/`.
    pub mail_root: PathBuf,
    /// User database in Dovecot passwd-file shape.
    pub users: PathBuf,
    /// Aliases file.
    pub aliases: PathBuf,
    /// Served (local) domains, one per line.
    pub domains: PathBuf,
    /// Pid files and the supervisor's lock.
    pub run_dir: PathBuf,
    /// Where the supervisor writes daemon logs when not in the foreground.
    pub log_file: PathBuf,
    /// Directory holding the daemon binaries; by default the directory of
    /// the running program.
    #[serde(default)]
    pub libexec_dir: Option<PathBuf>,
    /// DKIM signing keys: `<dkim_keys>/<domain>/<selector>.pem` (RSA or
    /// Ed25519, PKCS#8 or PKCS#1 PEM), made by `mailctl dkim keygen`.
    #[serde(default = "default_dkim_keys")]
    pub dkim_keys: PathBuf,
}

fn default_dkim_keys() -> PathBuf {
    "dkim".into()
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// One of error, warn, info, debug, trace.
    #[serde(default = "default_log_level", deserialize_with = "de_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

fn de_log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
        _ => Err(D::Error::custom(
            "expected one of error, warn, info, debug, trace",
        )),
    }
}

/// The SMTP receiver's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpdConfig {
    /// Addresses of the MX (port 25) listeners: STARTTLS offered, no AUTH.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Message submission listeners (RFC 6409, port 587): STARTTLS, and
    /// AUTH required before MAIL.
    #[serde(default)]
    pub submission_listen: Vec<SocketAddr>,
    /// Submission over implicit TLS (RFC 8314, port 465), AUTH required.
    #[serde(default)]
    pub submissions_listen: Vec<SocketAddr>,
    /// Offer and accept AUTH before TLS. Off: passwords never cross the
    /// network in clear.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Failed authentications from one client address within
    /// `auth_failure_window` before AUTH from it is refused (454) until the
    /// window passes.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    /// Failed authentications for one account, from anywhere, within
    /// `auth_failure_window` before AUTH as that account is refused.
    #[serde(default = "default_max_account_auth_failures")]
    pub max_account_auth_failures: u32,
    /// Seconds over which failed authentications are counted.
    #[serde(default = "default_auth_failure_window")]
    pub auth_failure_window: u64,
    /// Seconds a right password is remembered (a keyed digest of it, in
    /// memory), so the same client logging in again skips the slow hash;
    /// 0 checks every login in full.
    #[serde(default = "default_login_cache_ttl")]
    pub login_cache_ttl: u64,
    /// Write the authenticated user's name into the `Received:` header
    /// (otherwise only the fact of authentication, as `with ESMTPSA`).
    #[serde(default)]
    pub received_auth_user: bool,
    /// NOOP, RSET, VRFY, HELP and unknown commands a session may send
    /// before it is disconnected with 421 (Postfix's
    /// smtpd_junk_command_limit).
    #[serde(default = "default_max_junk_commands")]
    pub max_junk_commands: u32,
    /// Largest message accepted, in bytes (RFC 1870 SIZE).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Most recipients in one transaction (RFC 5321 4.5.3.1.8 asks for 100).
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4 asks for 512).
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// Seconds to wait for a command (RFC 5321 4.5.3.2.7 asks for 5 minutes).
    #[serde(default = "default_command_timeout")]
    pub command_timeout: u64,
    /// Seconds to wait for each block of message data (RFC 5321 4.5.3.2.6).
    #[serde(default = "default_data_timeout")]
    pub data_timeout: u64,
    /// Most `Received:` fields a message may bring before it is refused as
    /// looping (554 5.4.6; RFC 5321 6.3 asks for a threshold of at least
    /// 100).
    #[serde(default = "default_max_received_headers")]
    pub max_received_headers: u32,
    /// Slowest message data accepted, in bytes a second: DATA, or a BDAT
    /// chunk, must end within `data_timeout` plus a second for every this
    /// many bytes received (Postfix's smtpd_min_data_rate).
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: u64,
    /// Longest a whole session may last, in seconds.
    #[serde(default = "default_session_timeout")]
    pub session_timeout: u64,
    /// Most simultaneous sessions.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most simultaneous sessions from one client address.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Error replies a client may provoke before it is disconnected with 421.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Networks whose clients may relay to domains we do not serve.
    #[serde(default)]
    pub relay_networks: Vec<IpNet>,
    /// Seconds given to open sessions to finish when stopping.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: u64,
    /// The window of the rate limits below, in seconds.
    #[serde(default = "default_rate_window")]
    pub rate_window: u64,
    /// Messages (MAIL commands) one client address (an IPv6 /64) may
    /// send per window; 0: no limit. Relay networks and authenticated
    /// sessions are exempt (users have their own limits).
    #[serde(default)]
    pub max_messages_per_client: u32,
    /// Recipients one client address may give per window; 0: no limit.
    #[serde(default)]
    pub max_recipients_per_client: u32,
    /// Messages one authenticated user may send per window; 0: no limit.
    #[serde(default)]
    pub max_messages_per_user: u32,
    /// Recipients one authenticated user may give per window; 0: no limit.
    #[serde(default)]
    pub max_recipients_per_user: u32,
}

fn default_rate_window() -> u64 {
    3600
}

fn default_max_message_size() -> u64 {
    25 * 1024 * 1024
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_line_length() -> usize {
    2048
}
fn default_command_timeout() -> u64 {
    300
}
fn default_data_timeout() -> u64 {
    180
}
fn default_session_timeout() -> u64 {
    1800
}
fn default_max_connections() -> usize {
    500
}
fn default_max_connections_per_client() -> usize {
    20
}
fn default_max_errors() -> u32 {
    10
}
fn default_shutdown_grace() -> u64 {
    10
}
fn default_max_received_headers() -> u32 {
    100
}
fn default_min_data_rate() -> u64 {
    500
}
fn default_max_junk_commands() -> u32 {
    100
}
fn default_max_account_auth_failures() -> u32 {
    30
}

/// The queue manager's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QmgrConfig {
    /// Delivery passes reading and writing files (queue, Maildirs) at the
    /// same time; remote sessions are limited by delivery.max_connections.
    #[serde(default = "default_delivery_concurrency")]
    pub delivery_concurrency: usize,
    /// Most entries in `active/` at once (Postfix's
    /// qmgr_message_active_limit): more wait in `incoming/`, on disk.
    #[serde(default = "default_active_limit")]
    pub active_limit: usize,
    /// First retry delay for a deferred message, in seconds.
    #[serde(default = "default_min_backoff")]
    pub min_backoff: u64,
    /// Longest retry delay, in seconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: u64,
    /// Seconds a message may wait in the queue; then what is still
    /// undelivered is returned to the sender (Postfix's
    /// maximal_queue_lifetime, 5 days).
    #[serde(default = "default_max_queue_lifetime")]
    pub max_queue_lifetime: u64,
    /// Seconds after arrival at which a sender whose message is still
    /// undelivered is told once that it is delayed; 0: never.
    #[serde(default = "default_delay_warning")]
    pub delay_warning: u64,
}

impl Default for QmgrConfig {
    fn default() -> Self {
        Self {
            delivery_concurrency: default_delivery_concurrency(),
            active_limit: default_active_limit(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            max_queue_lifetime: default_max_queue_lifetime(),
            delay_warning: default_delay_warning(),
        }
    }
}

fn default_delivery_concurrency() -> usize {
    8
}
fn default_active_limit() -> usize {
    2_000
}
fn default_min_backoff() -> u64 {
    300
}
fn default_delay_warning() -> u64 {
    4 * 3600
}
fn default_max_queue_lifetime() -> u64 {
    5 * 24 * 3600
}
fn default_max_backoff() -> u64 {
    4000
}

/// Address handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressConfig {
    /// Separates a user from a tag: `user+tag@d` reaches `user@d`. Empty
    /// turns plus-addressing off.
    #[serde(default = "default_recipient_delimiter")]
    pub recipient_delimiter: String,
}

impl Default for AddressConfig {
    fn default() -> Self {
        Self {
            recipient_delimiter: default_recipient_delimiter(),
        }
    }
}

fn default_recipient_delimiter() -> String {
    "+".into()
}

/// The mail access daemon's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaildirdConfig {
    /// IMAP listeners with STARTTLS (RFC 9051 6.2.1), usually port 143.
    #[serde(default)]
    pub imap_listen: Vec<SocketAddr>,
    /// IMAP listeners with implicit TLS (RFC 8314), usually port 993.
    #[serde(default)]
    pub imaps_listen: Vec<SocketAddr>,
    /// POP3 listeners with STLS (RFC 1939, RFC 2595), usually port 110.
    #[serde(default)]
    pub pop3_listen: Vec<SocketAddr>,
    /// POP3 listeners with implicit TLS (RFC 8314), usually port 995.
    #[serde(default)]
    pub pop3s_listen: Vec<SocketAddr>,
    /// Allow USER/PASS and AUTH before TLS. Off: passwords never cross the
    /// network in clear.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Limits shared by the protocols.
    #[serde(default)]
    pub limits: AccessLimits,
    /// Largest message APPEND accepts, in bytes.
    #[serde(default = "default_max_append_size")]
    pub max_append_size: u32,
}

impl Default for MaildirdConfig {
    fn default() -> Self {
        Self {
            imap_listen: Vec::new(),
            imaps_listen: Vec::new(),
            pop3_listen: Vec::new(),
            pop3s_listen: Vec::new(),
            allow_plaintext_auth: false,
            limits: AccessLimits::default(),
            max_append_size: default_max_append_size(),
        }
    }
}

fn default_max_append_size() -> u32 {
    64 * 1024 * 1024
}

/// Connection and login limits of maildird.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLimits {
    /// Most simultaneous sessions.
    #[serde(default = "default_access_max_connections")]
    pub max_connections: usize,
    /// Most simultaneous sessions from one client address.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Seconds a session may wait for a command (RFC 1939 3: at least 600;
    /// RFC 9051 5.4: an IMAP session at least 30 minutes, IDLE included,
    /// so IMAP uses the larger of this and 1800).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    /// Failed logins from one address within `auth_failure_window` before
    /// further logins from it are refused until the window passes.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    /// Failed logins for one account, from anywhere, within
    /// `auth_failure_window` before logins as it are refused.
    #[serde(default = "default_max_account_auth_failures")]
    pub max_account_auth_failures: u32,
    /// Seconds over which failed logins are counted.
    #[serde(default = "default_auth_failure_window")]
    pub auth_failure_window: u64,
    /// Seconds a right password is remembered (a keyed digest of it, in
    /// memory), so the same client logging in again skips the slow hash;
    /// 0 checks every login in full.
    #[serde(default = "default_login_cache_ttl")]
    pub login_cache_ttl: u64,
}

impl Default for AccessLimits {
    fn default() -> Self {
        Self {
            max_connections: default_access_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            idle_timeout: default_idle_timeout(),
            max_auth_failures: default_max_auth_failures(),
            max_account_auth_failures: default_max_account_auth_failures(),
            auth_failure_window: default_auth_failure_window(),
            login_cache_ttl: default_login_cache_ttl(),
        }
    }
}

fn default_access_max_connections() -> usize {
    1000
}
fn default_idle_timeout() -> u64 {
    600
}
fn default_max_auth_failures() -> u32 {
    10
}
fn default_auth_failure_window() -> u64 {
    300
}
/// Dovecot's auth_cache_ttl default: an hour.
fn default_login_cache_ttl() -> u64 {
    3600
}

/// TLS material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// An IP network in CIDR notation (`192.0.2.0/24`, `::1/128`, or a bare
/// address meaning a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies inside this network. IPv4-mapped IPv6 addresses
    /// match their IPv4 network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network (like 192.0.2.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

impl Config {
    /// The configuration file to use: `explicit`, else `$MAILSRV_CONFIG`,
    /// else [`DEFAULT_CONFIG_PATH`].
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        if let Some(p) = explicit {
            return p.to_path_buf();
        }
        match std::env::var_os(CONFIG_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.paths.make_absolute(base);
        absolutize(base, &mut config.tls.cert);
        absolutize(base, &mut config.tls.key);
        if let Some(file) = config
            .delivery
            .relay
            .as_mut()
            .and_then(|r| r.credentials.as_mut())
        {
            absolutize(base, file);
        }
        Ok(config)
    }

    /// Parse and validate `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line: span.map(|s| line_of(text, s.start)).unwrap_or(1),
                key,
                message,
            }
        };
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            invalid(inner.span(), key, inner.message().to_string())
        })?;
        config.validate().map_err(|(key, message)| {
            let span = key_span(text, &key);
            invalid(span, key, message)
        })?;
        Ok(config)
    }

    /// Checks that need more than one value at a time.
    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return fail("hostname", "must be a host name without spaces");
        }
        let s = &self.smtpd;
        if s.listen.is_empty() && s.submission_listen.is_empty() && s.submissions_listen.is_empty()
        {
            return fail(
                "smtpd.listen",
                "needs at least one address (or submission_listen or submissions_listen)",
            );
        }
        if self.smtpd.max_line_length < 512 {
            return fail(
                "smtpd.max_line_length",
                "must be at least 512 (RFC 5321 4.5.3.1.4)",
            );
        }
        if self.smtpd.max_recipients == 0 {
            return fail("smtpd.max_recipients", "must be at least 1");
        }
        let at_least_one = [
            ("smtpd.max_connections", self.smtpd.max_connections as u64),
            (
                "smtpd.max_connections_per_client",
                self.smtpd.max_connections_per_client as u64,
            ),
            ("smtpd.max_errors", u64::from(self.smtpd.max_errors)),
            (
                "smtpd.max_junk_commands",
                u64::from(self.smtpd.max_junk_commands),
            ),
            (
                "smtpd.max_auth_failures",
                u64::from(self.smtpd.max_auth_failures),
            ),
            (
                "smtpd.max_account_auth_failures",
                u64::from(self.smtpd.max_account_auth_failures),
            ),
            ("smtpd.auth_failure_window", self.smtpd.auth_failure_window),
            ("smtpd.command_timeout", self.smtpd.command_timeout),
            ("smtpd.data_timeout", self.smtpd.data_timeout),
            ("smtpd.min_data_rate", self.smtpd.min_data_rate),
            (
                "smtpd.max_received_headers",
                u64::from(self.smtpd.max_received_headers),
            ),
            ("smtpd.session_timeout", self.smtpd.session_timeout),
            ("smtpd.rate_window", self.smtpd.rate_window),
            ("dns.timeout", self.dns.timeout),
            ("dns.attempts", self.dns.attempts as u64),
            ("delivery.remote_port", u64::from(self.delivery.remote_port)),
            ("delivery.connect_timeout", self.delivery.connect_timeout),
            (
                "delivery.max_connections",
                self.delivery.max_connections as u64,
            ),
            (
                "delivery.max_connections_per_destination",
                self.delivery.max_connections_per_destination as u64,
            ),
            (
                "delivery.max_recipients_per_transaction",
                self.delivery.max_recipients_per_transaction as u64,
            ),
        ];
        let access = &self.maildird.limits;
        let at_least_one = at_least_one.into_iter().chain([
            (
                "maildird.limits.max_connections",
                access.max_connections as u64,
            ),
            (
                "maildird.limits.max_connections_per_client",
                access.max_connections_per_client as u64,
            ),
            (
                "maildird.limits.max_auth_failures",
                u64::from(access.max_auth_failures),
            ),
            (
                "maildird.limits.max_account_auth_failures",
                u64::from(access.max_account_auth_failures),
            ),
            (
                "maildird.limits.auth_failure_window",
                access.auth_failure_window,
            ),
        ]);
        let checks = &self.checks;
        let greylist = checks.greylist.iter().flat_map(|g| {
            [
                ("checks.greylist.retry_window", g.retry_window),
                ("checks.greylist.max_age", g.max_age),
                ("checks.greylist.max_entries", g.max_entries as u64),
            ]
        });
        let clamd = checks.clamd.iter().flat_map(|c| {
            [
                ("checks.clamd.timeout", c.timeout),
                ("checks.clamd.max_size", c.max_size),
            ]
        });
        let spamd = checks.spamd.iter().flat_map(|c| {
            [
                ("checks.spamd.timeout", c.timeout),
                ("checks.spamd.max_size", c.max_size),
            ]
        });
        let at_least_one = at_least_one.chain(greylist).chain(clamd).chain(spamd);
        // RFC 7489 4.2: DMARC is decided by the SPF and DKIM results; with
        // one of them missing a domain's good mail would fail it.
        if checks.dmarc && !(checks.spf && checks.dkim) {
            return fail(
                "checks.dmarc",
                "needs checks.spf and checks.dkim on (turn dmarc off too)",
            );
        }
        if let Some(g) = &checks.greylist {
            if g.retry_window <= g.delay {
                return fail(
                    "checks.greylist.retry_window",
                    "must be longer than checks.greylist.delay",
                );
            }
        }
        if let Some(score) = checks.spamd.as_ref().and_then(|s| s.reject_score) {
            if !score.is_finite() {
                return fail("checks.spamd.reject_score", "must be a number");
            }
        }
        if access.idle_timeout < 600 {
            return fail(
                "maildird.limits.idle_timeout",
                "must be at least 600 (RFC 1939 section 3)",
            );
        }
        if let Some((key, _)) = at_least_one.into_iter().find(|(_, v)| *v == 0) {
            return fail(key, "must be at least 1");
        }
        if self.qmgr.max_queue_lifetime == 0 {
            return fail("qmgr.max_queue_lifetime", "must be at least 1");
        }
        if self.qmgr.active_limit == 0 {
            return fail("qmgr.active_limit", "must be at least 1");
        }
        if self.qmgr.delivery_concurrency == 0 {
            return fail("qmgr.delivery_concurrency", "must be at least 1");
        }
        if self.qmgr.min_backoff == 0 || self.qmgr.min_backoff > self.qmgr.max_backoff {
            return fail(
                "qmgr.min_backoff",
                "must be at least 1 and at most qmgr.max_backoff",
            );
        }
        let implicit_policy = (self.delivery.tls == TlsPolicy::Implicit)
            .then(|| "delivery.tls".to_string())
            .or_else(|| {
                self.delivery
                    .domains
                    .iter()
                    .find(|(_, p)| p.tls == Some(TlsPolicy::Implicit))
                    .map(|(d, _)| format!("delivery.domains.{d}.tls"))
            });
        if let Some(key) = implicit_policy {
            // MX hosts listen on port 25, where TLS starts with STARTTLS.
            return fail(
                &key,
                "must be none, may or required (implicit is for a relay host)",
            );
        }
        if let Some(relay) = &self.delivery.relay {
            if relay.host.is_empty() || relay.host.contains(char::is_whitespace) {
                return fail("delivery.relay.host", "must be a host name or IP address");
            }
            if relay.port == 0 {
                return fail("delivery.relay.port", "must be at least 1");
            }
        }
        if let Some(p) = &self.privileges {
            if p.maildrop_group == p.secret_group {
                // A setgid sendmail must not reach the secrets.
                return fail(
                    "privileges.maildrop_group",
                    "must differ from privileges.secret_group",
                );
            }
            if p.spool_user == p.store_user {
                // design.md: smtpd must not be able to read the Maildirs.
                return fail(
                    "privileges.store_user",
                    "must differ from privileges.spool_user",
                );
            }
        }
        let d = &self.addresses.recipient_delimiter;
        if d.chars().count() > 1 || d.contains(['@', '.', '"', ' ']) {
            return fail(
                "addresses.recipient_delimiter",
                "must be empty or one character other than @ . \" and space",
            );
        }
        Ok(())
    }
}

impl Paths {
    /// Where the programs are: `libexec_dir`, else beside the running
    /// program (so a build tree or an install prefix works unconfigured).
    pub fn binary_dir(&self) -> std::io::Result<PathBuf> {
        if let Some(dir) = &self.libexec_dir {
            return Ok(dir.clone());
        }
        let exe = std::env::current_exe()?;
        Ok(exe
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")))
    }

    /// The pid file of a program (`master`, `smtpd`, ...) in `run_dir`.
    pub fn pid_file(&self, program: &str) -> PathBuf {
        self.run_dir.join(format!("{program}.pid"))
    }

    fn make_absolute(&mut self, base: &Path) {
        for p in [
            &mut self.spool,
            &mut self.mail_root,
            &mut self.users,
            &mut self.aliases,
            &mut self.domains,
            &mut self.run_dir,
            &mut self.log_file,
            &mut self.dkim_keys,
        ] {
            absolutize(base, p);
        }
        if let Some(p) = &mut self.libexec_dir {
            absolutize(base, p);
        }
    }
}

fn absolutize(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

/// 1-based line number of byte offset `pos` in `text`.
fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Where the value of dotted `key` is written in `text`, if it is.
fn key_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    // Semantic checks run on the typed config, which has no spans left, so
    // find the key textually inside its table.
    let (table, leaf) = match key.rsplit_once('.') {
        Some((t, l)) => (Some(t), l),
        None => (None, key),
    };
    let mut in_table = table.is_none();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if let Some(header) = trimmed.strip_prefix('[') {
            // [delivery.domains."x.test"] is the table delivery.domains.x.test.
            let name = header.trim_end_matches(']').trim().replace('"', "");
            in_table = table == Some(name.as_str());
        } else if in_table {
            if let Some((k, _)) = trimmed.split_once('=') {
                if k.trim() == leaf {
                    return Some(offset..offset + line.len());
                }
            }
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
hostname = "mx.example.org"

[paths]
spool = "spool"
mail_root = "mail"
users = "users"
aliases = "aliases"
domains = "domains"
run_dir = "run"
log_file = "log/mailsrv.log"

[smtpd]
listen = ["127.0.0.1:2525"]
relay_networks = ["10.0.0.0/8", "::1"]

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/m.toml"))
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.smtpd.max_recipients, 100);
        assert_eq!(c.addresses.recipient_delimiter, "+");
        assert!(c.smtpd.relay_networks[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!c.smtpd.relay_networks[0].contains("11.1.2.3".parse().unwrap()));
        assert!(c.smtpd.relay_networks[1].contains("::1".parse().unwrap()));
    }

    #[test]
    fn type_error_names_line_and_key() {
        let text = GOOD.replace(
            "relay_networks = [\"10.0.0.0/8\", \"::1\"]",
            "max_recipients = \"many\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/m.toml:15: smtpd.max_recipients:"),
            "{e}"
        );
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let text = GOOD.replace("10.0.0.0/8", "10.0.0.0/33");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/m.toml:15: smtpd.relay_networks[0]"),
            "{e}"
        );
        assert!(e.contains("prefix length"), "{e}");
    }

    #[test]
    fn check_tables_are_validated() {
        let text = format!("{GOOD}\n[checks]\ndkim = false\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("checks.dmarc: needs checks.spf and checks.dkim"),
            "{e}"
        );
        let text = format!("{GOOD}\n[checks]\ndkim = false\ndmarc = false\n");
        assert!(parse(&text).is_ok());
        let text = format!("{GOOD}\n[checks.greylist]\ndelay = 600\nretry_window = 600\n");
        let e = parse(&text).unwrap_err().to_string();
        let line = text.lines().count();
        assert!(
            e.starts_with(&format!(
                "/etc/m.toml:{line}: checks.greylist.retry_window:"
            )),
            "{e}"
        );
        let text = format!("{GOOD}\n[checks.clamd]\naddress = \"clamd.sock\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("checks.clamd.address"), "{e}");
        let text =
            format!("{GOOD}\n[checks.spamd]\naddress = \"127.0.0.1:783\"\nreject_score = 12\n");
        let spamd = parse(&text).unwrap().checks.spamd.unwrap();
        assert_eq!(spamd.reject_score, Some(12.0));
        assert_eq!(spamd.on_failure, ScanFailure::Accept);
    }

    #[test]
    fn delivery_policy_errors_name_their_line() {
        let text = format!("{GOOD}\n[delivery.domains.\"b.test\"]\ntls = \"implicit\"\n");
        let e = parse(&text).unwrap_err().to_string();
        let line = text.lines().count();
        assert!(
            e.starts_with(&format!("/etc/m.toml:{line}: delivery.domains.b.test.tls:")),
            "{e}"
        );
        let text = format!("{GOOD}\n[delivery.relay]\nhost = \"\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("delivery.relay.host: must be a host name"),
            "{e}"
        );
        let text = format!("{GOOD}\n[dns]\nservers = [\"127.0.0.1\"]\n");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("dns.servers[0]"));
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = GOOD.replace("[tls]", "[tls]\ncertificate = \"x\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("/etc/m.toml:18: tls.certificate"), "{e}");
        assert!(e.contains("unknown field `certificate`"), "{e}");
    }

    #[test]
    fn cross_field_rule_names_line() {
        let text = GOOD.replace("[smtpd]\n", "[smtpd]\nmax_line_length = 100\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/m.toml:14: smtpd.max_line_length:"),
            "{e}"
        );
    }

    #[test]
    fn privileges_need_two_users() {
        let text = format!("{GOOD}\n[privileges]\nspool_user = \"vmail\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("privileges.store_user: must differ"), "{e}");
        let p = parse(&format!("{GOOD}\n[privileges]\n"))
            .unwrap()
            .privileges
            .unwrap();
        assert_eq!(
            (
                p.spool_user.as_str(),
                p.store_user.as_str(),
                p.secret_group.as_str()
            ),
            ("mailsrv", "vmail", "mailkeys")
        );
        assert!(parse(GOOD).unwrap().privileges.is_none());
    }

    #[test]
    fn submission_alone_is_enough() {
        let text = GOOD.replace("listen = [", "submissions_listen = [");
        assert!(parse(&text).is_ok());
        let text = GOOD.replace("listen = [\"127.0.0.1:2525\"]", "");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("smtpd.listen: needs at least one address"),
            "{e}"
        );
    }

    #[test]
    fn ipnet_edge_cases() {
        let any: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("203.0.113.9".parse().unwrap()));
        let mapped: IpNet = "127.0.0.0/8".parse().unwrap();
        assert!(mapped.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!("nonsense".parse::<IpNet>().is_err());
    }
}
