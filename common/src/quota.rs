//! Mailbox quotas: a storage limit per user, kept in the user database as
//! Dovecot keeps it (`userdb_quota_rule=*:storage=<n>` in the extra
//! fields, so a Dovecot file keeps its limits), usage counted from the
//! `,S=<size>` that every Maildir file name carries.
//!
//! qmgr defers a delivery that would pass the limit (RFC 3463 X.2.2,
//! mailbox full) and writes the full mailboxes into the spool, where
//! smtpd reads them to answer `452 4.2.2` at RCPT (it cannot read
//! Maildirs); maildird reports usage with GETQUOTA (RFC 9208) and refuses
//! APPEND, COPY and MOVE past the limit.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

/// The extra field holding the limit, as Dovecot's passwd-file has it.
pub const RULE_FIELD: &str = "userdb_quota_rule";

/// Bytes and messages in a mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub messages: u64,
}

/// The storage limit in a user line's extra fields (space-separated
/// `key=value`): `userdb_quota_rule=*:storage=<n>[B|K|M|G|T]`, a bare
/// number being KiB as in Dovecot; 0 means no limit.
pub fn limit_from_extra(extra: &str) -> Option<u64> {
    extra.split_whitespace().find_map(|field| {
        let rule = field.strip_prefix(RULE_FIELD)?.strip_prefix('=')?;
        let storage = rule.strip_prefix("*:")?.strip_prefix("storage=")?;
        parse_size(storage, 1024).ok().filter(|&n| n > 0)
    })
}

