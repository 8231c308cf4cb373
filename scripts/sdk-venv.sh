#!/usr/bin/env bash
# Makes sure the project's Python virtualenv (.venv at the repository root) has the pinned official SDK and the
# test tools, and prints its python's path. Packages come from the machine's own pip configuration (mirror).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${COMPUTE_VENV:-$root/.venv}
req=$root/tests/e2e/requirements.txt
stamp=$venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
