//! Logins for IMAP and POP3: the shared password check
//! (`common::login`), then the user's Maildir.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use common::login::{check_password, LoginThrottle};
use common::recipients::DirectoryCache;
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
    /// Too many recent failures from this address or for this account.
    Throttled,
    /// Wrong user or password.
    Failed,
    /// The user is fine but their mailbox cannot be reached.
    Unavailable,
}

/// Check `user`'s password; on success the user's Maildir root.
pub async fn login(
    directory: &DirectoryCache,
    throttle: &LoginThrottle,
    mail_root: &Path,
    protocol: &str,
    ip: IpAddr,
    user: &str,
    password: String,
) -> Result<PathBuf, LoginError> {
    let address = check_password(directory, throttle, protocol, ip, user, password)
        .await
        .map_err(|e| match e {
            common::login::LoginError::Throttled => LoginError::Throttled,
            common::login::LoginError::Failed => LoginError::Failed,
        })?;
    maildir_path(mail_root, &address).map_err(|e| {
        tracing::error!("{protocol} [{ip}]: {e}");
        LoginError::Unavailable
    })
}
