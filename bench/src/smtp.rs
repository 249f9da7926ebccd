//! The client side of SMTP: reply parsing and a connection whose reads are
//! bounded in size and every network operation in time.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Most bytes of unparsed server output held at once; a reply that does not
/// end within this many bytes is an error.
const MAX_BUFFERED: usize = 64 * 1024;

/// Size of one socket read.
const READ_CHUNK: usize = 8 * 1024;

/// One SMTP reply, possibly of several lines (RFC 5321 section 4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code, the same on every line.
    pub code: u16,
    /// The text of each line, without the code, the separator and the CRLF.
    pub lines: Vec<String>,
}

impl Reply {
    /// Whether the reply is a 2xx success.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Whether the server closes the connection after this reply.
    pub fn closes_connection(&self) -> bool {
        self.code == 421
    }

    /// Whether an EHLO reply advertises `keyword` (case-insensitive).
    /// The first line is the greeting, extensions follow one per line.
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|word| word.eq_ignore_ascii_case(keyword))
        })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// Parses the first complete reply in `buf`.
///
/// Returns `Ok(None)` while the reply is incomplete, otherwise the reply and
/// the number of bytes it took. Lines end in CRLF (a bare LF is tolerated).
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>> {
    let mut pos = 0;
    let mut lines = Vec::new();
    let mut code = None;
    while let Some(len) = buf[pos..].iter().position(|&b| b == b'\n') {
        let raw = &buf[pos..pos + len];
        pos += len + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let (line_code, last, text) = parse_line(line)?;
        if *code.get_or_insert(line_code) != line_code {
            bail!(
                "reply line {:?} changes the reply code",
                String::from_utf8_lossy(line)
            );
        }
        lines.push(text);
        if last {
            return Ok(Some((
                Reply {
                    code: line_code,
                    lines,
                },
                pos,
            )));
        }
    }
    Ok(None)
}

/// Splits a reply line into code, whether it is the last line, and text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, String)> {
    let malformed = || anyhow!("malformed reply line {:?}", excerpt(line));
    let digits = line.get(..3).ok_or_else(malformed)?;
    if !(b'2'..=b'5').contains(&digits[0]) || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match line.get(3) {
        None => (true, &line[3..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(malformed()),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// The start of `bytes` as text, for error messages.
fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(100)]).into_owned()
}

/// An SMTP connection past the greeting and EHLO.
pub struct Connection {
    stream: TcpStream,
    /// Received bytes not yet parsed; never longer than [`MAX_BUFFERED`].
    buf: Vec<u8>,
    io_timeout: Duration,
    /// Whether EHLO advertised PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// Whether EHLO advertised SIZE (RFC 1870).
    pub size: bool,
}

impl Connection {
    /// Connects to `addr`, reads the greeting and introduces itself with EHLO
    /// (HELO if the server does not know EHLO).
    pub async fn open(addr: SocketAddr, io_timeout: Duration) -> Result<Self> {
        let stream = timeout(io_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr}: timed out after {io_timeout:?}"))?
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let helo_name = address_literal(stream.local_addr().context("local address")?.ip());
        let mut conn = Connection {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            io_timeout,
            pipelining: false,
            size: false,
        };
        let greeting = conn.read_reply().await.context("greeting")?;
        if greeting.code != 220 {
            bail!("greeting: {greeting}");
        }
        let ehlo = conn.command(&format!("EHLO {helo_name}")).await?;
        if ehlo.code == 250 {
            conn.pipelining = ehlo.has_extension("PIPELINING");
            conn.size = ehlo.has_extension("SIZE");
        } else if matches!(ehlo.code, 500 | 502) {
            let helo = conn.command(&format!("HELO {helo_name}")).await?;
            if !helo.is_positive() {
                bail!("HELO refused: {helo}");
            }
        } else {
            bail!("EHLO refused: {ehlo}");
        }
        Ok(conn)
    }

