//! The IMAP I/O loop: listeners, TLS (implicit and STARTTLS), reading
//! commands with their literals (APPEND's streamed to disk), logins,
//! IDLE, and writing responses with message files streamed out.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::config::Config;
use common::net::{read_line, Line};
use common::recipients::DirectoryCache;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::cache::FolderCache;
use super::command;
use super::output::Output;
use super::send;
use super::session::{Action, Session};
use super::syntax;
use super::watch::FolderWatcher;
use crate::access::{handshake, Access, Settings};
use crate::login::{login, LoginError};

/// Longest command line (RFC 7162 3.2.1 recommends at least 8192).
const MAX_LINE: usize = 64 * 1024;
/// Largest literal other than APPEND's message, once logged in.
const MAX_LITERAL: u64 = 64 * 1024;
/// Largest literal before login (a user name or password).
const MAX_LITERAL_UNAUTHENTICATED: u64 = 8 * 1024;
/// Largest command in memory, lines and small literals together.
const MAX_COMMAND: usize = 256 * 1024;
/// RFC 9051 5.4: an inactivity autologout timer of at least 30 minutes.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a client that has not logged in may stay silent (RFC 9051 5.4
/// sets no minimum before login; a short one keeps idle strangers from
/// holding the connection slots).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Flush responses once this much is waiting (a big FETCH).
const FLUSH_AT: u64 = 256 * 1024;
/// Read buffer of a session: commands are short, literals are read in
/// pieces, and each of thousands of idle sessions keeps its buffer.
const READ_BUFFER: usize = 4 * 1024;

/// What every IMAP session shares.
pub struct ImapServer {
    access: Access,
    watcher: FolderWatcher,
    cache: Arc<FolderCache>,
}

/// How a session on a plain connection ended.
enum Ended<S> {
    Closed,
    StartTls(S, Box<Session>),
}

/// An APPEND literal streamed to a file, removed when dropped: after the
/// command, or when the connection fails or times out halfway.
struct SpooledLiteral(PathBuf);

impl Drop for SpooledLiteral {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A command as read from the client.
enum Incoming {
    Command {
        message: Vec<u8>,
        appended: Option<SpooledLiteral>,
    },
    /// A literal refused for its size: `tag NO [TOOBIG]`.
    TooBig(Option<String>),
    /// A non-synchronizing literal so far over the limit that reading
    /// past it is not worth it: `tag BAD [TOOBIG]`, then the connection
    /// closes (RFC 7888 4 leaves the server that choice).
    TooBigToSkip(Option<String>),
    /// APPEND's message could not be stored (a full disk): `tag NO`.
    NotStored(Option<String>),
    /// A line over the limit: `tag BAD`.
    TooLong(Option<String>),
    Eof,
}

impl ImapServer {
    /// A server for `config`; `tls` is the acceptor for STARTTLS and imaps.
    pub fn new(
        config: Config,
        tls: Option<TlsAcceptor>,
        directory: Arc<DirectoryCache>,
        shutdown: watch::Receiver<bool>,
        watcher: FolderWatcher,
    ) -> Arc<ImapServer> {
        Arc::new(ImapServer {
            access: Access::new(config, tls, directory, shutdown),
            watcher,
            cache: Arc::default(),
        })
    }

