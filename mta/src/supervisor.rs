//! The supervisor (`master`): starts the daemons, restarts one that dies,
//! forwards reloads, and stops them all on SIGTERM. See master(8).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use common::config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use common::daemon::{SignalEvent, Signals};

/// The daemons the supervisor runs.
pub const DAEMONS: [&str; 3] = ["smtpd", "qmgr", "maildird"];

/// Longest wait before restarting a daemon that keeps dying.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// A daemon that ran this long before dying is restarted at once.
const STABLE_RUN: Duration = Duration::from_secs(60);

struct Daemon {
    name: &'static str,
    child: Option<Child>,
    started: tokio::time::Instant,
    delay: Duration,
}

fn spawn(bin_dir: &Path, name: &str, config_path: &Path, config: &Config) -> anyhow::Result<Child> {
    let program = bin_dir.join(name);
    let mut cmd = Command::new(&program);
    cmd.arg("-c")
        .arg(config_path)
        .stdin(std::process::Stdio::null());
    // SAFETY: prctl is async-signal-safe; it makes the kernel stop the
    // daemon if the supervisor dies without stopping it.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    if let Some(pid) = child.id() {
        let _ = common::safeio::write_atomic(
            &config.paths.pid_file(name),
            format!("{pid}\n").as_bytes(),
        );
        tracing::info!("started {name} (pid {pid})");
    }
    Ok(child)
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
        daemons.push(Daemon {
            name,
            child: Some(spawn(&bin_dir, name, config_path, config)?),
            started: tokio::time::Instant::now(),
            delay: Duration::from_secs(1),
        });
    }
    loop {
        let exited = wait_any(&mut daemons);
        tokio::select! {
            sig = signals.next() => match sig {
                SignalEvent::Stop => break,
                SignalEvent::Reload => {
                    tracing::info!("reload: signalling daemons");
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
                // Signals during the wait still count.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    sig = signals.next() => if sig == SignalEvent::Stop { break },
                }
                let d = &mut daemons[index];
                match spawn(&bin_dir, d.name, config_path, config) {
                    Ok(child) => {
                        d.child = Some(child);
                        d.started = tokio::time::Instant::now();
                    }
                    Err(e) => tracing::error!("{e:#}"),
                }
            }
        }
    }
    stop_all(&mut daemons, config).await;
    Ok(())
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
