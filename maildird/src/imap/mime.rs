//! Message structure for FETCH and SEARCH: ENVELOPE, BODYSTRUCTURE,
//! body sections and decoded text (RFC 9051 6.4.4, 6.4.5, 7.5.2).
//!
//! `mail_parser` finds the MIME tree and where each part's header and body
//! lie; what clients get is cut from the raw bytes at those offsets, never
//! re-serialized, so BODYSTRUCTURE sizes match BODY[...]. Header fields
//! are sent raw (encoded words undecoded), as Dovecot does; types and
//! parameters as `mail_parser` parsed them (lowercase, RFC 2231 values
//! joined and decoded). Multiparts and enclosed messages are followed
//! [`MAX_DEPTH`] levels deep; deeper parts are opaque.

use std::borrow::Cow;

use chrono::NaiveDate;
use mail_parser::parsers::MessageStream;
use mail_parser::{
    ContentType, Encoding, HeaderName, HeaderValue, Message, MessageParser, MessagePart, PartType,
};

use super::wire::{nstring, string};

/// Levels of multiparts and enclosed messages walked.
const MAX_DEPTH: usize = 32;

/// A message as served to clients (CRLF line ends) and its MIME structure.
pub struct MessageView<'a> {
    raw: &'a [u8],
    msg: Message<'a>,
}

/// What BODY[section] selects (RFC 9051 6.4.5).
pub enum SectionText<'a> {
    /// `BODY[]`, the whole message, or `BODY[1.2]`, the part's body.
    Full,
    /// `HEADER` of the message, or of the one a message/rfc822 part encloses.
    Header,
    /// `HEADER.FIELDS (...)`: the named fields and the blank line.
    HeaderFields(&'a [&'a [u8]]),
    /// `HEADER.FIELDS.NOT (...)`: the other fields and the blank line.
    HeaderFieldsNot(&'a [&'a [u8]]),
    /// `TEXT`: the body of the message or of the enclosed message.
    Text,
    /// `MIME`: the part's own MIME header.
    Mime,
}

/// BINARY of a part whose Content-Transfer-Encoding is unknown (RFC 3516
/// 4.3: the server answers NO [UNKNOWN-CTE]).
#[derive(Debug, thiserror::Error)]
#[error("unknown Content-Transfer-Encoding")]
pub struct UnknownEncoding;

/// Stands in for the root part, which `MessageView::parse` always leaves.
static NO_PART: MessagePart<'static> = MessagePart {
    headers: Vec::new(),
    is_encoding_problem: false,
    body: PartType::Multipart(Vec::new()),
    encoding: Encoding::None,
    offset_header: 0,
    offset_body: 0,
    offset_end: 0,
};

impl<'a> MessageView<'a> {
    /// Parse `raw`; what `mail_parser` cannot parse is a text/plain body
    /// with an empty header.
    pub fn parse(raw: &'a [u8]) -> MessageView<'a> {
        let msg = MessageParser::new()
            .parse(raw)
            .filter(|m| !m.parts.is_empty())
            .unwrap_or_else(|| Message {
                parts: vec![MessagePart {
                    body: PartType::Text(String::from_utf8_lossy(raw)),
                    offset_end: u32::try_from(raw.len()).unwrap_or(u32::MAX),
                    ..MessagePart::default()
                }],
                raw_message: Cow::Borrowed(raw),
                ..Message::default()
            });
        MessageView { raw, msg }
    }

    fn root(&self) -> Node<'_> {
        let part = self.msg.parts.first().unwrap_or(&NO_PART);
        Node {
            raw: self.raw,
            msg: &self.msg,
            part,
            id: 0,
            depth: 0,
        }
    }

    /// ENVELOPE (RFC 9051 7.5.2): `("date" "subject" (from) (sender)
    /// (reply-to) (to) (cc) (bcc) "in-reply-to" "message-id")`.
    pub fn write_envelope(&self, out: &mut Vec<u8>, utf8: bool) {
        envelope(out, self.root().header(), utf8);
    }

    /// BODY (`extensible` false) or BODYSTRUCTURE (true), RFC 9051 7.5.2.
    pub fn write_body_structure(&self, out: &mut Vec<u8>, extensible: bool, utf8: bool) {
        body_structure(out, self.root(), extensible, utf8);
    }

    /// The bytes of BODY[part.what] (RFC 9051 6.4.5), `part` empty for the
    /// whole message; None when the part does not exist, HEADER or TEXT
    /// name a part that is no message/rfc822, or MIME names no part.
    pub fn section(&self, part: &[u32], what: SectionText<'_>) -> Option<Vec<u8>> {
        let node = if part.is_empty() {
            None
        } else {
            Some(self.resolve(part)?)
        };
        let message = match node.map(|n| n.kind()) {
            None => Some(self.root()),
            Some(Kind::Message(inner)) => Some(inner),
            Some(_) => None,
        };
        Some(match what {
            SectionText::Full => node.map_or(self.raw, |n| n.body()).to_vec(),
            SectionText::Header => message?.header().to_vec(),
            SectionText::HeaderFields(names) => select_fields(message?.header(), names, true),
            SectionText::HeaderFieldsNot(names) => select_fields(message?.header(), names, false),
            SectionText::Text => message?.body().to_vec(),
            SectionText::Mime => node?.header().to_vec(),
        })
    }

    /// BINARY[part] (RFC 3516 4.2): the body with its transfer encoding
    /// undone, `part` empty for the whole message as is; None when the
    /// part does not exist.
    pub fn binary(&self, part: &[u32]) -> Option<Result<Vec<u8>, UnknownEncoding>> {
        if part.is_empty() {
            return Some(Ok(self.raw.to_vec()));
        }
        let node = self.resolve(part)?;
        Some(decode_body(node.body(), node.header()))
    }

