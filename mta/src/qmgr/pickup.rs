//! Pickup: maildrop files written by `sendmail` become queue entries
//! (common::maildrop). The file is untrusted: it is checked, its message
//! gets CRLF line ends and our `Received:` header, and the entry is made
//! the way smtpd makes one (data fsynced, envelope renamed into
//! `incoming/`, directories fsynced) before the maildrop file goes.

use std::io::Read;

use common::address::Address;
use common::maildrop::{self, DropEnvelope};
use common::spool::{unix_now, ClientInfo, Envelope, EsmtpParams, QueueState, Recipient};
use std::io::Write;

use super::Context;

/// Take every complete maildrop file.
pub fn pickup_all(ctx: &Context) {
    let ids = match ctx.spool.list(QueueState::Maildrop) {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!("cannot read the maildrop: {e}");
            return;
        }
    };
    for id in ids {
        match pickup(ctx, &id) {
            Ok(()) => {}
            Err(Failed::Bad(reason)) => {
                // The reason quotes the file, which its writer chose.
                let reason = common::login::loggable(&reason);
                tracing::warn!("{id}: maildrop file set aside in corrupt/: {reason}");
                let _ = ctx
                    .spool
                    .move_entry(&id, QueueState::Maildrop, QueueState::Corrupt);
            }
            // Kept for the next pickup (next maildrop file, or restart).
            Err(Failed::Local(reason)) => {
                tracing::error!("{id}: cannot queue from the maildrop now: {reason}");
            }
        }
    }
}

/// Why a maildrop file was not queued.
enum Failed {
    /// The file itself is wrong: set it aside.
    Bad(String),
    /// We could not queue it (disk full, ...): try again later.
    Local(String),
}

/// Room for the magic and envelope lines beyond the message itself.
const ENVELOPE_ALLOWANCE: u64 = 2 << 20;

fn pickup(ctx: &Context, id: &str) -> Result<(), Failed> {
    let local = |e: &dyn std::fmt::Display| Failed::Local(e.to_string());
    let spool = &ctx.spool;
    let path = spool.envelope_path(QueueState::Maildrop, id);
    if spool.locate(id).is_some_and(|s| s != QueueState::Maildrop) {
        // Queued before a crash cut the pickup short.
        remove_drop(ctx, id);
        return Ok(());
    }
    let mut bytes = Vec::new();
    // sendmail applies max_message_size to the message; this bounds memory.
    let limit = ctx.max_message_size + ENVELOPE_ALLOWANCE;
    let file = common::safeio::open_regular(&path).map_err(|e| Failed::Bad(e.to_string()))?;
    // Who wrote it is the file's owner, not what the file says.
    let owner = std::os::unix::fs::MetadataExt::uid(
        &file.metadata().map_err(|e| Failed::Bad(e.to_string()))?,
    );
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failed::Bad(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(Failed::Bad(format!(
            "larger than {} bytes",
            ctx.max_message_size
        )));
    }
    let (mut drop, message) = maildrop::decode(&bytes).map_err(|e| Failed::Bad(e.to_string()))?;
    drop.uid = owner;
    if drop.recipients.len() > ctx.max_recipients {
        return Err(Failed::Bad(format!(
            "{} recipients, more than smtpd.max_recipients",
            drop.recipients.len()
        )));
    }
    let envelope = envelope(id, &drop).map_err(Failed::Bad)?;
    let data = crlf_message(&ctx.hostname, id, &drop, message);
    // A data file without an envelope is what a crash mid-pickup leaves.
    spool.discard(id);
    let mut file = spool.create_data(id).map_err(|e| local(&e))?;
    if let Err(e) = file.write_all(&data).and_then(|()| file.sync_all()) {
        spool.discard(id);
        return Err(local(&e));
    }
    let envelope = Envelope {
        size: data.len() as u64,
        // Signed once here, so every retry sends the same signature.
        // Local programs are trusted with any From, as relay networks are.
        added_headers: ctx.signers.sign(&data, |_| true),
        ..envelope
    };
    if let Err(e) = spool
        .commit(&envelope)
        .and_then(|()| spool.sync_new_entries())
    {
        let _ = std::fs::remove_file(spool.envelope_path(QueueState::Incoming, id));
        spool.discard(id);
        return Err(local(&e));
    }
    tracing::info!(
        "{id}: uid={}, from=<{}>, size={}, nrcpt={} (queued by sendmail)",
        drop.uid,
        envelope.sender,
        envelope.size,
        envelope.recipients.len()
    );
    remove_drop(ctx, id);
    Ok(())
}

