//! Writing a session's output: responses and message files (LF line ends
//! turned into CRLF) gathered into writes of about [`WRITE_AT`] octets.
//! Files are read in place on the runtime's thread, many at a time: one
//! `block_in_place` per write rather than two per message.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::output::{Chunk, CrlfEncoder};

/// Octets gathered before a write: a whole `FETCH 1:* BODY[]` goes out
/// in a few writes instead of two or three per message.
const WRITE_AT: usize = 64 * 1024;

/// Send `chunks` in order, then flush.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, chunks: Vec<Chunk>) -> io::Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let mut gather = Gather {
        chunks: chunks.into_iter(),
        source: None,
        pending: Vec::new(),
        scratch: Vec::new(),
    };
    loop {
        let more = tokio::task::block_in_place(|| gather.fill())?;
        if !gather.pending.is_empty() {
            w.write_all(&gather.pending).await?;
            gather.pending.clear();
        }
        if !more {
            return w.flush().await;
        }
    }
}

/// Output being gathered; its buffers live for one `send`, so an idle
/// session holds none.
struct Gather {
    chunks: std::vec::IntoIter<Chunk>,
    /// The message file being read, when a write cut it.
    source: Option<Source>,
    pending: Vec<u8>,
    /// File reads, reused from file to file.
    scratch: Vec<u8>,
}

/// Where the octets of a literal still come from.
enum Source {
    File {
        file: File,
        encoder: CrlfEncoder,
        remaining: u64,
        path: PathBuf,
    },
    /// The file vanished or is shorter than the literal announced: spaces,
    /// so the stream stays in step.
    Padding(u64),
}

impl Gather {
    /// Gather up to [`WRITE_AT`] octets; false once everything is in
    /// `pending`. A file that cannot be read ends the session: spaces in
    /// its place would be cached by the client as the message.
    fn fill(&mut self) -> io::Result<bool> {
        while self.pending.len() < WRITE_AT {
            match self.source.take() {
                Some(source) => self.source = self.read(source)?,
                None => match self.chunks.next() {
                    None => return Ok(false),
                    Some(Chunk::Bytes(b)) => self.pending.extend_from_slice(&b),
                    Some(Chunk::File { path, len }) => {
                        self.source = Some(match open(&path) {
                            Some(file) => Source::File {
                                file,
                                encoder: CrlfEncoder::default(),
                                remaining: len,
                                path,
                            },
                            None => Source::Padding(len),
                        });
                    }
                },
            }
        }
        Ok(true)
    }

    /// Move up to a write's worth of `source` into `pending`; what is left
    /// of it.
    fn read(&mut self, source: Source) -> io::Result<Option<Source>> {
        let room = WRITE_AT.saturating_sub(self.pending.len()).max(1);
        match source {
            Source::Padding(remaining) => {
                let take = room.min(usize::try_from(remaining).unwrap_or(usize::MAX));
                self.pending.resize(self.pending.len() + take, b' ');
                let left = remaining - take as u64;
                Ok((left > 0).then_some(Source::Padding(left)))
            }
            Source::File {
                mut file,
                mut encoder,
                remaining,
                path,
            } => {
                // The file holds at most `remaining` octets more (CRLF
                // only adds): a small message is read whole at once.
                let want = room.min(usize::try_from(remaining).unwrap_or(usize::MAX));
                self.scratch.resize(want.max(1), 0);
                let n = loop {
                    match file.read(&mut self.scratch) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::error!("{}: {e}", path.display());
                            return Err(e);
                        }
                    }
                };
                if n == 0 {
                    if remaining > 0 {
                        tracing::error!("{}: shorter than its size; padded", path.display());
                        return Ok(Some(Source::Padding(remaining)));
                    }
                    return Ok(None);
                }
                let start = self.pending.len();
                encoder.encode(&self.scratch[..n], &mut self.pending);
                // As `wire::literal`: no NUL in a literal (RFC 9051 4.3).
                let added = &mut self.pending[start..];
                if memchr::memchr(0, added).is_some() {
                    for b in added.iter_mut().filter(|b| **b == 0) {
                        *b = 0x80;
                    }
                }
                let added = (self.pending.len() - start) as u64;
                let take = added.min(remaining);
                self.pending.truncate(start + take as usize);
                let left = remaining - take;
                Ok((left > 0).then_some(Source::File {
                    file,
                    encoder,
                    remaining: left,
                    path,
                }))
            }
        }
    }
}

/// The message file at `path`, or where another session's flag change
/// renamed it.
fn open(path: &Path) -> Option<File> {
    File::open(path)
        .ok()
        .or_else(|| renamed(path).and_then(|p| File::open(p).ok()))
}

/// Where a message file went when another session changed its flags
/// (same base name in `cur/`, any info).
fn renamed(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let base = name.split(':').next()?;
    let cur = path.parent()?.parent()?.join("cur");
    let prefix = format!("{base}:");
    std::fs::read_dir(&cur).ok()?.flatten().find_map(|e| {
        let n = e.file_name();
        let n = n.to_str()?;
        (n == base || n.starts_with(&prefix)).then(|| cur.join(n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(chunks: Vec<Chunk>) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut out = Vec::new();
            send(&mut out, chunks).await.unwrap();
            out
        })
    }

    #[test]
    fn files_are_sent_with_crlf_cut_or_padded_to_their_literal() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"a\nb\n").unwrap();
        // Bigger than a write, with a line end across the reads.
        let big = dir.path().join("big");
        let mut content = vec![b'x'; WRITE_AT - 1];
        content.extend_from_slice(b"\ny\n");
        std::fs::write(&big, &content).unwrap();
        let out = sent(vec![
            Chunk::Bytes(b"* 1 FETCH (BODY[] {6}\r\n".to_vec()),
            Chunk::File {
                path: small.clone(),
                len: 6,
            },
            Chunk::Bytes(b")\r\n".to_vec()),
            Chunk::File {
                path: big,
                len: WRITE_AT as u64 + 4,
            },
            Chunk::File {
                path: small.clone(),
                len: 4,
            },
            Chunk::File {
                path: dir.path().join("gone"),
                len: 3,
            },
            Chunk::File {
                path: small,
                len: 8,
            },
        ]);
        let mut expected = b"* 1 FETCH (BODY[] {6}\r\na\r\nb\r\n)\r\n".to_vec();
        expected.extend_from_slice(&vec![b'x'; WRITE_AT - 1]);
        expected.extend_from_slice(b"\r\ny\r\n");
        expected.extend_from_slice(b"a\r\nb");
        expected.extend_from_slice(b"   ");
        expected.extend_from_slice(b"a\r\nb\r\n  ");
        assert_eq!(out, expected);
    }

    #[test]
    fn a_moved_file_is_found_in_cur() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["new", "cur"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("cur/1.M2P3.h,S=2:2,S"), b"z\n").unwrap();
        let out = sent(vec![Chunk::File {
            path: dir.path().join("new/1.M2P3.h,S=2"),
            len: 3,
        }]);
        assert_eq!(out, b"z\r\n");
    }
}
