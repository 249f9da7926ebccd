"""Smoke test of the side-by-side benchmark (bench/compare.py): with a tiny
load, every step runs against mailsrv and, as root, against the Postfix
and Dovecot instances it starts, and every figure comes out. Never a
timed pass/fail: the figures of a debug build under a test run mean
nothing; only that they exist and the loads went through."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import BIN_DIR, REPO


def test_compare_runs_every_scenario(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "bench" / "compare.py"), "--quick",
           "--bin-dir", str(BIN_DIR), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["table"]
    sections = {row["section"] for row in rows}
    assert "SMTP" in sections and "memory" in sections
    assert any(s.startswith("IMAP") for s in sections)
    for row in rows:
        assert row["mailsrv"] is not None, row
        if os.geteuid() == 0:
            # As root the references run too (the test command installs them).
            assert row["reference"] is not None, row
    for phase in results["smtp"]:
        report = phase["mailsrv"]["report"]
        assert report["ok"] and report["delivery"]["delivered"] == phase["phase"]["messages"]
        if phase["postfix"]:
            theirs = phase["postfix"]["report"]
            assert theirs["delivery"]["delivered"] == phase["phase"]["messages"]
    imap = results["imap"][0]
    for server in ("mailsrv", "dovecot"):
        r = imap[server]
        if r is None:
            continue
        assert r["select_cold"]["exists"] == imap["messages"]
        assert r["search_header"]["hits"] == 1 and r["search_body"]["hits"] == 1
        assert r["pop3"]["messages"] == imap["messages"]
        assert r["loop"]["loops"] > 0
