//! `mailctl backup`: create, verify, list and restore backups of a whole
//! installation (see [`format`] for what a backup is).

mod create;
pub mod format;
mod progress;
mod restore;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use common::config::Config;
use serde::{Deserialize, Serialize};

use format::{check_sums, Chain, Header, Record};

/// `mailctl backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up the installation, while it runs, into a new directory
    Create {
        /// The directory to create
        #[arg(long)]
        to: PathBuf,
        /// Store only what changed since this backup
        #[arg(long)]
        incremental_from: Option<PathBuf>,
        /// Print a JSON summary
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum of a backup and of the backups it builds on
    Verify {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what a backup holds
    List {
        path: PathBuf,
        /// Every folder of this user, with its messages
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a whole installation, one user or one folder
    Restore {
        path: PathBuf,
        /// Only this user (into the configured installation)
        #[arg(long, conflicts_with = "into")]
        user: Option<String>,
        /// Only this folder of --user (IMAP name, e.g. INBOX or Work.2024)
        #[arg(long, requires = "user")]
        folder: Option<String>,
        /// Into this new directory, as a complete installation
        #[arg(long)]
        into: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

impl BackupCommand {
    /// Whether the command reads only the backup: it then needs no
    /// installation (a backup is restored on a new machine).
    pub fn needs_no_config(&self) -> bool {
        matches!(
            self,
            BackupCommand::Verify { .. }
                | BackupCommand::List { .. }
                | BackupCommand::Restore { into: Some(_), .. }
        )
    }
}

/// Commands that need no installation.
pub fn without_config(command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::Verify { path, json } => verify(&path, json),
        BackupCommand::List { path, user, json } => list(&path, user.as_deref(), json),
        BackupCommand::Restore {
            path,
            into: Some(into),
            json,
            ..
        } => restore::into_new(&path, &into, json),
        _ => unreachable!("needs_no_config said so"),
    }
}

/// Commands on the configured installation.
pub fn backup(config: &Config, config_path: &Path, command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::Create {
            to,
            incremental_from,
            json,
        } => create::create(config, config_path, &to, incremental_from.as_deref(), json),
        BackupCommand::Restore {
            path,
            user: Some(user),
            folder,
            json,
            ..
        } => restore::user(config, &path, &user, folder.as_deref(), json),
        BackupCommand::Restore { path, json, .. } => {
            restore::into_empty(config, config_path, &path, json)
        }
        other => without_config(other),
    }
}

/// `<spool>/last-backup.json`, for `mailctl status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LastBackup {
    pub path: PathBuf,
    pub id: String,
    pub created: u64,
    pub incremental: bool,
}

pub fn last_backup_path(config: &Config) -> PathBuf {
    config.paths.spool.join("last-backup.json")
}

fn print_summary(
    verb: &str,
    path: &Path,
    header: &Header,
    took: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let t = &header.totals;
    if json {
        let summary = serde_json::json!({
            "path": path,
            "id": header.id,
            "incremental": header.parent.is_some(),
            "parent": header.parent.as_ref().map(|p| &p.id),
            "totals": t,
            "seconds": took.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{verb} {} backup {} in {}: {} users, {} folders, {} messages, {} queue entries, {} files; {} bytes, {} stored, in {:.1} s",
            if header.parent.is_some() { "incremental" } else { "full" },
            header.id,
            path.display(),
            t.users,
            t.folders,
            t.messages,
            t.queue_entries,
            t.files,
            t.bytes,
            t.stored_bytes,
            took.as_secs_f64()
        );
    }
    Ok(())
}

/// Check the chain: every file against `SHA256SUMS`, every blob against
/// its hash, every hash the manifests name present.
fn verify(path: &Path, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let chain = Chain::open(path)?;
    let mut problems = Vec::new();
    for dir in &chain.dirs {
        for p in check_sums(dir)? {
            problems.push(format!("{}: {p}", dir.display()));
        }
    }
    let packs = chain.open_packs()?;
    let mut blobs = 0u64;
    for (sha, at) in chain.blobs() {
        blobs += 1;
        if let Err(e) = packs.copy_blob(sha, at, &mut std::io::sink()) {
            problems.push(format!("{}: {e:#}", chain.dirs[at.backup].display()));
        }
    }
    let mut referenced = 0u64;
    for (i, dir) in chain.dirs.iter().enumerate() {
        for record in format::read_manifest(dir)? {
            match record {
                Ok(record) => {
                    for sha in restore::hashes_of(&record) {
                        referenced += 1;
                        // A backup's content is in it or its ancestors.
                        match chain.blob(sha) {
                            Some(at) if at.backup >= i => {}
                            _ => problems.push(format!(
                                "{}: content {sha} is in no backup of its chain",
                                dir.display()
                            )),
                        }
                    }
                }
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
    }
    if json {
        let summary = serde_json::json!({
            "path": path,
            "ok": problems.is_empty(),
            "backups": chain.dirs,
            "blobs": blobs,
            "references": referenced,
            "problems": problems,
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for p in &problems {
            println!("{p}");
        }
        if problems.is_empty() {
            println!(
                "{}: OK ({} backup{} in the chain, {blobs} blobs, {referenced} references checked)",
                path.display(),
                chain.dirs.len(),
                if chain.dirs.len() == 1 { "" } else { "s" }
            );
        }
    }
    if !problems.is_empty() {
        bail!("{}: {} problem(s) found", path.display(), problems.len());
    }
    Ok(())
}

/// What a backup holds: its header, users and folders (with messages for
/// `user`).
fn list(path: &Path, user: Option<&str>, json: bool) -> anyhow::Result<()> {
    let header = format::read_header(path)?;
    // user → folder dir → (messages, bytes)
    let mut users: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    let mut messages = Vec::new();
    let mut files = Vec::new();
    let mut queue = 0u64;
    for record in format::read_manifest(path)? {
        match record? {
            Record::User { address, .. } => {
                users.entry(address).or_default();
            }
            Record::Folder {
                user: u,
                dir,
                messages: m,
                ..
            } => {
                let bytes = m.iter().map(format::Message::size).sum();
                if user.is_some_and(|wanted| wanted.eq_ignore_ascii_case(&u)) {
                    for message in &m {
                        messages.push((folder_name(&dir), message.clone()));
                    }
                }
                users
                    .entry(u)
                    .or_default()
                    .insert(dir, (m.len() as u64, bytes));
            }
            Record::File { name, size, .. } => files.push((name, size)),
            Record::Queue { .. } | Record::Maildrop { .. } => queue += 1,
            Record::Blob { .. } => {}
        }
    }
    if json {
        let users_json: BTreeMap<&String, BTreeMap<String, serde_json::Value>> = users
            .iter()
            .map(|(u, folders)| {
                let f = folders
                    .iter()
                    .map(|(dir, (n, b))| {
                        (
                            folder_name(dir),
                            serde_json::json!({"messages": n, "bytes": b}),
                        )
                    })
                    .collect();
                (u, f)
            })
            .collect();
        let summary = serde_json::json!({
            "header": header,
            "files": files.iter().map(|(n, s)| serde_json::json!({"name": n, "size": s})).collect::<Vec<_>>(),
            "queue_entries": queue,
            "users": users_json,
            "messages": messages.iter().map(|(folder, m)| serde_json::json!({
                "folder": folder, "uid": m.uid(), "file": m.file_name(), "size": m.size(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let created = time::OffsetDateTime::from_unix_timestamp(header.created as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    println!(
        "backup {} of {}, {created}, {}",
        header.id,
        header.hostname,
        match &header.parent {
            Some(p) => format!("incremental on {}", p.id),
            None => "full".to_string(),
        }
    );
    for (name, size) in &files {
        println!("file {name} ({size} bytes)");
    }
    println!("queue: {queue} entries");
    for (u, folders) in &users {
        println!("user {u}");
        for (dir, (n, b)) in folders {
            println!("  {}: {n} messages, {b} bytes", folder_name(dir));
        }
    }
    for (folder, m) in &messages {
        println!("{folder} {} {} {}", m.uid(), m.file_name(), m.size());
    }
    Ok(())
}

/// The IMAP name of a folder directory.
fn folder_name(dir: &str) -> String {
    if dir.is_empty() {
        return "INBOX".to_string();
    }
    match common::mailbox_name::MailboxName::from_dir_name(dir) {
        Some(name) => name.to_client(true),
        None => dir.to_string(),
    }
}
