#!/usr/bin/env bash
# Installs what Compute needs on a Debian machine (run as root, or with sudo available): the C toolchain the
# Rust build uses, Python for the SDK test suite, and the tools the tests call. Idempotent; installs only what
# is missing. Packages come from the machine's own apt sources (mirror), never from a hard-coded host.
set -euo pipefail

need_pkgs=(ca-certificates curl openssl gcc libc6-dev pkg-config make python3 python3-venv)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found: install one with rustup (https://rustup.rs), then re-run" >&2
  exit 1
fi
echo "setup: ok" >&2
