#!/usr/bin/env bash
# Measure mailsrv's SMTP intake and end-to-end delivery with loadgen:
# builds release binaries, makes a throw-away installation in a temp dir
# on PORT_BASE (default 34000), runs loadgen with the arguments given
# (defaults below), prints its report, stops everything and cleans up.
#   bench/smtp-bench.sh [loadgen options...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
bin=$PWD/target/release
dir=$(mktemp -d)
port_base=${PORT_BASE:-34000}
cfg=$dir/mailsrv.toml
cleanup() { "$bin/mailctl" -c "$cfg" stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
"$bin/mailctl" init "$dir" --domain example.test --port-base "$port_base" >/dev/null
# loadgen connects from one address; lift the per-client limit for it.
sed -i 's/^\[smtpd\]$/[smtpd]\nmax_connections_per_client = 500/' "$cfg"
for u in u1 u2; do echo pw | "$bin/mailctl" -c "$cfg" user add "$u@example.test" >/dev/null; done
"$bin/mailctl" -c "$cfg" start >/dev/null
if [ $# -eq 0 ]; then
  set -- --sessions 64 --messages 10000 --size 4096 --per-session 50 --pipelining
fi
"$bin/loadgen" --server "127.0.0.1:$((port_base + 25))" --to u1@example.test \
  --maildir-glob "$dir/mail/example.test/u1/new" "$@"
