#!/usr/bin/env bash
# Fetch, verify, patch, build and cache PostgreSQL 15 plus our pgxn/ extensions.
#
# Usage: postgres/build.sh            (prints the install directory on its last line)
#
# Source, in order of preference:
#   1. $PG_SRC_TARBALL (a postgresql-15.x .tar.bz2 / .tar.gz you already have)
#   2. a tarball cached by an earlier run
#   3. Debian's source package postgresql-15 (`apt-get source`, adding a deb-src entry if missing)
#   4. the upstream release tarball (hosts with internet)
# The tarball's SHA-256 must match postgres/SOURCE.sha256.
#
# Caching: the core build is keyed by (version, hash of postgres/patches/*) and the final install
# by (core key, hash of pgxn/). Changing only pgxn/ costs a copy and the extension builds, not a
# Postgres rebuild; nothing changed costs a few hashes.
#
# Environment:
#   PG_CACHE_DIR   where builds live (default /var/cache/neon-pg as root, ~/.cache/neon-pg otherwise)
#   PG_BUILD_JOBS  make -j (default: nproc)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

PG_VERSION=15.18
PG_DEB_VERSION=15.18-0+deb12u1
TARBALL_NAME="postgresql-15_${PG_VERSION}.orig.tar.bz2"
UPSTREAM_URL="https://ftp.postgresql.org/pub/source/v${PG_VERSION}/postgresql-${PG_VERSION}.tar.bz2"
EXPECTED_SHA256=$(awk '{print $1}' "$here/SOURCE.sha256")

if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/neon-pg; else default_cache="$HOME/.cache/neon-pg"; fi
CACHE=${PG_CACHE_DIR:-$default_cache}
JOBS=${PG_BUILD_JOBS:-$(nproc)}
mkdir -p "$CACHE"
# The install must be readable by the unprivileged user that runs Postgres when we are root.
chmod 755 "$CACHE"

log() { echo "[postgres/build.sh] $*" >&2; }

hash_tree() { # stable hash of the files under $1 (names and contents)
  local dir=$1
  # A missing folder and an empty one hash alike (git does not keep empty folders).
  if [ -d "$dir" ] && [ -n "$(find "$dir" -type f -print -quit)" ]; then
    (cd "$dir" && find . -type f ! -name '*.o' ! -name '*.so' ! -name '*.bc' -print0 | LC_ALL=C sort -z |
      xargs -0 -r sha256sum) | sha256sum | cut -c1-16
  else
    echo none
  fi
}

# Contrib modules the tests use (spi: autoinc and refint, which the regression suite loads).
CONTRIB=(amcheck pageinspect pg_buffercache pg_prewarm pg_stat_statements pgstattuple spi)

# A build made while liblz4-dev/libzstd-dev were missing lacks lz4/zstd WAL compression (configure
# drops them, see configure_flags): it gets its own key, so it is not reused once they are there.
missing_libs=""
[ -f /usr/include/lz4.h ] || missing_libs+="-nolz4"
[ -f /usr/include/zstd.h ] || missing_libs+="-nozstd"
core_key="${PG_VERSION}-$(hash_tree "$here/patches")${missing_libs}"
# The install also changes with the contrib list (modules are added to an existing core build).
final_key="${core_key}-$(hash_tree "$repo/pgxn")-$(printf '%s' "${CONTRIB[*]}" | sha256sum | cut -c1-8)"
core_dir="$CACHE/core-$core_key"       # source tree (built) + install of patched Postgres
final_dir="$CACHE/install-$final_key"  # core install + pgxn extensions

link_result() {
  ln -sfn "$final_dir" "$repo/pg_install"
  echo "$final_dir"
}

if [ -f "$final_dir/.complete" ]; then
  log "up to date: $final_dir"
  link_result
  exit 0
fi

# Serialize concurrent builds (two test runs starting at once).
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$final_dir/.complete" ]; then link_result; exit 0; fi

fetch_source() {
  local dest="$CACHE/$TARBALL_NAME"
  if [ -n "${PG_SRC_TARBALL:-}" ]; then
    log "using \$PG_SRC_TARBALL=$PG_SRC_TARBALL"
    cp "$PG_SRC_TARBALL" "$dest.tmp" && mv "$dest.tmp" "$dest"
    return
  fi
  if [ -f "$dest" ]; then return; fi
  local tmp
  tmp=$(mktemp -d)
  chmod 755 "$tmp" # apt downloads as the _apt user
  if command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ] && ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding a deb-src entry for bookworm (/etc/apt/sources.list.d/neon-pg-src.sources)"
      cat >/etc/apt/sources.list.d/neon-pg-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
      apt-get update -qq || true
    fi
    log "fetching Debian source package postgresql-15=$PG_DEB_VERSION"
    if (cd "$tmp" && apt-get source -qq --download-only "postgresql-15=$PG_DEB_VERSION" >&2) &&
      [ -f "$tmp/$TARBALL_NAME" ]; then
      mv "$tmp/$TARBALL_NAME" "$dest"
      rm -rf "$tmp"
      return
    fi
    log "apt-get source failed; trying the upstream tarball"
  fi
  if curl -fsSL --max-time 300 -o "$tmp/src.tar.bz2" "$UPSTREAM_URL"; then
    mv "$tmp/src.tar.bz2" "$dest"
    rm -rf "$tmp"
    return
  fi
  rm -rf "$tmp"
  log "ERROR: could not get the PostgreSQL $PG_VERSION source. Set PG_SRC_TARBALL to a local copy of"
  log "       postgresql-$PG_VERSION.tar.bz2 (sha256 $EXPECTED_SHA256)."
  exit 1
}

