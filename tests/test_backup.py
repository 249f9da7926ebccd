"""`mailctl backup` (mailctl(8)): create, verify, list and restore backups
of a running installation, end to end.

A restored installation is compared with the original through IMAP: every
folder's UIDVALIDITY and UIDNEXT, every message's UID, FLAGS, INTERNALDATE
and whole text (BODY.PEEK[]) byte for byte, the subscriptions, and the
passwords (the same ones log in). A restore `--into` a new directory is
taken over with `make_mailsrv(existing=DIR)`, which moves its listeners to
free ports before it starts, and stops it at teardown.

Mail to far.example stays in the queue: the tests' DNS server answers
SERVFAIL for it (4.4.3), and with an hour of backoff nothing retries it
during a test; `mailctl queue hold` then keeps it in hold/."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import run_mailctl
from mailtest import (
    header, imap_fetch, imap_flags, imap_ok, imap_text, imaplib_responses, make_message,
    parse_list, parse_status, wait_until,
)

ALICE = "alice@example.test"
BOB = "bob@example.test"
FAR = "someone@far.example"
# Mail from 127.0.0.1 may go out (to far.example), and a deferred message
# is not retried within a test.
HOLDING = {"smtpd.relay_networks": ["127.0.0.0/8"], "qmgr.min_backoff": 3600,
           "qmgr.max_backoff": 3600}
# The files every backup holds, by their name in the backup.
INSTALLATION_FILES = {"mailsrv.toml", "users", "aliases", "domains", "tls/cert.pem",
                      "tls/key.pem"}
DKIM_KEY = "dkim/example.test/mail.pem"
APPEND_DATE = "05-Mar-2024 10:20:30 +0100"
# A folder name beyond ASCII: Maildir++ directory .Entw&APw-rfe.
DRAFTS_DE = "Entwürfe"
BACKUP_ID_RE = re.compile(r"[0-9a-f]+-[0-9a-f]{16}")


# --------------------------------------------------------------------------
# mailctl backup
# --------------------------------------------------------------------------

def offline(*args: str, check: bool = True):
    """`mailctl backup ARGS` without -c: verify, list and restore --into
    need no installation."""
    return run_mailctl(["backup", *args], check=check)


def create(srv, to: Path, parent: Path | None = None) -> dict[str, Any]:
    """`mailctl backup create --to TO [--incremental-from PARENT] --json`:
    its summary."""
    args = ["backup", "create", "--to", str(to), "--json"]
    if parent is not None:
        args += ["--incremental-from", str(parent)]
    return json.loads(srv.ctl(*args).stdout)


def listing(path: Path, user: str | None = None) -> dict[str, Any]:
    """`mailctl backup list PATH [--user USER] --json`."""
    args = ["list", str(path), "--json"]
    if user is not None:
        args += ["--user", user]
    return json.loads(offline(*args).stdout)


def refused(result, *wanted: str) -> str:
    """The output of a mailctl run that must have failed, naming each of
    `wanted` (in stdout or stderr)."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure, got success:\n{text}"
    for w in wanted:
        assert w in text, f"{w!r} not in the output:\n{text}"
    return text


def restore_into(make_mailsrv, backup: Path, passwords: dict[str, str],
                 start: bool = True):
    """`mailctl backup restore BACKUP --into NEW` (no config), then that
    installation taken over on free ports, started unless `start` is
    false, its users logging in with `passwords`."""
    root = make_mailsrv.new_root()
    out = offline("restore", str(backup), "--into", str(root), "--json").stdout
    summary = json.loads(out)
    assert summary["restored"]["files"] > 0, summary
    restored = make_mailsrv(existing=root, start=False, wait_for_imap=True)
    restored.passwords = dict(passwords)
    if start:
        restored.start()
    return restored


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of `path` (the middle one by default)."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------
# Mailboxes through IMAP
# --------------------------------------------------------------------------

def folders(client) -> list[str]:
    """The selectable mailboxes (LIST "" *)."""
    names = []
    for response in imaplib_responses(imap_ok(client.list('""', "*"))):
        attributes, _, name = parse_list(response)
        if not attributes & {"\\noselect", "\\nonexistent"}:
            names.append(name)
    return sorted(names)


def subscribed(client) -> set[str]:
    return {parse_list(r)[2] for r in imaplib_responses(imap_ok(client.lsub('""', "*")))}


def status(client, mailbox: str, items: str = "UIDVALIDITY UIDNEXT MESSAGES") -> dict[str, int]:
    name, got = parse_status(imap_ok(client.status(mailbox, f"({items})"))[0])
    assert name == mailbox, f"STATUS {mailbox} answered for {name}"
    return got


def messages(client, mailbox: str, items: str = "FLAGS INTERNALDATE BODY.PEEK[]",
             readonly: bool = True) -> dict[int, dict[str, Any]]:
    """{UID: {ITEM: value}} of every message in `mailbox` (EXAMINEd)."""
    count = int(imap_ok(client.select(mailbox, readonly))[-1])
    if count == 0:
        return {}
    fetched = imap_fetch(client, "1:*", f"(UID {items})", uid=True)
    found = {got["UID"]: got for got in fetched.values()}
    assert len(found) == count, f"{mailbox}: {count} messages, {len(found)} fetched"
    return found


def folder_state(client, mailbox: str) -> dict[str, Any]:
    """What a restore must reproduce of a folder."""
    st = status(client, mailbox)
    return {
        "UIDVALIDITY": st["UIDVALIDITY"],
        "UIDNEXT": st["UIDNEXT"],
        "messages": {uid: (frozenset(imap_flags(got["FLAGS"])),
                           imap_text(got["INTERNALDATE"]), got["BODY[]"])
                     for uid, got in messages(client, mailbox).items()},
    }


def snapshot(srv, user: str) -> dict[str, Any]:
    """Every folder of `user` (folder_state) and the subscriptions, logged
    in with the user's password."""
    with srv.imaps(user=user) as client:
        return {"folders": {name: folder_state(client, name) for name in folders(client)},
                "subscribed": subscribed(client)}


