//! Where mail for an address goes: alias expansion, catch-all,
//! plus-addressing, local mailboxes and remote addresses.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::address::Address;
use crate::aliases::{AliasKey, Aliases};
use crate::config::Config;
use crate::domains::Domains;
use crate::textdb::TableError;
use crate::userdb::{UserDb, UserDirectory};

/// Alias chains longer than this are a loop or a mistake (Postfix uses
/// a nesting limit of 100; real chains are short).
const MAX_ALIAS_DEPTH: usize = 20;

/// Most final recipients one address may expand to.
const MAX_EXPANSION: usize = 1000;

/// A final destination of mail.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destination {
    /// A mailbox of ours (tag removed).
    Local(Address),
    /// An address in a domain we do not serve.
    Remote(Address),
}

/// Why an address cannot take mail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no such user: {0}")]
    UnknownUser(String),
    #[error("alias loop or nesting deeper than {MAX_ALIAS_DEPTH} at {0}")]
    AliasLoop(String),
    #[error("alias expands to more than {MAX_EXPANSION} recipients")]
    TooManyTargets,
}

/// Domains, aliases and users, loaded together.
pub struct Directory {
    pub domains: Domains,
    pub aliases: Aliases,
    pub users: Arc<dyn UserDirectory>,
    /// The plus-addressing delimiter ("" for none).
    pub delimiter: String,
}

impl Directory {
    /// Whether `domain` is served here.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.contains(domain)
    }

    /// Expand `address` to its final destinations (sorted, deduplicated).
    pub fn resolve(&self, address: &Address) -> Result<Vec<Destination>, ResolveError> {
        let mut out = BTreeSet::new();
        self.expand(address, 0, &mut Vec::new(), &mut out)?;
        Ok(out.into_iter().collect())
    }

    /// The postmaster of this host (RFC 5321 4.5.1): of `hostname` if it
    /// is a served domain, else of the first domain served.
    pub fn postmaster(&self, hostname: &str) -> String {
        let domain = if self.is_local_domain(hostname) {
            hostname
        } else {
            self.domains.iter().next().unwrap_or(hostname)
        };
        format!("postmaster@{domain}")
    }

    /// Whether the authenticated `user` may send as `sender`: its own
    /// address, a plus-form of it, or an address (alias, catch-all) whose
    /// mail reaches `user`.
    pub fn may_send_as(&self, user: &Address, sender: &Address) -> bool {
        if sender.without_tag(&self.delimiter).0.key() == user.key() {
            return true;
        }
        let user = user.key();
        self.resolve(sender).is_ok_and(|dests| {
            dests
                .iter()
                .any(|d| matches!(d, Destination::Local(a) if a.key() == user))
        })
    }

    fn expand(
        &self,
        address: &Address,
        depth: usize,
        chain: &mut Vec<String>,
        out: &mut BTreeSet<Destination>,
    ) -> Result<(), ResolveError> {
        if out.len() > MAX_EXPANSION {
            return Err(ResolveError::TooManyTargets);
        }
        if !self.is_local_domain(address.domain()) {
            out.insert(Destination::Remote(address.clone()));
            return Ok(());
        }
        let key = address.key();
        if depth > MAX_ALIAS_DEPTH || chain.contains(&key) {
            return Err(ResolveError::AliasLoop(key));
        }
        let (base, tag) = address.without_tag(&self.delimiter);
        let Some(targets) = self.alias_targets(address, &base, tag.is_some()) else {
            return if self.users.exists(&base) {
                out.insert(Destination::Local(base));
                Ok(())
            } else {
                Err(ResolveError::UnknownUser(key))
            };
        };
        chain.push(key);
        for target in targets {
            // An alias that lists its own name delivers to that mailbox too
            // (`a@x: a@x, b@x`), as in Postfix's virtual(5).
            if target.key() == address.key() || target.key() == base.key() {
                if self.users.exists(&base) {
                    out.insert(Destination::Local(base.clone()));
                    continue;
                }
                return Err(ResolveError::UnknownUser(target.key()));
            }
            self.expand(&target, depth + 1, chain, out)?;
        }
        chain.pop();
        Ok(())
    }

    /// The alias that applies to `address`, most specific first:
    /// `user+tag@d`, `user@d`, `user+tag`, `user`, then `@d` if `user@d` is
    /// not a mailbox.
    fn alias_targets(
        &self,
        address: &Address,
        base: &Address,
        tagged: bool,
    ) -> Option<Vec<Address>> {
        let domain = address.domain();
        let mut keys = vec![AliasKey::Address(address.key())];
        if tagged {
            keys.push(AliasKey::Address(base.key()));
        }
        keys.push(AliasKey::Local(address.local().to_lowercase()));
        if tagged {
            keys.push(AliasKey::Local(base.local().to_lowercase()));
        }
        if !self.users.exists(base) {
            keys.push(AliasKey::CatchAll(domain.to_string()));
        }
        keys.iter().find_map(|k| {
            self.aliases
                .get(k)
                .map(|ts| ts.iter().filter_map(|t| t.in_domain(domain)).collect())
        })
    }
}

/// The directory, reloaded when one of its files changes. Each reader gets
/// a consistent snapshot.
pub struct DirectoryCache {
    files: [PathBuf; 3],
    delimiter: String,
    state: Mutex<(Vec<Option<SystemTime>>, Arc<Directory>)>,
}

