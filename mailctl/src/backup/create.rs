//! `mailctl backup create`: a consistent backup of a running installation.
//!
//! Order matters: the files, then the queue, then the mailboxes. A message
//! delivered while the backup runs is then in the queue part, the mailbox
//! part or both (restored twice, as after a crash), never in neither.
//! Maildir message files never change, only their names (flags) do, and
//! the UID list names them by the part of the name that flags leave alone;
//! each folder's files are hard-linked into a staging directory right
//! after its UID list is brought up to date, so a message expunged while
//! the backup reads is still read whole, and one that arrives later waits
//! for the next backup. While a user's folders are listed, no IMAP
//! command moves messages between them ([`FOLDERS_LOCK`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use common::address::Address;
use common::config::Config;
use common::maildir::FOLDERS_LOCK;
use common::queue_id::is_queue_id;
use common::spool::{QueueState, Spool};
use common::userdb::{maildir_path, UserDb};

use super::format::{
    read_header, sha256_of_file, Chain, FileRole, Header, ManifestWriter, Message, PackWriter,
    Parent, Record, Totals, FORMAT, HEADER_FILE, PACKS_DIR, SUMS_FILE,
};
use super::progress::Progress;
use super::{last_backup_path, LastBackup};

/// Content already stored up the chain, found without reading the file
/// again: Maildir names are unique and their files never change.
#[derive(Default)]
struct Reuse {
    /// (user, base name, size) → sha256.
    messages: HashMap<(String, String, u64), String>,
    /// (queue id, size) → sha256 of the data file.
    queue_data: HashMap<(String, u64), String>,
}

impl Reuse {
    fn from_parent(chain: &Chain) -> anyhow::Result<Reuse> {
        let mut reuse = Reuse::default();
        for record in chain.records()? {
            match record? {
                Record::Folder { user, messages, .. } => {
                    for m in messages {
                        let key = (user.clone(), m.base().to_string(), m.size());
                        reuse.messages.insert(key, m.sha256().to_string());
                    }
                }
                Record::Queue {
                    id,
                    data,
                    data_size,
                    ..
                } => {
                    reuse.queue_data.insert((id, data_size), data);
                }
                _ => {}
            }
        }
        Ok(reuse)
    }
}

/// What goes in: blobs stored so far, in this backup and up the chain.
struct Store<'a> {
    parent: Option<&'a Chain>,
    stored: HashSet<String>,
    totals: Totals,
}

impl Store<'_> {
    fn known(&self, sha256: &str) -> bool {
        self.stored.contains(sha256) || self.parent.is_some_and(|c| c.has(sha256))
    }

    /// Add `source` to `pack` unless known; the blob record, if any, goes
    /// to `out`.
    fn add(
        &mut self,
        pack: &mut PackWriter,
        source: &mut dyn Read,
        out: &mut dyn FnMut(&Record) -> anyhow::Result<()>,
    ) -> anyhow::Result<(String, u64)> {
        let before = pack.len();
        let (sha256, size, blob) = pack.add(source, &|s| self.known(s))?;
        if let Some(blob) = blob {
            self.totals.stored_bytes += pack.len() - before;
            self.stored.insert(sha256.clone());
            out(&blob)?;
        }
        Ok((sha256, size))
    }
}

pub fn create(
    config: &Config,
    config_path: &Path,
    to: &Path,
    parent: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    if to.exists() {
        bail!(
            "{}: already exists; a backup goes into a new directory",
            to.display()
        );
    }
    let chain = parent.map(Chain::open).transpose()?;
    let reuse = match &chain {
        Some(c) => Reuse::from_parent(c)?,
        None => Reuse::default(),
    };
    std::fs::create_dir_all(to.join(PACKS_DIR))
        .with_context(|| format!("creating {}", to.display()))?;
    let made = Unfinished(Some(to.to_path_buf()));
    write_backup(
        config,
        config_path,
        to,
        chain.as_ref(),
        &reuse,
        started,
        json,
    )?;
    made.keep();
    Ok(())
}

/// The directory of a backup that failed, removed: an unfinished backup
/// is of no use and would be refused.
struct Unfinished(Option<PathBuf>);

