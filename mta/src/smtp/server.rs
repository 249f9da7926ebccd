//! The SMTP I/O loop: listeners, connection limits, timeouts, STARTTLS,
//! password checks, and the reading and writing around [`Session`].

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use common::address::Address;
use common::config::Config;
use common::login::{check_password, LoginThrottle};
use common::net::{accept_loop, read_line, ConnectionLimiter, ConnectionSlot, Line, Refusal};
use common::quota::FullMailboxesView;
use common::recipients::DirectoryCache;
use common::spool::{ClientInfo, Envelope, Spool};
use common::tls::TlsSummary;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::auth_checks::{AuthChecks, Inbound, Verdict};
use super::data::{DataDecoder, DataStatus};
use super::dnsbl::Dnsbl;
use super::greylist::Greylist;
use super::rates::RateLimits;
use super::receive::MessageWriter;
use super::reply::Reply;
use super::scan::{ScanOutcome, Scanners};
use super::session::{Action, DataOutcome, Port, Session, SessionLimits};
use crate::dkim_sign::Signers;

/// Settings that a reload replaces; sessions started later use the new ones.
pub struct Settings {
    pub config: Config,
    pub limits: SessionLimits,
    /// The certificate and key to serve.
    pub tls: TlsAcceptor,
    /// Sender authentication of mail from the internet.
    pub checks: Arc<AuthChecks>,
    /// DNS block and allow lists asked at connect.
    pub dnsbl: Arc<Dnsbl>,
    /// Messages and recipients per client and user (counts start afresh
    /// at a reload).
    pub rates: Arc<RateLimits>,
    /// DKIM keys for mail our users and networks send.
    pub signers: Arc<Signers>,
    /// Virus and spam scanners.
    pub scanners: Arc<Scanners>,
}

impl Settings {
    /// Derive session settings from the config (inside the runtime).
    pub fn new(config: Config, tls: TlsAcceptor) -> anyhow::Result<Settings> {
        let limits = SessionLimits::new(&config);
        let resolver = common::dns::resolver(&config.dns)?;
        let checks = Arc::new(AuthChecks::new(&config, resolver.clone()));
        let dnsbl = Arc::new(Dnsbl::new(
            resolver,
            config.checks.dnsbl.clone(),
            config.checks.dnsbl_threshold,
        ));
        let signers = Arc::new(Signers::load(&config.paths.dkim_keys));
        let rates = Arc::new(RateLimits::new(&config));
        let scanners = Arc::new(Scanners::new(&config.checks));
        Ok(Settings {
            config,
            limits,
            tls,
            checks,
            dnsbl,
            rates,
            signers,
            scanners,
        })
    }
}

/// How one phase of a connection (before or after STARTTLS) ended.
enum Ended {
    Closed,
    /// The client asked for TLS and was told to go ahead.
    StartTls,
}

/// What every session shares.
pub struct Server {
    settings: RwLock<Arc<Settings>>,
    spool: Spool,
    directory: DirectoryCache,
    connections: ConnectionLimiter,
    throttle: LoginThrottle,
    /// Kept across reloads: the triplets seen must outlive a SIGHUP.
    greylist: Arc<Greylist>,
    full_mailboxes: Arc<FullMailboxesView>,
    shutdown: watch::Receiver<bool>,
}

