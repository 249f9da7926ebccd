//! IMAP UIDs of a Maildir folder (RFC 9051 2.3.1.1): UIDVALIDITY, UIDNEXT
//! and the UID of every message file, kept in `mailsrv-uidlist` inside the
//! folder.
//!
//! The file uses the syntax of Dovecot's `dovecot-uidlist` version 3:
//!
//! ```text
//! 3 V1700000000 N43
//! 41 :1700000000.M1P2.host,S=1234,W=1260
//! 42 :1700000001.M3P4.host,S=99,W=102
//! ```
//!
//! Messages are named by their base name (the file name before `:`), which
//! does not change when flags change. A folder with no list of ours but a
//! `dovecot-uidlist` keeps Dovecot's UIDVALIDITY and UIDs.
//!
//! Every sync runs under `mailsrv-uidlist.lock`, so two sessions never give
//! one file two UIDs; deliveries only add files to `new/` and need no lock.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::safeio::{lock_exclusive, write_atomic};

/// Our list's file name inside the folder.
pub const UIDLIST_FILE: &str = "mailsrv-uidlist";
/// Dovecot's, read once when taking over a folder.
pub const DOVECOT_UIDLIST_FILE: &str = "dovecot-uidlist";
const LOCK_FILE: &str = "mailsrv-uidlist.lock";

/// A message file of the folder with its UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidEntry {
    pub uid: u32,
    /// The file name before `:`.
    pub base: String,
    /// The whole file name now (with `:2,<flags>` when in cur/).
    pub file_name: String,
    /// Whether the file is in `new/` (else `cur/`).
    pub in_new: bool,
}

impl UidEntry {
    /// The file's path inside `folder`.
    pub fn path(&self, folder: &Path) -> PathBuf {
        folder
            .join(if self.in_new { "new" } else { "cur" })
            .join(&self.file_name)
    }

    /// The Maildir info flags (after `:2,`), e.g. `FS`.
    pub fn flags(&self) -> &str {
        self.file_name
            .split_once(":2,")
            .map(|(_, f)| f)
            .unwrap_or("")
    }
}

/// The folder's UID state after a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidState {
    pub uid_validity: u32,
    pub uid_next: u32,
    /// Every message, by ascending UID.
    pub entries: Vec<UidEntry>,
}

/// Bring the folder's UID list up to date with its `new/` and `cur/`:
/// files gone are dropped, new files get the next UIDs in name (arrival)
/// order. The list is rewritten only when it changed.
pub fn sync(folder: &Path) -> io::Result<UidState> {
    let _lock = lock_exclusive(&folder.join(LOCK_FILE))?;
    let list_path = folder.join(UIDLIST_FILE);
    let stored = match std::fs::read_to_string(&list_path) {
        Ok(text) => parse(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let (loaded, mut stored) = match stored {
        Some(s) => (true, s),
        None => (false, import_dovecot(folder).unwrap_or_else(fresh)),
    };
    let files = scan(folder)?;
    let before = stored.uids.len();
    stored.uids.retain(|base, _| files.contains_key(base));
    let mut changed = !loaded || stored.uids.len() != before;
    // New files are numbered in name order, which for Maildir names is
    // arrival order.
    let mut new: Vec<&String> = (files.keys())
        .filter(|base| !stored.uids.contains_key(base.as_str()))
        .collect();
    new.sort_unstable();
    let mut added = Vec::with_capacity(new.len());
    for base in new {
        let uid = stored.uid_next;
        stored.uid_next = stored
            .uid_next
            .checked_add(1)
            .ok_or_else(|| io::Error::other(format!("{}: UIDs exhausted", folder.display())))?;
        added.push((base.clone(), uid));
    }
    changed |= !added.is_empty();
    stored.uids.extend(added);
    if changed {
        write_atomic(&list_path, render(&stored).as_bytes())?;
    }
    let mut files = files;
    let mut entries: Vec<UidEntry> = (stored.uids.into_iter())
        .filter_map(|(base, uid)| {
            let (file_name, in_new) = files.remove(&base)?;
            Some(UidEntry {
                uid,
                base,
                file_name,
                in_new,
            })
        })
        .collect();
    entries.sort_unstable_by_key(|e| e.uid);
    Ok(UidState {
        uid_validity: stored.uid_validity,
        uid_next: stored.uid_next,
        entries,
    })
}

/// Give a folder a UID state of its own choosing (a restore): the files
/// named by `uids` (UID, base name) must already be in the folder, and
/// `uid_next` above every UID, as RFC 9051 2.3.1.1 requires.
pub fn install(
    folder: &Path,
    uid_validity: u32,
    uid_next: u32,
    uids: &[(u32, String)],
) -> io::Result<()> {
    if uids.iter().any(|(uid, _)| *uid >= uid_next) || uid_validity == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "UIDNEXT must be above every UID and UIDVALIDITY not 0",
        ));
    }
    let _lock = lock_exclusive(&folder.join(LOCK_FILE))?;
    let stored = Stored {
        uid_validity,
        uid_next,
        uids: uids
            .iter()
            .map(|(uid, base)| (base.clone(), *uid))
            .collect(),
    };
    write_atomic(&folder.join(UIDLIST_FILE), render(&stored).as_bytes())
}