def assert_same_mail(want: dict[str, Any], got: dict[str, Any], what: str) -> None:
    """Two snapshots are equal; the first difference is named."""
    assert sorted(got["folders"]) == sorted(want["folders"]), f"{what}: folders differ"
    for name, w in want["folders"].items():
        g = got["folders"][name]
        for key in ("UIDVALIDITY", "UIDNEXT"):
            assert g[key] == w[key], f"{what}: {name} {key} {g[key]}, want {w[key]}"
        assert sorted(g["messages"]) == sorted(w["messages"]), f"{what}: {name} UIDs differ"
        for uid, (flags, date, body) in w["messages"].items():
            g_flags, g_date, g_body = g["messages"][uid]
            assert g_flags == flags, (
                f"{what}: {name} UID {uid} FLAGS {set(g_flags)}, want {set(flags)}")
            assert g_date == date, f"{what}: {name} UID {uid} INTERNALDATE {g_date}, want {date}"
            assert g_body == body, f"{what}: {name} UID {uid}: the text differs"
    assert got["subscribed"] == want["subscribed"], f"{what}: subscriptions differ"


def message_id_of(body: bytes) -> str:
    value = header(body.replace(b"\r\n", b"\n"), "Message-ID")
    assert value, f"no Message-ID in {body[:300]!r}"
    return value


def ids_in(state: dict[str, Any]) -> dict[str, set[str]]:
    """{folder: Message-IDs} of a snapshot."""
    return {name: {message_id_of(body) for _, _, body in f["messages"].values()}
            for name, f in state["folders"].items()}


def append(client, mailbox: str, message: bytes, flags: str = "",
           date: str | None = None) -> int:
    """APPEND with imaplib; the UID of its APPENDUID."""
    data = imap_ok(client.append(mailbox, f"({flags})" if flags else None,
                                 f'"{date}"' if date else None, message))
    m = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[-1], re.IGNORECASE)
    assert m, f"no APPENDUID in {data[-1]!r}"
    return int(m[1])


def uids_by_id(client, mailbox: str = "INBOX") -> dict[str, int]:
    """SELECT `mailbox` (read-write); {Message-ID: UID} of its messages.
    Deliveries may land in any order, so tests name messages by
    Message-ID, not by position."""
    found = {}
    for uid, got in messages(client, mailbox, "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]",
                             readonly=False).items():
        found[message_id_of(got["BODY[HEADER.FIELDS (MESSAGE-ID)]"])] = uid
    return found


def mutf7(name: str) -> str:
    """`name` in IMAP's modified UTF-7 (RFC 3501 5.1.3), as a client that
    has not enabled UTF8=ACCEPT names a mailbox, and as the Maildir++
    directory is named."""
    out: list[str] = []
    wide: list[str] = []

    def flush() -> None:
        if wide:
            data = base64.b64encode("".join(wide).encode("utf-16-be")).decode()
            out.append("&" + data.rstrip("=").replace("/", ",") + "-")
            wide.clear()
    for ch in name:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            wide.append(ch)
    flush()
    return "".join(out)


def uid_set(uids) -> str:
    return ",".join(str(u) for u in sorted(uids))


