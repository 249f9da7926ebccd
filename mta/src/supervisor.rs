//! The supervisor (`master`): starts the daemons, restarts one that dies,
//! forwards reloads, and stops them all on SIGTERM. See master(8).

use std::path::Path;
use std::time::Duration;

use std::os::fd::AsRawFd;

use anyhow::Context;
use common::config::Config;
use common::tls_handoff::{self, Sender};
use nix::fcntl::{FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use common::daemon::{SignalEvent, Signals};

/// The daemons the supervisor runs.
pub const DAEMONS: [&str; 3] = ["smtpd", "qmgr", "maildird"];

/// The daemons that serve TLS and get renewed certificates from master
/// (`common::tls_handoff`).
const TLS_DAEMONS: [&str; 2] = ["smtpd", "maildird"];

/// Longest wait before restarting a daemon that keeps dying.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// A daemon that ran this long before dying had started fine: it is
/// restarted after a second, however often that happens. The back-off is
/// for daemons that cannot start (a taken port, a missing user), which
/// die sooner.
const STABLE_RUN: Duration = Duration::from_secs(5);

struct Daemon {
    name: &'static str,
    child: Option<Child>,
    /// Where its renewed certificates go, for a TLS daemon.
    tls: Option<Sender>,
    started: tokio::time::Instant,
    delay: Duration,
}

impl Daemon {
    fn new(name: &'static str) -> Daemon {
        Daemon {
            name,
            child: None,
            tls: None,
            started: tokio::time::Instant::now(),
            delay: Duration::from_secs(1),
        }
    }

    /// Start (or restart) the daemon.
    fn spawn(&mut self, bin_dir: &Path, config_path: &Path, config: &Config) -> anyhow::Result<()> {
        let (child, tls) = spawn(bin_dir, self.name, config_path, config)?;
        self.child = Some(child);
        self.tls = tls;
        self.started = tokio::time::Instant::now();
        Ok(())
    }
}

fn spawn(
    bin_dir: &Path,
    name: &str,
    config_path: &Path,
    config: &Config,
) -> anyhow::Result<(Child, Option<Sender>)> {
    let program = bin_dir.join(name);
    let mut cmd = Command::new(&program);
    cmd.arg("-c")
        .arg(config_path)
        .stdin(std::process::Stdio::null());
    let handoff = if TLS_DAEMONS.contains(&name) {
        let (sender, read) = tls_handoff::channel().context("making the certificate pipe")?;
        cmd.env(tls_handoff::FD_ENV, read.as_raw_fd().to_string());
        Some((sender, read))
    } else {
        None
    };
    let inherited = handoff.as_ref().map(|(_, read)| read.as_raw_fd());
    // SAFETY: prctl and fcntl are async-signal-safe. The parent-death
    // signal makes the kernel stop the daemon if the supervisor dies
    // without stopping it; the pipe's read end is kept across exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            if let Some(fd) = inherited {
                nix::fcntl::fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    // The read end now lives in the child; master keeps only the writer.
    let sender = handoff.map(|(sender, _read)| sender);
    if let Some(pid) = child.id() {
        let _ = common::safeio::write_atomic(
            &config.paths.pid_file(name),
            format!("{pid}\n").as_bytes(),
        );
        tracing::info!("started {name} (pid {pid})");
    }
    Ok((child, sender))
}

/// Run the daemons until SIGTERM/SIGINT. `config_path` is handed to them.
pub async fn run(config_path: &Path, config: &Config) -> anyhow::Result<()> {
    let bin_dir = config
        .paths
        .binary_dir()
        .context("finding this program's path")?;
    let mut signals = Signals::install()?;
    let mut daemons: Vec<Daemon> = Vec::new();
    for name in DAEMONS {
        let mut daemon = Daemon::new(name);
        daemon.spawn(&bin_dir, config_path, config)?;
        daemons.push(daemon);
    }
    loop {
        let exited = wait_any(&mut daemons);
        tokio::select! {
            sig = signals.next() => match sig {
                SignalEvent::Stop => break,
                SignalEvent::Reload => {
                    tracing::info!("reload: signalling daemons");
                    hand_over_certificate(&mut daemons, config_path, config);
                    signal_all(&daemons, Signal::SIGHUP);
                }
            },
            (index, status) = exited => {
                let d = &mut daemons[index];
                d.child = None;
                if d.started.elapsed() >= STABLE_RUN {
                    d.delay = Duration::from_secs(1);
                }
                tracing::warn!("{} exited ({status}); restarting in {}s", d.name, d.delay.as_secs());
                let delay = d.delay;
                d.delay = (d.delay * 2).min(MAX_RESTART_DELAY);
                // Signals during the wait still count: a reload goes to the
                // daemons that run, and the wait goes on.
                let restart_at = tokio::time::Instant::now() + delay;
                let stop = loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(restart_at) => break false,
                        sig = signals.next() => match sig {
                            SignalEvent::Stop => break true,
                            SignalEvent::Reload => {
                                tracing::info!("reload: signalling daemons");
                                hand_over_certificate(&mut daemons, config_path, config);
                                signal_all(&daemons, Signal::SIGHUP);
                            }
                        },
                    }
                };
                if stop {
                    break;
                }
                if let Err(e) = daemons[index].spawn(&bin_dir, config_path, config) {
                    tracing::error!("{e:#}");
                }
            }
        }
    }
    stop_all(&mut daemons, config).await;
    Ok(())
}

/// Read the certificate and key named in the config (as it is now, as
/// root if master runs as root) and write them to each TLS daemon, which
/// takes them at its SIGHUP: it may no longer be able to read them itself.
fn hand_over_certificate(daemons: &mut [Daemon], config_path: &Path, config: &Config) {
    let loaded = match Config::load(config_path) {
        Ok(now) => common::tls::read_pem(&now.tls),
        Err(_) => common::tls::read_pem(&config.tls),
    }
    .map_err(|e| e.to_string());
    if let Err(e) = &loaded {
        tracing::error!("reload: {e}");
    }
    let frame = tls_handoff::encode(&loaded);
    for d in daemons.iter_mut().filter(|d| d.child.is_some()) {
        if let Some(sender) = d.tls.as_mut() {
            if let Err(e) = sender.send(&frame) {
                tracing::error!("reload: certificate for {}: {e}", d.name);
            }
        }
    }
}

/// Wait for any running daemon to exit; yields its index and status.
async fn wait_any(daemons: &mut [Daemon]) -> (usize, String) {
    let waits = daemons.iter_mut().enumerate().filter_map(|(i, d)| {
        d.child.as_mut().map(|c| {
            Box::pin(async move {
                let status = c
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                (i, status)
            })
        })
    });
    let waits: Vec<_> = waits.collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(waits).await.0
}

fn signal_all(daemons: &[Daemon], sig: Signal) {
    for d in daemons {
        if let Some(pid) = d.child.as_ref().and_then(Child::id) {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }
}

/// SIGTERM every daemon, give them the configured grace (plus a margin),
/// then SIGKILL what is left.
async fn stop_all(daemons: &mut [Daemon], config: &Config) {
    tracing::info!("stopping daemons");
    signal_all(daemons, Signal::SIGTERM);
    let deadline = Duration::from_secs(config.smtpd.shutdown_grace + 20);
    for d in daemons.iter_mut() {
        if let Some(child) = d.child.as_mut() {
            if tokio::time::timeout(deadline, child.wait()).await.is_err() {
                tracing::warn!("{} did not stop in time; killing it", d.name);
                let _ = child.kill().await;
            }
        }
        let _ = std::fs::remove_file(config.paths.pid_file(d.name));
    }
    tracing::info!("stopped");
}
