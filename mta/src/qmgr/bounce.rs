//! Delivery status notifications (RFC 3464 multipart/report): failures,
//! and successes a sender asked for with NOTIFY=SUCCESS (RFC 3461). They
//! are queued like any other message, with the null sender so they can
//! never bounce in turn.

use std::io::{Read, Write};

use common::queue_id::new_queue_id;
use common::spool::{unix_now, ClientInfo, Envelope, EsmtpParams, Recipient, SpoolError};

use super::Context;

/// Most of the original header returned in a report.
const RETURNED_HEADER_LIMIT: u64 = 64 * 1024;

/// Most of the original message returned with RET=FULL; past this only
/// the header goes back.
const RETURNED_MESSAGE_LIMIT: u64 = 10 * 1024 * 1024;

/// What a report tells the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Delivery failed for good (a bounce).
    Failed,
    /// Delivered, as NOTIFY=SUCCESS asked.
    Delivered,
    /// Handed to a server that cannot report delivery itself (no DSN),
    /// as NOTIFY=SUCCESS asked (RFC 3461 5.2.2).
    Relayed,
    /// Still not delivered; still being tried.
    Delayed,
}

/// The sender of reports about reports: a report that fails in turn is
/// dropped (Postfix's double-bounce), so nothing can loop.
fn double_bounce(ctx: &Context) -> String {
    format!("double-bounce@{}", ctx.hostname)
}

/// Queue a report to the sender of `env` about `recipients`. A report
/// about a bounce (null sender) goes to the postmaster, from
/// `double-bounce@`; one about such a report is dropped with a log line.
pub fn queue_report(
    ctx: &Context,
    env: &Envelope,
    recipients: &[&Recipient],
    kind: Report,
) -> Result<(), SpoolError> {
    if env.sender.eq_ignore_ascii_case(&double_bounce(ctx))
        || (env.sender.is_empty() && kind != Report::Failed)
    {
        tracing::info!("{}: report about a report discarded", env.id);
        return Ok(());
    }
    let (to, from) = if env.sender.is_empty() {
        let (dir, _) = ctx.directory.current();
        (dir.postmaster(&ctx.hostname), double_bounce(ctx))
    } else {
        (env.sender.clone(), String::new())
    };
    let id = new_queue_id();
    let body = report(ctx, env, recipients, &id, kind, &to);
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
        sender: from,
        recipients: vec![Recipient::new(to.clone(), None)],
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
            smtputf8: !to.is_ascii(),
            ..EsmtpParams::default()
        },
        delay_warned: false,
        added_headers: String::new(),
        junk: false,
    };
    let queued = written
        .and_then(|_| spool.commit(&bounce))
        .and_then(|_| spool.sync_new_entries());
    if queued.is_err() {
        spool.discard(&id);
    }
    queued?;
    let what = match kind {
        Report::Failed => "non-delivery",
        Report::Delivered | Report::Relayed => "delivery",
        Report::Delayed => "delay",
    };
    tracing::info!("{}: {what} notification to <{to}>: {id}", env.id);
    Ok(())
}

fn report(
    ctx: &Context,
    env: &Envelope,
    recipients: &[&Recipient],
    id: &str,
    kind: Report,
    to: &str,
) -> Vec<u8> {
    let boundary = format!("{id}/{}", ctx.hostname);
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let (subject, intro, action) = match kind {
        Report::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients:",
            "failed",
        ),
        Report::Delivered => (
            "Successful Mail Delivery Report",
            "Your message was delivered to the following recipients, as you asked:",
            "delivered",
        ),
        Report::Relayed => (
            "Successful Mail Delivery Report",
            "Your message was passed on to the following recipients' mail servers, \
             which cannot confirm its delivery:",
            "relayed",
        ),
        Report::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message could not be delivered yet to these recipients; delivery \
             is still being tried, and you will be told if it fails for good:",
            "delayed",
        ),
    };
    let mut human = String::new();
    // RFC 3464 2.2: per-message fields.
    let mut machine = format!("Reporting-MTA: dns; {}\r\n", ctx.hostname);
    if let Some(envid) = &env.params.envid {
        machine.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    machine.push_str(&format!("X-Mailsrv-Queue-ID: {}\r\n", env.id));
    for r in recipients {
        let shown = r.original.as_deref().unwrap_or(&r.address);
        // RFC 3464 2.3: per-recipient fields.
        machine.push_str("\r\n");
        if let Some(orcpt) = &r.orcpt {
            // smtp-proto keeps the address of ORCPT=rfc822;addr without its
            // type; the field needs both (RFC 3464 2.3.1).
            let typed = if orcpt.contains(';') {
                orcpt.clone()
            } else {
                format!("rfc822;{orcpt}")
            };
            machine.push_str(&format!("Original-Recipient: {typed}\r\n"));
        }
        match kind {
            Report::Failed | Report::Delayed => {
                let reason = r.last_error.as_deref().unwrap_or("5.0.0 delivery failed");
                let status = reason.split_whitespace().next().unwrap_or("5.0.0");
                human.push_str(&format!("<{shown}>: {reason}\r\n"));
                machine.push_str(&format!(
                    "Final-Recipient: rfc822; {shown}\r\nAction: {action}\r\nStatus: {status}\r\n"
                ));
                // RFC 3464 2.3.5 and 2.3.6: the server's own words when a
                // server refused, else ours.
                match &r.remote_reply {
                    Some(remote) => machine.push_str(&format!(
                        "Remote-MTA: dns; {}\r\nDiagnostic-Code: smtp; {}\r\n",
                        remote.mta, remote.reply
                    )),
                    None => machine.push_str(&format!("Diagnostic-Code: X-mailsrv; {reason}\r\n")),
                }
            }
            Report::Delivered | Report::Relayed => {
                let how = match kind {
                    Report::Relayed => "relayed to a server without delivery notifications",
                    _ => "delivered to mailbox",
                };
                human.push_str(&format!("<{shown}>: {how}\r\n"));
                machine.push_str(&format!(
                    "Final-Recipient: rfc822; {shown}\r\nAction: {action}\r\nStatus: 2.0.0\r\n"
                ));
            }
        }
    }
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
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
         {intro}\r\n\
         \r\n\
         {human}\
         \r\n\
         --{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         {machine}\
         \r\n",
        host = ctx.hostname,
    )
    .into_bytes();
    // RFC 3461 4.3: RET=FULL asks for the whole message back with a
    // failure report; otherwise (and for successes) the header only.
    let full = kind == Report::Failed && env.params.ret.as_deref() == Some("FULL");
    match full.then(|| whole_message(ctx, &env.id)).flatten() {
        Some(message) => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(&message);
        }
        None => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(&original_headers(ctx, &env.id));
        }
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The original message when it is small enough to return whole.
fn whole_message(ctx: &Context, id: &str) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let f = ctx.spool.open_data(id).ok()?;
    f.take(RETURNED_MESSAGE_LIMIT + 1)
        .read_to_end(&mut message)
        .ok()?;
    (message.len() as u64 <= RETURNED_MESSAGE_LIMIT).then_some(message)
}

/// The header section of the original message (bounded).
fn original_headers(ctx: &Context, id: &str) -> Vec<u8> {
    let mut head = Vec::new();
    if let Ok(f) = ctx.spool.open_data(id) {
        let _ = f.take(RETURNED_HEADER_LIMIT).read_to_end(&mut head);
    }
    match memchr::memmem::find(&head, b"\r\n\r\n") {
        Some(end) => head.truncate(end + 2),
        None => head.truncate(head.len()),
    }
    head
}
