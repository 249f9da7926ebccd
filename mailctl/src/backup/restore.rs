//! `mailctl backup restore`: a whole installation into an empty one (or a
//! new directory), or one user or one folder into the running system.
//!
//! A folder that is not there is restored exactly: the same UIDVALIDITY,
//! UIDs, UIDNEXT, flags, keywords and INTERNALDATEs, so IMAP clients that
//! knew it download nothing again. Into a folder that exists, a message
//! can only be added with a new UID above those in use (RFC 9051
//! 2.3.1.1): the ones missing are added so, flags and keywords kept.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use common::address::Address;
use common::config::Config;
use common::spool::{QueueState, Spool};
use common::userdb::{maildir_path, UserDb};

use super::format::{Chain, FileRole, Message, Packs, Record};
use super::progress::Progress;

/// A backup opened for reading.
pub struct Source {
    chain: Chain,
    packs: Packs,
    records: Vec<Record>,
}

impl Source {
    pub fn open(path: &Path) -> anyhow::Result<Source> {
        let chain = Chain::open(path)?;
        let packs = chain.open_packs()?;
        let records = chain
            .records()?
            .filter(|r| !matches!(r, Ok(Record::Blob { .. })))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for record in &records {
            for sha in hashes_of(record) {
                if !chain.has(sha) {
                    bail!(
                        "{}: content {sha} is in no backup of the chain (run `mailctl backup verify`)",
                        chain.dir().display()
                    );
                }
            }
        }
        Ok(Source {
            chain,
            packs,
            records,
        })
    }

