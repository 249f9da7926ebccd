//! Removes `Authentication-Results:` fields that claim our authserv-id
//! from a message's header section as it streams in (RFC 8601 5: a
//! receiver must not let a sender forge the results it will add), in
//! pieces of any size.

/// `authentication-results:`, compared without regard to case.
const FIELD: &[u8] = b"authentication-results:";

/// Longest field held back while deciding; a longer one that started as
/// an Authentication-Results field is dropped (no honest one is so long).
const MAX_FIELD: usize = 64 * 1024;

/// The streaming filter.
#[derive(Debug)]
pub struct OwnResultsFilter {
    /// Our authserv-id, lowercase.
    authserv_id: Vec<u8>,
    /// The header section has ended; everything passes.
    in_body: bool,
    /// At the start of a line.
    line_start: bool,
    /// A line began with CR: the empty line if LF follows.
    blank_cr: bool,
    /// The current field, held back while it may be one to remove.
    held: Vec<u8>,
    /// `held` is an Authentication-Results field (its name matched).
    is_results: bool,
    /// Bytes of FIELD matched so far in the current field.
    matched: usize,
    /// The current field is being held back.
    holding: bool,
    /// The current field is being dropped (too long to hold).
    dropping: bool,
    removed: u32,
}

impl OwnResultsFilter {
    pub fn new(authserv_id: &str) -> OwnResultsFilter {
        OwnResultsFilter {
            authserv_id: authserv_id.to_ascii_lowercase().into_bytes(),
            in_body: false,
            line_start: true,
            blank_cr: false,
            held: Vec::new(),
            is_results: false,
            matched: 0,
            holding: false,
            dropping: false,
            removed: 0,
        }
    }

    /// How many fields were removed.
    pub fn removed(&self) -> u32 {
        self.removed
    }

    /// Filter `input`, appending what stays to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for (i, &b) in input.iter().enumerate() {
            if self.in_body {
                out.extend_from_slice(&input[i..]);
                return;
            }
            if self.blank_cr {
                // After a CR that began a line: LF makes the empty line.
                self.blank_cr = false;
                out.push(b);
                self.in_body = b == b'\n';
                continue;
            }
            if self.line_start {
                self.line_start = false;
                if b != b' ' && b != b'\t' {
                    // A new field, or the empty line: the previous field
                    // is complete.
                    self.end_field(out);
                    match b {
                        b'\n' => {
                            out.push(b);
                            self.in_body = true;
                            continue;
                        }
                        b'\r' => {
                            out.push(b);
                            self.blank_cr = true;
                            continue;
                        }
                        _ => {
                            self.holding = true;
                            self.is_results = false;
                            self.matched = 0;
                        }
                    }
                }
            }
            if b == b'\n' {
                self.line_start = true;
            }
            if self.dropping {
                continue;
            }
            if !self.holding {
                out.push(b);
                continue;
            }
            self.held.push(b);
            if !self.is_results {
                if self.matched == FIELD.len() - 1 && (b == b' ' || b == b'\t') {
                    // RFC 5322 4.5.3: white space before the colon
                    // (obsolete syntax) still names the field.
                    continue;
                }
                if !b.eq_ignore_ascii_case(&FIELD[self.matched]) {
                    // Another field: let it through as it comes.
                    out.append(&mut self.held);
                    self.holding = false;
                    continue;
                }
                self.matched += 1;
                self.is_results = self.matched == FIELD.len();
            }
            if self.held.len() > MAX_FIELD {
                self.held.clear();
                self.holding = false;
                self.dropping = true;
                self.removed += 1;
            }
        }
    }

    /// The input ended (end of data): release a field still held.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.end_field(out);
    }

    fn end_field(&mut self, out: &mut Vec<u8>) {
        self.dropping = false;
        if !self.holding {
            return;
        }
        self.holding = false;
        let value = memchr::memchr(b':', &self.held).map_or(&[][..], |i| &self.held[i + 1..]);
        if self.is_results && claims(value, &self.authserv_id) {
            self.removed += 1;
            self.held.clear();
        } else {
            out.append(&mut self.held);
        }
    }
}

/// Whether an Authentication-Results value starts with `authserv_id`
/// (RFC 8601 2.2: `authserv-id` after optional CFWS, ended by CFWS or
/// `;`).
fn claims(value: &[u8], authserv_id: &[u8]) -> bool {
    let mut i = 0;
    let mut depth = 0usize;
    // Skip folding white space and (possibly nested) comments.
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let rest = &value[i.min(value.len())..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b';' | b' ' | b'\t' | b'\r' | b'\n' | b'('))
        .unwrap_or(rest.len());
    rest[..end].eq_ignore_ascii_case(authserv_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_all(input: &[u8], split: usize) -> (Vec<u8>, u32) {
        let mut f = OwnResultsFilter::new("MX.B.test");
        let mut out = Vec::new();
        f.feed(&input[..split], &mut out);
        f.feed(&input[split..], &mut out);
        f.finish(&mut out);
        (out, f.removed())
    }

    #[test]
    fn removes_only_fields_claiming_our_id_in_any_split() {
        let input: &[u8] = b"Received: x\r\n\
            Authentication-Results: mx.b.test; dkim=pass\r\n\
            authentication-results:(forged)\r\n mx.b.test;\r\n\tspf=pass\r\n\
            Authentication-Results \t: mx.b.test; obsolete=spacing\r\n\
            Authentication-Results: other.test; dkim=fail\r\n\
            Authentication-Results: mx.b.test.evil; none\r\n\
            Subject: s\r\n\
            \r\n\
            Authentication-Results: mx.b.test; in the body\r\n";
        let expected: &[u8] = b"Received: x\r\n\
            Authentication-Results: other.test; dkim=fail\r\n\
            Authentication-Results: mx.b.test.evil; none\r\n\
            Subject: s\r\n\
            \r\n\
            Authentication-Results: mx.b.test; in the body\r\n";
        for split in 0..input.len() {
            let (out, removed) = filter_all(input, split);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(expected),
                "split at {split}"
            );
            assert_eq!(removed, 3, "split at {split}");
        }
    }

    #[test]
    fn lf_only_messages_and_a_header_without_body() {
        let (out, removed) = filter_all(b"Authentication-Results: mx.b.test; x\nA: b\n\nbody\n", 5);
        assert_eq!(out, b"A: b\n\nbody\n");
        assert_eq!(removed, 1);
        let (out, _) = filter_all(b"A: b\r\nAuthentication-Results: other; y", 3);
        assert_eq!(out, b"A: b\r\nAuthentication-Results: other; y");
    }

    #[test]
    fn an_overlong_results_field_is_dropped() {
        let mut input = b"Authentication-Results: ".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_FIELD + 10));
        input.extend_from_slice(b"\r\nSubject: s\r\n\r\nbody");
        let (out, removed) = filter_all(&input, 100);
        assert_eq!(out, b"Subject: s\r\n\r\nbody");
        assert_eq!(removed, 1);
    }
}
