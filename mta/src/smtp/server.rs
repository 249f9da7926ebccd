//! The SMTP I/O loop: listeners, connection limits, timeouts, and the
//! reading and writing around [`Session`].

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use common::config::Config;
use common::net::{accept_loop, read_line, ConnectionLimiter, ConnectionSlot, Line, Refusal};
use common::recipients::DirectoryCache;
use common::spool::{ClientInfo, Envelope, Spool};
use smtp_proto::Request;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::data::{DataDecoder, DataStatus};
use super::receive::{DirSyncer, MessageWriter};
use super::reply::Reply;
use super::session::{Action, DataOutcome, Session, SessionLimits};

/// Settings that a reload replaces; sessions started later use the new ones.
pub struct Settings {
    pub config: Config,
    pub limits: SessionLimits,
}

impl Settings {
    /// Derive session settings from the config.
    pub fn from_config(config: Config) -> Settings {
        let s = &config.smtpd;
        let limits = SessionLimits {
            hostname: config.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_errors: s.max_errors,
            relay_networks: s.relay_networks.clone(),
        };
        Settings { config, limits }
    }
}

/// What every session shares.
pub struct Server {
    settings: RwLock<Arc<Settings>>,
    spool: Spool,
    directory: DirectoryCache,
    syncer: DirSyncer,
    connections: ConnectionLimiter,
    shutdown: watch::Receiver<bool>,
}

impl Server {
    /// A server for `config`; `shutdown` turns true when the daemon stops.
    pub fn new(
        config: Config,
        directory: DirectoryCache,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Server> {
        let spool = Spool::new(&config.paths.spool);
        Arc::new(Server {
            settings: RwLock::new(Arc::new(Settings::from_config(config))),
            syncer: DirSyncer::spawn(spool.clone()),
            spool,
            directory,
            connections: ConnectionLimiter::default(),
            shutdown,
        })
    }

    /// Replace the settings (SIGHUP).
    pub fn reload(&self, config: Config) {
        let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
        *s = Arc::new(Settings::from_config(config));
    }

    /// Sessions now open.
    pub fn active_sessions(&self) -> usize {
        self.connections.active()
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Accept connections on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let shutdown = self.shutdown.clone();
        accept_loop(listener, shutdown, |stream, peer| {
            let server = self.clone();
            tokio::spawn(async move { server.connection(stream, peer).await });
        })
        .await;
    }

    fn take_slot(&self, ip: IpAddr, settings: &Settings) -> Result<ConnectionSlot<'_>, Reply> {
        let smtpd = &settings.config.smtpd;
        self.connections
            .admit(ip, smtpd.max_connections, smtpd.max_connections_per_client)
            .map_err(|refusal| match refusal {
                Refusal::Total => Reply::new(421, "4.3.2", "Too many connections, try again later"),
                Refusal::PerClient => {
                    Reply::new(421, "4.7.0", "Too many connections from your address")
                }
            })
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let settings = self.settings();
        let ip = peer.ip();
        let _slot = match self.take_slot(ip, &settings) {
            Ok(slot) => slot,
            Err(reply) => {
                tracing::info!("refused connection from [{ip}]: {}", reply.lines[0]);
                let _ = stream.write_all(reply.to_wire().as_bytes()).await;
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!("connect from [{ip}]");
        let limit = Duration::from_secs(settings.config.smtpd.session_timeout);
        let (r, w) = stream.into_split();
        let mut io = SessionIo {
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: BufWriter::with_capacity(16 * 1024, w),
            server: &self,
            settings: &settings,
            session: Session::new(settings.limits.clone(), ip),
            bdat: None,
        };
        match tokio::time::timeout(limit, io.run()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("[{ip}]: {e}"),
            Err(_) => {
                let reply = Reply::new(421, "4.4.2", "Session time limit exceeded");
                let _ = io.send(&reply).await;
                let _ = io.writer.flush().await;
            }
        }
        tracing::debug!("disconnect from [{ip}]");
    }
}

struct SessionIo<'a, R, W> {
    reader: BufReader<R>,
    writer: BufWriter<W>,
    server: &'a Server,
    settings: &'a Settings,
    session: Session,
    /// The message of a BDAT transaction between chunks.
    bdat: Option<MessageWriter>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> SessionIo<'_, R, W> {
    async fn send(&mut self, reply: &Reply) -> std::io::Result<()> {
        self.writer.write_all(reply.to_wire().as_bytes()).await
    }

    async fn run(&mut self) -> std::io::Result<()> {
        let greeting = self.session.greeting();
        self.send(&greeting).await?;
        self.writer.flush().await?;
        let command_timeout = Duration::from_secs(self.settings.config.smtpd.command_timeout);
        let mut shutdown = self.server.shutdown.clone();
        let mut line = Vec::with_capacity(512);
        loop {
            if *shutdown.borrow() {
                return self
                    .close(Reply::new(421, "4.3.2", "Service shutting down"))
                    .await;
            }
            let read = tokio::select! {
                r = tokio::time::timeout(
                    command_timeout,
                    read_line(&mut self.reader, &mut line, self.settings.config.smtpd.max_line_length),
                ) => r,
                // Idle sessions end at once on shutdown; busy ones finish
                // their command first.
                _ = shutdown.changed() => continue,
            };
            let action = match read {
                Err(_) => {
                    return self
                        .close(Reply::new(421, "4.4.2", "Timeout waiting for command"))
                        .await
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Line::Eof)) => return Ok(()),
                Ok(Ok(Line::TooLong)) => self.session.line_too_long(),
                Ok(Ok(Line::Complete)) => {
                    let (dir, stale) = self.server.directory.current();
                    if let Some(e) = stale {
                        tracing::error!("keeping previous tables: {e}");
                    }
                    self.session.handle(Request::parse(&mut line.iter()), &dir)
                }
            };
            match action {
                Action::Reply(r) => self.send(&r).await?,
                Action::Close(r) => return self.close(r).await,
                Action::ReadData(r) => {
                    self.send(&r).await?;
                    self.writer.flush().await?;
                    if let Some(close) = self.receive_data().await? {
                        return self.close(close).await;
                    }
                }
                Action::ReadChunk {
                    size,
                    last,
                    accept,
                    reply,
                } => {
                    if let Some(close) = self.receive_chunk(size, last, accept, reply).await? {
                        return self.close(close).await;
                    }
                }
            }
            self.forget_stale_chunks();
            // RFC 2920 3.1: flush when no more pipelined input is waiting.
            if self.reader.buffer().is_empty() {
                self.writer.flush().await?;
            }
        }
    }

