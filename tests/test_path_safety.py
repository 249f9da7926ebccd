"""Path and injection safety (issue 8): names that could leave a
directory, and input that could forge a line where lines mean something.

- `mailctl user add` refuses user names that cannot be a directory of
  their own (`..`, `/`, a leading `.`, control characters) or that would
  break the passwd-file (`:`), with a message naming the problem, and
  creates nothing anywhere; IMAP LOGIN with such names is a clean NO and
  maildird goes on serving. (NUL cannot reach mailctl: no argv can hold
  one; LOGIN gets it through a literal.)
- IMAP mailbox names with `..`, `/`, `~`, NUL, newline or a leading `.`
  are refused by every command that takes one, and nothing appears on
  disk (test_imap.py covers CREATE, SELECT, EXAMINE and RENAME's target
  for most of them; this adds DELETE, APPEND, RENAME's source, STATUS,
  SUBSCRIBE, COPY and MOVE, NUL, names in modified UTF-7 and UTF-8 that
  decode to `/` or `.`, and a walk of the whole installation).
- sendmail -f and -F: CR, LF, spaces and angle brackets cannot make a new
  header line or a new recipient.
- SMTP AUTH data holding CR, LF or NUL does not log in and leaves the
  session sane; NUL bytes, bare CR and invalid UTF-8 in SMTP commands get
  a 5xx and the server goes on.
"""

from __future__ import annotations

import base64
import email.utils
import os
import pwd
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import BIN_DIR, DOMAIN
from mailtest import RawSMTP, header, imap_quote, make_message, queued_id, wait_until
from test_submission import plain, submissions

SENDMAIL = BIN_DIR / "sendmail"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
VICTIM = "victim@remote.test"

