//! What a session sends: response bytes, and message files to stream
//! with their LF line ends turned into CRLF, so a large message never
//! has to sit in memory.

use std::path::PathBuf;

/// A piece of output, in order.
#[derive(Debug)]
pub enum Chunk {
    Bytes(Vec<u8>),
    /// Exactly `len` octets: the file with CRLF line ends (padded with
    /// spaces or cut if the file does not match its announced size, so
    /// the literal stays well-formed).
    File {
        path: PathBuf,
        len: u64,
    },
}

/// A session's pending output.
#[derive(Debug, Default)]
pub struct Output {
    chunks: Vec<Chunk>,
    current: Vec<u8>,
    /// What `chunks` holds, kept as they are pushed: asked after every
    /// message of a large FETCH, so never counted by walking them.
    tally: Tally,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Octets of the `Bytes` chunks.
    bytes: usize,
    /// Octets the `File` chunks will send.
    file_octets: u64,
    files: usize,
}

impl Tally {
    fn add(&mut self, chunk: &Chunk) {
        match chunk {
            Chunk::Bytes(b) => self.bytes += b.len(),
            Chunk::File { len, .. } => {
                self.file_octets += len;
                self.files += 1;
            }
        }
    }

    fn remove(&mut self, chunk: &Chunk) {
        match chunk {
            Chunk::Bytes(b) => self.bytes -= b.len(),
            Chunk::File { len, .. } => {
                self.file_octets -= len;
                self.files -= 1;
            }
        }
    }
}

impl Output {
    /// The buffer responses are written into.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.current
    }

    /// Append a line (CRLF added).
    pub fn line(&mut self, text: &str) {
        self.current.extend_from_slice(text.as_bytes());
        self.current.extend_from_slice(b"\r\n");
    }

    fn push(&mut self, chunk: Chunk) {
        self.tally.add(&chunk);
        self.chunks.push(chunk);
    }

    fn close_current(&mut self) {
        if !self.current.is_empty() {
            let bytes = std::mem::take(&mut self.current);
            self.push(Chunk::Bytes(bytes));
        }
    }

    /// Stream a message file here.
    pub fn file(&mut self, path: PathBuf, len: u64) {
        self.close_current();
        self.push(Chunk::File { path, len });
    }

    /// Octets held in memory (message files not counted).
    pub fn buffered(&self) -> usize {
        self.current.len() + self.tally.bytes
    }

    /// A point to go back to with [`Output::rollback`].
    pub fn mark(&self) -> (usize, usize) {
        (self.chunks.len(), self.current.len())
    }

    /// Drop what was written since `mark`.
    pub fn rollback(&mut self, (chunks, current): (usize, usize)) {
        if self.chunks.len() > chunks {
            for chunk in &self.chunks[chunks..] {
                self.tally.remove(chunk);
            }
            // Output went into chunks since the mark: the mark's bytes are
            // the head of the first of them.
            let mut first = match self.chunks.drain(chunks..).next() {
                Some(Chunk::Bytes(b)) => b,
                _ => Vec::new(),
            };
            first.truncate(current);
            self.current = first;
        } else {
            self.current.truncate(current);
        }
    }

    /// Whether message files wait to be streamed: they must go out before
    /// the next command can rename or remove them.
    pub fn has_files(&self) -> bool {
        self.tally.files > 0
    }

    /// Octets waiting (files counted by length), to decide when to flush.
    pub fn pending(&self) -> u64 {
        (self.current.len() + self.tally.bytes) as u64 + self.tally.file_octets
    }

    /// Take everything written so far.
    pub fn take(&mut self) -> Vec<Chunk> {
        self.close_current();
        self.tally = Tally::default();
        std::mem::take(&mut self.chunks)
    }
}

/// Turns LF line ends into CRLF across chunk boundaries.
#[derive(Debug, Default)]
pub struct CrlfEncoder {
    last: u8,
}

impl CrlfEncoder {
    /// Append `input` to `out` with every LF not preceded by CR made CRLF.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 16);
        let mut rest = input;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            let before = if i > 0 { rest[i - 1] } else { self.last };
            out.extend_from_slice(&rest[..i]);
            if before != b'\r' {
                out.push(b'\r');
            }
            out.push(b'\n');
            self.last = b'\n';
            rest = &rest[i + 1..];
        }
        if let Some(&b) = rest.last() {
            self.last = b;
        }
        out.extend_from_slice(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_across_chunks() {
        let mut e = CrlfEncoder::default();
        let mut out = Vec::new();
        e.encode(b"a\nb\r", &mut out);
        e.encode(b"\nc\n", &mut out);
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
        let mut out = Vec::new();
        let mut e = CrlfEncoder::default();
        e.encode(b"\n\n", &mut out);
        e.encode(b"", &mut out);
        e.encode(b"x\r\ny", &mut out);
        assert_eq!(out, b"\r\n\r\nx\r\ny");
    }

    #[test]
    fn chunks_keep_order() {
        let mut o = Output::default();
        o.line("* 1 FETCH (BODY[] {3}");
        o.file(PathBuf::from("/x"), 3);
        o.line(")");
        assert_eq!(o.pending(), 23 + 3 + 3);
        let c = o.take();
        assert_eq!(c.len(), 3);
        assert!(matches!(&c[1], Chunk::File { len: 3, .. }));
        assert!(o.take().is_empty());
        o.line("kept");
        let mark = o.mark();
        o.line("* 2 FETCH (BODY[] {3}");
        o.file(PathBuf::from("/y"), 3);
        o.line(")");
        o.rollback(mark);
        assert!(!o.has_files());
        assert_eq!(o.buffered(), 6);
    }
}
