r"""The crash harness (design.md, "The promises" 1-3): while senders push
uniquely numbered messages and an IMAP client reads and flags them,
smtpd, qmgr and maildird are killed with SIGKILL at random moments, many
times, and master restarts them. At the end every message that got a 250
is in the Maildir (losses must be zero; duplicates are counted and
reported, as at-least-once delivery allows them), no message file is
half-written, no tmp/ file is older than the run, and the queue drains.

The README's test command runs a short form. The full length:

    CRASH_MESSAGES=5000 CRASH_SECONDS=300 CRASH_SENDERS=8 \
        MAILSRV_BIN_DIR=$PWD/target/debug \
        python3 -m pytest -q -s tests/test_crash_harness.py

(-s shows the figures.)"""

import imaplib
import os
import random
import re
import signal
import smtplib
import threading
import time
from pathlib import Path

from conftest import read_pid
from mailtest import insecure_tls_context, make_message, pid_alive, wait_until

ALICE = "alice@example.test"
SENDER = "load@remote.test"
MESSAGES = int(os.environ.get("CRASH_MESSAGES", "800"))
SENDERS = int(os.environ.get("CRASH_SENDERS", "4"))
# The sending is spread over this long, so kills fall all along it.
SECONDS = float(os.environ.get("CRASH_SECONDS", "30"))
# A daemon is killed only once it has run this long, so that master
# restarts it after a second (a daemon dying sooner is taken for one
# that cannot start, and waits longer each time).
MIN_UPTIME = 5.5
SEQ_RE = re.compile(rb"^X-Crash-Seq: (\d+)\r?$", re.M)
DAEMONS = ("smtpd", "qmgr", "maildird")


def numbered(n: int) -> bytes:
    # The body's last line proves the file is whole.
    return (f"X-Crash-Seq: {n}\r\n".encode()
            + make_message(f"crash {n}", body=f"message {n}\n" + "x" * 200 + f"\nend {n}\n"))


class Senders:
    """Threads that send their share of the numbers, reconnecting while
    smtpd is down; `accepted` holds the numbers that got 250."""

    def __init__(self, srv):
        self.srv = srv
        self.accepted: set[int] = set()
        self.unanswered = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(SENDERS)]

    def run(self, index: int) -> None:
        pending = list(range(index, MESSAGES, SENDERS))
        pause = SECONDS * SENDERS / MESSAGES
        deadline = time.monotonic() + SECONDS + 600
        while pending and time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.srv.smtp_port, timeout=20) as s:
                    while pending:
                        n = pending[0]
                        s.sendmail(SENDER, [ALICE], numbered(n))
                        with self.lock:
                            self.accepted.add(n)
                        pending.pop(0)
                        time.sleep(pause)
            except (OSError, smtplib.SMTPException):
                # smtpd died under us: the message in flight may or may
                # not be queued; it is sent again (a duplicate at most).
                with self.lock:
                    self.unanswered += 1
                time.sleep(0.2)

    def start(self):
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)


class Reader(threading.Thread):
    """An IMAP client that keeps selecting INBOX (moving new/ to cur/) and
    flagging messages, reconnecting while maildird is down."""

    def __init__(self, srv):
        super().__init__(daemon=True)
        self.srv = srv
        self.stop = threading.Event()
        self.sessions = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                imap = imaplib.IMAP4_SSL("127.0.0.1", self.srv.imaps_port, timeout=10,
                                         ssl_context=insecure_tls_context())
                imap.login(ALICE, self.srv.passwords[ALICE])
                self.sessions += 1
                while not self.stop.is_set():
                    typ, data = imap.select("INBOX")
                    count = int(data[0])
                    if count:
                        first = random.randint(1, count)
                        imap.store(f"{first}:{min(count, first + 20)}", "+FLAGS", r"(\Seen)")
                    time.sleep(0.1)
            except (OSError, imaplib.IMAP4.error, ValueError):
                time.sleep(0.2)


