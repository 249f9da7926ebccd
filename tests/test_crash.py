"""Crash safety: a message that got `250 queued as` is never lost, whatever
dies (duplicates are allowed: at-least-once delivery)."""

import os
import re
import signal
import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailtest import make_message, queued_id, wait_until

ALICE = "alice@example.test"
SENDER = "load@remote.test"
TOTAL = 500
CONNECTIONS = 4
KILL_AFTER = 100          # deliveries visible in new/ before the kill
# A delivery interrupted by the crash must not wait minutes for its retry.
FAST_RETRY = {"qmgr.min_backoff": 1, "qmgr.max_backoff": 2}
SUBJECT_RE = re.compile(rb"^Subject: crash (\d+)$", re.M)


def crash_message(n: int) -> bytes:
    return make_message(f"crash {n}", body=f"message {n}\nend of message {n}\n",
                        message_id=f"crash-{n}@client.example.test")


def send_share(srv, numbers, accepted: dict, crashed: threading.Event | None) -> None:
    """Send the messages `numbers` over one connection, recording the queue
    ID of each accepted one in `accepted`. Connection errors are only
    tolerated once `crashed` is set."""
    try:
        with srv.smtp() as s:
            for n in numbers:
                assert s.mail(SENDER)[0] == 250
                assert s.rcpt(ALICE)[0] == 250
                code, reply = s.data(crash_message(n))
                assert code == 250, reply
                accepted[n] = queued_id([reply.decode()])
    except (OSError, smtplib.SMTPException):
        if crashed is None or not crashed.is_set():
            raise


def start_senders(pool, srv, accepted, crashed=None):
    return [pool.submit(send_share, srv, range(i, TOTAL, CONNECTIONS), accepted, crashed)
            for i in range(CONNECTIONS)]


class Mailbox:
    """The crash messages in a Maildir's new/, each file read once."""

    def __init__(self, maildir: Path):
        self.new = maildir / "new"
        self.numbers_by_file: dict[str, int] = {}

    def file_count(self) -> int:
        return len(os.listdir(self.new)) if self.new.is_dir() else 0

    def numbers(self) -> set[int]:
        for name in os.listdir(self.new) if self.new.is_dir() else []:
            if name not in self.numbers_by_file:
                content = (self.new / name).read_bytes()
                m = SUBJECT_RE.search(content)
                assert m, f"unexpected message {name}"
                n = int(m[1])
                assert content.endswith(f"\n\nmessage {n}\nend of message {n}\n".encode()), \
                    f"{name} is damaged"
                self.numbers_by_file[name] = n
        return set(self.numbers_by_file.values())

    def wait_for_all(self, wanted, timeout: float = 120) -> None:
        try:
            wait_until(lambda: set(wanted) <= self.numbers(), timeout,
                       "every accepted message in the Maildir", interval=0.2)
        except AssertionError as e:
            missing = sorted(set(wanted) - self.numbers())
            raise AssertionError(f"{e}: {len(missing)} missing, e.g. {missing[:10]}") from None


def test_qmgr_killed_during_delivery_loses_nothing(make_mailsrv):
    srv = make_mailsrv(config=FAST_RETRY)
    srv.add_user(ALICE)
    mailbox = Mailbox(srv.maildir(ALICE))
    accepted: dict[int, str] = {}

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        senders = start_senders(pool, srv, accepted)
        wait_until(lambda: mailbox.file_count() >= KILL_AFTER, 60,
                   f"{KILL_AFTER} deliveries")
        old = srv.pid("qmgr")
        os.kill(old, signal.SIGKILL)
        srv.wait_for_new_pid("qmgr", old, timeout=15)
        for sender in senders:
            sender.result()

    assert len(accepted) == TOTAL
    assert len(set(accepted.values())) == TOTAL, "queue IDs must be unique"
    mailbox.wait_for_all(accepted)


def test_whole_server_killed_and_restarted_loses_nothing(make_mailsrv):
    srv = make_mailsrv(config=FAST_RETRY)
    srv.add_user(ALICE)
    mailbox = Mailbox(srv.maildir(ALICE))
    accepted: dict[int, str] = {}
    crashed = threading.Event()

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        senders = start_senders(pool, srv, accepted, crashed)
        wait_until(lambda: mailbox.file_count() >= KILL_AFTER, 60,
                   f"{KILL_AFTER} deliveries")
        crashed.set()
        srv.crash()
        for sender in senders:
            sender.result()

    # Each delivered message was accepted (a client may not have read its
    # last 250 when the server died).
    assert len(accepted) >= KILL_AFTER - CONNECTIONS
    srv.restart()
    mailbox.wait_for_all(accepted)
    delivered = mailbox.file_count()
    srv.send(ALICE, make_message("after the crash"))
    srv.wait_for_messages(ALICE, delivered + 1)
