"""maildird's IMAP FETCH and SEARCH answers compared whole, byte for byte,
with expectations worked out by hand from RFC 9051 7.5.2 / RFC 3501 7.4.2
(BODYSTRUCTURE, ENVELOPE, body sections, BINARY), plus UID ranges and the
MIME corpus in shared/testdata/mime.

Choices where the RFCs leave room, made as Dovecot does (its own tests,
src/lib-imap/test-imap-bodystructure.c and test-imap-envelope.c, show the
same forms; these tests passed against Dovecot 2.3.19's imap when written):
- BODYSTRUCTURE carries the extension data: body-fld-md5, disposition,
  language and location for a part (`NIL NIL NIL NIL` when absent);
  parameters, disposition, language and location for a multipart.
- Type, subtype, parameter names and values are sent as the message
  writes them; every handmade message writes them in lower case. A part
  without Content-Type is `"text" "plain" ("charset" "us-ascii")`; a part
  without Content-Transfer-Encoding is `"7bit"`.
- Sizes are octets with CRLF line ends; the CRLF before a boundary belongs
  to the boundary (RFC 2046 5.1.1). Every handmade part ends with a blank
  line before its boundary, so its body ends with CRLF and its line count
  is its number of CRLFs, whichever way a server counts an unterminated
  last line.
- ENVELOPE strings are the raw header text: encoded words stay encoded.
- Body sections and BINARY data come as literals (`{n}`), BINARY data with
  a NUL as literal8 (`~{n}`, RFC 3516 4.2), never as quoted strings. Other
  strings are quoted; the one string holding a `"` is compared parsed, as
  it may be quoted or a literal.
- SEARCH numbers come in ascending order.
The mailbox is EXAMINEd (read-only), so no FETCH sets \\Seen and no FLAGS
ride along with the answers.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from mailtest import RawIMAP, crlf, fetch_items

ALICE = "alice@example.test"

CORPUS = Path(os.environ.get(
    "MAILSRV_TESTDATA", Path(__file__).resolve().parent / "data"
)) / "mime"


@pytest.fixture
def srv(make_mailsrv):
    """A running installation with alice; every start waits for IMAP."""
    return make_mailsrv(users=[ALICE], wait_for_imap=True)


# --------------------------------------------------------------------------
# Handmade messages (CRLF line ends)
# --------------------------------------------------------------------------

DATA = bytes(range(256))   # every octet value, NUL, CR and LF included
_B64 = base64.b64encode(DATA).decode()
B64_LINES = "".join(_B64[i:i + 76] + "\n" for i in range(0, len(_B64), 76))   # 5 lines

# 1: multipart/alternative.
ALTERNATIVE = crlf("""\
From: Alice Example <alice@example.test>
To: Bob <bob@example.test>
Subject: alternative parts
Date: Tue, 05 Mar 2024 10:20:30 +0100
Message-ID: <alt-1@example.test>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt-boundary"

This is a multi-part message in MIME format.

--alt-boundary
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 7bit

Hello Bob.

--alt-boundary
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>Hello Bob.</p>
<p>Second line.</p>

--alt-boundary--
""")

# 2: multipart/mixed, text and a base64 attachment.
MIXED = crlf("""\
From: "O\\"Brien, Pat" <pat@example.test>
To: alice@example.test
Subject: report attached
Date: Wed, 06 Mar 2024 08:00:00 +0000
Message-ID: <mixed-1@example.test>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mixed-boundary"

--mixed-boundary
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Gr=C3=BC=C3=9Fe, the data is attached.

--mixed-boundary
Content-Type: application/octet-stream; name="data.bin"
Content-Transfer-Encoding: base64
Content-ID: <data-1@example.test>
Content-Description: all byte values
Content-Disposition: attachment; filename="data.bin"

""" + B64_LINES + """
--mixed-boundary--
""")

# 3: multipart/mixed with a message/rfc822 part (no Content-Type inside).
FORWARD = crlf("""\
From: Carol <carol@example.test>
To: dave@example.test
Subject: fwd: original
Date: Sat, 09 Mar 2024 18:30:00 +0000
Message-ID: <fwd-1@example.test>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain; charset=us-ascii

See the attached message.

--outer
Content-Type: message/rfc822
Content-Description: forwarded message

From: Eve <eve@example.test>
To: carol@example.test
Subject: original
Date: Fri, 01 Mar 2024 07:00:00 +0000
Message-ID: <orig-1@example.test>

Original body line 1.
Original body line 2.