def filler(n_bytes: int) -> str:
    """Random text that compresses about as little as real mail: base64
    lines of 76 characters."""
    raw = base64.b64encode(os.urandom(n_bytes * 3 // 4 + 3)).decode()[:n_bytes]
    return "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76)) + "\n"


def letter(subject: str, to: str = ALICE, size: int = 0, utf8: bool = False) -> bytes:
    """A message with a few lines that a careless copy would change: a
    leading dot, trailing spaces, and (`utf8`, for APPEND) 8-bit text."""
    body = f"About {subject}.\n.a line with a leading dot\ntrailing spaces   \n"
    if utf8:
        body += "Grüße, naïve café\n"
    return make_message(subject, body=body + filler(size), to=to)


# --------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------

def queue_state(srv, queue_id: str) -> str | None:
    entry = srv.queue().get(queue_id)
    return entry and entry["state"]


def hold_far_message(srv, subject: str = "held for far.example") -> str:
    """Queue a message to far.example, wait until it is deferred, hold it."""
    queue_id = srv.submit(FAR, make_message(subject, to=FAR))
    wait_until(lambda: queue_state(srv, queue_id) == "deferred", 20,
               f"{queue_id} to be deferred")
    srv.ctl("queue", "hold", queue_id)
    wait_until(lambda: queue_state(srv, queue_id) == "hold", 20, f"{queue_id} to be held")
    return queue_id


def queue_view(srv) -> dict[str, tuple]:
    """{id: (state, sender, recipients)} of `mailctl queue list --json`."""
    return {i: (e["state"], e["sender"], sorted(r["address"] for r in e["recipients"]))
            for i, e in srv.queue().items()}


# --------------------------------------------------------------------------
# A populated installation
# --------------------------------------------------------------------------

def populate(srv) -> dict[str, Any]:
    """Give alice and bob mail in several folders, with flags, keywords,
    expunged UIDs, subscriptions and dates of their own; returns what was
    made."""
    inbox = [letter(f"inbox {i}", size=600 * i) for i in range(6)]
    for m in inbox:
        srv.send(ALICE, m)
    for_bob = letter("for bob", to=BOB)
    srv.send(BOB, for_bob)
    srv.wait_for_delivery(ALICE, inbox)
    srv.wait_for_delivery(BOB, [for_bob])
    with srv.imaps(user=ALICE) as client:
        for name in ("Work", "Work.Sub"):
            imap_ok(client.create(name))
            imap_ok(client.subscribe(name))
        append(client, "Work", letter("flagged and dated", utf8=True),
               r"\Seen \Flagged $Forwarded ProjectX", APPEND_DATE)
        append(client, "Work", letter("answered", utf8=True), r"\Answered", APPEND_DATE)
        append(client, "Work", letter("no flags"))
        append(client, "Work.Sub", letter("deep", utf8=True), r"\Seen $Label1")
        append(client, "Drafts", letter("a draft"), r"\Draft")
        by_id = uids_by_id(client)
        uid = [by_id[message_id_of(m)] for m in inbox]
        imap_ok(client.uid("STORE", str(uid[0]), "+FLAGS", r"(\Seen)"))
        imap_ok(client.uid("STORE", str(uid[1]), "+FLAGS", r"(\Flagged $Forwarded Custom-Keyword)"))
        imap_ok(client.uid("COPY", str(uid[2]), "Work"))
        # Two expunged: UIDs with gaps (UIDNEXT above the last one, when
        # the last delivered is among them).
        imap_ok(client.uid("STORE", uid_set([uid[4], uid[5]]), "+FLAGS", r"(\Deleted)"))
        imap_ok(client.expunge())
    with srv.imaps(user=BOB) as client:
        append(client, "Sent", letter("sent by bob", to=ALICE), r"\Seen", APPEND_DATE)
        imap_ok(client.unsubscribe("Junk"))
    return {"expunged": [message_id_of(inbox[4]), message_id_of(inbox[5])]}


def same_file(a: Path, b: Path) -> None:
    """Same bytes, mode, owner and group."""
    assert b.read_bytes() == a.read_bytes(), f"{b} differs from {a}"
    sa, sb = a.stat(), b.stat()
    assert (sb.st_mode, sb.st_uid, sb.st_gid) == (sa.st_mode, sa.st_uid, sa.st_gid), (
        f"{b}: mode {sb.st_mode:o} {sb.st_uid}:{sb.st_gid}, "
        f"the original {sa.st_mode:o} {sa.st_uid}:{sa.st_gid}")


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

def test_full_backup_restored_into_a_new_directory(make_mailsrv, tmp_path):
    srv = make_mailsrv(config=HOLDING, users=[ALICE, BOB], wait_for_imap=True)
    srv.ctl("dkim", "keygen", "example.test")
    srv.add_alias("info", ALICE)
    made = populate(srv)
    held = hold_far_message(srv)
    before = {u: snapshot(srv, u) for u in (ALICE, BOB)}
    assert not ids_in(before[ALICE])["INBOX"] & set(made["expunged"])

    path = tmp_path / "full"
    summary = create(srv, path)
    assert sorted(p.name for p in path.iterdir()) == [
        "SHA256SUMS", "backup.json", "manifest.jsonl.zst", "packs"]
    assert sorted(p.name for p in (path / "packs").iterdir()) == ["files.pack", "mail.pack"]
    # The format checks itself without mailctl.
    sums = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=path,
                          capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    assert summary["totals"]["queue_entries"] == 1, summary
    # Taking the backup changed nothing a client sees.
    for user in (ALICE, BOB):
        assert_same_mail(before[user], snapshot(srv, user), f"{user} after the backup")

    restored = restore_into(make_mailsrv, path, srv.passwords, start=False)
    # The tables and keys, byte for byte, with their modes and owners.
    for name in ("users", "aliases", "domains", "tls/cert.pem", "tls/key.pem", DKIM_KEY):
        same_file(srv.root / name, restored.root / name)
    # The config is the original's, its paths relative to its directory.
    config = restored.config()
    assert config["paths"]["mail_root"] == "mail" and config["tls"]["key"] == "tls/key.pem"
    assert config["hostname"] == srv.config()["hostname"]
    restored.ctl("check")
    # The held message is in the restored queue, held.
    assert queue_view(restored) == queue_view(srv)
    assert queue_view(restored)[held][0] == "hold"

    restored.start()
    # Each user logs in with the original password (snapshot() logs in).
    for user in (ALICE, BOB):
        assert_same_mail(before[user], snapshot(restored, user), f"{user} restored")
    assert queue_state(restored, held) == "hold"
    # The daemons (as their own users, when privileged) can read the key.
    assert "DKIM key not used" not in restored.log(), restored.log_tail()
    # New mail gets the UIDs the original would have given it.
    fresh = restored.send(ALICE, letter("after the restore"))
    restored.wait_for_delivery(ALICE, [fresh])
    with restored.imaps(user=ALICE) as client:
        inbox = before[ALICE]["folders"]["INBOX"]
        assert status(client, "INBOX")["UIDVALIDITY"] == inbox["UIDVALIDITY"]
        new = {uid for uid in messages(client, "INBOX") if uid not in inbox["messages"]}
        assert new == {inbox["UIDNEXT"]}


def test_backup_while_mail_arrives_and_a_client_moves_and_flags(make_mailsrv, tmp_path):
    """A backup of a mailbox that changes under it.

    One thread sends N uniquely numbered messages (an X-Seq header) over
    SMTP; an IMAP session MOVEs every number divisible by 3 from INBOX to
    Work as it arrives, one UID MOVE at a time; another keeps setting and
    clearing flags on the numbers that leave 1 modulo 3. The backup is
    taken when about a third has arrived. Archive holds 8192 old messages
    (hard-linked copies, so cheap to make), which the backup lists between
    INBOX and Work: a MOVE has time to happen in between.

    What must hold (create.rs: queue first, then each folder, INBOX before
    Work, every file hard-linked right after its folder's UIDs are read):
    - every message the backup lists is restored with its UID, byte for
      byte the file the original has, and its listed size;
    - no number is listed twice in one folder;
    - every number accepted (250) before the backup started is in the
      backup, in a folder or in the queue, and so in the restored
      installation once its queue is delivered: a superset of what the
      mailboxes held when the backup started;
    - a number listed in both INBOX and Work is one whose MOVE ran while
      the backup did (INBOX read before the MOVE ended, Work after it
      began); a MOVE may show in both, in either, never in neither;
    - the restored installation holds a number twice only as above, or
      once from a folder and once redelivered from the restored queue (a
      message delivered between the backup's queue and mailbox parts:
      restored twice, as after a crash, never lost)."""
    n_messages = 200
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True)
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Work"))
        for i in range(16):
            append(client, "Archive", letter(f"old {i}"))
        imap_ok(client.select("Archive"))
        for _ in range(9):
            imap_ok(client.copy("1:*", "Archive"))
            imap_ok(client.noop())
        assert status(client, "Archive")["MESSAGES"] == 16 << 9

    lock = threading.Lock()
    accepted: dict[int, float] = {}              # number → when its 250 came
    moves: dict[int, tuple[float, float]] = {}   # number → (MOVE sent, answered)
    errors: list[str] = []
    stop = threading.Event()

    def bulk(n: int) -> bytes:
        return make_message(f"bulk {n}", body=filler(300 + n),
                            message_id=f"bulk-{n}-{uuid.uuid4().hex}@client.example.test"
                            ).replace(b"MIME-Version:", f"X-Seq: {n}\r\nMIME-Version:".encode(), 1)

    def numbers(client) -> dict[int, int]:
        """{UID: X-Seq} of the selected INBOX, as this session sees it."""
        imap_ok(client.noop())
        uids = imap_ok(client.uid("SEARCH", "ALL"))[0].split()
        if not uids:
            return {}
        typ, data = client.uid("FETCH", b",".join(uids).decode(),
                               "(UID BODY.PEEK[HEADER.FIELDS (X-SEQ)])")
        if typ != "OK":   # another session expunged meanwhile: next round
            return {}
        found = {}
        for response in imaplib_responses(data):
            uid = re.search(rb"\bUID (\d+)", response, re.IGNORECASE)
            n = re.search(rb"X-Seq: (\d+)", response, re.IGNORECASE)
            if uid and n:
                found[int(uid[1])] = int(n[1])
        return found

    def sender():
        with srv.smtp() as s:
            for n in range(1, n_messages + 1):
                rejected = s.sendmail("sender@remote.test", [ALICE], bulk(n))
                assert rejected == {}, rejected
                with lock:
                    accepted[n] = time.monotonic()
                time.sleep(0.005)

    def mover():
        with srv.imaps(user=ALICE) as client:
            imap_ok(client.select("INBOX"))
            while not stop.is_set():
                for uid, n in sorted(numbers(client).items()):
                    if n % 3 == 0 and n not in moves:
                        sent = time.monotonic()
                        imap_ok(client.uid("MOVE", str(uid), "Work"))
                        with lock:
                            moves[n] = (sent, time.monotonic())
                time.sleep(0.02)

    def flagger():
        flags = [r"\Seen", r"\Flagged", "$Label1", "Urgent", r"\Answered"]
        with srv.imaps(user=ALICE) as client:
            imap_ok(client.select("INBOX"))
            turn = 0
            while not stop.is_set():
                for uid, n in sorted(numbers(client).items()):
                    if n % 3 == 1:
                        sign = "+" if (turn // len(flags)) % 2 == 0 else "-"
                        imap_ok(client.uid("STORE", str(uid), f"{sign}FLAGS.SILENT",
                                           f"({flags[turn % len(flags)]})"))
                        turn += 1
                time.sleep(0.01)

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as e:   # reported by the test's thread
                errors.append(f"{work.__name__}: {e!r}")
        return run

    threads = {f.__name__: threading.Thread(target=guarded(f), daemon=True)
               for f in (sender, mover, flagger)}
    for t in threads.values():
        t.start()
    path = tmp_path / "busy"
    try:
        wait_until(lambda: errors or (len(accepted) >= n_messages // 3 and len(moves) >= 5),
                   90, "a third of the messages and a few MOVEs")
        assert not errors, errors
        started = time.monotonic()
        with lock:
            before = {n for n, t in accepted.items() if t < started}
        create(srv, path)
        ended = time.monotonic()
        with lock:
            during = len(accepted) - len(before)
        threads["sender"].join(120)
        assert not threads["sender"].is_alive(), "the sender did not finish"
        time.sleep(0.5)   # the last MOVEs and flag changes
    finally:
        stop.set()
        for t in threads.values():
            t.join(30)
    assert not errors, errors
    assert len(before) < n_messages, "the backup started after the last message"
    overlapping = sum(1 for a, b in moves.values() if a <= ended and b >= started)
    print(f"{len(before)} messages accepted before the backup, {during} during it; "
          f"{overlapping} of {len(moves)} MOVEs ran during it; it took {ended - started:.2f} s")

    # The original lost nothing and has each message once.
    srv.wait_spool_empty(60)
    original: dict[int, bytes] = {}
    with srv.imaps(user=ALICE) as client:
        for folder in ("INBOX", "Work"):
            for got in messages(client, folder, "BODY.PEEK[]").values():
                n = int(header(got["BODY[]"].replace(b"\r\n", b"\n"), "X-Seq"))
                assert n not in original, f"the original has {n} twice"
                original[n] = got["BODY[]"]
    assert sorted(original) == list(range(1, n_messages + 1))

    listed = listing(path, ALICE)["messages"]
    root = make_mailsrv.new_root()
    offline("restore", str(path), "--into", str(root))
    queued: list[int] = []   # numbers in the restored queue
    for data in sorted((root / "spool" / "data").iterdir()):
        m = re.search(rb"^X-Seq: (\d+)", data.read_bytes(), re.MULTILINE)
        assert m, f"{data}: not one of ours"
        queued.append(int(m[1]))
    assert len(set(queued)) == len(queued), f"a message queued twice: {sorted(queued)}"
    restored = make_mailsrv(existing=root, start=False, wait_for_imap=True)
    restored.passwords = dict(srv.passwords)
    restored.start()
    restored.wait_spool_empty(60)
    found: dict[str, dict[int, tuple[int, bytes]]] = {}
    with restored.imaps(user=ALICE) as client:
        for folder in ("INBOX", "Work"):
            found[folder] = {}
            for uid, got in messages(client, folder, "BODY.PEEK[]").items():
                n = int(header(got["BODY[]"].replace(b"\r\n", b"\n"), "X-Seq"))
                found[folder][uid] = (n, got["BODY[]"])

    in_backup: dict[str, list[int]] = {"INBOX": [], "Work": []}
    for m in listed:
        if m["folder"] not in in_backup:
            continue
        got = found[m["folder"]].get(m["uid"])
        assert got is not None, f"listed {m['folder']} UID {m['uid']} is not restored"
        n, body = got
        assert body == original[n], f"{m['folder']} UID {m['uid']} (number {n}) differs"
        assert len(body.replace(b"\r\n", b"\n")) == m["size"], m
        in_backup[m["folder"]].append(n)
    for folder, ns in in_backup.items():
        assert len(set(ns)) == len(ns), f"the backup lists a message twice in {folder}"
    print(f"listed in INBOX and Work: {sorted(set(in_backup['INBOX']) & set(in_backup['Work']))}; "
          f"in the queue: {sorted(queued)}")

    # Nothing accepted before the backup is missing from it.
    missing = before - set(in_backup["INBOX"]) - set(in_backup["Work"]) - set(queued)
    assert not missing, (
        f"accepted before the backup, in neither a folder nor the queue: {sorted(missing)}")
    # In both folders only while its MOVE ran.
    for n in set(in_backup["INBOX"]) & set(in_backup["Work"]):
        assert n in moves, f"{n} listed in INBOX and Work but never moved"
        sent, answered = moves[n]
        assert sent <= ended and answered >= started, (
            f"{n} listed in INBOX and Work, moved {sent - started:+.3f}.."
            f"{answered - started:+.3f} s from the backup's start, which took "
            f"{ended - started:.3f} s")
    # The restored installation: the listed messages, plus the restored
    # queue delivered to INBOX, and nothing else.
    listed_uids = {f: {m["uid"] for m in listed if m["folder"] == f} for f in in_backup}
    extra_work = set(found["Work"]) - listed_uids["Work"]
    assert not extra_work, f"Work has messages the backup did not list: {extra_work}"
    redelivered = sorted(found["INBOX"][uid][0]
                         for uid in set(found["INBOX"]) - listed_uids["INBOX"])
    assert redelivered == sorted(queued), "INBOX beyond the listing is not the restored queue"
    everywhere = [n for folder in found.values() for n, _ in folder.values()]
    assert before <= set(everywhere)
    for n in set(everywhere):
        copies = everywhere.count(n)
        allowed = 1 + (n in queued) + (n in in_backup["INBOX"] and n in in_backup["Work"])
        assert copies <= allowed, f"{n} restored {copies} times"


def test_a_move_to_a_folder_listed_earlier_is_not_lost(make_mailsrv, tmp_path):
    """A client moves messages from Work to Archive, one UID MOVE at a
    time, while the backup runs. The backup reads the folders in name
    order (INBOX, Archive, ..., Old, ..., Work), and Old holds 8192 old
    messages, so many MOVEs happen after Archive is read and before Work
    is: each message must still be in the backup, in Archive or in Work
    (a message is never in neither, whichever folder it moves between)."""
    n_messages = 150
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True)
    wanted = set()
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Work"))
        imap_ok(client.create("Old"))
        for i in range(n_messages):
            m = letter(f"work {i}")
            append(client, "Work", m)
            wanted.add(message_id_of(m))
        for i in range(16):
            append(client, "Old", letter(f"old {i}"))
        imap_ok(client.select("Old"))
        for _ in range(9):
            imap_ok(client.copy("1:*", "Old"))
            imap_ok(client.noop())

    moved: list[tuple[float, float]] = []
    errors: list[str] = []
    stop = threading.Event()

    def mover():
        try:
            with srv.imaps(user=ALICE) as client:
                uids = sorted(messages(client, "Work", "FLAGS", readonly=False))
                for uid in uids:
                    if stop.is_set():
                        break
                    sent = time.monotonic()
                    imap_ok(client.uid("MOVE", str(uid), "Archive"))
                    moved.append((sent, time.monotonic()))
                    time.sleep(0.002)
        except BaseException as e:
            errors.append(repr(e))

    thread = threading.Thread(target=mover, daemon=True)
    thread.start()
    path = tmp_path / "moving"
    try:
        wait_until(lambda: errors or len(moved) >= 10, 60, "the first MOVEs")
        started = time.monotonic()
        create(srv, path)
        ended = time.monotonic()
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    during = sum(1 for a, b in moved if a <= ended and b >= started)
    print(f"{during} of {len(moved)} MOVEs ran during the backup ({ended - started:.2f} s)")
    assert during > 0, "no MOVE ran during the backup: the test proves nothing"

    root = make_mailsrv.new_root()
    offline("restore", str(path), "--into", str(root))
    found: dict[str, list[str]] = {}
    maildir = root / "mail" / "example.test" / "alice"
    for folder in (".Archive", ".Work"):
        for sub in ("cur", "new"):
            for f in (maildir / folder / sub).iterdir():
                found.setdefault(message_id_of(f.read_bytes()), []).append(folder)
    missing = wanted - set(found)
    assert not missing, (
        f"{len(missing)} of {n_messages} messages moved from Work to Archive are in "
        f"neither folder of the backup")
    assert all(len(folders) == 1 for folders in found.values()), found


def test_incremental_chain(make_mailsrv, tmp_path):
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True)
    sent = [letter(f"big {i}", size=12_000) for i in range(20)]
    for m in sent:
        srv.send(ALICE, m)
    srv.wait_for_delivery(ALICE, sent)
    ids = [message_id_of(m) for m in sent]

    full = create(srv, tmp_path / "full")
    assert full["incremental"] is False and full["parent"] is None
    assert full["totals"]["messages"] == 20
    assert full["totals"]["stored_bytes"] > 150_000, full

    # Changes: new mail, flags, keywords, expunges.
    new1 = [letter(f"new {i}") for i in range(2)]
    for m in new1:
        srv.send(ALICE, m)
    srv.wait_for_delivery(ALICE, new1)
    with srv.imaps(user=ALICE) as client:
        uid = uids_by_id(client)
        imap_ok(client.uid("STORE", uid_set(uid[i] for i in ids[:5]), "+FLAGS", r"(\Seen)"))
        imap_ok(client.uid("STORE", str(uid[ids[5]]), "+FLAGS", "(Reviewed)"))
        imap_ok(client.uid("STORE", uid_set(uid[i] for i in ids[17:]), "+FLAGS", r"(\Deleted)"))
        imap_ok(client.expunge())
    incr1 = create(srv, tmp_path / "incr1", parent=tmp_path / "full")
    assert incr1["incremental"] is True and incr1["parent"] == full["id"]
    assert incr1["totals"]["messages"] == 19
    assert incr1["totals"]["stored_bytes"] * 10 < full["totals"]["stored_bytes"], (incr1, full)

    # More: a folder, a MOVE, flags taken off and put on, one more expunge.
    new2 = letter("new 2")
    srv.send(ALICE, new2)
    srv.wait_for_delivery(ALICE, [new2])
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Work"))
        append(client, "Work", letter("appended", utf8=True), r"\Flagged $Forwarded", APPEND_DATE)
        uid = uids_by_id(client)
        imap_ok(client.uid("STORE", str(uid[ids[0]]), "-FLAGS", r"(\Seen)"))
        imap_ok(client.uid("STORE", str(uid[ids[6]]), "+FLAGS", r"(\Flagged $Forwarded)"))
        imap_ok(client.uid("MOVE", str(uid[ids[7]]), "Work"))
        imap_ok(client.uid("STORE", str(uid[ids[8]]), "+FLAGS", r"(\Deleted)"))
        imap_ok(client.expunge())
    incr2 = create(srv, tmp_path / "incr2", parent=tmp_path / "incr1")
    assert incr2["parent"] == incr1["id"]
    assert incr2["totals"]["stored_bytes"] * 10 < full["totals"]["stored_bytes"], (incr2, full)
    latest = snapshot(srv, ALICE)
    gone = {ids[i] for i in (8, 17, 18, 19)}   # expunged
    assert not gone & set().union(*ids_in(latest).values())
    assert ids[7] in ids_in(latest)["Work"]

    # verify checks the whole chain.
    report = json.loads(offline("verify", str(tmp_path / "incr2"), "--json").stdout)
    assert report["ok"] is True and report["problems"] == [], report
    assert "(3 backups in the chain" in offline("verify", str(tmp_path / "incr2")).stdout
    assert [Path(p) for p in report["backups"]] == [
        (tmp_path / name).resolve() for name in ("incr2", "incr1", "full")]
    assert f"incremental on {incr1['id']}" in offline("list", str(tmp_path / "incr2")).stdout

    restored = restore_into(make_mailsrv, tmp_path / "incr2", srv.passwords)
    state = snapshot(restored, ALICE)
    assert_same_mail(latest, state, "restored from the second incremental")
    assert not gone & set().union(*ids_in(state).values())
    inbox = state["folders"]["INBOX"]["messages"]
    flags_of = {message_id_of(body): flags for flags, _, body in inbox.values()}
    assert flags_of[ids[0]] == set() and flags_of[ids[1]] == {"\\seen"}
    assert flags_of[ids[5]] == {"reviewed"}
    assert flags_of[ids[6]] == {"\\flagged", "$forwarded"}
    # Restored again, untouched by any daemon, for the comparison below.
    first = make_mailsrv.new_root()
    offline("restore", str(tmp_path / "incr2"), "--into", str(first))

    # Moved together, the chain still holds: each parent is found beside
    # its child.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("full", "incr1", "incr2"):
        shutil.move(str(tmp_path / name), str(moved / name))
    report = json.loads(offline("verify", str(moved / "incr2"), "--json").stdout)
    assert report["ok"] is True, report
    assert [Path(p) for p in report["backups"]] == [
        (moved / name).resolve() for name in ("incr2", "incr1", "full")]
    again = make_mailsrv.new_root()
    offline("restore", str(moved / "incr2"), "--into", str(again))
    assert mail_tree(again) == mail_tree(first)
    # Alone, without its parents, an incremental is refused.
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copytree(moved / "incr2", lonely / "incr2")
    refused(offline("verify", str(lonely / "incr2"), check=False), incr1["id"])
    refused(offline("restore", str(lonely / "incr2"), "--into", str(tmp_path / "nowhere"),
                    check=False), incr1["id"])


def mail_tree(root: Path) -> dict[str, tuple[bytes, int | None]]:
    """{path under mail/: (content, mtime of a message file)} of every
    file of a restored installation's Maildirs (the other files are
    written when restored: their mtimes are the restore's)."""
    tree = {}
    for path in sorted((root / "mail").rglob("*")):
        if path.is_file():
            message = path.parent.name in ("cur", "new")
            tree[str(path.relative_to(root / "mail"))] = (
                path.read_bytes(), int(path.stat().st_mtime) if message else None)
    return tree


def test_verify_finds_damage_and_unfinished_backups_are_refused(make_mailsrv, tmp_path):
    srv = make_mailsrv(users=[ALICE])
    mail = [letter(f"check {i}", size=2000) for i in range(3)]
    for m in mail:
        srv.send(ALICE, m)
    srv.wait_for_delivery(ALICE, mail)
    good = tmp_path / "good"
    create(srv, good)
    out = offline("verify", str(good)).stdout
    assert "OK" in out, out

    # One byte changed in the mail pack.
    bad_pack = tmp_path / "bad-pack"
    shutil.copytree(good, bad_pack)
    flip_byte(bad_pack / "packs" / "mail.pack")
    refused(offline("verify", str(bad_pack), check=False), "packs/mail.pack")
    report = json.loads(offline("verify", str(bad_pack), "--json", check=False).stdout)
    assert report["ok"] is False and any("packs/mail.pack" in p for p in report["problems"])
    sums = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bad_pack,
                          capture_output=True, text=True)
    assert sums.returncode != 0 and "mail.pack" in sums.stdout + sums.stderr
    # Restoring from it stops at the damaged content.
    refused(offline("restore", str(bad_pack), "--into", str(tmp_path / "from-bad-pack"),
                    check=False), "damaged")

    # One byte changed in the manifest.
    bad_manifest = tmp_path / "bad-manifest"
    shutil.copytree(good, bad_manifest)
    flip_byte(bad_manifest / "manifest.jsonl.zst")
    refused(offline("verify", str(bad_manifest), check=False), "manifest.jsonl.zst")

    # Unfinished: no SHA256SUMS, as when create was interrupted.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(good, unfinished)
    (unfinished / "SHA256SUMS").unlink()
    for result in (
        offline("verify", str(unfinished), check=False),
        offline("list", str(unfinished), check=False),
        offline("restore", str(unfinished), "--into", str(tmp_path / "from-unfinished"),
                check=False),
        srv.ctl("backup", "restore", str(unfinished), "--user", ALICE, check=False),
        srv.ctl("backup", "create", "--to", str(tmp_path / "on-unfinished"),
                "--incremental-from", str(unfinished), check=False),
    ):
        refused(result, "unfinished backup")
    assert not (tmp_path / "from-unfinished").exists()

    # Not a backup at all.
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(offline("verify", str(empty), check=False), "not a mailsrv backup")

    # A backup goes into a new directory only; one already there is left alone.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("mine\n")
    refused(srv.ctl("backup", "create", "--to", str(existing), check=False), "already exists")
    assert [p.name for p in existing.iterdir()] == ["keep"]
    refused(srv.ctl("backup", "create", "--to", str(good), check=False), "already exists")
    assert offline("verify", str(good)).returncode == 0
    # A restore goes into a new (or empty) directory only.
    refused(offline("restore", str(good), "--into", str(existing), check=False), "not empty")
    assert [p.name for p in existing.iterdir()] == ["keep"]


