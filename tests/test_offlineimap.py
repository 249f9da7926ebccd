"""offlineimap (offlineimap3) as a real IMAP client: alice's mailboxes on
the server and a local Maildir tree kept in step both ways over IMAPS (a
folder tree with flags pulled down; new messages, flag changes and a folder
made locally pushed up; deletions both ways), and a second run that finds
nothing left to do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from mailtest import (
    as_stored, header, imap_fetch, imap_flags, imap_ok, imaplib_responses, make_message,
    parse_list, parse_status,
)

ALICE = "alice@example.test"
DEFAULT_MAILBOXES = {"INBOX", "Sent", "Drafts", "Junk", "Trash", "Archive"}

# offlineimap checks the certificate against sslcacertfile and the name in
# remotehost, so remotehost is `localhost`, one of the names `mailctl init`
# puts in its self-signed certificate; it resolves to 127.0.0.1. The local
# Maildir tree uses `/` as its separator (Projects.Q1 on the server is
# Projects/Q1 here), so the two hierarchy delimiters get translated.
CONFIG = """\
[general]
accounts = alice
metadata = {metadata}
maxsyncaccounts = 1

[Account alice]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {local}
sep = /
createfolders = yes

[Repository remote]
type = IMAP
remotehost = localhost
remoteport = {port}
remoteuser = {user}
remotepass = {password}
auth_mechanisms = PLAIN
ssl = yes
sslcacertfile = {cert}
maxconnections = 1
holdconnectionopen = no
createfolders = yes
expunge = yes
"""

# Maildir info letters <-> IMAP flags.
LETTERS = {"D": "\\draft", "F": "\\flagged", "R": "\\answered", "S": "\\seen", "T": "\\deleted"}


class Offlineimap:
    """offlineimap for alice with a local Maildir tree in `local` (one
    Maildir per folder, INBOX included, nested with `/`)."""

    def __init__(self, srv, home: Path, binary: str):
        self.srv = srv
        self.home = home
        self.binary = binary
        self.local = home / "Mail"
        self.local.mkdir(parents=True)
        self.metadata = home / "metadata"
        self.config = home / "offlineimaprc"
        self.config.write_text(CONFIG.format(
            metadata=self.metadata, local=self.local, port=srv.imaps_port, user=ALICE,
            password=srv.passwords[ALICE], cert=srv.root / "tls" / "cert.pem"))
        self.config.chmod(0o600)

    def run(self, *extra: str) -> str:
        """`offlineimap -o -u quiet` once; asserts exit 0 and no error or
        warning in its output; returns that output."""
        env = dict(os.environ, HOME=str(self.home))
        proc = subprocess.run([self.binary, "-c", str(self.config), "-o", "-u", "quiet", *extra],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=120)
        output = proc.stdout.decode("utf-8", "replace")
        assert proc.returncode == 0, (
            f"offlineimap exited {proc.returncode}\n{output}\n{self.srv.log_tail()}")
        assert not re.search(r"(?im)^\s*(ERROR|WARNING)", output), (
            f"offlineimap complained\n{output}\n{self.srv.log_tail()}")
        return output

    def folder(self, mailbox: str) -> Path:
        """The local Maildir of a server mailbox (A.B on the server is A/B)."""
        return self.local / mailbox.replace(".", "/")

    def folders(self) -> set[str]:
        """The local Maildirs, named as server mailboxes."""
        return {str(p.parent.relative_to(self.local)).replace("/", ".")
                for p in self.local.rglob("cur") if p.is_dir()}

    def make_folder(self, mailbox: str) -> None:
        for sub in ("cur", "new", "tmp"):
            (self.folder(mailbox) / sub).mkdir(parents=True)

    def messages(self, mailbox: str = "INBOX") -> dict[str, Path]:
        """{Message-ID: file} of a local mailbox."""
        d = self.folder(mailbox)
        files = [p for sub in ("new", "cur") if (d / sub).is_dir()
                 for p in (d / sub).iterdir() if p.is_file()]
        found = {header(p.read_bytes(), "Message-ID"): p for p in files}
        assert len(found) == len(files), f"duplicate Message-IDs in {d}: {files}"
        return found

    def add(self, mailbox: str, message: bytes) -> None:
        """Put a message (LF line ends, as MUAs write Maildirs) into new/."""
        d = self.folder(mailbox)
        name = f"{uuid.uuid4().hex}.local.example"
        (d / "tmp" / name).write_bytes(as_stored(message))
        os.rename(d / "tmp" / name, d / "new" / name)

    def snapshot(self) -> dict[str, bytes]:
        """Every file under the local tree: {path: content}."""
        return {str(p.relative_to(self.local)): p.read_bytes()
                for p in sorted(self.local.rglob("*")) if p.is_file()}


@pytest.fixture
def srv(make_mailsrv):
    """A running installation with alice; every start waits for IMAP."""
    return make_mailsrv(users=[ALICE], wait_for_imap=True)


@pytest.fixture
def offlineimap(srv, tmp_path) -> Offlineimap:
    binary = shutil.which("offlineimap")
    if binary is None:
        pytest.skip("offlineimap is not installed (test.sh installs offlineimap3)")
    return Offlineimap(srv, tmp_path / "offlineimap", binary)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def local_flags(path: Path) -> set[str]:
    """The IMAP flags of a local file's Maildir info letters."""
    return {LETTERS[c] for c in path.name.partition(":2,")[2] if c in LETTERS}


