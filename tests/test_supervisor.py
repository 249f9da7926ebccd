"""The supervisor: restarts, reload and clean shutdown."""

import os
import signal
import time

from mailtest import (
    as_stored, dot_stuff, greets, make_message, pid_alive, port_closed, queued_id,
    strip_added_headers, wait_until,
)

ALICE = "alice@example.test"


def assert_delivers(srv, subject):
    """A message to alice (who must exist) is delivered."""
    before = len(srv.messages(ALICE))
    srv.send(ALICE, make_message(subject))
    srv.wait_for_messages(ALICE, before + 1)


def test_killed_smtpd_is_restarted(mailsrv):
    mailsrv.add_user(ALICE)
    old = mailsrv.pid("smtpd")
    master = mailsrv.pid("master")

    os.kill(old, signal.SIGKILL)

    new = mailsrv.wait_for_new_pid("smtpd", old, timeout=10)
    wait_until(lambda: greets(mailsrv.smtp_port), 10, "smtpd to accept again")
    assert not pid_alive(old)
    assert pid_alive(new)
    assert mailsrv.pid("master") == master
    assert_delivers(mailsrv, "after smtpd restart")


def test_reload_keeps_serving(mailsrv):
    mailsrv.add_user(ALICE)
    master = mailsrv.pid("master")
    assert_delivers(mailsrv, "before reload")

    mailsrv.ctl("reload")

    wait_until(lambda: greets(mailsrv.smtp_port), 10, "smtpd to accept after reload")
    assert mailsrv.pid("master") == master
    assert mailsrv.running
    assert_delivers(mailsrv, "after reload")


def test_reload_rereads_config(mailsrv):
    mailsrv.set_config("smtpd.max_message_size", 12345)

    mailsrv.ctl("reload")

    def advertised_size():
        with mailsrv.raw() as smtp:
            return smtp.ehlo().get("SIZE")
    wait_until(lambda: advertised_size() == "12345", 10, "SIZE 12345 after reload")


def test_sigterm_stops_foreground_supervisor(mailsrv):
    children = [mailsrv.pid("smtpd"), mailsrv.pid("qmgr")]

    mailsrv.proc.send_signal(signal.SIGTERM)

    assert mailsrv.proc.wait(15) == 0
    wait_until(lambda: not any(pid_alive(p) for p in children), 5,
               "smtpd and qmgr to exit with the supervisor")
    assert port_closed(mailsrv.smtp_port)


def test_graceful_stop_lets_a_transaction_finish(mailsrv):
    mailsrv.add_user(ALICE)
    message = make_message("in flight at stop",
                           body="".join(f"line {n} of the message in flight\n" for n in range(200)))
    payload = dot_stuff(message)
    half = payload.index(b"\r\n", len(payload) // 2) + 2
    conn = mailsrv.raw()
    conn.ehlo()
    conn.expect("MAIL FROM:<sender@remote.test>", 250)
    conn.expect(f"RCPT TO:<{ALICE}>", 250)
    conn.expect("DATA", 354)
    conn.send(payload[:half])

    mailsrv.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    # smtpd(8): on SIGTERM it closes its listening socket at once; once it
    # has, it is shutting down with our transaction half done.
    wait_until(lambda: port_closed(mailsrv.smtp_port), 1, "smtpd to stop listening")
    conn.send(payload[half:])
    assert time.monotonic() - signalled < 1

    queue_id = queued_id(conn.check_reply(conn.read_reply(), 250, "2.0.0",
                                          "end of data during shutdown"))
    try:
        code, lines = conn.read_reply()
    except ConnectionError:
        pass                               # closed without a 421: allowed
    else:
        assert code == 421, f"after the 250: expected 421 or close, got {code} {lines}"
        assert conn.closed(), "not closed after the 421"
    assert mailsrv.proc.wait(30) == 0

    mailsrv.restart()
    [path] = mailsrv.wait_for_messages(ALICE, 1)
    content = path.read_bytes()
    assert strip_added_headers(content) == as_stored(message), f"queue id {queue_id}"


def test_graceful_stop_closes_an_idle_connection(mailsrv):
    conn = mailsrv.raw()
    conn.ehlo()

    mailsrv.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    conn.timeout = 5
    conn.check_reply(conn.read_reply(), 421, "4.3.2", "idle connection at shutdown")
    assert time.monotonic() - signalled < 2, "the 421 was not prompt"
    assert conn.closed()
    assert mailsrv.proc.wait(30) == 0
