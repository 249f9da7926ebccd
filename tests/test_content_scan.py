"""Content scanning at the end of DATA (`[checks.clamd]` and
`[checks.spamd]` in mailsrv.conf(5)), against the real daemons
(tests/scanners.py, one of each per session).

clamd sees every message smtpd receives over SMTP: a virus gets
`554 5.7.1 Message refused: virus found: NAME` and nothing is queued; when
clamd cannot answer, `on_failure` says 451 4.3.0 (the default) or accept
with `X-Not-Scanned: clamd: reason`. spamd sees mail from outside clients
only (neither authenticated nor in relay_networks); every message it
scores gets `X-Spam-Status`, spam also `X-Spam-Flag: YES`, and spam is
filed in Junk, tagged or refused as `action` says (`reject_score` refuses
whatever `action` says)."""

import base64
import email.message
import email.policy
import re
import smtplib
import socket
import time

import pytest

from mailtest import RawSMTP, header, insecure_tls_context, make_message, wait_until
from scanners import EICAR, EICAR_SIGNATURE, GTUBE, free_port

ALICE = "alice@example.test"
BOB = "bob@example.test"
SENDER = "sender@remote.test"
VIRUS_FOUND = f"Message refused: virus found: {EICAR_SIGNATURE}"
SPAM_STATUS_RE = re.compile(r"^(Yes|No), score=(-?\d+(?:\.\d+)?) required=(-?\d+(?:\.\d+)?)"
                            r" tests=(.*)$")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def with_virus(subject: str = "inline virus", to: str = ALICE) -> bytes:
    """A text message with the EICAR string on a line of its body."""
    return make_message(subject, body=b"Have a look:\n" + EICAR + b"\nBye.\n", to=to)


def with_virus_attached(to: str = ALICE) -> bytes:
    """A multipart message with EICAR as a base64 attachment (its base64
    text is split over two lines, so only a decoded match finds it)."""
    msg = email.message.EmailMessage()
    msg["From"] = f"<{SENDER}>"
    msg["To"] = f"<{to}>"
    msg["Subject"] = "attached virus"
    msg["Message-ID"] = f"<{time.time_ns()}@client.example.test>"
    msg.set_content("See the attachment.\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                       filename="invoice.com")
    data = msg.as_bytes(policy=email.policy.SMTP)
    assert EICAR not in data and base64.b64encode(EICAR)[:40] in data
    return data


def spam(subject: str = "spam", to: str = ALICE, sender: str = SENDER) -> bytes:
    return make_message(subject, body=b"Buy now.\n" + GTUBE + b"\n", sender=sender, to=to)


def padded(message: bytes, size: int) -> bytes:
    """`message` with text lines added to its body until it has `size` octets."""
    lines = b""
    while len(message) + len(lines) < size:
        lines += b"padding " + b"x" * 60 + b"\r\n"
    return message + lines


def send_raw(srv, message: bytes, to: str = ALICE, sender: str = SENDER,
             bdat: bool = False) -> tuple[int, list[str]]:
    """One transaction on port 25 (recipient accepted); the final reply
    to DATA (or to one `BDAT n LAST`)."""
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect(f"MAIL FROM:<{sender}>", 250)
        conn.expect(f"RCPT TO:<{to}>", 250)
        if bdat:
            conn.send(f"BDAT {len(message)} LAST\r\n".encode() + message)
            reply = conn.read_reply()
        else:
            reply = conn.data(message)
        conn.command("QUIT")
    return reply


def assert_reply(reply: tuple[int, list[str]], code: int, enhanced: str, *words: str) -> str:
    """Assert the reply's code, enhanced code and that its text holds each
    of `words` (case-insensitive); return the text."""
    got, lines = reply
    text = " ".join(lines)
    assert got == code and lines[0].startswith(enhanced + " "), (
        f"expected {code} {enhanced}, got {got} {lines}")
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {got} {lines}"
    return text


def submit_as(srv, user: str, to: str, message: bytes) -> None:
    """Send as an authenticated user on the submission port (STARTTLS)."""
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=30) as s:
        s.starttls(context=insecure_tls_context())
        s.login(user, srv.passwords[user])
        refused = s.sendmail(user, [to], message)
    assert refused == {}, refused


