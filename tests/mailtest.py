"""Protocol and message helpers for the mailsrv end-to-end tests.

Pure helpers with no knowledge of a running installation; the harness that
installs and runs mailsrv lives in conftest.py.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import itertools
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


def _greets_with(port: int, prefix: bytes, tls: bool, timeout: float,
                 goodbye: bytes = b"QUIT\r\n") -> bool:
    """Whether 127.0.0.1:port accepts a connection (with a TLS handshake
    first when `tls`) and its first line starts with `prefix`; then sends
    `goodbye` (QUIT, or an IMAP LOGOUT)."""
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
                s.sendall(goodbye)
                return True
            return False
    except OSError:   # ssl.SSLError is an OSError
        return False


def pop3_greets(port: int, tls: bool = False, timeout: float = 2.0) -> bool:
    """Whether a POP3 server on 127.0.0.1:port greets with `+OK`."""
    return _greets_with(port, b"+OK", tls, timeout)


def imap_greets(port: int, tls: bool = False, timeout: float = 2.0) -> bool:
    """Whether an IMAP server on 127.0.0.1:port greets with `* OK`."""
    return _greets_with(port, b"* OK", tls, timeout, goodbye=b"probe LOGOUT\r\n")


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


# Header fields kept in the envelope and written before the stored message.
QUEUE_ADDED_HEADERS = (b"authentication-results:", b"dkim-signature:")


def strip_added_headers(content: bytes) -> bytes:
    """Remove the Return-Path, Delivered-To, Authentication-Results and Received lines that
    mailsrv puts in front of a delivered message (Received may be folded);
    assert they are there, in that order. Returns the message as sent."""
    lines = content.split(b"\n")
    i = 0

    def skip_field() -> int:
        j = i + 1
        while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
            j += 1
        return j

    for prefix in ADDED_HEADERS:
        if prefix == b"received:":
            # Fields the checks and signing add when the message leaves
            # the queue, between Delivered-To and our Received.
            while i < len(lines) and lines[i].lower().startswith(QUEUE_ADDED_HEADERS):
                i = skip_field()
        assert i < len(lines) and lines[i].lower().startswith(prefix), (
            f"expected a {prefix.decode()} header at line {i + 1}, got "
            f"{lines[i] if i < len(lines) else b'<end of file>'!r}")
        i = skip_field()
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


def delivery_report(content: bytes) -> tuple[email.message.Message, list[dict[str, str]]]:
    """A delivery status notification (RFC 3464; RFC 6533's
    message/global-delivery-status too): the parsed multipart/report and
    the blocks of its status part, the per-message fields first, then one
    per recipient, each {field name in lower case: value, whitespace
    folded}. Read from the raw text, so UTF-8 addresses come through."""
    report = email.message_from_bytes(content, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report", report["Content-Type"]
    boundary = report.get_boundary()
    assert boundary, "multipart/report without a boundary"
    text = content.decode("utf-8", "replace").replace("\r\n", "\n")
    for part in text.split("\n--" + boundary)[1:]:
        head, _, body = part.partition("\n\n")
        if re.search(r"(?im)^content-type:\s*message/(global-)?delivery-status", head):
            blocks = []
            for block in re.split(r"\n\s*\n", body):
                unfolded = re.sub(r"\n[ \t]+", " ", block.strip("\n"))
                fields = {}
                for line in unfolded.splitlines():
                    key, sep, value = line.partition(":")
                    if sep:
                        fields[key.strip().lower()] = " ".join(value.split())
                if fields:
                    blocks.append(fields)
            return report, blocks
    raise AssertionError(f"no message/delivery-status part in {content[:2000]!r}")


def report_fields(content: bytes) -> tuple[email.message.Message, dict[str, str]]:
    """delivery_report() with its blocks merged, later ones overriding
    earlier ones: enough for a report about one recipient."""
    report, blocks = delivery_report(content)
    fields: dict[str, str] = {}
    for block in blocks:
        fields.update(block)
    return report, fields


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


# --------------------------------------------------------------------------
# IMAP
# --------------------------------------------------------------------------

# A literal announcement at the end of a line: `{n}`, `{n+}` (RFC 7888) or
# the literal8 `~{n}` (RFC 3516).
_LITERAL_AT_END_RE = re.compile(rb"~?\{(\d+)\+?\}$")
_LITERAL_RE = re.compile(rb"~?\{(\d+)\+?\}\r\n")
# A response code in a status response: `[NAME]` or `[NAME args]`.
_RESP_CODE_RE = re.compile(rb"^\S+ (?:OK|NO|BAD|PREAUTH|BYE) \[([A-Za-z0-9.-]+)(?: ([^\]]*))?\]",
                           re.IGNORECASE)


def imap_quote(text: str | bytes) -> bytes:
    """`text` as an IMAP quoted string (RFC 9051 4.3): `"` and `\\`
    escaped. UTF-8 goes as it is (valid in IMAP4rev2/UTF8=ACCEPT sessions
    only)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    assert not any(b in data for b in (0, 10, 13)), f"cannot quote {data!r}; use a literal"
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def parse_imap(data: bytes) -> list[Any]:
    """Parse IMAP response data (RFC 9051 9) into Python values: a
    parenthesised list is a list, a quoted string or a literal is bytes,
    NIL is None, a number is an int, any other atom is a str (a fetch item
    such as `BODY[HEADER.FIELDS (FROM)]<0>` or a flag such as `\\Seen` is
    one atom). Give it a whole response (`* 1 FETCH (...)`) or a part of
    one; raises ValueError when it is not well formed."""
    values, pos = _parse_values(data, 0, nested=False)
    assert pos == len(data)
    return values


