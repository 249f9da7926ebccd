//! Counting delivered files in Maildir directories.
//!
//! A watcher thread lists the directories matching a glob every
//! [`POLL_INTERVAL`] (less often once a listing takes long, see
//! [`LISTING_SHARE`]) from before the first connection on, and remembers
//! each file that was not there at the start and when the last one
//! appeared.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// Time between two listings of the directories, at least.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A listing may take at most one part in this many of the watcher's
/// time: listing a Maildir of 100,000 files takes tens of milliseconds of
/// CPU, which every 50 ms would take a core from the server measured.
const LISTING_SHARE: u32 = 20;

/// When the watcher may stop: once `expected` new files are seen, or at
/// `deadline`.
struct Goal {
    expected: u64,
    deadline: Instant,
}

/// What the watcher saw.
#[derive(Debug)]
pub struct Progress {
    /// New files seen (a file that moves away later still counts).
    pub delivered: u64,
    /// When the last new file was first seen.
    pub last_seen: Option<Instant>,
}

/// A running watcher.
pub struct MaildirWatch {
    goal: Sender<Goal>,
    thread: JoinHandle<Result<Progress>>,
}

impl MaildirWatch {
    /// Takes the snapshot of the files now in the directories matching
    /// `pattern` and starts watching them.
    pub fn start(pattern: &str) -> Result<Self> {
        let mut snapshot = HashSet::new();
        let dirs = list_files(pattern, |path| {
            snapshot.insert(path);
        })?;
        if dirs == 0 {
            eprintln!("loadgen: warning: --maildir-glob {pattern:?} matches no directory yet");
        }
        let (goal, goals) = mpsc::channel();
        let pattern = pattern.to_owned();
        let thread = thread::Builder::new()
            .name("maildir-watch".into())
            .spawn(move || {
                let mut seen = HashSet::new();
                let mut last_seen = None;
                let mut goal: Option<Goal> = None;
                loop {
                    let started = Instant::now();
                    list_files(&pattern, |path| {
                        if !snapshot.contains(&path) && seen.insert(path) {
                            last_seen = Some(Instant::now());
                        }
                    })?;
                    let interval = POLL_INTERVAL.max(started.elapsed() * LISTING_SHARE);
                    let delivered = seen.len() as u64;
                    if let Some(g) = &goal {
                        if delivered >= g.expected || Instant::now() >= g.deadline {
                            return Ok(Progress {
                                delivered,
                                last_seen,
                            });
                        }
                    }
                    match goals.recv_timeout(interval) {
                        Ok(g) => goal = Some(g),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(anyhow!("maildir watch abandoned"))
                        }
                    }
                }
            })
            .context("start the maildir watcher thread")?;
        Ok(MaildirWatch { goal, thread })
    }

    /// Waits until `expected` new files have appeared or `timeout` has
    /// passed, and returns what was seen. Blocks the calling thread.
    pub fn finish(self, expected: u64, timeout: Duration) -> Result<Progress> {
        let goal = Goal {
            expected,
            deadline: Instant::now() + timeout,
        };
        // If the thread has already stopped (on an error), join says why.
        let _ = self.goal.send(goal);
        self.thread
            .join()
            .map_err(|_| anyhow!("maildir watcher panicked"))?
    }
}

/// Calls `f` with the path of every file in the directories matching
/// `pattern`; returns the number of directories.
fn list_files(pattern: &str, mut f: impl FnMut(PathBuf)) -> Result<usize> {
    let mut dirs = 0;
    let paths = glob::glob(pattern).with_context(|| format!("--maildir-glob {pattern:?}"))?;
    for dir in paths {
        let dir = dir.context("--maildir-glob")?;
        if !dir.is_dir() {
            continue;
        }
        dirs += 1;
        for_each_file(&dir, &mut f).with_context(|| format!("list {}", dir.display()))?;
    }
    Ok(dirs)
}

/// Calls `f` with each regular file of `dir`. A directory that vanished
/// meanwhile has none.
fn for_each_file(dir: &Path, f: &mut impl FnMut(PathBuf)) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            f(entry.path());
        }
    }
    Ok(())
}
