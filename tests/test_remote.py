"""Remote delivery (qmgr(8)): MX lookup in the tests' DNS server (MX
preference and fallback, IPv6), SMTP to the next hop with opportunistic
STARTTLS, several recipients per transaction, retries (and their
schedule) and bounces, refusals of MAIL FROM, SIZE, 8BITMIME,
PIPELINING, lost connections, message content (dots, 5 MB), a relay host
with AUTH (STARTTLS or implicit TLS), TLS policy, connection reuse, DSN
parameters and SMTPUTF8.

The sending installation ("A") serves example.test and relays for
127.0.0.0/8; its `delivery.remote_port` is the port of the next hop: a
second installation ("B", serving its own domain) or a scripted SMTP
server (tests/smtpscript.py) where the next hop must misbehave on demand.
Every domain is fresh per test (`dns.unique`), and DNS answers come from
tests/dnsserver.py: a domain that is not set up gets SERVFAIL."""

import base64
import hashlib
import random
import re
import signal
import socket
import subprocess
import time

import pytest

from mailtest import (
    LOCALHOST, as_stored, delivery_report, header, make_message, report_fields,
    strip_added_headers, wait_until,
)
from smtpscript import DEFAULT_CAPABILITIES, DEFAULT_REPLIES, DROP, DROP_DURING_DATA

ALICE = "alice@example.test"
BOB = "bob@example.test"
RELAY = {"smtpd.relay_networks": ["127.0.0.0/8"]}
# No automatic retry within a test: only `mailctl queue flush` retries.
SLOW_RETRY = {"qmgr.min_backoff": 3600, "qmgr.max_backoff": 3600}
DSN_PARAMS = ("NOTIFY", "ORCPT", "RET", "ENVID")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def sending_installation(make_mailsrv, remote_port: int, config: dict | None = None,
                         users=(ALICE, BOB), start: bool = True):
    """Installation A: example.test with alice and bob, relaying for
    127.0.0.0/8, MX hosts reached on `remote_port`."""
    return make_mailsrv(users=users, start=start, config={
        **RELAY, "delivery.remote_port": remote_port, **(config or {})})


def receiving_installation(make_mailsrv, dns, users=("carol", "dave"), mx: bool = True):
    """Installation B: a fresh domain (`b-XXXX.test`) served by
    mx.<domain>, with the given local parts as users; with `mx`, the
    domain's MX record points at it (127.0.0.1). Returns (B, domain)."""
    domain = dns.unique("b")
    srv = make_mailsrv(hostname=f"mx.{domain}", domain=domain,
                       users=[f"{u}@{domain}" for u in users])
    if mx:
        dns.mail_domain(domain)
    return srv, domain


def scripted_destination(make_scripted_smtp, dns, **options):
    """A scripted SMTP server as the MX (`mx.<domain>`, 127.0.0.1) of a
    fresh domain. Returns (server, domain, MX host name)."""
    server = make_scripted_smtp(**options)
    domain = dns.unique("s")
    host = dns.mail_domain(domain)
    return server, domain, host


def wait_deferred(srv, address: str, attempts: int = 1, timeout: float = 20) -> dict:
    """Wait until `address` is queued in deferred/ after at least
    `attempts` attempts; return its recipient entry from `mailctl queue
    list --json`."""
    def deferred():
        found = srv.queue_recipient(address)
        if found is None:
            return None
        entry, rcpt = found
        return (entry["state"] == "deferred" and rcpt.get("attempts", 0) >= attempts
                and rcpt)
    try:
        return wait_until(deferred, timeout, f"{address} deferred after {attempts} attempt(s)")
    except AssertionError as e:
        raise AssertionError(f"{e}; queue: {srv.queue()}\n{srv.log_tail()}") from None


def wait_log(srv, pattern: str, timeout: float = 20) -> re.Match:
    """Wait until the installation's log matches `pattern` (a regex)."""
    try:
        return wait_until(lambda: re.search(pattern, srv.log()), timeout,
                          f"a log line matching {pattern!r}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{srv.log_tail()}") from None


def single_report(srv, address: str) -> tuple[bytes, dict[str, str]]:
    """The one message in `address`'s Maildir, a delivery report: its
    bytes and its (merged) status fields."""
    [path] = srv.wait_for_messages(address, 1)
    content = path.read_bytes()
    assert header(content, "Return-Path") == "<>", content[:300]
    _, fields = report_fields(content)
    return content, fields


# --------------------------------------------------------------------------
# Delivery by MX
# --------------------------------------------------------------------------

