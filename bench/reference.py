"""Private Postfix 3.7 and Dovecot 2.3 instances for reference benchmarks.

Both classes run the Debian 12 packages (postfix, dovecot-core,
dovecot-imapd, dovecot-pop3d) out of a throw-away directory the caller
makes (``mktemp -d``), on loopback ports the caller picks.  Nothing in
/etc/postfix, /etc/dovecot, /var/spool/postfix, /var/lib/postfix,
/run/dovecot or /var/lib/dovecot is read for configuration, written or
started; the system instances stay stopped.  Standard library only.

Root
----
Everything here must run as root: ``postfix start`` (master(8) runs as
root and drops to ``mail_owner``), ``postfix check`` (creates the queue
directories owned by postfix/postdrop), ``dovecot`` (the master binds,
chroots login processes and setuid()s to the mail user) and the chown of
the mail directories.  ``maildir()`` and ``pids()`` need no privileges;
``stop()`` needs root to signal the daemons.  ``start()`` chmods the
caller's root directory to 0711 so the unprivileged users (postfix,
dovecot, dovenull and the mail owner) can traverse it; nothing below it
is world-readable except what the daemons need.

Postfix (class Postfix)
-----------------------
Layout under root: postfix-etc/ (main.cf, master.cf, vmailbox),
postfix-queue/ (queue_directory, created by ``postfix check`` through
post-install create-missing, i.e. exactly like ``set-permissions``
wants it), postfix-data/ (data_directory), postfix-mail/ (Maildirs,
owned by the mail owner), postfix-log/maillog (maillog_file written by
postlogd, because there is no syslog; the directory is added to
maillog_file_prefixes).

* master.cf is Debian's shipped file (services, chroot and process
  columns unchanged) except that the smtp listener is
  ``127.0.0.1:PORT`` with chroot off.
* Delivery is virtual(8) into Maildir: virtual_mailbox_domains = DOMAIN,
  virtual_mailbox_maps = texthash:postfix-etc/vmailbox with
  ``user@DOMAIN DOMAIN/user/`` (trailing slash = Maildir), uid/gid static
  to the mail owner.  Queue and virtual(8) fsync behaviour as shipped.
* inet_interfaces = 127.0.0.1, inet_protocols = ipv4, mydestination and
  relay_domains empty, mynetworks = 127.0.0.0/8 (this also exempts the
  load generator from smtpd_client_connection_count_limit = 50, whose
  exceptions default to $mynetworks), smtpd_peername_lookup = no (exists
  in 3.7, default yes; without it every connection does a reverse lookup
  of 127.0.0.1), no DNS for local delivery.
* default_process_limit = process_limit (default 250) so that 200
  concurrent SMTP sessions each get an smtpd (Debian's default is 100,
  the 101st client would wait in the listen queue).
* alternate_config_directories is not needed.  mail_conf.c checks it
  only for set-uid/set-gid programs (postdrop, postqueue, sendmail's
  helpers) run by a non-root user; we are root and never use them (mail
  comes in over SMTP).  postfix(1) refuses non-root callers anyway and
  exports MAIL_CONFIG=DIR to postfix-script, postconf, master and every
  daemon.  The only thing postfix-script reads from the default
  /etc/postfix/main.cf (absent on this machine) is
  multi_instance_directories, to decide whether check-warn also checks
  the shared files; nothing under /etc/postfix is written.
* postfix(1) chdir()s to queue_directory before anything else, so
  start() makes that directory (root, 0755); ``postfix check`` then
  creates the rest (post-install create-missing), no set-permissions
  (which would also chmod the shared binaries) is run.
* Start takes about 2.7 s (``postfix check`` and ``postfix start`` each
  run postfix-script check-fatal + check-warn); stop about 1.3-1.7 s
  (postfix-script polls master once a second).

Dovecot (class Dovecot)
-----------------------
Layout under root: dovecot/dovecot.conf, dovecot/passwd (passwd-file,
SHA512-CRYPT hashes made by ``doveadm pw``), dovecot/run (base_dir),
dovecot/state (state_dir), dovecot/dovecot.log (log_path),
dovecot-mail/USER (the Maildir; INBOX is the Maildir itself, folders are
.Name subdirectories, Dovecot's index files live next to it).

* protocols imap pop3, listen 127.0.0.1, imaps/pop3s listeners port 0
  (off), ssl = no, disable_plaintext_auth = no, auth_mechanisms = plain
  login, passdb passwd-file, userdb static with the mail owner's uid/gid,
  mail_location = maildir:ROOT/dovecot-mail/%n, the namespace and
  special-use mailboxes of Debian's conf.d; otherwise upstream defaults
  (Debian's conf.d is not included: it would pull in PAM and the
  snakeoil certificate).
* Limits for 1,000 concurrent IMAP connections in both modes (all
  from one user and one IP):
  - mail_max_userip_connections (default 10 per user+IP!) raised to
    max_connections for imap and pop3;
  - service imap/pop3 process_limit >= max_connections (one process per
    logged-in client, client_limit 1);
  - default mode keeps the high-security login (service_count = 1, one
    imap-login process per connection not yet logged in); its
    process_limit (default_process_limit = 100) is raised to
    max_connections so 1,000 clients can sit in the pre-auth state at
    once; with ssl = no the login process exits after handing the
    connection to imap, so logged-in clients hold no login process;
  - default_client_limit (the client_limit of auth, anvil, log, stats,
    config ...) is raised to 2 * max_connections + 1000 (3000 for
    1,000): anvil must take every imap-, pop3- and imap-urlauth-login
    process (2n + 101 in the default mode, Dovecot logs a warning
    otherwise), stats-writer and log every process;
  - ``ulimit -n``: Dovecot gives each service process RLIMIT_NOFILE >=
    its client_limit and warns ("fd limit (ulimit -n) is lower than
    required under max. load") when the master's limit is below
    default_client_limit.  start() raises the soft limit (and, with
    CAP_SYS_RESOURCE, the hard one) to max(65536, default_client_limit
    + 256) in the master's preexec; without CAP_SYS_RESOURCE (this CI
    container: hard limit 20000) default_client_limit is capped at
    hard - 256, never below n + 1000, which still covers n IMAP
    connections (each holds one imap process: a log and a stats-writer
    connection).
* performance_mode=True applies the documented high-performance login
  mode: service imap-login / pop3-login { service_count = 0,
  process_min_avail = number of CPUs, vsz_limit = 1G, client_limit =
  default_client_limit }, auth_cache_size = 10M, auth_cache_ttl = 1
  hour, and max_connections defaults to 10,000 (service imap/pop3
  process_limit = 10000, mail_max_userip_connections 10000,
  default_client_limit 21000 or the fd cap).  Memory is then the limit:
  about 0.5 MB PSS per logged-in, idle imap process (measured: 1,000
  idle connections with INBOX selected = ~490-510 MB PSS in either
  mode, against 6 MB idle default / 12 MB idle performance mode).
  10,000 processes also need pid_max/threads-max headroom (32768 here).
* Start takes about 0.1 s; stop about 2.8 s (``dovecot stop`` waits for
  the master, which waits up to a second for its children).

Extras beyond start/maildir/pids/stop
-------------------------------------
``deliver(user, data)`` drops a message into the user's Maildir new/
(tmp/ then rename, owned by the mail owner) for filling Dovecot
mailboxes; ``pss_kib(pids)`` sums Pss of /proc/PID/smaps_rollup;
``free_port()``; Dovecot(max_connections=...) overrides the 1,000 /
10,000 sizing; both take mail_uid/mail_gid.

Mail owner
----------
By default both instances deliver as a dedicated id that is not in
/etc/passwd (first free of 64000..63000 in passwd and group); Postfix's
virtual(8) and Dovecot only need the numeric uid/gid, so /etc/passwd is
not modified.  Pass ``mail_uid``/``mail_gid`` to use another one.

Leftover processes
------------------
pids() and stop() find the processes of an instance by the process
tree below its master (pid file) and, for processes that lost their
master, by a mark: Postfix processes carry REFBENCH_INSTANCE=postfix:ROOT
in their environment (set for ``postfix`` and passed on by
import_environment); Dovecot overwrites its processes' environment with
their titles, so those are found by title ``dovecot-refbench-XXXXXXXX/...``
(instance_name is derived from ROOT) and the master by ``-c CONF``.  So
stop() after a failed or half-done start still kills everything of this
instance and nothing else, including another instance sharing ROOT.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

__all__ = ["Postfix", "Dovecot", "pss_kib", "free_port"]

TAG = "REFBENCH_INSTANCE"

# Debian 12's /etc/postfix/master.cf (postfix 3.7.11), service lines
# verbatim, with the smtp inet listener replaced (see Postfix._master_cf).
_DEBIAN_MASTER_CF_REST = """\
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       y       1000?   1       tlsmgr
rewrite   unix  -       -       y       -       -       trivial-rewrite
bounce    unix  -       -       y       -       0       bounce
defer     unix  -       -       y       -       0       bounce
trace     unix  -       -       y       -       0       bounce
verify    unix  -       -       y       -       1       verify
flush     unix  n       -       y       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       y       -       -       showq
error     unix  -       -       y       -       -       error
retry     unix  -       -       y       -       -       error
discard   unix  -       -       y       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       y       -       -       lmtp
anvil     unix  -       -       y       -       1       anvil
scache    unix  -       -       y       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
maildrop  unix  -       n       n       -       -       pipe
  flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}