impl Server {
    /// A server for `config` serving the certificate of `tls`; `shutdown`
    /// turns true when the daemon stops.
    pub fn new(
        config: Config,
        tls: TlsAcceptor,
        directory: DirectoryCache,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Server>> {
        let spool = Spool::new(&config.paths.spool);
        let s = &config.smtpd;
        let throttle = LoginThrottle::new(
            s.max_auth_failures,
            s.max_account_auth_failures,
            Duration::from_secs(s.auth_failure_window),
            Duration::from_secs(s.login_cache_ttl),
        );
        let greylist = Arc::new(Greylist::load(&spool.greylist_path()));
        let full_mailboxes = Arc::new(FullMailboxesView::new(&config.paths.spool));
        Ok(Arc::new(Server {
            settings: RwLock::new(Arc::new(Settings::new(config, tls)?)),
            greylist,
            full_mailboxes,
            spool,
            directory,
            connections: ConnectionLimiter::default(),
            throttle,
            shutdown,
        }))
    }

    /// Replace the settings and certificate (SIGHUP); open sessions keep
    /// theirs.
    pub fn reload(&self, config: Config, tls: TlsAcceptor) -> anyhow::Result<()> {
        let new = Settings::new(config, tls)?;
        let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
        *s = Arc::new(new);
        Ok(())
    }

    /// Write the greylisting table out if it changed (every minute and at
    /// stop).
    pub async fn save_greylist(&self) {
        let Some(config) = self.settings().config.checks.greylist.clone() else {
            return;
        };
        let greylist = self.greylist.clone();
        let now = common::spool::unix_now();
        let saved = tokio::task::spawn_blocking(move || greylist.save(&config, now)).await;
        if let Ok(Err(e)) = saved {
            tracing::error!("greylist: cannot save the table: {e}");
        }
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

    /// Accept connections on `listener`, a `port` kind of listener, until
    /// shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, port: Port) {
        let shutdown = self.shutdown.clone();
        accept_loop(listener, shutdown, |stream, peer| {
            let server = self.clone();
            tokio::spawn(async move { server.connection(stream, peer, port).await });
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

    async fn connection(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr, port: Port) {
        let settings = self.settings();
        let ip = peer.ip();
        let _slot = match self.take_slot(ip, &settings) {
            Ok(slot) => slot,
            Err(reply) => {
                tracing::info!("refused connection from [{ip}]: {}", reply.lines[0]);
                // Nothing goes out in clear on an implicit-TLS port.
                if port != Port::Submissions {
                    let _ = stream.write_all(reply.to_wire().as_bytes()).await;
                }
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!("connect from [{ip}]");
        let deadline = Instant::now() + Duration::from_secs(settings.config.smtpd.session_timeout);
        let mut session = Session::new(settings.limits.clone(), port, ip, None);
        session.set_rates(settings.rates.clone());
        session.set_full_mailboxes(self.full_mailboxes.clone());
        if let Some(config) = &settings.config.checks.greylist {
            session.set_greylist(self.greylist.clone(), config.clone());
        }
        if port == Port::Mx && session.from_outside() {
            if let Some(listed) = settings.dnsbl.check(ip).await {
                tracing::info!(
                    "refused connection from [{ip}]: listed by {} (score {})",
                    listed.zones.join(", "),
                    listed.score
                );
                session.refuse(format!(
                    "Service unavailable; client [{ip}] blocked using {}",
                    listed.zones.join(", ")
                ));
            }
        }
        if let Err(e) = self
            .phases(stream, session, port, &settings, deadline)
            .await
        {
            tracing::debug!("[{ip}]: {e}");
        }
        tracing::debug!("disconnect from [{ip}]");
    }

    /// Run the session, in TLS from the start on 465, or in clear until
    /// STARTTLS and then in TLS.
    async fn phases(
        &self,
        stream: TcpStream,
        mut session: Session,
        port: Port,
        settings: &Settings,
        deadline: Instant,
    ) -> std::io::Result<()> {
        let ip = session.client_ip();
        let stream = if port == Port::Submissions {
            stream
        } else {
            let mut io = SessionIo::new(stream, self, settings, session, deadline);
            match io.run(true).await? {
                Ended::Closed => return Ok(()),
                Ended::StartTls => {}
            }
            session = io.session;
            io.io.into_inner().into_inner()
        };
        let Some(tls) = common::tls::handshake(&settings.tls, stream, "smtp").await else {
            return Ok(());
        };
        let Some(summary) = TlsSummary::of(tls.get_ref().1) else {
            return Ok(());
        };
        tracing::debug!("[{ip}]: {} {}", summary.version, summary.cipher);
        let greet = port == Port::Submissions;
        session.tls_started(summary);
        let mut io = SessionIo::new(tls, self, settings, session, deadline);
        io.run(greet).await.map(|_| ())
    }
}

/// One phase of a connection: the stream (read through a buffer, written
/// through another), the session, and the deadline of the whole session.
struct SessionIo<'a, S> {
    io: BufReader<BufWriter<S>>,
    server: &'a Server,
    settings: &'a Settings,
    session: Session,
    /// The message of a BDAT transaction between chunks.
    bdat: Option<MessageWriter>,
    deadline: Instant,
}

/// Why a read gave up waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The per-read timeout passed.
    Idle,
    /// Message data came slower than `smtpd.min_data_rate`.
    TooSlow,
    /// The session's whole time is up.
    SessionOver,
}

/// The time message data may take (Postfix's smtpd_min_data_rate): each
/// read within `data_timeout` (RFC 5321 4.5.3.2.6), and the whole of DATA
/// or of a BDAT chunk within `data_timeout` plus one second for every
/// `min_rate` bytes received, so a client trickling bytes cannot hold a
/// session open.
struct DataPace {
    started: Instant,
    timeout: Duration,
    min_rate: u64,
    received: u64,
    session_deadline: Instant,
}

impl DataPace {
    fn new(settings: &Settings, session_deadline: Instant) -> DataPace {
        let s = &settings.config.smtpd;
        DataPace {
            started: Instant::now(),
            timeout: Duration::from_secs(s.data_timeout),
            min_rate: s.min_data_rate.max(1),
            received: 0,
            session_deadline,
        }
    }

    /// When the next read must end, and why.
    fn until(&self) -> (Instant, Wait) {
        let earned = Duration::from_secs(self.received / self.min_rate);
        [
            (Instant::now() + self.timeout, Wait::Idle),
            (self.started + self.timeout + earned, Wait::TooSlow),
            (self.session_deadline, Wait::SessionOver),
        ]
        .into_iter()
        .min_by_key(|(at, _)| *at)
        .unwrap_or((self.session_deadline, Wait::SessionOver))
    }

    fn received(&mut self, n: usize) {
        self.received += n as u64;
    }
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> SessionIo<'a, S> {
    fn new(
        stream: S,
        server: &'a Server,
        settings: &'a Settings,
        session: Session,
        deadline: Instant,
    ) -> Self {
        SessionIo {
            io: BufReader::with_capacity(64 * 1024, BufWriter::with_capacity(16 * 1024, stream)),
            server,
            settings,
            session,
            bdat: None,
            deadline,
        }
    }

    /// Queue a reply; it goes out when the buffer fills or at `flush`.
    /// A client that stops reading cannot hold the session: every write
    /// must end within `command_timeout` and by the session's deadline.
    async fn send(&mut self, reply: &Reply) -> std::io::Result<()> {
        let until = self.write_deadline();
        let wire = reply.to_wire();
        within(until, self.io.write_all(wire.as_bytes())).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        let until = self.write_deadline();
        within(until, self.io.flush()).await
    }

    fn write_deadline(&self) -> Instant {
        let timeout = Duration::from_secs(self.settings.config.smtpd.command_timeout);
        (Instant::now() + timeout).min(self.deadline)
    }

    /// When a read that may take `timeout` must end.
    fn read_deadline(&self, timeout: Duration) -> (Instant, Wait) {
        let idle = Instant::now() + timeout;
        if idle < self.deadline {
            (idle, Wait::Idle)
        } else {
            (self.deadline, Wait::SessionOver)
        }
    }

    fn timeout_reply(wait: Wait, waiting_for: &str) -> Reply {
        match wait {
            Wait::Idle => Reply::new(421, "4.4.2", format!("Timeout waiting for {waiting_for}")),
            Wait::TooSlow => Reply::new(421, "4.4.2", "Data arriving too slowly"),
            Wait::SessionOver => Reply::new(421, "4.4.2", "Session time limit exceeded"),
        }
    }

    async fn run(&mut self, greet: bool) -> std::io::Result<Ended> {
        if greet {
            let greeting = self.session.greeting();
            self.send(&greeting).await?;
            self.flush().await?;
        }
        let command_timeout = Duration::from_secs(self.settings.config.smtpd.command_timeout);
        let mut shutdown = self.server.shutdown.clone();
        let mut line = Vec::with_capacity(512);
        loop {
            if *shutdown.borrow() {
                self.close(Reply::new(421, "4.3.2", "Service shutting down"))
                    .await?;
                return Ok(Ended::Closed);
            }
            // The whole line must arrive in time, not each byte of it, so a
            // client trickling bytes cannot hold the session.
            let (until, wait) = self.read_deadline(command_timeout);
            // RFC 4954 4: SASL exchanges may use lines of 12288 octets.
            let max_line = if self.session.in_sasl() {
                self.settings.config.smtpd.max_line_length.max(12_288)
            } else {
                self.settings.config.smtpd.max_line_length
            };
            let read = tokio::select! {
                r = tokio::time::timeout_at(until, read_line(&mut self.io, &mut line, max_line)) => r,
                // Idle sessions end at once on shutdown; busy ones finish
                // their command first.
                _ = shutdown.changed() => continue,
            };
            let action = match read {
                Err(_) => {
                    self.close(Self::timeout_reply(wait, "command")).await?;
                    return Ok(Ended::Closed);
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Line::Eof)) => return Ok(Ended::Closed),
                Ok(Ok(Line::TooLong)) => self.session.line_too_long(),
                Ok(Ok(Line::Complete)) if self.session.in_sasl() => {
                    self.session.sasl_response(&line)
                }
                Ok(Ok(Line::Complete)) => {
                    let (dir, stale) = self.server.directory.current();
                    if let Some(e) = stale {
                        tracing::error!("keeping previous tables: {e}");
                    }
                    self.session.handle(&line, &dir)
                }
            };
            let action = match action {
                Action::Authenticate { user, password } => {
                    let result = check_password(
                        &self.server.directory,
                        &self.server.throttle,
                        "smtp",
                        self.session.client_ip(),
                        &user,
                        password,
                    )
                    .await;
                    if let Ok(address) = &result {
                        tracing::info!(
                            "[{}]: authenticated as {address}",
                            self.session.client_ip()
                        );
                    }
                    self.session.auth_result(result)
                }
                other => other,
            };
            match action {
                Action::Reply(r) => self.send(&r).await?,
                Action::Authenticate { .. } => unreachable!("answered above"),
                Action::Close(r) => {
                    self.close(r).await?;
                    return Ok(Ended::Closed);
                }
                Action::StartTls(r) => {
                    if !self.io.buffer().is_empty() {
                        // RFC 3207 4 / CVE-2011-0411: anything sent after
                        // STARTTLS before the handshake could be injected
                        // by an attacker in the path; it is never taken
                        // as a command.
                        tracing::info!(
                            "[{}]: rejected input pipelined after STARTTLS",
                            self.session.client_ip()
                        );
                        self.close(Reply::new(
                            554,
                            "5.5.1",
                            "Commands pipelined after STARTTLS are not allowed",
                        ))
                        .await?;
                        return Ok(Ended::Closed);
                    }
                    self.send(&r).await?;
                    self.flush().await?;
                    return Ok(Ended::StartTls);
                }
                Action::ReadData(r) => {
                    self.send(&r).await?;
                    self.flush().await?;
                    if let Some(close) = self.receive_data().await? {
                        self.close(close).await?;
                        return Ok(Ended::Closed);
                    }
                }
                Action::ReadChunk {
                    size,
                    last,
                    accept,
                    reply,
                } => {
                    if let Some(close) = self.receive_chunk(size, last, accept, reply).await? {
                        self.close(close).await?;
                        return Ok(Ended::Closed);
                    }
                }
            }
            self.forget_stale_chunks();
            // RFC 2920 3.1: flush when no more pipelined input is waiting.
            if self.io.buffer().is_empty() {
                self.flush().await?;
            }
        }
    }

    async fn close(&mut self, reply: Reply) -> std::io::Result<()> {
        self.session.abort();
        self.send(&reply).await?;
        self.flush().await?;
        let until = self.write_deadline();
        within(until, self.io.shutdown()).await
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
                protocol: self.session.protocol(),
            },
            auth_user: self.session.auth_user().map(|a| a.to_string()),
            params: tx.params,
            delay_warned: false,
            added_headers: String::new(),
            junk: false,
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
        let tls = match self.session.tls() {
            Some(t) => format!("\r\n\t(using {t})"),
            None => String::new(),
        };
        // RFC 3848: `with ESMTPSA` already says the client authenticated;
        // the name only when the admin asks (Postfix's
        // smtpd_sasl_authenticated_header).
        let auth = match self.session.auth_user() {
            Some(user) if self.settings.config.smtpd.received_auth_user => {
                format!("\r\n\t(Authenticated sender: {user})")
            }
            _ => String::new(),
        };
        // RFC 5321 4.4: the from-domain is required (a client may skip
        // HELO), and the client's word must not bring control characters
        // into a stored header.
        let helo: String = match self.session.helo_name() {
            "" => "unknown".into(),
            name => name
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        };
        format!(
            "Received: from {helo} ({literal}){tls}{auth}\r\n\tby {} (mailsrv) with {} id {id}{for_clause};\r\n\t{date}\r\n",
            self.settings.limits.hostname,
            self.session.protocol(),
        )
    }

    fn start_message(&self) -> MessageWriter {
        let smtpd = &self.settings.config.smtpd;
        let (max, hops) = (smtpd.max_message_size, smtpd.max_received_headers);
        let authserv_id = self.settings.checks.authserv_id();
        let mut writer = MessageWriter::create(&self.server.spool, max, hops, authserv_id);
        let header = self.received_header(writer.id());
        writer.write_own_header(header.as_bytes());
        writer
    }

    async fn finish_message(&mut self, mut writer: MessageWriter) -> Reply {
        let id = writer.id().to_string();
        let mut envelope = self.envelope(&id, writer.size());
        let from_outside = self.session.from_outside();
        if from_outside {
            let verdict = if self.settings.checks.any() {
                self.check_sender(&mut writer, &envelope).await
            } else {
                Some(self.settings.checks.unchecked())
            };
            match verdict {
                Some(Verdict::Accept { header, junk }) => {
                    envelope.added_headers = header;
                    envelope.junk = junk;
                }
                Some(Verdict::Reject(reply)) => return self.refuse(writer, &envelope, reply),
                None => {}
            }
        }
        let scanners = self.settings.scanners.clone();
        if !scanners.is_empty() {
            if let Some(path) = writer.stored().await {
                match scanners.scan(&id, &path, writer.size(), from_outside).await {
                    ScanOutcome::Accept { headers, junk } => {
                        envelope.added_headers.push_str(&headers);
                        envelope.junk |= junk;
                    }
                    ScanOutcome::Refuse(reply) => return self.refuse(writer, &envelope, reply),
                }
            }
        }
        if !from_outside && !self.settings.signers.is_empty() {
            // Our users' and networks' mail: signed once, before queueing.
            let _slot = self.settings.checks.slot().await;
            if let Some(message) = writer.contents().await {
                // A user gets signatures only for From addresses it may
                // send as, as for MAIL FROM; relay networks are trusted.
                let directory = self.server.directory.current().0;
                let user = self.session.auth_user().cloned();
                let signatures = self.settings.signers.sign(&message, |from| {
                    let Some(user) = &user else { return true };
                    Address::parse(from).is_ok_and(|f| directory.may_send_as(user, &f))
                });
                envelope.added_headers.insert_str(0, &signatures);
            }
        }
        let size = writer.size();
        envelope.size = size;
        let outcome = writer.commit(envelope.clone()).await;
        match &outcome {
            DataOutcome::Queued(_) => tracing::info!(
                "{id}: client=[{}], helo={}, {}from=<{}>, size={size}, nrcpt={}",
                envelope.client.address,
                envelope.client.helo,
                envelope
                    .auth_user
                    .as_ref()
                    .map(|u| format!("sasl_username={u}, "))
                    .unwrap_or_default(),
                envelope.sender,
                envelope.recipients.len()
            ),
            other => tracing::info!("{id}: rejected from=<{}>: {other:?}", envelope.sender),
        }
        self.session.finish(outcome)
    }

    /// Refuse the message with `reply` at the end of its data: nothing of
    /// it stays in the spool.
    fn refuse(&mut self, writer: MessageWriter, envelope: &Envelope, reply: Reply) -> Reply {
        tracing::info!(
            "{}: rejected from=<{}>, client=[{}]: {} {} {}",
            envelope.id,
            envelope.sender,
            envelope.client.address,
            reply.code,
            reply.enhanced,
            reply.lines.join(" ")
        );
        writer.discard();
        self.session.abort();
        reply
    }

    /// SPF, DKIM, ARC and DMARC of a message from the internet; None when
    /// the message is not stored whole (too big, write error: the commit
    /// reports that).
    async fn check_sender(
        &self,
        writer: &mut MessageWriter,
        envelope: &Envelope,
    ) -> Option<Verdict> {
        let checks = self.settings.checks.clone();
        let _slot = checks.slot().await;
        let message = writer.contents().await?;
        let inbound = Inbound {
            client_ip: self.session.client_ip(),
            helo: &envelope.client.helo,
            sender: &envelope.sender,
            message: &message,
        };
        Some(checks.check(&inbound).await)
    }

    /// Read DATA until `CRLF.CRLF`; returns a reply to close with if the
    /// stream can no longer be trusted.
    async fn receive_data(&mut self) -> std::io::Result<Option<Reply>> {
        let mut pace = DataPace::new(self.settings, self.deadline);
        // If the queue file cannot be written, the data is still read so
        // the client gets its answer (452 on a full disk) in step.
        let mut writer = self.start_message();
        let mut decoder = DataDecoder::default();
        let mut out = Vec::with_capacity(64 * 1024);
        loop {
            let (until, wait) = pace.until();
            let buf = match tokio::time::timeout_at(until, self.io.fill_buf()).await {
                Err(_) => return Ok(Some(Self::timeout_reply(wait, "data"))),
                Ok(r) => r?,
            };
            if buf.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            out.clear();
            let (used, status) = decoder.decode(buf, &mut out);
            self.io.consume(used);
            pace.received(used);
            writer.write(&out).await;
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
        let reply = self.finish_message(writer).await;
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
        let pace = DataPace::new(self.settings, self.deadline);
        let timed_out = |wait| Some(Self::timeout_reply(wait, "data"));
        if !accept {
            if let Err(wait) = copy_exact(&mut self.io, size, pace, None).await? {
                return Ok(timed_out(wait));
            }
            let reply = refusal.unwrap_or_else(|| Reply::new(554, "5.5.1", "Chunk refused"));
            if reply.code == 421 {
                return Ok(Some(reply));
            }
            self.send(&reply).await?;
            return Ok(None);
        }
        if self.bdat.is_none() {
            self.bdat = Some(self.start_message());
        }
        let sink = self.bdat.as_mut();
        if let Err(wait) = copy_exact(&mut self.io, size, pace, sink).await? {
            return Ok(timed_out(wait));
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

/// Move exactly `n` bytes from `reader` into `sink` (or nowhere); stops
/// when the client falls behind `pace`.
async fn copy_exact<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    mut n: u64,
    mut pace: DataPace,
    mut sink: Option<&mut MessageWriter>,
) -> std::io::Result<Result<(), Wait>> {
    while n > 0 {
        let (until, wait) = pace.until();
        let buf = match tokio::time::timeout_at(until, reader.fill_buf()).await {
            Err(_) => return Ok(Err(wait)),
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
        pace.received(take);
        n -= take as u64;
    }
    Ok(Ok(()))
}

/// `io` if it ends by `until`, else a TimedOut error.
async fn within<T>(
    until: Instant,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout_at(until, io)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(started_ago: u64, received: u64) -> DataPace {
        let now = Instant::now();
        DataPace {
            started: now - Duration::from_secs(started_ago),
            timeout: Duration::from_secs(10),
            min_rate: 100,
            received,
            session_deadline: now + Duration::from_secs(3600),
        }
    }

    #[test]
    fn data_must_keep_its_pace() {
        // Fast enough: only the per-read timeout applies.
        assert_eq!(pace(15, 10_000).until().1, Wait::Idle);
        // 100 bytes in 15 s at 100 B/s earns 1 s on top of the 10 s.
        let (at, why) = pace(15, 100).until();
        assert_eq!(why, Wait::TooSlow);
        assert!(at <= Instant::now());
        // The session deadline still caps everything.
        let mut p = pace(0, 1_000_000);
        p.session_deadline = Instant::now() + Duration::from_secs(1);
        assert_eq!(p.until().1, Wait::SessionOver);
    }
}
