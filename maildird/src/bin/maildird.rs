//! maildird: the IMAP and POP3 server over the Maildirs. See maildird(8).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use common::config::Config;
use common::daemon::{self, Prepared, SignalEvent, Signals};
use common::privileges::Role;
use common::tls_handoff::{reload_acceptor, Receiver};
use mailsrv_maildird::imap::server::ImapServer;
use mailsrv_maildird::imap::watch::FolderWatcher;
use mailsrv_maildird::pop3::server::Pop3Server;
use tokio::net::TcpListener;

fn main() -> std::process::ExitCode {
    daemon::main(
        "maildird",
        0,
        || Ok(daemon::prepare("maildird", Role::Maildird, endpoints)?),
        run,
    )
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Imap { implicit_tls: bool },
    Pop3 { implicit_tls: bool },
}

/// Every listener with its service, in config order.
fn endpoints(config: &Config) -> Vec<(SocketAddr, Service)> {
    let m = &config.maildird;
    let kinds = [
        (
            &m.imap_listen,
            Service::Imap {
                implicit_tls: false,
            },
        ),
        (&m.imaps_listen, Service::Imap { implicit_tls: true }),
        (
            &m.pop3_listen,
            Service::Pop3 {
                implicit_tls: false,
            },
        ),
        (&m.pop3s_listen, Service::Pop3 { implicit_tls: true }),
    ];
    kinds
        .into_iter()
        .flat_map(|(addrs, service)| addrs.iter().map(move |a| (*a, service)))
        .collect()
}

async fn run(prepared: Prepared<Service>) -> anyhow::Result<()> {
    let Prepared {
        config_path,
        config,
        directory,
        tls,
        listeners,
    } = prepared;
    let directory = std::sync::Arc::new(directory);
    let mut signals = Signals::install()?;
    let mut handoff = Receiver::from_env().context("the certificate pipe from master")?;
    let listen: Vec<SocketAddr> = endpoints(&config).into_iter().map(|(a, _)| a).collect();
    let (stop_tx, stop_rx) = daemon::shutdown_channel();
    let watcher = FolderWatcher::start().context("starting inotify")?;
    let imap_server = ImapServer::new(
        config.clone(),
        Some(tls.clone()),
        directory.clone(),
        stop_rx.clone(),
        watcher,
    );
    let server = Pop3Server::new(config, Some(tls), directory, stop_rx);
    for (listener, service) in listeners {
        let listener = TcpListener::from_std(listener)?;
        match service {
            Service::Imap { implicit_tls } => {
                tokio::spawn(imap_server.clone().serve(listener, implicit_tls))
            }
            Service::Pop3 { implicit_tls } => {
                tokio::spawn(server.clone().serve(listener, implicit_tls))
            }
        };
    }
    tracing::info!("listening on {listen:?}");
    while signals.next().await == SignalEvent::Reload {
        let reloaded = match daemon::load_config(&config_path) {
            Ok(c) => reload_acceptor(handoff.as_mut(), &c.tls)
                .await
                .map(|tls| (c, tls))
                .map_err(anyhow::Error::msg),
            Err(e) => Err(e.into()),
        };
        match reloaded {
            Ok((config, tls)) => {
                imap_server
                    .access()
                    .reload(config.clone(), Some(tls.clone()));
                server.access().reload(config, Some(tls));
                tracing::info!("configuration and certificate reloaded");
            }
            Err(e) => tracing::error!("reload failed, keeping the old configuration: {e:#}"),
        }
    }
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.access().active_sessions() + imap_server.access().active_sessions() > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