def _parse_values(data: bytes, pos: int, nested: bool) -> tuple[list[Any], int]:
    values: list[Any] = []
    while True:
        while data[pos:pos + 1] == b" ":
            pos += 1
        if pos >= len(data):
            if nested:
                raise ValueError(f"unclosed parenthesis in {data!r}")
            return values, pos
        if data[pos:pos + 1] == b")":
            if not nested:
                raise ValueError(f"unbalanced ')' at {pos} in {data!r}")
            return values, pos + 1
        value, pos = _parse_value(data, pos)
        values.append(value)


def _parse_value(data: bytes, pos: int) -> tuple[Any, int]:
    first = data[pos:pos + 1]
    if first == b"(":
        return _parse_values(data, pos + 1, nested=True)
    if first == b'"':
        out = bytearray()
        pos += 1
        while True:
            if pos >= len(data) or data[pos] in (10, 13):
                raise ValueError(f"unterminated quoted string in {data!r}")
            if data[pos] == 0x5C:   # backslash: a quoted-special follows
                out.append(data[pos + 1])
                pos += 2
            elif data[pos] == 0x22:
                return bytes(out), pos + 1
            else:
                out.append(data[pos])
                pos += 1
    literal = _LITERAL_RE.match(data, pos)
    if literal:
        start = literal.end()
        end = start + int(literal[1])
        if end > len(data):
            raise ValueError(f"literal of {literal[1]!r} octets runs past the end of {data!r}")
        return data[start:end], end
    # An atom; brackets (`BODY[HEADER.FIELDS (A B)]`) may hold spaces and parentheses.
    start, depth = pos, 0
    while pos < len(data):
        c = data[pos:pos + 1]
        if c == b"[":
            depth += 1
        elif c == b"]" and depth:
            depth -= 1
        elif depth == 0 and c in (b" ", b"(", b")", b"\r", b"\n"):
            break
        pos += 1
    if pos == start:
        raise ValueError(f"unexpected {first!r} at {pos} in {data!r}")
    atom = data[start:pos].decode("utf-8", "replace")
    if atom.upper() == "NIL":
        return None, pos
    if atom.isdigit():
        return int(atom), pos
    return atom, pos


def imap_text(value: Any) -> str:
    """An atom, string or number from parse_imap as str (UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    assert isinstance(value, (str, int)), f"not a string: {value!r}"
    return str(value)


def imap_flags(values: list[Any]) -> set[str]:
    """A parsed flag list as a set of lower-case names (flags are
    case-insensitive), without \\Recent: whether a session sees \\Recent is
    up to the server (RFC 3501 2.3.2; gone in RFC 9051)."""
    return {imap_text(f).lower() for f in values} - {"\\recent"}


def _without_prefix(values: list[Any], *words: str) -> list[Any]:
    """`values` without a leading `*` and the response's name (LIST, ...)."""
    if values[:1] == ["*"]:
        values = values[1:]
    if values and isinstance(values[0], str) and values[0].upper() in words:
        values = values[1:]
    return values


