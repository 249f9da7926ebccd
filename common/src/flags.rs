//! Message flags in Maildir file names (`:2,<letters>`) and IMAP flags.
//!
//! System flags use the Maildir letters (D draft, F flagged, R replied,
//! S seen, T trashed) as Dovecot maps them: `\Draft`, `\Flagged`,
//! `\Answered`, `\Seen`, `\Deleted`. Keywords (`$Junk`, `$Forwarded`,
//! custom ones) are the letters `a`-`z`, numbered in the folder's keywords
//! file, `mailsrv-keywords`, written in the syntax of Dovecot's
//! `dovecot-keywords` (`<index> <name>` lines); a folder taken over from
//! Dovecot keeps its keywords. Maildir allows 26 keywords per folder.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use crate::safeio::{lock_exclusive, write_atomic};

/// Our keywords file inside a folder.
pub const KEYWORDS_FILE: &str = "mailsrv-keywords";
/// Dovecot's, read when ours is missing.
pub const DOVECOT_KEYWORDS_FILE: &str = "dovecot-keywords";
const LOCK_FILE: &str = "mailsrv-keywords.lock";
const MAX_KEYWORDS: usize = 26;

/// IMAP system flags that live in the file name (RFC 9051 2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SystemFlag {
    Answered,
    Deleted,
    Draft,
    Flagged,
    Seen,
}

impl SystemFlag {
    /// Every system flag, for FLAGS and PERMANENTFLAGS.
    pub const ALL: [SystemFlag; 5] = [
        SystemFlag::Answered,
        SystemFlag::Flagged,
        SystemFlag::Deleted,
        SystemFlag::Seen,
        SystemFlag::Draft,
    ];

    /// The Maildir info letter.
    pub fn letter(self) -> char {
        match self {
            SystemFlag::Draft => 'D',
            SystemFlag::Flagged => 'F',
            SystemFlag::Answered => 'R',
            SystemFlag::Seen => 'S',
            SystemFlag::Deleted => 'T',
        }
    }

    fn from_letter(c: char) -> Option<SystemFlag> {
        SystemFlag::ALL.into_iter().find(|f| f.letter() == c)
    }

    /// The IMAP name, with its backslash.
    pub fn imap_name(self) -> &'static str {
        match self {
            SystemFlag::Answered => "\\Answered",
            SystemFlag::Deleted => "\\Deleted",
            SystemFlag::Draft => "\\Draft",
            SystemFlag::Flagged => "\\Flagged",
            SystemFlag::Seen => "\\Seen",
        }
    }
}

/// A message's flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageFlags {
    pub system: BTreeSet<SystemFlag>,
    pub keywords: BTreeSet<String>,
}

/// Why flags cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum FlagsError {
    #[error("this mailbox already has 26 keywords, the most a Maildir can hold")]
    TooManyKeywords,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A folder's keyword numbering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keywords {
    names: Vec<Option<String>>,
}

