//! `[checks]`: what smtpd checks of mail that comes from the internet
//! (the MX port, a client outside `smtpd.relay_networks`, no AUTH).

use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// What to do with a message a check condemns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckAction {
    /// Accept; the result is only written in Authentication-Results.
    Tag,
    /// Accept and file it in the recipient's Junk folder.
    Junk,
    /// Refuse it at the end of DATA (550 5.7.x).
    Reject,
}

/// Sender authentication checks (SPF, DKIM, ARC, DMARC).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksConfig {
    /// The authserv-id of our Authentication-Results header (RFC 8601
    /// 2.5); default: `hostname`. Incoming headers claiming it are removed.
    #[serde(default)]
    pub authserv_id: Option<String>,
    /// SPF (RFC 7208) of the HELO name and the MAIL FROM domain.
    #[serde(default = "on")]
    pub spf: bool,
    /// DKIM signatures (RFC 6376).
    #[serde(default = "on")]
    pub dkim: bool,
    /// ARC chains (RFC 8617).
    #[serde(default = "on")]
    pub arc: bool,
    /// DMARC (RFC 7489) of the From domain; needs `spf` and `dkim`.
    #[serde(default = "on")]
    pub dmarc: bool,
    /// A message whose SPF result for MAIL FROM is `fail`.
    #[serde(default = "tag")]
    pub spf_fail: CheckAction,
    /// A DMARC failure where the domain's policy is `reject`.
    #[serde(default = "reject")]
    pub dmarc_reject: CheckAction,
    /// A DMARC failure where the domain's policy is `quarantine`.
    #[serde(default = "junk")]
    pub dmarc_quarantine: CheckAction,
    /// DNS block and allow lists asked about MX-port clients at connect,
    /// as `zone`, `zone*weight` or `zone=127.0.0.2,127.0.0.4*weight`
    /// (Postfix postscreen's form; a negative weight is an allow list).
    #[serde(default)]
    pub dnsbl: Vec<DnsList>,
    /// The summed weight at which a client is refused (554 5.7.1).
    #[serde(default = "one")]
    pub dnsbl_threshold: i32,
    /// Greylisting of outside clients at RCPT; on when the table is there.
    #[serde(default)]
    pub greylist: Option<GreylistConfig>,
    /// ClamAV's clamd, asked about every message smtpd receives; on when
    /// the table is there.
    #[serde(default)]
    pub clamd: Option<ClamdConfig>,
    /// SpamAssassin's spamd, asked about mail from outside clients; on
    /// when the table is there.
    #[serde(default)]
    pub spamd: Option<SpamdConfig>,
}

/// `[checks.greylist]`: a client's first attempt to send from a sender to
/// a recipient is deferred; a retry after `delay` passes, and the triplet
/// is then remembered for `max_age` (RFC 6647).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GreylistConfig {
    /// Seconds a client must wait before its retry is accepted.
    #[serde(default = "greylist_delay")]
    pub delay: u64,
    /// Seconds after the first attempt within which a retry counts; a
    /// later one starts over.
    #[serde(default = "greylist_retry_window")]
    pub retry_window: u64,
    /// Seconds a triplet that passed stays known after its last use.
    #[serde(default = "greylist_max_age")]
    pub max_age: u64,
    /// Triplets kept at most; past this the least recently seen go.
    #[serde(default = "greylist_max_entries")]
    pub max_entries: usize,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        Self {
            delay: greylist_delay(),
            retry_window: greylist_retry_window(),
            max_age: greylist_max_age(),
            max_entries: greylist_max_entries(),
        }
    }
}

/// What to do when a scanner is down, too slow or answers an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanFailure {
    /// Answer 451 so the client tries again later.
    Tempfail,
    /// Accept, with an `X-Not-Scanned:` header saying why.
    Accept,
}

/// Where a scanner listens: a Unix socket path or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScannerAddress {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl FromStr for ScannerAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('/') {
            return Ok(ScannerAddress::Unix(s.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ScannerAddress::Tcp(s.to_string()))
            }
            _ => Err(format!(
                "`{s}`: expected a socket path like /run/clamav/clamd.ctl or host:port like 127.0.0.1:3310"
            )),
        }
    }
}

impl std::fmt::Display for ScannerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScannerAddress::Unix(p) => write!(f, "{}", p.display()),
            ScannerAddress::Tcp(a) => f.write_str(a),
        }
    }
}

impl<'de> Deserialize<'de> for ScannerAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `[checks.clamd]`: virus scanning through clamd's INSTREAM command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClamdConfig {
    pub address: ScannerAddress,
    /// Seconds the whole scan may take.
    #[serde(default = "scan_timeout")]
    pub timeout: u64,
    /// Larger messages are not scanned (clamd's StreamMaxLength).
    #[serde(default = "clamd_max_size")]
    pub max_size: u64,
    #[serde(default = "tempfail")]
    pub on_failure: ScanFailure,
}

/// `[checks.spamd]`: spam scoring through spamd's SPAMC protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpamdConfig {
    pub address: ScannerAddress,
    /// Seconds the whole scan may take.
    #[serde(default = "scan_timeout")]
    pub timeout: u64,
    /// Larger messages are not scanned (spamc's default limit).
    #[serde(default = "spamd_max_size")]
    pub max_size: u64,
    /// A message spamd calls spam (its score reached spamd's
    /// required_score).
    #[serde(default = "junk")]
    pub action: CheckAction,
    /// A score at which the message is refused whatever `action` says.
    #[serde(default)]
    pub reject_score: Option<f64>,
    #[serde(default = "accept")]
    pub on_failure: ScanFailure,
}