    /// Write blob `sha256` as a new file at `path` with `mode`, durably
    /// (written aside, fsynced, renamed into place).
    fn write_file(
        &self,
        sha256: &str,
        path: &Path,
        mode: u32,
        mtime: Option<i64>,
    ) -> anyhow::Result<u64> {
        let tmp = path.with_file_name(format!(
            ".{}.restoring",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        let written = (|| {
            let mut file = File::options()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            let size = self.copy(sha256, &mut file)?;
            if let Some(secs) = mtime {
                file.set_modified(unix_time(secs))?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
            Ok(size)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    fn copy(&self, sha256: &str, out: &mut dyn Write) -> anyhow::Result<u64> {
        let at = self
            .chain
            .blob(sha256)
            .with_context(|| format!("content {sha256} is missing from the backup"))?;
        self.packs.copy_blob(sha256, at, out)
    }

    fn bytes(&self, sha256: &str) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.copy(sha256, &mut out)?;
        Ok(out)
    }

    fn file(&self, role: FileRole) -> Option<&str> {
        self.records.iter().find_map(|r| match r {
            Record::File {
                role: r, sha256, ..
            } if *r == role => Some(sha256.as_str()),
            _ => None,
        })
    }

    fn folders_of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = FolderRef<'a>> + 'a {
        self.records.iter().filter_map(move |r| match r {
            Record::Folder {
                user: u,
                dir,
                uid_validity,
                uid_next,
                keywords,
                messages,
            } if u == user => Some(FolderRef {
                dir,
                uid_validity: *uid_validity,
                uid_next: *uid_next,
                keywords: keywords.as_deref(),
                messages,
            }),
            _ => None,
        })
    }

    fn users(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.records.iter().filter_map(|r| match r {
            Record::User {
                address,
                subscriptions,
            } => Some((address.as_str(), subscriptions.as_deref())),
            _ => None,
        })
    }

    /// Bytes and messages of the folders `wanted` says are restored.
    fn mail_totals(&self, wanted: impl Fn(&str, &str) -> bool) -> (u64, u64) {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Folder {
                    user,
                    dir,
                    messages,
                    ..
                } if wanted(user, dir) => Some(messages),
                _ => None,
            })
            .fold((0, 0), |(b, n), m| {
                (
                    b + m.iter().map(Message::size).sum::<u64>(),
                    n + m.len() as u64,
                )
            })
    }
}

struct FolderRef<'a> {
    dir: &'a str,
    uid_validity: u32,
    uid_next: u32,
    keywords: Option<&'a str>,
    messages: &'a [Message],
}

/// Every content hash a record refers to.
pub fn hashes_of(record: &Record) -> Vec<&str> {
    match record {
        Record::File { sha256, .. } | Record::Maildrop { sha256, .. } => vec![sha256],
        Record::Queue { envelope, data, .. } => vec![envelope, data],
        Record::User { subscriptions, .. } => subscriptions.iter().map(String::as_str).collect(),
        Record::Folder {
            keywords, messages, ..
        } => keywords
            .iter()
            .map(String::as_str)
            .chain(messages.iter().map(Message::sha256))
            .collect(),
        Record::Blob { .. } => Vec::new(),
    }
}

fn unix_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// What a restore did.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    pub files: u64,
    pub queue_entries: u64,
    pub users: u64,
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// The whole installation into the new directory `into`, laid out as
/// `mailctl init` makes one; needs no installation to exist.
pub fn into_new(path: &Path, into: &Path, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let source = Source::open(path)?;
    if into.exists() && std::fs::read_dir(into)?.next().is_some() {
        bail!(
            "{}: not empty; restore into a new directory",
            into.display()
        );
    }
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    // Half an installation is worse than none: a failed restore leaves
    // the directory empty, ready for another try.
    let result = restore_new(&source, into);
    if result.is_err() {
        for entry in std::fs::read_dir(into).into_iter().flatten().flatten() {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
    finish(&source, &result?, started, json)
}

fn restore_new(source: &Source, into: &Path) -> anyhow::Result<Restored> {
    let config_sha = source
        .file(FileRole::Config)
        .context("the backup holds no configuration")?;
    let text = String::from_utf8(source.bytes(config_sha)?)
        .context("the backed-up configuration is not UTF-8")?;
    let text = relocate_config(&text).context("the backed-up configuration")?;
    let config_path = into.join("mailsrv.toml");
    common::safeio::write_atomic_mode(&config_path, text.as_bytes(), 0o644)?;
    let config = Config::load(&config_path)
        .with_context(|| format!("the restored configuration {}", config_path.display()))?;
    for dir in ["tls", "run", "log"] {
        std::fs::create_dir_all(into.join(dir))?;
    }
    let mut restored = restore_installation(source, &config, true)?;
    restored.files += 1;
    if crate::system::is_root() && config.privileges.is_some() {
        crate::system::apply_ownership(&config, &config_path)?;
        restore_maildrop_owners(source, &config)?;
    } else if config.privileges.is_some() {
        eprintln!(
            "mailctl: note: {} drops privileges ([privileges]): restore as root so every file gets its owner, or remove that section",
            config_path.display()
        );
    }
    Ok(restored)
}

/// The whole installation into the configured one, which must be empty
/// (no users, no mail, an empty queue); its configuration, certificate
/// and key stay its own.
pub fn into_empty(
    config: &Config,
    config_path: &Path,
    path: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    if crate::control::is_running(config)? {
        bail!("mailsrv is running: stop it (mailctl stop) before restoring a whole installation into it");
    }
    let source = Source::open(path)?;
    let users = UserDb::load(&config.paths.users)?;
    if !users.list().is_empty() {
        bail!(
            "{} has users: restore a whole installation only into an empty one (or use --user, or --into a new directory)",
            config.paths.users.display()
        );
    }
    if std::fs::read_dir(&config.paths.mail_root).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} is not empty", config.paths.mail_root.display());
    }
    let spool = Spool::new(&config.paths.spool);
    for state in QueueState::ALL {
        if spool.list(state).is_ok_and(|l| !l.is_empty()) {
            bail!("the queue in {} is not empty", config.paths.spool.display());
        }
    }
    let restored = restore_installation(&source, config, false)?;
    if crate::system::is_root() && config.privileges.is_some() {
        crate::system::apply_ownership(config, config_path)?;
        restore_maildrop_owners(&source, config)?;
    }
    finish(&source, &restored, started, json)
}

fn finish(
    source: &Source,
    restored: &Restored,
    started: Instant,
    json: bool,
) -> anyhow::Result<()> {
    // Everything written is fsynced file by file; one sync covers the
    // directories.
    nix::unistd::sync();
    if json {
        let summary = serde_json::json!({
            "restored": restored,
            "backup": source.chain.dir(),
            "id": source.chain.header().id,
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "restored {} users, {} folders, {} messages ({} bytes), {} queue entries, {} files from {} in {:.1} s",
            restored.users,
            restored.folders,
            restored.messages,
            restored.bytes,
            restored.queue_entries,
            restored.files,
            source.chain.dir().display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Point every path of the configuration into its own directory, as
/// `mailctl init` lays one out; comments and everything else kept.
fn relocate_config(text: &str) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse()?;
    let paths = [
        ("spool", "spool"),
        ("mail_root", "mail"),
        ("users", "users"),
        ("aliases", "aliases"),
        ("domains", "domains"),
        ("run_dir", "run"),
        ("log_file", "log/mailsrv.log"),
        ("dkim_keys", "dkim"),
    ];
    for (key, value) in paths {
        doc["paths"][key] = toml_edit::value(value);
    }
    doc["tls"]["cert"] = toml_edit::value("tls/cert.pem");
    doc["tls"]["key"] = toml_edit::value("tls/key.pem");
    if doc
        .get("delivery")
        .and_then(|d| d.get("relay"))
        .and_then(|r| r.get("credentials"))
        .is_some()
    {
        doc["delivery"]["relay"]["credentials"] = toml_edit::value("relay-credentials");
    }
    Ok(doc.to_string())
}

/// Tables, keys, the queue and the mailboxes into `config`'s paths;
/// `with_tls`: the certificate and key too (a new installation).
fn restore_installation(
    source: &Source,
    config: &Config,
    with_tls: bool,
) -> anyhow::Result<Restored> {
    let mut restored = Restored::default();
    let paths = &config.paths;
    for record in &source.records {
        let Record::File {
            role,
            name,
            mode,
            mtime,
            sha256,
            ..
        } = record
        else {
            continue;
        };
        let target = match role {
            FileRole::Config => continue,
            FileRole::Users => paths.users.clone(),
            FileRole::Aliases => paths.aliases.clone(),
            FileRole::Domains => paths.domains.clone(),
            FileRole::TlsCert | FileRole::TlsKey if !with_tls => continue,
            FileRole::TlsCert => config.tls.cert.clone(),
            FileRole::TlsKey => config.tls.key.clone(),
            FileRole::Greylist => Spool::new(&paths.spool).greylist_path(),
            FileRole::RelayCredentials => match config
                .delivery
                .relay
                .as_ref()
                .and_then(|r| r.credentials.clone())
            {
                Some(p) => p,
                None => continue,
            },
            FileRole::Dkim => {
                // dkim/<domain>/<file>: names from our own manifest, but
                // checked all the same.
                let rest = name.strip_prefix("dkim/").unwrap_or(name);
                if rest
                    .split('/')
                    .any(|p| p.is_empty() || p == ".." || p == ".")
                {
                    bail!("the backup names a bad key file: {name}");
                }
                paths.dkim_keys.join(rest)
            }
        };
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&target);
        restored.bytes += source.write_file(sha256, &target, *mode, Some(*mtime))?;
        restored.files += 1;
    }
    restore_queue(source, config, &mut restored)?;
    let (bytes, messages) = source.mail_totals(|_, _| true);
    let mut progress = Progress::new("restore", bytes, messages);
    for (user, subscriptions) in source.users() {
        let address = Address::parse(user).with_context(|| format!("user {user} in the backup"))?;
        let maildir = maildir_path(&paths.mail_root, &address)?;
        restore_mailbox(
            source,
            user,
            subscriptions,
            &maildir,
            &mut progress,
            &mut restored,
        )?;
        restored.users += 1;
    }
    progress.finish();
    Ok(restored)
}

fn restore_queue(source: &Source, config: &Config, restored: &mut Restored) -> anyhow::Result<()> {
    let spool = Spool::new(&config.paths.spool);
    spool.create_dirs()?;
    for record in &source.records {
        match record {
            Record::Queue {
                id,
                state,
                envelope,
                data,
                ..
            } => {
                check_id(id)?;
                // An entry being delivered when the backup was taken is
                // delivered again, as after a crash.
                let state = match state.as_str() {
                    "active" => "incoming",
                    s => s,
                };
                restored.bytes += source.write_file(data, &spool.data_path(id), 0o640, None)?;
                let dir = config.paths.spool.join(state);
                if !QueueState::ALL.iter().any(|s| s.dir_name() == state) {
                    bail!("queue entry {id}: unknown state {state}");
                }
                restored.bytes += source.write_file(envelope, &dir.join(id), 0o640, None)?;
                restored.queue_entries += 1;
            }
            Record::Maildrop { id, sha256, .. } => {
                check_id(id)?;
                let path = spool.dir(QueueState::Maildrop).join(id);
                restored.bytes += source.write_file(sha256, &path, 0o640, None)?;
                restored.queue_entries += 1;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if !common::queue_id::is_queue_id(id) {
        bail!("the backup names a bad queue id: {id}");
    }
    Ok(())
}

/// pickup takes a maildrop file's owner for its submitter.
fn restore_maildrop_owners(source: &Source, config: &Config) -> anyhow::Result<()> {
    let dir = Spool::new(&config.paths.spool).dir(QueueState::Maildrop);
    for record in &source.records {
        if let Record::Maildrop { id, uid, .. } = record {
            std::os::unix::fs::chown(dir.join(id), Some(*uid), None)?;
        }
    }
    Ok(())
}

/// A user's mailbox at `maildir`, which may exist: missing folders are
/// restored exactly, existing ones get what they lack.
fn restore_mailbox(
    source: &Source,
    user: &str,
    subscriptions: Option<&str>,
    maildir: &Path,
    progress: &mut Progress,
    restored: &mut Restored,
) -> anyhow::Result<()> {
    for folder in source.folders_of(user) {
        restore_folder(source, maildir, &folder, progress, restored)?;
    }
    if let Some(sha) = subscriptions {
        merge_subscriptions(maildir, &source.bytes(sha)?)?;
    }
    Ok(())
}

fn restore_folder(
    source: &Source,
    maildir: &Path,
    folder: &FolderRef,
    progress: &mut Progress,
    restored: &mut Restored,
) -> anyhow::Result<()> {
    // The manifest is ours, but a name must never leave the Maildir.
    if !folder.dir.is_empty()
        && common::mailbox_name::MailboxName::from_dir_name(folder.dir).is_none()
    {
        bail!("the backup names a bad folder: {}", folder.dir);
    }
    let path = maildir.join(folder.dir);
    let exists = path.join("cur").is_dir();
    if exists {
        merge_folder(source, &path, folder, progress, restored)
    } else {
        exact_folder(source, maildir, folder, progress, restored)
    }
}

/// A folder that is not there, built aside and renamed into place so no
/// session sees half of it.
fn exact_folder(
    source: &Source,
    maildir: &Path,
    folder: &FolderRef,
    progress: &mut Progress,
    restored: &mut Restored,
) -> anyhow::Result<()> {
    let inbox = folder.dir.is_empty();
    let target = maildir.join(folder.dir);
    // INBOX is the Maildir itself: built beside it, under a name no user
    // can have (a leading dot).
    let building = if inbox {
        let parent = maildir.parent().context("a Maildir has a parent")?;
        std::fs::create_dir_all(parent)?;
        parent.join(format!(
            ".restoring-{}",
            maildir
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ))
    } else {
        // A folder of a user whose Maildir is gone: an empty INBOX first.
        if !maildir.join("cur").is_dir() {
            common::maildir::create_maildir(maildir)
                .with_context(|| format!("creating {}", maildir.display()))?;
        }
        maildir
            .join("tmp")
            .join(format!("mailsrv-restore{}", folder.dir))
    };
    let _ = std::fs::remove_dir_all(&building);
    common::maildir::create_maildir(&building)
        .with_context(|| format!("creating {}", building.display()))?;
    if !inbox {
        File::create(building.join("maildirfolder"))?;
    }
    let mut uids = Vec::with_capacity(folder.messages.len());
    for m in folder.messages {
        let name = m.file_name();
        if name.contains('/') || name.starts_with('.') {
            bail!("the backup names a bad message file: {name}");
        }
        let sub = if m.in_new() { "new" } else { "cur" };
        let size = source.write_file(
            m.sha256(),
            &building.join(sub).join(name),
            0o600,
            Some(m.mtime()),
        )?;
        uids.push((m.uid(), m.base().to_string()));
        progress.add(size, 1);
        restored.bytes += size;
        restored.messages += 1;
    }
    if let Some(sha) = folder.keywords {
        common::safeio::write_atomic(&building.join("mailsrv-keywords"), &source.bytes(sha)?)?;
    }
    common::uidlist::install(&building, folder.uid_validity, folder.uid_next, &uids)?;
    if inbox {
        if maildir.exists() {
            // Only subfolders so far (restored before INBOX? no: INBOX
            // comes first); an empty directory left by someone else.
            std::fs::remove_dir(maildir)
                .with_context(|| format!("{} is in the way", maildir.display()))?;
        }
        common::safeio::rename_durable(&building, maildir)?;
    } else {
        common::safeio::rename_durable(&building, &target)?;
    }
    restored.folders += 1;
    Ok(())
}

/// Into a folder that exists: what it lacks (by the name flags leave
/// alone) is added with new UIDs; keywords are numbered anew for it.
fn merge_folder(
    source: &Source,
    path: &Path,
    folder: &FolderRef,
    progress: &mut Progress,
    restored: &mut Restored,
) -> anyhow::Result<()> {
    let present: HashSet<String> = common::uidlist::sync(path)?
        .entries
        .into_iter()
        .map(|e| e.base)
        .collect();
    let missing: Vec<&Message> = folder
        .messages
        .iter()
        .filter(|m| !present.contains(m.base()))
        .collect();
    let backed_up_keywords: HashMap<char, String> = match folder.keywords {
        Some(sha) => String::from_utf8_lossy(&source.bytes(sha)?)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(i, name)| {
                let i: u8 = i.parse().ok()?;
                (i < 26).then(|| (char::from(b'a' + i), name.to_string()))
            })
            .collect(),
        None => HashMap::new(),
    };
    let wanted: BTreeSet<String> = missing
        .iter()
        .flat_map(|m| info_of(m.file_name()).chars())
        .filter_map(|c| backed_up_keywords.get(&c).cloned())
        .collect();
    let keywords = common::flags::Keywords::ensure(path, &wanted)?;
    for m in missing {
        let info: String = info_of(m.file_name())
            .chars()
            .filter_map(|c| match c {
                'a'..='z' => backed_up_keywords
                    .get(&c)
                    .and_then(|name| keywords.letter_of(name)),
                c => Some(c),
            })
            .collect::<BTreeSet<char>>()
            .into_iter()
            .collect();
        let (sub, name) = if m.in_new() {
            ("new", m.base().to_string())
        } else {
            ("cur", format!("{}:2,{info}", m.base()))
        };
        let size = source.write_file(
            m.sha256(),
            &path.join(sub).join(&name),
            0o600,
            Some(m.mtime()),
        )?;
        progress.add(size, 1);
        restored.bytes += size;
        restored.messages += 1;
    }
    common::uidlist::sync(path)?;
    restored.folders += 1;
    Ok(())
}

fn info_of(file_name: &str) -> &str {
    file_name.split_once(":2,").map_or("", |(_, i)| i)
}

fn merge_subscriptions(maildir: &Path, backed_up: &[u8]) -> anyhow::Result<()> {
    use common::mailbox_name::{encode_mutf7, parse_subscriptions};
    let path = maildir.join("subscriptions");
    let current = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Either file may be Dovecot's (a header, TABs between levels):
    // both are read as names and written back in our form.
    let mut names: BTreeSet<String> = parse_subscriptions(&current).into_iter().collect();
    let before = names.len();
    names.extend(parse_subscriptions(&String::from_utf8_lossy(backed_up)));
    if names.len() != before || current.is_empty() {
        let text: String = names
            .iter()
            .map(|n| format!("{}\n", encode_mutf7(n)))
            .collect();
        common::safeio::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}

/// One user, or one folder of one user, into the running system.
pub fn user(
    config: &Config,
    path: &Path,
    user: &str,
    folder: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let source = Source::open(path)?;
    let address = Address::parse(user).with_context(|| format!("user {user}"))?;
    let user = address.key();
    let Some((_, subscriptions)) = source.users().find(|(u, _)| *u == user) else {
        bail!("the backup has no user {user}");
    };
    // The account first, hash and all, if it is gone.
    if let Some(sha) = source.file(FileRole::Users) {
        let table = String::from_utf8_lossy(&source.bytes(sha)?).into_owned();
        let line = table.lines().find(|l| {
            l.split(':')
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case(&user))
        });
        if let Some(line) = line {
            if UserDb::add_line(&config.paths.users, line)? {
                eprintln!("mailctl: added the account {user} from the backup");
            }
        }
    }
    let maildir = maildir_path(&config.paths.mail_root, &address)?;
    let dirs: Vec<String> = match folder {
        None => source
            .folders_of(&user)
            .map(|f| f.dir.to_string())
            .collect(),
        Some(name) => {
            let dir = folder_dir(name)?;
            if !source.folders_of(&user).any(|f| f.dir == dir) {
                bail!("the backup has no folder {name} of {user}");
            }
            vec![dir]
        }
    };
    let subscriptions = subscriptions.map(str::to_string);
    let (bytes, messages) = source.mail_totals(|u, dir| u == user && dirs.iter().any(|d| d == dir));
    let mut restored = crate::system::as_store_user_returning(config, || {
        let mut progress = Progress::new("restore", bytes, messages);
        let mut done = Restored::default();
        for f in source
            .folders_of(&user)
            .filter(|f| dirs.iter().any(|d| d == f.dir))
        {
            restore_folder(&source, &maildir, &f, &mut progress, &mut done)?;
        }
        if folder.is_none() {
            if let Some(sha) = &subscriptions {
                merge_subscriptions(&maildir, &source.bytes(sha)?)?;
            }
        }
        progress.finish();
        Ok(done)
    })?;
    restored.users = 1;
    finish(&source, &restored, started, json)
}

/// The Maildir++ directory of an IMAP folder name, as IMAP clients show
/// it ("" for INBOX, the Maildir itself).
fn folder_dir(name: &str) -> anyhow::Result<String> {
    let name = common::mailbox_name::MailboxName::from_client(name, true)
        .map_err(|e| anyhow::anyhow!("folder `{name}`: {e}"))?;
    Ok(name
        .folder_dir(Path::new(""))
        .to_string_lossy()
        .into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relocated_config_points_into_its_directory() {
        let text = "hostname = \"mx.test\"\n# keep me\n[paths]\nspool = \"/var/spool/mailsrv\"\nmail_root = \"/srv/mail\"\n[tls]\ncert = \"/etc/le/cert.pem\"\nkey = \"/etc/le/key.pem\"\n[delivery.relay]\nhost = \"relay.test\"\ncredentials = \"/etc/mailsrv/relay\"\n";
        let out = relocate_config(text).unwrap();
        assert!(out.contains("# keep me"), "{out}");
        assert!(out.contains("spool = \"spool\""), "{out}");
        assert!(out.contains("mail_root = \"mail\""), "{out}");
        assert!(out.contains("cert = \"tls/cert.pem\""), "{out}");
        assert!(out.contains("credentials = \"relay-credentials\""), "{out}");
        assert!(!out.contains("/srv/mail"), "{out}");
    }

    #[test]
    fn folder_names() {
        assert_eq!(folder_dir("INBOX").unwrap(), "");
        assert_eq!(folder_dir("inbox").unwrap(), "");
        assert_eq!(folder_dir("Work.Sub").unwrap(), ".Work.Sub");
        assert_eq!(folder_dir("Entwürfe").unwrap(), ".Entw&APw-rfe");
        assert!(folder_dir("../x").is_err());
    }
}