# Enough room that the many refusals below never trip a throttle or the
# error limit, which would hide what each one does.
LENIENT = {
    "maildird.limits.max_auth_failures": 1000,
    "maildird.limits.max_account_auth_failures": 1000,
    "smtpd.max_auth_failures": 1000,
    "smtpd.max_account_auth_failures": 1000,
    "smtpd.max_errors": 1000,
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def tree(top: Path, *skip: Path) -> set[str]:
    """Every path under `top` (files, directories, symlinks, not followed),
    relative to it; the directories `skip` and what is under them are left
    out."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            found.add(str((here / name).relative_to(top)))
    return found


def leaked(marker: str, *tops: Path) -> list[Path]:
    """Paths whose name holds `marker` under `tops`, and right in the
    places a `..` or `~` could reach."""
    found = []
    for top in tops:
        found += [p for p in top.rglob(f"*{marker}*")]
    for place in (Path("/"), Path("/tmp"), Path.home(), Path("/var/tmp")):
        for candidate in (place / marker, place / f".{marker}"):
            if os.path.lexists(candidate):
                found.append(candidate)
    return found


def literal(data: str | bytes) -> bytes:
    """A non-synchronizing literal (RFC 7888)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return f"{{{len(raw)}+}}\r\n".encode() + raw


def status_of(responses: list[bytes]) -> str:
    return responses[-1].split(b" ", 2)[1].decode().upper()


def daemons_alive(srv) -> dict[str, int]:
    return {d: srv.pid(d) for d in ("smtpd", "maildird")}


def no_panic(srv) -> None:
    log = srv.log()
    assert "panicked" not in log and "RUST_BACKTRACE" not in log, srv.log_tail()


# --------------------------------------------------------------------------
# mailctl user add
# --------------------------------------------------------------------------

# {m}: a unique marker, looked for on disk afterwards.
UNSAFE_USER_NAMES = [
    ("dot-dot", "..@{d}"),
    ("dot-dot-slash", "../{m}@{d}"),
    ("deep-traversal", "a/../../../{m}@{d}"),
    ("absolute", "/tmp/{m}@{d}"),
    ("slash", "{m}/x@{d}"),
    ("leading-dot", ".{m}@{d}"),
    ("leading-dot-dot", "..{m}@{d}"),
    ("newline", "{m}\nx@{d}"),
    ("crlf", "{m}\r\nx@{d}"),
    ("tab", "{m}\tx@{d}"),
    ("domain-traversal", "{m}@{d}/../.."),
    ("domain-dot-dot", "{m}@.."),
    # The passwd-file's field separator: `a:b@d` would be read back as
    # the user `a` with the hash `b@d`.
    ("colon", "{m}:x@{d}"),
    # ...and with `@` in the local part, an account of one's choosing:
    # `v@d:HASH:@d` is read back as the account v@d with the hash HASH
    # (lower-cased; a duplicate of an existing v@d breaks the whole file).
    ("colon-forged-account", "{m}@{d}:$5$salt$forged:@{d}"),
    # A line starting with `#` is a comment: "added", but no such account.
    ("leading-hash", "#{m}@{d}"),
]

CLEAR_REASONS = ("directory name", "control character", "not usable", "not allowed",
                 "forbidden", "invalid", "not a valid", "cannot be", "colon", "character")


@pytest.mark.parametrize("name", [n for _, n in UNSAFE_USER_NAMES],
                         ids=[i for i, _ in UNSAFE_USER_NAMES])
def test_mailctl_refuses_unsafe_user_names(installation, name):
    srv = installation
    marker = f"unsafe-{uuid.uuid4().hex[:10]}"
    address = name.format(m=marker, d=DOMAIN)
    top = srv.root.parent
    users_before = (srv.root / "users").read_bytes()
    before = tree(top)

    result = srv.ctl("user", "add", address, input="pw\n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"mailctl user add {address!r} succeeded:\n{output}"
    assert "panicked" not in output, output
    assert any(r in result.stderr.lower() for r in CLEAR_REASONS), (
        f"the refusal of {address!r} does not say what is wrong: {result.stderr!r}")
    assert (srv.root / "users").read_bytes() == users_before
    assert tree(top) == before, sorted(tree(top) ^ before)
    assert leaked(marker, top) == []
    # The table still loads.
    assert srv.ctl("user", "list", "--json").returncode == 0


def test_user_database_survives_hostile_names(make_mailsrv):
    """However mailctl answers the names above, the users file stays
    loadable and an existing account keeps its password and only it."""
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True, config=LENIENT)
    marker = f"unsafe-{uuid.uuid4().hex[:10]}"
    for _, name in UNSAFE_USER_NAMES:
        srv.ctl("user", "add", name.format(m=marker, d=DOMAIN), input="pw\n", check=False)
    listed = srv.ctl("user", "list", "--json", check=False)
    assert listed.returncode == 0, f"the users file no longer loads:\n{listed.stderr}"
    check = srv.ctl("check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("NOOP")
    # Also after a restart, when the daemons read the file afresh.
    srv.restart()
    srv.wait_imap_ready()
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("NOOP")
    no_panic(srv)


# --------------------------------------------------------------------------
# IMAP LOGIN with such names
# --------------------------------------------------------------------------

HOSTILE_LOGINS = [
    b"..",
    b"../../../../etc/passwd",
    b"/etc/passwd",
    b"~root",
    b"alice@example.test/../bob@example.test",
    b"../example.test/alice",
    b"example.test/alice",
    b".alice@example.test",
    b"alice@example.test/",
    b"alice@example.test/.",
    b"alice@example.test\n",
    b"alice@example.test\r\n",
    b"alice@example.test\nx",
    b"alice@example.test\0",
    b"alice@example.test\0garbage",
    b"\0alice@example.test",
    b"alice\0@example.test",
    b"ALICE@EXAMPLE.TEST\0",
    b"alice@example.test\t",
    b"alice@example.test ",
    b"alice:x@example.test",
    b"alice@example.test:",
]


def test_imap_login_with_hostile_names_fails_cleanly(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB], wait_for_imap=True, config=LENIENT)
    password = srv.passwords[ALICE]
    pids = daemons_alive(srv)
    top = srv.root.parent
    with srv.raw_imap(user=ALICE) as warm:   # Maildir files made on first use
        warm.expect("SELECT INBOX")
    before = tree(top, srv.root / "log", srv.maildir(ALICE))

    with srv.raw_imap() as conn:
        for name in HOSTILE_LOGINS:
            # With alice's password: a name that is almost alice's must not
            # become alice (a NUL or line end cut off, trimmed, folded).
            for pw in (password, "wrong"):
                responses = conn.command(conn.tag(), b"LOGIN " + literal(name) + b" "
                                         + imap_quote(pw))
                status = status_of(responses)
                allowed = ("NO", "BAD") if b"\0" in name else ("NO",)
                assert status in allowed, f"LOGIN {name!r}: {responses}"
            conn.expect("NOOP")
        # AUTHENTICATE PLAIN carries the same names.
        for name in HOSTILE_LOGINS:
            for authz in (b"", name):
                blob = base64.b64encode(authz + b"\0" + name + b"\0" + password.encode())
                responses = conn.command(conn.tag(), b"AUTHENTICATE PLAIN " + blob)
                assert status_of(responses) in ("NO", "BAD"), (
                    f"AUTHENTICATE PLAIN {name!r}: {responses}")
            conn.expect("NOOP")
        # The right name still works on the same connection.
        conn.expect(b"LOGIN " + imap_quote(ALICE) + b" " + imap_quote(password))
        conn.expect("SELECT INBOX")

    assert daemons_alive(srv) == pids, "a daemon was restarted"
    after = tree(top, srv.root / "log", srv.maildir(ALICE))
    assert after == before, sorted(after ^ before)
    no_panic(srv)


# --------------------------------------------------------------------------
# IMAP mailbox names
# --------------------------------------------------------------------------

# {m}: a unique marker. Sent as literals, so any byte gets through. (One
# trailing delimiter is not here: it declares a hierarchy, RFC 9051 6.3.4,
# and is dropped; see the end of the test.)
HOSTILE_MAILBOXES = [
    "..", ".", "../{m}", "../../{m}", "../../../../../../tmp/{m}", "{m}/..", "/{m}",
    "/tmp/{m}", "{m}/x", "~", "~/{m}", "~root/{m}", "~{m}", ".{m}", "..{m}", "{m}..",
    "{m}..x", "{m}\0x", "\0", "{m}\nx", "{m}\r\nx", "{m}\rx", "\n",
    "INBOX/../{m}", "INBOX/{m}", "INBOX..{m}", ".INBOX", "{m}\\x", "\\{m}",
    # Modified UTF-7 spellings of "/" and "." (RFC 3501 5.1.3 forbids
    # encoding printable ASCII), which a careless decoder turns into paths.
    "&AC8-{m}", "{m}&AC8-x", "&AC4-&AC4-", "&AC4-&AC4-&AC8-{m}", "&AC4-{m}",
]

# The same dangers once UTF8=ACCEPT is enabled (names taken as UTF-8, no
# modified UTF-7 decoding).
HOSTILE_UTF8_MAILBOXES = ["..", "../{m}", "{m}/x", "~{m}", ".{m}", "{m}\0x", "{m}\nx"]


def test_mailbox_names_that_would_leave_the_maildir(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True, config=LENIENT)
    marker = f"mbox-{uuid.uuid4().hex[:10]}"
    names = [n.format(m=marker) for n in HOSTILE_MAILBOXES]
    maildir = srv.maildir(ALICE)
    top = srv.root.parent
    message = make_message("appended", to=ALICE)
    pids = daemons_alive(srv)

    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("CREATE Keep")
        conn.append("INBOX", message)
        conn.expect("SELECT INBOX")
        outside_before = tree(top, maildir)
        inside_before = {p for p in tree(maildir) if (maildir / p).is_dir()}

        def refused(command: bytes) -> None:
            responses = conn.command(conn.tag(), command)
            assert status_of(responses) in ("NO", "BAD"), f"{command!r}: {responses}"

        for name in names:
            quoted = literal(name)
            for command in (b"CREATE ", b"DELETE ", b"RENAME Keep ", b"SUBSCRIBE ",
                            b"COPY 1 ", b"MOVE 1 "):
                refused(command + quoted)
            for command in (b"SELECT ", b"EXAMINE "):
                refused(command + quoted)
                conn.expect("SELECT INBOX")   # a failed SELECT leaves none selected
            refused(b"RENAME " + quoted + b" Renamed")
            refused(b"STATUS " + quoted + b" (MESSAGES)")
            refused(b"APPEND " + quoted + b" " + literal(message))
            conn.expect("NOOP")

        # UTF-8 names, in a session that enabled them.
        conn.expect("ENABLE UTF8=ACCEPT")
        for name in (n.format(m=marker) for n in HOSTILE_UTF8_MAILBOXES):
            for command in (b"CREATE ", b"DELETE ", b"RENAME Keep "):
                refused(command + literal(name))
            refused(b"APPEND " + literal(name) + b" " + literal(message))
        conn.expect("NOOP")

        # Nothing was made, renamed or removed, and the session still works.
        conn.expect("SELECT Keep")
        conn.expect("SELECT INBOX")
        listing = [r for r in conn.expect('LIST "" "*"') if r.startswith(b"* LIST")]
        assert not [r for r in listing if marker.encode() in r], listing

    inside_after = {p for p in tree(maildir) if (maildir / p).is_dir()}
    assert inside_after == inside_before, sorted(inside_after ^ inside_before)
    # No name reached the subscriptions file either.
    for path in maildir.glob("*subscriptions*"):
        text = path.read_bytes()
        assert marker.encode() not in text and b"\0" not in text and b"\r" not in text, text
    outside_after = tree(top, maildir)
    assert outside_after == outside_before, sorted(outside_after ^ outside_before)
    assert leaked(marker, top) == []
    assert daemons_alive(srv) == pids, "a daemon was restarted"
    no_panic(srv)

    # A trailing delimiter only declares a parent (RFC 9051 6.3.4): CREATE
    # may make the mailbox without it, inside the Maildir and nowhere else.
    parent = f"{marker}-parent"
    with srv.raw_imap(user=ALICE) as conn:
        status = status_of(conn.command(conn.tag(), b"CREATE " + literal(parent + ".")))
        assert status in ("OK", "NO", "BAD")
    made = {p for p in tree(maildir) if (maildir / p).is_dir()} - inside_before
    assert made <= {f".{parent}", f".{parent}/cur", f".{parent}/new", f".{parent}/tmp"}, made
    assert tree(top, maildir) == outside_before


# --------------------------------------------------------------------------
# sendmail -f and -F
# --------------------------------------------------------------------------

def sendmail(srv, *args: str, input: bytes) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAILSRV_CONFIG": str(srv.config_path)}
    return subprocess.run([str(SENDMAIL), *args], input=input, env=env,
                          capture_output=True, timeout=30)


def header_section(content: bytes) -> list[bytes]:
    """The header lines of a stored message (LF line ends), unfolded
    continuation lines kept as they are."""
    head = content.split(b"\n\n", 1)[0]
    return head.split(b"\n")


def queued_addresses(srv) -> set[str]:
    return {r["address"].lower() for e in srv.queue().values()
            for r in e.get("recipients", [])}


def delivered_with_subject(srv, addr: str, subject: str, timeout: float = 20) -> bytes:
    def found() -> bytes | None:
        for path in srv.messages(addr):
            content = path.read_bytes()
            if subject.encode() in content:
                return content
        return None
    try:
        return wait_until(found, timeout, f"{subject!r} in {srv.maildir(addr)}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{srv.log_tail()}") from None


def refused_cleanly(result) -> bool:
    """Whether sendmail refused, as it must if it does: with a sysexits
    code and a word on why."""
    if result.returncode == 0:
        return False
    assert result.returncode in (64, 65), result
    assert result.stderr.strip(), result
    return True


def delivered_without_victim(srv, subject: str) -> bytes:
    """The message with `subject` as delivered to ALICE, after checking
    that nothing for VICTIM was queued or delivered."""
    content = delivered_with_subject(srv, ALICE, subject)
    srv.wait_spool_empty()
    assert VICTIM not in queued_addresses(srv)
    assert not [l for l in srv.log().splitlines() if f"to=<{VICTIM}>" in l]
    return content


HOSTILE_SENDERS = [
    f"robot@{DOMAIN}\r\nBcc: {VICTIM}",
    f"robot@{DOMAIN}\nBcc: {VICTIM}",
    f"robot@{DOMAIN}\rBcc: {VICTIM}",
    f"robot@{DOMAIN} {VICTIM}",
    f"robot@{DOMAIN}> <{VICTIM}",
    f"robot>,<{VICTIM}",
    f"robot@{DOMAIN}>\r\nX-Injected: yes\r\n<x@{DOMAIN}",
    f"<robot@{DOMAIN}>\nX-Injected: yes",
]
SENDER_IDS = ["crlf-bcc", "lf-bcc", "cr-bcc", "space", "angle-space", "angle-comma",
              "angle-crlf-header", "bracketed-lf-header"]


@pytest.mark.parametrize("sender", HOSTILE_SENDERS, ids=SENDER_IDS)
def test_sendmail_f_cannot_inject(mailsrv, sender):
    srv = mailsrv
    srv.add_user(ALICE)
    subject = f"hostile-f-{uuid.uuid4().hex[:8]}"
    result = sendmail(srv, "-f", sender, ALICE,
                      input=f"Subject: {subject}\nFrom: me@{DOMAIN}\n\nhello\n".encode())
    if refused_cleanly(result):
        assert list((srv.spool_dir / "maildrop").iterdir()) == []
        return
    content = delivered_without_victim(srv, subject)
    lines = header_section(content)
    assert not [l for l in lines if l.lower().startswith((b"bcc:", b"x-injected:"))], lines
    assert b"\r" not in b"\n".join(lines), lines
    return_path = header(content, "Return-Path")
    # One path, in one pair of angle brackets, with nothing of VICTIM.
    assert re.fullmatch(r"<[^<>\s]*>", return_path or ""), f"Return-Path: {return_path!r}"


HOSTILE_FULL_NAMES = [
    f"Joe\r\nBcc: {VICTIM}",
    f"Joe\nBcc: {VICTIM}",
    f"Joe\rBcc: {VICTIM}",
    "Joe\nX-Injected: yes",
    "Joe\n\nInjected body line",
    f'Joe" <{VICTIM}>, "x',
    f"Joe <{VICTIM}>",
    "Joe\\\" <evil@remote.test>, \\\"",
]
FULL_NAME_IDS = ["crlf-bcc", "lf-bcc", "cr-bcc", "lf-header", "lf-lf-body", "quote-address",
                 "angle-address", "backslash-quote"]


@pytest.mark.parametrize("full_name", HOSTILE_FULL_NAMES, ids=FULL_NAME_IDS)
def test_sendmail_F_cannot_inject(mailsrv, full_name):
    srv = mailsrv
    srv.add_user(ALICE)
    subject = f"hostile-F-{uuid.uuid4().hex[:8]}"
    # No From: in the message, so sendmail writes one with the full name.
    result = sendmail(srv, "-F", full_name, ALICE,
                      input=f"Subject: {subject}\n\nhello\n".encode())
    if refused_cleanly(result):
        return
    # No recipient was added: nothing for the victim queued or delivered.
    content = delivered_without_victim(srv, subject)
    lines = header_section(content)
    names = [l.split(b":", 1)[0].lower() for l in lines if l[:1] not in (b" ", b"\t")]
    assert b"bcc" not in names and b"x-injected" not in names, lines
    assert all(b":" in l for l in lines if l[:1] not in (b" ", b"\t")), (
        f"a header line that is not a field: {lines}")
    assert b"\r" not in content.split(b"\n\n", 1)[0], lines
    # The message's own header is still header: no empty line was made
    # in front of it.
    assert header(content, "Subject") == subject, lines
    froms = [l for l in lines if l.lower().startswith(b"from:")]
    assert len(froms) == 1, lines
    own = f"{pwd.getpwuid(os.getuid()).pw_name}@{srv.hostname}"
    addresses = email.utils.getaddresses([header(content, "From")])
    assert [a for _, a in addresses] == [own], (
        f"From: {header(content, 'From')!r} -> {addresses}")


# --------------------------------------------------------------------------
# SMTP AUTH data
# --------------------------------------------------------------------------

def raw_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_auth_data_with_line_ends_or_nul_does_not_log_in(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], config=LENIENT)
    password = srv.passwords[ALICE].encode()
    alice = ALICE.encode()
    fake = b"FAKE-LOG-LINE authenticated as " + alice
    plain_payloads = [
        b"\0" + alice + b"\r\n\0" + password,
        b"\0" + alice + b"\n\0" + password,
        b"\0" + alice + b"\r\0" + password,
        b"\0" + alice + b"\r\nMAIL FROM:<" + alice + b">\0" + password,
        b"\0" + alice + b"\n" + fake + b"\0" + password,
        b"\0" + alice + b"\0" + password + b"\0",
        b"\0" + alice + b"\0\0" + password,
        b"\0ali\0ce@example.test\0" + password,
        b"\0\0" + alice + b"\0" + password,
        alice + b"\r\n\0" + alice + b"\0" + password,
        alice + b"\0" + alice + b"\r\n\0" + password,
        b"\0" + alice + b"\0" + password + b"\r\nNOOP",
        b"\0" + alice.upper() + b"\n\0" + password,
    ]
    with submissions(srv) as conn:
        for payload in plain_payloads:
            # As an initial response and after the 334.
            code, lines = conn.command(f"AUTH PLAIN {raw_b64(payload)}")
            assert code in (535, 501), f"AUTH PLAIN {payload!r}: {code} {lines}"
            RawSMTP.check_reply(conn.command("AUTH PLAIN"), 334, context="AUTH PLAIN")
            code, lines = conn.command(raw_b64(payload))
            assert code in (535, 501), f"AUTH PLAIN, then {payload!r}: {code} {lines}"
            conn.expect("NOOP", 250)
            conn.expect(f"MAIL FROM:<{ALICE}>", 530)
        # LOGIN: user name and password in two steps.
        for user in (alice + b"\r\n", alice + b"\n", alice + b"\0", b"\0" + alice,
                     alice + b"\r\nNOOP", alice + b"\n" + fake):
            conn.expect(f"AUTH LOGIN {raw_b64(user)}", 334)
            code, lines = conn.command(raw_b64(password))
            assert code in (535, 501), f"AUTH LOGIN {user!r}: {code} {lines}"
            conn.expect("AUTH LOGIN", 334)
            conn.expect(raw_b64(user), 334)
            code, lines = conn.command(raw_b64(password))
            assert code in (535, 501), f"AUTH LOGIN, then {user!r}: {code} {lines}"
            conn.expect("NOOP", 250)
        # A base64 line cut by a bare CR or holding a NUL.
        for line in (f"AUTH PLAIN {plain(ALICE, srv.passwords[ALICE])}\rNOOP".encode(),
                     b"AUTH PLAIN " + raw_b64(b"\0" + alice).encode() + b"\0"
                     + raw_b64(b"\0" + password).encode()):
            code, lines = conn.command(line)
            assert code in (500, 501, 535), f"{line!r}: {code} {lines}"
            conn.expect("NOOP", 250)
        conn.expect(f"MAIL FROM:<{ALICE}>", 530)
        # The session is still sane: the right credentials work.
        conn.auth_plain(ALICE, srv.passwords[ALICE])
        conn.expect(f"MAIL FROM:<{ALICE}>", 250)
    log = srv.log()
    logins = [l for l in log.splitlines() if re.search(r"\]: authenticated as \S+$", l)]
    assert len(logins) == 1 and logins[0].endswith(f"authenticated as {ALICE}"), logins
    # A line end in a user name does not start a line of its own in the log.
    assert not [l for l in log.splitlines() if l.startswith("FAKE-LOG-LINE")], srv.log_tail()
    assert not [l for l in log.splitlines() if l.startswith("MAIL FROM:")], srv.log_tail()
    no_panic(srv)


