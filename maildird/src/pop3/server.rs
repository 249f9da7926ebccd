//! The POP3 I/O loop: listeners, TLS (implicit and STLS), timeouts,
//! logins, and streaming messages out of the Maildir.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::config::Config;
use common::net::{read_line, Line};
use common::recipients::DirectoryCache;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::command::{self, MAX_COMMAND_LINE};
use super::output::MessageEncoder;
use super::session::{Action, Session};
use crate::access::{handshake, Access, Settings};
use crate::login::{login, LoginError};
use crate::maildrop::{Maildrop, MaildropError};

/// A SASL response line may be longer than a command (RFC 5034 4).
const MAX_SASL_LINE: usize = 8192;

/// What every POP3 session shares.
pub struct Pop3Server {
    access: Access,
}

/// How a session on a plain connection ended.
enum Ended<S> {
    Closed,
    /// STLS accepted: hand the stream to TLS and go on with the session.
    StartTls(S, Session),
}

impl Pop3Server {
    /// A server for `config`; `tls` is the acceptor for STLS and pop3s.
    pub fn new(
        config: Config,
        tls: Option<TlsAcceptor>,
        directory: Arc<DirectoryCache>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Pop3Server> {
        Arc::new(Pop3Server {
            access: Access::new(config, tls, directory, shutdown),
        })
    }

    /// The shared state: reload and session count.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Accept connections until shutdown; `implicit_tls` for pop3s.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, implicit_tls: bool) {
        self.access
            .serve(listener, |stream, peer| {
                let server = self.clone();
                tokio::spawn(async move { server.connection(stream, peer, implicit_tls).await });
            })
            .await;
    }

    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        implicit_tls: bool,
    ) {
        let settings = self.access.settings();
        let ip = peer.ip();
        let refusal = b"-ERR [SYS/TEMP] Too many connections\r\n";
        let Some(_slot) = self
            .access
            .admit(&mut stream, ip, &settings, implicit_tls, refusal)
            .await
        else {
            return;
        };
        let policy = settings.login_policy();
        let result = if implicit_tls {
            match handshake(stream, &settings, "pop3").await {
                Some(tls) => {
                    let session = Session::new(policy, true);
                    self.session(tls, ip, &settings, session, true)
                        .await
                        .map(|_| ())
                }
                None => Ok(()),
            }
        } else {
            let session = Session::new(policy, false);
            match self.session(stream, ip, &settings, session, true).await {
                Ok(Ended::StartTls(stream, mut session)) => {
                    match handshake(stream, &settings, "pop3").await {
                        Some(tls) => {
                            session.tls_started();
                            self.session(tls, ip, &settings, session, false)
                                .await
                                .map(|_| ())
                        }
                        None => Ok(()),
                    }
                }
                Ok(Ended::Closed) => Ok(()),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            tracing::debug!("pop3 [{ip}]: {e}");
        }
    }

    /// Run a session on `stream` until it ends or asks for TLS.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        ip: IpAddr,
        settings: &Settings,
        mut session: Session,
        greet: bool,
    ) -> std::io::Result<Ended<S>> {
        let mut io = BufReader::with_capacity(16 * 1024, stream);
        let idle = Duration::from_secs(settings.config.maildird.limits.idle_timeout);
        let mut shutdown = self.access.shutdown.clone();
        let mut maildrop: Option<Maildrop> = None;
        let mut retrieved: Vec<usize> = Vec::new();
        let mut out = Vec::with_capacity(4096);
        if greet {
            push_line(&mut out, &session.greeting());
        }
        let mut line = Vec::with_capacity(256);
        loop {
            if io.buffer().is_empty() && !out.is_empty() {
                io.get_mut().write_all(&out).await?;
                io.get_mut().flush().await?;
                out.clear();
            }
            if *shutdown.borrow() {
                push_line(&mut out, "-ERR Server shutting down");
                return close(io, &out).await;
            }
            let max = if session.awaiting_sasl() {
                MAX_SASL_LINE
            } else {
                MAX_COMMAND_LINE
            };
            let read = tokio::select! {
                r = tokio::time::timeout(idle, read_line(&mut io, &mut line, max)) => r,
                _ = shutdown.changed() => continue,
            };
            let action = match read {
                Err(_) => {
                    push_line(&mut out, "-ERR Disconnected for inactivity");
                    return close(io, &out).await;
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Line::Eof)) => return Ok(Ended::Closed),
                Ok(Ok(Line::TooLong)) => Action::Reply("-ERR Line too long".into()),
                Ok(Ok(Line::Complete)) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\r', '\n']);
                    if session.awaiting_sasl() {
                        session.sasl_response(text)
                    } else {
                        session.handle(command::parse(text))
                    }
                }
            };
            match action {
                Action::Reply(r) => push_line(&mut out, &r),
                Action::MultiLine(head, lines) => {
                    push_line(&mut out, &format!("+OK {head}"));
                    for l in lines {
                        if l.starts_with('.') {
                            out.push(b'.');
                        }
                        push_line(&mut out, &l);
                    }
                    push_line(&mut out, ".");
                }
                Action::Continue => push_line(&mut out, "+ "),
                Action::Login { user, password } => {
                    let reply = match self.login(ip, &user, password, settings).await {
                        Ok(drop) => {
                            let reply = session.login_succeeded(drop.infos());
                            tracing::info!(
                                "pop3 login: user=<{user}>, rip={ip}, messages={}",
                                drop.messages().len()
                            );
                            maildrop = Some(drop);
                            reply
                        }
                        Err(reason) => session.login_failed(&reason),
                    };
                    if let Action::Reply(r) = reply {
                        push_line(&mut out, &r);
                    }
                }
                Action::SendMessage { index, body_lines } => {
                    let Some(drop) = maildrop.as_ref() else {
                        push_line(&mut out, "-ERR No maildrop");
                        continue;
                    };
                    match self
                        .send_message(
                            &mut io,
                            &mut out,
                            drop,
                            index,
                            body_lines,
                            session.message_size(index),
                        )
                        .await?
                    {
                        true if body_lines.is_none() => retrieved.push(index),
                        _ => {}
                    }
                }
                Action::StartTls => {
                    push_line(&mut out, "+OK Begin TLS negotiation");
                    io.get_mut().write_all(&out).await?;
                    io.get_mut().flush().await?;
                    if !io.buffer().is_empty() {
                        // RFC 2595 4 / the STARTTLS injection class of bugs:
                        // plaintext sent after STLS is never acted upon.
                        tracing::info!("pop3 [{ip}]: discarded data pipelined after STLS");
                    }
                    return Ok(Ended::StartTls(io.into_inner(), session));
                }
                Action::Update { delete } => {
                    let reply = match maildrop.take() {
                        Some(drop) => {
                            let retrieved = std::mem::take(&mut retrieved);
                            let done = tokio::task::spawn_blocking(move || {
                                drop.update(&delete, &retrieved)
                            })
                            .await
                            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                            match done {
                                Ok(n) => format!(
                                    "+OK {} closing ({n} messages deleted)",
                                    settings.config.hostname
                                ),
                                Err(e) => {
                                    tracing::error!("pop3 update failed: {e}");
                                    "-ERR [SYS/TEMP] Some deleted messages were not removed"
                                        .to_string()
                                }
                            }
                        }
                        None => format!("+OK {} closing", settings.config.hostname),
                    };
                    push_line(&mut out, &reply);
                    return close(io, &out).await;
                }
                Action::Close(r) => {
                    push_line(&mut out, &r);
                    return close(io, &out).await;
                }
            }
        }
    }

    /// Check the password (throttled per address) and open the maildrop;
    /// the error is the text after `-ERR `.
    async fn login(
        &self,
        ip: IpAddr,
        user: &str,
        password: String,
        settings: &Settings,
    ) -> Result<Maildrop, String> {
        let root = login(
            &self.access.directory,
            &self.access.throttle,
            &settings.config.paths.mail_root,
            "pop3",
            ip,
            user,
            password,
        )
        .await
        .map_err(|e| match e {
            LoginError::Throttled => "[SYS/TEMP] Too many failed logins; try again later",
            LoginError::Failed => "[AUTH] Authentication failed",
            LoginError::Unavailable => "[SYS/PERM] Mailbox unavailable",
        })?;
        let address = user.to_string();
        match tokio::task::spawn_blocking(move || Maildrop::open(&root)).await {
            Ok(Ok(drop)) => Ok(drop),
            Ok(Err(MaildropError::Locked)) => {
                Err("[IN-USE] Mailbox is locked by another POP3 session".into())
            }
            Ok(Err(e)) => {
                tracing::error!("pop3 {address}: {e}");
                Err("[SYS/TEMP] Mailbox unavailable".into())
            }
            Err(e) => {
                tracing::error!("pop3 {address}: {e}");
                Err("[SYS/TEMP] Mailbox unavailable".into())
            }
        }
    }

    /// Send message `index`; false if its file vanished (answered -ERR).
    async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut BufReader<S>,
        out: &mut Vec<u8>,
        drop: &Maildrop,
        index: usize,
        body_lines: Option<u32>,
        size: u64,
    ) -> std::io::Result<bool> {
        let path = &drop.messages()[index].path;
        // Local files: opened and read in place, as IMAP does (tokio::fs
        // would hand each call to another thread and back).
        let Ok(mut file) = tokio::task::block_in_place(|| std::fs::File::open(path)) else {
            push_line(out, "-ERR Message was removed by another session");
            return Ok(false);
        };
        push_line(out, &format!("+OK {size} octets"));
        let mut encoder = MessageEncoder::new(body_lines);
        // Sized to the message (its W= from the file name), so one read
        // takes a small one whole; at least 16 KiB in case W= is wrong.
        let want = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .clamp(16 * 1024, 64 * 1024);
        let mut buf = vec![0u8; want];
        while !encoder.is_done() {
            let n = tokio::task::block_in_place(|| file.read(&mut buf))?;
            if n == 0 {
                break;
            }
            encoder.encode(&buf[..n], out);
            if out.len() >= 64 * 1024 {
                io.get_mut().write_all(out).await?;
                out.clear();
            }
        }
        encoder.finish(out);
        Ok(true)
    }
}

fn push_line(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: BufReader<S>,
    out: &[u8],
) -> std::io::Result<Ended<S>> {
    io.get_mut().write_all(out).await?;
    io.get_mut().flush().await?;
    let _ = io.get_mut().shutdown().await;
    Ok(Ended::Closed)
}