    /// The shared state: reload and session count.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Accept connections until shutdown; `implicit_tls` for imaps.
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
        let refusal = b"* BYE [UNAVAILABLE] Too many connections\r\n";
        let Some(_slot) = self
            .access
            .admit(&mut stream, ip, &settings, implicit_tls, refusal)
            .await
        else {
            return;
        };
        let policy = settings.login_policy();
        let result = if implicit_tls {
            match handshake(stream, &settings, "imap").await {
                Some(tls) => self
                    .session(
                        tls,
                        ip,
                        &settings,
                        Session::new(policy, true, self.cache.clone()),
                        true,
                    )
                    .await
                    .map(|_| ()),
                None => Ok(()),
            }
        } else {
            match self
                .session(
                    stream,
                    ip,
                    &settings,
                    Session::new(policy, false, self.cache.clone()),
                    true,
                )
                .await
            {
                Ok(Ended::StartTls(stream, mut session)) => {
                    match handshake(stream, &settings, "imap").await {
                        Some(tls) => {
                            session.tls_started();
                            self.session(tls, ip, &settings, *session, false)
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
            tracing::debug!("imap [{ip}]: {e}");
        }
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        ip: IpAddr,
        settings: &Settings,
        mut session: Session,
        greet: bool,
    ) -> std::io::Result<Ended<S>> {
        let mut io = BufReader::with_capacity(READ_BUFFER, stream);
        let idle =
            Duration::from_secs(settings.config.maildird.limits.idle_timeout).max(MIN_IDLE_TIMEOUT);
        let max_append = u64::from(settings.config.maildird.max_append_size);
        let mut shutdown = self.access.shutdown.clone();
        if greet {
            session.greet();
        }
        loop {
            // Pipelined commands wait while output is small, so one write
            // carries several answers; message files go out at once, before
            // a following command can rename or remove them.
            if io.buffer().is_empty()
                || session.out.pending() >= FLUSH_AT
                || session.out.has_files()
            {
                flush(&mut io, &mut session.out).await?;
            }
            if *shutdown.borrow() {
                session.out.line("* BYE Server shutting down");
                return close(io, &mut session.out).await;
            }
            let limits = Limits {
                literal: if session.user().is_some() {
                    MAX_LITERAL
                } else {
                    MAX_LITERAL_UNAUTHENTICATED
                },
                append: max_append,
                spool: session.append_spool(),
            };
            let read = tokio::select! {
                r = tokio::time::timeout(
                    if session.user().is_some() { idle } else { LOGIN_TIMEOUT },
                    read_command(&mut io, &limits),
                ) => r,
                _ = shutdown.changed() => continue,
            };
            let (message, appended) = match read {
                Err(_) => {
                    session.out.line("* BYE Autologout; idle for too long");
                    return close(io, &mut session.out).await;
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Incoming::Eof)) => return Ok(Ended::Closed),
                Ok(Ok(Incoming::TooBig(tag))) => {
                    let tag = tag.unwrap_or_else(|| "*".into());
                    session
                        .out
                        .line(&format!("{tag} NO [TOOBIG] Literal too big"));
                    continue;
                }
                Ok(Ok(Incoming::TooBigToSkip(tag))) => {
                    let tag = tag.unwrap_or_else(|| "*".into());
                    session
                        .out
                        .line(&format!("{tag} BAD [TOOBIG] Literal far too big"));
                    session.out.line("* BYE Closing: the literal is not read");
                    return close(io, &mut session.out).await;
                }
                Ok(Ok(Incoming::NotStored(tag))) => {
                    let tag = tag.unwrap_or_else(|| "*".into());
                    // RFC 9051 7.1: OVERQUOTA also covers a full disk.
                    session
                        .out
                        .line(&format!("{tag} NO [OVERQUOTA] Not enough disk space"));
                    continue;
                }
                Ok(Ok(Incoming::TooLong(tag))) => {
                    let tag = tag.unwrap_or_else(|| "*".into());
                    session
                        .out
                        .line(&format!("{tag} BAD [TOOBIG] Command line too long"));
                    continue;
                }
                Ok(Ok(Incoming::Command { message, appended })) => (message, appended),
            };
            let message = session.expand_saved(&message).unwrap_or(message);
            let request = command::decode(&message);
            drop(message);
            let spooled = appended.as_ref().map(|a| a.0.clone());
            let mut action = tokio::task::block_in_place(|| session.handle(request, spooled));
            drop(appended);
            loop {
                action = match action {
                    Action::Continue => break,
                    Action::Login {
                        tag,
                        user,
                        password,
                    } => {
                        self.login(ip, &tag, &user, password, settings, &mut session)
                            .await;
                        break;
                    }
                    Action::SaslContinue { tag } => {
                        session.out.line("+ ");
                        flush(&mut io, &mut session.out).await?;
                        let mut line = Vec::new();
                        match tokio::time::timeout(idle, read_line(&mut io, &mut line, MAX_LINE))
                            .await
                        {
                            Ok(Ok(Line::Complete)) => session.sasl_response(tag, &line),
                            Ok(Ok(Line::TooLong)) => {
                                session.out.line(&format!("{tag} BAD Response too long"));
                                break;
                            }
                            Ok(Ok(Line::Eof)) => return Ok(Ended::Closed),
                            Ok(Err(e)) => return Err(e),
                            Err(_) => return close(io, &mut session.out).await,
                        }
                    }
                    Action::StartTls => {
                        flush(&mut io, &mut session.out).await?;
                        if !io.buffer().is_empty() {
                            // RFC 9051 6.2.1 / the STARTTLS injection class of
                            // bugs: plaintext pipelined after STARTTLS is dropped.
                            tracing::info!("imap [{ip}]: discarded data pipelined after STARTTLS");
                        }
                        return Ok(Ended::StartTls(io.into_inner(), Box::new(session)));
                    }
                    Action::Idle { tag } => {
                        if !self.idle(&mut io, &mut session, &tag, idle).await?
                            || session.is_closing()
                        {
                            return close(io, &mut session.out).await;
                        }
                        break;
                    }
                    Action::Resume => {
                        flush(&mut io, &mut session.out).await?;
                        tokio::task::block_in_place(|| session.resume())
                    }
                    Action::Close => return close(io, &mut session.out).await,
                };
            }
        }
    }

    async fn login(
        &self,
        ip: IpAddr,
        tag: &str,
        user: &str,
        password: String,
        settings: &Settings,
        session: &mut Session,
    ) {
        let result = login(
            &self.access.directory,
            &self.access.throttle,
            &settings.config.paths.mail_root,
            "imap",
            ip,
            user,
            password,
        )
        .await;
        let root = match result {
            Ok(root) => root,
            Err(e) => {
                let (code, text) = match e {
                    LoginError::Throttled => {
                        ("UNAVAILABLE", "Too many failed logins; try again later")
                    }
                    LoginError::Failed => ("AUTHENTICATIONFAILED", "Authentication failed"),
                    LoginError::Unavailable => ("UNAVAILABLE", "Mailbox unavailable"),
                };
                session.login_failed(tag, code, text);
                return;
            }
        };
        let prepared = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || {
                common::maildir::create_mailbox(&root)?;
                super::mailboxes::subscribe_defaults(&root)
            })
            .await
        };
        match prepared {
            Ok(Ok(())) => {
                tracing::info!("imap login: user=<{user}>, rip={ip}");
                let quota = common::address::Address::parse(user)
                    .ok()
                    .and_then(|a| self.access.directory.current().0.users.quota(&a));
                session.logged_in(tag, user, &root, quota);
            }
            Ok(Err(e)) => {
                tracing::error!("imap {user}: {}: {e}", root.display());
                session.login_failed(tag, "UNAVAILABLE", "Mailbox unavailable");
            }
            Err(e) => {
                tracing::error!("imap {user}: {e}");
                session.login_failed(tag, "UNAVAILABLE", "Mailbox unavailable");
            }
        }
    }

