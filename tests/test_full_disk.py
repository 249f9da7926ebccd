"""A full disk (issue 8, promise 4: "a full disk answers 452 4.3.1 and
loses nothing already accepted"), with the spool and the mail store each
on a small tmpfs of its own, mounted in the server's mount namespace (see
Mailsrv in conftest.py; the tests see them through /proc/<pid>/root).

- The mail store full: qmgr defers (the message stays queued, nothing half
  written in the Maildir: no partial file in new/ or cur/, tmp/ cleaned);
  IMAP APPEND answers NO [OVERQUOTA] or NO [SERVERBUG] (RFC 9051 7.1) and
  the folder stays as it was (SELECT works, same messages, same UIDs).
- The spool full as well: smtpd answers 452 4.3.1 and leaves no partial
  file; qmgr's retries meanwhile (envelopes that cannot be rewritten)
  lose and corrupt nothing.
- When space comes back (a filler file is deleted), everything accepted
  before is delivered exactly once.

Mounting needs root (CI runs as root: a mount namespace) or, for others,
an unprivileged user+mount namespace; without either the tests are
skipped, saying why.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from mailtest import (
    RawIMAP, as_stored, dot_stuff, header, make_message, resp_code,
    strip_added_headers, userns_tmpfs_available, wait_until,
)

ALICE = "alice@example.test"
SENDER = "sender@remote.test"
SPOOL_SIZE = "1m"
MAIL_SIZE = "2m"
QUEUE_STATES = ("incoming", "active", "deferred", "hold", "corrupt")
# RFC 9051 7.1 codes that say an APPEND failed for want of space.
NO_SPACE_CODES = ("OVERQUOTA", "SERVERBUG")


@pytest.fixture(autouse=True)
def can_mount():
    """As root (CI) the tmpfs mounts must work, so the tests run (and fail
    if they do not); otherwise they need an unprivileged user namespace."""
    if os.geteuid() != 0:
        available, reason = userns_tmpfs_available()
        if not available:
            pytest.skip(f"not root, and no unprivileged user+mount namespace: {reason}")


def assert_tmpfs(srv, directory: Path) -> None:
    mountinfo = Path(f"/proc/{srv.proc.pid}/mountinfo").read_text()
    assert any(line.split()[4] == str(directory) and " - tmpfs " in line
               for line in mountinfo.splitlines()), \
        f"no tmpfs on {directory} in the server's namespace:\n{mountinfo}"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` with a file `filler` there until
    writes fail with ENOSPC; returns the file."""
    path = directory / f"filler-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[:len(chunk) // 2]
    finally:
        os.close(fd)
    assert free_bytes(directory) < 4096, f"{directory}: {free_bytes(directory)} bytes still free"
    return path


def message_ids(maildir: Path) -> Counter:
    """Message-ID of every file in new/ and cur/ of `maildir`, counted."""
    found: Counter = Counter()
    for sub in ("new", "cur"):
        for path in sorted((maildir / sub).iterdir()):
            try:
                found[header(path.read_bytes(), "Message-ID")] += 1
            except FileNotFoundError:   # moved new/ -> cur/ meanwhile
                return message_ids(maildir)
    return found


def maildir_files(maildir: Path) -> dict[str, dict[str, int]]:
    """{new|cur|tmp: {file name: size}}."""
    return {sub: {p.name: p.stat().st_size for p in (maildir / sub).iterdir()}
            for sub in ("new", "cur", "tmp")}


