//! Durable file updates: the one place that knows the write-temp, fsync,
//! rename, fsync-directory sequence.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Replace `path` with `contents` atomically and durably: readers see the
/// old file or the new one, never a mix, and after return the new one
/// survives a crash.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, contents, 0o644)
}

/// Like [`write_atomic`] but a new file gets the permission bits `mode`
/// (for files holding secrets, such as the user database). A file that
/// exists keeps its owner, group and permission bits, so that a table an
/// admin (or `mailctl init`) made readable by the daemons' group stays so.
pub fn write_atomic_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let tmp = temp_sibling(path);
    let existing = std::fs::metadata(path).ok();
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some(old) = &existing {
            let new = f.metadata()?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()))?;
            }
            f.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o7777))?;
        }
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Open `path` for reading only if it is a regular file, without following
/// a symlink and without waiting on a FIFO: for files in directories that a
/// less trusted user can write (the spool, the maildrop).
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// fsync the directory that holds `path`, so a rename or unlink in it is
/// durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// fsync a directory: after return, every change made in it before the
/// call is durable. Threads of the process asking for the same directory
/// meanwhile share fsyncs (group commit): a caller waits for the next
/// fsync that starts after it asked, so eight deliveries into one Maildir
/// at once cost about two fsyncs of `new/`, not eight.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    dir_sync_group(dir).sync(dir)
}

/// Directories remembered for group commit; past this, those no thread
/// is syncing are forgotten.
const MAX_SYNC_GROUPS: usize = 1024;

fn dir_sync_group(dir: &Path) -> Arc<SyncGroup> {
    static GROUPS: OnceLock<Mutex<HashMap<PathBuf, Arc<SyncGroup>>>> = OnceLock::new();
    let mut groups = GROUPS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if groups.len() >= MAX_SYNC_GROUPS {
        groups.retain(|_, g| Arc::strong_count(g) > 1);
    }
    groups.entry(dir.to_path_buf()).or_default().clone()
}

/// The fsyncs of one directory: the round callers now wait for, and
/// whether one runs.
#[derive(Default)]
struct SyncGroup {
    state: Mutex<SyncState>,
    finished: Condvar,
}

/// How one fsync ended: filled once by the thread that ran it. Each
/// caller reads its own round's outcome, never a later one: after a failed
/// fsync Linux may drop the failed pages, so a later success does not
/// make the earlier caller's changes durable.
type RoundOutcome = Arc<OnceLock<Result<(), (io::ErrorKind, Option<i32>, String)>>>;

#[derive(Default)]
struct SyncState {
    /// The round that starts after the running one (or next, if none
    /// runs): every caller that asks now is covered by it.
    next: RoundOutcome,
    running: bool,
}

impl SyncGroup {
    fn sync(&self, dir: &Path) -> io::Result<()> {
        let lock = || self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = lock();
        let mine = Arc::clone(&state.next);
        loop {
            if let Some(outcome) = mine.get() {
                return outcome.clone().map_err(|(kind, code, text)| match code {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(kind, text),
                });
            }
            if !state.running {
                // Start our round: later callers join the one after it.
                state.running = true;
                let round = std::mem::take(&mut state.next);
                drop(state);
                let result = File::open(dir).and_then(|f| f.sync_all());
                let _ = round.set(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| (e.kind(), e.raw_os_error(), e.to_string())),
                );
                state = lock();
                state.running = false;
                self.finished.notify_all();
                continue;
            }
            state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Rename `from` to `to` and make the change durable in both directories.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    sync_parent(to)?;
    if from.parent() != to.parent() {
        sync_parent(from)?;
    }
    Ok(())
}

/// Block until a shared lock on `path` (created if missing) is ours: many
/// holders at once, none while someone holds it exclusively.
pub fn lock_shared(path: &Path) -> io::Result<LockGuard> {
    let file = open_lock_file(path)?;
    file.lock_shared()?;
    Ok(LockGuard { _file: file })
}

/// An advisory lock held on a lock file while the guard lives.
pub struct LockGuard {
    _file: File,
}

/// Block until the exclusive lock on `path` (created if missing) is ours.
pub fn lock_exclusive(path: &Path) -> io::Result<LockGuard> {
    let file = open_lock_file(path)?;
    file.lock()?;
    Ok(LockGuard { _file: file })
}

/// Take the exclusive lock on `path` if nobody holds it; `None` if taken.
pub fn try_lock_exclusive(path: &Path) -> io::Result<Option<LockGuard>> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(LockGuard { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_directory_syncs_all_finish_and_report_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|scope| {
            for t in 0..16 {
                let dir = dir.path();
                scope.spawn(move || {
                    for i in 0..20 {
                        std::fs::write(dir.join(format!("{t}-{i}")), b"x").unwrap();
                        sync_dir(dir).unwrap();
                    }
                });
            }
        });
        let missing = dir.path().join("missing");
        for _ in 0..2 {
            assert_eq!(
                sync_dir(&missing).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic_mode(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rewrite_keeps_the_existing_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users");
        write_atomic_mode(&p, b"one", 0o600).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic_mode(&p, b"two", 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);
    }

    #[test]
    fn open_regular_refuses_links_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(open_regular(&file).is_ok());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link).is_err());
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(open_regular(&fifo).is_err());
    }

    #[test]
    fn try_lock_sees_held_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = try_lock_exclusive(&p).unwrap();
        assert!(held.is_some());
        assert!(try_lock_exclusive(&p).unwrap().is_none());
        drop(held);
        assert!(try_lock_exclusive(&p).unwrap().is_some());
    }
}
