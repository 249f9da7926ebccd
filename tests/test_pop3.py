"""maildird's POP3 server (docs/contract.md, "maildird, POP3 part"): TLS and
login, the maildrop commands byte for byte, UIDL stability, deletion and the
Seen flag, the mailbox lock, login throttling, hostile input, supervision,
and fetchmail as a real client."""

from __future__ import annotations

import base64
import json
import os
import poplib
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from mailtest import (
    RawPOP3, crlf, dot_stuff, header, insecure_tls_context, json_contains, make_message,
    pid_alive, pop3_greets, pop3_unstuff, wait_until,
)

ALICE = "alice@example.test"
ALICE_PASSWORD = "alice-pw-7Yq"
BOB = "bob@example.test"
BOB_PASSWORD = "bob-pw-3Kd"
HOSTNAME = "mx.example.test"

GREETING = f"+OK {HOSTNAME} POP3 mailsrv ready".encode()
# Response codes (RFC 2449, RFC 3206) the contract puts on the refusals.
AUTH = b"-ERR [AUTH]"
IN_USE = b"-ERR [IN-USE]"
SYS_TEMP = b"-ERR [SYS/TEMP]"
# CAPA tags listed in every state, on both ports, before and after TLS.
ALWAYS_CAPS = ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION")
# RFC 1939 7: a unique-id is 1 to 70 characters in 0x21..0x7E; the
# contract's is Dovecot's %08Xu%08Xv: UID and UIDVALIDITY in lower-case hex.
UIDL_RE = re.compile(rb"[\x21-\x7e]{1,70}")
UIDL_FORM_RE = re.compile(rb"[0-9a-f]{16}")
# An answer to a session whose lock was released a moment ago may still be
# [IN-USE]; logins that follow a finished session retry that long.
LOCK_RELEASE_TIMEOUT = 5


@pytest.fixture
def srv(make_mailsrv):
    """A running installation with alice and bob, POP3 and POP3S ready."""
    return pop3_server(make_mailsrv)


def pop3_server(make_mailsrv, config=None):
    server = make_mailsrv(config=config, start=False)
    server.add_user(ALICE, ALICE_PASSWORD)
    server.add_user(BOB, BOB_PASSWORD)
    server.start()
    server.wait_pop3_ready()
    return server


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def plain_credentials(user: str, password: str, authzid: str = "") -> str:
    """The base64 SASL PLAIN response (RFC 4616)."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def refusal(call, *args) -> bytes:
    """Call a poplib method that must fail with -ERR; return the response."""
    with pytest.raises(poplib.error_proto) as info:
        call(*args)
    response = info.value.args[0]
    assert isinstance(response, bytes), f"poplib refused locally: {response!r}"
    return response


def login_refusal(client: poplib.POP3, user: str, password: str) -> bytes:
    """USER + PASS that must fail: the first -ERR (at USER or at PASS)."""
    try:
        client.user(user)
    except poplib.error_proto as e:
        return e.args[0]
    return refusal(client.pass_, password)


def connect(srv, how: str) -> poplib.POP3:
    """A poplib client over `how`: "pop3s" (implicit TLS) or "stls"."""
    return {"pop3s": srv.pop3s, "stls": srv.pop3_stls}[how]()


def login(srv, user: str = ALICE, password: str = ALICE_PASSWORD, how: str = "pop3s",
          lock_timeout: float = LOCK_RELEASE_TIMEOUT) -> poplib.POP3:
    """A logged-in poplib client. Retries for `lock_timeout` seconds while the
    login is answered [IN-USE] (the lock of a session that just ended)."""
    deadline = time.monotonic() + lock_timeout
    while True:
        client = connect(srv, how)
        try:
            client.user(user)
            client.pass_(password)
            return client
        except poplib.error_proto as e:
            client.close()
            if not (isinstance(e.args[0], bytes) and e.args[0].startswith(IN_USE)
                    and time.monotonic() < deadline):
                raise
        except BaseException:
            client.close()
            raise
        time.sleep(0.1)


def raw_login(srv, user: str = ALICE, password: str = ALICE_PASSWORD,
              lock_timeout: float = LOCK_RELEASE_TIMEOUT) -> RawPOP3:
    """A RawPOP3 over POP3S, logged in with USER/PASS; retries [IN-USE]
    like login()."""
    deadline = time.monotonic() + lock_timeout
    while True:
        conn = srv.raw_pop3(tls=True)
        try:
            conn.expect_ok(f"USER {user}")
            status = conn.command(f"PASS {password}")
        except BaseException:
            conn.close()
            raise
        if status.startswith(b"+OK"):
            return conn
        conn.close()
        assert status.startswith(IN_USE) and time.monotonic() < deadline, f"PASS: {status!r}"
        time.sleep(0.1)


def maildrop(srv, addr: str = ALICE) -> list[Path]:
    """The files of addr's INBOX (new/ and cur/), sorted by name."""
    d = srv.maildir(addr)
    files = [p for sub in ("new", "cur") if (d / sub).is_dir()
             for p in (d / sub).iterdir() if p.is_file()]
    return sorted(files, key=lambda p: p.name)


def base_name(path: Path) -> str:
    """The Maildir base name: the file name before `:`."""
    return path.name.split(":", 1)[0]


def bases(files: list[Path]) -> list[str]:
    return [base_name(p) for p in files]


