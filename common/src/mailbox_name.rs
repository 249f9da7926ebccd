//! IMAP mailbox names and where they live in a Maildir++ tree.
//!
//! The layout is Dovecot's Maildir++ default, so mailboxes written by
//! Dovecot are found as they are: INBOX is the user's Maildir itself, any
//! other mailbox `a.b` is the directory `.a.b` beside INBOX's `cur/`, with
//! `.` as the hierarchy delimiter and the name stored in modified UTF-7
//! (RFC 3501 5.1.3). A name is checked before it becomes a path: no `/`,
//! no empty level (so no `..`), no control characters, nothing that
//! starts with `~`; a bad name is refused, never cleaned up.

use std::path::{Path, PathBuf};

use base64::Engine;

/// The hierarchy delimiter shown to clients and used on disk.
pub const DELIMITER: char = '.';

/// Longest name accepted, in bytes of its on-disk form (a directory name
/// must fit in 255 bytes with the leading dot).
const MAX_NAME_BYTES: usize = 254;

/// Why a name cannot be a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("mailbox name is empty")]
    Empty,
    #[error("mailbox name has an empty level")]
    EmptyLevel,
    #[error("mailbox name contains a forbidden character")]
    ForbiddenCharacter,
    #[error("mailbox name is too long")]
    TooLong,
    #[error("mailbox name is not valid modified UTF-7")]
    BadEncoding,
}

/// A valid mailbox name, held as UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxName(String);

impl MailboxName {
    /// A name as a client sent it: modified UTF-7 for IMAP4rev1 clients,
    /// UTF-8 once IMAP4rev2 or UTF8=ACCEPT is enabled (RFC 9051 5.1).
    pub fn from_client(raw: &str, utf8: bool) -> Result<MailboxName, NameError> {
        let name = if utf8 {
            raw.to_string()
        } else {
            decode_mutf7(raw).ok_or(NameError::BadEncoding)?
        };
        Self::validate(name)
    }

    fn validate(name: String) -> Result<MailboxName, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        // RFC 9051 5.1: INBOX is case-insensitive.
        if name.eq_ignore_ascii_case("INBOX") {
            return Ok(MailboxName("INBOX".into()));
        }
        if name
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\')
            || name.starts_with('~')
        {
            return Err(NameError::ForbiddenCharacter);
        }
        if name.split(DELIMITER).any(str::is_empty) {
            return Err(NameError::EmptyLevel);
        }
        if encode_mutf7(&name).len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong);
        }
        Ok(MailboxName(name))
    }

    /// The name as UTF-8.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is INBOX.
    pub fn is_inbox(&self) -> bool {
        self.0 == "INBOX"
    }

    /// The name to send to a client (modified UTF-7 unless `utf8`).
    pub fn to_client(&self, utf8: bool) -> String {
        if utf8 {
            self.0.clone()
        } else {
            encode_mutf7(&self.0)
        }
    }

    /// The mailbox's Maildir inside the user's Maildir `root`.
    pub fn folder_dir(&self, root: &Path) -> PathBuf {
        if self.is_inbox() {
            root.to_path_buf()
        } else {
            root.join(format!(".{}", encode_mutf7(&self.0)))
        }
    }

    /// The mailbox a Maildir++ directory entry (`.Sent`) stands for, if it
    /// is one; entries that would not pass as client names are ignored.
    pub fn from_dir_name(entry: &str) -> Option<MailboxName> {
        let encoded = entry.strip_prefix('.')?;
        if encoded.is_empty() || encoded == "." {
            return None;
        }
        let name = decode_mutf7(encoded)?;
        // ".INBOX" would shadow INBOX itself.
        if name.eq_ignore_ascii_case("INBOX") {
            return None;
        }
        Self::validate(name).ok()
    }

    /// The parent mailbox, if this one has a level above it.
    pub fn parent(&self) -> Option<MailboxName> {
        self.0
            .rsplit_once(DELIMITER)
            .map(|(p, _)| MailboxName(p.to_string()))
    }
}

/// The modified base64 of RFC 3501 5.1.3: `,` for `/`, no padding.
fn mbase64() -> base64::engine::GeneralPurpose {
    let alphabet = base64::alphabet::Alphabet::new(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,",
    )
    .expect("valid alphabet");
    base64::engine::GeneralPurpose::new(
        &alphabet,
        base64::engine::GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
    )
}

