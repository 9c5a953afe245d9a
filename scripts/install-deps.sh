#!/usr/bin/env bash
# Installs what building and testing need, on Debian/Ubuntu. Only missing packages are installed;
# run as root (or with passwordless sudo). Also creates the unprivileged OS user for Postgres.
set -euo pipefail
pkgs=(build-essential pkg-config libreadline-dev zlib1g-dev libssl-dev liblz4-dev libzstd-dev
      python3-venv python3-pip bzip2 patch curl ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
user=${PG_OS_USER:-postgres}
if [ "$(id -u)" = 0 ] && ! id -u "$user" >/dev/null 2>&1; then
  echo "creating system user '$user' to run Postgres processes (Postgres refuses to run as root)"
  useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$user"
fi
