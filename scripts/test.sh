#!/usr/bin/env bash
# The project's test command (README, second line; .ci/run calls exactly this).
#   1. installs missing system packages (Debian/Ubuntu, as root) and the unprivileged OS user
#      that runs Postgres processes when we are root;
#   2. creates .venv with the pinned test requirements (test_runner/requirements.txt);
#   3. builds Postgres (cached by postgres/build.sh) and the workspace;
#   4. runs rustfmt/clippy checks, `cargo test`, and pytest (test_runner/), then the end-to-end
#      tests again with auth and TLS on (NEON_TEST_AUTH_TLS=1).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k wal` or `scripts/test.sh -m slow`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/env.sh

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "system packages"
scripts/install-deps.sh

step "python virtualenv (.venv)"
req_hash=$(sha256sum test_runner/requirements.txt | cut -c1-16)
if [ ! -f .venv/.req-$req_hash ]; then
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r test_runner/requirements.txt
  touch .venv/.req-$req_hash
fi

step "postgres (cached build)"
postgres/build.sh >/dev/null

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build"
cargo build --workspace --bins --locked

step "cargo test"
cargo test --workspace --locked

step "pytest"
# Exit code 5 = no tests collected: treat as a failure, a test run must test something.
.venv/bin/pytest test_runner -m "not slow and not performance" "$@"

# The end-to-end suite again on a secured stack: every `neon_local init` gets `--auth` (JWT auth
# and TLS on every daemon and compute; see test_runner/fixtures/neon_local.py). Only for a whole
# run: with a pytest filter in "$@" it might select nothing here.
if [ $# -eq 0 ]; then
  step "pytest: end-to-end suite with auth and TLS (NEON_TEST_AUTH_TLS=1)"
  NEON_TEST_AUTH_TLS=1 .venv/bin/pytest test_runner/regress -m "not slow and not performance" -k test_e2e_
fi
