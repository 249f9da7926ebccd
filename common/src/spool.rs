//! The mail queue on disk.
//!
//! ```text
//! spool/data/<id>          the message, immutable once its envelope exists
//! spool/tmp/               envelopes being written
//! spool/<state>/<id>       the envelope (JSON), in one state directory
//! ```
//!
//! A message is queued when its envelope is renamed into `incoming/` and
//! both `data/` and `incoming/` are fsynced. A change of state is a rename of
//! the envelope; a change of content is a whole new envelope renamed over
//! the old one. A data file with no envelope was never acknowledged and is
//! garbage.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::queue_id::is_queue_id;
use crate::safeio;

/// Largest envelope read (a JSON file of a few hundred bytes a recipient).
const MAX_ENVELOPE: u64 = 64 << 20;

/// The queue states, one directory each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueState {
    /// Just accepted; qmgr picks it up at once.
    Incoming,
    /// Being delivered by qmgr.
    Active,
    /// Waiting for a retry.
    Deferred,
    /// Held by the admin; never delivered until released.
    Hold,
    /// Unreadable entries set aside for the admin.
    Corrupt,
    /// Written by `sendmail` for pickup.
    Maildrop,
}

impl QueueState {
    /// Every state.
    pub const ALL: [QueueState; 6] = [
        QueueState::Incoming,
        QueueState::Active,
        QueueState::Deferred,
        QueueState::Hold,
        QueueState::Corrupt,
        QueueState::Maildrop,
    ];

    /// The directory name.
    pub fn dir_name(self) -> &'static str {
        match self {
            QueueState::Incoming => "incoming",
            QueueState::Active => "active",
            QueueState::Deferred => "deferred",
            QueueState::Hold => "hold",
            QueueState::Corrupt => "corrupt",
            QueueState::Maildrop => "maildrop",
        }
    }
}

/// A spool problem.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: bad envelope: {source}")]
    BadEnvelope {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl SpoolError {
    /// Whether the error means the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if is_disk_full(source))
    }
}

/// Whether an I/O error means "no space left" (ENOSPC or EDQUOT).
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Delivery status of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    /// As given in RCPT TO; aliases not yet expanded.
    Unresolved,
    /// A final destination, not yet delivered.
    Pending,
    /// Delivered (fsynced in its Maildir, or accepted by the next MTA).
    Delivered,
    /// Failed for good; the sender is told.
    Failed,
}

/// One recipient and how far its delivery has got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address mail goes to.
    pub address: String,
    /// The RCPT TO address this one came from (after alias expansion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    /// RFC 3461 ORCPT parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    pub status: RecipientStatus,
    /// Delivery attempts made for this recipient.
    #[serde(default)]
    pub attempts: u32,
    /// The latest error, for `mailq` and bounces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// RFC 3461 NOTIFY; None when the client gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// The remote server's reply that `last_error` reports, if it came
    /// from one (RFC 3464 Remote-MTA and Diagnostic-Code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_reply: Option<RemoteReply>,
}

/// A reply of another mail server about one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteReply {
    /// The server's host name.
    pub mta: String,
    /// Its reply: code, enhanced code and text, on one line.
    pub reply: String,
}

/// Which delivery status notifications a recipient's sender asked for
/// (RFC 3461 4.1); all false is NOTIFY=NEVER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Recipient {
    /// A recipient as received in RCPT TO.
    pub fn new(address: String, orcpt: Option<String>) -> Recipient {
        Recipient {
            address,
            original: None,
            orcpt,
            status: RecipientStatus::Unresolved,
            attempts: 0,
            last_error: None,
            notify: None,
            remote_reply: None,
        }
    }

    /// Whether the sender is to be told that delivery failed (RFC 3461
    /// 4.1: without NOTIFY, failures are reported).
    pub fn wants_failure_report(&self) -> bool {
        self.notify.is_none_or(|n| n.failure)
    }

    /// Whether the sender is to be told of a delay (without NOTIFY, yes:
    /// RFC 3461 4.1 lets the MTA choose, and Postfix warns).
    pub fn wants_delay_report(&self) -> bool {
        self.notify.is_none_or(|n| n.delay)
    }

    /// Whether the sender asked to be told of successful delivery.
    pub fn wants_success_report(&self) -> bool {
        self.notify.is_some_and(|n| n.success)
    }
}

