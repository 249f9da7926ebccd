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
if [ ${#missing[@]} -gt 0 ]; then
  sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pytest --version >/dev/null 2>&1 || python3 -m pip install -q pytest

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --quiet
cargo test --workspace --quiet
MAILSRV_BIN_DIR=$PWD/target/debug python3 -m pytest -q tests