fn remove_drop(ctx: &Context, id: &str) {
    let path = ctx.spool.envelope_path(QueueState::Maildrop, id);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::error!("{id}: cannot remove {}: {e}", path.display());
    }
}

/// The queue envelope for a checked maildrop envelope.
fn envelope(id: &str, drop: &DropEnvelope) -> Result<Envelope, String> {
    if !drop.sender.is_empty() {
        Address::parse(&drop.sender).map_err(|e| format!("sender <{}>: {e}", drop.sender))?;
    }
    let mut recipients: Vec<Recipient> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in &drop.recipients {
        let address = Address::parse(r).map_err(|e| format!("recipient <{r}>: {e}"))?;
        if seen.insert(address.key()) {
            recipients.push(Recipient::new(address.to_string(), None));
        }
    }
    let utf8 = !drop.sender.is_ascii() || drop.recipients.iter().any(|r| !r.is_ascii());
    Ok(Envelope {
        id: id.to_string(),
        sender: drop.sender.clone(),
        recipients,
        arrival: unix_now(),
        size: 0,
        attempts: 0,
        next_try: 0,
        client: ClientInfo {
            address: "local".into(),
            helo: String::new(),
            protocol: "local".into(),
        },
        auth_user: None,
        params: EsmtpParams {
            body: None,
            smtputf8: utf8,
            envid: None,
            ret: None,
        },
        delay_warned: false,
        added_headers: String::new(),
        junk: false,
    })
}

/// Our `Received:` (as Postfix's pickup writes it) and the message with
/// every line ending in CRLF, as the spool keeps messages.
fn crlf_message(hostname: &str, id: &str, drop: &DropEnvelope, message: &[u8]) -> Vec<u8> {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let mut out = format!(
        "Received: by {hostname} (mailsrv, from userid {})\r\n\tid {id}; {date}\r\n",
        drop.uid
    )
    .into_bytes();
    out.reserve(message.len() + message.len() / 32);
    let mut rest = message;
    while let Some(i) = memchr::memchr(b'\n', rest) {
        let line = &rest[..i];
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
        rest = &rest[i + 1..];
    }
    if !rest.is_empty() {
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_gets_crlf_and_received() {
        let drop = DropEnvelope {
            sender: "root@h.test".into(),
            recipients: vec!["a@b.test".into()],
            user: "root".into(),
            uid: 0,
        };
        let out = crlf_message("h.test", "ID", &drop, b"Subject: x\n\nline\r\nlast");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("Received: by h.test (mailsrv, from userid 0)\r\n\tid ID; "));
        assert!(
            text.ends_with("\r\nSubject: x\r\n\r\nline\r\nlast\r\n"),
            "{text:?}"
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        let drop = DropEnvelope {
            sender: "".into(),
            recipients: vec![
                "a@b.test".into(),
                "A@B.TEST".into(),
                "not an address".into(),
            ],
            user: "u".into(),
            uid: 1,
        };
        assert!(envelope("ID", &drop)
            .unwrap_err()
            .contains("not an address"));
        let ok = DropEnvelope {
            recipients: vec!["a@b.test".into(), "a@B.test".into()],
            ..drop
        };
        assert_eq!(envelope("ID", &ok).unwrap().recipients.len(), 1);
    }
}