uucp      unix  -       n       n       -       -       pipe
  flags=Fqhu user=uucp argv=uux -r -n -z -a$sender - $nexthop!rmail ($recipient)
ifmail    unix  -       n       n       -       -       pipe
  flags=F user=ftn argv=/usr/lib/ifmail/ifmail -r $nexthop ($recipient)
bsmtp     unix  -       n       n       -       -       pipe
  flags=Fq. user=bsmtp argv=/usr/lib/bsmtp/bsmtp -t$nexthop -f$sender $recipient
scalemail-backend unix -       n       n       -       2       pipe
  flags=R user=scalemail argv=/usr/lib/scalemail/bin/scalemail-store ${nexthop} ${user} ${extension}
mailman   unix  -       n       n       -       -       pipe
  flags=FRX user=list argv=/usr/lib/mailman/bin/postfix-to-mailman.py ${nexthop} ${user}
"""


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy, good enough for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_id(start: int = 64000, stop: int = 63000) -> int:
    for i in range(start, stop, -1):
        try:
            pwd.getpwuid(i)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(i)
            continue
        except KeyError:
            return i
    raise RuntimeError("no free uid/gid between %d and %d" % (stop, start))


def _read(path: Path | str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _ppid(pid: int) -> int | None:
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    # comm may contain spaces/parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] == b"Z":
        return None
    return int(rest[1])


def _tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        pp = _ppid(pid)
        if pp is not None:
            children.setdefault(pp, []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(children.get(p, ()))
    return out


def _tagged(tag_value: str, markers: tuple[bytes, ...] = ()) -> list[int]:
    """Processes whose environment holds TAG=tag_value or whose command
    line contains one of markers (zombies left out)."""
    needle = b"\0" + f"{TAG}={tag_value}".encode() + b"\0"
    me = os.getpid()
    out = []
    for pid in _all_pids():
        if pid == me:
            continue
        env = _read(f"/proc/{pid}/environ") or b""
        hit = needle in b"\0" + env
        if not hit and markers:
            cmd = _read(f"/proc/{pid}/cmdline") or b""
            hit = any(m in cmd for m in markers)
        if hit and _ppid(pid) is not None:
            out.append(pid)
    return out


def _pid_from_file(path: Path) -> int | None:
    data = _read(path)
    if not data:
        return None
    try:
        pid = int(data.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def _kill_all(pids_fn, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, whatever pids_fn() keeps returning."""
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while True:
        pids = pids_fn()
        if not pids:
            return
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                raise RuntimeError("processes survive SIGKILL: %r" % pids)
            sig, deadline = signal.SIGKILL, time.monotonic() + 3.0
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _wait_greeting(port: int, prefix: bytes, timeout: float, quit: bytes) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                buf = b""
                while b"\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                if buf.startswith(prefix):
                    try:
                        s.sendall(quit)
                        s.recv(4096)
                    except OSError:
                        pass
                    return
                last = "unexpected greeting %r" % buf[:200]
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"port {port}: no {prefix!r} greeting within {timeout}s ({last})")


