"""Message submission (RFC 6409, RFC 8314): STARTTLS (RFC 3207), AUTH
(RFC 4954), sender checks, failed-login throttling, certificate reload, and
the limits of the command loop (smtpd(8))."""

from __future__ import annotations

import base64
import os
import re
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from mailtest import (
    CLIENT_NAME, LOCALHOST, RawSMTP, as_stored, header, insecure_tls_context, make_message,
    queued_id, strip_added_headers, wait_until,
)

REPO = Path(__file__).resolve().parent.parent
BIN_DIR = Path(os.environ.get("MAILSRV_BIN_DIR", REPO / "target" / "debug")).resolve()
SMTPD = BIN_DIR / "smtpd"

ALICE = "alice@example.test"
BOB = "bob@example.test"
FAR = "someone@far.example"
SENDER = "sender@remote.test"

# `(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)` in a Received: header.
TLS_CLAUSE_RE = re.compile(r"\(using TLSv1\.3 with cipher TLS_[A-Z0-9_]+\)")
AUTH_FAILED = "smtp authentication failed: user=<{user}>, rip={ip}"


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

class Smtp(RawSMTP):
    """RawSMTP that may start in TLS (the submissions port), connect from a
    chosen loopback address, and switch to TLS with STARTTLS."""

    def __init__(self, port: int, tls: bool = False, source: str | None = None,
                 timeout: float = 10.0):
        # RawSMTP's constructor cannot start TLS or bind a source address;
        # this sets up the same state RawLineClient would.
        self.timeout = timeout
        self.sock = socket.create_connection(
            (LOCALHOST, port), timeout=timeout,
            source_address=None if source is None else (source, 0))
        if tls:
            try:
                self.sock = insecure_tls_context().wrap_socket(self.sock)
            except BaseException:
                self.sock.close()
                raise
        self._buf = b""
        self.eof = False
        self.history: list[list[str]] = []

    @property
    def tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    def starttls(self) -> None:
        """STARTTLS (220 2.0.0), then the TLS handshake."""
        self.expect("STARTTLS", 220, "2.0.0")
        assert self._buf == b"", f"bytes after the STARTTLS reply: {self._buf!r}"
        self.sock = insecure_tls_context().wrap_socket(self.sock)

    def peer_cert(self) -> bytes:
        assert self.tls, "not in TLS"
        return self.sock.getpeercert(binary_form=True)

    def auth_plain(self, user: str, password: str, code: int = 235,
                   enhanced: str = "2.7.0") -> list[str]:
        """AUTH PLAIN with an initial response; asserts the reply."""
        return self.expect(f"AUTH PLAIN {plain(user, password)}", code, enhanced)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    """A SASL PLAIN response (RFC 4616), base64."""
    return b64(f"{authzid}\0{user}\0{password}")


def connect(srv, port: int, tls: bool = False, source: str | None = None) -> Smtp:
    """A connection whose 220 greeting has been read."""
    conn = Smtp(port, tls=tls, source=source)
    try:
        conn.greeting()
    except BaseException:
        conn.close()
        raise
    return conn


def submission(srv, user: str | None = None, source: str | None = None) -> Smtp:
    """The submission port after EHLO, STARTTLS and EHLO again; logged in
    as `user` (AUTH PLAIN) if given."""
    conn = connect(srv, srv.submission_port, source=source)
    try:
        conn.ehlo()
        conn.starttls()
        conn.ehlo()
        if user is not None:
            conn.auth_plain(user, srv.passwords[user])
    except BaseException:
        conn.close()
        raise
    return conn


def submissions(srv, user: str | None = None, source: str | None = None) -> Smtp:
    """The submissions port (implicit TLS) after EHLO; logged in as `user`
    if given."""
    conn = connect(srv, srv.submissions_port, tls=True, source=source)
    try:
        conn.ehlo()
        if user is not None:
            conn.auth_plain(user, srv.passwords[user])
    except BaseException:
        conn.close()
        raise
    return conn


