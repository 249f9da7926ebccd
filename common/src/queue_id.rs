//! Queue ids: short, unique, time-sortable, like Postfix's long queue ids.

use std::time::{SystemTime, UNIX_EPOCH};

/// Crockford's base32 digits, in ASCII order so ids sort by time.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new id: 11 characters of microseconds since 1970 and 5 random ones,
/// so ids from many processes in the same microsecond still differ.
pub fn new_queue_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let random: u32 = rand::random();
    let mut id = String::with_capacity(16);
    push_base32(&mut id, micros, 11);
    push_base32(&mut id, u64::from(random), 5);
    id
}

fn push_base32(out: &mut String, value: u64, digits: u32) {
    for i in (0..digits).rev() {
        let d = (value >> (5 * i)) & 31;
        out.push(ALPHABET[d as usize] as char);
    }
}

/// Whether `s` has the shape of a queue id (checked before it becomes part
/// of a path).
pub fn is_queue_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// When the message of queue id `id` arrived (Unix seconds): its first 11
/// digits are the microseconds since 1970.
pub fn arrival(id: &str) -> Option<u64> {
    if !is_queue_id(id) {
        return None;
    }
    let micros = id.bytes().take(11).try_fold(0u64, |acc, b| {
        let digit = ALPHABET.iter().position(|&a| a == b)? as u64;
        Some((acc << 5) | digit)
    })?;
    Some(micros / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arrival_is_in_the_id() {
        let before = crate::spool::unix_now();
        let id = new_queue_id();
        let at = arrival(&id).unwrap();
        assert!(at >= before && at <= crate::spool::unix_now(), "{at}");
        assert_eq!(arrival("not-an-id"), None);
    }

    #[test]
    fn ids_are_unique_sortable_and_valid() {
        let a = new_queue_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_queue_id();
        assert!(a < b, "{a} {b}");
        assert!(is_queue_id(&a));
        assert!(!is_queue_id("../../etc/passwd"));
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| new_queue_id()).collect();
        assert_eq!(many.len(), 10_000);
    }
}
