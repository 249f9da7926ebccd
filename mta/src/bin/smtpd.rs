//! smtpd: the SMTP receiver. See smtpd(8).

use std::time::Duration;

use anyhow::Context;
use common::daemon::{self, SignalEvent, Signals};
use common::recipients::DirectoryCache;
use mailsrv_mta::smtp::server::Server;
use tokio::net::TcpListener;

fn main() -> std::process::ExitCode {
    daemon::main("smtpd", 0, run())
}

async fn run() -> anyhow::Result<()> {
    let (config_path, config) = daemon::start("smtpd")?;
    let mut signals = Signals::install()?;
    let directory = DirectoryCache::new(&config).context("loading users, aliases and domains")?;
    common::spool::Spool::new(&config.paths.spool)
        .create_dirs()
        .with_context(|| format!("creating the spool in {}", config.paths.spool.display()))?;
    let mut listeners = Vec::new();
    for addr in &config.smtpd.listen {
        let l = common::net::bind_listener(*addr)
            .and_then(TcpListener::from_std)
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(l);
    }
    let grace = Duration::from_secs(config.smtpd.shutdown_grace);
    let listen = config.smtpd.listen.clone();
    let (stop_tx, stop_rx) = daemon::shutdown_channel();
    let server = Server::new(config, directory, stop_rx);
    for l in listeners {
        tokio::spawn(server.clone().serve(l));
    }
    tracing::info!("listening on {listen:?}");
    while signals.next().await == SignalEvent::Reload {
        match daemon::load_config(&config_path) {
            Ok(new) => {
                if new.smtpd.listen != listen {
                    tracing::warn!("smtpd.listen changed: restart to apply");
                }
                server.reload(new);
                tracing::info!("configuration reloaded");
            }
            Err(e) => tracing::error!("reload failed, keeping the old configuration: {e:#}"),
        }
    }
    tracing::info!("stopping: closing listeners");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    while server.active_sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