    /// SEARCH HEADER (RFC 9051 6.4.4): a `name` field's value, unfolded and
    /// RFC 2047 decoded, contains `needle` (case-insensitive); an empty
    /// needle matches when the field exists.
    pub fn header_contains(&self, name: &str, needle: &str) -> bool {
        header_contains(self.root().header(), name, needle)
    }

    /// SEARCH BODY (RFC 9051 6.4.4): a text/* part, transfer encoding and
    /// charset undone, contains `needle` (case-insensitive).
    pub fn body_contains(&self, needle: &str) -> bool {
        let needle = needle.to_lowercase();
        needle.is_empty() || any_text(self.root(), &needle)
    }

    /// SEARCH TEXT (RFC 9051 6.4.4): a header field (name and decoded
    /// value) or the body contains `needle`.
    pub fn text_contains(&self, needle: &str) -> bool {
        let lower = needle.to_lowercase();
        fields(self.root().header()).any(|(name, field)| {
            let line = format!(
                "{}: {}",
                String::from_utf8_lossy(name),
                decoded_value(field)
            );
            line.to_lowercase().contains(&lower)
        }) || self.body_contains(needle)
    }

    /// The day of the Date: field in its own time zone, for SENTON and
    /// the like (RFC 9051 6.4.4); None when absent or unparsable.
    pub fn sent_date(&self) -> Option<NaiveDate> {
        let headers = &self.root().part.headers;
        let date = headers
            .iter()
            .find(|h| h.name == HeaderName::Date)?
            .value
            .as_datetime()?;
        let (month, day) = (u32::from(date.month), u32::from(date.day));
        NaiveDate::from_ymd_opt(i32::from(date.year), month, day)
    }

    /// The part numbered `path` (RFC 9051 6.4.5): numbers pick subparts of
    /// multiparts, 1 is the body of a message that is no multipart, and
    /// after a message/rfc822 part they count in the enclosed message.
    fn resolve(&self, path: &[u32]) -> Option<Node<'_>> {
        let mut found: Option<Node<'_>> = None;
        for &number in path {
            let base = match found.map(|n| (n, n.kind())) {
                None => self.root(),
                Some((_, Kind::Message(inner))) => inner,
                Some((node, Kind::Multipart(_))) => node,
                Some((_, Kind::Leaf)) => return None,
            };
            found = Some(match base.kind() {
                Kind::Multipart(children) => {
                    *children.get(usize::try_from(number).ok()?.checked_sub(1)?)?
                }
                _ if number == 1 => base,
                _ => return None,
            });
        }
        found
    }
}

impl Drop for MessageView<'_> {
    /// `mail_parser` nests enclosed messages without limit and drops them
    /// recursively, which thousands of nested message/rfc822 parts would
    /// overflow the stack with: take them apart one at a time.
    fn drop(&mut self) {
        let mut stack = vec![std::mem::take(&mut self.msg)];
        while let Some(mut msg) = stack.pop() {
            for part in &mut msg.parts {
                if let PartType::Message(inner) = &mut part.body {
                    stack.push(std::mem::take(inner));
                }
            }
        }
    }
}

/// One MIME part and the message whose part list holds it.
#[derive(Clone, Copy)]
struct Node<'m> {
    raw: &'m [u8],
    msg: &'m Message<'m>,
    part: &'m MessagePart<'m>,
    id: usize,
    depth: usize,
}

/// How a part is shown to IMAP.
enum Kind<'m> {
    Multipart(Vec<Node<'m>>),
    /// message/rfc822 or message/global: the enclosed message's root part.
    Message(Node<'m>),
    /// Anything else, and whatever lies too deep.
    Leaf,
}

impl<'m> Node<'m> {
    /// `raw[start..end]`, clamped to the message.
    fn bytes(&self, start: u32, end: u32) -> &'m [u8] {
        let end = (end as usize).min(self.raw.len());
        self.raw
            .get((start as usize).min(end)..end)
            .unwrap_or_default()
    }

    /// The part's header, blank line included.
    fn header(&self) -> &'m [u8] {
        self.bytes(self.part.offset_header, self.part.offset_body)
    }

    /// The part's body; in a multipart it ends before the CRLF preceding
    /// the boundary (RFC 2046 5.1.1).
    fn body(&self) -> &'m [u8] {
        self.bytes(self.part.offset_body, self.part.offset_end)
    }

    /// Part `id` of `msg`, a level below this part.
    fn below(&self, msg: &'m Message<'m>, id: usize) -> Option<Node<'m>> {
        let (part, depth) = (msg.parts.get(id)?, self.depth + 1);
        (depth <= MAX_DEPTH).then_some(Node {
            raw: self.raw,
            msg,
            part,
            id,
            depth,
        })
    }

    /// Parts nested deeper than `MAX_DEPTH` are leaves.
    fn kind(&self) -> Kind<'m> {
        match &self.part.body {
            PartType::Multipart(ids) => {
                // Subparts follow their multipart in the part list; others
                // would make a cycle.
                let ids = ids.iter().map(|&id| id as usize).filter(|&id| id > self.id);
                let children: Vec<_> = ids.filter_map(|id| self.below(self.msg, id)).collect();
                if children.is_empty() {
                    Kind::Leaf
                } else {
                    Kind::Multipart(children)
                }
            }
            // An encoded message/rfc822 (which RFC 2046 5.2.1 forbids) is
            // parsed from decoded bytes, not at offsets into `raw`: opaque.
            PartType::Message(msg) if self.part.encoding == Encoding::None => {
                self.below(msg, 0).map_or(Kind::Leaf, Kind::Message)
            }
            _ => Kind::Leaf,
        }
    }

    /// The last `name` field as `mail_parser` parsed it (and goes by).
    fn parsed(&self, name: HeaderName<'_>) -> Option<&'m ContentType<'m>> {
        let header = self.part.headers.iter().rev().find(|h| h.name == name);
        header.and_then(|h| h.value.as_content_type())
    }

    /// Type and subtype shown for the part, and the Content-Type whose
    /// parameters go with them.
    fn media(&self, kind: &Kind<'_>) -> (&'m str, &'m str, Option<&'m ContentType<'m>>) {
        let ct = self.parsed(HeaderName::ContentType);
        let declared = ct.and_then(|c| Some((c.ctype(), c.subtype()?)));
        let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match (kind, declared) {
            (Kind::Multipart(_), _) => ("multipart", declared.map_or("mixed", |d| d.1), ct),
            (Kind::Message(_), Some((ty, sub))) => (ty, sub, ct),
            // RFC 2046 5.1.5: the default in a multipart/digest.
            (Kind::Message(_), None) => ("message", "rfc822", None),
            // A multipart without boundary, an encoded or unparsable
            // message: opaque data, so that no client looks for subparts.
            (Kind::Leaf, Some((ty, sub)))
                if is(ty, "multipart")
                    || is(ty, "message") && (is(sub, "rfc822") || is(sub, "global")) =>
            {
                ("application", "octet-stream", ct)
            }
            (Kind::Leaf, Some((ty, sub))) => (ty, sub, ct),
            // RFC 2045 5.2: no or an invalid Content-Type.
            (Kind::Leaf, None) => ("text", "plain", None),
        }
    }
}