def set_local_flags(path: Path, letters: str) -> Path:
    """What a MUA does: move to cur/ with these info letters."""
    target = path.parent.parent / "cur" / f"{path.name.partition(':2,')[0]}:2,{letters}"
    os.rename(path, target)
    return target


def lf(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n")


def server_mailboxes(client) -> set[str]:
    data = imap_ok(client.list('""', "*"))
    return {parse_list(r)[2] for r in imaplib_responses(data)}


def server_messages(client, mailbox: str) -> dict[str, tuple[int, set[str], bytes]]:
    """{Message-ID: (UID, flags, BODY[])} of a mailbox, EXAMINEd so that
    looking changes nothing."""
    imap_ok(client.select(mailbox, readonly=True))
    fetched = imap_fetch(client, "1:*", "(UID FLAGS BODY.PEEK[])", uid=True)
    return {header(items["BODY[]"], "Message-ID"): (items["UID"], imap_flags(items["FLAGS"]),
                                                      items["BODY[]"])
            for items in fetched.values()}


def server_state(srv) -> dict[str, tuple[dict[str, int], dict]]:
    """Every mailbox of alice: (STATUS UIDVALIDITY UIDNEXT MESSAGES, messages)."""
    with srv.imaps(user=ALICE) as client:
        state = {}
        for mailbox in sorted(server_mailboxes(client)):
            data = imap_ok(client.status(mailbox, "(UIDVALIDITY UIDNEXT MESSAGES)"))
            state[mailbox] = (parse_status(data[0])[1], server_messages(client, mailbox))
        return state


def deliver(srv, n: int) -> list[bytes]:
    """Send `n` messages to alice and wait until they are in her INBOX."""
    sent = [srv.send(ALICE, make_message(f"offlineimap {uuid.uuid4().hex}", to=ALICE))
            for _ in range(n)]
    srv.wait_for_delivery(ALICE, sent)
    return sent


def message_id(message: bytes) -> str:
    return header(message, "Message-ID")


def assert_local_matches_server(offlineimap: Offlineimap, srv) -> None:
    """Every server mailbox is a local Maildir holding the same messages
    (content up to line ends) with the same flags, and nothing more."""
    state = server_state(srv)
    assert offlineimap.folders() == set(state)
    for mailbox, (_, messages) in state.items():
        local = offlineimap.messages(mailbox)
        assert set(local) == set(messages), mailbox
        for mid, (_, flags, body) in messages.items():
            assert lf(local[mid].read_bytes()) == lf(body), (mailbox, mid)
            assert local_flags(local[mid]) == flags, (mailbox, mid, local[mid].name)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

def test_server_tree_is_pulled_with_flags(srv, offlineimap):
    sent = deliver(srv, 2)
    on_server = {header(p.read_bytes(), "Message-ID"): p.read_bytes() for p in srv.messages(ALICE)}
    answered = make_message("read and answered")
    archived = make_message("archived on the server")
    nested = make_message("in Projects.Q1")
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.append("INBOX", r"(\Seen \Answered)", None, answered))
        imap_ok(client.append("Archive", r"(\Seen \Flagged)", None, archived))
        imap_ok(client.create("Projects"))
        imap_ok(client.create("Projects.Q1"))
        imap_ok(client.append("Projects.Q1", r"(\Draft)", None, nested))

    offlineimap.run()

    assert offlineimap.folders() == DEFAULT_MAILBOXES | {"Projects", "Projects.Q1"}
    assert (offlineimap.local / "Projects" / "Q1" / "cur").is_dir()
    local = offlineimap.messages()
    assert set(local) == set(map(message_id, sent)) | {message_id(answered)}
    for mid in map(message_id, sent):
        assert lf(local[mid].read_bytes()) == on_server[mid], mid
        assert local_flags(local[mid]) == set()
    assert lf(local[message_id(answered)].read_bytes()) == as_stored(answered)
    assert local_flags(local[message_id(answered)]) == {"\\seen", "\\answered"}
    [path] = offlineimap.messages("Archive").values()
    assert lf(path.read_bytes()) == as_stored(archived)
    assert local_flags(path) == {"\\seen", "\\flagged"}
    [path] = offlineimap.messages("Projects.Q1").values()
    assert lf(path.read_bytes()) == as_stored(nested)
    assert local_flags(path) == {"\\draft"}
    assert offlineimap.messages("Projects") == {}
    assert_local_matches_server(offlineimap, srv)


