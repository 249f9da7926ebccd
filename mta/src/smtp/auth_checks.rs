//! Sender authentication of mail from the internet, with mail-auth over
//! our one resolver: SPF (RFC 7208) of HELO and MAIL FROM, DKIM (RFC 6376),
//! ARC (RFC 8617), DMARC (RFC 7489); the `Authentication-Results:` header
//! (RFC 8601) and what the verdict means for the message.

use std::net::IpAddr;

use common::config::{CheckAction, ChecksConfig, Config};
use hickory_resolver::TokioResolver;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcResult,
    MessageAuthenticator, SpfOutput, SpfResult,
};
use tokio::sync::Semaphore;

use super::reply::Reply;

/// Longest the checks of one message may take.
const CHECK_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The checks, set up once per smtpd.
pub struct AuthChecks {
    authenticator: MessageAuthenticator,
    config: ChecksConfig,
    authserv_id: String,
    hostname: String,
    /// Messages being checked at once: each is read whole into memory.
    slots: Semaphore,
}

/// One received message and its envelope.
pub struct Inbound<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    /// MAIL FROM, bare; empty for the null sender.
    pub sender: &'a str,
    /// The message as stored, CRLF line ends.
    pub message: &'a [u8],
}

/// What becomes of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it with this Authentication-Results field (CRLF-ended);
    /// `junk`: file local copies in Junk.
    Accept {
        header: String,
        junk: bool,
    },
    Reject(Reply),
}

impl AuthChecks {
    /// Set up from the config, asking `resolver`.
    pub fn new(config: &Config, resolver: TokioResolver) -> AuthChecks {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        AuthChecks {
            authenticator: MessageAuthenticator(resolver),
            config: config.checks.clone(),
            authserv_id: config
                .checks
                .authserv_id
                .clone()
                .unwrap_or_else(|| config.hostname.clone()),
            hostname: config.hostname.clone(),
            slots: Semaphore::new(2 * cores),
        }
    }

    /// The name our Authentication-Results header carries.
    pub fn authserv_id(&self) -> &str {
        &self.authserv_id
    }

    /// Whether any check is on: with none, a message need not be read
    /// back ([`AuthChecks::unchecked`]).
    pub fn any(&self) -> bool {
        let c = &self.config;
        c.spf || c.dkim || c.arc || c.dmarc
    }

    /// The verdict when every check is off: accepted, with a header that
    /// says nothing was checked, so readers do not trust one from outside.
    pub fn unchecked(&self) -> Verdict {
        Verdict::Accept {
            header: AuthenticationResults::new(&self.authserv_id).to_header(),
            junk: false,
        }
    }

    /// Wait for a turn to check a message (bounds the memory of messages
    /// read whole).
    pub async fn slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.slots.acquire().await.expect("never closed")
    }

    /// Run the enabled checks, within CHECK_TIME_LIMIT: DNS that does not
    /// answer (one lookup per DKIM signature, SPF includes) must not hold
    /// the session or a check slot; past the limit the message is
    /// accepted with `temperror` results.
    pub async fn check(&self, input: &Inbound<'_>) -> Verdict {
        match tokio::time::timeout(CHECK_TIME_LIMIT, self.run_checks(input)).await {
            Ok(verdict) => verdict,
            Err(_) => Verdict::Accept {
                header: format!(
                    "Authentication-Results: {};\r\n\tspf=temperror;\r\n\tdkim=temperror;\r\n\tdmarc=temperror (checks timed out)\r\n",
                    self.authserv_id
                ),
                junk: false,
            },
        }
    }

    async fn run_checks(&self, input: &Inbound<'_>) -> Verdict {
        let c = &self.config;
        let auth = &self.authenticator;
        let Some(message) = AuthenticatedMessage::parse(input.message) else {
            // No header section at all: nothing to authenticate.
            return Verdict::Accept {
                header: format!("Authentication-Results: {}; none\r\n", self.authserv_id),
                junk: false,
            };
        };
        let ip = input.client_ip;
        let helo = input.helo;
        let mut results = AuthenticationResults::new(&self.authserv_id);
        let (spf_helo, spf_mail) = if c.spf {
            let helo_out = auth
                .verify_spf(SpfParameters::verify_ehlo(ip, helo, &self.hostname))
                .await;
            let mail_out = auth
                .verify_spf(SpfParameters::verify_mail_from(
                    ip,
                    helo,
                    &self.hostname,
                    input.sender,
                ))
                .await;
            results = results
                .with_spf_ehlo_result(&helo_out, ip, helo)
                .with_spf_mailfrom_result(&mail_out, ip, input.sender, helo);
            (Some(helo_out), Some(mail_out))
        } else {
            (None, None)
        };
        let dkim = if c.dkim {
            let out = body_hash_mismatch_fails(&message, auth.verify_dkim(&message).await);
            results = results.with_dkim_results(&out, message.from());
            out
        } else {
            Vec::new()
        };
        if c.arc {
            let arc = auth.verify_arc(&message).await;
            results = results.with_arc_result(&arc, ip);
        }
        let mut action = CheckAction::Tag;
        // The enhanced code and text of a refusal.
        let mut reason = ("5.7.1", String::new());
        let from_domains: std::collections::BTreeSet<&str> = message
            .froms()
            .iter()
            .filter_map(|f| f.rsplit_once('@').map(|(_, d)| d))
            .collect();
        if c.dmarc && from_domains.len() > 1 {
            // mail-auth skips DMARC then; a second From domain must not
            // carry mail past a p=reject domain (RFC 7489 6.6.1).
            action = c.dmarc_reject;
            reason = (
                "5.7.1",
                "From names several domains: DMARC cannot be checked".to_string(),
            );
        }
        if let Some(spf) = &spf_mail {
            if spf.result() == SpfResult::Fail {
                action = c.spf_fail;
                // RFC 7372 3.2
                reason = (
                    "5.7.23",
                    format!(
                        "SPF of {} does not allow {ip} to send its mail",
                        spf.domain()
                    ),
                );
            }
        }
        if let (true, Some(spf_mail), Some(spf_helo)) = (c.dmarc, &spf_mail, &spf_helo) {
            // RFC 7489 3.1.2: with the null sender, SPF identity is HELO's.
            let (mail_from_domain, spf): (&str, &SpfOutput) = match input.sender.rsplit_once('@') {
                Some((_, domain)) => (domain, spf_mail),
                None => (helo, spf_helo),
            };
            let dmarc = auth
                .verify_dmarc(DmarcParameters::new(&message, &dkim, mail_from_domain, spf))
                .await;
            results = results.with_dmarc_result(&dmarc);
            if matches!(dmarc.result(), DmarcResult::Fail(_)) {
                let policy = self.sampled_policy(dmarc.domain(), dmarc.policy()).await;
                let by_policy = match policy {
                    Policy::Reject => c.dmarc_reject,
                    Policy::Quarantine => c.dmarc_quarantine,
                    Policy::None | Policy::Unspecified => CheckAction::Tag,
                };
                if severity(by_policy) >= severity(action) {
                    action = by_policy;
                    reason = (
                        "5.7.1",
                        format!(
                            "DMARC check of {} failed (neither SPF nor DKIM aligned), and its policy says {}",
                            dmarc.domain(),
                            if policy == Policy::Reject { "reject" } else { "quarantine" }
                        ),
                    );
                }
            }
        }
        let header = results.to_header();
        match action {
            CheckAction::Reject => Verdict::Reject(Reply::new(550, reason.0, reason.1)),
            CheckAction::Junk => Verdict::Accept { header, junk: true },
            CheckAction::Tag => Verdict::Accept {
                header,
                junk: false,
            },
        }
    }
}

