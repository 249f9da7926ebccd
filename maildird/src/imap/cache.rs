//! State of folders shared by every session of the daemon: the folder's
//! UID list and keywords as last read from disk (reused until `new/` or
//! `cur/` changes, so SELECT of a large folder does not rescan it), and
//! what was once computed from each message (its ENVELOPE, and the values
//! of header fields searched for), kept in the folder's
//! `mailsrv-envelopes` file so a restart does not read every message
//! again.
//!
//! The file is only a cache: records are appended (one write per FETCH),
//! a torn or unreadable tail is ignored, and the file is rewritten with
//! only the live messages when stale records outnumber them.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::flags::Keywords;
use common::uidlist;

use super::folder::MessageFile;

/// How long after a directory change its mtime alone cannot be trusted
/// to show a further change: file systems stamp with a clock that ticks
/// every few milliseconds (the kernel's coarse clock; twice its longest
/// tick here), or, for those keeping whole seconds, every second or two.
const FINE_MTIME_SLACK: Duration = Duration::from_millis(20);
const COARSE_MTIME_SLACK: Duration = Duration::from_secs(2);
/// Records kept per folder; past this the folder's are dropped.
const MAX_RECORDS: usize = 500_000;
/// Folders kept; past this, those no session uses are dropped.
const MAX_FOLDERS: usize = 4096;
/// The envelope cache's file inside the folder.
const ENVELOPES_FILE: &str = "mailsrv-envelopes";
const ENVELOPES_MAGIC: &[u8] = b"mailsrv-envelopes 2\n";

/// What a record holds about a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// Its ENVELOPE, for UTF-8 sessions or not.
    Envelope { utf8: bool },
    /// The searchable values of the header field of this (lowercase) name.
    Field(Box<str>),
}

/// A record's message (by Maildir base name) and content.
type RecordKey = (String, Kind);

/// A folder as last read from disk.
#[derive(Debug)]
pub struct Snapshot {
    pub uid_validity: u32,
    pub uid_next: u32,
    pub keywords: Keywords,
    /// Every message, by ascending UID. Sessions whose view agrees with
    /// the folder hold this very list rather than a copy.
    pub entries: Arc<Vec<Arc<MessageFile>>>,
    /// How many of them are in `new/`.
    pub in_new: usize,
}

#[derive(Default)]
struct FolderState {
    /// The snapshot, the directories' mtimes read before it was made, and
    /// when they were read.
    snapshot: Option<(Arc<Snapshot>, [Option<SystemTime>; 2], SystemTime)>,
    /// What was computed from each message.
    records: HashMap<RecordKey, Arc<[u8]>>,
    /// Whether the file was read.
    loaded: bool,
    /// Computed since the last write to the file.
    unsaved: Vec<(RecordKey, Arc<[u8]>)>,
}

/// The daemon's cache of folders.
#[derive(Default)]
pub struct FolderCache {
    folders: Mutex<HashMap<PathBuf, Arc<Mutex<FolderState>>>>,
}

/// Whether every mtime in `mtimes` was older than its file system's
/// timestamp granularity at `read_at`. A time with nanoseconds comes from
/// a file system with fine timestamps; whole seconds suggest coarse ones.
fn settled(mtimes: &[Option<SystemTime>; 2], read_at: SystemTime) -> bool {
    mtimes.iter().all(|m| {
        m.is_some_and(|m| {
            let fine = m
                .duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|d| d.subsec_nanos() != 0);
            let slack = if fine {
                FINE_MTIME_SLACK
            } else {
                COARSE_MTIME_SLACK
            };
            read_at.duration_since(m).unwrap_or_default() >= slack
        })
    })
}

fn dir_mtimes(folder: &Path) -> [Option<SystemTime>; 2] {
    ["new", "cur"].map(|d| {
        std::fs::metadata(folder.join(d))
            .and_then(|m| m.modified())
            .ok()
    })
}