def flags(path: Path) -> str:
    """The Maildir flags of a file (the part after `:2,`), "" when none."""
    return path.name.partition(":2,")[2]


def find(srv, base: str, addr: str = ALICE) -> Path | None:
    """The file with Maildir base name `base` in new/ or cur/, if any."""
    found = [p for p in maildrop(srv, addr) if base_name(p) == base]
    assert len(found) <= 1, f"two files with base name {base}: {found}"
    return found[0] if found else None


def set_flags(srv, path: Path, new_flags: str) -> Path:
    """Move a message to cur/ with `:2,<new_flags>` (what an IMAP client or
    MUA does); returns the new path."""
    target = srv.maildir(ALICE) / "cur" / f"{base_name(path)}:2,{new_flags}"
    os.rename(path, target)
    return target


def lines_of(content: bytes) -> list[bytes]:
    """The lines of a Maildir file (LF ends), without their ends."""
    assert content.endswith(b"\n"), "a message file ends with LF"
    return content[:-1].split(b"\n")


def wire(lines: list[bytes]) -> bytes:
    """Lines as POP3 multi-line data: CRLF ends, dot-stuffed, with the
    terminating `.` line."""
    return dot_stuff(b"".join(line + b"\r\n" for line in lines))


def top_lines(content: bytes, n: int) -> list[bytes]:
    """What TOP msg n must send: the header section, the blank line, then
    the first n body lines (RFC 1939 7)."""
    lines = lines_of(content)
    blank = lines.index(b"")
    return lines[:blank + 1 + n]


def deliver(srv, *bodies: str, addr: str = ALICE) -> list[Path]:
    """Send one message per body to `addr`, wait until all are in new/;
    return the whole maildrop (sorted by name)."""
    before = len(srv.messages(addr))
    for body in bodies:
        srv.send(addr, make_message(f"pop3 test {uuid.uuid4().hex}", body=body, to=addr))
    srv.wait_for_messages(addr, before + len(bodies))
    return maildrop(srv, addr)


THREE_BODIES = (
    "Hello.\n",
    "first line\n.\n..\n.leading dot\n...\nlast line\n",
    "line one\nline two\nline three\nline four\n",
)


def pop3_size(path: Path) -> int:
    """A message's size as LIST gives it: octets with CRLF line ends."""
    return len(crlf(path.read_bytes()))


def numbering(client: poplib.POP3, files: list[Path]) -> list[Path]:
    """The file of each message number (the maildrop is in UID order, not
    name order), matched by the header section TOP n 0 sends: headers are
    unique (Message-ID). TOP is no retrieval, so no Seen flag follows."""
    count, _ = client.stat()
    by_head: dict[tuple[bytes, ...], list[Path]] = {}
    for path in files:
        by_head.setdefault(tuple(top_lines(path.read_bytes(), 0)), []).append(path)
    order = []
    for number in range(1, count + 1):
        _, lines, _ = client.top(number, 0)
        matches = by_head.get(tuple(lines), [])
        head = b"\n".join(lines).decode(errors="replace")
        assert len(matches) == 1, (
            f"message {number}: its header section matches {len(matches)} files:\n{head}")
        order.append(matches[0])
    assert sorted(order) == sorted(files), "the maildrop is not these files"
    return order


def expected_list(order: list[Path]) -> list[bytes]:
    """The LIST lines for files in message order."""
    return [f"{i} {pop3_size(p)}".encode() for i, p in enumerate(order, 1)]


def uidl_lines(client: poplib.POP3) -> list[bytes]:
    _, listing, _ = client.uidl()
    return listing


def check_uidls(listing: list[bytes]) -> list[tuple[int, int]]:
    """Check UIDL lines `n uid`: numbered 1.., each uid of the contract's
    form (UID and UIDVALIDITY as 8 lower-case hex digits each, which is
    also RFC 1939's 1..70 chars in 0x21..0x7E), UIDs strictly rising (the
    maildrop is in UID order), one UIDVALIDITY. Returns (UID, UIDVALIDITY)s."""
    parsed = []
    for i, line in enumerate(listing, 1):
        number, uid = line.split(b" ")
        assert number == str(i).encode(), listing
        assert UIDL_RE.fullmatch(uid), f"not an RFC 1939 unique-id: {uid!r}"
        assert UIDL_FORM_RE.fullmatch(uid), f"not %08x%08x: {uid!r}"
        parsed.append((int(uid[:8], 16), int(uid[8:], 16)))
    uids = [u for u, _ in parsed]
    assert uids == sorted(set(uids)), f"UIDs not strictly rising: {listing}"
    assert len({v for _, v in parsed}) <= 1, f"several UIDVALIDITYs: {listing}"
    return parsed


def assert_caps(caps: dict[str, list[str]], login_allowed: bool | None, stls: bool) -> None:
    """CAPA's tags; `login_allowed` None (after login) leaves USER and SASL
    open: RFC 2449 lets CAPA list the current state's capabilities only."""
    for tag in ALWAYS_CAPS:
        assert tag in caps, f"CAPA lacks {tag}: {caps}"
    assert caps["IMPLEMENTATION"][:1] == ["mailsrv"], caps
    if login_allowed is not None:
        assert ("USER" in caps) == login_allowed, caps
        assert ("PLAIN" in [m.upper() for m in caps.get("SASL", [])]) == login_allowed, caps
    assert ("STLS" in caps) == stls, caps


