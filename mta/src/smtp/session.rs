//! The SMTP server session state machine (RFC 5321 4.1, 4.3.2), free of
//! I/O: it takes parsed commands and tells the I/O loop what to answer and
//! what to read next.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use common::address::Address;
use common::config::{GreylistConfig, IpNet};
use common::login::LoginError;
use common::quota::FullMailboxesView;
use common::recipients::{Destination, Directory, ResolveError};
use common::spool::{EsmtpParams, Notify, Recipient};
use common::tls::TlsSummary;
use smtp_proto::{Error as ParseError, Request};

use super::greylist::{Decision, Greylist};
use super::rates::{Kind, RateLimits};
use super::reply::Reply;

/// The settings a session needs.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub max_junk_commands: u32,
    pub relay_networks: Vec<IpNet>,
    /// AUTH before TLS.
    pub allow_plaintext_auth: bool,
}

impl SessionLimits {
    /// The limits the config sets.
    pub fn new(config: &common::config::Config) -> SessionLimits {
        let s = &config.smtpd;
        SessionLimits {
            hostname: config.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_errors: s.max_errors,
            max_junk_commands: s.max_junk_commands,
            relay_networks: s.relay_networks.clone(),
            allow_plaintext_auth: s.allow_plaintext_auth,
        }
    }
}

/// The kind of listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Mail exchange (25): STARTTLS, no AUTH, mail for our domains or from
    /// relay networks.
    Mx,
    /// Message submission (587, RFC 6409): STARTTLS, AUTH before MAIL.
    Submission,
    /// Submission over implicit TLS (465, RFC 8314).
    Submissions,
    /// `sendmail -bs`: a local user on standard input; no TLS or AUTH,
    /// and mail may go anywhere, as with `sendmail` recipients.
    Local,
}

impl Port {
    fn takes_auth(self) -> bool {
        matches!(self, Port::Submission | Port::Submissions)
    }
}

/// Where a SASL exchange (RFC 4954 4) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sasl {
    /// PLAIN (RFC 4616) is waiting for its one response.
    Plain,
    /// LOGIN is waiting for the user name.
    LoginUser,
    /// LOGIN is waiting for the password of this user.
    LoginPassword(String),
}

/// What the I/O loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the reply, read the next command.
    Reply(Reply),
    /// Send the reply (220), then start TLS (RFC 3207) and report with
    /// [`Session::tls_started`]. Input the client pipelined after the
    /// command must not be read as commands.
    StartTls(Reply),
    /// Check this password, then report with [`Session::auth_result`].
    Authenticate { user: String, password: String },
    /// Send the reply and close the connection.
    Close(Reply),
    /// Send the 354 reply, then read message data until `CRLF.CRLF`.
    ReadData(Reply),
    /// Read exactly `size` bytes of BDAT data (RFC 3030), then report with
    /// [`Session::chunk_received`]. When `accept` is false the bytes are
    /// read and thrown away, and `reply` is the answer.
    ReadChunk {
        size: u64,
        last: bool,
        accept: bool,
        reply: Option<Reply>,
    },
}

/// How receiving a message ended, as reported by the I/O loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// Queued and fsynced under this id.
    Queued(String),
    /// More than `max_message_size` bytes.
    TooBig,
    /// More `Received:` fields than `max_received_headers`: a mail loop.
    Loop,
    /// The disk is full (ENOSPC/EDQUOT).
    DiskFull,
    /// Another local error; nothing was queued.
    LocalError,
}

/// The transaction being built (RFC 5321 3.3).
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    pub sender: String,
    pub params: EsmtpParams,
    pub recipients: Vec<Recipient>,
    /// Set once a BDAT chunk has been accepted: DATA is then out of order.
    pub in_bdat: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeted {
    No,
    Helo,
    Ehlo,
}

/// One client's session.
#[derive(Debug)]
pub struct Session {
    limits: SessionLimits,
    port: Port,
    client_ip: IpAddr,
    may_relay: bool,
    greeted: Greeted,
    helo_name: String,
    errors: u32,
    junk: u32,
    tx: Option<Transaction>,
    tls: Option<TlsSummary>,
    sasl: Option<Sasl>,
    auth_user: Option<Address>,
    /// Why the client is refused (a DNS block list): the greeting says so
    /// and every command but QUIT gets 503 (RFC 5321 3.1).
    refused: Option<String>,
    /// Rate limits shared by all sessions.
    rates: Option<Arc<RateLimits>>,
    /// Greylisting of outside clients, when on.
    greylist: Option<(Arc<Greylist>, GreylistConfig)>,
    /// Mailboxes qmgr found full.
    full_mailboxes: Option<Arc<FullMailboxesView>>,
    /// The reply being made is our policy's deferral, not the client's
    /// error: a message to many new recipients must not end the session.
    policy_deferral: bool,
}

impl Session {
    /// A new session with a client at `client_ip` on a `port` listener;
    /// `tls` is set when the connection started with TLS (465).
    pub fn new(
        limits: SessionLimits,
        port: Port,
        client_ip: IpAddr,
        tls: Option<TlsSummary>,
    ) -> Session {
        let may_relay =
            port == Port::Local || limits.relay_networks.iter().any(|n| n.contains(client_ip));
        Session {
            limits,
            port,
            client_ip,
            may_relay,
            greeted: Greeted::No,
            helo_name: String::new(),
            errors: 0,
            junk: 0,
            tx: None,
            tls,
            sasl: None,
            auth_user: None,
            refused: None,
            rates: None,
            greylist: None,
            full_mailboxes: None,
            policy_deferral: false,
        }
    }

