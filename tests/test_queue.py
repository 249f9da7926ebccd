"""The queue: retries of failed deliveries and bounces (qmgr(8))."""

import email
import email.policy
import json
import os
import shutil
import signal

from mailtest import as_stored, header, make_message, strip_added_headers, wait_until

ALICE = "alice@example.test"
BOB = "bob@example.test"
# Retries within seconds, not minutes.
FAST_RETRY = {"qmgr.min_backoff": 1, "qmgr.max_backoff": 2}


def deferred_attempts(srv, queue_id: str) -> int:
    """`attempts` of the entry's envelope in deferred/, 0 when it is not
    there (yet, or just now being retried)."""
    try:
        envelope = json.loads((srv.spool_view() / "deferred" / queue_id).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return envelope["attempts"]


def test_failed_local_delivery_is_retried(make_mailsrv):
    srv = make_mailsrv(config=FAST_RETRY)
    srv.add_user(ALICE)
    maildir = srv.maildir(ALICE)
    # A regular file where the Maildir should be: every delivery fails.
    shutil.rmtree(maildir)
    maildir.write_text("not a maildir\n")
    message = make_message("retry me", body="delivered on a later try\n")

    queue_id = srv.submit(ALICE, message)

    wait_until(lambda: deferred_attempts(srv, queue_id) >= 1, 15,
               f"{queue_id} in spool/deferred")
    # Retried (attempt 2 after min_backoff) and still kept, message file too.
    wait_until(lambda: deferred_attempts(srv, queue_id) >= 2, 15,
               f"{queue_id} to be retried and deferred again")
    assert (srv.spool_view() / "data" / queue_id).is_file(), "message file lost"
    assert maildir.is_file(), "the file in the Maildir's place was touched"
    assert srv.delivered_files() == []

    maildir.unlink()   # delivery may now make the Maildir

    [path] = srv.wait_for_messages(ALICE, 1, timeout=15)
    content = path.read_bytes()
    assert header(content, "Subject") == "retry me"
    assert strip_added_headers(content) == as_stored(message)
    srv.wait_spool_empty()
    assert srv.messages(ALICE) == [path], "delivered more than once"


def stopped_qmgr_send_then_delete(srv, sender: str, message: bytes) -> str:
    """With qmgr stopped, queue `message` from `sender` to alice and then
    delete alice, so her address vanishes between acceptance and delivery.
    Returns the queue id."""
    qmgr = srv.pid("qmgr")
    os.kill(qmgr, signal.SIGSTOP)
    try:
        queue_id = srv.submit(ALICE, message, sender=sender)
        srv.ctl("user", "del", ALICE)
    finally:
        os.kill(qmgr, signal.SIGCONT)
    return queue_id


def delivery_status_fields(report: email.message.Message) -> dict[str, str]:
    """The fields of every block of the message/delivery-status part(s) of
    `report`, later blocks overriding earlier ones (one recipient here)."""
    fields: dict[str, str] = {}
    parts = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(parts) == 1, f"expected one message/delivery-status part, found {len(parts)}"
    for block in parts[0].get_payload():
        for key, value in block.items():
            fields[key.lower()] = " ".join(str(value).split())
    return fields


def test_recipient_deleted_after_acceptance_is_bounced(mailsrv):
    mailsrv.add_user(ALICE)
    mailsrv.add_user(BOB)
    message = make_message("to a vanishing user", sender=BOB, to=ALICE,
                           message_id="vanishing-1@client.example.test")

    queue_id = stopped_qmgr_send_then_delete(mailsrv, BOB, message)

    [path] = mailsrv.wait_for_messages(BOB, 1)
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <>\n"), content[:200]
    report = email.message_from_bytes(content, policy=email.policy.compat32)
    assert "mailer-daemon" in (report["From"] or "").lower(), report["From"]
    assert report.get_content_type() == "multipart/report", report["Content-Type"]
    assert report.get_param("report-type") == "delivery-status", report["Content-Type"]
    fields = delivery_status_fields(report)
    assert fields.get("action") == "failed", fields
    assert fields.get("status") == "5.1.1", fields
    assert fields.get("final-recipient", "").lower() == f"rfc822; {ALICE}", fields
    assert b"vanishing-1@client.example.test" in content, \
        "the bounce does not return the original message's headers"
    mailsrv.wait_spool_empty()
    assert mailsrv.delivered_files() == [path], f"queue id {queue_id}"


def test_null_sender_to_deleted_recipient_is_not_bounced(mailsrv):
    # The report goes to the postmaster, who has no mailbox here: that
    # report fails in turn and, being from double-bounce@, is dropped.
    mailsrv.add_user(ALICE)
    mailsrv.add_user(BOB)
    message = make_message("a bounce to a vanishing user", sender="MAILER-DAEMON@remote.test",
                           to=ALICE)

    stopped_qmgr_send_then_delete(mailsrv, "", message)

    # A bounce would be queued before the original entry is removed, so an
    # empty spool means everything has happened.
    mailsrv.wait_spool_empty()
    assert mailsrv.delivered_files() == []
    assert "report about a report discarded" in mailsrv.log_tail()


def test_failed_bounce_goes_to_the_postmaster(mailsrv):
    mailsrv.add_user(ALICE)
    mailsrv.add_user(BOB)
    mailsrv.add_alias("postmaster", BOB)
    message = make_message("a bounce to a vanishing user", sender="MAILER-DAEMON@remote.test",
                           to=ALICE)

    stopped_qmgr_send_then_delete(mailsrv, "", message)

    [path] = mailsrv.wait_for_messages(BOB, 1)
    content = path.read_bytes()
    assert content.startswith(
        f"Return-Path: <double-bounce@{mailsrv.hostname}>\n".encode()), content[:200]
    report = email.message_from_bytes(content, policy=email.policy.compat32)
    fields = delivery_status_fields(report)
    assert fields.get("action") == "failed" and fields.get("status") == "5.1.1", fields
    mailsrv.wait_spool_empty()


def test_a_burst_waits_in_incoming_within_the_active_limit(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"qmgr.active_limit": 2})
    qmgr = srv.pid("qmgr")
    subjects = [f"burst {i}" for i in range(12)]
    os.kill(qmgr, signal.SIGSTOP)
    try:
        for subject in subjects:
            srv.submit(ALICE, make_message(subject))
    finally:
        os.kill(qmgr, signal.SIGCONT)
    active = srv.spool_view() / "active"
    most_active = 0

    def all_delivered() -> bool:
        nonlocal most_active
        most_active = max(most_active, len(os.listdir(active)))
        return len(srv.messages(ALICE)) == len(subjects)

    wait_until(all_delivered, 30, "every message of the burst delivered")
    assert most_active <= 2, f"{most_active} entries active at once"
    delivered = sorted(header(p.read_bytes(), "Subject") for p in srv.messages(ALICE))
    assert delivered == sorted(subjects)
    srv.wait_spool_empty()
