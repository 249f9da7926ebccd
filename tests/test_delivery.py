"""Local delivery: what lands in the Maildir, byte for byte."""

import re
import shutil
import subprocess

import pytest

from mailtest import (
    as_stored, delivered_to, header, make_message, queued_id, strip_added_headers,
)

ALICE = "alice@example.test"
SENDER = "sender@remote.test"
# <secs>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<crlf size>
MAILDIR_NAME_RE = re.compile(r"^\d+\.M\d+P\d+Q\d+\.mx\.example\.test,S=(\d+),W=(\d+)$")


def assert_delivered(content: bytes, message: bytes, sender: str, mailbox: str) -> None:
    """`content` is `message` delivered to `mailbox` from `sender`."""
    first_line = content.split(b"\n", 1)[0]
    assert first_line == f"Return-Path: <{sender}>".encode("utf-8")
    assert delivered_to(content) == mailbox
    assert b"\r\n" not in content, "Maildir files must have LF line ends"
    assert strip_added_headers(content) == as_stored(message)


def test_smtplib_delivery_headers_and_body(mailsrv):
    mailsrv.add_user(ALICE)
    message = make_message("hello", body="Hello Alice,\nthis is the body.\n\n-- \nsender\n")

    mailsrv.send(ALICE, message, sender=SENDER)

    [path] = mailsrv.wait_for_messages(ALICE, 1)
    content = mailsrv.read_message(path)
    assert_delivered(content, message, SENDER, ALICE)
    received = header(content, "Received")
    assert received is not None and "mx.example.test" in received
    m = MAILDIR_NAME_RE.match(path.name)
    assert m, f"bad Maildir file name {path.name}"
    assert int(m[1]) == len(content)
    assert int(m[2]) == len(content) + content.count(b"\n")


def test_swaks_delivery(mailsrv):
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed")
    mailsrv.add_user("bob@example.test")

    proc = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{mailsrv.smtp_port}", "--helo", "client.example.test",
         "--to", "bob@example.test", "--from", "carol@remote.test",
         "--header", "Subject: swaks test", "--body", "sent by swaks"],
        capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as [0-9A-Z]{16}", proc.stdout), proc.stdout
    [path] = mailsrv.wait_for_messages("bob@example.test", 1)
    content = mailsrv.read_message(path)
    assert content.startswith(b"Return-Path: <carol@remote.test>\n")
    assert delivered_to(content) == "bob@example.test"
    assert header(content, "Subject") == "swaks test"
    assert content.rstrip(b"\n").endswith(b"\n\nsent by swaks")


def test_several_recipients_each_get_the_message(mailsrv):
    users = ["alice@example.test", "bob@example.test", "carol@example.test"]
    for user in users:
        mailsrv.add_user(user)
    message = make_message("for three", to=users[0])

    mailsrv.send(users, message)

    for user in users:
        [path] = mailsrv.wait_for_messages(user, 1)
        assert_delivered(mailsrv.read_message(path), message, SENDER, user)


def test_8bitmime_body_is_byte_exact(mailsrv):
    mailsrv.add_user(ALICE)
    body = ("Grüße aus Köln — ñ € 日本語\n".encode("utf-8")
            + bytes(range(0x80, 0x100)) + b"\n"
            + "Latin-1: caf\xe9\n".encode("latin-1"))
    message = make_message("8bit", body=body)

    with mailsrv.smtp() as s:
        assert s.ehlo()[0] == 250 and s.has_extn("8bitmime")
        assert s.sendmail(SENDER, [ALICE], message, mail_options=["BODY=8BITMIME"]) == {}

    [path] = mailsrv.wait_for_messages(ALICE, 1)
    assert_delivered(mailsrv.read_message(path), message, SENDER, ALICE)


UTF8_DOMAIN = "bücher.example"
UTF8_USER = "jürgen@bücher.example"
UTF8_SENDER = "grüße@absender.example"


def test_smtputf8_delivery(mailsrv):
    mailsrv.add_domain(UTF8_DOMAIN)
    mailsrv.add_user(UTF8_USER)
    message = make_message("Grüße", body="Hallo Jürgen!\n", sender=UTF8_SENDER, to=UTF8_USER)

    with mailsrv.smtp() as s:
        refused = s.sendmail(UTF8_SENDER, [UTF8_USER], message,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {}

    [path] = mailsrv.wait_for_messages(UTF8_USER, 1)
    assert path.parent.parent == mailsrv.mail_root / UTF8_DOMAIN / "jürgen"
    assert_delivered(mailsrv.read_message(path), message, UTF8_SENDER, UTF8_USER)


def test_utf8_address_without_smtputf8_is_refused(mailsrv):
    mailsrv.add_domain(UTF8_DOMAIN)
    mailsrv.add_user(UTF8_USER)

    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{UTF8_SENDER}>", 553, "5.6.7")
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250, "2.1.0")
        smtp.expect(f"RCPT TO:<{UTF8_USER}>", 553, "5.6.7")
        smtp.expect("QUIT", 221, "2.0.0")
    assert mailsrv.settle(UTF8_USER) == []


def test_dot_stuffing_round_trip(mailsrv):
    mailsrv.add_user(ALICE)
    body = ".\n..\n.leading\ntrailing.\n...three\n. space\nmiddle . dot\n.\n"
    message = make_message("dots", body=body)

    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
        smtp.expect(f"RCPT TO:<{ALICE}>", 250)
        code, lines = smtp.data(message)   # sends the dot-stuffed form
        assert code == 250, lines
        queued_id(lines)

    [path] = mailsrv.wait_for_messages(ALICE, 1)
    content = mailsrv.read_message(path)
    assert strip_added_headers(content) == as_stored(message)
    assert content.endswith(b"\n.\n..\n.leading\ntrailing.\n...three\n. space\nmiddle . dot\n.\n")