impl Unfinished {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn write_backup(
    config: &Config,
    config_path: &Path,
    to: &Path,
    chain: Option<&Chain>,
    reuse: &Reuse,
    started: Instant,
    json: bool,
) -> anyhow::Result<()> {
    // It holds password hashes and private keys.
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    let to = to.canonicalize()?;
    let id = new_id();
    let mut manifest = ManifestWriter::create(&to)?;
    let mut store = Store {
        parent: chain,
        stored: HashSet::new(),
        totals: Totals::default(),
    };

    let mut files = PackWriter::create(&to, "files")?;
    back_up_files(config, config_path, &mut store, &mut files, &mut manifest)?;
    back_up_queue(config, reuse, &mut store, &mut files, &mut manifest)?;
    files.finish()?;

    let users: Vec<String> = UserDb::load(&config.paths.users)?
        .list()
        .iter()
        .map(|u| u.name.clone())
        .collect();
    let mail_pack = File::options()
        .write(true)
        .create_new(true)
        .open(to.join(PACKS_DIR).join("mail.pack"))?;
    let records_path = to.join("mail-records.tmp");
    let mut records = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&records_path)?;
    {
        let records = records.try_clone()?;
        let mail_root = config.paths.mail_root.clone();
        // What the mailbox part stores is counted from its records, as it
        // may run in a child whose memory is its own.
        let mut mail_store = Store {
            parent: store.parent,
            stored: store.stored.clone(),
            totals: Totals::default(),
        };
        let id = id.clone();
        crate::system::as_store_user(config, move || {
            let mut pack = PackWriter::from_file("mail", mail_pack);
            back_up_mailboxes(
                &mail_root,
                &users,
                &id,
                reuse,
                &mut mail_store,
                &mut pack,
                records,
            )?;
            pack.finish()?;
            Ok(())
        })?;
    }
    // The mailbox part may have run in a child: its records come back
    // through the file, and the totals are counted from them.
    records.seek(SeekFrom::Start(0))?;
    for line in BufReader::new(&records).lines() {
        let record: Record = serde_json::from_str(&line?).context("the mailbox part's records")?;
        count(&mut store.totals, &record);
        manifest.write(&record)?;
    }
    drop(records);
    std::fs::remove_file(&records_path)?;
    manifest.finish()?;

    let sums_of_parent = |c: &Chain| sha256_of_file(&c.dir().join(SUMS_FILE));
    let header = Header {
        format: FORMAT,
        id: id.clone(),
        created: common::spool::unix_now(),
        hostname: config.hostname.clone(),
        mailsrv_version: env!("CARGO_PKG_VERSION").to_string(),
        parent: match chain {
            Some(c) => Some(Parent {
                id: c.header().id.clone(),
                path: c.dir().to_path_buf(),
                sums_sha256: sums_of_parent(c)?,
            }),
            None => None,
        },
        totals: store.totals.clone(),
    };
    common::safeio::write_atomic(&to.join(HEADER_FILE), &serde_json::to_vec_pretty(&header)?)?;
    super::format::write_sums(&to)?;
    common::safeio::sync_dir(&to)?;
    // Check what was written can be read back as a backup.
    read_header(&to)?;

    let last = LastBackup {
        path: to.clone(),
        id,
        created: header.created,
        incremental: header.parent.is_some(),
    };
    if let Err(e) = common::safeio::write_atomic(
        &last_backup_path(config),
        &serde_json::to_vec_pretty(&last)?,
    ) {
        eprintln!("mailctl: warning: cannot record the last backup: {e}");
    }
    super::print_summary("created", &to, &header, started.elapsed(), json)
}

fn count(totals: &mut Totals, record: &Record) {
    match record {
        Record::User { .. } => totals.users += 1,
        Record::Folder { messages, .. } => {
            totals.folders += 1;
            totals.messages += messages.len() as u64;
            totals.bytes += messages.iter().map(Message::size).sum::<u64>();
        }
        Record::Blob { stored, .. } => totals.stored_bytes += stored,
        _ => {}
    }
}

/// A fresh backup id: time and randomness, in hex.
fn new_id() -> String {
    format!(
        "{:x}-{:016x}",
        common::spool::unix_now(),
        rand::random::<u64>()
    )
}

