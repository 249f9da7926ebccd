//! One delivery pass over one queue entry: alias expansion, local
//! Maildir delivery, remote delivery, per-recipient status, reports.

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use common::address::Address;
use common::maildir;
use common::recipients::{Destination, Directory, ResolveError};
use common::spool::{
    unix_now, Envelope, QueueState, Recipient, RecipientStatus, Spool, SpoolError,
};
use common::userdb::maildir_path;

use super::bounce::{self, Report};
use super::quota;
use super::remote::RemoteResult;
use super::Context;

/// What became of the entry after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassResult {
    /// Every recipient is done; the entry is gone.
    Finished,
    /// Some recipients wait; the entry is in `deferred/` until this time.
    Deferred { next_try: u64 },
    /// The entry could not be read; it was moved to `corrupt/`.
    Corrupt,
    /// The spool itself failed (a full disk); the entry stays in `active/`
    /// and is tried again after the shortest back-off.
    Stuck,
}

/// Deliver what can be delivered of entry `id` (in `active/`): local
/// recipients on the blocking pool, then remote ones over SMTP, then the
/// reports and the entry's new state on the blocking pool again. A pass
/// with no remote recipient does it all in one blocking job.
pub async fn run_pass(ctx: Arc<Context>, id: String) -> PassResult {
    let prepared = {
        let _slot = ctx.local_slots.acquire().await.expect("never closed");
        let ctx = ctx.clone();
        tokio::task::spawn_blocking(move || match prepare(&ctx, &id) {
            Ok(pass) if pass.remote.is_empty() => Err(finish(&ctx, pass)),
            other => other,
        })
        .await
    };
    let mut pass = match prepared {
        Ok(Ok(pass)) => pass,
        Ok(Err(result)) => return result,
        Err(_) => return PassResult::Stuck,
    };
    deliver_remote(&ctx, &mut pass).await;
    let _slot = ctx.local_slots.acquire().await.expect("never closed");
    let finishing = ctx.clone();
    tokio::task::spawn_blocking(move || finish(&finishing, pass))
        .await
        .unwrap_or(PassResult::Stuck)
}

/// A pass between its phases.
struct Pass {
    env: Envelope,
    /// Pending recipients of other domains.
    remote: Vec<usize>,
    /// Recipients delivered in this pass whose sender asked to be told,
    /// with what to tell.
    reports: Vec<(usize, Report)>,
}

/// Read the entry, expand aliases, deliver to local Maildirs.
fn prepare(ctx: &Context, id: &str) -> Result<Pass, PassResult> {
    let spool = &ctx.spool;
    let mut env = match spool.read_envelope(QueueState::Active, id) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!("{id}: unreadable envelope, moved to corrupt: {e}");
            return Err(move_to_corrupt(spool, id));
        }
    };
    let data = match open_message(spool, id) {
        Ok(data) => data,
        Err(e) => {
            // Missing, or not a regular file (a link smtpd's user could plant).
            tracing::error!("{id}: message file unusable ({e}), moved to corrupt");
            return Err(move_to_corrupt(spool, id));
        }
    };
    let (dir, stale) = ctx.directory.current();
    if let Some(e) = stale {
        tracing::error!("keeping previous tables: {e}");
    }
    expand_recipients(&mut env, &dir);
    let mut remote = Vec::new();
    let mut reports = Vec::new();
    let message = LocalMessage {
        id: &env.id,
        data: &data.0,
        size: data.1,
        sender: &env.sender,
        added_headers: &env.added_headers,
        junk: env.junk,
    };
    for (i, rcpt) in env.recipients.iter_mut().enumerate() {
        if rcpt.status != RecipientStatus::Pending {
            continue;
        }
        match Address::parse(&rcpt.address) {
            Err(e) => {
                rcpt.status = RecipientStatus::Failed;
                rcpt.last_error = Some(format!("5.1.3 bad address: {e}"));
            }
            Ok(address) if !dir.is_local_domain(address.domain()) => remote.push(i),
            Ok(address) => {
                deliver_local_recipient(ctx, &dir, &message, &address, rcpt);
                if rcpt.status == RecipientStatus::Delivered && rcpt.wants_success_report() {
                    reports.push((i, Report::Delivered));
                }
            }
        }
    }
    Ok(Pass {
        env,
        remote,
        reports,
    })
}

