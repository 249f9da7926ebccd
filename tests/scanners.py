"""Real content scanners for the end-to-end tests: ClamAV's clamd and
SpamAssassin's spamd, each started in a temporary directory of its own on
free ports, and small clients for their protocols (to check the daemons
themselves).

clamd gets a private database of one body signature that matches the EICAR
test string wherever it is in a file (raw, inline in a text body, or in a
base64 attachment, which clamd decodes), so no signatures are downloaded
and clamd is up in well under a second. It listens on a Unix socket and on
a TCP port at once. The EICAR string is built here from hex, so that the
repository never holds it verbatim (virus scanners on developers' machines
would quarantine the file).

spamd runs with `-L` (local tests only: no DNS, no network), so its
answers are deterministic; the GTUBE string scores 1000. It listens on a
TCP port and a Unix socket.

    clamd = Clamd().start()    # clamd.socket, clamd.tcp_address
    clamd.scan(b"...")         # "stream: OK"
    clamd.stop()

The conftest fixtures `clamd` and `spamd` run one of each per test session
and always stop them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

LOCALHOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60
STOP_TIMEOUT = 15

# The EICAR anti-virus test file (eicar.org), 68 bytes.
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354"
    "414e444152442d414e544956495255532d544553542d46494c452124482b482a")
# The name clamd gives our signature (`.UNOFFICIAL`: not from ClamAV's own
# databases).
EICAR_SIGNATURE = "Eicar-Test-Body"
# SpamAssassin's "Generic Test for Unsolicited Bulk Email" (score 1000).
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _find(program: str) -> str | None:
    """`program` on PATH or in /usr/sbin (not on a normal user's PATH)."""
    found = shutil.which(program)
    if found:
        return found
    candidate = Path("/usr/sbin") / program
    return str(candidate) if os.access(candidate, os.X_OK) else None


def clamd_path() -> str | None:
    return _find("clamd")


def spamd_path() -> str | None:
    return _find("spamd")


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def shared_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may enter (mode 0755):
    in the privileged test pass smtpd runs as its own system user and must
    reach the scanners' Unix sockets."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, so a
    pytest killed without its teardown leaves no daemon behind (Linux's
    PR_SET_PDEATHSIG; best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _connect(address: str | Path, timeout: float) -> socket.socket:
    """A connection to a Unix socket path or a `host:port`."""
    address = str(address)
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


class Daemon:
    """A scanner daemon run in the foreground in its own process group, its
    output in a log file of its directory."""

    name = "daemon"

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def console_log(self) -> Path:
        assert self.dir is not None
        return self.dir / f"{self.name}.out"

    def _spawn(self, command: list[str]) -> None:
        with open(self.console_log, "ab") as out:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=self.dir, preexec_fn=_die_with_parent)

    def log_tail(self, lines: int = 40) -> str:
        """The end of every log file in the daemon's directory."""
        if self.dir is None:
            return ""
        out = []
        for path in [*sorted(self.dir.glob("*.log")), self.console_log]:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"---- {path} ----\n" + "\n".join(text))
        return "\n".join(out)

    def _wait_ready(self, ready, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} "
                                   f"during start\n{self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after STOP_TIMEOUT (and to
        any process of the group left behind); then remove its directory."""
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self._signal_group(signal.SIGTERM)
                    try:
                        self.proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        self._signal_group(signal.SIGKILL)
                        self.proc.wait(STOP_TIMEOUT)
                self._signal_group(signal.SIGKILL)
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self):
        raise NotImplementedError


class Clamd(Daemon):
    """clamd with a one-signature database, on a Unix socket (`socket`)
    and a TCP port (`tcp_address`)."""

    name = "clamd"

    def __init__(self) -> None:
        super().__init__()
        self.socket: Path | None = None
        self.port: int | None = None

    @property
    def tcp_address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> "Clamd":
        program = clamd_path()
        if program is None:
            raise RuntimeError("clamd is not installed (package clamav-daemon)")
        self.dir = shared_tmpdir("mailsrv-clamd-")
        try:
            db = self.dir / "db"
            db.mkdir()
            # Name:TargetType:Offset:HexSignature; target 0 = any file.
            (db / "test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
            self.socket = self.dir / "clamd.sock"
            self.port = free_port()
            conf = self.dir / "clamd.conf"
            conf.write_text(
                f"DatabaseDirectory {db}\n"
                f"LocalSocket {self.socket}\n"
                "LocalSocketMode 666\n"
                f"TCPSocket {self.port}\n"
                f"TCPAddr {LOCALHOST}\n"
                "Foreground yes\n"
                f"LogFile {self.dir / 'clamd.log'}\n"
                f"PidFile {self.dir / 'clamd.pid'}\n"
                "StreamMaxLength 10M\n"
                # Scanning must not wait for a database check.
                "SelfCheck 0\n")
            self._spawn([program, "-c", str(conf)])
            self._wait_ready(lambda: self.ping(self.socket) and self.ping(self.tcp_address))
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def ping(address: str | Path, timeout: float = 2.0) -> bool:
        """Whether clamd at `address` answers zPING with PONG."""
        with _connect(address, timeout) as sock:
            sock.sendall(b"zPING\0")
            return _read_all(sock) == b"PONG\0"

    def scan(self, data: bytes, address: str | Path | None = None,
             chunk: int = 8192, timeout: float = 30.0) -> str:
        """INSTREAM `data` (to our Unix socket unless `address` is given);
        clamd's reply without its NUL: `stream: OK`, `stream: NAME FOUND`."""
        with _connect(address or self.socket, timeout) as sock:
            sock.sendall(b"zINSTREAM\0")
            for i in range(0, len(data), chunk):
                part = data[i:i + chunk]
                sock.sendall(struct.pack(">I", len(part)) + part)
            sock.sendall(struct.pack(">I", 0))
            return _read_all(sock).rstrip(b"\0").decode("utf-8", "replace")