/// `body` (RFC 9051 9) of `node`, with extension data when `ext`.
fn body_structure(out: &mut Vec<u8>, node: Node<'_>, ext: bool, utf8: bool) {
    let kind = node.kind();
    let (ty, subtype, ct) = node.media(&kind);
    let header = node.header();
    out.push(b'(');
    if let Kind::Multipart(children) = &kind {
        // body-type-mpart: the subparts unseparated, the subtype, then
        // body-ext-mpart: params, disposition, language, location.
        for &child in children {
            body_structure(out, child, ext, utf8);
        }
        out.push(b' ');
        string(out, subtype.as_bytes(), utf8);
        if ext {
            out.push(b' ');
            write_params(out, ct, false, utf8);
            write_ext_tail(out, node, utf8);
        }
    } else {
        // body-type-1part: type, subtype, params, id, description,
        // encoding, size; lines for text, envelope body lines for
        // message/rfc822; body-ext-1part: md5, disposition, language,
        // location.
        let text = ty.eq_ignore_ascii_case("text");
        let body = node.body();
        string(out, ty.as_bytes(), utf8);
        out.push(b' ');
        string(out, subtype.as_bytes(), utf8);
        out.push(b' ');
        write_params(out, ct, text, utf8);
        for name in ["Content-ID", "Content-Description"] {
            sp_nstring(out, last_value(header, name).as_deref(), utf8);
        }
        let encoding = transfer_encoding(header).unwrap_or_else(|| b"7bit".to_vec());
        sp_nstring(out, Some(&encoding), utf8);
        out.extend_from_slice(format!(" {}", body.len()).as_bytes());
        if let Kind::Message(inner) = kind {
            out.push(b' ');
            envelope(out, inner.header(), utf8);
            out.push(b' ');
            body_structure(out, inner, ext, utf8);
        }
        if text || matches!(kind, Kind::Message(_)) {
            out.extend_from_slice(format!(" {}", lines(body)).as_bytes());
        }
        if ext {
            sp_nstring(out, last_value(header, "Content-MD5").as_deref(), utf8);
            write_ext_tail(out, node, utf8);
        }
    }
    out.push(b')');
}

/// ` body-fld-dsp SP body-fld-lang SP body-fld-loc` (RFC 9051 9), such as
/// ` ("attachment" ("filename" "x.pdf")) ("en" "de") NIL`.
fn write_ext_tail(out: &mut Vec<u8>, node: Node<'_>, utf8: bool) {
    out.push(b' ');
    let disposition = node.parsed(HeaderName::ContentDisposition);
    write_list(out, disposition, b"", |out, disposition| {
        string(out, disposition.ctype().as_bytes(), utf8);
        out.push(b' ');
        write_params(out, Some(disposition), false, utf8);
    });
    out.push(b' ');
    let header = node.header();
    let languages = last_value(header, "Content-Language").unwrap_or_default();
    let languages = languages.split(|&b| b == b',').map(<[u8]>::trim_ascii);
    write_list(out, languages.filter(|l| !l.is_empty()), b" ", |out, l| {
        string(out, l, utf8)
    });
    sp_nstring(out, last_value(header, "Content-Location").as_deref(), utf8);
}

/// body-fld-param (RFC 9051 9): `("name" "value" ...)` or NIL, names in
/// lower case as Dovecot sends them. Text that names no charset gets the
/// default one (RFC 2046 4.1.2), as in Dovecot.
fn write_params(out: &mut Vec<u8>, ct: Option<&ContentType<'_>>, text: bool, utf8: bool) {
    let attributes = ct.and_then(|c| c.attributes()).unwrap_or_default();
    let named = attributes
        .iter()
        .any(|a| a.name.eq_ignore_ascii_case("charset"));
    let pairs = attributes
        .iter()
        .map(|a| (a.name.to_ascii_lowercase(), &a.value[..]));
    let default = (text && !named).then(|| ("charset".to_string(), "us-ascii"));
    write_list(out, pairs.chain(default), b" ", |out, (name, value)| {
        string(out, name.as_bytes(), utf8);
        out.push(b' ');
        string(out, value.as_bytes(), utf8);
    });
}