/// The data file of `id` and its size.
fn open_message(spool: &Spool, id: &str) -> Result<(std::fs::File, u64), SpoolError> {
    let file = spool.open_data(id)?;
    let size = file.metadata().map_err(|source| SpoolError::Io {
        path: spool.data_path(id),
        source,
    })?;
    Ok((file, size.len()))
}

/// Send to the remote recipients and record what became of each.
async fn deliver_remote(ctx: &Context, pass: &mut Pass) {
    let results = ctx
        .remote
        .deliver(&ctx.spool, &pass.env, &pass.remote)
        .await;
    let id = pass.env.id.clone();
    for (i, result) in results {
        let rcpt = &mut pass.env.recipients[i];
        rcpt.attempts += 1;
        match result {
            RemoteResult::Sent {
                relay,
                reply,
                dsn_passed,
            } => {
                tracing::info!(
                    "{id}: to=<{}>, relay={relay}, status=sent ({reply})",
                    rcpt.address
                );
                rcpt.status = RecipientStatus::Delivered;
                rcpt.last_error = None;
                rcpt.remote_reply = None;
                if rcpt.wants_success_report() && !dsn_passed {
                    // RFC 3461 5.2.2: the next hop cannot report success.
                    pass.reports.push((i, Report::Relayed));
                }
            }
            RemoteResult::Deferred(failure) => {
                let reason = &failure.reason;
                tracing::info!("{id}: to=<{}>, status=deferred ({reason})", rcpt.address);
                rcpt.last_error = Some(failure.reason);
                rcpt.remote_reply = failure.reply;
            }
            RemoteResult::Failed(failure) => {
                let reason = &failure.reason;
                tracing::info!("{id}: to=<{}>, status=bounced ({reason})", rcpt.address);
                rcpt.status = RecipientStatus::Failed;
                rcpt.last_error = Some(failure.reason);
                rcpt.remote_reply = failure.reply;
            }
        }
    }
}

/// Send the reports, then remove the entry or park it in `deferred/`.
fn finish(ctx: &Context, mut pass: Pass) -> PassResult {
    let spool = &ctx.spool;
    let id = pass.env.id.clone();
    let env = &mut pass.env;
    expire(ctx, env);
    for kind in [Report::Delivered, Report::Relayed] {
        let told: Vec<&Recipient> = pass
            .reports
            .iter()
            .filter(|(_, k)| *k == kind)
            .map(|(i, _)| &env.recipients[*i])
            .collect();
        if told.is_empty() {
            continue;
        }
        // RFC 3461 5.2.2: best effort; the mail itself is delivered.
        if let Err(e) = bounce::queue_report(ctx, env, &told, kind) {
            tracing::error!("{id}: cannot queue the success notification: {e}");
        }
    }
    let failed: Vec<&Recipient> = env
        .recipients
        .iter()
        .filter(|r| r.status == RecipientStatus::Failed && r.wants_failure_report())
        .collect();
    if !failed.is_empty() {
        if let Err(e) = bounce::queue_report(ctx, env, &failed, Report::Failed) {
            tracing::error!("{id}: cannot queue bounce, will retry: {e}");
            return defer(ctx, pass.env);
        }
    }
    // The bounce now carries the failed ones; they are done.
    for r in env.recipients.iter_mut() {
        if r.status == RecipientStatus::Failed {
            r.status = RecipientStatus::Delivered;
        }
    }
    if env
        .recipients
        .iter()
        .all(|r| r.status == RecipientStatus::Delivered)
    {
        return match spool.remove(&id, QueueState::Active) {
            Ok(()) => {
                tracing::info!("{id}: removed");
                PassResult::Finished
            }
            Err(e) => {
                tracing::error!("{id}: cannot remove finished entry: {e}");
                PassResult::Stuck
            }
        };
    }
    defer(ctx, pass.env)
}