    /// IDLE (RFC 2177, RFC 9051 6.3.13): report changes as they happen
    /// until DONE. Returns false when the session must close.
    async fn idle<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut BufReader<S>,
        session: &mut Session,
        tag: &str,
        timeout: Duration,
    ) -> std::io::Result<bool> {
        let mut subscription = match session.selected_path().map(|p| self.watcher.subscribe(p)) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                tracing::error!("imap IDLE: cannot watch the folder: {e}");
                None
            }
            None => None,
        };
        tokio::task::block_in_place(|| session.updates(true));
        session.out.line("+ idling");
        flush(io, &mut session.out).await?;
        let mut shutdown = self.access.shutdown.clone();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let changed = async {
                match subscription.as_mut() {
                    Some(s) => s.changed.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = io.fill_buf() => {
                    if r?.is_empty() {
                        return Ok(false);
                    }
                    break;
                }
                true = changed => {
                    tokio::task::block_in_place(|| session.updates(true));
                    if session.is_closing() {
                        return Ok(false);
                    }
                    flush(io, &mut session.out).await?;
                }
                _ = &mut deadline => {
                    session.out.line("* BYE Autologout; idle for too long");
                    return Ok(false);
                }
                _ = shutdown.changed() => {
                    session.out.line("* BYE Server shutting down");
                    return Ok(false);
                }
            }
        }
        drop(subscription);
        let mut line = Vec::new();
        let Ok(read) = tokio::time::timeout(timeout, read_line(io, &mut line, MAX_LINE)).await
        else {
            session.out.line("* BYE Autologout; idle for too long");
            return Ok(false);
        };
        let done = match read? {
            Line::Eof => return Ok(false),
            Line::TooLong => false,
            Line::Complete => line.trim_ascii().eq_ignore_ascii_case(b"DONE"),
        };
        tokio::task::block_in_place(|| session.idle_done(tag, done));
        Ok(true)
    }
}

/// Literal limits for the next command.
struct Limits {
    literal: u64,
    append: u64,
    /// Where APPEND's message literal is streamed (logged in only).
    spool: Option<PathBuf>,
}