configure_flags() {
  local flags=(--prefix="$core_dir/install" --with-openssl --enable-debug --enable-cassert=no)
  # lz4/zstd only when their headers are present (Debian: liblz4-dev, libzstd-dev).
  if [ -f /usr/include/lz4.h ]; then flags+=(--with-lz4); else log "no lz4.h: building without lz4"; fi
  if [ -f /usr/include/zstd.h ]; then flags+=(--with-zstd); else log "no zstd.h: building without zstd"; fi
  if [ ! -f /usr/include/unicode/ucol.h ]; then flags+=(--without-icu); fi
  printf '%s\n' "${flags[@]}"
}


# Builds and installs the contrib modules not installed yet into the core install; a module added
# to the list later costs its own build, not a Postgres rebuild.
build_contrib() {
  local m
  for m in "${CONTRIB[@]}"; do
    [ -f "$core_dir/.contrib-$m" ] && continue
    log "building contrib/$m"
    (cd "$core_dir/src/contrib/$m" && make -j"$JOBS" -s install >>"$core_dir/make.log" 2>&1) ||
      { log "contrib/$m failed; see $core_dir/make.log"; exit 1; }
    touch "$core_dir/.contrib-$m"
  done
}

build_core() {
  fetch_source
  local got
  got=$(sha256sum "$CACHE/$TARBALL_NAME" | awk '{print $1}')
  if [ "$got" != "$EXPECTED_SHA256" ]; then
    log "ERROR: $CACHE/$TARBALL_NAME has sha256 $got, expected $EXPECTED_SHA256 (postgres/SOURCE.sha256)."
    log "       Delete it and run again, or point PG_SRC_TARBALL at a good copy."
    rm -f "$CACHE/$TARBALL_NAME"
    exit 1
  fi
  rm -rf "$core_dir.tmp"
  mkdir -p "$core_dir.tmp/src"
  log "unpacking source into $core_dir.tmp/src"
  tar -xf "$CACHE/$TARBALL_NAME" -C "$core_dir.tmp/src" --strip-components=1
  local p
  for p in "$here"/patches/*.patch; do
    [ -e "$p" ] || continue
    log "applying $(basename "$p")"
    patch -d "$core_dir.tmp/src" -p1 --forward --quiet <"$p"
  done
  # configure records absolute paths: build in the final location.
  rm -rf "$core_dir"
  mv "$core_dir.tmp" "$core_dir"
  local flags
  mapfile -t flags < <(configure_flags)
  log "configure ${flags[*]}"
  (cd "$core_dir/src" && ./configure "${flags[@]}" >"$core_dir/configure.log" 2>&1) ||
    { log "configure failed; see $core_dir/configure.log"; tail -30 "$core_dir/configure.log" >&2; exit 1; }
  log "make -j$JOBS (about 3 minutes on 2 cores; log: $core_dir/make.log)"
  (cd "$core_dir/src" && make -j"$JOBS" -s >"$core_dir/make.log" 2>&1 && make -s install >>"$core_dir/make.log" 2>&1) ||
    { log "make failed; see $core_dir/make.log"; tail -30 "$core_dir/make.log" >&2; exit 1; }
  build_contrib
  # Regression-test support: pg_regress, regress.so, the isolation tester.
  (cd "$core_dir/src/src/test/regress" && make -j"$JOBS" -s >>"$core_dir/make.log" 2>&1) ||
    { log "src/test/regress failed; see $core_dir/make.log"; exit 1; }
  (cd "$core_dir/src/src/test/isolation" && make -j"$JOBS" -s >>"$core_dir/make.log" 2>&1) ||
    { log "src/test/isolation failed; see $core_dir/make.log"; exit 1; }
  touch "$core_dir/.complete"
}

if [ ! -f "$core_dir/.complete" ]; then
  build_core
else
  log "core build cached: $core_dir"
  build_contrib
fi

log "assembling $final_dir"
rm -rf "$final_dir.tmp"
cp -a "$core_dir/install" "$final_dir.tmp"
cp "$core_dir/src/src/test/regress/pg_regress" "$final_dir.tmp/bin/"
cp "$core_dir/src/src/test/regress/regress.so" "$final_dir.tmp/lib/postgresql/"
cp "$core_dir/src/src/test/isolation/isolationtester" "$core_dir/src/src/test/isolation/pg_isolation_regress" "$final_dir.tmp/bin/"
ln -sfn "$core_dir/src" "$final_dir.tmp/src" # the source tree: regression schedules and expected files

for ext in "$repo"/pgxn/*/; do
  [ -f "$ext/Makefile" ] || continue
  name=$(basename "$ext")
  log "building pgxn/$name"
  rm -rf "$CACHE/pgxn-build-$name"
  cp -a "$ext" "$CACHE/pgxn-build-$name"
  (cd "$CACHE/pgxn-build-$name" && make -s PG_CONFIG="$final_dir.tmp/bin/pg_config" install >&2) ||
    { log "pgxn/$name failed to build"; exit 1; }
  rm -rf "$CACHE/pgxn-build-$name"
done

# pg_config reports the core prefix; the tree is relocatable, so tools run from here work.
chmod -R a+rX "$final_dir.tmp" "$core_dir"
rm -rf "$final_dir"
mv "$final_dir.tmp" "$final_dir"
touch "$final_dir/.complete"
# Keep only the newest few finished installs.
ls -1dt "$CACHE"/install-* 2>/dev/null | tail -n +5 | xargs -r rm -rf
log "done: $final_dir"
link_result