# --------------------------------------------------------------------------
# TLS, CAPA and login
# --------------------------------------------------------------------------

def test_init_writes_the_pop3_listeners(installation):
    config = installation.config()["maildird"]
    assert installation.pop3_port == installation.port_base + 110
    assert installation.pop3s_port == installation.port_base + 995
    assert config["pop3_listen"] == [f"127.0.0.1:{installation.port_base + 110}"]
    assert config["pop3s_listen"] == [f"127.0.0.1:{installation.port_base + 995}"]
    assert config["allow_plaintext_auth"] is False
    installation.set_config("maildird.limits.max_auth_failures", 3)
    assert installation.config()["maildird"]["limits"] == {"max_auth_failures": 3}
    installation.ctl("check")



def test_capa_and_login_over_stls(srv):
    client = srv.pop3()
    try:
        assert client.getwelcome() == GREETING
        assert_caps(client.capa(), login_allowed=False, stls=True)

        client.stls(insecure_tls_context())

        assert_caps(client.capa(), login_allowed=True, stls=False)
        assert refusal(client._shortcmd, "STLS").startswith(b"-ERR"), "second STLS"
        assert client.user(ALICE).startswith(b"+OK")
        assert client.pass_(ALICE_PASSWORD).startswith(b"+OK")
        assert client.stat() == (0, 0)
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()


def test_capa_and_login_over_pop3s(srv):
    client = srv.pop3s()
    try:
        assert client.getwelcome() == GREETING
        assert_caps(client.capa(), login_allowed=True, stls=False)
        assert refusal(client._shortcmd, "STLS").startswith(b"-ERR"), "STLS on POP3S"
        assert client.user(ALICE).startswith(b"+OK")
        assert client.pass_(ALICE_PASSWORD).startswith(b"+OK")
        assert client.stat() == (0, 0)
        assert_caps(client.capa(), login_allowed=None, stls=False)
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()


@pytest.mark.parametrize("how", ["pop3s", "stls"])
def test_auth_plain(srv, how):
    # Initial response on the AUTH line.
    client = connect(srv, how)
    try:
        assert client._shortcmd(f"AUTH PLAIN {plain_credentials(ALICE, ALICE_PASSWORD)}"
                                ).startswith(b"+OK")
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        client.close()

    # Response after a `+ ` continuation (RFC 5034).
    client = connect(srv, how)
    try:
        challenge = client._shortcmd("AUTH PLAIN")
        assert challenge.startswith(b"+") and not challenge.startswith(b"+OK"), challenge
        assert client._shortcmd(plain_credentials(BOB, BOB_PASSWORD)).startswith(b"+OK")
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        client.close()

    # Wrong password, and an authorization identity naming someone else.
    for response in (plain_credentials(ALICE, BOB_PASSWORD),
                     plain_credentials(BOB, BOB_PASSWORD, authzid=ALICE)):
        client = connect(srv, how)
        try:
            assert refusal(client._shortcmd, f"AUTH PLAIN {response}").startswith(AUTH)
        finally:
            client.close()


def test_login_refused_before_tls(srv):
    client = srv.pop3()
    try:
        assert refusal(client.user, ALICE).startswith(AUTH)
        assert refusal(client.pass_, ALICE_PASSWORD).startswith(AUTH)
        response = plain_credentials(ALICE, ALICE_PASSWORD)
        assert refusal(client._shortcmd, f"AUTH PLAIN {response}").startswith(AUTH)
        # No `+ ` inviting the password in clear either.
        assert refusal(client._shortcmd, "AUTH PLAIN").startswith(AUTH)

        # The session survives the refusals: STLS, then the login works.
        client.stls(insecure_tls_context())
        client.user(ALICE)
        client.pass_(ALICE_PASSWORD)
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        client.close()


def test_wrong_password_and_unknown_user(srv):
    for user, password in ((ALICE, "wrong"), (ALICE, BOB_PASSWORD),
                           ("nobody@example.test", "pw"), ("alice", ALICE_PASSWORD)):
        client = srv.pop3s()
        try:
            assert login_refusal(client, user, password).startswith(AUTH), (user, password)
        finally:
            client.close()
    # The failures above lock nothing: the right password works.
    login(srv).quit()


# --------------------------------------------------------------------------
# The maildrop: STAT, LIST, UIDL, RETR, TOP
# --------------------------------------------------------------------------

def test_stat_list_uidl_retr_top(srv):
    files = deliver(srv, *THREE_BODIES)
    assert len(files) == 3

    client = login(srv)
    try:
        order = numbering(client, files)
        contents = [p.read_bytes() for p in order]
        sizes = [len(crlf(c)) for c in contents]
        assert client.stat() == (3, sum(sizes))
        _, listing, _ = client.list()
        assert listing == expected_list(order)
        uids = uidl_lines(client)
        assert len(uids) == 3
        check_uidls(uids)
        for i, (content, size, uid_line) in enumerate(zip(contents, sizes, uids), 1):
            assert client.list(i).split()[:3] == [b"+OK", str(i).encode(), str(size).encode()]
            assert client.uidl(i).split() == [b"+OK", *uid_line.split()]

            _, lines, octets = client.retr(i)   # poplib removes the stuffing dots
            assert lines == lines_of(content), f"RETR {i}"
            assert sum(len(line) + 2 for line in lines) == size == octets

            _, lines, _ = client.top(i, 0)
            assert lines == top_lines(content, 0), f"TOP {i} 0"
            assert lines[-1] == b"" and b"" not in lines[:-1]
            _, lines, _ = client.top(i, 2)
            assert lines == top_lines(content, 2), f"TOP {i} 2"
            _, lines, _ = client.top(i, 1000)
            assert lines == lines_of(content), f"TOP {i} 1000: the whole message"
        client.quit()
    finally:
        client.close()
    assert sorted(p.read_bytes() for p in maildrop(srv)) == sorted(contents), \
        "reading changed a file"


