"""Greylisting (`[checks.greylist]` in mailsrv.conf(5), RFC 6647): the first
RCPT of a (client /24, sender, recipient) triplet from an outside client
gets `450 4.7.1`; a retry at least `delay` seconds later passes, and the
triplet then passes at once. Authenticated users and relay_networks are
never greylisted. The table is kept in <spool>/greylist across restarts.

Delays are 0 to 2 seconds, so waits are short; smtpd counts in whole Unix
seconds, so the tests wait on the wall clock (time.time)."""

import math
import re
import smtplib
import time

from mailtest import RawSMTP, insecure_tls_context, make_message, wait_until

ALICE = "alice@example.test"
BOB = "bob@example.test"
SENDER = "news@remote.test"
GREYLISTED_RE = re.compile(r"^4\.7\.1 <(?P<rcpt>[^>]*)>: Greylisted, try again in "
                           r"(?P<wait>\d+) seconds?$")


def greylisted(make_mailsrv, delay: int = 2, **config):
    return make_mailsrv(users=[ALICE, BOB],
                        config={"checks.greylist.delay": delay, **config})


def attempt(srv, rcpts: list[str] | str, sender: str = SENDER,
            message: bytes | None = None) -> tuple[list[tuple[int, list[str]]], float]:
    """One transaction from 127.0.0.1 on port 25: MAIL, a RCPT per address
    in `rcpts`, then, when one was accepted and `message` is given, DATA,
    which must be accepted. Returns the RCPT replies and the wall-clock time
    after the last of them."""
    rcpts = [rcpts] if isinstance(rcpts, str) else rcpts
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect(f"MAIL FROM:<{sender}>", 250)
        replies = [conn.command(f"RCPT TO:<{r}>") for r in rcpts]
        after = time.time()
        if message is not None and any(code == 250 for code, _ in replies):
            RawSMTP.check_reply(conn.data(message), 250, "2.0.0", "end of data")
        conn.command("QUIT")
    return replies, after


def assert_greylisted(reply: tuple[int, list[str]], rcpt: str) -> int:
    """Assert `450 4.7.1 <rcpt>: Greylisted, try again in N seconds`;
    return N."""
    code, lines = reply
    assert code == 450, f"RCPT TO:<{rcpt}>: expected 450 (greylisted), got {code} {lines}"
    m = GREYLISTED_RE.match(lines[0])
    assert m, f"RCPT TO:<{rcpt}>: not a greylisting reply: {lines}"
    assert m["rcpt"] == rcpt, lines
    return int(m["wait"])


def assert_accepted(reply: tuple[int, list[str]], rcpt: str) -> None:
    code, lines = reply
    assert code == 250, f"RCPT TO:<{rcpt}>: expected 250, got {code} {lines}"


def wait_past(moment: float, seconds: float) -> None:
    """Sleep until the Unix second `seconds` whole seconds after the one
    holding `moment` has begun (smtpd keeps whole seconds)."""
    until = math.floor(moment) + seconds
    time.sleep(max(0.0, until - time.time()) + 0.05)


def test_first_attempt_is_deferred_and_a_retry_after_the_delay_is_delivered(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=2)
    first = make_message("first try", sender=SENDER, to=ALICE)
    [reply], first_at = attempt(srv, ALICE, message=first)
    assert 1 <= assert_greylisted(reply, ALICE) <= 2, reply

    # A retry before the delay is over is deferred again.
    [reply], _ = attempt(srv, ALICE)
    assert_greylisted(reply, ALICE)

    wait_past(first_at, 2)
    retry = make_message("retried", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=retry)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [retry])

    # The triplet is known now: the next message passes at once.
    again = make_message("known sender", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=again)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [retry, again])


def test_each_recipient_and_each_sender_is_a_triplet_of_its_own(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=2)
    [reply], first_at = attempt(srv, ALICE)
    assert_greylisted(reply, ALICE)
    wait_past(first_at, 2)

    message = make_message("two recipients", sender=SENDER, to=ALICE)
    (to_alice, to_bob), _ = attempt(srv, [ALICE, BOB], message=message)
    assert_accepted(to_alice, ALICE)
    assert_greylisted(to_bob, BOB)
    # The sender is part of the triplet too.
    [reply], _ = attempt(srv, ALICE, sender="other@remote.test")
    assert_greylisted(reply, ALICE)

    srv.wait_for_delivery(ALICE, [message])
    srv.wait_spool_empty()
    assert srv.messages(BOB) == []


