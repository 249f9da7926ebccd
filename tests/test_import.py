"""`mailctl import`: taking over a Dovecot installation (passwd-file users
with their password hashes and quotas, and their Maildirs with folders,
UIDs, flags, keywords and subscriptions) and an /etc/aliases file.

The Maildirs are made by Dovecot itself (2.3, test.sh installs
dovecot-core and dovecot-imapd): its `imap` binary runs standalone in
PREAUTH mode on a pipe, and the test drives it as an IMAP client would.
What that client saw through Dovecot (folders, UIDVALIDITY, UIDs, flags,
keywords, INTERNALDATE, bodies, subscriptions) must be what it sees
through maildird after the import, so nothing is downloaded again.
Password hashes come from `doveadm pw`."""

from __future__ import annotations

import datetime
import grp
import itertools
import json
import os
import pwd
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailtest import (
    RawIMAP, fetch_items, header, imap_flags, imap_quote, imap_text, make_message, parse_list,
    resp_code,
)

DOVECOT_IMAP = Path("/usr/lib/dovecot/imap")
ALICE = "alice@example.test"
BOB = "bob@example.test"
# A user of a domain the installation does not serve yet.
CAROL = "carol@old.test"
# Seconds any Dovecot process may take for a session; it is killed after.
DOVECOT_TIMEOUT = 30
# The quota in the passwd-file, as Dovecot's userdb field, and in bytes.
QUOTA_FIELD = "userdb_quota_rule=*:storage=1G"
QUOTA_BYTES = 1 << 30
# The folders every mailbox of ours has (`mailctl user add`, first login).
SPECIAL_FOLDERS = {"Sent", "Drafts", "Junk", "Trash", "Archive"}


def doveadm() -> str:
    path = shutil.which("doveadm") or ("/usr/bin/doveadm" if Path("/usr/bin/doveadm").is_file()
                                       else None)
    if path is None or not DOVECOT_IMAP.is_file():
        pytest.fail("Dovecot is not installed (test.sh installs dovecot-core and dovecot-imapd)")
    return path


# --------------------------------------------------------------------------
# Dovecot, standalone
# --------------------------------------------------------------------------

class DovecotIMAP(RawIMAP):
    """A PREAUTH session with Dovecot's `imap` binary on its standard
    input and output (pipes: Dovecot refuses a socket there, and a file
    makes it panic), read with RawIMAP's parsing and deadlines. close()
    ends its input, at which Dovecot exits; it is killed if it does not
    within a few seconds."""

    def __init__(self, proc: subprocess.Popen, stderr_path: Path,
                 timeout: float = DOVECOT_TIMEOUT):
        # No socket: RawLineClient's reading goes through _fill below.
        self.timeout = timeout
        self._buf = b""
        self.eof = False
        self._tags = itertools.count(1)
        self.proc = proc
        self.stderr_path = stderr_path

    def send(self, data: bytes | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data.encode("utf-8") if isinstance(data, str) else data)
        self.proc.stdin.flush()

    def _fill(self, deadline: float) -> bool:
        assert self.proc.stdout is not None
        remaining = deadline - time.monotonic()
        ready = select.select([self.proc.stdout], [], [], max(remaining, 0))[0]
        if not ready:
            raise TimeoutError(f"Dovecot: nothing complete within {self.timeout}s; have "
                               f"{self._buf!r}; its stderr: {self.stderr()}")
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            self.eof = True
        self._buf += chunk
        return bool(chunk)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def greeting(self) -> bytes:
        response = self.read_response()
        assert response.startswith(b"* PREAUTH"), (
            f"Dovecot greeting: {response!r}; its stderr: {self.stderr()}")
        return response

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def logout(self) -> None:
        self.expect("LOGOUT")
        self.close()