impl AuthChecks {
    /// RFC 7489 6.6.4: a record with `pct=N` wants its policy applied to
    /// N% of the failing messages and the next milder one to the rest.
    /// mail-auth follows RFC 9989, which dropped `pct`, so the record is
    /// read again here (from the resolver's cache) for the domain or the
    /// nearest parent that has one.
    async fn sampled_policy(&self, from_domain: &str, policy: Policy) -> Policy {
        if !matches!(policy, Policy::Reject | Policy::Quarantine) {
            return policy;
        }
        let Some(pct) = self.dmarc_pct(from_domain).await else {
            return policy;
        };
        if rand::random::<u8>() % 100 < pct {
            return policy;
        }
        tracing::info!("DMARC of {from_domain}: pct={pct}, this message gets the milder policy");
        match policy {
            Policy::Reject => Policy::Quarantine,
            _ => Policy::None,
        }
    }

    /// The `pct` of the DMARC record that applies to `domain`, if below 100.
    async fn dmarc_pct(&self, domain: &str) -> Option<u8> {
        let resolver = &self.authenticator.0;
        let labels: Vec<&str> = domain.trim_end_matches('.').split('.').collect();
        for start in 0..labels.len().saturating_sub(1) {
            let name = format!("_dmarc.{}.", labels[start..].join("."));
            let Ok(answer) = resolver.txt_lookup(name).await else {
                continue;
            };
            let record = answer.answers().iter().find_map(|r| match &r.data {
                hickory_resolver::proto::rr::RData::TXT(txt) => {
                    let text: String = txt
                        .txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect();
                    text.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("v=dmarc1")
                        .then_some(text)
                }
                _ => None,
            });
            if let Some(record) = record {
                return pct_of(&record);
            }
        }
        None
    }
}

/// The `pct` tag of a DMARC record, when it is a number below 100.
fn pct_of(record: &str) -> Option<u8> {
    record
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("pct"))
        .and_then(|(_, value)| value.trim().parse::<u8>().ok())
        .filter(|&pct| pct < 100)
}

fn severity(action: CheckAction) -> u8 {
    match action {
        CheckAction::Tag => 0,
        CheckAction::Junk => 1,
        CheckAction::Reject => 2,
    }
}

/// RFC 6376 6.1.3: a body hash that does not match is a failed signature
/// (PERMFAIL, "dkim=fail" in RFC 8601), where mail-auth says neutral.
fn body_hash_mismatch_fails<'x>(
    message: &'x AuthenticatedMessage<'x>,
    outputs: Vec<DkimOutput<'x>>,
) -> Vec<DkimOutput<'x>> {
    let mismatch = mail_auth::Error::Dkim(DkimError::FailedBodyHashMatch);
    outputs
        .into_iter()
        .map(|out| {
            let signed = out.signature().and_then(|sig| {
                message
                    .dkim_headers
                    .iter()
                    .find(|h| std::ptr::eq(&h.header, sig))
            });
            match (out.result(), signed) {
                (DkimResult::Neutral(e), Some(h)) if *e == mismatch => {
                    DkimOutput::fail(mismatch.clone()).with_signature(&h.header)
                }
                _ => out,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pct_tag() {
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=20"), Some(20));
        assert_eq!(pct_of("v=DMARC1;p=reject;PCT = 0 ;rua=mailto:a@b"), Some(0));
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=100"), None);
        assert_eq!(pct_of("v=DMARC1; p=reject"), None);
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=150"), None);
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=x"), None);
    }
}
