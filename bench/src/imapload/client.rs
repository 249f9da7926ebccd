//! A minimal IMAP client for load: tagged commands, responses read whole
//! (literals included) and counted.

use crate::stream::{connect, Stream};
use crate::tls::TlsClient;
use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// What a command's response held.
#[derive(Debug, Default)]
pub struct Response {
    pub untagged: u64,
    pub octets: u64,
    pub literal_octets: u64,
    /// The `* n EXISTS` count, when one came.
    pub exists: Option<u32>,
}

pub struct Client {
    io: BufReader<Stream>,
    next_tag: u64,
    /// Every SEARCH response's numbers, counted.
    pub search_hits: u64,
}

impl Client {
    /// Connect (with TLS from the start when `tls` is given) and read the
    /// greeting. `buffer` is the read buffer's capacity: small for many
    /// idle connections, large for bulk fetches.
    pub async fn connect(server: &str, tls: Option<&TlsClient>, buffer: usize) -> Result<Client> {
        let stream = connect(server, tls).await?;
        let mut c = Client {
            io: BufReader::with_capacity(buffer, stream),
            next_tag: 1,
            search_hits: 0,
        };
        let mut line = Vec::new();
        c.io.read_until(b'\n', &mut line).await?;
        if !line.starts_with(b"* OK") {
            bail!("greeting: {}", String::from_utf8_lossy(&line).trim_end());
        }
        Ok(c)
    }

    fn quote(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }

    pub async fn login(&mut self, user: &str, password: &str) -> Result<()> {
        let cmd = format!("LOGIN {} {}", Self::quote(user), Self::quote(password));
        self.command(&cmd).await.map(|_| ())
    }

    /// SELECT; returns the message count.
    pub async fn select(&mut self, mailbox: &str) -> Result<u32> {
        let r = self
            .command(&format!("SELECT {}", Self::quote(mailbox)))
            .await?;
        r.exists.context("no EXISTS in the SELECT response")
    }

    /// Send IDLE and wait for the continuation.
    pub async fn start_idle(&mut self) -> Result<()> {
        let tag = format!("i{}", self.next_tag);
        self.next_tag += 1;
        self.io
            .get_mut()
            .write_all(format!("{tag} IDLE\r\n").as_bytes())
            .await?;
        self.io.get_mut().flush().await?;
        let mut line = Vec::new();
        loop {
            line.clear();
            if self.io.read_until(b'\n', &mut line).await? == 0 {
                bail!("connection closed");
            }
            if line.starts_with(b"+") {
                return Ok(());
            }
            if !line.starts_with(b"*") {
                bail!("IDLE: {}", String::from_utf8_lossy(&line).trim_end());
            }
        }
    }

    /// Run a command; fails unless it ends in OK.
    pub async fn command(&mut self, command: &str) -> Result<Response> {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        self.io
            .get_mut()
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        self.io.get_mut().flush().await?;
        let mut r = Response::default();
        let mut line = Vec::new();
        let mut literal = Vec::new();
        loop {
            line.clear();
            if self.io.read_until(b'\n', &mut line).await? == 0 {
                bail!("connection closed during {command}");
            }
            r.octets += line.len() as u64;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                let status = &line[tag.len() + 1..];
                if status.starts_with(b"OK") {
                    return Ok(r);
                }
                bail!("{command}: {}", String::from_utf8_lossy(&line).trim_end());
            }
            if line.starts_with(b"* ") {
                r.untagged += 1;
                let text = String::from_utf8_lossy(&line);
                let mut words = text.split_whitespace().skip(1);
                match (words.next(), words.next()) {
                    (Some(n), Some("EXISTS")) => r.exists = n.parse().ok(),
                    (Some("SEARCH"), next) => {
                        self.search_hits += next.map_or(0, |_| 1) + words.count() as u64;
                    }
                    _ => {}
                }
            }
            // A line ending in {n} announces n octets of literal.
            let mut rest = line.as_slice();
            while let Some(n) = literal_length(rest) {
                literal.resize(n, 0);
                self.io.read_exact(&mut literal).await?;
                r.octets += n as u64;
                r.literal_octets += n as u64;
                line.clear();
                self.io.read_until(b'\n', &mut line).await?;
                r.octets += line.len() as u64;
                rest = line.as_slice();
            }
        }
    }
}

fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n")?;
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&c| c == b'{')?;
    std::str::from_utf8(&inner[open + 1..]).ok()?.parse().ok()
}
