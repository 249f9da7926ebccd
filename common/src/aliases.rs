//! The aliases file: `/etc/aliases` syntax extended with virtual aliases.
//!
//! ```text
//! # a bare name applies in every served domain
//! postmaster: alice
//! sales@example.org: bob@example.org, carol@example.net
//! # catch-all for users that do not exist
//! @example.org: alice@example.org
//! ```
//!
//! Comments are whole lines starting with `#`, as in `/etc/aliases`.
//! A line that starts with white space continues the previous one, as in
//! `/etc/aliases`. A bare target name means that user in the domain of the
//! address being expanded. Pipes, files and `:include:` are refused: the
//! mail store is virtual and delivery never runs commands.

use std::collections::HashMap;
use std::path::Path;

use crate::address::{normalize_domain, Address};
use crate::textdb::{self, TableError};

/// The left-hand side of an alias.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AliasKey {
    /// `user@domain`.
    Address(String),
    /// `user`, in any served domain.
    Local(String),
    /// `@domain`, for users that do not exist.
    CatchAll(String),
}

impl AliasKey {
    /// Parse a left-hand side.
    pub fn parse(s: &str) -> Result<AliasKey, String> {
        let s = s.trim();
        if let Some(domain) = s.strip_prefix('@') {
            let d = normalize_domain(domain).ok_or_else(|| format!("`{s}`: bad domain"))?;
            Ok(AliasKey::CatchAll(d))
        } else if s.contains('@') {
            let a = Address::parse(s).map_err(|e| format!("`{s}`: {e}"))?;
            Ok(AliasKey::Address(a.key()))
        } else if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control()) {
            Err(format!("`{s}` is not an alias name"))
        } else {
            Ok(AliasKey::Local(s.to_lowercase()))
        }
    }
}

impl std::fmt::Display for AliasKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AliasKey::Address(a) => f.write_str(a),
            AliasKey::Local(l) => f.write_str(l),
            AliasKey::CatchAll(d) => write!(f, "@{d}"),
        }
    }
}

/// A right-hand side target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasTarget {
    /// A full address.
    Address(Address),
    /// A bare user name, in the domain of the address being expanded.
    Local(String),
}

impl AliasTarget {
    fn parse(s: &str) -> Result<AliasTarget, String> {
        let s = s.trim();
        if s.starts_with('|') || s.starts_with('/') || s.starts_with(":include:") {
            return Err(format!(
                "`{s}`: pipe, file and :include: targets are not supported"
            ));
        }
        if s.contains('@') {
            Address::parse(s)
                .map(AliasTarget::Address)
                .map_err(|e| format!("`{s}`: {e}"))
        } else if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control()) {
            Err(format!("`{s}` is not a target address"))
        } else {
            Ok(AliasTarget::Local(s.to_string()))
        }
    }

    /// The target as an address, bare names taken in `domain`.
    pub fn in_domain(&self, domain: &str) -> Option<Address> {
        match self {
            AliasTarget::Address(a) => Some(a.clone()),
            AliasTarget::Local(l) => Address::from_parts(l, domain).ok(),
        }
    }
}

impl std::fmt::Display for AliasTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AliasTarget::Address(a) => write!(f, "{a}"),
            AliasTarget::Local(l) => f.write_str(l),
        }
    }
}

/// The loaded aliases table.
#[derive(Debug, Clone, Default)]
pub struct Aliases {
    map: HashMap<AliasKey, Vec<AliasTarget>>,
}