def test_retr_and_top_bytes_on_the_wire(srv):
    """CRLF line ends, dot-stuffing and the terminating line, byte for byte
    (poplib hides all three)."""
    files = deliver(srv, *THREE_BODIES)
    contents = [p.read_bytes() for p in files]

    with raw_login(srv) as conn:
        served = []
        for i in range(1, 4):
            _, data = conn.multiline(f"RETR {i}")
            matches = [c for c in contents if wire(lines_of(c)) == data + b".\r\n"]
            assert len(matches) == 1, f"RETR {i} is no file's content, byte for byte: {data!r}"
            content = matches[0]
            served.append(content)
            assert data + b".\r\n" == dot_stuff(crlf(content))
            assert pop3_unstuff(data) == crlf(content)
            for n in (0, 2, 3):
                _, data = conn.multiline(f"TOP {i} {n}")
                assert data + b".\r\n" == wire(top_lines(content, n)), f"TOP {i} {n}"
        assert sorted(served) == sorted(contents)

        dotted = next(i for i, c in enumerate(served, 1) if b"\n.leading dot\n" in c)
        _, data = conn.multiline(f"RETR {dotted}")
        assert b"\r\nfirst line\r\n..\r\n...\r\n..leading dot\r\n....\r\nlast line\r\n" in data
        conn.expect_ok("QUIT")


def put_in_maildir(srv, path: Path, content: bytes) -> None:
    """Write a message file the Maildir way: tmp/, then rename."""
    tmp = srv.maildir(ALICE) / "tmp" / base_name(path)
    tmp.write_bytes(content)
    os.rename(tmp, path)


def test_handmade_files_in_new_and_cur(srv):
    """Files another program put in the Maildir (no S=/W= in the name,
    flags in cur/) are part of the maildrop, sized and sent like the rest."""
    deliver(srv, THREE_BODIES[0])
    maildir = srv.maildir(ALICE)
    put_in_maildir(srv, maildir / "cur" / "1000000001.hand1.example:2,S",
                   b"Subject: in cur\nX-Test: 1\n\nbody\n.\nend\n")
    put_in_maildir(srv, maildir / "new" / "1000000002.hand2.example",
                   b"Subject: in new\n\n" + (b"x" * 1000 + b"\n") * 5
                   + b"\n\ntrailing blank lines\n\n")
    files = maildrop(srv)
    assert len(files) == 3

    client = login(srv)
    try:
        order = numbering(client, files)
        _, listing, _ = client.list()
        assert listing == expected_list(order)
        check_uidls(uidl_lines(client))
        assert client.stat() == (3, sum(pop3_size(p) for p in files))
        for i, path in enumerate(order, 1):
            _, lines, _ = client.retr(i)
            assert lines == lines_of(path.read_bytes()), path.name
        client.quit()
    finally:
        client.close()


def test_dovecot_uidlist_is_taken_over(srv):
    """A Maildir that Dovecot served keeps its UIDs and UIDVALIDITY, so POP3
    clients do not download everything again after a migration."""
    maildir = srv.maildir(ALICE)
    (maildir / "mailsrv-uidlist").unlink(missing_ok=True)   # as if copied over
    first = maildir / "cur" / "1000000001.hand1.example:2,S"
    second = maildir / "new" / "1000000002.hand2.example"
    put_in_maildir(srv, first, b"Subject: migrated 1\n\nfrom dovecot\n")
    put_in_maildir(srv, second, b"Subject: migrated 2\n\nfrom dovecot too\n.\n")
    validity = 1234567
    # Dovecot's format 3: header, then `<uid> [<ext> ...] :<file name>`; the
    # name may carry flags that are out of date.
    (maildir / "dovecot-uidlist").write_text(
        f"3 V{validity} N10 G{uuid.uuid4().hex}\n"
        "7 :1000000001.hand1.example:2,\n"
        f"9 W{pop3_size(second)} :1000000002.hand2.example\n")
    expected = [f"1 {7:08x}{validity:08x}".encode(), f"2 {9:08x}{validity:08x}".encode()]

    client = login(srv)
    try:
        assert uidl_lines(client) == expected
        assert numbering(client, [first, second]) == [first, second]
        client.quit()
    finally:
        client.close()

    # New mail continues after Dovecot's UIDs, in the same UIDVALIDITY.
    files = deliver(srv, "delivered after the migration\n")
    client = login(srv)
    try:
        listing = uidl_lines(client)
        assert listing[:2] == expected
        assert len(listing) == 3
        assert check_uidls(listing)[2][0] > 9
        order = numbering(client, files)
        _, lines, _ = client.retr(3)
        assert lines == lines_of(order[2].read_bytes())
        client.quit()
    finally:
        client.close()


# --------------------------------------------------------------------------
# UIDL stability
# --------------------------------------------------------------------------

