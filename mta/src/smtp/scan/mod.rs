//! Content scanning of received messages by external daemons: ClamAV's
//! clamd for viruses, SpamAssassin's spamd for spam. Both read the message
//! from the spool file as it is streamed to them, so a large message is
//! never held in memory. A scanner that is down or slow never loses a
//! message: the admin chooses between a 451 (the client retries) and
//! accepting it with a header saying it was not scanned.

pub mod clamd;
pub mod spamd;

use std::path::Path;
use std::time::Duration;

use common::config::{CheckAction, ChecksConfig, ScanFailure, ScannerAddress};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use super::reply::Reply;
use clamd::ClamdAnswer;

/// Why a scan gave no verdict.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot read the queued message: {0}")]
    Read(std::io::Error),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("no answer within {0} seconds")]
    Timeout(u64),
    #[error("message larger than {0} bytes")]
    TooBig(u64),
}

/// A connection to a scanner, over TCP or a Unix socket.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

async fn connect(address: &ScannerAddress) -> Result<Box<dyn Socket>, ScanError> {
    Ok(match address {
        ScannerAddress::Unix(path) => Box::new(UnixStream::connect(path).await?),
        ScannerAddress::Tcp(addr) => Box::new(TcpStream::connect(addr.as_str()).await?),
    })
}

/// What the scanners made of a message.
#[derive(Debug)]
pub enum ScanOutcome {
    /// Accept it, with these header fields added, into Junk when `junk`.
    Accept {
        headers: String,
        junk: bool,
    },
    Refuse(Reply),
}

/// The scanners the config turns on.
pub struct Scanners {
    checks: ChecksConfig,
}

impl Scanners {
    pub fn new(checks: &ChecksConfig) -> Scanners {
        Scanners {
            checks: checks.clone(),
        }
    }

    /// Whether no scanner is on.
    pub fn is_empty(&self) -> bool {
        self.checks.clamd.is_none() && self.checks.spamd.is_none()
    }

    /// Scan message `id`, stored at `path` (`size` bytes). Every message
    /// goes to clamd (our own users' too: a stolen account spreading
    /// malware); only mail `from_outside` goes to spamd.
    pub async fn scan(&self, id: &str, path: &Path, size: u64, from_outside: bool) -> ScanOutcome {
        let mut headers = String::new();
        let mut junk = false;
        if let Some(c) = &self.checks.clamd {
            let result = if size > c.max_size {
                Err(ScanError::TooBig(c.max_size))
            } else {
                within(c.timeout, clamd::scan(&c.address, path, size)).await
            };
            match result {
                Ok(ClamdAnswer::Clean) => {}
                Ok(ClamdAnswer::Infected(name)) => {
                    tracing::info!("{id}: clamd found {name}");
                    return ScanOutcome::Refuse(Reply::new(
                        554,
                        "5.7.1",
                        format!("Message refused: virus found: {name}"),
                    ));
                }
                // Not scanning what is over the limit is the admin's
                // choice, not a failure.
                Err(e @ ScanError::TooBig(_)) => headers.push_str(&not_scanned("clamd", &e)),
                Err(e) => {
                    if let Some(reply) = failed("clamd", id, &e, c.on_failure) {
                        return ScanOutcome::Refuse(reply);
                    }
                    headers.push_str(&not_scanned("clamd", &e));
                }
            }
        }
        if let Some(c) = self.checks.spamd.as_ref().filter(|_| from_outside) {
            let result = if size > c.max_size {
                Err(ScanError::TooBig(c.max_size))
            } else {
                within(c.timeout, spamd::scan(&c.address, path, size)).await
            };
            match result {
                Ok(verdict) => {
                    headers.push_str(&verdict.headers());
                    let over = c.reject_score.is_some_and(|max| verdict.score >= max);
                    let action = if over {
                        CheckAction::Reject
                    } else if verdict.spam {
                        c.action
                    } else {
                        CheckAction::Tag
                    };
                    if verdict.spam || over {
                        tracing::info!(
                            "{id}: spamd score {:.1} (required {:.1}): {action:?}",
                            verdict.score,
                            verdict.required
                        );
                    }
                    match action {
                        CheckAction::Tag => {}
                        CheckAction::Junk => junk = true,
                        CheckAction::Reject => {
                            return ScanOutcome::Refuse(Reply::new(
                                550,
                                "5.7.1",
                                format!("Message refused as spam (score {:.1})", verdict.score),
                            ));
                        }
                    }
                }
                Err(e @ ScanError::TooBig(_)) => headers.push_str(&not_scanned("spamd", &e)),
                Err(e) => {
                    if let Some(reply) = failed("spamd", id, &e, c.on_failure) {
                        return ScanOutcome::Refuse(reply);
                    }
                    headers.push_str(&not_scanned("spamd", &e));
                }
            }
        }
        ScanOutcome::Accept { headers, junk }
    }
}

async fn within<T>(
    seconds: u64,
    scan: impl std::future::Future<Output = Result<T, ScanError>>,
) -> Result<T, ScanError> {
    tokio::time::timeout(Duration::from_secs(seconds), scan)
        .await
        .unwrap_or(Err(ScanError::Timeout(seconds)))
}

/// Log a scanner failure; the reply to give when the admin chose 451.
fn failed(scanner: &str, id: &str, e: &ScanError, on_failure: ScanFailure) -> Option<Reply> {
    tracing::warn!("{id}: {scanner}: {e}");
    (on_failure == ScanFailure::Tempfail).then(|| {
        Reply::new(
            451,
            "4.3.0",
            format!("Message not scanned ({scanner} unavailable), try again later"),
        )
    })
}

fn not_scanned(scanner: &str, e: &ScanError) -> String {
    let why: String = e.to_string().chars().filter(|c| !c.is_control()).collect();
    format!("X-Not-Scanned: {scanner}: {why}\r\n")
}