/// A size as an admin writes it: `500M`, `2G`, `750K`, `1000B`; a bare
/// number is in `unit` bytes.
pub fn parse_size(text: &str, unit: u64) -> Result<u64, String> {
    let text = text.trim();
    let (digits, multiplier) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{text}`: the unit must be B, K, M, G or T")),
            };
            (&text[..i], m)
        }
        _ => (text, unit),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("`{text}`: expected a size like 500M or 2G"))
}

/// The extra fields with the limit set to `limit` bytes (None: removed),
/// every other field kept.
pub fn set_limit_in_extra(extra: &str, limit: Option<u64>) -> String {
    let mut fields: Vec<String> = extra
        .split_whitespace()
        .filter(|f| !f.starts_with(&format!("{RULE_FIELD}=")))
        .map(str::to_string)
        .collect();
    if let Some(bytes) = limit {
        fields.push(format!("{RULE_FIELD}=*:storage={bytes}B"));
    }
    fields.join(" ")
}

/// What the mailbox at `maildir` holds, every folder counted. A file whose
/// name lacks its size is measured.
pub fn usage(maildir: &Path) -> io::Result<Usage> {
    let mut usage = Usage::default();
    let mut folders = vec![maildir.to_path_buf()];
    match std::fs::read_dir(maildir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name != "." && name != ".." {
                    folders.push(entry.path());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(usage),
        Err(e) => return Err(e),
    }
    for folder in folders {
        for sub in ["cur", "new"] {
            let Ok(entries) = std::fs::read_dir(folder.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let size = match crate::maildir::size_from_name(&name.to_string_lossy()) {
                    Some(s) => s,
                    None => match entry.metadata() {
                        Ok(m) => m.len(),
                        // Expunged while we counted.
                        Err(_) => continue,
                    },
                };
                usage.bytes += size;
                usage.messages += 1;
            }
        }
    }
    Ok(usage)
}

/// The mailboxes qmgr found full: `<spool>/full-mailboxes`, one address a
/// line, rewritten whole.
#[derive(Debug, Clone)]
pub struct FullMailboxes {
    path: PathBuf,
}

impl FullMailboxes {
    pub fn new(spool: &Path) -> FullMailboxes {
        FullMailboxes {
            path: spool.join("full-mailboxes"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The addresses listed now.
    pub fn read(&self) -> io::Result<BTreeSet<String>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(e),
        }
    }

    /// List or unlist `address`; written only on a change.
    pub fn set(&self, address: &str, full: bool) -> io::Result<()> {
        let mut all = self.read()?;
        let changed = if full {
            all.insert(address.to_string())
        } else {
            all.remove(address)
        };
        if changed {
            let text: String = all.iter().map(|a| format!("{a}\n")).collect();
            crate::safeio::write_atomic(&self.path, text.as_bytes())?;
        }
        Ok(())
    }
}

/// The list as smtpd consults it at every RCPT: read again only when the
/// file changed, and its time looked at no more than once a second.
#[derive(Debug)]
pub struct FullMailboxesView {
    list: FullMailboxes,
    state: std::sync::Mutex<ViewState>,
}

#[derive(Debug, Default)]
struct ViewState {
    checked: Option<std::time::Instant>,
    modified: Option<std::time::SystemTime>,
    addresses: BTreeSet<String>,
}

impl FullMailboxesView {
    pub fn new(spool: &Path) -> FullMailboxesView {
        FullMailboxesView {
            list: FullMailboxes::new(spool),
            state: std::sync::Mutex::new(ViewState::default()),
        }
    }

    /// Whether `address` was full when qmgr last looked.
    pub fn contains(&self, address: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stale = state
            .checked
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if stale {
            state.checked = Some(std::time::Instant::now());
            let modified = std::fs::metadata(self.list.path())
                .and_then(|m| m.modified())
                .ok();
            if modified != state.modified {
                state.modified = modified;
                state.addresses = self.list.read().unwrap_or_default();
            }
        }
        state.addresses.contains(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rules() {
        assert_eq!(parse_size("500M", 1), Ok(500 << 20));
        assert_eq!(parse_size("2g", 1), Ok(2 << 30));
        assert_eq!(parse_size("100", 1024), Ok(102_400));
        assert_eq!(parse_size("100B", 1024), Ok(100));
        assert!(parse_size("12X", 1).is_err());
        assert!(parse_size("M", 1).is_err());
        assert!(parse_size("99999999999T", 1).is_err());
        assert_eq!(
            limit_from_extra("userdb_quota_rule=*:storage=1G"),
            Some(1 << 30)
        );
        assert_eq!(
            limit_from_extra("x=y userdb_quota_rule=*:storage=100"),
            Some(102_400)
        );
        assert_eq!(limit_from_extra("userdb_quota_rule=*:storage=0"), None);
        assert_eq!(limit_from_extra("userdb_quota_rule=*:messages=10"), None);
        assert_eq!(limit_from_extra(""), None);
        let extra = set_limit_in_extra("x=y userdb_quota_rule=*:storage=1G", Some(5000));
        assert_eq!(extra, "x=y userdb_quota_rule=*:storage=5000B");
        assert_eq!(limit_from_extra(&extra), Some(5000));
        assert_eq!(set_limit_in_extra(&extra, None), "x=y");
    }

    #[test]
    fn usage_counts_every_folder() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("u");
        crate::maildir::create_mailbox(&md).unwrap();
        std::fs::write(md.join("new/1.M1.h,S=100"), b"x").unwrap();
        std::fs::write(md.join("cur/2.M2.h,S=50:2,S"), b"x").unwrap();
        std::fs::write(md.join(".Sent/cur/3.M3.h:2,S"), b"four").unwrap();
        assert_eq!(
            usage(&md).unwrap(),
            Usage {
                bytes: 154,
                messages: 3
            }
        );
        assert_eq!(usage(&dir.path().join("none")).unwrap(), Usage::default());
    }

    #[test]
    fn the_full_list() {
        let dir = tempfile::tempdir().unwrap();
        let full = FullMailboxes::new(dir.path());
        full.set("a@x", true).unwrap();
        full.set("b@x", true).unwrap();
        full.set("a@x", false).unwrap();
        assert_eq!(
            full.read().unwrap().into_iter().collect::<Vec<_>>(),
            ["b@x"]
        );
    }
}