/// Replace recipients as received by their final destinations.
fn expand_recipients(env: &mut Envelope, dir: &Directory) {
    if env
        .recipients
        .iter()
        .all(|r| r.status != RecipientStatus::Unresolved)
    {
        return;
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(env.recipients.len());
    for r in std::mem::take(&mut env.recipients) {
        if r.status != RecipientStatus::Unresolved {
            seen.insert(r.address.clone());
            out.push(r);
            continue;
        }
        let resolved = Address::parse(&r.address)
            .map_err(|e| format!("5.1.3 bad address: {e}"))
            .and_then(|a| dir.resolve(&a).map_err(|e| resolve_error(&e)));
        match resolved {
            Ok(dests) => {
                for d in dests {
                    let address = match d {
                        Destination::Local(a) | Destination::Remote(a) => a.to_string(),
                    };
                    if seen.insert(address.clone()) {
                        let original = (address != r.address).then(|| r.address.clone());
                        out.push(Recipient {
                            address,
                            original,
                            orcpt: r.orcpt.clone(),
                            status: RecipientStatus::Pending,
                            attempts: 0,
                            last_error: None,
                            notify: r.notify,
                            remote_reply: None,
                        });
                    }
                }
            }
            Err(reason) => {
                tracing::info!("{}: to=<{}>, status=bounced ({reason})", env.id, r.address);
                out.push(Recipient {
                    status: RecipientStatus::Failed,
                    last_error: Some(reason),
                    ..r
                });
            }
        }
    }
    env.recipients = out;
}

fn resolve_error(e: &ResolveError) -> String {
    match e {
        ResolveError::UnknownUser(_) => format!("5.1.1 {e}"),
        ResolveError::AliasLoop(_) | ResolveError::TooManyTargets => format!("5.4.6 {e}"),
    }
}

/// What local delivery needs of the envelope.
struct LocalMessage<'a> {
    id: &'a str,
    /// The data file, read from its start for each recipient.
    data: &'a std::fs::File,
    /// Its size.
    size: u64,
    sender: &'a str,
    added_headers: &'a str,
    junk: bool,
}

fn deliver_local_recipient(
    ctx: &Context,
    dir: &Directory,
    message: &LocalMessage,
    address: &Address,
    rcpt: &mut Recipient,
) {
    let id = message.id;
    rcpt.attempts += 1;
    match deliver_local(ctx, dir, message, address) {
        Ok(path) => {
            rcpt.status = RecipientStatus::Delivered;
            rcpt.last_error = None;
            let orig = rcpt
                .original
                .as_deref()
                .map(|o| format!(", orig_to=<{o}>"))
                .unwrap_or_default();
            tracing::info!(
                "{id}: to=<{address}>{orig}, relay=local, status=sent (delivered to maildir {}{})",
                path.display(),
                if message.junk { ", as junk" } else { "" }
            );
        }
        Err(LocalFailure::Full(full)) => {
            // RFC 3463 4.2.2: mailbox full, a condition that may pass.
            let why = format!("mailbox full ({} of {} bytes used)", full.used, full.limit);
            rcpt.last_error = Some(format!("4.2.2 {why}"));
            rcpt.remote_reply = None;
            tracing::info!("{id}: to=<{address}>, relay=local, status=deferred ({why})");
        }
        Err(LocalFailure::Io(e)) => {
            rcpt.last_error = Some(format!("4.2.0 local delivery failed: {e}"));
            rcpt.remote_reply = None;
            tracing::warn!("{id}: to=<{address}>, relay=local, status=deferred ({e})");
        }
    }
}

/// Why a local delivery did not happen.
enum LocalFailure {
    Full(quota::Full),
    Io(std::io::Error),
}

impl From<std::io::Error> for LocalFailure {
    fn from(e: std::io::Error) -> Self {
        LocalFailure::Io(e)
    }
}

