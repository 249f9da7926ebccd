//! Writing IMAP response syntax (RFC 9051 4 and 9): strings as atoms,
//! quoted strings or literals, NIL, and dates.

/// Longest string sent quoted; longer ones go as literals.
const MAX_QUOTED: usize = 1024;

/// Whether `bytes` may be sent as a quoted string (RFC 9051 4.3): no CR,
/// LF or NUL, and 8-bit text only when the session enabled UTF-8
/// (RFC 9051 9 `quoted` / RFC 6855 3).
fn quotable(bytes: &[u8], utf8: bool) -> bool {
    bytes.len() <= MAX_QUOTED
        && bytes
            .iter()
            .all(|&b| b != b'\r' && b != b'\n' && b != 0 && (b < 0x80 || utf8))
        && (bytes.is_ascii() || std::str::from_utf8(bytes).is_ok())
}

/// Write `bytes` as an IMAP string: quoted when it can be, else a literal.
pub fn string(out: &mut Vec<u8>, bytes: &[u8], utf8: bool) {
    if quotable(bytes, utf8) {
        out.push(b'"');
        for &b in bytes {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        literal(out, bytes);
    }
}

/// Write `bytes` as a literal `{n}\r\n...`. A literal may not hold NUL
/// (RFC 9051 4.3) and only BINARY may answer with `literal8` (RFC 3516),
/// so NUL goes out as 0x80, as Dovecot sends it.
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    literal_header(out, bytes.len() as u64, false);
    out.extend(bytes.iter().map(|&b| if b == 0 { 0x80 } else { b }));
}

/// Write the announcement of a literal of `len` octets; `binary` for a
/// `literal8` (RFC 3516 4.2, data that may hold NUL).
pub fn literal_header(out: &mut Vec<u8>, len: u64, binary: bool) {
    if binary {
        out.push(b'~');
    }
    out.extend_from_slice(format!("{{{len}}}\r\n").as_bytes());
}

/// Write an `nstring`: NIL or a string.
pub fn nstring(out: &mut Vec<u8>, bytes: Option<&[u8]>, utf8: bool) {
    match bytes {
        Some(b) => string(out, b, utf8),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// Write an `astring` (RFC 9051 9): a bare atom when every character is
/// an ATOM-CHAR, else a string. Mailbox names go out this way.
pub fn astring(out: &mut Vec<u8>, bytes: &[u8], utf8: bool) {
    if !bytes.is_empty() && bytes.iter().all(|&b| is_astring_char(b)) {
        out.extend_from_slice(bytes);
    } else {
        string(out, bytes, utf8);
    }
}

/// ASTRING-CHAR of RFC 9051 9: ATOM-CHAR or `]`.
fn is_astring_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Write a `date-time` (RFC 9051 9), e.g. `"21-Nov-2026 09:05:01 +0000"`,
/// for a Unix time in UTC.
pub fn date_time(out: &mut Vec<u8>, unix_seconds: i64) {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    out.extend_from_slice(
        format!(
            "\"{:02}-{}-{:04} {:02}:{:02}:{:02} +0000\"",
            t.day(),
            MONTHS[usize::from(u8::from(t.month())) - 1],
            t.year(),
            t.hour(),
            t.minute(),
            t.second()
        )
        .as_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_quoted_or_literal() {
        assert_eq!(s(|o| string(o, b"hello", false)), "\"hello\"");
        assert_eq!(s(|o| string(o, b"a\"b\\c", false)), "\"a\\\"b\\\\c\"");
        assert_eq!(s(|o| string(o, b"a\r\nb", false)), "{4}\r\na\r\nb");
        assert_eq!(s(|o| string(o, "é".as_bytes(), false)), "{2}\r\né");
        assert_eq!(s(|o| string(o, "é".as_bytes(), true)), "\"é\"");
        assert_eq!(s(|o| nstring(o, None, false)), "NIL");
        let mut o = Vec::new();
        literal(&mut o, b"a\0b");
        assert_eq!(o, b"{3}\r\na\x80b");
    }

    #[test]
    fn astrings_are_atoms_when_possible() {
        assert_eq!(s(|o| astring(o, b"INBOX", false)), "INBOX");
        assert_eq!(s(|o| astring(o, b"a b", false)), "\"a b\"");
        assert_eq!(s(|o| astring(o, b"", false)), "\"\"");
        assert_eq!(s(|o| astring(o, b"a*", false)), "\"a*\"");
    }

    #[test]
    fn dates() {
        assert_eq!(s(|o| date_time(o, 0)), "\"01-Jan-1970 00:00:00 +0000\"");
        assert_eq!(
            s(|o| date_time(o, 1_795_338_301)),
            "\"22-Nov-2026 09:05:01 +0000\""
        );
    }
}