def fetch_items(response: bytes) -> tuple[int, dict[str, Any]]:
    """A FETCH response (`* 3 FETCH (UID 7 FLAGS (\\Seen))`, or imaplib's
    `3 (UID 7 ...)`) as (message number, {ITEM NAME (upper case): value})."""
    values = parse_imap(response)
    if values[:1] == ["*"]:
        values = values[1:]
    if len(values) == 3 and str(values[1]).upper() == "FETCH":
        values = [values[0], values[2]]
    assert len(values) == 2 and isinstance(values[0], int) and isinstance(values[1], list), (
        f"not a FETCH response: {response!r}")
    items = values[1]
    assert len(items) % 2 == 0, f"odd number of FETCH items: {response!r}"
    return values[0], {str(items[i]).upper(): items[i + 1] for i in range(0, len(items), 2)}


def parse_list(response: bytes) -> tuple[set[str], str | None, str]:
    """A LIST or LSUB response (`* LIST (\\HasNoChildren) "." Sent`, or
    imaplib's data without `* LIST`) as (attributes in lower case,
    delimiter, mailbox name); extended data after the name is ignored."""
    values = _without_prefix(parse_imap(response), "LIST", "LSUB")
    assert len(values) >= 3 and isinstance(values[0], list), f"not a LIST response: {response!r}"
    attributes = {imap_text(a).lower() for a in values[0]}
    delimiter = None if values[1] is None else imap_text(values[1])
    return attributes, delimiter, imap_text(values[2])


def parse_status(response: bytes) -> tuple[str, dict[str, int]]:
    """A STATUS response (`* STATUS INBOX (MESSAGES 2 UNSEEN 1)`, or
    imaplib's data without `* STATUS`) as (mailbox name, {ITEM: number})."""
    values = _without_prefix(parse_imap(response), "STATUS")
    assert len(values) == 2 and isinstance(values[1], list), f"not a STATUS response: {response!r}"
    items = values[1]
    return imap_text(values[0]), {str(items[i]).upper(): items[i + 1]
                                  for i in range(0, len(items), 2)}


def parse_esearch(response: bytes) -> tuple[str | None, bool, dict[str, Any]]:
    """An ESEARCH response (RFC 4731, RFC 9051 7.3.4:
    `* ESEARCH (TAG "a1") UID MIN 1 COUNT 3`) as (tag, UID indicator,
    {RETURN ITEM: value}); ALL's sequence set is expanded to a list."""
    values = _without_prefix(parse_imap(response), "ESEARCH")
    tag = None
    if values and isinstance(values[0], list):
        correlator = values.pop(0)
        assert len(correlator) == 2 and str(correlator[0]).upper() == "TAG", response
        tag = imap_text(correlator[1])
    uid = bool(values) and str(values[0]).upper() == "UID"
    if uid:
        values = values[1:]
    assert len(values) % 2 == 0, f"odd ESEARCH return data: {response!r}"
    data = {str(values[i]).upper(): values[i + 1] for i in range(0, len(values), 2)}
    if "ALL" in data:
        data["ALL"] = uid_set(str(data["ALL"]))
    return tag, uid, data


def uid_set(text: str | bytes) -> list[int]:
    """A sequence set of numbers (`1:3,7`) as a list in the order written,
    each range ascending (`4:2` is 2, 3, 4). No `*`."""
    if isinstance(text, bytes):
        text = text.decode()
    numbers: list[int] = []
    for part in str(text).split(","):
        low, _, high = part.partition(":")
        a, b = int(low), int(high or low)
        numbers.extend(range(min(a, b), max(a, b) + 1))
    return numbers


