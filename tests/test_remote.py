"""Remote delivery (qmgr(8)): MX lookup in the tests' DNS server, SMTP to
the next hop with opportunistic STARTTLS, several recipients per
transaction, retries and bounces, a relay host with AUTH, TLS policy,
connection reuse, DSN parameters and SMTPUTF8.

The sending installation ("A") serves example.test and relays for
127.0.0.0/8; its `delivery.remote_port` is the port of the next hop: a
second installation ("B", serving its own domain) or a scripted SMTP
server (tests/smtpscript.py) where the next hop must misbehave on demand.
Every domain is fresh per test (`dns.unique`), and DNS answers come from
tests/dnsserver.py: a domain that is not set up gets SERVFAIL."""

import re

from mailtest import (
    LOCALHOST, as_stored, delivery_report, header, make_message, report_fields,
    strip_added_headers, wait_until,
)

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
    assert "550 5.1.1 no such user" in fields["diagnostic-code"], fields
    assert host in content.decode(), "the report does not name the remote host"
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

def relaying_installation(make_mailsrv, b, login: str, password: str):
    """Installation A sending everything not local through B's submission
    port with STARTTLS and AUTH as `login`."""
    a = sending_installation(make_mailsrv, 1, SLOW_RETRY, start=False)
    credentials = a.write_secret("relay-credentials", f"{login}:{password}\n")
    a.set_config("delivery.relay.host", LOCALHOST)
    a.set_config("delivery.relay.port", b.submission_port)
    a.set_config("delivery.relay.tls", "required")
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