fn deliver_local(
    ctx: &Context,
    dir: &Directory,
    message: &LocalMessage,
    mailbox: &Address,
) -> Result<std::path::PathBuf, LocalFailure> {
    let headers = format!(
        "Return-Path: <{}>\nDelivered-To: {mailbox}\n{}",
        message.sender,
        message.added_headers.replace("\r\n", "\n")
    );
    let mut target = maildir_path(&ctx.mail_root, mailbox).map_err(std::io::Error::other)?;
    let size = message.size + headers.len() as u64;
    quota::check(ctx, dir, mailbox, &target, size)?.map_err(LocalFailure::Full)?;
    if message.junk {
        let junk = target.join(".Junk");
        if !junk.is_dir() {
            // A mailbox made before Junk existed, or whose Junk was deleted.
            maildir::create_mailbox(&target)?;
        }
        target = junk;
    }
    let mut file = message.data;
    file.seek(SeekFrom::Start(0))?;
    let delivered = maildir::deliver(&target, &ctx.hostname, headers.as_bytes(), file)?;
    Ok(delivered.path)
}

/// Record the pass and park the entry in `deferred/`.
/// Past the queue lifetime, what is still undelivered fails, with the
/// last temporary error kept as the reason (RFC 3463 X.4.7, "delivery
/// time expired").
fn expire(ctx: &Context, env: &mut Envelope) {
    if unix_now() < env.arrival.saturating_add(ctx.max_queue_lifetime) {
        return;
    }
    for r in env.recipients.iter_mut() {
        if r.status == RecipientStatus::Pending {
            let last = r
                .last_error
                .as_deref()
                .unwrap_or("no delivery attempt succeeded");
            tracing::info!(
                "{}: to=<{}>, status=expired, returned to sender ({last})",
                env.id,
                r.address
            );
            r.last_error = Some(format!(
                "4.4.7 message expired after {} seconds in the queue; last error: {last}",
                ctx.max_queue_lifetime
            ));
            r.status = RecipientStatus::Failed;
        }
    }
}

/// Tell the sender once, after `delay_warning`, which recipients are
/// still waiting (RFC 3464 Action: delayed), unless their NOTIFY excludes
/// DELAY. Best effort: the message itself stays queued either way.
fn warn_of_delay(ctx: &Context, env: &mut Envelope) {
    if ctx.delay_warning == 0
        || env.delay_warned
        || unix_now() < env.arrival.saturating_add(ctx.delay_warning)
    {
        return;
    }
    let waiting: Vec<&Recipient> = env
        .recipients
        .iter()
        .filter(|r| r.status == RecipientStatus::Pending && r.wants_delay_report())
        .collect();
    if !waiting.is_empty() {
        if let Err(e) = bounce::queue_report(ctx, env, &waiting, Report::Delayed) {
            tracing::error!("{}: cannot queue the delay notification: {e}", env.id);
            return;
        }
    }
    env.delay_warned = true;
}

fn defer(ctx: &Context, mut env: Envelope) -> PassResult {
    warn_of_delay(ctx, &mut env);
    env.attempts += 1;
    env.next_try = unix_now() + ctx.backoff(env.attempts);
    let id = env.id.clone();
    let saved: Result<(), SpoolError> = ctx
        .spool
        .write_envelope(QueueState::Active, &env)
        .and_then(|_| {
            ctx.spool
                .move_entry(&id, QueueState::Active, QueueState::Deferred)
        });
    match saved {
        Ok(()) => PassResult::Deferred {
            next_try: env.next_try,
        },
        Err(e) => {
            tracing::error!("{id}: cannot defer: {e}");
            PassResult::Stuck
        }
    }
}

fn move_to_corrupt(spool: &Spool, id: &str) -> PassResult {
    match spool.move_entry(id, QueueState::Active, QueueState::Corrupt) {
        Ok(()) => PassResult::Corrupt,
        Err(e) => {
            tracing::error!("{id}: cannot move to corrupt: {e}");
            PassResult::Stuck
        }
    }
}