def test_uidl_stable_across_sessions_flag_changes_and_restart(srv):
    files = deliver(srv, *THREE_BODIES)

    def session(how: str) -> tuple[list[bytes], list[str]]:
        """(UIDL lines, base name of each message in order) of a session."""
        client = login(srv, how=how)
        try:
            listing = uidl_lines(client)
            check_uidls(listing)
            order = numbering(client, maildrop(srv))
            _, sizes, _ = client.list()
            assert sizes == expected_list(order)
            for line in listing:
                number = line.split()[0].decode()
                assert client.uidl(number).split() == [b"+OK", *line.split()]
            client.quit()
            return listing, bases(order)
        finally:
            client.close()

    first = session("pop3s")
    assert len(first[0]) == 3
    assert session("stls") == first, "a second session"

    # A MUA reads and flags messages: new/ -> cur/ with flags, flags change.
    current = {base_name(p): p for p in maildrop(srv)}
    one, two, _ = (current[base_name(p)] for p in files)
    set_flags(srv, one, "S")                 # the third stays where it is
    two = set_flags(srv, two, "FR")
    assert session("pop3s") == first, "after new/ -> cur/ and flag changes"

    set_flags(srv, two, "FRS")
    srv.restart()
    srv.wait_pop3_ready()
    assert session("pop3s") == first, "after a restart"
    assert session("stls") == first, "after a restart, over STLS"

    # Mail delivered after the restart comes last, with a higher UID in the
    # same UIDVALIDITY (check_uidls).
    deliver(srv, "after the restart\n")
    listing, order = session("pop3s")
    assert listing[:3] == first[0] and order[:3] == first[1]
    assert len(listing) == 4


# --------------------------------------------------------------------------
# DELE, RSET, QUIT and the Seen flag
# --------------------------------------------------------------------------

def test_dele_and_quit_remove_the_file(srv):
    files = deliver(srv, *THREE_BODIES)

    client = login(srv)
    try:
        order = numbering(client, files)
        names = bases(order)
        sizes = [pop3_size(p) for p in order]
        listing = uidl_lines(client)
        uids = [line.split()[1] for line in listing]

        assert client.dele(2).startswith(b"+OK")
        # RFC 1939: a deleted message is no longer listed nor retrievable.
        assert client.stat() == (2, sizes[0] + sizes[2])
        _, sizes_listed, _ = client.list()
        assert sizes_listed == [f"1 {sizes[0]}".encode(), f"3 {sizes[2]}".encode()]
        assert uidl_lines(client) == [listing[0], listing[2]]
        for call, args in ((client.retr, (2,)), (client.list, (2,)), (client.dele, (2,)),
                           (client.top, (2, 0)), (client.uidl, (2,))):
            assert refusal(call, *args).startswith(b"-ERR"), (call.__name__, args)
        assert find(srv, names[1]) is not None, "DELE removed the file before QUIT"
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()

    # The +OK to QUIT comes after the UPDATE state (RFC 1939 6).
    assert find(srv, names[1]) is None, "the deleted message's file is still there"
    assert sorted(bases(maildrop(srv))) == sorted([names[0], names[2]])

    client = login(srv)
    try:
        assert uidl_lines(client) == [b"1 " + uids[0], b"2 " + uids[2]]
        client.quit()
    finally:
        client.close()


def test_dele_then_rset_keeps_everything(srv):
    files = deliver(srv, *THREE_BODIES)

    client = login(srv)
    try:
        listing = uidl_lines(client)
        client.dele(1)
        client.dele(3)
        assert client.stat()[0] == 1
        assert client.rset().startswith(b"+OK")
        assert client.stat()[0] == 3
        assert uidl_lines(client) == listing
        client.quit()
    finally:
        client.close()

    assert sorted(bases(maildrop(srv))) == sorted(bases(files))
    client = login(srv)
    try:
        assert uidl_lines(client) == listing
        client.quit()
    finally:
        client.close()


@pytest.mark.parametrize("how", ["pop3s", "stls"])
def test_dropped_connection_deletes_nothing(srv, how):
    files = deliver(srv, *THREE_BODIES)

    client = login(srv, how=how)
    try:
        listing = uidl_lines(client)
        assert client.dele(1).startswith(b"+OK")
        assert client.dele(2).startswith(b"+OK")
    finally:
        client.close()   # no QUIT

    # Once the lock is free again the session is over: nothing was deleted.
    client = login(srv, lock_timeout=10)
    try:
        assert uidl_lines(client) == listing
        assert client.stat()[0] == 3
    finally:
        client.close()   # no QUIT again
    time.sleep(0.5)
    assert sorted(bases(maildrop(srv))) == sorted(bases(files))


