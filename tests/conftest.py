"""Harness for the mailsrv end-to-end tests (interfaces: docs/contract.md).

Every test gets its own installation made by `mailctl init` in a temporary
directory, on a random port base, and runs it with
`mailctl start --foreground` in its own process group. Teardown always stops
it (SIGTERM, then SIGKILL) and prints the tail of its log when the test
failed.

Binaries come from $MAILSRV_BIN_DIR, default <repo>/target/debug.

One DNS server (tests/dnsserver.py) runs for the whole session on
127.0.0.1; every installation's `[dns] servers` names it, so qmgr never
asks the real network: a name no test has set up gets SERVFAIL, and mail
to it is deferred (4.4.3). A test adds records through the `dns` fixture,
which removes them when the test ends.

The content scanners (tests/scanners.py), clamd and spamd, run once per
session too, started by the first test that asks for the `clamd` or
`spamd` fixture and always stopped at the end.
"""

from __future__ import annotations

import imaplib
import itertools
import json
import os
import poplib
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnsserver import DNSRecords, DNSServer  # noqa: E402
from scanners import Clamd, Spamd, clamd_path, spamd_path  # noqa: E402
from smtpscript import ScriptedSMTP  # noqa: E402
from mailtest import (  # noqa: E402
    CLIENT_NAME, LOCALHOST, RawIMAP, RawPOP3, RawSMTP, bindable, greets, header,
    imap_greets, insecure_tls_context, make_message, pid_alive, pop3_greets,
    process_mentions, queued_id, read_pid, wait_until,
)

REPO = Path(__file__).resolve().parent.parent
BIN_DIR = Path(os.environ.get("MAILSRV_BIN_DIR", REPO / "target" / "debug")).resolve()
MAILCTL = BIN_DIR / "mailctl"

HOSTNAME = "mx.example.test"
DOMAIN = "example.test"
# Daemons with a pid file in run/ (maildird's is absent until it runs).
DAEMONS = ("master", "smtpd", "qmgr", "maildird")
# smtpd listens on P+25, maildird's POP3 on P+110 (STLS) and P+995 (POP3S),
# its IMAP on P+143 (STARTTLS) and P+993 (IMAPS); P+587 and P+465 are
# reserved for submission.
PORT_OFFSETS = (25, 587, 465, 143, 993, 110, 995)
# The config keys `mailctl init` writes for those ports, with their offsets.
LISTEN_KEYS = (("smtpd.listen", 25), ("smtpd.submission_listen", 587),
               ("smtpd.submissions_listen", 465), ("maildird.imap_listen", 143),
               ("maildird.imaps_listen", 993), ("maildird.pop3_listen", 110),
               ("maildird.pop3s_listen", 995))

# The spool's subdirectories (ARCHITECTURE.md), data/ first: a message file
# is written before its envelope and removed after it, so listing data/
# first never misses an entry that moves between the others meanwhile.
SPOOL_DIRS = ("data", "tmp", "incoming", "active", "deferred", "hold", "corrupt",
              "maildrop")

START_TIMEOUT = 20
STOP_TIMEOUT = 15
LOG_TAIL_LINES = 80


# MAILSRV_TEST_PRIVILEGED=1: every installation is made without
# --single-user, so (as root) the daemons run as their system users.
PRIVILEGED_BY_DEFAULT = os.environ.get("MAILSRV_TEST_PRIVILEGED") == "1"


