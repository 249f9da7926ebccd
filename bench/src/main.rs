//! `loadgen`: an SMTP load generator for mailsrv or any other SMTP server.
//!
//! N concurrent sessions share M messages; each session sends K messages
//! per connection, then QUITs and reconnects. Connections may use TLS
//! (STARTTLS or implicit) and log in with AUTH PLAIN, as mail clients
//! submitting mail do. It reports how many messages were accepted or
//! refused, the throughput, the latency from the end of the data to the 250
//! reply, the time each connection took to set up (with the TLS handshake
//! and AUTH separately) and, with `--maildir-glob`, how many messages
//! reached the Maildirs and how fast. Exit status 1 when any message was
//! refused, not sent, or not delivered.

mod cli;
mod maildir;
mod message;
mod report;
mod session;
mod smtp;
mod stats;
mod tls;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use crate::cli::Cli;
use crate::maildir::MaildirWatch;
use crate::message::MessageTemplate;
use crate::report::{Delivery, Report};
use crate::session::Job;
use crate::stats::{Percentiles, Stats};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the load and prints the report; returns whether the run succeeded.
async fn run(cli: Cli) -> Result<bool> {
    let addr = resolve(&cli.server).await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?;
    let run_id = format!("{}-{}", now.as_secs(), std::process::id());
    let size = usize::try_from(cli.size).context("--size")?;
    let template = MessageTemplate::new(&run_id, &cli.from, &cli.to, now.as_secs(), size);
    let watch = cli
        .maildir_glob
        .as_deref()
        .map(MaildirWatch::start)
        .transpose()?;

    let job = Arc::new(Job::new(&cli, addr, template)?);
    let start = Instant::now();
    let sessions: Vec<_> = (0..cli.sessions.min(cli.messages))
        .map(|_| tokio::spawn(session::run(Arc::clone(&job))))
        .collect();
    let mut stats = Stats::default();
    for session in sessions {
        stats.merge(session.await.context("session task")?);
    }
    let elapsed = start.elapsed();
    if stats.connections == 0 {
        let why = stats
            .errors
            .distinct
            .first()
            .map_or("no session started", |(text, _)| text.as_str());
        bail!(
            "cannot establish an SMTP session with {}: {why}",
            cli.server
        );
    }

    let delivery = match watch {
        Some(watch) => {
            let expected = cli.expect_files.unwrap_or(stats.deliveries);
            let timeout = cli.delivery_timeout();
            eprintln!(
                "loadgen: sent; waiting up to {} s for {expected} delivered files",
                timeout.as_secs()
            );
            let progress = tokio::task::spawn_blocking(move || watch.finish(expected, timeout))
                .await
                .context("maildir watcher")??;
            Some(Delivery {
                expected,
                delivered: progress.delivered,
                elapsed: progress
                    .last_seen
                    .map(|t| t.saturating_duration_since(start)),
            })
        }
        None => None,
    };

    let latency = Percentiles::of(&mut stats.latencies);
    let setup = Percentiles::of(&mut stats.setup_times);
    let tls_handshake = Percentiles::of(&mut stats.tls_handshakes);
    let auth = Percentiles::of(&mut stats.auth_times);
    let report = Report {
        cli: &cli,
        run_id: &run_id,
        stats: &stats,
        elapsed,
        latency,
        setup,
        tls_handshake,
        auth,
        delivery,
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    Ok(report.success())
}

/// The first address `server` (HOST:PORT) resolves to.
async fn resolve(server: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("--server {server:?}: cannot resolve"))?
        .next()
        .ok_or_else(|| anyhow!("--server {server:?}: no address"))
}