def test_greylisting_many_recipients_does_not_end_the_session(make_mailsrv):
    """A deferral is our policy, not the client's error: a message to more
    new recipients than smtpd.max_errors keeps its session."""
    users = [f"user{i}@example.test" for i in range(6)]
    srv = make_mailsrv(users=users, config={"checks.greylist.delay": 1,
                                            "smtpd.max_errors": 3})
    replies, first_at = attempt(srv, users)
    for reply, rcpt in zip(replies, users):
        assert_greylisted(reply, rcpt)
    wait_past(first_at, 1)
    message = make_message("to six", sender=SENDER, to=users[0])
    replies, _ = attempt(srv, users, message=message)
    for reply, rcpt in zip(replies, users):
        assert_accepted(reply, rcpt)
    for rcpt in users:
        srv.wait_for_messages(rcpt, 1)
    assert "greylisted client=[127.0.0.1], from=<news@remote.test>" in srv.log()


def test_a_zero_delay_still_defers_the_first_attempt(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=0)
    [reply], first_at = attempt(srv, ALICE)
    assert assert_greylisted(reply, ALICE) == 1, reply
    wait_past(first_at, 1)
    message = make_message("next second", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=message)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [message])


def test_authenticated_users_are_not_greylisted(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=300)
    message = make_message("from alice", sender=ALICE, to=BOB)
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=15) as s:
        s.starttls(context=insecure_tls_context())
        s.login(ALICE, srv.passwords[ALICE])
        refused = s.sendmail(ALICE, [BOB], message)
    assert refused == {}
    srv.wait_for_delivery(BOB, [message])
    # The same triplet from an outside client is greylisted: the table is on.
    [reply], _ = attempt(srv, BOB, sender=ALICE)
    assert 299 <= assert_greylisted(reply, BOB) <= 300, reply


def test_relay_networks_are_not_greylisted(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=300, **{"smtpd.relay_networks": ["127.0.0.0/8"]})
    message = make_message("from our network", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=message)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [message])


def test_greylisting_is_off_without_its_table(mailsrv):
    srv = mailsrv
    srv.add_user(ALICE)
    message = make_message("first and only try", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=message)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [message])


def test_the_table_survives_a_restart(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=2)
    table = srv.spool_dir / "greylist"
    [reply], first_at = attempt(srv, ALICE)
    assert_greylisted(reply, ALICE)
    srv.stop()
    assert table.is_file(), f"no {table} after smtpd stopped\n{srv.log_tail()}"
    srv.start()

    # The pending triplet was remembered: after the delay, the retry
    # passes (a forgotten one would be a first attempt again).
    wait_past(first_at, 2)
    message = make_message("retried across a restart", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=message)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [message])

    # And so is a triplet that passed: accepted at once after the next restart.
    srv.restart()
    again = make_message("known after a restart", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=again)
    assert_accepted(reply, ALICE)
    # A triplet never seen is still greylisted after the restarts.
    [reply], _ = attempt(srv, BOB)
    assert_greylisted(reply, BOB)
    srv.wait_for_delivery(ALICE, [message, again])



def test_an_unknown_recipient_is_refused_not_greylisted(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=300)
    (unknown, known), _ = attempt(srv, ["nobody@example.test", ALICE])
    code, lines = unknown
    assert code == 550 and lines[0].startswith("5.1.1 "), unknown
    assert_greylisted(known, ALICE)


def test_a_reload_keeps_the_table(make_mailsrv):
    srv = greylisted(make_mailsrv, delay=2)
    [reply], first_at = attempt(srv, ALICE)
    assert_greylisted(reply, ALICE)
    reloads = srv.log().count("configuration and certificate reloaded")
    srv.ctl("reload")
    wait_until(lambda: srv.log().count("configuration and certificate reloaded") > reloads,
               15, "smtpd's reload logged")
    wait_past(first_at, 2)
    message = make_message("retried across a reload", sender=SENDER, to=ALICE)
    [reply], _ = attempt(srv, ALICE, message=message)
    assert_accepted(reply, ALICE)
    srv.wait_for_delivery(ALICE, [message])
