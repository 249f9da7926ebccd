//! What qmgr does at start to pick up after a crash.

use std::collections::HashMap;
use std::path::Path;

use common::maildir;
use common::spool::QueueState;

use super::Context;

/// Data files younger than this may belong to a session still receiving.
const ORPHAN_MIN_AGE_SECS: u64 = 3600;

/// Put entries a crash left in `active/` back in `incoming/`, remove
/// orphaned spool files and our own unfinished Maildir deliveries, and
/// return the deferred entries with their due times.
pub fn recover(ctx: &Context) -> HashMap<String, u64> {
    let spool = &ctx.spool;
    match spool.list(QueueState::Active) {
        Ok(ids) => {
            for id in ids {
                match spool.move_entry(&id, QueueState::Active, QueueState::Incoming) {
                    Ok(()) => tracing::info!("{id}: recovered from an interrupted delivery"),
                    Err(e) => tracing::error!("{id}: cannot recover: {e}"),
                }
            }
        }
        Err(e) => tracing::error!("cannot read the active queue: {e}"),
    }
    match spool.remove_orphans(ORPHAN_MIN_AGE_SECS) {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} orphaned spool files"),
        Err(e) => tracing::error!("cannot clean the spool: {e}"),
    }
    let cleaned = clean_maildir_leftovers(&ctx.mail_root);
    if cleaned > 0 {
        tracing::info!("removed {cleaned} unfinished Maildir deliveries");
    }
    let mut deferred = HashMap::new();
    match spool.list(QueueState::Deferred) {
        Ok(ids) => {
            for id in ids {
                match spool.read_envelope(QueueState::Deferred, &id) {
                    Ok(env) => {
                        deferred.insert(id, env.next_try);
                    }
                    Err(e) => {
                        tracing::error!(
                            "{id}: unreadable deferred envelope, moved to corrupt: {e}"
                        );
                        let _ = spool.move_entry(&id, QueueState::Deferred, QueueState::Corrupt);
                    }
                }
            }
        }
        Err(e) => tracing::error!("cannot read the deferred queue: {e}"),
    }
    deferred
}

/// Walk `<mail_root>/<domain>/<user>/` and each Maildir++ folder; only qmgr
/// writes `*.delivering` files and only one qmgr runs, so every one found
/// now is a leftover.
fn clean_maildir_leftovers(mail_root: &Path) -> usize {
    let mut removed = 0;
    for domain in subdirs(mail_root) {
        for user in subdirs(&domain) {
            removed += maildir::clean_tmp(&user, true).unwrap_or(0);
            for folder in subdirs(&user) {
                let is_folder = folder
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if is_folder {
                    removed += maildir::clean_tmp(&folder, true).unwrap_or(0);
                }
            }
        }
    }
    removed
}

fn subdirs(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}