/// Who handed us the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientInfo {
    /// IP address of the SMTP client, or "local" for `sendmail`.
    pub address: String,
    /// EHLO/HELO name.
    #[serde(default)]
    pub helo: String,
    /// ESMTP, ESMTPS, UTF8SMTP... (RFC 3848 "with" keyword).
    #[serde(default)]
    pub protocol: String,
}

/// ESMTP parameters of MAIL FROM that travel with the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EsmtpParams {
    /// BODY= (7BIT, 8BITMIME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// SMTPUTF8 was given.
    #[serde(default)]
    pub smtputf8: bool,
    /// RFC 3461 ENVID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// RFC 3461 RET (FULL or HDRS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<String>,
}

/// The envelope of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    /// Reverse path; empty for the null sender (bounces).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Unix time of arrival.
    pub arrival: u64,
    /// Size of the data file in bytes.
    pub size: u64,
    /// Delivery passes made.
    #[serde(default)]
    pub attempts: u32,
    /// Unix time of the next try (deferred entries).
    #[serde(default)]
    pub next_try: u64,
    #[serde(default)]
    pub client: ClientInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    #[serde(default)]
    pub params: EsmtpParams,
    /// The sender has been told that delivery is delayed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
    /// Header fields (CRLF-ended) that go before the stored message when
    /// it is delivered: Authentication-Results, DKIM-Signature. Kept here
    /// so the data file is written once, as it streams in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub added_headers: String,
    /// Local copies go to the recipient's Junk folder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub junk: bool,
}

/// Seconds since 1970.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An envelope written and fsynced under `tmp/`, not yet queued.
#[derive(Debug)]
#[must_use = "publish or unstage it"]
pub struct StagedEnvelope {
    tmp: PathBuf,
    id: String,
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    /// The spool at `root` (not touched until used).
    pub fn new(root: &Path) -> Spool {
        Spool {
            root: root.to_path_buf(),
        }
    }

    /// Create every directory of the spool.
    pub fn create_dirs(&self) -> io::Result<()> {
        std::fs::create_dir_all(self.root.join("data"))?;
        std::fs::create_dir_all(self.root.join("tmp"))?;
        for s in QueueState::ALL {
            std::fs::create_dir_all(self.dir(s))?;
        }
        Ok(())
    }

    /// Directory of a state.
    pub fn dir(&self, state: QueueState) -> PathBuf {
        self.root.join(state.dir_name())
    }

    /// smtpd's greylisting table (a file of its own, no queue state).
    pub fn greylist_path(&self) -> PathBuf {
        self.root.join("greylist")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The message file of `id`.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.root.join("data").join(id)
    }

    /// The envelope of `id` in `state`.
    pub fn envelope_path(&self, state: QueueState, id: &str) -> PathBuf {
        self.dir(state).join(id)
    }