class Killer(threading.Thread):
    """SIGKILLs a daemon that has run at least MIN_UPTIME, every
    0.5-2 seconds."""

    def __init__(self, srv):
        super().__init__(daemon=True)
        self.srv = srv
        self.stop = threading.Event()
        self.kills = {d: 0 for d in DAEMONS}
        self.started: dict[int, float] = {}

    def run(self) -> None:
        while not self.stop.wait(random.uniform(0.5, 2.0)):
            now = time.monotonic()
            ready = []
            for daemon in DAEMONS:
                pid = read_pid(self.srv.run_dir / f"{daemon}.pid")
                if pid and pid_alive(pid):
                    first_seen = self.started.setdefault(pid, now)
                    if now - first_seen >= MIN_UPTIME:
                        ready.append((daemon, pid))
            if ready:
                daemon, pid = random.choice(ready)
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.kills[daemon] += 1
                except ProcessLookupError:
                    pass


def maildir_messages(maildir: Path) -> tuple[dict[int, int], list[str]]:
    """Count of files per number in new/ and cur/, and damaged files."""
    counts: dict[int, int] = {}
    damaged = []
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            content = path.read_bytes()
            m = SEQ_RE.search(content)
            if not m:
                damaged.append(path.name)
                continue
            n = int(m[1])
            if not content.rstrip(b"\r\n").endswith(f"end {n}".encode()):
                damaged.append(path.name)
                continue
            counts[n] = counts.get(n, 0) + 1
    return counts, damaged


def tmp_files(srv) -> list[Path]:
    found = list((srv.spool_view() / "tmp").iterdir())
    for tmp in srv.maildir(ALICE).glob("**/tmp"):
        found.extend(p for p in tmp.iterdir() if p.is_file())
    return found


def test_random_kills_of_every_daemon_lose_no_accepted_message(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True,
                       config={"qmgr.min_backoff": 1, "qmgr.max_backoff": 2,
                               "smtpd.max_connections_per_client": 100})
    run_start = time.time()
    # The first kills may come as soon as the senders start.
    time.sleep(MIN_UPTIME)
    senders = Senders(srv)
    reader = Reader(srv)
    killer = Killer(srv)
    senders.start()
    reader.start()
    killer.start()
    try:
        wait_until(lambda: not senders.alive(), 600, "the senders to finish", interval=0.5)
    finally:
        killer.stop.set()
        killer.join()
    # Every daemon back up, then the queue drains.
    for daemon in DAEMONS:
        wait_until(lambda: (pid := read_pid(srv.run_dir / f"{daemon}.pid")) and pid_alive(pid),
                   40, f"{daemon} running again")
    queue_dirs = [srv.spool_view() / d for d in ("incoming", "active", "deferred", "hold")]
    wait_until(lambda: not any(any(d.iterdir()) for d in queue_dirs), 120,
               "the queue to drain", interval=0.5)
    reader.stop.set()
    reader.join(15)

    assert len(senders.accepted) == MESSAGES, "every message is sent until it gets 250"
    counts, damaged = maildir_messages(srv.maildir(ALICE))
    lost = sorted(set(senders.accepted) - set(counts))
    duplicates = sum(c - 1 for c in counts.values())
    kills = sum(killer.kills.values())
    print(f"\ncrash harness: {MESSAGES} messages accepted, {kills} kills "
          f"({', '.join(f'{d} {k}' for d, k in killer.kills.items())}), "
          f"{senders.unanswered} failed connections, {reader.sessions} IMAP sessions, "
          f"losses {len(lost)}, duplicates {duplicates}, damaged files {len(damaged)}, "
          f"{len(list((srv.spool_view() / 'data').iterdir()))} unacknowledged data files "
          "left for qmgr's hourly cleanup")
    assert kills >= 3 and all(killer.kills.values()), killer.kills
    assert not lost, f"{len(lost)} accepted messages lost, e.g. {lost[:10]}"
    assert not damaged, f"half-written message files: {damaged[:10]}"
    stale = [p for p in tmp_files(srv) if p.stat().st_mtime < run_start]
    assert not stale, f"tmp files older than the run: {stale}"
    assert srv.ctl("queue", "list", "--json").stdout.strip() in ("[]", ""), "queue drained"
