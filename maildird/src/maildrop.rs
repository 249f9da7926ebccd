//! A user's INBOX as a POP3 maildrop: listed once at login, locked against
//! a second POP3 session, changed only in the UPDATE state.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use common::flags::{Keywords, SystemFlag};
use common::maildir::create_mailbox;
use common::safeio::{sync_dir, try_lock_exclusive, LockGuard};
use common::uidlist;

use crate::pop3::session::MessageInfo;

/// Lock file held by a POP3 session in TRANSACTION state.
const LOCK_FILE: &str = "mailsrv-pop3.lock";

/// Why a maildrop cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum MaildropError {
    #[error("mailbox is locked by another POP3 session")]
    Locked,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// One message of the maildrop.
#[derive(Debug, Clone)]
pub struct DropMessage {
    /// Where the file is now.
    pub path: PathBuf,
    /// The Maildir base name (before `:`).
    pub base: String,
    /// Octets with CRLF line ends.
    pub size: u64,
    /// RFC 1939 7 unique id: the IMAP UID and UIDVALIDITY in Dovecot's
    /// default `%08Xu%08Xv` form, so clients moving from Dovecot keep
    /// their "already downloaded" lists.
    pub uidl: String,
}

/// A locked, listed maildrop.
pub struct Maildrop {
    root: PathBuf,
    messages: Vec<DropMessage>,
    _lock: LockGuard,
}

impl Maildrop {
    /// Lock and list the Maildir at `root` (created if missing).
    pub fn open(root: &Path) -> Result<Maildrop, MaildropError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MaildropError::Io { path, source }
        };
        create_mailbox(root).map_err(io_err(root))?;
        let lock_path = root.join(LOCK_FILE);
        let lock = try_lock_exclusive(&lock_path)
            .map_err(io_err(&lock_path))?
            .ok_or(MaildropError::Locked)?;
        let state = uidlist::sync(root).map_err(io_err(root))?;
        let mut messages = Vec::with_capacity(state.entries.len());
        for entry in state.entries {
            let path = entry.path(root);
            let size = match common::maildir::crlf_size(&path) {
                Ok(size) => size,
                // Moved or removed by an IMAP session meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            messages.push(DropMessage {
                path,
                uidl: format!("{:08x}{:08x}", entry.uid, state.uid_validity),
                base: entry.base,
                size,
            });
        }
        Ok(Maildrop {
            root: root.to_path_buf(),
            messages,
            _lock: lock,
        })
    }

    /// The messages, in maildrop order.
    pub fn messages(&self) -> &[DropMessage] {
        &self.messages
    }

    /// What the session needs to know of each message.
    pub fn infos(&self) -> Vec<MessageInfo> {
        self.messages
            .iter()
            .map(|m| MessageInfo {
                size: m.size,
                uidl: m.uidl.clone(),
            })
            .collect()
    }

    /// The UPDATE state (RFC 1939 section 6): remove `delete`, mark the
    /// other `retrieved` messages Seen (moved to cur/ with the S flag).
    /// Returns how many were removed.
    pub fn update(self, delete: &[usize], retrieved: &[usize]) -> io::Result<usize> {
        let delete: HashSet<usize> = delete.iter().copied().collect();
        let mut removed = 0;
        for &i in &delete {
            if let Some(m) = self.messages.get(i) {
                match std::fs::remove_file(&m.path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for &i in retrieved.iter().filter(|i| !delete.contains(i)) {
            if let Some(m) = self.messages.get(i) {
                let target = self.root.join("cur").join(with_seen_flag(&m.path, &m.base));
                if target != m.path {
                    match std::fs::rename(&m.path, &target) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        sync_dir(&self.root.join("new"))?;
        sync_dir(&self.root.join("cur"))?;
        Ok(removed)
    }
}

/// The file name with the Seen flag added to its `:2,` info, other
/// letters kept.
fn with_seen_flag(path: &Path, base: &str) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let info = name.split_once(":2,").map_or("", |(_, f)| f);
    // Keyword letters need no numbering here: they pass through as `other`.
    let letters = Keywords::default();
    let (mut flags, other) = letters.parse_info(info);
    flags.system.insert(SystemFlag::Seen);
    format!("{base}:2,{}", letters.render(&flags, &other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_locks_and_updates() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        create_mailbox(&root).unwrap();
        std::fs::write(root.join("new/1.a.h,S=4,W=6"), b"x\ny\n").unwrap();
        std::fs::write(root.join("cur/2.b.h:2,F"), b"a\r\nb\n").unwrap();
        std::fs::write(root.join("new/3.c.h"), b"zz").unwrap();
        let drop = Maildrop::open(&root).unwrap();
        assert!(matches!(Maildrop::open(&root), Err(MaildropError::Locked)));
        let infos = drop.infos();
        assert_eq!(infos.iter().map(|i| i.size).collect::<Vec<_>>(), [6, 6, 2]);
        // Name order is UID order; UIDL = UID and UIDVALIDITY in hex.
        assert!(infos[1].uidl.starts_with("00000002"), "{}", infos[1].uidl);
        assert_eq!(infos[1].uidl.len(), 16);
        assert_eq!(drop.update(&[2], &[0, 1, 2]).unwrap(), 1);
        assert!(root.join("cur/1.a.h,S=4,W=6:2,S").exists());
        assert!(root.join("cur/2.b.h:2,FS").exists());
        assert!(!root.join("new/3.c.h").exists());
        assert!(Maildrop::open(&root).is_ok());
    }
}
