//! Remote delivery: recipients of other domains are grouped by
//! destination (their domain, or the relay host), routed (MX or relay),
//! and sent over SMTP sessions shared between queued messages.

pub mod client;
mod pool;
pub mod proto;
mod route;
mod session;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use common::config::{Config, DeliveryConfig, TlsPolicy};
use common::spool::{Envelope, RemoteReply, Spool};
use futures_util::future::join_all;
use tokio::io::AsyncReadExt;
use tokio_rustls::TlsConnector;

use proto::{MailParams, RcptParams};
use route::{Route, Router};
use session::{RcptResult, Session, SessionSettings, TxnRecipient};

/// Largest header section examined for non-ASCII text.
const HEADER_SCAN_LIMIT: u64 = 256 * 1024;

/// What became of one remote recipient in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteResult {
    /// Accepted by the next hop.
    Sent {
        /// `name[ip]:port` of the server.
        relay: String,
        /// Its reply to the end of data.
        reply: String,
        /// The NOTIFY request went on to a DSN server, which now answers
        /// for it (RFC 3461 5.2.2); otherwise a "relayed" notice is ours.
        dsn_passed: bool,
    },
    Deferred(Failure),
    Failed(Failure),
}

/// Why a recipient was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// RFC 3463 status and reason, for logs, the queue and reports.
    pub reason: String,
    /// The server's reply, when a server refused.
    pub reply: Option<RemoteReply>,
}

impl Failure {
    /// A failure of ours (DNS, policy, local checks), not a server's reply.
    fn local(reason: String) -> Failure {
        Failure {
            reason,
            reply: None,
        }
    }
}

/// Everything remote delivery keeps between passes.
pub struct Remote {
    router: Router,
    pool: pool::Pool,
    connector: TlsConnector,
    /// Outgoing sessions in use, over all destinations.
    connections: tokio::sync::Semaphore,
    delivery: DeliveryConfig,
    /// The relay host's credentials, or why they cannot be used (the
    /// relay's mail then waits; local delivery goes on).
    credentials: Result<Option<(String, String)>, String>,
    hostname: String,
}

impl Remote {
    /// Set up from the config (inside the runtime: the resolver and the
    /// connection cache spawn tasks).
    pub fn new(config: &Config) -> anyhow::Result<Remote> {
        let credentials = match config
            .delivery
            .relay
            .as_ref()
            .and_then(|r| r.credentials.as_ref())
        {
            Some(path) => common::relay_credentials::load(path)
                .map(Some)
                .map_err(|e| {
                    tracing::error!("relay host credentials: {e}");
                    e.to_string()
                }),
            None => Ok(None),
        };
        let d = &config.delivery;
        Ok(Remote {
            router: Router {
                resolver: common::dns::resolver(&config.dns).context("setting up DNS")?,
                hostname: config.hostname.clone(),
                own_listeners: config.smtpd.listen.clone(),
                remote_port: d.remote_port,
            },
            pool: pool::Pool::new(
                d.max_connections_per_destination,
                Duration::from_secs(d.connection_cache_time),
            ),
            connector: client::unverified_connector(),
            connections: tokio::sync::Semaphore::new(d.max_connections),
            delivery: d.clone(),
            credentials,
            hostname: config.hostname.clone(),
        })
    }

    /// Close cached connections.
    pub async fn shutdown(&self) {
        self.pool.close_all().await;
    }

    /// Deliver `env`'s recipients at `indices` (all Pending, all remote).
    pub async fn deliver(
        &self,
        spool: &Spool,
        env: &Envelope,
        indices: &[usize],
    ) -> Vec<(usize, RemoteResult)> {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in indices {
            let domain = env.recipients[i]
                .address
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default();
            let destination = if self.delivery.relay.is_some() {
                String::new()
            } else {
                domain
            };
            groups.entry(destination).or_default().push(i);
        }
        let headers_utf8 = env.params.smtputf8 && headers_need_utf8(spool, &env.id).await;
        let message = Message {
            spool,
            env,
            headers_utf8,
        };
        join_all(
            groups
                .iter()
                .map(|(destination, group)| self.deliver_group(&message, destination, group)),
        )
        .await
        .into_iter()
        .flatten()
        .collect()
    }

