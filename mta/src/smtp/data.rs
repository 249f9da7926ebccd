//! Decoding the DATA stream (RFC 5321 4.1.1.4 and 4.5.2): finds the
//! `CRLF.CRLF` end, removes dot-stuffing, and refuses bare LF and bare CR,
//! which is what makes SMTP smuggling (2023) impossible through us: any end
//! marker other than the exact `CRLF.CRLF` is an error, never an end.

/// What the decoder found in the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// All input used; the message goes on.
    NeedMore,
    /// The end-of-data line was consumed.
    Done,
    /// A LF not preceded by CR.
    BareLf,
    /// A CR not followed by LF.
    BareCr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    LineStart,
    DotStart,
    DotCr,
    Mid,
    Cr,
}

/// Incremental decoder; feed it the bytes as they arrive.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
}

impl Default for DataDecoder {
    fn default() -> Self {
        // DATA's 354 reply is followed by the first line of the message.
        DataDecoder {
            state: State::LineStart,
        }
    }
}

impl DataDecoder {
    /// Decode `input`, appending message bytes (CRLF kept, dots unstuffed)
    /// to `out`. Returns how many input bytes were used and the status;
    /// after `Done` the rest of `input` belongs to the next command.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Mid => {
                    // Copy the run up to the next CR or LF in one go.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    out.extend_from_slice(&input[i..i + run]);
                    i += run;
                    if i == input.len() {
                        break;
                    }
                    if input[i] == b'\n' {
                        return (i + 1, DataStatus::BareLf);
                    }
                    self.state = State::Cr;
                }
                State::LineStart => match b {
                    b'.' => self.state = State::DotStart,
                    b'\r' => self.state = State::Cr,
                    b'\n' => return (i + 1, DataStatus::BareLf),
                    _ => {
                        out.push(b);
                        self.state = State::Mid;
                    }
                },
                State::DotStart => match b {
                    b'\r' => self.state = State::DotCr,
                    b'\n' => return (i + 1, DataStatus::BareLf),
                    // RFC 5321 4.5.2: drop the leading dot of a stuffed line.
                    _ => {
                        out.push(b);
                        self.state = State::Mid;
                    }
                },
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::LineStart;
                        return (i + 1, DataStatus::Done);
                    }
                    return (i + 1, DataStatus::BareCr);
                }
                State::Cr => {
                    if b != b'\n' {
                        return (i + 1, DataStatus::BareCr);
                    }
                    out.extend_from_slice(b"\r\n");
                    self.state = State::LineStart;
                }
            }
            i += 1;
        }
        (input.len(), DataStatus::NeedMore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<u8>, DataStatus, usize) {
        let mut d = DataDecoder::default();
        let mut out = Vec::new();
        let (used, st) = d.decode(input, &mut out);
        (out, st, used)
    }

    #[test]
    fn unstuffs_and_stops_at_end() {
        let (out, st, used) = decode_all(b"a\r\n..b\r\n.\r\n..\r\n.\r\nQUIT\r\n");
        assert_eq!(st, DataStatus::Done);
        assert_eq!(out, b"a\r\n.b\r\n");
        assert_eq!(used, 11);
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let input = b"x\r\n.y\r\n..\r\nz.\r\n\r\n.\r\n";
        let mut d = DataDecoder::default();
        let mut out = Vec::new();
        let mut last = DataStatus::NeedMore;
        for b in input.iter() {
            let (_, st) = d.decode(std::slice::from_ref(b), &mut out);
            last = st;
        }
        assert_eq!(last, DataStatus::Done);
        assert_eq!(out, b"x\r\ny\r\n.\r\nz.\r\n\r\n");
    }

    #[test]
    fn empty_message() {
        let (out, st, _) = decode_all(b".\r\n");
        assert_eq!((out.as_slice(), st), (&b""[..], DataStatus::Done));
    }

    #[test]
    fn smuggling_forms_are_errors_not_ends() {
        assert_eq!(decode_all(b"a\n.\nMAIL").1, DataStatus::BareLf);
        assert_eq!(decode_all(b"a\r\n.\nMAIL").1, DataStatus::BareLf);
        assert_eq!(decode_all(b"a\n.\r\n").1, DataStatus::BareLf);
        assert_eq!(decode_all(b"a\r.\r\n").1, DataStatus::BareCr);
        assert_eq!(decode_all(b"a\r\n.\r.\r\n").1, DataStatus::BareCr);
    }
}
