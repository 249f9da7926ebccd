//! `[checks]`: what smtpd checks of mail that comes from the internet
//! (the MX port, a client outside `smtpd.relay_networks`, no AUTH).

use serde::Deserialize;

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
        }
    }
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