def transaction(conn: Smtp, sender: str, recipient: str, message: bytes) -> str:
    """MAIL, RCPT, DATA, all accepted; returns the queue id."""
    conn.expect(f"MAIL FROM:<{sender}>", 250, "2.1.0")
    conn.expect(f"RCPT TO:<{recipient}>", 250, "2.1.5")
    return queued_id(RawSMTP.check_reply(conn.data(message), 250, "2.0.0", "end of data"))


def delivered(srv, addr: str, message: bytes) -> bytes:
    """Wait until `message` (by Message-ID) is in addr's INBOX; its content."""
    srv.wait_for_delivery(addr, [message])
    wanted = header(message, "Message-ID")
    inbox = srv.maildir(addr)
    for path in sorted(inbox.glob("new/*")) + sorted(inbox.glob("cur/*")):
        content = path.read_bytes()
        if header(content, "Message-ID") == wanted:
            return content
    raise AssertionError(f"{wanted} vanished from {inbox}")


def wait_for_subject(srv, addr: str, subject: str, timeout: float = 20) -> bytes:
    """The content of the message with `subject` once it is in addr's new/."""
    def found() -> bytes | None:
        for path in srv.messages(addr):
            content = path.read_bytes()
            if header(content, "Subject") == subject:
                return content
        return None
    try:
        return wait_until(found, timeout, f"a message with subject {subject!r} for {addr}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{srv.log_tail()}") from None


def wait_for_log(srv, text: str, count: int = 1, timeout: float = 10) -> str:
    """Wait until the daemon log holds `text` at least `count` times."""
    try:
        wait_until(lambda: srv.log().count(text) >= count, timeout,
                   f"{count} log line(s) with {text!r}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{srv.log_tail()}") from None
    return srv.log()


def received_of(content: bytes) -> str:
    received = header(content, "Received")
    assert received is not None, f"no Received header in {content[:500]!r}"
    return received


def pem_der(path: Path) -> bytes:
    """The DER form of the first certificate in a PEM file."""
    text = path.read_text()
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    assert m, f"no certificate in {path}"
    return ssl.PEM_cert_to_DER_cert(m[0])