def test_mail_for_another_installation_goes_by_mx_over_starttls_into_its_maildir(
        make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    carol = f"carol@{domain}"
    a = sending_installation(make_mailsrv, b.smtp_port)
    message = make_message("over the MX", sender=BOB, to=carol)
    a.send(carol, message, sender=BOB)

    [path] = b.wait_for_messages(carol, 1)
    content = path.read_bytes()
    assert header(content, "Return-Path") == f"<{BOB}>"
    # B's own Received: first: A used STARTTLS (opportunistic, tls = "may").
    received = header(content, "Received")
    assert f"by mx.{domain} (mailsrv)" in received, received
    assert "using TLS" in received and "with ESMTPS" in received, received
    # Then A's Received:, then the message exactly as sent.
    rest = strip_added_headers(content)
    assert rest.lower().startswith(b"received: "), rest[:300]
    assert rest.endswith(as_stored(message)), rest
    a.wait_spool_empty()
    wait_log(a, rf"to=<{re.escape(carol)}>, relay=mx\.{re.escape(domain)}\[127\.0\.0\.1\]:"
                rf"{b.smtp_port}, .*status=sent \(250 2\.0\.0 ")
    assert dns.queried(domain, "MX"), "no MX lookup was made"


def test_domain_without_mx_is_delivered_to_its_address_record(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns, mx=False)
    dns.add_a(domain, LOCALHOST)   # implicit MX (RFC 5321 5.1)
    carol = f"carol@{domain}"
    a = sending_installation(make_mailsrv, b.smtp_port)
    message = make_message("to the A record", sender=BOB, to=carol)
    a.send(carol, message, sender=BOB)

    b.wait_for_delivery(carol, [message])
    a.wait_spool_empty()
    wait_log(a, rf"to=<{re.escape(carol)}>, relay={re.escape(domain)}\[127\.0\.0\.1\]:"
                rf"{b.smtp_port}, .*status=sent")


def test_recipients_of_one_domain_go_in_one_transaction(make_mailsrv, make_scripted_smtp,
                                                        dns):
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns)
    a = sending_installation(make_mailsrv, mx.port)
    recipients = [f"{name}@{domain}" for name in ("one", "two", "three")]
    message = make_message("three of a kind", sender=BOB, to=recipients[0])
    a.send(recipients, message, sender=BOB)

    [tx] = mx.wait_delivered(1)
    a.wait_spool_empty()
    assert tx.sender == BOB
    assert sorted(tx.recipients) == sorted(recipients), tx
    assert "SIZE" in tx.mail_params, tx.mail_line
    assert len(mx.transactions) == 1, mx.commands
    # A's Received: first, then the message as sent.
    assert tx.data.startswith(b"Received: "), tx.data[:300]
    assert tx.data.endswith(message), tx.data


def test_temporary_failure_is_retried_and_the_message_arrives_once(
        make_mailsrv, make_scripted_smtp, dns):
    later = "451 4.3.0 try later"
    mx, domain, host = scripted_destination(
        make_scripted_smtp, dns, replies={"RCPT": [later, later, "250 2.1.5 Ok"]})
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("persistent", sender=BOB, to=rcpt), sender=BOB)

    first = wait_deferred(a, rcpt, attempts=1)
    error = first["last_error"]
    assert error.startswith("4.3.0"), error
    assert f"host {host}[127.0.0.1] said: {later}" in error, error
    assert "in reply to RCPT TO" in error, error
    listed = a.ctl("queue", "list").stdout
    assert rcpt in listed and later in listed, listed
    wait_log(a, rf"to=<{re.escape(rcpt)}>, .*status=deferred \(.*{re.escape(later)}")

    a.ctl("queue", "flush")
    wait_deferred(a, rcpt, attempts=2)
    assert mx.delivered == []
    a.ctl("queue", "flush")
    mx.wait_delivered(1)
    a.wait_spool_empty()
    assert len(mx.delivered) == 1, mx.commands
    assert sum(len(t.rcpt_lines) for t in mx.transactions) == 3, mx.commands


def test_permanent_refusal_bounces_to_the_sender_at_once(make_mailsrv, make_scripted_smtp,
                                                        dns):
    mx, domain, host = scripted_destination(
        make_scripted_smtp, dns, replies={"RCPT": "550 5.1.1 no such user"})
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpt = f"nobody@{domain}"
    a.send(rcpt, make_message("to nobody", sender=BOB, to=rcpt), sender=BOB)

    content, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "5.1.1", fields
    assert fields["final-recipient"].lower() == f"rfc822; {rcpt}", fields
    # RFC 3464 2.3.5/2.3.6: the server's name and its own words.
    assert fields["diagnostic-code"] == "smtp; 550 5.1.1 no such user", fields
    assert fields["remote-mta"] == f"dns; {host}", fields
    a.wait_spool_empty()
    assert mx.delivered == []
    wait_log(a, rf"to=<{re.escape(rcpt)}>, .*status=bounced \(.*550 5\.1\.1 no such user")


def test_null_mx_domain_bounces_with_5_1_10(make_mailsrv, dns):
    domain = dns.unique("nullmx")
    dns.add_null_mx(domain)
    a = sending_installation(make_mailsrv, 1, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("to a null MX", sender=BOB, to=rcpt), sender=BOB)

    _, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "5.1.10", fields
    a.wait_spool_empty()


def test_nonexistent_domain_bounces_with_5_1_2(make_mailsrv, dns):
    domain = dns.unique("gone")
    dns.nxdomain(domain)
    a = sending_installation(make_mailsrv, 1, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("to nowhere", sender=BOB, to=rcpt), sender=BOB)

    _, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "5.1.2", fields
    a.wait_spool_empty()


def test_mail_still_refused_past_the_queue_lifetime_is_returned_with_4_4_7(
        make_mailsrv, make_scripted_smtp, dns):
    mx, domain, _ = scripted_destination(
        make_scripted_smtp, dns, replies={"RCPT": "451 4.3.0 try later"})
    a = sending_installation(make_mailsrv, mx.port, {
        "qmgr.max_queue_lifetime": 3, "qmgr.min_backoff": 1, "qmgr.max_backoff": 1})
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("too slow", sender=BOB, to=rcpt), sender=BOB)

    _, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "4.4.7", fields
    # The last temporary error comes along.
    assert "451 4.3.0 try later" in fields["diagnostic-code"], fields
    a.wait_spool_empty()
    assert mx.delivered == []
    assert mx.connection_count >= 1


