#!/usr/bin/env python3
"""Side-by-side benchmark: mailsrv against Postfix (SMTP, Maildir delivery
through virtual(8)) and Dovecot (IMAP, POP3) on this machine, with the
same load generators (loadgen, imapload), the same messages and the same
Maildir contents. Prints every figure and the ratio; `--json FILE` saves
them all.

Run it through bench/compare.sh, which installs the Debian packages and
builds the release binaries. Postfix and Dovecot start as root (their
masters drop privileges themselves); without root only mailsrv is
measured. Every server runs from a throw-away directory on loopback
ports and is stopped at the end, even after a failure.

Fairness: mailsrv runs with its sender checks (SPF, DKIM, ARC, DMARC) off,
as Postfix does none as shipped; both fsync every message before the 250
and again in the Maildir. Dovecot passwords are SHA512-CRYPT (doveadm pw's
default), mailsrv's Argon2id. "cold" means the first open of a Maildir the
server has never seen (no index), after the page cache was dropped when
the machine allows it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402  (bench/reference.py: Postfix and Dovecot instances)
from reference import free_port, pss_kib  # noqa: E402

KIB = 1024
MIB = 1024 * 1024


def free_port_base() -> int:
    """A base port P such that P+25 ... P+995 are probably free."""
    for base in range(40000, 60000, 1000):
        probes = [base + o for o in (25, 110, 143, 465, 587, 993, 995)]
        if all(port_free(p) for p in probes):
            return base
    raise RuntimeError("no free port range between 40000 and 60000")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class PeakMemory:
    """Samples the summed PSS of a server's processes every `interval`
    seconds in a thread; `peak` is the largest sample."""

    def __init__(self, pids_of, interval: float = 0.5):
        self.pids_of = pids_of
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_kib(self.pids_of()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache, so that a "cold" figure
    reads from the disk; False when the machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_json(cmd: list[str], timeout: float) -> dict:
    """Run a load generator with --json; its last output line, parsed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Mailsrv:
    """A throw-away mailsrv installation (mailctl init --single-user)."""

    def __init__(self, bin_dir: Path, root: Path, port_base: int):
        self.bin = bin_dir
        self.root = root
        self.port_base = port_base
        self.config = root / "mailsrv.toml"
        self.started = False

    def mailctl(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run([str(self.bin / "mailctl"), "-c", str(self.config), *args],
                              input=stdin, capture_output=True, text=True, check=True).stdout

    def init(self, users: tuple[str, ...]) -> None:
        subprocess.run([str(self.bin / "mailctl"), "init", str(self.root), "--domain",
                        "example.test", "--port-base", str(self.port_base), "--single-user"],
                       capture_output=True, check=True)
        text = self.config.read_text()
        # The load comes from one address, plaintext LOGIN included, as
        # for Dovecot; sender checks off, as Postfix has none as shipped.
        text = text.replace("[smtpd]\n", "[smtpd]\nmax_connections_per_client = 1000\n", 1)
        text = text.replace("allow_plaintext_auth = false", "allow_plaintext_auth = true")
        text += ("\n[checks]\nspf = false\ndkim = false\narc = false\ndmarc = false\n"
                 "\n[maildird.limits]\nmax_connections = 30000\n"
                 "max_connections_per_client = 30000\n")
        self.config.write_text(text)
        for user in users:
            self.mailctl("user", "add", f"{user}@example.test", stdin="pw\n")

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / "example.test" / user

    def start(self) -> None:
        self.mailctl("start")
        self.started = True

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.mailctl("stop")
            self.started = False

    def pids(self, daemon: str | None = None) -> list[int]:
        status = json.loads(self.mailctl("status", "--json"))
        return [int(pid) for name, pid in status.get("pids", {}).items()
                if daemon is None or name == daemon]

    def smtp_port(self) -> int:
        return self.port_base + 25

    def imap_port(self) -> int:
        return self.port_base + 143

    def imaps_port(self) -> int:
        return self.port_base + 993

    def pop3_port(self) -> int:
        return self.port_base + 110


class Table:
    """The printed comparison: one row per figure."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, figure: str, unit: str, ours, theirs,
            higher_is_better: bool, reference_name: str) -> None:
        ratio = None
        if ours and theirs:
            ratio = ours / theirs if higher_is_better else theirs / ours
        row = {"section": section, "figure": figure, "unit": unit, "mailsrv": ours,
               "reference": theirs, "reference_name": reference_name,
               "higher_is_better": higher_is_better, "advantage": ratio}
        self.rows.append(row)
        print(self.format(row), flush=True)

    @staticmethod
    def format(row: dict) -> str:
        def num(v):
            if v is None:
                return "-"
            return f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"
        adv = row["advantage"]
        better = "" if adv is None else f"{adv:5.2f}x {'better' if adv >= 1 else 'WORSE'}"
        name = f"{row['section']}: {row['figure']}"
        return (f"  {name:58} {num(row['mailsrv']):>10} {num(row['reference']):>10} "
                f"{row['unit']:9} {better}")

    def header(self, reference_name: str) -> None:
        print(f"  {'figure':58} {'mailsrv':>10} {reference_name:>10} {'unit':9} "
              "mailsrv vs reference", flush=True)


def smtp_phases(quick: bool) -> list[dict]:
    """The loads of the issue: 20 sessions x 5,000 x 4 KiB, 200 sessions,
    100 x 10 MiB; tiny ones with --quick."""
    if quick:
        return [dict(name="20 sessions x 4 KiB", sessions=4, messages=40, size=4 * KIB, per=10),
                dict(name="200 sessions x 4 KiB", sessions=20, messages=40, size=4 * KIB, per=2),
                dict(name="10 MiB messages", sessions=2, messages=4, size=1 * MIB, per=2)]
    return [dict(name="20 sessions x 4 KiB", sessions=20, messages=100_000, size=4 * KIB,
                 per=5_000),
            dict(name="200 sessions x 4 KiB", sessions=200, messages=100_000, size=4 * KIB,
                 per=500),
            dict(name="10 MiB messages", sessions=10, messages=100, size=10 * MIB, per=10)]


def smtp_load(bin_dir: Path, port: int, maildir: Path, phase: dict, timeout: int) -> dict:
    cmd = [str(bin_dir / "loadgen"), "--server", f"127.0.0.1:{port}",
           "--sessions", str(phase["sessions"]), "--messages", str(phase["messages"]),
           "--size", str(phase["size"]), "--per-session", str(phase["per"]), "--pipelining",
           "--from", "loadgen@sender.test", "--to", "u1@example.test",
           "--maildir-glob", str(maildir / "new"), "--timeout", str(timeout), "--json"]
    return run_json(cmd, timeout * 3)


def smtp_figures(report: dict) -> tuple[float | None, float | None]:
    """(accepted msg/s, end-to-end msg/s) from a loadgen JSON report."""
    delivery = report.get("delivery") or {}
    return report.get("accepted_per_s"), delivery.get("delivered_per_s")


def run_smtp(args, table: Table, results: dict) -> None:
    print("\nSMTP end to end: loadgen -> server -> Maildir (fsync on both)", flush=True)
    table.header("Postfix")
    phases = smtp_phases(args.quick)
    timeout = 60 if args.quick else 900
    for phase in phases:
        rest(args.rest)
        ours = measure_mailsrv_smtp(args, phase, timeout)
        theirs = None
        if args.references:
            rest(args.rest)
            theirs = measure_postfix_smtp(args, phase, timeout)
        results.setdefault("smtp", []).append(
            {"phase": phase, "mailsrv": ours, "postfix": theirs})
        name = phase["name"]
        acc_o, e2e_o = smtp_figures(ours["report"])
        acc_t, e2e_t = smtp_figures(theirs["report"]) if theirs else (None, None)
        table.add("SMTP", f"{name}: accepted", "msg/s", acc_o, acc_t, True, "Postfix")
        table.add("SMTP", f"{name}: end to end", "msg/s", e2e_o, e2e_t, True, "Postfix")
        if phase["size"] >= MIB:
            mb_o = e2e_o * phase["size"] / 1e6 if e2e_o else None
            mb_t = e2e_t * phase["size"] / 1e6 if e2e_t else None
            table.add("SMTP", f"{name}: end to end", "MB/s", mb_o, mb_t, True, "Postfix")
        table.add("SMTP", f"{name}: peak memory of all processes", "MiB",
                  ours["peak_pss_kib"] / 1024,
                  theirs["peak_pss_kib"] / 1024 if theirs else None, False, "Postfix")


def rest(seconds: int) -> None:
    """Let the disk settle before a measurement: a virtual machine's disk
    often takes fsyncs fast in bursts and slows under sustained load, so
    whichever server ran second would pay for the first."""
    if seconds > 0:
        os.sync()
        time.sleep(seconds)


def measure_mailsrv_smtp(args, phase: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cmp-mailsrv-") as tmp:
        srv = Mailsrv(args.bin_dir, Path(tmp) / "inst", free_port_base())
        try:
            srv.init(("u1",))
            srv.start()
            pids = srv.pids()
            with PeakMemory(lambda: pids) as peak:
                report = smtp_load(args.bin_dir, srv.smtp_port(), srv.maildir("u1"), phase,
                                   timeout)
            smtpd_hwm = vm_hwm_kib(srv.pids("smtpd"))
            return {"report": report, "peak_pss_kib": peak.peak, "smtpd_vmhwm_kib": smtpd_hwm}
        finally:
            srv.stop()


def measure_postfix_smtp(args, phase: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cmp-postfix-") as tmp:
        root = Path(tmp)
        root.chmod(0o711)   # the reference servers' users must reach below it
        pf = reference.Postfix(root / "postfix", free_port(), users=("u1",))
        try:
            pf.start()
            with PeakMemory(pf.pids) as peak:
                report = smtp_load(args.bin_dir, pf.smtp_port, pf.maildir("u1"), phase, timeout)
            return {"report": report, "peak_pss_kib": peak.peak}
        finally:
            pf.stop()


def vm_hwm_kib(pids: list[int]) -> int | None:
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return None


def chown_tree(top: Path, uid: int, gid: int) -> None:
    for directory, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            os.chown(os.path.join(directory, name), uid, gid)
    os.chown(top, uid, gid)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A P-256 certificate and key for the reference IMAPS listener (the
    same kind mailctl init makes for mailsrv)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def versions() -> dict:
    """Versions of the reference servers, as they report them."""
    def out(cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    return {"postfix": out(["postconf", "-d", "-h", "mail_version"]),
            "dovecot": out(["dovecot", "--version"])}


def populate(bin_dir: Path, maildir: Path, count: int) -> None:
    subprocess.run([str(bin_dir / "imapload"), "populate", "--maildir", str(maildir),
                    "--count", str(count), "--size", str(4 * KIB)],
                   check=True, capture_output=True)


class ImapTarget:
    """What imapload needs to aim at one server."""

    def __init__(self, bin_dir: Path, imap: int, pop3: int, imaps: int | None):
        self.bin_dir = bin_dir
        self.imap = imap
        self.pop3 = pop3
        self.imaps = imaps

    def imapload(self, *args: str, user: str = "demo", port: int | None = None,
                 tls: bool = False, timeout: float = 1800) -> dict:
        cmd = [str(self.bin_dir / "imapload"), "--server", f"127.0.0.1:{port or self.imap}",
               "--user", f"{user}@example.test", "--password", "pw", "--json"]
        if tls:
            cmd.append("--tls")
        return run_json(cmd + list(args), timeout)


def imap_scenarios(t: ImapTarget, count: int, quick: bool, loop_seconds: int) -> dict:
    """Every IMAP and POP3 figure of one server, first open first."""
    r = {}
    r["select_cold"] = t.imapload("select", "--repeat", "1")
    r["fetch_envelopes_cold"] = t.imapload("fetch-envelopes", "--repeat", "1")
    r["select_warm"] = t.imapload("select", "--repeat", "5")
    r["fetch_envelopes_warm"] = t.imapload("fetch-envelopes", "--repeat", "3")
    r["fetch_bodies"] = t.imapload("fetch-bodies", "--count", str(min(count, 10_000)))
    middle = count // 2
    r["search_header"] = t.imapload(
        "search", "--criteria", f'HEADER Message-ID "<{middle}.imapload@example.org>"',
        "--repeat", "3")
    r["search_body"] = t.imapload("search", "--criteria", f'BODY "xq{middle}z"', "--repeat", "2")
    for key in ("search_header", "search_body"):
        if r[key]["hits"] != 1:
            raise RuntimeError(f"{key}: {r[key]['hits']} hits instead of 1: {r[key]}")
    r["pop3"] = t.imapload("pop3", "--count", str(min(count, 10_000)), port=t.pop3)
    r["loop"] = t.imapload("loop", "--clients", "4" if quick else "50",
                           "--seconds", str(loop_seconds))
    return r


AFTER_CLOSE_SECONDS = 10


def idle_memory(t: ImapTarget, pids_of, connections: int, tls: bool) -> dict:
    """Open `connections` IMAP sessions in IDLE (each with the idle user's
    INBOX selected), measure the summed PSS of the server's processes
    before, with them open, and AFTER_CLOSE_SECONDS after they close."""
    before = pss_kib(pids_of())
    cmd = [str(t.bin_dir / "imapload"), "--server",
           f"127.0.0.1:{t.imaps if tls else t.imap}", "--user", "idle@example.test",
           "--password", "pw", "--json"]
    if tls:
        cmd.append("--tls")
    cmd += ["idle-connections", "--connections", str(connections), "--hold"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"imapload idle-connections: {proc.stderr.read()[-2000:]}")
        opened = json.loads(line)
        with_open = pss_kib(pids_of())
        proc.stdin.close()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # mailsrv gives freed memory back once closing has stopped for a few
    # seconds (common/src/memory.rs); Dovecot's processes simply exit.
    time.sleep(AFTER_CLOSE_SECONDS)
    after = pss_kib(pids_of())
    return {"connections": connections, "tls": tls, "open_s": opened.get("open_s"),
            "pss_before_kib": before, "pss_open_kib": with_open, "pss_after_kib": after,
            "kib_per_connection": (with_open - before) / connections}


def run_imap(args, table: Table, results: dict) -> None:
    for count in args.counts:
        print(f"\nIMAP and POP3, INBOX of {count:,} messages of 4 KiB "
              "(the same files for both)", flush=True)
        table.header("Dovecot")
        ours = measure_mailsrv_imap(args, count)
        theirs = measure_dovecot_imap(args, count) if args.references else None
        results.setdefault("imap", []).append(
            {"messages": count, "mailsrv": ours, "dovecot": theirs})
        imap_rows(table, f"IMAP {count:,}", ours, theirs)
        if "idle" in ours:
            results["idle"] = {"mailsrv": ours["idle"],
                               "dovecot": theirs.get("idle", {}) if theirs else {}}
    idle_rows(table, results)


def imap_rows(table: Table, section: str, ours: dict, theirs: dict | None) -> None:
    def fig(r: dict | None, key: str, field: str):
        return r[key][field] if r else None

    rows = [("SELECT, first open", "select_cold", "first_ms", "ms", False),
            ("SELECT, warm", "select_warm", "best_ms", "ms", False),
            ("FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE), first", "fetch_envelopes_cold",
             "first_ms", "ms", False),
            ("FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE), warm", "fetch_envelopes_warm",
             "best_ms", "ms", False),
            ("FETCH BODY.PEEK[] of up to 10k", "fetch_bodies", "mb_s", "MB/s", True),
            ("UID SEARCH HEADER Message-ID, first", "search_header", "first_ms", "ms", False),
            ("UID SEARCH HEADER Message-ID, warm", "search_header", "best_ms", "ms", False),
            ("UID SEARCH BODY, first", "search_body", "first_ms", "ms", False),
            ("UID SEARCH BODY, warm", "search_body", "best_ms", "ms", False),
            ("POP3 STAT", "pop3", "stat_ms", "ms", False),
            ("POP3 UIDL", "pop3", "uidl_ms", "ms", False),
            ("POP3 RETR of up to 10k, one at a time", "pop3", "retr_messages_s", "msg/s", True),
            ("POP3 RETR of up to 10k, pipelined", "pop3", "pipelined_messages_s", "msg/s",
             True)]
    for figure, key, field, unit, higher in rows:
        table.add(section, figure, unit, fig(ours, key, field), fig(theirs, key, field),
                  higher, "Dovecot")
    best_theirs = None
    if theirs:
        best_theirs = max(theirs["loop"]["loops_s"], theirs["loop_performance"]["loops_s"])
    clients = ours["loop"]["clients"]
    table.add(section, f"login/SELECT/FETCH/LOGOUT loop, {clients} clients (Dovecot: best mode)",
              "loops/s", ours["loop"]["loops_s"], best_theirs, True, "Dovecot")


def idle_rows(table: Table, results: dict) -> None:
    idle = results.get("idle", {})
    for tls in (False, True):
        key = "tls" if tls else "plain"
        ours = idle.get("mailsrv", {}).get(key)
        theirs = idle.get("dovecot", {}).get(key)
        if ours is None:
            continue
        kind = "TLS" if tls else "plaintext"
        table.add("memory", f"per idle {kind} IMAP connection (mailsrv {ours['connections']:,}, "
                  f"Dovecot {theirs['connections']:,} open)" if theirs else
                  f"per idle {kind} IMAP connection ({ours['connections']:,} open)",
                  "KiB", ours["kib_per_connection"],
                  theirs["kib_per_connection"] if theirs else None, False, "Dovecot")
        table.add("memory", f"{AFTER_CLOSE_SECONDS} s after the {kind} connections closed, "
                  "over the start", "MiB",
                  (ours["pss_after_kib"] - ours["pss_before_kib"]) / 1024,
                  (theirs["pss_after_kib"] - theirs["pss_before_kib"]) / 1024
                  if theirs else None, False, "Dovecot")


def measure_mailsrv_imap(args, count: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cmp-mailsrv-") as tmp:
        srv = Mailsrv(args.bin_dir, Path(tmp) / "inst", free_port_base())
        try:
            srv.init(("demo", "idle"))
            populate(args.bin_dir, srv.maildir("demo"), count)
            populate(args.bin_dir, srv.maildir("idle"), args.idle_mailbox)
            drop_page_cache()
            srv.start()
            t = ImapTarget(args.bin_dir, srv.imap_port(), srv.pop3_port(), srv.imaps_port())
            result = imap_scenarios(t, count, args.quick, args.loop_seconds)
            if count == args.counts[-1]:
                result["idle"] = {}
                for tls in (False, True):
                    # A fresh daemon for each, so "after" is against its start.
                    srv.stop()
                    srv.start()
                    result["idle"]["tls" if tls else "plain"] = idle_memory(
                        t, lambda: srv.pids("maildird"), args.idle_connections, tls)
            return result
        finally:
            srv.stop()


def measure_dovecot_imap(args, count: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cmp-dovecot-") as tmp:
        root = Path(tmp)
        root.chmod(0o711)   # the reference servers' users must reach below it
        result = {}
        cert, key = self_signed_certificate(root)
        for performance in (False, True):
            dc = reference.Dovecot(root / ("perf" if performance else "default"), free_port(),
                                   free_port(), users=("demo", "idle"),
                                   performance_mode=performance, imaps_port=free_port(),
                                   tls_cert=cert, tls_key=key)
            try:
                dc.start()
                for user, n in (("demo", count), ("idle", args.idle_mailbox)):
                    populate(args.bin_dir, dc.maildir(user), n)
                    chown_tree(dc.maildir(user), dc.mail_uid, dc.mail_gid)
                drop_page_cache()
                t = ImapTarget(args.bin_dir, dc.imap_port, dc.pop3_port, dc.imaps_port)
                if not performance:
                    result.update(imap_scenarios(t, count, args.quick, args.loop_seconds))
                else:
                    result["loop_performance"] = t.imapload(
                        "loop", "--clients", "4" if args.quick else "50",
                        "--seconds", str(args.loop_seconds))
                    if count == args.counts[-1]:
                        # Its best mode for memory too: one login process
                        # serves every TLS connection.
                        n = min(args.idle_connections, args.dovecot_idle_connections)
                        result["idle"] = {"tls" if tls else "plain": idle_memory(t, dc.pids, n, tls)
                                          for tls in (False, True)}
            finally:
                dc.stop()
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", type=Path,
                        default=Path(__file__).resolve().parent.parent / "target" / "release")
    parser.add_argument("--quick", action="store_true",
                        help="tiny loads: a smoke test that every step works, no figures")
    parser.add_argument("--only", choices=("smtp", "imap"))
    parser.add_argument("--no-references", dest="references", action="store_false",
                        help="measure mailsrv alone (what happens without root)")
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10_000, 100_000], help="INBOX sizes, comma-separated")
    parser.add_argument("--loop-seconds", type=int, default=10)
    parser.add_argument("--rest", type=int, default=60,
                        help="seconds of quiet before each SMTP measurement")
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument("--dovecot-idle-connections", type=int, default=1_000,
                        help="Dovecot runs a process per connection: fewer")
    parser.add_argument("--idle-mailbox", type=int, default=1_000,
                        help="messages in the INBOX each idle connection selects")
    parser.add_argument("--json", type=Path, help="save every result here")
    args = parser.parse_args()
    # Stopped by a signal: unwind, so every server started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.rest = 0
        args.counts = [200]
        args.loop_seconds = 2
        args.idle_connections = 20
        args.dovecot_idle_connections = 20
        args.idle_mailbox = 20
    if args.references and os.geteuid() != 0:
        print("not root: Postfix and Dovecot cannot be started; measuring mailsrv alone",
              flush=True)
        args.references = False
    with contextlib.suppress(ValueError, OSError):
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1),
               "page_cache_droppable": os.access("/proc/sys/vm/drop_caches", os.W_OK),
               "references": versions() if args.references else None}
    print(f"machine: {machine}", flush=True)
    table = Table()
    results: dict = {"machine": machine}
    try:
        if args.only in (None, "smtp"):
            run_smtp(args, table, results)
        if args.only in (None, "imap"):
            run_imap(args, table, results)
    finally:
        results["table"] = table.rows
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