/// One DNS list and what its answers are worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsList {
    pub zone: String,
    /// Answers that count; empty: any 127.0.0.0/8 answer except the
    /// ones that mean "not listed" or "error" (see [`DnsList::counts`]).
    pub codes: Vec<Ipv4Addr>,
    pub weight: i32,
}

impl DnsList {
    /// Whether the answer `code` means "listed".
    pub fn counts(&self, code: Ipv4Addr) -> bool {
        if !self.codes.is_empty() {
            return self.codes.contains(&code);
        }
        let [a, b, c, d] = code.octets();
        // RFC 5782 2.3: 127.0.0.1 is never a listing (it is the test
        // entry's "not listed" reply on some lists); 127.0.0.255 is
        // DNSWL's "you are over the limit", 127.255.255.x Spamhaus's.
        a == 127 && code != Ipv4Addr::new(127, 0, 0, 1) && d != 255 && !(b == 255 && c == 255)
    }
}

impl FromStr for DnsList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, weight) = match s.rsplit_once('*') {
            Some((r, w)) => (
                r,
                w.parse::<i32>()
                    .map_err(|_| format!("`{s}`: the weight after * must be an integer"))?,
            ),
            None => (s, 1),
        };
        let (zone, codes) = match rest.split_once('=') {
            Some((z, c)) => (
                z,
                c.split(',')
                    .map(|code| {
                        code.trim().parse::<Ipv4Addr>().map_err(|_| {
                            format!("`{s}`: `{code}` is not an IPv4 address like 127.0.0.2")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => (rest, Vec::new()),
        };
        let zone = zone.trim().trim_end_matches('.').to_ascii_lowercase();
        if zone.is_empty() || !zone.contains('.') || zone.contains(char::is_whitespace) {
            return Err(format!("`{s}`: expected a DNS zone like zen.spamhaus.org"));
        }
        Ok(DnsList {
            zone,
            codes,
            weight,
        })
    }
}

impl<'de> Deserialize<'de> for DnsList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            authserv_id: None,
            spf: true,
            dkim: true,
            arc: true,
            dmarc: true,
            spf_fail: CheckAction::Tag,
            dmarc_reject: CheckAction::Reject,
            dmarc_quarantine: CheckAction::Junk,
            dnsbl: Vec::new(),
            dnsbl_threshold: 1,
            greylist: None,
            clamd: None,
            spamd: None,
        }
    }
}

fn greylist_delay() -> u64 {
    300
}
fn greylist_retry_window() -> u64 {
    2 * 86_400
}
fn greylist_max_age() -> u64 {
    35 * 86_400
}
fn greylist_max_entries() -> usize {
    200_000
}
fn scan_timeout() -> u64 {
    60
}
fn clamd_max_size() -> u64 {
    25 * 1024 * 1024
}
fn spamd_max_size() -> u64 {
    500 * 1024
}
fn tempfail() -> ScanFailure {
    ScanFailure::Tempfail
}
fn accept() -> ScanFailure {
    ScanFailure::Accept
}
fn one() -> i32 {
    1
}
fn on() -> bool {
    true
}
fn tag() -> CheckAction {
    CheckAction::Tag
}
fn reject() -> CheckAction {
    CheckAction::Reject
}
fn junk() -> CheckAction {
    CheckAction::Junk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_forms_and_what_counts() {
        let plain: DnsList = "zen.spamhaus.org.".parse().unwrap();
        assert_eq!((plain.zone.as_str(), plain.weight), ("zen.spamhaus.org", 1));
        assert!(plain.counts(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(!plain.counts(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(!plain.counts(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(!plain.counts(Ipv4Addr::new(10, 0, 0, 2)));
        let allow: DnsList = "list.dnswl.org*-5".parse().unwrap();
        assert_eq!(allow.weight, -5);
        assert!(allow.counts(Ipv4Addr::new(127, 0, 9, 2)));
        assert!(!allow.counts(Ipv4Addr::new(127, 0, 0, 255)));
        let coded: DnsList = "bl.test=127.0.0.4, 127.0.0.5*3".parse().unwrap();
        assert_eq!(coded.weight, 3);
        assert!(coded.counts(Ipv4Addr::new(127, 0, 0, 5)));
        assert!(!coded.counts(Ipv4Addr::new(127, 0, 0, 2)));
        assert!("bl.test*x".parse::<DnsList>().is_err());
        assert!("nodot".parse::<DnsList>().is_err());
        assert!("bl.test=1.2.3".parse::<DnsList>().is_err());
    }

    #[test]
    fn scanner_addresses() {
        assert_eq!(
            "/run/clamav/clamd.ctl".parse(),
            Ok(ScannerAddress::Unix("/run/clamav/clamd.ctl".into()))
        );
        assert_eq!(
            "127.0.0.1:783".parse(),
            Ok(ScannerAddress::Tcp("127.0.0.1:783".into()))
        );
        assert_eq!(
            "[::1]:3310".parse(),
            Ok(ScannerAddress::Tcp("[::1]:3310".into()))
        );
        assert!("localhost".parse::<ScannerAddress>().is_err());
        assert!("relative/clamd.sock".parse::<ScannerAddress>().is_err());
        assert!(":783".parse::<ScannerAddress>().is_err());
    }
}
