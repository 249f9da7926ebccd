#!/usr/bin/env bash
# Measure mailsrv's IMAP server with imapload: builds release binaries,
# makes a throw-away installation in a temp dir on PORT_BASE (default
# 35000), fills demo's INBOX with COUNT (default 100000) messages of 4 KiB
# and idle's with 1000, runs every imapload scenario (the 1000 idle
# connections log in as idle), stops everything and cleans up.
#   COUNT=100000 bench/imap-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
bin=$PWD/target/release
dir=$(mktemp -d)
port_base=${PORT_BASE:-35000}
count=${COUNT:-100000}
cfg=$dir/mailsrv.toml
cleanup() { "$bin/mailctl" -c "$cfg" stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
"$bin/mailctl" init "$dir" --domain example.test --port-base "$port_base" >/dev/null
# imapload logs in over plain TCP from one address, up to 1000 times at once.
sed -i 's/^allow_plaintext_auth = false/allow_plaintext_auth = true/' "$cfg"
printf '\n[maildird.limits]\nmax_connections = 2000\nmax_connections_per_client = 2000\n' >> "$cfg"
echo pw | "$bin/mailctl" -c "$cfg" user add demo@example.test >/dev/null
echo pw | "$bin/mailctl" -c "$cfg" user add idle@example.test >/dev/null
"$bin/imapload" populate --maildir "$dir/mail/example.test/demo" --count "$count" --size 4096
# The idle connections select a mailbox of ordinary size.
"$bin/imapload" populate --maildir "$dir/mail/example.test/idle" --count 1000 --size 4096
# mailctl start returns once every listener answers.
start() { "$bin/mailctl" -c "$cfg" start >/dev/null; }
start
load() { "$bin/imapload" --server "127.0.0.1:$((port_base + 143))" --password pw "$@"; }
echo "first SELECT (moves $count messages from new/ to cur/):"
demo=(--user demo@example.test)
load "${demo[@]}" select --repeat 1
load "${demo[@]}" select --repeat 5
load "${demo[@]}" fetch-envelopes
load "${demo[@]}" fetch-envelopes
echo "after a restart (envelopes come from mailsrv-envelopes):"
"$bin/mailctl" -c "$cfg" stop >/dev/null
start
load "${demo[@]}" select --repeat 1
load "${demo[@]}" fetch-envelopes
load "${demo[@]}" fetch-bodies --count 10000
load "${demo[@]}" loop --clients 50 --seconds 10
pid=$(pgrep -f "$bin/maildird" | head -n 1)
echo "maildird RSS after the runs above: $(grep VmRSS /proc/"$pid"/status)"
# Measure idle connections on a fresh daemon.
"$bin/mailctl" -c "$cfg" stop >/dev/null
start
pid=$(pgrep -f "$bin/maildird" | head -n 1)
load --user idle@example.test idle-connections --connections 1000 --pid "$pid"
