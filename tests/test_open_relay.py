"""The open-relay battery (issue 8): classic tricks for getting a mail
server to relay, tried on the MX port from 127.0.0.1 without
authentication, with 127.0.0.1 outside `smtpd.relay_networks`.

Every trick whose final destination is not one of our mailboxes must be
refused with a 5xx at RCPT (554 5.7.1 Relay access denied, 550 5.1.1
unknown user, or a 501/553 syntax refusal: which one does not matter).
Some tricks have a reading under which the destination is local (a
source route ending at our domain, the literal of our own address, an
unqualified name); for those either a refusal or a local delivery is
right, and whatever is accepted must end in a local Maildir, never in the
queue for another host. RFC 5321 also says what must be accepted:
`<postmaster>` without a domain (4.5.1), domains in any case (2.4).

One installation serves the whole module (it only reads mail from a
fresh connection per case); the last test looks at what every case left
behind. Each accepted message is followed to its end: its queue id must
only appear in the log with `relay=local` and it must leave the queue,
which a remote recipient cannot do here (the tests' DNS server answers
SERVFAIL for every other domain, so remote mail is deferred).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DOMAIN, HOSTNAME, PRIVILEGED_BY_DEFAULT, Mailsrv, free_port_base
from mailtest import header, make_message, queued_id, wait_until

ALICE = f"alice@{DOMAIN}"
SENDER = "sender@remote.test"
LOOKALIKE = "ex\u0430mple.test"            # Cyrillic a (U+0430)
LOOKALIKE_ACE = LOOKALIKE.encode("idna").decode()   # xn--exmple-4nf.test

REFUSE = "refuse"                 # 5xx at RCPT
LOCAL = "local"                   # 250 and delivered to `mailbox`
REFUSE_OR_LOCAL = "refuse or local"

# Replies seen for every case, for the report at the end of the module.
REPLIES: dict[str, str] = {}
# Queue ids of messages accepted by a case: {case id: queue id}.
ACCEPTED: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    id: str
    rcpt: str | bytes                  # the whole RCPT command line, no CRLF
    expect: str = REFUSE
    mail: str = f"MAIL FROM:<{SENDER}>"
    helo: str = "client.example.test"
    mailbox: str = ALICE               # where a LOCAL (or accepted REFUSE_OR_LOCAL) lands

    def __str__(self) -> str:
        return self.id


def rcpt(address: str) -> str:
    return f"RCPT TO:<{address}>"


UTF8_MAIL = f"MAIL FROM:<{SENDER}> SMTPUTF8"

RELAY_TRICKS = [
    # The plain case, as a baseline.
    Case("remote", rcpt("victim@remote.test")),
    # The percent hack: user%remote@local, relayed by old sendmails.
    Case("percent-hack", rcpt(f"victim%remote.test@{DOMAIN}")),
    Case("percent-hack-local-user", rcpt(f"alice%remote.test@{DOMAIN}"), REFUSE_OR_LOCAL),
    Case("percent-hack-double", rcpt(f"victim%remote.test%{DOMAIN}@{DOMAIN}")),
    Case("percent-hack-no-at", rcpt("victim%remote.test")),
    Case("percent-in-domain", rcpt(f"victim@remote.test%{DOMAIN}")),
    Case("url-encoded-at", rcpt(f"victim%40remote.test@{DOMAIN}")),
    # UUCP bang paths.
    Case("bang-path", rcpt("remote.test!victim")),
    Case("bang-path-at-local", rcpt(f"remote.test!victim@{DOMAIN}")),
    Case("bang-path-two-hops", rcpt(f"{DOMAIN}!remote.test!victim")),
    Case("bang-path-upper-case", rcpt(f"REMOTE.TEST!victim@{DOMAIN.upper()}")),
    # Quoted local parts that hold an address.
    Case("quoted-at-local-domain", rcpt(f'"victim@remote.test"@{DOMAIN}')),
    Case("quoted-at-no-domain", rcpt('"victim@remote.test"')),
    Case("quoted-escaped-at", rcpt(f'"victim\\@remote.test"@{DOMAIN}')),
    Case("quoted-local-address-at-remote", rcpt(f'"{ALICE}"@remote.test')),
    Case("quoted-plus-tag-hiding-remote", rcpt(f'"alice+x@remote.test"@{DOMAIN}'),
         REFUSE_OR_LOCAL),
    # Source routes (RFC 5321 4.1.2 / C: to be ignored, never followed).
    Case("source-route", rcpt(f"@{DOMAIN}:victim@remote.test")),
    Case("source-route-two-hops", rcpt(f"@{DOMAIN},@{HOSTNAME}:victim@remote.test")),
    Case("source-route-ending-local", rcpt(f"@remote.test:{ALICE}"), REFUSE_OR_LOCAL),
    # Address literals and bare addresses.
    Case("ip-literal", rcpt("victim@[192.0.2.1]")),
    Case("ip-literal-loopback", rcpt("victim@[127.0.0.1]")),
    Case("ip-literal-loopback-local-user", rcpt("alice@[127.0.0.1]"), REFUSE_OR_LOCAL),
    Case("ipv6-literal-loopback", rcpt("victim@[IPv6:::1]")),
    Case("ip-literal-of-a-name", rcpt("victim@[remote.test]")),
    Case("bare-ip-domain", rcpt("victim@192.0.2.1")),
    # Spellings of a remote domain.
    Case("trailing-dot", rcpt("victim@remote.test.")),
    Case("two-trailing-dots", rcpt("victim@remote.test..")),
    Case("mixed-case-remote", rcpt("Victim@ReMoTe.TeSt")),
    Case("subdomain-of-local", rcpt(f"victim@sub.{DOMAIN}")),
    Case("local-domain-as-prefix", rcpt(f"victim@{DOMAIN}.remote.test")),
    Case("local-domain-as-prefix-with-slash", rcpt(f"victim@remote.test/{DOMAIN}")),
    Case("lookalike-utf8", rcpt(f"alice@{LOOKALIKE}"), mail=UTF8_MAIL),
    Case("lookalike-utf8-without-smtputf8", rcpt(f"alice@{LOOKALIKE}")),
    Case("lookalike-punycode", rcpt(f"alice@{LOOKALIKE_ACE}")),
    Case("localhost", rcpt("victim@localhost")),
    Case("localhost-local-user", rcpt("alice@localhost"), REFUSE_OR_LOCAL),
    Case("our-host-name-local-user", rcpt(f"alice@{HOSTNAME}"), REFUSE_OR_LOCAL),
    # Several at signs, empty or dotted domains.
    Case("remote-then-local", rcpt(f"victim@remote.test@{DOMAIN}")),
    Case("local-then-remote", rcpt(f"{ALICE}@remote.test")),
    Case("double-at", rcpt("victim@@remote.test")),
    Case("domain-of-dots", rcpt("victim@...")),
    Case("domain-one-dot", rcpt("victim@.")),
    Case("empty-domain", rcpt("victim@")),
    # Unqualified recipients.
    Case("unqualified", rcpt("victim")),
    Case("unqualified-local-user", rcpt("alice"), REFUSE_OR_LOCAL),
    # Senders that might look trusted.
    Case("null-sender", rcpt("victim@remote.test"), mail="MAIL FROM:<>"),
    Case("null-sender-remote-postmaster", rcpt("postmaster@remote.test"), mail="MAIL FROM:<>"),
    Case("local-sender", rcpt("victim@remote.test"), mail=f"MAIL FROM:<{ALICE}>"),
    Case("helo-as-ourselves", rcpt("victim@remote.test"), helo=HOSTNAME),
    Case("helo-as-localhost-literal", rcpt("victim@remote.test"), helo="[127.0.0.1]"),
    # postmaster of someone else.
    Case("remote-postmaster", rcpt("postmaster@remote.test")),
    Case("remote-postmaster-upper-case", rcpt("POSTMASTER@REMOTE.TEST")),
    # Comments, display names and other wrappings of the address.
    Case("comment-after-address", rcpt(f"victim@remote.test({ALICE})")),
    Case("comment-before-address", rcpt(f"({ALICE})victim@remote.test")),
    Case("display-name", "RCPT TO:Alice <victim@remote.test>"),
    Case("no-angle-brackets", "RCPT TO:victim@remote.test"),
    Case("space-after-colon", "RCPT TO: <victim@remote.test>"),
    Case("list-in-one-rcpt", rcpt(f"{ALICE},victim@remote.test"), REFUSE_OR_LOCAL),
    Case("second-address-as-parameter", f"RCPT TO:<{ALICE}> <victim@remote.test>",
         REFUSE_OR_LOCAL),
    Case("orcpt-naming-local", f"RCPT TO:<victim@remote.test> ORCPT=rfc822;{ALICE}"),
    Case("bare-cr-inside", f"RCPT TO:<victim@remote.test\r@{DOMAIN}>".encode()),
    Case("nul-inside", f"RCPT TO:<victim@remote.test\0@{DOMAIN}>".encode()),
]

LOCAL_DESTINATIONS = [
    Case("local-user", rcpt(ALICE), LOCAL),
    Case("local-domain-upper-case", rcpt(f"alice@{DOMAIN.upper()}"), LOCAL),
    Case("local-part-upper-case", rcpt(f"ALICE@{DOMAIN}"), LOCAL),
    Case("local-trailing-dot", rcpt(f"{ALICE}."), REFUSE_OR_LOCAL),
    Case("plus-address", rcpt(f"alice+tag@{DOMAIN}"), LOCAL),
    # RFC 5321 4.5.1: <postmaster> without a domain MUST be accepted.
    Case("postmaster-no-domain", rcpt("postmaster"), LOCAL),
    Case("postmaster-no-domain-upper-case", rcpt("POSTMASTER"), LOCAL),
    Case("postmaster-local", rcpt(f"postmaster@{DOMAIN}"), LOCAL),
    Case("postmaster-local-mixed-case", rcpt(f"Postmaster@{DOMAIN}"), LOCAL),
    Case("postmaster-no-domain-null-sender", rcpt("postmaster"), LOCAL, mail="MAIL FROM:<>"),
]


# --------------------------------------------------------------------------
# The installation
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(dns_server, tmp_path_factory):
    """One running installation for the whole battery: alice, postmaster
    an alias of alice, and relay_networks empty (what `mailctl init`
    writes, set here again so that a changed default cannot make this
    module test a trusting server)."""
    shared = None
    if PRIVILEGED_BY_DEFAULT:
        shared = Path(tempfile.mkdtemp(prefix="mailsrv-priv-", dir="/tmp"))
        shared.chmod(0o755)
        root = shared / "inst"
    else:
        root = tmp_path_factory.mktemp("relay") / "inst"
    server = Mailsrv(root, free_port_base(), privileged=PRIVILEGED_BY_DEFAULT)
    try:
        server.init()
        server.set_config("dns.servers", [dns_server.address])
        server.set_config("smtpd.relay_networks", [])
        server.set_config("smtpd.max_errors", 100)
        server.add_user(ALICE, f"alice-pw-{uuid.uuid4().hex[:8]}")
        server.add_alias("postmaster", ALICE)
        server.start()
        yield server
    finally:
        try:
            server.close()
        finally:
            if shared is not None:
                shutil.rmtree(shared, ignore_errors=True)


def is_local(address: str) -> bool:
    return address.rpartition("@")[2].rstrip(".").lower() == DOMAIN


def log_lines_of(srv: Mailsrv, qid: str) -> list[str]:
    return [line for line in srv.log().splitlines() if f"{qid}: to=<" in line]


def follow(srv: Mailsrv, case: Case, qid: str, subject: str) -> None:
    """An accepted message must leave the queue through local delivery
    only, and end in `case.mailbox`."""
    def gone() -> bool:
        return qid not in srv.queue()
    try:
        wait_until(gone, 20, f"{qid} to leave the queue")
    except AssertionError:
        entry = srv.queue().get(qid)
        raise AssertionError(
            f"OPEN RELAY? {case.id}: {case.rcpt!r} was accepted ({REPLIES[case.id]}) and "
            f"{qid} is still queued: {entry}\n{srv.log_tail()}") from None
    lines = log_lines_of(srv, qid)
    assert lines, f"no delivery logged for {qid}\n{srv.log_tail()}"
    remote = [line for line in lines if "relay=local" not in line]
    assert not remote, (f"OPEN RELAY: {case.id}: {case.rcpt!r} ({REPLIES[case.id]}) "
                        f"went elsewhere than a local mailbox: {remote}")
    assert all("status=sent" in line for line in lines), lines

    def landed() -> bool:
        return any(header(p.read_bytes(), "Subject") == subject
                   for p in srv.messages(case.mailbox))
    wait_until(landed, 10, f"{subject!r} in {srv.maildir(case.mailbox)}")


def run_case(srv: Mailsrv, case: Case) -> tuple[int, str]:
    """EHLO, MAIL, the case's RCPT; DATA if it was accepted. Returns the
    RCPT reply code and text."""
    with srv.raw() as conn:
        conn.ehlo(case.helo)
        conn.expect(case.mail, 250)
        line = case.rcpt if isinstance(case.rcpt, bytes) else case.rcpt.encode()
        conn.send(line + b"\r\n")
        try:
            code, lines = conn.read_reply()
        except (ConnectionError, TimeoutError) as e:
            # Closing the connection on a malformed line is a refusal too.
            REPLIES[case.id] = f"connection ended: {e}"
            return 0, REPLIES[case.id]
        text = f"{code} {' '.join(lines)}"
        REPLIES[case.id] = text
        print(f"{case.id}: {line!r} -> {text}")
        if code >= 300:
            # Nothing can have been taken into the transaction.
            code_data, data_lines = conn.command("DATA")
            assert code_data in (503, 554), (
                f"{case.id}: DATA after a refused RCPT got {code_data} {data_lines}")
            conn.expect("NOOP", 250)
            return code, text
        subject = f"relay-{case.id}-{uuid.uuid4().hex[:8]}"
        reply = conn.data(make_message(subject, to=case.mailbox))
        assert reply[0] == 250, f"{case.id}: end of data: {reply}"
        qid = queued_id(reply[1])
        ACCEPTED[case.id] = qid
        conn.command("QUIT")
    follow(srv, case, qid, subject)
    return code, text


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

def test_installation_does_not_trust_the_client(srv):
    relay_networks = srv.config()["smtpd"].get("relay_networks", [])
    assert relay_networks == [], relay_networks
    with srv.raw() as conn:
        extensions = conn.ehlo()
        assert "AUTH" not in extensions, f"AUTH offered on the MX port: {extensions}"


@pytest.mark.parametrize("case", RELAY_TRICKS, ids=str)
def test_relay_trick_is_refused(srv, case, record_property):
    code, text = run_case(srv, case)
    record_property("rcpt_reply", text)
    if case.expect == REFUSE:
        assert code == 0 or 500 <= code < 600, (
            f"OPEN RELAY: {case.id}: {case.rcpt!r} was not refused: {text}")
    else:
        assert code == 0 or 500 <= code < 600 or code == 250, f"{case.id}: {text}"


@pytest.mark.parametrize("case", LOCAL_DESTINATIONS, ids=str)
def test_local_destination_is_accepted(srv, case, record_property):
    code, text = run_case(srv, case)
    record_property("rcpt_reply", text)
    if case.expect == LOCAL:
        assert code == 250, f"{case.id}: {case.rcpt!r} must be accepted: {text}"
    else:
        assert code == 250 or 500 <= code < 600, f"{case.id}: {text}"


def test_relay_denied_is_554_5_7_1_and_names_the_address(srv):
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect(f"MAIL FROM:<{SENDER}>", 250)
        lines = conn.expect("RCPT TO:<victim@remote.test>", 554, "5.7.1")
        assert "victim@remote.test" in lines[0] and "relay" in lines[0].lower(), lines


def test_nothing_is_queued_for_another_domain(srv):
    """After every case: no queue entry has a recipient outside our
    domain, every accepted message was delivered here, and qmgr never
    tried another host."""
    for entry in srv.queue().values():
        remote = [r["address"] for r in entry.get("recipients", [])
                  if not is_local(r["address"])]
        assert not remote, f"OPEN RELAY: queued for {remote}: {entry}"
    log = srv.log()
    to_lines = [line for line in log.splitlines() if re.search(r": to=<", line)]
    assert all("relay=local" in line for line in to_lines), (
        [line for line in to_lines if "relay=local" not in line])
    assert "connected to" not in log, srv.log_tail()
    # What each accepted case became, for the record.
    for case_id, qid in ACCEPTED.items():
        print(f"accepted {case_id}: {qid}: {log_lines_of(srv, qid)}")
    refused = {k: v for k, v in REPLIES.items() if k not in ACCEPTED}
    print("refused:\n" + "\n".join(f"  {k}: {v}" for k, v in refused.items()))
    # Every case ran (the module was not cut short by a filter).
    if len(REPLIES) == len(RELAY_TRICKS) + len(LOCAL_DESTINATIONS):
        accepted_tricks = [c.id for c in RELAY_TRICKS if c.expect == REFUSE and c.id in ACCEPTED]
        assert not accepted_tricks, f"accepted relay tricks: {accepted_tricks}"