impl Keywords {
    /// Read the folder's keywords (ours, else Dovecot's, else none).
    pub fn load(folder: &Path) -> io::Result<Keywords> {
        for file in [KEYWORDS_FILE, DOVECOT_KEYWORDS_FILE] {
            match std::fs::read_to_string(folder.join(file)) {
                Ok(text) => return Ok(Self::parse(&text)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Keywords::default())
    }

    fn parse(text: &str) -> Keywords {
        let mut names = vec![None; MAX_KEYWORDS];
        for line in text.lines() {
            if let Some((idx, name)) = line.split_once(' ') {
                if let Ok(i) = idx.parse::<usize>() {
                    if i < MAX_KEYWORDS && !name.is_empty() {
                        names[i] = Some(name.to_string());
                    }
                }
            }
        }
        while names.last() == Some(&None) {
            names.pop();
        }
        Keywords { names }
    }

    /// The keyword of a Maildir letter `a`-`z`, if numbered.
    pub fn name_of(&self, letter: char) -> Option<&str> {
        let i = (letter as usize).checked_sub('a' as usize)?;
        self.names.get(i)?.as_deref()
    }

    /// The letter of `name` (keywords compare case-insensitively, RFC
    /// 9051 2.3.2), if numbered.
    pub fn letter_of(&self, name: &str) -> Option<char> {
        self.names
            .iter()
            .position(|n| n.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .map(|i| (b'a' + i as u8) as char)
    }

    /// Every known keyword, for FLAGS.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.names.iter().flatten().map(String::as_str)
    }

    /// Number the `wanted` keywords that have no letter yet, saving the
    /// file under its lock (re-read first, so concurrent sessions agree).
    pub fn ensure(folder: &Path, wanted: &BTreeSet<String>) -> Result<Keywords, FlagsError> {
        let current = Self::load(folder)?;
        if wanted.iter().all(|k| current.letter_of(k).is_some()) {
            return Ok(current);
        }
        let _lock = lock_exclusive(&folder.join(LOCK_FILE))?;
        let mut kw = Self::load(folder)?;
        for name in wanted {
            if kw.letter_of(name).is_none() {
                match kw.names.iter().position(Option::is_none) {
                    Some(free) => kw.names[free] = Some(name.clone()),
                    None if kw.names.len() < MAX_KEYWORDS => kw.names.push(Some(name.clone())),
                    None => return Err(FlagsError::TooManyKeywords),
                }
            }
        }
        let text: String = kw
            .names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| format!("{i} {n}\n")))
            .collect();
        write_atomic(&folder.join(KEYWORDS_FILE), text.as_bytes())?;
        Ok(kw)
    }

    /// Flags from a file name's info part (after `:2,`). Letters that are
    /// neither a system flag nor a numbered keyword (such as Maildir's P)
    /// come back as `other`, so that rewriting the name keeps them.
    pub fn parse_info(&self, info: &str) -> (MessageFlags, String) {
        let mut flags = MessageFlags::default();
        let mut other = String::new();
        for c in info.chars() {
            if let Some(f) = SystemFlag::from_letter(c) {
                flags.system.insert(f);
            } else if let Some(name) = self.name_of(c) {
                flags.keywords.insert(name.to_string());
            } else {
                other.push(c);
            }
        }
        (flags, other)
    }

    /// The info letters for `flags` plus the `other` letters a file had,
    /// in ASCII order as Maildir wants. Keywords must be numbered first
    /// ([`Keywords::ensure`]).
    pub fn render(&self, flags: &MessageFlags, other: &str) -> String {
        let mut letters: Vec<char> = flags
            .system
            .iter()
            .map(|f| f.letter())
            .chain(flags.keywords.iter().filter_map(|k| self.letter_of(k)))
            .chain(other.chars())
            .collect();
        letters.sort_unstable();
        letters.dedup();
        letters.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trip_with_keywords() {
        let dir = tempfile::tempdir().unwrap();
        let wanted: BTreeSet<String> = ["$Junk", "$Forwarded"].map(String::from).into();
        let kw = Keywords::ensure(dir.path(), &wanted).unwrap();
        let (flags, other) = kw.parse_info("FPSab");
        assert_eq!(other, "P");
        assert!(flags.system.contains(&SystemFlag::Seen));
        assert_eq!(flags.keywords, wanted);
        assert_eq!(kw.render(&flags, &other), "FPSab");
        // Keywords match case-insensitively and survive a reload.
        let again = Keywords::load(dir.path()).unwrap();
        assert_eq!(again.letter_of("$junk"), kw.letter_of("$Junk"));
    }

    #[test]
    fn dovecot_keywords_are_read_and_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(DOVECOT_KEYWORDS_FILE),
            "0 $Forwarded\n2 Work\n",
        )
        .unwrap();
        let kw = Keywords::load(dir.path()).unwrap();
        assert_eq!(kw.name_of('c'), Some("Work"));
        assert_eq!(kw.name_of('b'), None);
        let many: BTreeSet<String> = (0..25).map(|i| format!("k{i}")).collect();
        assert!(matches!(
            Keywords::ensure(dir.path(), &many),
            Err(FlagsError::TooManyKeywords)
        ));
        let fits: BTreeSet<String> = (0..24).map(|i| format!("k{i}")).collect();
        let kw = Keywords::ensure(dir.path(), &fits).unwrap();
        assert_eq!(kw.letter_of("k0"), Some('b'));
        assert_eq!(kw.all().count(), 26);
    }
}
