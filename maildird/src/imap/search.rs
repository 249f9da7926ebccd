//! SEARCH criteria (RFC 9051 6.4.4) evaluated against one message.

use std::io;
use std::path::Path;

use chrono::NaiveDate;
use common::flags::SystemFlag;
use imap_types::search::SearchKey;

use super::cache::FolderCache;
use super::fetch::{internal_date, load_header, load_message};
use super::folder::Message;
use super::mime::{self, MessageView};
use super::sequence::NumberSet;

/// Deepest nesting of NOT/OR/() evaluated; imap-codec already refuses
/// deeper input, this keeps the evaluator bounded on its own.
const MAX_DEPTH: usize = 64;

/// One message under test, its content read only if a key needs it.
pub struct Candidate<'a> {
    pub seq: u32,
    pub message: Message<'a>,
    pub folder: &'a Path,
    /// Where searched header fields' values are kept.
    pub cache: &'a FolderCache,
    /// Highest sequence number and UID in the mailbox, for `*`.
    pub largest_seq: u32,
    pub largest_uid: u32,
    content: Option<Vec<u8>>,
    /// The header block alone, when only header keys needed the file.
    header: Option<Vec<u8>>,
}

impl<'a> Candidate<'a> {
    pub fn new(
        seq: u32,
        message: Message<'a>,
        (folder, cache): (&'a Path, &'a FolderCache),
        largest_seq: u32,
        largest_uid: u32,
    ) -> Candidate<'a> {
        Candidate {
            seq,
            message,
            folder,
            cache,
            largest_seq,
            largest_uid,
            content: None,
            header: None,
        }
    }

    fn content(&mut self) -> io::Result<&[u8]> {
        if self.content.is_none() {
            self.content = Some(load_message(&self.message.path(self.folder))?);
        }
        Ok(self.content.as_deref().unwrap_or_default())
    }

    /// The header block: from the whole message if it was read, else the
    /// file's first lines only.
    fn header_block(&mut self) -> io::Result<&[u8]> {
        if let Some(content) = &self.content {
            return Ok(content);
        }
        if self.header.is_none() {
            self.header = Some(load_header(&self.message.path(self.folder))?);
        }
        Ok(self.header.as_deref().unwrap_or_default())
    }

    fn with_view<T>(&mut self, f: impl FnOnce(&MessageView) -> T) -> io::Result<T> {
        let content = self.content()?;
        Ok(f(&MessageView::parse(content)))
    }

    fn internal_day(&self) -> io::Result<NaiveDate> {
        let secs = internal_date(&self.message.path(self.folder))?;
        Ok(chrono::DateTime::from_timestamp(secs, 0)
            .unwrap_or_default()
            .date_naive())
    }
}

