#!/usr/bin/env bash
# Build mailsrv, create a development installation in ./dev (first run only)
# with a demo user, and run the whole system in the foreground on loopback
# high ports. Ctrl-C stops it. PORT_BASE (default 10000) moves the ports.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --workspace --quiet
bin=$PWD/target/release
dir=${MAILSRV_DEV_DIR:-$PWD/dev}
port_base=${PORT_BASE:-10000}
if [ ! -f "$dir/mailsrv.toml" ]; then
  # --single-user: a development installation runs as whoever starts it,
  # root included (a real one made by root drops to system users).
  "$bin/mailctl" init "$dir" --hostname localhost --domain example.test \
    --port-base "$port_base" --single-user
  password=$(head -c 12 /dev/urandom | base64 | tr -d '/+=')
  printf '%s\n' "$password" | "$bin/mailctl" -c "$dir/mailsrv.toml" user add demo@example.test
  printf '%s\n' "$password" > "$dir/demo-password"
  chmod 600 "$dir/demo-password"
fi
setting() { sed -n "s/^$1 = \[\"\(.*\)\"\]/\1/p" "$dir/mailsrv.toml" | head -n 1; }
smtp=$(setting listen)
submission=$(setting submission_listen)
submissions=$(setting submissions_listen)
imaps=$(setting imaps_listen)
pop3s=$(setting pop3s_listen)
cat <<MSG

mailsrv development installation: $dir
  demo user      demo@example.test   password: $(cat "$dir/demo-password")
  SMTP           $smtp
  submission     $submission   (STARTTLS, then AUTH as the demo user)
  submissions    $submissions   (TLS)
  IMAPS          $imaps   (self-signed certificate: tell your client to accept it)
  POP3S          $pop3s   (self-signed certificate: tell your client to accept it)
  Maildir        $dir/mail/example.test/demo/new/

Send a first message from another terminal:
  swaks --server $smtp --from you@example.org --to demo@example.test
or, as the demo user over submission:
  swaks --server $submission --tls --auth PLAIN --auth-user demo@example.test \\
    --auth-password "\$(cat $dir/demo-password)" --from demo@example.test --to demo@example.test
or
  python3 -c 'import smtplib; smtplib.SMTP("${smtp%:*}", ${smtp##*:}).sendmail("you@example.org", ["demo@example.test"], "Subject: hi\r\n\r\nhello\r\n")'

MSG
exec "$bin/mailctl" -c "$dir/mailsrv.toml" start --foreground