    async fn deliver_group(
        &self,
        message: &Message<'_>,
        destination: &str,
        group: &[usize],
    ) -> Vec<(usize, RemoteResult)> {
        let all = |r: RemoteResult| group.iter().map(|&i| (i, r.clone())).collect::<Vec<_>>();
        let (route, tls) = match &self.delivery.relay {
            Some(relay) => (
                self.router.relay_route(&relay.host, relay.port).await,
                relay.tls,
            ),
            None => (
                self.router.mx_route(destination).await,
                self.delivery.tls_for(destination),
            ),
        };
        let hops = match route {
            Route::Hops(hops) => hops,
            Route::Fail(reason) => return all(RemoteResult::Failed(Failure::local(reason))),
            Route::Defer(reason) => return all(RemoteResult::Deferred(Failure::local(reason))),
        };
        let credentials = match &self.credentials {
            Ok(c) => c.as_ref(),
            Err(e) => {
                return all(RemoteResult::Deferred(Failure::local(format!(
                    "4.7.0 relay host credentials unusable: {e}"
                ))))
            }
        };
        let _slot = self.pool.slot(destination).await;
        // After the destination's slot, so a busy destination does not
        // hold connections others could use.
        let _connection = self.connections.acquire().await.expect("never closed");
        let mut session = None;
        if let Some(mut cached) = self.pool.take(destination) {
            // A cached session the server has closed meanwhile is dropped.
            if cached.reset().await {
                session = Some(cached);
            }
        }
        let mut session = match session {
            Some(s) => s,
            None => {
                let settings = SessionSettings {
                    helo_name: &self.hostname,
                    tls,
                    connector: &self.connector,
                    connect_timeout: Duration::from_secs(self.delivery.connect_timeout),
                    credentials,
                };
                match open_first(&hops, &settings, &message.env.id).await {
                    Ok(s) => s,
                    Err(result) => return all(result),
                }
            }
        };
        let (results, reusable) = self.send(message, &mut session, group).await;
        if reusable {
            self.pool.put(destination, session);
        }
        results
    }
}

/// A session with the first hop that takes one; else the result for
/// every recipient: a bounce only when every server refused for good.
async fn open_first(
    hops: &[route::Hop],
    settings: &SessionSettings<'_>,
    id: &str,
) -> Result<Session, RemoteResult> {
    let mut failures = Vec::new();
    for hop in hops {
        let mut opened = Session::open(hop, settings).await;
        if let Err(f) = &opened {
            if f.tls_failed && settings.tls == TlsPolicy::May && settings.credentials.is_none() {
                // Opportunistic TLS (RFC 7435 4): a failed handshake is
                // no reason not to deliver in the clear, as before TLS;
                // but never with a password to send.
                tracing::info!(
                    "{id}: {}; trying {} without TLS",
                    f.failure.reason,
                    hop.relay()
                );
                let plain = SessionSettings {
                    tls: TlsPolicy::None,
                    ..*settings
                };
                opened = Session::open(hop, &plain).await;
            }
        }
        match opened {
            Ok(s) => {
                match &s.tls {
                    Some(tls) => tracing::info!("{id}: connected to {} using {tls}", hop.relay()),
                    None => tracing::info!("{id}: connected to {} without TLS", hop.relay()),
                }
                return Ok(s);
            }
            Err(f) => {
                tracing::info!("{id}: {}", f.failure.reason);
                failures.push(f);
            }
        }
    }
    let permanent = !failures.is_empty() && failures.iter().all(|f| f.permanent);
    let failure = failures
        .into_iter()
        .find(|f| f.permanent == permanent)
        .map(|f| f.failure)
        .unwrap_or_else(|| Failure::local("4.4.1 no server to try".into()));
    Err(if permanent {
        RemoteResult::Failed(failure)
    } else {
        RemoteResult::Deferred(failure)
    })
}

