//! The user database: a text file in Dovecot's passwd-file shape,
//! `user@domain:{SCHEME}hash:uid:gid:gecos:home:shell:extra`, one account a
//! line. Only the first two fields are used; the rest are kept as they are
//! so a Dovecot file can be taken over unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::address::Address;
use crate::password;
use crate::textdb::{self, TableError};

/// Permission bits of the database: it holds password hashes.
const USERDB_MODE: u32 = 0o600;

/// Looking up and authenticating mail users. The passwd-file is the first
/// implementation; a SQL or LDAP directory would be another.
pub trait UserDirectory: Send + Sync {
    /// Whether `address` (already stripped of any plus-tag) is a mailbox.
    fn exists(&self, address: &Address) -> bool;
    /// Whether `password` is right for `user`.
    fn authenticate(&self, user: &str, password: &str) -> bool;
    /// `user`'s stored password hash, which changes when the password
    /// does (what the login cache is tied to).
    fn password_hash(&self, user: &str) -> Option<&str>;
    /// The storage limit of `address`'s mailbox in bytes, if it has one.
    fn quota(&self, address: &Address) -> Option<u64>;
}

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// The login name, `user@domain`, case-folded.
    pub name: String,
    /// `{SCHEME}hash`.
    pub hash: String,
    /// Storage limit in bytes (`userdb_quota_rule` in the extra fields).
    pub quota: Option<u64>,
}

/// The passwd-file, loaded.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    users: HashMap<String, UserEntry>,
}

