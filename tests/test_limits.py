"""Resource limits: connections per client, a full spool disk (smtpd(8))."""

from pathlib import Path

import pytest

from mailtest import (
    RawSMTP, as_stored, dot_stuff, header, make_message, strip_added_headers,
    userns_tmpfs_available, wait_until,
)

ALICE = "alice@example.test"
SENDER = "sender@remote.test"


def connect(srv) -> tuple[RawSMTP, int, list[str]]:
    """A new raw connection and its first reply (greeting or refusal)."""
    conn = RawSMTP(srv.smtp_port)
    code, lines = conn.read_reply()
    return conn, code, lines


def greeted_connection(srv) -> RawSMTP | None:
    """A new connection if it is greeted with 220, else None (closed)."""
    conn, code, _ = connect(srv)
    if code == 220:
        return conn
    conn.close()
    return None


def assert_refused_per_client(srv) -> None:
    conn, code, lines = connect(srv)
    with conn:
        RawSMTP.check_reply((code, lines), 421, "4.7.0", "connection over the per-client limit")
        assert conn.closed(), "the refused connection was not closed"


def test_connections_per_client_are_limited(make_mailsrv):
    srv = make_mailsrv(config={"smtpd.max_connections_per_client": 2})
    first = srv.raw()
    second = srv.raw()
    try:
        assert_refused_per_client(srv)

        first.close()
        third = wait_until(lambda: greeted_connection(srv), 5,
                           "a 220 once one of the two connections is closed")
        with third:
            third.ehlo()
            assert_refused_per_client(srv)   # two open again: still limited
    finally:
        first.close()
        second.close()


def sized_message(subject: str, size: int) -> bytes:
    line = "0123456789" * 7 + "abcde\n"      # 76 bytes + CRLF on the wire
    return make_message(subject, body=line * (size // (len(line) + 1)))


def test_full_spool_disk_is_a_temporary_error(make_mailsrv):
    available, reason = userns_tmpfs_available()
    if not available:
        pytest.skip(f"needs an unprivileged user+mount namespace: {reason}")
    srv = make_mailsrv(config={"smtpd.max_message_size": 10 * 1024 * 1024},
                       spool_tmpfs="300k")
    mountinfo = Path(f"/proc/{srv.proc.pid}/mountinfo").read_text()
    assert any(line.split()[4] == str(srv.spool_dir) and " - tmpfs " in line
               for line in mountinfo.splitlines()), \
        f"no tmpfs on {srv.spool_dir} in the server's namespace:\n{mountinfo}"
    srv.add_user(ALICE)

    medium = sized_message("100 KB", 100 * 1024)
    srv.submit(ALICE, medium)
    srv.wait_for_messages(ALICE, 1)
    srv.wait_spool_empty()

    huge = sized_message("1 MB", 1024 * 1024)
    with srv.raw() as conn:
        conn.ehlo()
        conn.expect(f"MAIL FROM:<{SENDER}> SIZE={len(huge)}", 250)
        conn.expect(f"RCPT TO:<{ALICE}>", 250)
        conn.expect("DATA", 354)
        try:
            conn.send(dot_stuff(huge))
        except OSError as e:
            raise AssertionError(f"smtpd stopped reading the data: {e}\n{srv.log_tail()}")
        RawSMTP.check_reply(conn.read_reply(), 452, "4.3.1", "1 MB message on a 300 KB spool")
        # The session goes on; nothing of the refused message stays behind.
        conn.expect("RSET", 250)
    assert srv.spool_files() == {}, "the refused message left files in the spool"

    small = make_message("small after full")
    srv.submit(ALICE, small)
    srv.wait_for_messages(ALICE, 2)
    srv.wait_spool_empty()

    by_subject = {header(p.read_bytes(), "Subject"): p.read_bytes() for p in srv.messages(ALICE)}
    assert set(by_subject) == {"100 KB", "small after full"}
    assert strip_added_headers(by_subject["100 KB"]) == as_stored(medium)
    assert strip_added_headers(by_subject["small after full"]) == as_stored(small)
