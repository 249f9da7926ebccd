"""maildird's IMAP server (RFC 9051 IMAP4rev2, RFC 3501 IMAP4rev1) with
imaplib, and with RawIMAP where the exact responses matter: TLS and login,
CAPABILITY, the mailbox tree, APPEND, flags, COPY/MOVE, EXPUNGE and CLOSE,
STATUS, SEARCH and ESEARCH, IDLE, two sessions at once, UIDs across
restarts and from Dovecot, mailbox names, ID, NAMESPACE and hostile input.

Byte-exact FETCH answers (BODYSTRUCTURE, ENVELOPE, sections) are in
test_imap_raw.py; mbsync as a client is in test_mbsync.py."""

from __future__ import annotations

import base64
import datetime
import imaplib
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from mailtest import (
    RawIMAP, crlf, fetch_items, header, imap_fetch, imap_flags, imap_ok, imap_quote,
    imap_text, imaplib_responses, insecure_tls_context, make_message, parse_esearch,
    parse_imap, parse_list, parse_status, resp_code, uid_set, wait_until,
)

ALICE = "alice@example.test"
BOB = "bob@example.test"

# CAPABILITY after login (the contract), upper case as imaplib gives them.
CAPABILITIES = {
    "IMAP4REV1", "IMAP4REV2", "IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE", "NAMESPACE",
    "LITERAL+", "ENABLE", "ID", "UNSELECT", "CHILDREN", "SASL-IR", "LIST-EXTENDED",
    "LIST-STATUS", "ESEARCH", "BINARY",
}
# CAPABILITY before login on TLS: at least these (the rest may wait for login).
PRE_LOGIN_CAPABILITIES = {"IMAP4REV1", "IMAP4REV2", "SASL-IR", "AUTH=PLAIN"}
# The folders `mailctl user add` makes and their special-use attributes
# (RFC 6154), lower case as parse_list gives attributes.
SPECIAL_USE = {"Sent": "\\sent", "Drafts": "\\drafts", "Junk": "\\junk",
               "Trash": "\\trash", "Archive": "\\archive"}
SPECIAL_USE_ATTRIBUTES = set(SPECIAL_USE.values()) | {"\\all", "\\flagged"}
DEFAULT_MAILBOXES = {"INBOX", *SPECIAL_USE}
CHILDREN_ATTRIBUTES = {"\\haschildren", "\\hasnochildren"}
# Seconds from a delivery landing in new/ to `* n EXISTS` reaching IDLE.
IDLE_NOTICE = 2.0
# Seconds for another session's change to show at NOOP.
SESSION_NOTICE = 5.0


@pytest.fixture
def srv(make_mailsrv):
    """A running installation with alice and bob; every start waits for
    IMAP and IMAPS."""
    return make_mailsrv(users=[ALICE, BOB], wait_for_imap=True)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def connect(srv, how: str, user: str | None = None) -> imaplib.IMAP4:
    """An imaplib client over `how`: "imaps" (implicit TLS) or "starttls"."""
    return {"imaps": srv.imaps, "starttls": srv.imap_starttls}[how](user=user)


def raw_connect(srv, how: str) -> RawIMAP:
    """A RawIMAP over IMAPS, or over the plain port after STARTTLS."""
    if how == "imaps":
        return srv.raw_imap(tls=True)
    conn = srv.raw_imap(tls=False)
    try:
        conn.starttls()
    except BaseException:
        conn.close()
        raise
    return conn


def plain_response(user: str, password: str, authzid: str = "") -> str:
    """The base64 SASL PLAIN response (RFC 4616)."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def capabilities(client: imaplib.IMAP4) -> set[str]:
    """CAPABILITY now (imaplib's own list is from before login)."""
    data = imap_ok(client.capability())
    return set(data[-1].decode().upper().split())


def refused(result: tuple[str, list], code: str | None = None) -> bytes:
    """The text of an imaplib (type, data) result that must be NO, with the
    response code `code` when given."""
    typ, data = result
    assert typ == "NO", f"expected NO, got {typ} {data}"
    text = data[-1]
    if code is not None:
        assert re.match(rb"\[" + code.encode() + rb"[\] ]", text, re.IGNORECASE), (
            f"expected NO [{code}], got {text!r}")
    return text


def login_refusal(client: imaplib.IMAP4, user: str, password: str) -> bytes:
    """LOGIN that must be answered NO; returns the text of the NO."""
    with pytest.raises(imaplib.IMAP4.error) as info:
        client.login(user, password)
    text = info.value.args[0]
    # imaplib raises with the response text for NO, with a str for BAD.
    assert isinstance(text, bytes), f"LOGIN got BAD, not NO: {text!r}"
    return text


def changes(responses: list[bytes]) -> list[bytes]:
    """The untagged responses but `* n RECENT`, which an IMAP4rev1 session
    may get whenever the count of \\Recent messages changes (RFC 3501
    7.3.2; gone in RFC 9051)."""
    return [r for r in RawIMAP.untagged(responses) if not re.fullmatch(rb"\* \d+ RECENT", r)]


def fetches(responses: list[bytes]) -> list[bytes]:
    """The `* n FETCH` responses among `responses`."""
    return [r for r in responses if re.match(rb"\* \d+ FETCH ", r, re.IGNORECASE)]


def tagged_status(responses: list[bytes]) -> str:
    """OK, NO or BAD: the status of the tagged response (the last)."""
    return responses[-1].split(b" ", 2)[1].decode().upper()


def select(client: imaplib.IMAP4, mailbox: str = "INBOX",
           readonly: bool = False) -> tuple[int, int]:
    """SELECT (EXAMINE when `readonly`) with imaplib: (EXISTS, UIDVALIDITY)."""
    data = imap_ok(client.select(mailbox, readonly))
    _, validity = client.response("UIDVALIDITY")
    assert validity and validity[-1] is not None, "no [UIDVALIDITY] in the SELECT answer"
    return int(data[-1]), int(validity[-1])


def append(client: imaplib.IMAP4, mailbox: str, message: bytes, flags: str = "",
           date: str | None = None) -> tuple[int, int]:
    """APPEND with imaplib; returns (UIDVALIDITY, UID) of its APPENDUID."""
    data = imap_ok(client.append(mailbox, f"({flags})" if flags else None,
                                 f'"{date}"' if date else None, message))
    m = re.match(rb"\[APPENDUID (\d+) (\d+)\]", data[-1], re.IGNORECASE)
    assert m, f"no APPENDUID in {data[-1]!r}"
    return int(m[1]), int(m[2])


def status(client: imaplib.IMAP4, mailbox: str, items: str) -> dict[str, int]:
    """STATUS with imaplib: {ITEM: number}."""
    name, got = parse_status(imap_ok(client.status(mailbox, f"({items})"))[0])
    assert name == mailbox, f"STATUS {mailbox} answered for {name}"
    return got


def mailboxes(client: imaplib.IMAP4, pattern: str = "*",
              lsub: bool = False) -> dict[str, set[str]]:
    """LIST (or LSUB) "" pattern with imaplib: {name: attributes}; every
    delimiter must be "."."""
    data = imap_ok((client.lsub if lsub else client.list)('""', pattern))
    found = {}
    for response in imaplib_responses(data):
        attributes, delimiter, name = parse_list(response)
        assert delimiter == ".", response
        assert name not in found, f"{name} listed twice"
        found[name] = attributes
    return found


def listed(responses: list[bytes]) -> dict[str, set[str]]:
    """The LIST responses among raw responses: {name: attributes}."""
    found = {}
    for response in RawIMAP.untagged(responses):
        if response.upper().startswith(b"* LIST "):
            attributes, delimiter, name = parse_list(response)
            assert delimiter == ".", response
            assert name not in found, f"{name} listed twice"
            found[name] = attributes
    return found


def message_ids(client: imaplib.IMAP4) -> dict[int, str]:
    """{UID: Message-ID} of the selected mailbox; asserts that UIDs rise
    with the message numbers (RFC 9051 2.3.1.1)."""
    fetched = imap_fetch(client, "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])", uid=True)
    ids = {}
    for number in sorted(fetched):
        items = fetched[number]
        ids[items["UID"]] = header(items["BODY[HEADER.FIELDS (MESSAGE-ID)]"], "Message-ID")
    assert list(ids) == sorted(ids), f"UIDs do not rise with message numbers: {list(ids)}"
    return ids


def raw_uids(conn: RawIMAP) -> list[int]:
    """The UIDs of the mailbox selected in `conn`, in message order."""
    fetched = dict(fetch_items(r) for r in fetches(conn.expect("UID FETCH 1:* (UID)")))
    return [fetched[n]["UID"] for n in sorted(fetched)]


def current_flags(client: imaplib.IMAP4) -> dict[int, set[str]]:
    """{message number: flags} of the selected mailbox."""
    fetched = imap_fetch(client, "1:*", "(FLAGS)")
    return {n: imap_flags(items["FLAGS"]) for n, items in fetched.items()}


def copyuid(text: bytes) -> tuple[int, list[int], list[int]]:
    """(UIDVALIDITY, source UIDs, destination UIDs) of a [COPYUID ...]
    code (RFC 4315 3) in `text`."""
    m = re.search(rb"\[COPYUID (\d+) ([\d:,]+) ([\d:,]+)\]", text, re.IGNORECASE)
    assert m, f"no COPYUID in {text!r}"
    return int(m[1]), uid_set(m[2]), uid_set(m[3])


def folder_dir(srv, mailbox: str, addr: str = ALICE) -> Path:
    """The Maildir++ directory of an ASCII mailbox name."""
    root = srv.maildir(addr)
    return root if mailbox == "INBOX" else root / f".{mailbox}"


def folder_files(srv, mailbox: str = "INBOX", addr: str = ALICE) -> list[Path]:
    """The message files in new/ and cur/ of a mailbox."""
    d = folder_dir(srv, mailbox, addr)
    return sorted(p for sub in ("new", "cur") if (d / sub).is_dir()
                  for p in (d / sub).iterdir() if p.is_file())


def file_with(srv, mailbox: str, name: str, value: str) -> Path:
    """The one message file of `mailbox` whose header `name` is `value`."""
    found = [p for p in folder_files(srv, mailbox) if header(p.read_bytes(), name) == value]
    assert len(found) == 1, f"{len(found)} files with {name}: {value} in {mailbox}"
    return found[0]


def info_flags(path: Path) -> str:
    """The Maildir info letters of a file (after `:2,`)."""
    return path.name.partition(":2,")[2]


def is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("cur", "new", "tmp"))


