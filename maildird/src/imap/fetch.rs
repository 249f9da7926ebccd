//! FETCH data items (RFC 9051 6.4.5, 7.5.2; RFC 3516 BINARY) for one
//! message.

use std::io::{self, Read};
use std::path::Path;

use common::flags::SystemFlag;
use imap_types::fetch::{MessageDataItemName, Part, Section};

use super::cache::FolderCache;
use super::folder::{Message, MessageFile};
use super::mime::{self, MessageView, SectionText};
use super::output::{CrlfEncoder, Output};
use super::wire;

/// Read a message file with CRLF line ends, as clients get it.
pub fn load_message(path: &Path) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut raw)?;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32);
    CrlfEncoder::default().encode(&raw, &mut out);
    Ok(out)
}

/// The header block of the message file at `path`: its lines up to and
/// including the blank one that ends the header (RFC 5322 2.1), or the
/// whole file if it has none.
pub fn load_header(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let mut header = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(header);
        }
        // The blank line may straddle two reads: its first LF can be up
        // to two octets back ("\n" "\r\n").
        let from = header.len().saturating_sub(2);
        header.extend_from_slice(&chunk[..n]);
        if let Some(end) = header_end(&header, from) {
            header.truncate(end);
            return Ok(header);
        }
    }
}

/// Where the header in `bytes` ends (after its blank line, LF or CRLF),
/// looking for the blank line from `from` on.
fn header_end(bytes: &[u8], from: usize) -> Option<usize> {
    if bytes.starts_with(b"\n") {
        return Some(1);
    }
    if bytes.starts_with(b"\r\n") {
        return Some(2);
    }
    memchr::memchr_iter(b'\n', &bytes[from..]).find_map(|i| match &bytes[from + i + 1..] {
        [b'\n', ..] => Some(from + i + 2),
        [b'\r', b'\n', ..] => Some(from + i + 3),
        _ => None,
    })
}

/// INTERNALDATE: the file's modification time (set by APPEND, else the
/// delivery time), as Dovecot keeps it.
pub fn internal_date(path: &Path) -> io::Result<i64> {
    let modified = std::fs::metadata(path)?.modified()?;
    Ok(match modified.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    })
}

/// Most octets of one message's FETCH response held in memory (many
/// sections or partial ranges of a large message could add up to far
/// more); past it the FETCH ends with `NO [LIMIT]`.
pub const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// Why a message's FETCH failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// RFC 3516 4.3: `NO [UNKNOWN-CTE]`.
    #[error("unknown Content-Transfer-Encoding")]
    UnknownCte,
    /// The response for one message passed [`MAX_RESPONSE`].
    #[error("response too large")]
    TooLarge,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Session settings FETCH output depends on.
#[derive(Debug, Clone, Copy)]
pub struct FetchMode {
    pub utf8: bool,
    /// IMAP4rev2 enabled: no \Recent (RFC 9051 removed it).
    pub rev2: bool,
}

/// Whether fetching `item` sets \Seen (RFC 9051 6.4.5: BODY[...] and
/// BINARY[...] without .PEEK, RFC822, RFC822.TEXT).
pub fn sets_seen(item: &MessageDataItemName) -> bool {
    match item {
        MessageDataItemName::BodyExt { peek, .. } | MessageDataItemName::Binary { peek, .. } => {
            !peek
        }
        MessageDataItemName::Rfc822 | MessageDataItemName::Rfc822Text => true,
        _ => false,
    }
}

/// Write the flags list of `m`.
pub fn write_flags(out: &mut Vec<u8>, m: &Message<'_>, mode: FetchMode) {
    out.push(b'(');
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, s: &str| {
        if !first {
            out.push(b' ');
        }
        first = false;
        out.extend_from_slice(s.as_bytes());
    };
    for f in &m.flags.system {
        put(out, f.imap_name());
    }
    for k in &m.flags.keywords {
        put(out, k);
    }
    if m.recent && !mode.rev2 {
        put(out, "\\Recent");
    }
    out.push(b')');
}

fn part_numbers(part: &Option<Part>) -> Vec<u32> {
    part.as_ref()
        .map(|p| p.0.as_ref().iter().map(|n| n.get()).collect())
        .unwrap_or_default()
}

