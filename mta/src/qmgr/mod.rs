//! The queue manager: notices new entries at once (inotify on `incoming/`),
//! runs delivery passes with bounded concurrency, and retries deferred
//! entries with exponential backoff.

pub mod bounce;
pub mod deliver;
pub mod pickup;
pub mod quota;
pub mod recovery;
pub mod remote;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use common::config::Config;
use common::queue_id::is_queue_id;
use common::recipients::DirectoryCache;
use common::spool::{unix_now, QueueState, Spool};
use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::{mpsc, Semaphore};

use deliver::PassResult;

/// Everything a delivery pass needs.
pub struct Context {
    pub spool: Spool,
    pub directory: DirectoryCache,
    pub mail_root: PathBuf,
    pub hostname: String,
    pub min_backoff: u64,
    pub max_backoff: u64,
    /// Largest message taken from the maildrop.
    pub max_message_size: u64,
    /// Seconds a message may stay queued before it is returned.
    pub max_queue_lifetime: u64,
    /// Most recipients taken from one maildrop file.
    pub max_recipients: usize,
    /// Seconds after arrival to warn of a delay (0: never).
    pub delay_warning: u64,
    /// Most entries active at once: a pass waiting for a delivery slot
    /// still holds its task and envelope, so a burst that arrives faster
    /// than it is delivered waits in `incoming/`, on disk, instead of in
    /// qmgr's memory.
    pub active_limit: usize,
    /// Delivery to other mail servers.
    pub remote: remote::Remote,
    /// Passes in a blocking phase (queue files, Maildirs) at once; a pass
    /// waiting on a remote server holds none.
    pub local_slots: Semaphore,
    /// DKIM keys for mail that local programs send through sendmail.
    pub signers: crate::dkim_sign::Signers,
    /// The mailboxes found over quota, for smtpd.
    pub full_mailboxes: common::quota::FullMailboxes,
}

impl Context {
    /// Build from the config (inside the runtime).
    pub fn new(config: &Config) -> anyhow::Result<Context> {
        Ok(Context {
            spool: Spool::new(&config.paths.spool),
            directory: DirectoryCache::new(config).context("loading users, aliases and domains")?,
            mail_root: config.paths.mail_root.clone(),
            hostname: config.hostname.clone(),
            min_backoff: config.qmgr.min_backoff,
            max_backoff: config.qmgr.max_backoff,
            max_message_size: config.smtpd.max_message_size,
            max_queue_lifetime: config.qmgr.max_queue_lifetime,
            max_recipients: config.smtpd.max_recipients,
            delay_warning: config.qmgr.delay_warning,
            active_limit: config.qmgr.active_limit,
            remote: remote::Remote::new(config)?,
            local_slots: Semaphore::new(config.qmgr.delivery_concurrency),
            signers: crate::dkim_sign::Signers::load(&config.paths.dkim_keys),
            full_mailboxes: common::quota::FullMailboxes::new(&config.paths.spool),
        })
    }

    /// Seconds to wait after the `attempts`-th failed pass: doubling from
    /// `min_backoff`, capped at `max_backoff` (as Postfix's
    /// minimal/maximal_backoff_time).
    pub fn backoff(&self, attempts: u32) -> u64 {
        let shift = attempts.saturating_sub(1).min(20);
        self.min_backoff
            .saturating_mul(1u64 << shift)
            .min(self.max_backoff)
    }
}

/// The scheduler's view of the queue.
struct Scheduler {
    ctx: Arc<Context>,
    /// Entries being delivered now.
    in_flight: HashSet<String>,
    /// Entries seen in `incoming/` and not yet taken, oldest (smallest
    /// queue id) first.
    waiting: BTreeSet<String>,
    /// Deferred entries and when they are due.
    deferred: HashMap<String, u64>,
    /// Entries left in `active/` by a spool failure, and when to try again.
    stuck: HashMap<String, u64>,
    done_tx: mpsc::UnboundedSender<(String, PassResult)>,
}

