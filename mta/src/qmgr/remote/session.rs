//! One SMTP client session: greeting, EHLO, STARTTLS, AUTH, then any
//! number of mail transactions (RFC 5321 3.3, RFC 2920 pipelining).

use std::time::Duration;

use base64::Engine as _;
use smtp_proto::Response;
use tokio::io::AsyncReadExt;
use tokio_rustls::TlsConnector;

use super::client::{
    ClientError, Connection, BLOCK_TIMEOUT, COMMAND_TIMEOUT, DATA_TIMEOUT, FINAL_TIMEOUT,
    QUIT_TIMEOUT,
};
use super::proto::{self, Capabilities, DataEncoder, MailParams, RcptParams};
use super::route::Hop;
use super::Failure;
use common::config::TlsPolicy;
use common::spool::RemoteReply;
use common::tls::TlsSummary;

/// How to open a session.
pub struct SessionSettings<'a> {
    pub helo_name: &'a str,
    pub tls: TlsPolicy,
    pub connector: &'a TlsConnector,
    pub connect_timeout: Duration,
    /// AUTH PLAIN/LOGIN credentials (relay host).
    pub credentials: Option<&'a (String, String)>,
}

/// Why a session could not be opened with a hop.
#[derive(Debug)]
pub struct OpenFailure {
    pub failure: Failure,
    /// The server refused with 5xx (try the next hop, but if every hop
    /// does, the mail bounces).
    pub permanent: bool,
    /// The TLS handshake failed (opportunistic TLS then tries without).
    pub tls_failed: bool,
}

impl OpenFailure {
    fn temporary(reason: String) -> Self {
        OpenFailure {
            failure: Failure {
                reason,
                reply: None,
            },
            permanent: false,
            tls_failed: false,
        }
    }

    fn tls(hop: &Hop, e: &ClientError) -> Self {
        OpenFailure {
            tls_failed: true,
            ..Self::temporary(format!("4.7.5 TLS with {hop} failed: {e}"))
        }
    }

    fn refused(hop: &Hop, reply: &Response<String>, phase: &str) -> Self {
        OpenFailure {
            failure: Failure::from_reply(hop, reply, phase),
            permanent: reply.code >= 500,
            tls_failed: false,
        }
    }

    fn broken(hop: &Hop, e: &ClientError) -> Self {
        Self::temporary(format!("4.4.2 lost connection with {hop}: {e}"))
    }
}

impl Failure {
    /// What a server's refusal means for a recipient.
    pub fn from_reply(hop: &Hop, reply: &Response<String>, phase: &str) -> Failure {
        let said = proto::describe(reply);
        Failure {
            reason: format!(
                "{} host {hop} said: {said} (in reply to {phase})",
                proto::status_of(reply)
            ),
            reply: Some(RemoteReply {
                mta: hop.name.clone(),
                reply: said,
            }),
        }
    }
}

/// An open session, ready for a transaction.
pub struct Session {
    conn: Connection,
    pub hop: Hop,
    pub caps: Capabilities,
    /// What TLS the session uses, if any.
    pub tls: Option<TlsSummary>,
}

/// The reply to one recipient of a transaction.
#[derive(Debug, Clone)]
pub enum RcptResult {
    /// Accepted by the server; the final reply text.
    Sent(String),
    Deferred(Failure),
    Failed(Failure),
}

/// One recipient as sent.
pub struct TxnRecipient {
    pub address: String,
    pub params: RcptParams,
}

