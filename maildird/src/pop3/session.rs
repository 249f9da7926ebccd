//! The POP3 session state machine (RFC 1939 section 3): AUTHORIZATION,
//! TRANSACTION, UPDATE. No I/O: it answers commands and tells the I/O loop
//! when to check a password, send a message, start TLS or delete.

use super::command::{Command, ParseError};
use crate::login::LoginPolicy;

/// One message of the maildrop as the session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    /// Size in octets as sent (CRLF line ends), for LIST and STAT.
    pub size: u64,
    /// Unique id for UIDL (RFC 1939 section 7): 1 to 70 characters 0x21-0x7E.
    pub uidl: String,
}

/// What the I/O loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this single line (CRLF added by the I/O loop).
    Reply(String),
    /// Send a `+OK` line and then these lines, dot-stuffed, ending `.`.
    MultiLine(String, Vec<String>),
    /// Send `+ ` and read one SASL response line.
    Continue,
    /// Check the credentials; report with [`Session::login_succeeded`] or
    /// [`Session::login_failed`].
    Login { user: String, password: String },
    /// Send message `index` (0-based): all of it, or the header and
    /// `Some(n)` body lines (TOP).
    SendMessage {
        index: usize,
        body_lines: Option<u32>,
    },
    /// Reply `+OK`, then do the TLS handshake.
    StartTls,
    /// Enter UPDATE: delete these (0-based) messages, then reply and close.
    Update { delete: Vec<usize> },
    /// Send this line and close.
    Close(String),
}

#[derive(Debug)]
enum State {
    Authorization {
        user: Option<String>,
        /// AUTH PLAIN sent without an initial response.
        awaiting_sasl: bool,
    },
    Transaction {
        messages: Vec<MessageInfo>,
        deleted: Vec<bool>,
    },
}

/// One POP3 session.
#[derive(Debug)]
pub struct Session {
    policy: LoginPolicy,
    tls: bool,
    state: State,
}

impl Session {
    /// A new session; `tls` is true on the implicit-TLS port.
    pub fn new(policy: LoginPolicy, tls: bool) -> Session {
        Session {
            policy,
            tls,
            state: State::Authorization {
                user: None,
                awaiting_sasl: false,
            },
        }
    }

    /// The greeting.
    pub fn greeting(&self) -> String {
        format!("+OK {} POP3 mailsrv ready", self.policy.hostname)
    }

    /// Whether the session waits for a SASL response line (not a command).
    pub fn awaiting_sasl(&self) -> bool {
        matches!(
            self.state,
            State::Authorization {
                awaiting_sasl: true,
                ..
            }
        )
    }