    /// Count this session's messages and recipients in `rates`.
    pub fn set_rates(&mut self, rates: Arc<RateLimits>) {
        self.rates = Some(rates);
    }

    /// Answer 452 to recipients whose mailboxes `full` lists.
    pub fn set_full_mailboxes(&mut self, full: Arc<FullMailboxesView>) {
        self.full_mailboxes = Some(full);
    }

    /// Greylist outside clients' recipients with `greylist` as `config` says.
    pub fn set_greylist(&mut self, greylist: Arc<Greylist>, config: GreylistConfig) {
        self.greylist = Some((greylist, config));
    }

    /// The greylisting answer for `recipient`, when it is deferred.
    /// Authenticated users and relay networks are never greylisted.
    fn greylisted(&mut self, sender: &str, recipient: &Address) -> Option<Action> {
        let (greylist, config) = self.greylist.as_ref()?;
        if !self.from_outside() {
            return None;
        }
        let now = common::spool::unix_now();
        match greylist.check(config, self.client_ip, sender, &recipient.to_string(), now) {
            Decision::Pass => None,
            // RFC 6647 2.1: a temporary failure the sending MTA retries.
            Decision::Defer(wait) => {
                tracing::info!(
                    "greylisted client=[{}], from=<{sender}>, to=<{recipient}>",
                    self.client_ip
                );
                self.policy_deferral = true;
                Some(reply(
                    450,
                    "4.7.1",
                    format!("<{recipient}>: Greylisted, try again in {wait} seconds"),
                ))
            }
        }
    }

    /// Count one `kind` against the rate limits: an outside client's
    /// address, or the authenticated user (who may share an address with
    /// many others behind a NAT).
    fn take_rate(&self, kind: Kind) -> Result<(), Action> {
        let Some(rates) = &self.rates else {
            return Ok(());
        };
        let client = self.from_outside().then_some(self.client_ip);
        let user = self.auth_user.as_ref().map(|u| u.to_string());
        rates
            .take(client, user.as_deref(), kind)
            .map_err(|why| reply(450, "4.7.1", why))
    }

    /// Refuse the client for `why`: a 554 greeting, then nothing but QUIT.
    pub fn refuse(&mut self, why: String) {
        self.refused = Some(why);
    }

    /// Whether the client is an outsider: neither authenticated, nor in
    /// the relay networks, nor local. Its mail gets the sender checks.
    pub fn from_outside(&self) -> bool {
        !self.may_relay && self.auth_user.is_none()
    }

    /// TLS is up after STARTTLS: everything learnt from the client before
    /// is forgotten and EHLO is needed again (RFC 3207 4.2).
    pub fn tls_started(&mut self, tls: TlsSummary) {
        self.tls = Some(tls);
        self.greeted = Greeted::No;
        self.helo_name.clear();
        self.tx = None;
        self.sasl = None;
        self.auth_user = None;
    }

    /// The TLS parameters, once TLS is up.
    pub fn tls(&self) -> Option<&TlsSummary> {
        self.tls.as_ref()
    }

    /// The authenticated user, if any.
    pub fn auth_user(&self) -> Option<&Address> {
        self.auth_user.as_ref()
    }

    /// Whether the next line is a SASL response rather than a command.
    pub fn in_sasl(&self) -> bool {
        self.sasl.is_some()
    }

    /// The 220 greeting (no enhanced code: RFC 2034 section 3).
    pub fn greeting(&self) -> Reply {
        if let Some(why) = &self.refused {
            return Reply::new(554, "5.7.1", why.clone());
        }
        Reply {
            code: 220,
            enhanced: "",
            lines: vec![format!("{} ESMTP mailsrv", self.limits.hostname)],
        }
    }

    /// The client's HELO/EHLO name.
    pub fn helo_name(&self) -> &str {
        &self.helo_name
    }

    /// The client address.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// The open transaction, if any.
    pub fn transaction(&self) -> Option<&Transaction> {
        self.tx.as_ref()
    }

    /// The `with` protocol keyword for `Received:` (RFC 3848, RFC 6531
    /// 3.7.3): S for TLS, A for an authenticated client.
    pub fn protocol(&self) -> String {
        let utf8 = self.tx.as_ref().is_some_and(|t| t.params.smtputf8);
        let base = match (self.greeted, utf8) {
            (_, true) => "UTF8SMTP",
            (Greeted::Ehlo, false) => "ESMTP",
            _ => return "SMTP".into(),
        };
        let tls = if self.tls.is_some() { "S" } else { "" };
        let auth = if self.auth_user.is_some() { "A" } else { "" };
        format!("{base}{tls}{auth}")
    }