/// `(item item ...)`, each item written by `write`, or NIL for none.
fn write_list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    separator: &[u8],
    mut write: impl FnMut(&mut Vec<u8>, T),
) {
    let mut first = true;
    for item in items {
        out.extend_from_slice(if first { b"(" } else { separator });
        first = false;
        write(out, item);
    }
    out.extend_from_slice(if first { b"NIL" } else { b")" });
}

/// A space and an nstring.
fn sp_nstring(out: &mut Vec<u8>, value: Option<&[u8]>, utf8: bool) {
    out.push(b' ');
    nstring(out, value, utf8);
}

/// body-fld-lines: the lines of `body`, a last one without line end too.
fn lines(body: &[u8]) -> usize {
    let unended = !body.is_empty() && !body.ends_with(b"\n");
    body.iter().filter(|&&b| b == b'\n').count() + usize::from(unended)
}

/// The Content-Transfer-Encoding mechanism (RFC 2045 6.1) without
/// comments; None when absent or empty.
fn transfer_encoding(header: &[u8]) -> Option<Vec<u8>> {
    let value = last_value(header, "Content-Transfer-Encoding")?;
    let mut tokens = value.split(|&b| b.is_ascii_whitespace() || b == b'(' || b == b';');
    tokens.next().filter(|t| !t.is_empty()).map(<[u8]>::to_vec)
}

/// `body` with the transfer encoding its `header` names undone (RFC 2045 6).
fn decode_body(body: &[u8], header: &[u8]) -> Result<Vec<u8>, UnknownEncoding> {
    let encoding = transfer_encoding(header).unwrap_or_default();
    let is = |name: &str| encoding.eq_ignore_ascii_case(name.as_bytes());
    if encoding.is_empty() || is("7bit") || is("8bit") || is("binary") {
        Ok(body.to_vec())
    } else if is("base64") {
        Ok(base64(body))
    } else if is("quoted-printable") {
        Ok(quoted_printable(body))
    } else {
        Err(UnknownEncoding)
    }
}

/// Base64 (RFC 2045 6.8), leniently: bytes outside the alphabet are
/// skipped, the first `=` ends the data.
fn base64(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        let value = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Quoted-printable (RFC 2045 6.7), leniently: an `=` starting neither an
/// escape nor a soft line break stays; trailing white space goes (rule 3).
fn quoted_printable(data: &[u8]) -> Vec<u8> {
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        let text = line
            .strip_suffix(b"\n")
            .map_or(line, |l| l.strip_suffix(b"\r").unwrap_or(l));
        let line_end = line.get(text.len()..).unwrap_or_default();
        let content = text.trim_ascii_end();
        let (content, soft_break) = match content.strip_suffix(b"=") {
            Some(content) => (content, true),
            None => (content, false),
        };
        let mut i = 0;
        while let Some(&b) = content.get(i) {
            match (b, hex(content.get(i + 1)), hex(content.get(i + 2))) {
                (b'=', Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        if !soft_break {
            out.extend_from_slice(line_end);
        }
    }
    out
}

/// SEARCH BODY in the text/* leaves under `node`; `needle` is lowercase.
fn any_text(node: Node<'_>, needle: &str) -> bool {
    let kind = node.kind();
    let text = node.media(&kind).0.eq_ignore_ascii_case("text");
    match kind {
        Kind::Multipart(children) => children.into_iter().any(|c| any_text(c, needle)),
        Kind::Message(inner) => any_text(inner, needle),
        Kind::Leaf => matches!(&node.part.body,
            PartType::Text(t) | PartType::Html(t) if text && t.to_lowercase().contains(needle)),
    }
}

/// SEARCH HEADER on a header block alone (the message's first lines up
/// to the blank one), so a header search need not read or parse bodies.
pub fn header_contains(header: &[u8], name: &str, needle: &str) -> bool {
    values_contain(&header_field_values(header, name), &needle.to_lowercase())
}

/// The text of every `name` field of `header`, decoded and lowercased,
/// each followed by a NUL (no IMAP string holds one): what a HEADER
/// search looks in, in the form [`values_contain`] reads and the folder
/// cache keeps.
pub fn header_field_values(header: &[u8], name: &str) -> Vec<u8> {
    let mut values = Vec::new();
    for (_, field) in fields(header).filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())) {
        values.extend_from_slice(decoded_value(field).to_lowercase().as_bytes());
        values.push(0);
    }
    values
}

/// Whether one of `values` (see [`header_field_values`]) contains
/// `needle`, already lowercase; an empty needle matches any field there
/// is (RFC 9051 6.4.4).
pub fn values_contain(values: &[u8], needle: &str) -> bool {
    let Some(values) = values.strip_suffix(b"\0") else {
        return false;
    };
    values
        .split(|&b| b == 0)
        .any(|v| memchr::memmem::find(v, needle.as_bytes()).is_some())
}

/// The fields of a header (RFC 5322 2.2): each one's name and whole text,
/// continuation lines and line end included. Lines without a colon are
/// skipped; a blank line ends the header.
fn fields(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = header;
    std::iter::from_fn(move || loop {
        if rest.is_empty() || rest.starts_with(b"\n") || rest.starts_with(b"\r\n") {
            return None;
        }
        // RFC 5322 2.2.3: a field goes on over lines starting with WSP.
        let mut end = 0;
        loop {
            match rest
                .get(end..)
                .and_then(|r| r.iter().position(|&b| b == b'\n'))
            {
                Some(newline) => end += newline + 1,
                None => end = rest.len(),
            }
            if !matches!(rest.get(end), Some(b' ' | b'\t')) {
                break;
            }
        }
        let (field, tail) = rest.split_at(end.min(rest.len()));
        rest = tail;
        let colon = field.iter().position(|&b| b == b':');
        let name = colon
            .and_then(|colon| field.get(..colon))
            .map(<[u8]>::trim_ascii);
        if let Some(name) = name.filter(|name| !name.is_empty()) {
            return Some((name, field));
        }
    })
}

/// A field's value unfolded (RFC 5322 2.2.3) and trimmed.
fn field_value(field: &[u8]) -> Vec<u8> {
    let colon = field
        .iter()
        .position(|&b| b == b':')
        .map_or(field.len(), |c| c + 1);
    let value = field.get(colon..).unwrap_or_default();
    let unfolded: Vec<u8> = value
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    unfolded.trim_ascii().to_vec()
}

/// The value of the first field called `name`.
fn first_value(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut named = fields(header).filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()));
    named.next().map(|(_, field)| field_value(field))
}

