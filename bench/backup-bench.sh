#!/usr/bin/env bash
# Measure mailctl backup on a throw-away installation: MESSAGES messages
# of SIZE bytes (defaults 10000 x 4096) spread over USERS users' INBOX
# and a Work folder, written straight into the Maildirs (no SMTP); then
# times a full backup, an incremental one after 1% new mail and 10% flag
# changes, verify of the chain, and restore --into a new directory, and
# prints the sizes. Uses release binaries.
#   bench/backup-bench.sh [MESSAGES] [SIZE] [USERS]
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-10000}
size=${2:-4096}
users=${3:-10}
cargo build --release -p mailctl --quiet
mailctl=$PWD/target/release/mailctl
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$mailctl" init "$dir/inst" --domain example.test --single-user >/dev/null
cfg=$dir/inst/mailsrv.toml
for u in $(seq 1 "$users"); do
  echo pw | "$mailctl" -c "$cfg" user add "u$u@example.test" >/dev/null
done
python3 - "$dir/inst/mail/example.test" "$messages" "$size" "$users" <<'PY'
import os, sys
root, n, size, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
line = b"x" * 75 + b"\n"
for u in range(1, users + 1):
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, f"u{u}", ".Work", sub), exist_ok=True)
    open(os.path.join(root, f"u{u}", ".Work", "maildirfolder"), "w").close()
for i in range(n):
    user = f"u{i % users + 1}"
    folder = os.path.join(root, user, "" if i % 3 else ".Work")
    head = f"From: a@b.test\nSubject: message {i}\nMessage-ID: <{i}@bench>\n\n".encode()
    body = head + line * max(0, (size - len(head)) // len(line))
    name = f"{1700000000 + i}.M{i}P1.bench,S={len(body)}"
    sub, name = ("new", name) if i % 2 else ("cur", name + ":2,S")
    with open(os.path.join(folder, sub, name), "wb") as f:
        f.write(body)
PY
timed() { local t0=$EPOCHREALTIME; "$@" >/dev/null 2>&1; awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
echo "mailboxes: $messages messages of $size bytes for $users users ($(du -sh "$dir/inst/mail" | cut -f1) on disk)"
echo "full backup:        $(timed "$mailctl" -c "$cfg" backup create --to "$dir/b0") s, $(du -sh "$dir/b0" | cut -f1)"
python3 - "$dir/inst/mail/example.test" "$messages" "$users" <<'PY'
import os, sys
root, n, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n // 100):
    user = f"u{i % users + 1}"
    name = f"{1800000000 + i}.M{i}P2.bench,S=20"
    with open(os.path.join(root, user, "new", name), "wb") as f:
        f.write(b"Subject: new\n\nhello\n")
changed = 0
for u in range(1, users + 1):
    cur = os.path.join(root, f"u{u}", "cur")
    for name in sorted(os.listdir(cur))[: n // users // 10]:
        base = name.split(":")[0]
        os.rename(os.path.join(cur, name), os.path.join(cur, base + ":2,FS"))
        changed += 1
PY
echo "incremental backup: $(timed "$mailctl" -c "$cfg" backup create --to "$dir/b1" --incremental-from "$dir/b0") s, $(du -sh "$dir/b1" | cut -f1)"
echo "verify (chain):     $(timed "$mailctl" backup verify "$dir/b1") s"
echo "restore --into:     $(timed "$mailctl" backup restore "$dir/b1" --into "$dir/restored") s"
