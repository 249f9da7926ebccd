"""Protocol and message helpers for the mailsrv end-to-end tests.

Pure helpers with no knowledge of a running installation; the harness that
installs and runs mailsrv lives in conftest.py.
"""

from __future__ import annotations

import email.utils
import re
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

LOCALHOST = "127.0.0.1"
CLIENT_NAME = "client.example.test"

# `250 2.0.0 Ok: queued as <ID>`, ID = 16 chars [0-9A-Z] (docs/contract.md).
QUEUED_RE = re.compile(r"queued as ([0-9A-Z]{16})\b")
# A reply line carrying an enhanced status code (RFC 3463).
ENHANCED_LINE_RE = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}")
_REPLY_LINE_RE = re.compile(rb"^(\d{3})([ -])(.*)$")

# Header lines mailsrv puts in front of a delivered message, in this order.
ADDED_HEADERS = (b"return-path:", b"delivered-to:", b"received:")


# --------------------------------------------------------------------------
# Waiting and processes
# --------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def insecure_tls_context() -> ssl.SSLContext:
    """A TLS client context that accepts any certificate: `mailctl init`
    makes a self-signed one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _greets_with(port: int, prefix: bytes, tls: bool, timeout: float) -> bool:
    """Whether 127.0.0.1:port accepts a connection (with a TLS handshake
    first when `tls`) and its first line starts with `prefix`; QUITs."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=timeout) as raw:
            s = insecure_tls_context().wrap_socket(raw) if tls else raw
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            if data.startswith(prefix):
                s.sendall(b"QUIT\r\n")
                return True
            return False
    except OSError:   # ssl.SSLError is an OSError
        return False


def pop3_greets(port: int, tls: bool = False, timeout: float = 2.0) -> bool:
    """Whether a POP3 server on 127.0.0.1:port greets with `+OK`."""
    return _greets_with(port, b"+OK", tls, timeout)


def greets(port: int, timeout: float = 2.0) -> bool:
    """Whether an SMTP server on 127.0.0.1:port greets with 220."""
    return _greets_with(port, b"220", False, timeout)


_userns_tmpfs: tuple[bool, str] | None = None


