//! Writing an incoming message into the spool.

use std::fs::File;
use std::io::Write;

use common::queue_id::new_queue_id;
use common::spool::{is_disk_full, Envelope, QueueState, Spool, SpoolError};
use memmap2::Mmap;

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
    /// fields naming `authserv_id` are dropped. Its data file is created at
    /// the first write to disk: a small message is written, fsynced and
    /// queued in one step.
    pub fn create(spool: &Spool, max_size: u64, max_hops: u32, authserv_id: &str) -> MessageWriter {
        MessageWriter {
            id: new_queue_id(),
            spool: spool.clone(),
            file: None,
            buf: Vec::with_capacity(WRITE_BATCH),
            size: 0,
            max_size,
            error: None,
            hops: ReceivedCounter::default(),
            max_hops,
            own_results: OwnResultsFilter::new(authserv_id),
            filtered: Vec::new(),
            ended: false,
        }
    }

    /// The queue id this message will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes of message so far (including the Received header).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Start the message with a header of our own (Received:); it does not
    /// count against the client's size limit (RFC 1870 concerns the
    /// client's message). Buffered: the next write flushes it with the rest.
    pub fn write_own_header(&mut self, header: &[u8]) {
        self.max_size += header.len() as u64;
        self.size += header.len() as u64;
        self.buf.extend_from_slice(header);
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
        self.flush().await;
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
            self.flush().await;
        }
    }

    /// Write out the buffer off the async threads, creating the data file
    /// first if this is the first write.
    async fn flush(&mut self) {
        if self.file.is_some() && self.buf.is_empty() {
            return;
        }
        let file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        let spool = self.spool.clone();
        let id = self.id.clone();
        let (file, buf, result) = tokio::task::spawn_blocking(move || {
            let mut buf = buf;
            let written = write_data(&spool, &id, file, &buf);
            buf.clear();
            match written {
                Ok(file) => (Some(file), buf, Ok(())),
                Err(e) => (None, buf, Err(e)),
            }
        })
        .await
        .expect("file writes do not panic");
        self.file = file;
        self.buf = buf;
        if let Err(e) = result {
            self.error = Some(e);
        }
    }

    /// Finish: write what is left and fsync the data file and `data/`
    /// while the envelope is written and fsynced under `tmp/`; once both
    /// are durable, rename the envelope into `incoming/` and make that
    /// durable; only then report `Queued`. The directory fsyncs are shared
    /// with the sessions committing at the same time (`safeio::sync_dir`'s
    /// group commit). Anything short of that removes the data file and the
    /// envelope.
    pub async fn commit(mut self, envelope: Envelope) -> DataOutcome {
        self.end_of_message().await;
        if self.too_big() {
            self.discard();
            return DataOutcome::TooBig;
        }
        if self.hops.count() > self.max_hops {
            self.discard();
            return DataOutcome::Loop;
        }
        if let Some(e) = self.error.take() {
            return self.write_failed(&e);
        }
        let file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        let (spool, id) = (self.spool.clone(), self.id.clone());
        let data_synced = tokio::task::spawn_blocking(move || {
            let file = write_data(&spool, &id, file, &buf)?;
            file.sync_all()?;
            common::safeio::sync_dir(&spool.data_dir())
        });
        let spool = self.spool.clone();
        let staged = tokio::task::spawn_blocking(move || spool.stage_envelope(&envelope));
        let (data_synced, staged) = tokio::join!(data_synced, staged);
        let data_synced =
            data_synced.unwrap_or_else(|_| Err(std::io::Error::other("data file job failed")));
        let staged = staged.unwrap_or_else(|_| {
            Err(SpoolError::Io {
                path: self.spool.data_path(&self.id),
                source: std::io::Error::other("envelope job failed"),
            })
        });
        let staged = match (data_synced, staged) {
            (Ok(()), Ok(staged)) => staged,
            (Err(e), staged) => {
                if let Ok(staged) = staged {
                    self.spool.unstage(staged);
                }
                return self.write_failed(&e);
            }
            (Ok(()), Err(e)) => return self.queue_failed(&e),
        };
        let (spool, id) = (self.spool.clone(), self.id.clone());
        let published = tokio::task::spawn_blocking(move || {
            spool.publish(staged)?;
            spool.sync_incoming().inspect_err(|_| {
                let _ = std::fs::remove_file(spool.envelope_path(QueueState::Incoming, &id));
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(SpoolError::Io {
                path: self.spool.dir(QueueState::Incoming),
                source: std::io::Error::other("publishing job failed"),
            })
        });
        match published {
            Ok(()) => DataOutcome::Queued(std::mem::take(&mut self.id)),
            Err(e) => self.queue_failed(&e),
        }
    }

    /// The envelope could not be written or published: throw the message
    /// away and answer 452 4.3.1 for a full disk, else 451.
    fn queue_failed(self, e: &SpoolError) -> DataOutcome {
        tracing::error!("{}: cannot queue message: {e}", self.id);
        let full = e.is_disk_full();
        self.discard();
        if full {
            DataOutcome::DiskFull
        } else {
            DataOutcome::LocalError
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
        // A writer dropped mid-message (disconnect, RSET) leaves no file;
        // one that committed or discarded has no id left.
        if !self.id.is_empty() {
            self.spool.discard(&self.id);
        }
    }
}

/// Append `bytes` to the data file of `id`, creating it if `file` is None;
/// the file.
fn write_data(spool: &Spool, id: &str, file: Option<File>, bytes: &[u8]) -> std::io::Result<File> {
    let mut file = match file {
        Some(file) => file,
        None => spool.create_data(id).map_err(|e| match e {
            SpoolError::Io { source, .. } => source,
            other => std::io::Error::other(other),
        })?,
    };
    file.write_all(bytes)?;
    Ok(file)
}