def new_certificate(tls_dir: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate and key, made with openssl in
    `tls_dir` under temporary names; returns (cert, key)."""
    tag = uuid.uuid4().hex[:8]
    cert, key = tls_dir / f"new-cert-{tag}.pem", tls_dir / f"new-key-{tag}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=localhost", "-days", "2", "-keyout", str(key), "-out", str(cert)],
        stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=60)
    return cert, key


def srv_cert(srv) -> tuple[Path, Path]:
    tls = srv.config()["tls"]
    return srv.root / tls["cert"], srv.root / tls["key"]


# --------------------------------------------------------------------------
# Submission with real clients
# --------------------------------------------------------------------------

def test_smtplib_starttls_login_and_received_header(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    message = make_message("submitted over STARTTLS", sender=ALICE, to=BOB)

    with smtplib.SMTP(LOCALHOST, srv.submission_port, local_hostname=CLIENT_NAME,
                      timeout=15) as client:
        client.ehlo()
        assert client.has_extn("starttls"), client.esmtp_features
        assert not client.has_extn("auth"), f"AUTH offered before TLS: {client.esmtp_features}"
        code, _ = client.starttls(context=insecure_tls_context())
        assert code == 220
        client.ehlo()
        assert not client.has_extn("starttls"), "STARTTLS offered again inside TLS"
        assert set(client.esmtp_features.get("auth", "").upper().split()) >= {"PLAIN", "LOGIN"}, \
            client.esmtp_features
        code, _ = client.login(ALICE, srv.passwords[ALICE])
        assert code == 235
        assert client.sendmail(ALICE, [BOB], message) == {}

    content = delivered(srv, BOB, message)
    assert strip_added_headers(content) == as_stored(message)
    assert header(content, "Return-Path") == f"<{ALICE}>"
    received = received_of(content)
    assert received.startswith(f"from {CLIENT_NAME} ([127.0.0.1])"), received
    assert TLS_CLAUSE_RE.search(received), f"no TLS version and cipher: {received}"
    assert re.search(r"\bwith ESMTPSA\b", received), received
    # Only the fact of authentication, not who (received_auth_user is off).
    assert "alice" not in received.lower(), received
    assert "authenticated sender" not in received.lower(), received


def test_smtplib_ssl_on_submissions_port_with_login(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    message = make_message("submitted over implicit TLS", sender=ALICE, to=BOB)

    with smtplib.SMTP_SSL(LOCALHOST, srv.submissions_port, local_hostname=CLIENT_NAME,
                          timeout=15, context=insecure_tls_context()) as client:
        client.ehlo()
        assert not client.has_extn("starttls"), "STARTTLS offered on the implicit-TLS port"
        assert "LOGIN" in client.esmtp_features.get("auth", "").upper().split()
        # The LOGIN mechanism: user name as initial response, password after 334.
        client.user, client.password = ALICE, srv.passwords[ALICE]
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        assert client.sendmail(ALICE, [BOB], message) == {}

    received = received_of(delivered(srv, BOB, message))
    assert TLS_CLAUSE_RE.search(received), received
    assert re.search(r"\bwith ESMTPSA\b", received), received


def test_swaks(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    runs = (("plain", srv.submission_port, "--tls", "PLAIN"),
            ("login", srv.submissions_port, "--tls-on-connect", "LOGIN"))
    for name, port, tls_option, mechanism in runs:
        subject = f"swaks {name} {uuid.uuid4().hex}"
        command = ["swaks", "--server", LOCALHOST, "--port", str(port), tls_option,
                   "--auth", mechanism, "--auth-user", ALICE,
                   "--auth-password", srv.passwords[ALICE],
                   "--ehlo", CLIENT_NAME, "--from", ALICE, "--to", BOB,
                   "--header", f"Subject: {subject}", "--body", "sent by swaks",
                   "--timeout", "20"]
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60)
        output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, f"swaks {tls_option} --auth {mechanism} exited " \
                                     f"{proc.returncode}:\n{output}"
        assert "235 2.7.0" in output, output
        assert re.search(r"250 2\.0\.0 Ok: queued as [0-9A-Z]{16}", output), output
        content = wait_for_subject(srv, BOB, subject)
        assert re.search(r"\bwith ESMTPSA\b", received_of(content)), content[:600]


# --------------------------------------------------------------------------
# AUTH rules
# --------------------------------------------------------------------------

def test_auth_needs_tls_on_submission_port(make_mailsrv):
    srv = make_mailsrv(users=[ALICE])
    password = srv.passwords[ALICE]
    with connect(srv, srv.submission_port) as conn:
        extensions = conn.ehlo()
        assert "STARTTLS" in extensions, extensions
        assert "AUTH" not in extensions, f"AUTH offered before TLS: {extensions}"
        conn.auth_plain(ALICE, password, 538, "5.7.11")
        conn.auth_plain(ALICE, "wrong-in-clear", 538, "5.7.11")
        conn.expect(f"AUTH LOGIN {b64(ALICE)}", 538, "5.7.11")
        conn.expect("AUTH LOGIN", 538, "5.7.11")
        conn.expect(f"MAIL FROM:<{ALICE}>", 530, "5.7.0")

        conn.starttls()
        extensions = conn.ehlo()
        assert set(extensions.get("AUTH", "").upper().split()) >= {"PLAIN", "LOGIN"}, extensions
        # TLS alone is not enough to send.
        conn.expect(f"MAIL FROM:<{ALICE}>", 530, "5.7.0")
        conn.auth_plain(ALICE, password)
        conn.expect(f"MAIL FROM:<{ALICE}>", 250, "2.1.0")
    # Nothing said before TLS reached the password check: the wrong
    # password left no failure line (the right one, later, is logged).
    log = wait_for_log(srv, f"authenticated as {ALICE}")
    assert "smtp authentication failed" not in log, srv.log_tail()


def test_plaintext_auth_when_allowed(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.allow_plaintext_auth": True}, users=[ALICE, BOB])
    message = make_message("submitted in clear", sender=ALICE, to=BOB)
    with connect(srv, srv.submission_port) as conn:
        extensions = conn.ehlo()
        assert "STARTTLS" in extensions, extensions
        assert set(extensions.get("AUTH", "").upper().split()) >= {"PLAIN", "LOGIN"}, extensions
        conn.auth_plain(ALICE, srv.passwords[ALICE])
        transaction(conn, ALICE, BOB, message)

        # STARTTLS forgets the authentication made in clear.
        conn.starttls()
        conn.ehlo()
        conn.expect(f"MAIL FROM:<{ALICE}>", 530, "5.7.0")
        conn.auth_plain(ALICE, srv.passwords[ALICE])
        conn.expect(f"MAIL FROM:<{ALICE}>", 250, "2.1.0")

    received = received_of(delivered(srv, BOB, message))
    assert re.search(r"\bwith ESMTPA\b", received), received
    assert "using TLS" not in received, received


def test_sasl_exchanges(make_mailsrv):
    srv = make_mailsrv(users=[ALICE])
    password = srv.passwords[ALICE]
    # PLAIN without initial response: an empty 334 challenge.
    with submissions(srv) as conn:
        RawSMTP.check_reply(conn.command("AUTH PLAIN"), 334, context="AUTH PLAIN")
        assert conn.history[-1] == ["334 "], conn.history[-1]
        conn.expect(plain(ALICE, password), 235, "2.7.0")
        conn.expect(f"AUTH PLAIN {plain(ALICE, password)}", 503, "5.5.1")   # only once
        conn.expect(f"MAIL FROM:<{ALICE}>", 250)

    # LOGIN without initial response: "Username:", then "Password:".
    with submissions(srv) as conn:
        assert conn.expect("AUTH LOGIN", 334) == [b64("Username:")]
        assert conn.expect(b64(ALICE), 334) == [b64("Password:")]
        conn.expect(b64(password), 235, "2.7.0")
        conn.expect(f"MAIL FROM:<{ALICE}>", 250)

    with submission(srv) as conn:
        # `*` cancels, at any step.
        conn.expect("AUTH PLAIN", 334)
        conn.expect("*", 501, "5.0.0")
        conn.expect(f"AUTH LOGIN {b64(ALICE)}", 334)
        conn.expect("*", 501, "5.0.0")
        # Wrong password, by either mechanism.
        conn.auth_plain(ALICE, "wrong", 535, "5.7.8")
        conn.expect(f"AUTH LOGIN {b64(ALICE)}", 334)
        conn.expect(b64("wrong too"), 535, "5.7.8")
        # None of that stops the right one.
        conn.expect(f"MAIL FROM:<{ALICE}>", 530, "5.7.0")
        conn.auth_plain(ALICE, password)
        conn.expect(f"MAIL FROM:<{ALICE}>", 250)


def test_mail_without_auth_is_refused(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    for conn in (submission(srv), submissions(srv)):
        with conn:
            conn.expect(f"MAIL FROM:<{ALICE}>", 530, "5.7.0")
            conn.expect("MAIL FROM:<>", 530, "5.7.0")
            # No transaction was opened.
            conn.expect(f"RCPT TO:<{BOB}>", 503, "5.5.1")
            conn.expect("DATA", 503, "5.5.1")
    assert srv.settle(BOB) == []


def test_sender_must_belong_to_the_user(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    srv.add_alias("team@example.test", ALICE, BOB)
    srv.add_alias("bob-only@example.test", BOB)
    with submission(srv, ALICE) as conn:
        for sender in (BOB, "bob+alice@example.test", "bob-only@example.test",
                       "nobody@example.test", "alice@far.example"):
            lines = conn.expect(f"MAIL FROM:<{sender}>", 553, "5.7.1")
            assert sender.lower() in lines[0].lower(), lines
        for sender in (ALICE, "Alice@Example.Test", "alice+lists@example.test",
                       "team@example.test", ""):
            conn.expect(f"MAIL FROM:<{sender}>", 250, "2.1.0")
            # Authenticated senders may relay.
            conn.expect(f"RCPT TO:<{FAR}>", 250, "2.1.5")
            conn.expect("RSET", 250, "2.0.0")
        message = make_message("from the team", sender="team@example.test", to=BOB)
        transaction(conn, "team@example.test", BOB, message)
    assert header(delivered(srv, BOB, message), "Return-Path") == "<team@example.test>"


def test_mx_port_offers_starttls_but_not_auth(make_mailsrv):
    srv = make_mailsrv(users=[ALICE])
    password = srv.passwords[ALICE]
    message = make_message("over STARTTLS on the MX port")
    with connect(srv, srv.smtp_port) as conn:
        extensions = conn.ehlo("before-tls.example.test")
        assert "STARTTLS" in extensions, extensions
        assert "AUTH" not in extensions, extensions
        lines = conn.auth_plain(ALICE, password, 503, "5.5.1")
        assert "authentication not enabled" in lines[0].lower(), lines

        conn.starttls()
        extensions = conn.ehlo("after-tls.example.test")
        assert "STARTTLS" not in extensions, extensions
        assert "AUTH" not in extensions, extensions
        lines = conn.auth_plain(ALICE, password, 503, "5.5.1")
        assert "authentication not enabled" in lines[0].lower(), lines
        conn.expect("STARTTLS", 503, "5.5.1")
        # Mail for local users needs no AUTH here; relaying is still refused.
        conn.expect(f"MAIL FROM:<{SENDER}>", 250)
        conn.expect(f"RCPT TO:<{FAR}>", 554, "5.7.1")
        conn.expect(f"RCPT TO:<{ALICE}>", 250)
        queued_id(RawSMTP.check_reply(conn.data(message), 250, "2.0.0"))

    received = received_of(delivered(srv, ALICE, message))
    # The EHLO before STARTTLS is forgotten (RFC 3207 4.2).
    assert received.startswith("from after-tls.example.test ([127.0.0.1])"), received
    assert "before-tls" not in received, received
    assert TLS_CLAUSE_RE.search(received), received
    assert re.search(r"\bwith ESMTPS\b", received), received


def test_starttls_resets_the_session(make_mailsrv):
    srv = make_mailsrv(users=[ALICE])
    with connect(srv, srv.submission_port) as conn:
        conn.ehlo()
        conn.starttls()
        # The EHLO before TLS no longer counts.
        lines = conn.auth_plain(ALICE, srv.passwords[ALICE], 503, "5.5.1")
        assert "ehlo" in lines[0].lower(), lines
        extensions = conn.ehlo()
        assert "STARTTLS" not in extensions, extensions
        assert "AUTH" in extensions, extensions
        conn.expect("STARTTLS", 503, "5.5.1")
        conn.auth_plain(ALICE, srv.passwords[ALICE])
        conn.expect(f"MAIL FROM:<{ALICE}>", 250)


def test_commands_pipelined_after_starttls_are_refused(make_mailsrv):
    srv = make_mailsrv(users=[ALICE])
    for port in (srv.smtp_port, srv.submission_port):
        with connect(srv, port) as conn:
            conn.ehlo()
            conn.send(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n")
            # The first reply, in clear: no 220 and no TLS.
            RawSMTP.check_reply(conn.read_reply(), 554, "5.5.1", f"port {port}")
            assert conn.closed(), f"port {port}: connection still open after 554"
            assert conn._buf == b"", f"port {port}: more after the 554: {conn._buf!r}"
    wait_for_log(srv, "rejected input pipelined after STARTTLS", count=2)
    # STARTTLS on its own still works.
    with connect(srv, srv.smtp_port) as conn:
        conn.ehlo()
        conn.starttls()
        conn.ehlo()
        conn.expect("NOOP", 250)


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------

def fetch_cert(srv, how: str) -> bytes:
    """The certificate a new connection gets on the MX port (STARTTLS),
    the submission port (STARTTLS) or the submissions port."""
    if how == "submissions":
        with Smtp(srv.submissions_port, tls=True) as conn:
            return conn.peer_cert()
    port = srv.smtp_port if how == "mx" else srv.submission_port
    with connect(srv, port) as conn:
        conn.ehlo()
        conn.starttls()
        return conn.peer_cert()


def test_certificate_reload_keeps_open_sessions(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB])
    cert_path, key_path = srv_cert(srv)
    old_cert = pem_der(cert_path)

    # Sessions open before the reload, one of them authenticated.
    old_submissions = submissions(srv, ALICE)
    old_mx = connect(srv, srv.smtp_port)
    try:
        old_mx.ehlo()
        old_mx.starttls()
        old_mx.ehlo()
        assert old_submissions.peer_cert() == old_cert
        assert old_mx.peer_cert() == old_cert

        new_cert_path, new_key_path = new_certificate(cert_path.parent)
        new_cert = pem_der(new_cert_path)
        assert new_cert != old_cert
        os.replace(new_key_path, key_path)
        os.replace(new_cert_path, cert_path)
        srv.ctl("reload")

        wait_until(lambda: fetch_cert(srv, "submissions") == new_cert, 15,
                   "the new certificate on the submissions port")
        for how in ("mx", "submission", "submissions"):
            assert fetch_cert(srv, how) == new_cert, f"old certificate on {how} after reload"

        # The old sessions go on, with their certificate.
        to_bob = make_message("old TLS session after reload", sender=ALICE, to=BOB)
        transaction(old_submissions, ALICE, BOB, to_bob)
        old_submissions.expect("QUIT", 221)
        to_alice = make_message("old STARTTLS session after reload")
        transaction(old_mx, SENDER, ALICE, to_alice)
        old_mx.expect("QUIT", 221)
    finally:
        old_submissions.close()
        old_mx.close()
    delivered(srv, BOB, to_bob)
    delivered(srv, ALICE, to_alice)
    assert "configuration and certificate reloaded" in srv.log()


def test_mismatched_key_is_refused(make_mailsrv):
    srv = make_mailsrv(start=False)
    cert_path, key_path = srv_cert(srv)
    other_cert, other_key = new_certificate(cert_path.parent)
    os.replace(other_key, key_path)
    other_cert.unlink()

    result = srv.ctl("check", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"mailctl check accepted a foreign key:\n{output}"
    assert "do not belong together" in output, output
    assert str(cert_path) in output and str(key_path) in output, output

    # mailctl start refuses before starting anything.
    result = srv.ctl("start", check=False)
    if result.returncode == 0:
        srv.ctl("stop", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"mailctl start accepted a foreign key:\n{output}"
    assert "do not belong together" in output, output

    # smtpd itself refuses to start, at once.
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        proc = subprocess.Popen([str(SMTPD), "-c", str(srv.config_path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - started
        out.seek(0)
        output = out.read().decode(errors="replace")
    assert returncode is not None, f"smtpd still running after 15 s with a foreign key:\n{output}"
    assert returncode != 0, f"smtpd exited 0 with a foreign key:\n{output}"
    assert elapsed < 10, f"smtpd took {elapsed:.1f} s to refuse the key"
    assert "key" in output.lower(), output
    assert "do not belong together" in output, output


# --------------------------------------------------------------------------
# Failed logins
# --------------------------------------------------------------------------

def auth_once(srv, user: str, password: str, code: int, enhanced: str,
              source: str | None = None, implicit_tls: bool = False) -> None:
    """One AUTH PLAIN on a new connection (submission or submissions)."""
    with (submissions if implicit_tls else submission)(srv, source=source) as conn:
        conn.auth_plain(user, password, code, enhanced)


def test_auth_failures_throttled_per_client_address(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.max_auth_failures": 3,
                               "smtpd.max_account_auth_failures": 100},
                       users=[ALICE, BOB])
    nobody = "nobody@example.test"
    # Three failures from 127.0.0.1, one per account.
    with submission(srv) as conn:
        conn.auth_plain(ALICE, "wrong", 535, "5.7.8")
        conn.auth_plain(BOB, "wrong", 535, "5.7.8")
    auth_once(srv, nobody, "guess", 535, "5.7.8", implicit_tls=True)

    # Now 127.0.0.1 is refused even the right password, of any account, on
    # either port, without a password check.
    for user in (ALICE, BOB):
        auth_once(srv, user, srv.passwords[user], 454, "4.7.0")
        auth_once(srv, user, srv.passwords[user], 454, "4.7.0", implicit_tls=True)
    with submission(srv) as conn:
        conn.expect(f"AUTH LOGIN {b64(ALICE)}", 334)
        conn.expect(b64(srv.passwords[ALICE]), 454, "4.7.0")
        conn.expect(f"MAIL FROM:<{ALICE}>", 530, "5.7.0")

    # Another client address is not affected.
    auth_once(srv, ALICE, srv.passwords[ALICE], 235, "2.7.0", source="127.0.0.2")

    log = wait_for_log(srv, "smtp login refused (too many failures)", count=5)
    for user in (ALICE, BOB, nobody):
        line = AUTH_FAILED.format(user=user, ip="127.0.0.1")
        assert log.count(line) == 1, f"expected one {line!r}:\n{srv.log_tail()}"
    # Throttled attempts are refused, not failed: still three failures.
    assert log.count("smtp authentication failed:") == 3, srv.log_tail()


def test_auth_failures_throttled_per_account(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.max_auth_failures": 100,
                               "smtpd.max_account_auth_failures": 3},
                       users=[ALICE, BOB])
    # Three failures for alice, each from another address.
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        auth_once(srv, ALICE, f"wrong-from-{source}", 535, "5.7.8", source=source)

    # alice is refused from anywhere, right password or not, whatever the case.
    for source in ("127.0.0.1", "127.0.0.4"):
        auth_once(srv, ALICE, srv.passwords[ALICE], 454, "4.7.0", source=source)
        auth_once(srv, ALICE, srv.passwords[ALICE], 454, "4.7.0", source=source,
                  implicit_tls=True)
    auth_once(srv, ALICE.upper(), srv.passwords[ALICE], 454, "4.7.0", source="127.0.0.5")
    # The addresses are not blocked: bob logs in from them.
    for source in ("127.0.0.1", "127.0.0.2"):
        auth_once(srv, BOB, srv.passwords[BOB], 235, "2.7.0", source=source)

    log = wait_for_log(srv, "smtp login refused (too many failures)", count=5)
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        line = AUTH_FAILED.format(user=ALICE, ip=source)
        assert log.count(line) == 1, f"expected one {line!r}:\n{srv.log_tail()}"
    assert log.count("smtp authentication failed:") == 3, srv.log_tail()


def test_account_owner_is_not_locked_out_from_a_known_address(make_mailsrv):
    # Failures an attacker causes for alice elsewhere do not lock her out
    # where she logged in before.
    srv = make_mailsrv(config={"smtpd.max_auth_failures": 100,
                               "smtpd.max_account_auth_failures": 2},
                       users=[ALICE])
    auth_once(srv, ALICE, srv.passwords[ALICE], 235, "2.7.0", source="127.0.0.1")
    for source in ("127.0.0.2", "127.0.0.3"):
        auth_once(srv, ALICE, "guess", 535, "5.7.8", source=source)
    auth_once(srv, ALICE, srv.passwords[ALICE], 235, "2.7.0", source="127.0.0.1")
    auth_once(srv, ALICE, srv.passwords[ALICE], 454, "4.7.0", source="127.0.0.4")


def test_auth_throttle_ends_with_its_window(make_mailsrv):
    window = 3
    srv = make_mailsrv(config={"smtpd.max_auth_failures": 1,
                               "smtpd.auth_failure_window": window},
                       users=[ALICE])
    auth_once(srv, ALICE, "wrong", 535, "5.7.8")
    failed_at = time.monotonic()
    auth_once(srv, ALICE, srv.passwords[ALICE], 454, "4.7.0")

    def logged_in() -> bool:
        with submission(srv) as conn:
            code, lines = conn.command(f"AUTH PLAIN {plain(ALICE, srv.passwords[ALICE])}")
            assert code in (235, 454), f"AUTH: {code} {lines}"
            return code == 235
    wait_until(logged_in, window + 10, "AUTH to succeed once the window has passed",
               interval=0.25)
    assert time.monotonic() - failed_at >= window - 0.5, "throttle ended before its window"


def test_received_header_names_the_user_when_asked(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.received_auth_user": True}, users=[ALICE, BOB])
    message = make_message("with the sender's name", sender=ALICE, to=BOB)
    with submissions(srv, ALICE) as conn:
        transaction(conn, ALICE, BOB, message)
    received = received_of(delivered(srv, BOB, message))
    assert f"(Authenticated sender: {ALICE})" in received, received
    assert re.search(r"\bwith ESMTPSA\b", received), received


# --------------------------------------------------------------------------
# The command loop
# --------------------------------------------------------------------------

def test_junk_commands_are_capped(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.max_junk_commands": 5})
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect("NOOP", 250, "2.0.0")
        conn.expect("RSET", 250, "2.0.0")
        conn.expect("VRFY alice", 252, "2.5.0")
        conn.expect("HELP", 214, "2.0.0")
        conn.expect("BOGUS", 500, "5.5.2")
        # Real commands are not junk.
        conn.expect(f"MAIL FROM:<{SENDER}>", 250, "2.1.0")
        conn.expect("NOOP", 421, "4.7.0")
        assert conn.closed(), "connection still open after 421"


def trickle(conn, pieces: list[bytes], interval: float,
            offset: float = 0.0) -> tuple[tuple[int, list[str]], float]:
    """Send `pieces` one every `interval` seconds (the first after
    `offset`), looking for a reply between them; returns the reply and the
    seconds it took. Fails if none comes before the pieces run out."""
    started = time.monotonic()
    conn.timeout = interval
    for i, piece in enumerate(pieces):
        time.sleep(max(0.0, started + offset + i * interval - time.monotonic()))
        try:
            conn.send(piece)
        except OSError as e:
            raise AssertionError(f"connection failed after {i} pieces: {e}") from None
        try:
            return conn.read_reply(), time.monotonic() - started
        except TimeoutError:
            continue
    raise AssertionError(f"no reply to input trickled for {time.monotonic() - started:.1f} s")


def test_trickled_command_line_times_out(make_mailsrv):
    # test_protocol.py::test_command_timeout covers a silent client; this
    # one keeps sending, a byte a second, and never ends the line.
    timeout = 2
    srv = make_mailsrv(config={"smtpd.command_timeout": timeout})
    with srv.raw() as conn:
        conn.ehlo()
        # Each byte goes half-way between whole seconds after the start, so
        # the 421 (due after `timeout` seconds) arrives while we wait.
        payload = b"NOOP " + b"x" * 20
        reply, elapsed = trickle(conn, [bytes([b]) for b in payload[:9]], 1.0, offset=0.5)
        RawSMTP.check_reply(reply, 421, "4.4.2", "trickled command")
        assert elapsed < timeout + 2.5, f"421 only after {elapsed:.1f} s"
        conn.timeout = 5.0
        assert conn.closed(), "connection still open after 421"


def test_trickled_message_data_times_out(make_mailsrv):
    # Each byte comes well within data_timeout, but DATA as a whole falls
    # behind min_data_rate: after data_timeout plus one second per
    # min_data_rate bytes, the session ends.
    timeout, rate = 2, 1000
    srv = make_mailsrv(config={"smtpd.data_timeout": timeout, "smtpd.min_data_rate": rate},
                       users=[ALICE])
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect("MAIL FROM:<x@far.example>", 250)
        conn.expect(f"RCPT TO:<{ALICE}>", 250)
        conn.expect("DATA", 354)
        # 100 bytes every half second: 200 B/s, a fifth of the rate.
        reply, elapsed = trickle(conn, [b"x" * 98 + b"\r\n"] * 20, 0.5)
        lines = RawSMTP.check_reply(reply, 421, "4.4.2", "trickled data")
        assert "slowly" in " ".join(lines), lines
        assert elapsed < 5.5, f"421 only after {elapsed:.1f} s"
        conn.timeout = 5.0
        assert conn.closed(), "connection still open after 421"
    assert not srv.messages(ALICE), "a message cut short was delivered"
