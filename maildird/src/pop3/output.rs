//! Turning a stored message into a POP3 multi-line response body
//! (RFC 1939 section 3): LF becomes CRLF (a CRLF stays), lines starting
//! with `.` are byte-stuffed, and TOP stops after the header and n body
//! lines. Pure and incremental.

/// Streaming encoder for one RETR or TOP.
#[derive(Debug)]
pub struct MessageEncoder {
    at_line_start: bool,
    prev_cr: bool,
    line_empty: bool,
    in_body: bool,
    /// Body lines still to send (TOP); `None` sends everything.
    body_lines_left: Option<u32>,
    done: bool,
}

impl MessageEncoder {
    /// An encoder for the whole message (`None`) or TOP with `n` lines.
    pub fn new(body_lines: Option<u32>) -> MessageEncoder {
        MessageEncoder {
            at_line_start: true,
            prev_cr: false,
            line_empty: true,
            in_body: false,
            body_lines_left: body_lines,
            done: false,
        }
    }

    /// Whether TOP has sent all it should; further input is ignored.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Encode `input`, appending to `out`.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.done {
                return;
            }
            if self.at_line_start {
                self.at_line_start = false;
                self.line_empty = true;
                if b == b'.' {
                    out.push(b'.');
                }
            }
            match b {
                b'\n' => {
                    if !self.prev_cr {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                    self.prev_cr = false;
                    self.end_of_line();
                }
                b'\r' => {
                    out.push(b'\r');
                    self.prev_cr = true;
                }
                _ => {
                    out.push(b);
                    self.prev_cr = false;
                    self.line_empty = false;
                }
            }
        }
    }

    fn end_of_line(&mut self) {
        self.at_line_start = true;
        if !self.in_body {
            if self.line_empty {
                self.in_body = true;
                self.done = self.body_lines_left == Some(0);
            }
        } else if let Some(left) = self.body_lines_left.as_mut() {
            *left = left.saturating_sub(1);
            self.done = *left == 0;
        }
    }

    /// End the response: a CRLF if the message did not end with one, then
    /// the terminating `.` line.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(input: &[u8], lines: Option<u32>, chunk: usize) -> Vec<u8> {
        let mut e = MessageEncoder::new(lines);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            e.encode(c, &mut out);
        }
        e.finish(&mut out);
        out
    }

    const MSG: &[u8] = b"Subject: x\nFrom: a\n\n.dot\nline2\r\nline3\nlast";

    #[test]
    fn whole_message_is_crlf_and_stuffed_in_any_chunking() {
        let want =
            b"Subject: x\r\nFrom: a\r\n\r\n..dot\r\nline2\r\nline3\r\nlast\r\n.\r\n".to_vec();
        for chunk in [1, 2, 3, 7, 100] {
            assert_eq!(encode(MSG, None, chunk), want, "chunk {chunk}");
        }
    }

    #[test]
    fn top_counts_body_lines() {
        assert_eq!(
            encode(MSG, Some(0), 4),
            b"Subject: x\r\nFrom: a\r\n\r\n.\r\n".to_vec()
        );
        assert_eq!(
            encode(MSG, Some(2), 5),
            b"Subject: x\r\nFrom: a\r\n\r\n..dot\r\nline2\r\n.\r\n".to_vec()
        );
        assert_eq!(encode(b"H: v\n", Some(3), 1), b"H: v\r\n.\r\n".to_vec());
    }

    #[test]
    fn size_matches_maildir_w_for_lf_files() {
        let body = b"a\nb\n\nc\n";
        let out = encode(body, None, 3);
        // W = size + number of LFs; the encoder adds only the final ".\r\n".
        assert_eq!(out.len() - 3, body.len() + 4);
    }
}