impl Session {
    /// Connect to `hop` and get it ready for MAIL.
    pub async fn open(hop: &Hop, settings: &SessionSettings<'_>) -> Result<Session, OpenFailure> {
        let mut conn = Connection::connect(hop.addr, settings.connect_timeout)
            .await
            .map_err(|e| OpenFailure::temporary(format!("4.4.1 cannot connect to {hop}: {e}")))?;
        let mut tls = None;
        if settings.tls == TlsPolicy::Implicit {
            let (c, summary) = conn
                .start_tls(settings.connector, &hop.name)
                .await
                .map_err(|e| OpenFailure::tls(hop, &e))?;
            (conn, tls) = (c, summary);
        }
        let (greeting, _) = conn
            .reply(COMMAND_TIMEOUT, "in the greeting")
            .await
            .map_err(|e| OpenFailure::broken(hop, &e))?;
        if greeting.code != 220 {
            return Err(OpenFailure::refused(hop, &greeting, "the greeting"));
        }
        let mut caps = ehlo(&mut conn, hop, settings.helo_name).await?;
        if tls.is_none() && settings.tls != TlsPolicy::None && caps.starttls {
            let reply = conn
                .command("STARTTLS\r\n", COMMAND_TIMEOUT, "to STARTTLS")
                .await
                .map_err(|e| OpenFailure::broken(hop, &e))?;
            if reply.code == 220 {
                let (c, summary) = conn
                    .start_tls(settings.connector, &hop.name)
                    .await
                    .map_err(|e| OpenFailure::tls(hop, &e))?;
                (conn, tls) = (c, summary);
                // RFC 3207 4.2: forget what was learnt before TLS.
                caps = ehlo(&mut conn, hop, settings.helo_name).await?;
            } else if settings.tls == TlsPolicy::Required {
                return Err(OpenFailure::temporary(format!(
                    "4.7.10 TLS is required, but {hop} refused STARTTLS: {}",
                    proto::describe(&reply)
                )));
            }
        }
        if tls.is_none() && settings.tls == TlsPolicy::Required {
            return Err(OpenFailure::temporary(format!(
                "4.7.10 TLS is required, but {hop} does not offer STARTTLS"
            )));
        }
        let mut session = Session {
            conn,
            hop: hop.clone(),
            caps,
            tls,
        };
        if let Some(credentials) = settings.credentials {
            if session.tls.is_none() && settings.tls != TlsPolicy::None {
                return Err(OpenFailure::temporary(format!(
                    "4.7.10 not sending credentials to {hop} without TLS"
                )));
            }
            session.authenticate(credentials).await?;
        }
        Ok(session)
    }

