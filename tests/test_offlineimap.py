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
from pathlib import Path

import pytest

from mailtest import as_stored, header, imap_ok, make_message
from synctest import (
    ALICE, DEFAULT_MAILBOXES, LocalTree, deliver, local_flags, message_id, server_messages,
    server_state, set_local_flags,
)

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

class Offlineimap(LocalTree):
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





def lf(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n")












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