def test_restore_refuses_a_changed_manifest(make_mailsrv, tmp_path):
    """A manifest changed after the backup was made (here: one message's
    flags taken off, recompressed with the zstd tool, SHA256SUMS left as
    it was) is refused by restore, as by verify: a damaged backup must not
    restore other flags, UIDs or dates than the ones backed up without a
    word. (The manifest's zstd frame has no checksum of its own: a flipped
    byte in it may well decompress.)"""
    srv = make_mailsrv(users=[ALICE], wait_for_imap=True)
    mail = [letter(f"manifest {i}") for i in range(2)]
    for m in mail:
        srv.send(ALICE, m)
    srv.wait_for_delivery(ALICE, mail)
    with srv.imaps(user=ALICE) as client:
        messages(client, "INBOX", "FLAGS", readonly=False)
        imap_ok(client.store("1:*", "+FLAGS", r"(\Seen)"))
    good = tmp_path / "good"
    create(srv, good)

    changed = tmp_path / "changed"
    shutil.copytree(good, changed)
    manifest = changed / "manifest.jsonl.zst"
    text = subprocess.run(["zstd", "-q", "-d", "-c", str(manifest)], check=True,
                          capture_output=True).stdout.decode()
    edited, n = re.subn(r'(,S=\d+,W=\d+:2,)S"', r'\1"', text, count=1)
    assert n == 1, f"no message with \\Seen in the manifest:\n{text[:3000]}"
    manifest.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=edited.encode(), check=True,
                                        capture_output=True).stdout)
    refused(offline("verify", str(changed), check=False), "manifest.jsonl.zst")
    target = tmp_path / "from-changed"
    refused(offline("restore", str(changed), "--into", str(target), check=False),
            "manifest.jsonl.zst")