/// The installation's own files: config, tables, keys, certificates.
fn installation_files(
    config: &Config,
    config_path: &Path,
) -> anyhow::Result<Vec<(FileRole, String, PathBuf)>> {
    let paths = &config.paths;
    let mut files = vec![
        (
            FileRole::Config,
            "mailsrv.toml".to_string(),
            config_path.to_path_buf(),
        ),
        (FileRole::Users, "users".into(), paths.users.clone()),
        (FileRole::Aliases, "aliases".into(), paths.aliases.clone()),
        (FileRole::Domains, "domains".into(), paths.domains.clone()),
        (
            FileRole::TlsCert,
            "tls/cert.pem".into(),
            config.tls.cert.clone(),
        ),
        (
            FileRole::TlsKey,
            "tls/key.pem".into(),
            config.tls.key.clone(),
        ),
        (
            FileRole::Greylist,
            "spool/greylist".into(),
            Spool::new(&paths.spool).greylist_path(),
        ),
    ];
    if let Some(credentials) = config
        .delivery
        .relay
        .as_ref()
        .and_then(|r| r.credentials.clone())
    {
        files.push((
            FileRole::RelayCredentials,
            "relay-credentials".into(),
            credentials,
        ));
    }
    // <dkim_keys>/<domain>/<selector>.pem
    if let Ok(domains) = std::fs::read_dir(&paths.dkim_keys) {
        for domain in domains.flatten() {
            let Ok(keys) = std::fs::read_dir(domain.path()) else {
                continue;
            };
            for key in keys.flatten() {
                let name = format!(
                    "dkim/{}/{}",
                    domain.file_name().to_string_lossy(),
                    key.file_name().to_string_lossy()
                );
                files.push((FileRole::Dkim, name, key.path()));
            }
        }
    }
    Ok(files)
}

fn back_up_files(
    config: &Config,
    config_path: &Path,
    store: &mut Store,
    pack: &mut PackWriter,
    manifest: &mut ManifestWriter,
) -> anyhow::Result<()> {
    for (role, name, path) in installation_files(config, config_path)? {
        let mut file = match File::open(&path) {
            Ok(f) => f,
            // Optional ones (the greylist, an aliases file never made).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let (sha256, size) = store.add(pack, &mut file, &mut |r| Ok(manifest.write(r)?))?;
        let record = Record::File {
            role,
            name,
            origin: path,
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime(),
            size,
            sha256,
        };
        store.totals.files += 1;
        store.totals.bytes += size;
        manifest.write(&record)?;
    }
    Ok(())
}

/// The queue: listed by its data files (which never move), each found in
/// whatever state its envelope is in then. The maildrop is listed first:
/// a message picked up meanwhile is then caught in both, not in neither.
fn back_up_queue(
    config: &Config,
    reuse: &Reuse,
    store: &mut Store,
    pack: &mut PackWriter,
    manifest: &mut ManifestWriter,
) -> anyhow::Result<()> {
    let spool = Spool::new(&config.paths.spool);
    for id in list_ids(&spool.dir(QueueState::Maildrop))? {
        let path = spool.dir(QueueState::Maildrop).join(&id);
        let Some(mut file) = open_if_there(&path)? else {
            continue;
        };
        let uid = file.metadata()?.uid();
        let (sha256, size) = store.add(pack, &mut file, &mut |r| Ok(manifest.write(r)?))?;
        store.totals.queue_entries += 1;
        store.totals.bytes += size;
        manifest.write(&Record::Maildrop {
            id,
            uid,
            size,
            sha256,
        })?;
    }
    for id in list_ids(&spool.data_dir())? {
        // An envelope moves by rename; a few tries find it between moves.
        let found = (0..5).find_map(|_| {
            let state = spool.locate(&id)?;
            let bytes = open_if_there(&spool.envelope_path(state, &id)).ok()??;
            Some((state, bytes))
        });
        // No envelope: delivered, or never acknowledged.
        let Some((state, mut envelope_file)) = found else {
            continue;
        };
        let Some(mut data) = open_if_there(&spool.data_path(&id))? else {
            continue;
        };
        let (envelope, envelope_size) =
            store.add(pack, &mut envelope_file, &mut |r| Ok(manifest.write(r)?))?;
        let data_size = data.metadata()?.len();
        let data_sha = match reuse.queue_data.get(&(id.clone(), data_size)) {
            Some(sha) => sha.clone(),
            None => {
                store
                    .add(pack, &mut data, &mut |r| Ok(manifest.write(r)?))?
                    .0
            }
        };
        store.totals.queue_entries += 1;
        store.totals.bytes += envelope_size + data_size;
        manifest.write(&Record::Queue {
            id,
            state: state.dir_name().to_string(),
            envelope,
            data: data_sha,
            data_size,
        })?;
    }
    Ok(())
}

/// Queue ids in `dir` (files being written are skipped).
fn list_ids(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_queue_id(name))
        .collect();
    ids.sort();
    Ok(ids)
}