def resp_code(line: bytes) -> tuple[str, str] | None:
    """The response code of a status response (`a1 OK [APPENDUID 5 3] ...`,
    `* OK [UIDVALIDITY 5]`, `a1 NO [NONEXISTENT] ...`) as (NAME in upper
    case, arguments), or None."""
    m = _RESP_CODE_RE.match(line)
    if m is None:
        return None
    return m[1].decode().upper(), (m[2] or b"").decode("utf-8", "replace")


def imaplib_responses(data: list[Any]) -> list[bytes]:
    """The data list imaplib returns, one bytes per response as RawIMAP
    reads them: imaplib gives a literal as a (text up to `{n}`, literal)
    tuple followed by the rest of that line as the next item."""
    responses: list[bytes] = []
    continues = False   # whether the next item goes on the last response
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            text = item[0] + b"\r\n" + item[1]
        else:
            text = item
        if continues:
            responses[-1] += text
        else:
            responses.append(text)
        continues = isinstance(item, tuple)
    return responses


def imap_ok(result: tuple[str, list[Any]]) -> list[Any]:
    """The data of an imaplib (type, data) result, which must be OK."""
    typ, data = result
    assert typ == "OK", f"{typ} {data}"
    return data


def imap_fetch(client: Any, message_set: str, items: str,
               uid: bool = False) -> dict[int, dict[str, Any]]:
    """FETCH (UID FETCH when `uid`) with an imaplib client, asserting OK:
    {message number: {ITEM: value}} (see fetch_items)."""
    if uid:
        data = imap_ok(client.uid("FETCH", message_set, items))
    else:
        data = imap_ok(client.fetch(message_set, items))
    fetched: dict[int, dict[str, Any]] = {}
    for response in imaplib_responses(data):
        number, got = fetch_items(response)
        fetched.setdefault(number, {}).update(got)
    return fetched


