//! Greylisting (RFC 6647): the first attempt of a client network to send
//! from one sender to one recipient is deferred; a retry after the delay
//! passes, and the triplet is then let through at once until it has not
//! been seen for `max_age`. Real MTAs retry, most spam software does not.
//!
//! The table lives in memory and is written whole to one file in the spool
//! every minute when it changed and when smtpd stops, so a restart keeps
//! it; a crash loses at most a minute, which only greylists a few senders
//! once more.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::config::GreylistConfig;

/// What to answer a triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pass,
    /// Try again in this many seconds.
    Defer(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Unix seconds of the first attempt (the delay counts from it).
    first: u64,
    /// Unix seconds of the last attempt.
    last: u64,
    /// A retry came after the delay: the triplet is known good.
    passed: bool,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<String, Entry>,
    dirty: bool,
}

/// The triplets seen, shared by every session of a daemon.
#[derive(Debug)]
pub struct Greylist {
    path: PathBuf,
    table: Mutex<Table>,
}

impl Greylist {
    /// The table saved at `path` (empty when there is none). Lines that do
    /// not parse are skipped: the file is ours, and losing an entry only
    /// greylists its sender again.
    pub fn load(path: &Path) -> Greylist {
        let mut entries = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                entries.extend(text.lines().filter_map(parse_line));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("greylist: cannot read {}: {e}", path.display()),
        }
        Greylist {
            path: path.to_path_buf(),
            table: Mutex::new(Table {
                entries,
                dirty: false,
            }),
        }
    }

    /// Decide on the attempt of `client` to send from `sender` to
    /// `recipient` at `now` (Unix seconds), and remember it.
    pub fn check(
        &self,
        config: &GreylistConfig,
        client: IpAddr,
        sender: &str,
        recipient: &str,
        now: u64,
    ) -> Decision {
        let key = triplet(client, sender, recipient);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.dirty = true;
        let fresh = Entry {
            first: now,
            last: now,
            passed: false,
        };
        let entry = table.entries.entry(key).or_insert(fresh);
        let expired = if entry.passed {
            now.saturating_sub(entry.last) > config.max_age
        } else {
            now.saturating_sub(entry.first) > config.retry_window
        };
        if expired {
            *entry = fresh;
        }
        entry.last = now;
        let waited = now.saturating_sub(entry.first);
        let decision = if entry.passed || (waited >= config.delay && entry.first != now) {
            entry.passed = true;
            Decision::Pass
        } else {
            Decision::Defer(config.delay.saturating_sub(waited).max(1))
        };
        if table.entries.len() > config.max_entries {
            evict(&mut table.entries, config.max_entries);
        }
        decision
    }

    /// Write the table out if it changed since the last save; entries
    /// past their time are dropped on the way.
    pub fn save(&self, config: &GreylistConfig, now: u64) -> io::Result<()> {
        let text = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            if !table.dirty {
                return Ok(());
            }
            table.dirty = false;
            table.entries.retain(|_, e| !stale(e, config, now));
            let mut text = String::with_capacity(table.entries.len() * 64);
            for (key, e) in &table.entries {
                let state = if e.passed { 'p' } else { 'w' };
                text.push_str(&format!("{} {} {state} {key}\n", e.first, e.last));
            }
            text
        };
        let saved = common::safeio::write_atomic_mode(&self.path, text.as_bytes(), 0o600);
        if saved.is_err() {
            self.table.lock().unwrap_or_else(|p| p.into_inner()).dirty = true;
        }
        saved
    }

    /// Triplets now known.
    pub fn len(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.entries.len()
    }

    /// Whether no triplet is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn stale(e: &Entry, config: &GreylistConfig, now: u64) -> bool {
    if e.passed {
        now.saturating_sub(e.last) > config.max_age
    } else {
        now.saturating_sub(e.first) > config.retry_window
    }
}

/// Drop the least recently seen tenth beyond `max` at once, so that a
/// flood of new triplets sorts the table once per many inserts.
fn evict(entries: &mut HashMap<String, Entry>, max: usize) {
    let keep = max - max / 10;
    let mut lasts: Vec<u64> = entries.values().map(|e| e.last).collect();
    let cut = lasts.len() - keep;
    let (_, &mut oldest_kept, _) = lasts.select_nth_unstable(cut);
    entries.retain(|_, e| e.last >= oldest_kept);
}

/// `first last state key`, as [`Greylist::save`] writes it.
fn parse_line(line: &str) -> Option<(String, Entry)> {
    let mut fields = line.splitn(4, ' ');
    let first = fields.next()?.parse().ok()?;
    let last = fields.next()?.parse().ok()?;
    let passed = match fields.next()? {
        "p" => true,
        "w" => false,
        _ => return None,
    };
    let key = fields.next().filter(|k| !k.is_empty())?;
    Some((
        key.to_string(),
        Entry {
            first,
            last,
            passed,
        },
    ))
}

/// The key of a triplet, normalised as postgrey does so that a sender's
/// retries from a pool of hosts, with a new bounce tag or VERP number
/// each time, are one triplet: the client's /24 (IPv4) or /64 (IPv6),
/// the sender without a BATV tag, `+extension` or digit runs.
fn triplet(client: IpAddr, sender: &str, recipient: &str) -> String {
    let net = match client {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                let [a, b, c, _] = v4.octets();
                format!("{a}.{b}.{c}.0/24")
            }
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    };
    let sender = normalise_sender(sender);
    // A key is one line of the saved table.
    let clean = |s: &str| s.replace(|c: char| c.is_control() || c == ' ', "_");
    format!(
        "{net}/{}/{}",
        clean(&sender),
        clean(&recipient.to_lowercase())
    )
}

