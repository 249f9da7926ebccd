//! A selected IMAP mailbox over one Maildir folder: the session's view of
//! its messages (sequence numbers, UIDs, flags), kept in step with the
//! disk, and the changes a session makes (flags, expunge, copy, append).
//!
//! The view changes only when the session asks ([`Folder::refresh`]), so
//! sequence numbers stay put while a command runs (RFC 9051 7.5.1).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use common::flags::{FlagsError, Keywords, MessageFlags, SystemFlag};
use common::maildir::{self, Filing, NewToCur};
use common::safeio::sync_dir;
use common::uidlist::{self, UidEntry};

use super::cache::{FolderCache, Snapshot};

/// A message file as read from disk: shared by every session's view
/// (through [`super::cache::Snapshot`]) until its name changes.
#[derive(Debug)]
pub struct MessageFile {
    pub uid: u32,
    /// The Maildir base name (before `:`), stable across flag changes.
    pub base: String,
    /// The file name now.
    pub file_name: String,
    pub in_new: bool,
    pub flags: MessageFlags,
    /// Info letters that are neither system flags nor known keywords.
    other: String,
    size: OnceLock<u64>,
}

impl MessageFile {
    /// The file of a UID list entry, its flags read with `keywords`.
    pub fn new(entry: UidEntry, keywords: &Keywords) -> MessageFile {
        let (flags, other) = keywords.parse_info(entry.flags());
        MessageFile {
            uid: entry.uid,
            base: entry.base,
            file_name: entry.file_name,
            in_new: entry.in_new,
            flags,
            other,
            size: OnceLock::new(),
        }
    }

    /// The same message under another name, with these flags.
    fn renamed(
        &self,
        file_name: String,
        in_new: bool,
        flags: MessageFlags,
        other: String,
    ) -> MessageFile {
        let size = OnceLock::new();
        if let Some(s) = self.size.get() {
            let _ = size.set(*s);
        }
        MessageFile {
            uid: self.uid,
            base: self.base.clone(),
            file_name,
            in_new,
            flags,
            other,
            size,
        }
    }

    /// The file's path inside `folder`.
    pub fn path(&self, folder: &Path) -> PathBuf {
        folder
            .join(if self.in_new { "new" } else { "cur" })
            .join(&self.file_name)
    }

    /// Whether the message has this system flag.
    pub fn has(&self, flag: SystemFlag) -> bool {
        self.flags.system.contains(&flag)
    }

    /// Octets with CRLF line ends (RFC822.SIZE), counted at most once.
    pub fn size(&self, folder: &Path) -> io::Result<u64> {
        if let Some(s) = self.known_size() {
            return Ok(s);
        }
        let size = maildir::crlf_size(&self.path(folder))?;
        Ok(*self.size.get_or_init(|| size))
    }

    /// The size without reading the file, if known.
    pub fn known_size(&self) -> Option<u64> {
        self.size
            .get()
            .copied()
            .or_else(|| maildir::crlf_size_from_name(&self.base))
    }
}

/// One message as the session sees it: the shared file, and whether it
/// is \Recent for this session.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    file: &'a MessageFile,
    /// \Recent (RFC 3501 only): this session moved it out of `new/`.
    pub recent: bool,
}

impl std::ops::Deref for Message<'_> {
    type Target = MessageFile;

    fn deref(&self) -> &MessageFile {
        self.file
    }
}

/// The folder's UIDVALIDITY changed while it was selected.
#[derive(Debug, thiserror::Error)]
#[error("UIDVALIDITY changed")]
pub struct UidValidityChanged;

/// What changed on disk since the last refresh, for untagged responses.
#[derive(Debug, Default)]
pub struct Changes {
    /// Sequence numbers to announce as EXPUNGE, in the order to send them.
    pub expunged: Vec<u32>,
    /// The new message count, if messages arrived.
    pub exists: Option<u32>,
    /// Sequence numbers whose flags changed.
    pub flags_changed: Vec<u32>,
    /// A keyword was defined: FLAGS must be sent again.
    pub keywords_changed: bool,
}