impl UserDb {
    /// Load and check the whole file; a missing file is an empty database.
    pub fn load(path: &Path) -> Result<UserDb, TableError> {
        let text = textdb::read_table(path)?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<UserDb, TableError> {
        let mut users = HashMap::new();
        for (line, entry) in textdb::entries(text) {
            let parsed = parse_line(entry).map_err(|m| TableError::syntax(path, line, m))?;
            if users.insert(parsed.name.clone(), parsed).is_some() {
                return Err(TableError::syntax(path, line, "user is listed twice"));
            }
        }
        Ok(UserDb { users })
    }

    /// The account named `name` (any case).
    pub fn get(&self, name: &str) -> Option<&UserEntry> {
        self.users.get(&name.to_lowercase())
    }

    /// All accounts, sorted by name.
    pub fn list(&self) -> Vec<&UserEntry> {
        let mut v: Vec<_> = self.users.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Add `address` with a new hash of `password` to the file at `path`.
    pub fn add(path: &Path, address: &Address, password: &str) -> Result<(), TableError> {
        let name = address.key();
        maildir_path(Path::new(""), address)?;
        check_name(&name)?;
        let line = format!("{name}:{}::::::", password::hash_password(password));
        textdb::update(path, USERDB_MODE, |text| {
            let db = Self::parse(text, path)?;
            if db.get(&name).is_some() {
                return Err(TableError::Refused(format!("user {name} already exists")));
            }
            Ok((textdb::append_line(text, &line), ()))
        })
    }

    /// Add a whole passwd-file `line`, hash and extra fields kept (a
    /// restored or imported account), unless its user exists; returns
    /// whether it was added.
    pub fn add_line(path: &Path, line: &str) -> Result<bool, TableError> {
        let entry = parse_line(line.trim()).map_err(TableError::Refused)?;
        let address = Address::parse(&entry.name)
            .map_err(|e| TableError::Refused(format!("{}: {e}", entry.name)))?;
        maildir_path(Path::new(""), &address)?;
        check_name(&entry.name)?;
        textdb::update(path, USERDB_MODE, |text| {
            let db = Self::parse(text, path)?;
            if db.get(&entry.name).is_some() {
                return Ok((text.to_string(), false));
            }
            Ok((textdb::append_line(text, line.trim()), true))
        })
    }

    /// Set (or with None remove) the storage limit of `name` in the file
    /// at `path`; the line's other fields are kept.
    pub fn set_quota(path: &Path, name: &str, limit: Option<u64>) -> Result<(), TableError> {
        Self::edit_line(path, name, |line| {
            // The extra fields are the eighth, colons and all.
            let mut fields: Vec<&str> = line.splitn(8, ':').collect();
            fields.resize(8, "");
            let extra = crate::quota::set_limit_in_extra(fields[7], limit);
            fields[7] = &extra;
            fields.join(":")
        })
    }

    /// Rewrite the line of user `name` in the file at `path` with `edit`.
    fn edit_line(path: &Path, name: &str, edit: impl Fn(&str) -> String) -> Result<(), TableError> {
        let name = name.to_lowercase();
        textdb::update(path, USERDB_MODE, |text| {
            let mut found = false;
            let mut out = String::with_capacity(text.len() + 128);
            for line in text.lines() {
                let t = line.trim();
                let matches =
                    !t.starts_with('#') && login_of(t).is_some_and(|n| n.to_lowercase() == name);
                if matches {
                    found = true;
                    out.push_str(&edit(t));
                } else {
                    out.push_str(line);
                }
                out.push('\n');
            }
            if !found {
                return Err(TableError::Refused(format!("user {name} does not exist")));
            }
            Ok((out, ()))
        })
    }

    /// Remove `name` from the file at `path`.
    pub fn remove(path: &Path, name: &str) -> Result<(), TableError> {
        let name = name.to_lowercase();
        textdb::update(path, USERDB_MODE, |text| {
            let out = textdb::remove_lines(text, &format!("user {name}"), |l| {
                login_of(l).is_some_and(|n| n.to_lowercase() == name)
            })?;
            Ok((out, ()))
        })
    }

    /// Replace the hash of `name` in the file at `path`.
    pub fn set_password(path: &Path, name: &str, password: &str) -> Result<(), TableError> {
        let hash = password::hash_password(password);
        Self::edit_line(path, name, |line| {
            let mut fields: Vec<&str> = line.splitn(3, ':').collect();
            fields.resize(3, "");
            format!("{}:{hash}:{}", fields[0], fields[2])
        })
    }
}

impl UserDirectory for UserDb {
    fn exists(&self, address: &Address) -> bool {
        self.users.contains_key(&address.key())
    }

    fn authenticate(&self, user: &str, password: &str) -> bool {
        self.get(user)
            .is_some_and(|u| password::verify_password(&u.hash, password).unwrap_or(false))
    }

    fn password_hash(&self, user: &str) -> Option<&str> {
        self.get(user).map(|u| u.hash.as_str())
    }

    fn quota(&self, address: &Address) -> Option<u64> {
        self.users.get(&address.key()).and_then(|u| u.quota)
    }
}

/// A name the users file can hold: its fields are split at `:` and a
/// line starting with `#` is a comment.
fn check_name(name: &str) -> Result<(), TableError> {
    if name.contains(':') || name.starts_with('#') {
        return Err(TableError::Refused(format!(
            "`{name}` cannot be a user: a name holds no `:` and does not start with `#`"
        )));
    }
    Ok(())
}

fn login_of(line: &str) -> Option<&str> {
    line.split(':').next()
}

fn parse_line(line: &str) -> Result<UserEntry, String> {
    // The extra fields are the rest of the line, colons and all
    // (`userdb_quota_rule=*:storage=1G`).
    let mut fields = line.splitn(8, ':');
    let name = fields.next().unwrap_or_default();
    let hash = fields
        .next()
        .ok_or_else(|| "expected user@domain:{SCHEME}hash".to_string())?;
    let address = Address::parse(name).map_err(|e| format!("user `{name}`: {e}"))?;
    password::check_hash_format(hash).map_err(|e| format!("user `{name}`: {e}"))?;
    // uid, gid, gecos, home, shell, then the extra fields.
    let extra = fields.nth(5).unwrap_or_default();
    Ok(UserEntry {
        name: address.key(),
        hash: hash.to_string(),
        quota: crate::quota::limit_from_extra(extra),
    })
}

/// Where a user's Maildir lives: `<mail_root>/<domain>/<local part>/`,
/// lower-cased. Names that could leave that directory (a `/`, a leading
/// `.`, NUL) have no Maildir, whatever the user database says.
pub fn maildir_path(mail_root: &Path, address: &Address) -> Result<PathBuf, TableError> {
    let local = address.local().to_lowercase();
    let domain = address.domain();
    for part in [local.as_str(), domain] {
        if part.is_empty() || part.starts_with('.') || part.contains(['/', '\0']) {
            return Err(TableError::Refused(format!(
                "`{address}` cannot be a mailbox: its name is not usable as a directory name"
            )));
        }
    }
    Ok(mail_root.join(domain).join(local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_passwd_remove() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users");
        let a = Address::parse("Alice@Example.org").unwrap();
        UserDb::add(&p, &a, "pw1").unwrap();
        assert!(UserDb::add(&p, &a, "again").is_err());
        for bad in ["a/../../x@example.org", ".hidden@example.org"] {
            let e = UserDb::add(&p, &Address::parse(bad).unwrap(), "pw");
            assert!(matches!(e, Err(TableError::Refused(_))), "{bad}");
        }
        let db = UserDb::load(&p).unwrap();
        assert!(db.exists(&a));
        assert!(db.authenticate("alice@example.org", "pw1"));
        assert!(!db.authenticate("alice@example.org", "pw2"));
        UserDb::set_password(&p, "ALICE@example.org", "pw2").unwrap();
        let db = UserDb::load(&p).unwrap();
        assert!(db.authenticate("alice@example.org", "pw2"));
        UserDb::remove(&p, "alice@example.org").unwrap();
        assert!(UserDb::load(&p).unwrap().list().is_empty());
        assert!(UserDb::remove(&p, "alice@example.org").is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn dovecot_lines_load_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users");
        std::fs::write(
            &p,
            "# migrated\nbob@x.org:{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuOQiyCxlgf/oeuTqixKmWdcYUh4Hjl0a:1000:1000::/home/bob::\nbad line\n",
        )
        .unwrap();
        let e = UserDb::load(&p).unwrap_err().to_string();
        assert!(e.ends_with(":3: expected user@domain:{SCHEME}hash"), "{e}");
        std::fs::write(
            &p,
            "bob@x.org:{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuOQiyCxlgf/oeuTqixKmWdcYUh4Hjl0a:1000:1000::/home/bob::\n",
        )
        .unwrap();
        let db = UserDb::load(&p).unwrap();
        assert!(db.authenticate("bob@x.org", "secret"));
        UserDb::set_password(&p, "bob@x.org", "new").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with(":1000:1000::/home/bob::\n"), "{text}");
    }
}