/// Read one command: its lines and the literals between them. A
/// synchronising literal gets `+` before its bytes are read (RFC 9051
/// 4.3); APPEND's message goes to a file in `limits.spool` and the
/// command keeps an empty literal in its place.
async fn read_command<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    limits: &Limits,
) -> std::io::Result<Incoming> {
    let mut message = Vec::new();
    let mut line = Vec::new();
    let mut appended: Option<SpooledLiteral> = None;
    loop {
        match read_line(io, &mut line, MAX_LINE).await? {
            Line::Eof => {
                return Ok(Incoming::Eof);
            }
            Line::TooLong => {
                message.extend_from_slice(&line);
                return Ok(Incoming::TooLong(
                    syntax::command_name(&message).map(|(t, _)| t),
                ));
            }
            Line::Complete => {}
        }
        let start_of_line = message.len();
        message.extend_from_slice(&line);
        let tag = || syntax::command_name(&message).map(|(t, _)| t);
        let Some((length, sync)) = syntax::literal_announcement(&line) else {
            return Ok(Incoming::Command { message, appended });
        };
        let is_append = syntax::command_name(&message).is_some_and(|(_, n)| n == "APPEND")
            && limits.spool.is_some()
            && appended.is_none()
            && syntax::is_append_message_literal(
                &message[..start_of_line + announcement_start(&line)],
            );
        let limit = if is_append {
            limits.append
        } else {
            limits.literal
        };
        if length > limit || (!is_append && message.len() + length as usize > MAX_COMMAND) {
            let tag = tag();
            if !sync {
                // RFC 7888 4: the bytes come anyway. A literal a little
                // over is read past (the session goes on); one far over
                // would tie the connection up for nothing.
                if length > limit.saturating_mul(2).max(MAX_COMMAND as u64) {
                    return Ok(Incoming::TooBigToSkip(tag));
                }
                skip(io, length).await?;
                skip_rest_of_command(io).await?;
            }
            return Ok(Incoming::TooBig(tag));
        }
        if sync {
            io.get_mut()
                .write_all(b"+ Ready for literal data\r\n")
                .await?;
            io.get_mut().flush().await?;
        }
        if is_append {
            let spool = limits.spool.as_deref().unwrap_or(std::path::Path::new("."));
            let path = spool.join(format!(
                "{}.{}.imap-append",
                std::process::id(),
                APPEND_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let guard = SpooledLiteral(path);
            let mut file = match tokio::task::block_in_place(|| std::fs::File::create(&guard.0)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("imap APPEND: cannot store the message: {e}");
                    skip(io, length).await?;
                    skip_rest_of_command(io).await?;
                    return Ok(Incoming::NotStored(tag()));
                }
            };
            appended = Some(guard);
            let mut remaining = length;
            let mut buf = vec![0u8; 64 * 1024];
            let mut write_error = None;
            while remaining > 0 {
                let want = buf.len().min(remaining as usize);
                let n = io.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Ok(Incoming::Eof);
                }
                if write_error.is_none() {
                    let written = tokio::task::block_in_place(|| {
                        std::io::Write::write_all(&mut file, &buf[..n])
                    });
                    write_error = written.err();
                }
                remaining -= n as u64;
            }
            // The client sent it all: the session can answer and go on.
            if let Some(e) = write_error {
                tracing::warn!("imap APPEND: cannot store the message: {e}");
                skip_rest_of_command(io).await?;
                return Ok(Incoming::NotStored(tag()));
            }
            // Keep an empty literal in the command for the parser.
            message.truncate(start_of_line + announcement_start(&line));
            message.extend_from_slice(b"{0}\r\n");
        } else {
            let at = message.len();
            message.resize(at + length as usize, 0);
            if let Err(e) = io.read_exact(&mut message[at..]).await {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(Incoming::Eof)
                } else {
                    Err(e)
                };
            }
        }
    }
}

static APPEND_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the `{n}` (or `~{n}`) announcement starts in a line that ends
/// with one.
fn announcement_start(line: &[u8]) -> usize {
    let open = line.iter().rposition(|&c| c == b'{').unwrap_or(line.len());
    if open > 0 && line[open - 1] == b'~' {
        open - 1
    } else {
        open
    }
}

async fn skip<S: AsyncRead + Unpin>(io: &mut BufReader<S>, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let want = buf.len().min(n as usize);
        let got = io.read(&mut buf[..want]).await?;
        if got == 0 {
            return Ok(());
        }
        n -= got as u64;
    }
    Ok(())
}

/// After a refused non-synchronising literal: read and drop the lines
/// and literals up to the end of the command.
async fn skip_rest_of_command<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> std::io::Result<()> {
    let mut line = Vec::new();
    loop {
        match read_line(io, &mut line, MAX_LINE).await? {
            Line::Eof => return Ok(()),
            Line::TooLong => continue,
            Line::Complete => match syntax::literal_announcement(&line) {
                Some((n, false)) => skip(io, n).await?,
                _ => return Ok(()),
            },
        }
    }
}

/// Send everything pending, streaming message files with CRLF line ends.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    out: &mut Output,
) -> std::io::Result<()> {
    send::send(io.get_mut(), out.take()).await
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: BufReader<S>,
    out: &mut Output,
) -> std::io::Result<Ended<S>> {
    flush(&mut io, out).await?;
    let _ = io.get_mut().shutdown().await;
    Ok(Ended::Closed)
}