    /// Handle one command line (CRLF included).
    pub fn handle(&mut self, line: &[u8], dir: &Directory) -> Action {
        // RFC 5321 2.4: commands are text; a NUL or bytes that are not
        // UTF-8 (RFC 6531 3.3) are never part of a valid one.
        if line.contains(&0) {
            return self.count_errors(reply(500, "5.5.2", "Error: NUL character in command"));
        }
        if std::str::from_utf8(line).is_err() {
            return self.count_errors(reply(500, "5.5.2", "Error: bad UTF-8 syntax"));
        }
        let qualified = qualify_postmaster(line, || dir.postmaster(&self.limits.hostname));
        let line = qualified.as_deref().unwrap_or(line);
        let parsed = Request::parse(&mut line.iter());
        if let Some(why) = &self.refused {
            if !matches!(parsed, Ok(Request::Quit)) {
                let refusal = reply(503, "5.7.1", why.clone());
                return self.count_errors(refusal);
            }
        }
        let junk = matches!(
            parsed,
            Ok(Request::Noop { .. } | Request::Rset | Request::Vrfy { .. } | Request::Help { .. })
                | Err(ParseError::UnknownCommand)
        );
        let action = match parsed {
            // RFC 3207 4: STARTTLS takes no parameters (smtp-proto skips them).
            Ok(Request::StartTls) if has_argument(line) => {
                reply(501, "5.5.4", "Syntax: STARTTLS takes no parameters")
            }
            Ok(req) => self.command(req, dir),
            Err(ParseError::SyntaxError { syntax }) if syntax.starts_with("AUTH ") => {
                auth_syntax_reply(line)
            }
            Err(e) => Action::Reply(parse_error_reply(e)),
        };
        if junk {
            self.junk += 1;
            if self.junk > self.limits.max_junk_commands {
                return Action::Close(Reply::new(
                    421,
                    "4.7.0",
                    format!("{} Too many junk commands", self.limits.hostname),
                ));
            }
        }
        self.count_errors(action)
    }

    /// Handle a line sent in answer to a 334 challenge (RFC 4954 4).
    pub fn sasl_response(&mut self, line: &[u8]) -> Action {
        let action = self.sasl_step(line);
        self.count_errors(action)
    }

    fn sasl_step(&mut self, line: &[u8]) -> Action {
        let Some(state) = self.sasl.take() else {
            return reply(503, "5.5.1", "No authentication in progress");
        };
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == b"*" {
            return reply(501, "5.0.0", "Authentication cancelled");
        }
        let Some(decoded) = decode_base64(line) else {
            return reply(501, "5.5.2", "Cannot decode response");
        };
        match state {
            Sasl::Plain => self.plain(&decoded),
            Sasl::LoginUser => self.login_user(decoded),
            Sasl::LoginPassword(user) => login_password(user, decoded),
        }
    }

    /// The password check ended (throttled, failed or good).
    pub fn auth_result(&mut self, result: Result<Address, LoginError>) -> Action {
        let action = match result {
            Ok(user) => {
                self.auth_user = Some(user);
                reply(235, "2.7.0", "Authentication successful")
            }
            Err(LoginError::Throttled) => reply(
                454,
                "4.7.0",
                "Temporary authentication failure: too many failures, try again later",
            ),
            Err(LoginError::Failed) => reply(535, "5.7.8", "Authentication credentials invalid"),
        };
        self.count_errors(action)
    }

    /// A command line longer than the limit.
    pub fn line_too_long(&mut self) -> Action {
        let reply = if self.sasl.take().is_some() {
            // RFC 4954 4
            Reply::new(500, "5.5.6", "Authentication exchange line is too long")
        } else {
            Reply::new(500, "5.5.2", "Line too long")
        };
        self.count_errors(Action::Reply(reply))
    }

    /// Counts error replies; past `max_errors` the answer becomes 421 and
    /// the session ends (as Postfix's smtpd_hard_error_limit).
    fn count_errors(&mut self, action: Action) -> Action {
        if std::mem::take(&mut self.policy_deferral) {
            return action;
        }
        let is_error = match &action {
            Action::Reply(r) => r.is_error(),
            Action::ReadChunk {
                reply: Some(r),
                accept: false,
                ..
            } => r.is_error(),
            _ => false,
        };
        if is_error {
            self.errors += 1;
            if self.errors >= self.limits.max_errors {
                let close = Reply::new(
                    421,
                    "4.7.0",
                    format!("{} Too many errors", self.limits.hostname),
                );
                return match action {
                    // The chunk's bytes are on the wire: read them before closing.
                    Action::ReadChunk { size, last, .. } => Action::ReadChunk {
                        size,
                        last,
                        accept: false,
                        reply: Some(close),
                    },
                    _ => Action::Close(close),
                };
            }
        }
        action
    }

