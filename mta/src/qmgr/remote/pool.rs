//! Per-destination limits and the cache of idle sessions, so that queued
//! messages to one destination share a connection (Postfix's scache).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::session::Session;

/// Idle sessions by destination, each with the ticket its expiry timer
/// looks for.
type IdleSessions = Arc<Mutex<HashMap<String, Vec<(u64, Session)>>>>;

/// Sessions open for delivery, by destination (a domain, or the relay).
pub struct Pool {
    max_per_destination: usize,
    cache_time: Duration,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    idle: IdleSessions,
    next_ticket: AtomicU64,
}

impl Pool {
    pub fn new(max_per_destination: usize, cache_time: Duration) -> Pool {
        Pool {
            max_per_destination,
            cache_time,
            limits: Mutex::new(HashMap::new()),
            idle: Arc::new(Mutex::new(HashMap::new())),
            next_ticket: AtomicU64::new(0),
        }
    }

    /// Wait for a delivery slot to `destination`.
    pub async fn slot(&self, destination: &str) -> OwnedSemaphorePermit {
        let semaphore = {
            let mut limits = self.limits.lock().expect("pool lock");
            // Forget destinations nobody holds or waits for (permits and
            // waiters hold a clone), so the map stays as small as the set
            // of busy destinations.
            limits.retain(|_, s| Arc::strong_count(s) > 1);
            limits
                .entry(destination.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_destination)))
                .clone()
        };
        semaphore.acquire_owned().await.expect("never closed")
    }

    /// An idle session to `destination`, if one is cached.
    pub fn take(&self, destination: &str) -> Option<Session> {
        let mut idle = self.idle.lock().expect("pool lock");
        let sessions = idle.get_mut(destination)?;
        let session = sessions.pop().map(|(_, s)| s);
        if sessions.is_empty() {
            idle.remove(destination);
        }
        session
    }

    /// Keep `session` for the next message to `destination`; it is closed
    /// after `connection_cache_time` if nobody takes it.
    pub fn put(&self, destination: &str, session: Session) {
        if self.cache_time.is_zero() {
            tokio::spawn(session.quit());
            return;
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.idle
            .lock()
            .expect("pool lock")
            .entry(destination.to_string())
            .or_default()
            .push((ticket, session));
        let idle = self.idle.clone();
        let destination = destination.to_string();
        let cache_time = self.cache_time;
        tokio::spawn(async move {
            tokio::time::sleep(cache_time).await;
            let expired = {
                let mut idle = idle.lock().expect("pool lock");
                let Some(sessions) = idle.get_mut(&destination) else {
                    return;
                };
                let found = sessions.iter().position(|(t, _)| *t == ticket);
                let expired = found.map(|i| sessions.swap_remove(i).1);
                if sessions.is_empty() {
                    idle.remove(&destination);
                }
                expired
            };
            if let Some(session) = expired {
                session.quit().await;
            }
        });
    }

    /// Close every idle session (at shutdown).
    pub async fn close_all(&self) {
        let sessions: Vec<Session> = self
            .idle
            .lock()
            .expect("pool lock")
            .drain()
            .flat_map(|(_, v)| v.into_iter().map(|(_, s)| s))
            .collect();
        for s in sessions {
            s.quit().await;
        }
    }
}
