//! Listening sockets, made the same way by every daemon.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

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

#[cfg(test)]
mod tests {
    use super::*;

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
