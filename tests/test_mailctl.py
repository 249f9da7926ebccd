"""The admin tool: init, check, users, aliases, domains, start/stop/status."""

import json
import time
import stat
import tomllib

from mailtest import greets, json_contains, pid_alive, port_closed, wait_until

ALICE = "alice@example.test"
SPOOL_DIRS = ("data", "tmp", "incoming", "active", "deferred", "hold", "corrupt", "maildrop")
SPECIAL_FOLDERS = (".Sent", ".Drafts", ".Junk", ".Trash", ".Archive")


def listed(srv, *what):
    """`mailctl <what> list --json`, parsed."""
    return json.loads(srv.ctl(*what, "list", "--json").stdout)


def assert_check_error(srv, path, line, key=""):
    """`mailctl check` fails naming `path:line: key`."""
    result = srv.ctl("check", check=False)
    assert result.returncode == 1, result
    assert f"{path}:{line}: {key}" in result.stderr, result.stderr


def test_init_layout(installation):
    root = installation.root
    config = tomllib.loads(installation.config_path.read_text())
    assert config["hostname"] == installation.hostname
    assert config["smtpd"]["listen"] == [f"127.0.0.1:{installation.smtp_port}"]
    for name in ("tls/cert.pem", "tls/key.pem", "users", "aliases", "domains"):
        assert (root / name).is_file(), name
    for name in ("mail", "run", "log", *(f"spool/{d}" for d in SPOOL_DIRS)):
        assert (root / name).is_dir(), name
    assert stat.S_IMODE((root / "users").stat().st_mode) == 0o600
    assert (root / "users").read_text() == ""
    assert installation.domain in (root / "domains").read_text().split()
    assert b"BEGIN CERTIFICATE" in (root / "tls/cert.pem").read_bytes()
    installation.ctl("check")


def test_init_refuses_existing_installation(installation):
    before = installation.config_path.read_bytes()
    result = installation.init(check=False)
    assert result.returncode == 1
    assert result.stderr.strip()
    assert installation.config_path.read_bytes() == before


def test_check_reports_bad_value_with_line(installation):
    line = installation.set_config("smtpd.max_recipients", "many")
    assert_check_error(installation, installation.config_path, line, "smtpd.max_recipients")


def test_check_reports_unknown_key_with_line(installation):
    line = installation.set_config("smtpd.no_such_setting", 1)
    assert_check_error(installation, installation.config_path, line, "smtpd.no_such_setting")


def test_check_reports_pipe_alias_with_line(installation):
    aliases = installation.root / "aliases"
    text = aliases.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    text += "\n# a comment\nbackup: |/usr/bin/backup\n"
    aliases.write_text(text)
    assert_check_error(installation, aliases, len(text.splitlines()))


def test_user_add_list_passwd_del(installation):
    users_file = installation.root / "users"
    installation.add_user(ALICE, password="first password")

    assert json_contains(listed(installation, "user"), ALICE)
    assert ALICE in installation.ctl("user", "list").stdout
    [line] = users_file.read_text().splitlines()
    assert line.startswith(f"{ALICE}:{{ARGON2ID}}$argon2id$"), line
    maildir = installation.maildir(ALICE)
    for sub in ("cur", "new", "tmp", *SPECIAL_FOLDERS):
        assert (maildir / sub).is_dir(), sub

    installation.ctl("user", "passwd", ALICE, input="second password\n")
    [new_line] = users_file.read_text().splitlines()
    assert new_line.startswith(f"{ALICE}:") and new_line != line

    installation.ctl("user", "del", ALICE)
    assert not json_contains(listed(installation, "user"), ALICE)
    assert ALICE not in users_file.read_text()


def test_user_add_refuses_unserved_domain(installation):
    result = installation.add_user("bob@not-served.test", check=False)
    assert result.returncode == 1
    assert "not-served.test" in result.stderr
    assert (installation.root / "users").read_text() == ""
    assert not json_contains(listed(installation, "user"), "bob@not-served.test")


def test_domain_add_list_del(installation):
    installation.add_domain("other.test")
    assert json_contains(listed(installation, "domain"), "other.test")
    assert "other.test" in installation.ctl("domain", "list").stdout.split()
    assert "other.test" in (installation.root / "domains").read_text().split()

    installation.ctl("domain", "del", "other.test")
    assert not json_contains(listed(installation, "domain"), "other.test")
    assert "other.test" not in (installation.root / "domains").read_text().split()
    assert json_contains(listed(installation, "domain"), installation.domain)


def test_alias_add_list_del(installation):
    installation.add_user(ALICE)
    installation.add_alias("team@example.test", ALICE, "bob@remote.test")
    aliases = listed(installation, "alias")
    for value in ("team@example.test", ALICE, "bob@remote.test"):
        assert json_contains(aliases, value), aliases
    installation.ctl("check")

    installation.ctl("alias", "del", "team@example.test")
    assert not json_contains(listed(installation, "alias"), "team@example.test")


def test_status_json_shows_pids(mailsrv):
    status = json.loads(mailsrv.ctl("status", "--json").stdout)
    for daemon in ("master", "smtpd", "qmgr"):
        pid = mailsrv.pid(daemon)
        assert pid_alive(pid), daemon
        assert json_contains(status, pid), (daemon, pid, status)


def test_status_reports_queue_disk_certificate_and_last_backup(make_mailsrv, tmp_path):
    srv = make_mailsrv(users=[ALICE], config={"smtpd.relay_networks": ["127.0.0.1"]})
    srv.send(ALICE)
    srv.wait_for_messages(ALICE, 1)
    # A message for a domain that does not resolve stays deferred.
    srv.send("someone@nowhere.invalid")
    wait_until(lambda: srv.spool_files().get("deferred"), 20, "a deferred message")
    srv.ctl("backup", "create", "--to", str(tmp_path / "b1"))
    status = json.loads(srv.ctl("status", "--json").stdout)
    assert status["running"] is True
    assert set(status["pids"]) == {"master", "smtpd", "qmgr", "maildird"}, status["pids"]
    assert status["listeners"]["smtp"] == [f"127.0.0.1:{srv.smtp_port}"], status["listeners"]
    assert status["queue"]["deferred"] == 1 and status["queue"]["incoming"] == 0, status["queue"]
    now = time.time()
    assert now - 60 < status["oldest_deferred"] <= now, status
    assert status["mail_store"]["used"] >= srv.messages(ALICE)[0].stat().st_size, status
    assert status["spool"]["available"] > 0
    # mailctl init's certificate: valid for long.
    assert status["certificate_expires"] > now + 365 * 86400, status
    assert status["last_backup"]["path"] == str(tmp_path / "b1"), status["last_backup"]
    text = srv.ctl("status").stdout
    assert "mailsrv is running" in text and "oldest deferred message:" in text, text
    assert f"last backup: {tmp_path / 'b1'} (full" in text, text


def test_background_start_and_stop(installation):
    installation.ctl("start")
    # `start` returns once the SMTP port accepts connections.
    assert greets(installation.smtp_port)
    pids = [installation.pid(d) for d in ("master", "smtpd", "qmgr")]
    assert all(pid_alive(p) for p in pids), pids
    assert (installation.root / "log" / "mailsrv.log").exists()

    installation.ctl("stop")

    assert port_closed(installation.smtp_port)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 5,
               "smtpd and qmgr to be gone after stop")
    assert not pid_alive(pids[0]), "stop returned before the supervisor exited"
