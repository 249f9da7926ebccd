//! `mailctl status`: is the system healthy, at a glance: the daemons and
//! their pids, what they listen on, the queue by state and its oldest
//! deferred message, disk use of the spool and the mail store, when the
//! certificate expires, and the last backup.

use std::path::Path;

use anyhow::Context;
use common::config::Config;
use common::spool::{unix_now, QueueState, Spool};
use serde::Serialize;

use crate::backup::{last_backup_path, LastBackup};
use crate::control::{is_running, read_pid, DAEMONS};

#[derive(Debug, Serialize)]
struct Status {
    running: bool,
    /// Daemon → pid, when its pid file names a live process.
    pids: serde_json::Map<String, serde_json::Value>,
    listeners: serde_json::Map<String, serde_json::Value>,
    queue: serde_json::Map<String, serde_json::Value>,
    /// Unix seconds of the oldest deferred message's arrival.
    oldest_deferred: Option<u64>,
    spool: Disk,
    mail_store: Disk,
    /// Unix seconds at which the certificate expires.
    certificate_expires: Option<i64>,
    certificate_error: Option<String>,
    last_backup: Option<LastBackup>,
}

#[derive(Debug, Serialize)]
struct Disk {
    path: String,
    /// Bytes of the files under it.
    used: u64,
    /// Bytes left to unprivileged users on its file system.
    available: Option<u64>,
}

pub fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let running = is_running(config)?;
    let pids = DAEMONS
        .iter()
        .filter_map(|d| {
            let pid = read_pid(config, d).filter(|&p| alive(p))?;
            running.then(|| (d.to_string(), serde_json::json!(pid)))
        })
        .collect();
    let s = &config.smtpd;
    let m = &config.maildird;
    let listeners = [
        ("smtp", &s.listen),
        ("submission", &s.submission_listen),
        ("submissions", &s.submissions_listen),
        ("imap", &m.imap_listen),
        ("imaps", &m.imaps_listen),
        ("pop3", &m.pop3_listen),
        ("pop3s", &m.pop3s_listen),
    ]
    .into_iter()
    .filter(|(_, addrs)| !addrs.is_empty())
    .map(|(name, addrs)| {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        (name.to_string(), serde_json::json!(list))
    })
    .collect();
    let spool = Spool::new(&config.paths.spool);
    let mut queue = serde_json::Map::new();
    for state in QueueState::ALL {
        let ids = spool.list(state).unwrap_or_default();
        queue.insert(state.dir_name().to_string(), serde_json::json!(ids.len()));
    }
    let oldest_deferred = spool
        .list(QueueState::Deferred)
        .unwrap_or_default()
        .iter()
        .filter_map(|id| common::queue_id::arrival(id))
        .min();
    let (certificate_expires, certificate_error) = match certificate_expiry(&config.tls.cert) {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let last_backup = std::fs::read(last_backup_path(config))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let status = Status {
        running,
        pids,
        listeners,
        queue,
        oldest_deferred,
        spool: disk(&config.paths.spool),
        mail_store: disk(&config.paths.mail_root),
        certificate_expires,
        certificate_error,
        last_backup,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    // LSB init-script convention: 3 means "not running".
    if !running && !json {
        std::process::exit(3);
    }
    Ok(())
}

fn print_text(s: &Status) {
    let now = unix_now();
    println!(
        "mailsrv is {}",
        if s.running { "running" } else { "not running" }
    );
    for (name, pid) in &s.pids {
        println!("  {name:9} pid {pid}");
    }
    for (name, addrs) in &s.listeners {
        let list: Vec<&str> = addrs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        println!("  {name:12} {}", list.join(" "));
    }
    let counts: Vec<String> = s.queue.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("queue: {}", counts.join(", "));
    if let Some(t) = s.oldest_deferred {
        println!("  oldest deferred message: {}", ago(now, t));
    }
    for (name, d) in [("spool", &s.spool), ("mail store", &s.mail_store)] {
        println!(
            "{name}: {} used in {}{}",
            human(d.used),
            d.path,
            d.available
                .map(|a| format!(", {} available", human(a)))
                .unwrap_or_default()
        );
    }
    match (s.certificate_expires, &s.certificate_error) {
        (Some(t), _) if t < now as i64 => println!("certificate: EXPIRED {}", ago(now, t as u64)),
        (Some(t), _) => println!("certificate: expires in {} days", (t - now as i64) / 86_400),
        (None, Some(e)) => println!("certificate: {e}"),
        (None, None) => {}
    }
    match &s.last_backup {
        Some(b) => println!(
            "last backup: {} ({}, {})",
            b.path.display(),
            if b.incremental { "incremental" } else { "full" },
            ago(now, b.created)
        ),
        None => println!("last backup: none recorded"),
    }
}

fn ago(now: u64, then: u64) -> String {
    let secs = now.saturating_sub(then);
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn disk(path: &Path) -> Disk {
    Disk {
        path: path.display().to_string(),
        used: tree_size(path),
        available: nix::sys::statvfs::statvfs(path)
            .ok()
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size())),
    }
}

/// Bytes of the files under `path`; links are not followed.
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return if meta.is_file() { meta.len() } else { 0 };
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| tree_size(&e.path())).sum())
        .unwrap_or(0)
}

/// When the certificate at `path` stops being valid (Unix seconds).
fn certificate_expiry(path: &Path) -> anyhow::Result<i64> {
    use x509_cert::der::{Decode, DecodePem};
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let cert = if text.starts_with(b"-----") {
        x509_cert::Certificate::from_pem(&text)
    } else {
        x509_cert::Certificate::from_der(&text)
    }
    .with_context(|| format!("{}: not a certificate", path.display()))?;
    let not_after = cert.tbs_certificate.validity.not_after.to_unix_duration();
    Ok(not_after.as_secs() as i64)
}