def test_mail_for_a_local_and_a_remote_recipient_reaches_both(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    carol = f"carol@{domain}"
    a = sending_installation(make_mailsrv, b.smtp_port)
    message = make_message("near and far", sender=BOB, to=ALICE)
    a.send([ALICE, carol], message, sender="someone@remote.test")

    a.wait_for_delivery(ALICE, [message])
    b.wait_for_delivery(carol, [message])
    a.wait_spool_empty()
    assert len(a.messages(ALICE)) == 1 and len(b.messages(carol)) == 1


# --------------------------------------------------------------------------
# Relay host
# --------------------------------------------------------------------------

def relaying_installation(make_mailsrv, b, login: str, password: str,
                          port: int | None = None, tls: str = "required"):
    """Installation A sending everything not local through B's submission
    port (or `port`) with STARTTLS (or `tls`) and AUTH as `login`."""
    a = sending_installation(make_mailsrv, 1, SLOW_RETRY, start=False)
    credentials = a.write_secret("relay-credentials", f"{login}:{password}\n")
    a.set_config("delivery.relay.host", LOCALHOST)
    a.set_config("delivery.relay.port", b.submission_port if port is None else port)
    a.set_config("delivery.relay.tls", tls)
    a.set_config("delivery.relay.credentials", str(credentials))
    a.start()
    return a


def test_relay_host_takes_the_mail_after_auth(make_mailsrv, dns):
    # B's domain is not in the DNS at all: only the relay host can get
    # the mail there.
    b, domain = receiving_installation(make_mailsrv, dns, mx=False)
    carol, dave = f"carol@{domain}", f"dave@{domain}"
    elsewhere = f"someone@{dns.unique('elsewhere')}"
    a = relaying_installation(make_mailsrv, b, carol, b.passwords[carol])
    # carol's own address as the sender: B lets its user send as herself.
    message = make_message("through the smarthost", sender=carol, to=dave)
    a.send([dave, elsewhere], message, sender=carol)

    [path] = b.wait_for_messages(dave, 1)
    content = path.read_bytes()
    assert header(content, "Return-Path") == f"<{carol}>"
    received = header(content, "Received")
    assert "with ESMTPSA" in received, received   # TLS and AUTH (RFC 3848)
    assert strip_added_headers(content).endswith(as_stored(message))
    a.wait_spool_empty()
    # B relayed for its authenticated user: the other recipient waits in
    # B's queue (B's own MX lookup for it gets SERVFAIL).
    wait_deferred(b, elsewhere)
    assert not dns.queried(domain), "A looked up the relay's domain instead of relaying"


def test_relay_host_refusing_the_password_defers_with_its_535(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns, mx=False)
    carol, dave = f"carol@{domain}", f"dave@{domain}"
    a = relaying_installation(make_mailsrv, b, carol, "not-the-password")
    a.send(dave, make_message("wrong password", sender=carol, to=dave), sender=carol)

    rcpt = wait_deferred(a, dave)
    assert "535" in rcpt["last_error"], rcpt
    assert rcpt["last_error"].startswith("4."), rcpt
    assert b.messages(dave) == []


# --------------------------------------------------------------------------
# TLS policy, connection reuse
# --------------------------------------------------------------------------

def test_required_tls_without_starttls_defers_and_sends_nothing(
        make_mailsrv, make_scripted_smtp, dns):
    # The scripted server offers no STARTTLS (it has no certificate).
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns)
    a = sending_installation(make_mailsrv, mx.port, {
        **SLOW_RETRY, f'delivery.domains."{domain}".tls': "required"})
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("secret", sender=BOB, to=rcpt), sender=BOB)

    error = wait_deferred(a, rcpt)["last_error"]
    assert error.startswith("4.7."), error
    assert "TLS" in error.upper(), error
    assert mx.connection_count >= 1
    assert not any(c.upper().startswith(("MAIL", "RCPT", "DATA")) for c in mx.commands), \
        mx.commands


def test_messages_to_one_destination_reuse_one_connection(make_mailsrv, make_scripted_smtp,
                                                          dns):
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns)
    a = sending_installation(make_mailsrv, mx.port, {
        "delivery.max_connections_per_destination": 1,
        "delivery.connection_cache_time": 10})
    rcpt = f"someone@{domain}"
    messages = [make_message(f"number {i}", sender=BOB, to=rcpt) for i in range(3)]
    with a.smtp() as client:   # in quick succession, one client session
        for message in messages:
            assert client.sendmail(BOB, [rcpt], message) == {}

    delivered = mx.wait_delivered(3)
    a.wait_spool_empty()
    assert sorted(header(as_stored(t.data), "Subject") for t in delivered) == \
        ["number 0", "number 1", "number 2"]
    assert mx.connection_count == 1, (
        f"{mx.connection_count} connections for 3 messages; commands: {mx.commands}")


# --------------------------------------------------------------------------
# DSN (RFC 3461) and SMTPUTF8 (RFC 6531) towards the next hop
# --------------------------------------------------------------------------

