//! The parts of the IMAP command grammar that imap-codec does not parse
//! (docs/research/imap-codec.md): LIST-EXTENDED (RFC 5258) with
//! SPECIAL-USE (RFC 6154) and LIST-STATUS (RFC 5819), SEARCH RETURN
//! (RFC 4731), and the framing questions the reader asks before a command
//! is complete (is a literal announced, is it APPEND's message).

use std::borrow::Cow;

/// A lexical token of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token<'a> {
    Open,
    Close,
    /// An atom, or a list-mailbox made of atom characters, `%` and `*`.
    Atom(&'a [u8]),
    /// A quoted string (unescaped) or a literal's bytes.
    String(Cow<'a, [u8]>),
}

/// Malformed syntax; the command gets `BAD`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SyntaxError(pub &'static str);

/// Tokens of a whole command (lines and the literals between them).
pub struct Tokens<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(bytes: &'a [u8]) -> Tokens<'a> {
        Tokens { bytes, pos: 0 }
    }

    /// Byte offset of the next unread byte.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn peek_byte(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    /// The next token; `Ok(None)` at the end of the command.
    pub fn next_token(&mut self) -> Result<Option<Token<'a>>, SyntaxError> {
        while self.peek_byte() == Some(b' ') {
            self.pos += 1;
        }
        let Some(b) = self.peek_byte() else {
            return Ok(None);
        };
        match b {
            b'\r' | b'\n' => Ok(None),
            b'(' => {
                self.pos += 1;
                Ok(Some(Token::Open))
            }
            b')' => {
                self.pos += 1;
                Ok(Some(Token::Close))
            }
            b'"' => self.quoted().map(Some),
            b'{' => self.literal().map(Some),
            b'~' if self.bytes.get(self.pos + 1) == Some(&b'{') => {
                self.pos += 1;
                self.literal().map(Some)
            }
            _ => {
                let start = self.pos;
                while let Some(c) = self.peek_byte() {
                    if matches!(c, b' ' | b'(' | b')' | b'\r' | b'\n' | b'"' | b'{') || c < 0x20 {
                        break;
                    }
                    self.pos += 1;
                }
                // A control character starts no token: without this the
                // caller would get an empty atom forever (found by
                // fuzz/imap_command: `A LIST (\x08` looped until memory
                // ran out).
                if self.pos == start {
                    return Err(SyntaxError("control character in command"));
                }
                Ok(Some(Token::Atom(&self.bytes[start..self.pos])))
            }
        }
    }

    fn quoted(&mut self) -> Result<Token<'a>, SyntaxError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek_byte() {
                None | Some(b'\r') | Some(b'\n') => return Err(SyntaxError("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Token::String(Cow::Owned(out)));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek_byte() {
                        Some(c @ (b'"' | b'\\')) => out.push(c),
                        _ => return Err(SyntaxError("bad escape in string")),
                    }
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// A literal; the input is at its `{`.
    fn literal(&mut self) -> Result<Token<'a>, SyntaxError> {
        let rest = &self.bytes[self.pos..];
        let close = rest
            .iter()
            .position(|&c| c == b'}')
            .ok_or(SyntaxError("bad literal"))?;
        let (length, _) = rest
            .get(1..close)
            .and_then(parse_announcement)
            .ok_or(SyntaxError("bad literal length"))?;
        let mut at = self.pos + close + 1;
        if self.bytes.get(at) == Some(&b'\r') {
            at += 1;
        }
        if self.bytes.get(at) != Some(&b'\n') {
            return Err(SyntaxError("literal length not at end of line"));
        }
        at += 1;
        let end = usize::try_from(length)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= self.bytes.len())
            .ok_or(SyntaxError("literal shorter than announced"))?;
        self.pos = end;
        Ok(Token::String(Cow::Borrowed(&self.bytes[at..end])))
    }

    /// An astring or nstring-like argument as bytes.
    pub fn string_arg(&mut self) -> Result<Cow<'a, [u8]>, SyntaxError> {
        match self.next_token()? {
            Some(Token::Atom(a)) => Ok(Cow::Borrowed(a)),
            Some(Token::String(s)) => Ok(s),
            _ => Err(SyntaxError("expected a string")),
        }
    }

    /// The atoms of a parenthesised list whose `(` was just read; nested
    /// lists are returned flattened with their own parentheses as atoms
    /// `(` and `)`.
    fn atom_list(&mut self) -> Result<Vec<String>, SyntaxError> {
        let mut out = Vec::new();
        let mut depth = 1;
        loop {
            match self.next_token()? {
                Some(Token::Open) => {
                    depth += 1;
                    out.push("(".to_string());
                }
                Some(Token::Close) => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(out);
                    }
                    out.push(")".to_string());
                }
                Some(Token::Atom(a)) => out.push(String::from_utf8_lossy(a).to_ascii_uppercase()),
                Some(Token::String(_)) => return Err(SyntaxError("unexpected string in list")),
                None => return Err(SyntaxError("unterminated list")),
            }
        }
    }
}

