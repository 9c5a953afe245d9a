# Sourced by the project's scripts: shared locations.
# Cargo builds go to one target dir kept outside the clone (cache) so that a fresh clone, like
# CI's, reuses compiled dependencies instead of rebuilding them from scratch.
if [ "$(id -u)" = 0 ]; then NEON_CACHE_DIR=${NEON_CACHE_DIR:-/var/cache/neon}; else NEON_CACHE_DIR=${NEON_CACHE_DIR:-$HOME/.cache/neon}; fi
export NEON_CACHE_DIR
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ ! -e "$repo/target" ]; then
  mkdir -p "$NEON_CACHE_DIR/cargo-target"
  ln -s "$NEON_CACHE_DIR/cargo-target" "$repo/target"
fi
# The OS user that runs Postgres processes when we are root (Postgres refuses to run as root).
export PG_OS_USER=${PG_OS_USER:-postgres}
export PG_INSTALL_DIR=${PG_INSTALL_DIR:-$repo/pg_install}
export PATH="$HOME/.cargo/bin:$PATH"