def send_with_dsn(a, rcpt: str, subject: str) -> None:
    """bob sends to `rcpt` with RET, ENVID, NOTIFY=SUCCESS and ORCPT."""
    with a.raw() as smtp:
        assert "DSN" in smtp.ehlo()
        smtp.expect(f"MAIL FROM:<{BOB}> RET=HDRS ENVID=env-42", 250, "2.1.0")
        smtp.expect(f"RCPT TO:<{rcpt}> NOTIFY=SUCCESS ORCPT=rfc822;{rcpt}", 250, "2.1.5")
        message = make_message(subject, sender=BOB, to=rcpt)
        smtp.check_reply(smtp.data(message), 250, "2.0.0")


def test_dsn_parameters_go_on_to_a_server_that_offers_dsn(make_mailsrv, make_scripted_smtp,
                                                          dns):
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns)
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"someone@{domain}"
    send_with_dsn(a, rcpt, "notify me")

    [tx] = mx.wait_delivered(1)
    assert tx.mail_params.get("RET") == "HDRS", tx.mail_line
    assert tx.mail_params.get("ENVID") == "env-42", tx.mail_line
    [params] = tx.rcpt_params
    assert params.get("NOTIFY") == "SUCCESS", tx.rcpt_lines
    assert params.get("ORCPT", "").lower() == f"rfc822;{rcpt}".lower(), tx.rcpt_lines
    a.wait_spool_empty()
    # The next hop now owes the success report; A sends none.
    assert a.settle(BOB) == []


def test_server_without_dsn_gets_no_dsn_parameters_and_the_sender_hears_relayed(
        make_mailsrv, make_scripted_smtp, dns):
    capabilities = ("PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES",
                    "SMTPUTF8")
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns, capabilities=capabilities)
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"someone@{domain}"
    send_with_dsn(a, rcpt, "notify me anyway")

    [tx] = mx.wait_delivered(1)
    for param in DSN_PARAMS:
        assert param not in tx.mail_params, tx.mail_line
        assert all(param not in p for p in tx.rcpt_params), tx.rcpt_lines
    content, fields = single_report(a, BOB)
    assert fields["action"] == "relayed", fields
    assert fields["status"].startswith("2."), fields
    assert fields["original-envelope-id"] == "env-42", fields
    assert fields["final-recipient"].lower() == f"rfc822; {rcpt}", fields
    a.wait_spool_empty()


