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

echo "== unit, integration and conformance tests" >&2
COMPUTE_SDK_PYTHON=$python cargo test --workspace --locked

echo "== end-to-end tests (chalkcompute SDK against compute serve)" >&2
COMPUTE_BIN=$PWD/target/debug/compute "$python" -m pytest tests/e2e -v -p no:cacheprovider