impl Scheduler {
    /// Note every entry in `incoming/` (at start, and when inotify lost
    /// events) and start passes for as many as may be active.
    fn take_incoming(&mut self) {
        let ids = match self.ctx.spool.list(QueueState::Incoming) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!("cannot read the incoming queue: {e}");
                return;
            }
        };
        for id in ids {
            self.note_incoming(id);
        }
        self.take_waiting();
    }

    /// Entry `id` appeared in `incoming/`. One in flight is taken again
    /// when its pass ends (`finished`).
    fn note_incoming(&mut self, id: String) {
        if is_queue_id(&id) && !self.in_flight.contains(&id) {
            self.waiting.insert(id);
        }
    }

    /// Start passes for the oldest waiting entries, up to the active limit.
    fn take_waiting(&mut self) {
        while self.in_flight.len() < self.ctx.active_limit {
            let Some(id) = self.waiting.pop_first() else {
                break;
            };
            self.activate(id);
        }
    }

    /// Move entry `id` from `incoming/` to `active/` and start its pass.
    fn activate(&mut self, id: String) {
        // No fsync: active and incoming both mean "to deliver", and
        // recovery moves active entries back at start.
        let from = self.ctx.spool.envelope_path(QueueState::Incoming, &id);
        let to = self.ctx.spool.envelope_path(QueueState::Active, &id);
        match std::fs::rename(&from, &to) {
            Ok(()) => self.start(id),
            // Held, removed or taken again by the admin meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("{id}: gone from incoming before its pass");
            }
            Err(e) => tracing::error!("{id}: cannot activate: {e}"),
        }
    }

    /// Move due deferred entries to `active/` and start them, and start
    /// again the stuck ones that are due.
    fn take_due(&mut self) {
        let now = unix_now();
        for id in take_due_ids(&mut self.stuck, now) {
            if self
                .ctx
                .spool
                .envelope_path(QueueState::Active, &id)
                .exists()
            {
                self.start(id);
            }
        }
        for id in take_due_ids(&mut self.deferred, now) {
            match self
                .ctx
                .spool
                .move_entry(&id, QueueState::Deferred, QueueState::Active)
            {
                Ok(()) => self.start(id),
                // Removed or held by the admin meanwhile.
                Err(e) => tracing::debug!("{id}: not retried: {e}"),
            }
        }
    }

    fn start(&mut self, id: String) {
        self.in_flight.insert(id.clone());
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let result = deliver::run_pass(ctx, id.clone()).await;
            let _ = done.send((id, result));
        });
    }

    fn finished(&mut self, id: String, result: PassResult) {
        self.in_flight.remove(&id);
        // A flush, release or requeue that moved the entry back to
        // incoming/ while its pass ran was skipped then: take it now.
        if self
            .ctx
            .spool
            .envelope_path(QueueState::Incoming, &id)
            .exists()
        {
            self.activate(id);
            return;
        }
        match result {
            PassResult::Deferred { next_try } => {
                self.deferred.insert(id, next_try);
            }
            // The spool failed under the pass (a full disk): the entry is
            // still in active/, tried again after the shortest back-off.
            PassResult::Stuck => {
                self.stuck.insert(id, unix_now() + self.ctx.min_backoff);
            }
            PassResult::Finished | PassResult::Corrupt => {}
        }
        self.take_waiting();
    }

    /// How long until the next deferred entry is due.
    fn next_wakeup(&self) -> Duration {
        let now = unix_now();
        self.deferred
            .values()
            .chain(self.stuck.values())
            .min()
            .map(|t| Duration::from_secs(t.saturating_sub(now)))
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// Run the queue manager until `stop` turns true.
pub async fn run(
    config: &Config,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Context::new(config)?);
    let spool = &ctx.spool;
    spool.create_dirs().context("creating spool directories")?;
    // Watch before the first scan, so nothing that arrives in between is
    // missed.
    let inotify = Inotify::init().context("inotify init")?;
    inotify
        .watches()
        .add(
            spool.dir(QueueState::Incoming),
            WatchMask::MOVED_TO | WatchMask::CREATE,
        )
        .context("watching the incoming queue")?;
    let maildrop = inotify
        .watches()
        .add(spool.dir(QueueState::Maildrop), WatchMask::MOVED_TO)
        .context("watching the maildrop")?;
    let mut events = inotify
        .into_event_stream(vec![0u8; 4096])
        .context("inotify stream")?;
    let deferred = recovery::recover(&ctx);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut sched = Scheduler {
        ctx: ctx.clone(),
        in_flight: HashSet::new(),
        waiting: BTreeSet::new(),
        deferred,
        stuck: HashMap::new(),
        done_tx,
    };
    tokio::task::block_in_place(|| pickup::pickup_all(&ctx));
    let rechecking = ctx.clone();
    let recheck = tokio::spawn(async move {
        let mut every_minute = tokio::time::interval(Duration::from_secs(60));
        loop {
            every_minute.tick().await;
            let ctx = rechecking.clone();
            let _ =
                tokio::task::spawn_blocking(move || quota::recheck_full(&ctx, &ctx.full_mailboxes))
                    .await;
        }
    });
    sched.take_incoming();
    sched.take_due();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            ev = events.next() => match ev {
                // A pickup queues into incoming/, whose event follows.
                Some(Ok(event)) if event.wd == maildrop => {
                    tokio::task::block_in_place(|| pickup::pickup_all(&ctx));
                }
                // Events were lost: look at both directories whole.
                Some(Ok(event)) if event.mask.contains(EventMask::Q_OVERFLOW) => {
                    tokio::task::block_in_place(|| pickup::pickup_all(&ctx));
                    sched.take_incoming();
                }
                Some(Ok(event)) => {
                    if let Some(name) = event.name.and_then(|n| n.into_string().ok()) {
                        sched.note_incoming(name);
                    }
                    sched.take_waiting();
                }
                Some(Err(e)) => anyhow::bail!("inotify: {e}"),
                None => anyhow::bail!("inotify stream ended"),
            },
            Some((id, result)) = done_rx.recv() => sched.finished(id, result),
            _ = tokio::time::sleep(sched.next_wakeup()) => sched.take_due(),
        }
    }
    // Let running passes finish: a pass cut short is redone at next start,
    // which may deliver twice but never loses mail.
    while !sched.in_flight.is_empty() {
        match tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await {
            Ok(Some((id, result))) => sched.finished(id, result),
            _ => break,
        }
    }
    recheck.abort();
    ctx.remote.shutdown().await;
    Ok(())
}

/// Remove from `waiting` (queue id -> time of next try) every entry due
/// at `now`; their ids.
fn take_due_ids(waiting: &mut HashMap<String, u64>, now: u64) -> Vec<String> {
    let due: Vec<String> = waiting
        .iter()
        .filter(|(_, t)| **t <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in &due {
        waiting.remove(id);
    }
    due
}
