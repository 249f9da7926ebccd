//! The served domains: mail to them is delivered here, one domain a line.

use std::collections::BTreeSet;
use std::path::Path;

use crate::address::normalize_domain;
use crate::textdb::{self, TableError};

/// The set of local (virtual mailbox) domains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domains {
    names: BTreeSet<String>,
}

impl Domains {
    /// Load the domains file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Domains, TableError> {
        let text = textdb::read_table(path)?;
        let mut names = BTreeSet::new();
        for (line, entry) in textdb::entries(&text) {
            let name = normalize_domain(entry).ok_or_else(|| {
                TableError::syntax(path, line, format!("`{entry}` is not a domain name"))
            })?;
            names.insert(name);
        }
        Ok(Domains { names })
    }

    /// Whether mail for `domain` (lower-cased) is ours.
    pub fn contains(&self, domain: &str) -> bool {
        self.names.contains(domain)
    }

    /// The domains, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Add `domain` to the file at `path`.
    pub fn add(path: &Path, domain: &str) -> Result<String, TableError> {
        let name = normalize_domain(domain)
            .ok_or_else(|| TableError::Refused(format!("`{domain}` is not a domain name")))?;
        textdb::update(path, 0o644, |text| {
            if Self::load(path)?.contains(&name) {
                return Err(TableError::Refused(format!("domain {name} already exists")));
            }
            Ok((textdb::append_line(text, &name), name.clone()))
        })
    }

    /// Remove `domain` from the file at `path`.
    pub fn remove(path: &Path, domain: &str) -> Result<(), TableError> {
        let name = domain.to_lowercase();
        textdb::update(path, 0o644, |text| {
            let out = textdb::remove_lines(text, &format!("domain {name}"), |l| {
                l.to_lowercase() == name
            })?;
            Ok((out, ()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("domains");
        Domains::add(&p, "Example.ORG").unwrap();
        Domains::add(&p, "b.test").unwrap();
        assert!(Domains::add(&p, "example.org").is_err());
        assert!(Domains::add(&p, "bad domain").is_err());
        let d = Domains::load(&p).unwrap();
        assert!(d.contains("example.org"));
        assert_eq!(d.iter().collect::<Vec<_>>(), ["b.test", "example.org"]);
        Domains::remove(&p, "example.org").unwrap();
        assert!(!Domains::load(&p).unwrap().contains("example.org"));
    }

    #[test]
    fn bad_line_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("domains");
        std::fs::write(&p, "a.test\n\nnot_a domain\n").unwrap();
        let e = Domains::load(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("domains:3: `not_a domain` is not a domain name"),
            "{e}"
        );
    }
}
