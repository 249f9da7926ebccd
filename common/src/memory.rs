//! Giving freed heap memory back to the system.
//!
//! glibc's allocator keeps what a burst of sessions freed (each thread's
//! arena holds on to its pages), so a daemon that once had ten thousand
//! connections would stay that big long after they closed.
//! `malloc_trim` returns every whole free page of every arena.

/// Return the allocator's free pages to the system, on a thread of its
/// own (it walks every arena; the caller may be a session on the async
/// runtime).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| {
                // SAFETY: malloc_trim only walks and trims the allocator's
                // own free lists; it is safe to call from any thread.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("cannot start the thread returning free memory: {e}");
        }
    }
}
