//! smtpd: the SMTP receiver. See smtpd(8).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use common::config::Config;
use common::daemon::{self, Prepared, SignalEvent, Signals};
use common::privileges::Role;
use common::tls_handoff::{reload_acceptor, Receiver};
use mailsrv_mta::smtp::server::Server;
use mailsrv_mta::smtp::session::Port;
use tokio::net::TcpListener;

fn main() -> std::process::ExitCode {
    daemon::main(
        "smtpd",
        0,
        || Ok(daemon::prepare("smtpd", Role::Smtpd, endpoints)?),
        run,
    )
}

async fn run(prepared: Prepared<Port>) -> anyhow::Result<()> {
    let Prepared {
        config_path,
        config,
        directory,
        tls,
        listeners,
    } = prepared;
    let mut signals = Signals::install()?;
    let mut handoff = Receiver::from_env().context("the certificate pipe from master")?;
    let listeners = listeners
        .into_iter()
        .map(|(l, port)| Ok((TcpListener::from_std(l)?, port)))
        .collect::<std::io::Result<Vec<_>>>()?;
    common::spool::Spool::new(&config.paths.spool)
        .create_dirs()
        .with_context(|| format!("creating the spool in {}", config.paths.spool.display()))?;
    let grace = Duration::from_secs(config.smtpd.shutdown_grace);
    let listen = listen_addresses(&config);
    let (stop_tx, stop_rx) = daemon::shutdown_channel();
    let server = Server::new(config, tls, directory, stop_rx)?;
    for (l, port) in listeners {
        tokio::spawn(server.clone().serve(l, port));
    }
    tracing::info!("listening on {listen:?}");
    let saver = server.clone();
    tokio::spawn(async move {
        let mut every_minute = tokio::time::interval(Duration::from_secs(60));
        loop {
            every_minute.tick().await;
            saver.save_greylist().await;
        }
    });
    while signals.next().await == SignalEvent::Reload {
        let loaded = match daemon::load_config(&config_path) {
            Ok(c) => reload_acceptor(handoff.as_mut(), &c.tls)
                .await
                .map(|tls| (tls, c))
                .map_err(anyhow::Error::msg),
            Err(e) => Err(e.into()),
        };
        match loaded {
            Ok((tls, new)) => {
                if listen_addresses(&new) != listen {
                    tracing::warn!("smtpd listeners changed: restart to apply");
                }
                match server.reload(new, tls) {
                    Ok(()) => tracing::info!("configuration and certificate reloaded"),
                    Err(e) => {
                        tracing::error!("reload failed, keeping the old configuration: {e:#}")
                    }
                }
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
    server.save_greylist().await;
    Ok(())
}

/// Every listener with the kind of port it is, in config order.
fn endpoints(config: &Config) -> Vec<(SocketAddr, Port)> {
    let s = &config.smtpd;
    let kinds = [
        (&s.listen, Port::Mx),
        (&s.submission_listen, Port::Submission),
        (&s.submissions_listen, Port::Submissions),
    ];
    kinds
        .into_iter()
        .flat_map(|(addrs, port)| addrs.iter().map(move |a| (*a, port)))
        .collect()
}

/// Every listener address, in config order.
fn listen_addresses(config: &Config) -> Vec<SocketAddr> {
    endpoints(config).into_iter().map(|(a, _)| a).collect()
}
