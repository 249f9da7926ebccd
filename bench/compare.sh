#!/usr/bin/env bash
# mailsrv against Postfix and Dovecot on this machine, same load, one run:
#   sudo bench/compare.sh [--quick] [--only smtp|imap] [--json FILE] ...
# (options: bench/compare.py --help). Needs root for two steps: installing
# Debian's postfix, dovecot-core, dovecot-imapd and dovecot-pop3d when
# missing (the system instances are left unconfigured and stopped), and
# starting the private Postfix and Dovecot instances (their masters drop
# privileges themselves). Without root, mailsrv alone is measured.
# Builds the release binaries; every server runs from a temp dir on
# loopback ports and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  missing=()
  command -v postfix >/dev/null || [ -x /usr/sbin/postfix ] || missing+=(postfix)
  [ -x /usr/sbin/dovecot ] || missing+=(dovecot-core)
  [ -x /usr/lib/dovecot/imap ] || missing+=(dovecot-imapd)
  [ -x /usr/lib/dovecot/pop3 ] || missing+=(dovecot-pop3d)
  if [ ${#missing[@]} -gt 0 ]; then
    # "No configuration": the package's own instance stays unset and off.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
cargo build --release --workspace --quiet
exec python3 bench/compare.py "$@"
