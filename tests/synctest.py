"""What the tests of synchronising clients (mbsync, offlineimap) share:
alice's local Maildir tree as the client keeps it, and the server's state
read over IMAP to compare with it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from mailtest import (
    as_stored, header, imap_fetch, imap_flags, imap_ok, imaplib_responses, make_message,
    parse_list, parse_status,
)

ALICE = "alice@example.test"
DEFAULT_MAILBOXES = {"INBOX", "Sent", "Drafts", "Junk", "Trash", "Archive"}

# Maildir info letters <-> IMAP flags.
LETTERS = {"D": "\\draft", "F": "\\flagged", "R": "\\answered", "S": "\\seen", "T": "\\deleted"}


class LocalTree:
    """A client's local Maildir tree under `local`; subclasses say where a
    mailbox's Maildir is (`folder`)."""

    local: Path

    def folder(self, mailbox: str) -> Path:
        raise NotImplementedError

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
        """Every file under the local tree (state files included): {path: content}."""
        return {str(p.relative_to(self.local)): p.read_bytes()
                for p in sorted(self.local.rglob("*")) if p.is_file()}


def local_flags(path: Path) -> set[str]:
    """The IMAP flags of a local file's Maildir info letters."""
    return {LETTERS[c] for c in path.name.partition(":2,")[2] if c in LETTERS}


def set_local_flags(path: Path, letters: str) -> Path:
    """What a MUA does: move to cur/ with these info letters."""
    target = path.parent.parent / "cur" / f"{path.name.partition(':2,')[0]}:2,{letters}"
    os.rename(path, target)
    return target


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
    sent = [srv.send(ALICE, make_message(f"sync {uuid.uuid4().hex}", to=ALICE))
            for _ in range(n)]
    srv.wait_for_delivery(ALICE, sent)
    return sent


def message_id(message: bytes) -> str:
    return header(message, "Message-ID")