impl DirectoryCache {
    /// Load the tables named in `config`.
    pub fn new(config: &Config) -> Result<DirectoryCache, TableError> {
        let files = [
            config.paths.domains.clone(),
            config.paths.aliases.clone(),
            config.paths.users.clone(),
        ];
        let delimiter = config.addresses.recipient_delimiter.clone();
        let stamps = stamps(&files);
        let dir = load(&files, &delimiter)?;
        Ok(DirectoryCache {
            files,
            delimiter,
            state: Mutex::new((stamps, Arc::new(dir))),
        })
    }

    /// The current tables, reloaded first if a file changed since the last
    /// call. A file that fails to load keeps the previous tables in force
    /// (the error is returned for logging).
    pub fn current(&self) -> (Arc<Directory>, Option<TableError>) {
        let now = stamps(&self.files);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now != state.0 {
            match load(&self.files, &self.delimiter) {
                Ok(dir) => *state = (now, Arc::new(dir)),
                Err(e) => return (state.1.clone(), Some(e)),
            }
        }
        (state.1.clone(), None)
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

fn load(files: &[PathBuf; 3], delimiter: &str) -> Result<Directory, TableError> {
    Ok(Directory {
        domains: Domains::load(&files[0])?,
        aliases: Aliases::load(&files[1])?,
        users: Arc::new(UserDb::load(&files[2])?),
        delimiter: delimiter.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory(aliases: &str) -> Directory {
        let dir = tempfile::tempdir().unwrap();
        let ap = dir.path().join("aliases");
        std::fs::write(&ap, aliases).unwrap();
        let dp = dir.path().join("domains");
        std::fs::write(&dp, "a.test\nb.test\n").unwrap();
        let up = dir.path().join("users");
        for u in ["alice@a.test", "bob@a.test", "carol@b.test"] {
            UserDb::add(&up, &Address::parse(u).unwrap(), "x").unwrap();
        }
        Directory {
            domains: Domains::load(&dp).unwrap(),
            aliases: Aliases::load(&ap).unwrap(),
            users: Arc::new(UserDb::load(&up).unwrap()),
            delimiter: "+".into(),
        }
    }

    fn resolve(d: &Directory, a: &str) -> Result<Vec<String>, ResolveError> {
        d.resolve(&Address::parse(a).unwrap()).map(|v| {
            v.into_iter()
                .map(|d| match d {
                    Destination::Local(a) => format!("local:{a}"),
                    Destination::Remote(a) => format!("remote:{a}"),
                })
                .collect()
        })
    }

    #[test]
    fn who_may_send_as_whom() {
        let d = directory("team@a.test: alice@a.test, carol@b.test\n@b.test: carol@b.test\n");
        let a = |s: &str| Address::parse(s).unwrap();
        let alice = a("alice@a.test");
        assert!(d.may_send_as(&alice, &a("Alice@A.TEST")));
        assert!(d.may_send_as(&alice, &a("alice+lists@a.test")));
        assert!(d.may_send_as(&alice, &a("team@a.test")));
        assert!(!d.may_send_as(&alice, &a("bob@a.test")));
        assert!(!d.may_send_as(&alice, &a("nobody@a.test")));
        assert!(!d.may_send_as(&alice, &a("alice@elsewhere.test")));
        let carol = a("carol@b.test");
        assert!(d.may_send_as(&carol, &a("anything@b.test")));
        assert!(d.may_send_as(&carol, &a("team@a.test")));
    }

    #[test]
    fn users_tags_and_unknowns() {
        let d = directory("");
        assert_eq!(resolve(&d, "Alice@A.test").unwrap(), ["local:Alice@a.test"]);
        assert_eq!(
            resolve(&d, "alice+news@a.test").unwrap(),
            ["local:alice@a.test"]
        );
        assert_eq!(
            resolve(&d, "x@elsewhere.test").unwrap(),
            ["remote:x@elsewhere.test"]
        );
        assert!(matches!(
            resolve(&d, "nobody@a.test"),
            Err(ResolveError::UnknownUser(_))
        ));
    }

    #[test]
    fn aliases_catchall_and_precedence() {
        let d = directory(
            "postmaster: alice\nteam@a.test: alice, carol@b.test, out@far.test\n@b.test: bob@a.test\nbob+spam@a.test: alice@a.test\nself@a.test: self@a.test\n",
        );
        assert_eq!(
            resolve(&d, "postmaster@a.test").unwrap(),
            ["local:alice@a.test"]
        );
        // bare target alice means alice@b.test, unknown there, so the catch-all applies
        assert_eq!(
            resolve(&d, "postmaster@b.test").unwrap(),
            ["local:bob@a.test"]
        );
        assert_eq!(
            resolve(&d, "team+x@a.test").unwrap(),
            [
                "local:alice@a.test",
                "local:carol@b.test",
                "remote:out@far.test"
            ]
        );
        // catch-all only for users that do not exist
        assert_eq!(resolve(&d, "zed@b.test").unwrap(), ["local:bob@a.test"]);
        assert_eq!(resolve(&d, "carol@b.test").unwrap(), ["local:carol@b.test"]);
        // an exact tagged alias wins over the user
        assert_eq!(
            resolve(&d, "bob+spam@a.test").unwrap(),
            ["local:alice@a.test"]
        );
        assert!(matches!(
            resolve(&d, "self@a.test"),
            Err(ResolveError::UnknownUser(_))
        ));
    }

    #[test]
    fn loops_are_errors() {
        let d = directory("x@a.test: y@a.test\ny@a.test: x@a.test\n");
        assert!(matches!(
            resolve(&d, "x@a.test"),
            Err(ResolveError::AliasLoop(_))
        ));
    }
}