def userns_tmpfs_available() -> tuple[bool, str]:
    """Whether an unprivileged user can mount a tmpfs in a new user+mount
    namespace here (`unshare --user --map-root-user --mount`); with the
    reason when not."""
    global _userns_tmpfs
    if _userns_tmpfs is None:
        try:
            with tempfile.TemporaryDirectory() as d:
                proc = subprocess.run(
                    ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                     'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", d],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            _userns_tmpfs = (proc.returncode == 0,
                             f"`unshare --user --map-root-user --mount` + tmpfs mount "
                             f"exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
        except (OSError, subprocess.SubprocessError) as e:
            _userns_tmpfs = (False, f"cannot run unshare: {e}")
    return _userns_tmpfs


def port_closed(port: int) -> bool:
    """Whether connecting to 127.0.0.1:port is refused."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def json_contains(data: Any, wanted: Any) -> bool:
    """Whether `wanted` occurs as a value (or key) anywhere in parsed JSON."""
    if data == wanted:
        return True
    if isinstance(data, dict):
        return any(json_contains(k, wanted) or json_contains(v, wanted)
                   for k, v in data.items())
    if isinstance(data, list):
        return any(json_contains(v, wanted) for v in data)
    if isinstance(data, str) and isinstance(wanted, int) and not isinstance(wanted, bool):
        return data == str(wanted)
    return False


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------

def crlf(text: str | bytes) -> bytes:
    """`text` as bytes with every line ending (LF or CRLF) turned into CRLF."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return re.sub(rb"\r?\n", b"\r\n", data)


def make_message(subject: str, body: str | bytes = "Hello.\n",
                 sender: str = "sender@remote.test", to: str = "alice@example.test",
                 message_id: str | None = None) -> bytes:
    """A small RFC 5322 message with CRLF line ends, ending in CRLF."""
    message_id = message_id or f"{uuid.uuid4().hex}@client.example.test"
    headers = (
        f"From: <{sender}>\n"
        f"To: <{to}>\n"
        f"Subject: {subject}\n"
        f"Message-ID: <{message_id}>\n"
        f"Date: {email.utils.formatdate()}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
    )
    message = crlf(headers) + crlf(body)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for `message` (CRLF lines): dot-stuffed, with the
    terminating `.` line (RFC 5321 4.5.2)."""
    assert message.endswith(b"\r\n"), "message must end with CRLF"
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


def as_stored(message: bytes) -> bytes:
    """How `message` (as sent, CRLF) must appear in a Maildir file: LF ends."""
    return message.replace(b"\r\n", b"\n")


def strip_added_headers(content: bytes) -> bytes:
    """Remove the Return-Path, Delivered-To and Received header lines that
    mailsrv puts in front of a delivered message (Received may be folded);
    assert they are there, in that order. Returns the message as sent."""
    lines = content.split(b"\n")
    i = 0
    for prefix in ADDED_HEADERS:
        assert i < len(lines) and lines[i].lower().startswith(prefix), (
            f"expected a {prefix.decode()} header at line {i + 1}, got "
            f"{lines[i] if i < len(lines) else b'<end of file>'!r}")
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\n".join(lines[i:])


def delivered_to(content: bytes) -> str:
    """The address in the Delivered-To line, the second line of a delivered
    file (`Delivered-To: addr`, angle brackets tolerated)."""
    line = content.split(b"\n")[1].decode("utf-8")
    m = re.fullmatch(r"Delivered-To: <?([^<>]+)>?", line)
    assert m, f"second line is not Delivered-To: {line!r}"
    return m[1]


def header(content: bytes, name: str) -> str | None:
    """First value of header `name` in the header block of `content`
    (unfolded), or None."""
    head = content.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    for line in unfolded.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return None


# --------------------------------------------------------------------------
# Raw SMTP
# --------------------------------------------------------------------------

class RawLineClient:
    """A byte-level client for CRLF line protocols, plain or implicit TLS:
    sends exactly what it is given and reads lines split on CRLF only (a
    bare LF from the server stays visible), never waiting longer than
    `timeout`."""

    def __init__(self, port: int, tls: bool = False, timeout: float = 10.0):
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection((LOCALHOST, port), timeout=timeout)
        if tls:
            self.sock = insecure_tls_context().wrap_socket(self.sock)
        self._buf = b""
        self.eof = False

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection (no QUIT)."""
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode("utf-8") if isinstance(data, str) else data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False at end of stream."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing complete within {self.timeout}s; have {self._buf!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            chunk = b""
        except socket.timeout as e:
            raise TimeoutError(
                f"nothing complete within {self.timeout}s; have {self._buf!r}") from e
        if not chunk:
            self.eof = True
        self._buf += chunk
        return bool(chunk)

    def read_line(self, deadline: float | None = None) -> bytes:
        """One line without its CRLF."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while b"\r\n" not in self._buf:
            if self.eof or not self._fill(deadline):
                raise ConnectionError(f"connection closed; unread bytes: {self._buf!r}")
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within `timeout`
        (bytes that arrive meanwhile are kept in the buffer)."""
        deadline = time.monotonic() + timeout
        try:
            while not self.eof:
                self._fill(deadline)
        except TimeoutError:
            return False
        return True


class RawSMTP(RawLineClient):
    """A byte-level SMTP client that reads whole (multi-line) replies."""

    def __init__(self, port: int, timeout: float = 10.0):
        super().__init__(port, timeout=timeout)
        self.history: list[list[str]] = []   # raw lines of every reply read

    def read_reply(self) -> tuple[int, list[str]]:
        """Read one complete reply: (code, text of each line after the code)."""
        deadline = time.monotonic() + self.timeout
        code: int | None = None
        texts: list[str] = []
        raw_lines: list[str] = []
        while True:
            line = self.read_line(deadline)
            m = _REPLY_LINE_RE.match(line)
            assert m, f"malformed reply line {line!r}"
            assert code is None or int(m[1]) == code, f"code changed inside a reply: {line!r}"
            code = int(m[1])
            texts.append(m[3].decode("utf-8", "replace"))
            raw_lines.append(line.decode("utf-8", "replace"))
            if m[2] == b" ":
                self.history.append(raw_lines)
                return code, texts

    def command(self, line: str | bytes) -> tuple[int, list[str]]:
        """Send one command line (CRLF added) and read its reply."""
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.read_reply()

    def expect(self, line: str | bytes, code: int, enhanced: str | None = None) -> list[str]:
        """Send a command and assert the reply code (and enhanced code)."""
        return self.check_reply(self.command(line), code, enhanced, line)

    @staticmethod
    def check_reply(reply: tuple[int, list[str]], code: int, enhanced: str | None = None,
                    context: object = "") -> list[str]:
        got, lines = reply
        assert got == code, f"{context!r}: expected {code}, got {got} {lines}"
        if enhanced is not None:
            assert lines[0].split(" ", 1)[0] == enhanced, (
                f"{context!r}: expected {code} {enhanced}, got {got} {lines}")
        return lines

    def greeting(self) -> str:
        code, lines = self.read_reply()
        assert code == 220, f"greeting: {code} {lines}"
        return lines[0]

    def ehlo(self, name: str = CLIENT_NAME) -> dict[str, str]:
        """EHLO; returns the extensions as {KEYWORD: parameters}."""
        lines = self.expect(f"EHLO {name}", 250)
        extensions = {}
        for line in lines[1:]:
            keyword, _, params = line.partition(" ")
            extensions[keyword.upper()] = params
        return extensions

    def data(self, message: bytes) -> tuple[int, list[str]]:
        """DATA with `message` dot-stuffed; returns the final reply."""
        self.expect("DATA", 354)
        self.send(dot_stuff(message))
        return self.read_reply()


def queued_id(lines: list[str]) -> str:
    """The queue ID from a `250 2.0.0 Ok: queued as <ID>` reply."""
    m = QUEUED_RE.search(" ".join(lines))
    assert m, f"no 'queued as <ID>' in {lines}"
    return m[1]


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def process_mentions(pid: int, needle: str) -> bool:
    """Whether the command line or environment of `pid` mention `needle`
    (used to make sure a pid from a pid file is one of ours)."""
    for part in ("cmdline", "environ"):
        try:
            if needle.encode() in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
        except OSError:
            pass
    return False



# --------------------------------------------------------------------------
# Raw POP3
# --------------------------------------------------------------------------

def pop3_unstuff(data: bytes) -> bytes:
    """Undo POP3 dot-stuffing (RFC 1939 3) of multi-line data without the
    terminating `.` line: remove one leading `.` from every line."""
    return re.sub(rb"(?m)^\.", b"", data)


class RawPOP3(RawLineClient):
    """A byte-level POP3 client, plain or implicit TLS."""

    def read_status(self) -> bytes:
        """One status line (`+OK ...`, `-ERR ...` or a `+ ` continuation)."""
        line = self.read_line()
        assert line.startswith((b"+OK", b"-ERR", b"+ ")) or line == b"+", (
            f"not a POP3 status line: {line!r}")
        return line

    def read_data(self) -> bytes:
        """The multi-line data following a `+OK` of RETR, TOP, LIST, UIDL,
        CAPA: every line with its CRLF, still dot-stuffed, up to and without
        the terminating `.` line."""
        deadline = time.monotonic() + self.timeout
        lines = []
        while True:
            line = self.read_line(deadline)
            if line == b".":
                return b"".join(l + b"\r\n" for l in lines)
            lines.append(line)

    def command(self, line: bytes | str) -> bytes:
        """Send one command line (CRLF added); return its status line."""
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.read_status()

    def expect_ok(self, line: bytes | str) -> bytes:
        status = self.command(line)
        assert status.startswith(b"+OK"), f"{line!r}: {status!r}"
        return status

    def multiline(self, line: bytes | str) -> tuple[bytes, bytes]:
        """A command with a multi-line answer: (status line, raw data as in
        read_data); asserts `+OK`."""
        status = self.expect_ok(line)
        return status, self.read_data()

    def greeting(self) -> bytes:
        status = self.read_status()
        assert status.startswith(b"+OK"), f"greeting: {status!r}"
        return status

    def capa(self) -> dict[str, list[str]]:
        """CAPA as {TAG (upper case): [parameters]}."""
        _, data = self.multiline("CAPA")
        caps = {}
        for line in data.decode("utf-8").split("\r\n")[:-1]:
            tag, *params = line.split()
            caps[tag.upper()] = params
        return caps

    def stls(self) -> None:
        """STLS, then the TLS handshake on this connection."""
        self.expect_ok("STLS")
        assert self._buf == b"", f"bytes after the STLS reply: {self._buf!r}"
        self.sock = insecure_tls_context().wrap_socket(self.sock)

    def login(self, user: str, password: str) -> None:
        self.expect_ok(f"USER {user}")
        self.expect_ok(f"PASS {password}")