def _raise_nofile(n: int):
    """preexec_fn: raise RLIMIT_NOFILE soft and hard to at least n."""
    def fn():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(n, soft)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return fn


def pss_kib(pids) -> int:
    """Sum of Pss (KiB) from /proc/PID/smaps_rollup over pids."""
    total = 0
    for pid in pids:
        data = _read(f"/proc/{pid}/smaps_rollup")
        if not data:
            continue
        for line in data.splitlines():
            if line.startswith(b"Pss:"):
                total += int(line.split()[1])
                break
    return total


def _tail(path: Path, n: int = 30) -> str:
    data = _read(path)
    if not data:
        return "(no log)"
    return "\n".join(data.decode(errors="replace").splitlines()[-n:])


def _run(cmd, env, what, **kw):
    # Output goes to a file, not a pipe: daemons forked by the command
    # (Dovecot's log/anvil/config) inherit stdout and would keep a pipe
    # open forever.
    with tempfile.TemporaryFile() as out:
        p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL,
                           stdout=out, stderr=subprocess.STDOUT, timeout=120, **kw)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
                           + text)
    return text


def _quiet(cmd, env) -> None:
    """Run a stop command; whatever it does, stop() kills leftovers after."""
    try:
        subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


def _base_env(tag: str) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C",
        "TZ": os.environ.get("TZ", ":/etc/localtime"),
        TAG: tag,
    }


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def _make_maildir(path: Path, uid: int, gid: int) -> None:
    for d in (path.parent, path, path / "new", path / "cur", path / "tmp"):
        d.mkdir(exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)


