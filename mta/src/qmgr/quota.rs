//! Mailbox quotas at local delivery ([`common::quota`]): a message that
//! would take a mailbox past its limit is deferred (RFC 3463 X.2.2), and
//! the full mailboxes are listed in the spool for smtpd.

use std::path::Path;

use common::address::Address;
use common::quota::{self, FullMailboxes};
use common::recipients::Directory;

use super::Context;

/// Why a message does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub used: u64,
    pub limit: u64,
}

/// Whether `size` more bytes fit in `mailbox` (at `maildir`); keeps the
/// list of full mailboxes up to date either way.
pub fn check(
    ctx: &Context,
    dir: &Directory,
    mailbox: &Address,
    maildir: &Path,
    size: u64,
) -> std::io::Result<Result<(), Full>> {
    let Some(limit) = dir.users.quota(mailbox) else {
        return Ok(Ok(()));
    };
    let used = quota::usage(maildir)?.bytes;
    // Listed for smtpd only when nothing more fits at all: one message
    // too big for the room left must not turn the small ones away.
    let full = used >= limit;
    if let Err(e) = ctx.full_mailboxes.set(&mailbox.to_string(), full) {
        tracing::warn!("cannot update {}: {e}", ctx.full_mailboxes.path().display());
    }
    Ok(if used.saturating_add(size) > limit {
        Err(Full { used, limit })
    } else {
        Ok(())
    })
}

/// Take off the list the mailboxes that have room again (their users
/// deleted mail, or their limit was raised or removed): run every minute.
pub fn recheck_full(ctx: &Context, full: &FullMailboxes) {
    let Ok(listed) = full.read() else {
        return;
    };
    if listed.is_empty() {
        return;
    }
    let dir = ctx.directory.current().0;
    for address in listed {
        let room = match Address::parse(&address) {
            Err(_) => true,
            Ok(a) => match dir.users.quota(&a) {
                None => true,
                Some(limit) => common::userdb::maildir_path(&ctx.mail_root, &a)
                    .ok()
                    .and_then(|m| quota::usage(&m).ok())
                    .is_some_and(|u| u.bytes < limit),
            },
        };
        if room {
            if let Err(e) = full.set(&address, false) {
                tracing::warn!("cannot update {}: {e}", full.path().display());
            }
        }
    }
}
