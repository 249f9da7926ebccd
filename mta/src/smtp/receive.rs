//! Writing an incoming message into the spool, and the group commit that
//! lets many sessions share one directory fsync.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use common::queue_id::new_queue_id;
use common::spool::{is_disk_full, Envelope, Spool, SpoolError};
use memmap2::Mmap;
use tokio::sync::{mpsc, oneshot};

use super::hops::ReceivedCounter;
use super::own_results::OwnResultsFilter;
use super::session::DataOutcome;

/// Bytes gathered in memory before they are written to the data file.
const WRITE_BATCH: usize = 256 * 1024;

/// A message being received into `spool/data/<id>`.
pub struct MessageWriter {
    id: String,
    spool: Spool,
    file: Option<File>,
    buf: Vec<u8>,
    size: u64,
    max_size: u64,
    error: Option<std::io::Error>,
    /// `Received:` fields the client's message brought.
    hops: ReceivedCounter,
    max_hops: u32,
    /// Drops Authentication-Results fields that claim to be ours.
    own_results: OwnResultsFilter,
    filtered: Vec<u8>,
    /// The client's message has ended.
    ended: bool,
}

impl MessageWriter {
    /// Start a message, with a fresh queue id, that may bring at most
    /// `max_hops` `Received:` fields of its own; its Authentication-Results
    /// fields naming `authserv_id` are dropped.
    pub async fn create(
        spool: &Spool,
        max_size: u64,
        max_hops: u32,
        authserv_id: &str,
    ) -> Result<MessageWriter, SpoolError> {
        let id = new_queue_id();
        let file = {
            let spool = spool.clone();
            let id = id.clone();
            tokio::task::spawn_blocking(move || spool.create_data(&id))
                .await
                .expect("create_data does not panic")?
        };
        Ok(MessageWriter {
            id,
            spool: spool.clone(),
            file: Some(file),
            buf: Vec::with_capacity(WRITE_BATCH),
            size: 0,
            max_size,
            error: None,
            hops: ReceivedCounter::default(),
            max_hops,
            own_results: OwnResultsFilter::new(authserv_id),
            filtered: Vec::new(),
            ended: false,
        })
    }

    /// The queue id this message will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes of message so far (including the Received header).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Write a header of our own (Received:); it does not count against the
    /// client's size limit (RFC 1870 concerns the client's message).
    pub async fn write_own_header(&mut self, header: &[u8]) {
        self.max_size += header.len() as u64;
        self.append(header).await;
    }

    /// Whether the message has grown past the size limit; from then on
    /// bytes are counted but not stored.
    pub fn too_big(&self) -> bool {
        self.size > self.max_size
    }

