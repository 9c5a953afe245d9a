# syntax=docker/dockerfile:1
#
# The neon-rs stack in one image: pageserver, safekeeper, compute_ctl, neon_local and our patched
# Postgres 15 (+ pgxn/ extensions). docker-compose.yml runs every daemon from this image.
#
#   docker build -t neon-rs:local .        (or: docker compose build)
#
# The build FETCHES POSTGRES SOURCES over the network: postgres/build.sh tries Debian's
# postgresql-15 source package (it adds a bookworm deb-src entry) and then the upstream
# ftp.postgresql.org tarball; the digest in postgres/SOURCE.sha256 is checked either way. It also
# downloads rustup and the crates in Cargo.lock. Needs BuildKit (the default since Docker 23) for
# the cache mounts below.

########################################################################################
# Build stage: the toolchain and build dependencies (scripts/install-deps.sh's list, minus the
# Python test tooling), Postgres, then the Rust binaries.
FROM debian:bookworm AS build

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libreadline-dev zlib1g-dev libssl-dev liblz4-dev libzstd-dev \
      bzip2 patch curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Rust from rustup: Debian's rustc is too old for the workspace. Override with
# --build-arg RUST_VERSION=1.xx.y to pin a toolchain.
ARG RUST_VERSION=stable
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$RUST_VERSION"

WORKDIR /src

# Postgres first, from postgres/ and pgxn/ only: editing Rust code does not invalidate this layer.
# build.sh installs into PG_CACHE_DIR and points the pg_install symlink at it; we copy the resolved
# directory (not the symlink) to /out/pg_install. Its `src` entry is a symlink to the source tree
# (regression files for the test suite), which the runtime image neither has nor needs.
COPY postgres/ postgres/
COPY pgxn/ pgxn/
RUN PG_CACHE_DIR=/var/cache/neon-pg postgres/build.sh \
 && mkdir -p /out \
 && cp -a "$(readlink -f pg_install)" /out/pg_install \
 && rm -f /out/pg_install/src

# The Rust workspace. The target dir and cargo registry are cache mounts (fast rebuilds), so the
# binaries are copied out in the same step.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --bins --locked \
 && mkdir -p /out/bin \
 && cp target/release/pageserver target/release/safekeeper target/release/compute_ctl \
       target/release/neon_local /out/bin/

########################################################################################
# Runtime stage: only the shared libraries the binaries and Postgres link against
# (libssl/libcrypto, zlib, lz4, zstd; readline for psql), curl for healthchecks and the init job,
# and the OS user Postgres runs as.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libssl3 zlib1g liblz4-1 libzstd1 libreadline8 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Postgres refuses to run as root. The daemons run as root in the containers (named volumes are
# created root-owned) and start every Postgres process -- the pageserver's initdb and WAL-redo
# processes, compute_ctl's Postgres -- as $PG_OS_USER through setpriv (util-linux, in the base
# image); see libs/utils/src/pg_os_user.rs. That user must exist, so create it here.
RUN useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
ENV PG_OS_USER=postgres

COPY --from=build /out/pg_install /usr/local/neon/pg_install
COPY --from=build /out/bin/ /usr/local/bin/
# compute_ctl --pg-install and the pageserver's pg_distrib_dir fall back to this; psql is on PATH
# for `docker compose exec compute psql ...`.
ENV PG_INSTALL_DIR=/usr/local/neon/pg_install PATH=/usr/local/neon/pg_install/bin:$PATH

# pageserver: 64000 (libpq) 9898 (HTTP); safekeeper: 5454 (libpq) 7676 (HTTP);
# compute: 55432 (Postgres) 3080 (compute_ctl HTTP)
EXPOSE 64000 9898 5454 7676 55432 3080
CMD ["pageserver", "--help"]
