//! Throttling of failed logins per client address or per account, shared
//! by every protocol that takes passwords.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered at most; past this, keys whose failures all left the
/// window are forgotten first.
const MAX_TRACKED: usize = 65_536;

/// Counts failed logins per key (a client address, an account) over a
/// sliding window.
pub struct AuthThrottle<K> {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K: Hash + Eq + Clone> AuthThrottle<K> {
    /// At most `max_failures` failures per key within `window`.
    pub fn new(max_failures: u32, window: Duration) -> AuthThrottle<K> {
        AuthThrottle {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether logins for `key` are refused now.
    pub fn is_blocked(&self, key: &K) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match map.get_mut(key) {
            Some(times) => {
                prune(times, now, self.window);
                times.len() >= self.max_failures as usize
            }
            None => false,
        }
    }

    /// Count a failed login for `key`.
    pub fn record_failure(&self, key: &K) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= MAX_TRACKED && !map.contains_key(key) {
            map.retain(|_, times| {
                prune(times, now, self.window);
                !times.is_empty()
            });
            if map.len() >= MAX_TRACKED {
                // Memory stays bounded: a new key is not tracked until
                // older ones leave the window.
                return;
            }
        }
        let times = map.entry(key.clone()).or_default();
        prune(times, now, self.window);
        // Only the most recent `max_failures` matter.
        if times.len() >= self.max_failures as usize {
            times.pop_front();
        }
        times.push_back(now);
    }
}

fn prune(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn blocks_after_max_failures_and_forgets_after_window() {
        let t = AuthThrottle::new(2, Duration::from_millis(50));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        t.record_failure(&ip);
        assert!(!t.is_blocked(&ip));
        t.record_failure(&ip);
        assert!(t.is_blocked(&ip));
        assert!(!t.is_blocked(&other));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!t.is_blocked(&ip));
    }
}