def test_restore_one_folder_and_one_user_into_the_running_system(make_mailsrv, tmp_path):
    srv = make_mailsrv(users=[ALICE, BOB], wait_for_imap=True)
    inbox = [letter(f"inbox {i}") for i in range(5)]
    for m in inbox:
        srv.send(ALICE, m)
    for_bob = letter("for bob", to=BOB)
    srv.send(BOB, for_bob)
    srv.wait_for_delivery(ALICE, inbox)
    srv.wait_for_delivery(BOB, [for_bob])
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Work"))
        imap_ok(client.subscribe("Work"))
        append(client, "Work", letter("work 1", utf8=True), r"\Seen $Forwarded ProjectX",
               APPEND_DATE)
        append(client, "Work", letter("work 2"), r"\Flagged")
        append(client, "Work", letter("work 3"))
        imap_ok(client.create(mutf7(DRAFTS_DE)))
        append(client, mutf7(DRAFTS_DE), letter("ein Entwurf", utf8=True), r"\Draft")
        imap_ok(client.select("INBOX"))
        imap_ok(client.store("2", "+FLAGS", r"(\Flagged $Forwarded Custom-Keyword)"))
        imap_ok(client.store("4", "+FLAGS", r"(\Seen \Answered)"))
    with srv.imaps(user=BOB) as client:
        append(client, "Sent", letter("sent by bob", to=ALICE), r"\Seen", APPEND_DATE)
    alice = snapshot(srv, ALICE)
    bob = snapshot(srv, BOB)
    path = tmp_path / "backup"
    create(srv, path)

    # A deleted folder comes back exactly: UIDVALIDITY, UIDs, flags, dates.
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.delete("Work"))
        assert "Work" not in folders(client)
    result = srv.ctl("backup", "restore", str(path), "--user", ALICE, "--folder", "Work",
                     "--json")
    assert json.loads(result.stdout)["restored"]["messages"] == 3
    with srv.imaps(user=ALICE) as client:
        assert "Work" in folders(client)
        work = folder_state(client, "Work")
    want = alice["folders"]["Work"]
    for key in ("UIDVALIDITY", "UIDNEXT", "messages"):
        assert work[key] == want[key], f"Work's {key} after the restore"
    # A folder is named as IMAP clients show it, in UTF-8.
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.delete(mutf7(DRAFTS_DE)))
    srv.ctl("backup", "restore", str(path), "--user", ALICE, "--folder", DRAFTS_DE)
    with srv.imaps(user=ALICE) as client:
        assert folder_state(client, mutf7(DRAFTS_DE)) == alice["folders"][mutf7(DRAFTS_DE)]

    # Into the existing INBOX: the two expunged messages come back with new
    # UIDs and their flags; the others keep theirs.
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.select("INBOX"))
        imap_ok(client.store("2,4", "+FLAGS", r"(\Deleted)"))
        imap_ok(client.expunge())
        uidnext = status(client, "INBOX")["UIDNEXT"]
    srv.ctl("backup", "restore", str(path), "--user", ALICE, "--folder", "INBOX")
    with srv.imaps(user=ALICE) as client:
        now = folder_state(client, "INBOX")
    was = alice["folders"]["INBOX"]
    assert now["UIDVALIDITY"] == was["UIDVALIDITY"]
    kept = set(now["messages"]) & set(was["messages"])
    added = set(now["messages"]) - set(was["messages"])
    assert len(kept) == 3 and len(added) == 2, (sorted(was["messages"]), sorted(now["messages"]))
    assert min(added) >= uidnext, f"restored UIDs {sorted(added)}, UIDNEXT was {uidnext}"
    assert now["UIDNEXT"] == max(added) + 1
    by_text = {body: (flags, date) for flags, date, body in was["messages"].values()}
    for uid in added:
        flags, date, body = now["messages"][uid]
        assert body in by_text, f"UID {uid} is not one of the backed-up messages"
        assert (flags, date) == by_text[body], f"UID {uid}: flags or date not restored"
    assert Counter(body for _, _, body in now["messages"].values()) == Counter(
        body for _, _, body in was["messages"].values())
    # Again: nothing is missing now, nothing is added twice.
    again = json.loads(srv.ctl("backup", "restore", str(path), "--user", ALICE,
                               "--json").stdout)
    assert again["restored"]["messages"] == 0, again
    with srv.imaps(user=ALICE) as client:
        assert folder_state(client, "INBOX") == now

    # A deleted user, Maildir and all: the account (same password) and mail.
    srv.ctl("user", "del", BOB)
    shutil.rmtree(srv.maildir(BOB))
    with pytest.raises(Exception):
        srv.imaps(user=BOB).logout()
    result = srv.ctl("backup", "restore", str(path), "--user", BOB)
    assert f"added the account {BOB}" in result.stderr, result.stderr
    assert BOB in srv.ctl("user", "list").stdout
    assert_same_mail(bob, snapshot(srv, BOB), "bob restored")

    # What the backup does not have.
    refused(srv.ctl("backup", "restore", str(path), "--user", "carol@example.test",
                    check=False), "no user carol@example.test")
    refused(srv.ctl("backup", "restore", str(path), "--user", ALICE, "--folder", "NoSuch",
                    check=False), "no folder NoSuch")
    assert srv.ctl("backup", "restore", str(path), "--folder", "Work", check=False).returncode != 0