    /// Writes `data` as it is.
    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        timeout(self.io_timeout, self.stream.write_all(data))
            .await
            .map_err(|_| anyhow!("write timed out after {:?}", self.io_timeout))?
            .context("write")
    }

    /// Sends one command line (without CRLF) and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        let verb = line.split(' ').next().unwrap_or(line);
        self.read_reply()
            .await
            .with_context(|| format!("reply to {verb}"))
    }

    /// Reads the next reply.
    pub async fn read_reply(&mut self) -> Result<Reply> {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            if self.buf.len() >= MAX_BUFFERED {
                bail!("reply longer than {MAX_BUFFERED} bytes");
            }
            let mut chunk = [0u8; READ_CHUNK];
            let room = (MAX_BUFFERED - self.buf.len()).min(READ_CHUNK);
            let n = timeout(self.io_timeout, self.stream.read(&mut chunk[..room]))
                .await
                .map_err(|_| anyhow!("no reply within {:?}", self.io_timeout))?
                .context("read")?;
            if n == 0 {
                bail!("connection closed by the server");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Ends the session politely. Errors are ignored: the connection is
    /// dropped either way and no message depends on it.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT").await;
    }
}

/// The EHLO argument for a client without a host name: its address literal.
fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &str) -> Option<(Reply, usize)> {
        parse_reply(input.as_bytes()).expect("well-formed")
    }

    #[test]
    fn single_line() {
        let (reply, used) = parse("250 2.0.0 Ok: queued as ABC\r\n").expect("complete");
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines, ["2.0.0 Ok: queued as ABC"]);
        assert_eq!(used, 29);
        assert!(reply.is_positive());
        assert_eq!(reply.to_string(), "250 2.0.0 Ok: queued as ABC");
    }

    #[test]
    fn code_only_and_bare_lf() {
        let (reply, used) = parse("354\n").expect("complete");
        assert_eq!(reply.code, 354);
        assert_eq!(reply.lines, [""]);
        assert_eq!(used, 4);
    }

    #[test]
    fn multi_line_ehlo() {
        let text = "250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250 HELP\r\n";
        let (reply, used) = parse(text).expect("complete");
        assert_eq!(used, text.len());
        assert_eq!(reply.lines.len(), 4);
        assert!(reply.has_extension("pipelining"));
        assert!(reply.has_extension("SIZE"));
        assert!(reply.has_extension("HELP"));
        assert!(
            !reply.has_extension("mx.example.test"),
            "greeting line is no extension"
        );
        assert!(!reply.has_extension("STARTTLS"));
    }

    #[test]
    fn incomplete() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("250 Ok"), None);
        assert_eq!(parse("250-first\r\n250-second\r\n"), None);
        assert_eq!(parse("250-first\r\n250 la"), None);
    }

    #[test]
    fn pipelined_replies_are_taken_one_at_a_time() {
        let buf = b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n354 Go ahead\r\n";
        let (first, used) = parse_reply(buf).expect("ok").expect("complete");
        assert_eq!(first.code, 250);
        let (second, used2) = parse_reply(&buf[used..]).expect("ok").expect("complete");
        assert_eq!(second.code, 550);
        assert!(!second.is_positive());
        let (third, used3) = parse_reply(&buf[used + used2..])
            .expect("ok")
            .expect("complete");
        assert_eq!(third.code, 354);
        assert_eq!(used + used2 + used3, buf.len());
    }

    #[test]
    fn malformed() {
        assert!(parse_reply(b"hello\r\n").is_err());
        assert!(parse_reply(b"25\r\n").is_err());
        assert!(parse_reply(b"2x0 Ok\r\n").is_err());
        assert!(parse_reply(b"650 Ok\r\n").is_err());
        assert!(parse_reply(b"250_Ok\r\n").is_err());
        assert!(parse_reply(b"250-one\r\n251 two\r\n").is_err());
    }

    #[test]
    fn multi_line_error_display() {
        let (reply, _) = parse("421-4.7.0 Too many\r\n421 4.7.0 Bye\r\n").expect("complete");
        assert!(reply.closes_connection());
        assert_eq!(reply.to_string(), "421 4.7.0 Too many / 4.7.0 Bye");
    }

    #[test]
    fn helo_names() {
        assert_eq!(
            address_literal("127.0.0.1".parse().expect("ip")),
            "[127.0.0.1]"
        );
        assert_eq!(address_literal("::1".parse().expect("ip")), "[IPv6:::1]");
    }
}