impl Aliases {
    /// Load the aliases file; a missing file is an empty table.
    pub fn load(path: &Path) -> Result<Aliases, TableError> {
        let text = textdb::read_table(path)?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Aliases, TableError> {
        let mut map = HashMap::new();
        for (line, entry) in logical_lines(text) {
            let (key, targets) =
                parse_entry(&entry).map_err(|m| TableError::syntax(path, line, m))?;
            if map.insert(key.clone(), targets).is_some() {
                return Err(TableError::syntax(
                    path,
                    line,
                    format!("alias {key} is defined twice"),
                ));
            }
        }
        Ok(Aliases { map })
    }

    /// The targets of `key`, if it is an alias.
    pub fn get(&self, key: &AliasKey) -> Option<&[AliasTarget]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// All entries, sorted by key.
    pub fn list(&self) -> Vec<(&AliasKey, &[AliasTarget])> {
        let mut v: Vec<_> = self.map.iter().map(|(k, t)| (k, t.as_slice())).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// Add `key: targets` to the file at `path`.
    pub fn add(path: &Path, key: &str, targets: &[String]) -> Result<(), TableError> {
        let parsed_key = AliasKey::parse(key).map_err(TableError::Refused)?;
        if targets.is_empty() {
            return Err(TableError::Refused(
                "an alias needs at least one target".into(),
            ));
        }
        for t in targets {
            AliasTarget::parse(t).map_err(TableError::Refused)?;
        }
        let line = format!("{parsed_key}: {}", targets.join(", "));
        textdb::update(path, 0o644, |text| {
            let current = Self::parse(text, path)?;
            if current.get(&parsed_key).is_some() {
                return Err(TableError::Refused(format!(
                    "alias {parsed_key} already exists"
                )));
            }
            Ok((textdb::append_line(text, &line), ()))
        })
    }

    /// Remove the alias `key` (and its continuation lines) from the file.
    pub fn remove(path: &Path, key: &str) -> Result<(), TableError> {
        let parsed_key = AliasKey::parse(key).map_err(TableError::Refused)?;
        textdb::update(path, 0o644, |text| {
            let mut out = String::with_capacity(text.len());
            let mut skipping = false;
            let mut found = false;
            for line in text.lines() {
                let continuation = line.starts_with([' ', '\t']) && !line.trim().is_empty();
                if continuation && skipping {
                    continue;
                }
                skipping = !line.trim_start().starts_with('#')
                    && line
                        .split_once(':')
                        .is_some_and(|(k, _)| AliasKey::parse(k).ok() == Some(parsed_key.clone()));
                if skipping {
                    found = true;
                    continue;
                }
                out.push_str(line);
                out.push('\n');
            }
            if !found {
                return Err(TableError::Refused(format!(
                    "alias {parsed_key} does not exist"
                )));
            }
            Ok((out, ()))
        })
    }
}

/// Join continuation lines; yields each logical entry with the number of the
/// line it starts on.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(trimmed);
                continue;
            }
        }
        out.push((i + 1, trimmed.to_string()));
    }
    out
}

fn parse_entry(entry: &str) -> Result<(AliasKey, Vec<AliasTarget>), String> {
    // The key ends at the first colon that is not inside the address; keys
    // never contain a colon, so the first one splits.
    let (key, rhs) = entry
        .split_once(':')
        .ok_or_else(|| "expected `name: target, target`".to_string())?;
    let key = AliasKey::parse(key)?;
    let targets: Vec<AliasTarget> = rhs
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(AliasTarget::parse)
        .collect::<Result<_, _>>()?;
    if targets.is_empty() {
        return Err(format!("alias {key} has no target"));
    }
    Ok((key, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Aliases, TableError> {
        Aliases::parse(t, Path::new("/etc/aliases"))
    }

    #[test]
    fn parses_all_forms_and_continuations() {
        let a = parse(
            "# comment\npostmaster: root\nSales@Example.org: bob@example.org,\n  carol@example.net\n@example.org: alice\n",
        )
        .unwrap();
        assert_eq!(
            a.get(&AliasKey::Local("postmaster".into())).unwrap(),
            &[AliasTarget::Local("root".into())]
        );
        let sales = a
            .get(&AliasKey::Address("sales@example.org".into()))
            .unwrap();
        assert_eq!(sales.len(), 2);
        assert_eq!(sales[1].to_string(), "carol@example.net");
        assert!(a.get(&AliasKey::CatchAll("example.org".into())).is_some());
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("a: b\n\nc: |/usr/bin/prog\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/aliases:3: `|/usr/bin/prog`"), "{e}");
        let e = parse("a: b\na: c\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/aliases:2: alias a is defined twice"),
            "{e}"
        );
        let e = parse("nocolon\n").unwrap_err().to_string();
        assert!(e.starts_with("/etc/aliases:1: expected"), "{e}");
    }

    #[test]
    fn add_and_remove_with_continuation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("aliases");
        std::fs::write(&p, "keep: x\nlist@a.test: p@a.test,\n q@a.test\nafter: y\n").unwrap();
        Aliases::remove(&p, "list@a.test").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "keep: x\nafter: y\n");
        Aliases::add(&p, "@a.test", &["z@a.test".into()]).unwrap();
        assert!(Aliases::add(&p, "@a.test", &["z@a.test".into()]).is_err());
        assert!(Aliases::add(&p, "n", &["|cmd".into()]).is_err());
        let a = Aliases::load(&p).unwrap();
        assert_eq!(a.list().len(), 3);
    }
}