def test_restore_into_an_empty_installation(make_mailsrv, tmp_path):
    srv = make_mailsrv(config=HOLDING, users=[ALICE, BOB], wait_for_imap=True)
    srv.ctl("dkim", "keygen", "example.test")
    populate(srv)
    held = hold_far_message(srv)
    before = {u: snapshot(srv, u) for u in (ALICE, BOB)}
    path = tmp_path / "backup"
    create(srv, path)
    # Not into a running installation, nor one that has users.
    refused(srv.ctl("backup", "restore", str(path), check=False), "is running")
    srv.stop()
    refused(srv.ctl("backup", "restore", str(path), check=False), "has users")
    srv.start()

    target = make_mailsrv(config=HOLDING, start=False, wait_for_imap=True)
    own = {name: (target.root / name).read_bytes()
           for name in ("mailsrv.toml", "tls/cert.pem", "tls/key.pem")}
    summary = json.loads(target.ctl("backup", "restore", str(path), "--json").stdout)
    assert summary["restored"]["users"] == 2 and summary["restored"]["queue_entries"] == 1
    # Its own config, certificate and key stay; the tables and keys come over.
    for name, content in own.items():
        assert (target.root / name).read_bytes() == content, f"{name} was replaced"
    for name in ("users", "aliases", "domains"):
        assert (target.root / name).read_bytes() == (srv.root / name).read_bytes(), name
    same_file(srv.root / DKIM_KEY, target.root / DKIM_KEY)
    assert queue_view(target) == queue_view(srv)

    target.passwords = dict(srv.passwords)
    target.start()
    for user in (ALICE, BOB):
        assert_same_mail(before[user], snapshot(target, user), f"{user} restored")
    assert queue_state(target, held) == "hold"
    assert "DKIM key not used" not in target.log(), target.log_tail()
    fresh = target.send(BOB, letter("after the restore", to=BOB))
    target.wait_for_delivery(BOB, [fresh])
    # Now it has users: a second whole restore is refused.
    target.stop()
    refused(target.ctl("backup", "restore", str(path), check=False), "has users")


