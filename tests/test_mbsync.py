"""mbsync (isync 1.4) as a real IMAP client: alice's mailboxes on the
server and a local Maildir++ tree kept in step both ways over IMAPS (new
messages, flags, deletions, a folder made locally), and a second run that
finds nothing left to do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mailtest import as_stored, header, imap_ok, make_message
from synctest import (
    ALICE, DEFAULT_MAILBOXES, LocalTree, deliver, local_flags, message_id, server_mailboxes,
    server_messages, server_state, set_local_flags,
)

# isync 1.4.4 checks the certificate's name even for a certificate given in
# CertificateFile, so Host is `localhost`, one of the names `mailctl init`
# puts in its self-signed certificate; it resolves to 127.0.0.1.
CONFIG = """\
IMAPAccount server
Host localhost
Port {port}
User "{user}"
Pass "{password}"
SSLType IMAPS
SSLVersions TLSv1.2 TLSv1.3
CertificateFile {cert}
SystemCertificates no
Timeout 30

IMAPStore remote
Account server

MaildirStore local
Inbox {inbox}
SubFolders Maildir++

Channel alice
Far :remote:
Near :local:
Patterns INBOX *
Create Both
Expunge Both
SyncState *
"""

class Mbsync(LocalTree):
    """mbsync for alice with a local Maildir++ tree in `local`."""

    def __init__(self, srv, home: Path, binary: str):
        self.srv = srv
        self.home = home
        self.binary = binary
        self.local = home / "Mail"
        for sub in ("cur", "new", "tmp"):
            (self.local / sub).mkdir(parents=True)
        self.config = home / "mbsyncrc"
        self.config.write_text(CONFIG.format(
            port=srv.imaps_port, user=ALICE, password=srv.passwords[ALICE],
            cert=srv.root / "tls" / "cert.pem", inbox=self.local))
        self.config.chmod(0o600)

    def run(self) -> str:
        """`mbsync -a` once; asserts exit 0; returns its output."""
        env = dict(os.environ, HOME=str(self.home))
        proc = subprocess.run([self.binary, "-V", "-c", str(self.config), "-a"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=120)
        output = proc.stdout.decode("utf-8", "replace")
        assert proc.returncode == 0, (
            f"mbsync exited {proc.returncode}\n{output}\n{self.srv.log_tail()}")
        return output

    def folder(self, mailbox: str) -> Path:
        """The local Maildir of a mailbox (Maildir++: `.A.B` for A/B)."""
        return self.local if mailbox == "INBOX" else self.local / ("." + mailbox.replace("/", "."))





@pytest.fixture
def srv(make_mailsrv):
    """A running installation with alice; every start waits for IMAP."""
    return make_mailsrv(users=[ALICE], wait_for_imap=True)


@pytest.fixture
def mbsync(srv, tmp_path) -> Mbsync:
    binary = shutil.which("mbsync")
    if binary is None:
        pytest.skip("mbsync is not installed (test.sh installs isync)")
    return Mbsync(srv, tmp_path / "mbsync", binary)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------





def without_tuid(content: bytes) -> bytes:
    """The content without the X-TUID header mbsync may add while copying,
    with LF line ends."""
    return re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", content.replace(b"\r\n", b"\n"))












# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

def test_server_mail_appears_locally(srv, mbsync):
    sent = deliver(srv, 2)
    on_server = {header(p.read_bytes(), "Message-ID"): p.read_bytes() for p in srv.messages(ALICE)}
    archived = make_message("archived on the server")
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.append("Archive", r"(\Seen \Flagged)", None, archived))

    mbsync.run()

    local = mbsync.messages()
    assert set(local) == set(map(message_id, sent))
    for mid, path in local.items():
        assert without_tuid(path.read_bytes()) == on_server[mid], mid
        assert local_flags(path) == set()
    [path] = mbsync.messages("Archive").values()
    assert without_tuid(path.read_bytes()) == as_stored(archived)
    assert local_flags(path) == {"\\seen", "\\flagged"}
    for mailbox in DEFAULT_MAILBOXES - {"INBOX"}:
        assert (mbsync.folder(mailbox) / "cur").is_dir(), f"{mailbox} was not created locally"


def test_local_mail_and_flags_go_to_the_server(srv, mbsync):
    first, second = deliver(srv, 2)
    mbsync.run()

    local = mbsync.messages()
    set_local_flags(local[message_id(first)], "FS")
    written = make_message("written locally")
    mbsync.add("INBOX", written)
    drafted = make_message("a local draft")
    mbsync.add("Drafts", drafted)
    # Meanwhile a flag changes on the server.
    with srv.imaps(user=ALICE) as client:
        uid = server_messages(client, "INBOX")[message_id(second)][0]
        imap_ok(client.select("INBOX"))
        imap_ok(client.uid("STORE", str(uid), "+FLAGS", r"(\Answered)"))

    mbsync.run()

    with srv.imaps(user=ALICE) as client:
        inbox = server_messages(client, "INBOX")
        drafts = server_messages(client, "Drafts")
    assert set(inbox) == {message_id(m) for m in (first, second, written)}
    assert inbox[message_id(first)][1] == {"\\flagged", "\\seen"}
    assert without_tuid(inbox[message_id(written)][2]) == as_stored(written)
    assert set(drafts) == {message_id(drafted)}
    assert local_flags(mbsync.messages()[message_id(second)]) == {"\\answered"}


def test_a_local_folder_is_created_on_the_server(srv, mbsync):
    mbsync.run()
    for mailbox in ("Projects", "Projects/Q1"):
        for sub in ("cur", "new", "tmp"):
            (mbsync.folder(mailbox) / sub).mkdir(parents=True)
    top, nested = make_message("in Projects"), make_message("in Projects/Q1")
    mbsync.add("Projects", top)
    mbsync.add("Projects/Q1", nested)

    mbsync.run()

    with srv.imaps(user=ALICE) as client:
        assert server_mailboxes(client) == DEFAULT_MAILBOXES | {"Projects", "Projects.Q1"}
        assert set(server_messages(client, "Projects")) == {message_id(top)}
        assert set(server_messages(client, "Projects.Q1")) == {message_id(nested)}
    maildir = srv.maildir(ALICE)
    assert (maildir / ".Projects" / "cur").is_dir() and (maildir / ".Projects.Q1" / "cur").is_dir()


def test_deletions_are_expunged_both_ways(srv, mbsync):
    gone_locally, gone_on_server, kept = deliver(srv, 3)
    mbsync.run()

    mbsync.messages()[message_id(gone_locally)].unlink()
    with srv.imaps(user=ALICE) as client:
        uid = server_messages(client, "INBOX")[message_id(gone_on_server)][0]
        imap_ok(client.select("INBOX"))
        imap_ok(client.uid("STORE", str(uid), "+FLAGS", r"(\Deleted)"))
        imap_ok(client.expunge())

    mbsync.run()

    with srv.imaps(user=ALICE) as client:
        assert set(server_messages(client, "INBOX")) == {message_id(kept)}
    assert set(mbsync.messages()) == {message_id(kept)}
    maildir = srv.maildir(ALICE)
    files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert len(files) == 1, f"the expunged messages' files remain: {files}"


def test_a_second_run_changes_nothing(srv, mbsync):
    deliver(srv, 2)
    with srv.imaps(user=ALICE) as client:
        imap_ok(client.append("Archive", r"(\Seen)", None, make_message("archived")))
    mbsync.run()
    # Changes on both sides, in several mailboxes, for the run that follows.
    set_local_flags(next(iter(mbsync.messages().values())), "RS")
    mbsync.add("INBOX", make_message("written locally"))
    for sub in ("cur", "new", "tmp"):
        (mbsync.folder("Projects") / sub).mkdir(parents=True)
    mbsync.add("Projects", make_message("in Projects"))
    [more] = deliver(srv, 1)
    mbsync.run()

    local_before, server_before = mbsync.snapshot(), server_state(srv)
    assert message_id(more) in server_before["INBOX"][1]
    assert message_id(more) in mbsync.messages()
    assert "Projects" in server_before

    mbsync.run()

    assert mbsync.snapshot() == local_before, "the second run changed the local tree"
    assert server_state(srv) == server_before, "the second run changed the server"