--outer--
""")

# 4: a single base64 part.
SINGLE_BASE64 = crlf("""\
From: alice@example.test
To: bob@example.test
Subject: just bytes
Date: Thu, 07 Mar 2024 09:00:00 +0000
Message-ID: <b64-1@example.test>
MIME-Version: 1.0
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

""" + B64_LINES)

# 5: encoded words and group syntax for ENVELOPE.
ENVELOPE_TEST = crlf("""\
Date: Fri, 08 Mar 2024 12:00:00 +0100
From: =?iso-8859-1?q?J=F6rg?= Schmidt <joerg@example.test>
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin
To: Team: anna@example.test, "Ben B." <ben@example.test>;
Cc: undisclosed-recipients:;
Reply-To: replies@example.test
In-Reply-To: <earlier@example.test>
Message-ID: <env-1@example.test>

Body.
""")

# In this order into the mailbox Raw, with these flags (for SEARCH).
HANDMADE = (
    (ALTERNATIVE, "\\Seen"),
    (MIXED, "\\Flagged"),
    (FORWARD, "$Forwarded"),
    (SINGLE_BASE64, ""),
    (ENVELOPE_TEST, "\\Seen \\Flagged"),
)

# Worked out by hand. ALTERNATIVE: "Hello Bob.\r\n" is 12 octets, 1 line;
# "<p>Hello Bob.</p>\r\n<p>Second line.</p>\r\n" is 19 + 21 = 40, 2 lines.
ALTERNATIVE_STRUCTURE = (
    b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 12 1 NIL NIL NIL NIL)'
    b'("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 40 2 NIL NIL NIL NIL)'
    b' "alternative" ("boundary" "alt-boundary") NIL NIL NIL)')
ALTERNATIVE_BODY = (
    b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 12 1)'
    b'("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 40 2)'
    b' "alternative")')
# MIXED: "Gr=C3=BC=C3=9Fe, the data is attached.\r\n" is 38 + 2 = 40
# octets, 1 line; the base64 is 344 characters in lines of 76, 76, 76, 76
# and 40, each with CRLF: 354 octets (no line count: not text).
MIXED_STRUCTURE = (
    b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 40 1 NIL NIL NIL NIL)'
    b'("application" "octet-stream" ("name" "data.bin") "<data-1@example.test>"'
    b' "all byte values" "base64" 354 NIL ("attachment" ("filename" "data.bin")) NIL NIL)'
    b' "mixed" ("boundary" "mixed-boundary") NIL NIL NIL)')
# FORWARD: "See the attached message.\r\n" 27 octets, 1 line. The enclosed
# message: 5 header lines of 30 + 24 + 19 + 39 + 35 octets, the blank line
# (2) and 2 body lines of 23: 195 octets, 8 lines; its body 46 octets,
# 2 lines. Sender and Reply-To default to From (RFC 3501 7.4.2).
EVE = b'(("Eve" NIL "eve" "example.test"))'
FORWARD_STRUCTURE = (
    b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 27 1 NIL NIL NIL NIL)'
    b'("message" "rfc822" NIL NIL "forwarded message" "7bit" 195'
    b' ("Fri, 01 Mar 2024 07:00:00 +0000" "original" ' + EVE + b' ' + EVE + b' ' + EVE
    + b' ((NIL NIL "carol" "example.test")) NIL NIL NIL "<orig-1@example.test>")'
    b' ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 46 2 NIL NIL NIL NIL)'
    b' 8 NIL NIL NIL NIL)'
    b' "mixed" ("boundary" "outer") NIL NIL NIL)')
SINGLE_BASE64_STRUCTURE = b'("application" "octet-stream" NIL NIL NIL "base64" 354 NIL NIL NIL NIL)'
# Group syntax (RFC 3501 7.4.2): (NIL NIL "name" NIL) opens a group,
# (NIL NIL NIL NIL) closes it.
JOERG = b'(("=?iso-8859-1?q?J=F6rg?= Schmidt" NIL "joerg" "example.test"))'
ENVELOPE_TEST_ENVELOPE = (
    b'("Fri, 08 Mar 2024 12:00:00 +0100" "=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin" '
    + JOERG + b' ' + JOERG
    + b' ((NIL NIL "replies" "example.test"))'
    b' ((NIL NIL "Team" NIL)(NIL NIL "anna" "example.test")("Ben B." NIL "ben" "example.test")'
    b'(NIL NIL NIL NIL))'
    b' ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
    b' NIL "<earlier@example.test>" "<env-1@example.test>")')
PAT = b'(("O\\"Brien, Pat" NIL "pat" "example.test"))'
MIXED_ENVELOPE = (
    b'("Wed, 06 Mar 2024 08:00:00 +0000" "report attached" ' + PAT + b' ' + PAT + b' ' + PAT
    + b' ((NIL NIL "alice" "example.test")) NIL NIL NIL "<mixed-1@example.test>")')


def lit(data: bytes) -> bytes:
    """`data` as an IMAP literal."""
    return b"{%d}\r\n" % len(data) + data


def header_of(message: bytes) -> bytes:
    """The header section with its terminating blank line."""
    return message[:message.index(b"\r\n\r\n") + 4]


def text_of(message: bytes) -> bytes:
    return message[message.index(b"\r\n\r\n") + 4:]


@pytest.fixture
def raw(srv):
    """(alice's RawIMAP session with the mailbox Raw EXAMINEd, UIDs of the
    HANDMADE messages in it, in order)."""
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("CREATE Raw")
        uids = [conn.append("Raw", message, flags)[1] for message, flags in HANDMADE]
        conn.select("Raw", readonly=True)
        yield conn, uids


def answers(conn: RawIMAP, command: str) -> list[bytes]:
    """The untagged responses to a command that must succeed."""
    return conn.untagged(conn.expect(command))


# --------------------------------------------------------------------------
# BODYSTRUCTURE, BODY, ENVELOPE
# --------------------------------------------------------------------------

def test_bodystructure_of_multipart_alternative(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 1 BODYSTRUCTURE") == [
        b"* 1 FETCH (BODYSTRUCTURE " + ALTERNATIVE_STRUCTURE + b")"]
    # BODY is BODYSTRUCTURE without the extension data.
    assert answers(conn, "FETCH 1 BODY") == [b"* 1 FETCH (BODY " + ALTERNATIVE_BODY + b")"]


def test_bodystructure_of_multipart_mixed_with_attachment(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 2 BODYSTRUCTURE") == [
        b"* 2 FETCH (BODYSTRUCTURE " + MIXED_STRUCTURE + b")"]


def test_bodystructure_of_an_enclosed_message(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 3 BODYSTRUCTURE") == [
        b"* 3 FETCH (BODYSTRUCTURE " + FORWARD_STRUCTURE + b")"]


def test_bodystructure_of_a_single_part(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 4 BODYSTRUCTURE") == [
        b"* 4 FETCH (BODYSTRUCTURE " + SINGLE_BASE64_STRUCTURE + b")"]


def test_envelope_with_encoded_words_and_groups(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 5 ENVELOPE") == [
        b"* 5 FETCH (ENVELOPE " + ENVELOPE_TEST_ENVELOPE + b")"]
    # A display name with a quoted-pair comes back unquoted. Holding a `"`,
    # it may be sent quoted with `\"` or as a literal (Dovecot): compare
    # parsed values.
    [response] = answers(conn, "FETCH 2 ENVELOPE")
    assert fetch_items(response) == fetch_items(b"* 2 FETCH (ENVELOPE " + MIXED_ENVELOPE + b")")


# --------------------------------------------------------------------------
# Body sections, partial fetches, BINARY
# --------------------------------------------------------------------------

def test_partial_fetch(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 1 BODY.PEEK[]<0.10>") == [
        b"* 1 FETCH (BODY[]<0> " + lit(b"From: Alic") + b")"]
    assert answers(conn, "FETCH 1 BODY.PEEK[1]<3.4>") == [
        b"* 1 FETCH (BODY[1]<3> " + lit(b"lo B") + b")"]
    # BODY[] (not PEEK) answers as BODY[]; EXAMINE keeps \Seen off.
    assert answers(conn, "FETCH 2 BODY[]<5.3>") == [
        b"* 2 FETCH (BODY[]<5> " + lit(MIXED[5:8]) + b")"]


def test_whole_sections(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 1 BODY.PEEK[]") == [b"* 1 FETCH (BODY[] " + lit(ALTERNATIVE) + b")"]
    assert answers(conn, "FETCH 1 BODY.PEEK[HEADER]") == [
        b"* 1 FETCH (BODY[HEADER] " + lit(header_of(ALTERNATIVE)) + b")"]
    assert answers(conn, "FETCH 1 BODY.PEEK[TEXT]") == [
        b"* 1 FETCH (BODY[TEXT] " + lit(text_of(ALTERNATIVE)) + b")"]
    assert answers(conn, "FETCH 1 RFC822.HEADER") == [
        b"* 1 FETCH (RFC822.HEADER " + lit(header_of(ALTERNATIVE)) + b")"]
    assert answers(conn, "FETCH 1 RFC822.SIZE") == [
        b"* 1 FETCH (RFC822.SIZE %d)" % len(ALTERNATIVE)]
    assert answers(conn, "FETCH 1 BODY.PEEK[2]") == [
        b"* 1 FETCH (BODY[2] " + lit(b"<p>Hello Bob.</p>\r\n<p>Second line.</p>\r\n") + b")"]


def test_mime_and_header_fields_sections(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 2 BODY.PEEK[1.MIME]") == [
        b"* 2 FETCH (BODY[1.MIME] " + lit(b"Content-Type: text/plain; charset=utf-8\r\n"
                                         b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
        + b")"]
    assert answers(conn, "FETCH 2 BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]") == [
        b"* 2 FETCH (BODY[HEADER.FIELDS (FROM SUBJECT)] "
        + lit(b'From: "O\\"Brien, Pat" <pat@example.test>\r\nSubject: report attached\r\n\r\n')
        + b")"]
    assert answers(conn, "FETCH 2 BODY.PEEK[HEADER.FIELDS.NOT (FROM SUBJECT DATE MESSAGE-ID"
                         " MIME-VERSION CONTENT-TYPE)]") == [
        b"* 2 FETCH (BODY[HEADER.FIELDS.NOT (FROM SUBJECT DATE MESSAGE-ID MIME-VERSION"
        b" CONTENT-TYPE)] " + lit(b"To: alice@example.test\r\n\r\n") + b")"]
    # The enclosed message of part 3: its header and text (RFC 9051 6.4.5).
    enclosed = FORWARD[FORWARD.index(b"From: Eve"):FORWARD.index(b"\r\n--outer--")]
    assert answers(conn, "FETCH 3 BODY.PEEK[2.HEADER]") == [
        b"* 3 FETCH (BODY[2.HEADER] " + lit(header_of(enclosed)) + b")"]
    assert answers(conn, "FETCH 3 BODY.PEEK[2.TEXT]") == [
        b"* 3 FETCH (BODY[2.TEXT] " + lit(b"Original body line 1.\r\nOriginal body line 2.\r\n")
        + b")"]
    assert answers(conn, "FETCH 3 BODY.PEEK[2]") == [b"* 3 FETCH (BODY[2] " + lit(enclosed) + b")"]


def test_binary_decodes_the_transfer_encoding(raw):
    conn, _ = raw
    assert answers(conn, "FETCH 4 BINARY.PEEK[1]") == [
        b"* 4 FETCH (BINARY[1] ~{256}\r\n" + DATA + b")"]
    assert answers(conn, "FETCH 4 BINARY.SIZE[1]") == [b"* 4 FETCH (BINARY.SIZE[1] 256)"]
    assert answers(conn, "FETCH 4 BINARY.PEEK[1]<0.4>") == [
        b"* 4 FETCH (BINARY[1]<0> ~{4}\r\n\x00\x01\x02\x03)"]
    assert answers(conn, "FETCH 2 BINARY.PEEK[2]") == [
        b"* 2 FETCH (BINARY[2] ~{256}\r\n" + DATA + b")"]
    # Quoted-printable text: no NUL, so the literal may be either kind.
    decoded = "Grüße, the data is attached.\r\n".encode()
    assert answers(conn, "FETCH 2 BINARY.SIZE[1]") == [
        b"* 2 FETCH (BINARY.SIZE[1] %d)" % len(decoded)]
    [response] = answers(conn, "FETCH 2 BINARY.PEEK[1]")
    assert fetch_items(response) == (2, {"BINARY[1]": decoded})


def test_fetch_macros(raw):
    conn, _ = raw
    expected = {"FAST": {"FLAGS", "INTERNALDATE", "RFC822.SIZE"},
                "ALL": {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"},
                "FULL": {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"}}
    for macro, items in expected.items():
        [response] = answers(conn, f"FETCH 1 {macro}")
        number, got = fetch_items(response)
        assert number == 1 and set(got) == items, (macro, response)
        assert got["RFC822.SIZE"] == len(ALTERNATIVE)
        if "BODY" in got:
            assert b"BODY " + ALTERNATIVE_BODY in response


# --------------------------------------------------------------------------
# SEARCH and UID ranges
# --------------------------------------------------------------------------

def test_search_with_nested_or_and_not(raw):
    conn, uids = raw
    # From: 1 alice, 2 pat, 3 carol, 4 alice, 5 joerg. To bob: 1, 4.
    # Seen: 1, 5. Flagged: 2, 5. $Forwarded: 3.
    searches = (
        ("OR (FROM alice SEEN) NOT (OR FLAGGED KEYWORD $Forwarded)", [1, 4]),
        ("OR (FLAGGED NOT SEEN) OR SUBJECT original FROM carol", [2, 3]),
        ("NOT (OR TO bob (OR SUBJECT Berlin (FLAGGED NOT SEEN)))", [3]),
        ("(OR FROM pat FROM joerg) (NOT (NOT FLAGGED))", [2, 5]),
    )
    for criteria, numbers in searches:
        assert answers(conn, f"SEARCH {criteria}") == [
            b" ".join([b"* SEARCH", *(b"%d" % n for n in numbers)])], criteria
        assert answers(conn, f"UID SEARCH {criteria}") == [
            b" ".join([b"* SEARCH", *(b"%d" % uids[n - 1] for n in numbers)])], criteria


def test_uid_ranges_include_the_highest_uid(raw):
    """RFC 9051 6.4.8: `n:*` means the range between n and the highest UID,
    so it always contains the last message, even when n is above UIDNEXT."""
    conn, uids = raw
    last = uids[-1]
    beyond = last + 5
    assert answers(conn, "UID FETCH * (UID)") == [b"* 5 FETCH (UID %d)" % last]
    assert answers(conn, f"UID FETCH {beyond}:* (UID)") == [b"* 5 FETCH (UID %d)" % last]
    assert answers(conn, f"UID FETCH *:{beyond} (UID)") == [b"* 5 FETCH (UID %d)" % last]
    assert answers(conn, f"UID FETCH {uids[3]}:* (UID)") == [
        b"* 4 FETCH (UID %d)" % uids[3], b"* 5 FETCH (UID %d)" % last]
    assert answers(conn, f"UID FETCH {last + 1}:{beyond} (UID)") == []
    assert answers(conn, "FETCH 4:* (UID)") == [
        b"* 4 FETCH (UID %d)" % uids[3], b"* 5 FETCH (UID %d)" % last]
    assert answers(conn, f"UID SEARCH UID {uids[1]}:*") == [
        b" ".join([b"* SEARCH", *(b"%d" % u for u in uids[1:])])]
    assert answers(conn, f"UID SEARCH UID {beyond}:*") == [b"* SEARCH %d" % last]


def test_uid_fetch_in_an_empty_mailbox(srv):
    with srv.raw_imap(user=ALICE) as conn:
        conn.select("Junk")
        assert answers(conn, "UID FETCH 1:* (UID)") == []
        assert answers(conn, "UID SEARCH UID 1:*") == [b"* SEARCH"]


# --------------------------------------------------------------------------
# The MIME corpus
# --------------------------------------------------------------------------

def part_numbers(body: list, prefix: str = "") -> list[str]:
    """The section number of every part of a parsed BODYSTRUCTURE that
    multiparts lead to (RFC 9051 6.4.5); a message that is no multipart
    has part 1. Enclosed messages are not entered."""
    if not isinstance(body[0], list):
        return [] if prefix else ["1"]
    numbers = []
    for i, part in enumerate(body, 1):
        if not isinstance(part, list):
            break   # the subtype, after the last part
        numbers.append(f"{prefix}{i}")
        numbers += part_numbers(part, f"{prefix}{i}.")
    return numbers


def test_corpus_messages_answer_every_fetch(srv):
    files = sorted(CORPUS.glob("msg_*.txt"))
    assert files, f"no MIME corpus in {CORPUS}"
    # APPEND takes CRLF lines; the files have LF (most) or CRLF.
    messages = [crlf(path.read_bytes()) for path in files]
    with srv.raw_imap(user=ALICE) as conn:
        conn.expect("CREATE Corpus")
        for message in messages:
            conn.append("Corpus", message, literal_plus=True)
        conn.select("Corpus", readonly=True)
        for number, (path, message) in enumerate(zip(files, messages), 1):
            responses = answers(conn, f"FETCH {number} (RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY[])")
            assert len(responses) == 1, (path.name, responses)
            got_number, items = fetch_items(responses[0])   # parses the whole response
            assert got_number == number, path.name
            assert items["BODY[]"] == message, f"{path.name}: BODY[] is not the message appended"
            assert items["RFC822.SIZE"] == len(message), path.name
            envelope = items["ENVELOPE"]
            assert isinstance(envelope, list) and len(envelope) == 10, (path.name, envelope)
            structure = items["BODYSTRUCTURE"]
            assert isinstance(structure, list) and structure, (path.name, structure)
            for section in part_numbers(structure):
                wanted = f"BODY.PEEK[{section}]"
                if isinstance(structure[0], list):
                    wanted += f" BODY.PEEK[{section}.MIME]"
                [response] = answers(conn, f"FETCH {number} ({wanted})")
                assert fetch_items(response)[0] == number, (path.name, section)