impl FolderCache {
    fn state(&self, folder: &Path) -> Arc<Mutex<FolderState>> {
        let mut folders = self.folders.lock().unwrap_or_else(|p| p.into_inner());
        if folders.len() > MAX_FOLDERS {
            folders.retain(|_, s| Arc::strong_count(s) > 1);
        }
        folders.entry(folder.to_path_buf()).or_default().clone()
    }

    /// The folder's current state: the cached one while its directories
    /// are unchanged, else read again (and the UID list brought up to
    /// date). Two calls return the same `Arc` when nothing changed.
    pub fn snapshot(&self, folder: &Path) -> io::Result<Arc<Snapshot>> {
        let state = self.state(folder);
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let mtimes = dir_mtimes(folder);
        if let Some((snapshot, seen, read_at)) = &state.snapshot {
            // Unchanged mtimes prove an unchanged folder only if they were
            // a tick old when read: a change after that gets a later one.
            if *seen == mtimes && settled(&mtimes, *read_at) {
                return Ok(snapshot.clone());
            }
        }
        let list = uidlist::sync(folder)?;
        let keywords = Keywords::load(folder)?;
        let previous = state.snapshot.as_ref().map(|(s, _, _)| s.clone());
        let (uid_validity, uid_next) = (list.uid_validity, list.uid_next);
        let in_new = list.entries.iter().filter(|e| e.in_new).count();
        let entries = Arc::new(entries_of(list, &keywords, previous.as_deref()));
        let snapshot = Arc::new(Snapshot {
            uid_validity,
            uid_next,
            keywords,
            in_new,
            entries,
        });
        if state
            .snapshot
            .as_ref()
            .is_some_and(|(old, _, _)| old.uid_validity != snapshot.uid_validity)
        {
            state.records.clear();
        }
        state.snapshot = Some((snapshot.clone(), mtimes, now));
        Ok(snapshot)
    }

    /// A cached ENVELOPE.
    pub fn envelope(&self, folder: &Path, base: &str, utf8: bool) -> Option<Arc<[u8]>> {
        self.record(folder, (base.to_string(), Kind::Envelope { utf8 }))
    }

    /// Remember an ENVELOPE (message files never change, so it stays
    /// right while the file exists); [`FolderCache::save`]
    /// writes it out.
    pub fn keep_envelope(&self, folder: &Path, base: &str, utf8: bool, envelope: Arc<[u8]>) {
        self.keep(
            folder,
            (base.to_string(), Kind::Envelope { utf8 }),
            envelope,
        );
    }

    /// The cached values of header field `name` (lowercase), as made by
    /// [`field_values`].
    pub fn field_values(&self, folder: &Path, base: &str, name: &str) -> Option<Arc<[u8]>> {
        self.record(folder, (base.to_string(), Kind::Field(name.into())))
    }

    /// Remember the values of header field `name` (lowercase).
    pub fn keep_field_values(&self, folder: &Path, base: &str, name: &str, values: Arc<[u8]>) {
        self.keep(folder, (base.to_string(), Kind::Field(name.into())), values);
    }

    fn record(&self, folder: &Path, key: RecordKey) -> Option<Arc<[u8]>> {
        let state = self.state(folder);
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.loaded {
            state.loaded = true;
            load_envelopes(folder, &mut state);
        }
        state.records.get(&key).cloned()
    }

    fn keep(&self, folder: &Path, key: RecordKey, value: Arc<[u8]>) {
        // A record's head is one line of words.
        if key.0.contains([' ', '\n']) {
            return;
        }
        let state = self.state(folder);
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if state.records.len() >= MAX_RECORDS {
            // Searched fields are worth less than envelopes.
            if matches!(key.1, Kind::Field(_)) {
                return;
            }
            state.records.clear();
        }
        state.unsaved.push((key.clone(), value.clone()));
        state.records.insert(key, value);
    }

