//! The client side of SMTP: reply parsing and a connection, over TCP or
//! TLS (STARTTLS or implicit) and optionally logged in with AUTH PLAIN, whose
//! reads are bounded in size and every network operation in time.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::ClientConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use crate::tls::TlsClient;

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

    /// The SASL mechanisms an EHLO reply advertises, if it advertises AUTH
    /// (`AUTH PLAIN LOGIN`, or the old `AUTH=PLAIN LOGIN` form).
    pub fn auth_mechanisms(&self) -> Option<Vec<&str>> {
        self.lines.iter().skip(1).find_map(|line| {
            let mut words = line.split_ascii_whitespace();
            let first = words.next()?;
            if first.eq_ignore_ascii_case("AUTH") {
                return Some(words.collect());
            }
            let old = first
                .get(..5)
                .is_some_and(|k| k.eq_ignore_ascii_case("AUTH="));
            old.then(|| std::iter::once(&first[5..]).chain(words).collect())
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

/// How connections are secured beyond TCP.
#[derive(Clone)]
pub enum Security {
    /// Plain TCP.
    Plain,
    /// STARTTLS after the first EHLO (RFC 3207).
    StartTls(TlsClient),
    /// TLS from the connect (RFC 8314).
    Implicit(TlsClient),
}

/// How every connection of the run is set up.
#[derive(Clone)]
pub struct Setup {
    pub security: Security,
    /// The AUTH PLAIN initial response (see [`plain_response`]), if the
    /// client logs in.
    pub auth_plain: Option<String>,
}

/// The server answered AUTH with something else than 235.
#[derive(Debug)]
pub struct AuthRefused(pub Reply);

impl fmt::Display for AuthRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AUTH refused: {}", self.0)
    }
}

impl std::error::Error for AuthRefused {}

/// The SASL PLAIN message (RFC 4616) of `user` with `password` and no
/// authorization identity, base64-encoded for AUTH (RFC 4954).
pub fn plain_response(user: &str, password: &str) -> String {
    BASE64.encode(format!("\0{user}\0{password}"))
}

/// The byte stream under the SMTP session.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Writes all of `data` and pushes it out of TLS's buffer.
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
        }
    }

    /// Closes the sending side (with a TLS close_notify first).
    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
        }
    }
}

/// An SMTP connection past the greeting and EHLO (and TLS and AUTH when
/// asked for): ready for MAIL.
pub struct Connection {
    stream: Stream,
    /// Received bytes not yet parsed; never longer than [`MAX_BUFFERED`].
    buf: Vec<u8>,
    io_timeout: Duration,
    /// Whether EHLO advertised PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// Whether EHLO advertised SIZE (RFC 1870).
    pub size: bool,
    /// Duration of the TLS handshake, if there was one.
    pub tls_handshake: Option<Duration>,
    /// Protocol version, cipher suite and key exchange group of the TLS
    /// session, if there is one.
    pub tls_session: Option<String>,
    /// AUTH command to its 235 reply, if the client logged in.
    pub auth: Option<Duration>,
}

impl Connection {
    /// Connects to `addr`, does TLS first if `setup` says so, reads the
    /// greeting and introduces itself with EHLO (HELO if the server does not
    /// know EHLO and neither STARTTLS nor AUTH is needed), then does
    /// STARTTLS and EHLO again and AUTH if `setup` says so.
    ///
    /// A refused AUTH is an [`AuthRefused`] error (after a QUIT).
    pub async fn open(addr: SocketAddr, io_timeout: Duration, setup: &Setup) -> Result<Self> {
        let stream = timeout(io_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr}: timed out after {io_timeout:?}"))?
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let helo_name = address_literal(stream.local_addr().context("local address")?.ip());
        let mut conn = Connection {
            stream: Stream::Plain(stream),
            buf: Vec::with_capacity(READ_CHUNK),
            io_timeout,
            pipelining: false,
            size: false,
            tls_handshake: None,
            tls_session: None,
            auth: None,
        };
        if let Security::Implicit(client) = &setup.security {
            conn = conn.start_tls(client).await?;
        }
        let greeting = conn.read_reply().await.context("greeting")?;
        if greeting.code != 220 {
            bail!("greeting: {greeting}");
        }
        let helo_allowed = matches!(setup.security, Security::Plain) && setup.auth_plain.is_none();
        let mut ehlo = conn.ehlo(&helo_name, helo_allowed).await?;
        if let Security::StartTls(client) = &setup.security {
            if !ehlo.has_extension("STARTTLS") {
                bail!("the server does not offer STARTTLS");
            }
            let reply = conn.command("STARTTLS").await?;
            if reply.code != 220 {
                bail!("STARTTLS refused: {reply}");
            }
            if !conn.buf.is_empty() {
                // RFC 3207 6: nothing sent before TLS may count after it.
                bail!("the server sent more than its reply to STARTTLS before TLS");
            }
            conn = conn.start_tls(client).await?;
            ehlo = conn.ehlo(&helo_name, false).await?;
        }
        if let Some(initial) = &setup.auth_plain {
            if let Err(e) = conn.auth_plain(&ehlo, initial).await {
                if e.is::<AuthRefused>() {
                    conn.quit().await;
                }
                return Err(e);
            }
        }
        conn.pipelining = ehlo.has_extension("PIPELINING");
        conn.size = ehlo.has_extension("SIZE");
        Ok(conn)
    }