def free_port_base() -> int:
    """A port base P whose P+25, P+587, ... are all bindable on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 50000)
        if all(bindable(base + off) for off in PORT_OFFSETS):
            return base
    raise RuntimeError("no free port base found")


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal (str, int, float, bool or list of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)   # 15.0, 1e-05: TOML floats
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# A table header; a part may be quoted (`[delivery.domains."b.test"]`).
_TABLE_HEADER_RE = re.compile(r'\[\s*([A-Za-z0-9_.\- "]+?)\s*\]\s*(#.*)?$')


def set_toml_key(text: str, dotted_key: str, literal: str) -> tuple[str, int]:
    """Set `table.key = literal` in TOML `text` (a template as written by
    `mailctl init`, one `[table]` header per table): replace the key's line
    if present, else add it right after the table header (or at the top for
    a top-level key, or in a new table at the end). The table may be nested:
    "maildird.limits.max_auth_failures" is the key max_auth_failures of
    `[maildird.limits]`. A part of the table name that holds a dot is
    quoted, as in TOML: 'delivery.domains."b.test".tls' is the key tls of
    `[delivery.domains."b.test"]`. Returns the new text and the 1-based line
    of the key."""
    table, _, key = dotted_key.rpartition(".")
    lines = text.splitlines()
    current = ""
    header_index = -1 if table == "" else None
    key_re = re.compile(rf"{re.escape(key)}\s*=")
    for i, line in enumerate(lines):
        stripped = line.strip()
        header = _TABLE_HEADER_RE.match(stripped)
        if header:
            current = re.sub(r"\s*\.\s*", ".", header[1])
            if current == table:
                header_index = i
        elif current == table and key_re.match(stripped):
            lines[i] = f"{key} = {literal}"
            return "\n".join(lines) + "\n", i + 1
    if header_index is None:
        lines += ["", f"[{table}]"]
        header_index = len(lines) - 1
    lines.insert(header_index + 1, f"{key} = {literal}")
    return "\n".join(lines) + "\n", header_index + 2


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_mailctl(args: list[str], input: str | None = None, check: bool = True,
                timeout: float = 60) -> Result:
    """Run mailctl. Output goes through temporary files, not pipes, so a
    daemon that inherits them cannot keep us waiting."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(
            [str(MAILCTL), *args],
            input=None if input is None else input.encode("utf-8"),
            stdin=subprocess.DEVNULL if input is None else None,
            stdout=out, stderr=err, timeout=timeout,
        )
        out.seek(0)
        err.seek(0)
        result = Result(proc.returncode, out.read().decode("utf-8", "replace"),
                        err.read().decode("utf-8", "replace"))
    if check and result.returncode != 0:
        raise AssertionError(
            f"mailctl {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


class Mailsrv:
    """One mailsrv installation in `root`, optionally running.

    With `spool_tmpfs` (a tmpfs size such as "300k") the supervisor runs in
    its own user+mount namespace (no root needed) with a tmpfs of that size
    mounted on the spool directory; only processes in that namespace see
    it, so the tests look at it through /proc/<pid>/root (`spool_view`).
    `mail_root_tmpfs` does the same for the mail store (`mail_view`); the
    Maildirs made before the start (add_user) are copied onto it. As root
    the namespace is a mount namespace only, so a privileged installation's
    daemons can still become their users."""

    def __init__(self, root: Path, port_base: int, spool_tmpfs: str | None = None,
                 privileged: bool = False, hostname: str = HOSTNAME, domain: str = DOMAIN,
                 mail_root_tmpfs: str | None = None):
        self.root = root
        # privileged: `mailctl init` without --single-user, so that when the
        # tests run as root the daemons drop to the system users.
        self.privileged = privileged
        self.spool_tmpfs = spool_tmpfs
        self.mail_root_tmpfs = mail_root_tmpfs
        self.port_base = port_base
        self.smtp_port = port_base + 25
        self.config_path = root / "mailsrv.toml"
        self.log_path = root / "test-daemon.log"
        self.run_dir = root / "run"
        self.mail_root = root / "mail"
        self.spool_dir = root / "spool"
        # `mailctl init --hostname/--domain`: the name smtpd greets with and
        # the first domain it serves.
        self.hostname = hostname
        self.domain = domain
        self.proc: subprocess.Popen | None = None
        # Password of each user added with add_user(), for the clients'
        # `user=` logins.
        self.passwords: dict[str, str] = {}
        # start() (so restart() too) also waits until IMAP and IMAPS greet.
        self.wait_for_imap = False

    # ---- installation and configuration ---------------------------------

    def init(self, check: bool = True) -> Result:
        self.root.mkdir(parents=True, exist_ok=True)
        single = [] if self.privileged else ["--single-user"]
        return run_mailctl(["init", str(self.root), "--hostname", self.hostname,
                            "--domain", self.domain, "--port-base", str(self.port_base),
                            *single],
                           check=check)

    def set_config(self, dotted_key: str, value: Any) -> int:
        """Set a config value (e.g. "smtpd.max_errors", 3) in the file;
        returns the line it is on. Takes effect at the next start/reload."""
        text, line = set_toml_key(self.config_path.read_text(), dotted_key,
                                  toml_value(value))
        self.config_path.write_text(text)
        return line

    def move_ports(self, port_base: int) -> None:
        """Point every listener of the config at `port_base` + the offsets
        `mailctl init` uses (for an installation made from a copy, such as
        a restored backup, whose ports another one holds)."""
        assert not self.running, "move the ports of a stopped installation"
        for key, offset in LISTEN_KEYS:
            self.set_config(key, [f"127.0.0.1:{port_base + offset}"])
        self.port_base = port_base
        self.smtp_port = port_base + 25

    def write_secret(self, name: str, text: str) -> Path:
        """Write `text` to `name` in the installation's directory, readable
        by its owner only (0600); in a privileged installation root:<secret
        group> 0640, so the daemons (as their own users) can read it, as
        they read the config. For files such as relay credentials."""
        path = self.root / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        if self.privileged and os.geteuid() == 0:
            group = self.config()["privileges"]["secret_group"]
            shutil.chown(path, "root", group)
            os.chmod(path, 0o640)
        return path

    def config(self) -> dict[str, Any]:
        """The config file as parsed TOML."""
        with open(self.config_path, "rb") as f:
            return tomllib.load(f)

    def _listen_port(self, table: str, key: str) -> int:
        addresses = self.config().get(table, {}).get(key)
        assert addresses, f"no {table}.{key} in {self.config_path}"
        return int(str(addresses[0]).rpartition(":")[2])

    @property
    def pop3_port(self) -> int:
        """The first maildird.pop3_listen port (POP3 with STLS; P+110 from init)."""
        return self._listen_port("maildird", "pop3_listen")

    @property
    def pop3s_port(self) -> int:
        """The first maildird.pop3s_listen port (implicit TLS; P+995 from init)."""
        return self._listen_port("maildird", "pop3s_listen")

    @property
    def submission_port(self) -> int:
        """The first smtpd.submission_listen port (STARTTLS, AUTH; P+587 from init)."""
        return self._listen_port("smtpd", "submission_listen")

    @property
    def submissions_port(self) -> int:
        """The first smtpd.submissions_listen port (implicit TLS; P+465 from init)."""
        return self._listen_port("smtpd", "submissions_listen")

    @property
    def imap_port(self) -> int:
        """The first maildird.imap_listen port (IMAP with STARTTLS; P+143 from init)."""
        return self._listen_port("maildird", "imap_listen")

    @property
    def imaps_port(self) -> int:
        """The first maildird.imaps_listen port (implicit TLS; P+993 from init)."""
        return self._listen_port("maildird", "imaps_listen")

    def ctl(self, *args: str, input: str | None = None, check: bool = True) -> Result:
        return run_mailctl(["-c", str(self.config_path), *args], input=input, check=check)

    def add_user(self, addr: str, password: str = "pw", check: bool = True) -> Result:
        result = self.ctl("user", "add", addr, input=password + "\n", check=check)
        if result.returncode == 0:
            self.passwords[addr] = password
        return result

    def add_alias(self, source: str, *targets: str) -> Result:
        return self.ctl("alias", "add", source, *targets)

    def add_domain(self, domain: str) -> Result:
        return self.ctl("domain", "add", domain)

    def queue(self) -> dict[str, dict]:
        """`mailctl queue list --json`, by queue id."""
        return {e["id"]: e for e in json.loads(self.ctl("queue", "list", "--json").stdout)}

    def queue_recipient(self, address: str) -> tuple[dict, dict] | None:
        """(entry, recipient) of the first queued recipient `address`
        (case-insensitive) in `mailctl queue list --json`, or None."""
        for entry in self.queue().values():
            for rcpt in entry.get("recipients", []):
                if rcpt["address"].lower() == address.lower():
                    return entry, rcpt
        return None

    # ---- running ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start_command(self) -> list[str]:
        """`mailctl start --foreground`, wrapped in unshare + mount when the
        spool or the mail store is to be a tmpfs. Every wrapper execs, so
        the pid we start stays the supervisor's."""
        command = [str(MAILCTL), "-c", str(self.config_path), "start", "--foreground"]
        if self.spool_tmpfs is None and self.mail_root_tmpfs is None:
            return command
        # $1 $2: spool size and directory; $3 $4: mail store size and
        # directory (an empty size: no tmpfs there). What the mail store
        # already holds (the Maildirs of add_user) is copied aside, then
        # onto its tmpfs (`mount --move` fails in a user namespace).
        script = (
            'set -e; '
            'if [ -n "$1" ]; then mount -t tmpfs -o "size=$1" tmpfs "$2"; fi; '
            'if [ -n "$3" ]; then '
            '  stage=$(mktemp -d); cp -a "$4/." "$stage/"; '
            '  mount -t tmpfs -o "size=$3" tmpfs "$4"; '
            '  cp -a "$stage/." "$4/"; chmod --reference="$stage" "$4"; rm -rf "$stage"; '
            'fi; '
            'shift 4; exec "$@"')
        namespace = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
        return ["unshare", *namespace, "sh", "-c", script, "sh",
                self.spool_tmpfs or "", str(self.spool_dir),
                self.mail_root_tmpfs or "", str(self.mail_root), *command]

    def start(self) -> None:
        """`mailctl start --foreground` in a new session; wait for port 25."""
        assert not self.running, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.start_command(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until smtpd greets with 220, and with `wait_for_imap` until
        maildird greets on IMAP and IMAPS too."""
        deadline = time.monotonic() + timeout
        self._wait_greeting(lambda: greets(self.smtp_port),
                            f"port {self.smtp_port} gave no 220 greeting", deadline, timeout)
        if self.wait_for_imap:
            self.wait_imap_ready(timeout)

    def wait_pop3_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until maildird greets on its POP3 and POP3S ports. start()
        waits for SMTP only: maildird may come up a little later."""
        deadline = time.monotonic() + timeout
        for port, tls in ((self.pop3_port, False), (self.pop3s_port, True)):
            self._wait_greeting(lambda: pop3_greets(port, tls),
                                f"port {port} ({'POP3S' if tls else 'POP3'}) gave no +OK greeting",
                                deadline, timeout)

    def wait_imap_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until maildird greets with `* OK` on its IMAP and IMAPS
        ports (start() does this itself when `wait_for_imap` is set)."""
        deadline = time.monotonic() + timeout
        for port, tls in ((self.imap_port, False), (self.imaps_port, True)):
            self._wait_greeting(lambda: imap_greets(port, tls),
                                f"port {port} ({'IMAPS' if tls else 'IMAP'}) gave no * OK greeting",
                                deadline, timeout)

    def _wait_greeting(self, greeted, what: str, deadline: float, timeout: float) -> None:
        """Poll `greeted` until true; fail if mailsrv exits or time runs out."""
        while not greeted():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"mailsrv exited with {self.proc.returncode} during start\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM to the process group; SIGKILL if it outlives `timeout`.
        Returns the exit code of `mailctl start --foreground`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout)
        self._signal_group(signal.SIGKILL)   # stragglers left in the group
        return self.proc.returncode

    def daemon_pids(self) -> list[int]:
        """Live pids named by our pid files that really belong to this
        installation."""
        pids = (read_pid(self.run_dir / f"{d}.pid") for d in DAEMONS)
        return [p for p in pids
                if p and pid_alive(p) and process_mentions(p, str(self.root))]

    def crash(self) -> None:
        """kill -9 everything: the process group and every daemon we know."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        for pid in self.daemon_pids():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.daemon_pids(), STOP_TIMEOUT,
                   "killed daemons to disappear")

    def restart(self) -> None:
        """Stop (if running) and start again in the foreground."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Teardown: stop, and kill anything of ours still alive (e.g. a
        supervisor from a background `mailctl start`)."""
        try:
            self.stop()
        finally:
            for pid in self.daemon_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def pid(self, daemon: str) -> int:
        pid = read_pid(self.run_dir / f"{daemon}.pid")
        assert pid is not None, f"no pid in {self.run_dir / (daemon + '.pid')}"
        return pid

    def wait_for_new_pid(self, daemon: str, old: int, timeout: float = 15) -> int:
        """Wait until run/<daemon>.pid names a live process other than `old`."""
        def new_pid() -> int | None:
            pid = read_pid(self.run_dir / f"{daemon}.pid")
            return pid if pid and pid != old and pid_alive(pid) else None
        return wait_until(new_pid, timeout, f"a restarted {daemon} (old pid {old})")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"---- last {lines} lines of {self.log_path} ----\n{tail}\n----"

    # ---- the spool -------------------------------------------------------

    def spool_view(self) -> Path:
        """The spool directory as the daemons see it."""
        if self.spool_tmpfs is None:
            return self.spool_dir
        assert self.running, "the tmpfs spool exists only while mailsrv runs"
        return Path(f"/proc/{self.proc.pid}/root") / self.spool_dir.relative_to("/")

    def mail_view(self) -> Path:
        """The mail store (mail_root) as the daemons see it."""
        if self.mail_root_tmpfs is None:
            return self.mail_root
        assert self.running, "the tmpfs mail store exists only while mailsrv runs"
        return Path(f"/proc/{self.proc.pid}/root") / self.mail_root.relative_to("/")

    def spool_files(self) -> dict[str, list[str]]:
        """{subdirectory: file names} for every non-empty spool subdirectory."""
        view = self.spool_view()
        found = {}
        for sub in SPOOL_DIRS:
            try:
                names = sorted(os.listdir(view / sub))
            except FileNotFoundError:
                names = []
            if names:
                found[sub] = names
        return found

    def wait_spool_empty(self, timeout: float = 20) -> None:
        """Wait until no spool subdirectory holds a file (every message done)."""
        try:
            wait_until(lambda: not self.spool_files(), timeout, "an empty spool")
        except AssertionError as e:
            raise AssertionError(f"{e}; left: {self.spool_files()}\n{self.log_tail()}") from None

    # ---- SMTP and mailboxes ----------------------------------------------

    def submit(self, to: str, message: bytes, sender: str = "sender@remote.test") -> str:
        """One transaction over a raw connection (EHLO, MAIL, RCPT, DATA),
        asserting each reply; returns the queue id of the 250."""
        with self.raw() as conn:
            conn.ehlo()
            conn.expect(f"MAIL FROM:<{sender}>", 250)
            conn.expect(f"RCPT TO:<{to}>", 250)
            lines = RawSMTP.check_reply(conn.data(message), 250, "2.0.0", "end of data")
            conn.command("QUIT")
            return queued_id(lines)

    def delivered_files(self) -> list[Path]:
        """Every file in any mailbox's new/ or cur/ (all domains and users)."""
        return sorted(p for p in self.mail_root.glob("*/*/*/*")
                      if p.parent.name in ("new", "cur") and p.is_file())

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP(LOCALHOST, self.smtp_port, local_hostname=CLIENT_NAME,
                            timeout=15)

    # ---- POP3 ------------------------------------------------------------

    def pop3(self, timeout: float = 15) -> poplib.POP3:
        """poplib on the plain POP3 port (no TLS yet; login needs STLS)."""
        return poplib.POP3(LOCALHOST, self.pop3_port, timeout=timeout)

    def pop3s(self, timeout: float = 15) -> poplib.POP3_SSL:
        """poplib on the POP3S port (implicit TLS, certificate not verified)."""
        return poplib.POP3_SSL(LOCALHOST, self.pop3s_port, timeout=timeout,
                               context=insecure_tls_context())

    def pop3_stls(self, timeout: float = 15) -> poplib.POP3:
        """poplib on the plain port after STLS (certificate not verified)."""
        client = self.pop3(timeout)
        try:
            client.stls(insecure_tls_context())
        except BaseException:
            client.close()
            raise
        return client

    def raw_pop3(self, tls: bool = True, timeout: float = 10.0) -> RawPOP3:
        """A RawPOP3 connection (POP3S when `tls`, else the plain port)
        whose greeting has been read."""
        conn = RawPOP3(self.pop3s_port if tls else self.pop3_port, tls, timeout)
        try:
            conn.greeting()
        except BaseException:
            conn.close()
            raise
        return conn

    # ---- IMAP ------------------------------------------------------------

    def _imap_login(self, client: imaplib.IMAP4, user: str | None) -> imaplib.IMAP4:
        """LOGIN as `user` with the password add_user() gave it, unless
        `user` is None; closes the client if that fails."""
        try:
            if user is not None:
                client.login(user, self.passwords[user])
        except BaseException:
            client.shutdown()
            raise
        return client

    def imap(self, user: str | None = None, timeout: float = 15) -> imaplib.IMAP4:
        """imaplib on the plain IMAP port, no TLS (login needs STARTTLS
        unless maildird.allow_plaintext_auth); logged in as `user` if given."""
        return self._imap_login(imaplib.IMAP4(LOCALHOST, self.imap_port, timeout=timeout), user)

    def imaps(self, user: str | None = None, timeout: float = 15) -> imaplib.IMAP4_SSL:
        """imaplib on the IMAPS port (implicit TLS, certificate not
        verified); logged in as `user` if given."""
        client = imaplib.IMAP4_SSL(LOCALHOST, self.imaps_port, timeout=timeout,
                                   ssl_context=insecure_tls_context())
        return self._imap_login(client, user)

    def imap_starttls(self, user: str | None = None, timeout: float = 15) -> imaplib.IMAP4:
        """imaplib on the plain port after STARTTLS (certificate not
        verified); logged in as `user` if given."""
        client = imaplib.IMAP4(LOCALHOST, self.imap_port, timeout=timeout)
        try:
            client.starttls(insecure_tls_context())
        except BaseException:
            client.shutdown()
            raise
        return self._imap_login(client, user)

    def raw_imap(self, tls: bool = True, user: str | None = None,
                 timeout: float = 10.0) -> RawIMAP:
        """A RawIMAP connection (IMAPS when `tls`, else the plain port) whose
        greeting has been read; logged in as `user` (LOGIN) if given."""
        conn = RawIMAP(self.imaps_port if tls else self.imap_port, tls, timeout)
        try:
            conn.greeting()
            if user is not None:
                conn.login(user, self.passwords[user])
        except BaseException:
            conn.close()
            raise
        return conn

    def raw(self) -> RawSMTP:
        """A RawSMTP connection whose greeting has been read."""
        conn = RawSMTP(self.smtp_port)
        conn.greeting()
        return conn

    def send(self, to: str | list[str], message: bytes | None = None,
             sender: str = "sender@remote.test", **options: Any) -> bytes:
        """Send `message` (default: a fresh one) with smtplib; assert that
        every recipient was accepted. Returns the message."""
        recipients = [to] if isinstance(to, str) else to
        if not all(a.isascii() for a in [sender, *recipients]):
            options.setdefault("mail_options", ["SMTPUTF8", "BODY=8BITMIME"])
        if message is None:
            message = make_message(f"test {uuid.uuid4().hex}", to=recipients[0])
        with self.smtp() as s:
            refused = s.sendmail(sender, recipients, message, **options)
        assert refused == {}, f"refused recipients: {refused}"
        return message

    def maildir(self, addr: str) -> Path:
        """addr's Maildir as the daemons see it (on the mail store's tmpfs
        while one is mounted)."""
        local, _, domain = addr.rpartition("@")
        base = self.mail_view() if self.mail_root_tmpfs and self.running else self.mail_root
        return base / domain.lower() / local.lower()

    def messages(self, addr: str) -> list[Path]:
        new = self.maildir(addr) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_for_messages(self, addr: str, n: int, timeout: float = 20) -> list[Path]:
        def enough() -> list[Path] | None:
            found = self.messages(addr)
            return found if len(found) >= n else None
        try:
            return wait_until(enough, timeout, f"{n} message(s) in {self.maildir(addr)}/new")
        except AssertionError as e:
            raise AssertionError(
                f"{e}; found {len(self.messages(addr))}\n{self.log_tail()}") from None

    def wait_for_delivery(self, addr: str, messages: list[bytes], timeout: float = 20) -> None:
        """Wait until every message in `messages` (known by its Message-ID)
        is in addr's INBOX, in new/ or cur/: an IMAP session may move a
        delivered file from new/ to cur/ at once."""
        wanted = {header(m, "Message-ID") for m in messages}
        assert None not in wanted, "a message without Message-ID"
        inbox = self.maildir(addr)

        def delivered() -> bool:
            found = set()
            for sub in ("new", "cur"):
                for path in (inbox / sub).iterdir() if (inbox / sub).is_dir() else ():
                    try:
                        found.add(header(path.read_bytes(), "Message-ID"))
                    except FileNotFoundError:   # moved to cur/ meanwhile
                        return False
            return wanted <= found
        try:
            wait_until(delivered, timeout, f"{len(wanted)} message(s) in {inbox}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    @staticmethod
    def read_message(path: Path) -> bytes:
        return path.read_bytes()

    def settle(self, addr: str) -> list[Path]:
        """Send a marker message to `addr` and wait for it, so anything
        queued before has had its turn; return the other messages."""
        subject = f"settle-marker-{uuid.uuid4().hex}"
        self.send(addr, make_message(subject, to=addr))

        def marker_seen() -> bool:
            return any(header(p.read_bytes(), "Subject") == subject for p in self.messages(addr))
        wait_until(marker_seen, 20, f"the marker message in {self.maildir(addr)}")
        time.sleep(0.5)   # concurrent deliveries may finish out of order
        return [p for p in self.messages(addr)
                if header(p.read_bytes(), "Subject") != subject]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Keep each phase's report on the item so fixtures can see failures."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _test_failed(node: pytest.Item) -> bool:
    return any(getattr(getattr(node, f"rep_{phase}", None), "failed", False)
               for phase in ("setup", "call"))


@pytest.fixture(scope="session")
def dns_server():
    """The session's DNS server on 127.0.0.1 (tests/dnsserver.py); every
    installation asks it. Stopped at the end of the session, whatever
    happened."""
    server = DNSServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns(dns_server: DNSServer):
    """A handle to add DNS records for this test (`dns.mail_domain(d)`,
    `dns.add_mx(...)`, `dns.add_a(...)`, `dns.nxdomain(...)`, `dns.unique("b")`
    for a fresh domain name); what it added is removed after the test."""
    records = DNSRecords(dns_server)
    try:
        yield records
    finally:
        records.clear()


@pytest.fixture(scope="session")
def clamd():
    """ClamAV's clamd for the whole session (tests/scanners.py), with a
    database of one signature that finds the EICAR test string: its Unix
    socket is `clamd.socket`, its TCP address `clamd.tcp_address`. Stopped
    at the end of the session, whatever happened. Tests using it fail when
    clamd is not installed (test.sh installs clamav-daemon): a skipped
    test is not a passed one."""
    if clamd_path() is None:
        pytest.fail("clamd is not installed (test.sh installs clamav-daemon)")
    daemon = Clamd().start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def spamd():
    """SpamAssassin's spamd for the whole session (tests/scanners.py), with
    local tests only (no DNS): its TCP address is `spamd.address`, its Unix
    socket `spamd.socket`. Stopped at the end of the session, whatever
    happened. Tests using it fail when spamd is not installed (test.sh
    installs it)."""
    if spamd_path() is None:
        pytest.fail("spamd is not installed (test.sh installs it)")
    daemon = Spamd().start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def make_scripted_smtp():
    """Factory: make_scripted_smtp(capabilities=..., replies=...) starts a
    ScriptedSMTP (tests/smtpscript.py) on a free port of 127.0.0.1, or on
    `address=` / `port=` if given (e.g. a second server on 127.0.0.2 and
    the first one's port); every one is stopped when the test ends."""
    servers: list[ScriptedSMTP] = []

    def make(**options: Any) -> ScriptedSMTP:
        server = ScriptedSMTP(**options)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def make_mailsrv(tmp_path: Path, request: pytest.FixtureRequest, dns_server: DNSServer):
    """Factory: make_mailsrv(config={"smtpd.max_errors": 3}, start=True,
    spool_tmpfs=None, mail_root_tmpfs=None, users=(), wait_for_imap=False,
    hostname=HOSTNAME, domain=DOMAIN) initialises an installation (`mailctl init --hostname
    --domain`), points its `dns.servers` at the session's DNS server,
    applies the config values (which may override that) and adds the users
    (each with a fresh password, kept in srv.passwords) before the first
    start, and (by default) starts it; spool_tmpfs="300k" runs it with a
    tmpfs of that size on its spool, mail_root_tmpfs on its mail store (see
    Mailsrv); wait_for_imap makes every
    start wait for the IMAP and IMAPS greetings too.

    make_mailsrv(existing=DIR) takes over the installation already in DIR
    (a copy, or a restored backup: DIR/mailsrv.toml) instead of making one:
    its listeners move to a free port base, then the config values and
    users apply as above; it is stopped at teardown like the others.
    make_mailsrv.new_root() gives a fresh path (not yet made) for such an
    installation, where the daemons of a privileged one can reach it; it is
    removed at teardown, after every installation has stopped."""
    if not MAILCTL.is_file():
        pytest.fail(f"{MAILCTL} not found: build with `cargo build --workspace` "
                    "or set MAILSRV_BIN_DIR")
    made: list[Mailsrv] = []
    shared_roots: list[Path] = []
    roots_made = itertools.count()

    def new_root(privileged: bool | None = None) -> Path:
        if privileged is None:
            privileged = PRIVILEGED_BY_DEFAULT
        if privileged:
            # The daemons' users must get through every directory above
            # the installation; pytest's own temp dirs are private.
            root = Path(tempfile.mkdtemp(prefix="mailsrv-priv-", dir="/tmp"))
            root.chmod(0o755)
            shared_roots.append(root)
            return root / "inst"
        return tmp_path / f"inst{next(roots_made)}"

    def make(config: dict[str, Any] | None = None, start: bool = True,
             spool_tmpfs: str | None = None, mail_root_tmpfs: str | None = None,
             users: Iterable[str] = (),
             wait_for_imap: bool = False, privileged: bool | None = None,
             hostname: str = HOSTNAME, domain: str = DOMAIN,
             existing: Path | None = None) -> Mailsrv:
        if existing is not None:
            root = Path(existing)
            assert (root / "mailsrv.toml").is_file(), f"no installation in {root}"
            with open(root / "mailsrv.toml", "rb") as f:
                existing_config = tomllib.load(f)
            privileged = "privileges" in existing_config
            hostname = existing_config.get("hostname", hostname)
        elif privileged is None:
            privileged = PRIVILEGED_BY_DEFAULT
        if existing is None:
            root = new_root(privileged)
        srv = Mailsrv(root, free_port_base(), spool_tmpfs, privileged, hostname, domain,
                      mail_root_tmpfs)
        made.append(srv)
        srv.wait_for_imap = wait_for_imap
        if existing is not None:
            srv.move_ports(srv.port_base)
        else:
            srv.init()
            # Never the system resolver: names no test set up get SERVFAIL.
            srv.set_config("dns.servers", [dns_server.address])
        for key, value in (config or {}).items():
            srv.set_config(key, value)
        for addr in users:
            srv.add_user(addr, f"{addr.partition('@')[0]}-pw-{uuid.uuid4().hex[:8]}")
        if start:
            srv.start()
        return srv

    make.new_root = new_root
    try:
        yield make
    finally:
        for srv in made:
            try:
                srv.close()
            finally:
                if _test_failed(request.node):
                    print(srv.log_tail(), file=sys.stderr)
        for root in shared_roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mailsrv(make_mailsrv) -> Mailsrv:
    """A fresh, running installation serving example.test."""
    return make_mailsrv()


@pytest.fixture
def installation(make_mailsrv) -> Mailsrv:
    """A fresh installation that is not started."""
    return make_mailsrv(start=False)
