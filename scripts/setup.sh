#!/usr/bin/env bash
# Installs what Compute needs on a Debian machine (run as root, or with sudo available): the C toolchain the
# Rust build uses, Python for the SDK test suite, and the tools the runtime drives (mmdebstrap for base images,
# iproute2 and nftables for sandbox networks, runsc for gVisor isolation, runc and podman as benchmark peers, git for the
# SDK's Volume.load_git_repo in the tests; docker-registry, skopeo, busybox-static and musl-tools to seed and
# measure a local registry in the image tests and benchmark).
# Idempotent; installs only what is missing. Packages come from the machine's own apt sources (its mirror);
# bookworm-backports, where needed, is added to the existing Debian entry rather than as a new URI.
set -euo pipefail

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

need_pkgs=(ca-certificates curl openssl gcc libc6-dev pkg-config make python3 python3-venv
           mmdebstrap iproute2 nftables procps runc git docker-registry skopeo busybox-static musl-tools podman)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${need_pkgs[@]}"; do installed "$p" || missing+=("$p"); done
# Node.js and npm for the e2e suite's Azure storage emulator (tests/e2e/package.json), unless already there.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)

# gVisor: bookworm's own runsc (2022) lacks the systrap platform; the bookworm-backports build has it.
want_runsc=0
if ! installed runsc || ! dpkg-query -W -f='${Version}' runsc 2>/dev/null | grep -qE '^0\.0~20(2[3-9]|[3-9][0-9])'; then
  want_runsc=1
fi

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
add_backports() {
  [ "$codename" = "bookworm" ] || return 0
  if grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then return 0; fi
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    if grep -qE '^Suites:.*\bbookworm-updates\b' "$f"; then
      $sudo sed -i -E '/^Suites:.*\bbookworm-updates\b/ s/$/ bookworm-backports/' "$f"
      echo "setup: added bookworm-backports to $f" >&2
      return 0
    fi
  done
  if [ -f /etc/apt/sources.list ]; then
    local line
    line=$(grep -E '^deb\s+\S+\s+bookworm\s' /etc/apt/sources.list | head -n1 || true)
    if [ -n "$line" ]; then
      echo "$line" | sed -E 's/\sbookworm\s/ bookworm-backports /' | $sudo tee -a /etc/apt/sources.list >/dev/null
      echo "setup: added bookworm-backports to /etc/apt/sources.list" >&2
    fi
  fi
}

if [ ${#missing[@]} -gt 0 ] || [ "$want_runsc" = 1 ]; then
  [ "$want_runsc" = 1 ] && add_backports
  echo "setup: installing ${missing[*]} $( [ "$want_runsc" = 1 ] && echo runsc)" >&2
  $sudo apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  if [ "$want_runsc" = 1 ]; then
    if [ "$codename" = "bookworm" ]; then
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends -t bookworm-backports runsc >&2 \
        || echo "setup: WARNING: could not install runsc from bookworm-backports; gVisor isolation will be unavailable" >&2
    else
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends runsc >&2 \
        || echo "setup: WARNING: could not install runsc; gVisor isolation will be unavailable" >&2
    fi
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found: install one with rustup (https://rustup.rs), then re-run" >&2
  exit 1
fi
echo "setup: ok" >&2
