//! qmgr: the queue manager and local delivery agent. See qmgr(8).

use anyhow::Context;
use common::config::Config;
use common::daemon::{self, SignalEvent, Signals};
use common::privileges::{drop_privileges, Role};
use common::safeio::{try_lock_exclusive, LockGuard};

fn main() -> std::process::ExitCode {
    daemon::main("qmgr", 0, setup, run)
}

/// Take the lock in the (root's) run directory, then drop privileges.
fn setup() -> anyhow::Result<(Config, LockGuard)> {
    let (_path, config) = daemon::start("qmgr")?;
    std::fs::create_dir_all(&config.paths.run_dir)
        .with_context(|| format!("creating {}", config.paths.run_dir.display()))?;
    let lock_path = config.paths.run_dir.join("qmgr.lock");
    let lock = try_lock_exclusive(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?
        .context("another qmgr is running")?;
    drop_privileges(&config, Role::Qmgr)?;
    Ok((config, lock))
}

async fn run((config, _lock): (Config, LockGuard)) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let (stop_tx, stop_rx) = daemon::shutdown_channel();
    let queue = tokio::spawn({
        let config = config.clone();
        async move { mailsrv_mta::qmgr::run(&config, stop_rx).await }
    });
    tracing::info!("started");
    tokio::pin!(queue);
    loop {
        tokio::select! {
            // The tables reload by themselves when their files change.
            sig = signals.next() => if sig == SignalEvent::Stop { break },
            result = &mut queue => return result.context("queue manager task")?,
        }
    }
    let _ = stop_tx.send(true);
    queue.await.context("queue manager task")?
}
