//! Giving freed heap memory back to the system.
//!
//! glibc's allocator keeps what a burst of sessions freed (each thread's
//! arena holds on to its pages), so a daemon that once had ten thousand
//! connections would stay that big long after they closed.
//! `malloc_trim` returns every whole free page of every arena.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::time::Duration;

/// How long requests must stop before the trim: sessions of a burst
/// close over a while and free their memory after the request that
/// their closing made, and the idle blocking threads of the burst hand
/// back what their allocator caches hold only when they exit (2 s idle,
/// see `daemon::BLOCKING_THREAD_KEEP_ALIVE`), so trimming at once would
/// miss most of it.
const QUIET: Duration = Duration::from_secs(3);

/// Return the allocator's free pages to the system once requests have
/// stopped for [`QUIET`], on a thread of its own (it walks every arena;
/// the caller may be a session on the async runtime).
pub fn release_free_memory() {
    static TRIMMER: OnceLock<Option<Sender<()>>> = OnceLock::new();
    let trimmer = TRIMMER.get_or_init(|| {
        let (requests, received) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(move || {
                while received.recv().is_ok() {
                    loop {
                        match received.recv_timeout(QUIET) {
                            Ok(()) => continue,
                            Err(RecvTimeoutError::Timeout) => break,
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
