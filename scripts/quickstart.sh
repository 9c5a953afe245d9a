#!/usr/bin/env bash
# Builds everything and brings up a local stack with neon_local (pageserver, 3 safekeepers,
# one compute on branch 'main'), then prints a postgresql:// connection string. Running it again
# reuses the environment in $NEON_REPO_DIR (default .neon/).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/env.sh
scripts/install-deps.sh >&2
postgres/build.sh >/dev/null
cargo build --workspace --bins >&2
export NEON_REPO_DIR=${NEON_REPO_DIR:-$repo/.neon}
export PG_INSTALL_DIR
N="${CARGO_TARGET_DIR:-$repo/target}/debug/neon_local"
if [ ! -f "$NEON_REPO_DIR/config.json" ]; then
  "$N" init >&2
fi
"$N" start >&2
if ! grep -q '"default_tenant": "' "$NEON_REPO_DIR/config.json"; then
  "$N" tenant create --set-default >&2
fi
if ! grep -q '"main": {' "$NEON_REPO_DIR/config.json"; then
  "$N" endpoint create main >&2
fi
"$N" endpoint start main | tail -1 | sed 's/.*started: //'
