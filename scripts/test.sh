#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds, checks style, and runs the unit,
# integration, conformance and end-to-end (official SDK against a real server) suites.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== build" >&2
cargo build --workspace --all-targets --locked

echo "== style" >&2
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== SDK virtualenv" >&2
python=$(scripts/sdk-venv.sh)

echo "== e2e tools from npm (Azurite)" >&2
lock_sum=$(sha256sum tests/e2e/package-lock.json | cut -d' ' -f1)
if [ "$(cat tests/e2e/node_modules/.compute-lock.sha256 2>/dev/null)" != "$lock_sum" ]; then
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$lock_sum" > tests/e2e/node_modules/.compute-lock.sha256
fi

echo "== unit, integration and conformance tests" >&2
COMPUTE_SDK_PYTHON=$python cargo test --workspace --locked

# Base images are built once (from the Debian archive) and shared by every test server.
export COMPUTE_E2E_IMAGE_DIR=${COMPUTE_E2E_IMAGE_DIR:-$PWD/target/e2e-images}
export COMPUTE_BIN=$PWD/target/debug/compute

echo "== end-to-end tests under gVisor isolation (sandbox suites)" >&2
COMPUTE_E2E_ISOLATION=gvisor "$python" -m pytest tests/e2e/test_sandboxes.py tests/e2e/test_operations.py tests/e2e/test_images.py tests/e2e/test_registry.py tests/e2e/test_volume_mounts.py tests/e2e/test_scaling_groups.py tests/e2e/test_secrets.py tests/e2e/test_functions.py -v -p no:cacheprovider

echo "== end-to-end tests (chalkcompute SDK against compute serve, native isolation)" >&2
COMPUTE_E2E_ISOLATION=native "$python" -m pytest tests/e2e -v -p no:cacheprovider
