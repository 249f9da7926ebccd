//! Non-delivery reports (RFC 3464 multipart/report), queued like any
//! other message with the null sender so they can never bounce in turn.

use std::io::{Read, Write};

use common::queue_id::new_queue_id;
use common::spool::{unix_now, ClientInfo, Envelope, EsmtpParams, Recipient, SpoolError};

use super::Context;

/// Most of the original message returned in a bounce.
const RETURNED_HEADER_LIMIT: u64 = 64 * 1024;

/// Queue a bounce to the sender of `env` about `failed`. Bounces of
/// bounces (null sender) are dropped with a log line, as every MTA does.
pub fn queue_bounce(
    ctx: &Context,
    env: &Envelope,
    failed: &[&Recipient],
) -> Result<(), SpoolError> {
    if env.sender.is_empty() {
        tracing::info!("{}: undeliverable bounce discarded", env.id);
        return Ok(());
    }
    let id = new_queue_id();
    let body = report(ctx, env, failed, &id);
    let spool = &ctx.spool;
    let path = spool.data_path(&id);
    let written = spool.create_data(&id).and_then(|mut f| {
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|source| SpoolError::Io {
                path: path.clone(),
                source,
            })
    });
    let bounce = Envelope {
        id: id.clone(),
        sender: String::new(),
        recipients: vec![Recipient::new(env.sender.clone(), None)],
        arrival: unix_now(),
        size: body.len() as u64,
        attempts: 0,
        next_try: 0,
        client: ClientInfo {
            address: "local".into(),
            helo: ctx.hostname.clone(),
            protocol: "local".into(),
        },
        auth_user: None,
        params: EsmtpParams {
            smtputf8: !env.sender.is_ascii(),
            ..EsmtpParams::default()
        },
    };
    let queued = written
        .and_then(|_| spool.commit(&bounce))
        .and_then(|_| spool.sync_new_entries());
    if queued.is_err() {
        spool.discard(&id);
    }
    queued?;
    tracing::info!("{}: sender non-delivery notification: {id}", env.id);
    Ok(())
}

fn report(ctx: &Context, env: &Envelope, failed: &[&Recipient], id: &str) -> Vec<u8> {
    let boundary = format!("{id}/{}", ctx.hostname);
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let mut human = String::new();
    let mut machine = format!(
        "Reporting-MTA: dns; {}\r\nX-Mailsrv-Queue-ID: {}\r\n",
        ctx.hostname, env.id
    );
    for r in failed {
        let reason = r.last_error.as_deref().unwrap_or("5.0.0 delivery failed");
        let status = reason.split_whitespace().next().unwrap_or("5.0.0");
        let original = r.original.as_deref().unwrap_or(&r.address);
        human.push_str(&format!("<{original}>: {reason}\r\n"));
        machine.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {original}\r\nAction: failed\r\nStatus: {status}\r\nDiagnostic-Code: X-mailsrv; {reason}\r\n"
        ));
    }
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at host {host}.\r\n\
         \r\n\
         Your message could not be delivered to one or more recipients:\r\n\
         \r\n\
         {human}\
         \r\n\
         --{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         {machine}\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n",
        host = ctx.hostname,
        to = env.sender,
    )
    .into_bytes();
    out.extend_from_slice(&original_headers(ctx, &env.id));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of the original message (bounded).
fn original_headers(ctx: &Context, id: &str) -> Vec<u8> {
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(ctx.spool.data_path(id)) {
        let _ = f.take(RETURNED_HEADER_LIMIT).read_to_end(&mut head);
    }
    match memchr::memmem::find(&head, b"\r\n\r\n") {
        Some(end) => head.truncate(end + 2),
        None => head.truncate(head.len()),
    }
    head
}
