"""Sender authentication of mail from the internet (smtpd(8), [checks] in
mailsrv.conf(5)): SPF, DKIM, ARC and DMARC results in one
Authentication-Results header, forged ones removed, DMARC policies
applied. The sending domains live in the test's DNS server; messages are
signed with dkimpy, an independent DKIM implementation."""

import base64
import email
import os
import email.policy
import smtplib
import socket
import subprocess

import dkim
import pytest

from conftest import BIN_DIR
from mailtest import insecure_tls_context, make_message, wait_until
from test_remote import receiving_installation

ALICE = "alice@example.test"
BOB = "bob@example.test"


def results_of(content: bytes) -> list[str]:
    """Every Authentication-Results field of a delivered message, unfolded."""
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    return [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results", [])]


def our_results(srv, content: bytes) -> str:
    ours = [r for r in results_of(content) if r.split(";")[0].strip() == srv.hostname]
    assert len(ours) == 1, results_of(content)
    return ours[0]


def sender_domain(dns, spf: str | None = "v=spf1 ip4:127.0.0.1 -all",
                  dmarc: str | None = "v=DMARC1; p=reject") -> str:
    """A fresh domain that answers for itself (NXDOMAIN for names it does
    not have), with the given SPF and DMARC records."""
    domain = dns.unique("s")
    dns.authoritative(domain)
    # DMARC also asks the parent domains (RFC 9989 tree walk).
    dns.nxdomain("_dmarc.test")
    if spf:
        dns.add_txt(domain, spf)
    if dmarc:
        dns.add_txt(f"_dmarc.{domain}", dmarc)
    return domain


def dkim_key(dns, domain: str, selector: str = "sel") -> bytes:
    """An RSA-2048 key whose public half is published for `domain`."""
    private = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=private,
                            capture_output=True, check=True).stdout
    dns.add_txt(f"{selector}._domainkey.{domain}",
                f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")
    return private


def signed(message: bytes, domain: str, key: bytes, selector: str = "sel") -> bytes:
    signature = dkim.sign(message, selector.encode(), domain.encode(), key,
                          include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"])
    return signature.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + message


def send_from(srv, sender: str, message: bytes) -> None:
    with srv.smtp() as s:
        s.ehlo("client.example.test")
        refused = s.sendmail(sender, [ALICE], message)
    assert refused == {}


def test_signed_mail_from_an_authenticated_domain_passes_every_check(mailsrv, dns):
    srv = mailsrv
    srv.add_user(ALICE)
    domain = sender_domain(dns)
    key = dkim_key(dns, domain)
    sender = f"news@{domain}"
    send_from(srv, sender, signed(make_message("signed", sender=sender, to=ALICE), domain, key))
    [path] = srv.wait_for_messages(ALICE, 1)
    results = our_results(srv, path.read_bytes())
    assert f"dkim=pass header.i=@{domain} header.s=sel" in results, results
    assert "spf=pass" in results and f"smtp.mailfrom={sender}" in results, results
    assert f"dmarc=pass header.from={domain}" in results, results
    # Ours is the first field, above our Received.
    lines = path.read_bytes().split(b"\n")
    assert lines[2].startswith(f"Authentication-Results: {srv.hostname};".encode()), lines[:4]


def test_body_changed_in_transit_fails_dkim(mailsrv, dns):
    srv = mailsrv
    srv.add_user(ALICE)
    domain = sender_domain(dns, spf=None, dmarc="v=DMARC1; p=none")
    key = dkim_key(dns, domain)
    sender = f"news@{domain}"
    message = signed(make_message("tampered", sender=sender, to=ALICE), domain, key)
    send_from(srv, sender, message.replace(b"\r\n\r\n", b"\r\n\r\nAn added line.\r\n", 1))
    [path] = srv.wait_for_messages(ALICE, 1)
    results = our_results(srv, path.read_bytes())
    assert f"dkim=fail (body hash did not verify) header.i=@{domain}" in results, results
    assert "spf=none" in results and "dmarc=fail" in results, results


def test_spf_failure_from_a_p_reject_domain_is_refused_at_end_of_data(mailsrv, dns):
    srv = mailsrv
    srv.add_user(ALICE)
    domain = sender_domain(dns, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    sender = f"ceo@{domain}"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_from(srv, sender, make_message("forged", sender=sender, to=ALICE))
    assert refused.value.smtp_code == 550, refused.value
    assert b"5.7.1" in refused.value.smtp_error and domain.encode() in refused.value.smtp_error
    assert "rejected from=<" in srv.log()
    srv.wait_spool_empty()
    assert srv.messages(ALICE) == []


def test_quarantine_policy_files_the_message_in_junk(mailsrv, dns):
    srv = mailsrv
    srv.add_user(ALICE)
    domain = sender_domain(dns, spf="v=spf1 -all", dmarc="v=DMARC1; p=quarantine")
    sender = f"billing@{domain}"
    send_from(srv, sender, make_message("suspicious", sender=sender, to=ALICE))
    junk = srv.maildir(ALICE) / ".Junk" / "new"
    [path] = wait_until(lambda: list(junk.iterdir()) or None, 20, "a message in Junk")
    assert "dmarc=fail" in our_results(srv, path.read_bytes())
    assert srv.messages(ALICE) == []
    wait_until(lambda: "as junk" in srv.log(), 10, "the junk delivery logged")


def test_pct_zero_applies_the_milder_policy(mailsrv, dns):
    """RFC 7489 6.6.4: p=reject with pct=0 quarantines every failing
    message instead, and p=quarantine with pct=0 delivers to the inbox."""
    srv = mailsrv
    srv.add_user(ALICE)
    domain = sender_domain(dns, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject; pct=0")
    sender = f"billing@{domain}"
    send_from(srv, sender, make_message("sampled out", sender=sender, to=ALICE))
    junk = srv.maildir(ALICE) / ".Junk" / "new"
    [path] = wait_until(lambda: list(junk.iterdir()) or None, 20, "a message in Junk")
    assert "dmarc=fail" in our_results(srv, path.read_bytes())
    # A parent's record applies to a subdomain without one.
    parent = sender_domain(dns, spf=None, dmarc="v=DMARC1; p=quarantine; pct=0")
    sub = f"mail.{parent}"
    dns.add_txt(sub, "v=spf1 -all")
    sender = f"news@{sub}"
    second = make_message("milder still", sender=sender, to=ALICE)
    send_from(srv, sender, second)
    [inbox] = srv.wait_for_messages(ALICE, 1)
    assert "dmarc=fail" in our_results(srv, inbox.read_bytes())
    assert "pct=0" in srv.log()


def test_forged_results_claiming_our_name_are_removed(mailsrv, dns):
    srv = mailsrv
    srv.add_user(ALICE)
    domain = sender_domain(dns, spf="v=spf1 ?all", dmarc=None)
    sender = f"someone@{domain}"
    message = (f"Authentication-Results: {srv.hostname}; dkim=pass header.d=bank.test\r\n"
               f"Authentication-Results: (comment)\r\n {srv.hostname.upper()};\r\n\tspf=pass\r\n"
               f"Authentication-Results: elsewhere.test; spf=pass\r\n").encode() \
        + make_message("forged results", sender=sender, to=ALICE)
    send_from(srv, sender, message)
    [path] = srv.wait_for_messages(ALICE, 1)
    content = path.read_bytes()
    results = results_of(content)
    assert len(results) == 2, results
    assert "bank.test" not in content.decode()
    assert any(r.startswith("elsewhere.test;") for r in results), results
    assert "spf=neutral" in our_results(srv, content)
    assert "removed 2 Authentication-Results" in srv.log()


def test_checks_turned_off_accept_what_dmarc_would_refuse(make_mailsrv, dns):
    srv = make_mailsrv(users=[ALICE], config={"checks.dmarc_reject": "tag"})
    domain = sender_domain(dns, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    sender = f"ceo@{domain}"
    send_from(srv, sender, make_message("tagged", sender=sender, to=ALICE))
    [path] = srv.wait_for_messages(ALICE, 1)
    assert "dmarc=fail" in our_results(srv, path.read_bytes())

    for check in ("spf", "dkim", "arc", "dmarc"):
        srv.set_config(f"checks.{check}", False)
    srv.restart()
    send_from(srv, sender, make_message("unchecked", sender=sender, to=ALICE))
    paths = srv.wait_for_messages(ALICE, 2)
    newest = max(paths, key=lambda p: p.stat().st_mtime_ns)
    results = our_results(srv, newest.read_bytes())
    assert "spf=" not in results and "dmarc=" not in results, results


def test_mail_from_relay_networks_is_not_checked(make_mailsrv, dns):
    srv = make_mailsrv(users=[ALICE], config={"smtpd.relay_networks": ["127.0.0.1"]})
    domain = sender_domain(dns, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    sender = f"app@{domain}"
    send_from(srv, sender, make_message("trusted network", sender=sender, to=ALICE))
    [path] = srv.wait_for_messages(ALICE, 1)
    assert results_of(path.read_bytes()) == []


def publish(dns, zone_output: str) -> None:
    """Put the TXT lines `mailctl dns` printed into the test DNS server."""
    for line in zone_output.splitlines():
        if line.startswith(";") or " IN TXT " not in line:
            continue
        name, _, value = line.partition(" IN TXT ")
        strings = [s for s in value.strip().split('"') if s.strip()]
        dns.add_txt(name.strip().rstrip("."), "".join(strings).encode())


def signing_installation(make_mailsrv, dns, remote_port: int):
    """Installation A (example.test) with an RSA and an Ed25519 key, its
    DKIM, SPF (127.0.0.1 via `ip4:` instead of the printed `mx`) and
    DMARC records published, relaying for 127.0.0.0/8 to MX hosts on
    `remote_port`."""
    a = make_mailsrv(users=[ALICE], start=False, config={
        "smtpd.relay_networks": ["127.0.0.0/8"], "delivery.remote_port": remote_port})
    for selector, algorithm in (("r1", "rsa"), ("e1", "ed25519")):
        made = a.ctl("dkim", "keygen", a.domain, "--selector", selector, "--algorithm", algorithm)
        assert f"{selector}._domainkey.{a.domain}." in made.stdout, made.stdout
    printed = a.ctl("dns", a.domain).stdout
    assert "v=spf1 mx -all" in printed and "v=DMARC1; p=quarantine" in printed, printed
    publish(dns, "\n".join(l for l in printed.splitlines() if "_domainkey" in l))
    dns.authoritative(a.domain)
    # DMARC also asks the parent domains (RFC 9989 tree walk).
    dns.nxdomain("_dmarc.test")
    dns.add_txt(a.domain, "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt(f"_dmarc.{a.domain}", "v=DMARC1; p=reject")
    a.start()
    return a


def test_mail_signed_by_one_installation_passes_every_check_at_another(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    a = signing_installation(make_mailsrv, dns, b.smtp_port)
    carol = f"carol@{domain}"
    a.send(carol, make_message("signed by A", sender=ALICE, to=carol), sender=ALICE)
    [path] = b.wait_for_messages(carol, 1)
    content = path.read_bytes()
    results = our_results(b, content)
    for selector in ("r1", "e1"):
        assert f"dkim=pass header.d={a.domain} header.s={selector}" in results, results
    assert "spf=pass" in results and f"dmarc=pass header.from={a.domain}" in results, results
    assert content.count(b"DKIM-Signature:") == 2


def test_mail_from_sendmail_is_signed_before_queueing(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    a = signing_installation(make_mailsrv, dns, b.smtp_port)
    carol = f"carol@{domain}"
    env = {**os.environ, "MAILSRV_CONFIG": str(a.config_path)}
    message = f"From: {ALICE}\nTo: {carol}\nSubject: from cron\n\n.a dotted line\n".encode()
    subprocess.run([str(BIN_DIR / "sendmail"), "-f", ALICE, "-t"], input=message, env=env,
                   check=True)
    [path] = b.wait_for_messages(carol, 1)
    results = our_results(b, path.read_bytes())
    assert f"dkim=pass header.d={a.domain} header.s=r1" in results, results
    assert "dmarc=pass" in results, results



def test_client_on_a_block_list_is_refused_with_the_zone_named(make_mailsrv, dns):
    zone = dns.unique("bl")
    dns.authoritative(zone)
    dns.add_a(f"1.0.0.127.{zone}", "127.0.0.2")
    srv = make_mailsrv(users=[ALICE])
    # Listed from a reload on (the start-up check waits for a 220).
    srv.set_config("checks.dnsbl", [zone])
    srv.ctl("reload")

    def greeting() -> tuple[int, bytes]:
        try:
            with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10):
                return None
        except smtplib.SMTPConnectError as e:
            return e.smtp_code, e.smtp_error
    code, text = wait_until(greeting, 15, "a refused greeting after the reload")
    assert code == 554, (code, text)
    assert f"5.7.1 Service unavailable; client [127.0.0.1] blocked using {zone}".encode() in text
    # RFC 5321 3.1: after the 554 greeting only QUIT is served.
    with socket.create_connection(("127.0.0.1", srv.smtp_port), timeout=10) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"554 5.7.1 ")
        for command, expected in ((b"EHLO client.example.test", b"503 5.7.1 "),
                                  (b"MAIL FROM:<x@y.test>", b"503 5.7.1 "), (b"QUIT", b"221 ")):
            sock.sendall(command + b"\r\n")
            assert replies.readline().startswith(expected), command
    assert f"listed by {zone}" in srv.log()
    # The submission port does not ask the lists.
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as s:
        assert s.ehlo()[0] == 250


def test_allow_list_weight_and_error_codes_let_a_client_in(make_mailsrv, dns):
    block, allow, erroring = dns.unique("bl"), dns.unique("wl"), dns.unique("err")
    for zone in (block, allow, erroring):
        dns.authoritative(zone)
    dns.add_a(f"1.0.0.127.{block}", "127.0.0.2")
    dns.add_a(f"1.0.0.127.{allow}", "127.0.9.2")
    # Spamhaus's "query refused" answer is not a listing.
    dns.add_a(f"1.0.0.127.{erroring}", "127.255.255.254")
    srv = make_mailsrv(users=[ALICE], config={
        "checks.dnsbl": [f"{block}*2", f"{allow}*-5", f"{erroring}*10"],
        "checks.dnsbl_threshold": 2})
    srv.send(ALICE, make_message("allowed", to=ALICE))
    srv.wait_for_messages(ALICE, 1)
    assert "refused connection" not in srv.log()
    assert f"{erroring} refused the query (127.255.255.254)" in srv.log()


def test_relay_networks_are_not_looked_up(make_mailsrv, dns):
    zone = dns.unique("bl")
    dns.authoritative(zone)
    dns.add_a(f"1.0.0.127.{zone}", "127.0.0.2")
    srv = make_mailsrv(users=[ALICE], config={"checks.dnsbl": [zone],
                                              "smtpd.relay_networks": ["127.0.0.1"]})
    srv.send(ALICE, make_message("from our network", to=ALICE))
    srv.wait_for_messages(ALICE, 1)
    assert dns.queried(f"1.0.0.127.{zone}") == []


def test_a_user_gets_signatures_only_for_its_own_from_addresses(make_mailsrv, dns):
    b, domain = receiving_installation(make_mailsrv, dns)
    a = signing_installation(make_mailsrv, dns, b.smtp_port)
    a.add_user(BOB)
    carol = f"carol@{domain}"
    with smtplib.SMTP("127.0.0.1", a.submission_port, timeout=15) as s:
        s.starttls(context=insecure_tls_context())
        s.login(ALICE, a.passwords[ALICE])
        # MAIL FROM is alice's own; the From header claims bob.
        s.sendmail(ALICE, [carol], make_message("as bob", sender=BOB, to=carol))
        s.sendmail(ALICE, [carol], make_message("as alice", sender=ALICE, to=carol))
    paths = b.wait_for_messages(carol, 2)
    by_subject = {email.message_from_bytes(p.read_bytes())["Subject"]: p.read_bytes()
                  for p in paths}
    assert b"DKIM-Signature:" not in by_subject["as bob"]
    assert "dkim=pass" in our_results(b, by_subject["as alice"])
    assert f"not signing for <{BOB}>" in a.log()


def test_rate_limits_answer_450_per_client_and_per_user(make_mailsrv):
    srv = make_mailsrv(users=[ALICE, BOB], config={
        "smtpd.max_messages_per_client": 2, "smtpd.max_recipients_per_user": 2})
    with srv.raw() as smtp:
        smtp.ehlo()
        for _ in range(2):
            smtp.expect("MAIL FROM:<x@remote.test>", 250)
            smtp.expect("RSET", 250)
        smtp.expect("MAIL FROM:<x@remote.test>", 450, "4.7.1")
    # The user limit follows the login, whatever the address.
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=15) as s:
        s.starttls(context=insecure_tls_context())
        s.login(ALICE, srv.passwords[ALICE])
        s.mail(ALICE)
        assert s.rcpt(ALICE)[0] == 250 and s.rcpt(BOB)[0] == 250
        code, text = s.rcpt("alice+more@example.test")
        assert code == 450 and text.startswith(b"4.7.1 Too many recipients from this user"), text


def test_a_second_from_domain_cannot_carry_mail_past_dmarc(mailsrv, dns):
    srv = mailsrv
    srv.add_user(ALICE)
    bank = sender_domain(dns, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    evil = sender_domain(dns, spf="v=spf1 ip4:127.0.0.1 -all", dmarc=None)
    message = make_message("two authors", sender=f"ceo@{bank}", to=ALICE).replace(
        f"From: <ceo@{bank}>".encode(), f"From: <ceo@{bank}>, <x@{evil}>".encode())
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_from(srv, f"x@{evil}", message)
    assert refused.value.smtp_code == 550
    assert b"From names several domains" in refused.value.smtp_error