    /// AUTH PLAIN (RFC 4616) or, if that is not offered, LOGIN.
    async fn authenticate(
        &mut self,
        (user, password): &(String, String),
    ) -> Result<(), OpenFailure> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let hop = self.hop.clone();
        let broken = |e: ClientError| OpenFailure::broken(&hop, &e);
        let reply = if self.caps.auth_plain || !self.caps.auth_login {
            let line = format!("AUTH PLAIN {}\r\n", b64(&format!("\0{user}\0{password}")));
            self.conn
                .command(&line, COMMAND_TIMEOUT, "to AUTH")
                .await
                .map_err(broken)?
        } else {
            let mut reply = self
                .conn
                .command("AUTH LOGIN\r\n", COMMAND_TIMEOUT, "to AUTH")
                .await
                .map_err(broken)?;
            for secret in [user, password] {
                if reply.code != 334 {
                    break;
                }
                reply = self
                    .conn
                    .command(&format!("{}\r\n", b64(secret)), COMMAND_TIMEOUT, "to AUTH")
                    .await
                    .map_err(broken)?;
            }
            reply
        };
        if reply.code == 235 {
            return Ok(());
        }
        // Wrong credentials are the admin's to fix: the mail waits
        // (Postfix's smtp_sasl_auth_soft_bounce).
        Err(OpenFailure::temporary(format!(
            "4.7.8 authentication to {hop} failed: {}",
            proto::describe(&reply)
        )))
    }

    /// Whether the session still answers (before reusing a cached one).
    pub async fn reset(&mut self) -> bool {
        matches!(
            self.conn.command("RSET\r\n", COMMAND_TIMEOUT, "to RSET").await,
            Ok(r) if r.code == 250
        )
    }

    /// End politely.
    pub async fn quit(mut self) {
        let _ = self.conn.command("QUIT\r\n", QUIT_TIMEOUT, "to QUIT").await;
    }

    /// One mail transaction. Err means the connection broke (the results
    /// are then to be deferred); Ok gives a result per recipient.
    pub async fn transaction(
        &mut self,
        sender: &str,
        params: &MailParams,
        recipients: &[TxnRecipient],
        added_headers: &str,
        message: tokio::fs::File,
    ) -> Result<Vec<RcptResult>, ClientError> {
        let mail = proto::mail_from(sender, params);
        let rcpts: Vec<String> = recipients
            .iter()
            .map(|r| proto::rcpt_to(&r.address, &r.params))
            .collect();
        let hop = self.hop.clone();
        let result_of = |reply: &Response<String>, phase: &str| -> RcptResult {
            let failure = Failure::from_reply(&hop, reply, phase);
            if reply.code >= 500 {
                RcptResult::Failed(failure)
            } else {
                RcptResult::Deferred(failure)
            }
        };
        let pipelining = self.caps.pipelining;
        if pipelining {
            // RFC 2920 3.1: MAIL, the RCPTs and DATA go in one group.
            let mut group = mail.clone();
            rcpts.iter().for_each(|r| group.push_str(r));
            group.push_str("DATA\r\n");
            self.conn.send(group.as_bytes(), COMMAND_TIMEOUT).await?;
        } else {
            self.conn.send(mail.as_bytes(), COMMAND_TIMEOUT).await?;
        }
        let (mail_reply, _) = self.conn.reply(COMMAND_TIMEOUT, "to MAIL FROM").await?;
        let mail_ok = (200..300).contains(&mail_reply.code);
        let mut results = Vec::with_capacity(recipients.len());
        let mut accepted = 0;
        for line in &rcpts {
            if !pipelining {
                if !mail_ok {
                    break;
                }
                self.conn.send(line.as_bytes(), COMMAND_TIMEOUT).await?;
            }
            let (reply, _) = self.conn.reply(COMMAND_TIMEOUT, "to RCPT TO").await?;
            if !mail_ok {
                continue;
            }
            if reply.code == 250 || reply.code == 251 {
                accepted += 1;
                results.push(None);
            } else {
                results.push(Some(result_of(&reply, "RCPT TO")));
            }
        }
        if !mail_ok {
            if pipelining {
                // The answer to the pipelined DATA (503, normally).
                self.conn.reply(DATA_TIMEOUT, "to DATA").await?;
            }
            self.rset().await?;
            let failed = result_of(&mail_reply, "MAIL FROM");
            return Ok(vec![failed; recipients.len()]);
        }
        let data_reply = if pipelining {
            Some(self.conn.reply(DATA_TIMEOUT, "to DATA").await?.0)
        } else if accepted > 0 {
            Some(
                self.conn
                    .command("DATA\r\n", DATA_TIMEOUT, "to DATA")
                    .await?,
            )
        } else {
            None
        };
        let final_reply = match data_reply {
            Some(reply) if reply.code == 354 && accepted == 0 => {
                // RFC 2920 3.1: a server that says 354 with no valid
                // recipient gets an empty message, which it must reject.
                self.conn.send(b".\r\n", BLOCK_TIMEOUT).await?;
                self.conn.reply(FINAL_TIMEOUT, "to end of DATA").await?;
                None
            }
            Some(reply) if reply.code == 354 => {
                self.send_data(added_headers, message).await?;
                Some(self.conn.reply(FINAL_TIMEOUT, "to end of DATA").await?.0)
            }
            Some(reply) if accepted > 0 => {
                let r = result_of(&reply, "DATA");
                for slot in results.iter_mut().filter(|s| s.is_none()) {
                    *slot = Some(r.clone());
                }
                self.rset().await?;
                None
            }
            _ => {
                self.rset().await?;
                None
            }
        };
        Ok(results
            .into_iter()
            .map(|slot| match (slot, &final_reply) {
                (Some(r), _) => r,
                (None, Some(reply)) if (200..300).contains(&reply.code) => {
                    RcptResult::Sent(proto::describe(reply))
                }
                (None, Some(reply)) => result_of(reply, "end of DATA"),
                (None, None) => RcptResult::Deferred(Failure {
                    reason: "4.4.2 transaction aborted".into(),
                    reply: None,
                }),
            })
            .collect())
    }

    async fn rset(&mut self) -> Result<(), ClientError> {
        self.conn
            .command("RSET\r\n", COMMAND_TIMEOUT, "to RSET")
            .await
            .map(|_| ())
    }

    /// Stream `added_headers` and the message, dot-stuffed, then the
    /// final dot.
    async fn send_data(
        &mut self,
        added_headers: &str,
        mut message: tokio::fs::File,
    ) -> Result<(), ClientError> {
        let mut encoder = DataEncoder::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(70 * 1024);
        // The added header fields go out with the first block.
        encoder.encode(added_headers.as_bytes(), &mut out);
        loop {
            let n = message.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            encoder.encode(&chunk[..n], &mut out);
            self.conn.send(&out, BLOCK_TIMEOUT).await?;
            out.clear();
        }
        encoder.finish(&mut out);
        self.conn.send(&out, BLOCK_TIMEOUT).await
    }
}

/// EHLO, falling back to HELO when the server does not know it (RFC 5321
/// 4.1.4, 3.2).
async fn ehlo(conn: &mut Connection, hop: &Hop, name: &str) -> Result<Capabilities, OpenFailure> {
    let broken = |e: ClientError| OpenFailure::broken(hop, &e);
    conn.send(format!("EHLO {name}\r\n").as_bytes(), COMMAND_TIMEOUT)
        .await
        .map_err(broken)?;
    let (reply, raw) = conn
        .reply(COMMAND_TIMEOUT, "to EHLO")
        .await
        .map_err(broken)?;
    if reply.code == 250 {
        return Ok(Capabilities::parse(&raw));
    }
    let reply = conn
        .command(&format!("HELO {name}\r\n"), COMMAND_TIMEOUT, "to HELO")
        .await
        .map_err(broken)?;
    if reply.code == 250 {
        Ok(Capabilities::default())
    } else {
        Err(OpenFailure::refused(hop, &reply, "HELO"))
    }
}