def test_retrieved_messages_get_the_seen_flag(srv):
    files = deliver(srv, *THREE_BODIES)
    set_flags(srv, files[-1], "F")   # one already read by a MUA and flagged
    before = {base_name(p): flags(p) for p in maildrop(srv)}

    client = login(srv)
    try:
        order = numbering(client, maildrop(srv))   # TOP only: no retrieval
        names = bases(order)
        contents = [p.read_bytes() for p in order]
        listing = uidl_lines(client)
        client.retr(1)
        client.top(2, 0)   # TOP is no retrieval
        client.retr(3)
        client.quit()
    finally:
        client.close()

    def seen(name: str) -> str:
        return "".join(sorted(set(before[name]) | {"S"}))
    cur = srv.maildir(ALICE) / "cur"
    wanted = {cur / f"{names[0]}:2,{seen(names[0])}", cur / f"{names[2]}:2,{seen(names[2])}"}
    try:
        wait_until(lambda: wanted <= set(maildrop(srv)), 5,
                   f"the Seen flag on the retrieved messages: {sorted(p.name for p in wanted)}")
    except AssertionError as e:
        raise AssertionError(f"{e}; have {[p.name for p in maildrop(srv)]}") from None

    untouched = find(srv, names[1])
    assert untouched is not None and flags(untouched) == before[names[1]], untouched
    now = [find(srv, name) for name in names]
    assert [p.read_bytes() for p in now] == contents, "a file's content changed"
    client = login(srv)
    try:
        assert uidl_lines(client) == listing, "the Seen flag changed a UIDL"
        client.quit()
    finally:
        client.close()


# --------------------------------------------------------------------------
# The mailbox lock and login throttling
# --------------------------------------------------------------------------

def test_second_session_of_a_user_is_refused_in_use(srv):
    deliver(srv, THREE_BODIES[0])
    first = login(srv)
    try:
        for how in ("pop3s", "stls"):
            second = connect(srv, how)
            try:
                assert login_refusal(second, ALICE, ALICE_PASSWORD).startswith(IN_USE), how
            finally:
                second.close()
        second = srv.pop3s()
        try:
            response = plain_credentials(ALICE, ALICE_PASSWORD)
            assert refusal(second._shortcmd, f"AUTH PLAIN {response}").startswith(IN_USE)
        finally:
            second.close()

        # The lock is per mailbox: bob logs in meanwhile.
        bob = login(srv, BOB, BOB_PASSWORD, lock_timeout=0)
        bob.quit()

        # The first session is unharmed.
        assert first.stat()[0] == 1
        _, lines, _ = first.retr(1)
        assert lines
        assert first.quit().startswith(b"+OK")
    finally:
        first.close()

    after = login(srv)
    try:
        assert after.stat()[0] == 1
        after.quit()
    finally:
        after.close()


def test_failed_logins_are_throttled(make_mailsrv):
    srv = pop3_server(make_mailsrv, {"maildird.limits.max_auth_failures": 3})
    for attempt in range(3):
        client = srv.pop3s()
        try:
            assert login_refusal(client, ALICE, f"wrong{attempt}").startswith(AUTH), attempt
        finally:
            client.close()

    # Now even the right password (and another user) is refused for a while.
    for user, password in ((ALICE, ALICE_PASSWORD), (BOB, BOB_PASSWORD)):
        client = srv.pop3s()
        try:
            assert login_refusal(client, user, password).startswith(SYS_TEMP), user
        finally:
            client.close()
    client = srv.pop3_stls()
    try:
        response = plain_credentials(ALICE, ALICE_PASSWORD)
        assert refusal(client._shortcmd, f"AUTH PLAIN {response}").startswith(SYS_TEMP)
    finally:
        client.close()


def test_connections_per_client_are_limited(make_mailsrv):
    srv = pop3_server(make_mailsrv, {"maildird.limits.max_connections_per_client": 2})

    def greeted(tls):
        conn = RawPOP3(srv.pop3s_port if tls else srv.pop3_port, tls)
        status = conn.read_status()
        if status.startswith(b"+OK"):
            return conn
        conn.close()
        return None

    # The readiness probes may still count for a moment.
    first = wait_until(lambda: greeted(False), 5, "a first POP3 connection")
    second = wait_until(lambda: greeted(True), 5, "a second (POP3S) connection")
    try:
        with RawPOP3(srv.pop3_port) as third:
            status = third.read_status()
            assert status.startswith(SYS_TEMP), status
            assert third.closed(), "the refused connection was not closed"
        # On POP3S the refusal comes inside TLS, or the server hangs up
        # before the handshake: either way no greeting.
        try:
            with RawPOP3(srv.pop3s_port, tls=True) as third:
                try:
                    status = third.read_status()
                except ConnectionError:
                    status = b"<closed>"
                assert status.startswith(SYS_TEMP) or status == b"<closed>", status
                assert third.closed(), "the refused connection was not closed"
        except OSError as e:   # includes ssl.SSLError
            assert not isinstance(e, TimeoutError), e
        first.close()
        third = wait_until(lambda: greeted(False), 5, "a greeting once one connection closed")
        third.close()
    finally:
        first.close()
        second.close()


# --------------------------------------------------------------------------
# Hostile and unusual input
# --------------------------------------------------------------------------

BAD_TRANSACTION_COMMANDS = (
    "FOO", "FOO BAR", "RETR 0", "RETR 99", "RETR x", "RETR", "RETR -1", "LIST x",
    "LIST 0", "LIST 99", "LIST 1x", "UIDL 0", "UIDL 99", "DELE 99", "DELE x", "TOP 1",
    "TOP 1 x", "TOP 99 0", "TOP 1 -1", "USER " + ALICE, "PASS " + ALICE_PASSWORD, "STLS",
    "RETR 99999999999999999999999",
)