/// `n` or `n+` (the inside of `{...}`): the length and whether the client
/// waits for a continuation (synchronising literal).
fn parse_announcement(inside: &[u8]) -> Option<(u64, bool)> {
    let (digits, sync) = match inside.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (inside, true),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .map(|n| (n, sync))
}

/// A literal announced at the end of `line` (which includes its CRLF):
/// `{n}`, `{n+}`, or `~{n}` (RFC 3516 literal8). Returns the length and
/// whether it is synchronising.
pub fn literal_announcement(line: &[u8]) -> Option<(u64, bool)> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&c| c == b'{')?;
    parse_announcement(&inner[open + 1..])
}

/// The tag and the command name (upper case; `UID FETCH` as one name) of
/// a command so far.
pub fn command_name(message: &[u8]) -> Option<(String, String)> {
    let mut t = Tokens::new(message);
    let tag = match t.next_token().ok()?? {
        Token::Atom(a) => String::from_utf8_lossy(a).into_owned(),
        _ => return None,
    };
    let name = match t.next_token().ok()?? {
        Token::Atom(a) => String::from_utf8_lossy(a).to_ascii_uppercase(),
        _ => return Some((tag, String::new())),
    };
    if name == "UID" {
        if let Ok(Some(Token::Atom(a))) = t.next_token() {
            return Some((
                tag,
                format!("UID {}", String::from_utf8_lossy(a).to_ascii_uppercase()),
            ));
        }
    }
    Some((tag, name))
}

/// Whether a literal announced at the end of `message` (an APPEND so far)
/// is the message to append: APPEND's first argument is the mailbox, so
/// any literal after it is the message (RFC 9051 6.3.12).
pub fn is_append_message_literal(message: &[u8]) -> bool {
    let mut t = Tokens::new(message);
    // tag, APPEND
    for _ in 0..2 {
        if !matches!(t.next_token(), Ok(Some(Token::Atom(_)))) {
            return false;
        }
    }
    // The mailbox, then anything (flags, date) up to the announcement.
    let Ok(Some(Token::Atom(_) | Token::String(_))) = t.next_token() else {
        return false;
    };
    true
}

/// What `SEARCH RETURN (...)` asked for (RFC 4731 3.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchReturn {
    pub min: bool,
    pub max: bool,
    pub all: bool,
    pub count: bool,
    /// RFC 5182 SAVE: keep the result for `$`.
    pub save: bool,
}

impl SearchReturn {
    /// `RETURN ()` means ALL (RFC 4731 3.1).
    fn from_options(options: &[String]) -> Result<SearchReturn, SyntaxError> {
        let mut r = SearchReturn::default();
        for o in options {
            match o.as_str() {
                "MIN" => r.min = true,
                "MAX" => r.max = true,
                "ALL" => r.all = true,
                "COUNT" => r.count = true,
                "SAVE" => r.save = true,
                _ => return Err(SyntaxError("unknown SEARCH RETURN option")),
            }
        }
        if options.is_empty() {
            r.all = true;
        }
        Ok(r)
    }
}

