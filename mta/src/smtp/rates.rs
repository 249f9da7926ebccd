//! Rate limits: messages and recipients per client address and per
//! authenticated user in a time window (Postfix's anvil limits),
//! answered 450 4.7.1 until the window has passed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::config::Config;

/// Keys kept at most; past this, expired ones are dropped first, then the
/// least used (a flood of addresses must not eat memory, nor push out the
/// counts of the clients near their limits).
const MAX_KEYS: usize = 100_000;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    Recipient,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// An IPv4 address, or the /64 of an IPv6 one.
    Client(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    start: Instant,
    messages: u32,
    recipients: u32,
}

/// The limits and the counts.
#[derive(Debug)]
pub struct RateLimits {
    window: Duration,
    per_client: (u32, u32),
    per_user: (u32, u32),
    counts: Mutex<HashMap<Key, Counter>>,
}

impl RateLimits {
    pub fn new(config: &Config) -> RateLimits {
        let s = &config.smtpd;
        RateLimits {
            window: Duration::from_secs(s.rate_window),
            per_client: (s.max_messages_per_client, s.max_recipients_per_client),
            per_user: (s.max_messages_per_user, s.max_recipients_per_user),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Count one `kind` for the client (None: exempt, a relay network)
    /// and the user; Err names the limit reached, and nothing is counted.
    pub fn take(
        &self,
        client: Option<IpAddr>,
        user: Option<&str>,
        kind: Kind,
    ) -> Result<(), String> {
        let now = Instant::now();
        let mut keys = Vec::with_capacity(2);
        if let Some(ip) = client {
            keys.push((Key::Client(network(ip)), self.per_client));
        }
        if let Some(user) = user {
            keys.push((Key::User(user.to_ascii_lowercase()), self.per_user));
        }
        let limit_of = |(messages, recipients): (u32, u32)| match kind {
            Kind::Message => messages,
            Kind::Recipient => recipients,
        };
        keys.retain(|(_, limits)| limit_of(*limits) > 0);
        if keys.is_empty() {
            return Ok(());
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= MAX_KEYS {
            counts.retain(|_, c| now.duration_since(c.start) < self.window);
            if counts.len() >= MAX_KEYS {
                evict_least_used(&mut counts);
            }
        }
        for (key, limits) in &keys {
            let c = counts.entry(key.clone()).or_insert(Counter {
                start: now,
                messages: 0,
                recipients: 0,
            });
            if now.duration_since(c.start) >= self.window {
                *c = Counter {
                    start: now,
                    messages: 0,
                    recipients: 0,
                };
            }
            let used = match kind {
                Kind::Message => c.messages,
                Kind::Recipient => c.recipients,
            };
            if used >= limit_of(*limits) {
                let (what, whose) = match (kind, key) {
                    (Kind::Message, Key::Client(_)) => ("messages", "this address"),
                    (Kind::Recipient, Key::Client(_)) => ("recipients", "this address"),
                    (Kind::Message, Key::User(_)) => ("messages", "this user"),
                    (Kind::Recipient, Key::User(_)) => ("recipients", "this user"),
                };
                return Err(format!(
                    "Too many {what} from {whose} in {} seconds; try again later",
                    self.window.as_secs()
                ));
            }
        }
        for (key, _) in &keys {
            if let Some(c) = counts.get_mut(key) {
                match kind {
                    Kind::Message => c.messages += 1,
                    Kind::Recipient => c.recipients += 1,
                }
            }
        }
        Ok(())
    }
}

/// Drop the tenth of the counters with the least use, at once, so a
/// flood of new keys sorts the table once per many of them.
fn evict_least_used(counts: &mut HashMap<Key, Counter>) {
    let use_of = |c: &Counter| u64::from(c.messages) + u64::from(c.recipients);
    let mut uses: Vec<u64> = counts.values().map(use_of).collect();
    let cut = uses.len() / 10;
    let (_, &mut threshold, _) = uses.select_nth_unstable(cut);
    let mut to_drop = cut.max(1);
    counts.retain(|_, c| {
        let drop = to_drop > 0 && use_of(c) <= threshold;
        to_drop -= usize::from(drop);
        !drop
    });
}

/// The unit an address is counted by: one IPv4 address, or an IPv6 /64
/// (one customer's network).
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_client: (u32, u32), per_user: (u32, u32)) -> RateLimits {
        RateLimits {
            window: Duration::from_secs(3600),
            per_client,
            per_user,
            counts: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn counts_per_client_network_and_per_user() {
        let r = limits((2, 0), (0, 3));
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(r.take(Some(a), None, Kind::Message).is_ok());
        assert!(r.take(Some(b), None, Kind::Message).is_ok());
        let e = r.take(Some(a), None, Kind::Message).unwrap_err();
        assert!(e.contains("Too many messages from this address"), "{e}");
        // Exempt clients and unlimited kinds pass.
        assert!(r.take(None, None, Kind::Message).is_ok());
        assert!(r.take(Some(a), None, Kind::Recipient).is_ok());
        for _ in 0..3 {
            assert!(r.take(None, Some("U@x.test"), Kind::Recipient).is_ok());
        }
        assert!(r.take(None, Some("u@x.test"), Kind::Recipient).is_err());
    }

    #[test]
    fn a_full_table_keeps_the_busiest_counters() {
        let limits = limits((1000, 1000), (0, 0));
        let busy: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            limits.take(Some(busy), None, Kind::Message).unwrap();
        }
        for i in 0..MAX_KEYS as u32 + 10 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limits.take(Some(ip), None, Kind::Message).unwrap();
        }
        let counts = limits.counts.lock().unwrap();
        assert!(counts.len() <= MAX_KEYS);
        assert_eq!(counts[&Key::Client(busy)].messages, 5);
    }

    #[test]
    fn a_refusal_counts_nothing() {
        let r = limits((1, 0), (5, 0));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(r.take(Some(ip), Some("u"), Kind::Message).is_ok());
        assert!(r.take(Some(ip), Some("u"), Kind::Message).is_err());
        // The user's count stayed at 1: another address may still send 4.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(r.take(Some(other), Some("u"), Kind::Message).is_ok());
    }
}
