//! The SMTP server session state machine (RFC 5321 4.1, 4.3.2), free of
//! I/O: it takes parsed commands and tells the I/O loop what to answer and
//! what to read next.

use std::net::IpAddr;

use common::address::Address;
use common::config::IpNet;
use common::recipients::{Directory, ResolveError};
use common::spool::{EsmtpParams, Recipient};
use smtp_proto::{Error as ParseError, Request};

use super::reply::Reply;

/// The settings a session needs.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub relay_networks: Vec<IpNet>,
}

/// What the I/O loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the reply, read the next command.
    Reply(Reply),
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
    client_ip: IpAddr,
    may_relay: bool,
    greeted: Greeted,
    helo_name: String,
    errors: u32,
    tx: Option<Transaction>,
}

impl Session {
    /// A new session with a client at `client_ip`.
    pub fn new(limits: SessionLimits, client_ip: IpAddr) -> Session {
        let may_relay = limits.relay_networks.iter().any(|n| n.contains(client_ip));
        Session {
            limits,
            client_ip,
            may_relay,
            greeted: Greeted::No,
            helo_name: String::new(),
            errors: 0,
            tx: None,
        }
    }

    /// The 220 greeting (no enhanced code: RFC 2034 section 3).
    pub fn greeting(&self) -> Reply {
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

    /// The `with` protocol keyword for `Received:` (RFC 3848, RFC 6531 3.7.3).
    pub fn protocol(&self) -> &'static str {
        let utf8 = self.tx.as_ref().is_some_and(|t| t.params.smtputf8);
        match (self.greeted, utf8) {
            (_, true) => "UTF8SMTP",
            (Greeted::Ehlo, false) => "ESMTP",
            _ => "SMTP",
        }
    }

    /// Handle one command line, parsed or not.
    pub fn handle(
        &mut self,
        parsed: Result<Request<String>, ParseError>,
        dir: &Directory,
    ) -> Action {
        let action = match parsed {
            Ok(req) => self.command(req, dir),
            Err(e) => Action::Reply(parse_error_reply(e)),
        };
        self.count_errors(action)
    }

    /// A command line longer than the limit.
    pub fn line_too_long(&mut self) -> Action {
        self.count_errors(Action::Reply(Reply::new(500, "5.5.2", "Line too long")))
    }

    /// Counts error replies; past `max_errors` the answer becomes 421 and
    /// the session ends (as Postfix's smtpd_hard_error_limit).
    fn count_errors(&mut self, action: Action) -> Action {
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
            Request::Mail { from } => self.mail(from),
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
            Request::Help { .. } => reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP; see RFC 5321",
            ),
            Request::StartTls => reply(502, "5.5.1", "STARTTLS not available"),
            Request::Auth { .. } => reply(502, "5.5.1", "AUTH not available"),
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
        let lines = vec![
            self.limits.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.limits.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
            "HELP".into(),
        ];
        Action::Reply(Reply {
            code: 250,
            enhanced: "",
            lines,
        })
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) -> Action {
        // No HELO/EHLO needed first: Postfix's default
        // (smtpd_helo_required = no), and Python's smtplib.mail() relies on it.
        if self.tx.is_some() {
            return reply(503, "5.5.1", "Nested MAIL command");
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !from.address.is_empty() {
            if Address::parse(&from.address).is_err() {
                return reply(501, "5.1.7", "Bad sender address syntax");
            }
            if !from.address.is_ascii() && !smtputf8 {
                // RFC 6531 3.5
                return reply(553, "5.6.7", "Non-ASCII sender address needs SMTPUTF8");
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
        self.tx = Some(Transaction {
            sender: from.address,
            params: EsmtpParams {
                body,
                smtputf8,
                envid: None,
                ret: None,
            },
            recipients: Vec::new(),
            in_bdat: false,
        });
        reply(250, "2.1.0", "Ok")
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, dir: &Directory) -> Action {
        let hostname = self.limits.hostname.clone();
        let may_relay = self.may_relay;
        let max = self.limits.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return reply(503, "5.5.1", "Need MAIL before RCPT");
        };
        // RFC 5321 4.5.1: <postmaster> without a domain must be accepted;
        // it means the postmaster of this host's domain, or of the first
        // domain served if the host name is not one.
        let raw = if to.address.eq_ignore_ascii_case("postmaster") {
            let domain = if dir.is_local_domain(&hostname) {
                hostname.as_str()
            } else {
                dir.domains.iter().next().unwrap_or(hostname.as_str())
            };
            format!("postmaster@{domain}")
        } else {
            to.address
        };
        let Ok(address) = Address::parse(&raw) else {
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
            tx.recipients
                .push(Recipient::new(address.to_string(), to.orcpt));
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
                relay_networks: relay.iter().map(|n| n.parse().unwrap()).collect(),
            },
            "192.0.2.1".parse().unwrap(),
        )
    }

    fn run(s: &mut Session, d: &Directory, line: &str) -> Action {
        let line = format!("{line}\r\n");
        s.handle(Request::parse(&mut line.as_bytes().iter()), d)
    }

    fn code(a: &Action) -> (u16, &'static str) {
        match a {
            Action::Reply(r) | Action::Close(r) | Action::ReadData(r) => (r.code, r.enhanced),
            Action::ReadChunk { reply: Some(r), .. } => (r.code, r.enhanced),
            Action::ReadChunk { reply: None, .. } => (0, ""),
        }
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
            assert!(matches!(run(&mut s, &d, "BOGUS"), Action::Reply(_)));
        }
        assert_eq!(code(&run(&mut s, &d, "BOGUS")), (421, "4.7.0"));
    }
}
