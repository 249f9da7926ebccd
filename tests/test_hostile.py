"""Hostile sessions against the running daemons (issue 8, promise 5): each
gets a clear refusal, the daemon's memory stays bounded, and ordinary
clients (smtplib, imaplib, poplib) are served while the attack runs.

- Connection floods on SMTP (ports 25 and 587 together), IMAP and POP3:
  MAILSRV_HOSTILE_CONNECTIONS connections (default 10000, about 16 s for
  the three floods on 2 cores) held open from many 127.1.x.y addresses, against
  max_connections = that + 2 and max_connections_per_client = 100. One
  more from a full address gets the per-client refusal, one more past the
  total the total refusal (127.0.0.1 too, then: the bound is for
  everyone); a normal client is served while there is room; once the
  attack lets go, the daemon's open files come back down and clients are
  served again; the same flood a second time costs no more than the
  bound (nothing kept per finished session). RLIMIT_NOFILE of the test
  process (and so of the daemons it starts) is raised for this when
  allowed; the count is cut to what the limit allows, and printed.
- Slowloris: one byte a second on SMTP (25 and 587, a command, and DATA)
  and IMAP, while smtplib and imaplib clients are served. smtpd cuts at
  smtpd.command_timeout / smtpd.data_timeout (3 s here); IMAP has no
  configurable command timeout: before login it is a fixed 60 s (after
  login the idle timeout, at least 30 minutes, so not tried here; nor
  POP3's, at least 600 s).
- Command lines of 16 MiB (SMTP, the submission port's AUTH, IMAP before
  and after login, POP3 before and after login): 500 5.5.x, BAD, -ERR, and
  the session goes on or ends; memory grows far less than a line.
- IMAP literals announcing 4 GiB, 2^64 and 93 GiB (LITERAL+): refused
  without the `+` and without reading them; APPEND over
  maildird.max_append_size refused, exactly that size accepted.
- NUL bytes and invalid UTF-8 in IMAP and POP3 commands: BAD / -ERR, and
  the server goes on (SMTP's are in test_path_safety.py).
- A MIME message nested 10,000 levels deep and one with 100,000 header
  lines, delivered over SMTP, then FETCHed (BODYSTRUCTURE, ENVELOPE,
  BODY[1.1.1...]) and SEARCHed: answered or refused within a bounded time,
  memory bounded, no crash.
- A message of exactly smtpd.max_message_size is accepted and one octet
  more refused with 552 5.3.4, by DATA and by BDAT.

Memory is the daemon's resident set from /proc/<pid>/status: VmRSS
sampled every 20 ms during the attack, and VmHWM (the peak) before and
after; the figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import imaplib
import os
import poplib
import resource
import selectors
import smtplib
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from mailtest import (
    CLIENT_NAME, LOCALHOST, RawIMAP, RawSMTP, as_stored, header, insecure_tls_context,
    make_message, parse_status, resp_code, strip_added_headers, wait_until,
)

ALICE = "alice@example.test"
SENDER = "sender@remote.test"
KiB = 1024
MiB = 1024 * 1024

CONNECTIONS = int(os.environ.get("MAILSRV_HOSTILE_CONNECTIONS", "10000"))
PER_CLIENT = 100           # max_connections_per_client in the flood tests
FREE_SLOTS = 2             # max_connections = the flood + this many
# Files the test process keeps for itself besides the flood's sockets.
SPARE_FILES = 1024
# Resident memory a held session may cost the daemon, and a fixed
# allowance (allocator arenas): a flood of N may add N x this + that, +
# LOGIN_MIB for the normal clients' logins. An idle smtpd session holds
# 80 KiB of buffers (64 KiB to read, 16 KiB to write): the first flood
# touches little of them (about 25 KiB a session resident), later ones
# get pages the allocator has already used, and reach about 100 KiB.
PER_CONNECTION_KIB = 128
FLOOD_SLACK_MIB = 8
# Growth allowed while 16 MiB lines come in: less than one line.
LINE_SLACK_MIB = 8
# Checking a password: Argon2id's default memory cost, 19 MiB, for each
# login in progress (at most 2 x cores at once; the tests log in one at a
# time).
LOGIN_MIB = 20
MEGA_LINE = 16 * MiB

IMAP_LOGIN_TIMEOUT = 60    # maildird's fixed timeout before login (server.rs)
SMTP_TIMEOUT = 3           # smtpd.command_timeout and data_timeout here


# --------------------------------------------------------------------------
# Measuring a daemon
# --------------------------------------------------------------------------

def status_kib(pid: int, field: str) -> int:
    """A `kB` field (VmRSS, VmHWM) of /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class MemoryWatch:
    """The resident memory of `pid` while the block runs: VmRSS before,
    sampled every 20 ms, and VmHWM before and after. `growth_kib` is the
    peak during the block minus VmRSS before it."""

    def __init__(self, pid: int, what: str):
        self.pid = pid
        self.what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.sampled_max = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.sampled_max = max(self.sampled_max, status_kib(self.pid, "VmRSS"))
            except (OSError, AssertionError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> "MemoryWatch":
        self.rss_before = status_kib(self.pid, "VmRSS")
        self.hwm_before = status_kib(self.pid, "VmHWM")
        self.sampled_max = self.rss_before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_after = status_kib(self.pid, "VmRSS")
        self.hwm_after = status_kib(self.pid, "VmHWM")

    @property
    def peak_kib(self) -> int:
        # VmHWM only says something new if it rose during the block.
        if self.hwm_after > self.hwm_before:
            return max(self.hwm_after, self.sampled_max)
        return self.sampled_max

    @property
    def growth_kib(self) -> int:
        return self.peak_kib - self.rss_before

    def check(self, limit_kib: float) -> None:
        """Print the figures; assert the growth stays within `limit_kib`."""
        print(f"\n[memory] {self.what}: pid {self.pid} VmRSS {self.rss_before / KiB:.1f} MiB"
              f" before, peak {self.peak_kib / KiB:.1f} MiB (+{self.growth_kib / KiB:.1f} MiB,"
              f" limit +{limit_kib / KiB:.1f} MiB), {self.rss_after / KiB:.1f} MiB after;"
              f" VmHWM {self.hwm_before / KiB:.1f} -> {self.hwm_after / KiB:.1f} MiB")
        assert self.growth_kib <= limit_kib, (
            f"{self.what}: resident memory grew by {self.growth_kib / KiB:.1f} MiB,"
            f" more than {limit_kib / KiB:.1f} MiB")


def no_panic(srv) -> None:
    log = srv.log()
    assert "panicked" not in log and "RUST_BACKTRACE" not in log, srv.log_tail()


# --------------------------------------------------------------------------
# Normal clients
# --------------------------------------------------------------------------

def smtp_client(srv) -> bytes:
    """smtplib on port 25: one message to alice. Returns it."""
    message = make_message(f"normal {uuid.uuid4().hex[:8]}")
    with smtplib.SMTP(LOCALHOST, srv.smtp_port, local_hostname=CLIENT_NAME, timeout=20) as s:
        assert s.sendmail(SENDER, [ALICE], message) == {}
    return message


def submission_client(srv) -> bytes:
    """smtplib on the submission port, STARTTLS and AUTH as alice: one
    message to alice. Returns it."""
    message = make_message(f"submitted {uuid.uuid4().hex[:8]}", sender=ALICE)
    with smtplib.SMTP(LOCALHOST, srv.submission_port, local_hostname=CLIENT_NAME,
                      timeout=20) as s:
        s.starttls(context=insecure_tls_context())
        s.login(ALICE, srv.passwords[ALICE])
        assert s.sendmail(ALICE, [ALICE], message) == {}
    return message


def imap_client(srv) -> None:
    """imaplib on the plain IMAP port: LOGIN, SELECT, NOOP, LOGOUT."""
    client = imaplib.IMAP4(LOCALHOST, srv.imap_port, timeout=20)
    try:
        client.login(ALICE, srv.passwords[ALICE])
        typ, _ = client.select("INBOX")
        assert typ == "OK"
        assert client.noop()[0] == "OK"
    finally:
        client.logout()


def pop3_client(srv) -> None:
    """poplib on the plain POP3 port: USER, PASS, STAT, QUIT."""
    client = poplib.POP3(LOCALHOST, srv.pop3_port, timeout=20)
    try:
        client.user(ALICE)
        client.pass_(srv.passwords[ALICE])
        client.stat()
    finally:
        client.quit()


# --------------------------------------------------------------------------
# Many connections
# --------------------------------------------------------------------------

def attacker_address(n: int) -> str:
    """The n-th attacking client address: 127.1.x.y (127.0.0.1 stays the
    normal clients')."""
    return f"127.1.{n // 250}.{n % 250 + 1}"


def connect_from(source: str, port: int, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((LOCALHOST, port))
    except BaseException:
        s.close()
        raise
    return s


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def first_lines(socks: list[socket.socket], timeout: float = 60) -> list[bytes]:
    """The first line each socket receives, in order (what came before the
    close, without CRLF, when the server closes first)."""
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    for s in socks:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
        buffers[s] = b""
    done: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < len(socks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(socks) - len(done)} of {len(socks)} connections"
                                     f" got no first line within {timeout}s")
            for key, _ in selector.select(min(remaining, 1.0)):
                s = key.fileobj
                try:
                    chunk = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                buffers[s] += chunk
                if b"\r\n" in buffers[s] or not chunk:
                    done[s] = buffers[s].split(b"\r\n")[0]
                    selector.unregister(s)
    finally:
        selector.close()
        for s in socks:
            s.settimeout(10)
    return [done[s] for s in socks]


def first_line_and_close(source: str, port: int) -> tuple[bytes, bool]:
    """Connect from `source`: (the first line, whether the server then
    closes within 5 s)."""
    with connect_from(source, port) as s:
        [line] = first_lines([s], timeout=10)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
            closed = True
        except TimeoutError:
            closed = False
        except OSError:
            closed = True
    return line, closed


def greeted_from(source: str, port: int, greeting: bytes) -> socket.socket | None:
    """A connection from `source` if it is greeted, else None (closed)."""
    s = connect_from(source, port)
    [line] = first_lines([s], timeout=10)
    if line.startswith(greeting):
        return s
    s.close()
    return None


@dataclass
class Flood:
    daemon: str
    table: str                                   # where max_connections lives
    ports: Callable[..., list[int]]
    greeting: bytes
    per_client_refusal: bytes
    total_refusal: bytes
    clients: tuple[Callable, ...]                # normal clients, each one session


FLOODS = {
    "smtp": Flood("smtpd", "smtpd", lambda srv: [srv.smtp_port, srv.submission_port],
                  b"220 ", b"421 4.7.0 ", b"421 4.3.2 ", (smtp_client, submission_client)),
    "imap": Flood("maildird", "maildird.limits", lambda srv: [srv.imap_port], b"* OK",
                  b"* BYE [UNAVAILABLE]", b"* BYE [UNAVAILABLE]", (imap_client,)),
    "pop3": Flood("maildird", "maildird.limits", lambda srv: [srv.pop3_port], b"+OK",
                  b"-ERR [SYS/TEMP]", b"-ERR [SYS/TEMP]", (pop3_client,)),
}


@pytest.fixture
def flood_size():
    """How many connections the flood may hold: MAILSRV_HOSTILE_CONNECTIONS,
    cut to what RLIMIT_NOFILE allows after raising it (the daemons started
    afterwards inherit the raised limit). The old limit comes back at the
    end, after the installation has stopped."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNECTIONS + SPARE_FILES
    for limits in ((max(soft, want), max(hard, want)), (min(max(soft, want), hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    allowed = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    count = min(CONNECTIONS, allowed - SPARE_FILES)
    assert count >= 2 * PER_CLIENT, f"RLIMIT_NOFILE {allowed} leaves room for {count} connections"
    print(f"\n[flood] RLIMIT_NOFILE {soft}/{hard} -> {allowed}; holding {count} connections"
          f" (asked {CONNECTIONS})")
    try:
        yield count
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("protocol", list(FLOODS))
def test_connection_flood(flood_size, make_mailsrv, protocol):
    flood = FLOODS[protocol]
    count = flood_size
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True, config={
        f"{flood.table}.max_connections": count + FREE_SLOTS,
        f"{flood.table}.max_connections_per_client": PER_CLIENT,
        "maildird.allow_plaintext_auth": True,
    })
    srv.wait_pop3_ready()
    pid = srv.pid(flood.daemon)
    ports = flood.ports(srv)
    time.sleep(0.5)   # the readiness probes' sessions end
    files_before = open_files(pid)
    sent: list[bytes] = []
    held: list[socket.socket] = []
    try:
        with MemoryWatch(pid, f"{protocol} with {count} connections held") as memory:
            started = time.monotonic()
            for i in range(count):
                held.append(connect_from(attacker_address(i // PER_CLIENT),
                                         ports[i % len(ports)]))
            lines = first_lines(held)
            took = time.monotonic() - started
            not_greeted = [line for line in lines if not line.startswith(flood.greeting)]
            assert not not_greeted, (f"{len(not_greeted)} of {count} connections not greeted,"
                                     f" e.g. {not_greeted[:3]}\n{srv.log_tail()}")
            files_held = open_files(pid)
            print(f"\n[flood] {protocol}: {count} connections open and greeted in {took:.1f} s;"
                  f" {flood.daemon} has {files_before} open files before, {files_held} now")
            assert files_held >= files_before + count

            # One more from an address that has PER_CLIENT open.
            line, closed = first_line_and_close(attacker_address(0), ports[0])
            assert line.startswith(flood.per_client_refusal), line
            assert closed, "the connection over the per-client limit was not closed"

            # Normal clients are served meanwhile, on the free slots.
            for client in flood.clients:
                started = time.monotonic()
                message = client(srv)
                print(f"[flood] {protocol}: {client.__name__} served in"
                      f" {time.monotonic() - started:.2f} s during the flood")
                if message is not None:
                    sent.append(message)

            # Take the free slots from new addresses; then the total is
            # reached: a new address is refused, and so is 127.0.0.1.
            fresh = iter(range(count // PER_CLIENT + 1, 10 ** 6))
            for _ in range(FREE_SLOTS):
                address = attacker_address(next(fresh))
                held.append(wait_until(lambda: greeted_from(address, ports[0], flood.greeting),
                                       10, f"a free slot for {address}", interval=0.1))
            for source in (attacker_address(next(fresh)), LOCALHOST):
                line, closed = first_line_and_close(source, ports[-1])
                assert line.startswith(flood.total_refusal), (source, line)
                assert closed, f"the connection from {source} over the total was not closed"
        memory.check(count * PER_CONNECTION_KIB + (FLOOD_SLACK_MIB + LOGIN_MIB) * KiB)
    finally:
        close_all(held)

    # The sessions end: the daemon's open files come back down.
    try:
        wait_until(lambda: open_files(pid) <= files_before + 5, 30,
                   f"{flood.daemon}'s open files back to about {files_before}", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}; it has {open_files(pid)}") from None
    print(f"[flood] {protocol}: {flood.daemon} has {open_files(pid)} open files after the flood;"
          f" VmRSS {status_kib(pid, 'VmRSS') / KiB:.1f} MiB")
    for client in flood.clients:
        message = client(srv)
        if message is not None:
            sent.append(message)
    # Every slot came back: the same flood again is greeted whole, and
    # costs no more memory than the first (nothing kept per session).
    again: list[socket.socket] = []
    try:
        with MemoryWatch(pid, f"{protocol}: the same flood again") as second:
            for i in range(count):
                again.append(connect_from(attacker_address(i // PER_CLIENT),
                                          ports[i % len(ports)]))
            lines = first_lines(again)
        assert all(line.startswith(flood.greeting) for line in lines), set(lines)
    finally:
        close_all(again)
    second_growth = second.peak_kib - memory.rss_before
    print(f"[flood] {protocol}: peak VmRSS {memory.peak_kib / KiB:.1f} MiB in the first flood,"
          f" {second.peak_kib / KiB:.1f} MiB in the second: +{second_growth / KiB:.1f} MiB"
          f" over the start, {second_growth / count:.1f} KiB a connection")
    assert second_growth <= count * PER_CONNECTION_KIB + (FLOOD_SLACK_MIB + LOGIN_MIB) * KiB, (
        "the second flood needed more memory than the bound")
    assert srv.pid(flood.daemon) == pid, f"{flood.daemon} was restarted"
    if sent:
        srv.wait_for_delivery(ALICE, sent)
    no_panic(srv)


# --------------------------------------------------------------------------
# Slowloris
# --------------------------------------------------------------------------

class Trickler:
    """A connection that, once `setup` is done, sends `payload` one byte
    per tick and records what the server says and when it hangs up."""

    def __init__(self, name: str, sock: socket.socket, payload: bytes):
        self.name = name
        self.sock = sock
        self.payload = payload
        self.sent = 0
        self.received = b""
        self.started = time.monotonic()
        self.cut_after: float | None = None
        sock.setblocking(False)

    def tick(self) -> None:
        if self.cut_after is not None or self.sent >= len(self.payload):
            return
        try:
            self.sock.send(self.payload[self.sent:self.sent + 1])
            self.sent += 1
        except BlockingIOError:
            pass
        except OSError:
            self.hung_up()

    def readable(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.received += chunk
        if not chunk:
            self.hung_up()

    def hung_up(self) -> None:
        if self.cut_after is None:
            self.cut_after = time.monotonic() - self.started


class SourcedSMTP(RawSMTP):
    """RawSMTP from a chosen client address."""

    def __init__(self, port: int, source: str, timeout: float = 10.0):
        self.timeout = timeout
        self.sock = connect_from(source, port, timeout)
        self._buf = b""
        self.eof = False
        self.history = []


def smtp_trickler(name: str, source: str, port: int, payload: bytes,
                  before: tuple[bytes, ...] = ()) -> Trickler:
    """Greeted, `before` lines exchanged (each must get 250 or 354), then
    trickling `payload`."""
    conn = SourcedSMTP(port, source)
    try:
        conn.greeting()
        for line in before:
            code, lines = conn.command(line)
            assert code in (250, 354), (line, code, lines)
    except BaseException:
        conn.close()
        raise
    return Trickler(name, conn.sock, payload)


def imap_trickler(srv, name: str, source: str, payload: bytes) -> Trickler:
    sock = connect_from(source, srv.imap_port)
    [greeting] = first_lines([sock], timeout=10)
    assert greeting.startswith(b"* OK"), greeting
    return Trickler(name, sock, payload)


def test_slowloris(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True, config={
        "smtpd.command_timeout": SMTP_TIMEOUT, "smtpd.data_timeout": SMTP_TIMEOUT,
        "maildird.allow_plaintext_auth": True,
    })
    ehlo = f"EHLO {CLIENT_NAME}".encode()
    slow_line = f"EHLO {CLIENT_NAME}\r\n".encode()
    slow_mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    slow_data = make_message("never ends", body="x" * 200)
    imap_line = b'a1 LOGIN "alice@example.test" "' + b"x" * 150 + b'"\r\n'
    assert min(len(slow_line), len(slow_mail)) > 3 * SMTP_TIMEOUT + 5
    assert len(imap_line) > IMAP_LOGIN_TIMEOUT + 30

    tricklers: list[Trickler] = []
    address = iter(range(10 ** 6))
    try:
        for i in range(4):
            tricklers.append(imap_trickler(srv, f"imap-login-{i}",
                                           f"127.2.0.{next(address) + 1}", imap_line))
        for i in range(3):
            tricklers.append(smtp_trickler(f"smtp-ehlo-{i}", f"127.2.0.{next(address) + 1}",
                                           srv.smtp_port, slow_line))
            tricklers.append(smtp_trickler(f"submission-ehlo-{i}",
                                           f"127.2.0.{next(address) + 1}",
                                           srv.submission_port, slow_line))
            tricklers.append(smtp_trickler(f"smtp-mail-{i}", f"127.2.0.{next(address) + 1}",
                                           srv.smtp_port, slow_mail, before=(ehlo,)))
        tricklers.append(smtp_trickler("smtp-data", f"127.2.0.{next(address) + 1}",
                                       srv.smtp_port, slow_data,
                                       before=(ehlo, f"MAIL FROM:<{SENDER}>".encode(),
                                               f"RCPT TO:<{ALICE}>".encode(), b"DATA")))

        # Normal clients, one after another, all the while.
        stop = threading.Event()
        served: list[str] = []
        failures: list[str] = []
        sent: list[bytes] = []

        def normal_clients() -> None:
            while not stop.is_set():
                for client in (smtp_client, imap_client):
                    try:
                        started = time.monotonic()
                        message = client(srv)
                        served.append(f"{client.__name__} {time.monotonic() - started:.2f}s")
                        if message is not None:
                            sent.append(message)
                    except Exception as e:   # noqa: BLE001: reported below
                        failures.append(f"{client.__name__}: {e!r}")
                stop.wait(1.0)

        smtpd_memory = MemoryWatch(srv.pid("smtpd"), "smtpd during the slowloris").__enter__()
        maildird_memory = MemoryWatch(srv.pid("maildird"),
                                      "maildird during the slowloris").__enter__()
        clients = threading.Thread(target=normal_clients, daemon=True)
        clients.start()
        selector = selectors.DefaultSelector()
        for t in tricklers:
            selector.register(t.sock, selectors.EVENT_READ, t)
        deadline = time.monotonic() + IMAP_LOGIN_TIMEOUT + 20
        try:
            while time.monotonic() < deadline and any(t.cut_after is None for t in tricklers):
                for t in tricklers:
                    t.tick()
                tick_end = time.monotonic() + 1.0
                while (remaining := tick_end - time.monotonic()) > 0:
                    for key, _ in selector.select(remaining):
                        key.data.readable()
                        if key.data.cut_after is not None:
                            selector.unregister(key.fileobj)
        finally:
            stop.set()
            clients.join(60)
            selector.close()
            smtpd_memory.__exit__(None, None, None)
            maildird_memory.__exit__(None, None, None)
    finally:
        close_all([t.sock for t in tricklers])

    for t in tricklers:
        print(f"[slowloris] {t.name}: {t.sent} of {len(t.payload)} bytes sent, cut after"
              f" {t.cut_after if t.cut_after is None else round(t.cut_after, 1)} s:"
              f" {t.received[-120:]!r}")
    print(f"[slowloris] {len(served)} normal sessions served meanwhile, {len(failures)} failed")
    smtpd_memory.check(16 * MiB / KiB)
    maildird_memory.check((16 + LOGIN_MIB) * MiB / KiB)
    assert failures == [], failures
    assert len(served) >= 10, served
    for t in tricklers:
        assert t.cut_after is not None, f"{t.name}: not cut after {t.sent} bytes\n{srv.log_tail()}"
        if t.name.startswith("imap"):
            assert t.cut_after <= IMAP_LOGIN_TIMEOUT + 10, (t.name, t.cut_after)
            assert b"* BYE" in t.received, (t.name, t.received)
        else:
            assert t.cut_after <= SMTP_TIMEOUT + 4, (t.name, t.cut_after)
            assert b"421 4.4.2 " in t.received, (t.name, t.received)
        assert t.sent < len(t.payload), f"{t.name}: the whole payload went through"
    srv.wait_for_delivery(ALICE, sent)
    # The DATA that never ended left nothing behind.
    srv.wait_spool_empty()
    no_panic(srv)


# --------------------------------------------------------------------------
# Command lines of megabytes
# --------------------------------------------------------------------------

def send_mega_line(conn, prefix: bytes, size: int = MEGA_LINE, end: bytes = b"\r\n") -> bool:
    """Send `prefix` + `size` octets of "x" + `end` in pieces; False if the
    server closed the connection meanwhile (what it said stays readable)."""
    piece = b"x" * MiB
    try:
        conn.send(prefix)
        for _ in range(size // len(piece)):
            conn.send(piece)
        conn.send(end)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def goes_on_or_closed(conn, still_works: Callable[[], None]) -> str:
    """After a refused line: either the session still works (`still_works`
    passes) or the server has closed it. Returns which."""
    try:
        still_works()
        return "session goes on"
    except ConnectionError:
        assert conn.closed(), "the server neither answers nor closes"
        return "connection closed"


def test_mega_lines_smtp(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"smtpd.allow_plaintext_auth": True})
    pid = srv.pid("smtpd")
    with MemoryWatch(pid, f"smtpd reading 7 command lines of {MEGA_LINE // MiB} MiB") as memory:
        for port, prefix in ((srv.smtp_port, b"EHLO "), (srv.smtp_port, b"NOOP "),
                             (srv.smtp_port, b"MAIL FROM:<"), (srv.submission_port, b"EHLO "),
                             (srv.submission_port, b"AUTH PLAIN ")):
            with RawSMTP(port, timeout=30) as conn:
                conn.greeting()
                if prefix != b"EHLO ":
                    conn.ehlo()
                send_mega_line(conn, prefix)
                code, lines = conn.read_reply()
                assert code == 500 and lines[0].startswith("5.5."), (port, prefix, code, lines)
                outcome = goes_on_or_closed(conn, lambda: conn.expect("NOOP", 250))
                print(f"[mega] port {port} {prefix!r}: {code} {lines[0]}; {outcome}")
        # AUTH LOGIN's answer line.
        with RawSMTP(srv.submission_port, timeout=30) as conn:
            conn.greeting()
            conn.ehlo()
            conn.expect("AUTH LOGIN", 334)
            send_mega_line(conn, b"")
            code, lines = conn.read_reply()
            assert code in (500, 501) and lines[0].startswith("5."), (code, lines)
            print(f"[mega] AUTH LOGIN answer line: {code} {lines[0]}")
        # A line with no end at all, then a line end.
        with RawSMTP(srv.smtp_port, timeout=30) as conn:
            conn.greeting()
            send_mega_line(conn, b"HELO ", end=b"")
            conn.send(b"\r\n")
            code, lines = conn.read_reply()
            assert code == 500 and lines[0].startswith("5.5."), (code, lines)
    memory.check(LINE_SLACK_MIB * MiB / KiB)
    srv.send(ALICE)
    srv.wait_for_messages(ALICE, 1)
    assert srv.pid("smtpd") == pid
    no_panic(srv)


def imap_refuses_as_too_long(response: bytes, tag: str) -> bool:
    """A BAD (tagged, or untagged when the tag was not read) or a tagged
    NO [TOOBIG]."""
    return (response.startswith((f"{tag} BAD".encode(), b"* BAD"))
            or (response.startswith(f"{tag} NO".encode())
                and (resp_code(response) or ("",))[0] == "TOOBIG"))


def test_mega_lines_imap(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True,
                       config={"maildird.allow_plaintext_auth": True})
    pid = srv.pid("maildird")
    with MemoryWatch(pid, f"maildird reading IMAP lines of {MEGA_LINE // MiB} MiB") as memory:
        for login in (False, True):
            with srv.raw_imap(tls=False, timeout=30,
                              user=ALICE if login else None) as conn:
                for text in ((b"SEARCH SUBJECT \"", b"FETCH 1:* (FLAGS ", b"SELECT ")
                             if login else (b"LOGIN ", b"CAPABILITY ")):
                    if login:
                        conn.select("INBOX")
                    tag = conn.tag()
                    send_mega_line(conn, tag.encode() + b" " + text)
                    response = conn.read_response()
                    assert imap_refuses_as_too_long(response, tag), (text, response[:200])
                    outcome = goes_on_or_closed(conn, lambda: conn.expect("NOOP"))
                    print(f"[mega] IMAP {'after' if login else 'before'} login {text!r}:"
                          f" {response[:80]!r}; {outcome}")
                    if outcome != "session goes on":
                        break
    memory.check((LINE_SLACK_MIB + LOGIN_MIB) * MiB / KiB)
    imap_client(srv)
    assert srv.pid("maildird") == pid
    no_panic(srv)


def test_mega_lines_pop3(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"maildird.allow_plaintext_auth": True})
    srv.wait_pop3_ready()
    srv.send(ALICE)
    srv.wait_for_messages(ALICE, 1)
    pid = srv.pid("maildird")
    with MemoryWatch(pid, f"maildird reading POP3 lines of {MEGA_LINE // MiB} MiB") as memory:
        for login in (False, True):
            with srv.raw_pop3(tls=False, timeout=30) as conn:
                if login:
                    conn.expect_ok(f"USER {ALICE}")
                    conn.expect_ok(f"PASS {srv.passwords[ALICE]}")
                def still_works() -> None:
                    if login:
                        conn.expect_ok("STAT")
                    else:
                        conn.multiline("CAPA")

                for text in (b"USER ", b"NOOP ", b"LIST ") if not login else (b"RETR ", b"NOOP "):
                    send_mega_line(conn, text)
                    status = conn.read_status()
                    assert status.startswith(b"-ERR"), (text, status)
                    outcome = goes_on_or_closed(conn, still_works)
                    print(f"[mega] POP3 {'after' if login else 'before'} login {text!r}:"
                          f" {status!r}; {outcome}")
                    if outcome != "session goes on":
                        break
                if login:
                    conn.expect_ok("QUIT")
    memory.check((LINE_SLACK_MIB + LOGIN_MIB) * MiB / KiB)
    wait_until(lambda: _pop3_ok(srv), 10, "a POP3 login after the long lines")
    assert srv.pid("maildird") == pid
    no_panic(srv)


def _pop3_ok(srv) -> bool:
    try:
        pop3_client(srv)
        return True
    except poplib.error_proto as e:   # the last session's lock is released a moment later
        assert b"[IN-USE]" in e.args[0], e
        return False


# --------------------------------------------------------------------------
# IMAP literals
# --------------------------------------------------------------------------

MAX_APPEND = 100_000


def refused_literal(conn: RawIMAP, command: bytes, then: bytes = b"",
                    timeout: float = 10) -> bytes:
    """Send `tag command` (ending in a literal announcement) and `then`;
    the server must refuse without `+`, within `timeout`. Returns the
    refusal, or b"<closed>" when the server hung up instead."""
    tag = conn.tag()
    conn.send(tag.encode() + b" " + command + b"\r\n")
    try:
        conn.send(then)
    except (BrokenPipeError, ConnectionResetError):
        pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = conn.read_response(deadline)
        except TimeoutError:
            raise AssertionError(f"{command!r}: no answer within {timeout}s"
                                 f" (is the server reading the literal?)") from None
        except ConnectionError:
            return b"<closed>"
        assert not response.startswith(b"+"), f"{command!r}: the server invites the literal"
        if response.startswith((tag.encode() + b" ", b"* BAD", b"* BYE")):
            assert imap_refuses_as_too_long(response, tag) or response.startswith(b"* BYE"), (
                command, response)
            return response


def inbox_count(srv) -> int:
    with srv.raw_imap(tls=False, user=ALICE) as conn:
        return parse_status(conn.untagged(conn.expect("STATUS INBOX (MESSAGES)"))[-1])[1][
            "MESSAGES"]


def test_huge_imap_literals(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True, config={
        "maildird.allow_plaintext_auth": True, "maildird.max_append_size": MAX_APPEND})
    pid = srv.pid("maildird")
    results = []
    with MemoryWatch(pid, "maildird refusing huge literals") as memory:
        with srv.raw_imap(tls=False) as conn:
            for announcement in (b"{4294967296}", b"{18446744073709551616}",
                                 b"{99999999999999999999999999}"):
                response = refused_literal(conn, b"LOGIN " + announcement)
                results.append((b"LOGIN " + announcement, response))
                if response == b"<closed>":
                    break
                conn.expect("NOOP")
        with srv.raw_imap(tls=False, user=ALICE) as conn:
            for command in (b"APPEND INBOX {4294967296}", b"APPEND INBOX {18446744073709551616}",
                            b"APPEND INBOX (\\Seen) {%d}" % (MAX_APPEND + 1),
                            b"SEARCH SUBJECT {4294967296}", b"LOGIN a {4294967296}"):
                response = refused_literal(conn, command)
                results.append((command, response))
                assert response != b"<closed>", f"{command!r}: the session was dropped"
                conn.expect("NOOP")
            # LITERAL+: the octets come without waiting; one too many is
            # refused and the session goes on.
            response = refused_literal(conn, b"APPEND INBOX {%d+}" % (MAX_APPEND + 1),
                                       then=b"x" * (MAX_APPEND + 1) + b"\r\n")
            results.append((b"APPEND INBOX {%d+} + the octets" % (MAX_APPEND + 1), response))
            assert response != b"<closed>"
            conn.expect("NOOP")
            # Exactly the limit is taken.
            message = make_message("exactly max_append_size", body="y" * 10)
            message += b"z" * (MAX_APPEND - len(message) - 2) + b"\r\n"
            assert len(message) == MAX_APPEND
            conn.append("INBOX", message)
    for command, response in results:
        print(f"[literal] {command!r}: {response[:100]!r}")
    memory.check((8 + LOGIN_MIB) * MiB / KiB)
    assert inbox_count(srv) == 1
    imap_client(srv)
    assert srv.pid("maildird") == pid
    no_panic(srv)


@pytest.mark.parametrize("login", [False, True], ids=["before-login", "after-login"])
def test_literal_plus_of_93_gigabytes(make_mailsrv, login):
    """A non-synchronizing literal far past any limit, with its first
    64 KiB: refused (BAD/NO [TOOBIG], or BYE and close) at once, not read
    to its end: 93 GB would hold the session for as long as the client
    likes to trickle them."""
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True,
                       config={"maildird.allow_plaintext_auth": True})
    pid = srv.pid("maildird")
    with srv.raw_imap(tls=False, user=ALICE if login else None) as conn:
        command = b"APPEND INBOX {99999999999+}" if login else b"LOGIN {99999999999+}"
        started = time.monotonic()
        response = refused_literal(conn, command, then=b"x" * 65536)
        print(f"\n[literal] {command!r} + 64 KiB: {response[:100]!r}"
              f" after {time.monotonic() - started:.2f} s")
    assert inbox_count(srv) == 0
    imap_client(srv)
    assert srv.pid("maildird") == pid
    no_panic(srv)


# --------------------------------------------------------------------------
# NUL and invalid UTF-8 in IMAP and POP3 commands
# --------------------------------------------------------------------------

# (line, accepted tagged answers); the tag may be unreadable, then `* BAD`.
IMAP_HOSTILE_BEFORE_LOGIN = [
    (b"n1 NOOP\x00", ("BAD",)),
    (b"n2 NO\x00OP", ("BAD",)),
    (b"\x00n3 NOOP", ("BAD",)),
    (b"n4\x00 NOOP", ("BAD",)),
    (b"n5 CAPABILITY \x00", ("BAD",)),
    (b"n6 \xff\xfe\xfd", ("BAD",)),
    (b"\xff\xfe NOOP", ("BAD",)),
    (b"n7 NOOP \xc3\x28", ("BAD",)),
    (b'n8 LOGIN "alice@example.test\x00" "pw"', ("BAD", "NO")),
    (b'n9 LOGIN "\xc3\x28@example.test" "pw"', ("BAD", "NO")),
    (b'n10 LOGIN alice@example.test "pw\xff"', ("BAD", "NO")),
]
IMAP_HOSTILE_AFTER_LOGIN = [
    (b"m1 FETCH 1 (FLAGS\x00)", ("BAD",)),
    (b"m2 FETCH 1\x00 FLAGS", ("BAD",)),
    (b"m3 FETCH \xff (FLAGS)", ("BAD",)),
    (b'm4 SEARCH SUBJECT "a\x00b"', ("BAD",)),
    (b'm5 SEARCH SUBJECT "\xff\xfe"', ("BAD",)),
    (b'm6 SEARCH CHARSET UTF-8 SUBJECT "\xc3\x28"', ("BAD", "NO")),
    (b"m7 STORE 1 +FLAGS (\\Seen\x00)", ("BAD",)),
    (b"m8 STORE 1 +FLAGS (\xff\xfe)", ("BAD",)),
    (b"m9 STORE 1 +FLAGS (k\x00w)", ("BAD",)),
    (b"m10 UID\x00 FETCH 1 FLAGS", ("BAD",)),
    (b"m11 NOOP\x00\xff", ("BAD",)),
]


def imap_answer(conn: RawIMAP, line: bytes) -> bytes:
    """Send a raw line and a NOOP after it; the status response (tagged,
    with whatever tag the server made of it, or `* BAD`) that answered the
    line. The NOOP must then succeed: the session goes on."""
    noop = conn.tag()
    conn.send(line + b"\r\n" + noop.encode() + b" NOOP\r\n")
    responses = conn.read_until_tagged(noop)
    assert responses[-1].startswith(f"{noop} OK".encode()), responses
    answers = [r for r in responses[:-1] if not r.startswith((b"* OK", b"* NO "))
               and r.split(b" ")[1:2] in ([b"OK"], [b"NO"], [b"BAD"])]
    assert len(answers) == 1, f"{line!r}: answered by {responses}"
    return answers[0]


def test_nul_and_invalid_utf8_in_imap(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True,
                       config={"maildird.allow_plaintext_auth": True})
    srv.send(ALICE)
    srv.wait_for_messages(ALICE, 1)
    pid = srv.pid("maildird")
    wrong = []
    with srv.raw_imap(tls=False) as conn:
        for line, allowed in IMAP_HOSTILE_BEFORE_LOGIN:
            response = imap_answer(conn, line)
            status = response.split(b" ")[1].decode(errors="replace")
            print(f"[nul] IMAP {line!r}: {response[:100]!r}")
            if status not in allowed:
                wrong.append((line, response))
        conn.login(ALICE, srv.passwords[ALICE])
        conn.select("INBOX")
        for line, allowed in IMAP_HOSTILE_AFTER_LOGIN:
            response = imap_answer(conn, line)
            status = response.split(b" ")[1].decode(errors="replace")
            print(f"[nul] IMAP {line!r}: {response[:100]!r}")
            if status not in allowed:
                wrong.append((line, response))
        [flags] = [r for r in conn.untagged(conn.expect("FETCH 1 FLAGS")) if b"FETCH" in r]
        assert b"\x00" not in flags and b"\xff" not in flags and b"\xef\xbf\xbd" not in flags, flags
    assert wrong == [], "hostile lines not refused as expected:\n" + "\n".join(
        f"  {line!r}: {response!r}" for line, response in wrong)
    imap_client(srv)
    assert srv.pid("maildird") == pid
    no_panic(srv)


POP3_HOSTILE_BEFORE_LOGIN = [
    b"CAPA\x00", b"CA\x00PA", b"\x00CAPA", b"\xff\xfe\xfd", b"CAPA \xc3\x28", b"STLS\x00",
    b"QUIT\x00", b"AUTH PLAIN \x00",
]
POP3_HOSTILE_AFTER_LOGIN = [
    b"STAT\x00", b"LIST 1\x00", b"RETR \x001", b"UIDL \xff", b"TOP 1 0\x00", b"DELE 1\x00",
    b"DELE \xc3\x28", b"NOOP \xc3\x28", b"RSET\x00", b"QUIT\xff",
]


def test_nul_and_invalid_utf8_in_pop3(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"maildird.allow_plaintext_auth": True})
    srv.wait_pop3_ready()
    srv.send(ALICE)
    srv.wait_for_messages(ALICE, 1)
    pid = srv.pid("maildird")
    password = srv.passwords[ALICE].encode()
    alice = ALICE.encode()
    wrong = []
    with srv.raw_pop3(tls=False) as conn:
        for line in POP3_HOSTILE_BEFORE_LOGIN:
            status = conn.command(line)
            print(f"[nul] POP3 {line!r}: {status!r}")
            if not status.startswith(b"-ERR"):
                wrong.append((line, status))
            conn.multiline("CAPA")
        # Names and passwords holding NUL or invalid UTF-8 never log in,
        # whatever USER answered.
        for user, pw in ((alice + b"\x00", password), (b"\x00" + alice, password),
                         (alice[:3] + b"\x00" + alice[3:], password),
                         (alice + b"\xff", password), (alice, password + b"\x00"),
                         (alice, password + b"\xff"), (alice, b"\x00" + password)):
            answer = conn.command(b"USER " + user)
            status = conn.command(b"PASS " + pw) if answer.startswith(b"+OK") else answer
            print(f"[nul] POP3 USER {user!r} / PASS {pw!r}: {answer!r} {status!r}")
            if not status.startswith(b"-ERR"):
                wrong.append((user + b" / " + pw, status))
                break
            conn.multiline("CAPA")
    with srv.raw_pop3(tls=False) as conn:
        conn.expect_ok(b"USER " + alice)
        conn.expect_ok(b"PASS " + password)
        for line in POP3_HOSTILE_AFTER_LOGIN:
            status = conn.command(line)
            print(f"[nul] POP3 {line!r}: {status!r}")
            if not status.startswith(b"-ERR"):
                wrong.append((line, status))
            assert conn.expect_ok("STAT").startswith(b"+OK 1 "), "a message went away"
        conn.expect_ok("QUIT")
    assert wrong == [], "hostile lines not refused with -ERR:\n" + "\n".join(
        f"  {line!r}: {status!r}" for line, status in wrong)
    assert len(srv.messages(ALICE)) + len(list((srv.maildir(ALICE) / "cur").iterdir())) == 1
    wait_until(lambda: _pop3_ok(srv), 10, "a POP3 login afterwards")
    assert srv.pid("maildird") == pid
    no_panic(srv)


# --------------------------------------------------------------------------
# Pathological MIME
# --------------------------------------------------------------------------

NESTING = 10_000
HEADER_LINES = 100_000
# Each FETCH or SEARCH below must be answered within this many seconds.
ANSWER_WITHIN = 30


def nested_message(depth: int, subject: str) -> bytes:
    """multipart/mixed inside multipart/mixed, `depth` deep, around one
    text/plain part saying "deep needle"."""
    head = (f"From: <{SENDER}>\r\nTo: <{ALICE}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@client.example.test>\r\n"
            "Date: Sat, 21 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n")
    parts = [head.encode()]
    for i in range(depth):
        parts.append(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode())
    parts.append(b"Content-Type: text/plain\r\n\r\ndeep needle\r\n")
    for i in reversed(range(depth)):
        parts.append(f"--b{i}--\r\n".encode())
    return b"".join(parts)


def many_headers_message(lines: int, subject: str) -> bytes:
    """`lines` header fields X-Hostile-NNNNNN, then Subject, then a body."""
    fields = b"".join(b"X-Hostile-%06d: value-%d\r\n" % (i, i) for i in range(lines))
    return (f"From: <{SENDER}>\r\nTo: <{ALICE}>\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@client.example.test>\r\n"
            "Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n").encode() + fields + (
        f"Subject: {subject}\r\n\r\nneedle in the body\r\n").encode()


def timed_commands(srv, conn: RawIMAP, commands: list[bytes]) -> dict[bytes, list[bytes]]:
    """Run each command; each must be answered (OK, NO or BAD, the session
    still there) within ANSWER_WITHIN seconds. Returns the responses."""
    answers = {}
    for command in commands:
        tag = conn.tag()
        started = time.monotonic()
        conn.send(tag.encode() + b" " + command + b"\r\n")
        try:
            responses = conn.read_until_tagged(tag, time.monotonic() + ANSWER_WITHIN)
        except (TimeoutError, ConnectionError) as e:
            raise AssertionError(f"{command[:80]!r}: {e.__class__.__name__} {str(e)[:300]}\n"
                                 f"{srv.log_tail()}") from None
        took = time.monotonic() - started
        tagged = responses[-1]
        size = sum(len(r) for r in responses)
        print(f"[mime] {command[:60]!r}{'...' if len(command) > 60 else ''}: {tagged[:90]!r}"
              f" in {took:.2f} s, {size} octets")
        assert tagged.split(b" ")[1] in (b"OK", b"NO", b"BAD"), tagged
        answers[command] = responses
    return answers


def test_deeply_nested_mime(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True,
                       config={"maildird.allow_plaintext_auth": True})
    message = nested_message(NESTING, "nested")
    print(f"\n[mime] {NESTING} levels: {len(message)} octets")
    pids = {d: srv.pid(d) for d in ("smtpd", "qmgr", "maildird")}
    with MemoryWatch(pids["smtpd"], "smtpd taking the nested message") as smtpd_memory:
        srv.send(ALICE, message)
    srv.wait_for_messages(ALICE, 1, timeout=60)
    smtpd_memory.check(16 * MiB / KiB)
    deep = ".".join(["1"] * NESTING).encode()
    with MemoryWatch(pids["maildird"], "maildird serving the nested message") as memory:
        with srv.raw_imap(tls=False, user=ALICE, timeout=ANSWER_WITHIN) as conn:
            conn.select("INBOX")
            answers = timed_commands(srv, conn, [
                b"FETCH 1 BODYSTRUCTURE", b"FETCH 1 BODY", b"FETCH 1 ENVELOPE",
                b"FETCH 1 (RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
                b"FETCH 1 BODY.PEEK[" + deep + b"]",
                b"FETCH 1 BODY.PEEK[" + deep + b".MIME]",
                b"FETCH 1 BODY.PEEK[" + b".".join([b"1"] * 40) + b"]",
                b"FETCH 1 BINARY.PEEK[" + b".".join([b"1"] * 100) + b"]",
                b"FETCH 1 BINARY.SIZE[" + deep + b"]",
                b"SEARCH BODY \"deep needle\"", b"SEARCH TEXT needle",
                b"SEARCH HEADER Content-Type mixed",
                b"FETCH 1 BODY.PEEK[]",
            ])
            conn.expect("NOOP")
    memory.check((16 + LOGIN_MIB) * MiB / KiB)
    [envelope] = [r for r in answers[b"FETCH 1 ENVELOPE"] if r.startswith(b"* 1 FETCH")]
    assert b'"nested"' in envelope, envelope
    [whole] = [r for r in answers[b"FETCH 1 BODY.PEEK[]"] if r.startswith(b"* 1 FETCH")]
    assert whole.endswith(message[-200:] + b")"), "BODY[] is not the message"
    # What the deepest part came back as (the server may stop descending).
    for command, responses in answers.items():
        if b"[1.1.1" in command:
            print(f"[mime] {command[:30]!r}...: ...{responses[0][-60:]!r}")
    assert {d: srv.pid(d) for d in pids} == pids, "a daemon was restarted"
    no_panic(srv)


def test_hundred_thousand_header_lines(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True,
                       config={"maildird.allow_plaintext_auth": True})
    subject = f"many-headers-{uuid.uuid4().hex[:8]}"
    message = many_headers_message(HEADER_LINES, subject)
    print(f"\n[mime] {HEADER_LINES} header lines: {len(message)} octets")
    pids = {d: srv.pid(d) for d in ("smtpd", "qmgr", "maildird")}
    with MemoryWatch(pids["smtpd"], "smtpd taking 100,000 header lines") as smtpd_memory:
        started = time.monotonic()
        srv.send(ALICE, message)
        print(f"[mime] smtpd took it in {time.monotonic() - started:.1f} s")
    srv.wait_for_messages(ALICE, 1, timeout=60)
    smtpd_memory.check(32 * MiB / KiB)
    last = HEADER_LINES - 1
    with MemoryWatch(pids["maildird"], "maildird serving 100,000 header lines") as memory:
        with srv.raw_imap(tls=False, user=ALICE, timeout=ANSWER_WITHIN) as conn:
            conn.select("INBOX")
            answers = timed_commands(srv, conn, [
                b"FETCH 1 ENVELOPE", b"FETCH 1 BODYSTRUCTURE",
                b"FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT X-HOSTILE-%06d)]" % last,
                b"FETCH 1 BODY.PEEK[HEADER.FIELDS.NOT (X-HOSTILE-000001)]",
                b"FETCH 1 (RFC822.SIZE BODY.PEEK[TEXT])",
                b"SEARCH HEADER X-Hostile-%06d value-%d" % (last, last),
                b"SEARCH SUBJECT " + subject.encode(),
                b"SEARCH BODY needle",
                b"SEARCH HEADER X-Nowhere x",
            ])
            conn.expect("NOOP")
    memory.check((32 + LOGIN_MIB) * MiB / KiB)
    [envelope] = [r for r in answers[b"FETCH 1 ENVELOPE"] if r.startswith(b"* 1 FETCH")]
    assert subject.encode() in envelope, f"ENVELOPE misses the Subject: {envelope[:300]!r}"
    for command in (b"SEARCH HEADER X-Hostile-%06d value-%d" % (last, last),
                    b"SEARCH SUBJECT " + subject.encode()):
        responses = answers[command]
        if responses[-1].split(b" ")[1] == b"OK":
            assert b"* SEARCH 1" in responses, (command, responses)
    fields = [r for r in answers[b"FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT X-HOSTILE-%06d)]"
                                 % last] if r.startswith(b"* 1 FETCH")]
    assert fields and f"Subject: {subject}".encode() in fields[0], fields
    assert {d: srv.pid(d) for d in pids} == pids, "a daemon was restarted"
    no_panic(srv)


# --------------------------------------------------------------------------
# Exactly max_message_size
# --------------------------------------------------------------------------

MAX_SIZE = 10_000


def message_of_size(size: int, subject: str) -> bytes:
    """A message of exactly `size` octets (CRLF lines, no line starting
    with a dot)."""
    message = make_message(subject, body="")
    remaining = size - len(message)
    assert remaining >= 2, remaining
    lines = []
    while remaining:
        n = min(80, remaining)
        if remaining - n == 1:
            n -= 1
        lines.append(b"x" * (n - 2) + b"\r\n")
        remaining -= n
    message += b"".join(lines)
    assert len(message) == size
    return message


def test_exactly_max_message_size(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config={"smtpd.max_message_size": MAX_SIZE})
    exact_data = message_of_size(MAX_SIZE, "exact by DATA")
    exact_bdat = message_of_size(MAX_SIZE, "exact by BDAT")
    over_data = message_of_size(MAX_SIZE + 1, "one over by DATA")
    over_bdat = message_of_size(MAX_SIZE + 1, "one over by BDAT")
    with srv.raw() as smtp:
        assert smtp.ehlo()["SIZE"] == str(MAX_SIZE)

        def transaction() -> None:
            smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
            smtp.expect(f"RCPT TO:<{ALICE}>", 250)

        transaction()
        smtp.check_reply(smtp.data(exact_data), 250, "2.0.0", "DATA of exactly the maximum")
        transaction()
        smtp.check_reply(smtp.data(over_data), 552, "5.3.4", "DATA one octet over")
        smtp.expect("RSET", 250)
        transaction()
        smtp.send(f"BDAT {MAX_SIZE} LAST\r\n".encode() + exact_bdat)
        smtp.check_reply(smtp.read_reply(), 250, "2.0.0", "BDAT of exactly the maximum")
        transaction()
        half = MAX_SIZE // 2
        smtp.send(f"BDAT {half}\r\n".encode() + over_bdat[:half])
        code, lines = smtp.read_reply()
        if code == 250:   # the excess is in the last chunk
            rest = over_bdat[half:]
            smtp.send(f"BDAT {len(rest)} LAST\r\n".encode() + rest)
            code, lines = smtp.read_reply()
        smtp.check_reply((code, lines), 552, "5.3.4", "BDAT one octet over")
        smtp.expect("RSET", 250)
        smtp.expect("QUIT", 221)
    srv.wait_for_messages(ALICE, 2)
    stored = {header(p.read_bytes(), "Subject"): p.read_bytes() for p in srv.settle(ALICE)}
    assert set(stored) == {"exact by DATA", "exact by BDAT"}, set(stored)
    assert strip_added_headers(stored["exact by DATA"]) == as_stored(exact_data)
    assert strip_added_headers(stored["exact by BDAT"]) == as_stored(exact_bdat)
    srv.wait_spool_empty()
