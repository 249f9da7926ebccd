//! `sendmail -bs`: the SMTP session machine on standard input and output
//! (Port::Local: no TLS, no AUTH, recipients checked later by qmgr, as
//! command-line ones are); each message goes to the maildrop.

use std::io::{self, BufRead, Read, Write};

use common::recipients::Directory;
use mailsrv_mta::smtp::reply::Reply;
use mailsrv_mta::smtp::session::{Action, DataOutcome, Session, Transaction};

/// Longest message line read at once; longer lines are read in pieces.
const DATA_PIECE: u64 = 64 * 1024;

/// Stores one message: returns its queue id, or why it was not queued.
pub type Store<'a> = dyn FnMut(&Transaction, &mut dyn Read) -> io::Result<String> + 'a;

/// Run the session until QUIT, a closing reply, or end of input.
pub fn serve(
    mut session: Session,
    input: &mut impl BufRead,
    output: &mut impl Write,
    max_line: usize,
    max_size: u64,
    store: &mut Store<'_>,
) -> io::Result<()> {
    // Local recipients are checked by qmgr, which can read the tables.
    let directory = Directory {
        domains: Default::default(),
        aliases: Default::default(),
        users: std::sync::Arc::new(common::userdb::UserDb::default()),
        delimiter: String::new(),
    };
    send(output, &session.greeting())?;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input
            .by_ref()
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let action = if line.last() != Some(&b'\n') && line.len() > max_line {
            skip_line(input)?;
            session.line_too_long()
        } else {
            session.handle(&line, &directory)
        };
        match action {
            Action::Reply(r) => send(output, &r)?,
            Action::Close(r) => return send(output, &r),
            Action::ReadData(r) => {
                send(output, &r)?;
                let tx = session.transaction().cloned().unwrap_or_default();
                let mut data = DotReader::new(input, max_size);
                let stored = store(&tx, &mut data);
                if data.eof {
                    // The client went away mid-message: nothing was queued.
                    return Ok(());
                }
                let outcome = match stored {
                    Ok(id) => DataOutcome::Queued(id),
                    Err(e) => {
                        data.drain()?;
                        if data.eof {
                            return Ok(());
                        }
                        match e.kind() {
                            io::ErrorKind::FileTooLarge => DataOutcome::TooBig,
                            _ if common::spool::is_disk_full(&e) => DataOutcome::DiskFull,
                            _ => DataOutcome::LocalError,
                        }
                    }
                };
                send(output, &session.finish(outcome))?;
            }
            Action::ReadChunk { size, reply, .. } => {
                // Port::Local refuses BDAT; its chunk is read and dropped
                // (RFC 3030 3) so it is not taken for commands.
                io::copy(&mut input.by_ref().take(size), &mut io::sink())?;
                let r = reply.unwrap_or_else(|| Reply::new(502, "5.5.1", "BDAT is not available"));
                send(output, &r)?;
            }
            // Port::Local offers neither.
            Action::StartTls(_) | Action::Authenticate { .. } => {
                send(output, &Reply::new(502, "5.5.1", "Not available here"))?
            }
        }
    }
}

fn send(output: &mut impl Write, reply: &Reply) -> io::Result<()> {
    output.write_all(reply.to_wire().as_bytes())?;
    output.flush()
}

/// Discard the rest of an overlong command line.
fn skip_line(input: &mut impl BufRead) -> io::Result<()> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match memchr::memchr(b'\n', buf) {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
}

/// The message data up to the line with a single dot, dots unstuffed.
/// Lines may end in LF or CRLF: a local program is not a network peer
/// that could smuggle a second message past a relay.
struct DotReader<'a, R> {
    input: &'a mut R,
    line: Vec<u8>,
    pos: usize,
    at_line_start: bool,
    done: bool,
    /// The input ended before the final dot.
    eof: bool,
    size: u64,
    limit: u64,
}

impl<'a, R: BufRead> DotReader<'a, R> {
    fn new(input: &'a mut R, limit: u64) -> Self {
        DotReader {
            input,
            line: Vec::new(),
            pos: 0,
            at_line_start: true,
            done: false,
            eof: false,
            size: 0,
            limit,
        }
    }

    /// Read the next piece of a line into `self.line`; false at the end.
    fn next_piece(&mut self) -> io::Result<bool> {
        self.line.clear();
        self.pos = 0;
        let n = self
            .input
            .by_ref()
            .take(DATA_PIECE)
            .read_until(b'\n', &mut self.line)?;
        if n == 0 {
            self.eof = true;
            self.done = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "input ended before the final dot",
            ));
        }
        let start = self.at_line_start;
        self.at_line_start = self.line.last() == Some(&b'\n');
        if start && (self.line == b".\r\n" || self.line == b".\n") {
            self.done = true;
            return Ok(false);
        }
        if start && self.line.first() == Some(&b'.') {
            // RFC 5321 4.5.2
            self.pos = 1;
        }
        Ok(true)
    }

    /// Read and drop the rest of the message.
    fn drain(&mut self) -> io::Result<()> {
        while !self.done {
            match self.next_piece() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: BufRead> Read for DotReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.line.len() {
            if self.done || !self.next_piece()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.line.len() - self.pos);
        buf[..n].copy_from_slice(&self.line[self.pos..self.pos + n]);
        self.pos += n;
        self.size += n as u64;
        if self.size > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "message too large",
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> (io::Result<Vec<u8>>, Vec<u8>) {
        let mut input = input;
        let mut out = Vec::new();
        let r = DotReader::new(&mut input, 100)
            .read_to_end(&mut out)
            .map(|_| out);
        (r, input.to_vec())
    }

    #[test]
    fn dot_ends_data_and_stuffing_is_removed() {
        let (r, rest) = read_all(b"a\r\n..b\n.c\r\n.\r\nQUIT\r\n");
        assert_eq!(r.unwrap(), b"a\r\n.b\nc\r\n");
        assert_eq!(rest, b"QUIT\r\n");
        let (r, _) = read_all(b"x\n.\n");
        assert_eq!(r.unwrap(), b"x\n");
    }

    #[test]
    fn eof_and_size_are_errors() {
        let (r, _) = read_all(b"no end\r\n");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let big = [b"x".repeat(200), b"\r\n.\r\n".to_vec()].concat();
        let (r, _) = read_all(&big);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::FileTooLarge);
    }
}