    async fn close(&mut self, reply: Reply) -> std::io::Result<()> {
        self.session.abort();
        self.send(&reply).await?;
        self.writer.flush().await?;
        self.writer.shutdown().await
    }

    fn envelope(&self, id: &str, size: u64) -> Envelope {
        let tx = self.session.transaction().cloned().unwrap_or_default();
        Envelope {
            id: id.to_string(),
            sender: tx.sender,
            recipients: tx.recipients,
            arrival: common::spool::unix_now(),
            size,
            attempts: 0,
            next_try: 0,
            client: ClientInfo {
                address: self.session.client_ip().to_string(),
                helo: self.session.helo_name().to_string(),
                protocol: self.session.protocol().to_string(),
            },
            auth_user: None,
            params: tx.params,
        }
    }

    /// The `Received:` header (RFC 5321 4.4), with `for` only when there is
    /// a single recipient.
    fn received_header(&self, id: &str) -> String {
        let tx = self.session.transaction();
        let for_clause = match tx.map(|t| t.recipients.as_slice()) {
            Some([one]) => format!("\r\n\tfor <{}>", one.address),
            _ => String::new(),
        };
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        let ip = self.session.client_ip();
        let literal = match ip {
            IpAddr::V4(v4) => format!("[{v4}]"),
            IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
        };
        format!(
            "Received: from {} ({literal})\r\n\tby {} (mailsrv) with {} id {id}{for_clause};\r\n\t{date}\r\n",
            self.session.helo_name(),
            self.settings.limits.hostname,
            self.session.protocol(),
        )
    }

    async fn start_message(&mut self) -> Result<MessageWriter, DataOutcome> {
        let max = self.settings.config.smtpd.max_message_size;
        match MessageWriter::create(&self.server.spool, max).await {
            Ok(mut w) => {
                let header = self.received_header(w.id());
                w.write_own_header(header.as_bytes()).await;
                Ok(w)
            }
            Err(e) => {
                tracing::error!("cannot create queue file: {e}");
                Err(if e.is_disk_full() {
                    DataOutcome::DiskFull
                } else {
                    DataOutcome::LocalError
                })
            }
        }
    }

    async fn finish_message(&mut self, writer: MessageWriter) -> Reply {
        let id = writer.id().to_string();
        let size = writer.size();
        let envelope = self.envelope(&id, size);
        let outcome = writer.commit(envelope.clone(), &self.server.syncer).await;
        match &outcome {
            DataOutcome::Queued(_) => tracing::info!(
                "{id}: client=[{}], helo={}, from=<{}>, size={size}, nrcpt={}",
                envelope.client.address,
                envelope.client.helo,
                envelope.sender,
                envelope.recipients.len()
            ),
            other => tracing::info!("{id}: rejected from=<{}>: {other:?}", envelope.sender),
        }
        self.session.finish(outcome)
    }