def test_list_and_summaries(make_mailsrv, tmp_path):
    srv = make_mailsrv(config=HOLDING, users=[ALICE, BOB], wait_for_imap=True)
    inbox = [letter(f"inbox {i}", size=100 * i) for i in range(3)]
    for m in inbox:
        srv.send(ALICE, m)
    for_bob = letter("for bob", to=BOB)
    srv.send(BOB, for_bob)
    srv.wait_for_delivery(ALICE, inbox)
    srv.wait_for_delivery(BOB, [for_bob])
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.create("Work"))
        append(client, "Work", letter("work 1"), r"\Seen")
        append(client, "Work", letter("work 2"))
        imap_ok(client.create(mutf7(DRAFTS_DE)))
        append(client, mutf7(DRAFTS_DE), letter("ein Entwurf"))
    hold_far_message(srv)
    # {user: folder names}, in UTF-8 as `backup list` shows them.
    folders_of: dict[str, list[str]] = {}
    for user in (ALICE, BOB):
        with srv.imaps(user=user) as client:
            utf7 = folders(client)
            folders_of[user] = sorted(DRAFTS_DE if n == mutf7(DRAFTS_DE) else n for n in utf7)
            if user == ALICE:
                uids = {name: sorted(messages(client, mutf7(name), "FLAGS"))
                        for name in ("INBOX", "Work", DRAFTS_DE)}

    def on_disk(user: str, folder: str) -> dict[str, int]:
        """{base name: size} of a folder's message files."""
        d = srv.maildir(user) / ("" if folder == "INBOX" else f".{mutf7(folder)}")
        return {p.name.split(":")[0]: p.stat().st_size
                for sub in ("cur", "new") for p in (d / sub).iterdir()}

    path = tmp_path / "listed"
    summary = create(srv, path)
    assert Path(summary["path"]) == path.resolve()
    assert BACKUP_ID_RE.fullmatch(summary["id"]), summary["id"]
    assert summary["incremental"] is False and summary["parent"] is None
    totals = summary["totals"]
    assert totals["users"] == 2
    assert totals["folders"] == len(folders_of[ALICE]) + len(folders_of[BOB])
    assert totals["messages"] == 7
    assert totals["queue_entries"] == 1
    assert totals["files"] >= len(INSTALLATION_FILES)
    message_bytes = sum(sum(on_disk(u, f).values()) for u in (ALICE, BOB) for f in folders_of[u])
    assert totals["bytes"] > message_bytes
    assert 0 < totals["stored_bytes"]
    assert summary["seconds"] >= 0
    header_file = json.loads((path / "backup.json").read_text())
    assert header_file["id"] == summary["id"] and header_file["totals"] == totals
    last = json.loads((srv.spool_dir / "last-backup.json").read_text())
    assert last["id"] == summary["id"] and Path(last["path"]) == path.resolve()

    listed = listing(path)
    assert listed["header"]["id"] == summary["id"]
    assert listed["header"]["hostname"] == srv.config()["hostname"]
    assert listed["queue_entries"] == 1
    assert listed["messages"] == []
    assert INSTALLATION_FILES <= {f["name"] for f in listed["files"]}
    assert len(listed["files"]) == totals["files"]
    assert sorted(listed["users"]) == [ALICE, BOB]
    for user in (ALICE, BOB):
        assert sorted(listed["users"][user]) == folders_of[user]
        for folder, counts in listed["users"][user].items():
            sizes = on_disk(user, folder)
            assert counts == {"messages": len(sizes), "bytes": sum(sizes.values())}, (user, folder)

    mine = listing(path, ALICE)["messages"]
    assert {(m["folder"], m["uid"]) for m in mine} == {
        (f, uid) for f, us in uids.items() for uid in us}
    for m in mine:
        assert on_disk(ALICE, m["folder"])[m["file"].split(":")[0]] == m["size"], m

    text = offline("list", str(path)).stdout
    assert f"backup {summary['id']} of {srv.config()['hostname']}" in text, text
    assert ", full" in text and "queue: 1 entries" in text, text
    assert f"user {ALICE}" in text and f"user {BOB}" in text, text
    work_bytes = sum(on_disk(ALICE, "Work").values())
    assert f"  Work: 2 messages, {work_bytes} bytes" in text, text
    assert f"  {DRAFTS_DE}: 1 messages, " in text, text
    assert re.search(r"^file mailsrv\.toml \(\d+ bytes\)$", text, re.MULTILINE), text
    text = offline("list", str(path), "--user", ALICE).stdout
    for m in mine:
        assert f"{m['folder']} {m['uid']} {m['file']} {m['size']}" in text, text

    plain = srv.ctl("backup", "create", "--to", str(tmp_path / "plain"),
                    "--incremental-from", str(path)).stdout
    assert re.match(r"created incremental backup \S+ in .*: 2 users, "
                    rf"{totals['folders']} folders, 7 messages, 1 queue entries", plain), plain