struct Stored {
    uid_validity: u32,
    uid_next: u32,
    uids: HashMap<String, u32>,
}

/// A new folder's state: UIDVALIDITY from the clock, as Dovecot does, so a
/// folder deleted and made again gets a different one (RFC 9051 2.3.1.1).
fn fresh() -> Stored {
    let now = crate::spool::unix_now();
    Stored {
        uid_validity: u32::try_from(now).unwrap_or(u32::MAX).max(1),
        uid_next: 1,
        uids: HashMap::new(),
    }
}

/// Base name → (current file name, in new/) for every message file.
fn scan(folder: &Path) -> io::Result<HashMap<String, (String, bool)>> {
    let mut files = HashMap::new();
    for (sub, in_new) in [("cur", false), ("new", true)] {
        let entries = match std::fs::read_dir(folder.join(sub)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let base = name.split(':').next().unwrap_or(&name).to_string();
            // A file seen in both (moved between the two reads) counts once.
            files.entry(base).or_insert((name, in_new));
        }
    }
    Ok(files)
}

/// Parse version-3 syntax (ours and Dovecot's); `None` if malformed.
fn parse(text: &str) -> Option<Stored> {
    let mut lines = text.lines();
    let header = lines.next()?;
    let mut fields = header.split(' ');
    let version = fields.next()?;
    let (uid_validity, uid_next) = match version {
        "3" => {
            let mut v: Option<u32> = None;
            let mut n: Option<u32> = None;
            for f in fields {
                if let Some(x) = f.strip_prefix('V') {
                    v = x.parse().ok();
                } else if let Some(x) = f.strip_prefix('N') {
                    n = x.parse().ok();
                }
            }
            (v?, n?)
        }
        // Version 1: "1 <uidvalidity> <uidnext>", records "<uid> <file>".
        "1" => (fields.next()?.parse().ok()?, fields.next()?.parse().ok()?),
        _ => return None,
    };
    let mut uids = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (uid, rest) = line.split_once(' ')?;
        let uid: u32 = uid.parse().ok()?;
        // v3 may put extension fields before " :file"; v1 has just the name.
        let file = if version == "3" {
            match rest.strip_prefix(':') {
                Some(f) => f,
                None => rest.split_once(" :")?.1,
            }
        } else {
            rest
        };
        let base = file.split(':').next().unwrap_or(file);
        uids.insert(base.to_string(), uid);
    }
    Some(Stored {
        uid_validity,
        uid_next: uid_next.max(uids.values().max().map_or(1, |m| m + 1)),
        uids,
    })
}

fn import_dovecot(folder: &Path) -> Option<Stored> {
    let text = std::fs::read_to_string(folder.join(DOVECOT_UIDLIST_FILE)).ok()?;
    parse(&text)
}