def queued(srv) -> dict[str, dict]:
    """Every queued envelope, read from the spool as qmgr sees it: {id:
    envelope, with "state" added}."""
    view = srv.spool_view()
    entries = {}
    for state in QUEUE_STATES:
        directory = view / state
        for name in os.listdir(directory) if directory.is_dir() else ():
            try:
                envelope = json.loads((directory / name).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue   # being replaced: read it next time
            envelope["state"] = state
            entries[envelope.get("id", name)] = envelope
    return entries


def wait_for_attempts(srv, ids: list[str], attempts: int, timeout: float = 30) -> dict:
    """Wait until every entry in `ids` is queued (not delivered) and has
    had `attempts` delivery attempts for alice; returns the entries."""
    def enough() -> dict | None:
        entries = queued(srv)
        for queue_id in ids:
            entry = entries.get(queue_id)
            if entry is None:
                # Either delivered (the timeout below reports it) or moving
                # between two state directories while they were listed.
                return None
            rcpt = entry["recipients"][0]
            if rcpt.get("attempts", 0) < attempts or not rcpt.get("last_error"):
                return None
        return entries
    try:
        return wait_until(enough, timeout, f"{attempts} attempts of {ids}", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}: {queued(srv)}\n{srv.log_tail()}") from None


def submit(srv, message: bytes) -> str:
    return srv.submit(ALICE, message)


def transaction_refusal(srv, message: bytes) -> tuple[str, int, list[str]]:
    """A whole SMTP transaction; the first reply that is not a success, as
    (stage, code, lines), or ("queued", 250, lines)."""
    with srv.raw() as conn:
        conn.ehlo()
        for stage, line in (("MAIL", f"MAIL FROM:<{SENDER}> SIZE={len(message)}"),
                            ("RCPT", f"RCPT TO:<{ALICE}>"), ("DATA", "DATA")):
            code, lines = conn.command(line)
            if code not in (250, 354):
                return stage, code, lines
        conn.send(dot_stuff(message))
        code, lines = conn.read_reply()
        conn.expect("RSET", 250)
        return ("end of data" if code != 250 else "queued"), code, lines


def append_answer(conn: RawIMAP, message: bytes) -> bytes:
    """APPEND `message` to INBOX (synchronizing literal); the tagged answer,
    whether the server refused before the literal or after it."""
    tag = conn.tag()
    conn.send(f"{tag} APPEND INBOX {{{len(message)}}}\r\n".encode())
    while True:
        response = conn.read_response()
        if response.startswith(b"+"):
            conn.send(message + b"\r\n")
            return conn.read_until_tagged(tag)[-1]
        if response.startswith(tag.encode() + b" "):
            return response


def inbox_state(conn: RawIMAP) -> tuple[int, int, dict[int, str]]:
    """SELECT INBOX: (EXISTS, UIDVALIDITY, {UID: Message-ID})."""
    responses = conn.select("INBOX")
    exists = validity = None
    for r in responses:
        words = r.split()
        if len(words) >= 3 and words[2] == b"EXISTS":
            exists = int(words[1])
        code = resp_code(r)
        if code and code[0] == "UIDVALIDITY":
            validity = int(code[1])
    uids: dict[int, str] = {}
    if exists:
        for r in conn.untagged(conn.expect("UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS "
                                           "(MESSAGE-ID)])")):
            uid = int(r.split(b"UID ", 1)[1].split()[0])
            uids[uid] = header(r.split(b"\r\n", 1)[1].replace(b"\r\n", b"\n"), "Message-ID")
    return exists, validity, uids


def no_panic(srv) -> None:
    log = srv.log()
    assert "panicked" not in log and "RUST_BACKTRACE" not in log, srv.log_tail()


def test_full_mail_store(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], mail_root_tmpfs=MAIL_SIZE, wait_for_imap=True, config={
        "qmgr.min_backoff": 1, "qmgr.max_backoff": 2, "maildird.allow_plaintext_auth": True})
    assert_tmpfs(srv, srv.mail_root)
    inbox = srv.maildir(ALICE)
    assert (inbox / "new").is_dir(), f"alice's Maildir did not reach the tmpfs: {inbox}"

    delivered = make_message("delivered before")
    submit(srv, delivered)
    srv.wait_for_delivery(ALICE, [delivered])
    appended = make_message("appended before", sender=ALICE)
    with srv.raw_imap(tls=False, user=ALICE) as conn:
        conn.append("INBOX", appended)
        before = inbox_state(conn)
    assert before[0] == 2 and len(before[2]) == 2, before

    filler = fill(srv.mail_view())
    files_before = maildir_files(inbox)
    waiting = [make_message(f"waits for space {i}") for i in range(3)]
    ids = [submit(srv, m) for m in waiting]
    entries = wait_for_attempts(srv, ids, 2)
    for queue_id in ids:
        rcpt = entries[queue_id]["recipients"][0]
        print(f"\n[full] {queue_id} ({entries[queue_id]['state']}): attempts"
              f" {rcpt['attempts']}, last_error {rcpt['last_error']!r}")
        assert rcpt["status"].lower() not in ("delivered", "bounced", "failed"), rcpt
        assert rcpt["last_error"].startswith("4"), rcpt
    # Nothing of them in the Maildir, not even in tmp/.
    files_meanwhile = maildir_files(inbox)
    assert files_meanwhile["tmp"] == {}, f"left in tmp/: {files_meanwhile['tmp']}"
    assert (dict(files_meanwhile["new"], **files_meanwhile["cur"])
            == dict(files_before["new"], **files_before["cur"])), (files_before, files_meanwhile)
    assert message_ids(inbox) == Counter(before[2].values())

    # APPEND: a clear NO, and the session goes on. (Failures are gathered
    # and reported at the end, so that the rest is checked as well.)
    problems = []
    for size in (200, 300_000):
        with srv.raw_imap(tls=False, user=ALICE) as conn:
            conn.select("INBOX")
            try:
                answer = append_answer(
                    conn, make_message("no room", sender=ALICE, body="z" * size))
                conn.expect("NOOP")
            except ConnectionError as e:
                answer = f"<connection closed: {e}>".encode()
            code = resp_code(answer)
            print(f"[full] APPEND of {size} octets on a full store: {answer!r}")
            if not (answer.split(b" ")[1:2] == [b"NO"] and code and code[0] in NO_SPACE_CODES):
                problems.append(f"APPEND of {size} octets on a full mail store got {answer!r},"
                                f" not NO [{' or '.join(NO_SPACE_CODES)}]")
    with srv.raw_imap(tls=False, user=ALICE) as conn:
        assert inbox_state(conn) == before, "the folder changed (new session)"
        fetched = conn.untagged(conn.expect("FETCH 1:* BODY.PEEK[]"))
        assert len(fetched) == 2
    assert maildir_files(inbox)["tmp"] == {}, "APPEND left a file in tmp/"

    # Space comes back: each waiting message arrives once.
    filler.unlink()
    srv.wait_for_delivery(ALICE, waiting, timeout=30)
    srv.wait_spool_empty()
    others = srv.settle(ALICE)
    counts = message_ids(inbox)
    wanted = {header(m, "Message-ID") for m in [delivered, appended, *waiting]}
    assert {i: n for i, n in counts.items() if i in wanted} == {i: 1 for i in wanted}, counts
    by_subject = {header(p.read_bytes(), "Subject"): p.read_bytes() for p in others}
    for message in waiting:
        stored = by_subject.get(header(message, "Subject"))
        assert stored is not None and strip_added_headers(stored) == as_stored(message)
    with srv.raw_imap(tls=False, user=ALICE) as conn:
        exists, validity, uids = inbox_state(conn)
        assert validity == before[1]
        assert {u: i for u, i in uids.items() if u in before[2]} == before[2], "UIDs changed"
        assert exists == 2 + len(waiting) + 1
        conn.append("INBOX", make_message("room again", sender=ALICE))
    no_panic(srv)
    assert problems == [], "\n".join(problems)