def test_bad_commands_get_err_and_the_session_goes_on(srv):
    deliver(srv, THREE_BODIES[0])
    with srv.raw_pop3(tls=True) as conn:
        for line in ("STAT", "LIST", "RETR 1", "DELE 1", "UIDL", "TOP 1 0", "FOO"):
            assert conn.command(line).startswith(b"-ERR"), f"{line} before login"
    # A few per session: a server may end a session after many errors.
    for start in range(0, len(BAD_TRANSACTION_COMMANDS), 4):
        with raw_login(srv) as conn:
            for line in BAD_TRANSACTION_COMMANDS[start:start + 4]:
                assert conn.command(line).startswith(b"-ERR"), repr(line)
                assert conn.command("NOOP").startswith(b"+OK"), f"NOOP after {line!r}"
            # Keywords are case-insensitive (RFC 1939 3).
            assert conn.command("stat").startswith(b"+OK 1 ")
            assert conn.command("List 1").startswith(b"+OK 1 ")
            assert conn.command("QUIT").startswith(b"+OK")
            assert conn.closed(), "no close after QUIT"


def test_overlong_command_line(srv):
    deliver(srv, THREE_BODIES[0])
    with raw_login(srv) as conn:
        # A valid command padded beyond 255 octets (RFC 2449 4): refused,
        # as one command, and the session goes on.
        long_line = b"LIST " + b"0" * 300 + b"1"
        assert len(long_line) + 2 > 255
        assert conn.command(long_line).startswith(b"-ERR")
        assert conn.command("NOOP").startswith(b"+OK"), "the next answer is NOOP's"
        assert conn.command("LIST 1").startswith(b"+OK 1 ")
        huge = b"NOOP " + b"x" * 4000
        assert conn.command(huge).startswith(b"-ERR")
        assert conn.command("STAT").startswith(b"+OK 1 ")
        conn.expect_ok("QUIT")


def test_pipelined_commands_are_answered_in_order(srv):
    files = deliver(srv, *THREE_BODIES)
    # Read now: the QUIT at the end runs before the answers are checked, and
    # moves the retrieved message to cur/.
    by_head = {wire(top_lines(p.read_bytes(), 0)): p.read_bytes() for p in files}
    total = sum(pop3_size(p) for p in files)

    with srv.raw_pop3(tls=True) as conn:
        conn.send(f"CAPA\r\nUSER {ALICE}\r\nPASS {ALICE_PASSWORD}\r\nSTAT\r\n"
                  "TOP 1 0\r\nTOP 2 0\r\nTOP 3 0\r\nLIST\r\nUIDL\r\nRETR 2\r\nNOOP\r\n"
                  "TOP 3 1\r\nRETR 99\r\nDELE 1\r\nSTAT\r\nRSET\r\nLIST 1\r\nQUIT\r\n")
        assert conn.read_status().startswith(b"+OK"), "CAPA"
        assert b"PIPELINING\r\n" in conn.read_data()
        assert conn.read_status().startswith(b"+OK"), "USER"
        assert conn.read_status().startswith(b"+OK"), "PASS"
        assert conn.read_status().split()[:3] == [b"+OK", b"3", str(total).encode()], "STAT"
        contents = []
        for i in range(1, 4):
            assert conn.read_status().startswith(b"+OK"), f"TOP {i} 0"
            head = conn.read_data() + b".\r\n"
            assert head in by_head, f"TOP {i} 0 is no file's header section: {head!r}"
            contents.append(by_head[head])
        assert sorted(contents) == sorted(by_head.values())
        sizes = [len(crlf(c)) for c in contents]
        assert conn.read_status().startswith(b"+OK"), "LIST"
        assert conn.read_data() == b"".join(f"{i} {size}\r\n".encode()
                                            for i, size in enumerate(sizes, 1))
        assert conn.read_status().startswith(b"+OK"), "UIDL"
        check_uidls(conn.read_data().split(b"\r\n")[:-1])
        assert conn.read_status().startswith(b"+OK"), "RETR 2"
        assert conn.read_data() + b".\r\n" == wire(lines_of(contents[1]))
        assert conn.read_status().startswith(b"+OK"), "NOOP"
        assert conn.read_status().startswith(b"+OK"), "TOP 3 1"
        assert conn.read_data() + b".\r\n" == wire(top_lines(contents[2], 1))
        assert conn.read_status().startswith(b"-ERR"), "RETR 99"
        assert conn.read_status().startswith(b"+OK"), "DELE 1"
        assert conn.read_status().split()[:2] == [b"+OK", b"2"], "STAT after DELE"
        assert conn.read_status().startswith(b"+OK"), "RSET"
        assert conn.read_status().split()[:3] == [b"+OK", b"1", str(sizes[0]).encode()]
        assert conn.read_status().startswith(b"+OK"), "QUIT"
        assert conn.closed()
    assert sorted(bases(maildrop(srv))) == sorted(bases(files))


def test_plaintext_pipelined_after_stls_is_discarded(srv):
    """Commands sent in clear behind STLS must not run inside the TLS
    session (the STARTTLS command injection, CVE-2011-0411 class)."""
    with srv.raw_pop3(tls=False) as conn:
        conn.send(f"STLS\r\nUSER {ALICE}\r\nPASS {ALICE_PASSWORD}\r\n")
        assert conn.read_status().startswith(b"+OK"), "STLS"
        assert conn._buf == b"", f"answers after STLS in clear: {conn._buf!r}"
        try:
            conn.sock = insecure_tls_context().wrap_socket(conn.sock)
        except OSError:
            return   # the server gave up on the connection: nothing ran either
        # Had USER/PASS run, this would be a TRANSACTION-state answer.
        assert conn.command("STAT").startswith(b"-ERR"), "the injected login ran"
        conn.expect_ok(f"USER {ALICE}")
        conn.expect_ok(f"PASS {ALICE_PASSWORD}")
        conn.expect_ok("QUIT")


