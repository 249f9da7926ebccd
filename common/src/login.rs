//! Password checks for every protocol that takes one (SMTP AUTH, IMAP,
//! POP3): the user database, throttled per client address and per
//! account, each failure logged in a form fail2ban can match.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::address::Address;
use crate::login_cache::LoginCache;
use crate::recipients::DirectoryCache;
use crate::throttle::AuthThrottle;

/// The failure counters of one daemon, the bound on password checks
/// running at once, and the passwords checked lately.
pub struct LoginThrottle {
    clients: AuthThrottle<IpAddr>,
    accounts: AuthThrottle<String>,
    /// Each Argon2 check takes ~19 MiB and a core for tens of
    /// milliseconds: more at once than cores only queue in memory.
    checks: tokio::sync::Semaphore,
    /// Where each account logged in lately: from there the per-account
    /// limit does not apply, so failures an attacker causes elsewhere do
    /// not lock the owner out.
    recent: Mutex<HashMap<(IpAddr, String), Instant>>,
    verified: LoginCache,
}

/// How long a successful login exempts its address from the account's
/// failure limit.
const TRUSTED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// Most (address, account) pairs remembered.
const MAX_RECENT: usize = 65_536;

impl LoginThrottle {
    /// Refuse logins from a client address after `per_client` failures, and
    /// for an account after `per_account` failures, within `window`; a
    /// right password is not checked again for `cache_ttl`.
    pub fn new(
        per_client: u32,
        per_account: u32,
        window: Duration,
        cache_ttl: Duration,
    ) -> LoginThrottle {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoginThrottle {
            clients: AuthThrottle::new(per_client, window),
            accounts: AuthThrottle::new(per_account, window),
            checks: tokio::sync::Semaphore::new(cores * 2),
            recent: Mutex::new(HashMap::new()),
            verified: LoginCache::new(cache_ttl),
        }
    }

    fn trusted(&self, ip: IpAddr, account: &str) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .get(&(ip, account.to_string()))
            .is_some_and(|t| t.elapsed() < TRUSTED_FOR)
    }

    fn remember(&self, ip: IpAddr, account: String) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= MAX_RECENT {
            recent.retain(|_, t| t.elapsed() < TRUSTED_FOR);
            if recent.len() >= MAX_RECENT {
                return;
            }
        }
        recent.insert((ip, account), Instant::now());
    }
}

/// Why a password check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    /// Too many recent failures from this address or for this account;
    /// the password was not checked.
    Throttled,
    /// Wrong user or password.
    Failed,
}

/// Check `user`'s password as `protocol` (a word for the log: `smtp`,
/// `imap`, `pop3`) from `ip`; on success the user's address.
pub async fn check_password(
    directory: &DirectoryCache,
    throttle: &LoginThrottle,
    protocol: &str,
    ip: IpAddr,
    user: &str,
    password: String,
) -> Result<Address, LoginError> {
    let shown = loggable(user);
    let account = user.to_lowercase();
    let ip = client_key(ip);
    let account_blocked = throttle.accounts.is_blocked(&account) && !throttle.trusted(ip, &account);
    if throttle.clients.is_blocked(&ip) || account_blocked {
        tracing::warn!("{protocol} login refused (too many failures): user=<{shown}>, rip={ip}");
        return Err(LoginError::Throttled);
    }
    let (dir, stale) = directory.current();
    if let Some(e) = stale {
        tracing::error!("keeping previous tables: {e}");
    }
    let stored = dir.users.password_hash(user).map(str::to_string);
    let cached = stored
        .as_deref()
        .is_some_and(|h| throttle.verified.knows(&account, h, &password));
    let ok = cached || {
        let name = user.to_string();
        let _permit = throttle.checks.acquire().await;
        // Argon2 is slow on purpose: off the async threads.
        let checked = tokio::task::spawn_blocking(move || {
            let ok = dir.users.authenticate(&name, &password);
            (ok, password)
        })
        .await;
        match (checked, &stored) {
            (Ok((true, password)), Some(h)) => {
                throttle.verified.remember(&account, h, &password);
                true
            }
            _ => false,
        }
    };
    match Address::parse(user).ok().filter(|_| ok) {
        Some(address) => {
            throttle.remember(ip, account);
            Ok(address)
        }
        None => {
            throttle.clients.record_failure(&ip);
            throttle.accounts.record_failure(&account);
            // The line fail2ban matches.
            tracing::warn!("{protocol} authentication failed: user=<{shown}>, rip={ip}");
            Err(LoginError::Failed)
        }
    }
}

/// The address failures are counted under: an IPv6 client by its /64,
/// which one host usually has whole.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(net.into())
        }
        other => other,
    }
}

/// A client-chosen name as it may appear in a log line: no control
/// characters (a forged second line) and no `<>` (a forged `user=<>`
/// field for fail2ban to match), each shown as `?`.
pub fn loggable(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control() || c == '<' || c == '>' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_address_escapes_the_account_limit() {
        let t = LoginThrottle::new(10, 1, Duration::from_secs(60), Duration::ZERO);
        let home: IpAddr = "192.0.2.1".parse().unwrap();
        let elsewhere: IpAddr = "198.51.100.7".parse().unwrap();
        t.remember(home, "alice@a.test".into());
        t.accounts.record_failure(&"alice@a.test".to_string());
        assert!(t.accounts.is_blocked(&"alice@a.test".to_string()));
        assert!(t.trusted(home, "alice@a.test"));
        assert!(!t.trusted(elsewhere, "alice@a.test"));
        assert!(!t.trusted(home, "bob@a.test"));
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        assert_eq!(
            loggable("x>, rip=1.2.3.4\nimap authentication failed: user=<y"),
            "x?, rip=1.2.3.4?imap authentication failed: user=?y"
        );
        assert_eq!(loggable("alice@example.test"), "alice@example.test");
    }
}