/// The value of the last field called `name`, the one `mail_parser` goes by.
fn last_value(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let named = fields(header).filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()));
    named.last().map(|(_, field)| field_value(field))
}

/// A field's value unfolded, its encoded words decoded (RFC 2047).
fn decoded_value(field: &[u8]) -> String {
    let mut value = field_value(field);
    value.push(b'\n'); // mail_parser reads a value up to its line end.
    match MessageStream::new(&value).parse_unstructured() {
        HeaderValue::Text(text) => text.into_owned(),
        _ => String::new(),
    }
}

/// HEADER.FIELDS (`keep`) or HEADER.FIELDS.NOT (RFC 9051 6.4.5): the
/// whole fields whose name is (not) among `names`, then the blank line.
fn select_fields(header: &[u8], names: &[&[u8]], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, field) in fields(header) {
        if names.iter().any(|n| n.eq_ignore_ascii_case(name)) == keep {
            out.extend_from_slice(field);
            if !field.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// ENVELOPE (RFC 9051 7.5.2) for a message header: values raw and
/// unfolded, NIL when absent; sender and reply-to absent or empty are
/// from's.
fn envelope(out: &mut Vec<u8>, header: &[u8], utf8: bool) {
    let value = |name| first_value(header, name);
    let list = |name| value(name).map(|v| addresses(&v)).unwrap_or_default();
    let or_from = |name| {
        Some(list(name))
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| list("From"))
    };
    out.push(b'(');
    nstring(out, value("Date").as_deref(), utf8);
    sp_nstring(out, value("Subject").as_deref(), utf8);
    let (from, sender, reply_to) = (list("From"), or_from("Sender"), or_from("Reply-To"));
    for list in [from, sender, reply_to, list("To"), list("Cc"), list("Bcc")] {
        out.push(b' ');
        // An address is (name adl mailbox host).
        write_list(out, list, b"", |out, address| {
            write_list(out, address, b" ", |out, item| {
                nstring(out, item.as_deref(), utf8)
            });
        });
    }
    sp_nstring(out, value("In-Reply-To").as_deref(), utf8);
    sp_nstring(out, value("Message-ID").as_deref(), utf8);
    out.push(b')');
}

/// An ENVELOPE address: name, adl, mailbox, host. A group start has only
/// the group name as mailbox, a group end nothing (RFC 9051 7.5.2).
type Address = [Option<Vec<u8>>; 4];

/// A token of an address list (RFC 5322 3.2).
enum Token {
    /// An atom, or a quoted string with its escapes undone.
    Word(Vec<u8>),
    Comment(Vec<u8>),
    /// One of `<>@,:;`.
    Special(u8),
}

fn tokenize(value: &[u8]) -> Vec<Token> {
    let special = |c: &u8| matches!(c, b'<' | b'>' | b'@' | b',' | b':' | b';');
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        i += 1;
        match b {
            _ if b.is_ascii_whitespace() => {}
            _ if special(&b) => tokens.push(Token::Special(b)),
            // RFC 5322 3.2.4 quoted-string, 3.2.2 comment (which nests).
            b'"' | b'(' => {
                let (mut text, mut depth) = (Vec::new(), 1);
                while let Some(&c) = value.get(i) {
                    i += 1;
                    match c {
                        b'\\' => {
                            text.extend(value.get(i));
                            i += 1;
                            continue;
                        }
                        b'(' if b == b'(' => depth += 1,
                        b')' if b == b'(' => depth -= 1,
                        b'"' if b == b'"' => depth = 0,
                        _ => {}
                    }
                    if depth == 0 {
                        break;
                    }
                    text.push(c);
                }
                let token = if b == b'"' {
                    Token::Word
                } else {
                    Token::Comment
                };
                tokens.push(token(text));
            }
            _ => {
                let start = i - 1;
                let atom = |c: &u8| !(c.is_ascii_whitespace() || special(c) || b"\"(".contains(c));
                while value.get(i).is_some_and(atom) {
                    i += 1;
                }
                let word = value.get(start..i).unwrap_or_default();
                tokens.push(Token::Word(word.to_vec()));
            }
        }
    }
    tokens
}