def _deliver(maildir: Path, data: bytes, uid: int, gid: int, seq: list[int]) -> Path:
    seq[0] += 1
    name = f"{time.time_ns() // 1000}.R{seq[0]}P{os.getpid()}.refbench"
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as f:
        f.write(data)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, 0o600)
    dst = maildir / "new" / name
    os.rename(tmp, dst)
    return dst


class _Instance:
    root: Path
    mail_uid: int
    mail_gid: int

    def _prepare_root(self) -> None:
        if any(c.isspace() for c in str(self.root)):
            raise ValueError(f"root {self.root!r} must not contain white space")
        if os.geteuid() != 0:
            raise PermissionError(f"{type(self).__name__}.start() must run as root")
        self.root.mkdir(parents=True, exist_ok=True)
        # mktemp -d makes it 0700: postfix, dovecot, dovenull and the mail
        # owner must be able to traverse it (and every directory above it).
        os.chmod(self.root, 0o711)
        for d in self.root.parents:
            if not os.stat(d).st_mode & 0o001:
                raise PermissionError(
                    f"{d} is not searchable by other users; the postfix, dovecot "
                    f"and mail-owner processes could not reach {self.root}")

    def deliver(self, user: str, data: bytes) -> Path:
        """Drop one message into user's Maildir new/ (owned by the mail owner)."""
        md = self.maildir(user)
        if not (md / "new").is_dir():
            _make_maildir(md, self.mail_uid, self.mail_gid)
        return _deliver(md, data, self.mail_uid, self.mail_gid, self._seq)