fn render(s: &Stored) -> String {
    let mut out = format!("3 V{} N{}\n", s.uid_validity, s.uid_next);
    let mut by_uid: Vec<(&u32, &String)> = s.uids.iter().map(|(b, u)| (u, b)).collect();
    by_uid.sort();
    for (uid, base) in by_uid {
        out.push_str(&format!("{uid} :{base}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maildir::create_maildir;

    fn folder() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        create_maildir(d.path()).unwrap();
        d
    }

    #[test]
    fn an_installed_state_is_what_sync_finds() {
        let d = folder();
        touch(d.path(), "cur", "1.M1.h,S=1:2,S");
        touch(d.path(), "new", "2.M2.h,S=1");
        let uids = [(7, "1.M1.h,S=1".to_string()), (9, "2.M2.h,S=1".to_string())];
        assert!(install(d.path(), 42, 9, &uids).is_err());
        install(d.path(), 42, 12, &uids).unwrap();
        let state = sync(d.path()).unwrap();
        assert_eq!((state.uid_validity, state.uid_next), (42, 12));
        let got: Vec<(u32, &str)> = state
            .entries
            .iter()
            .map(|e| (e.uid, e.base.as_str()))
            .collect();
        assert_eq!(got, [(7, "1.M1.h,S=1"), (9, "2.M2.h,S=1")]);
    }

    fn touch(dir: &Path, sub: &str, name: &str) {
        std::fs::write(dir.join(sub).join(name), b"x").unwrap();
    }

    #[test]
    fn uids_are_assigned_in_order_and_stay() {
        let d = folder();
        touch(d.path(), "new", "200.M1.h,S=1");
        touch(d.path(), "new", "100.M1.h,S=1");
        let s = sync(d.path()).unwrap();
        assert_eq!(s.uid_next, 3);
        assert_eq!(
            s.entries
                .iter()
                .map(|e| (e.uid, e.base.as_str()))
                .collect::<Vec<_>>(),
            [(1, "100.M1.h,S=1"), (2, "200.M1.h,S=1")]
        );
        // A flag change (rename into cur/) keeps the UID.
        std::fs::rename(
            d.path().join("new/100.M1.h,S=1"),
            d.path().join("cur/100.M1.h,S=1:2,S"),
        )
        .unwrap();
        touch(d.path(), "new", "300.M1.h,S=1");
        let again = sync(d.path()).unwrap();
        assert_eq!(again.uid_validity, s.uid_validity);
        let e1 = &again.entries[0];
        assert_eq!((e1.uid, e1.flags(), e1.in_new), (1, "S", false));
        assert_eq!(again.entries[2].uid, 3);
        // Expunged: the UID is never reused.
        std::fs::remove_file(d.path().join("new/300.M1.h,S=1")).unwrap();
        touch(d.path(), "new", "400.M1.h,S=1");
        let third = sync(d.path()).unwrap();
        assert_eq!(
            third.entries.iter().map(|e| e.uid).collect::<Vec<_>>(),
            [1, 2, 4]
        );
        assert_eq!(third.uid_next, 5);
    }

    #[test]
    fn no_rewrite_when_nothing_changed() {
        let d = folder();
        touch(d.path(), "new", "1.a.h");
        sync(d.path()).unwrap();
        let path = d.path().join(UIDLIST_FILE);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        sync(d.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
    }

    #[test]
    fn dovecot_uidlist_is_taken_over() {
        let d = folder();
        touch(d.path(), "cur", "1600000000.M5P6.old,S=10,W=11:2,RS");
        touch(d.path(), "new", "1700000000.M1P2.new,S=5,W=6");
        std::fs::write(
            d.path().join(DOVECOT_UIDLIST_FILE),
            "3 V1599999999 N78 G3085f01b7f11094c501100008c4a11c1\n\
             77 W11 :1600000000.M5P6.old,S=10,W=11\n\
             12 :1500000000.gone\n",
        )
        .unwrap();
        let s = sync(d.path()).unwrap();
        assert_eq!(s.uid_validity, 1599999999);
        assert_eq!(
            s.entries.iter().map(|e| e.uid).collect::<Vec<_>>(),
            [77, 78],
            "{s:?}"
        );
        assert_eq!(s.uid_next, 79);
        // Our own list now exists and wins from here on.
        assert!(d.path().join(UIDLIST_FILE).exists());
    }

    #[test]
    fn version_1_and_malformed_lists() {
        let v1 = parse("1 12345 10\n3 1.a.h\n9 2.b.h:2,S\n").unwrap();
        assert_eq!((v1.uid_validity, v1.uid_next), (12345, 10));
        assert_eq!(v1.uids["2.b.h"], 9);
        assert!(parse("").is_none());
        assert!(parse("3 N5\n").is_none());
        assert!(parse("3 V1 N2\nnot a record\n").is_none());
        // UIDNEXT is never below a stored UID.
        assert_eq!(parse("3 V1 N2\n7 :x\n").unwrap().uid_next, 8);
    }
}