fn normalise_sender(sender: &str) -> String {
    if sender.is_empty() {
        return "<>".into();
    }
    let sender = sender.to_lowercase();
    let (local, domain) = sender.rsplit_once('@').unwrap_or((&sender, ""));
    // BATV (draft-levine-smtp-batv-01 4.1): prvs=tag=user.
    let local = match local.strip_prefix("prvs=") {
        Some(rest) => rest.split_once('=').map_or(rest, |(_, user)| user),
        None => local,
    };
    let local = local.split_once('+').map_or(local, |(user, _)| user);
    let mut out = String::with_capacity(sender.len());
    let mut in_digits = false;
    for c in local.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out.push('@');
    out.push_str(domain);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(delay: u64) -> GreylistConfig {
        GreylistConfig {
            delay,
            retry_window: 1000,
            max_age: 5000,
            max_entries: 100,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_attempt_waits_then_passes_and_is_remembered() {
        let g = Greylist::load(Path::new("/nonexistent/greylist"));
        let c = config(300);
        let client = ip("192.0.2.7");
        assert_eq!(
            g.check(&c, client, "a@x", "u@y", 1000),
            Decision::Defer(300)
        );
        assert_eq!(
            g.check(&c, client, "a@x", "u@y", 1100),
            Decision::Defer(200)
        );
        assert_eq!(g.check(&c, client, "a@x", "u@y", 1300), Decision::Pass);
        // Known good now, also from the next host of the sender's pool.
        assert_eq!(
            g.check(&c, ip("192.0.2.200"), "a@x", "u@y", 6000),
            Decision::Pass
        );
        // Another recipient is another triplet.
        assert_eq!(
            g.check(&c, client, "a@x", "v@y", 6000),
            Decision::Defer(300)
        );
    }

    #[test]
    fn late_retries_and_old_triplets_start_over() {
        let g = Greylist::load(Path::new("/nonexistent/greylist"));
        let c = config(10);
        let client = ip("2001:db8:1:2::5");
        assert_eq!(g.check(&c, client, "a@x", "u@y", 0), Decision::Defer(10));
        // Past retry_window: the first attempt is forgotten.
        assert_eq!(g.check(&c, client, "a@x", "u@y", 1001), Decision::Defer(10));
        assert_eq!(g.check(&c, client, "a@x", "u@y", 1011), Decision::Pass);
        // Unused for longer than max_age.
        assert_eq!(
            g.check(&c, ip("2001:db8:1:2::9"), "a@x", "u@y", 6012),
            Decision::Defer(10)
        );
    }

    #[test]
    fn a_zero_delay_still_defers_the_first_attempt() {
        let g = Greylist::load(Path::new("/nonexistent/greylist"));
        let c = config(0);
        let client = ip("192.0.2.7");
        assert_eq!(g.check(&c, client, "a@x", "u@y", 50), Decision::Defer(1));
        assert_eq!(g.check(&c, client, "a@x", "u@y", 51), Decision::Pass);
    }

    #[test]
    fn senders_are_normalised() {
        assert_eq!(normalise_sender(""), "<>");
        assert_eq!(
            normalise_sender("prvs=1234abcd=Bounce@X.test"),
            "bounce@x.test"
        );
        assert_eq!(normalise_sender("list+123-456@x"), "list@x");
        assert_eq!(normalise_sender("bounce-12-345@x"), "bounce-#-#@x");
        assert_eq!(
            triplet(ip("::ffff:192.0.2.9"), "a@x", "U@Y"),
            "192.0.2.0/24/a@x/u@y"
        );
        assert_eq!(
            triplet(ip("2001:db8::1"), "a b@x", "u@y"),
            "2001:db8:0:0::/64/a_b@x/u@y"
        );
    }

    #[test]
    fn saved_and_loaded_without_stale_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greylist");
        let c = config(10);
        let g = Greylist::load(&path);
        g.check(&c, ip("192.0.2.1"), "a@x", "u@y", 0);
        g.check(&c, ip("192.0.2.1"), "a@x", "u@y", 20);
        g.check(&c, ip("198.51.100.1"), "b@x", "u@y", 10);
        g.save(&c, 1011).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "0 20 p 192.0.2.0/24/a@x/u@y\n");
        std::fs::write(&path, format!("{text}junk line\n1 2 q k\n")).unwrap();
        let again = Greylist::load(&path);
        assert_eq!(again.len(), 1);
        assert_eq!(
            again.check(&c, ip("192.0.2.99"), "a@x", "u@y", 1100),
            Decision::Pass
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let g = Greylist::load(Path::new("/nonexistent/greylist"));
        let c = config(10);
        for i in 0..1000u64 {
            g.check(
                &c,
                ip("192.0.2.1"),
                &format!("s{}@x", char::from(b'a' + (i % 26) as u8)),
                &format!("r{i}@y"),
                i,
            );
        }
        assert!(g.len() <= 100);
        // The newest survive.
        assert_eq!(
            g.check(&c, ip("192.0.2.1"), "sl@x", "r999@y", 1009),
            Decision::Pass
        );
    }
}
