//! Password checks for IMAP and POP3: the user database shared with SMTP,
//! throttled per client address, logged in a form fail2ban can match.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use common::address::Address;
use common::recipients::DirectoryCache;
use common::throttle::AuthThrottle;
use common::userdb::maildir_path;

/// When and where a session may take a password, from the configuration.
#[derive(Debug, Clone)]
pub struct LoginPolicy {
    pub hostname: String,
    /// Whether passwords may be sent before TLS.
    pub allow_plaintext_auth: bool,
    /// Whether STARTTLS/STLS can be offered (a certificate is loaded).
    pub tls_available: bool,
}

/// Why a login failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    /// Too many recent failures from this address.
    Throttled,
    /// Wrong user or password.
    Failed,
    /// The user is fine but their mailbox cannot be reached.
    Unavailable,
}

/// Check `user`'s password; on success the user's Maildir root.
pub async fn login(
    directory: &DirectoryCache,
    throttle: &AuthThrottle,
    mail_root: &Path,
    protocol: &str,
    ip: IpAddr,
    user: &str,
    password: String,
) -> Result<PathBuf, LoginError> {
    let shown = loggable(user);
    if throttle.is_blocked(ip) {
        tracing::warn!("{protocol} login refused (too many failures): user=<{shown}>, rip={ip}");
        return Err(LoginError::Throttled);
    }
    let (dir, stale) = directory.current();
    if let Some(e) = stale {
        tracing::error!("keeping previous tables: {e}");
    }
    let name = user.to_string();
    let ok = tokio::task::spawn_blocking(move || dir.users.authenticate(&name, &password))
        .await
        .unwrap_or(false);
    let address = Address::parse(user).ok().filter(|_| ok);
    let Some(address) = address else {
        throttle.record_failure(ip);
        // A line fail2ban can match.
        tracing::warn!("{protocol} authentication failed: user=<{shown}>, rip={ip}");
        return Err(LoginError::Failed);
    };
    maildir_path(mail_root, &address).map_err(|e| {
        tracing::error!("{protocol} [{ip}]: {e}");
        LoginError::Unavailable
    })
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