def delivered(srv, addr: str, message: bytes, folder: str = "") -> bytes:
    """Wait for `message` (by its Message-ID) in addr's INBOX, or in the
    Maildir++ subfolder `folder` (".Junk"); return the file's content."""
    wanted = header(message, "Message-ID")
    new = srv.maildir(addr) / folder / "new" if folder else srv.maildir(addr) / "new"

    def find() -> bytes | None:
        for path in new.iterdir() if new.is_dir() else ():
            content = path.read_bytes()
            if header(content, "Message-ID") == wanted:
                return content
        return None
    try:
        return wait_until(find, 20, f"{wanted} in {new}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{srv.log_tail()}") from None


def assert_nothing_queued(srv, addr: str = ALICE) -> None:
    """Nothing left in the spool, and (after a marker message has been
    delivered, so qmgr had its turn) nothing delivered to `addr`, in its
    INBOX or its Junk folder."""
    srv.wait_spool_empty()
    assert srv.settle(addr) == []
    assert list((srv.maildir(addr) / ".Junk" / "new").iterdir()) == []


def assert_nothing_queued_without_settling(srv) -> None:
    """As assert_nothing_queued, for an installation that accepts no
    marker message: the spool empties, and in the next 2 seconds (ample
    for qmgr, which picks a message up at once) nothing is delivered."""
    srv.wait_spool_empty()
    time.sleep(2)
    assert srv.delivered_files() == []
    assert list(srv.mail_root.glob("*/*/.*/new/*")) == []   # subfolders (Junk)


def spam_status(content: bytes) -> tuple[str, float, float, str]:
    """X-Spam-Status as (Yes/No, score, required, tests)."""
    value = header(content, "X-Spam-Status")
    assert value is not None, f"no X-Spam-Status in\n{content[:1500].decode(errors='replace')}"
    m = SPAM_STATUS_RE.match(value)
    assert m, f"X-Spam-Status: {value}"
    return m[1], float(m[2]), float(m[3]), m[4]


def assert_not_scanned(content: bytes, scanner: str) -> str:
    """The message carries `X-Not-Scanned: <scanner>: <reason>`; the reason."""
    value = header(content, "X-Not-Scanned")
    assert value is not None and value.startswith(f"{scanner}: ") and len(value) > len(
        scanner) + 2, f"X-Not-Scanned: {value!r}"
    return value


def clamd_at(address: str, **options) -> dict:
    return {"checks.clamd.address": address,
            **{f"checks.clamd.{k}": v for k, v in options.items()}}


def spamd_at(address: str, **options) -> dict:
    return {"checks.spamd.address": address,
            **{f"checks.spamd.{k}": v for k, v in options.items()}}


# --------------------------------------------------------------------------
# The daemons themselves (the fixtures work)
# --------------------------------------------------------------------------

def test_the_clamd_fixture_finds_eicar_on_both_addresses(clamd):
    assert clamd.ping(clamd.socket) and clamd.ping(clamd.tcp_address)
    found = f"stream: {EICAR_SIGNATURE}.UNOFFICIAL FOUND"
    assert clamd.scan(with_virus()) == found
    assert clamd.scan(with_virus_attached(), address=clamd.tcp_address) == found
    assert clamd.scan(make_message("clean")) == "stream: OK"


def test_the_spamd_fixture_scores_gtube_on_both_addresses(spamd):
    assert spamd.ping(spamd.address) and spamd.ping(spamd.socket)
    is_spam, score, required, rules = spamd.symbols(spam())
    assert is_spam and score > 900 and required == 5.0 and "GTUBE" in rules, (score, rules)
    is_spam, score, _, rules = spamd.symbols(make_message("ham"), address=spamd.socket)
    assert not is_spam and score < 5 and "GTUBE" not in rules, (score, rules)


# --------------------------------------------------------------------------
# clamd
# --------------------------------------------------------------------------

def test_a_virus_in_the_body_is_refused_and_nothing_is_queued(make_mailsrv, clamd):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(str(clamd.socket)))
    assert_reply(send_raw(srv, with_virus()), 554, "5.7.1", VIRUS_FOUND)
    assert_nothing_queued(srv)


def test_a_virus_in_a_base64_attachment_is_refused(make_mailsrv, clamd):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(clamd.tcp_address))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        srv.send(ALICE, with_virus_attached())
    assert refused.value.smtp_code == 554, refused.value
    assert refused.value.smtp_error.startswith(b"5.7.1 ")
    assert VIRUS_FOUND.encode() in refused.value.smtp_error, refused.value
    assert_nothing_queued(srv)


