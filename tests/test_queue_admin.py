"""`mailctl queue` (mailctl(8)): list, show, hold, release, requeue, flush
and delete, while qmgr runs.

Mail to far.example stays deferred: the tests' DNS server answers
SERVFAIL for it, so every MX lookup fails for now (last error 4.4.3);
these tests use such entries, and a local delivery that fails because a
file stands where the Maildir should be."""

import json
import shutil

import pytest

from mailtest import make_message, wait_until

ALICE = "alice@example.test"
FAR = "someone@far.example"
RELAY = {"smtpd.relay_networks": ["127.0.0.0/8"]}
# No automatic retry within a test: only the admin's commands move mail.
SLOW_RETRY = {**RELAY, "qmgr.min_backoff": 3600, "qmgr.max_backoff": 3600}


def entries(srv) -> dict[str, dict]:
    """`mailctl queue list --json`, by id."""
    out = srv.ctl("queue", "list", "--json").stdout
    return {e["id"]: e for e in json.loads(out)}


def state_of(srv, queue_id: str) -> str | None:
    e = entries(srv).get(queue_id)
    return e and e["state"]


def wait_state(srv, queue_id: str, state: str, timeout: float = 15) -> dict:
    wait_until(lambda: state_of(srv, queue_id) == state, timeout,
               f"{queue_id} to be {state}")
    return entries(srv)[queue_id]


def deferred_far(srv, subject: str, sender: str = "sender@remote.test") -> str:
    """Queue a message to a remote address and wait until it is deferred."""
    queue_id = srv.submit(FAR, make_message(subject, to=FAR, sender=sender), sender=sender)
    wait_state(srv, queue_id, "deferred")
    return queue_id


def test_list_and_show(make_mailsrv):
    srv = make_mailsrv(config=SLOW_RETRY)
    assert "Mail queue is empty" in srv.ctl("queue", "list").stdout
    queue_id = deferred_far(srv, "listed")

    entry = entries(srv)[queue_id]
    assert entry["sender"] == "sender@remote.test"
    assert entry["size"] > 0 and entry["attempts"] == 1
    [rcpt] = entry["recipients"]
    assert rcpt["address"] == FAR
    assert rcpt["last_error"].startswith("4.4.3"), rcpt

    text = srv.ctl("queue", "list").stdout
    assert queue_id in text and "deferred" in text and FAR in text, text
    assert rcpt["last_error"] in text, text
    assert "in 1 message(s)" in text, text

    shown = srv.ctl("queue", "show", queue_id).stdout
    assert "state: deferred" in shown, shown
    assert "Subject: listed" in shown, shown
    assert f'"id": "{queue_id}"' in shown, shown

    missing = srv.ctl("queue", "show", "1AAAAAAAAAAAAAAA", check=False)
    assert missing.returncode != 0 and "no message" in missing.stderr


def test_hold_release_and_requeue_while_qmgr_runs(make_mailsrv):
    srv = make_mailsrv(config={**RELAY, "qmgr.min_backoff": 1, "qmgr.max_backoff": 1})
    queue_id = deferred_far(srv, "held")

    srv.ctl("queue", "hold", queue_id)
    held = wait_state(srv, queue_id, "hold")
    attempts = held["attempts"]
    # A held message is not retried, though its retry time passes.
    with pytest.raises(AssertionError):
        wait_until(lambda: entries(srv)[queue_id]["attempts"] > attempts, 3, "a retry")
    assert state_of(srv, queue_id) == "hold"

    srv.ctl("queue", "release", queue_id)
    wait_until(lambda: entries(srv)[queue_id]["attempts"] > attempts, 15,
               "the released message to be tried again")

    srv.ctl("queue", "hold", queue_id, check=False)
    wait_state(srv, queue_id, "hold")
    srv.ctl("queue", "requeue", queue_id)
    wait_until(lambda: entries(srv)[queue_id]["attempts"] > attempts + 1, 15,
               "the requeued message to be tried again")

    # Releasing what is not held is an error that names the message.
    result = srv.ctl("queue", "release", queue_id, "1AAAAAAAAAAAAAAA", check=False)
    assert result.returncode != 0
    assert queue_id in result.stderr and "no such message" in result.stderr, result.stderr


def test_flush_retries_now(make_mailsrv):
    srv = make_mailsrv(config=SLOW_RETRY)
    srv.add_user(ALICE)
    maildir = srv.maildir(ALICE)
    shutil.rmtree(maildir)
    maildir.write_text("not a maildir\n")   # every delivery fails
    queue_id = srv.submit(ALICE, make_message("flushed", to=ALICE))
    wait_state(srv, queue_id, "deferred")

    maildir.unlink()
    srv.ctl("queue", "flush")
    [path] = srv.wait_for_messages(ALICE, 1, timeout=15)
    assert b"Subject: flushed" in path.read_bytes()
    srv.wait_spool_empty()


def test_delete_by_id_sender_recipient_and_all(make_mailsrv):
    srv = make_mailsrv(config=SLOW_RETRY)
    one = deferred_far(srv, "one")
    two = deferred_far(srv, "two", sender="other@remote.test")
    three = deferred_far(srv, "three")
    four = deferred_far(srv, "four")

    srv.ctl("queue", "delete", one)
    assert one not in entries(srv)
    assert not (srv.spool_dir / "data" / one).exists(), "message file left behind"

    srv.ctl("queue", "delete", "--from", "other@remote.test")
    assert set(entries(srv)) == {three, four}

    srv.ctl("queue", "hold", three)
    wait_state(srv, three, "hold")
    srv.ctl("queue", "delete", "--to", FAR.upper())
    assert entries(srv) == {}

    five = deferred_far(srv, "five")
    srv.ctl("queue", "delete", "--all")
    assert five not in entries(srv)
    srv.wait_spool_empty()

    nothing = srv.ctl("queue", "delete", check=False)
    assert nothing.returncode != 0 and "--all" in nothing.stderr
    gone = srv.ctl("queue", "delete", five, check=False)
    assert gone.returncode != 0 and "no such message" in gone.stderr
