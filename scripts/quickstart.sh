#!/usr/bin/env bash
# Builds everything and brings up a local stack with neon_local, printing a postgresql:// URL.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/env.sh
scripts/install-deps.sh
postgres/build.sh >/dev/null
cargo build --workspace --bins
echo "Built Postgres ($PG_INSTALL_DIR) and the workspace (target/debug)." >&2
echo "neon_local cannot start a stack yet: the pageserver, safekeepers and compute_ctl are still" >&2
echo "being built (see the open issues). Use 'scripts/test.sh' to run what exists." >&2
exit 1