# ---------------------------------------------------------------- Postfix

class Postfix(_Instance):
    def __init__(self, root: Path, smtp_port: int, domain: str = "example.test",
                 users=("u1",), process_limit: int = 250,
                 mail_uid: int | None = None, mail_gid: int | None = None):
        self.root = Path(root).resolve()
        self.smtp_port = int(smtp_port)
        self.domain = domain
        self.users = tuple(users)
        self.process_limit = int(process_limit)
        fid = _free_id() if mail_uid is None or mail_gid is None else 0
        self.mail_uid = fid if mail_uid is None else mail_uid
        self.mail_gid = fid if mail_gid is None else mail_gid
        self.etc = self.root / "postfix-etc"
        self.queue = self.root / "postfix-queue"
        self.data = self.root / "postfix-data"
        self.mail = self.root / "postfix-mail"
        self.logdir = self.root / "postfix-log"
        self.log = self.logdir / "maillog"
        self._seq = [0]
        self._tag = f"postfix:{self.root}"
        self._env = _base_env(self._tag)
        self._env["MAIL_CONFIG"] = str(self.etc)

    def maildir(self, user) -> Path:
        return self.mail / self.domain / user

    def _main_cf(self) -> str:
        vmailbox = self.etc / "vmailbox"
        return f"""\
# Private benchmark instance; see bench/reference.py.
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.{self.domain}
mydomain = {self.domain}
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Also exempts the load generator from smtpd_client_connection_count_limit
# (50 per client), whose exceptions default to $mynetworks.
mynetworks = 127.0.0.0/8
# No reverse DNS of 127.0.0.1 per connection (parameter exists in 3.7).
smtpd_peername_lookup = no
smtp_host_lookup = native
smtp_dns_support_level = disabled
biff = no
append_dot_mydomain = no
# 200 concurrent SMTP sessions need 200 smtpd processes; Debian's
# default_process_limit is 100.
default_process_limit = {self.process_limit}
# mailsrv's default limit (25 MiB) instead of 10,240,000 octets, so the
# benchmark's 10 MiB messages are taken (virtual_mailbox_limit, 51,200,000
# by default, stays above it).
message_size_limit = 26214400
# Maildir delivery through virtual(8); fsync behaviour as shipped.
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{vmailbox}
virtual_uid_maps = static:{self.mail_uid}
virtual_gid_maps = static:{self.mail_gid}
virtual_minimum_uid = 100
virtual_transport = virtual
# No syslog here: postlogd writes the log file.
maillog_file = {self.log}
maillog_file_prefixes = /var, /dev/stdout, {self.logdir}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME {TAG}={self._tag}
"""

    def _master_cf(self) -> str:
        return (f"# Debian 12 master.cf; only the smtp listener moved/unchrooted.\n"
                f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd\n"
                + _DEBIAN_MASTER_CF_REST)

    def start(self) -> None:
        self._prepare_root()
        for d in (self.etc, self.logdir):
            d.mkdir(mode=0o755, exist_ok=True)
            os.chmod(d, 0o755)
        self.mail.mkdir(exist_ok=True)
        os.chown(self.mail, self.mail_uid, self.mail_gid)
        os.chmod(self.mail, 0o700)
        for u in self.users:
            _make_maildir(self.maildir(u), self.mail_uid, self.mail_gid)
        _write(self.etc / "main.cf", self._main_cf())
        _write(self.etc / "master.cf", self._master_cf())
        _write(self.etc / "vmailbox",
               "".join(f"{u}@{self.domain} {self.domain}/{u}/\n" for u in self.users))
        # postfix(1) chdirs to queue_directory before it runs
        # postfix-script, so the top directory must exist (root, 0755).
        self.queue.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.queue, 0o755)
        pf = ["postfix", "-c", str(self.etc)]
        # check runs post-install create-missing: makes queue_directory
        # and data_directory with the owners/modes postfix-files wants.
        try:
            _run(pf + ["check"], self._env, "postfix check")
            _run(pf + ["start"], self._env, "postfix start",
                 preexec_fn=_raise_nofile(4 * self.process_limit + 1024))
        except RuntimeError as e:
            # postfix-script and master log to maillog_file, not stderr.
            raise RuntimeError(f"{e}\n--- {self.log}:\n{_tail(self.log)}") from None
        try:
            _wait_greeting(self.smtp_port, b"220", 30, b"QUIT\r\n")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- {self.log}:\n{_tail(self.log)}") from None

    def _master_pid(self) -> int | None:
        return _pid_from_file(self.queue / "pid" / "master.pid")

    def pids(self) -> list[int]:
        found = set(_tagged(self._tag))
        m = self._master_pid()
        if m is not None:
            found.update(_tree(m))
        return sorted(found)

    def stop(self) -> None:
        if (self.etc / "main.cf").exists() and self._master_pid() is not None:
            _quiet(["postfix", "-c", str(self.etc), "stop"], self._env)
        _kill_all(self.pids)


