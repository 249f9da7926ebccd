//! Successful password checks remembered for a while, as Dovecot's
//! auth_cache does: a client that logs in again and again (a phone
//! polling every minute, webmail opening a connection per page) costs one
//! Argon2 run per `ttl` instead of one per login.
//!
//! Only a digest is kept: SHA-256 over a key drawn at random when the
//! daemon starts, the account, its stored hash and the password. Nothing
//! in the cache answers for a wrong password, and a changed password (a
//! new stored hash) no longer matches its entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Most accounts remembered; past it the expired entries go, and if none
/// has expired new ones are not remembered until some do.
const MAX_ENTRIES: usize = 100_000;

/// The cache of one daemon.
pub struct LoginCache {
    key: [u8; 32],
    ttl: Duration,
    entries: Mutex<HashMap<String, ([u8; 32], Instant)>>,
}

impl LoginCache {
    /// A cache whose entries last `ttl`; a zero `ttl` remembers nothing.
    pub fn new(ttl: Duration) -> LoginCache {
        let mut key = [0; 32];
        rand::thread_rng().fill_bytes(&mut key);
        LoginCache {
            key,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn digest(&self, account: &str, stored_hash: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        // Length prefixes: no two different triples hash the same input.
        for field in [account, stored_hash, password] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.finalize().into()
    }

    /// Whether `password` was checked right for `account`, whose stored
    /// hash is `stored_hash`, within the last `ttl`.
    pub fn knows(&self, account: &str, stored_hash: &str, password: &str) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let digest = self.digest(account, stored_hash, password);
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(account)
            .is_some_and(|(known, at)| at.elapsed() < self.ttl && constant_time_eq(known, &digest))
    }

    /// Remember that `password` is right for `account` with `stored_hash`.
    pub fn remember(&self, account: &str, stored_hash: &str, password: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let digest = self.digest(account, stored_hash, password);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(account) {
            entries.retain(|_, (_, at)| at.elapsed() < self.ttl);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(account.to_string(), (digest, Instant::now()));
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_password_with_the_same_stored_hash_is_known() {
        let cache = LoginCache::new(Duration::from_secs(60));
        assert!(!cache.knows("a@x.test", "{ARGON2ID}h1", "pw"));
        cache.remember("a@x.test", "{ARGON2ID}h1", "pw");
        assert!(cache.knows("a@x.test", "{ARGON2ID}h1", "pw"));
        assert!(!cache.knows("a@x.test", "{ARGON2ID}h1", "pw2"));
        assert!(!cache.knows("a@x.test", "{ARGON2ID}h2", "pw"));
        assert!(!cache.knows("b@x.test", "{ARGON2ID}h1", "pw"));
        // Field boundaries matter: "ab"+"c" is not "a"+"bc".
        cache.remember("c@x.test", "ab", "c");
        assert!(!cache.knows("c@x.test", "a", "bc"));
    }

    #[test]
    fn entries_expire_and_a_zero_ttl_remembers_nothing() {
        let cache = LoginCache::new(Duration::from_millis(20));
        cache.remember("a@x.test", "h", "pw");
        assert!(cache.knows("a@x.test", "h", "pw"));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!cache.knows("a@x.test", "h", "pw"));
        let off = LoginCache::new(Duration::ZERO);
        off.remember("a@x.test", "h", "pw");
        assert!(!off.knows("a@x.test", "h", "pw"));
    }

    #[test]
    fn two_daemons_have_different_keys() {
        let (a, b) = (
            LoginCache::new(Duration::from_secs(1)),
            LoginCache::new(Duration::from_secs(1)),
        );
        assert_ne!(a.digest("u", "h", "p"), b.digest("u", "h", "p"));
    }
}
