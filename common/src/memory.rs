//! Giving freed heap memory back to the system.
//!
//! glibc's allocator keeps what a burst of sessions freed (each thread's
//! arena holds on to its pages), so a daemon that once had ten thousand
//! connections would stay that big long after they closed.
//! `malloc_trim` returns every whole free page of every arena.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long requests must stop before the trim: sessions of a burst
/// close over a while and free their memory after the request that
/// their closing made, and the idle blocking threads of the burst hand
/// back what their allocator caches hold only when they exit (2 s idle,
/// see `common::daemon`), so trimming at once would miss most of it.
const QUIET: Duration = Duration::from_secs(3);
/// Longest a trim waits for quiet: sessions that keep closing every
/// second or two must not put it off for ever.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Return the allocator's free pages to the system once requests have
/// stopped for [`QUIET`] (or [`MAX_DELAY`] after the first), on a thread
/// of its own (it walks every arena;
/// the caller may be a session on the async runtime).
pub fn release_free_memory() {
    static TRIMMER: OnceLock<Option<Sender<()>>> = OnceLock::new();
    let trimmer = TRIMMER.get_or_init(|| {
        let (requests, received) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(move || {
                while received.recv().is_ok() {
                    let latest = Instant::now() + MAX_DELAY;
                    loop {
                        let wait = QUIET.min(latest.saturating_duration_since(Instant::now()));
                        match received.recv_timeout(wait) {
                            Ok(()) if Instant::now() < latest => continue,
                            Ok(()) | Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    trim();
                }
            });
        match spawned {
            Ok(_) => Some(requests),
            Err(e) => {
                tracing::debug!("cannot start the thread returning free memory: {e}");
                None
            }
        }
    });
    if let Some(requests) = trimmer {
        let _ = requests.send(());
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free
    // lists; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