# --------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------

def test_maildird_is_supervised(srv):
    pid = srv.pid("maildird")
    assert pid_alive(pid)
    status = json.loads(srv.ctl("status", "--json").stdout)
    assert json_contains(status, pid), status
    assert json_contains(status, "maildird"), status

    os.kill(pid, signal.SIGKILL)

    new = srv.wait_for_new_pid("maildird", pid, timeout=10)
    wait_until(lambda: pop3_greets(srv.pop3s_port, tls=True), 10, "POP3S after a restart")
    assert pid_alive(new) and not pid_alive(pid)
    deliver(srv, THREE_BODIES[0])
    login(srv).quit()


# --------------------------------------------------------------------------
# fetchmail
# --------------------------------------------------------------------------

def run_fetchmail(srv, workdir: Path, port: int, implicit_tls: bool,
                  keep: bool) -> tuple[str, list[bytes]]:
    """Run fetchmail once for alice against `port` (POP3S when
    `implicit_tls`, else the plain port with STLS required), delivering
    each message to its own file through an MDA. Returns fetchmail's output
    and the delivered messages."""
    fetchmail = shutil.which("fetchmail")
    if fetchmail is None:
        pytest.skip("fetchmail is not installed (test.sh installs it)")
    workdir.mkdir(mode=0o700)
    out = workdir / "delivered"
    out.mkdir()
    mda = workdir / "mda.sh"
    mda.write_text(f'#!/bin/sh\nf=$(mktemp "{out}/msg.XXXXXX") || exit 75\n'
                   'exec cat > "$f"\n')
    mda.chmod(0o700)
    rcfile = workdir / "fetchmailrc"
    rcfile.write_text("\n".join([
        "set no bouncemail",
        "set no syslog",
        f"poll 127.0.0.1 service {port} protocol pop3 timeout 30",
        f'  user "{ALICE}" password "{ALICE_PASSWORD}"',
        # sslproto: TLS 1.2 or newer, and STLS required on the plain port.
        f'  {"ssl " if implicit_tls else ""}sslproto "TLS1.2+" no sslcertck',
        f'  mda "{mda}"',
        "  keep" if keep else "  no keep",
        "",
    ]))
    rcfile.chmod(0o600)
    env = dict(os.environ, HOME=str(workdir),
               FETCHMAILUSER=pwd.getpwuid(os.getuid()).pw_name)
    env.pop("FETCHMAILHOME", None)
    proc = subprocess.run(
        [fetchmail, "-f", str(rcfile), "--nodetach", "--nosyslog", "-v",
         "--pidfile", str(workdir / "fetchmail.pid"), "--idfile", str(workdir / "fetchids")],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=120)
    output = proc.stdout.decode("utf-8", "replace")
    # 0: mail retrieved (1 would be "no mail").
    assert proc.returncode == 0, f"fetchmail exited {proc.returncode}\n{output}"
    assert "not the expected length" not in output, output
    return output, [p.read_bytes() for p in sorted(out.iterdir())]


def assert_fetched(delivered: list[bytes], sent: list[bytes], output: str) -> None:
    """Each message `sent` arrived exactly once through the MDA."""
    assert len(delivered) == len(sent), f"{len(delivered)} delivered\n{output}"
    for message in sent:
        subject = header(message, "Subject")
        body = message.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
        matching = [d for d in delivered if header(d, "Subject") == subject]
        assert len(matching) == 1, f"{subject!r}: {len(matching)} copies\n{output}"
        assert matching[0].replace(b"\r\n", b"\n").endswith(b"\n\n" + body), subject


def send_messages(srv, n: int) -> list[bytes]:
    before = len(maildrop(srv))
    sent = [srv.send(ALICE, make_message(
        f"fetchmail {i} {uuid.uuid4().hex}",
        body=f"body of message {i}\n.\n.dot line\n{uuid.uuid4().hex}\n", to=ALICE))
        for i in range(n)]
    srv.wait_for_messages(ALICE, before + n)
    return sent


def test_fetchmail_pop3s_keep_then_delete(srv, tmp_path):
    sent = send_messages(srv, 2)
    bases = sorted(base_name(p) for p in maildrop(srv))

    output, delivered = run_fetchmail(srv, tmp_path / "keep", srv.pop3s_port,
                                      implicit_tls=True, keep=True)
    assert_fetched(delivered, sent, output)
    assert sorted(base_name(p) for p in maildrop(srv)) == bases, "keep deleted messages"

    output, delivered = run_fetchmail(srv, tmp_path / "nokeep", srv.pop3s_port,
                                      implicit_tls=True, keep=False)
    assert_fetched(delivered, sent, output)
    assert maildrop(srv) == [], "fetched messages were not deleted"


def test_fetchmail_stls(srv, tmp_path):
    sent = send_messages(srv, 3)

    output, delivered = run_fetchmail(srv, tmp_path / "stls", srv.pop3_port,
                                      implicit_tls=False, keep=False)
    assert "POP3> STLS" in output, f"fetchmail did not use STLS\n{output}"
    assert output.index("POP3> STLS") < output.index("POP3> USER"), output
    assert_fetched(delivered, sent, output)
    assert maildrop(srv) == [], "fetched messages were not deleted"