/// Encode UTF-8 as modified UTF-7 (RFC 3501 5.1.3): printable ASCII as
/// itself (`&` as `&-`), everything else as `&` + modified base64 of
/// UTF-16BE + `-`.
pub fn encode_mutf7(s: &str) -> String {
    let engine = mbase64();
    let mut out = String::with_capacity(s.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if !pending.is_empty() {
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&engine.encode(bytes));
            out.push('-');
            pending.clear();
        }
    };
    for c in s.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            out.push(c);
            if c == '&' {
                out.push('-');
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Decode modified UTF-7; `None` if it is not valid (including the
/// non-canonical forms RFC 3501 forbids, such as encoded printable ASCII).
pub fn decode_mutf7(s: &str) -> Option<String> {
    let engine = mbase64();
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        let plain = &rest[..amp];
        if !plain.chars().all(|c| (' '..='~').contains(&c)) {
            return None;
        }
        out.push_str(plain);
        let after = &rest[amp + 1..];
        let end = after.find('-')?;
        let encoded = &after[..end];
        if encoded.is_empty() {
            out.push('&');
        } else {
            let bytes = engine.decode(encoded).ok()?;
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            let decoded = String::from_utf16(&units).ok()?;
            if decoded.chars().any(|c| (' '..='~').contains(&c)) {
                return None;
            }
            out.push_str(&decoded);
        }
        rest = &after[end + 1..];
    }
    if !rest.chars().all(|c| (' '..='~').contains(&c)) {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

/// Subscribed names (UTF-8) from the file's text: ours, one modified
/// UTF-7 name a line, or Dovecot 2.3's (a `V\t2` header line, then names
/// with TAB between hierarchy levels).
pub fn parse_subscriptions(text: &str) -> Vec<String> {
    let mut lines = text.lines().peekable();
    if lines.peek().is_some_and(|l| l.starts_with("V\t")) {
        lines.next();
    }
    lines
        .filter(|l| !l.is_empty())
        .map(|l| l.replace('\t', &DELIMITER.to_string()))
        .filter_map(|l| decode_mutf7(&l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_subscriptions_are_read() {
        let names = parse_subscriptions("V\t2\n\nWork\nWork\tSub\nEntw&APw-rfe\n");
        assert_eq!(names, ["Work", "Work.Sub", "Entwürfe"]);
        assert_eq!(
            parse_subscriptions("Sent\nWork.Sub\n"),
            ["Sent", "Work.Sub"]
        );
    }

    #[test]
    fn rfc3501_examples_round_trip() {
        // RFC 3501 5.1.3's example, and a few more.
        let cases = [
            ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
            ("Entwürfe", "Entw&APw-rfe"),
            ("A&B", "A&-B"),
            ("Plain", "Plain"),
            ("😀", "&2D3eAA-"),
        ];
        for (utf8, mutf7) in cases {
            assert_eq!(encode_mutf7(utf8), mutf7);
            assert_eq!(decode_mutf7(mutf7).as_deref(), Some(utf8));
        }
    }

    #[test]
    fn bad_mutf7_is_refused() {
        for bad in ["&Jjo", "&AGE-", "Entwürfe", "&U,BTF2XlZyyKng-x&=-", "&A-"] {
            assert_eq!(decode_mutf7(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_map_to_maildir_plus_plus() {
        let root = Path::new("/m/d/u");
        let n = MailboxName::from_client("Entw&APw-rfe.2024", false).unwrap();
        assert_eq!(n.as_str(), "Entwürfe.2024");
        assert_eq!(n.folder_dir(root), Path::new("/m/d/u/.Entw&APw-rfe.2024"));
        assert_eq!(n.to_client(true), "Entwürfe.2024");
        assert_eq!(n.parent().unwrap().as_str(), "Entwürfe");
        let inbox = MailboxName::from_client("inbox", false).unwrap();
        assert!(inbox.is_inbox());
        assert_eq!(inbox.folder_dir(root), root);
        assert_eq!(
            MailboxName::from_dir_name(".Entw&APw-rfe")
                .unwrap()
                .as_str(),
            "Entwürfe"
        );
        assert_eq!(MailboxName::from_dir_name("cur"), None);
        assert_eq!(MailboxName::from_dir_name(".."), None);
        assert_eq!(MailboxName::from_dir_name(".INBOX"), None);
    }

    #[test]
    fn escapes_are_refused() {
        let refused = [
            ("..", NameError::EmptyLevel),
            ("a..b", NameError::EmptyLevel),
            (".hidden", NameError::EmptyLevel),
            ("trailing.", NameError::EmptyLevel),
            ("a/b", NameError::ForbiddenCharacter),
            ("../../etc", NameError::ForbiddenCharacter),
            ("/etc/passwd", NameError::ForbiddenCharacter),
            ("~root", NameError::ForbiddenCharacter),
            ("a\\b", NameError::ForbiddenCharacter),
            ("tab\there", NameError::ForbiddenCharacter),
            ("", NameError::Empty),
        ];
        for (name, why) in refused {
            assert_eq!(
                MailboxName::from_client(name, true),
                Err(why.clone()),
                "{name:?}"
            );
        }
        assert_eq!(
            MailboxName::from_client(&"x".repeat(300), true),
            Err(NameError::TooLong)
        );
        assert_eq!(
            MailboxName::from_client("Entwürfe", false),
            Err(NameError::BadEncoding)
        );
    }
}
