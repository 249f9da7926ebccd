"""sendmail(1) and mailq(1): local programs queue mail through the
maildrop, even while the daemons are down; qmgr picks it up."""

import json
import os
import pwd
import subprocess
from conftest import BIN_DIR
from mailtest import header, wait_until

SENDMAIL = BIN_DIR / "sendmail"
ALICE = "alice@example.test"
BOB = "bob@example.test"


def sendmail(srv, *args: str, input: bytes, argv0: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run sendmail with the installation's config in $MAILSRV_CONFIG."""
    env = {**os.environ, "MAILSRV_CONFIG": str(srv.config_path)}
    program = str(SENDMAIL)
    result = subprocess.run([argv0 or program, *args], executable=program, input=input,
                            env=env, capture_output=True, timeout=30)
    if check:
        assert result.returncode == 0, \
            f"sendmail {args} exited {result.returncode}: {result.stderr.decode()}"
    return result


def test_sendmail_t_while_stopped_then_delivered(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB], start=False)
    message = (f"To: Alice <{ALICE}>\nBcc: {BOB}\nSubject: from cron\n\n"
               "a line\n..a dotted line\n").encode()
    sendmail(srv, "-t", "-i", input=message)
    drops = list((srv.spool_dir / "maildrop").iterdir())
    assert len(drops) == 1 and not drops[0].name.endswith(".tmp"), drops

    srv.start()
    [to_alice] = srv.wait_for_messages(ALICE, 1, timeout=15)
    [to_bob] = srv.wait_for_messages(BOB, 1, timeout=15)
    srv.wait_spool_empty()
    content = to_alice.read_bytes()
    assert to_bob.read_bytes().split(b"\n", 2)[2] == content.split(b"\n", 2)[2]
    assert header(content, "Subject") == "from cron"
    assert header(content, "Bcc") is None, "Bcc must not be delivered"
    # sendmail adds what RFC 5322 requires and the sender left out.
    assert header(content, "Date") and header(content, "Message-ID")
    assert f"@{srv.hostname}" in header(content, "From")
    assert f"from userid {os.getuid()}" in content.decode(), content
    assert b"\n..a dotted line\n" in content, "with -i, dots are not touched"
    login = pwd.getpwuid(os.getuid()).pw_name
    assert content.startswith(f"Return-Path: <{login}@{srv.hostname}>\n".encode()), content[:200]


def test_recipients_sender_and_dot_end(mailsrv):
    srv = mailsrv
    srv.add_user(ALICE)
    message = b"Subject: dots\nFrom: me@example.test\n\nfirst\n.\nnever sent\n"
    sendmail(srv, "-f", "robot@example.test", "-F", "Ro Bot", ALICE, input=message)
    [path] = srv.wait_for_messages(ALICE, 1, timeout=15)
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <robot@example.test>\n"), content[:200]
    assert header(content, "From") == "me@example.test", "an existing From is kept"
    assert content.rstrip(b"\n").endswith(b"first"), content
    assert b"never sent" not in content


def test_errors_have_sysexits_codes(mailsrv):
    srv = mailsrv
    none = sendmail(srv, input=b"Subject: x\n\nno one\n", check=False)
    assert none.returncode == 64, none
    assert b"no recipients" in none.stderr
    bad = sendmail(srv, "not an address", input=b"\n", check=False)
    assert bad.returncode == 65 and b"recipient" in bad.stderr, bad
    unknown = sendmail(srv, "-Z", ALICE, input=b"\n", check=False)
    assert unknown.returncode == 64 and b"unknown option" in unknown.stderr, unknown
    srv.set_config("smtpd.max_message_size", 1000)
    big = sendmail(srv, ALICE, input=b"Subject: big\n\n" + b"x" * 2000 + b"\n", check=False)
    assert big.returncode == 65 and b"larger than 1000" in big.stderr, big
    assert [p for p in (srv.spool_dir / "maildrop").iterdir()] == [], "a refused message was left"
    missing = subprocess.run([str(SENDMAIL), "-C", str(srv.root / "nope.toml"), ALICE],
                             input=b"\n", capture_output=True, timeout=30)
    assert missing.returncode == 78 and b"nope.toml" in missing.stderr, missing