def test_utf8_address_to_a_server_without_smtputf8_bounces_with_5_6_7(
        make_mailsrv, make_scripted_smtp, dns):
    capabilities = ("PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns, capabilities=capabilities)
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpt = f"jösé@{domain}"
    a.send(rcpt, make_message("ünïcödé", sender=BOB, to=rcpt), sender=BOB)   # SMTPUTF8

    [path] = a.wait_for_messages(BOB, 1)
    content = path.read_bytes()
    _, blocks = delivery_report(content)
    [fields] = [b for b in blocks if "final-recipient" in b]
    assert fields["action"] == "failed" and fields["status"] == "5.6.7", fields
    assert "SMTPUTF8" in content.decode("utf-8", "replace").upper(), \
        "the report does not say SMTPUTF8 was missing"
    a.wait_spool_empty()
    assert not any(c.upper().startswith(("MAIL", "RCPT", "DATA")) for c in mx.commands), \
        mx.commands


# --------------------------------------------------------------------------
# More helpers
# --------------------------------------------------------------------------

def capabilities_without(*names: str) -> tuple[str, ...]:
    """The scripted server's default EHLO keywords without `names`."""
    return tuple(c for c in DEFAULT_CAPABILITIES if c.split(" ", 1)[0] not in names)


def without_first_received(content: bytes) -> bytes:
    """`content` (LF line ends) without its first header field, which must
    be a (possibly folded) Received:."""
    assert content.lower().startswith(b"received: "), content[:300]
    lines = content.split(b"\n")
    i = 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\n".join(lines[i:])


def as_relayed_by_a(content: bytes) -> bytes:
    """A message file in B's Maildir without what A and B added in front
    (B's Return-Path, Delivered-To and Received, then A's Received): the
    message as A's client submitted it, with LF line ends."""
    return without_first_received(strip_added_headers(content))


def verbs(commands: list[str]) -> list[str]:
    return [c.split(" ", 1)[0].upper() for c in commands]


def no_transaction_commands(commands: list[str]) -> bool:
    return not any(v in ("MAIL", "RCPT", "DATA") for v in verbs(commands))


def big_body(size: int, seed: int = 5) -> bytes:
    """About `size` bytes of text lines (LF ends) of varied length, some of
    them starting with dots, so the data has to be dot-stuffed often and
    line ends fall everywhere across the client's read chunks."""
    rng = random.Random(seed)
    raw = base64.b64encode(rng.randbytes(size * 3 // 4 + 3))
    lines, pos = [], 0
    while pos < len(raw):
        n = rng.randint(1, 200)
        line = raw[pos:pos + n]
        pos += n
        if rng.random() < 0.1:
            line = b"." * rng.randint(1, 3) + line
        lines.append(line)
    return b"\n".join(lines) + b"\n"


# --------------------------------------------------------------------------
# MX preference and fallback, IPv6
# --------------------------------------------------------------------------

def two_mx_hosts(dns, address_of_mx1: str = "127.0.0.2") -> tuple[str, str, str]:
    """A fresh domain with `MX 10 mx1` (A `address_of_mx1`) and `MX 20
    mx2` (A 127.0.0.1), listed worst first, so qmgr has to sort them.
    Returns (domain, mx1, mx2)."""
    domain = dns.unique("mx")
    mx2 = dns.mail_domain(domain, f"mx2.{domain}", LOCALHOST, preference=20)
    mx1 = dns.mail_domain(domain, f"mx1.{domain}", address_of_mx1, preference=10)
    return domain, mx1, mx2


def test_mail_goes_to_the_next_mx_host_when_the_preferred_one_refuses_connections(
        make_mailsrv, make_scripted_smtp, dns):
    # Only 127.0.0.1 listens on the port: mx1's 127.0.0.2 refuses.
    second = make_scripted_smtp()
    domain, mx1, mx2 = two_mx_hosts(dns)
    a = sending_installation(make_mailsrv, second.port)
    rcpt = f"someone@{domain}"
    message = make_message("second choice", sender=BOB, to=rcpt)
    a.send(rcpt, message, sender=BOB)

    [tx] = second.wait_delivered(1)
    assert tx.recipients == [rcpt] and tx.data.endswith(message)
    a.wait_spool_empty()
    sent = wait_log(a, rf"to=<{re.escape(rcpt)}>, relay={re.escape(mx2)}\[127\.0\.0\.1\]:"
                       rf"{second.port}, .*status=sent")
    refused = re.search(rf"4\.4\.1 cannot connect to {re.escape(mx1)}\[127\.0\.0\.2\]", a.log())
    assert refused, f"no failed attempt at {mx1} in the log\n{a.log_tail()}"
    assert refused.start() < sent.start(), "mx1 was not tried first"


def test_mail_goes_to_the_next_mx_host_when_the_preferred_one_greets_with_421(
        make_mailsrv, make_scripted_smtp, dns):
    second = make_scripted_smtp()
    busy = "421 4.3.2 too busy, try later"
    first = make_scripted_smtp(address="127.0.0.2", port=second.port, greeting=busy)
    domain, mx1, mx2 = two_mx_hosts(dns)
    a = sending_installation(make_mailsrv, second.port)
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("the busy one first", sender=BOB, to=rcpt), sender=BOB)

    [tx] = second.wait_delivered(1)
    assert tx.recipients == [rcpt]
    a.wait_spool_empty()
    assert first.connection_count == 1 and first.commands == [], first.commands
    said = wait_log(a, rf"host {re.escape(mx1)}\[127\.0\.0\.2\] said: {re.escape(busy)} "
                       rf"\(in reply to the greeting\)")
    sent = wait_log(a, rf"to=<{re.escape(rcpt)}>, relay={re.escape(mx2)}\[127\.0\.0\.1\]:"
                       rf"{second.port}, .*status=sent")
    assert said.start() < sent.start()


@pytest.mark.parametrize("greetings, bounced", [
    (("421 4.3.2 busy", "421 4.3.2 busy"), False),
    (("554 5.7.1 go away", "421 4.3.2 busy"), False),
    (("554 5.7.1 go away", "554 5.7.1 go away"), True),
], ids=["both-busy", "one-refuses-for-good", "both-refuse-for-good"])
def test_mail_bounces_only_when_every_mx_host_refuses_for_good(
        make_mailsrv, make_scripted_smtp, dns, greetings, bounced):
    second = make_scripted_smtp(greeting=greetings[1])
    first = make_scripted_smtp(address="127.0.0.2", port=second.port, greeting=greetings[0])
    domain, mx1, mx2 = two_mx_hosts(dns)
    a = sending_installation(make_mailsrv, second.port, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("nobody wants it", sender=BOB, to=rcpt), sender=BOB)

    if bounced:
        _, fields = single_report(a, BOB)
        assert fields["action"] == "failed" and fields["status"] == "5.7.1", fields
        a.wait_spool_empty()
    else:
        error = wait_deferred(a, rcpt)["last_error"]
        assert error.startswith("4."), error
    assert first.connection_count == 1 and second.connection_count == 1
    assert no_transaction_commands(first.commands + second.commands)


def test_mx_host_with_only_an_ipv6_address_gets_the_mail(make_mailsrv, make_scripted_smtp,
                                                          dns):
    mx = make_scripted_smtp(address="::1")
    domain = dns.unique("six")
    host = f"mx.{domain}"
    dns.add_mx(domain, 10, host)
    dns.add_aaaa(host, "::1")
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"someone@{domain}"
    message = make_message("over IPv6", sender=BOB, to=rcpt)
    a.send(rcpt, message, sender=BOB)

    [tx] = mx.wait_delivered(1)
    assert tx.recipients == [rcpt] and tx.data.endswith(message)
    a.wait_spool_empty()
    wait_log(a, rf"to=<{re.escape(rcpt)}>, relay={re.escape(host)}\[::1\]:{mx.port}, "
                rf".*status=sent")


# --------------------------------------------------------------------------
# Refusals of MAIL FROM, SIZE, 8BITMIME
# --------------------------------------------------------------------------

PIPELINING_MODES = pytest.mark.parametrize(
    "capabilities", [DEFAULT_CAPABILITIES, capabilities_without("PIPELINING")],
    ids=["pipelining", "no-pipelining"])


@PIPELINING_MODES
def test_sender_refused_with_452_defers_every_recipient(make_mailsrv, make_scripted_smtp, dns,
                                                        capabilities):
    later = "452 4.3.1 insufficient system storage"
    mx, domain, host = scripted_destination(make_scripted_smtp, dns, capabilities=capabilities,
                                            replies={"MAIL": later})
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpts = [f"one@{domain}", f"two@{domain}"]
    a.send(rcpts, make_message("not now", sender=BOB, to=rcpts[0]), sender=BOB)

    for rcpt in rcpts:
        error = wait_deferred(a, rcpt)["last_error"]
        assert error.startswith("4.3.1"), error
        assert f"host {host}[127.0.0.1] said: {later}" in error, error
        assert "in reply to MAIL FROM" in error, error
    assert mx.transactions == [] and mx.delivered == []
    assert mx.unwaited == [], mx.commands
    assert a.messages(BOB) == [], "a deferral bounced"


@PIPELINING_MODES
def test_sender_refused_with_550_bounces_every_recipient(make_mailsrv, make_scripted_smtp, dns,
                                                         capabilities):
    refusal = "550 5.7.1 sender rejected"
    mx, domain, host = scripted_destination(make_scripted_smtp, dns, capabilities=capabilities,
                                            replies={"MAIL": refusal})
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpts = [f"one@{domain}", f"two@{domain}"]
    a.send(rcpts, make_message("never", sender=BOB, to=rcpts[0]), sender=BOB)

    [path] = a.wait_for_messages(BOB, 1)
    _, blocks = delivery_report(path.read_bytes())
    per_rcpt = {b["final-recipient"].lower(): b for b in blocks if "final-recipient" in b}
    assert sorted(per_rcpt) == sorted(f"rfc822; {r}" for r in rcpts), blocks
    for fields in per_rcpt.values():
        assert fields["action"] == "failed" and fields["status"] == "5.7.1", fields
        assert refusal in fields["diagnostic-code"], fields
    a.wait_spool_empty()
    assert mx.transactions == [] and mx.delivered == []
    assert mx.unwaited == [], mx.commands


def test_message_over_the_servers_size_limit_bounces_with_5_3_4_and_no_mail_is_sent(
        make_mailsrv, make_scripted_smtp, dns):
    capabilities = ("PIPELINING", "SIZE 100", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns, capabilities=capabilities)
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    message = make_message("too big for it", sender=BOB, to=rcpt, body="x" * 500 + "\n")
    a.send(rcpt, message, sender=BOB)

    _, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "5.3.4", fields
    a.wait_spool_empty()
    assert mx.connection_count >= 1
    assert no_transaction_commands(mx.commands), mx.commands


EIGHT_BIT = "Grüße aus Köln, 8 bits.\n"


def test_8bit_message_to_a_server_without_8bitmime_bounces_with_5_6_3(
        make_mailsrv, make_scripted_smtp, dns):
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns,
                                         capabilities=capabilities_without("8BITMIME"))
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    message = make_message("eight bits", sender=BOB, to=rcpt, body=EIGHT_BIT)
    a.send(rcpt, message, sender=BOB, mail_options=["BODY=8BITMIME"])

    _, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "5.6.3", fields
    assert "8BITMIME" in fields["diagnostic-code"], fields
    a.wait_spool_empty()
    assert no_transaction_commands(mx.commands), mx.commands


def test_8bit_message_goes_with_body_8bitmime_to_a_server_that_offers_it(
        make_mailsrv, make_scripted_smtp, dns):
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns)
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"someone@{domain}"
    message = make_message("eight bits", sender=BOB, to=rcpt, body=EIGHT_BIT)
    a.send(rcpt, message, sender=BOB, mail_options=["BODY=8BITMIME"])

    [tx] = mx.wait_delivered(1)
    assert tx.mail_params.get("BODY") == "8BITMIME", tx.mail_line
    assert tx.data.endswith(message), tx.data
    a.wait_spool_empty()