    fn command(&mut self, req: Request<String>, dir: &Directory) -> Action {
        match req {
            Request::Ehlo { host } => self.hello(host, Greeted::Ehlo),
            Request::Helo { host } => self.hello(host, Greeted::Helo),
            Request::Lhlo { .. } => reply(500, "5.5.1", "LHLO is for LMTP"),
            Request::Mail { from } => self.mail(from, dir),
            Request::Rcpt { to } => self.rcpt(to, dir),
            Request::Data => self.data(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size as u64, is_last),
            Request::Rset => {
                self.tx = None;
                reply(250, "2.0.0", "Ok")
            }
            Request::Noop { .. } => reply(250, "2.0.0", "Ok"),
            Request::Quit => Action::Close(Reply::new(221, "2.0.0", "Bye")),
            // RFC 5321 3.5.3: 252 when we will not verify; no disclosure.
            Request::Vrfy { .. } => reply(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Expn { .. } => reply(502, "5.5.1", "EXPN not available"),
            Request::Help { .. } if self.port == Port::Local => reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP; see RFC 5321",
            ),
            Request::Help { .. } => reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP; see RFC 5321",
            ),
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                reply(502, "5.5.1", "Command not implemented")
            }
        }
    }

    fn hello(&mut self, host: String, kind: Greeted) -> Action {
        // RFC 5321 4.1.4: EHLO/HELO in a session resets the transaction.
        self.tx = None;
        self.greeted = kind;
        self.helo_name = host;
        if kind == Greeted::Helo {
            return reply(250, "", self.limits.hostname.clone());
        }
        let mut lines = vec![
            self.limits.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.limits.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "HELP".into(),
        ];
        // The maildrop keeps sender and recipients only: no DSN for -bs.
        if self.port != Port::Local {
            lines.push("DSN".into());
            lines.push("CHUNKING".into());
            if self.tls.is_none() {
                lines.push("STARTTLS".into());
            }
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Action::Reply(Reply {
            code: 250,
            enhanced: "",
            lines,
        })
    }

    /// AUTH is advertised and taken: on a submission port, over TLS
    /// unless plaintext is allowed.
    fn auth_offered(&self) -> bool {
        self.port.takes_auth() && (self.tls.is_some() || self.limits.allow_plaintext_auth)
    }

    fn starttls(&mut self) -> Action {
        if self.port == Port::Local {
            return reply(502, "5.5.1", "STARTTLS is for network clients");
        }
        if self.tls.is_some() {
            return reply(503, "5.5.1", "TLS already active");
        }
        if self.tx.is_some() {
            return reply(503, "5.5.1", "Mail transaction in progress");
        }
        Action::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
    }

    fn auth(&mut self, mechanism: u64, initial: String) -> Action {
        if !self.port.takes_auth() {
            return reply(503, "5.5.1", "Authentication not enabled");
        }
        if self.greeted != Greeted::Ehlo {
            return reply(503, "5.5.1", "Send EHLO first");
        }
        if self.auth_user.is_some() {
            // RFC 4954 4: one successful AUTH per session.
            return reply(503, "5.5.1", "Already authenticated");
        }
        if self.tx.is_some() {
            return reply(503, "5.5.1", "Mail transaction in progress");
        }
        if !self.auth_offered() {
            return reply(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            );
        }
        let state = match mechanism {
            smtp_proto::AUTH_PLAIN => Sasl::Plain,
            smtp_proto::AUTH_LOGIN => Sasl::LoginUser,
            _ => return reply(504, "5.5.4", "Unrecognized authentication type"),
        };
        if initial.is_empty() {
            self.sasl = Some(state.clone());
            // PLAIN's challenge is empty; LOGIN asks for "Username:".
            let challenge = if state == Sasl::Plain {
                ""
            } else {
                "VXNlcm5hbWU6"
            };
            return Action::Reply(Reply::new(334, "", challenge));
        }
        // RFC 4954 4: "=" is an initial response of zero length.
        let initial = if initial == "=" { "" } else { initial.as_str() };
        self.sasl = Some(state);
        self.sasl_step(initial.as_bytes())
    }

    fn plain(&mut self, decoded: &[u8]) -> Action {
        // RFC 4616 2: authzid NUL authcid NUL passwd.
        let mut parts = decoded.split(|b| *b == 0);
        let (Some(authz), Some(authc), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return reply(501, "5.5.2", "Malformed PLAIN response");
        };
        let (Ok(authz), Ok(user), Ok(password)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(authc),
            std::str::from_utf8(password),
        ) else {
            return reply(501, "5.5.2", "Malformed PLAIN response");
        };
        // Acting for another user is not offered.
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(user) {
            return reply(535, "5.7.8", "Authentication credentials invalid");
        }
        Action::Authenticate {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    fn login_user(&mut self, decoded: Vec<u8>) -> Action {
        match String::from_utf8(decoded) {
            Ok(user) => {
                self.sasl = Some(Sasl::LoginPassword(user));
                Action::Reply(Reply::new(334, "", "UGFzc3dvcmQ6"))
            }
            Err(_) => reply(501, "5.5.2", "Malformed user name"),
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, dir: &Directory) -> Action {
        // No HELO/EHLO needed first: Postfix's default
        // (smtpd_helo_required = no), and Python's smtplib.mail() relies on it.
        if self.tx.is_some() {
            return reply(503, "5.5.1", "Nested MAIL command");
        }
        if self.port.takes_auth() && self.auth_user.is_none() {
            // RFC 6409 4.3 / RFC 4954 6
            return reply(530, "5.7.0", "Authentication required");
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !from.address.is_empty() {
            let Ok(sender) = Address::parse(&from.address) else {
                return reply(501, "5.1.7", "Bad sender address syntax");
            };
            if !from.address.is_ascii() && !smtputf8 {
                // RFC 6531 3.5
                return reply(553, "5.6.7", "Non-ASCII sender address needs SMTPUTF8");
            }
            if let Some(user) = &self.auth_user {
                if !dir.may_send_as(user, &sender) {
                    return reply(
                        553,
                        "5.7.1",
                        format!("<{sender}>: Sender address rejected: not owned by the authenticated user"),
                    );
                }
            }
        }
        if from.size as u64 > self.limits.max_message_size {
            // RFC 1870 6.2
            return reply(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
        }
        let body = if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            Some("8BITMIME".to_string())
        } else if from.flags & smtp_proto::MAIL_BODY_7BIT != 0 {
            Some("7BIT".to_string())
        } else if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return reply(555, "5.5.4", "BINARYMIME is not supported");
        } else {
            None
        };
        // RFC 3461 4.3, 4.4
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some("FULL".to_string())
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some("HDRS".to_string())
        } else {
            None
        };
        if let Err(refusal) = self.take_rate(Kind::Message) {
            return refusal;
        }
        self.tx = Some(Transaction {
            sender: from.address,
            params: EsmtpParams {
                body,
                smtputf8,
                envid: from.env_id,
                ret,
            },
            recipients: Vec::new(),
            in_bdat: false,
        });
        reply(250, "2.1.0", "Ok")
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, dir: &Directory) -> Action {
        let full = self.full_mailboxes.clone();
        let may_relay = self.may_relay || self.auth_user.is_some();
        let max = self.limits.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return reply(503, "5.5.1", "Need MAIL before RCPT");
        };
        let Ok(address) = Address::parse(&to.address) else {
            return reply(501, "5.1.3", "Bad recipient address syntax");
        };
        if !address.is_ascii() && !tx.params.smtputf8 {
            return reply(553, "5.6.7", "Non-ASCII recipient address needs SMTPUTF8");
        }
        if tx.recipients.len() >= max {
            // RFC 5321 4.5.3.1.10
            return reply(452, "4.5.3", "Too many recipients");
        }
        if dir.is_local_domain(address.domain()) {
            match dir.resolve(&address) {
                Ok(dests) if all_full(full.as_deref(), &dests) => {
                    // RFC 3463 4.2.2; qmgr keeps the list up to date.
                    // Not the client's error: it does not count as one.
                    self.policy_deferral = true;
                    return reply(452, "4.2.2", format!("<{address}>: Mailbox full"));
                }
                Ok(dests) if !dests.is_empty() => {}
                Ok(_) | Err(ResolveError::UnknownUser(_)) => {
                    return reply(
                        550,
                        "5.1.1",
                        format!("<{address}>: Recipient address rejected: User unknown"),
                    );
                }
                Err(ResolveError::AliasLoop(_)) | Err(ResolveError::TooManyTargets) => {
                    return reply(
                        550,
                        "5.4.6",
                        format!("<{address}>: Alias loop or expansion too large"),
                    );
                }
            }
        } else if !may_relay {
            return reply(554, "5.7.1", format!("<{address}>: Relay access denied"));
        }
        // Avoid delivering twice when a client repeats a recipient.
        if !tx
            .recipients
            .iter()
            .any(|r| r.address == address.to_string())
        {
            let sender = tx.sender.clone();
            if let Some(deferred) = self.greylisted(&sender, &address) {
                return deferred;
            }
            if let Err(refusal) = self.take_rate(Kind::Recipient) {
                return refusal;
            }
            let tx = self.tx.as_mut().expect("checked above");
            let mut recipient = Recipient::new(address.to_string(), to.orcpt);
            recipient.notify = notify(to.flags);
            tx.recipients.push(recipient);
        }
        reply(250, "2.1.5", "Ok")
    }

    fn data(&mut self) -> Action {
        match &self.tx {
            None => reply(503, "5.5.1", "Need MAIL command"),
            Some(tx) if tx.in_bdat => reply(503, "5.5.1", "DATA not allowed after BDAT"),
            Some(tx) if tx.recipients.is_empty() => reply(554, "5.5.1", "No valid recipients"),
            Some(_) => Action::ReadData(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")),
        }
    }

    fn bdat(&mut self, size: u64, last: bool) -> Action {
        let refuse = |r: Reply| Action::ReadChunk {
            size,
            last,
            accept: false,
            reply: Some(r),
        };
        match self.tx.as_mut() {
            // The -bs loop reads line by line; it has no chunk reader.
            _ if self.port == Port::Local => {
                refuse(Reply::new(502, "5.5.1", "BDAT is not available here"))
            }
            None => refuse(Reply::new(503, "5.5.1", "Need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => {
                refuse(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(tx) => {
                tx.in_bdat = true;
                Action::ReadChunk {
                    size,
                    last,
                    accept: true,
                    reply: None,
                }
            }
        }
    }

    /// A BDAT chunk was read. For a chunk that is not the last, the reply
    /// acknowledges it; the last one ends like DATA with [`Session::finish`].
    pub fn chunk_received(&mut self, size: u64) -> Reply {
        Reply::new(250, "2.0.0", format!("{size} octets received"))
    }

    /// The message data ended with `outcome`; the transaction is over
    /// either way.
    pub fn finish(&mut self, outcome: DataOutcome) -> Reply {
        self.tx = None;
        match outcome {
            DataOutcome::Queued(id) => Reply::new(250, "2.0.0", format!("Ok: queued as {id}")),
            DataOutcome::TooBig => Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ),
            DataOutcome::DiskFull => Reply::new(452, "4.3.1", "Insufficient system storage"),
            // RFC 5321 6.3
            DataOutcome::Loop => Reply::new(554, "5.4.6", "Too many hops: mail loop detected"),
            DataOutcome::LocalError => {
                Reply::new(451, "4.3.0", "Local error in processing; try again later")
            }
        }
    }

    /// Abandon the transaction (bare LF, timeout, disconnect).
    pub fn abort(&mut self) {
        self.tx = None;
    }
}

fn reply(code: u16, enhanced: &'static str, text: impl Into<String>) -> Action {
    Action::Reply(Reply::new(code, enhanced, text))
}

/// Whether a command line has anything after its verb.
/// `RCPT TO:<postmaster>` with the address of the postmaster `ours`
/// gives. RFC 5321 4.5.1: the bare name must be accepted, and means the
/// postmaster of this host's domain (or of the first one served);
/// smtp-proto only parses addresses with a domain, so it is qualified
/// before parsing.
fn qualify_postmaster(line: &[u8], ours: impl FnOnce() -> String) -> Option<Vec<u8>> {
    let prefix = b"RCPT TO:";
    let head = line.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = &line[prefix.len()..];
    let spaces = rest.iter().take_while(|b| **b == b' ').count();
    let name = b"<postmaster>";
    let candidate = rest.get(spaces..spaces + name.len())?;
    if !candidate.eq_ignore_ascii_case(name) {
        return None;
    }
    let mut out = line[..prefix.len() + spaces].to_vec();
    out.push(b'<');
    out.extend_from_slice(ours().as_bytes());
    out.push(b'>');
    out.extend_from_slice(&rest[spaces + name.len()..]);
    Some(out)
}

fn has_argument(line: &[u8]) -> bool {
    line.split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .nth(1)
        .is_some()
}

/// RFC 3461 4.1 NOTIFY from smtp-proto's flags; None when not given.
fn notify(flags: u64) -> Option<Notify> {
    let given = smtp_proto::RCPT_NOTIFY_SUCCESS
        | smtp_proto::RCPT_NOTIFY_FAILURE
        | smtp_proto::RCPT_NOTIFY_DELAY
        | smtp_proto::RCPT_NOTIFY_NEVER;
    (flags & given != 0).then_some(Notify {
        success: flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
        failure: flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
        delay: flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
    })
}

fn login_password(user: String, decoded: Vec<u8>) -> Action {
    match String::from_utf8(decoded) {
        Ok(password) => Action::Authenticate { user, password },
        Err(_) => reply(501, "5.5.2", "Malformed password"),
    }
}

fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// smtp-proto refuses a mechanism it does not know as a syntax error;
/// RFC 4954 4 wants 504 for that, and 501 for a missing mechanism.
fn auth_syntax_reply(line: &[u8]) -> Action {
    if has_argument(line) {
        reply(504, "5.5.4", "Unrecognized authentication type")
    } else {
        reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
    }
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand | ParseError::NeedsMoreData { .. } => {
            Reply::new(500, "5.5.2", "Command unrecognized")
        }
        ParseError::InvalidSenderAddress => Reply::new(501, "5.1.7", "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, "5.1.3", "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid parameter {param}"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        ParseError::ResponseTooLong | ParseError::InvalidResponse { .. } => {
            Reply::new(500, "5.5.2", "Command unrecognized")
        }
    }
}

/// Whether every mailbox `dests` reaches is listed `full` (an alias with
/// one mailbox left with room still takes mail).
fn all_full(full: Option<&FullMailboxesView>, dests: &[Destination]) -> bool {
    let Some(full) = full else {
        return false;
    };
    !dests.is_empty()
        && dests.iter().all(|d| match d {
            Destination::Local(a) => full.contains(&a.to_string()),
            Destination::Remote(_) => false,
        })
}
#[cfg(test)]
mod tests {
    use super::*;
    use common::aliases::Aliases;
    use common::domains::Domains;
    use common::userdb::UserDb;
    use std::sync::Arc;

    fn directory() -> (tempfile::TempDir, Directory) {
        let dir = tempfile::tempdir().unwrap();
        let dp = dir.path().join("domains");
        std::fs::write(&dp, "a.test\n").unwrap();
        let up = dir.path().join("users");
        UserDb::add(&up, &Address::parse("alice@a.test").unwrap(), "x").unwrap();
        let d = Directory {
            domains: Domains::load(&dp).unwrap(),
            aliases: Aliases::default(),
            users: Arc::new(UserDb::load(&up).unwrap()),
            delimiter: "+".into(),
        };
        (dir, d)
    }

    fn session(relay: &[&str]) -> Session {
        Session::new(
            SessionLimits {
                hostname: "mx.a.test".into(),
                max_message_size: 1000,
                max_recipients: 2,
                max_errors: 5,
                max_junk_commands: 3,
                relay_networks: relay.iter().map(|n| n.parse().unwrap()).collect(),
                allow_plaintext_auth: false,
            },
            Port::Mx,
            "192.0.2.1".parse().unwrap(),
            None,
        )
    }

    fn tls() -> TlsSummary {
        TlsSummary {
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_128_GCM_SHA256".into(),
        }
    }

    /// A session on the submission port, TLS up.
    fn submission() -> Session {
        let mut s = session(&[]);
        s.port = Port::Submission;
        s.tls_started(tls());
        s
    }

    fn run(s: &mut Session, d: &Directory, line: &str) -> Action {
        let line = format!("{line}\r\n");
        s.handle(line.as_bytes(), d)
    }

    fn code(a: &Action) -> (u16, &'static str) {
        match a {
            Action::Reply(r) | Action::Close(r) | Action::ReadData(r) | Action::StartTls(r) => {
                (r.code, r.enhanced)
            }
            Action::ReadChunk { reply: Some(r), .. } => (r.code, r.enhanced),
            Action::ReadChunk { reply: None, .. } | Action::Authenticate { .. } => (0, ""),
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn authenticated(d: &Directory) -> Session {
        let mut s = submission();
        run(&mut s, d, "EHLO c.test");
        let line = format!("AUTH PLAIN {}", b64("\0alice@a.test\0pw"));
        assert!(matches!(run(&mut s, d, &line), Action::Authenticate { .. }));
        let ok = s.auth_result(Ok(Address::parse("alice@a.test").unwrap()));
        assert_eq!(code(&ok), (235, "2.7.0"));
        s
    }

    #[test]
    fn starttls_forgets_the_session_and_changes_ehlo() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        let Action::Reply(ehlo) = run(&mut s, &d, "EHLO c.test") else {
            panic!()
        };
        assert!(ehlo.lines.contains(&"STARTTLS".to_string()));
        // No AUTH on the MX port, not even after TLS.
        assert!(!ehlo.lines.iter().any(|l| l.starts_with("AUTH")));
        assert_eq!(code(&run(&mut s, &d, "STARTTLS now")), (501, "5.5.4"));
        assert_eq!(code(&run(&mut s, &d, "STARTTLS")), (220, "2.0.0"));
        s.tls_started(tls());
        assert_eq!(s.helo_name(), "");
        let Action::Reply(ehlo) = run(&mut s, &d, "EHLO c.test") else {
            panic!()
        };
        assert!(!ehlo.lines.contains(&"STARTTLS".to_string()));
        assert_eq!(code(&run(&mut s, &d, "STARTTLS")), (503, "5.5.1"));
        assert_eq!(s.protocol(), "ESMTPS");
        assert_eq!(code(&run(&mut s, &d, "AUTH PLAIN")), (503, "5.5.1"));
    }

    #[test]
    fn submission_needs_tls_for_auth_and_auth_for_mail() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        s.port = Port::Submission;
        let Action::Reply(ehlo) = run(&mut s, &d, "EHLO c.test") else {
            panic!()
        };
        assert!(!ehlo.lines.iter().any(|l| l.starts_with("AUTH")));
        assert_eq!(
            code(&run(&mut s, &d, "AUTH PLAIN AGFsaWNlAHB3")),
            (538, "5.7.11")
        );
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<alice@a.test>")),
            (530, "5.7.0")
        );
        let mut s = submission();
        let Action::Reply(ehlo) = run(&mut s, &d, "EHLO c.test") else {
            panic!()
        };
        assert!(ehlo.lines.contains(&"AUTH PLAIN LOGIN".to_string()));
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<alice@a.test>")),
            (530, "5.7.0")
        );
        assert_eq!(code(&run(&mut s, &d, "AUTH CRAM-MD5")), (504, "5.5.4"));
        assert_eq!(code(&run(&mut s, &d, "AUTH")), (501, "5.5.4"));
    }

    #[test]
    fn sasl_plain_and_login_exchanges() {
        let (_t, d) = directory();
        let mut s = submission();
        s.limits.max_errors = 100;
        run(&mut s, &d, "EHLO c.test");
        assert_eq!(code(&run(&mut s, &d, "AUTH PLAIN")), (334, ""));
        assert!(s.in_sasl());
        match s.sasl_response(format!("{}\r\n", b64("\0alice@a.test\0secret")).as_bytes()) {
            Action::Authenticate { user, password } => {
                assert_eq!(
                    (user.as_str(), password.as_str()),
                    ("alice@a.test", "secret")
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            code(&s.auth_result(Err(LoginError::Failed))),
            (535, "5.7.8")
        );
        assert_eq!(
            code(&s.auth_result(Err(LoginError::Throttled))),
            (454, "4.7.0")
        );
        // Someone else's authorization identity is refused.
        let other = format!("AUTH PLAIN {}", b64("bob@a.test\0alice@a.test\0pw"));
        assert_eq!(code(&run(&mut s, &d, &other)), (535, "5.7.8"));
        // LOGIN, with the user name as initial response.
        let a = run(&mut s, &d, &format!("AUTH LOGIN {}", b64("alice@a.test")));
        let Action::Reply(r) = a else { panic!() };
        assert_eq!(r.to_wire(), "334 UGFzc3dvcmQ6\r\n");
        match s.sasl_response(format!("{}\r\n", b64("pw")).as_bytes()) {
            Action::Authenticate { user, password } => {
                assert_eq!((user.as_str(), password.as_str()), ("alice@a.test", "pw"))
            }
            other => panic!("{other:?}"),
        }
        // Cancelled, and undecodable.
        run(&mut s, &d, "AUTH LOGIN");
        assert_eq!(code(&s.sasl_response(b"*\r\n")), (501, "5.0.0"));
        run(&mut s, &d, "AUTH PLAIN");
        assert_eq!(code(&s.sasl_response(b"%%%\r\n")), (501, "5.5.2"));
        assert!(!s.in_sasl());
    }

    #[test]
    fn authenticated_sender_must_be_the_users_own() {
        let (_t, d) = directory();
        let mut s = authenticated(&d);
        assert_eq!(s.protocol(), "ESMTPSA");
        assert_eq!(
            code(&run(&mut s, &d, "AUTH PLAIN AGFsaWNlAHB3")),
            (503, "5.5.1")
        );
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<bob@elsewhere.test>")),
            (553, "5.7.1")
        );
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<alice+x@a.test>")),
            (250, "2.1.0")
        );
        // Authenticated users may relay.
        assert_eq!(
            code(&run(&mut s, &d, "RCPT TO:<x@far.test>")),
            (250, "2.1.5")
        );
        run(&mut s, &d, "RSET");
        assert_eq!(code(&run(&mut s, &d, "MAIL FROM:<>")), (250, "2.1.0"));
    }

    #[test]
    fn dsn_parameters_are_kept() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        let Action::Reply(ehlo) = run(&mut s, &d, "EHLO c.test") else {
            panic!()
        };
        assert!(ehlo.lines.contains(&"DSN".to_string()));
        run(&mut s, &d, "MAIL FROM:<x@y.test> RET=HDRS ENVID=QQ314159");
        run(
            &mut s,
            &d,
            "RCPT TO:<alice@a.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Alice@a.test",
        );
        run(&mut s, &d, "RCPT TO:<alice+x@a.test>");
        let tx = s.transaction().unwrap();
        assert_eq!(tx.params.ret.as_deref(), Some("HDRS"));
        assert_eq!(tx.params.envid.as_deref(), Some("QQ314159"));
        let [first, second] = tx.recipients.as_slice() else {
            panic!("{:?}", tx.recipients)
        };
        assert_eq!(
            first.notify,
            Some(Notify {
                success: true,
                failure: false,
                delay: true
            })
        );
        assert!(first.wants_success_report() && !first.wants_failure_report());
        assert_eq!(second.notify, None);
        assert!(second.wants_failure_report() && !second.wants_success_report());
    }

    #[test]
    fn junk_commands_are_capped() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        for _ in 0..3 {
            assert_eq!(code(&run(&mut s, &d, "NOOP")), (250, "2.0.0"));
        }
        assert_eq!(code(&run(&mut s, &d, "RSET")), (421, "4.7.0"));
    }

    #[test]
    fn happy_path_and_order() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        assert_eq!(code(&run(&mut s, &d, "EHLO c.test")).0, 250);
        assert_eq!(
            code(&run(&mut s, &d, "RCPT TO:<alice@a.test>")),
            (503, "5.5.1")
        );
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<x@y.test> BODY=8BITMIME")),
            (250, "2.1.0")
        );
        let nested = run(&mut s, &d, "MAIL FROM:<x@y.test>");
        assert_eq!(code(&nested), (503, "5.5.1"));
        assert_eq!(code(&run(&mut s, &d, "DATA")), (554, "5.5.1"));
        assert_eq!(
            code(&run(&mut s, &d, "RCPT TO:<Alice+tag@A.test>")),
            (250, "2.1.5")
        );
        assert!(matches!(run(&mut s, &d, "DATA"), Action::ReadData(_)));
        let r = s.finish(DataOutcome::Queued("ID".into()));
        assert_eq!(r.to_wire(), "250 2.0.0 Ok: queued as ID\r\n");
        assert!(s.transaction().is_none());
    }

    #[test]
    fn recipient_checks() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        run(&mut s, &d, "EHLO c.test");
        run(&mut s, &d, "MAIL FROM:<>");
        assert_eq!(
            code(&run(&mut s, &d, "RCPT TO:<bob@a.test>")),
            (550, "5.1.1")
        );
        assert_eq!(
            code(&run(&mut s, &d, "RCPT TO:<x@far.test>")),
            (554, "5.7.1")
        );
        assert_eq!(
            code(&run(&mut s, &d, "RCPT TO:<jü@a.test>")),
            (553, "5.6.7")
        );
        let mut relay = session(&["192.0.2.0/24"]);
        run(&mut relay, &d, "EHLO c.test");
        run(&mut relay, &d, "MAIL FROM:<a@b.test>");
        assert_eq!(
            code(&run(&mut relay, &d, "RCPT TO:<x@far.test>")),
            (250, "2.1.5")
        );
        assert_eq!(
            code(&run(&mut relay, &d, "RCPT TO:<y@far.test>")),
            (250, "2.1.5")
        );
        assert_eq!(
            code(&run(&mut relay, &d, "RCPT TO:<z@far.test>")),
            (452, "4.5.3")
        );
    }

    #[test]
    fn size_and_utf8_on_mail() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        run(&mut s, &d, "EHLO c.test");
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<a@b.test> SIZE=1001")),
            (552, "5.3.4")
        );
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<ü@b.test>")),
            (553, "5.6.7")
        );
        assert_eq!(
            code(&run(&mut s, &d, "MAIL FROM:<ü@b.test> SMTPUTF8")),
            (250, "2.1.0")
        );
        assert_eq!(s.protocol(), "UTF8SMTP");
    }

    #[test]
    fn bdat_refused_still_reads_chunk() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        run(&mut s, &d, "EHLO c.test");
        match run(&mut s, &d, "BDAT 10 LAST") {
            Action::ReadChunk {
                size: 10,
                accept: false,
                reply: Some(r),
                ..
            } => assert_eq!(r.code, 503),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_many_errors_closes() {
        let (_t, d) = directory();
        let mut s = session(&[]);
        for _ in 0..4 {
            assert_eq!(code(&run(&mut s, &d, "DATA")), (503, "5.5.1"));
        }
        assert_eq!(code(&run(&mut s, &d, "DATA")), (421, "4.7.0"));
    }
}