    /// Create the data file for a new message; the caller writes it,
    /// fsyncs it, then calls [`Spool::commit`] (or [`Spool::discard`]).
    pub fn create_data(&self, id: &str) -> Result<File, SpoolError> {
        let path = self.data_path(id);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// Queue a message whose data file is written and fsynced: write the
    /// envelope, fsync it, rename it into `incoming/`. The caller must then
    /// make the directories durable with [`Spool::sync_new_entries`] before
    /// acknowledging (done separately so that many sessions can share one
    /// directory fsync).
    pub fn commit(&self, envelope: &Envelope) -> Result<(), SpoolError> {
        self.write_envelope_to(QueueState::Incoming, envelope, false)
    }

    /// The first half of [`Spool::commit`], which may run while the data
    /// file is being fsynced: write and fsync the envelope under `tmp/`.
    /// [`Spool::publish`] then moves it into `incoming/`, once the data
    /// file and its name in `data/` are durable, so no envelope ever names
    /// data a crash could lose.
    pub fn stage_envelope(&self, envelope: &Envelope) -> Result<StagedEnvelope, SpoolError> {
        let tmp = self.write_envelope_tmp(envelope)?;
        Ok(StagedEnvelope {
            tmp,
            id: envelope.id.clone(),
        })
    }

    /// The second half of [`Spool::commit`]: rename a staged envelope into
    /// `incoming/` (then [`Spool::sync_new_entries`] as after `commit`).
    pub fn publish(&self, staged: StagedEnvelope) -> Result<(), SpoolError> {
        let dest = self.envelope_path(QueueState::Incoming, &staged.id);
        std::fs::rename(&staged.tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&staged.tmp);
            io_err(&dest)(e)
        })
    }

    /// Remove a staged envelope that will not be published.
    pub fn unstage(&self, staged: StagedEnvelope) {
        let _ = std::fs::remove_file(&staged.tmp);
    }

    /// fsync `data/` and `incoming/`, making every committed entry durable.
    pub fn sync_new_entries(&self) -> Result<(), SpoolError> {
        let data = self.data_dir();
        safeio::sync_dir(&data).map_err(io_err(&data))?;
        self.sync_incoming()
    }

    /// fsync `incoming/` alone, for entries whose data file and its name
    /// in `data/` were made durable before the envelope was published.
    pub fn sync_incoming(&self) -> Result<(), SpoolError> {
        let inc = self.dir(QueueState::Incoming);
        safeio::sync_dir(&inc).map_err(io_err(&inc))
    }

    /// Remove the data file of a message that was not queued.
    pub fn discard(&self, id: &str) {
        let _ = std::fs::remove_file(self.data_path(id));
    }

    /// Replace the envelope of `envelope.id` in `state` whole, durably.
    pub fn write_envelope(&self, state: QueueState, envelope: &Envelope) -> Result<(), SpoolError> {
        self.write_envelope_to(state, envelope, true)
    }

    fn write_envelope_to(
        &self,
        state: QueueState,
        envelope: &Envelope,
        sync_dir: bool,
    ) -> Result<(), SpoolError> {
        let tmp = self.write_envelope_tmp(envelope)?;
        let dest = self.envelope_path(state, &envelope.id);
        std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        if sync_dir {
            safeio::sync_parent(&dest).map_err(io_err(&dest))?;
        }
        Ok(())
    }

    /// Write and fsync `envelope` as `tmp/<id>.env`; its path.
    fn write_envelope_tmp(&self, envelope: &Envelope) -> Result<PathBuf, SpoolError> {
        let tmp = self.root.join("tmp").join(format!("{}.env", envelope.id));
        let json = serde_json::to_vec(envelope).expect("envelopes always serialize");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        let written = f.write_all(&json).and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        Ok(tmp)
    }

    /// The message file of `id`, opened for reading (a regular file only:
    /// smtpd's user can write `data/`).
    pub fn open_data(&self, id: &str) -> Result<File, SpoolError> {
        let path = self.data_path(id);
        safeio::open_regular(&path).map_err(io_err(&path))
    }

    /// Read the envelope of `id` in `state`.
    pub fn read_envelope(&self, state: QueueState, id: &str) -> Result<Envelope, SpoolError> {
        let path = self.envelope_path(state, id);
        let mut bytes = Vec::new();
        safeio::open_regular(&path)
            .and_then(|f| {
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_ENVELOPE), &mut bytes)
            })
            .map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|source| SpoolError::BadEnvelope { path, source })
    }

    /// Move the envelope of `id` from one state to another, durably.
    pub fn move_entry(&self, id: &str, from: QueueState, to: QueueState) -> Result<(), SpoolError> {
        let src = self.envelope_path(from, id);
        let dst = self.envelope_path(to, id);
        safeio::rename_durable(&src, &dst).map_err(io_err(&src))
    }

    /// Remove a finished message: the envelope first (so a crash leaves only
    /// garbage data, never an envelope without data), then the data. No
    /// fsync, as Postfix: a power failure may bring the envelope back,
    /// and the message is then delivered twice, never lost.
    pub fn remove(&self, id: &str, state: QueueState) -> Result<(), SpoolError> {
        let env = self.envelope_path(state, id);
        std::fs::remove_file(&env).map_err(io_err(&env))?;
        let data = self.data_path(id);
        match std::fs::remove_file(&data) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&data)(e)),
        }
    }

    /// The state whose directory holds the envelope of `id`, if any.
    pub fn locate(&self, id: &str) -> Option<QueueState> {
        QueueState::ALL
            .into_iter()
            .find(|s| self.envelope_path(*s, id).exists())
    }

    /// The ids of the entries in `state`, oldest first. Names that are not
    /// queue ids are skipped.
    pub fn list(&self, state: QueueState) -> Result<Vec<String>, SpoolError> {
        let dir = self.dir(state);
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_queue_id(n))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Remove data files that no envelope refers to and leftover temporary
    /// envelopes, if older than `min_age_secs` (younger ones may belong to a
    /// session still writing). Returns how many files were removed.
    pub fn remove_orphans(&self, min_age_secs: u64) -> Result<usize, SpoolError> {
        let mut live = std::collections::HashSet::new();
        for s in QueueState::ALL {
            live.extend(self.list(s)?);
        }
        let now = SystemTime::now();
        let old_enough = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age.as_secs() >= min_age_secs)
        };
        let mut removed = 0;
        // spool/tmp/<id>.env, and the maildrop's <id>.tmp a sendmail that
        // died mid-write leaves.
        let dirs = [
            (self.data_dir(), ""),
            (self.root.join("tmp"), ".env"),
            (self.dir(QueueState::Maildrop), ".tmp"),
        ];
        for (dir, suffix) in dirs {
            for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(suffix) else {
                    continue;
                };
                let path = entry.path();
                if !live.contains(id) && old_enough(&path) && std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue_id::new_queue_id;

    fn envelope(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            sender: "a@x.test".into(),
            recipients: vec![Recipient::new("b@y.test".into(), None)],
            arrival: unix_now(),
            size: 5,
            attempts: 0,
            next_try: 0,
            client: ClientInfo::default(),
            auth_user: None,
            params: EsmtpParams::default(),
            delay_warned: false,
            added_headers: String::new(),
            junk: false,
        }
    }

    #[test]
    fn queue_move_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let id = new_queue_id();
        let mut f = spool.create_data(&id).unwrap();
        f.write_all(b"hello").unwrap();
        f.sync_all().unwrap();
        spool.commit(&envelope(&id)).unwrap();
        spool.sync_new_entries().unwrap();
        assert_eq!(spool.list(QueueState::Incoming).unwrap(), vec![id.clone()]);
        spool
            .move_entry(&id, QueueState::Incoming, QueueState::Deferred)
            .unwrap();
        let mut env = spool.read_envelope(QueueState::Deferred, &id).unwrap();
        env.recipients[0].status = RecipientStatus::Delivered;
        spool.write_envelope(QueueState::Deferred, &env).unwrap();
        assert_eq!(spool.read_envelope(QueueState::Deferred, &id).unwrap(), env);
        assert_eq!(spool.remove_orphans(0).unwrap(), 0);
        spool.remove(&id, QueueState::Deferred).unwrap();
        assert!(!spool.data_path(&id).exists());
    }

    #[test]
    fn orphans_are_removed_only_when_old() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let id = new_queue_id();
        spool.create_data(&id).unwrap();
        let drop_dir = spool.dir(QueueState::Maildrop);
        let half_written = new_queue_id();
        std::fs::write(drop_dir.join(format!("{half_written}.tmp")), "x").unwrap();
        let complete = new_queue_id();
        std::fs::write(drop_dir.join(&complete), "x").unwrap();
        assert_eq!(spool.remove_orphans(3600).unwrap(), 0);
        assert_eq!(spool.remove_orphans(0).unwrap(), 2);
        assert!(
            drop_dir.join(&complete).exists(),
            "a finished maildrop file is mail"
        );
    }
}
