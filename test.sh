#!/usr/bin/env bash
# Run every test: formatting and lints, the crates' unit tests, and the
# end-to-end tests that start the real binaries and drive them with real
# clients. Installs the clients the tests need when they are missing.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v swaks >/dev/null || missing+=(swaks)
command -v fetchmail >/dev/null || missing+=(fetchmail)
command -v mbsync >/dev/null || missing+=(isync)
command -v offlineimap >/dev/null || missing+=(offlineimap3)
command -v openssl >/dev/null || missing+=(openssl)
command -v useradd >/dev/null || missing+=(passwd)
command -v strace >/dev/null || missing+=(strace)
# The backup tests rewrite a manifest with the zstd tool.
command -v zstd >/dev/null || missing+=(zstd)
# The import tests make real Dovecot Maildirs with Dovecot's own imap
# (run standalone, no daemon) and hash passwords with doveadm.
{ command -v doveadm >/dev/null && [ -x /usr/lib/dovecot/imap ]; } ||
  missing+=(dovecot-core dovecot-imapd)
# The content scanners the tests run (tests/scanners.py); both live in
# /usr/sbin, which a normal user's PATH lacks.
command -v clamd >/dev/null || [ -x /usr/sbin/clamd ] || missing+=(clamav-daemon)
command -v spamd >/dev/null || [ -x /usr/sbin/spamd ] || missing+=(spamd)
# The benchmark's smoke test (tests/test_bench_compare.py) runs the same
# load against Postfix and Dovecot (bench/compare.sh).
[ -x /usr/sbin/postfix ] || missing+=(postfix)
[ -x /usr/lib/dovecot/pop3 ] || missing+=(dovecot-pop3d)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  # Postfix's package instance stays unconfigured and off.
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pytest --version >/dev/null 2>&1 || python3 -m pip install -q pytest
# The tests' DNS server (tests/dnsserver.py).
python3 -c 'import dnslib' 2>/dev/null || python3 -m pip install -q dnslib
python3 -c 'import dkim' 2>/dev/null || python3 -m pip install -q dkimpy

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --quiet
cargo test --workspace --quiet
MAILSRV_BIN_DIR=$PWD/target/debug python3 -m pytest -q tests
if [ "$(id -u)" -eq 0 ]; then
  # As root (CI): the clients again, against installations whose daemons
  # drop to their system users, as a production one does.
  MAILSRV_BIN_DIR=$PWD/target/debug MAILSRV_TEST_PRIVILEGED=1 python3 -m pytest -q \
    tests/test_delivery.py tests/test_aliases.py tests/test_queue.py tests/test_queue_admin.py \
    tests/test_submission.py tests/test_sendmail.py tests/test_remote.py tests/test_mail_auth.py \
    tests/test_imap.py tests/test_pop3.py tests/test_mbsync.py tests/test_greylist.py \
    tests/test_content_scan.py tests/test_backup.py tests/test_import.py tests/test_quota.py \
    tests/test_open_relay.py tests/test_path_safety.py
fi