/// Whether the message matches every key of `keys` (their AND).
pub fn matches_all(keys: &[SearchKey], c: &mut Candidate) -> io::Result<bool> {
    for k in keys {
        if !matches(k, c, 0)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn text(s: &impl AsRef<[u8]>) -> String {
    String::from_utf8_lossy(s.as_ref()).into_owned()
}

fn matches(key: &SearchKey, c: &mut Candidate, depth: usize) -> io::Result<bool> {
    if depth > MAX_DEPTH {
        return Ok(false);
    }
    let flag = |c: &Candidate, f: SystemFlag| c.message.has(f);
    Ok(match key {
        SearchKey::And(keys) => {
            for k in keys.as_ref() {
                if !matches(k, c, depth + 1)? {
                    return Ok(false);
                }
            }
            true
        }
        SearchKey::SequenceSet(set) => NumberSet::resolve(set, c.largest_seq).contains(c.seq),
        SearchKey::Uid(set) => NumberSet::resolve(set, c.largest_uid).contains(c.message.uid),
        SearchKey::All => true,
        SearchKey::Answered => flag(c, SystemFlag::Answered),
        SearchKey::Deleted => flag(c, SystemFlag::Deleted),
        SearchKey::Draft => flag(c, SystemFlag::Draft),
        SearchKey::Flagged => flag(c, SystemFlag::Flagged),
        SearchKey::Seen => flag(c, SystemFlag::Seen),
        SearchKey::Unanswered => !flag(c, SystemFlag::Answered),
        SearchKey::Undeleted => !flag(c, SystemFlag::Deleted),
        SearchKey::Undraft => !flag(c, SystemFlag::Draft),
        SearchKey::Unflagged => !flag(c, SystemFlag::Flagged),
        SearchKey::Unseen => !flag(c, SystemFlag::Seen),
        SearchKey::Recent => c.message.recent,
        SearchKey::New => c.message.recent && !flag(c, SystemFlag::Seen),
        SearchKey::Old => !c.message.recent,
        SearchKey::Keyword(k) => has_keyword(c, k.as_ref()),
        SearchKey::Unkeyword(k) => !has_keyword(c, k.as_ref()),
        SearchKey::Larger(n) => c.message.size(c.folder)? > u64::from(*n),
        SearchKey::Smaller(n) => c.message.size(c.folder)? < u64::from(*n),
        SearchKey::Before(d) => c.internal_day()? < *d.as_ref(),
        SearchKey::On(d) => c.internal_day()? == *d.as_ref(),
        SearchKey::Since(d) => c.internal_day()? >= *d.as_ref(),
        SearchKey::SentBefore(d) => c
            .with_view(|v| v.sent_date())?
            .is_some_and(|s| s < *d.as_ref()),
        SearchKey::SentOn(d) => c
            .with_view(|v| v.sent_date())?
            .is_some_and(|s| s == *d.as_ref()),
        SearchKey::SentSince(d) => c
            .with_view(|v| v.sent_date())?
            .is_some_and(|s| s >= *d.as_ref()),
        SearchKey::Bcc(s) => header(c, "Bcc", &text(s))?,
        SearchKey::Cc(s) => header(c, "Cc", &text(s))?,
        SearchKey::From(s) => header(c, "From", &text(s))?,
        SearchKey::To(s) => header(c, "To", &text(s))?,
        SearchKey::Subject(s) => header(c, "Subject", &text(s))?,
        SearchKey::Header(name, value) => header(c, &text(name), &text(value))?,
        SearchKey::Body(s) => {
            let needle = text(s);
            c.with_view(|v| v.body_contains(&needle))?
        }
        SearchKey::Text(s) => {
            let needle = text(s);
            c.with_view(|v| v.text_contains(&needle))?
        }
        SearchKey::Not(k) => !matches(k, c, depth + 1)?,
        SearchKey::Or(a, b) => matches(a, c, depth + 1)? || matches(b, c, depth + 1)?,
    })
}

fn has_keyword(c: &Candidate, keyword: &str) -> bool {
    c.message
        .flags
        .keywords
        .iter()
        .any(|k| k.eq_ignore_ascii_case(keyword))
}

/// Longest values of a field kept in the folder cache.
const MAX_CACHED_VALUES: usize = 1024;

/// HEADER and the like: the field's values come from the folder cache
/// when known, else from the message (and are then kept), so a folder is
/// read once for each field searched.
fn header(c: &mut Candidate, name: &str, needle: &str) -> io::Result<bool> {
    let name = name.to_ascii_lowercase();
    // RFC 5322 3.6.8: a field name is printable ASCII but ':'. Others
    // would not fit a cache record.
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Ok(mime::header_contains(c.header_block()?, &name, needle));
    }
    let needle = needle.to_lowercase();
    if let Some(values) = c.cache.field_values(c.folder, &c.message.base, &name) {
        return Ok(mime::values_contain(&values, &needle));
    }
    let values = mime::header_field_values(c.header_block()?, &name);
    let found = mime::values_contain(&values, &needle);
    if values.len() <= MAX_CACHED_VALUES {
        let base = &c.message.base;
        c.cache
            .keep_field_values(c.folder, base, &name, values.into());
    }
    Ok(found)
}
