"""Privilege separation (smtpd(8), qmgr(8), maildird(8)): started as root,
the daemons drop to their system users, and each can reach only its part
of the installation. Runs only as root (CI does)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import smtplib
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import BIN_DIR
from mailtest import (
    CLIENT_NAME, LOCALHOST, header, imap_fetch, imap_ok, insecure_tls_context, make_message,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="privilege separation needs the tests to run as root (CI does): the daemons "
           "drop privileges only when started as root")

ALICE = "alice@example.test"
BOB = "bob@example.test"
FAR = "someone@far.example"


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    """/proc/<pid>/status (or a thread's) as {field: value}."""
    path = Path(f"/proc/{pid}/status") if task is None else Path(f"/proc/{pid}/task/{task}/status")
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def thread_credentials(pid: int) -> dict[int, dict[str, Any]]:
    """{thread id: its uids and gids (real, effective, saved, fs),
    supplementary groups and NoNewPrivs} for every thread of `pid`."""
    per_thread = {}
    for task in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        try:
            status = proc_status(pid, task)
        except FileNotFoundError:   # a thread that just ended
            continue
        per_thread[task] = {
            "uids": [int(v) for v in status["Uid"].split()],
            "gids": [int(v) for v in status["Gid"].split()],
            "groups": sorted(int(v) for v in status["Groups"].split()),
            "no_new_privs": status["NoNewPrivs"],
        }
    assert pid in per_thread, f"no main thread for pid {pid}"
    return per_thread


def credentials(pid: int) -> dict[str, Any]:
    """The credentials of `pid`'s main thread (/proc/<pid>/status); asserts
    that every other thread has the same ids and groups."""
    per_thread = thread_credentials(pid)
    main = per_thread[pid]
    ids = ("uids", "gids", "groups")
    differing = {t: c for t, c in per_thread.items() if any(c[k] != main[k] for k in ids)}
    assert not differing, f"threads of {pid} differ in ids: main {main}, others {differing}"
    return main


def run_as(creds: dict[str, Any], checks: dict[str, Callable[[], Any]]) -> dict[str, list]:
    """Run each check in a forked child holding exactly `creds`'s uid, gid
    and groups (setgroups, setgid, setuid, in that order); returns
    {name: ["ok", value] or [exception class name, message]}, sent back
    through a pipe as JSON."""
    uid, gid, groups = creds["uids"][0], creds["gids"][0], creds["groups"]
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:   # the child: report, never return
        code = 1
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            results: dict[str, Any] = {
                "ids": ["ok", [list(os.getresuid()), list(os.getresgid()),
                               sorted(os.getgroups())]]}
            for name, check in checks.items():
                try:
                    results[name] = ["ok", check()]
                except OSError as e:
                    results[name] = [type(e).__name__, str(e)]
            data = json.dumps(results).encode()
            while data:
                data = data[os.write(write_end, data):]
            code = 0
        except BaseException as e:
            try:
                os.write(write_end, json.dumps({"child error": ["error", repr(e)]}).encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(child, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, f"the child failed: {text}"
    results = json.loads(text)
    assert results["ids"][1] == [[uid] * 3, [gid] * 3, sorted(groups)], \
        f"the child did not get the credentials {creds}: {results['ids']}"
    return results


def allowed(results: dict[str, list], name: str, who: str) -> Any:
    outcome, value = results[name]
    assert outcome == "ok", f"{who} could not {name}: {outcome}: {value}"
    return value


def denied(results: dict[str, list], name: str, who: str) -> None:
    outcome, value = results[name]
    assert outcome == "PermissionError", \
        f"{who} should get PermissionError for {name}, got {outcome}: {value!r}"


def read_head(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(4096).decode(errors="replace")


def test_daemons_drop_privileges_and_keep_apart(make_mailsrv):
    srv = make_mailsrv(privileged=True, users=[ALICE, BOB], wait_for_imap=True)
    privileges = srv.config()["privileges"]
    spool_user = pwd.getpwnam(privileges["spool_user"])
    store_user = pwd.getpwnam(privileges["store_user"])
    secret_gid = grp.getgrnam(privileges["secret_group"]).gr_gid

    # The whole system works: submission with AUTH, the MX port, delivery,
    # IMAPS; and a relayed message stays in the queue (far.example gets
    # SERVFAIL from the tests' DNS server).
    submitted = make_message("submitted as alice", sender=ALICE, to=BOB)
    relayed = make_message("relayed, stays queued", sender=ALICE, to=FAR)
    with smtplib.SMTP(LOCALHOST, srv.submission_port, local_hostname=CLIENT_NAME,
                      timeout=15) as client:
        client.starttls(context=insecure_tls_context())
        client.login(ALICE, srv.passwords[ALICE])
        assert client.sendmail(ALICE, [BOB], submitted) == {}
        assert client.sendmail(ALICE, [FAR], relayed) == {}
    from_mx = srv.send(BOB, make_message(f"over the MX port {uuid.uuid4().hex}", to=BOB))
    srv.wait_for_delivery(BOB, [submitted, from_mx])

    data_dir = srv.spool_dir / "data"
    queued = wait_until(lambda: "deferred" in srv.spool_files() and srv.spool_files().get("data"),
                        20, "the relayed message deferred in the spool")
    spool_file = data_dir / queued[0]
    [message_path] = [p for p in srv.messages(BOB)
                      if header(p.read_bytes(), "Message-ID") == header(submitted, "Message-ID")]

    # Who each daemon runs as, in every thread.
    creds = {d: credentials(srv.pid(d)) for d in ("smtpd", "qmgr", "maildird")}
    for daemon, c in creds.items():
        assert all(u != 0 for u in c["uids"]), f"{daemon} kept uid 0: Uid {c['uids']}"
        assert all(g != 0 for g in c["gids"]), f"{daemon} kept gid 0: Gid {c['gids']}"
        assert len(set(c["uids"])) == 1, f"{daemon}: real/effective/saved/fs uids differ: {c}"
        assert c["no_new_privs"] == "1", f"{daemon}: NoNewPrivs is {c['no_new_privs']}"
    assert creds["smtpd"]["uids"][0] != creds["maildird"]["uids"][0], \
        f"smtpd and maildird run as the same uid: {creds}"
    assert creds["smtpd"]["uids"][0] == spool_user.pw_uid, creds["smtpd"]
    assert creds["qmgr"]["uids"][0] == store_user.pw_uid, creds["qmgr"]
    assert creds["maildird"]["uids"][0] == store_user.pw_uid, creds["maildird"]
    assert creds["smtpd"]["groups"] == sorted({spool_user.pw_gid, secret_gid}), creds["smtpd"]
    drop_gid = grp.getgrnam(srv.config()["privileges"].get("maildrop_group",
                                                            "mailsrv-drop")).gr_gid
    assert creds["qmgr"]["groups"] == sorted({store_user.pw_gid, secret_gid,
                                             spool_user.pw_gid, drop_gid}), creds["qmgr"]
    assert creds["maildird"]["groups"] == sorted({store_user.pw_gid, secret_gid}), \
        creds["maildird"]

    # smtpd's credentials reach the spool, not the Maildirs.
    as_smtpd = run_as(creds["smtpd"], {
        "list the spool": lambda: sorted(os.listdir(srv.spool_dir)),
        "list spool/data": lambda: sorted(os.listdir(data_dir)),
        "open a delivered message": lambda: read_head(message_path),
        "list the mail root": lambda: sorted(os.listdir(srv.mail_root)),
    })
    allowed(as_smtpd, "list the spool", "smtpd")
    assert spool_file.name in allowed(as_smtpd, "list spool/data", "smtpd")
    denied(as_smtpd, "open a delivered message", "smtpd")
    denied(as_smtpd, "list the mail root", "smtpd")

    # maildird's credentials reach the Maildirs, not the spool.
    as_maildird = run_as(creds["maildird"], {
        "read a delivered message": lambda: read_head(message_path),
        "list the mail root": lambda: sorted(os.listdir(srv.mail_root)),
        "list the spool": lambda: sorted(os.listdir(srv.spool_dir)),
        "list spool/data": lambda: sorted(os.listdir(data_dir)),
        "open a spool file": lambda: read_head(spool_file),
    })
    content = allowed(as_maildird, "read a delivered message", "maildird")
    assert "Subject: submitted as alice" in content, content
    assert srv.domain in allowed(as_maildird, "list the mail root", "maildird")
    denied(as_maildird, "list the spool", "maildird")
    denied(as_maildird, "list spool/data", "maildird")
    denied(as_maildird, "open a spool file", "maildird")
    assert spool_file.exists(), "the spool file went away during the checks"

    # Reading the mail back over IMAPS.
    with srv.imaps(BOB) as client:
        imap_ok(client.select("INBOX"))
        fetched = imap_fetch(client, "1:*", "(BODY.PEEK[])")
    ids = {header(items["BODY[]"], "Message-ID") for items in fetched.values()}
    assert ids == {header(submitted, "Message-ID"), header(from_mx, "Message-ID")}, ids


def test_no_new_privs_in_every_thread(make_mailsrv):
    # PR_SET_NO_NEW_PRIVS is a per-thread attribute: a thread started
    # before it was set (a runtime's worker threads) does not get it, and
    # those threads are the ones that serve the network.
    srv = make_mailsrv(privileged=True, users=[ALICE], wait_for_imap=True)
    # Some work first, so the worker and blocking-pool threads exist.
    with smtplib.SMTP_SSL(LOCALHOST, srv.submissions_port, local_hostname=CLIENT_NAME,
                          timeout=15, context=insecure_tls_context()) as client:
        client.login(ALICE, srv.passwords[ALICE])
    with srv.imaps(ALICE) as client:
        imap_ok(client.select("INBOX"))
    srv.send(ALICE)
    srv.wait_for_messages(ALICE, 1)

    problems = {}
    for daemon in ("smtpd", "qmgr", "maildird"):
        pid = srv.pid(daemon)
        per_thread = thread_credentials(pid)
        without = {}
        for task, c in per_thread.items():
            if c["no_new_privs"] != "1":
                try:
                    name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
                except FileNotFoundError:
                    name = "?"
                without[f"{task} ({name})"] = c["no_new_privs"]
        if without:
            problems[daemon] = f"{len(without)} of {len(per_thread)} threads: {without}"
    assert not problems, f"threads with NoNewPrivs not 1: {problems}"


def served_certificate(port: int) -> bytes:
    """The certificate an implicit-TLS port (SMTPS, IMAPS) presents."""
    with socket.create_connection((LOCALHOST, port), timeout=10) as raw:
        with insecure_tls_context().wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def test_renewed_root_only_key_reaches_the_unprivileged_daemons(make_mailsrv):
    """An ACME client writes the renewed key readable by root alone; the
    daemons, no longer root, get it from master at `mailctl reload`."""
    srv = make_mailsrv(privileged=True, wait_for_imap=True)
    tls = srv.config()["tls"]
    cert_path, key_path = srv.root / tls["cert"], srv.root / tls["key"]
    before = served_certificate(srv.submissions_port)
    assert served_certificate(srv.imaps_port) == before

    tag = uuid.uuid4().hex[:8]
    new_cert, new_key = cert_path.with_name(f"new-{tag}.pem"), key_path.with_name(f"k-{tag}.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=localhost", "-days", "2", "-keyout", str(new_key),
         "-out", str(new_cert)],
        stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=60)
    for path in (new_cert, new_key):
        os.chown(path, 0, 0)
        path.chmod(0o600)
    os.replace(new_key, key_path)
    os.replace(new_cert, cert_path)
    smtpd = credentials(int((srv.run_dir / "smtpd.pid").read_text()))
    denied(run_as(smtpd, {"read the key": lambda: read_head(key_path)}),
           "read the key", "smtpd's user")

    srv.ctl("reload")
    after = {}

    def renewed() -> bool:
        after["smtps"] = served_certificate(srv.submissions_port)
        after["imaps"] = served_certificate(srv.imaps_port)
        return after["smtps"] != before and after["imaps"] != before
    wait_until(renewed, 10, "the renewed certificate on SMTPS and IMAPS", interval=0.2)
    assert after["smtps"] == after["imaps"]
    assert "reload failed" not in srv.log_tail(), srv.log_tail()


def test_root_mailctl_never_follows_links_in_the_mail_store(make_mailsrv, tmp_path):
    """The store user (a broken-into maildird) controls the mail root;
    `mailctl user add` run as root must not chown or create through a
    link it planted there."""
    srv = make_mailsrv(privileged=True, start=False)
    target = tmp_path / "root-owned"
    target.mkdir(mode=0o755)
    (target / "keep").write_text("root's file\n")
    srv.add_domain("evil.test")
    domain_dir = srv.mail_root / "evil.test"
    domain_dir.rmdir()
    domain_dir.symlink_to(target)

    result = srv.add_user("bob@evil.test", check=False)
    assert result.returncode != 0, "a Maildir was made through the link"
    stat = target.stat()
    assert (stat.st_uid, stat.st_gid) == (0, 0), "mailctl chowned the link's target"
    assert sorted(p.name for p in target.iterdir()) == ["keep"], list(target.iterdir())


def test_spool_links_and_fifos_are_refused(make_mailsrv):
    """smtpd's user can write the spool: a message file that is a link
    (to a Maildir file) is never delivered, and a FIFO in the maildrop does
    not stop qmgr."""
    srv = make_mailsrv(privileged=True, users=[ALICE, BOB])
    secret = srv.mail_root / "example.test" / "alice" / "cur" / "secret:2,S"
    secret.write_text("Subject: alice's secret\n\nnot for bob\n")
    spool = srv.spool_dir
    link_id, fifo_id = "1AAAAAAAAAAAAAAA", "1BBBBBBBBBBBBBBB"
    envelope = {"id": link_id, "sender": "x@far.example", "arrival": 0, "size": 1,
                "recipients": [{"address": BOB, "status": "unresolved"}]}
    (spool / "data" / link_id).symlink_to(secret)
    (spool / "tmp" / f"{link_id}.env").write_text(json.dumps(envelope))
    os.mkfifo(spool / "maildrop" / f"{fifo_id}.tmp")
    os.rename(spool / "maildrop" / f"{fifo_id}.tmp", spool / "maildrop" / fifo_id)
    os.rename(spool / "tmp" / f"{link_id}.env", spool / "incoming" / link_id)

    # qmgr still works: ordinary mail is delivered.
    with smtplib.SMTP(LOCALHOST, srv.smtp_port, timeout=10) as smtp:
        smtp.sendmail("x@far.example", [ALICE], make_message("after the traps", to=ALICE))
    srv.wait_for_messages(ALICE, 1, timeout=15)
    wait_until(lambda: (spool / "corrupt" / link_id).exists(), 15, "the linked entry set aside")
    wait_until(lambda: (spool / "corrupt" / fifo_id).exists(), 15, "the FIFO set aside")
    assert srv.messages(BOB) == [], "a message file that is a link was delivered"


def run_sendmail_as_nobody(program: Path, config: Path, *args: str,
                           input: bytes) -> subprocess.CompletedProcess:
    """Run `program` as the unprivileged user nobody (no supplementary
    groups), with the installation's config in $MAILSRV_CONFIG."""
    env = {"PATH": os.environ["PATH"], "MAILSRV_CONFIG": str(config)}
    nobody = pwd.getpwnam("nobody")
    return subprocess.run([str(program), *args], input=input, env=env, capture_output=True,
                          user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                          timeout=30)


def test_any_user_queues_mail_through_a_setgid_sendmail(make_mailsrv):
    """Installed setgid to the maildrop group (as Postfix's postdrop), the
    sendmail of any local user reaches the maildrop and nothing else; the
    message is attributed to that user, and a config the user could have
    written is refused."""
    srv = make_mailsrv(users=[ALICE], privileged=True)
    drop_group = srv.config()["privileges"].get("maildrop_group", "mailsrv-drop")
    maildrop = srv.spool_dir / "maildrop"
    st = maildrop.stat()
    assert oct(st.st_mode & 0o7777) == oct(0o3730), oct(st.st_mode)
    assert grp.getgrgid(st.st_gid).gr_name == drop_group
    assert oct(srv.config_path.stat().st_mode & 0o777) == oct(0o644)

    # What a package's install step does; and the same program without
    # the setgid bit.
    srv.root.chmod(0o755)
    installed, plain = srv.root / "sendmail", srv.root / "sendmail-plain"
    for copy in (installed, plain):
        copy.write_bytes((BIN_DIR / "sendmail").read_bytes())
        copy.chmod(0o755)
    os.chown(installed, 0, grp.getgrnam(drop_group).gr_gid)
    installed.chmod(0o2755)

    message = f"To: {ALICE}\nSubject: from nobody\n\nhello\n".encode()
    refused = run_sendmail_as_nobody(plain, srv.config_path, "-t", input=message)
    assert refused.returncode == 77, refused  # EX_NOPERM: no way into the maildrop

    result = run_sendmail_as_nobody(installed, srv.config_path, "-t", input=message)
    assert result.returncode == 0, result.stderr.decode()
    [path] = srv.wait_for_messages(ALICE, 1, timeout=15)
    content = path.read_bytes()
    uid = pwd.getpwnam("nobody").pw_uid
    assert f"from userid {uid}" in content.decode(), content[:400]
    assert content.startswith(f"Return-Path: <nobody@{srv.hostname}>\n".encode())

    # A config nobody could have written is not read by the setgid program.
    forged = srv.root / "forged.toml"
    forged.write_text(srv.config_path.read_text())
    os.chown(forged, uid, -1)
    refused = run_sendmail_as_nobody(installed, forged, "-t", input=message)
    assert refused.returncode == 77, refused
    assert b"refusing it in a setgid sendmail" in refused.stderr, refused.stderr
