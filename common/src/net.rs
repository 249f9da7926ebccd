//! Listening sockets, made the same way by every daemon.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Mutex;

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Pending connections the kernel may hold for us.
const BACKLOG: i32 = 1024;

/// A non-blocking listener on `addr`. IPv6 sockets are IPv6-only, so that
/// `0.0.0.0:25` and `[::]:25` can both be listed; SO_REUSEADDR lets a
/// restarted daemon bind while old connections are in TIME_WAIT.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Accept connections on `listener` and hand each to `on_accept` until
/// `shutdown` turns true. Accept errors (EMFILE and friends) back off
/// briefly instead of spinning.
pub async fn accept_loop<F>(
    listener: tokio::net::TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut on_accept: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr),
{
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => on_accept(stream, peer),
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A line read by [`read_line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// A whole line, through its LF, is in the buffer.
    Complete,
    /// The line was longer than allowed; it was consumed and dropped.
    TooLong,
    /// The peer closed the connection.
    Eof,
}

/// Read one line (through LF) into `line`, keeping at most `max` bytes so
/// no client can make us buffer more.
pub async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    line.clear();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long && line.len() + n <= max {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
        }
        reader.consume(n);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

/// Counts open sessions overall and per client address, and gives the
/// memory of closed sessions back to the system once many have closed.
#[derive(Default)]
pub struct ConnectionLimiter {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    per_client: HashMap<IpAddr, usize>,
    total: usize,
    /// The most sessions open at once since memory was last given back.
    high_water: usize,
}

/// Sessions that must have closed since the high-water mark before the
/// allocator's free memory is given back (each session leaves some tens
/// of KiB that the allocator would otherwise keep).
const RELEASE_AFTER_CLOSED: usize = 256;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_total` sessions are open.
    Total,
    /// `max_per_client` sessions from this address are open.
    PerClient,
}

/// A session's place, given back when dropped.
pub struct ConnectionSlot<'a> {
    limiter: &'a ConnectionLimiter,
    ip: IpAddr,
}

impl ConnectionLimiter {
    /// Admit a session from `ip` if both limits allow it.
    pub fn admit(
        &self,
        ip: IpAddr,
        max_total: usize,
        max_per_client: usize,
    ) -> Result<ConnectionSlot<'_>, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= max_total {
            return Err(Refusal::Total);
        }
        let n = counts.per_client.entry(ip).or_insert(0);
        if *n >= max_per_client {
            return Err(Refusal::PerClient);
        }
        *n += 1;
        counts.total += 1;
        counts.high_water = counts.high_water.max(counts.total);
        Ok(ConnectionSlot { limiter: self, ip })
    }

    /// Sessions open now.
    pub fn active(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&self.ip);
            }
        }
        counts.total = counts.total.saturating_sub(1);
        // After a flood, or the end of a busy hour: half or more of the
        // sessions are gone, and at least a few hundred; or the last of
        // several. The trim waits for the closing to stop.
        let gone = counts.high_water - counts.total;
        if gone >= RELEASE_AFTER_CLOSED && counts.total <= counts.high_water / 2
            || counts.total == 0 && gone > 1
        {
            counts.high_water = counts.total;
            drop(counts);
            crate::memory::release_free_memory();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_per_client_and_total() {
        let l = ConnectionLimiter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.admit(a, 3, 2).unwrap();
        let _s2 = l.admit(a, 3, 2).unwrap();
        assert_eq!(l.admit(a, 3, 2).err(), Some(Refusal::PerClient));
        let _s3 = l.admit(b, 3, 2).unwrap();
        assert_eq!(l.admit(b, 3, 2).err(), Some(Refusal::Total));
        drop(s1);
        assert_eq!(l.active(), 2);
        assert!(l.admit(a, 3, 2).is_ok());
    }

    #[tokio::test]
    async fn read_line_bounds_and_reports() {
        let input: &[u8] = b"short\r\nthis line is too long\r\nlast";
        let mut r = BufReader::new(input);
        let mut line = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut line, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(line, b"short\r\n");
        assert_eq!(
            read_line(&mut r, &mut line, 10).await.unwrap(),
            Line::TooLong
        );
        assert_eq!(read_line(&mut r, &mut line, 10).await.unwrap(), Line::Eof);
    }

    #[test]
    fn v4_and_v6_wildcards_coexist() {
        let v4 = bind_listener("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        // Only when the host has IPv6 at all.
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            bind_listener(format!("[::]:{port}").parse().unwrap()).unwrap();
        }
    }
}
