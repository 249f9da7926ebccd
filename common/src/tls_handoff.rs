//! How a daemon that has dropped root gets a renewed certificate and key it
//! may no longer read itself (ACME clients write keys readable by root
//! only): `master`, which stays root, reads the files when it is told to
//! reload and writes them into a pipe to each TLS daemon just before its
//! SIGHUP; the daemon takes the newest frame from the pipe.
//!
//! Frame: a tag byte (0: certificate and key follow; 1: master could not
//! read them, an error message follows), then each part as a 4-byte
//! big-endian length and its bytes.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::tls::Pem;

/// How long a daemon waits at SIGHUP for the frame master writes first.
const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// The environment variable naming the pipe's read end in a daemon.
pub const FD_ENV: &str = "MAILSRV_TLS_FD";

/// Longest part of a frame (a certificate chain, a key, a message).
const MAX_PART: usize = crate::tls::MAX_PEM_FILE;

/// The pipe's capacity, so a frame never has to wait for the daemon.
const PIPE_SIZE: i32 = 1 << 20;

/// What master could read: the files, or why not.
pub type Loaded = Result<Pem, String>;

/// The frame for `loaded`.
pub fn encode(loaded: &Loaded) -> Vec<u8> {
    fn part(out: &mut Vec<u8>, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(MAX_PART)];
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::new();
    match loaded {
        Ok(pem) => {
            out.push(0);
            part(&mut out, &pem.cert);
            part(&mut out, &pem.key);
        }
        Err(message) => {
            out.push(1);
            part(&mut out, message.as_bytes());
        }
    }
    out
}

/// Take every complete frame from the front of `buf`.
fn take_frames(buf: &mut Vec<u8>) -> Vec<Loaded> {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some((&tag, body)) = rest.split_first() else {
            break;
        };
        let parts = if tag == 0 { 2 } else { 1 };
        let mut cursor = body;
        let mut found = Vec::new();
        while found.len() < parts {
            let Some((len, tail)) = cursor.split_first_chunk::<4>() else {
                break;
            };
            let len = u32::from_be_bytes(*len) as usize;
            if tag > 1 || len > MAX_PART {
                // Nothing sane can follow: drop what is buffered.
                buf.clear();
                frames.push(Err("malformed certificate handoff from master".into()));
                return frames;
            }
            if tail.len() < len {
                break;
            }
            found.push(tail[..len].to_vec());
            cursor = &tail[len..];
        }
        if found.len() < parts {
            break;
        }
        at = buf.len() - cursor.len();
        let mut found = found.into_iter();
        frames.push(match (tag, found.next(), found.next()) {
            (0, Some(cert), Some(key)) => Ok(Pem { cert, key }),
            (_, Some(message), _) => Err(String::from_utf8_lossy(&message).into_owned()),
            _ => Err("malformed certificate handoff from master".into()),
        });
    }
    buf.drain(..at);
    frames
}

/// Master's end of one daemon's pipe.
pub struct Sender {
    pipe: File,
}

/// A new pipe: master's end, and the daemon's (to be inherited).
pub fn channel() -> io::Result<(Sender, OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Ignored where the limit is lower: frames are small.
    let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    fcntl(write.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((
        Sender {
            pipe: File::from(write),
        },
        read,
    ))
}

impl Sender {
    /// Write one frame, whole or not at all: a daemon that has not taken
    /// earlier frames must not make master wait or get half a frame.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let fd = self.pipe.as_raw_fd();
        let capacity = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETPIPE_SZ)? as usize;
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if unread as usize + frame.len() > capacity {
            return Err(io::Error::other(
                "the daemon has not taken earlier certificates",
            ));
        }
        self.pipe.write_all(frame)
    }
}

/// A daemon's end.
pub struct Receiver {
    pipe: tokio::net::unix::pipe::Receiver,
    buf: Vec<u8>,
}

impl Receiver {
    /// The pipe master gave this process (inside a tokio runtime), if any.
    pub fn from_env() -> io::Result<Option<Receiver>> {
        let Some(fd) = std::env::var(FD_ENV)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
        else {
            return Ok(None);
        };
        // Only take a descriptor that is open and a pipe.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETPIPE_SZ)?;
        // SAFETY: the descriptor was inherited for this purpose, is open
        // (checked above) and nothing else in this process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(owned)?;
        Ok(Some(Receiver {
            pipe,
            buf: Vec::new(),
        }))
    }

    /// The newest frame master sent, waiting up to `wait` for one.
    pub async fn latest(&mut self, wait: Duration) -> Loaded {
        let deadline = tokio::time::Instant::now() + wait;
        let mut newest = None;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(last) = take_frames(&mut self.buf).pop() {
                newest = Some(last);
            }
            match self.pipe.try_read(&mut chunk) {
                Ok(0) => return Err("master closed the certificate pipe".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(frame) = newest {
                        return frame;
                    }
                    match tokio::time::timeout_at(deadline, self.pipe.readable()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(format!("certificate pipe: {e}")),
                        Err(_) => return Err("no certificate from master".into()),
                    }
                }
                Err(e) => return Err(format!("certificate pipe: {e}")),
            }
        }
    }
}

/// The acceptor a reload gives a daemon: from master's pipe when there is
/// one, else read from the files named in `config` (a daemon started
/// alone, as its own user).
pub async fn reload_acceptor(
    handoff: Option<&mut Receiver>,
    config: &TlsConfig,
) -> Result<TlsAcceptor, String> {
    let pem = match handoff {
        Some(receiver) => receiver.latest(HANDOFF_WAIT).await?,
        None => crate::tls::read_pem(config).map_err(|e| e.to_string())?,
    };
    crate::tls::acceptor_from_pem(config, &pem).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(tag: &str) -> Pem {
        Pem {
            cert: format!("cert {tag}").into_bytes(),
            key: format!("key {tag}").into_bytes(),
        }
    }

    #[test]
    fn frames_round_trip_in_any_split() {
        let mut stream = encode(&Ok(pem("a")));
        stream.extend(encode(&Err("no key".into())));
        stream.extend(encode(&Ok(pem("b"))));
        for split in 0..stream.len() {
            let mut buf = stream[..split].to_vec();
            let mut frames = take_frames(&mut buf);
            buf.extend_from_slice(&stream[split..]);
            frames.extend(take_frames(&mut buf));
            assert!(buf.is_empty());
            assert_eq!(
                frames,
                vec![Ok(pem("a")), Err("no key".to_string()), Ok(pem("b"))]
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        let mut buf = vec![7, 0, 0, 0, 1, b'x'];
        assert!(take_frames(&mut buf)[0].is_err());
        assert!(buf.is_empty());
        let mut huge = vec![0, 0xff, 0xff, 0xff, 0xff];
        assert!(take_frames(&mut huge)[0].is_err());
    }

    #[tokio::test]
    async fn newest_frame_wins_and_silence_times_out() {
        let (mut tx, rx) = channel().unwrap();
        let mut rx = Receiver {
            pipe: tokio::net::unix::pipe::Receiver::from_owned_fd(rx).unwrap(),
            buf: Vec::new(),
        };
        tx.send(&encode(&Ok(pem("old")))).unwrap();
        tx.send(&encode(&Ok(pem("new")))).unwrap();
        assert_eq!(rx.latest(Duration::from_secs(1)).await, Ok(pem("new")));
        let e = rx.latest(Duration::from_millis(50)).await.unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }
}