/// A selected mailbox.
pub struct Folder {
    pub path: PathBuf,
    pub uid_validity: u32,
    pub uid_next: u32,
    /// The view's messages by ascending UID. While the view agrees with
    /// the cache's snapshot this is the snapshot's own list, so a session
    /// costs no memory per message and SELECT copies nothing.
    files: Arc<Vec<Arc<MessageFile>>>,
    /// UIDs this session took out of `new/` (\Recent), ascending.
    recent: Vec<u32>,
    /// UIDs of messages in the view that are gone from disk; announced as
    /// EXPUNGE at the next chance.
    gone: BTreeSet<u32>,
    pub keywords: Keywords,
    pub read_only: bool,
    cache: Arc<FolderCache>,
    /// The folder state this view was last brought up to date with.
    seen: Option<Arc<Snapshot>>,
    /// This session defined a keyword: FLAGS goes out at the next refresh.
    keywords_defined: bool,
}

impl Folder {
    /// Open the folder at `path`. A read-write open takes the messages in
    /// `new/` into `cur/` and marks them \Recent for this session.
    pub fn open(path: &Path, read_only: bool, cache: Arc<FolderCache>) -> io::Result<Folder> {
        let mut folder = Folder {
            path: path.to_path_buf(),
            uid_validity: 0,
            uid_next: 1,
            files: Arc::default(),
            recent: Vec::new(),
            gone: BTreeSet::new(),
            keywords: Keywords::default(),
            read_only,
            cache,
            seen: None,
            keywords_defined: false,
        };
        folder.refresh(true)?;
        Ok(folder)
    }

    /// Number of messages in the view.
    pub fn exists(&self) -> u32 {
        self.files.len() as u32
    }

    /// The view's message files, by sequence number less one.
    pub fn files(&self) -> &[Arc<MessageFile>] {
        &self.files
    }

