//! `imapload`: an IMAP and POP3 load generator for mailsrv or any other
//! server (LOGIN / USER+PASS; plain TCP, or TLS from the connect with
//! `--tls`, which accepts any certificate).
//!
//! Scenarios:
//! - `select`: SELECT the mailbox `--repeat` times; time each.
//! - `fetch-envelopes`: SELECT, then `FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)`
//!   `--repeat` times.
//! - `fetch-bodies`: SELECT, then `FETCH 1:N BODY.PEEK[]`; octets per second.
//! - `search`: SELECT, then `UID SEARCH <criteria>` `--repeat` times.
//! - `loop`: `--clients` sessions each looping login / SELECT / FETCH of the
//!   newest 10 messages (FLAGS ENVELOPE) / LOGOUT for `--seconds`.
//! - `idle-connections`: open `--connections` logged-in sessions with the
//!   mailbox selected and IDLE; report the growth of `--pid`'s resident
//!   memory, or with `--hold` say when they are open and keep them until
//!   standard input ends, so the caller can measure the server.
//! - `pop3`: STAT, UIDL and RETR of the first `--count` messages, one at a
//!   time and pipelined, against a POP3 server.
//! - `populate`: write `--count` messages of `--size` octets straight into a
//!   Maildir's `new/` (no server involved), to set up the other scenarios.
//!
//! With `--json` each scenario prints one JSON object instead of a sentence.

mod client;
mod pop3;
mod stream;
#[path = "../tls.rs"]
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use crate::client::Client;
use crate::pop3::Pop3;
use crate::tls::TlsClient;

/// Read buffer of a bulk session; idle connections get a small one.
const BULK_BUFFER: usize = 256 * 1024;
const IDLE_BUFFER: usize = 4096;
/// Logins in flight at once while opening idle connections.
const OPEN_CONCURRENCY: usize = 64;

