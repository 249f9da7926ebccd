//! One load-generating session: takes message numbers from the shared
//! counter and sends them, `per_session` per connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cli::{Cli, TlsMode};
use crate::message::{Message, MessageTemplate};
use crate::smtp::{plain_response, AuthRefused, Connection, Reply, Security, Setup};
use crate::stats::Stats;
use crate::tls::TlsClient;

/// The work shared by all sessions.
pub struct Job {
    /// The server.
    addr: SocketAddr,
    /// Envelope sender.
    from: String,
    /// Envelope recipients.
    to: Vec<String>,
    /// Messages per connection.
    per_session: u64,
    /// Whether to pipeline when the server allows it.
    pipelining: bool,
    /// Limit of each connect, handshake, read and write.
    io_timeout: Duration,
    /// TLS and AUTH of each connection.
    setup: Setup,
    /// The messages.
    template: MessageTemplate,
    /// Number of messages of the run.
    total: u64,
    /// Next message number to send.
    next: AtomicU64,
}

impl Job {
    /// The job the command line describes, sent to `addr`.
    pub fn new(cli: &Cli, addr: SocketAddr, template: MessageTemplate) -> Result<Self> {
        let security = match cli.tls {
            TlsMode::None => Security::Plain,
            TlsMode::Starttls => Security::StartTls(TlsClient::insecure(&cli.server)?),
            TlsMode::Implicit => Security::Implicit(TlsClient::insecure(&cli.server)?),
        };
        Ok(Job {
            addr,
            from: cli.from.clone(),
            to: cli.to.clone(),
            per_session: cli.per_session,
            pipelining: cli.pipelining,
            io_timeout: cli.io_timeout(),
            setup: Setup {
                security,
                auth_plain: cli
                    .credentials()
                    .map(|(user, password)| plain_response(user, password)),
            },
            template,
            total: cli.messages,
            next: AtomicU64::new(0),
        })
    }

    /// Claims the next message number, if any is left.
    fn claim(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.total).then_some(n)
    }
}

/// What the server did with one message.
enum Outcome {
    /// The server took the message (2xx after the data).
    Accepted {
        /// End of data to the final reply.
        latency: Duration,
        /// Recipients the server accepted.
        rcpts: u64,
        /// Replies of the recipients it refused.
        refused_rcpts: Vec<Reply>,
    },
    /// A negative reply to MAIL, to every RCPT, to DATA or to the data.
    Refused(Reply),
}

/// Runs one session until the job's messages are all claimed. A message
/// claimed by a session that then cannot connect (or set up TLS, or log in)
/// is left unsent, and the session ends.
pub async fn run(job: Arc<Job>) -> Stats {
    let mut stats = Stats::default();
    let mut conn: Option<Connection> = None;
    let mut sent_on_conn = 0;
    while let Some(n) = job.claim() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let started = Instant::now();
                match Connection::open(job.addr, job.io_timeout, &job.setup).await {
                    Ok(c) => {
                        stats.add_connection(&c, started.elapsed());
                        if job.pipelining && c.pipelining {
                            stats.pipelined_connections += 1;
                        }
                        sent_on_conn = 0;
                        conn.insert(c)
                    }
                    Err(e) => {
                        stats.connect_failures += 1;
                        if e.is::<AuthRefused>() {
                            stats.auth_failures += 1;
                        }
                        stats.errors.add(format!("{e:#}"), 1);
                        break;
                    }
                }
            }
        };
        let message = job.template.render(n);
        let mut keep = true;
        match transaction(c, &job, &message).await {
            Ok(Outcome::Accepted {
                latency,
                rcpts,
                refused_rcpts,
            }) => {
                stats.accepted += 1;
                stats.accepted_bytes += message.size;
                stats.deliveries += rcpts;
                stats.latencies.push(latency);
                stats.rcpt_refused += refused_rcpts.len() as u64;
                for reply in refused_rcpts {
                    stats.errors.add(format!("RCPT: {reply}"), 1);
                }
            }
            Ok(Outcome::Refused(reply)) => {
                stats.refused += 1;
                stats.errors.add(reply.to_string(), 1);
                keep = !reply.closes_connection()
                    && c.command("RSET").await.is_ok_and(|r| r.is_positive());
            }
            Err(e) => {
                stats.failed += 1;
                stats.errors.add(format!("{e:#}"), 1);
                keep = false;
            }
        }
        sent_on_conn += 1;
        if !keep {
            conn = None;
        } else if sent_on_conn >= job.per_session {
            if let Some(c) = conn.take() {
                c.quit().await;
            }
        }
    }
    if let Some(c) = conn {
        c.quit().await;
    }
    stats
}

/// Sends one message over `conn`. An error means the connection is in an
/// unknown state and must be dropped.
async fn transaction(conn: &mut Connection, job: &Job, message: &Message) -> Result<Outcome> {
    let mail = if conn.size {
        format!("MAIL FROM:<{}> SIZE={}", job.from, message.size)
    } else {
        format!("MAIL FROM:<{}>", job.from)
    };
    let rcpts: Vec<String> = job.to.iter().map(|to| format!("RCPT TO:<{to}>")).collect();

    // The envelope replies, in the order of the commands.
    let (mail_reply, rcpt_replies, data_reply) = if job.pipelining && conn.pipelining {
        let mut batch = format!("{mail}\r\n");
        for rcpt in &rcpts {
            batch.push_str(rcpt);
            batch.push_str("\r\n");
        }
        batch.push_str("DATA\r\n");
        conn.send(batch.as_bytes()).await?;
        let mail_reply = conn.read_reply().await.context("reply to MAIL")?;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for _ in &rcpts {
            rcpt_replies.push(conn.read_reply().await.context("reply to RCPT")?);
        }
        let data_reply = conn.read_reply().await.context("reply to DATA")?;
        (mail_reply, rcpt_replies, data_reply)
    } else {
        let mail_reply = conn.command(&mail).await?;
        if !mail_reply.is_positive() {
            return Ok(Outcome::Refused(mail_reply));
        }
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for rcpt in &rcpts {
            rcpt_replies.push(conn.command(rcpt).await?);
        }
        if let Some(refusal) = all_refused(&rcpt_replies) {
            return Ok(Outcome::Refused(refusal));
        }
        (mail_reply, rcpt_replies, conn.command("DATA").await?)
    };

    if data_reply.code != 354 {
        // Report the first cause: MAIL, then the recipients, then DATA itself.
        let cause = if !mail_reply.is_positive() {
            mail_reply
        } else {
            all_refused(&rcpt_replies).unwrap_or(data_reply)
        };
        return Ok(Outcome::Refused(cause));
    }
    conn.send(&message.wire).await?;
    let sent = Instant::now();
    let final_reply = conn.read_reply().await.context("reply to end of data")?;
    let latency = sent.elapsed();
    if !final_reply.is_positive() {
        return Ok(Outcome::Refused(final_reply));
    }
    let (accepted, refused): (Vec<Reply>, Vec<Reply>) =
        rcpt_replies.into_iter().partition(Reply::is_positive);
    Ok(Outcome::Accepted {
        latency,
        rcpts: accepted.len() as u64,
        refused_rcpts: refused,
    })
}

/// The first refusal if every recipient was refused.
fn all_refused(rcpt_replies: &[Reply]) -> Option<Reply> {
    if rcpt_replies.iter().any(Reply::is_positive) {
        None
    } else {
        rcpt_replies.first().cloned()
    }
}