def test_mailq_shows_deferred_mail_and_q_flushes(make_mailsrv):
    srv = make_mailsrv(config={"qmgr.min_backoff": 3600, "qmgr.max_backoff": 3600})
    far = "someone@far.example"
    sendmail(srv, far, input=b"Subject: to the world\n\nhello\n")

    def listed() -> str:
        return sendmail(srv, input=b"", argv0="mailq").stdout.decode()
    wait_until(lambda: "deferred" in listed(), 15, "the message deferred in mailq")
    text = listed()
    # far.example gets SERVFAIL from the tests' DNS server: 4.4.3, retried later.
    assert far in text and "4.4.3" in text, text
    assert sendmail(srv, "-bp", input=b"").stdout.decode().splitlines()[1:] \
        == text.splitlines()[1:]
    flushed = sendmail(srv, "-q", input=b"").stdout.decode()
    assert "1 message(s) queued for delivery now" in flushed, flushed
    wait_until(lambda: "deferred" in listed(), 15, "the flushed message deferred again")


def test_cron_style_call_and_headerless_input(mailsrv):
    srv = mailsrv
    srv.add_user(ALICE)
    # Debian's cron: sendmail -FCronDaemon -i -B8BITMIME -oem root; a bare
    # name is qualified with the host name, as Postfix appends $myorigin.
    sendmail(srv, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
             input=b"Subject: cron output\n\nok\n")
    wait_until(lambda: any(r["address"] == f"root@{srv.hostname}"
                           for e in json.loads(srv.ctl("queue", "list", "--json").stdout)
                           for r in e.get("recipients", [])),
               15, "root@hostname in the queue")
    # No header at all: ours go first, then the empty line, then the text.
    sendmail(srv, ALICE, input=b"just a line of text\nand another\n")
    [path] = srv.wait_for_messages(ALICE, 1, timeout=15)
    content = path.read_bytes()
    head, _, body = content.partition(b"\n\n")
    assert body == b"just a line of text\nand another\n", content
    assert header(content, "Date") and header(content, "From")


def test_bs_takes_a_pipelined_smtp_session_from_swaks(mailsrv):
    """`sendmail -bs`: swaks drives an SMTP session over the command's
    standard input and output; the message is queued via the maildrop."""
    srv = mailsrv
    srv.add_user(ALICE)
    env = {**os.environ, "MAILSRV_CONFIG": str(srv.config_path)}
    result = subprocess.run(
        ["swaks", "--pipe", f"{SENDMAIL} -bs", "--from", "robot@example.test",
         "--to", ALICE, "--header", "Subject: over -bs", "--body", ".dotted\nplain",
         "--pipeline"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout, result.stdout
    assert "STARTTLS" not in result.stdout and "AUTH" not in result.stdout
    [path] = srv.wait_for_messages(ALICE, 1, timeout=15)
    content = path.read_bytes()
    assert header(content, "Subject") == "over -bs"
    assert content.startswith(b"Return-Path: <robot@example.test>\n"), content[:200]
    assert b"\n.dotted\n" in content, "the client's dot-stuffing is undone"


def test_bs_refuses_what_a_local_session_cannot_do(mailsrv):
    srv = mailsrv
    env = {**os.environ, "MAILSRV_CONFIG": str(srv.config_path)}
    session = (b"EHLO me\r\nSTARTTLS\r\nAUTH PLAIN AGJvYgBwdw==\r\n"
               b"MAIL FROM:<a@example.test>\r\nRCPT TO:<x@far.example>\r\n"
               b"BDAT 6 LAST\r\nQUIT\r\nRSET\r\n" + b"X" * 2000 + b"\r\nQUIT\r\n")
    result = subprocess.run([str(SENDMAIL), "-bs"], input=session, env=env,
                            capture_output=True, timeout=30)
    replies = result.stdout.decode().splitlines()
    assert result.returncode == 0, result.stderr
    assert replies[0].startswith("220 "), replies
    assert "250-DSN" not in replies and "250-CHUNKING" not in replies, replies
    codes = [r[:3] for r in replies if not r.startswith("250-")][1:]
    # EHLO, STARTTLS, AUTH, MAIL, RCPT (any domain: a local user), BDAT and
    # its 6 bytes ("QUIT\r\n") dropped, RSET, the overlong line, QUIT.
    assert codes == ["250", "502", "503", "250", "250", "502", "250", "500", "221"], replies
    assert list((srv.spool_dir / "maildrop").iterdir()) == []
