//! State of folders shared by every session of the daemon: the folder's
//! UID list and keywords as last read from disk (reused until `new/` or
//! `cur/` changes, so SELECT of a large folder does not rescan it), and
//! the ENVELOPE of each message once computed.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::flags::Keywords;
use common::uidlist::{self, UidEntry};

/// How long after a directory change its mtime alone cannot be trusted
/// to show a further change (file system timestamps are coarse).
const MTIME_SLACK: Duration = Duration::from_secs(2);
/// Envelopes kept per folder; past this the folder's are dropped.
const MAX_ENVELOPES: usize = 500_000;
/// Folders kept; past this, those no session uses are dropped.
const MAX_FOLDERS: usize = 4096;

/// A folder as last read from disk.
#[derive(Debug)]
pub struct Snapshot {
    pub uid_validity: u32,
    pub uid_next: u32,
    pub keywords: Keywords,
    /// Every message, by ascending UID.
    pub entries: Vec<UidEntry>,
}

#[derive(Default)]
struct FolderState {
    snapshot: Option<(Arc<Snapshot>, [Option<SystemTime>; 2])>,
    /// ENVELOPE responses by (base name, UTF-8 session).
    envelopes: HashMap<(String, bool), Arc<[u8]>>,
}

/// The daemon's cache of folders.
#[derive(Default)]
pub struct FolderCache {
    folders: Mutex<HashMap<PathBuf, Arc<Mutex<FolderState>>>>,
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
        let mtimes = dir_mtimes(folder);
        let now = SystemTime::now();
        let settled = mtimes
            .iter()
            .all(|m| m.is_some_and(|m| now.duration_since(m).unwrap_or_default() >= MTIME_SLACK));
        if let Some((snapshot, seen)) = &state.snapshot {
            if *seen == mtimes && settled {
                return Ok(snapshot.clone());
            }
        }
        let list = uidlist::sync(folder)?;
        let snapshot = Arc::new(Snapshot {
            uid_validity: list.uid_validity,
            uid_next: list.uid_next,
            keywords: Keywords::load(folder)?,
            entries: list.entries,
        });
        if state
            .snapshot
            .as_ref()
            .is_some_and(|(old, _)| old.uid_validity != snapshot.uid_validity)
        {
            state.envelopes.clear();
        }
        state.snapshot = Some((snapshot.clone(), mtimes));
        Ok(snapshot)
    }

    /// A cached ENVELOPE.
    pub fn envelope(&self, folder: &Path, base: &str, utf8: bool) -> Option<Arc<[u8]>> {
        let state = self.state(folder);
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.envelopes.get(&(base.to_string(), utf8)).cloned()
    }

    /// Remember an ENVELOPE (message files never change, so it stays
    /// right while the file exists).
    pub fn keep_envelope(&self, folder: &Path, base: &str, utf8: bool, envelope: Arc<[u8]>) {
        let state = self.state(folder);
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if state.envelopes.len() >= MAX_ENVELOPES {
            state.envelopes.clear();
        }
        state.envelopes.insert((base.to_string(), utf8), envelope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(b.entries, a.entries);
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
    }
}