def test_local_changes_go_to_the_server_and_a_second_run_changes_nothing(srv, offlineimap):
    first, second = deliver(srv, 2)
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.append("Archive", r"(\Seen)", None, make_message("archived")))
    offlineimap.run()
    before = server_state(srv)

    set_local_flags(offlineimap.messages()[message_id(first)], "FS")
    written = make_message("written locally")
    offlineimap.add("INBOX", written)
    drafted = make_message("a local draft")
    offlineimap.add("Drafts", drafted)
    offlineimap.make_folder("Projects")
    offlineimap.make_folder("Projects.Q1")
    top, nested = make_message("in Projects"), make_message("in Projects/Q1")
    offlineimap.add("Projects", top)
    offlineimap.add("Projects.Q1", nested)
    # Meanwhile a flag changes on the server.
    with srv.imaps(user=ALICE) as client:
        uid = server_messages(client, "INBOX")[message_id(second)][0]
        imap_ok(client.select("INBOX"))
        imap_ok(client.uid("STORE", str(uid), "+FLAGS", r"(\Answered)"))

    offlineimap.run()

    state = server_state(srv)
    assert set(state) == DEFAULT_MAILBOXES | {"Projects", "Projects.Q1"}
    maildir = srv.maildir(ALICE)
    assert (maildir / ".Projects" / "cur").is_dir() and (maildir / ".Projects.Q1" / "cur").is_dir()
    inbox = state["INBOX"][1]
    assert set(inbox) == {message_id(m) for m in (first, second, written)}
    assert inbox[message_id(first)][1] == {"\\flagged", "\\seen"}
    assert inbox[message_id(second)][1] == {"\\answered"}
    assert inbox[message_id(written)][1] == set()
    assert lf(inbox[message_id(written)][2]) == as_stored(written)
    # The messages already there kept their UIDs under the same UIDVALIDITY.
    assert state["INBOX"][0]["UIDVALIDITY"] == before["INBOX"][0]["UIDVALIDITY"]
    for mid in map(message_id, (first, second)):
        assert inbox[mid][0] == before["INBOX"][1][mid][0], mid
        assert inbox[mid][2] == before["INBOX"][1][mid][2], mid
    assert state["Archive"] == before["Archive"]
    for mailbox, message in (("Drafts", drafted), ("Projects", top), ("Projects.Q1", nested)):
        [(_, flags, body)] = state[mailbox][1].values()
        assert lf(body) == as_stored(message), mailbox
        assert flags == set(), mailbox
    assert local_flags(offlineimap.messages()[message_id(second)]) == {"\\answered"}
    assert_local_matches_server(offlineimap, srv)

    local_before, server_before = offlineimap.snapshot(), state

    offlineimap.run()

    assert offlineimap.snapshot() == local_before, "the second run changed the local tree"
    assert server_state(srv) == server_before, "the second run changed the server"


def test_deletions_propagate_both_ways(srv, offlineimap):
    gone_locally, gone_on_server, kept = deliver(srv, 3)
    offlineimap.run()

    offlineimap.messages()[message_id(gone_locally)].unlink()
    with srv.imaps(user=ALICE) as client:
        uid = server_messages(client, "INBOX")[message_id(gone_on_server)][0]
        imap_ok(client.select("INBOX"))
        imap_ok(client.uid("STORE", str(uid), "+FLAGS", r"(\Deleted)"))
        imap_ok(client.expunge())

    offlineimap.run()

    with srv.imaps(user=ALICE) as client:
        assert set(server_messages(client, "INBOX")) == {message_id(kept)}
    assert set(offlineimap.messages()) == {message_id(kept)}
    maildir = srv.maildir(ALICE)
    files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert len(files) == 1, f"the expunged messages' files remain: {files}"
    assert_local_matches_server(offlineimap, srv)
