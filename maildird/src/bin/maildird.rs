//! maildird: the IMAP and POP3 server over the Maildirs. See maildird(8).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use common::config::Config;
use common::daemon::{self, SignalEvent, Signals};
use common::privileges::{drop_privileges, Role};
use common::recipients::DirectoryCache;
use common::tls_handoff::{reload_acceptor, Receiver};
use mailsrv_maildird::imap::server::ImapServer;
use mailsrv_maildird::imap::watch::FolderWatcher;
use mailsrv_maildird::pop3::server::Pop3Server;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn main() -> std::process::ExitCode {
    daemon::main("maildird", 0, setup, run)
}

fn bind(addrs: &[std::net::SocketAddr]) -> anyhow::Result<Vec<std::net::TcpListener>> {
    addrs
        .iter()
        .map(|addr| {
            common::net::bind_listener(*addr).with_context(|| format!("cannot listen on {addr}"))
        })
        .collect()
}

fn into_tokio(listeners: Vec<std::net::TcpListener>) -> std::io::Result<Vec<TcpListener>> {
    listeners.into_iter().map(TcpListener::from_std).collect()
}

/// What is done as root, if started as root: read the config, the tables
/// and the key, bind the listeners; then drop privileges.
struct Prepared {
    config_path: PathBuf,
    config: Config,
    directory: DirectoryCache,
    tls: TlsAcceptor,
    /// IMAP, IMAPS, POP3, POP3S.
    listeners: [Vec<std::net::TcpListener>; 4],
}

fn setup() -> anyhow::Result<Prepared> {
    let (config_path, config) = daemon::start("maildird")?;
    let directory = DirectoryCache::new(&config).context("loading users, aliases and domains")?;
    let tls = common::tls::acceptor(&config.tls)?;
    let m = &config.maildird;
    let listeners = [
        bind(&m.imap_listen)?,
        bind(&m.imaps_listen)?,
        bind(&m.pop3_listen)?,
        bind(&m.pop3s_listen)?,
    ];
    drop_privileges(&config, Role::Maildird)?;
    Ok(Prepared {
        config_path,
        config,
        directory,
        tls,
        listeners,
    })
}

async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        config_path,
        config,
        directory,
        tls,
        listeners: [imap, imaps, pop3, pop3s],
    } = prepared;
    let directory = std::sync::Arc::new(directory);
    let mut signals = Signals::install()?;
    let mut handoff = Receiver::from_env().context("the certificate pipe from master")?;
    let (imap, imaps, pop3, pop3s) = (
        into_tokio(imap)?,
        into_tokio(imaps)?,
        into_tokio(pop3)?,
        into_tokio(pop3s)?,
    );
    let listen: Vec<_> = config
        .maildird
        .imap_listen
        .iter()
        .chain(&config.maildird.imaps_listen)
        .chain(&config.maildird.pop3_listen)
        .chain(&config.maildird.pop3s_listen)
        .copied()
        .collect();
    let (stop_tx, stop_rx) = daemon::shutdown_channel();
    let watcher = FolderWatcher::start().context("starting inotify")?;
    let imap_server = ImapServer::new(
        config.clone(),
        Some(tls.clone()),
        directory.clone(),
        stop_rx.clone(),
        watcher,
    );
    for (listeners, implicit_tls) in [(imap, false), (imaps, true)] {
        for l in listeners {
            tokio::spawn(imap_server.clone().serve(l, implicit_tls));
        }
    }
    let server = Pop3Server::new(config, Some(tls), directory, stop_rx);
    for (listeners, implicit_tls) in [(pop3, false), (pop3s, true)] {
        for l in listeners {
            tokio::spawn(server.clone().serve(l, implicit_tls));
        }
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