fn dotted(numbers: &[u32]) -> String {
    numbers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// The section spec as echoed in the response, e.g. `1.HEADER.FIELDS (FROM)`.
fn section_name(section: &Option<Section>) -> String {
    let with_part = |p: &Option<Part>, what: &str| {
        let n = dotted(&part_numbers(p));
        match (n.is_empty(), what.is_empty()) {
            (true, _) => what.to_string(),
            (false, true) => n,
            (false, false) => format!("{n}.{what}"),
        }
    };
    let fields = |names: &[imap_types::core::AString]| {
        names
            .iter()
            .map(|n| {
                let mut b = Vec::new();
                wire::astring(&mut b, n.as_ref(), false);
                String::from_utf8_lossy(&b).into_owned()
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    match section {
        None => String::new(),
        Some(Section::Part(p)) => with_part(&Some(p.clone()), ""),
        Some(Section::Header(p)) => with_part(p, "HEADER"),
        Some(Section::HeaderFields(p, names)) => {
            with_part(p, &format!("HEADER.FIELDS ({})", fields(names.as_ref())))
        }
        Some(Section::HeaderFieldsNot(p, names)) => with_part(
            p,
            &format!("HEADER.FIELDS.NOT ({})", fields(names.as_ref())),
        ),
        Some(Section::Text(p)) => with_part(p, "TEXT"),
        Some(Section::Mime(p)) => with_part(&Some(p.clone()), "MIME"),
    }
}

/// Apply `<origin.length>` (RFC 9051 6.4.5) to section bytes.
fn partial(bytes: &[u8], range: Option<(u32, std::num::NonZeroU32)>) -> &[u8] {
    match range {
        None => bytes,
        Some((origin, len)) => {
            let start = (origin as usize).min(bytes.len());
            let end = start.saturating_add(len.get() as usize).min(bytes.len());
            &bytes[start..end]
        }
    }
}

/// A message being answered: its content loaded once, when needed.
struct Loaded<'a> {
    path: &'a Path,
    content: Option<Vec<u8>>,
}

impl Loaded<'_> {
    fn content(&mut self) -> io::Result<&[u8]> {
        if self.content.is_none() {
            self.content = Some(load_message(self.path)?);
        }
        Ok(self.content.as_deref().unwrap_or_default())
    }
}

/// Where the message lives.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub folder: &'a Path,
    pub cache: &'a FolderCache,
}

/// Write `* seq FETCH (...)` for message `m` of the folder at `folder`.
/// `uid` adds UID first when the items lack it (UID FETCH, RFC 9051
/// 6.4.9). Large whole-message bodies are streamed from the file.
pub fn write_fetch(
    out: &mut Output,
    seq: u32,
    m: &Message<'_>,
    target: Target,
    items: &[MessageDataItemName],
    uid: bool,
    mode: FetchMode,
) -> Result<(), FetchError> {
    let path = m.path(target.folder);
    let mut loaded = Loaded {
        path: &path,
        content: None,
    };
    let mut head = format!("* {seq} FETCH (").into_bytes();
    let mut sep = false;
    if uid && !items.contains(&MessageDataItemName::Uid) {
        head.extend_from_slice(format!("UID {}", m.uid).as_bytes());
        sep = true;
    }
    out.buf().extend_from_slice(&head);
    let start = out.buffered();
    for item in items {
        if sep {
            out.buf().push(b' ');
        }
        sep = true;
        write_item(out, m, target, &mut loaded, item, mode)?;
        if out.buffered().saturating_sub(start) > MAX_RESPONSE {
            return Err(FetchError::TooLarge);
        }
    }
    out.buf().extend_from_slice(b")\r\n");
    Ok(())
}

fn write_item(
    out: &mut Output,
    m: &Message<'_>,
    target: Target,
    loaded: &mut Loaded,
    item: &MessageDataItemName,
    mode: FetchMode,
) -> Result<(), FetchError> {
    let utf8 = mode.utf8;
    let folder = target.folder;
    match item {
        MessageDataItemName::Uid => out
            .buf()
            .extend_from_slice(format!("UID {}", m.uid).as_bytes()),
        MessageDataItemName::Flags => {
            out.buf().extend_from_slice(b"FLAGS ");
            write_flags(out.buf(), m, mode);
        }
        MessageDataItemName::InternalDate => {
            out.buf().extend_from_slice(b"INTERNALDATE ");
            wire::date_time(out.buf(), internal_date(loaded.path)?);
        }
        MessageDataItemName::Rfc822Size => {
            let size = m.size(folder)?;
            out.buf()
                .extend_from_slice(format!("RFC822.SIZE {size}").as_bytes());
        }
        MessageDataItemName::Envelope => {
            let envelope = match target.cache.envelope(folder, &m.base, utf8) {
                Some(e) => e,
                None => {
                    let mut b = Vec::new();
                    let content = loaded.content()?;
                    MessageView::parse(content).write_envelope(&mut b, utf8);
                    let e: std::sync::Arc<[u8]> = b.into();
                    target.cache.keep_envelope(folder, &m.base, utf8, e.clone());
                    // Clients find messages by Message-ID (mbsync, or
                    // Thunderbird after a MOVE): its values are kept
                    // with the envelope, whose field it is.
                    let cache = target.cache;
                    if cache.field_values(folder, &m.base, "message-id").is_none() {
                        // The header block searches read, not the parser's.
                        let header = &content[..header_end(content, 0).unwrap_or(content.len())];
                        let ids = mime::header_field_values(header, "message-id");
                        cache.keep_field_values(folder, &m.base, "message-id", ids.into());
                    }
                    e
                }
            };
            out.buf().extend_from_slice(b"ENVELOPE ");
            out.buf().extend_from_slice(&envelope);
        }
        MessageDataItemName::Body | MessageDataItemName::BodyStructure => {
            let extensible = matches!(item, MessageDataItemName::BodyStructure);
            let content = loaded.content()?;
            let mut b = if extensible {
                b"BODYSTRUCTURE ".to_vec()
            } else {
                b"BODY ".to_vec()
            };
            MessageView::parse(content).write_body_structure(&mut b, extensible, utf8);
            out.buf().extend_from_slice(&b);
        }
        MessageDataItemName::Rfc822 => whole(out, m, folder, loaded, "RFC822")?,
        MessageDataItemName::Rfc822Header => {
            let bytes = section_bytes(loaded, &Some(Section::Header(None)))?;
            out.buf().extend_from_slice(b"RFC822.HEADER ");
            wire::nstring(out.buf(), bytes.as_deref(), false);
        }
        MessageDataItemName::Rfc822Text => {
            let bytes = section_bytes(loaded, &Some(Section::Text(None)))?;
            out.buf().extend_from_slice(b"RFC822.TEXT ");
            wire::nstring(out.buf(), bytes.as_deref(), false);
        }
        MessageDataItemName::BodyExt {
            section,
            partial: range,
            ..
        } => {
            let name = format!("BODY[{}]", section_name(section));
            if section.is_none() && range.is_none() {
                return whole(out, m, folder, loaded, &name);
            }
            let bytes = section_bytes(loaded, section)?;
            let origin = range.map(|(o, _)| format!("<{o}>")).unwrap_or_default();
            out.buf()
                .extend_from_slice(format!("{name}{origin} ").as_bytes());
            match bytes {
                Some(b) => wire::literal(out.buf(), partial(&b, *range)),
                // RFC 9051 6.4.5: a missing part is sent as empty.
                None => wire::literal(out.buf(), b""),
            }
        }
        MessageDataItemName::Binary {
            section,
            partial: range,
            ..
        } => {
            let numbers: Vec<u32> = section.iter().map(|n| n.get()).collect();
            let decoded = binary(loaded, &numbers)?;
            let origin = range.map(|(o, _)| format!("<{o}>")).unwrap_or_default();
            out.buf()
                .extend_from_slice(format!("BINARY[{}]{origin} ", dotted(&numbers)).as_bytes());
            match decoded {
                Some(b) => {
                    let b = partial(&b, *range);
                    wire::literal_header(out.buf(), b.len() as u64, b.contains(&0));
                    out.buf().extend_from_slice(b);
                }
                None => out.buf().extend_from_slice(b"NIL"),
            }
        }
        MessageDataItemName::BinarySize { section } => {
            let numbers: Vec<u32> = section.iter().map(|n| n.get()).collect();
            let size = binary(loaded, &numbers)?.map_or(0, |b| b.len());
            out.buf()
                .extend_from_slice(format!("BINARY.SIZE[{}] {size}", dotted(&numbers)).as_bytes());
        }
    }
    Ok(())
}

/// The whole message as a literal, streamed from its file when its size
/// is known from the name.
fn whole(
    out: &mut Output,
    m: &Message<'_>,
    folder: &Path,
    loaded: &mut Loaded,
    name: &str,
) -> Result<(), FetchError> {
    if loaded.content.is_none() {
        if let Some(len) = m.known_size() {
            out.buf()
                .extend_from_slice(format!("{name} {{{len}}}\r\n").as_bytes());
            out.file(m.path(folder), len);
            return Ok(());
        }
    }
    let content = loaded.content()?;
    out.buf().extend_from_slice(format!("{name} ").as_bytes());
    wire::literal(out.buf(), content);
    Ok(())
}

fn section_bytes(loaded: &mut Loaded, section: &Option<Section>) -> io::Result<Option<Vec<u8>>> {
    let content = loaded.content()?;
    let view = MessageView::parse(content);
    let names = |names: &[imap_types::core::AString]| -> Vec<Vec<u8>> {
        names.iter().map(|n| n.as_ref().to_vec()).collect()
    };
    Ok(match section {
        None => Some(content.to_vec()),
        Some(Section::Part(p)) => view.section(&part_numbers(&Some(p.clone())), SectionText::Full),
        Some(Section::Header(p)) => view.section(&part_numbers(p), SectionText::Header),
        Some(Section::Text(p)) => view.section(&part_numbers(p), SectionText::Text),
        Some(Section::Mime(p)) => view.section(&part_numbers(&Some(p.clone())), SectionText::Mime),
        Some(Section::HeaderFields(p, n)) => {
            let owned = names(n.as_ref());
            let refs: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
            view.section(&part_numbers(p), SectionText::HeaderFields(&refs))
        }
        Some(Section::HeaderFieldsNot(p, n)) => {
            let owned = names(n.as_ref());
            let refs: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
            view.section(&part_numbers(p), SectionText::HeaderFieldsNot(&refs))
        }
    })
}

fn binary(loaded: &mut Loaded, part: &[u32]) -> Result<Option<Vec<u8>>, FetchError> {
    let content = loaded.content()?;
    match MessageView::parse(content).binary(part) {
        None => Ok(None),
        Some(Ok(b)) => Ok(Some(b)),
        Some(Err(_)) => Err(FetchError::UnknownCte),
    }
}

/// Whether `m` should get \Seen from fetching `items` in a read-write
/// session.
pub fn marks_seen(m: &MessageFile, items: &[MessageDataItemName]) -> bool {
    !m.has(SystemFlag::Seen) && items.iter().any(sets_seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(content: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, content).unwrap();
        load_header(&path).unwrap()
    }

    #[test]
    fn the_header_ends_at_the_blank_line_wherever_the_reads_split_it() {
        assert_eq!(header_of(b"A: 1\nB: 2\n\nbody\n\nmore"), b"A: 1\nB: 2\n\n");
        assert_eq!(header_of(b"A: 1\r\n\r\nbody"), b"A: 1\r\n\r\n");
        assert_eq!(header_of(b"\nbody"), b"\n");
        assert_eq!(header_of(b"A: 1\nno blank line"), b"A: 1\nno blank line");
        // Blank lines straddling the 4096-octet reads, LF and CRLF.
        for filler in [4092, 4093, 4094, 4095, 4096] {
            for blank in [&b"\n\n"[..], b"\n\r\n"] {
                let mut m = b"X: ".to_vec();
                m.resize(filler, b'x');
                m.extend_from_slice(blank);
                let header_len = m.len();
                m.extend_from_slice(b"the body\n\nstill the body\n");
                assert_eq!(header_of(&m), m[..header_len], "{filler} {blank:?}");
            }
        }
    }
}