_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def internaldate(value: bytes | str) -> datetime.datetime:
    """An IMAP date-time (`05-Mar-2024 10:20:30 +0100`, day maybe
    space-padded) as an aware datetime."""
    m = re.fullmatch(r" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([-+])(\d\d)(\d\d)",
                     imap_text(value))
    assert m, f"not an IMAP date-time: {value!r}"
    offset = datetime.timedelta(hours=int(m[8]), minutes=int(m[9]))
    zone = datetime.timezone(offset if m[7] == "+" else -offset)
    return datetime.datetime(int(m[3]), _MONTHS.index(m[2].title()) + 1, int(m[1]),
                             int(m[4]), int(m[5]), int(m[6]), tzinfo=zone)


def deliver(srv, n: int, addr: str = ALICE) -> list[bytes]:
    """Send `n` messages to `addr` over SMTP; wait until they are in its INBOX."""
    sent = [srv.send(addr, make_message(f"imap test {uuid.uuid4().hex}", to=addr))
            for _ in range(n)]
    srv.wait_for_delivery(addr, sent)
    return sent


def message_id(message: bytes) -> str:
    value = header(message, "Message-ID")
    assert value, "message without Message-ID"
    return value


def literal(name: str) -> bytes:
    """`name` as a non-synchronizing literal (RFC 7888)."""
    data = name.encode("utf-8")
    return f"{{{len(data)}+}}\r\n".encode() + data


# --------------------------------------------------------------------------
# Configuration, TLS, login and CAPABILITY
# --------------------------------------------------------------------------

def test_init_writes_the_imap_listeners(installation):
    config = installation.config()["maildird"]
    assert installation.imap_port == installation.port_base + 143
    assert installation.imaps_port == installation.port_base + 993
    assert config["imap_listen"] == [f"127.0.0.1:{installation.port_base + 143}"]
    assert config["imaps_listen"] == [f"127.0.0.1:{installation.port_base + 993}"]
    assert config["allow_plaintext_auth"] is False
    installation.ctl("check")


@pytest.mark.parametrize("how", ["imaps", "starttls"])
def test_login(srv, how):
    with connect(srv, how) as client:
        assert client.welcome.startswith(b"* OK"), client.welcome
        typ, _ = client.login(ALICE, srv.passwords[ALICE])
        assert typ == "OK"
        assert select(client)[0] == 0
        typ, _ = client.logout()
        assert typ == "BYE", "LOGOUT must send BYE (RFC 9051 6.1.3)"


@pytest.mark.parametrize("how", ["imaps", "starttls"])
def test_wrong_password_and_unknown_user(srv, how):
    with connect(srv, how) as client:
        for user, password in ((ALICE, "wrong"), (ALICE, srv.passwords[BOB]),
                               ("nobody@example.test", "pw"), ("alice", srv.passwords[ALICE])):
            login_refusal(client, user, password)
        # The session survives the failures.
        imap_ok(client.login(ALICE, srv.passwords[ALICE]))
        select(client)


def test_a_changed_password_ends_the_remembered_login(srv):
    """A right password is remembered (maildird.limits.login_cache_ttl) so
    the next logins skip Argon2; a password change must end that at once."""
    old = srv.passwords[ALICE]
    for _ in range(3):   # the first checks in full, the next ones hit the cache
        with srv.imaps() as client:
            imap_ok(client.login(ALICE, old))
    srv.ctl("user", "passwd", ALICE, input="a brand new password\n")
    with srv.imaps() as client:
        assert b"[AUTHENTICATIONFAILED]" in login_refusal(client, ALICE, old)
        imap_ok(client.login(ALICE, "a brand new password"))
    srv.passwords[ALICE] = "a brand new password"


def test_failed_logins_are_throttled(make_mailsrv):
    srv = make_mailsrv(config={"maildird.limits.max_auth_failures": 3},
                       users=[ALICE, BOB], wait_for_imap=True)
    with srv.imaps() as client:
        for attempt in range(3):
            assert b"[AUTHENTICATIONFAILED]" in login_refusal(client, ALICE, f"wrong{attempt}")
    # Now even the right password, of any user, by any method, is refused.
    with srv.imaps() as client:
        for user in (ALICE, BOB):
            assert b"[UNAVAILABLE]" in login_refusal(client, user, srv.passwords[user]), user
    with srv.raw_imap(tls=True) as conn:
        response = plain_response(ALICE, srv.passwords[ALICE])
        conn.expect(f"AUTHENTICATE PLAIN {response}", status="NO", code="UNAVAILABLE")
    # Each failure leaves a line fail2ban can match.
    log = srv.log()
    assert log.count("imap authentication failed: user=<alice@example.test>, rip=127.0.0.1") == 3
    assert "imap login refused (too many failures)" in log


@pytest.mark.parametrize("how", ["imaps", "starttls"])
def test_authenticate_plain(srv, how):
    alice = plain_response(ALICE, srv.passwords[ALICE])
    # The response after a `+` continuation (imaplib never uses SASL-IR).
    with connect(srv, how) as client:
        typ, _ = client.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{srv.passwords[ALICE]}")
        assert typ == "OK"
        select(client)

    # The initial response on the command line (SASL-IR, RFC 4959).
    with raw_connect(srv, how) as conn:
        conn.expect(f"AUTHENTICATE PLAIN {alice}")
        conn.select("INBOX")

    with raw_connect(srv, how) as conn:
        # Wrong password; an authorization identity naming someone else.
        conn.expect(f"AUTHENTICATE PLAIN {plain_response(ALICE, 'wrong')}", "NO")
        bob_as_alice = plain_response(BOB, srv.passwords[BOB], authzid=ALICE)
        conn.expect(f"AUTHENTICATE PLAIN {bob_as_alice}", "NO")
        # `*` cancels the exchange: BAD (RFC 9051 6.2.2).
        tag = conn.tag()
        conn.send(f"{tag} AUTHENTICATE PLAIN\r\n")
        assert conn.read_response().startswith(b"+"), "no continuation request"
        conn.send(b"*\r\n")
        assert tagged_status(conn.read_until_tagged(tag)) == "BAD"
        # None of that stops the right login.
        conn.expect(f"AUTHENTICATE PLAIN {alice}")
        conn.select("INBOX")