def test_a_virus_sent_with_bdat_is_refused(make_mailsrv, clamd):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(str(clamd.socket)))
    assert_reply(send_raw(srv, with_virus("bdat virus"), bdat=True), 554, "5.7.1", VIRUS_FOUND)
    assert_nothing_queued(srv)


def test_after_a_refused_virus_the_session_goes_on(make_mailsrv, clamd):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(str(clamd.socket)))
    clean = make_message("clean after a virus", to=ALICE)
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect(f"MAIL FROM:<{SENDER}>", 250)
        conn.expect(f"RCPT TO:<{ALICE}>", 250)
        assert_reply(conn.data(with_virus()), 554, "5.7.1", VIRUS_FOUND)
        conn.expect(f"MAIL FROM:<{SENDER}>", 250)
        conn.expect(f"RCPT TO:<{ALICE}>", 250)
        RawSMTP.check_reply(conn.data(clean), 250, "2.0.0", "clean message")
        conn.command("QUIT")
    assert header(delivered(srv, ALICE, clean), "X-Not-Scanned") is None
    srv.wait_spool_empty()
    assert len(srv.messages(ALICE)) == 1


def test_a_clean_message_is_scanned_and_delivered(make_mailsrv, clamd):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(clamd.tcp_address))
    message = make_message("nothing to see", to=ALICE)
    srv.send(ALICE, message)
    content = delivered(srv, ALICE, message)
    assert header(content, "X-Not-Scanned") is None
    assert header(content, "X-Spam-Status") is None   # no spamd configured


def test_authenticated_users_are_scanned_for_viruses_too(make_mailsrv, clamd, spamd):
    srv = make_mailsrv(users=[ALICE, BOB], config={**clamd_at(str(clamd.socket)),
                                                   **spamd_at(spamd.address)})
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit_as(srv, ALICE, BOB, with_virus(to=BOB))
    assert refused.value.smtp_code == 554, refused.value
    assert VIRUS_FOUND.encode() in refused.value.smtp_error, refused.value
    # ... but not for spam: spamd only sees mail from outside clients.
    message = spam("gtube from a user", to=BOB, sender=ALICE)
    submit_as(srv, ALICE, BOB, message)
    content = delivered(srv, BOB, message)
    assert header(content, "X-Spam-Status") is None and header(content, "X-Spam-Flag") is None
    srv.wait_spool_empty()
    assert len(srv.messages(BOB)) == 1


def test_clamd_unreachable_defers_the_message_by_default(make_mailsrv, tmp_path):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(str(tmp_path / "no-clamd.sock")))
    assert_reply(send_raw(srv, make_message("unscanned", to=ALICE)), 451, "4.3.0", "clamd")
    assert_nothing_queued_without_settling(srv)


def test_clamd_unreachable_with_on_failure_accept_delivers_with_a_header(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(f"127.0.0.1:{free_port()}",
                                                      on_failure="accept"))
    message = make_message("accepted unscanned", to=ALICE)
    srv.send(ALICE, message)
    assert_not_scanned(delivered(srv, ALICE, message), "clamd")


def test_clamd_that_never_answers_times_out_into_a_451(make_mailsrv):
    # A listening socket nobody accepts on: the connection is made (the
    # kernel's backlog) but no reply ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        srv = make_mailsrv(users=[ALICE], config=clamd_at(
            f"127.0.0.1:{silent.getsockname()[1]}", timeout=1, on_failure="tempfail"))
        started = time.monotonic()
        reply = send_raw(srv, make_message("slow scanner", to=ALICE))
        took = time.monotonic() - started
    assert_reply(reply, 451, "4.3.0", "clamd")
    assert took < 8, f"the 1 s scan timeout took {took:.1f}s"
    assert_nothing_queued_without_settling(srv)


def test_a_message_over_clamd_max_size_is_delivered_unscanned(make_mailsrv, clamd):
    srv = make_mailsrv(users=[ALICE], config=clamd_at(str(clamd.socket), max_size=2000))
    message = padded(with_virus("too big to scan"), 5000)
    srv.send(ALICE, message)
    assert_not_scanned(delivered(srv, ALICE, message), "clamd")


# --------------------------------------------------------------------------
# spamd
# --------------------------------------------------------------------------