    /// Read DATA until `CRLF.CRLF`; returns a reply to close with if the
    /// stream can no longer be trusted.
    async fn receive_data(&mut self) -> std::io::Result<Option<Reply>> {
        let data_timeout = Duration::from_secs(self.settings.config.smtpd.data_timeout);
        // If the queue file cannot be made, the data is still read so the
        // client gets its answer (452 on a full disk) in step.
        let mut writer = self.start_message().await;
        let mut decoder = DataDecoder::default();
        let mut out = Vec::with_capacity(64 * 1024);
        loop {
            let buf = match tokio::time::timeout(data_timeout, self.reader.fill_buf()).await {
                Err(_) => return Ok(Some(Reply::new(421, "4.4.2", "Timeout waiting for data"))),
                Ok(r) => r?,
            };
            if buf.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            out.clear();
            let (used, status) = decoder.decode(buf, &mut out);
            self.reader.consume(used);
            if let Ok(w) = writer.as_mut() {
                w.write(&out).await;
            }
            match status {
                DataStatus::NeedMore => continue,
                DataStatus::Done => break,
                // Postfix's smtpd_forbid_bare_newline answer: the end of the
                // message is ambiguous, so nothing more is read.
                DataStatus::BareLf | DataStatus::BareCr => {
                    let what = if status == DataStatus::BareLf {
                        "LF"
                    } else {
                        "CR"
                    };
                    tracing::info!(
                        "rejected message from [{}]: bare {what} in data",
                        self.session.client_ip()
                    );
                    return Ok(Some(Reply::new(
                        521,
                        "5.5.2",
                        format!("Bare {what} received; lines must end with CRLF"),
                    )));
                }
            }
        }
        let reply = match writer {
            Ok(w) => self.finish_message(w).await,
            Err(outcome) => self.session.finish(outcome),
        };
        self.send(&reply).await?;
        Ok(None)
    }

    /// Read one BDAT chunk of exactly `size` bytes (RFC 3030 2). A refused
    /// chunk is read and dropped, so the stream stays in step.
    async fn receive_chunk(
        &mut self,
        size: u64,
        last: bool,
        accept: bool,
        refusal: Option<Reply>,
    ) -> std::io::Result<Option<Reply>> {
        let data_timeout = Duration::from_secs(self.settings.config.smtpd.data_timeout);
        let timed_out = || Some(Reply::new(421, "4.4.2", "Timeout waiting for data"));
        if !accept {
            if !copy_exact(&mut self.reader, size, data_timeout, None).await? {
                return Ok(timed_out());
            }
            let reply = refusal.unwrap_or_else(|| Reply::new(554, "5.5.1", "Chunk refused"));
            if reply.code == 421 {
                return Ok(Some(reply));
            }
            self.send(&reply).await?;
            return Ok(None);
        }
        if self.bdat.is_none() {
            match self.start_message().await {
                Ok(w) => self.bdat = Some(w),
                Err(outcome) => {
                    if !copy_exact(&mut self.reader, size, data_timeout, None).await? {
                        return Ok(timed_out());
                    }
                    let reply = self.session.finish(outcome);
                    self.send(&reply).await?;
                    return Ok(None);
                }
            }
        }
        if !copy_exact(&mut self.reader, size, data_timeout, self.bdat.as_mut()).await? {
            return Ok(timed_out());
        }
        let reply = match (last, self.bdat.take()) {
            (true, Some(writer)) => self.finish_message(writer).await,
            (_, writer) => {
                self.bdat = writer;
                self.session.chunk_received(size)
            }
        };
        self.send(&reply).await?;
        Ok(None)
    }

    /// Drop a half-received BDAT message once its transaction is gone.
    fn forget_stale_chunks(&mut self) {
        if self.session.transaction().is_none_or(|t| !t.in_bdat) {
            self.bdat = None;
        }
    }
}

/// Move exactly `n` bytes from `reader` into `sink` (or nowhere); false if
/// the client went quiet for longer than `timeout`.
async fn copy_exact<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    mut n: u64,
    timeout: Duration,
    mut sink: Option<&mut MessageWriter>,
) -> std::io::Result<bool> {
    while n > 0 {
        let buf = match tokio::time::timeout(timeout, reader.fill_buf()).await {
            Err(_) => return Ok(false),
            Ok(r) => r?,
        };
        if buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        if let Some(w) = sink.as_deref_mut() {
            w.write(&buf[..take]).await;
        }
        reader.consume(take);
        n -= take as u64;
    }
    Ok(true)
}
