//! `imapload`: an IMAP load generator for mailsrv or any other IMAP server
//! (plain TCP; let the server accept LOGIN without TLS for the run).
//!
//! Scenarios:
//! - `select`: SELECT the mailbox `--repeat` times; time each.
//! - `fetch-envelopes`: SELECT, then `FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)`.
//! - `fetch-bodies`: SELECT, then `FETCH 1:N BODY.PEEK[]`; octets per second.
//! - `loop`: `--clients` sessions each looping login / SELECT / FETCH of the
//!   newest 10 messages (FLAGS ENVELOPE) / LOGOUT for `--seconds`.
//! - `idle-connections`: open `--connections` logged-in sessions with the
//!   mailbox selected and IDLE; report the growth of `--pid`'s resident memory.
//! - `populate`: write `--count` messages of `--size` octets straight into a
//!   Maildir's `new/` (no server involved), to set up the other scenarios.

mod client;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::client::Client;

#[derive(Parser)]
#[command(about = "IMAP load generator")]
struct Cli {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:143")]
    server: String,
    #[arg(long, default_value = "demo@example.test")]
    user: String,
    #[arg(long, default_value = "pw")]
    password: String,
    #[arg(long, default_value = "INBOX")]
    mailbox: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    Select {
        #[arg(long, default_value_t = 5)]
        repeat: u32,
    },
    FetchEnvelopes,
    FetchBodies {
        /// How many messages (from 1).
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    Loop {
        #[arg(long, default_value_t = 50)]
        clients: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    IdleConnections {
        #[arg(long, default_value_t = 1000)]
        connections: u32,
        /// Server process whose VmRSS is measured.
        #[arg(long)]
        pid: u32,
    },
    Populate {
        #[arg(long)]
        maildir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        count: u32,
        #[arg(long, default_value_t = 4096)]
        size: usize,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imapload: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where and as whom the sessions log in.
#[derive(Clone)]
struct Target {
    server: String,
    user: String,
    password: String,
    mailbox: String,
}

async fn session(t: &Target) -> Result<Client> {
    let mut c = Client::connect(&t.server).await?;
    c.login(&t.user, &t.password).await?;
    Ok(c)
}

async fn run(cli: Cli) -> Result<()> {
    let Cli {
        server,
        user,
        password,
        mailbox,
        scenario,
    } = cli;
    let target = Target {
        server,
        user,
        password,
        mailbox,
    };
    let cli = &target;
    match &scenario {
        Scenario::Populate {
            maildir,
            count,
            size,
        } => populate(maildir, *count, *size),
        Scenario::Select { repeat } => {
            let mut c = session(cli).await?;
            let mut times = Vec::new();
            let mut exists = 0;
            for _ in 0..*repeat {
                let t = Instant::now();
                exists = c.select(&cli.mailbox).await?;
                times.push(t.elapsed());
                c.command("UNSELECT").await?;
            }
            times.sort();
            println!(
                "SELECT of {exists} messages: best {:.1} ms, median {:.1} ms ({repeat} runs)",
                ms(times[0]),
                ms(times[times.len() / 2])
            );
            Ok(())
        }
        Scenario::FetchEnvelopes => {
            let mut c = session(cli).await?;
            let exists = c.select(&cli.mailbox).await?;
            let t = Instant::now();
            let r = c.command("FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)").await?;
            let elapsed = t.elapsed();
            println!(
                "FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE) of {exists} messages: {:.0} ms, {} responses, {:.1} MB, {:.0} messages/s",
                ms(elapsed),
                r.untagged,
                r.octets as f64 / 1e6,
                f64::from(exists) / elapsed.as_secs_f64()
            );
            Ok(())
        }
        Scenario::FetchBodies { count } => {
            let mut c = session(cli).await?;
            let exists = c.select(&cli.mailbox).await?;
            let n = (*count).min(exists);
            if n == 0 {
                bail!("the mailbox is empty");
            }
            let t = Instant::now();
            let r = c.command(&format!("FETCH 1:{n} BODY.PEEK[]")).await?;
            let elapsed = t.elapsed();
            println!(
                "FETCH 1:{n} BODY.PEEK[]: {:.0} ms, {:.1} MB of literals, {:.1} MB/s, {:.0} messages/s",
                ms(elapsed),
                r.literal_octets as f64 / 1e6,
                r.literal_octets as f64 / 1e6 / elapsed.as_secs_f64(),
                f64::from(n) / elapsed.as_secs_f64()
            );
            Ok(())
        }
        Scenario::Loop { clients, seconds } => {
            let deadline = Instant::now() + Duration::from_secs(*seconds);
            let cli = std::sync::Arc::new(target.clone());
            let tasks: Vec<_> = (0..*clients)
                .map(|_| {
                    let cli = cli.clone();
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            let mut c = session(&cli).await?;
                            let exists = c.select(&cli.mailbox).await?;
                            let from = exists.saturating_sub(9).max(1);
                            if exists > 0 {
                                c.command(&format!("FETCH {from}:* (FLAGS ENVELOPE)"))
                                    .await?;
                            }
                            c.command("LOGOUT").await?;
                            lat.push(t.elapsed());
                        }
                        anyhow::Ok(lat)
                    })
                })
                .collect();
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.context("client task")??);
            }
            lat.sort();
            if lat.is_empty() {
                bail!("no loop completed");
            }
            let p = |q: f64| ms(lat[((lat.len() - 1) as f64 * q) as usize]);
            println!(
                "{clients} clients, {seconds} s: {} login/select/fetch/logout loops, {:.0} loops/s, p50 {:.1} ms, p99 {:.1} ms",
                lat.len(),
                lat.len() as f64 / *seconds as f64,
                p(0.5),
                p(0.99)
            );
            Ok(())
        }
        Scenario::IdleConnections { connections, pid } => {
            let before = rss_kib(*pid)?;
            let mut open = Vec::new();
            for _ in 0..*connections {
                let mut c = session(cli).await?;
                c.select(&cli.mailbox).await?;
                c.start_idle().await?;
                open.push(c);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = rss_kib(*pid)?;
            println!(
                "{connections} idle connections: server RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
                (after as f64 - before as f64) / f64::from(*connections)
            );
            Ok(())
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Write `count` messages of about `size` octets into `maildir/new`.
fn populate(maildir: &std::path::Path, count: u32, size: usize) -> Result<()> {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub))?;
    }
    let body_line = "The quick brown fox jumps over the lazy dog, again and again.\n";
    let t = Instant::now();
    for i in 0..count {
        let mut msg = format!(
            "From: Sender {i} <sender{i}@example.org>\nTo: Receiver <demo@example.test>\n\
Subject: =?UTF-8?Q?Load_test_message_{i}?=\nDate: Sat, 21 Nov 2026 10:00:00 +0000\n\
Message-ID: <{i}.imapload@example.org>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
        );
        while msg.len() < size {
            msg.push_str(body_line);
        }
        let lines = msg.matches('\n').count();
        let name = format!(
            "1795000000.M{i}P1.imapload,S={},W={}",
            msg.len(),
            msg.len() + lines
        );
        std::fs::write(maildir.join("new").join(name), msg)?;
    }
    println!(
        "wrote {count} messages in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