def test_spam_from_outside_goes_to_junk_with_the_spam_headers(make_mailsrv, spamd):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(spamd.address))
    message = spam()
    srv.send(ALICE, message)
    content = delivered(srv, ALICE, message, ".Junk")
    verdict, score, required, tests = spam_status(content)
    # GTUBE alone scores 1000; other rules add or take a few points.
    assert verdict == "Yes" and score > 900 and required == 5.0, (verdict, score, required)
    assert "GTUBE" in tests, tests
    assert header(content, "X-Spam-Flag") == "YES"
    assert srv.messages(ALICE) == []


def test_ham_from_outside_goes_to_the_inbox_marked_no(make_mailsrv, spamd):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(str(spamd.socket)))
    message = make_message("lunch on friday?", to=ALICE)
    srv.send(ALICE, message)
    content = delivered(srv, ALICE, message)
    verdict, score, required, tests = spam_status(content)
    assert verdict == "No" and score < required, (verdict, score, required)
    assert "GTUBE" not in tests
    assert header(content, "X-Spam-Flag") is None
    assert header(content, "X-Not-Scanned") is None


def test_spam_with_action_tag_goes_to_the_inbox_flagged(make_mailsrv, spamd):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(spamd.address, action="tag"))
    message = spam("tagged spam")
    srv.send(ALICE, message)
    content = delivered(srv, ALICE, message)
    assert spam_status(content)[0] == "Yes"
    assert header(content, "X-Spam-Flag") == "YES"
    assert list((srv.maildir(ALICE) / ".Junk" / "new").iterdir()) == []


def test_spam_with_action_reject_is_refused(make_mailsrv, spamd):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(spamd.address, action="reject"))
    assert_reply(send_raw(srv, spam("refused spam")), 550, "5.7.1", "spam")
    assert_nothing_queued(srv)


def test_a_score_at_reject_score_is_refused_whatever_the_action(make_mailsrv, spamd):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(spamd.address, action="tag",
                                                      reject_score=15.0))
    assert_reply(send_raw(srv, spam("far over the line")), 550, "5.7.1")
    assert_nothing_queued(srv)
    # Ham stays well under it.
    message = make_message("ordinary", to=ALICE)
    srv.send(ALICE, message)
    assert spam_status(delivered(srv, ALICE, message))[0] == "No"


def test_spamd_unreachable_delivers_with_a_header_by_default(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(f"127.0.0.1:{free_port()}"))
    message = spam("spamd is down")
    srv.send(ALICE, message)
    content = delivered(srv, ALICE, message)
    assert_not_scanned(content, "spamd")
    assert header(content, "X-Spam-Status") is None


def test_spamd_unreachable_with_on_failure_tempfail_defers(make_mailsrv, tmp_path):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(str(tmp_path / "no-spamd.sock"),
                                                      on_failure="tempfail"))
    assert_reply(send_raw(srv, make_message("wait for spamd", to=ALICE)), 451, "4.3.0",
                 "spamd")
    assert_nothing_queued_without_settling(srv)


def test_a_message_over_spamd_max_size_is_delivered_unscanned(make_mailsrv, spamd):
    srv = make_mailsrv(users=[ALICE], config=spamd_at(spamd.address, max_size=2000))
    message = padded(spam("too big to score"), 5000)
    srv.send(ALICE, message)
    # GTUBE would have sent it to Junk, had it been scanned.
    content = delivered(srv, ALICE, message)
    assert_not_scanned(content, "spamd")
    assert header(content, "X-Spam-Status") is None and header(content, "X-Spam-Flag") is None


def test_mail_from_relay_networks_is_scanned_for_viruses_but_not_for_spam(make_mailsrv,
                                                                          clamd, spamd):
    srv = make_mailsrv(users=[ALICE], config={**clamd_at(str(clamd.socket)),
                                              **spamd_at(spamd.address),
                                              "smtpd.relay_networks": ["127.0.0.1"]})
    assert_reply(send_raw(srv, with_virus()), 554, "5.7.1", VIRUS_FOUND)
    message = spam("gtube from our network")
    srv.send(ALICE, message)
    content = delivered(srv, ALICE, message)
    assert header(content, "X-Spam-Status") is None and header(content, "X-Spam-Flag") is None
    srv.wait_spool_empty()
    assert len(srv.messages(ALICE)) == 1
