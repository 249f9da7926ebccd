"""The SMTP dialogue: extensions, limits, errors and hostile input."""

import re

from mailtest import (
    ENHANCED_LINE_RE, RawSMTP, as_stored, make_message, queued_id, strip_added_headers,
)

ALICE = "alice@example.test"
BOB = "bob@example.test"
SENDER = "sender@remote.test"
DEFAULT_MAX_SIZE = 26214400


def start_transaction(smtp, *recipients, sender=SENDER):
    """EHLO, MAIL and RCPT for each recipient, all expected to succeed."""
    smtp.ehlo()
    smtp.expect(f"MAIL FROM:<{sender}>", 250, "2.1.0")
    for rcpt in recipients:
        smtp.expect(f"RCPT TO:<{rcpt}>", 250, "2.1.5")


def test_greeting_and_ehlo_extensions(mailsrv):
    with RawSMTP(mailsrv.smtp_port) as smtp:
        greeting = smtp.greeting()
        assert re.match(r"mx\.example\.test ESMTP mailsrv\b", greeting), greeting
        extensions = smtp.ehlo()
    for keyword in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                    "CHUNKING", "HELP"):
        assert keyword in extensions, extensions
    assert extensions.get("SIZE") == str(DEFAULT_MAX_SIZE)


def test_pipelined_transaction(mailsrv):
    mailsrv.add_user(ALICE)
    mailsrv.add_user(BOB)
    message = make_message("pipelined")

    with mailsrv.raw() as smtp:
        assert "PIPELINING" in smtp.ehlo()
        smtp.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n")
        for code, enhanced in ((250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5")):
            smtp.check_reply(smtp.read_reply(), code, enhanced)
        smtp.check_reply(smtp.read_reply(), 354)
        smtp.send(message + b".\r\n")
        queued_id(smtp.check_reply(smtp.read_reply(), 250, "2.0.0"))

    for user in (ALICE, BOB):
        [path] = mailsrv.wait_for_messages(user, 1)
        assert strip_added_headers(mailsrv.read_message(path)) == as_stored(message)


def test_bdat_three_chunks(mailsrv):
    mailsrv.add_user(ALICE)
    # BDAT has no dot-stuffing: the "." and ".." lines are message content.
    message = make_message("chunked", body="first\n.\n..\nsecond line\nend\n")
    cuts = (len(message) // 3, 2 * len(message) // 3)
    cut_in_crlf = message.index(b"\r\n", cuts[0]) + 1   # split a CRLF across chunks
    assert cut_in_crlf < cuts[1]
    chunks = [message[:cut_in_crlf], message[cut_in_crlf:cuts[1]], message[cuts[1]:]]

    with mailsrv.raw() as smtp:
        assert "CHUNKING" in smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
        smtp.expect(f"RCPT TO:<{ALICE}>", 250)
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            smtp.send(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
            reply = smtp.check_reply(smtp.read_reply(), 250, context=f"chunk {i}")
        queued_id(reply)

    [path] = mailsrv.wait_for_messages(ALICE, 1)
    content = mailsrv.read_message(path)
    assert strip_added_headers(content) == as_stored(message)
    assert content.endswith(b"\n\nfirst\n.\n..\nsecond line\nend\n")


def test_size_parameter_over_limit(mailsrv):
    with mailsrv.raw() as smtp:
        max_size = int(smtp.ehlo()["SIZE"])
        smtp.expect(f"MAIL FROM:<a@remote.test> SIZE={max_size + 1}", 552, "5.3.4")
        smtp.expect(f"MAIL FROM:<a@remote.test> SIZE={max_size}", 250, "2.1.0")


def test_data_over_limit_is_refused(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.max_message_size": 10000})
    srv.add_user(ALICE)
    big = make_message("too big", body=("x" * 98 + "\n") * 200)   # about 20 KB

    with srv.raw() as smtp:
        assert smtp.ehlo()["SIZE"] == "10000"
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
        smtp.expect(f"RCPT TO:<{ALICE}>", 250)
        smtp.check_reply(smtp.data(big), 552, "5.3.4")
        smtp.expect("QUIT", 221)
    assert srv.settle(ALICE) == []


def test_unknown_recipient(mailsrv):
    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
        smtp.expect("RCPT TO:<nobody@example.test>", 550, "5.1.1")


def test_relay_denied(mailsrv):
    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
        lines = smtp.expect("RCPT TO:<user@elsewhere.test>", 554, "5.7.1")
    assert "relay access denied" in " ".join(lines).lower()


def test_relay_allowed_from_relay_networks(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.relay_networks": ["127.0.0.0/8"]})
    with srv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{SENDER}>", 250)
        smtp.expect("RCPT TO:<user@elsewhere.test>", 250, "2.1.5")


def assert_refused_and_closed(srv, payload: bytes) -> None:
    """Send a DATA payload that has a bare CR or LF: 521 5.5.2, then close."""
    with srv.raw() as smtp:
        start_transaction(smtp, ALICE)
        smtp.expect("DATA", 354)
        smtp.send(payload)
        smtp.check_reply(smtp.read_reply(), 521, "5.5.2", payload)
        assert smtp.closed(), f"connection still open after 521 for {payload!r}"


def test_bare_line_ends_in_data(mailsrv):
    mailsrv.add_user(ALICE)
    for payload in (b"Subject: bare LF\r\n\r\nline one\n.\r\n",
                    b"Subject: bare CR\r\n\r\nline one\rline two\r\n.\r\n"):
        assert_refused_and_closed(mailsrv, payload)
    assert mailsrv.settle(ALICE) == []


def test_smtp_smuggling_is_refused(mailsrv):
    mailsrv.add_user(ALICE)
    smuggled = (f"MAIL FROM:<admin@example.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
                "Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n").encode()
    for fake_end in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"):
        payload = b"Subject: cover\r\n\r\nhello" + fake_end + smuggled + b"QUIT\r\n"
        assert_refused_and_closed(mailsrv, payload)
    assert mailsrv.settle(ALICE) == []


def test_vrfy(mailsrv):
    mailsrv.add_user(ALICE)
    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect("VRFY alice", 252, "2.5.0")


def test_rcpt_before_mail(mailsrv):
    mailsrv.add_user(ALICE)
    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect(f"RCPT TO:<{ALICE}>", 503, "5.5.1")


def test_too_many_recipients(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.max_recipients": 3})
    users = [f"user{i}@example.test" for i in range(4)]
    for user in users:
        srv.add_user(user)
    message = make_message("three of four")

    with srv.raw() as smtp:
        start_transaction(smtp, *users[:3])
        smtp.expect(f"RCPT TO:<{users[3]}>", 452, "4.5.3")
        queued_id(smtp.check_reply(smtp.data(message), 250, "2.0.0"))

    for user in users[:3]:
        srv.wait_for_messages(user, 1)
    assert srv.settle(users[3]) == []


def test_too_many_errors(make_mailsrv):
    max_errors = 3
    srv = make_mailsrv(config={"smtpd.max_errors": max_errors})
    with srv.raw() as smtp:
        smtp.ehlo()
        codes = []
        while len(codes) <= max_errors:
            code, lines = smtp.command("BOGUS")
            codes.append(code)
            if code == 421:
                assert lines[0].startswith("4.7.0"), lines
                break
        assert codes[-1] == 421, f"no 421 after {codes}"
        # 421 comes with the max_errors-th error (or at the latest the next one).
        assert len(codes) in (max_errors, max_errors + 1), codes
        assert all(500 <= c < 600 for c in codes[:-1]), codes
        assert smtp.closed()


def test_command_timeout(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.command_timeout": 2})
    with srv.raw() as smtp:
        smtp.ehlo()
        smtp.timeout = 15
        smtp.check_reply(smtp.read_reply(), 421, "4.4.2")
        assert smtp.closed()


def test_simple_commands(mailsrv):
    with mailsrv.raw() as smtp:
        smtp.ehlo()
        smtp.expect("NOOP", 250, "2.0.0")
        smtp.expect("RSET", 250, "2.0.0")
        smtp.expect("MAIL FROM:<>", 250, "2.1.0")   # null sender (bounces)
        smtp.expect("MAIL FROM:<again@remote.test>", 503, "5.5.1")
        smtp.expect("RSET", 250, "2.0.0")
        smtp.expect("MAIL FROM:<again@remote.test>", 250, "2.1.0")
        smtp.expect("QUIT", 221, "2.0.0")
        assert smtp.closed()


def test_every_reply_has_an_enhanced_code(mailsrv):
    mailsrv.add_user(ALICE)
    with mailsrv.raw() as smtp:
        smtp.ehlo()
        after_ehlo = len(smtp.history)
        for command in ("NOOP", "HELP", "VRFY alice", "RSET", f"RCPT TO:<{ALICE}>",
                        "DATA", "MAIL FROM:broken", f"MAIL FROM:<{SENDER}>",
                        f"MAIL FROM:<{SENDER}>", "RCPT TO:<nobody@example.test>",
                        "RCPT TO:<user@elsewhere.test>", f"RCPT TO:<{ALICE}>", "BOGUS"):
            smtp.command(command)
        smtp.data(make_message("codes"))
        smtp.command("QUIT")
        # RFC 2034 3: 2xx, 4xx and 5xx replies carry the code; the greeting,
        # the EHLO reply and 354 (intermediate) do not need one.
        lines = [line for reply in smtp.history[after_ehlo:] for line in reply
                 if not line.startswith("3")]
        assert len(lines) >= 15

    bad = [line for line in lines if not ENHANCED_LINE_RE.match(line)]
    assert bad == [], f"reply lines without an enhanced status code: {bad}"
    # RFC 3463 2: the class of the enhanced code matches the reply code.
    mismatched = [line for line in lines if line[0] != line[4]]
    assert mismatched == [], mismatched


def test_mail_loop_is_refused(make_mailsrv):
    # RFC 5321 6.3: more Received: fields than smtpd.max_received_headers
    # means a loop; refused at the end of DATA or BDAT, nothing queued.
    srv = make_mailsrv(config={"smtpd.max_received_headers": 3})
    srv.add_user(ALICE)

    def with_hops(n: int, subject: str) -> bytes:
        hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; "
                       f"Sat, 21 Nov 2026 12:00:0{i} +0000\r\n" for i in range(n))
        body = "Received: in the body is not a hop\r\n" * 5
        return hops.encode() + make_message(subject, body=body)

    with srv.raw() as smtp:
        start_transaction(smtp, ALICE)
        smtp.check_reply(smtp.data(with_hops(3, "three hops")), 250, "2.0.0")
        start_transaction(smtp, ALICE)
        smtp.check_reply(smtp.data(with_hops(4, "looping")), 554, "5.4.6")
        start_transaction(smtp, ALICE)
        looping = with_hops(4, "looping in chunks")
        smtp.send(f"BDAT {len(looping)} LAST\r\n".encode() + looping)
        smtp.check_reply(smtp.read_reply(), 554, "5.4.6")
        # The session goes on.
        start_transaction(smtp, ALICE)
        smtp.check_reply(smtp.data(with_hops(0, "no hops")), 250, "2.0.0")

    paths = srv.wait_for_messages(ALICE, 2)
    subjects = sorted(srv.read_message(p).split(b"Subject: ")[1].split(b"\n")[0] for p in paths)
    assert subjects == [b"no hops", b"three hops"]
    srv.wait_spool_empty()
