#!/usr/bin/env bash
# Measure mailsrv's SMTP intake and end-to-end delivery with loadgen:
# builds release binaries, makes a throw-away installation in a temp dir
# on PORT_BASE (default 34000), runs loadgen with the arguments given
# (defaults below), prints its report, stops everything and cleans up.
#   bench/smtp-bench.sh [--submission | --submissions | --remote] [loadgen options...]
# By default loadgen sends to the MX port (P+25) over plain TCP. With
# --submission it submits as a mail client does on the submission port
# (P+587): STARTTLS, then AUTH PLAIN as u2@example.test, sender u2;
# --submissions does the same with TLS from the connect (P+465). The
# installation's certificate is self-signed, hence --tls-insecure.
# With --remote a second installation (example.net, on PORT_BASE+1000)
# is the destination: loadgen sends to the first one's MX port, whose
# qmgr relays every message over SMTP with STARTTLS (delivery.relay) to
# the second, and the time to the last message in the second's Maildir
# measures remote delivery end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=mx
case ${1-} in
  --submission | --submissions | --remote) mode=${1#--}; shift ;;
esac
cargo build --release --workspace --quiet
bin=$PWD/target/release
dir=$(mktemp -d)
port_base=${PORT_BASE:-34000}
cfg=$dir/mailsrv.toml
far=$dir/far
far_cfg=$far/mailsrv.toml
cleanup() {
  "$bin/mailctl" -c "$cfg" stop >/dev/null 2>&1 || true
  [ -f "$far_cfg" ] && { "$bin/mailctl" -c "$far_cfg" stop >/dev/null 2>&1 || true; }
  rm -rf "$dir"
}
trap cleanup EXIT
# --single-user: run the daemons as whoever runs this script, even root
# (dropping to system users would need a world-searchable $dir).
"$bin/mailctl" init "$dir" --domain example.test --port-base "$port_base" --single-user >/dev/null
# loadgen connects from one address; lift the per-client limit for it.
sed -i 's/^\[smtpd\]$/[smtpd]\nmax_connections_per_client = 500/' "$cfg"
# u1 receives; u2 is the submitting client's account.
for u in u1 u2; do echo pw | "$bin/mailctl" -c "$cfg" user add "$u@example.test" >/dev/null; done
deliveries=$dir/mail/example.test/u1/new
if [ "$mode" = remote ]; then
  "$bin/mailctl" init "$far" --domain example.net --hostname mx.example.net \
    --port-base $((port_base + 1000)) --single-user >/dev/null
  sed -i 's/^\[smtpd\]$/[smtpd]\nmax_connections_per_client = 500/' "$far_cfg"
  echo pw | "$bin/mailctl" -c "$far_cfg" user add u1@example.net >/dev/null
  "$bin/mailctl" -c "$far_cfg" start >/dev/null
  sed -i 's/^relay_networks = \[\]/relay_networks = ["127.0.0.1"]/' "$cfg"
  printf '\n[delivery.relay]\nhost = "127.0.0.1"\nport = %d\ntls = "required"\n' \
    $((port_base + 1025)) >> "$cfg"
  deliveries=$far/mail/example.net/u1/new
fi
"$bin/mailctl" -c "$cfg" start >/dev/null
if [ $# -eq 0 ]; then
  set -- --sessions 64 --messages 10000 --size 4096 --per-session 50 --pipelining
fi
submit=(--tls-insecure --auth-user u2@example.test --auth-password pw --from u2@example.test)
rcpt=u1@example.test
case $mode in
  mx) target=(--server "127.0.0.1:$((port_base + 25))") ;;
  remote) target=(--server "127.0.0.1:$((port_base + 25))"); rcpt=u1@example.net ;;
  submission) target=(--server "127.0.0.1:$((port_base + 587))" --tls starttls "${submit[@]}") ;;
  submissions) target=(--server "127.0.0.1:$((port_base + 465))" --tls implicit "${submit[@]}") ;;
esac
"$bin/loadgen" "${target[@]}" --to "$rcpt" --maildir-glob "$deliveries" "$@"
