"""Mailbox quotas (`mailctl user quota`, RFC 9208 QUOTA): a limit in the
user database as Dovecot keeps it, deliveries past it deferred 4.2.2,
smtpd answering 452 4.2.2 at RCPT once qmgr has found the mailbox full,
IMAP GETQUOTAROOT/GETQUOTA reporting usage, and APPEND/COPY refused with
[OVERQUOTA]."""

import json
import re
import smtplib

from mailtest import make_message, wait_until

ALICE = "alice@example.test"


def quota_of(srv, user: str) -> dict:
    return json.loads(srv.ctl("user", "quota", user, "--json").stdout)


def sized(subject: str, size: int) -> bytes:
    """A message of about `size` bytes."""
    return make_message(subject, body=("x" * 70 + "\n") * (size // 71), to=ALICE)


def test_quota_is_set_shown_and_kept_in_the_users_file(mailsrv):
    srv = mailsrv
    srv.add_user(ALICE)
    assert quota_of(srv, ALICE)["limit_bytes"] is None
    shown = srv.ctl("user", "quota", ALICE, "2M").stdout
    assert f"{ALICE}: " in shown and "of 2097152 bytes used" in shown, shown
    line = next(l for l in (srv.root / "users").read_text().splitlines() if l.startswith(ALICE))
    # Dovecot's own field, so a Dovecot users file keeps its limits.
    assert "userdb_quota_rule=*:storage=2097152B" in line, line
    assert srv.ctl("user", "quota", ALICE, "12Q", check=False).returncode != 0
    srv.ctl("user", "quota", ALICE, "none")
    assert quota_of(srv, ALICE)["limit_bytes"] is None


def refused_at_rcpt(srv):
    """The reply to RCPT TO alice, when it is not 250."""
    with srv.smtp() as s:
        s.ehlo("client.example.test")
        s.mail("sender@remote.test")
        code, text = s.rcpt(f"<{ALICE}>")
        return (code, text) if code != 250 else None


def test_a_message_that_does_not_fit_is_deferred_and_small_ones_still_come(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"qmgr.min_backoff": 1, "qmgr.max_backoff": 2})
    srv.ctl("user", "quota", ALICE, "20K")
    srv.send(ALICE, sized("fits", 12_000))
    srv.wait_for_messages(ALICE, 1)
    usage = quota_of(srv, ALICE)
    assert 12_000 <= usage["used_bytes"] <= 20_480 and usage["messages"] == 1, usage

    srv.send(ALICE, sized("too much", 12_000))
    wait_until(lambda: "4.2.2" in ((srv.queue_recipient(ALICE) or ({}, {}))[1].get("last_error") or ""),
               20, "a 4.2.2 mailbox-full deferral")
    assert len(srv.messages(ALICE)) == 1
    # Room is left for small mail: RCPT is not refused, and it is delivered.
    assert refused_at_rcpt(srv) is None
    srv.send(ALICE, sized("small", 1_000))
    srv.wait_for_messages(ALICE, 2)


def test_a_full_mailbox_is_refused_at_rcpt_until_it_has_room(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"qmgr.min_backoff": 1, "qmgr.max_backoff": 2,
                                              "smtpd.max_errors": 2})
    srv.send(ALICE, sized("fills it", 12_000))
    srv.wait_for_messages(ALICE, 1)
    # The admin lowers the limit below what the mailbox holds.
    srv.ctl("user", "quota", ALICE, "10K")
    srv.send(ALICE, sized("one more", 1_000))
    wait_until(lambda: "4.2.2" in ((srv.queue_recipient(ALICE) or ({}, {}))[1].get("last_error") or ""),
               20, "a 4.2.2 mailbox-full deferral")
    code, text = wait_until(lambda: refused_at_rcpt(srv), 10, "452 at RCPT")
    assert code == 452 and text.startswith(b"4.2.2"), (code, text)
    # Our policy, not the client's error: many of them keep the session.
    with srv.smtp() as s:
        s.ehlo("client.example.test")
        s.mail("sender@remote.test")
        for _ in range(4):
            assert s.rcpt(f"<{ALICE}>")[0] == 452
        assert s.noop()[0] == 250

    # Room again: the deferred message goes in, and RCPT is accepted.
    srv.ctl("user", "quota", ALICE, "100K")
    srv.ctl("queue", "flush")
    srv.wait_for_messages(ALICE, 2)
    wait_until(lambda: refused_at_rcpt(srv) is None, 10, "RCPT accepted again")


def test_imap_reports_usage_and_refuses_append_and_copy_past_the_limit(mailsrv):
    srv = mailsrv
    srv.add_user(ALICE)
    srv.ctl("user", "quota", ALICE, "10K")
    srv.send(ALICE, sized("six k", 6_000))
    [path] = srv.wait_for_messages(ALICE, 1)
    used_kib = -(-path.stat().st_size // 1024)
    imap = srv.imaps(ALICE)
    try:
        assert b"QUOTA" in imap.capability()[1][0].split()
        typ, data = imap._simple_command("GETQUOTAROOT", "INBOX")
        assert typ == "OK", data
        roots = imap._untagged_response(typ, data, "QUOTAROOT")[1]
        assert roots == [b'INBOX ""'], roots
        quota = imap._untagged_response(typ, data, "QUOTA")[1]
        assert quota == [f'"" (STORAGE {used_kib} 10)'.encode()], quota
        typ, data = imap._simple_command("GETQUOTA", '""')
        assert typ == "OK" and imap._untagged_response(typ, data, "QUOTA")[1] == quota

        typ, data = imap.append("INBOX", None, None, sized("five k", 5_000))
        assert typ == "NO" and b"[OVERQUOTA]" in data[0], (typ, data)
        imap.create("Work")
        imap.select("INBOX")
        typ, data = imap.copy("1", "Work")
        assert typ == "NO" and b"[OVERQUOTA]" in data[0], (typ, data)
        # A MOVE changes nothing of the usage: allowed.
        typ, data = imap._simple_command("MOVE", "1", "Work")
        assert typ == "OK", data
        typ, data = imap._simple_command("SETQUOTA", '""', "(STORAGE 99999)")
        assert typ == "NO" and re.search(rb"\[NOPERM\]", data[0]), (typ, data)
        typ, data = imap.append("Work", None, None, sized("small", 1_000))
        assert typ == "OK", data
    finally:
        imap.logout()


def test_a_user_without_a_limit_has_no_quota_root(mailsrv):
    srv = mailsrv
    srv.add_user(ALICE)
    imap = srv.imaps(ALICE)
    try:
        typ, data = imap._simple_command("GETQUOTAROOT", "INBOX")
        assert typ == "OK", data
        assert imap._untagged_response(typ, data, "QUOTAROOT")[1] == [b"INBOX"]
        typ, data = imap._simple_command("GETQUOTA", '""')
        assert typ == "NO" and b"[NONEXISTENT]" in data[0], (typ, data)
    finally:
        imap.logout()
