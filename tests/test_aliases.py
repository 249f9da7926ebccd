"""Aliases, catch-all and plus-addressing, end to end."""

from mailtest import delivered_to, header, make_message

ALICE = "alice@example.test"
BOB = "bob@example.test"


def subjects(srv, addr, n):
    """Subjects of the (at least n) messages delivered to `addr`."""
    return sorted(header(srv.read_message(p), "Subject")
                  for p in srv.wait_for_messages(addr, n))


def test_alias_to_two_users(mailsrv):
    mailsrv.add_user(ALICE)
    mailsrv.add_user(BOB)
    mailsrv.add_alias("team@example.test", ALICE, BOB)

    mailsrv.send("team@example.test", make_message("to the team", to="team@example.test"))

    for user in (ALICE, BOB):
        [path] = mailsrv.wait_for_messages(user, 1)
        content = mailsrv.read_message(path)
        assert header(content, "Subject") == "to the team"
        assert delivered_to(content) == user
    assert not mailsrv.maildir("team@example.test").exists()


def test_catch_all_for_unknown_users_only(mailsrv):
    catchall = "catchall@example.test"
    mailsrv.add_user(catchall)
    mailsrv.add_user(ALICE)
    mailsrv.add_alias("@example.test", catchall)

    mailsrv.send("unknown@example.test", make_message("for unknown", to="unknown@example.test"))
    mailsrv.send(ALICE, make_message("for alice"))

    assert subjects(mailsrv, ALICE, 1) == ["for alice"]
    assert subjects(mailsrv, catchall, 1) == ["for unknown"]
    assert [header(mailsrv.read_message(p), "Subject") for p in mailsrv.settle(catchall)] \
        == ["for unknown"]
    assert len(mailsrv.messages(ALICE)) == 1


def test_plus_address_reaches_the_user(mailsrv):
    mailsrv.add_user(ALICE)

    mailsrv.send("alice+lists@example.test",
                 make_message("tagged", to="alice+lists@example.test"))

    [path] = mailsrv.wait_for_messages(ALICE, 1)
    content = mailsrv.read_message(path)
    assert header(content, "Subject") == "tagged"
    assert delivered_to(content) == ALICE
    assert not mailsrv.maildir("alice+lists@example.test").exists()


def test_bare_name_alias(mailsrv):
    mailsrv.add_user(ALICE)
    mailsrv.add_alias("postmaster", "alice")

    mailsrv.send("postmaster@example.test",
                 make_message("to postmaster", to="postmaster@example.test"))

    [path] = mailsrv.wait_for_messages(ALICE, 1)
    content = mailsrv.read_message(path)
    assert header(content, "Subject") == "to postmaster"
    assert delivered_to(content) == ALICE
