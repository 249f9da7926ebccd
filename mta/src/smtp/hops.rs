//! Mail loop detection (RFC 5321 6.3): count the `Received:` fields of a
//! message's header section as its bytes stream past, in pieces of any
//! size.

/// `received:`, the field name compared without regard to case.
const FIELD: &[u8] = b"received:";

/// Counts `Received:` header fields until the header section ends.
#[derive(Debug, Default)]
pub struct ReceivedCounter {
    /// Bytes of the current line seen (CR not counted).
    column: usize,
    /// Whether the current line so far matches `received:`.
    matching: bool,
    header_done: bool,
    count: u32,
}

impl ReceivedCounter {
    /// Feed the next bytes of the message (CRLF or LF line ends).
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.header_done {
                return;
            }
            match b {
                b'\n' => {
                    if self.column == 0 {
                        // The empty line ends the header section.
                        self.header_done = true;
                    }
                    self.column = 0;
                }
                b'\r' => {}
                _ => {
                    if self.column == 0 {
                        self.matching = true;
                    }
                    if self.column < FIELD.len() {
                        self.matching &= b.to_ascii_lowercase() == FIELD[self.column];
                        if self.matching && self.column + 1 == FIELD.len() {
                            self.count += 1;
                        }
                    }
                    self.column += 1;
                }
            }
        }
    }

    /// `Received:` fields seen so far.
    pub fn count(&self) -> u32 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_header_fields_only_in_any_split() {
        let message = b"Received: from a\r\n\tby b\r\nRECEIVED:x\r\nX-Received: no\r\nReceived : no\r\nSubject: s\r\n\r\nReceived: in the body\r\n";
        for split in 0..message.len() {
            let mut c = ReceivedCounter::default();
            c.feed(&message[..split]);
            c.feed(&message[split..]);
            assert_eq!(c.count(), 2, "split at {split}");
        }
    }
}