    /// The message with sequence number `index + 1`.
    pub fn message(&self, index: usize) -> Option<Message<'_>> {
        self.files.get(index).map(|file| Message {
            file,
            recent: self.is_recent(file.uid),
        })
    }

    /// Every message of the view, in sequence order.
    pub fn messages(&self) -> impl Iterator<Item = Message<'_>> {
        self.files.iter().map(|file| Message {
            file,
            recent: self.is_recent(file.uid),
        })
    }

    /// The highest UID in the view (0 when empty).
    pub fn last_uid(&self) -> u32 {
        self.files.last().map_or(0, |m| m.uid)
    }

    /// The index of the message with this UID.
    pub fn index_of(&self, uid: u32) -> Option<usize> {
        self.files.binary_search_by_key(&uid, |m| m.uid).ok()
    }

    fn is_recent(&self, uid: u32) -> bool {
        self.recent.binary_search(&uid).is_ok()
    }

    /// How many messages are \Recent for this session.
    pub fn recent_count(&self) -> usize {
        self.recent.len()
    }

    /// Whether message `index` is known to be gone from disk.
    pub fn is_gone(&self, index: usize) -> bool {
        self.files
            .get(index)
            .is_some_and(|m| self.gone.contains(&m.uid))
    }

    /// Message `index` turned out to be gone (its file could not be read).
    pub fn mark_gone(&mut self, index: usize) {
        if let Some(m) = self.files.get(index) {
            self.gone.insert(m.uid);
        }
    }

    /// Bring the view up to date with the disk. Messages that vanished
    /// are removed (and reported) only when `allow_expunge`; until then
    /// they stay, marked gone.
    pub fn refresh(&mut self, allow_expunge: bool) -> io::Result<Changes> {
        let mut changes = Changes {
            keywords_changed: std::mem::take(&mut self.keywords_defined),
            ..Changes::default()
        };
        let snapshot = self.cache.snapshot(&self.path)?;
        let mut changed_uids = Vec::new();
        let mut arrived = 0;
        if !self
            .seen
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &snapshot))
        {
            arrived = self.sync(&snapshot, &mut changes, &mut changed_uids)?;
            self.seen = Some(snapshot);
        }
        if allow_expunge && !self.gone.is_empty() {
            changes.expunged = self.drop_gone();
        }
        // Numbered after the EXPUNGEs, which are sent first.
        if arrived > 0 {
            changes.exists = Some(self.exists());
        }
        changes.flags_changed = changed_uids
            .into_iter()
            .filter_map(|uid| self.index_of(uid))
            .map(|i| i as u32 + 1)
            .collect();
        Ok(changes)
    }

    /// Take the gone messages out of the view; returns their sequence
    /// numbers, highest first, so each stays valid as it is sent.
    fn drop_gone(&mut self) -> Vec<u32> {
        let gone = std::mem::take(&mut self.gone);
        let mut expunged: Vec<u32> = (self.files.iter().enumerate())
            .filter(|(_, m)| gone.contains(&m.uid))
            .map(|(i, _)| i as u32 + 1)
            .collect();
        expunged.reverse();
        Arc::make_mut(&mut self.files).retain(|m| !gone.contains(&m.uid));
        self.recent.retain(|uid| !gone.contains(uid));
        // Often the view is now the snapshot again: share it.
        if let Some(seen) = &self.seen {
            let same = seen.entries.len() == self.files.len()
                && (seen.entries.iter().zip(self.files.iter())).all(|(a, b)| Arc::ptr_eq(a, b));
            if same {
                self.files = seen.entries.clone();
            }
        }
        expunged
    }

    /// Take in `state`: flag changes (by UID) into `changed`, vanished
    /// messages marked gone, arrivals appended. Returns how many arrived.
    fn sync(
        &mut self,
        state: &Snapshot,
        changes: &mut Changes,
        changed: &mut Vec<u32>,
    ) -> io::Result<usize> {
        if state.keywords != self.keywords {
            changes.keywords_changed = true;
            self.keywords = state.keywords.clone();
        }
        if self.seen.is_some() && state.uid_validity != self.uid_validity {
            // The UID list was made anew (lost or replaced): the UIDs this
            // session handed out mean nothing now (RFC 9051 2.3.1.1).
            return Err(io::Error::other(UidValidityChanged));
        }
        self.uid_validity = state.uid_validity;
        self.uid_next = state.uid_next;
        // Both lists are in UID order: walk them together. A message found
        // again is not gone (a failed read under an old name).
        let mut gone = BTreeSet::new();
        let mut agrees = true;
        let mut on_disk = state.entries.iter().peekable();
        for m in self.files.iter() {
            while on_disk.next_if(|f| f.uid < m.uid).is_some() {
                agrees = false;
            }
            match on_disk.next_if(|f| f.uid == m.uid) {
                None => {
                    gone.insert(m.uid);
                    agrees = false;
                }
                Some(f) if !Arc::ptr_eq(f, m) && f.flags != m.flags => changed.push(m.uid),
                Some(_) => {}
            }
        }
        self.gone = gone;
        let last = self.last_uid();
        let arrivals = &state.entries[state.entries.partition_point(|f| f.uid <= last)..];
        // The count spares a warm SELECT a walk over every message.
        let takes_new = !self.read_only && state.in_new > 0 && arrivals.iter().any(|f| f.in_new);
        if agrees && !takes_new {
            self.files = state.entries.clone();
            return Ok(arrivals.len());
        }
        let mut files = Vec::with_capacity(self.files.len() + arrivals.len());
        let mut on_disk = state.entries.iter().peekable();
        for m in self.files.iter() {
            while on_disk.next_if(|f| f.uid < m.uid).is_some() {}
            files.push(on_disk.next_if(|f| f.uid == m.uid).unwrap_or(m).clone());
        }
        let mut dirs = None;
        for f in arrivals {
            if !(f.in_new && takes_new) {
                files.push(f.clone());
                continue;
            }
            // RFC 3501 2.3.2: the first session to see it gets \Recent.
            let info = f.file_name.split_once(":2,").map_or("", |(_, i)| i);
            let target = format!("{}:2,{info}", f.base);
            let dirs = match &mut dirs {
                Some(dirs) => dirs,
                None => dirs.insert(NewToCur::open(&self.path)?),
            };
            match dirs.rename(&f.file_name, &target) {
                Ok(()) => {
                    let (flags, other) = (f.flags.clone(), f.other.clone());
                    files.push(Arc::new(f.renamed(target, false, flags, other)));
                    self.recent.push(f.uid);
                }
                // Another session took it first (or it was removed).
                Err(e) if e.kind() == io::ErrorKind::NotFound => files.push(f.clone()),
                Err(e) => return Err(e),
            }
        }
        self.files = Arc::new(files);
        if dirs.is_some() {
            sync_dir(&self.path.join("cur"))?;
        }
        Ok(arrivals.len())
    }

    /// Give message `index` these flags (keywords numbered as needed), by
    /// renaming its file. A message that vanished is left alone.
    pub fn set_flags(&mut self, index: usize, flags: MessageFlags) -> Result<(), FlagsError> {
        if !flags.keywords.is_empty()
            && flags
                .keywords
                .iter()
                .any(|k| self.keywords.letter_of(k).is_none())
        {
            self.keywords = Keywords::ensure(&self.path, &flags.keywords)?;
            self.keywords_defined = true;
        }
        let Some(m) = self.files.get(index).cloned() else {
            return Ok(());
        };
        if self.gone.contains(&m.uid) || m.flags == flags {
            return Ok(());
        }
        let target = format!("{}:2,{}", m.base, self.keywords.render(&flags, &m.other));
        let mut source = m.path(&self.path);
        for attempt in 0..2 {
            match std::fs::rename(&source, self.path.join("cur").join(&target)) {
                Ok(()) => {
                    let renamed = m.renamed(target, false, flags, m.other.clone());
                    Arc::make_mut(&mut self.files)[index] = Arc::new(renamed);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                    // Renamed by another session: find its current name.
                    let state = uidlist::sync(&self.path)?;
                    match state.entries.into_iter().find(|e| e.uid == m.uid) {
                        Some(e) => source = e.path(&self.path),
                        None => {
                            self.gone.insert(m.uid);
                            return Ok(());
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.gone.insert(m.uid);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Make flag changes durable (one fsync for a whole STORE).
    pub fn sync_flags(&self) -> io::Result<()> {
        sync_dir(&self.path.join("cur"))
    }

    /// Remove the messages marked \Deleted (only those with a UID in
    /// `uids`, for UID EXPUNGE). Returns the sequence numbers to announce,
    /// highest first, so each stays valid as it is sent.
    pub fn expunge(&mut self, uids: Option<&BTreeSet<u32>>) -> io::Result<Vec<u32>> {
        self.remove_where(|m| m.has(SystemFlag::Deleted) && uids.is_none_or(|u| u.contains(&m.uid)))
    }

    /// Remove the messages with these UIDs (the second half of MOVE).
    pub fn remove_uids(&mut self, uids: &BTreeSet<u32>) -> io::Result<Vec<u32>> {
        self.remove_where(|m| uids.contains(&m.uid))
    }

    /// Delete the files of the chosen messages and drop them, and those
    /// already gone, from the view; returns their sequence numbers,
    /// highest first.
    fn remove_where(&mut self, chosen: impl Fn(&MessageFile) -> bool) -> io::Result<Vec<u32>> {
        let removing: Vec<usize> = (self.files.iter().enumerate())
            .filter(|(_, m)| chosen(m))
            .map(|(i, _)| i)
            .collect();
        if removing.is_empty() && self.gone.is_empty() {
            return Ok(Vec::new());
        }
        for &i in &removing {
            let m = &self.files[i];
            if self.gone.contains(&m.uid) {
                continue;
            }
            match std::fs::remove_file(m.path(&self.path)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // Out of the view with the gone ones below.
            self.gone.insert(m.uid);
        }
        sync_dir(&self.path.join("cur"))?;
        uidlist::sync(&self.path)?;
        Ok(self.drop_gone())
    }

    /// Copy messages (by index) into the folder at `dest`, flags and
    /// keywords kept. Returns the destination's UIDVALIDITY and each
    /// (source UID, new UID) pair (RFC 4315 COPYUID).
    pub fn copy_to(
        &self,
        indexes: &[usize],
        dest: &Path,
        hostname: &str,
    ) -> Result<(u32, Vec<(u32, u32)>), FlagsError> {
        let wanted: BTreeSet<String> = indexes
            .iter()
            .filter_map(|&i| self.files.get(i))
            .flat_map(|m| m.flags.keywords.iter().cloned())
            .collect();
        let dest_keywords = Keywords::ensure(dest, &wanted)?;
        let mut copied = Vec::new();
        for m in indexes.iter().filter_map(|&i| self.files.get(i)) {
            // Unknown lowercase letters are keywords of this folder only.
            let other: String = m
                .other
                .chars()
                .filter(|c| !c.is_ascii_lowercase())
                .collect();
            let info = dest_keywords.render(&m.flags, &other);
            match maildir::link_copy(&m.path(&self.path), dest, hostname, &info) {
                Ok(path) => copied.push((m.uid, path)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        sync_dir(&dest.join("cur"))?;
        let state = uidlist::sync(dest)?;
        let uid_of: HashMap<&str, u32> = state
            .entries
            .iter()
            .map(|e| (e.base.as_str(), e.uid))
            .collect();
        let pairs = copied
            .iter()
            .filter_map(|(src, path)| {
                let name = path.file_name()?.to_str()?;
                let base = name.split(':').next()?;
                uid_of.get(base).map(|&u| (*src, u))
            })
            .collect();
        Ok((state.uid_validity, pairs))
    }
}

/// Store an appended message in the folder at `dest` with `flags` and
/// `date` (INTERNALDATE). Returns the folder's UIDVALIDITY and the UID.
pub fn append(
    dest: &Path,
    hostname: &str,
    message: impl Read,
    flags: &MessageFlags,
    date: Option<SystemTime>,
) -> Result<(u32, u32), FlagsError> {
    let keywords = Keywords::ensure(dest, &flags.keywords)?;
    let info = keywords.render(flags, "");
    let stored = maildir::store(
        dest,
        hostname,
        message,
        Filing {
            info: &info,
            mtime: date,
        },
    )?;
    let state = uidlist::sync(dest)?;
    let name = stored
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let base = name.split(':').next().unwrap_or_default();
    let uid = state
        .entries
        .iter()
        .find(|e| e.base == base)
        .map(|e| e.uid)
        .ok_or_else(|| io::Error::other("appended message vanished"))?;
    Ok((state.uid_validity, uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::maildir::create_maildir;

    fn folder_with(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        create_maildir(&path).unwrap();
        for n in names {
            std::fs::write(path.join(n), b"Subject: x\n\nbody\n").unwrap();
        }
        (dir, path)
    }

    #[test]
    fn open_takes_new_messages_as_recent() {
        let (_d, path) = folder_with(&["new/1.a.h,S=17,W=20", "cur/0.a.h:2,S"]);
        let f = Folder::open(&path, false, Arc::default()).unwrap();
        assert_eq!(f.exists(), 2);
        assert!(!f.message(0).unwrap().recent && f.message(1).unwrap().recent);
        assert!(path.join("cur/1.a.h,S=17,W=20:2,").exists());
        let ro = Folder::open(&path, true, Arc::default()).unwrap();
        assert!(ro.messages().all(|m| !m.recent));
    }

    #[test]
    fn sessions_share_the_folder_list_until_they_differ() {
        let (_d, path) = folder_with(&["cur/1.a.h:2,", "cur/2.a.h:2,S"]);
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        for d in ["new", "cur"] {
            let dir = std::fs::File::open(path.join(d)).unwrap();
            dir.set_modified(old).unwrap();
        }
        let cache = Arc::new(FolderCache::default());
        let mut a = Folder::open(&path, false, cache.clone()).unwrap();
        let b = Folder::open(&path, true, cache).unwrap();
        assert_eq!(a.files().as_ptr(), b.files().as_ptr());
        let mut flags = MessageFlags::default();
        flags.system.insert(SystemFlag::Flagged);
        a.set_flags(0, flags.clone()).unwrap();
        assert_ne!(a.files().as_ptr(), b.files().as_ptr());
        assert_eq!(a.files()[0].flags, flags);
        assert!(b.files()[0].flags.system.is_empty());
    }

    #[test]
    fn refresh_reports_arrivals_flags_and_expunges() {
        let (_d, path) = folder_with(&["cur/1.a.h:2,", "cur/2.a.h:2,"]);
        let mut f = Folder::open(&path, false, Arc::default()).unwrap();
        let mut other = Folder::open(&path, false, Arc::default()).unwrap();
        std::fs::write(path.join("new/3.a.h"), b"x\n").unwrap();
        let mut flags = MessageFlags::default();
        flags.system.insert(SystemFlag::Flagged);
        flags.keywords.insert("$Junk".into());
        other.set_flags(0, flags.clone()).unwrap();
        std::fs::remove_file(path.join("cur/2.a.h:2,")).unwrap();
        let c = f.refresh(false).unwrap();
        assert_eq!(c.exists, Some(3));
        assert_eq!(c.flags_changed, vec![1]);
        assert!(c.keywords_changed);
        assert!(c.expunged.is_empty());
        assert_eq!(f.files()[0].flags, flags);
        let c = f.refresh(true).unwrap();
        assert_eq!(c.expunged, vec![2]);
        assert_eq!(f.exists(), 2);
    }

    #[test]
    fn exists_after_expunges_counts_the_view_then() {
        let (_d, path) = folder_with(&["cur/1.a.h:2,", "cur/2.a.h:2,"]);
        let mut f = Folder::open(&path, false, Arc::default()).unwrap();
        std::fs::remove_file(path.join("cur/1.a.h:2,")).unwrap();
        std::fs::rename(path.join("cur/2.a.h:2,"), path.join("cur/2.a.h:2,S")).unwrap();
        std::fs::write(path.join("new/3.a.h"), b"x\n").unwrap();
        let c = f.refresh(true).unwrap();
        assert_eq!(c.expunged, vec![1]);
        assert_eq!(c.exists, Some(2));
        assert_eq!(c.flags_changed, vec![1]);
    }

    #[test]
    fn a_new_uidvalidity_is_refused_mid_session() {
        let (_d, path) = folder_with(&["cur/1.a.h:2,"]);
        let mut f = Folder::open(&path, false, Arc::default()).unwrap();
        let list = std::fs::read_to_string(path.join(uidlist::UIDLIST_FILE)).unwrap();
        let renumbered = list.replacen(
            &format!("V{}", f.uid_validity),
            &format!("V{}", f.uid_validity + 1),
            1,
        );
        std::fs::write(path.join(uidlist::UIDLIST_FILE), renumbered).unwrap();
        std::fs::write(path.join("new/2.a.h"), b"x\n").unwrap();
        let e = f.refresh(true).unwrap_err();
        assert!(e.get_ref().is_some_and(|e| e.is::<UidValidityChanged>()));
    }

    #[test]
    fn expunge_copy_append() {
        let (_d, path) = folder_with(&["cur/1.a.h,S=17,W=20:2,T", "cur/2.a.h:2,"]);
        let dest = path.parent().unwrap().join("g");
        create_maildir(&dest).unwrap();
        let mut f = Folder::open(&path, false, Arc::default()).unwrap();
        let (validity, pairs) = f.copy_to(&[0, 1], &dest, "h").unwrap();
        assert_eq!(pairs, vec![(1, 1), (2, 2)]);
        let g = Folder::open(&dest, true, Arc::default()).unwrap();
        assert_eq!(g.uid_validity, validity);
        assert!(g.files()[0].has(SystemFlag::Deleted));
        assert_eq!(g.files()[0].known_size(), Some(20));
        assert_eq!(f.expunge(None).unwrap(), vec![1]);
        assert_eq!(f.files()[0].uid, 2);
        let mut flags = MessageFlags::default();
        flags.system.insert(SystemFlag::Seen);
        let (_, uid) = append(&dest, "h", &b"A: b\r\n\r\nc\r\n"[..], &flags, None).unwrap();
        assert_eq!(uid, 3);
        let g = Folder::open(&dest, true, Arc::default()).unwrap();
        assert!(g.files()[2].has(SystemFlag::Seen));
        assert_eq!(
            std::fs::read(g.files()[2].path(&dest)).unwrap(),
            b"A: b\n\nc\n"
        );
    }
}