/// Split `RETURN (...)` off a SEARCH command: the options and the command
/// without them (for imap-codec). None when there is no RETURN.
pub fn split_search_return(message: &[u8]) -> Result<Option<(SearchReturn, Vec<u8>)>, SyntaxError> {
    let mut t = Tokens::new(message);
    t.next_token()?; // tag
    let mut name = t.next_token()?;
    if matches!(name, Some(Token::Atom(a)) if a.eq_ignore_ascii_case(b"UID")) {
        name = t.next_token()?;
    }
    if !matches!(name, Some(Token::Atom(_))) {
        return Err(SyntaxError("expected a tag and a command name"));
    }
    let start = t.position();
    match t.next_token()? {
        Some(Token::Atom(a)) if a.eq_ignore_ascii_case(b"RETURN") => {}
        _ => return Ok(None),
    }
    if t.next_token()? != Some(Token::Open) {
        return Err(SyntaxError("RETURN needs a list"));
    }
    let options = t.atom_list()?;
    let ret = SearchReturn::from_options(&options)?;
    let mut rest = message[..start].to_vec();
    rest.extend_from_slice(&message[t.position()..]);
    Ok(Some((ret, rest)))
}

/// Replace each `$` (RFC 5182 2: the saved search result, RFC 9051
/// `seq-last-command`) in a command with a sequence set: `uids` where it
/// names UIDs (a UID command, or after the search key UID), `sequence`
/// elsewhere. None when the command has no `$`.
pub fn replace_saved_marker(message: &[u8], uids: &str, sequence: &str) -> Option<Vec<u8>> {
    let (_, name) = command_name(message)?;
    let uid_command = name.starts_with("UID ");
    let mut t = Tokens::new(message);
    let mut out = Vec::new();
    let mut copied = 0;
    let mut previous_was_uid = false;
    while let Ok(Some(token)) = t.next_token() {
        let end = t.position();
        if let Token::Atom(a) = &token {
            if *a == b"$" {
                out.extend_from_slice(&message[copied..end - 1]);
                let set = if uid_command || previous_was_uid {
                    uids
                } else {
                    sequence
                };
                out.extend_from_slice(set.as_bytes());
                copied = end;
            }
        }
        previous_was_uid = matches!(token, Token::Atom(a) if a.eq_ignore_ascii_case(b"UID"));
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&message[copied..]);
    Some(out)
}

/// A parsed LIST command (RFC 9051 6.3.9, RFC 5258 3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListCommand {
    pub reference: Vec<u8>,
    pub patterns: Vec<Vec<u8>>,
    /// Selection options (RFC 5258 3.1).
    pub select_subscribed: bool,
    pub select_special_use: bool,
    pub recursive_match: bool,
    /// Return options (RFC 5258 3.2, RFC 6154 2, RFC 5819 2).
    pub return_subscribed: bool,
    pub return_children: bool,
    pub return_special_use: bool,
    pub return_status: Option<Vec<String>>,
    /// Whether any extended syntax was used: then attributes like
    /// \Subscribed follow the extended rules.
    pub extended: bool,
}