# --------------------------------------------------------------------------
# NUL, bare CR and invalid UTF-8 in SMTP commands
# --------------------------------------------------------------------------

# Lines with a NUL or invalid UTF-8 where the command's argument is used:
# a 5xx, not a mangled (U+FFFD) name or address taken in.
HOSTILE_COMMANDS = [
    b"NOOP\0",
    b"\0NOOP",
    b"NO\0OP",
    b"\xef\xbb\xbfNOOP",
    b"\xff\xfe\xfd\xfc",
    b"HELO client\0.example.test",
    b"EHLO client\0.example.test",
    b"EHLO \xff\xfe\xfd",
    b"HELO \xc3\x28",
    b"MAIL FROM:<sender\0@remote.test>",
    b"MAIL FROM:<sender@remote.test\0>",
    b"MAIL FROM:<sender@remote.test> \0SMTPUTF8",
    b"MAIL FROM:<\xff\xfe@remote.test>",
    b"MAIL FROM:<\xff\xfe@remote.test> SMTPUTF8",
    b"MAIL FROM:<sender@\xc3\x28.test> SMTPUTF8",
]


@pytest.mark.parametrize("line", HOSTILE_COMMANDS, ids=[repr(l)[2:-1] for l in HOSTILE_COMMANDS])
def test_nul_and_invalid_utf8_in_commands(make_mailsrv, line):
    srv = make_mailsrv(users=[ALICE])
    pid = srv.pid("smtpd")
    with srv.raw() as conn:
        conn.ehlo()
        conn.send(line + b"\r\n")
        code, lines = conn.read_reply()
        assert 500 <= code < 600, f"{line!r}: {code} {lines}"
        after_hostile_line(srv, conn)
    assert srv.pid("smtpd") == pid
    no_panic(srv)