/// A regular file of the spool (others can write there: no symlinks),
/// None when it is gone.
fn open_if_there(path: &Path) -> anyhow::Result<Option<File>> {
    match common::safeio::open_regular(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The folders of a Maildir: "" (INBOX) first, then each `.Name` with a
/// `cur/`.
pub fn folders(maildir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(maildir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with('.') && n.len() > 1 && n != "..")
        .filter(|n| maildir.join(n).join("cur").is_dir())
        .collect();
    names.sort();
    names.insert(0, String::new());
    Ok(names)
}

/// Removes a staging directory however the backup of a user ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One folder, listed and staged.
struct Listed {
    dir: String,
    uid_validity: u32,
    uid_next: u32,
    keywords: Option<Vec<u8>>,
    /// UID, file name, in new/, staged path.
    messages: Vec<(u32, String, bool, PathBuf)>,
}

/// Runs as the mail-store user: the records go to `out` as JSON lines.
fn back_up_mailboxes(
    mail_root: &Path,
    users: &[String],
    id: &str,
    reuse: &Reuse,
    store: &mut Store,
    pack: &mut PackWriter,
    out: File,
) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    let mut write = |r: &Record| -> anyhow::Result<()> {
        serde_json::to_writer(&mut out, r)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    let maildirs: Vec<(String, Option<PathBuf>)> = users
        .iter()
        .map(|u| {
            let dir = Address::parse(u)
                .ok()
                .and_then(|a| maildir_path(mail_root, &a).ok())
                .filter(|d| d.is_dir());
            (u.clone(), dir)
        })
        .collect();
    let (total_bytes, total_messages) = estimate(&maildirs);
    let mut progress = Progress::new("backup", total_bytes, total_messages);
    // Hard-linked copies (COPY) are read once.
    let mut by_inode: HashMap<(u64, u64), String> = HashMap::new();
    for (user, maildir) in &maildirs {
        let Some(maildir) = maildir else {
            write(&Record::User {
                address: user.clone(),
                subscriptions: None,
            })?;
            continue;
        };
        let staging = Staging(maildir.join("tmp").join(format!("mailsrv-backup.{id}")));
        std::fs::create_dir_all(&staging.0)
            .with_context(|| format!("creating {}", staging.0.display()))?;
        let mut listed = Vec::new();
        {
            let _no_moves = common::safeio::lock_exclusive(&maildir.join(FOLDERS_LOCK))?;
            for (n, dir) in folders(maildir)?.into_iter().enumerate() {
                listed.push(list_folder(maildir, dir, &staging.0, n)?);
            }
        }
        let subscriptions = read_optional(&maildir.join("subscriptions"))?;
        let subscriptions = match subscriptions {
            Some(bytes) => Some(store.add(pack, &mut &bytes[..], &mut write)?.0),
            None => None,
        };
        write(&Record::User {
            address: user.clone(),
            subscriptions,
        })?;
        for folder in listed {
            let keywords = match &folder.keywords {
                Some(bytes) => Some(store.add(pack, &mut &bytes[..], &mut write)?.0),
                None => None,
            };
            let mut messages = Vec::with_capacity(folder.messages.len());
            for (uid, name, in_new, staged) in folder.messages {
                let meta = std::fs::metadata(&staged)?;
                let base = name.split_once(':').map_or(name.as_str(), |(b, _)| b);
                let key = (user.clone(), base.to_string(), meta.len());
                let sha256 = match reuse
                    .messages
                    .get(&key)
                    .or_else(|| by_inode.get(&(meta.dev(), meta.ino())))
                {
                    Some(sha) => sha.clone(),
                    None => {
                        let mut file = File::open(&staged)?;
                        let (sha, _) = store.add(pack, &mut file, &mut write)?;
                        by_inode.insert((meta.dev(), meta.ino()), sha.clone());
                        sha
                    }
                };
                progress.add(meta.len(), 1);
                messages.push(Message(uid, name, in_new, meta.mtime(), meta.len(), sha256));
            }
            write(&Record::Folder {
                user: user.clone(),
                dir: folder.dir,
                uid_validity: folder.uid_validity,
                uid_next: folder.uid_next,
                keywords,
                messages,
            })?;
        }
    }
    progress.finish();
    out.flush()?;
    out.get_ref().sync_all()?;
    Ok(())
}

/// Bring the folder's UIDs up to date and hard-link its files into
/// `staging`, where they stay whatever clients do meanwhile.
fn list_folder(maildir: &Path, dir: String, staging: &Path, n: usize) -> anyhow::Result<Listed> {
    let folder = if dir.is_empty() {
        maildir.to_path_buf()
    } else {
        maildir.join(&dir)
    };
    let state = common::uidlist::sync(&folder)
        .with_context(|| format!("reading the UIDs of {}", folder.display()))?;
    let keywords = match read_optional(&folder.join("mailsrv-keywords"))? {
        Some(k) => Some(k),
        None => read_optional(&folder.join("dovecot-keywords"))?,
    };
    let mut messages = Vec::with_capacity(state.entries.len());
    for entry in state.entries {
        let staged = staging.join(format!("{n}-{}", entry.uid));
        let mut linked = None;
        // A flag change renames the file: look it up again by base name.
        for attempt in 0..3 {
            let (name, in_new) = if attempt == 0 {
                (entry.file_name.clone(), entry.in_new)
            } else {
                match find_by_base(&folder, &entry.base)? {
                    Some(found) => found,
                    None => break,
                }
            };
            let sub = if in_new { "new" } else { "cur" };
            let file = folder.join(sub).join(&name);
            // A file of another owner cannot be linked (Linux's
            // protected_hardlinks): it is copied instead.
            let staged_ok = std::fs::hard_link(&file, &staged).or_else(|e| {
                if e.raw_os_error() == Some(libc::EPERM) {
                    // The mtime is the message's INTERNALDATE: kept.
                    let modified = std::fs::metadata(&file)?.modified()?;
                    std::fs::copy(&file, &staged)?;
                    File::options()
                        .write(true)
                        .open(&staged)?
                        .set_modified(modified)
                } else {
                    Err(e)
                }
            });
            match staged_ok {
                Ok(()) => {
                    linked = Some((name, in_new));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("linking {} into {}", name, staging.display()))
                }
            }
        }
        // Expunged since the sync: not in the backup.
        if let Some((name, in_new)) = linked {
            messages.push((entry.uid, name, in_new, staged));
        }
    }
    Ok(Listed {
        dir,
        uid_validity: state.uid_validity,
        uid_next: state.uid_next,
        keywords,
        messages,
    })
}

fn find_by_base(folder: &Path, base: &str) -> anyhow::Result<Option<(String, bool)>> {
    for (sub, in_new) in [("cur", false), ("new", true)] {
        for entry in std::fs::read_dir(folder.join(sub))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.split_once(':').map_or(name.as_str(), |(b, _)| b) == base {
                return Ok(Some((name, in_new)));
            }
        }
    }
    Ok(None)
}

fn read_optional(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Bytes and messages of the Maildirs, from the sizes in the file names
/// (no file is opened): the progress bar's totals.
fn estimate(maildirs: &[(String, Option<PathBuf>)]) -> (u64, u64) {
    let (mut bytes, mut messages) = (0, 0);
    for maildir in maildirs.iter().filter_map(|(_, d)| d.as_ref()) {
        for dir in folders(maildir).unwrap_or_default() {
            for sub in ["cur", "new"] {
                let Ok(entries) = std::fs::read_dir(maildir.join(&dir).join(sub)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    messages += 1;
                    bytes += common::maildir::size_from_name(&name).unwrap_or(0);
                }
            }
        }
    }
    (bytes, messages)
}