# ---------------------------------------------------------------- Dovecot

class Dovecot(_Instance):
    def __init__(self, root: Path, imap_port: int, pop3_port: int, users=("demo",),
                 password="pw", domain="example.test", performance_mode: bool = False,
                 max_connections: int | None = None,
                 mail_uid: int | None = None, mail_gid: int | None = None,
                 imaps_port: int | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None):
        self.root = Path(root).resolve()
        self.imap_port = int(imap_port)
        # IMAPS (TLS from the connect) with this PEM certificate and key,
        # when all three are given; otherwise ssl = no.
        self.imaps_port = imaps_port if tls_cert and tls_key else None
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.pop3_port = int(pop3_port)
        self.users = tuple(users)
        self.password = password
        self.domain = domain
        self.performance_mode = bool(performance_mode)
        if max_connections is None:
            max_connections = 10000 if performance_mode else 1000
        self.max_connections = int(max_connections)
        fid = _free_id() if mail_uid is None or mail_gid is None else 0
        self.mail_uid = fid if mail_uid is None else mail_uid
        self.mail_gid = fid if mail_gid is None else mail_gid
        self.dir = self.root / "dovecot"
        self.conf = self.dir / "dovecot.conf"
        self.passwd = self.dir / "passwd"
        self.base_dir = self.dir / "run"
        self.state_dir = self.dir / "state"
        self.log = self.dir / "dovecot.log"
        self.mail = self.root / "dovecot-mail"
        self._seq = [0]
        self._tag = f"dovecot:{self.root}"
        self._env = _base_env(self._tag)
        # Dovecot's process titles overwrite the environment area, so
        # /proc/PID/environ of its processes is blank: they are found by
        # title ("dovecot-INSTANCE_NAME/imap") and the master by its -c CONF.
        self.instance_name = "refbench-" + format(zlib.crc32(str(self.root).encode()), "08x")

    def maildir(self, user) -> Path:
        return self.mail / user

    def _client_limit(self) -> int:
        # anvil must take every login process of imap, pop3 and
        # imap-urlauth (2n + 101 in the default mode); stats-writer and log
        # every login and mail process.  Every service process gets
        # RLIMIT_NOFILE >= its client_limit, so the value cannot exceed the
        # hard `ulimit -n` (only raisable with CAP_SYS_RESOURCE); n + 1000
        # is still plenty for n IMAP connections.
        n = self.max_connections
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        return max(n + 1000, min(2 * n + 1000, hard - 256))

    def _config(self) -> str:
        n = self.max_connections
        client_limit = self._client_limit()
        if self.performance_mode:
            cpus = os.cpu_count() or 1
            login = f"""\
  # Dovecot's documented high-performance login mode.
  service_count = 0
  process_min_avail = {cpus}
  vsz_limit = 1G
  client_limit = {client_limit}
"""
            auth_cache = "auth_cache_size = 10M\nauth_cache_ttl = 1 hour\n"
        else:
            # High-security mode (one login process per pre-auth client), as
            # shipped; only the number of such processes is raised.
            login = f"  process_limit = {n}\n"
            auth_cache = ""
        imap_limit = max(1024, n)
        if self.imaps_port:
            ssl = f"ssl = yes\nssl_cert = <{self.tls_cert}\nssl_key = <{self.tls_key}\n"
            imaps = f"    address = 127.0.0.1\n    port = {self.imaps_port}\n"
        else:
            ssl = "ssl = no\n"
            imaps = "    port = 0\n"
        return f"""\
# Private benchmark instance; see bench/reference.py.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log}
protocols = imap pop3
listen = 127.0.0.1
{ssl}disable_plaintext_auth = no
auth_mechanisms = plain login
{auth_cache}import_environment = TZ CORE_OUTOFMEM CORE_ERROR LISTEN_PID LISTEN_FDS NOTIFY_SOCKET {TAG}={self._tag}
first_valid_uid = 100
mail_location = maildir:{self.mail}/%n
default_client_limit = {client_limit}

passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {self.passwd}
}}
userdb {{
  driver = static
  args = uid={self.mail_uid} gid={self.mail_gid} home={self.mail}/%n
}}

# As in Debian's conf.d/10-mail.conf and 15-mailboxes.conf.
namespace inbox {{
  inbox = yes
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox "Sent Messages" {{
    special_use = \\Sent
  }}
}}

# All connections of a benchmark come from one user at one address
# (the default allows 10).
protocol imap {{
  mail_max_userip_connections = {n}
}}
protocol pop3 {{
  mail_max_userip_connections = {n}
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
{imaps}  }}
{login}}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
{login}}}
service imap {{
  process_limit = {imap_limit}
}}
service pop3 {{
  process_limit = {imap_limit}
}}
"""

    def _hash(self) -> str:
        out = _run(["doveadm", "-c", str(self.conf), "pw", "-s", "SHA512-CRYPT",
                    "-p", self.password], self._env, "doveadm pw")
        return out.strip()

    def start(self) -> None:
        self._prepare_root()
        self.dir.mkdir(exist_ok=True)
        os.chmod(self.dir, 0o755)
        for d in (self.state_dir,):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o750)
        self.mail.mkdir(exist_ok=True)
        os.chown(self.mail, self.mail_uid, self.mail_gid)
        os.chmod(self.mail, 0o700)
        for u in self.users:
            _make_maildir(self.maildir(u), self.mail_uid, self.mail_gid)
        _write(self.conf, self._config())
        # The passwd-file is read by the auth process (user dovecot).
        _write(self.passwd, "")
        h = self._hash()
        _write(self.passwd, "".join(f"{u}@{self.domain}:{h}\n" for u in self.users), 0o640)
        os.chown(self.passwd, 0, grp.getgrnam("dovecot").gr_gid)
        nofile = max(65536, self._client_limit() + 256)
        _run(["dovecot", "-c", str(self.conf)], self._env, "dovecot",
             preexec_fn=_raise_nofile(nofile))
        try:
            _wait_greeting(self.imap_port, b"* OK", 30, b"a LOGOUT\r\n")
            _wait_greeting(self.pop3_port, b"+OK", 30, b"QUIT\r\n")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- {self.log}:\n{_tail(self.log)}") from None

    def _master_pid(self) -> int | None:
        return _pid_from_file(self.base_dir / "master.pid")

    def pids(self) -> list[int]:
        found = set(_tagged(self._tag, (f"dovecot-{self.instance_name}/".encode(),
                                        str(self.conf).encode() + b"\0")))
        m = self._master_pid()
        if m is not None:
            found.update(_tree(m))
        return sorted(found)

    def stop(self) -> None:
        if self.conf.exists() and self._master_pid() is not None:
            _quiet(["dovecot", "-c", str(self.conf), "stop"], self._env)
        _kill_all(self.pids)
