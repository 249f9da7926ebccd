"""Delivery status notifications (RFC 3461 parameters, RFC 3464 reports):
NOTIFY, RET, ENVID and ORCPT as given at MAIL and RCPT, honoured by qmgr's
reports for local delivery."""

import email
import email.policy
import json
import os
import signal

from mailtest import wait_until

ALICE = "alice@example.test"
BOB = "bob@example.test"


def report_fields(content: bytes) -> tuple[email.message.Message, dict[str, str]]:
    """The report and the fields of its message/delivery-status part, later
    blocks overriding earlier ones (one recipient here)."""
    report = email.message_from_bytes(content, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report", report["Content-Type"]
    fields: dict[str, str] = {}
    [status] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    for block in status.get_payload():
        for key, value in block.items():
            fields[key.lower()] = " ".join(str(value).split())
    return report, fields


def send(srv, mail_params: str, rcpt_params: str, subject: str) -> None:
    with srv.raw() as smtp:
        assert "DSN" in smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{BOB}>{mail_params}", 250, "2.1.0")
        smtp.expect(f"RCPT TO:<{ALICE}>{rcpt_params}", 250, "2.1.5")
        message = (f"From: {BOB}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\n"
                   f"the body of {subject}\r\n").encode()
        smtp.check_reply(smtp.data(message), 250, "2.0.0")


def send_to_vanishing_alice(srv, mail_params: str, rcpt_params: str, subject: str) -> None:
    """Queue a message from bob to alice while qmgr is stopped, then delete
    alice, so delivery fails after acceptance."""
    qmgr = srv.pid("qmgr")
    os.kill(qmgr, signal.SIGSTOP)
    try:
        send(srv, mail_params, rcpt_params, subject)
        srv.ctl("user", "del", ALICE)
    finally:
        os.kill(qmgr, signal.SIGCONT)


def test_notify_success_reports_delivery(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    send(srv, " ENVID=batch-42", " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.test",
         "tell me")
    srv.wait_for_messages(ALICE, 1)
    [path] = srv.wait_for_messages(BOB, 1)
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <>\n"), content[:200]
    report, fields = report_fields(content)
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert fields["action"] == "delivered" and fields["status"] == "2.0.0", fields
    assert fields["original-envelope-id"] == "batch-42", fields
    assert fields["original-recipient"] == "rfc822;alice@example.test", fields
    assert fields["final-recipient"].lower() == f"rfc822; {ALICE}", fields
    srv.wait_spool_empty()


def test_no_notify_means_no_success_report(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    send(srv, "", "", "quiet")
    srv.wait_for_messages(ALICE, 1)
    srv.wait_spool_empty()
    assert srv.messages(BOB) == []


def test_notify_never_suppresses_the_bounce(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    send_to_vanishing_alice(srv, "", " NOTIFY=NEVER", "never tell")
    # A bounce would be queued before the entry is removed.
    srv.wait_spool_empty()
    assert srv.messages(BOB) == []


def test_ret_full_returns_the_whole_message(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    send_to_vanishing_alice(srv, " RET=FULL ENVID=e-1", "", "give it back")
    [path] = srv.wait_for_messages(BOB, 1)
    report, fields = report_fields(path.read_bytes())
    assert fields["action"] == "failed" and fields["status"] == "5.1.1", fields
    assert fields["original-envelope-id"] == "e-1", fields
    [returned] = [p for p in report.walk() if p.get_content_type() == "message/rfc822"]
    assert b"the body of give it back" in returned.as_bytes(), "RET=FULL lost the body"


def test_ret_hdrs_returns_the_header_only(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    send_to_vanishing_alice(srv, " RET=HDRS", "", "headers only")
    [path] = srv.wait_for_messages(BOB, 1)
    report, _ = report_fields(path.read_bytes())
    [headers] = [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert "Subject: headers only" in headers.get_payload()
    assert b"the body of headers only" not in path.read_bytes()


FAR = "someone@far.example"


def send_far(srv, subject: str) -> None:
    """Bob sends to another domain (allowed from 127.0.0.0/8); the message
    waits in the queue: the tests' DNS server answers SERVFAIL for
    far.example, a temporary error (4.4.3)."""
    with srv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{BOB}>", 250)
        smtp.expect(f"RCPT TO:<{FAR}>", 250)
        smtp.check_reply(smtp.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode()), 250)


def test_queue_lifetime_expiry_returns_the_message(make_mailsrv):
    # Mail to another domain waits in the queue (its MX lookup fails for
    # now); past qmgr.max_queue_lifetime it goes back to the sender.
    srv = make_mailsrv(users=[BOB], config={
        "qmgr.max_queue_lifetime": 2, "qmgr.min_backoff": 1, "qmgr.max_backoff": 1,
        "smtpd.relay_networks": ["127.0.0.0/8"]})
    send_far(srv, "too slow")
    [path] = srv.wait_for_messages(BOB, 1, timeout=20)
    report, fields = report_fields(path.read_bytes())
    assert fields["action"] == "failed" and fields["status"] == "4.4.7", fields
    assert fields["final-recipient"] == f"rfc822; {FAR}", fields
    # The last temporary error comes along: the failed DNS lookup.
    assert "4.4.3" in fields["diagnostic-code"], fields
    srv.wait_spool_empty()


def test_delay_warning_is_sent_once(make_mailsrv):
    srv = make_mailsrv(users=[BOB], config={
        "qmgr.delay_warning": 1, "qmgr.min_backoff": 1, "qmgr.max_backoff": 1,
        "smtpd.relay_networks": ["127.0.0.0/8"]})
    send_far(srv, "slow going")
    [path] = srv.wait_for_messages(BOB, 1, timeout=20)
    report, fields = report_fields(path.read_bytes())
    assert report["Subject"] == "Delayed Mail (still being retried)"
    assert fields["action"] == "delayed" and fields["status"] == "4.4.3", fields
    assert fields["final-recipient"] == f"rfc822; {FAR}", fields

    # More retries, no second warning; the message is still queued.
    def attempts() -> int:
        return max((e.get("attempts", 0)
                    for e in json.loads(srv.ctl("queue", "list", "--json").stdout)), default=0)
    seen = attempts()
    wait_until(lambda: attempts() >= seen + 2, 15, "two more delivery attempts")
    assert srv.messages(BOB) == [path], "the delay warning was sent twice"