impl Remote {
    /// The transactions for `group` over `session`; false when the session
    /// broke.
    async fn send(
        &self,
        message: &Message<'_>,
        session: &mut Session,
        group: &[usize],
    ) -> (Vec<(usize, RemoteResult)>, bool) {
        let env = message.env;
        let hop = session.hop.to_string();
        let caps = session.caps;
        let mut results = Vec::with_capacity(group.len());
        let fail_all = |reason: String| {
            let reason = Failure::local(reason);
            group
                .iter()
                .map(|&i| (i, RemoteResult::Failed(reason.clone())))
                .collect()
        };
        // What goes out: the header fields added in the queue, then the file.
        let size = env.size + env.added_headers.len() as u64;
        if caps.size_limit > 0 && size > caps.size_limit {
            return (
                fail_all(format!(
                    "5.3.4 message size {size} exceeds the limit of {} bytes of {hop}",
                    caps.size_limit
                )),
                true,
            );
        }
        let eight_bit = env
            .params
            .body
            .as_deref()
            .is_some_and(|b| b.eq_ignore_ascii_case("8BITMIME"));
        if eight_bit && !caps.eight_bit_mime {
            match has_8bit_data(message.spool, &env.id).await {
                Ok(false) => {}
                Ok(true) => {
                    // RFC 6152 3: without 8BITMIME at the server, 8-bit
                    // data may not be sent; we do not convert it.
                    return (
                        fail_all(format!(
                            "5.6.3 the message has 8-bit data and {hop} does not support 8BITMIME"
                        )),
                        true,
                    );
                }
                Err(e) => {
                    let reason =
                        Failure::local(format!("4.3.0 cannot read the queued message: {e}"));
                    let deferred = group
                        .iter()
                        .map(|&i| (i, RemoteResult::Deferred(reason.clone())));
                    return (deferred.collect(), true);
                }
            }
        }
        let sender_utf8 = !env.sender.is_ascii();
        if env.params.smtputf8 && !caps.smtputf8 && (sender_utf8 || message.headers_utf8) {
            // RFC 6531 3.2: such a message cannot be downgraded.
            return (
                fail_all(format!(
                    "5.6.7 the message needs SMTPUTF8 (non-ASCII {}) and {hop} does not support it",
                    if sender_utf8 {
                        "sender address"
                    } else {
                        "header fields"
                    }
                )),
                true,
            );
        }
        let mut sendable = Vec::with_capacity(group.len());
        for &i in group {
            let address = &env.recipients[i].address;
            if !caps.smtputf8 && !address.is_ascii() {
                results.push((
                    i,
                    RemoteResult::Failed(Failure::local(format!(
                        "5.6.7 the recipient address needs SMTPUTF8 and {hop} does not support it"
                    ))),
                ));
            } else {
                sendable.push(i);
            }
        }
        let params = MailParams {
            // RFC 1870 6: SIZE= whenever the server offers SIZE.
            size: caps.size_offered.then_some(size),
            eight_bit: eight_bit && caps.eight_bit_mime,
            smtputf8: env.params.smtputf8 && caps.smtputf8,
            ret: env.params.ret.clone().filter(|_| caps.dsn),
            envid: env.params.envid.clone().filter(|_| caps.dsn),
        };
        let per_transaction = self.delivery.max_recipients_per_transaction;
        for batch in sendable.chunks(per_transaction) {
            let rcpts: Vec<TxnRecipient> = batch
                .iter()
                .map(|&i| {
                    let r = &env.recipients[i];
                    TxnRecipient {
                        address: r.address.clone(),
                        params: if caps.dsn {
                            RcptParams {
                                notify: r.notify.map(|n| notify_value(&n)),
                                orcpt: r.orcpt.clone().or_else(|| r.original.clone()),
                            }
                        } else {
                            RcptParams::default()
                        },
                    }
                })
                .collect();
            let file = match message.spool.open_data(&env.id) {
                Ok(f) => tokio::fs::File::from_std(f),
                Err(e) => {
                    let reason =
                        Failure::local(format!("4.3.0 cannot read the queued message: {e}"));
                    results.extend(
                        batch
                            .iter()
                            .map(|&i| (i, RemoteResult::Deferred(reason.clone()))),
                    );
                    continue;
                }
            };
            match session
                .transaction(&env.sender, &params, &rcpts, &env.added_headers, file)
                .await
            {
                Ok(replies) => {
                    results.extend(batch.iter().zip(replies).map(|(&i, reply)| {
                        let result = match reply {
                            RcptResult::Sent(reply) => RemoteResult::Sent {
                                relay: session.hop.relay(),
                                reply,
                                dsn_passed: caps.dsn,
                            },
                            RcptResult::Deferred(r) => RemoteResult::Deferred(r),
                            RcptResult::Failed(r) => RemoteResult::Failed(r),
                        };
                        (i, result)
                    }));
                }
                Err(e) => {
                    let reason = Failure::local(format!("4.4.2 lost connection with {hop}: {e}"));
                    let done: Vec<usize> = results.iter().map(|(i, _)| *i).collect();
                    results.extend(
                        group
                            .iter()
                            .filter(|i| !done.contains(i))
                            .map(|&i| (i, RemoteResult::Deferred(reason.clone()))),
                    );
                    return (results, false);
                }
            }
        }
        (results, true)
    }
}

/// One message being delivered.
struct Message<'a> {
    spool: &'a Spool,
    env: &'a Envelope,
    headers_utf8: bool,
}

/// RFC 3461 4.1 NOTIFY value.
fn notify_value(n: &common::spool::Notify) -> String {
    let mut v = Vec::new();
    if n.success {
        v.push("SUCCESS");
    }
    if n.failure {
        v.push("FAILURE");
    }
    if n.delay {
        v.push("DELAY");
    }
    if v.is_empty() {
        "NEVER".into()
    } else {
        v.join(",")
    }
}

async fn headers_need_utf8(spool: &Spool, id: &str) -> bool {
    let Ok(file) = spool.open_data(id) else {
        return false;
    };
    let mut head = Vec::new();
    let _ = tokio::fs::File::from_std(file)
        .take(HEADER_SCAN_LIMIT)
        .read_to_end(&mut head)
        .await;
    proto::headers_need_utf8(&head)
}

/// Whether the message has any byte above 127 (read in full; only for
/// the rare 8BITMIME message to a server without 8BITMIME).
async fn has_8bit_data(spool: &Spool, id: &str) -> std::io::Result<bool> {
    let file = spool.open_data(id).map_err(std::io::Error::other)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut chunk).await? {
            0 => return Ok(false),
            n if !chunk[..n].is_ascii() => return Ok(true),
            _ => {}
        }
    }
}