    /// Append the client's message bytes.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.hops.feed(bytes);
        let mut filtered = std::mem::take(&mut self.filtered);
        filtered.clear();
        self.own_results.feed(bytes, &mut filtered);
        self.append(&filtered).await;
        self.filtered = filtered;
    }

    /// The client's message has ended: release what the filter held.
    async fn end_of_message(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut rest = Vec::new();
        self.own_results.finish(&mut rest);
        if !rest.is_empty() {
            self.append(&rest).await;
        }
        if self.own_results.removed() > 0 {
            tracing::info!(
                "{}: removed {} Authentication-Results field(s) claiming our name",
                self.id,
                self.own_results.removed()
            );
        }
    }

    /// The file holding the whole message ([`MessageWriter::size`] bytes),
    /// for checks that stream it; None if it is too big or could not be
    /// written.
    pub async fn stored(&mut self) -> Option<std::path::PathBuf> {
        self.end_of_message().await;
        if self.too_big() || self.error.is_some() {
            return None;
        }
        self.flush(false).await;
        if self.error.is_some() {
            return None;
        }
        Some(self.spool.data_path(&self.id))
    }

    /// The whole message as stored so far, for the checks that need it
    /// all (DKIM, DMARC, signing), mapped from the spool file rather than
    /// read: its pages are the page cache's, so a 20 MiB message does not
    /// make smtpd 20 MiB bigger. None if it is too big, empty or could not
    /// be written.
    pub async fn contents(&mut self) -> Option<Mmap> {
        let path = self.stored().await?;
        let mapped = tokio::task::spawn_blocking(move || {
            let file = File::open(path)?;
            if file.metadata()?.len() == 0 {
                return Ok(None);
            }
            // SAFETY: the spool file is ours alone until the envelope is
            // committed (qmgr reads only queued entries), and nothing
            // truncates or rewrites it while the map lives.
            unsafe { Mmap::map(&file) }.map(Some)
        })
        .await;
        match mapped {
            Ok(Ok(map)) => map,
            Ok(Err(e)) => {
                self.error = Some(e);
                None
            }
            Err(_) => None,
        }
    }

    async fn append(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.too_big() || self.error.is_some() {
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= WRITE_BATCH {
            self.flush(false).await;
        }
    }

    /// Write out the buffer (and fsync when `sync`) off the async threads.
    async fn flush(&mut self, sync: bool) {
        let Some(mut file) = self.file.take() else {
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let (file, buf, result) = tokio::task::spawn_blocking(move || {
            let mut r = file.write_all(&buf);
            if r.is_ok() && sync {
                r = file.sync_all();
            }
            buf.clear();
            (file, buf, r)
        })
        .await
        .expect("file writes do not panic");
        self.file = Some(file);
        self.buf = buf;
        if let Err(e) = result {
            self.error = Some(e);
        }
    }

    /// Finish: fsync the data and `data/` while the envelope is written and
    /// fsynced, publish the envelope, make `incoming/` durable (shared
    /// fsync), and only then report `Queued`.
    /// Anything short of that removes the data file.
    pub async fn commit(mut self, envelope: Envelope, syncer: &DirSyncer) -> DataOutcome {
        self.end_of_message().await;
        if self.too_big() {
            self.discard();
            return DataOutcome::TooBig;
        }
        if self.hops.count() > self.max_hops {
            self.discard();
            return DataOutcome::Loop;
        }
        self.flush(false).await;
        if let Some(e) = self.error.take() {
            return self.write_failed(&e);
        }
        // The data file's fsync (then its directory's, shared with other
        // sessions) and the envelope's write and fsync run at once; the
        // envelope goes into incoming/ only once both are durable.
        let Some(file) = self.file.take() else {
            self.discard();
            return DataOutcome::LocalError;
        };
        let spool = self.spool.clone();
        let data_dir = self.spool.data_dir();
        let (data_synced, staged) = tokio::join!(
            tokio::task::spawn_blocking(move || {
                file.sync_all()
                    .and_then(|()| common::safeio::sync_dir(&data_dir))
                    .map(|()| file)
            }),
            tokio::task::spawn_blocking(move || spool.stage_envelope(&envelope)),
        );
        let data_synced = data_synced.expect("fsync does not panic");
        let staged = staged.expect("envelope writes do not panic");
        let committed = match (data_synced, staged) {
            (Ok(file), Ok(staged)) => {
                self.file = Some(file);
                let spool = self.spool.clone();
                tokio::task::spawn_blocking(move || spool.publish(staged))
                    .await
                    .expect("renames do not panic")
            }
            (Err(e), staged) => {
                if let Ok(staged) = staged {
                    self.spool.unstage(staged);
                }
                return self.write_failed(&e);
            }
            (Ok(file), Err(e)) => {
                self.file = Some(file);
                Err(e)
            }
        };
        let synced = match committed {
            Ok(()) => syncer.sync().await,
            Err(e) => Err(Arc::new(e)),
        };
        match synced {
            Ok(()) => {
                self.file = None;
                DataOutcome::Queued(std::mem::take(&mut self.id))
            }
            Err(e) => {
                tracing::error!("{}: cannot queue message: {e}", self.id);
                let full = e.is_disk_full();
                let _ = std::fs::remove_file(
                    self.spool
                        .envelope_path(common::spool::QueueState::Incoming, &self.id),
                );
                self.discard();
                if full {
                    DataOutcome::DiskFull
                } else {
                    DataOutcome::LocalError
                }
            }
        }
    }

    /// The data file could not be written or fsynced: throw it away and
    /// answer 452 4.3.1 for a full disk, else 451.
    fn write_failed(self, e: &std::io::Error) -> DataOutcome {
        tracing::error!("{}: cannot write message: {e}", self.id);
        let full = is_disk_full(e);
        self.discard();
        if full {
            DataOutcome::DiskFull
        } else {
            DataOutcome::LocalError
        }
    }

    /// Throw the message away.
    pub fn discard(mut self) {
        self.file = None;
        self.spool.discard(&self.id);
        self.id.clear();
    }
}

impl Drop for MessageWriter {
    fn drop(&mut self) {
        // A writer dropped mid-message (disconnect, RSET) leaves no file.
        if !self.id.is_empty() && self.file.is_some() {
            self.spool.discard(&self.id);
        }
    }
}

type SyncResult = Result<(), Arc<SpoolError>>;

/// Group commit of `incoming/`: every session that published an envelope
/// asks for a sync; one fsync answers all the requests that were waiting
/// when it started (`data/` was made durable before publishing, through
/// `safeio::sync_dir`'s own group commit).
#[derive(Clone)]
pub struct DirSyncer {
    requests: mpsc::UnboundedSender<oneshot::Sender<SyncResult>>,
}

impl DirSyncer {
    /// Start the sync task for `spool`.
    pub fn spawn(spool: Spool) -> DirSyncer {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<SyncResult>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiters = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiters.push(more);
                }
                let spool = spool.clone();
                let result = tokio::task::spawn_blocking(move || spool.sync_incoming())
                    .await
                    .expect("fsync does not panic")
                    .map_err(Arc::new);
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        });
        DirSyncer { requests: tx }
    }

    /// Wait until everything committed before this call is durable.
    pub async fn sync(&self) -> SyncResult {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(tx).is_err() {
            return Err(sync_task_gone());
        }
        rx.await.unwrap_or_else(|_| Err(sync_task_gone()))
    }
}

fn sync_task_gone() -> Arc<SpoolError> {
    Arc::new(SpoolError::Io {
        path: "spool".into(),
        source: std::io::Error::other("directory sync task stopped"),
    })
}