class Dovecot:
    """A Dovecot 2.3 "installation" for the import: a passwd-file and the
    users' Maildirs under `maildir_root`/<domain>/<user>, made and read by
    Dovecot's own `imap` binary. `root` is a directory every user can get
    through (the copy of a privileged installation runs as its store
    user). As root, Dovecot runs as `mail_user` (it refuses root)."""

    def __init__(self, root: Path, mail_user: str | None):
        self.root = root
        self.maildir_root = root / "maildirs"
        self.maildir_root.mkdir(mode=0o755)
        self.passwd_file = root / "passwd"
        self.stderr_path = root / "dovecot-stderr.log"
        self.config = root / "dovecot.conf"
        self.doveadm = doveadm()
        if os.geteuid() == 0:
            user = pwd.getpwnam(mail_user or "nobody")
            self.uid, self.gid = user.pw_uid, user.pw_gid
            identity = (f"mail_uid = {user.pw_name}\n"
                        f"mail_gid = {grp.getgrgid(user.pw_gid).gr_name}\n"
                        "first_valid_uid = 0\nfirst_valid_gid = 0\n")
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
            identity = ""
        self.config.write_text(
            "mail_location = maildir:~/Maildir\n"
            f"base_dir = {root / 'run'}\n"
            f"log_path = {root / 'dovecot.log'}\n"
            "ssl = no\n" + identity)

    def password_hash(self, password: str) -> str:
        """`doveadm pw -s SHA512-CRYPT`: `{SHA512-CRYPT}$6$...`."""
        proc = subprocess.run([self.doveadm, "-c", str(self.config), "pw", "-s", "SHA512-CRYPT",
                               "-p", password],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=DOVECOT_TIMEOUT)
        assert proc.returncode == 0, f"doveadm pw: {proc.returncode} {proc.stderr}"
        hashed = proc.stdout.strip()
        assert hashed.startswith("{SHA512-CRYPT}$6$"), hashed
        return hashed

    def home(self, addr: str) -> Path:
        local, _, domain = addr.partition("@")
        return self.maildir_root / domain / local

    def maildir(self, addr: str, subdir: bool = True) -> Path:
        """Where Dovecot keeps `addr`'s mail: <home>/Maildir, or the home
        itself (`mail_location = maildir:~`)."""
        return self.home(addr) / "Maildir" if subdir else self.home(addr)

    def session(self, addr: str, subdir: bool = True) -> DovecotIMAP:
        """A PREAUTH IMAP session of `addr` whose greeting has been read."""
        home = self.home(addr)
        for d in (home.parent, home):
            d.mkdir(mode=0o755, exist_ok=True)
        os.chown(home, self.uid, self.gid)
        location = "maildir:~/Maildir" if subdir else "maildir:~"
        env = {"USER": addr.partition("@")[0], "HOME": str(home),
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        with open(self.stderr_path, "ab") as err:
            proc = subprocess.Popen(
                [str(DOVECOT_IMAP), "-c", str(self.config), "-o", f"mail_location={location}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, bufsize=0)
        conn = DovecotIMAP(proc, self.stderr_path)
        try:
            conn.greeting()
        except BaseException:
            conn.close()
            raise
        return conn


@pytest.fixture
def dovecot():
    """Factory: dovecot(srv) gives a Dovecot in a fresh directory that
    srv's store user can read; Dovecot runs as that user when the tests
    run as root with a privileged installation (as `nobody` otherwise).
    Removed when the test ends."""
    made: list[Path] = []

    def make(srv) -> Dovecot:
        root = Path(tempfile.mkdtemp(prefix="dovecot-", dir="/tmp"))
        root.chmod(0o755)
        made.append(root)
        store_user = srv.config()["privileges"]["store_user"] if srv.privileged else None
        return Dovecot(root, store_user)

    try:
        yield make
    finally:
        for root in made:
            shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------
# What an IMAP client sees, through Dovecot or through maildird
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Seen:
    """One message as a client saw it."""
    flags: frozenset[str]
    internaldate: datetime.datetime
    size: int
    body: bytes


@dataclass
class Folder:
    uidvalidity: int
    uidnext: int
    messages: dict[int, Seen]   # by UID


def internaldate(value: object) -> datetime.datetime:
    """An INTERNALDATE (`05-Mar-2024 10:20:30 +0100`, the day maybe
    space-padded) as an aware datetime: servers may give another zone."""
    return datetime.datetime.strptime(imap_text(value).strip(), "%d-%b-%Y %H:%M:%S %z")


def examine(conn: RawIMAP, name: str) -> Folder:
    """EXAMINE `name` (read-only: nothing changes) and fetch every message."""
    responses = conn.expect(b"EXAMINE " + imap_quote(name))
    codes = dict(c for c in map(resp_code, responses) if c is not None)
    assert "UIDVALIDITY" in codes and "UIDNEXT" in codes, f"EXAMINE {name}: {responses}"
    exists = [int(m[1]) for r in responses if (m := re.fullmatch(rb"\* (\d+) EXISTS", r))]
    assert exists, f"EXAMINE {name}: no EXISTS in {responses}"
    messages: dict[int, Seen] = {}
    if exists[-1]:
        fetched = conn.expect("UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])")
        for response in conn.untagged(fetched):
            if not re.match(rb"\* \d+ FETCH ", response):
                continue
            _, items = fetch_items(response)
            messages[items["UID"]] = Seen(frozenset(imap_flags(items["FLAGS"])),
                                          internaldate(items["INTERNALDATE"]),
                                          items["RFC822.SIZE"], items["BODY[]"])
        assert len(messages) == exists[-1], f"{name}: {exists[-1]} EXISTS, fetched {messages}"
    return Folder(int(codes["UIDVALIDITY"]), int(codes["UIDNEXT"]), messages)


def list_names(conn: RawIMAP, command: str = 'LIST "" "*"') -> dict[str, set[str]]:
    """{mailbox name: attributes} of a LIST or LSUB (names as sent: modified
    UTF-7 in an IMAP4rev1 session)."""
    return {name: attrs for attrs, _, name in map(parse_list, conn.untagged(conn.expect(command)))}


def client_view(conn: RawIMAP) -> tuple[dict[str, Folder], set[str]]:
    """Every selectable folder with its messages, and the subscriptions."""
    folders = {name: examine(conn, name) for name, attrs in list_names(conn).items()
               if "\\noselect" not in attrs and "\\nonexistent" not in attrs}
    return folders, set(list_names(conn, 'LSUB "" "*"'))


def assert_same_view(ours: tuple[dict[str, Folder], set[str]],
                     dovecots: tuple[dict[str, Folder], set[str]], who: str) -> None:
    """Every folder, message, flag and subscription a client saw through
    Dovecot is the same through maildird. maildird adds the special-use
    folders (empty) a mailbox of its own starts with, and subscribes them
    and INBOX for a user who had no subscriptions file."""
    folders, subscribed = ours
    old_folders, old_subscribed = dovecots
    assert set(old_folders) <= set(folders), f"{who}: folders"
    added = set(folders) - set(old_folders)
    assert added <= SPECIAL_FOLDERS, f"{who}: folders that Dovecot did not have: {added}"
    assert all(not folders[name].messages for name in added), f"{who}: {added}"
    for name, old in old_folders.items():
        new = folders[name]
        assert new.uidvalidity == old.uidvalidity, f"{who} {name}: UIDVALIDITY"
        assert sorted(new.messages) == sorted(old.messages), f"{who} {name}: UIDs"
        for uid, seen in old.messages.items():
            got = new.messages[uid]
            assert got.flags == seen.flags, f"{who} {name} UID {uid}: flags"
            assert got.internaldate == seen.internaldate, f"{who} {name} UID {uid}: INTERNALDATE"
            assert got.body == seen.body, f"{who} {name} UID {uid}: body"
            assert got.size == seen.size, f"{who} {name} UID {uid}: RFC822.SIZE"
        # A new message must never get a UID Dovecot gave out (RFC 9051 2.3.1.1).
        assert new.uidnext >= old.uidnext, f"{who} {name}: UIDNEXT"
    if old_subscribed:
        assert subscribed == old_subscribed, f"{who}: subscriptions"
    else:
        assert subscribed <= {"INBOX"} | SPECIAL_FOLDERS, f"{who}: subscriptions"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def message(subject: str, body: str = "Hello.\n") -> bytes:
    return make_message(subject, body=body, sender="friend@remote.test", to=ALICE)


def fill_alice(dv: Dovecot) -> None:
    """Alice's mail as years of IMAP use through Dovecot left it: nested
    folders, a modified-UTF-7 one, an empty unsubscribed one, system flags
    and keywords (different keyword letters per folder), an expunged
    message in the middle of INBOX and one at the end of Work (gaps in the
    UIDs), a message Dovecot left in new/, and subscriptions."""
    c = dv.session(ALICE)
    try:
        for name in ("Work", "Work.Sub", "Entw&APw-rfe", "Old"):
            c.expect(b"CREATE " + imap_quote(name))
        for name in ("Work.Sub", "Entw&APw-rfe"):
            c.expect(b"SUBSCRIBE " + imap_quote(name))
        c.append("INBOX", message("first"), flags="\\Seen $Forwarded Custom1",
                 date="05-Mar-2024 10:20:30 +0100")
        c.append("INBOX", message("second"), date="06-Mar-2024 23:59:59 -0800")
        c.append("INBOX", message("expunged"), flags="\\Answered")
        c.append("INBOX", message("third", "Grüße, \u00fcber UTF-8.\nFrom the start.\n. dot\n"),
                 flags="\\Seen \\Draft \\Answered", date="01-Jan-2020 00:00:00 +0000")
        c.expect("SELECT INBOX")
        c.expect("STORE 2 +FLAGS (\\Flagged Later)")
        c.expect("STORE 3 +FLAGS (\\Deleted)")
        c.expect("EXPUNGE")
        c.append("Work", message("work one"), flags="\\Seen Custom1",
                 date="10-Feb-2023 08:00:00 +0200")
        c.append("Work", message("work two, expunged"))
        c.expect("SELECT Work")
        c.expect("STORE 2 +FLAGS (\\Deleted)")
        c.expect("EXPUNGE")
        # Another folder, other keyword letters: ProjectX is `a` here.
        c.append("Work.Sub", message("sub one"), flags="ProjectX Custom1")
        c.append("Work.Sub", message("sub two"), flags="\\Deleted \\Seen")
        # Never selected: Dovecot leaves it in new/.
        c.append("Entw&APw-rfe", message("draft"), date="24-Dec-2022 18:00:00 +0100")
        c.logout()
    finally:
        c.close()


def fill_carol(dv: Dovecot) -> None:
    """Carol's Maildir is her home itself (`mail_location = maildir:~`)."""
    c = dv.session(CAROL, subdir=False)
    try:
        c.append("INBOX", make_message("for carol", to=CAROL), flags="$Label1")
        c.append("INBOX", make_message("for carol too", to=CAROL), flags="\\Seen")
        c.logout()
    finally:
        c.close()


def dovecot_view(dv: Dovecot, addr: str, subdir: bool = True) -> tuple[dict[str, Folder], set[str]]:
    c = dv.session(addr, subdir)
    try:
        view = client_view(c)
        c.logout()
    finally:
        c.close()
    return view


def message_files(maildir: Path) -> dict[str, os.stat_result]:
    """Message files of a Maildir++ tree: {folder/sub/file name: stat}."""
    found = {}
    for folder in [maildir, *(p for p in maildir.iterdir() if p.name.startswith("."))]:
        for sub in ("new", "cur"):
            if (folder / sub).is_dir():
                for path in (folder / sub).iterdir():
                    found[str(path.relative_to(maildir))] = path.stat()
    return found


def ours(srv, addr: str) -> RawIMAP:
    """A logged-in IMAPS session of `addr` on srv."""
    return srv.raw_imap(tls=True, user=addr)


def snapshot(srv) -> dict[str, object]:
    """The installation's tables and mail store, to see nothing changed."""
    files = {name: (srv.root / name).read_bytes() for name in ("users", "domains", "aliases")}
    tree = sorted(str(p.relative_to(srv.mail_root)) for p in srv.mail_root.rglob("*"))
    return {**files, "mail": tree}


def import_dovecot(srv, dv: Dovecot, *extra: str, check: bool = True):
    return srv.ctl("import", "dovecot", "--passwd-file", str(dv.passwd_file),
                   "--maildir-root", str(dv.maildir_root), *extra, check=check)


# --------------------------------------------------------------------------
# import dovecot
# --------------------------------------------------------------------------

def test_dovecot_users_and_maildirs_are_taken_over_as_clients_saw_them(make_mailsrv, dovecot):
    """Into a fresh installation: alice (Maildir in ~/Maildir, a quota)
    and carol (Maildir in ~, a domain not served yet) log in with their
    Dovecot passwords and see what they saw through Dovecot."""
    srv = make_mailsrv(users=[], start=False, wait_for_imap=True)
    dv = dovecot(srv)
    fill_alice(dv)
    fill_carol(dv)
    alice_before = dovecot_view(dv, ALICE)
    carol_before = dovecot_view(dv, CAROL, subdir=False)

    # What the import must cope with is really there.
    dv_alice = dv.maildir(ALICE)
    assert (dv_alice / "subscriptions").read_text().startswith("V\t2\n"), \
        "Dovecot 2.3 subscriptions expected"
    assert "Work\tSub\n" in (dv_alice / "subscriptions").read_text()
    assert alice_before[1] == {"Work.Sub", "Entw&APw-rfe"}, alice_before[1]
    assert any((dv_alice / ".Entw&APw-rfe" / "new").iterdir()), "no message in new/"
    assert "ProjectX" in (dv_alice / ".Work.Sub" / "dovecot-keywords").read_text()
    assert sorted(alice_before[0]["INBOX"].messages) == [1, 2, 4]
    assert sorted(alice_before[0]["Work"].messages) == [1]
    assert alice_before[0]["Work"].uidnext == 3
    assert list(dv_alice.glob("dovecot.index*")) and list(dv_alice.glob("dovecot-uidvalidity*"))
    assert any("dovecot-uidlist" in p.name for p in dv.maildir(CAROL, subdir=False).iterdir())

    passwords = {ALICE: "alice's old secret", CAROL: "carol: pw with colon"}
    dv.passwd_file.write_text(
        "# Dovecot passwd-file\n"
        f"{ALICE}:{dv.password_hash(passwords[ALICE])}:1000:1000::/home/alice::{QUOTA_FIELD}\n"
        "\n"
        f"{CAROL}:{dv.password_hash(passwords[CAROL])}:1001:1001:Carol:/home/carol::\n")
    dovecot_files = {addr: message_files(dv.maildir(addr, subdir=addr != CAROL))
                     for addr in (ALICE, CAROL)}

    result = import_dovecot(srv, dv)
    alice_count = sum(len(f.messages) for f in alice_before[0].values())
    carol_count = sum(len(f.messages) for f in carol_before[0].values())
    assert alice_count == 7 and carol_count == 2
    assert f"{ALICE}: imported with {alice_count} messages" in result.stdout, result.stdout
    assert f"{CAROL}: imported with {carol_count} messages" in result.stdout, result.stdout
    assert "old.test" in result.stdout, result.stdout

    # The message files keep their names and times; Dovecot's caches and
    # indexes stay behind.
    for addr in (ALICE, CAROL):
        copied = message_files(srv.maildir(addr))
        assert set(copied) == set(dovecot_files[addr]), addr
        for name, stat in dovecot_files[addr].items():
            assert copied[name].st_mtime_ns == stat.st_mtime_ns, f"{addr} {name}: mtime"
            assert copied[name].st_size == stat.st_size, f"{addr} {name}: size"
        left = [str(p) for p in srv.maildir(addr).rglob("*")
                if p.name.startswith(("dovecot.index", "dovecot.list.index", "dovecot-uidvalidity",
                                      "dovecot.mailbox.log"))]
        assert left == [], f"Dovecot's caches were copied: {left}"
        if srv.privileged and os.geteuid() == 0:
            # Copied as the store user: root never writes in the mail root.
            store_uid = pwd.getpwnam(srv.config()["privileges"]["store_user"]).pw_uid
            owners = {p.stat().st_uid for p in srv.maildir(addr).rglob("*")}
            assert owners == {store_uid}, f"{addr}: owners {owners}, not {store_uid}"

    assert json.loads(srv.ctl("user", "quota", ALICE, "--json").stdout)["limit_bytes"] \
        == QUOTA_BYTES
    assert json.loads(srv.ctl("user", "quota", CAROL, "--json").stdout)["limit_bytes"] is None
    domains = {d["domain"] for d in json.loads(srv.ctl("domain", "list", "--json").stdout)}
    assert domains == {"example.test", "old.test"}, domains
    users = {u["user"] for u in json.loads(srv.ctl("user", "list", "--json").stdout)}
    assert users == {ALICE, CAROL}, users
    srv.ctl("check")

    srv.start()
    srv.passwords.update(passwords)
    for addr, before in ((ALICE, alice_before), (CAROL, carol_before)):
        conn = ours(srv, addr)
        try:
            assert_same_view(client_view(conn), before, addr)
        finally:
            conn.close()

    conn = ours(srv, ALICE)
    try:
        # LIST-EXTENDED sees the same subscriptions, the nested one too.
        subscribed = list_names(conn, 'LIST (SUBSCRIBED) "" "*"')
        assert set(subscribed) == {"Work.Sub", "Entw&APw-rfe"}, subscribed
        # A SUBSCRIBE rewrites the file: Dovecot's entries must survive it.
        conn.expect("SUBSCRIBE Work")
        assert set(list_names(conn, 'LSUB "" "*"')) == {"Work", "Work.Sub", "Entw&APw-rfe"}
        # New mail continues after Dovecot's UIDs, in the same UIDVALIDITY,
        # also where Dovecot's last UID was expunged.
        for name in ("INBOX", "Work"):
            validity, uid = conn.append(name, message(f"new in {name}"))
            assert validity == alice_before[0][name].uidvalidity, name
            assert uid >= alice_before[0][name].uidnext, (name, uid)
    finally:
        conn.close()
    # The new domain is served: mail for carol is delivered.
    sent = srv.send(CAROL, make_message("after the move", to=CAROL))
    srv.wait_for_delivery(CAROL, [sent])


def put_maildir(maildir: Path, *messages: bytes) -> None:
    """A plain Maildir with `messages` in cur/, as Dovecot keeps one
    (for tests where what Dovecot wrote does not matter)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for i, content in enumerate(messages):
        (maildir / "cur" / f"1700000000.M{i}P1.old,S={len(content)}:2,S").write_bytes(content)
    os.chmod(maildir, 0o755)
    for path in maildir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("bad_line, complaint", [
    ("bob@example.test:{PLAIN}secret:1002:1002::/home/bob::", "PLAIN"),
    ("bob@example.test:{CLEARTEXT}secret:1002:1002::/home/bob::", "CLEARTEXT"),
    ("bob:{SHA512-CRYPT}$6$abcdefgh$ijklmnop:1002:1002::/home/bob::", "--domain"),
])
def test_an_unusable_passwd_line_stops_the_import_before_anything_changes(
        make_mailsrv, dovecot, bad_line, complaint):
    """Every line is checked first: a hash we cannot verify, or a user
    without a domain and no --domain, fails the import with the line
    named, and neither users, domains nor Maildirs change."""
    srv = make_mailsrv(users=["dave@example.test"], start=False)
    dv = dovecot(srv)
    # A good line first, for a domain not served yet and with a Maildir:
    # none of it may be imported when a later line is refused.
    put_maildir(dv.maildir("erin@new.test"), message("hello erin"))
    dv.passwd_file.write_text(
        f"erin@new.test:{dv.password_hash('erin pw')}:1001:1001::/home/erin::{QUOTA_FIELD}\n"
        f"{bad_line}\n")
    before = snapshot(srv)

    result = import_dovecot(srv, dv, check=False)
    assert result.returncode != 0, result
    assert "nothing imported" in result.stderr, result.stderr
    assert f"{dv.passwd_file}:2:" in result.stderr and complaint in result.stderr, result.stderr
    assert "erin" not in result.stdout, result.stdout
    assert snapshot(srv) == before
    assert not (srv.mail_root / "new.test").exists()


def test_domain_option_names_the_domain_of_bare_users(make_mailsrv, dovecot):
    """Bare user names take --domain's; a user without a Maildir gets an
    empty one. Imported into a running installation."""
    srv = make_mailsrv(users=[], wait_for_imap=True)
    dv = dovecot(srv)
    # Dovecot's Maildir as the home itself (`mail_location = maildir:~`).
    frank = "frank@example.test"
    c = dv.session(frank, subdir=False)
    try:
        validity, uid = c.append("INBOX", message("for frank"), flags="\\Seen Important")
        c.logout()
    finally:
        c.close()
    passwords = {frank: "frank pw", "gina@example.test": "gina pw"}
    dv.passwd_file.write_text("".join(
        f"{addr.partition('@')[0]}:{dv.password_hash(pw)}:1000:1000::/home/x::\n"
        for addr, pw in passwords.items()))

    # Into a running installation.
    result = import_dovecot(srv, dv, "--domain", "example.test")
    assert f"{frank}: imported with 1 messages" in result.stdout, result.stdout
    # gina has no Maildir under the root: an account, and an empty INBOX.
    assert "gina@example.test: imported" in result.stdout, result.stdout
    users = {u["user"] for u in json.loads(srv.ctl("user", "list", "--json").stdout)}
    assert users == set(passwords), users
    line = next(l for l in (srv.root / "users").read_text().splitlines() if l.startswith("frank"))
    assert line.startswith(f"{frank}:{{SHA512-CRYPT}}$6$"), line

    srv.passwords.update(passwords)
    conn = ours(srv, frank)
    try:
        inbox = examine(conn, "INBOX")
        assert inbox.uidvalidity == validity
        assert {u: m.flags for u, m in inbox.messages.items()} == {uid: {"\\seen", "important"}}
        assert header(inbox.messages[uid].body, "Subject") == "for frank"
    finally:
        conn.close()
    conn = ours(srv, "gina@example.test")
    try:
        assert examine(conn, "INBOX").messages == {}
    finally:
        conn.close()
    # The password is the one the hash was made of, not any other.
    conn = srv.raw_imap(tls=True)
    try:
        conn.expect(b"LOGIN " + imap_quote(frank) + b' "not frank\'s"', status="NO")
    finally:
        conn.close()


# --------------------------------------------------------------------------
# import aliases
# --------------------------------------------------------------------------

ALIASES_FILE = """\
# /etc/aliases of the old server
postmaster:    root
root: alice
# a list over three lines, the last one indented with a tab
staff: alice,
    bob@example.test,
\tcarol@example.test

builds: "|/usr/local/bin/build-hook", bob
logger: |/usr/bin/logger -t mail
archive: /var/mail/archive
lists: :include:/etc/mail/lists
abuse: bob
"""


def aliases_of(srv) -> dict[str, list[str]]:
    return {a["source"]: a["targets"]
            for a in json.loads(srv.ctl("alias", "list", "--json").stdout)}


def test_aliases_are_imported_without_programs_files_and_includes(make_mailsrv, tmp_path):
    """Comments and continuation lines are understood; programs, files
    and :include:s are left out and reported, an alias left with nothing
    is skipped, an alias that exists here is kept; the rest delivers."""
    carol = "carol@example.test"
    srv = make_mailsrv(users=[ALICE, BOB, carol])
    srv.add_alias("abuse", "carol")   # already here: stays as it is
    path = tmp_path / "aliases"
    path.write_text(ALIASES_FILE)

    result = srv.ctl("import", "aliases", str(path))
    assert aliases_of(srv) == {
        "abuse": ["carol"],
        "postmaster": ["root"],
        "root": ["alice"],
        "staff": ["alice", "bob@example.test", carol],
        "builds": ["bob"],
    }
    # What was left out is reported, with its line.
    out = result.stdout
    for target, line in (('"|/usr/local/bin/build-hook"', 9), ("|/usr/bin/logger -t mail", 10),
                         ("/var/mail/archive", 11), (":include:/etc/mail/lists", 12)):
        assert re.search(rf"{re.escape(str(path))}:{line}: .*{re.escape(target)}", out), \
            (target, out)
    assert re.search(rf"{re.escape(str(path))}:13: .*abuse", out), out
    assert "imported 4 aliases" in out and "(4 skipped)" in out, out
    srv.ctl("check")

    # Imported aliases deliver, through two of them (postmaster -> root -> alice)
    # and to every member of a list.
    to_postmaster = srv.send(f"postmaster@{srv.domain}",
                             make_message("to postmaster", to=f"postmaster@{srv.domain}"))
    to_staff = srv.send(f"staff@{srv.domain}", make_message("to staff", to=f"staff@{srv.domain}"))
    to_builds = srv.send(f"builds@{srv.domain}", make_message("builds", to=f"builds@{srv.domain}"))
    srv.wait_for_delivery(ALICE, [to_postmaster, to_staff])
    srv.wait_for_delivery(BOB, [to_staff, to_builds])
    srv.wait_for_delivery(carol, [to_staff])
    subjects = {addr: sorted(header(p.read_bytes(), "Subject") for p in srv.settle(addr))
                for addr in (ALICE, BOB, carol)}
    assert subjects == {ALICE: ["to postmaster", "to staff"], BOB: ["builds", "to staff"],
                        carol: ["to staff"]}
    # Importing again changes nothing.
    again = srv.ctl("import", "aliases", str(path)).stdout
    assert "imported 0 aliases" in again, again
    assert len(aliases_of(srv)) == 5


def test_quoted_commands_and_backslashed_names_do_not_spoil_an_alias(make_mailsrv, tmp_path):
    """/etc/aliases quotes a command that holds commas or spaces (aliases(5)),
    and `\\user` is user's own mailbox, with no further aliasing
    (sendmail's and Postfix's local delivery). Neither may leave behind a
    target that makes the alias refuse mail for its other targets."""
    srv = make_mailsrv(users=[ALICE, BOB])
    path = tmp_path / "aliases"
    path.write_text('prog: "|/usr/bin/procmail -a x, -b y", alice\n'
                    'keep: \\alice, bob\n')

    result = srv.ctl("import", "aliases", str(path))
    assert '"|/usr/bin/procmail -a x, -b y"' in result.stdout, result.stdout
    imported = aliases_of(srv)
    assert imported.get("prog") == ["alice"], imported
    for name, users in (("prog", [ALICE]), ("keep", [ALICE, BOB])):
        addr = f"{name}@{srv.domain}"
        sent = srv.send(addr, make_message(f"to {name}", to=addr))
        for user in users:
            srv.wait_for_delivery(user, [sent])
