//! Password checks for every protocol that takes one (SMTP AUTH, IMAP,
//! POP3): the user database, throttled per client address and per
//! account, each failure logged in a form fail2ban can match.

use std::net::IpAddr;
use std::time::Duration;

use crate::address::Address;
use crate::recipients::DirectoryCache;
use crate::throttle::AuthThrottle;

/// The failure counters of one daemon.
pub struct LoginThrottle {
    clients: AuthThrottle<IpAddr>,
    accounts: AuthThrottle<String>,
}

impl LoginThrottle {
    /// Refuse logins from a client address after `per_client` failures, and
    /// for an account after `per_account` failures, within `window`.
    pub fn new(per_client: u32, per_account: u32, window: Duration) -> LoginThrottle {
        LoginThrottle {
            clients: AuthThrottle::new(per_client, window),
            accounts: AuthThrottle::new(per_account, window),
        }
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
    if throttle.clients.is_blocked(&ip) || throttle.accounts.is_blocked(&account) {
        tracing::warn!("{protocol} login refused (too many failures): user=<{shown}>, rip={ip}");
        return Err(LoginError::Throttled);
    }
    let (dir, stale) = directory.current();
    if let Some(e) = stale {
        tracing::error!("keeping previous tables: {e}");
    }
    let name = user.to_string();
    // Argon2 is slow on purpose: off the async threads.
    let ok = tokio::task::spawn_blocking(move || dir.users.authenticate(&name, &password))
        .await
        .unwrap_or(false);
    match Address::parse(user).ok().filter(|_| ok) {
        Some(address) => Ok(address),
        None => {
            throttle.clients.record_failure(&ip);
            throttle.accounts.record_failure(&account);
            // The line fail2ban matches.
            tracing::warn!("{protocol} authentication failed: user=<{shown}>, rip={ip}");
            Err(LoginError::Failed)
        }
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
    fn log_lines_cannot_be_forged() {
        assert_eq!(
            loggable("x>, rip=1.2.3.4\nimap authentication failed: user=<y"),
            "x?, rip=1.2.3.4?imap authentication failed: user=?y"
        );
        assert_eq!(loggable("alice@example.test"), "alice@example.test");
    }
}