#[derive(Parser)]
#[command(about = "IMAP and POP3 load generator")]
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
    /// TLS from the connect (port 993); any certificate is accepted.
    #[arg(long)]
    tls: bool,
    /// One JSON object per scenario instead of a sentence.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    Select {
        #[arg(long, default_value_t = 5)]
        repeat: u32,
    },
    FetchEnvelopes {
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    FetchBodies {
        /// How many messages (from 1).
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    Search {
        /// The criteria after `UID SEARCH`, e.g. `HEADER Subject "x"` or `BODY "x"`.
        #[arg(long)]
        criteria: String,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
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
        #[arg(long, required_unless_present = "hold")]
        pid: Option<u32>,
        /// Print when the connections are open and hold them until
        /// standard input ends.
        #[arg(long)]
        hold: bool,
    },
    Pop3 {
        /// How many messages to RETR (from 1), each way.
        #[arg(long, default_value_t = 10_000)]
        count: u32,
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
struct Target {
    server: String,
    user: String,
    password: String,
    mailbox: String,
    tls: Option<TlsClient>,
}

impl Target {
    async fn session(&self, buffer: usize) -> Result<Client> {
        let mut c = Client::connect(&self.server, self.tls.as_ref(), buffer).await?;
        c.login(&self.user, &self.password).await?;
        Ok(c)
    }
}

/// Prints a scenario's result: `value` with `--json`, else `sentence`.
struct Output {
    json: bool,
}

impl Output {
    fn print(&self, scenario: &str, mut value: Value, sentence: String) {
        if self.json {
            value["scenario"] = json!(scenario);
            println!("{value}");
        } else {
            println!("{sentence}");
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let tls = cli
        .tls
        .then(|| TlsClient::insecure(&cli.server))
        .transpose()?;
    let target = Arc::new(Target {
        server: cli.server,
        user: cli.user,
        password: cli.password,
        mailbox: cli.mailbox,
        tls,
    });
    let out = Output { json: cli.json };
    let t = &*target;
    match cli.scenario {
        Scenario::Populate {
            maildir,
            count,
            size,
        } => populate(&maildir, count, size),
        Scenario::Select { repeat } => {
            let mut c = t.session(BULK_BUFFER).await?;
            let mut times = Vec::new();
            let mut exists = 0;
            for _ in 0..repeat.max(1) {
                let start = Instant::now();
                exists = c.select(&t.mailbox).await?;
                times.push(start.elapsed());
                c.command("UNSELECT").await?;
            }
            let (first, best, median) = summary(&times);
            out.print(
                "select",
                json!({"exists": exists, "first_ms": first, "best_ms": best, "median_ms": median}),
                format!(
                    "SELECT of {exists} messages: first {first:.1} ms, best {best:.1} ms, median {median:.1} ms ({repeat} runs)"
                ),
            );
            Ok(())
        }
        Scenario::FetchEnvelopes { repeat } => {
            let mut c = t.session(BULK_BUFFER).await?;
            let exists = c.select(&t.mailbox).await?;
            let mut times = Vec::new();
            let mut octets = 0;
            for _ in 0..repeat.max(1) {
                let start = Instant::now();
                let r = c.command("FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)").await?;
                times.push(start.elapsed());
                octets = r.octets;
            }
            let (first, best, _) = summary(&times);
            out.print(
                "fetch-envelopes",
                json!({"exists": exists, "first_ms": first, "best_ms": best, "octets": octets}),
                format!(
                    "FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE) of {exists} messages: first {first:.0} ms, best {best:.0} ms, {:.1} MB",
                    octets as f64 / 1e6
                ),
            );
            Ok(())
        }
        Scenario::FetchBodies { count } => {
            let mut c = t.session(BULK_BUFFER).await?;
            let exists = c.select(&t.mailbox).await?;
            let n = count.min(exists);
            if n == 0 {
                bail!("the mailbox is empty");
            }
            let start = Instant::now();
            let r = c.command(&format!("FETCH 1:{n} BODY.PEEK[]")).await?;
            let elapsed = start.elapsed().as_secs_f64();
            let mb = r.literal_octets as f64 / 1e6;
            out.print(
                "fetch-bodies",
                json!({"messages": n, "ms": elapsed * 1000.0, "mb": mb, "mb_s": mb / elapsed,
                       "messages_s": f64::from(n) / elapsed}),
                format!(
                    "FETCH 1:{n} BODY.PEEK[]: {:.0} ms, {mb:.1} MB of literals, {:.1} MB/s, {:.0} messages/s",
                    elapsed * 1000.0,
                    mb / elapsed,
                    f64::from(n) / elapsed
                ),
            );
            Ok(())
        }
        Scenario::Search { criteria, repeat } => {
            let mut c = t.session(BULK_BUFFER).await?;
            let exists = c.select(&t.mailbox).await?;
            let mut times = Vec::new();
            for _ in 0..repeat.max(1) {
                c.search_hits = 0;
                let start = Instant::now();
                c.command(&format!("UID SEARCH {criteria}")).await?;
                times.push(start.elapsed());
            }
            let (first, best, _) = summary(&times);
            let hits = c.search_hits;
            out.print(
                "search",
                json!({"exists": exists, "criteria": criteria, "hits": hits,
                       "first_ms": first, "best_ms": best}),
                format!(
                    "UID SEARCH {criteria} over {exists} messages: {hits} hits, first {first:.1} ms, best {best:.1} ms"
                ),
            );
            Ok(())
        }
        Scenario::Loop { clients, seconds } => {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let t = Arc::clone(&target);
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        while Instant::now() < deadline {
                            let start = Instant::now();
                            let mut c = t.session(IDLE_BUFFER).await?;
                            let exists = c.select(&t.mailbox).await?;
                            let from = exists.saturating_sub(9).max(1);
                            if exists > 0 {
                                c.command(&format!("FETCH {from}:* (FLAGS ENVELOPE)"))
                                    .await?;
                            }
                            c.command("LOGOUT").await?;
                            lat.push(start.elapsed());
                        }
                        anyhow::Ok(lat)
                    })
                })
                .collect();
            let mut lat = Vec::new();
            for task in tasks {
                lat.extend(task.await.context("client task")??);
            }
            lat.sort();
            if lat.is_empty() {
                bail!("no loop completed");
            }
            let p = |q: f64| ms(lat[((lat.len() - 1) as f64 * q) as usize]);
            let rate = lat.len() as f64 / seconds as f64;
            out.print(
                "loop",
                json!({"clients": clients, "seconds": seconds, "loops": lat.len(),
                       "loops_s": rate, "p50_ms": p(0.5), "p99_ms": p(0.99)}),
                format!(
                    "{clients} clients, {seconds} s: {} login/select/fetch/logout loops, {rate:.0} loops/s, p50 {:.1} ms, p99 {:.1} ms",
                    lat.len(),
                    p(0.5),
                    p(0.99)
                ),
            );
            Ok(())
        }
        Scenario::IdleConnections {
            connections,
            pid,
            hold,
        } => idle_connections(&target, &out, connections, pid, hold).await,
        Scenario::Pop3 { count } => {
            let mut c = Pop3::login(&t.server, &t.user, &t.password).await?;
            let start = Instant::now();
            let (messages, _) = c.stat().await?;
            let stat = ms(start.elapsed());
            let start = Instant::now();
            let listed = c.uidl().await?;
            let uidl = ms(start.elapsed());
            let n = count.min(u32::try_from(messages).unwrap_or(u32::MAX));
            if n == 0 {
                bail!("the maildrop is empty");
            }
            let mut rates = Vec::new();
            for pipelined in [false, true] {
                let start = Instant::now();
                let octets = c.retr(n, pipelined).await?;
                let elapsed = start.elapsed().as_secs_f64();
                rates.push((f64::from(n) / elapsed, octets as f64 / 1e6 / elapsed));
            }
            c.quit().await?;
            out.print(
                "pop3",
                json!({"messages": messages, "uidl_lines": listed, "stat_ms": stat, "uidl_ms": uidl,
                       "retr": n, "retr_messages_s": rates[0].0, "retr_mb_s": rates[0].1,
                       "pipelined_messages_s": rates[1].0, "pipelined_mb_s": rates[1].1}),
                format!(
                    "POP3 of {messages} messages: STAT {stat:.1} ms, UIDL {uidl:.1} ms, RETR of {n}: {:.0} messages/s ({:.1} MB/s), pipelined {:.0} messages/s ({:.1} MB/s)",
                    rates[0].0, rates[0].1, rates[1].0, rates[1].1
                ),
            );
            Ok(())
        }
    }
}

/// Open `connections` sessions, each logged in with the mailbox selected
/// and in IDLE, at most `OPEN_CONCURRENCY` logins at a time.
async fn idle_connections(
    target: &Arc<Target>,
    out: &Output,
    connections: u32,
    pid: Option<u32>,
    hold: bool,
) -> Result<()> {
    let before = pid.map(rss_kib).transpose()?;
    let start = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let t = Arc::clone(target);
            let limit = Arc::clone(&limit);
            tokio::spawn(async move {
                let _permit = limit.acquire().await?;
                let mut c = t.session(IDLE_BUFFER).await?;
                c.select(&t.mailbox).await?;
                c.start_idle().await?;
                anyhow::Ok(c)
            })
        })
        .collect();
    let mut open = Vec::with_capacity(tasks.len());
    for task in tasks {
        open.push(task.await.context("connection task")??);
    }
    let opening = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    if hold {
        out.print(
            "idle-open",
            json!({"connections": connections, "open_s": opening}),
            format!("{connections} connections open in IDLE after {opening:.1} s; close standard input to close them"),
        );
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while lines.next_line().await?.is_some() {}
        drop(open);
        out.print(
            "idle-closed",
            json!({"connections": connections}),
            "closed".into(),
        );
        return Ok(());
    }
    if let (Some(pid), Some(before)) = (pid, before) {
        let after = rss_kib(pid)?;
        let per = (after as f64 - before as f64) / f64::from(connections);
        out.print(
            "idle-connections",
            json!({"connections": connections, "rss_before_kib": before, "rss_after_kib": after,
                   "kib_per_connection": per}),
            format!(
                "{connections} idle connections: server RSS {before} KiB -> {after} KiB, {per:.1} KiB per connection"
            ),
        );
    }
    Ok(())
}

/// (first, best, median) of `times`, in milliseconds.
fn summary(times: &[Duration]) -> (f64, f64, f64) {
    let mut sorted = times.to_vec();
    sorted.sort();
    (ms(times[0]), ms(sorted[0]), ms(sorted[sorted.len() / 2]))
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
Message-ID: <{i}.imapload@example.org>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n\
This is message {i}, marked xq{i}z for searches.\n"
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
