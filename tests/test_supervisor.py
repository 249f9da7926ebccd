"""The supervisor: restarts, reload and clean shutdown."""

import os
import signal

from mailtest import greets, make_message, pid_alive, port_closed, wait_until

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