/// Parse a LIST command's arguments (after `tag LIST`).
pub fn parse_list(message: &[u8]) -> Result<ListCommand, SyntaxError> {
    let mut t = Tokens::new(message);
    t.next_token()?;
    t.next_token()?;
    let mut cmd = ListCommand::default();
    let mut first = t.next_token()?.ok_or(SyntaxError("LIST needs arguments"))?;
    if first == Token::Open {
        cmd.extended = true;
        for o in t.atom_list()? {
            match o.as_str() {
                "SUBSCRIBED" => cmd.select_subscribed = true,
                "SPECIAL-USE" => cmd.select_special_use = true,
                "RECURSIVEMATCH" => cmd.recursive_match = true,
                "REMOTE" => {}
                _ => return Err(SyntaxError("unknown LIST selection option")),
            }
        }
        // RFC 5258 3.1: RECURSIVEMATCH alone is an error.
        if cmd.recursive_match && !cmd.select_subscribed && !cmd.select_special_use {
            return Err(SyntaxError("RECURSIVEMATCH needs another selection option"));
        }
        first = t
            .next_token()?
            .ok_or(SyntaxError("LIST needs a reference"))?;
    }
    cmd.reference = match first {
        Token::Atom(a) => a.to_vec(),
        Token::String(s) => s.into_owned(),
        _ => return Err(SyntaxError("bad LIST reference")),
    };
    match t.next_token()?.ok_or(SyntaxError("LIST needs a pattern"))? {
        Token::Open => {
            cmd.extended = true;
            loop {
                match t.next_token()? {
                    Some(Token::Close) => break,
                    Some(Token::Atom(a)) => cmd.patterns.push(a.to_vec()),
                    Some(Token::String(s)) => cmd.patterns.push(s.into_owned()),
                    _ => return Err(SyntaxError("bad LIST pattern list")),
                }
            }
            if cmd.patterns.is_empty() {
                return Err(SyntaxError("empty LIST pattern list"));
            }
        }
        Token::Atom(a) => cmd.patterns.push(a.to_vec()),
        Token::String(s) => cmd.patterns.push(s.into_owned()),
        Token::Close => return Err(SyntaxError("bad LIST pattern")),
    }
    match t.next_token()? {
        None => {}
        Some(Token::Atom(a)) if a.eq_ignore_ascii_case(b"RETURN") => {
            cmd.extended = true;
            if t.next_token()? != Some(Token::Open) {
                return Err(SyntaxError("RETURN needs a list"));
            }
            let options = t.atom_list()?;
            let mut i = 0;
            while i < options.len() {
                match options[i].as_str() {
                    "SUBSCRIBED" => cmd.return_subscribed = true,
                    "CHILDREN" => cmd.return_children = true,
                    "SPECIAL-USE" => cmd.return_special_use = true,
                    "STATUS" if options.get(i + 1).map(String::as_str) == Some("(") => {
                        let end = options[i + 1..]
                            .iter()
                            .position(|o| o == ")")
                            .ok_or(SyntaxError("bad STATUS list"))?;
                        cmd.return_status = Some(options[i + 2..i + 1 + end].to_vec());
                        i += end + 1;
                    }
                    _ => return Err(SyntaxError("unknown LIST return option")),
                }
                i += 1;
            }
        }
        _ => return Err(SyntaxError("unexpected LIST argument")),
    }
    if t.next_token()?.is_some() {
        return Err(SyntaxError("unexpected LIST argument"));
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements() {
        assert_eq!(literal_announcement(b"a LOGIN {5}\r\n"), Some((5, true)));
        assert_eq!(literal_announcement(b"a LOGIN {5+}\r\n"), Some((5, false)));
        assert_eq!(
            literal_announcement(b"a APPEND x ~{12}\r\n"),
            Some((12, true))
        );
        assert_eq!(literal_announcement(b"a LOGIN {}\r\n"), None);
        assert_eq!(literal_announcement(b"a LOGIN x\r\n"), None);
        assert_eq!(literal_announcement(b"a {99999999999999999999}\r\n"), None);
    }

    #[test]
    fn names_and_append_literal() {
        assert_eq!(
            command_name(b"a1 uid fetch 1 FLAGS\r\n"),
            Some(("a1".into(), "UID FETCH".into()))
        );
        assert!(!is_append_message_literal(b"a APPEND {5}\r\n"));
        assert!(is_append_message_literal(b"a APPEND {5}\r\nINBOX {3}\r\n"));
        assert!(is_append_message_literal(
            b"a APPEND INBOX (\\Seen) {3}\r\n"
        ));
    }

    #[test]
    fn list_forms() {
        let l = parse_list(b"a LIST \"\" *\r\n").unwrap();
        assert_eq!(l.patterns, vec![b"*".to_vec()]);
        assert!(!l.extended);
        let l = parse_list(b"a LIST (SPECIAL-USE) \"\" \"*\"\r\n").unwrap();
        assert!(l.select_special_use && l.extended);
        let l = parse_list(
            b"a LIST \"\" (INBOX {4}\r\nSent) RETURN (SPECIAL-USE STATUS (MESSAGES UNSEEN) CHILDREN)\r\n",
        )
        .unwrap();
        assert_eq!(l.patterns, vec![b"INBOX".to_vec(), b"Sent".to_vec()]);
        assert!(l.return_special_use && l.return_children);
        assert_eq!(
            l.return_status,
            Some(vec!["MESSAGES".to_string(), "UNSEEN".to_string()])
        );
        assert!(parse_list(b"a LIST (RECURSIVEMATCH) \"\" *\r\n").is_err());
        assert!(parse_list(b"a LIST \"\"\r\n").is_err());
        assert!(parse_list(b"a LIST \"\" * extra\r\n").is_err());
    }

    #[test]
    fn search_return() {
        let (r, rest) = split_search_return(b"a UID SEARCH RETURN (MIN COUNT) UNSEEN\r\n")
            .unwrap()
            .unwrap();
        assert!(r.min && r.count && !r.all);
        assert_eq!(rest, b"a UID SEARCH UNSEEN\r\n");
        let (r, _) = split_search_return(b"a SEARCH RETURN () ALL\r\n")
            .unwrap()
            .unwrap();
        assert!(r.all);
        assert!(split_search_return(b"a SEARCH ALL\r\n").unwrap().is_none());
        let (r, _) = split_search_return(b"a SEARCH RETURN (SAVE) ALL\r\n")
            .unwrap()
            .unwrap();
        assert!(r.save && !r.all);
        assert!(split_search_return(b"a SEARCH RETURN (FOO) ALL\r\n").is_err());
        // Found by fuzz/imap_command: a control character in a list.
        assert!(parse_list(b"A((\x08").is_err());
        assert!(parse_list(b"a LIST (\x01) \"\" *\r\n").is_err());
        // Found by fuzz/imap_command: no command at all.
        assert!(split_search_return(b"").is_err());
        assert!(split_search_return(b"a").is_err());
    }

    #[test]
    fn saved_marker() {
        let r =
            |m: &[u8]| replace_saved_marker(m, "7:9", "2:3").map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            r(b"a FETCH $ FLAGS\r\n").as_deref(),
            Some("a FETCH 2:3 FLAGS\r\n")
        );
        assert_eq!(
            r(b"a UID COPY $ Sent\r\n").as_deref(),
            Some("a UID COPY 7:9 Sent\r\n")
        );
        assert_eq!(
            r(b"a SEARCH UID $ NOT $ (\"$\")\r\n").as_deref(),
            Some("a SEARCH UID 7:9 NOT 2:3 (\"$\")\r\n")
        );
        assert_eq!(r(b"a STORE 1 +FLAGS ($Junk)\r\n"), None);
    }

    #[test]
    fn strings() {
        let mut t = Tokens::new(b"\"a\\\"b\" {2}\r\nxy (");
        assert_eq!(t.string_arg().unwrap().as_ref(), b"a\"b");
        assert_eq!(t.string_arg().unwrap().as_ref(), b"xy");
        assert_eq!(t.next_token().unwrap(), Some(Token::Open));
        assert!(Tokens::new(b"{9}\r\nab").next_token().is_err());
        assert_eq!(
            Tokens::new(b"~}").next_token().unwrap(),
            Some(Token::Atom(b"~}"))
        );
        assert_eq!(
            Tokens::new(b"~/Mail/%").next_token().unwrap(),
            Some(Token::Atom(b"~/Mail/%"))
        );
        assert!(command_name(b"~} NOOP\r\n").is_some());
    }
}