def test_capabilities(srv):
    with srv.imaps() as client:
        before = capabilities(client)
        assert PRE_LOGIN_CAPABILITIES <= before, sorted(PRE_LOGIN_CAPABILITIES - before)
        assert "STARTTLS" not in before and "LOGINDISABLED" not in before, before
        imap_ok(client.login(ALICE, srv.passwords[ALICE]))
        after = capabilities(client)
        assert CAPABILITIES <= after, f"missing after login: {sorted(CAPABILITIES - after)}"

    with srv.imap() as client:
        plain = capabilities(client)
        # RFC 9051 6.2.3, 7.2.2: LOGINDISABLED and no AUTH= before TLS.
        assert {"IMAP4REV1", "STARTTLS", "LOGINDISABLED"} <= plain, plain
        assert not any(c.startswith("AUTH=") for c in plain), plain
        client.starttls(insecure_tls_context())
        tls = capabilities(client)
        assert PRE_LOGIN_CAPABILITIES <= tls, sorted(PRE_LOGIN_CAPABILITIES - tls)
        assert "STARTTLS" not in tls and "LOGINDISABLED" not in tls, tls


def test_plaintext_login_refused_before_starttls(srv):
    password = srv.passwords[ALICE]
    with srv.imap() as client:
        assert login_refusal(client, ALICE, password).upper().startswith(b"[PRIVACYREQUIRED]")
        client.starttls(insecure_tls_context())
        imap_ok(client.login(ALICE, password))
        select(client)

    with srv.raw_imap(tls=False) as conn:
        conn.expect(f"AUTHENTICATE PLAIN {plain_response(ALICE, password)}", "NO",
                    "PRIVACYREQUIRED")
        # No `+` inviting the credentials in clear either.
        tag = conn.tag()
        conn.send(f"{tag} AUTHENTICATE PLAIN\r\n")
        first = conn.read_response()
        assert first.startswith(f"{tag} NO".encode()), first
        assert resp_code(first) == ("PRIVACYREQUIRED", ""), first
        conn.expect(b"LOGIN " + imap_quote(ALICE) + b" " + imap_quote(password), "NO",
                    "PRIVACYREQUIRED")
        conn.expect("NOOP")   # the session goes on
        conn.starttls()
        conn.login(ALICE, password)
        conn.select("INBOX")


def test_plaintext_login_allowed_by_config(make_mailsrv):
    srv = make_mailsrv(config={"maildird.allow_plaintext_auth": True}, users=[ALICE],
                       wait_for_imap=True)
    with srv.imap() as client:
        caps = capabilities(client)
        assert {"STARTTLS", "AUTH=PLAIN"} <= caps and "LOGINDISABLED" not in caps, caps
        imap_ok(client.login(ALICE, srv.passwords[ALICE]))
        select(client)
    with srv.raw_imap(tls=False) as conn:
        conn.expect(f"AUTHENTICATE PLAIN {plain_response(ALICE, srv.passwords[ALICE])}")
        conn.select("INBOX")


def test_plaintext_pipelined_after_starttls_is_discarded(srv):
    """Commands sent in clear behind STARTTLS must not run inside the TLS
    session (the STARTTLS command injection, CVE-2011-0411 class)."""
    with srv.raw_imap(tls=False) as conn:
        starttls, injected = conn.tag(), conn.tag()
        conn.send(f"{starttls} STARTTLS\r\n".encode() + injected.encode() + b" LOGIN "
                  + imap_quote(ALICE) + b" " + imap_quote(srv.passwords[ALICE]) + b"\r\n")
        responses = conn.read_until_tagged(starttls)
        assert tagged_status(responses) == "OK", responses
        assert conn._buf == b"", f"answers after STARTTLS in clear: {conn._buf!r}"
        try:
            conn.sock = insecure_tls_context().wrap_socket(conn.sock)
        except OSError:
            return   # the server gave up on the connection: nothing ran either
        # Had the LOGIN run, SELECT would work.
        responses = conn.command(conn.tag(), "SELECT INBOX")
        assert not any(r.startswith(injected.encode() + b" ") for r in responses), responses
        assert tagged_status(responses) in ("NO", "BAD"), "the injected LOGIN ran"
        conn.login(ALICE, srv.passwords[ALICE])
        conn.select("INBOX")


# --------------------------------------------------------------------------
# Mailboxes: LIST, CREATE, RENAME, DELETE, SUBSCRIBE
# --------------------------------------------------------------------------

def test_list_shows_the_special_use_mailboxes(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.append("INBOX", make_message("unseen"))

        boxes = listed(conn.expect('LIST "" "*"'))
        assert set(boxes) == DEFAULT_MAILBOXES
        for name, attributes in boxes.items():
            assert attributes & CHILDREN_ATTRIBUTES == {"\\hasnochildren"}, (name, attributes)
            special = {SPECIAL_USE[name]} if name in SPECIAL_USE else set()
            assert attributes & SPECIAL_USE_ATTRIBUTES == special, (name, attributes)

        # RFC 6154 5.1: the SPECIAL-USE selection option lists only those.
        boxes = listed(conn.expect('LIST (SPECIAL-USE) "" "*"'))
        assert {name: attributes & SPECIAL_USE_ATTRIBUTES
                for name, attributes in boxes.items()} == {
            name: {attribute} for name, attribute in SPECIAL_USE.items()}

        # RFC 5258 return options with RFC 5819 STATUS: each STATUS comes
        # right after the LIST of its mailbox.
        responses = conn.untagged(
            conn.expect('LIST "" "*" RETURN (SPECIAL-USE STATUS (MESSAGES UNSEEN))'))
        boxes = listed(responses)
        assert set(boxes) == DEFAULT_MAILBOXES
        for name, attributes in boxes.items():
            special = {SPECIAL_USE[name]} if name in SPECIAL_USE else set()
            assert attributes & SPECIAL_USE_ATTRIBUTES == special, (name, attributes)
        statuses = {}
        for i, response in enumerate(responses):
            if response.upper().startswith(b"* STATUS "):
                name, items = parse_status(response)
                assert i > 0 and parse_list(responses[i - 1])[2] == name, responses
                statuses[name] = items
        expected = {name: {"MESSAGES": 0, "UNSEEN": 0} for name in DEFAULT_MAILBOXES}
        expected["INBOX"] = {"MESSAGES": 1, "UNSEEN": 1}
        assert statuses == expected


def test_create_rename_delete_and_subscribe_a_tree(srv):
    maildir = srv.maildir(ALICE)
    with srv.imaps(user=ALICE) as client:
        for name in ("Projects", "Projects.Alpha", "Projects.Alpha.Q1"):
            imap_ok(client.create(name))
            assert is_maildir(maildir / f".{name}"), name
        append(client, "Projects.Alpha.Q1", make_message("in Q1"))

        boxes = mailboxes(client)
        assert set(boxes) == DEFAULT_MAILBOXES | {"Projects", "Projects.Alpha", "Projects.Alpha.Q1"}
        assert boxes["Projects"] & CHILDREN_ATTRIBUTES == {"\\haschildren"}
        assert boxes["Projects.Alpha"] & CHILDREN_ATTRIBUTES == {"\\haschildren"}
        assert boxes["Projects.Alpha.Q1"] & CHILDREN_ATTRIBUTES == {"\\hasnochildren"}
        assert set(mailboxes(client, "Projects.%")) == {"Projects.Alpha"}

        imap_ok(client.subscribe("Projects.Alpha"))
        subscribed = mailboxes(client, lsub=True)
        assert "Projects.Alpha" in subscribed and "Projects.Alpha.Q1" not in subscribed
        imap_ok(client.unsubscribe("Projects.Alpha"))
        assert "Projects.Alpha" not in mailboxes(client, lsub=True)

        # RENAME takes the inferior names along (RFC 9051 6.3.6).
        imap_ok(client.rename("Projects.Alpha", "Projects.Beta"))
        projects = {n for n in mailboxes(client) if n.startswith("Projects")}
        assert projects == {"Projects", "Projects.Beta", "Projects.Beta.Q1"}
        assert is_maildir(maildir / ".Projects.Beta") and is_maildir(maildir / ".Projects.Beta.Q1")
        assert not (maildir / ".Projects.Alpha").exists()
        assert not (maildir / ".Projects.Alpha.Q1").exists()
        assert status(client, "Projects.Beta.Q1", "MESSAGES") == {"MESSAGES": 1}

        imap_ok(client.delete("Projects.Beta.Q1"))   # with its message
        imap_ok(client.delete("Projects.Beta"))
        boxes = mailboxes(client)
        assert {n for n in boxes if n.startswith("Projects")} == {"Projects"}
        assert boxes["Projects"] & CHILDREN_ATTRIBUTES == {"\\hasnochildren"}
        assert not (maildir / ".Projects.Beta.Q1").exists()
        assert not (maildir / ".Projects.Beta").exists()

        refused(client.delete("INBOX"), "CANNOT")   # RFC 9051 6.3.5
        imap_ok(client.delete("Projects"))
        assert set(mailboxes(client)) == DEFAULT_MAILBOXES


def test_rename_inbox_moves_its_messages(srv):
    sent = deliver(srv, 2)
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.rename("INBOX", "Old"))
        # RFC 9051 6.3.6: the messages move, INBOX stays, empty.
        assert {"INBOX", "Old"} <= set(mailboxes(client))
        assert status(client, "INBOX", "MESSAGES") == {"MESSAGES": 0}
        assert status(client, "Old", "MESSAGES") == {"MESSAGES": 2}
        select(client, "Old")
        assert sorted(message_ids(client).values()) == sorted(map(message_id, sent))
    assert folder_files(srv, "INBOX") == []
    assert len(folder_files(srv, "Old")) == 2

    # Delivery goes on into the (new) INBOX.
    deliver(srv, 1)
    with srv.imaps(user=ALICE) as client:
        assert status(client, "INBOX", "MESSAGES") == {"MESSAGES": 1}