def test_full_spool_and_mail_store(make_mailsrv):
    srv = make_mailsrv(users=[ALICE], spool_tmpfs=SPOOL_SIZE, mail_root_tmpfs=MAIL_SIZE,
                       config={"qmgr.min_backoff": 1, "qmgr.max_backoff": 2})
    assert_tmpfs(srv, srv.spool_dir)
    assert_tmpfs(srv, srv.mail_root)
    inbox = srv.maildir(ALICE)

    # Mail accepted while the store is full stays queued.
    mail_filler = fill(srv.mail_view())
    waiting = [make_message(f"queued before the spool filled {i}", body="w" * 20_000)
               for i in range(3)]
    ids = [submit(srv, m) for m in waiting]
    wait_for_attempts(srv, ids, 1)
    data_before = {name: (srv.spool_view() / "data" / name).stat().st_size
                   for name in os.listdir(srv.spool_view() / "data")}
    assert set(ids) <= set(data_before), data_before

    # Now the spool fills up too.
    spool_filler = fill(srv.spool_view())
    for size in (100, 50_000):
        stage, code, lines = transaction_refusal(
            srv, make_message("spool full", body="s" * size))
        print(f"\n[full] a {size}-octet message on a full spool: {stage}: {code} {lines}")
        assert (code, lines[0].split(" ", 1)[0]) == (452, "4.3.1"), (stage, code, lines)
    assert set(os.listdir(srv.spool_view() / "data")) == set(data_before), \
        "the refused message left a file in the spool"

    # qmgr goes on retrying with both full; nothing is lost or corrupted.
    entries = queued(srv)
    attempts = {i: entries[i]["attempts"] for i in ids}
    time.sleep(5)
    entries = queued(srv)
    print(f"[full] attempts before {attempts}, after 5 s on a full spool"
          f" {({i: entries[i]['attempts'] for i in ids if i in entries})}")
    assert set(ids) <= set(entries), f"entries left the queue: {entries.keys()}"
    assert not any(e["state"] == "corrupt" for e in entries.values()), entries
    assert {n: (srv.spool_view() / "data" / n).stat().st_size for n in data_before} == data_before
    assert os.listdir(srv.spool_view() / "tmp") == [], "half-written files in the spool's tmp/"
    assert message_ids(inbox) == Counter(), "delivered onto a full store?"

    # The spool has room again: smtpd takes mail.
    spool_filler.unlink()
    after_spool = make_message("after the spool emptied")
    submit(srv, after_spool)
    # The store has room again: everything comes, once.
    mail_filler.unlink()
    everything = [*waiting, after_spool]
    try:
        srv.wait_for_delivery(ALICE, everything, timeout=30)
    except AssertionError as e:
        left = {i: (e["state"], e["attempts"], e["recipients"][0].get("last_error"))
                for i, e in queued(srv).items()}
        raise AssertionError(f"not all delivered 30 s after space came back; still queued"
                             f" (state, attempts, last error): {left}\n{e}") from None
    srv.wait_spool_empty()
    srv.settle(ALICE)
    counts = message_ids(inbox)
    wanted = {header(m, "Message-ID") for m in everything}
    assert {i: n for i, n in counts.items() if i in wanted} == {i: 1 for i in wanted}, counts
    assert sum(counts.values()) == len(everything) + 1, counts   # + settle's marker
    stored = {header(p.read_bytes(), "Message-ID"): p.read_bytes()
              for sub in ("new", "cur") for p in (inbox / sub).iterdir()}
    for message in everything:
        assert strip_added_headers(stored[header(message, "Message-ID")]) == as_stored(message)
    assert maildir_files(inbox)["tmp"] == {}
    no_panic(srv)