def test_message_declared_8bit_but_all_ascii_goes_to_a_server_without_8bitmime(
        make_mailsrv, make_scripted_smtp, dns):
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns,
                                         capabilities=capabilities_without("8BITMIME"))
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"someone@{domain}"
    message = make_message("seven bits after all", sender=BOB, to=rcpt)
    a.send(rcpt, message, sender=BOB, mail_options=["BODY=8BITMIME"])

    [tx] = mx.wait_delivered(1)
    assert "BODY" not in tx.mail_params, tx.mail_line
    assert tx.data.endswith(message), tx.data
    a.wait_spool_empty()


# --------------------------------------------------------------------------
# Pipelining (RFC 2920)
# --------------------------------------------------------------------------

def test_scripted_server_notices_a_client_that_does_not_wait(make_scripted_smtp):
    # The check the next test relies on: without PIPELINING, a command
    # sent before the previous one was answered is recorded.
    mx = make_scripted_smtp(capabilities=capabilities_without("PIPELINING"))
    with socket.create_connection((LOCALHOST, mx.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(b"NOOP\r\nNOOP\r\n")
        assert reader.readline().startswith(b"250")
        assert reader.readline().startswith(b"250")
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221")
    assert mx.unwaited == ["NOOP"], mx.unwaited


@PIPELINING_MODES
def test_client_waits_for_every_reply_it_must_and_one_refused_recipient_bounces(
        make_mailsrv, make_scripted_smtp, dns, capabilities):
    def rcpt_reply(tx, line):
        return "550 5.1.1 no such user" if "<two@" in line else "250 2.1.5 Ok"
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns, capabilities=capabilities,
                                         replies={"RCPT": rcpt_reply})
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpts = [f"one@{domain}", f"two@{domain}", f"three@{domain}"]
    message = make_message("one by one", sender=BOB, to=rcpts[0])
    a.send(rcpts, message, sender=BOB)

    [tx] = mx.wait_delivered(1)
    assert sorted(tx.recipients) == sorted([rcpts[0], rcpts[2]]), tx
    assert tx.data.endswith(message)
    _, fields = single_report(a, BOB)
    assert fields["action"] == "failed" and fields["status"] == "5.1.1", fields
    assert fields["final-recipient"].lower() == f"rfc822; {rcpts[1]}", fields
    a.wait_spool_empty()
    assert verbs(mx.commands)[:6] == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA"], \
        mx.commands
    assert mx.unwaited == [], f"did not wait for the replies to {mx.unwaited}"


# --------------------------------------------------------------------------
# Lost connections
# --------------------------------------------------------------------------

@pytest.mark.parametrize("replies", [
    {"DATA": [DROP_DURING_DATA, DEFAULT_REPLIES["DATA"]]},
    {"DOT": [DROP, DEFAULT_REPLIES["DOT"]]},
], ids=["during-the-data", "before-the-final-reply"])
def test_connection_lost_in_the_data_phase_defers_with_4_4_2_and_a_retry_delivers(
        make_mailsrv, make_scripted_smtp, dns, replies):
    mx, domain, host = scripted_destination(make_scripted_smtp, dns, replies=replies)
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    rcpt = f"someone@{domain}"
    # Big enough that the drop during the data comes while A still sends.
    message = make_message("cut short", sender=BOB, to=rcpt, body=big_body(2 * 1024 * 1024))
    a.send(rcpt, message, sender=BOB)

    error = wait_deferred(a, rcpt)["last_error"]
    assert error.startswith("4.4.2"), error
    assert f"{host}[127.0.0.1]" in error, error
    assert mx.delivered == []

    a.ctl("queue", "flush")
    [tx] = mx.wait_delivered(1)
    assert tx.recipients == [rcpt]
    assert tx.data.endswith(message), "the message arrived changed"
    a.wait_spool_empty()
    assert mx.connection_count == 2, mx.commands
    assert a.messages(BOB) == [], "the sender got a report"


# --------------------------------------------------------------------------
# Message content between two installations
# --------------------------------------------------------------------------

def test_lines_starting_with_dots_arrive_unchanged(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    carol = f"carol@{domain}"
    a = sending_installation(make_mailsrv, b.smtp_port)
    body = ("first\n.\n..\n...\n.leading dot\n..two dots\n. space\nmiddle . line\n.\n"
            "\n.\nlast line.\n.")
    message = make_message("dots", sender=BOB, to=carol, body=body)
    a.send(carol, message, sender=BOB)

    [path] = b.wait_for_messages(carol, 1)
    assert as_relayed_by_a(path.read_bytes()) == as_stored(message)
    a.wait_spool_empty()


def test_five_megabyte_message_arrives_intact(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    carol = f"carol@{domain}"
    a = sending_installation(make_mailsrv, b.smtp_port)
    message = make_message("big", sender=BOB, to=carol, body=big_body(5 * 1024 * 1024))
    assert len(message) > 5 * 1024 * 1024
    a.send(carol, message, sender=BOB)

    [path] = b.wait_for_messages(carol, 1, timeout=120)
    got = as_relayed_by_a(path.read_bytes())
    want = as_stored(message)
    assert len(got) == len(want)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()
    a.wait_spool_empty()


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------

def test_required_tls_to_an_mx_host_offering_starttls_delivers_over_tls(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    carol = f"carol@{domain}"
    a = sending_installation(make_mailsrv, b.smtp_port, {
        **SLOW_RETRY, f'delivery.domains."{domain}".tls': "required"})
    message = make_message("tls or nothing", sender=BOB, to=carol)
    a.send(carol, message, sender=BOB)

    [path] = b.wait_for_messages(carol, 1)
    received = header(path.read_bytes(), "Received")
    assert "using TLS" in received and "with ESMTPS" in received, received
    a.wait_spool_empty()
    wait_log(a, rf"connected to mx\.{re.escape(domain)}\[127\.0\.0\.1\]:{b.smtp_port} "
                rf"using TLS")
    wait_log(a, rf"to=<{re.escape(carol)}>, relay=mx\.{re.escape(domain)}\[127\.0\.0\.1\]:"
                rf"{b.smtp_port}, .*status=sent")


def test_relay_host_with_implicit_tls_takes_the_mail_after_auth(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns, mx=False)
    carol, dave = f"carol@{domain}", f"dave@{domain}"
    a = relaying_installation(make_mailsrv, b, carol, b.passwords[carol],
                              port=b.submissions_port, tls="implicit")
    message = make_message("through port 465", sender=carol, to=dave)
    a.send(dave, message, sender=carol)

    [path] = b.wait_for_messages(dave, 1)
    content = path.read_bytes()
    assert header(content, "Return-Path") == f"<{carol}>"
    received = header(content, "Received")
    assert "with ESMTPSA" in received, received
    assert as_relayed_by_a(content) == as_stored(message)
    a.wait_spool_empty()
    wait_log(a, rf"connected to 127\.0\.0\.1\[127\.0\.0\.1\]:{b.submissions_port} using TLS")
    assert not dns.queried(domain), "A looked up the relay's domain instead of relaying"


# --------------------------------------------------------------------------
# Retry schedule
# --------------------------------------------------------------------------

def test_deferred_mail_is_retried_by_itself_after_min_backoff_capped_at_max_backoff(
        make_mailsrv, make_scripted_smtp, dns):
    later = "451 4.3.0 try later"
    mx, domain, _ = scripted_destination(
        make_scripted_smtp, dns, replies={"RCPT": [later, later, later, "250 2.1.5 Ok"]})
    a = sending_installation(make_mailsrv, mx.port,
                             {"qmgr.min_backoff": 1, "qmgr.max_backoff": 1})
    rcpt = f"someone@{domain}"
    a.send(rcpt, make_message("again and again", sender=BOB, to=rcpt), sender=BOB)

    # No flush: qmgr retries on its own.
    mx.wait_delivered(1, timeout=20)
    a.wait_spool_empty()
    times = [t for t, _ in mx.timed_commands("RCPT")]
    assert len(times) == 4, mx.commands
    gaps = [round(next_ - previous, 2) for previous, next_ in zip(times, times[1:])]
    # Backoff times are whole seconds, so a 1 s backoff waits up to 2 s;
    # doubling past max_backoff would make the third wait 4 s (over 3 s).
    assert all(gap < 2.9 for gap in gaps), f"gaps between attempts: {gaps}"


def test_flush_right_after_a_deferral_retries_at_once(make_mailsrv, make_scripted_smtp, dns,
                                                      tmp_path):
    """A flush that lands between the end of a pass (entry in deferred/)
    and the scheduler hearing of it must not be lost: strace delays every
    rename qmgr makes by 1 s to hold that window open."""
    mx, domain, _ = scripted_destination(make_scripted_smtp, dns,
                                         replies={"RCPT": ["451 4.3.0 later", "250 2.1.5 Ok"]})
    a = sending_installation(make_mailsrv, mx.port, SLOW_RETRY)
    st = subprocess.Popen(["strace", "-f", "-p", str(a.pid("qmgr")), "-o", str(tmp_path / "st"),
                           "-e", "trace=rename,renameat,renameat2",
                           "-e", "inject=rename,renameat,renameat2:delay_exit=1000000"])
    try:
        time.sleep(1)
        rcpt = f"r@{domain}"
        a.send(rcpt, make_message("m", sender=BOB, to=rcpt), sender=BOB)
        wait_deferred(a, rcpt)
        a.ctl("queue", "flush")
        mx.wait_delivered(1, timeout=15)
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(10)


def test_failed_tls_handshake_falls_back_to_plaintext_under_may(make_mailsrv, make_scripted_smtp,
                                                               dns):
    """tls = may is opportunistic (RFC 7435): a handshake that fails is
    retried in the clear on the same host, as Postfix does."""
    mx, domain, host = scripted_destination(make_scripted_smtp, dns, broken_tls=True)
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"r@{domain}"
    a.send(rcpt, make_message("fallback", sender=BOB, to=rcpt), sender=BOB)
    [tx] = mx.wait_delivered(1, timeout=15)
    assert not tx.tls
    assert [c.commands[-1] for c in mx.connections][:1] == ["STARTTLS"], mx.connections
    assert "STARTTLS" not in mx.connections[-1].commands
    a.wait_spool_empty()
    assert "without TLS" in a.log()


def test_relay_password_never_goes_in_clear_after_a_failed_handshake(make_mailsrv,
                                                                     make_scripted_smtp):
    """No plaintext fallback when there are credentials to send: the mail
    waits (4.7.5) and the server never sees AUTH."""
    relay = make_scripted_smtp(broken_tls=True,
                               capabilities=[*DEFAULT_CAPABILITIES, "AUTH PLAIN LOGIN"])
    a = sending_installation(make_mailsrv, 1, SLOW_RETRY, start=False)
    credentials = a.write_secret("relay-credentials", "me:secret\n")
    a.set_config("delivery.relay.host", LOCALHOST)
    a.set_config("delivery.relay.port", relay.port)
    a.set_config("delivery.relay.tls", "may")
    a.set_config("delivery.relay.credentials", str(credentials))
    a.start()
    rcpt = "someone@far.example"
    a.send(rcpt, make_message("secret", sender=BOB, to=rcpt), sender=BOB)
    entry = wait_deferred(a, rcpt)
    assert entry["last_error"].startswith("4.7.5"), entry
    commands = [c for conn in relay.connections for c in conn.commands]
    assert not any(c.upper().startswith("AUTH") for c in commands), commands
    assert len(relay.connections) == 1, relay.connections


def test_server_that_refuses_ehlo_gets_helo_and_plain_smtp(make_mailsrv, make_scripted_smtp, dns):
    """RFC 5321 3.2: a server that does not know EHLO is greeted with HELO,
    and then gets no extension at all (no SIZE=, no BODY=, no pipelining)."""
    mx, domain, _ = scripted_destination(
        make_scripted_smtp, dns, replies={"EHLO": "502 5.5.2 Error: command not recognized"})
    a = sending_installation(make_mailsrv, mx.port)
    rcpt = f"r@{domain}"
    a.send(rcpt, make_message("old server", sender=BOB, to=rcpt), sender=BOB)
    [tx] = mx.wait_delivered(1, timeout=15)
    [conn] = mx.connections
    assert [c.split(" ")[0] for c in conn.commands[:2]] == ["EHLO", "HELO"], conn.commands
    assert tx.mail_line == f"MAIL FROM:<{BOB}>", tx.mail_line
    assert conn.unwaited == [], conn.unwaited