    /// Append the records computed since the last call to the folder's
    /// file, in one write.
    pub fn save(&self, folder: &Path) -> io::Result<()> {
        let state = self.state(folder);
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if state.unsaved.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for (key, value) in state.unsaved.drain(..) {
            write_record(&mut out, &key, &value);
        }
        let path = folder.join(ENVELOPES_FILE);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)?;
        if file.metadata()?.len() == 0 {
            out.splice(0..0, ENVELOPES_MAGIC.iter().copied());
        }
        file.write_all(&out)
    }
}

/// One `<base> <kind> <length>\n<value>\n` record; the kind is `0` or `1`
/// for an ENVELOPE (UTF-8 or not) and `h:<name>` for a header field.
fn write_record(out: &mut Vec<u8>, (base, kind): &RecordKey, value: &[u8]) {
    let kind = match kind {
        Kind::Envelope { utf8 } => u8::from(*utf8).to_string(),
        Kind::Field(name) => format!("h:{name}"),
    };
    out.extend_from_slice(format!("{base} {kind} {}\n", value.len()).as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The messages of `list`, each the previous snapshot's own record when
/// its file is unchanged: sessions then see it unchanged without
/// comparing flags, and its counted size is kept.
fn entries_of(
    list: uidlist::UidState,
    keywords: &Keywords,
    previous: Option<&Snapshot>,
) -> Vec<Arc<MessageFile>> {
    let reusable = previous
        .filter(|p| p.uid_validity == list.uid_validity && p.keywords == *keywords)
        .map_or(&[][..], |p| p.entries.as_slice());
    let mut old = reusable.iter().peekable();
    (list.entries.into_iter())
        .map(|e| {
            while old.next_if(|o| o.uid < e.uid).is_some() {}
            match old.next_if(|o| o.uid == e.uid) {
                Some(o) if o.file_name == e.file_name && o.in_new == e.in_new => o.clone(),
                _ => Arc::new(MessageFile::new(e, keywords)),
            }
        })
        .collect()
}

/// Read the folder's envelope file into `state`; rewrite it when most of
/// its records are of messages no longer in the folder.
fn load_envelopes(folder: &Path, state: &mut FolderState) {
    let path = folder.join(ENVELOPES_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    let Some(mut rest) = bytes.strip_prefix(ENVELOPES_MAGIC) else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    let mut records = 0usize;
    while let Some((key, envelope, tail)) = parse_record(rest) {
        records += 1;
        state.records.insert(key, Arc::from(envelope));
        rest = tail;
    }
    if !rest.is_empty() {
        // A torn last write: cut off, or the next record appended would be
        // read as its missing part.
        let valid = (bytes.len() - rest.len()) as u64;
        let cut = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(valid));
        if let Err(e) = cut {
            tracing::warn!("{}: {e}", path.display());
        }
    }
    let Some((snapshot, _, _)) = &state.snapshot else {
        return;
    };
    let live: HashSet<&str> = snapshot.entries.iter().map(|e| e.base.as_str()).collect();
    state
        .records
        .retain(|(base, _), _| live.contains(base.as_str()));
    if records > 2 * state.records.len() + 1000 {
        let mut out = ENVELOPES_MAGIC.to_vec();
        for (key, value) in &state.records {
            write_record(&mut out, key, value);
        }
        if let Err(e) = common::safeio::write_atomic(&path, &out) {
            tracing::warn!("{}: {e}", path.display());
        }
    }
}

/// One record (see [`write_record`]) and what follows it.
fn parse_record(bytes: &[u8]) -> Option<(RecordKey, &[u8], &[u8])> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..nl]).ok()?;
    let mut fields = head.split(' ');
    let (base, kind, len) = (fields.next()?, fields.next()?, fields.next()?);
    let kind = match kind {
        "0" | "1" => Kind::Envelope { utf8: kind == "1" },
        _ => Kind::Field(kind.strip_prefix("h:")?.into()),
    };
    let len: usize = len.parse().ok()?;
    let body = bytes.get(nl + 1..)?;
    if body.get(len) != Some(&b'\n') {
        return None;
    }
    Some(((base.to_string(), kind), &body[..len], &body[len + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtimes_are_trusted_once_a_timestamp_tick_old() {
        let at = |secs: u64, nanos: u32| Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos));
        let fine = [at(1_000, 5_000_000), at(990, 1)];
        let read = |secs: u64, millis: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        assert!(!settled(&fine, read(1_000, 10)));
        assert!(settled(&fine, read(1_000, 30)));
        // Whole seconds: a file system that may stamp in 1 or 2 s steps.
        let coarse = [at(1_000, 0), at(990, 0)];
        assert!(!settled(&coarse, read(1_001, 500)));
        assert!(settled(&coarse, read(1_002, 0)));
        assert!(!settled(&[None, at(990, 1)], read(2_000, 0)));
    }

    #[test]
    fn snapshot_is_reused_until_the_folder_changes() {
        let dir = tempfile::tempdir().unwrap();
        common::maildir::create_maildir(dir.path()).unwrap();
        std::fs::write(dir.path().join("cur/1.a.h:2,S"), b"x\n").unwrap();
        let cache = FolderCache::default();
        let a = cache.snapshot(dir.path()).unwrap();
        assert_eq!(a.entries.len(), 1);
        // Just changed: not trusted, read again, same content.
        let b = cache.snapshot(dir.path()).unwrap();
        assert_eq!(b.entries[0].file_name, a.entries[0].file_name);
        std::fs::write(dir.path().join("new/2.a.h"), b"y\n").unwrap();
        assert_eq!(cache.snapshot(dir.path()).unwrap().entries.len(), 2);
        // Settled directories: the same snapshot comes back.
        let old = SystemTime::now() - Duration::from_secs(60);
        for d in ["new", "cur"] {
            std::fs::File::open(dir.path().join(d))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let c = cache.snapshot(dir.path()).unwrap();
        assert!(Arc::ptr_eq(&c, &cache.snapshot(dir.path()).unwrap()));
        cache.keep_envelope(dir.path(), "1.a.h", false, Arc::from(&b"(NIL)"[..]));
        assert!(cache.envelope(dir.path(), "1.a.h", false).is_some());
        assert!(cache.envelope(dir.path(), "1.a.h", true).is_none());
        cache.keep_field_values(
            dir.path(),
            "1.a.h",
            "message-id",
            Arc::from(&b"<a@b>\0"[..]),
        );
        cache.save(dir.path()).unwrap();
        // A torn record at the end is ignored.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(ENVELOPES_FILE))
            .unwrap();
        f.write_all(b"2.a.h 0 99\n(NIL").unwrap();
        let fresh = FolderCache::default();
        fresh.snapshot(dir.path()).unwrap();
        assert_eq!(
            fresh.envelope(dir.path(), "1.a.h", false).as_deref(),
            Some(&b"(NIL)"[..])
        );
        assert!(fresh.envelope(dir.path(), "2.a.h", false).is_none());
        assert_eq!(
            fresh
                .field_values(dir.path(), "1.a.h", "message-id")
                .as_deref(),
            Some(&b"<a@b>\0"[..])
        );
        assert!(fresh.field_values(dir.path(), "1.a.h", "subject").is_none());
        // The torn tail was cut: what is appended next reads back.
        fresh.keep_envelope(dir.path(), "1.a.h", true, Arc::from(&b"(X)"[..]));
        fresh.save(dir.path()).unwrap();
        let again = FolderCache::default();
        again.snapshot(dir.path()).unwrap();
        assert_eq!(
            again.envelope(dir.path(), "1.a.h", true).as_deref(),
            Some(&b"(X)"[..])
        );
    }
}