/// Words and specials run together, comments left out; with `space`,
/// only the words, spaced (a display name, raw). None when empty.
fn join(tokens: &[&Token], space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for token in tokens {
        match token {
            Token::Word(w) if space && !out.is_empty() => out.extend([b" ", &w[..]].concat()),
            Token::Word(w) => out.extend_from_slice(w),
            Token::Special(b) if !space => out.push(*b),
            _ => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The address of an addr-spec. An empty mailbox or host gets a
/// placeholder (Dovecot's), so that no NIL host reads as a group marker.
fn mailbox(name: Option<Vec<u8>>, adl: Option<Vec<u8>>, spec: &[&Token]) -> Address {
    let at = spec.iter().rposition(|t| matches!(t, Token::Special(b'@')));
    let (local, domain) = match at {
        Some(at) => (spec.get(..at), spec.get(at + 1..)),
        None => (Some(spec), None),
    };
    let part = |tokens: Option<&[&Token]>, missing: &[u8]| {
        join(tokens.unwrap_or_default(), false).or_else(|| Some(missing.to_vec()))
    };
    let (mailbox, host) = (
        part(local, b"MISSING_MAILBOX"),
        part(domain, b"MISSING_DOMAIN"),
    );
    [name, adl, mailbox, host]
}

/// The addresses of an address list (RFC 5322 3.4), a group flattened
/// into start, members, end (RFC 9051 7.5.2).
fn addresses(value: &[u8]) -> Vec<Address> {
    let tokens = tokenize(value);
    let mut tokens = tokens.iter();
    let mut out = Vec::new();
    // The tokens since the last `,`, and whether they held an angle-addr.
    let mut pending: Vec<&Token> = Vec::new();
    let (mut taken, mut in_group) = (false, false);
    loop {
        let token = tokens.next();
        match token {
            Some(Token::Special(b'<')) => {
                let inner: Vec<_> = (tokens.by_ref())
                    .take_while(|t| !matches!(t, Token::Special(b'>')))
                    .collect();
                // RFC 5322 4.4 obs-route: `@a,@b:` before the addr-spec.
                let colon = inner.iter().position(|t| matches!(t, Token::Special(b':')));
                let (adl, spec) = match colon {
                    Some(colon) => (inner.get(..colon), inner.get(colon + 1..)),
                    None => (None, Some(&inner[..])),
                };
                let adl = adl.and_then(|adl| join(adl, false));
                if !taken {
                    out.push(mailbox(join(&pending, true), adl, spec.unwrap_or_default()));
                }
                pending.clear();
                taken = true;
            }
            Some(Token::Special(b':')) if !in_group && !taken => {
                let name = join(&pending, true).unwrap_or_default();
                out.push([None, None, Some(name), None]);
                pending.clear();
                in_group = true;
            }
            Some(Token::Special(b',' | b';')) | None => {
                if !taken && pending.iter().any(|t| matches!(t, Token::Word(_))) {
                    // `user@host (Name)`: the comment names the address.
                    let name = pending.iter().rev().find_map(|t| match t {
                        Token::Comment(c) => Some(c.trim_ascii().to_vec()),
                        _ => None,
                    });
                    out.push(mailbox(name, None, &pending));
                }
                pending.clear();
                taken = false;
                if in_group && !matches!(token, Some(Token::Special(b','))) {
                    out.push(Address::default());
                    in_group = false;
                }
                if token.is_none() {
                    return out;
                }
            }
            Some(token) => pending.push(token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SectionText::*;
    use super::*;

    /// `text` with CRLF line ends, as messages are served.
    fn crlf(text: &str) -> Vec<u8> {
        text.replace("\r\n", "\n")
            .replace('\n', "\r\n")
            .into_bytes()
    }

    fn envelope_of(raw: &[u8]) -> String {
        let mut out = Vec::new();
        MessageView::parse(raw).write_envelope(&mut out, false);
        String::from_utf8(out).unwrap()
    }

    fn structure_of(raw: &[u8], extensible: bool) -> String {
        let mut out = Vec::new();
        MessageView::parse(raw).write_body_structure(&mut out, extensible, false);
        String::from_utf8(out).unwrap()
    }

    const MIXED: &str = "From: Alice <alice@example.com>
To: bob@example.com
Subject: mixed
Content-Type: multipart/mixed; boundary=outer

preamble
--outer
Content-Type: text/plain

See attached.
--outer
Content-Type: application/pdf; name=\"x.pdf\"
Content-Disposition: attachment; filename=\"x.pdf\"
Content-Transfer-Encoding: base64
Content-ID: <pdf1@example.com>
Content-Description: A file

JVBERi0xLjQK
--outer
Content-Type: message/rfc822
Content-Description: forwarded

From: Carol <carol@example.com>
Subject: inner
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=us-ascii

inner text
--inner
Content-Type: text/html

<b>inner</b>
--inner--

--outer--
";

    #[test]
    fn envelopes() {
        let raw = crlf(
            "Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: =?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?= <keld@dkuug.dk>
Subject: =?utf-8?q?caf=C3=A9?=
 menu
To: Friends: a@example.com, \"Doe, John\" <john@example.org>;, bob@example.net (Bob)
Cc: <@relay.example:route@example.com>, nohost
Message-ID: <123@example.com>

body
",
        );
        let keld = "((\"=?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?=\" NIL \"keld\" \"dkuug.dk\"))";
        let expected = format!(
            "(\"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\" \"=?utf-8?q?caf=C3=A9?= menu\" \
             {keld} {keld} {keld} ((NIL NIL \"Friends\" NIL)(NIL NIL \"a\" \"example.com\")\
             (\"Doe, John\" NIL \"john\" \"example.org\")(NIL NIL NIL NIL)\
             (\"Bob\" NIL \"bob\" \"example.net\")) ((NIL \"@relay.example\" \"route\" \
             \"example.com\")(NIL NIL \"nohost\" \"MISSING_DOMAIN\")) NIL NIL \"<123@example.com>\")"
        );
        assert_eq!(envelope_of(&raw), expected);
        // Missing fields are NIL; an empty Reply-To is From.
        let raw = crlf("Subject: hi\nSender: s@x.org\nReply-To:\nFrom: f@x.org\n\nbody\n");
        let (f, s) = ("((NIL NIL \"f\" \"x.org\"))", "((NIL NIL \"s\" \"x.org\"))");
        let expected = format!("(NIL \"hi\" {f} {s} {f} NIL NIL NIL NIL NIL)");
        assert_eq!(envelope_of(&raw), expected);
        let nothing = b"no header at all\r\n";
        assert_eq!(envelope_of(nothing), format!("({})", ["NIL"; 10].join(" ")));
        assert_eq!(
            structure_of(nothing, true),
            "(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 18 1 NIL NIL NIL NIL)"
        );
    }

    #[test]
    fn body_structures() {
        let ext = "NIL NIL NIL NIL";
        // Sizes exclude the CRLF before each boundary; the enclosed
        // message is 232 octets in 13 lines.
        let text =
            format!("(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 13 1 {ext})");
        let pdf =
            "(\"application\" \"pdf\" (\"name\" \"x.pdf\") \"<pdf1@example.com>\" \"A file\" \
                   \"base64\" 12 NIL (\"attachment\" (\"filename\" \"x.pdf\")) NIL NIL)";
        let carol = "((\"Carol\" NIL \"carol\" \"example.com\"))";
        let inner = format!(
            "((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 10 1 {ext})\
             (\"text\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 12 1 {ext}) \
             \"alternative\" (\"boundary\" \"inner\") NIL NIL NIL)"
        );
        let message = format!(
            "(\"message\" \"rfc822\" NIL NIL \"forwarded\" \"7bit\" 232 \
             (NIL \"inner\" {carol} {carol} {carol} NIL NIL NIL NIL NIL) {inner} 13 {ext})"
        );
        assert_eq!(
            structure_of(&crlf(MIXED), true),
            format!("({text}{pdf}{message} \"mixed\" (\"boundary\" \"outer\") NIL NIL NIL)")
        );
        // An encoded message/rfc822 (RFC 2046 5.2.1 forbids it) is opaque.
        let encoded =
            "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogeA==\n";
        let opaque = "(\"application\" \"octet-stream\" NIL NIL NIL \"base64\" 18)";
        assert_eq!(structure_of(&crlf(encoded), false), opaque);
        // BODY: no extension data, down to the enclosed message.
        let body = structure_of(&crlf(MIXED), false);
        let inner = "((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 10 1)\
                     (\"text\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 12 1) \"alternative\")";
        assert!(body
            .starts_with("((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 13 1)"));
        assert!(body.ends_with(&format!("{inner} 13) \"mixed\")")), "{body}");
    }

    #[test]
    fn sections() {
        let raw = crlf(MIXED);
        let view = MessageView::parse(&raw);
        let (fields, not): (&[&[u8]], &[&[u8]]) = (
            &[b"from", b"SUBJECT"],
            &[b"from", b"subject", b"content-type"],
        );
        let inner_header = "From: Carol <carol@example.com>\nSubject: inner\n\
                            Content-Type: multipart/alternative; boundary=inner\n\n";
        let cases: [(&[u32], SectionText<'_>, Option<&str>); 14] = [
            (&[1], Full, Some("See attached.")),
            (&[1], Mime, Some("Content-Type: text/plain\n\n")),
            (
                &[3],
                Mime,
                Some("Content-Type: message/rfc822\nContent-Description: forwarded\n\n"),
            ),
            (&[3], Header, Some(inner_header)),
            (&[3, 1], Full, Some("inner text")),
            (&[3, 2], Mime, Some("Content-Type: text/html\n\n")),
            (
                &[],
                HeaderFields(fields),
                Some("From: Alice <alice@example.com>\nSubject: mixed\n\n"),
            ),
            (&[], HeaderFieldsNot(not), Some("To: bob@example.com\n\n")),
            (&[4], Full, None),
            (&[0], Full, None),
            (&[1, 1], Full, None),
            (&[1], Header, None),
            (&[2], Text, None),
            (&[], Mime, None),
        ];
        for (part, what, expected) in cases {
            assert_eq!(view.section(part, what), expected.map(crlf), "{part:?}");
        }
        assert_eq!(view.section(&[], Full), Some(raw.clone()));
        let text = view.section(&[], Text).unwrap();
        assert!(text.starts_with(b"preamble\r\n--outer\r\n") && text.ends_with(b"--outer--\r\n"));
        let text = view.section(&[3], Text).unwrap();
        assert!(text.starts_with(b"--inner\r\n") && text.ends_with(b"--inner--\r\n"));

        let single = crlf("Subject: one\n\nbody line\n");
        let view = MessageView::parse(&single);
        assert_eq!(view.section(&[1], Full), Some(crlf("body line\n")));
        assert_eq!(view.section(&[2], Full), None);
    }

    #[test]
    fn binary() {
        let raw = crlf(MIXED);
        let view = MessageView::parse(&raw);
        assert_eq!(view.binary(&[2]).unwrap().unwrap(), b"%PDF-1.4\n");
        assert_eq!(view.binary(&[1]).unwrap().unwrap(), b"See attached.");
        assert_eq!(view.binary(&[]).unwrap().unwrap(), raw);
        assert!(view.binary(&[5]).is_none());
        let raw = crlf(
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: Quoted-Printable\n\n\
             caf=C3=A9 =\nlong line  \nx=3Dy =zz\n",
        );
        let decoded = MessageView::parse(&raw).binary(&[1]).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "café long line\r\nx=y =zz\r\n"
        );
        let raw = crlf("Content-Transfer-Encoding: x-uuencode\n\nbegin 644 x\n");
        assert!(matches!(
            MessageView::parse(&raw).binary(&[1]),
            Some(Err(UnknownEncoding))
        ));
    }

    #[test]
    fn search() {
        let raw = crlf(
            "From: Alice <alice@example.com>
Subject: =?utf-8?q?Caf=C3=A9?= menu
Date: Wed, 17 Jul 1996 23:59:00 -0700
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

R3LDvMOfZQ==
--b
Content-Type: text/html; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

<p>=E9t=E9</p>
--b
Content-Type: application/octet-stream

secret
--b--
",
        );
        let view = MessageView::parse(&raw);
        assert!(view.header_contains("subject", "CAFÉ MENU"));
        assert!(view.header_contains("Subject", ""));
        assert!(!view.header_contains("X-Missing", ""));
        assert!(!view.header_contains("From", "bob"));
        let two = b"X-Tag: One\r\nX-Empty:\r\nx-tag: =?utf-8?q?Tw=C3=B6?=\r\n\r\n";
        let values = header_field_values(two, "x-tag");
        assert_eq!(values, "one\0twö\0".as_bytes());
        assert!(values_contain(&values, "twö") && values_contain(&values, "ne"));
        assert!(!values_contain(&values, "one\0tw") && !values_contain(&values, "onetw"));
        assert!(values_contain(&header_field_values(two, "x-empty"), ""));
        assert!(!values_contain(&header_field_values(two, "x-none"), ""));
        for needle in ["grÜße", "ÉTÉ", "<P>"] {
            assert!(
                view.body_contains(needle) && view.text_contains(needle),
                "{needle}"
            );
        }
        assert!(!view.body_contains("secret") && !view.body_contains("alice"));
        assert!(view.text_contains("ALICE@") && !view.text_contains("nowhere"));
        // The day in the header's own zone, not in UTC.
        assert_eq!(view.sent_date(), NaiveDate::from_ymd_opt(1996, 7, 17));
        assert_eq!(MessageView::parse(b"Date: never\r\n\r\n").sent_date(), None);
    }

    /// Whether the parentheses of `s` balance outside strings and literals.
    fn balanced(s: &[u8]) -> bool {
        let (mut depth, mut i) = (0i64, 0);
        while let Some(&b) = s.get(i) {
            match b {
                b'"' => {
                    i += 1;
                    while s[i] != b'"' {
                        i += if s[i] == b'\\' { 2 } else { 1 };
                    }
                }
                b'{' => {
                    let close = i + s[i..].iter().position(|&c| c == b'}').unwrap();
                    let len: usize = std::str::from_utf8(&s[i + 1..close])
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert_eq!(&s[close + 1..close + 3], b"\r\n");
                    i = close + 2 + len;
                }
                b'(' => depth += 1,
                b')' if depth == 0 => return false,
                b')' => depth -= 1,
                _ => {}
            }
            i += 1;
        }
        depth == 0
    }

    /// Everything on every part of `raw`: no panic, balanced output.
    fn exercise(raw: &[u8]) {
        let view = MessageView::parse(raw);
        for (extensible, utf8) in [(false, false), (true, false), (true, true)] {
            let mut out = Vec::new();
            view.write_envelope(&mut out, utf8);
            view.write_body_structure(&mut out, extensible, utf8);
            assert!(balanced(&out), "{}", String::from_utf8_lossy(&out));
        }
        view.header_contains("subject", "x");
        view.text_contains("the");
        view.sent_date();
        let names: &[&[u8]] = &[b"From", b"Content-Type"];
        let mut paths = vec![Vec::new()];
        while let Some(path) = paths.pop() {
            for what in [
                Full,
                Header,
                HeaderFields(names),
                HeaderFieldsNot(names),
                Text,
                Mime,
            ] {
                view.section(&path, what);
            }
            let _ = view.binary(&path);
            for n in 1.. {
                let child = [&path[..], &[n]].concat();
                if path.len() > MAX_DEPTH + 2 || view.section(&child, Full).is_none() {
                    break;
                }
                paths.push(child);
            }
        }
    }

    #[test]
    fn corpus_and_truncations() {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/mime");
        let Ok(dir) = std::fs::read_dir(corpus) else {
            panic!("no corpus in {corpus}");
        };
        let mut files = 0;
        for path in dir.map(|entry| entry.unwrap().path()) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("msg_") && name.ends_with(".txt") {
                files += 1;
                let raw = std::fs::read(&path).unwrap();
                let served = crlf(&String::from_utf8_lossy(&raw));
                exercise(&raw);
                // Cut short: missing boundaries, broken headers.
                for cut in (0..=served.len()).step_by(97) {
                    exercise(&served[..cut]);
                }
            }
        }
        assert!(files > 0);
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let mut multipart = Vec::new();
        for level in 0..200 {
            let part =
                format!("Content-Type: multipart/mixed; boundary=b{level}\r\n\r\n--b{level}\r\n");
            multipart.extend_from_slice(part.as_bytes());
        }
        multipart.extend_from_slice(b"\r\ndeep\r\n");
        exercise(&multipart);

        let mut messages = b"Content-Type: message/rfc822\r\n\r\n".repeat(50_000);
        messages.extend_from_slice(b"Subject: deep\r\n\r\nhi\r\n");
        exercise(&messages);
        let mut out = Vec::new();
        MessageView::parse(&messages).write_body_structure(&mut out, true, false);
        // MAX_DEPTH enclosed messages, then an opaque part.
        assert_eq!(
            out.windows(8).filter(|w| w == b"\"rfc822\"").count(),
            MAX_DEPTH
        );
        assert!(out.windows(14).any(|w| w == b"\"octet-stream\""));
    }
}