def test_error_response_codes(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("SELECT NoSuchBox", "NO", "NONEXISTENT")
        conn.expect("EXAMINE NoSuchBox", "NO", "NONEXISTENT")
        conn.expect("CREATE Archive", "NO", "ALREADYEXISTS")
        conn.expect("CREATE INBOX", "NO", "ALREADYEXISTS")
        conn.expect("DELETE NoSuchBox", "NO", "NONEXISTENT")
        conn.expect("DELETE INBOX", "NO", "CANNOT")   # RFC 9051 6.3.5
        conn.expect("RENAME NoSuchBox Other", "NO", "NONEXISTENT")
        conn.expect("RENAME Archive Sent", "NO", "ALREADYEXISTS")
        conn.expect("STATUS NoSuchBox (MESSAGES)", "NO", "NONEXISTENT")
        # RFC 9051 6.3.12, 6.4.7, RFC 6851: never created on the fly; TRYCREATE.
        conn.expect(b"APPEND NoSuchBox {7+}\r\nHello\r\n", "NO", "TRYCREATE")
        conn.append("INBOX", make_message("to copy"))
        conn.select("INBOX")
        conn.expect("COPY 1 NoSuchBox", "NO", "TRYCREATE")
        conn.expect("MOVE 1 NoSuchBox", "NO", "TRYCREATE")
        assert raw_uids(conn) and not (srv.maildir(ALICE) / ".NoSuchBox").exists()


# --------------------------------------------------------------------------
# APPEND, flags, COPY, MOVE, EXPUNGE, CLOSE
# --------------------------------------------------------------------------

def test_append_with_flags_and_date(srv):
    message = crlf("From: Alice <alice@example.test>\n"
                   "To: bob@example.test\n"
                   "Subject: a draft\n"
                   "Date: Tue, 05 Mar 2024 10:20:30 +0100\n"
                   "Message-ID: <draft-1@example.test>\n"
                   "\n"
                   "Draft body.\n.\n..two dots\n")
    with srv.imaps(user=ALICE) as client:
        validity, uid = append(client, "Drafts", message, r"\Draft \Seen $Forwarded",
                               "05-Mar-2024 10:20:30 +0100")
        assert select(client, "Drafts") == (1, validity)
        [items] = imap_fetch(client, str(uid), "(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])",
                             uid=True).values()
        assert items["UID"] == uid
        assert imap_flags(items["FLAGS"]) == {"\\draft", "\\seen", "$forwarded"}
        assert internaldate(items["INTERNALDATE"]) == datetime.datetime(
            2024, 3, 5, 9, 20, 30, tzinfo=datetime.timezone.utc)
        assert items["RFC822.SIZE"] == len(message)
        assert items["BODY[]"] == message

        # Without flags and date: no flags, and now as INTERNALDATE.
        plain = make_message("appended without flags")
        _, second = append(client, "Drafts", plain)
        assert second > uid
        [items] = imap_fetch(client, str(second), "(FLAGS INTERNALDATE BODY.PEEK[])",
                             uid=True).values()
        assert imap_flags(items["FLAGS"]) == set()
        now = datetime.datetime.now(datetime.timezone.utc)
        assert abs(internaldate(items["INTERNALDATE"]) - now) < datetime.timedelta(minutes=2)
        assert items["BODY[]"] == plain

        refused(client.append("NoSuchBox", None, None, message), "TRYCREATE")

    # In the Maildir: the flags as info letters, keywords as a-z.
    path = file_with(srv, "Drafts", "Message-ID", "<draft-1@example.test>")
    letters = info_flags(path)
    assert {c for c in letters if c.isupper()} == {"D", "S"}, path.name
    assert len([c for c in letters if c.islower()]) == 1, path.name
    assert len(folder_files(srv, "Drafts")) == 2


def test_flags_and_keywords_persist_across_restart(srv):
    with srv.imaps(user=ALICE) as client:
        for i in range(3):
            append(client, "INBOX", make_message(f"flags {i}"))
        select(client)
        _, permanent = client.response("PERMANENTFLAGS")
        assert permanent[-1] is not None and b"\\*" in permanent[-1], (
            "PERMANENTFLAGS must allow new keywords (\\*)")

        steps = (
            ("1", "+FLAGS", r"(\Seen \Flagged)", {"\\seen", "\\flagged"}),
            ("2", "+FLAGS", "($Junk $Forwarded ProjectX)", {"$junk", "$forwarded", "projectx"}),
            ("2", "-FLAGS", "($Junk)", {"$forwarded", "projectx"}),
            ("2", "+FLAGS", "($NotJunk $MDNSent)",
             {"$forwarded", "projectx", "$notjunk", "$mdnsent"}),
            ("3", "FLAGS", r"(\Answered \Draft)", {"\\answered", "\\draft"}),
        )
        for number, operation, flags, after in steps:
            responses = imaplib_responses(imap_ok(client.store(number, operation, flags)))
            got = {n: imap_flags(items["FLAGS"]) for n, items in map(fetch_items, responses)}
            assert got == {int(number): after}, (number, operation, flags)
        # .SILENT: no FETCH back (RFC 9051 6.4.6).
        assert imap_ok(client.store("3", "+FLAGS.SILENT", r"(\Deleted)")) == [None]

        expected = {1: {"\\seen", "\\flagged"},
                    2: {"$forwarded", "projectx", "$notjunk", "$mdnsent"},
                    3: {"\\answered", "\\draft", "\\deleted"}}
        assert current_flags(client) == expected

    # Maildir info letters in ASCII order; the keywords as four a-z letters.
    assert info_flags(file_with(srv, "INBOX", "Subject", "flags 0")) == "FS"
    assert info_flags(file_with(srv, "INBOX", "Subject", "flags 2")) == "DRT"
    keyworded = info_flags(file_with(srv, "INBOX", "Subject", "flags 1"))
    assert len(keyworded) == 4 and keyworded.islower(), keyworded

    srv.restart()
    with srv.imaps(user=ALICE) as client:
        select(client)
        assert current_flags(client) == expected


def test_copy_reports_copyuid(srv):
    messages = [make_message(f"copy {i}") for i in range(3)]
    with srv.imaps(user=ALICE) as client:
        uids = [append(client, "INBOX", m)[1] for m in messages]
        select(client)
        imap_ok(client.store("1", "+FLAGS", r"(\Flagged)"))

        validity, source, target = copyuid(imap_ok(client.copy("1:2", "Archive"))[-1])
        assert source == uids[:2] and len(target) == 2
        assert status(client, "Archive", "UIDVALIDITY MESSAGES") == {"UIDVALIDITY": validity,
                                                                    "MESSAGES": 2}
        assert status(client, "INBOX", "MESSAGES") == {"MESSAGES": 3}, "COPY moved"

        assert select(client, "Archive") == (2, validity)
        copies = {items["UID"]: items for items in
                  imap_fetch(client, "1:*", "(UID FLAGS BODY.PEEK[])", uid=True).values()}
        assert sorted(copies) == sorted(target)
        for i, uid in enumerate(target):
            assert copies[uid]["BODY[]"] == messages[i]
        # The flags come along (RFC 9051 6.4.7 SHOULD; Dovecot does).
        assert imap_flags(copies[target[0]]["FLAGS"]) == {"\\flagged"}
        assert imap_flags(copies[target[1]]["FLAGS"]) == set()


def test_move_reports_copyuid_then_expunges(srv):
    messages = [make_message(f"move {i}") for i in range(3)]
    with srv.raw_imap(user=ALICE) as conn:
        uids = [conn.append("INBOX", m)[1] for m in messages]
        conn.select("INBOX")

        # RFC 6851 4.3: `* OK [COPYUID ...]`, then the EXPUNGEs, then OK.
        moved = {}
        for command, number, uid in ((f"UID MOVE {uids[1]} Trash", 2, uids[1]),
                                     ("MOVE 1 Trash", 1, uids[0])):
            responses = changes(conn.expect(command))
            assert len(responses) == 2, responses
            assert responses[0].upper().startswith(b"* OK [COPYUID "), responses
            validity, source, target = copyuid(responses[0])
            assert source == [uid] and len(target) == 1
            assert responses[1] == f"* {number} EXPUNGE".encode(), responses
            moved[target[0]] = messages[uids.index(uid)]
        assert raw_uids(conn) == [uids[2]]

        responses = conn.select("Trash")
        assert f"[UIDVALIDITY {validity}]".encode() in b"\n".join(responses).upper()
        fetched = [fetch_items(r)[1]
                   for r in fetches(conn.expect("UID FETCH 1:* (UID BODY.PEEK[])"))]
        assert {items["UID"]: items["BODY[]"] for items in fetched} == moved
    assert len(folder_files(srv, "INBOX")) == 1 and len(folder_files(srv, "Trash")) == 2


def test_expunge_and_uid_expunge(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("CREATE Exp")
        uids = [conn.append("Exp", make_message(f"expunge {i}"))[1] for i in range(4)]
        conn.select("Exp")
        assert changes(conn.expect(r"STORE 1,3 +FLAGS.SILENT (\Deleted)")) == []

        # UID EXPUNGE removes only the named \Deleted messages (RFC 4315 2.1).
        assert changes(conn.expect(f"UID EXPUNGE {uids[2]}")) == [b"* 3 EXPUNGE"]
        assert raw_uids(conn) == [uids[0], uids[1], uids[3]]
        assert changes(conn.expect(f"UID EXPUNGE {uids[1]}")) == [], "not \\Deleted"

        assert changes(conn.expect("EXPUNGE")) == [b"* 1 EXPUNGE"]
        assert raw_uids(conn) == [uids[1], uids[3]]
    assert len(folder_files(srv, "Exp")) == 2


def test_close_expunges_but_unselect_and_examine_do_not(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("CREATE Closing")
        for i, flags in enumerate(("\\Deleted", "", "\\Deleted")):
            conn.append("Closing", make_message(f"close {i}"), flags)

        def count() -> int:
            responses = conn.untagged(conn.expect("STATUS Closing (MESSAGES)"))
            return parse_status(responses[-1])[1]["MESSAGES"]

        # EXAMINE is read-only: CLOSE expunges nothing (RFC 9051 6.4.1).
        conn.select("Closing", readonly=True)
        assert changes(conn.expect("CLOSE")) == []
        assert count() == 3

        # UNSELECT never expunges (RFC 3691).
        conn.select("Closing")
        assert changes(conn.expect("UNSELECT")) == []
        assert count() == 3

        # CLOSE after SELECT expunges, silently.
        conn.select("Closing")
        assert changes(conn.expect("CLOSE")) == []
        assert count() == 1

        # Back in the authenticated state.
        assert tagged_status(conn.command(conn.tag(), "FETCH 1 (UID)")) in ("NO", "BAD")
    assert len(folder_files(srv, "Closing")) == 1


# --------------------------------------------------------------------------
# STATUS, SEARCH, ESEARCH
# --------------------------------------------------------------------------

def test_status_reports_every_item(srv):
    messages = [make_message(f"status {i}", body="x" * (100 * i) + "\n") for i in range(3)]
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Stats"))
        appended = [append(client, "Stats", m, f)
                    for m, f in zip(messages, (r"\Seen", r"\Deleted", ""))]
        validity = appended[0][0]
        items = status(client, "Stats", "MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE RECENT")
        # Which messages are \Recent is the server's business (gone in rev2).
        assert 0 <= items.pop("RECENT") <= 3
        assert items.pop("UIDNEXT") > max(uid for _, uid in appended)
        assert items == {"MESSAGES": 3, "UIDVALIDITY": validity, "UNSEEN": 2, "DELETED": 1,
                         "SIZE": sum(map(len, messages))}
        assert status(client, "Junk", "MESSAGES UNSEEN DELETED SIZE") == {
            "MESSAGES": 0, "UNSEEN": 0, "DELETED": 0, "SIZE": 0}
        refused(client.status("NoSuchBox", "(MESSAGES)"))


# (message, flags, internal date): four messages for the SEARCH keys.
SEARCH_MESSAGES = (
    (crlf("From: Alice Example <alice@example.test>\nTo: bob@example.test\n"
          "Subject: Quarterly report\nDate: Mon, 01 Jan 2024 10:00:00 +0000\n"
          "Message-ID: <s1@example.test>\nX-Priority: 1\n\nThe numbers are attached.\n"),
     r"\Seen", "01-Jan-2024 10:00:00 +0000"),
    (crlf("From: bob@example.test\nTo: alice@example.test\n"
          "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from Berlin\n"
          "Date: Thu, 15 Feb 2024 10:00:00 +0000\nMessage-ID: <s2@example.test>\n"
          "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
          "See you soon.\n" + "padding line\n" * 200),
     r"\Flagged $Project", "15-Feb-2024 10:00:00 +0000"),
    (crlf("From: carol@example.test\nTo: alice@example.test\nSubject: Lunch\n"
          "Date: Wed, 20 Mar 2024 10:00:00 +0000\nMessage-ID: <s3@example.test>\n\nPizza?\n"),
     r"\Answered \Deleted", "20-Mar-2024 10:00:00 +0000"),
    (crlf("From: alice@example.test\nTo: carol@example.test\nCc: bob@example.test\n"
          "Subject: Re: Quarterly report\nDate: Wed, 10 Apr 2024 10:00:00 +0000\n"
          "Message-ID: <s4@example.test>\n\nAfter the pizza.\n"),
     "", "10-Apr-2024 10:00:00 +0000"),
)

SEARCHES = (
    ("ALL", [1, 2, 3, 4]),
    ("SEEN", [1]),
    ("UNSEEN", [2, 3, 4]),
    ("FLAGGED", [2]),
    ("ANSWERED", [3]),
    ("DELETED", [3]),
    ("UNDELETED", [1, 2, 4]),
    ("KEYWORD $Project", [2]),
    ("UNKEYWORD $Project", [1, 3, 4]),
    ("FROM alice", [1, 4]),
    ('FROM "Alice Example"', [1]),
    ("TO carol", [4]),
    ("CC bob", [4]),
    ("SUBJECT quarterly", [1, 4]),
    ("SUBJECT Berlin", [2]),
    ("BODY pizza", [3, 4]),
    ("BODY quarterly", []),
    ("TEXT quarterly", [1, 4]),
    ("HEADER X-Priority 1", [1]),
    ('HEADER Message-ID "<s3@"', [3]),
    ("BEFORE 1-Mar-2024", [1, 2]),
    ("SINCE 20-Mar-2024", [3, 4]),
    ("ON 15-Feb-2024", [2]),
    ("SENTBEFORE 1-Mar-2024", [1, 2]),
    ("SENTON 20-Mar-2024", [3]),
    ("SENTSINCE 10-Apr-2024", [4]),
    ("LARGER 2000", [2]),
    ("SMALLER 2000", [1, 3, 4]),
    ("NOT FROM alice", [2, 3]),
    ("OR SEEN FLAGGED", [1, 2]),
    ("FROM alice UNSEEN", [4]),
    ("2:3", [2, 3]),
    ("2:* NOT DELETED", [2, 4]),
)


def search_numbers(data: list) -> list[int]:
    return [int(n) for n in (data[0] or b"").split()]


def test_search_keys(srv):
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Search"))
        uids = [append(client, "Search", m, f, d)[1] for m, f, d in SEARCH_MESSAGES]
        select(client, "Search")
        for criteria, expected in SEARCHES:
            assert search_numbers(imap_ok(client.search(None, criteria))) == expected, criteria

        # CHARSET UTF-8 with a literal; the encoded word in the Subject is
        # decoded before matching (RFC 9051 6.4.4).
        client.literal = "rüße".encode()
        assert search_numbers(imap_ok(client.search("UTF-8", "SUBJECT"))) == [2]

        assert search_numbers(imap_ok(client.uid("SEARCH", "ALL"))) == uids
        between = imap_ok(client.uid("SEARCH", f"UID {uids[1]}:{uids[2]}"))
        assert search_numbers(between) == uids[1:3]
        assert search_numbers(imap_ok(client.uid("SEARCH", "FROM alice"))) == [uids[0], uids[3]]


def test_header_searches_answer_the_same_from_the_folder_cache(srv):
    """The values of a searched header field are kept for each message
    (Message-ID's also with each ENVELOPE) and written to the folder's
    cache file: searches after FETCH ENVELOPE, after a first search and
    after a restart answer as the message files do, for a field a message
    has twice or not at all too."""
    twice = crlf("Message-ID: <first@example.test>\nMessage-ID: <second@example.test>\n"
                 "X-Label: =?utf-8?q?Gr=C3=BCn?=\nSubject: two ids\n\nbody\n")
    none = crlf("Subject: no id\nX-Label:\n\nbody\n")
    searches = (
        ('HEADER Message-ID "<second@"', [1]),
        ('HEADER Message-ID "<FIRST@EXAMPLE"', [1]),
        ('HEADER Message-ID ""', [1]),
        ('HEADER X-Label ""', [1, 2]),
        ('HEADER X-Missing ""', []),
        ('NOT HEADER Message-ID "<"', [2]),
    )

    def run(client) -> None:
        for criteria, expected in searches:
            assert search_numbers(imap_ok(client.search(None, criteria))) == expected, criteria
        client.literal = "GRÜN".encode()
        assert search_numbers(imap_ok(client.search("UTF-8", "HEADER X-Label"))) == [1]

    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Cached"))
        for message in (twice, none):
            append(client, "Cached", message, "", "15-Feb-2024 10:00:00 +0000")
        select(client, "Cached")
        imap_ok(client.fetch("1:*", "(ENVELOPE)"))
        run(client)
        run(client)
    # The answers above came from kept values, not only from the files.
    kept = (srv.maildir(ALICE) / ".Cached" / "mailsrv-envelopes").read_bytes()
    for field in (b"message-id", b"x-label", b"x-missing"):
        assert kept.count(b" h:" + field + b" ") == 2, field
    srv.restart()
    with srv.imaps(user=ALICE) as client:
        select(client, "Cached")
        run(client)


def test_esearch_with_return_options_and_imap4rev2(srv):
    with srv.raw_imap(user=ALICE) as conn:
        uids = [conn.append("INBOX", make_message(f"esearch {i}"), flags)[1]
                for i, flags in enumerate(("\\Seen", "", "\\Seen"))]
        conn.select("INBOX")

        def esearch(command: str) -> tuple[bool, dict]:
            tag = conn.tag()
            responses = conn.command(tag, command)
            assert tagged_status(responses) == "OK", responses
            untagged = changes(responses)
            assert len(untagged) == 1, untagged
            got_tag, uid, data = parse_esearch(untagged[0])
            assert got_tag == tag, untagged
            return uid, data

        # IMAP4rev1: SEARCH answers `* SEARCH`, RETURN asks for ESEARCH (RFC 4731).
        assert changes(conn.expect("SEARCH ALL")) == [b"* SEARCH 1 2 3"]
        assert esearch("SEARCH RETURN (MIN MAX COUNT ALL) ALL") == (
            False, {"MIN": 1, "MAX": 3, "COUNT": 3, "ALL": [1, 2, 3]})

        # IMAP4rev2 (RFC 9051 6.4.4, 7.3.4): every SEARCH answers ESEARCH.
        enabled = conn.untagged(conn.expect("ENABLE IMAP4rev2"))
        assert [r.upper() for r in enabled] == [b"* ENABLED IMAP4REV2"]
        assert esearch("UID SEARCH RETURN (MIN MAX COUNT ALL) SEEN") == (
            True, {"MIN": uids[0], "MAX": uids[2], "COUNT": 2, "ALL": [uids[0], uids[2]]})
        assert esearch("SEARCH UNSEEN") == (False, {"ALL": [2]})
        # No match: COUNT 0 only, no MIN/MAX/ALL (RFC 4731 3.1).
        assert esearch("SEARCH RETURN (MIN COUNT) DELETED") == (False, {"COUNT": 0})
        assert esearch("UID SEARCH DELETED") == (True, {})


# --------------------------------------------------------------------------
# IDLE and concurrent sessions
# --------------------------------------------------------------------------

def test_idle_reports_a_delivery(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.select("INBOX")
        tag = conn.idle()
        [sent] = deliver(srv, 1)
        deadline = time.monotonic() + IDLE_NOTICE
        seen = []
        while b"* 1 EXISTS" not in seen:
            try:
                seen.append(conn.read_response(deadline))
            except TimeoutError:
                pytest.fail(f"no `* 1 EXISTS` in IDLE within {IDLE_NOTICE}s of the delivery; "
                            f"got {seen}")
        conn.done(tag)
        [response] = fetches(conn.expect("FETCH 1 (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"))
        assert header(fetch_items(response)[1]["BODY[HEADER.FIELDS (MESSAGE-ID)]"],
                      "Message-ID") == message_id(sent)


def test_two_sessions_see_each_others_changes(srv):
    with srv.raw_imap(user=ALICE) as first, srv.raw_imap(user=ALICE) as second:
        for i in range(2):
            second.append("INBOX", make_message(f"shared {i}"))
        first.select("INBOX")
        second.select("INBOX")

        second.append("INBOX", make_message("third"))
        first.noop_until(lambda seen: b"* 3 EXISTS" in seen, SESSION_NOTICE,
                         "the first session to see the appended message")

        def flags_of(seen: list[bytes], number: int) -> set[str] | None:
            updates = [items for n, items in map(fetch_items, fetches(seen))
                       if n == number and "FLAGS" in items]
            return imap_flags(updates[-1]["FLAGS"]) if updates else None

        second.expect(r"STORE 1 +FLAGS (\Flagged)")
        seen = first.noop_until(lambda seen: flags_of(seen, 1) is not None, SESSION_NOTICE,
                                "the first session to see the new flag")
        assert flags_of(seen, 1) == {"\\flagged"}

        second.expect(r"STORE 2 +FLAGS.SILENT (\Deleted)")
        assert changes(second.expect("EXPUNGE")) == [b"* 2 EXPUNGE"]
        first.noop_until(lambda seen: b"* 2 EXPUNGE" in seen, SESSION_NOTICE,
                         "the first session to see the expunge")
        assert raw_uids(first) == raw_uids(second)


# --------------------------------------------------------------------------
# UIDs: restarts, concurrent delivery, Dovecot's dovecot-uidlist
# --------------------------------------------------------------------------

def test_uids_are_stable_across_restarts_and_deliveries(srv):
    deliver(srv, 3)
    with srv.imaps(user=ALICE) as client:
        _, validity = select(client)
        first = message_ids(client)
        assert len(first) == 3
        imap_ok(client.store("1", "+FLAGS", r"(\Seen)"))   # new/ -> cur/, same UID
        assert message_ids(client) == first
        uidnext = status(client, "INBOX", "UIDNEXT")["UIDNEXT"]
        assert uidnext > max(first)

    srv.restart()
    with srv.imaps(user=ALICE) as client:
        assert select(client)[1] == validity
        assert message_ids(client) == first

        # Deliveries while the session watches: old UIDs never move, new
        # ones come after them.
        sent = [srv.send(ALICE, make_message(f"while watching {i}", to=ALICE)) for i in range(5)]

        def all_arrived() -> dict[int, str] | None:
            imap_ok(client.noop())
            now = message_ids(client)
            assert {u: m for u, m in now.items() if u in first} == first
            assert all(u >= uidnext for u in now if u not in first), now
            return now if len(now) == 8 else None
        final = wait_until(all_arrived, 20, "the five deliveries in the session")
        assert set(final.values()) == set(first.values()) | set(map(message_id, sent))

    with srv.imaps(user=ALICE) as client:
        assert select(client)[1] == validity
        assert message_ids(client) == final


def put_file(path: Path, content: bytes) -> Path:
    """Write a message file the Maildir way: tmp/, then rename."""
    tmp = path.parent.parent / "tmp" / path.name.split(":", 1)[0]
    tmp.write_bytes(content)
    os.rename(tmp, path)
    return path


def migrated(n: int) -> bytes:
    """A small LF message as another server stored it."""
    return (f"From: old@example.test\nSubject: migrated {n}\n"
            f"Message-ID: <migrated-{n}@example.test>\n\nmessage {n}\n").encode()


def test_dovecot_uidlist_is_taken_over(make_mailsrv):
    """A Maildir that Dovecot served, copied in before the first start,
    keeps its UIDs, UIDVALIDITY and keywords (ARCHITECTURE.md:
    dovecot-keywords is read when ours is missing), so clients need not
    download everything again."""
    srv = make_mailsrv(users=[ALICE], start=False, wait_for_imap=True)
    inbox = srv.maildir(ALICE)
    archive = inbox / ".Archive"
    for folder in (inbox, archive):   # only Dovecot's state, as if copied over
        (folder / "mailsrv-uidlist").unlink(missing_ok=True)
        (folder / "mailsrv-keywords").unlink(missing_ok=True)
    put_file(inbox / "cur" / "1000000001.dove1.example:2,S", migrated(1))
    put_file(inbox / "cur" / "1000000002.dove2.example:2,a", migrated(2))
    put_file(inbox / "new" / "1000000003.dove3.example", migrated(3))
    put_file(inbox / "new" / "1000000004.other.example", migrated(4))   # not in the list
    # Format 3: header, then `<uid> [<ext> ...] :<base name>`; the names may
    # carry out-of-date flags.
    (inbox / "dovecot-uidlist").write_text(
        f"3 V1234567 N50 G{uuid.uuid4().hex}\n"
        "7 :1000000001.dove1.example:2,\n"
        f"9 W{len(crlf(migrated(2)))} :1000000002.dove2.example\n"
        "12 :1000000003.dove3.example\n")
    (inbox / "dovecot-keywords").write_text("0 $Forwarded\n1 Work\n")
    put_file(archive / "cur" / "1000000005.dove5.example:2,S", migrated(5))
    (archive / "dovecot-uidlist").write_text(
        f"3 V7654321 N4 G{uuid.uuid4().hex}\n3 :1000000005.dove5.example\n")
    srv.start()

    with srv.imaps(user=ALICE) as client:
        assert select(client) == (4, 1234567)
        ids = message_ids(client)
        assert {uid: ids[uid] for uid in (7, 9, 12)} == {
            7: "<migrated-1@example.test>", 9: "<migrated-2@example.test>",
            12: "<migrated-3@example.test>"}
        [newcomer] = set(ids) - {7, 9, 12}
        assert ids[newcomer] == "<migrated-4@example.test>"
        assert newcomer >= 50, "a new file must get a UID from Dovecot's N (next UID) on"
        flags = {items["UID"]: imap_flags(items["FLAGS"])
                 for items in imap_fetch(client, "1:*", "(UID FLAGS)", uid=True).values()}
        assert flags == {7: {"\\seen"}, 9: {"$forwarded"}, 12: set(), newcomer: set()}

        assert status(client, "Archive", "UIDVALIDITY UIDNEXT MESSAGES") == {
            "UIDVALIDITY": 7654321, "UIDNEXT": 4, "MESSAGES": 1}

        # New mail continues after Dovecot's UIDs, in the same UIDVALIDITY.
        srv.send(ALICE, make_message("after the migration", to=ALICE))

        def arrived() -> dict[int, str] | None:
            imap_ok(client.noop())
            now = message_ids(client)
            return now if len(now) == 5 else None
        now = wait_until(arrived, 20, "the delivery after the migration")
        [delivered] = set(now) - set(ids)
        assert delivered > newcomer
        assert select(client, "Archive") == (1, 7654321)
        assert message_ids(client) == {3: "<migrated-5@example.test>"}


# --------------------------------------------------------------------------
# Mailbox names
# --------------------------------------------------------------------------

# Names that must be refused with NO [CANNOT]: `..`, a leading `/` or `~`,
# `/` anywhere, empty levels, control characters. {m} is a unique marker
# looked for on disk afterwards.
ESCAPING_NAMES = (
    "..", "../{m}", "../../{m}", "a/../../../{m}", "/{m}", "/tmp/{m}", "~/{m}", "~{m}",
    "{m}/sub", "..{m}", ".{m}", "{m}..sub", "{m}\x01", "{m}\tx", "{m}\x7f", "{m}\nx",
)


def test_names_that_would_leave_the_maildir_are_refused(srv):
    marker = f"escape-{uuid.uuid4().hex[:12]}"
    names = [n.format(m=marker) for n in ESCAPING_NAMES]
    top = srv.root.parent

    def directories() -> set[Path]:
        return {p for p in top.rglob("*") if p.is_dir()}
    before = directories()

    with srv.raw_imap(user=ALICE) as conn:
        for name in names:
            for command in (b"CREATE ", b"SELECT ", b"EXAMINE ", b"RENAME Archive "):
                conn.expect(command + literal(name), "NO", "CANNOT")
        assert set(listed(conn.expect('LIST "" "*"'))) == DEFAULT_MAILBOXES

    assert directories() == before
    leaked = list(top.rglob(f"*{marker}*"))
    for place in (*srv.maildir(ALICE).parents, Path.home(), Path("/tmp")):
        leaked += [p for p in (place / marker, place / f".{marker}") if os.path.lexists(p)]
    assert leaked == []


def test_mailbox_names_in_modified_utf7_and_utf8(srv):
    maildir = srv.maildir(ALICE)
    with srv.raw_imap(user=ALICE) as rev1:
        rev1.expect("CREATE Entw&APw-rfe")
        assert is_maildir(maildir / ".Entw&APw-rfe")
        assert set(listed(rev1.expect('LIST "" "Entw*"'))) == {"Entw&APw-rfe"}
        # 8-bit names are not IMAP4rev1 (RFC 3501 5.1.3).
        status = tagged_status(rev1.command(rev1.tag(), 'CREATE "Grüße"'.encode()))
        assert status in ("NO", "BAD")
        assert not [p for p in maildir.iterdir() if p.name.startswith(".Gr")]

    with srv.raw_imap(user=ALICE) as rev2:
        enabled = rev2.untagged(rev2.expect("ENABLE IMAP4rev2"))
        assert [r.upper() for r in enabled] == [b"* ENABLED IMAP4REV2"]
        assert set(listed(rev2.expect('LIST "" "Entw*"'))) == {"Entwürfe"}
        rev2.select("Entwürfe")
        rev2.expect(b"CREATE " + imap_quote("Grüße"))
        assert is_maildir(maildir / ".Gr&APwA3w-e")

    with srv.raw_imap(user=ALICE) as utf8:
        enabled = utf8.untagged(utf8.expect("ENABLE UTF8=ACCEPT"))
        assert [r.upper() for r in enabled] == [b"* ENABLED UTF8=ACCEPT"]
        assert set(listed(utf8.expect('LIST "" "*"'))) == DEFAULT_MAILBOXES | {"Entwürfe",
                                                                             "Grüße"}
        utf8.expect(b"STATUS " + imap_quote("Grüße") + b" (MESSAGES)")

    with srv.raw_imap(user=ALICE) as rev1:
        assert set(listed(rev1.expect('LIST "" "*"'))) == DEFAULT_MAILBOXES | {
            "Entw&APw-rfe", "Gr&APwA3w-e"}
        rev1.select("Gr&APwA3w-e")


# --------------------------------------------------------------------------
# ID, NAMESPACE
# --------------------------------------------------------------------------

def server_id(responses: list[bytes]) -> dict[str, str | None]:
    """The `* ID (...)` answer (RFC 2971) as {field (lower case): value}."""
    [answer] = [r for r in RawIMAP.untagged(responses) if r.upper().startswith(b"* ID ")]
    fields = parse_imap(answer)[2]
    assert isinstance(fields, list) and len(fields) % 2 == 0, answer
    return {imap_text(key).lower(): None if value is None else imap_text(value)
            for key, value in zip(fields[::2], fields[1::2])}


def test_id(srv):
    with srv.raw_imap() as conn:   # ID works before login (RFC 2971 3.1)
        before = server_id(conn.expect('ID ("name" "pytest" "version" "1.0")'))
        conn.login(ALICE, srv.passwords[ALICE])
        after = server_id(conn.expect("ID NIL"))
    assert before == after
    assert before["name"] == "mailsrv"


def test_namespace(srv):
    with srv.imaps(user=ALICE) as client:
        assert imap_ok(client.namespace()) == [b'(("" ".")) NIL NIL']


# --------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------

def refuses_as_too_long(response: bytes, tag: str) -> bool:
    """Whether `response` refuses an overlong command: a BAD (tagged, or
    untagged when the tag was not read) or a tagged NO [TOOBIG]."""
    return (response.startswith((f"{tag} BAD".encode(), b"* BAD"))
            or (response.startswith(f"{tag} NO".encode())
                and resp_code(response) is not None and resp_code(response)[0] == "TOOBIG"))


def test_overlong_line_is_refused_and_the_session_goes_on(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.select("INBOX")
        tag = conn.tag()
        conn.send(f'{tag} SEARCH SUBJECT "'.encode() + b"x" * 100_000 + b'"\r\n')
        # A closed connection raises ConnectionError here: the session must stay.
        first = conn.read_response()
        assert refuses_as_too_long(first, tag), first
        responses = conn.expect("NOOP")
        assert all(refuses_as_too_long(r, tag) for r in responses[:-1]), responses
        conn.select("INBOX")


def test_huge_literal_is_refused_before_it_is_sent(srv):
    with srv.raw_imap(user=ALICE) as conn:
        tag = conn.tag()
        conn.send(f"{tag} APPEND INBOX {{999999999}}\r\n")
        response = conn.read_response()
        assert not response.startswith(b"+"), "the server invites a 1 GB literal"
        assert refuses_as_too_long(response, tag), response
        conn.expect("NOOP")
        responses = conn.untagged(conn.expect("STATUS INBOX (MESSAGES)"))
        assert parse_status(responses[-1])[1] == {"MESSAGES": 0}


# (line, what must answer it): "ok" the line's own OK, "tagged" a BAD with
# the line's tag, "untagged"
# a `* BAD` (no usable tag), "any" (nothing, or BAD). Untagged `* OK`s may
# come along (Dovecot sends `* OK [CLOSED]` when a bad SELECT closed the
# mailbox).
SYNTAX_ERRORS = (
    (b"x1 FOO", "tagged"),
    (b"x2 FETCH", "tagged"),
    (b"x3 FETCH 1 (", "tagged"),
    (b"x4 FETCH x (FLAGS)", "tagged"),
    (b"x5 UID FOO 1", "tagged"),
    (b"x6 SEARCH (((", "tagged"),
    (b"x7 STORE 1 +FLAGS (\\Seen", "tagged"),
    (b"x8 SELECT", "tagged"),
    (b'"x9 NOOP', "untagged"),
    (b"~} NOOP", "ok"),   # a valid tag (RFC 9051 9), once a parser crash
    (b"x10 LIST \"\" " + b"*%" * 600, "tagged"),
    (b"*", "untagged"),
    (b"", "any"),
)


def test_syntax_errors_get_bad_and_the_session_goes_on(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.append("INBOX", make_message("one"))
        conn.select("INBOX")
        for line, answer in SYNTAX_ERRORS:
            noop = conn.tag()
            conn.send(line + b"\r\n" + noop.encode() + b" NOOP\r\n")
            responses = conn.read_until_tagged(noop)
            assert tagged_status(responses) == "OK", (line, responses)
            answers = responses[:-1]
            if answer == "ok":
                assert answers[-1:] == [line.split(b" ", 1)[0] + b" OK NOOP completed"], answers
                continue
            bad_tag = line.split(b" ", 1)[0] + b" BAD"
            assert all(r.startswith((bad_tag, b"* BAD", b"* OK")) for r in answers), (line, answers)
            if answer == "tagged":
                assert any(r.startswith(bad_tag) for r in answers), (line, answers)
            elif answer == "untagged":
                assert any(r.startswith(b"* BAD") for r in answers), (line, answers)
        conn.select("INBOX")
        assert raw_uids(conn)


def test_body_fetched_then_pipelined_store_arrives_whole(srv):
    """A body streamed from its file must be sent before a pipelined
    command renames that file (as mbsync pipelines FETCH and STORE)."""
    body = b"".join(b"line %d of a body that must arrive whole\r\n" % i for i in range(2000))
    message = make_message("pipelined") .replace(b"\r\n\r\n", b"\r\n\r\n" + body, 1)
    with srv.raw_imap(user=ALICE) as conn:
        _, uid = conn.append("INBOX", message)
        conn.select("INBOX")
        fetch, store = conn.tag(), conn.tag()
        conn.send(f"{fetch} UID FETCH {uid} BODY.PEEK[]\r\n"
                  f"{store} UID STORE {uid} +FLAGS.SILENT (\\Seen)\r\n")
        responses = conn.read_until_tagged(fetch)
        conn.read_until_tagged(store)
        fetched = [r for r in responses if b"BODY[]" in r]
        assert len(fetched) == 1, responses
        assert fetched[0].split(b"}\r\n", 1)[1].startswith(message), "body damaged"


def test_nul_in_a_message_never_goes_out_as_literal8_but_in_binary(srv):
    message = make_message("nul").replace(b"Subject: nul", b"Subject: a\0b", 1)
    with srv.raw_imap(user=ALICE) as conn:
        conn.append("INBOX", message)
        conn.select("INBOX")
        responses = conn.expect("FETCH 1 (ENVELOPE BODY.PEEK[HEADER] BINARY.PEEK[])")
        fetch = responses[0]
        assert b"~{" not in fetch.split(b"BINARY[]")[0], fetch
        assert b"a\x80b" in fetch, fetch
        assert b"BINARY[] ~{" in fetch, fetch


def test_searchres_saves_a_result_for_dollar(srv):
    """RFC 5182, part of IMAP4rev2: SEARCH RETURN (SAVE) and `$`."""
    with srv.raw_imap(user=ALICE) as conn:
        for subject in ("one", "two", "three", "four"):
            conn.append("INBOX", make_message(subject))
        conn.select("INBOX")
        conn.expect("STORE 2,4 +FLAGS.SILENT (\\Flagged)")
        # SAVE alone answers no ESEARCH.
        assert conn.expect("SEARCH RETURN (SAVE) FLAGGED")[:-1] == []
        fetched = conn.expect("FETCH $ (UID)")[:-1]
        assert [fetch_items(r)[0] for r in fetched] == [2, 4], fetched
        # In a UID command `$` names the same messages by UID.
        conn.expect("UID STORE $ +FLAGS.SILENT (\\Seen)")
        seen = conn.expect("SEARCH SEEN")[0]
        assert seen.split()[2:] == [b"2", b"4"], seen
        # `$` inside SEARCH, combined with other keys.
        assert conn.expect("SEARCH $ SUBJECT four")[0].split()[2:] == [b"4"]
        # An empty saved result: `$` names no message, and that is no error.
        assert conn.expect("SEARCH RETURN (SAVE) SUBJECT nothing-like-this")[:-1] == []
        assert conn.expect("FETCH $ (UID)")[:-1] == []
        # Selecting again forgets the result.
        conn.expect("SEARCH RETURN (SAVE) ALL")
        conn.select("INBOX")
        assert conn.expect("UID FETCH $ (UID)")[:-1] == []


def test_a_new_user_is_subscribed_to_inbox_and_the_special_folders(srv):
    """Thunderbird shows only subscribed folders by default: Sent, Drafts,
    Junk, Trash and Archive must be there from the first login, and an
    unsubscription must stick."""
    special = {"INBOX", "Sent", "Drafts", "Junk", "Trash", "Archive"}
    with srv.raw_imap(user=ALICE) as conn:
        listed = {parse_list(r)[2] for r in conn.expect('LSUB "" "*"')[:-1]}
        assert listed == special, listed
        conn.expect("UNSUBSCRIBE Junk")
    with srv.raw_imap(user=ALICE) as conn:
        responses = conn.expect('LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN SPECIAL-USE)')[:-1]
        assert {parse_list(r)[2] for r in responses} == special - {"Junk"}, responses
