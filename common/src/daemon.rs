//! What every daemon does at start: read `-c FILE`, load the config, set up
//! logging, and turn SIGTERM/SIGINT and SIGHUP into async events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use std::net::SocketAddr;

use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError};
use crate::privileges::{drop_privileges, PrivilegeError, Role};
use crate::recipients::DirectoryCache;
use crate::textdb::TableError;
use crate::tls::TlsError;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Command line shared by the daemons.
#[derive(Debug, Parser)]
pub struct DaemonArgs {
    /// Configuration file (default: $MAILSRV_CONFIG or /etc/mailsrv/mailsrv.toml).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
}

impl DaemonArgs {
    /// The config file path to use.
    pub fn config_path(&self) -> PathBuf {
        Config::locate(self.config.as_deref())
    }
}

/// Load the config or explain why not.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

/// Have glibc give large blocks (password hashing's memory, big response
/// buffers) straight back to the kernel when freed. Its default raises the
/// mmap threshold after each such free, so the next ones come from the
/// per-thread heaps and stay resident: after a burst of Argon2 logins a
/// daemon would keep gigabytes it no longer uses.
fn return_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// How long an idle blocking thread stays: tokio's 10 s would keep the
/// threads of a burst (and the memory their allocator caches hold) well
/// after it.
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// The whole `main` of a daemon: run `setup` first, on this one thread
/// (load the config, bind ports, read keys, drop privileges: the
/// per-thread `no_new_privs` must be set before any other thread exists),
/// then `body` with its result on a tokio runtime with `threads` worker
/// threads (0: one per core). An error from either becomes a message on
/// stderr and exit status 1.
pub fn main<S, F, Fut, E>(
    program: &str,
    threads: usize,
    setup: impl FnOnce() -> Result<S, E>,
    body: F,
) -> std::process::ExitCode
where
    F: FnOnce(S) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    return_large_allocations();
    // Spool files, Maildirs and their state files are for the daemons'
    // own user and group only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o007));
    let fail = |e: E| {
        // The alternate form of anyhow's errors shows the context chain.
        eprintln!("{program}: {e:#}");
        std::process::ExitCode::FAILURE
    };
    let state = match setup() {
        Ok(state) => state,
        Err(e) => return fail(e),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE);
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(body(state)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Parse the command line, load the config and start logging as `program`.
pub fn start(program: &'static str) -> Result<(PathBuf, Config), ConfigError> {
    let args = DaemonArgs::parse();
    let path = args.config_path();
    let config = load_config(&path)?;
    crate::logging::init(program, &config.log.level);
    Ok((path, config))
}

/// Why a network daemon could not get ready.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("loading users, aliases and domains: {0}")]
    Tables(#[from] TableError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
}

/// What a network daemon has once it is ready to serve: done as root if
/// started as root, then privileges dropped.
pub struct Prepared<K> {
    pub config_path: PathBuf,
    pub config: Config,
    pub directory: DirectoryCache,
    pub tls: TlsAcceptor,
    /// Each bound listener with the kind of service it is for.
    pub listeners: Vec<(std::net::TcpListener, K)>,
}

/// The start of a network daemon, run as `daemon::main`'s setup: read the
/// config, the tables and the TLS key, bind the listeners `endpoints`
/// names, then drop to `role`'s user (design.md: all before reading a
/// byte from the network).
pub fn prepare<K>(
    program: &'static str,
    role: Role,
    endpoints: impl FnOnce(&Config) -> Vec<(SocketAddr, K)>,
) -> Result<Prepared<K>, PrepareError> {
    let (config_path, config) = start(program)?;
    let directory = DirectoryCache::new(&config)?;
    let tls = crate::tls::acceptor(&config.tls)?;
    let listeners = endpoints(&config)
        .into_iter()
        .map(|(addr, kind)| match crate::net::bind_listener(addr) {
            Ok(listener) => Ok((listener, kind)),
            Err(source) => Err(PrepareError::Listen { addr, source }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop_privileges(&config, role)?;
    Ok(Prepared {
        config_path,
        config,
        directory,
        tls,
        listeners,
    })
}

/// Signals a daemon reacts to.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// What arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT: stop.
    Stop,
    /// SIGHUP: reload.
    Reload,
}

impl Signals {
    /// Install the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Wait for the next signal.
    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.term.recv() => SignalEvent::Stop,
            _ = self.int.recv() => SignalEvent::Stop,
            _ = self.hup.recv() => SignalEvent::Reload,
        }
    }
}

/// A shutdown flag: the sender side stays with main, receivers go to tasks.
pub fn shutdown_channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}