HOSTILE_RECIPIENTS = [
    b"RCPT TO:<alice\0@example.test>",
    b"RCPT TO:<alice@example.test\0>",
    b"RCPT TO:<alice\xff@example.test>",
    b"RCPT TO:<alice@example\xff.test>",
    b"RCPT TO:<alice@example.test> \0NOTIFY=NEVER",
]


@pytest.mark.parametrize("line", HOSTILE_RECIPIENTS,
                         ids=[repr(l)[2:-1] for l in HOSTILE_RECIPIENTS])
def test_nul_and_invalid_utf8_in_recipients(make_mailsrv, line):
    srv = make_mailsrv(users=[ALICE])
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect("MAIL FROM:<sender@remote.test> SMTPUTF8", 250)
        conn.send(line + b"\r\n")
        code, lines = conn.read_reply()
        assert 500 <= code < 600, f"{line!r}: {code} {lines}"
        conn.expect("RSET", 250)
        after_hostile_line(srv, conn)


def after_hostile_line(srv, conn) -> None:
    """The session and the server still work: a message to alice goes
    through on this connection, and a new connection is served."""
    conn.expect("NOOP", 250)
    conn.expect("RSET", 250)
    subject = f"after-{uuid.uuid4().hex[:8]}"
    conn.expect("MAIL FROM:<sender@remote.test>", 250)
    conn.expect(f"RCPT TO:<{ALICE}>", 250)
    RawSMTP.check_reply(conn.data(make_message(subject)), 250, "2.0.0")
    delivered_with_subject(srv, ALICE, subject)
    with srv.raw() as other:
        other.ehlo()
        other.expect("NOOP", 250)