    /// Sends EHLO and returns its 250 reply; when `helo_allowed`, falls
    /// back to HELO (whose reply advertises nothing) if EHLO is unknown.
    async fn ehlo(&mut self, helo_name: &str, helo_allowed: bool) -> Result<Reply> {
        let ehlo = self.command(&format!("EHLO {helo_name}")).await?;
        if ehlo.code == 250 {
            return Ok(ehlo);
        }
        if helo_allowed && matches!(ehlo.code, 500 | 502) {
            let helo = self.command(&format!("HELO {helo_name}")).await?;
            if !helo.is_positive() {
                bail!("HELO refused: {helo}");
            }
            return Ok(helo);
        }
        bail!("EHLO refused: {ehlo}")
    }

    /// The TLS handshake on the plain connection, bounded by the I/O timeout.
    async fn start_tls(mut self, client: &TlsClient) -> Result<Self> {
        let Stream::Plain(tcp) = self.stream else {
            bail!("TLS is already active");
        };
        let started = Instant::now();
        let tls = timeout(
            self.io_timeout,
            client.connector.connect(client.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| anyhow!("TLS handshake: timed out after {:?}", self.io_timeout))?
        .context("TLS handshake")?;
        self.tls_handshake = Some(started.elapsed());
        self.tls_session = Some(describe_session(tls.get_ref().1));
        self.stream = Stream::Tls(Box::new(tls));
        Ok(self)
    }

    /// AUTH PLAIN with the initial response `initial`, if `ehlo` offers it.
    async fn auth_plain(&mut self, ehlo: &Reply, initial: &str) -> Result<()> {
        let Some(mechanisms) = ehlo.auth_mechanisms() else {
            if matches!(self.stream, Stream::Plain(_)) {
                bail!("the server does not offer AUTH (over plain TCP; see --tls)");
            }
            bail!("the server does not offer AUTH");
        };
        if !mechanisms.iter().any(|m| m.eq_ignore_ascii_case("PLAIN")) {
            bail!(
                "the server does not offer AUTH PLAIN, only {}",
                mechanisms.join(" ")
            );
        }
        let started = Instant::now();
        let reply = self.command(&format!("AUTH PLAIN {initial}")).await?;
        if reply.code != 235 {
            return Err(AuthRefused(reply).into());
        }
        self.auth = Some(started.elapsed());
        Ok(())
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

    /// Ends the session politely (QUIT, then TLS close_notify). Errors are
    /// ignored: the connection is dropped either way and no message
    /// depends on it.
    pub async fn quit(mut self) {
        if self.command("QUIT").await.is_ok() {
            let _ = timeout(self.io_timeout, self.stream.shutdown()).await;
        }
    }
}

/// Protocol version, cipher suite and key exchange group of a TLS session.
fn describe_session(session: &ClientConnection) -> String {
    let unknown = || "?".to_owned();
    format!(
        "{}, {}, {}",
        session
            .protocol_version()
            .map_or_else(unknown, |v| format!("{v:?}")),
        session
            .negotiated_cipher_suite()
            .map_or_else(unknown, |s| format!("{:?}", s.suite())),
        session
            .negotiated_key_exchange_group()
            .map_or_else(unknown, |g| format!("{:?}", g.name())),
    )
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
    fn auth_mechanisms() {
        let (reply, _) = parse(
            "250-mx.example.test\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 SIZE 1000\r\n",
        )
        .expect("complete");
        assert_eq!(reply.auth_mechanisms(), Some(vec!["PLAIN", "LOGIN"]));
        let (old, _) = parse("250-mx\r\n250-AUTH=LOGIN plain\r\n250 HELP\r\n").expect("complete");
        assert_eq!(old.auth_mechanisms(), Some(vec!["LOGIN", "plain"]));
        let (none, _) = parse("250-AUTH PLAIN\r\n250 STARTTLS\r\n").expect("complete");
        assert_eq!(
            none.auth_mechanisms(),
            None,
            "greeting line is no extension"
        );
        let (bare, _) = parse("250-mx\r\n250 auth\r\n").expect("complete");
        assert_eq!(bare.auth_mechanisms(), Some(vec![]));
        let (other, _) = parse("250-mx\r\n250 AUTHX PLAIN\r\n").expect("complete");
        assert_eq!(other.auth_mechanisms(), None);
    }

    #[test]
    fn plain_responses() {
        // RFC 4616 section 4, without authorization identity.
        assert_eq!(
            plain_response("tim", "tanstaaftanstaaf"),
            "AHRpbQB0YW5zdGFhZnRhbnN0YWFm"
        );
        assert_eq!(
            plain_response("u2@example.test", "pw"),
            BASE64.encode(b"\0u2@example.test\0pw")
        );
        let decoded = BASE64
            .decode(plain_response("ü@x.test", "pä ss"))
            .expect("base64");
        assert_eq!(decoded, "\0ü@x.test\0pä ss".as_bytes());
    }

    #[test]
    fn auth_refusal_is_recognisable() {
        let (reply, _) =
            parse("535 5.7.8 Authentication credentials invalid\r\n").expect("complete");
        let e = anyhow::Error::from(AuthRefused(reply));
        assert!(e.is::<AuthRefused>());
        assert_eq!(
            e.to_string(),
            "AUTH refused: 535 5.7.8 Authentication credentials invalid"
        );
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
