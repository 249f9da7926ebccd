//! A minimal POP3 client for load (RFC 1939): single-line and multi-line
//! responses read whole and counted; RETR one at a time or pipelined
//! (RFC 2449 PIPELINING: commands sent in batches, answers read in order).

use anyhow::{bail, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::stream::{connect, Stream};

/// Commands sent at once when pipelining RETR.
const PIPELINE_BATCH: u32 = 64;

pub struct Pop3 {
    io: BufReader<Stream>,
}

impl Pop3 {
    /// Connect, read the greeting, log in with USER and PASS.
    pub async fn login(server: &str, user: &str, password: &str) -> Result<Pop3> {
        let mut c = Pop3 {
            io: BufReader::with_capacity(256 * 1024, connect(server, None).await?),
        };
        c.status_line().await?;
        c.command(&format!("USER {user}")).await?;
        c.command(&format!("PASS {password}")).await?;
        Ok(c)
    }

    /// STAT: (messages, octets).
    pub async fn stat(&mut self) -> Result<(u64, u64)> {
        let line = self.command("STAT").await?;
        let mut words = line.split_whitespace().skip(1);
        match (words.next(), words.next()) {
            (Some(n), Some(octets)) => Ok((n.parse()?, octets.parse()?)),
            _ => bail!("STAT: {line}"),
        }
    }

    /// UIDL: the number of listed messages.
    pub async fn uidl(&mut self) -> Result<u64> {
        self.command("UIDL").await?;
        let (lines, _) = self.multi_line().await?;
        Ok(lines)
    }

    /// RETR 1..=count, one command at a time or in pipelined batches;
    /// returns the octets received.
    pub async fn retr(&mut self, count: u32, pipelined: bool) -> Result<u64> {
        let batch = if pipelined { PIPELINE_BATCH } else { 1 };
        let mut octets = 0;
        let mut next = 1;
        while next <= count {
            let last = (next + batch - 1).min(count);
            let commands: String = (next..=last).map(|i| format!("RETR {i}\r\n")).collect();
            self.send(&commands).await?;
            for _ in next..=last {
                self.status_line().await?;
                octets += self.multi_line().await?.1;
            }
            next = last + 1;
        }
        Ok(octets)
    }

    pub async fn quit(&mut self) -> Result<()> {
        self.command("QUIT").await.map(|_| ())
    }

    async fn send(&mut self, text: &str) -> Result<()> {
        self.io.get_mut().write_all(text.as_bytes()).await?;
        self.io.get_mut().flush().await?;
        Ok(())
    }

    /// Send one command; its `+OK` line, or an error with the `-ERR` line.
    async fn command(&mut self, command: &str) -> Result<String> {
        self.send(&format!("{command}\r\n")).await?;
        self.status_line().await.map_err(|e| {
            let verb = command.split(' ').next().unwrap_or(command);
            e.context(format!("POP3 {verb}"))
        })
    }

    async fn status_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.io.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        if !line.starts_with("+OK") {
            bail!("{}", line.trim_end());
        }
        Ok(line)
    }

    /// The lines of a multi-line response up to the terminating `.`:
    /// (lines, octets).
    async fn multi_line(&mut self) -> Result<(u64, u64)> {
        let mut line = Vec::new();
        let (mut lines, mut octets) = (0, 0);
        loop {
            line.clear();
            if self.io.read_until(b'\n', &mut line).await? == 0 {
                bail!("connection closed in a multi-line response");
            }
            if line == b".\r\n" {
                return Ok((lines, octets));
            }
            lines += 1;
            octets += line.len() as u64;
        }
    }
}