    /// The TLS handshake finished (RFC 2595 4: the session restarts its
    /// AUTHORIZATION state).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.state = State::Authorization {
            user: None,
            awaiting_sasl: false,
        };
    }

    fn auth_allowed(&self) -> bool {
        self.tls || self.policy.allow_plaintext_auth
    }

    /// Handle one command line.
    pub fn handle(&mut self, parsed: Result<Command, ParseError>) -> Action {
        let cmd = match parsed {
            Ok(c) => c,
            Err(ParseError::Unknown) => return err("Unknown command"),
            Err(ParseError::Syntax(m)) => return err(m),
        };
        match cmd {
            Command::Capa => self.capa(),
            Command::Noop => ok(""),
            Command::Quit => match &self.state {
                State::Authorization { .. } => {
                    Action::Close(format!("+OK {} closing", self.policy.hostname))
                }
                State::Transaction { deleted, .. } => Action::Update {
                    delete: deleted
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| **d)
                        .map(|(i, _)| i)
                        .collect(),
                },
            },
            _ if matches!(self.state, State::Authorization { .. }) => self.authorization(cmd),
            _ => self.transaction(cmd),
        }
    }

    fn capa(&self) -> Action {
        let mut caps = vec![
            "TOP".to_string(),
            "UIDL".into(),
            "RESP-CODES".into(),
            "AUTH-RESP-CODE".into(),
            "PIPELINING".into(),
        ];
        let in_auth = matches!(self.state, State::Authorization { .. });
        if in_auth && self.auth_allowed() {
            caps.push("USER".into());
            caps.push("SASL PLAIN".into());
        }
        if in_auth && !self.tls && self.policy.tls_available {
            caps.push("STLS".into());
        }
        caps.push("IMPLEMENTATION mailsrv".into());
        Action::MultiLine("Capability list follows".into(), caps)
    }

    fn authorization(&mut self, cmd: Command) -> Action {
        let State::Authorization {
            user,
            awaiting_sasl,
        } = &mut self.state
        else {
            return err("Wrong state");
        };
        *awaiting_sasl = false;
        match cmd {
            Command::Stls if self.tls => err("Already using TLS"),
            Command::Stls if !self.policy.tls_available => err("TLS not available"),
            Command::Stls => Action::StartTls,
            Command::User(_) | Command::Pass(_) | Command::Auth { .. }
                if !self.tls && !self.policy.allow_plaintext_auth =>
            {
                err("[AUTH] Plaintext authentication disallowed without TLS; use STLS")
            }
            Command::User(name) => {
                *user = Some(name);
                ok("Send PASS")
            }
            Command::Pass(password) => match user.take() {
                Some(user) => Action::Login { user, password },
                None => err("Send USER first"),
            },
            Command::AuthList => {
                Action::MultiLine("Mechanisms follow".into(), vec!["PLAIN".into()])
            }
            Command::Auth { mechanism, initial } => {
                if mechanism != "PLAIN" {
                    return err("Unsupported authentication mechanism");
                }
                match initial {
                    // RFC 5034 4: "=" is an empty initial response.
                    Some(ir) => self.sasl_plain(&ir),
                    None => {
                        *awaiting_sasl = true;
                        Action::Continue
                    }
                }
            }
            _ => err("Not allowed before authentication"),
        }
    }

    /// The client's SASL response line after a `+ ` continuation.
    pub fn sasl_response(&mut self, line: &str) -> Action {
        if let State::Authorization { awaiting_sasl, .. } = &mut self.state {
            *awaiting_sasl = false;
        }
        if line == "*" {
            return err("Authentication cancelled");
        }
        self.sasl_plain(line)
    }

    /// RFC 4616: `authzid NUL authcid NUL passwd`, base64.
    fn sasl_plain(&mut self, b64: &str) -> Action {
        let decoded = if b64 == "=" {
            Vec::new()
        } else {
            match base64_decode(b64) {
                Some(d) => d,
                None => return err("[AUTH] Invalid base64"),
            }
        };
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let [authzid, authcid, password] = parts.as_slice() else {
            return err("[AUTH] Malformed PLAIN response");
        };
        let (Ok(authzid), Ok(user), Ok(password)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(password),
        ) else {
            return err("[AUTH] Malformed PLAIN response");
        };
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(user) {
            return err("[AUTH] Authorization identity must be empty or the user");
        }
        Action::Login {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// The credentials were right and the maildrop is locked and listed.
    pub fn login_succeeded(&mut self, messages: Vec<MessageInfo>) -> Action {
        let count = messages.len();
        let size: u64 = messages.iter().map(|m| m.size).sum();
        self.state = State::Transaction {
            deleted: vec![false; count],
            messages,
        };
        ok(&format!("Logged in, {count} messages ({size} octets)"))
    }

    /// The login failed with this reply (credentials, lock, throttling).
    pub fn login_failed(&mut self, reply: &str) -> Action {
        self.state = State::Authorization {
            user: None,
            awaiting_sasl: false,
        };
        Action::Reply(format!("-ERR {reply}"))
    }

    fn transaction(&mut self, cmd: Command) -> Action {
        let State::Transaction { messages, deleted } = &mut self.state else {
            return err("Wrong state");
        };
        // Message n, if it exists and is not deleted (RFC 1939 section 5).
        let live = |n: u32| {
            let i = n as usize - 1;
            (i < messages.len() && !deleted[i]).then_some(i)
        };
        match cmd {
            Command::Stat => {
                let (count, size) = messages
                    .iter()
                    .zip(deleted.iter())
                    .filter(|(_, d)| !**d)
                    .fold((0, 0u64), |(c, s), (m, _)| (c + 1, s + m.size));
                ok(&format!("{count} {size}"))
            }
            Command::List(None) => Action::MultiLine(
                "Scan listing follows".into(),
                listing(messages, deleted, |i, m| format!("{} {}", i + 1, m.size)),
            ),
            Command::List(Some(n)) => match live(n) {
                Some(i) => ok(&format!("{n} {}", messages[i].size)),
                None => err("No such message"),
            },
            Command::Uidl(None) => Action::MultiLine(
                "Unique-id listing follows".into(),
                listing(messages, deleted, |i, m| format!("{} {}", i + 1, m.uidl)),
            ),
            Command::Uidl(Some(n)) => match live(n) {
                Some(i) => ok(&format!("{n} {}", messages[i].uidl)),
                None => err("No such message"),
            },
            Command::Retr(n) => match live(n) {
                Some(index) => Action::SendMessage {
                    index,
                    body_lines: None,
                },
                None => err("No such message"),
            },
            Command::Top(n, lines) => match live(n) {
                Some(index) => Action::SendMessage {
                    index,
                    body_lines: Some(lines),
                },
                None => err("No such message"),
            },
            Command::Dele(n) => match live(n) {
                Some(i) => {
                    deleted[i] = true;
                    ok(&format!("Message {n} deleted"))
                }
                None => err("No such message"),
            },
            Command::Rset => {
                deleted.iter_mut().for_each(|d| *d = false);
                ok(&format!("{} messages", messages.len()))
            }
            _ => err("Not allowed after authentication"),
        }
    }

    /// The size of message `index`, for the `+OK` line before it.
    pub fn message_size(&self, index: usize) -> u64 {
        match &self.state {
            State::Transaction { messages, .. } => messages.get(index).map_or(0, |m| m.size),
            State::Authorization { .. } => 0,
        }
    }
}

fn listing(
    messages: &[MessageInfo],
    deleted: &[bool],
    line: impl Fn(usize, &MessageInfo) -> String,
) -> Vec<String> {
    messages
        .iter()
        .enumerate()
        .filter(|(i, _)| !deleted[*i])
        .map(|(i, m)| line(i, m))
        .collect()
}

fn ok(text: &str) -> Action {
    if text.is_empty() {
        Action::Reply("+OK".into())
    } else {
        Action::Reply(format!("+OK {text}"))
    }
}

fn err(text: &str) -> Action {
    Action::Reply(format!("-ERR {text}"))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::super::command::parse;
    use super::*;

    fn session(tls: bool, plaintext: bool) -> Session {
        Session::new(
            LoginPolicy {
                hostname: "mx".into(),
                allow_plaintext_auth: plaintext,
                tls_available: true,
            },
            tls,
        )
    }

    fn run(s: &mut Session, line: &str) -> Action {
        s.handle(parse(line))
    }

    fn logged_in() -> Session {
        let mut s = session(true, false);
        run(&mut s, "USER a@x");
        assert!(matches!(run(&mut s, "PASS pw"), Action::Login { .. }));
        let msgs = vec![
            MessageInfo {
                size: 10,
                uidl: "u1".into(),
            },
            MessageInfo {
                size: 20,
                uidl: "u2".into(),
            },
        ];
        s.login_succeeded(msgs);
        s
    }

    #[test]
    fn plaintext_refused_without_tls() {
        let mut s = session(false, false);
        assert!(
            matches!(run(&mut s, "USER a@x"), Action::Reply(r) if r.starts_with("-ERR [AUTH]"))
        );
        assert_eq!(run(&mut s, "STLS"), Action::StartTls);
        s.tls_started();
        assert_eq!(
            run(&mut s, "USER a@x"),
            Action::Reply("+OK Send PASS".into())
        );
        let mut open = session(false, true);
        run(&mut open, "USER a@x");
        assert_eq!(
            run(&mut open, "PASS p w"),
            Action::Login {
                user: "a@x".into(),
                password: "p w".into()
            }
        );
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let mut s = session(true, false);
        // "\0alice\0pw"
        assert_eq!(
            run(&mut s, "AUTH PLAIN AGFsaWNlAHB3"),
            Action::Login {
                user: "alice".into(),
                password: "pw".into()
            }
        );
        assert_eq!(run(&mut s, "AUTH PLAIN"), Action::Continue);
        assert!(s.awaiting_sasl());
        assert_eq!(
            s.sasl_response("AGFsaWNlAHB3"),
            Action::Login {
                user: "alice".into(),
                password: "pw".into()
            }
        );
        assert!(matches!(s.sasl_response("*"), Action::Reply(r) if r.starts_with("-ERR")));
        assert!(matches!(run(&mut s, "AUTH PLAIN !!!"), Action::Reply(r) if r.starts_with("-ERR")));
    }

    #[test]
    fn transaction_commands_and_update() {
        let mut s = logged_in();
        assert_eq!(run(&mut s, "STAT"), Action::Reply("+OK 2 30".into()));
        assert_eq!(
            run(&mut s, "DELE 1"),
            Action::Reply("+OK Message 1 deleted".into())
        );
        assert!(matches!(run(&mut s, "RETR 1"), Action::Reply(r) if r.starts_with("-ERR")));
        assert_eq!(run(&mut s, "STAT"), Action::Reply("+OK 1 20".into()));
        assert_eq!(
            run(&mut s, "UIDL"),
            Action::MultiLine("Unique-id listing follows".into(), vec!["2 u2".into()])
        );
        assert_eq!(
            run(&mut s, "TOP 2 0"),
            Action::SendMessage {
                index: 1,
                body_lines: Some(0)
            }
        );
        assert!(matches!(run(&mut s, "LIST 3"), Action::Reply(r) if r.starts_with("-ERR")));
        run(&mut s, "RSET");
        run(&mut s, "DELE 2");
        assert_eq!(run(&mut s, "QUIT"), Action::Update { delete: vec![1] });
    }

    #[test]
    fn quit_before_login_deletes_nothing() {
        let mut s = session(true, false);
        assert!(matches!(run(&mut s, "QUIT"), Action::Close(_)));
        assert!(matches!(run(&mut s, "STAT"), Action::Reply(r) if r.starts_with("-ERR")));
    }
}
