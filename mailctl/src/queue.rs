//! `mailctl queue`: see and steer the mail queue, safely while qmgr runs.
//!
//! Every change is one rename of an envelope between state directories
//! (or its removal), so it either happens whole or not at all; qmgr finds
//! entries renamed into `incoming/` at once (inotify) and skips entries
//! that left `deferred/` before their retry. An entry in `active/` is
//! being delivered and is not touched.

use std::io::Read;

use anyhow::{bail, Context};
use clap::Subcommand;
use common::config::Config;
use common::queue_id::is_queue_id;
use common::spool::{Envelope, QueueState, RecipientStatus, Spool};

/// Most header bytes `show` prints.
const MAX_SHOWN_HEADER: u64 = 64 * 1024;

/// `mailctl queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages with their recipients and last errors
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one message's envelope and headers
    Show { id: String },
    /// Retry deferred messages now (all, or the ones named)
    Flush { ids: Vec<String> },
    /// Delete messages without delivering them or telling the sender
    Delete {
        ids: Vec<String>,
        /// Every queued message
        #[arg(long, conflicts_with_all = ["ids", "from", "to"])]
        all: bool,
        /// Every message from this sender (`<>` or an empty string: bounces)
        #[arg(long, conflicts_with = "ids")]
        from: Option<String>,
        /// Every message with this recipient
        #[arg(long, conflicts_with = "ids")]
        to: Option<String>,
    },
    /// Keep messages from delivery until released
    Hold {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Release held messages for delivery now
    Release {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Put messages (deferred, held or set aside as corrupt) back for
    /// delivery now
    Requeue {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// The states `list` shows, in order.
const LISTED: [QueueState; 6] = [
    QueueState::Maildrop,
    QueueState::Incoming,
    QueueState::Active,
    QueueState::Deferred,
    QueueState::Hold,
    QueueState::Corrupt,
];

/// Run a queue command.
pub fn queue(config: &Config, cmd: QueueCommand) -> anyhow::Result<()> {
    let spool = Spool::new(&config.paths.spool);
    // Ids become paths: only queue ids.
    let named: &[String] = match &cmd {
        QueueCommand::Show { id } => std::slice::from_ref(id),
        QueueCommand::Flush { ids }
        | QueueCommand::Delete { ids, .. }
        | QueueCommand::Hold { ids }
        | QueueCommand::Release { ids }
        | QueueCommand::Requeue { ids } => ids,
        QueueCommand::List { .. } => &[],
    };
    if let Some(bad) = named.iter().find(|id| !is_queue_id(id)) {
        bail!("`{bad}` is not a queue id (16 letters and digits, as `mailctl queue list` shows)");
    }
    match cmd {
        QueueCommand::List { json } => list(&spool, json),
        QueueCommand::Show { id } => show(&spool, &id),
        QueueCommand::Flush { ids } => {
            let ids = if ids.is_empty() {
                spool.list(QueueState::Deferred)?
            } else {
                ids
            };
            let n = move_each(&spool, &ids, &[QueueState::Deferred], QueueState::Incoming)?;
            println!("{n} message(s) queued for delivery now");
            Ok(())
        }
        QueueCommand::Delete { ids, all, from, to } => delete(&spool, ids, all, from, to),
        QueueCommand::Hold { ids } => {
            let from = [QueueState::Incoming, QueueState::Deferred];
            let n = move_each(&spool, &ids, &from, QueueState::Hold)?;
            println!("{n} message(s) held");
            Ok(())
        }
        QueueCommand::Release { ids } => {
            let n = move_each(&spool, &ids, &[QueueState::Hold], QueueState::Incoming)?;
            println!("{n} message(s) released");
            Ok(())
        }
        QueueCommand::Requeue { ids } => {
            let from = [QueueState::Deferred, QueueState::Hold, QueueState::Corrupt];
            let n = move_each(&spool, &ids, &from, QueueState::Incoming)?;
            println!("{n} message(s) requeued");
            Ok(())
        }
    }
}

/// One queue entry as `list` sees it.
struct Entry {
    id: String,
    state: QueueState,
    /// None when the envelope cannot be read.
    envelope: Option<Envelope>,
}

fn entries(spool: &Spool) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for state in LISTED {
        for id in spool.list(state)? {
            // An entry may move on while we look; that is not an error.
            let envelope = spool.read_envelope(state, &id).ok();
            if envelope.is_none() && spool.locate(&id) != Some(state) {
                continue;
            }
            out.push(Entry {
                id,
                state,
                envelope,
            });
        }
    }
    Ok(out)
}

fn list(spool: &Spool, json: bool) -> anyhow::Result<()> {
    let entries = entries(spool)?;
    if json {
        let items: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
        println!("{}", serde_json::Value::Array(items));
        return Ok(());
    }
    if entries.is_empty() {
        println!("Mail queue is empty");
        return Ok(());
    }
    println!(
        "{:<16}  {:>9}  {:<19}  {:<8}  SENDER / RECIPIENTS",
        "ID", "SIZE", "ARRIVAL (UTC)", "STATE"
    );
    let mut bytes = 0;
    for e in &entries {
        let Some(env) = &e.envelope else {
            // Maildrop files have their own format until qmgr picks them up.
            let what = if e.state == QueueState::Maildrop {
                "(from sendmail, waiting for qmgr)"
            } else {
                "(unreadable envelope)"
            };
            println!(
                "{:<16}  {:>9}  {:<19}  {:<8}  {what}",
                e.id,
                "-",
                "-",
                state_name(e.state)
            );
            continue;
        };
        bytes += env.size;
        println!(
            "{:<16}  {:>9}  {:<19}  {:<8}  <{}>",
            e.id,
            env.size,
            format_time(env.arrival),
            state_name(e.state),
            env.sender
        );
        for r in &env.recipients {
            let status = match r.status {
                RecipientStatus::Unresolved | RecipientStatus::Pending => "pending",
                RecipientStatus::Delivered => "delivered",
                RecipientStatus::Failed => "failed",
            };
            let error = r
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!(
                "{:<59}  {} ({status}, {} attempt(s)){error}",
                "", r.address, r.attempts
            );
        }
    }
    println!(
        "-- {} KiB in {} message(s)",
        bytes.div_ceil(1024),
        entries.len()
    );
    Ok(())
}

fn entry_json(e: &Entry) -> serde_json::Value {
    let mut v = serde_json::json!({ "id": e.id, "state": state_name(e.state) });
    if let Some(env) = &e.envelope {
        v["size"] = env.size.into();
        v["arrival"] = env.arrival.into();
        v["sender"] = env.sender.clone().into();
        v["attempts"] = env.attempts.into();
        v["next_try"] = env.next_try.into();
        v["recipients"] = serde_json::to_value(&env.recipients).unwrap_or_default();
    } else {
        v["error"] = "unreadable envelope".into();
    }
    v
}

fn state_name(state: QueueState) -> &'static str {
    state.dir_name()
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn format_time(unix: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn show(spool: &Spool, id: &str) -> anyhow::Result<()> {
    let state = spool
        .locate(id)
        .with_context(|| format!("no message {id} in the queue"))?;
    let envelope = spool.read_envelope(state, id)?;
    println!("state: {}", state_name(state));
    println!("{}", serde_json::to_string_pretty(&envelope)?);
    println!();
    let mut head = Vec::new();
    spool
        .open_data(id)?
        .take(MAX_SHOWN_HEADER)
        .read_to_end(&mut head)
        .with_context(|| format!("reading the message of {id}"))?;
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(head.len());
    // The header comes from the internet: no control sequences reach the
    // admin's terminal.
    let shown: String = String::from_utf8_lossy(&head[..end])
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect();
    print!("{shown}");
    Ok(())
}

/// Move each of `ids` that is in one of the states `from` to `to`;
/// returns how many moved. An id that is being delivered, or not in the
/// queue, is reported and the others still move; the command fails if
/// any id could not be moved.
fn move_each(
    spool: &Spool,
    ids: &[String],
    from: &[QueueState],
    to: QueueState,
) -> anyhow::Result<usize> {
    let mut moved = 0;
    let mut failed = 0;
    for id in ids {
        match spool.locate(id) {
            Some(state) if from.contains(&state) => match spool.move_entry(id, state, to) {
                Ok(()) => moved += 1,
                Err(e) => {
                    eprintln!("{id}: {e}");
                    failed += 1;
                }
            },
            Some(QueueState::Active) => {
                eprintln!("{id}: being delivered now; try again in a moment");
                failed += 1;
            }
            Some(state) => {
                eprintln!("{id}: is {}, not {}", state_name(state), names(from));
                failed += 1;
            }
            None => {
                eprintln!("{id}: no such message in the queue");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} message(s) not changed", ids.len());
    }
    Ok(moved)
}

fn names(states: &[QueueState]) -> String {
    states
        .iter()
        .map(|s| state_name(*s))
        .collect::<Vec<_>>()
        .join(" or ")
}

fn delete(
    spool: &Spool,
    ids: Vec<String>,
    all: bool,
    from: Option<String>,
    to: Option<String>,
) -> anyhow::Result<()> {
    let selected: Vec<String> = if all || from.is_some() || to.is_some() {
        let sender = from.map(|f| f.trim_matches(['<', '>']).to_lowercase());
        let recipient = to.map(|t| t.trim_matches(['<', '>']).to_lowercase());
        entries(spool)?
            .into_iter()
            .filter(|e| e.state != QueueState::Active)
            .filter(|e| match &e.envelope {
                Some(env) => {
                    sender
                        .as_ref()
                        .is_none_or(|s| env.sender.to_lowercase() == *s)
                        && recipient.as_ref().is_none_or(|r| {
                            env.recipients.iter().any(|x| {
                                x.address.to_lowercase() == *r
                                    || x.original
                                        .as_deref()
                                        .is_some_and(|o| o.to_lowercase() == *r)
                            })
                        })
                }
                // An unreadable entry matches only --all.
                None => sender.is_none() && recipient.is_none(),
            })
            .map(|e| e.id)
            .collect()
    } else if ids.is_empty() {
        bail!("name the messages to delete, or give --all, --from or --to");
    } else {
        ids
    };
    let mut deleted = 0;
    let mut failed = 0;
    for id in &selected {
        match spool.locate(id) {
            Some(QueueState::Active) => {
                eprintln!("{id}: being delivered now; try again in a moment");
                failed += 1;
            }
            Some(state) => match spool.remove(id, state) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    eprintln!("{id}: {e}");
                    failed += 1;
                }
            },
            None => {
                eprintln!("{id}: no such message in the queue");
                failed += 1;
            }
        }
    }
    println!("{deleted} message(s) deleted");
    if failed > 0 {
        bail!("{failed} of {} message(s) not deleted", selected.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_795_302_181), "2026-11-21 23:03:01");
    }
}
