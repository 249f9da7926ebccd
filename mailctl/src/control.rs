//! `mailctl start|stop|reload|status`: drive the supervisor (`master`).
//!
//! Whether mailsrv runs is decided by the supervisor's lock on
//! `run_dir/master.lock`, not by a pid file that might be stale.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::config::Config;
use common::safeio::try_lock_exclusive;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The daemons whose pid files `status` reports.
pub const DAEMONS: [&str; 4] = ["master", "smtpd", "qmgr", "maildird"];

/// How long `start` waits for the listening ports, and `stop` for the exit.
const START_WAIT: Duration = Duration::from_secs(20);
const STOP_WAIT: Duration = Duration::from_secs(60);

fn master_binary(config: &Config) -> anyhow::Result<PathBuf> {
    let dir = config
        .paths
        .binary_dir()
        .context("finding this program's path")?;
    Ok(dir.join("master"))
}

pub fn is_running(config: &Config) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&config.paths.run_dir)
        .with_context(|| format!("creating {}", config.paths.run_dir.display()))?;
    let lock = config.paths.run_dir.join("master.lock");
    let free = try_lock_exclusive(&lock).with_context(|| format!("checking {}", lock.display()))?;
    Ok(free.is_none())
}

pub fn read_pid(config: &Config, name: &str) -> Option<i32> {
    let text = std::fs::read_to_string(config.paths.pid_file(name)).ok()?;
    text.trim().parse().ok()
}

/// Start the supervisor, in this process (`foreground`) or detached.
pub fn start(config_path: &Path, config: &Config, foreground: bool) -> anyhow::Result<()> {
    if is_running(config)? {
        bail!("mailsrv is already running");
    }
    // A bad key would only show as daemons restarting over and over.
    crate::check::startable(config)?;
    let master = master_binary(config)?;
    let config_path = std::path::absolute(config_path).context("resolving the config path")?;
    let mut cmd = Command::new(&master);
    cmd.arg("-c").arg(&config_path);
    if foreground {
        print_ports(config);
        let err = cmd.exec();
        bail!("cannot run {}: {err}", master.display());
    }
    let log_path = &config.paths.log_file;
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", master.display()))?;
    let mut waiting: Vec<SocketAddr> = listeners(config)
        .into_iter()
        .map(|(_, a)| connectable(a))
        .collect();
    let deadline = Instant::now() + START_WAIT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "mailsrv failed to start ({status}); from {}:\n{}",
                log_path.display(),
                log_since(log_path, log_start)
            );
        }
        waiting.retain(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err());
        if waiting.is_empty() {
            println!(
                "mailsrv started (master pid {}); log in {}",
                child.id(),
                log_path.display()
            );
            print_ports(config);
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "mailsrv did not open {waiting:?} within {}s; see {}",
                START_WAIT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every listening address of the configuration, by service.
fn listeners(config: &Config) -> Vec<(&'static str, SocketAddr)> {
    let m = &config.maildird;
    let services: [(&'static str, &[SocketAddr]); 7] = [
        ("smtp", &config.smtpd.listen),
        ("submission", &config.smtpd.submission_listen),
        ("submissions", &config.smtpd.submissions_listen),
        ("imap", &m.imap_listen),
        ("imaps", &m.imaps_listen),
        ("pop3", &m.pop3_listen),
        ("pop3s", &m.pop3s_listen),
    ];
    services
        .into_iter()
        .flat_map(|(name, addrs)| addrs.iter().map(move |a| (name, *a)))
        .collect()
}

/// `addr`, with a wildcard address replaced by loopback.
fn connectable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

fn print_ports(config: &Config) {
    for (name, a) in listeners(config) {
        println!("  {name:<11} {a}");
    }
}

fn log_since(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(text.len());
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Stop the supervisor and wait until it is gone.
pub fn stop(config: &Config) -> anyhow::Result<()> {
    if !is_running(config)? {
        println!("mailsrv is not running");
        return Ok(());
    }
    let pid =
        read_pid(config, "master").context("mailsrv runs but run/master.pid is unreadable")?;
    kill(Pid::from_raw(pid), Signal::SIGTERM).with_context(|| format!("signalling pid {pid}"))?;
    let deadline = Instant::now() + STOP_WAIT;
    while is_running(config)? {
        if Instant::now() > deadline {
            bail!(
                "mailsrv (pid {pid}) did not stop within {}s",
                STOP_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("mailsrv stopped");
    Ok(())
}

/// Ask the daemons to re-read the configuration.
pub fn reload(config: &Config) -> anyhow::Result<()> {
    if !is_running(config)? {
        bail!("mailsrv is not running");
    }
    let pid = read_pid(config, "master").context("run/master.pid is unreadable")?;
    kill(Pid::from_raw(pid), Signal::SIGHUP).with_context(|| format!("signalling pid {pid}"))?;
    println!("reload requested");
    Ok(())
}