class RawIMAP(RawLineClient):
    """A byte-level IMAP client, plain or implicit TLS, that reads whole
    responses: a response that carries literals is returned as one bytes
    object exactly as sent (`* 1 FETCH (BODY[] {5}\\r\\nHello)`), without
    its final CRLF, so tests can compare whole responses."""

    def __init__(self, port: int, tls: bool = False, timeout: float = 10.0):
        super().__init__(port, tls, timeout)
        self._tags = itertools.count(1)

    def tag(self) -> str:
        """A fresh tag: t1, t2, ..."""
        return f"t{next(self._tags)}"

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            if self.eof or not self._fill(deadline):
                raise ConnectionError(
                    f"connection closed inside a literal of {n} octets; have {self._buf!r}")
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_response(self, deadline: float | None = None) -> bytes:
        """One response (untagged, tagged, or a `+` continuation request),
        literals included, without its final CRLF."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        response = b""
        while True:
            line = self.read_line(deadline)
            response += line
            literal = _LITERAL_AT_END_RE.search(line)
            if literal is None:
                return response
            response += b"\r\n" + self._read_exact(int(literal[1]), deadline)

    def read_until_tagged(self, tag: str, deadline: float | None = None) -> list[bytes]:
        """Responses up to and including the one tagged `tag`."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        prefix = tag.encode() + b" "
        responses = []
        while True:
            response = self.read_response(deadline)
            responses.append(response)
            if response.startswith(prefix):
                return responses

    def command(self, tag: str, text: str | bytes) -> list[bytes]:
        """Send `tag text` + CRLF; return every response up to and including
        the tagged one. `text` may hold non-synchronizing literals
        (`{n+}\\r\\n...`, RFC 7888); synchronizing ones need append()."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        self.send(tag.encode() + b" " + data + b"\r\n")
        return self.read_until_tagged(tag)

    def expect(self, text: str | bytes, status: str = "OK",
               code: str | None = None) -> list[bytes]:
        """command() with a fresh tag; assert the tagged response is
        `status` (OK, NO, BAD), with response code `code` when given.
        Returns all responses, the tagged one last."""
        tag = self.tag()
        responses = self.command(tag, text)
        tagged = responses[-1]
        shown = text if len(text) <= 200 else f"{text[:200]!r}... ({len(text)} octets)"
        got_status = tagged.split(b" ", 2)[1:2]
        assert got_status and got_status[0].upper() == status.upper().encode(), (
            f"{shown!r}: expected {status}, got {responses}")
        if code is not None:
            got = resp_code(tagged)
            assert got is not None and got[0] == code.upper(), (
                f"{shown!r}: expected {status} [{code}], got {tagged!r}")
        return responses

    @staticmethod
    def untagged(responses: list[bytes]) -> list[bytes]:
        """The untagged (`* `) responses of a list."""
        return [r for r in responses if r.startswith(b"* ")]

    def greeting(self) -> bytes:
        response = self.read_response()
        assert response.startswith(b"* OK"), f"greeting: {response!r}"
        return response

    def starttls(self) -> None:
        """STARTTLS, then the TLS handshake on this connection."""
        self.expect("STARTTLS")
        assert self._buf == b"", f"bytes after the STARTTLS response: {self._buf!r}"
        self.sock = insecure_tls_context().wrap_socket(self.sock)

    def login(self, user: str, password: str) -> list[bytes]:
        return self.expect(b"LOGIN " + imap_quote(user) + b" " + imap_quote(password))

    def select(self, mailbox: str, readonly: bool = False) -> list[bytes]:
        """SELECT (EXAMINE when `readonly`) `mailbox`, which is sent quoted."""
        return self.expect((b"EXAMINE " if readonly else b"SELECT ") + imap_quote(mailbox))

    def append(self, mailbox: str, message: bytes, flags: str = "", date: str | None = None,
               literal_plus: bool = False) -> tuple[int, int]:
        """APPEND `message` to `mailbox` (sent quoted) with `flags` (e.g.
        "\\\\Seen $Forwarded") and `date` (`05-Mar-2024 10:20:30 +0100`), as a
        synchronizing literal (waiting for the `+`) or a LITERAL+ one.
        Asserts OK; returns (UIDVALIDITY, UID) of its APPENDUID (RFC 4315)."""
        tag = self.tag()
        head = tag.encode() + b" APPEND " + imap_quote(mailbox)
        if flags:
            head += f" ({flags})".encode()
        if date is not None:
            head += f' "{date}"'.encode()
        if literal_plus:
            self.send(head + f" {{{len(message)}+}}\r\n".encode() + message + b"\r\n")
        else:
            self.send(head + f" {{{len(message)}}}\r\n".encode())
            deadline = time.monotonic() + self.timeout
            while True:
                response = self.read_response(deadline)
                if response.startswith(b"+"):
                    break
                assert not response.startswith(tag.encode() + b" "), (
                    f"APPEND refused before the literal: {response!r}")
            self.send(message + b"\r\n")
        responses = self.read_until_tagged(tag)
        assert responses[-1].startswith(f"{tag} OK".encode()), f"APPEND: {responses}"
        code = resp_code(responses[-1])
        assert code is not None and code[0] == "APPENDUID", f"no APPENDUID: {responses[-1]!r}"
        validity, uid = code[1].split()
        return int(validity), int(uid)

    def idle(self) -> str:
        """Start IDLE (RFC 2177); returns its tag once the server sent `+`."""
        tag = self.tag()
        self.send(f"{tag} IDLE\r\n")
        deadline = time.monotonic() + self.timeout
        while True:
            response = self.read_response(deadline)
            if response.startswith(b"+"):
                return tag
            assert not response.startswith(tag.encode() + b" "), f"IDLE refused: {response!r}"

    def done(self, tag: str) -> list[bytes]:
        """End IDLE; assert its tagged OK; return the responses."""
        self.send(b"DONE\r\n")
        responses = self.read_until_tagged(tag)
        assert responses[-1].startswith(f"{tag} OK".encode()), f"IDLE: {responses}"
        return responses

    def noop_until(self, wanted: Callable[[list[bytes]], Any], timeout: float,
                   what: str) -> list[bytes]:
        """Send NOOP until `wanted(untagged responses of all the NOOPs so
        far)` is true; return those responses."""
        seen: list[bytes] = []

        def check() -> Any:
            seen.extend(self.untagged(self.expect("NOOP")))
            return wanted(seen)
        try:
            wait_until(check, timeout, what, interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}; untagged responses to NOOP: {seen}") from None
        return seen
