//! The maildrop: how `sendmail` queues mail without the daemons and
//! without write access to the rest of the spool.
//!
//! `sendmail` writes one file, `spool/maildrop/<id>`: the line
//! `MAILSRV-MAILDROP 1`, one line of JSON ([`DropEnvelope`]), then the
//! message as the program gave it (LF or CRLF line ends). It writes
//! `<id>.tmp`, fsyncs it, renames it to `<id>` and fsyncs the directory
//! (or, for a setgid sendmail that cannot read the directory, the file
//! again), and only then exits 0. qmgr's pickup treats the file as untrusted
//! input: it checks it, turns it into a normal queue entry (CRLF data,
//! its own `Received:`), and removes it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::safeio;

/// The first line of every maildrop file.
pub const MAGIC: &str = "MAILSRV-MAILDROP 1";

/// Longest JSON line accepted.
const MAX_ENVELOPE_LINE: usize = 1 << 20;

/// What `sendmail` says about a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEnvelope {
    /// Envelope sender; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// The login name of the user who ran sendmail.
    pub user: String,
    /// Their uid, as sendmail saw it.
    pub uid: u32,
}

/// Why a maildrop file cannot be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DropError {
    #[error("not a maildrop file (no `{MAGIC}` line)")]
    NoMagic,
    #[error("envelope line: {0}")]
    Envelope(String),
    #[error("no recipients")]
    NoRecipients,
}

/// The bytes of a maildrop file for `envelope` and `message`.
pub fn encode_header(envelope: &DropEnvelope) -> Vec<u8> {
    let mut out = format!("{MAGIC}\n").into_bytes();
    out.extend(serde_json::to_vec(envelope).expect("envelopes always serialize"));
    out.push(b'\n');
    out
}

/// Split a maildrop file into its envelope and the message bytes.
pub fn decode(bytes: &[u8]) -> Result<(DropEnvelope, &[u8]), DropError> {
    let rest = bytes
        .strip_prefix(MAGIC.as_bytes())
        .and_then(|r| r.strip_prefix(b"\n"))
        .ok_or(DropError::NoMagic)?;
    let end = memchr::memchr(b'\n', &rest[..rest.len().min(MAX_ENVELOPE_LINE)])
        .ok_or_else(|| DropError::Envelope("no end of line".into()))?;
    let envelope: DropEnvelope =
        serde_json::from_slice(&rest[..end]).map_err(|e| DropError::Envelope(e.to_string()))?;
    if envelope.recipients.is_empty() {
        return Err(DropError::NoRecipients);
    }
    Ok((envelope, &rest[end + 1..]))
}

/// Write a maildrop file durably: `<dir>/<id>.tmp`, fsync, rename to
/// `<dir>/<id>`, fsync the directory. `message` is copied from a reader so
/// a large message is not held in memory twice.
pub fn write(
    dir: &Path,
    id: &str,
    envelope: &DropEnvelope,
    message: &mut impl io::Read,
) -> io::Result<PathBuf> {
    let tmp = dir.join(format!("{id}.tmp"));
    let done = dir.join(id);
    let result = (|| {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        // Whatever the caller's umask: qmgr reads it through the group.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o640))?;
        f.write_all(&encode_header(envelope))?;
        io::copy(message, &mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &done)?;
        match safeio::sync_dir(dir) {
            // A setgid sendmail may write into the maildrop but not read
            // it, so it cannot open the directory to fsync it. The rename
            // changed the file's ctime, so on a journaling file system
            // (ext4, XFS, btrfs) an fsync of the file commits the rename
            // with it.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => f.sync_all(),
            other => other,
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> DropEnvelope {
        DropEnvelope {
            sender: "root@host.test".into(),
            recipients: vec!["a@b.test".into()],
            user: "root".into(),
            uid: 0,
        }
    }

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "ID",
            &envelope(),
            &mut &b"Subject: x\n\nhi\n"[..],
        )
        .unwrap();
        assert!(!dir.path().join("ID.tmp").exists());
        let bytes = std::fs::read(path).unwrap();
        let (env, message) = decode(&bytes).unwrap();
        assert_eq!(env, envelope());
        assert_eq!(message, b"Subject: x\n\nhi\n");
        assert_eq!(decode(b"garbage"), Err(DropError::NoMagic));
        assert!(matches!(
            decode(format!("{MAGIC}\n{{\"sender\":1}}\nx").as_bytes()),
            Err(DropError::Envelope(_))
        ));
        let none = DropEnvelope {
            recipients: vec![],
            ..envelope()
        };
        assert_eq!(decode(&encode_header(&none)), Err(DropError::NoRecipients));
    }
}