# A bare CR is never a line end: what follows it is not a second command.
BARE_CR_LINES = [
    b"NOOP\rQUIT",
    b"RSET\rQUIT",
    b"MAIL FROM:<sender@remote.test>\rRCPT TO:<victim@remote.test>",
    b"MAIL FROM:<sender@remote.test>\rQUIT",
    b"EHLO client.example.test\rQUIT",
    b"VRFY alice\rQUIT",
]


@pytest.mark.parametrize("line", BARE_CR_LINES, ids=[repr(l)[2:-1] for l in BARE_CR_LINES])
def test_bare_cr_inside_a_command(make_mailsrv, line):
    srv = make_mailsrv(users=[ALICE])
    with srv.raw() as conn:
        conn.ehlo()
        conn.send(line + b"\r\n")
        code, lines = conn.read_reply()
        assert code != 221, f"{line!r}: the QUIT after the bare CR was run: {code} {lines}"
        assert code < 400 or 500 <= code < 600, f"{line!r}: {code} {lines}"
        # Exactly one reply for the one line.
        conn.send(b"NOOP\r\n")
        noop = conn.read_reply()
        assert noop[0] == 250, f"{line!r}: a second reply, or none, to one line: {noop}"
        assert not conn.closed(0.3), f"{line!r}: connection closed"
        conn.expect("RSET", 250)
        conn.expect("MAIL FROM:<sender@remote.test>", 250)
        conn.expect(f"RCPT TO:<{ALICE}>", 250)
        subject = f"bare-cr-{uuid.uuid4().hex[:8]}"
        qid = queued_id(RawSMTP.check_reply(conn.data(make_message(subject)), 250, "2.0.0"))
    delivered_with_subject(srv, ALICE, subject)
    assert "victim@remote.test" not in queued_addresses(srv)
    recipients = [l for l in srv.log().splitlines() if f"{qid}: to=<" in l]
    assert recipients and all("alice@example.test" in l for l in recipients), recipients


def test_hostile_helo_does_not_reach_the_stored_header(make_mailsrv):
    """Whatever EHLO names, no control character lands in Received:."""
    srv = make_mailsrv(users=[ALICE])
    for helo in (b"evil\0name", b"evil\x1bname", b"evil\x7fname", b"evil\x0bname"):
        with srv.raw() as conn:
            conn.send(b"EHLO " + helo + b"\r\n")
            code, lines = conn.read_reply()
            if code != 250:
                assert 500 <= code < 600, f"EHLO {helo!r}: {code} {lines}"
                continue
            subject = f"helo-{uuid.uuid4().hex[:8]}"
            conn.expect("MAIL FROM:<sender@remote.test>", 250)
            conn.expect(f"RCPT TO:<{ALICE}>", 250)
            RawSMTP.check_reply(conn.data(make_message(subject)), 250, "2.0.0")
        content = delivered_with_subject(srv, ALICE, subject)
        head = content.split(b"\n\n", 1)[0]
        assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", head), head