class Spamd(Daemon):
    """SpamAssassin's spamd with local tests only, on a TCP port
    (`address`) and a Unix socket (`socket`)."""

    name = "spamd"

    def __init__(self) -> None:
        super().__init__()
        self.port: int | None = None
        self.socket: Path | None = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> "Spamd":
        program = spamd_path()
        if program is None:
            raise RuntimeError("spamd is not installed (package spamd)")
        self.dir = shared_tmpdir("mailsrv-spamd-")
        try:
            self.port = free_port()
            self.socket = self.dir / "spamd.sock"
            home = self.dir / "home"
            home.mkdir()
            home.chmod(0o777)
            command = [
                program,
                f"--listen={self.address}", f"--listen={self.socket}", "--socketmode=0666",
                "--local", "--nouser-config", "--max-children=1", "--min-children=1",
                f"--pidfile={self.dir / 'spamd.pid'}",
                f"--syslog={self.dir / 'spamd.log'}",
                f"--helper-home-dir={home}",
            ]
            if os.geteuid() == 0:
                # As root spamd would switch to each request's user; keep
                # it on one unprivileged user instead.
                command.append("--username=nobody")
            self._spawn(command)
            self._wait_ready(lambda: self.ping(self.address) and self.ping(self.socket))
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def ping(address: str | Path, timeout: float = 2.0) -> bool:
        """Whether spamd at `address` answers PING with PONG."""
        with _connect(address, timeout) as sock:
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b" PONG" in _read_all(sock).split(b"\r\n", 1)[0]

    def symbols(self, message: bytes, address: str | Path | None = None,
                timeout: float = 60.0) -> tuple[bool, float, float, list[str]]:
        """SYMBOLS: (spam?, score, required score, rule names)."""
        with _connect(address or self.address, timeout) as sock:
            sock.sendall(b"SYMBOLS SPAMC/1.5\r\n"
                         + f"Content-length: {len(message)}\r\n\r\n".encode() + message)
            reply = _read_all(sock)
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("utf-8", "replace").split("\r\n")
        if not lines[0].startswith("SPAMD/") or " 0 EX_OK" not in lines[0]:
            raise RuntimeError(f"spamd answered {reply!r}")
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "spam":
                verdict, _, scores = value.partition(";")
                score, _, required = scores.partition("/")
                rules = [r for r in body.decode().strip().split(",") if r]
                return (verdict.strip().lower() == "true", float(score), float(required),
                        rules)
        raise RuntimeError(f"no Spam: line in {reply!r}")
