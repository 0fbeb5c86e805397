#!/usr/bin/env bash
# Makes sure schemathesis (pinned) is installed in a venv under the cargo target
# directory and prints the absolute path of its `st`. Used by test-prereqs.sh
# (the fuzz test in `make test` looks for it there) and by `make fuzz`.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=4.32.5
VENV="${CARGO_TARGET_DIR:-target}/fuzz-venv"
if ! "$VENV/bin/st" --version 2>/dev/null | grep -qF "$VERSION"; then
  python3 -m venv "$VENV" >&2 \
    || { echo "schemathesis.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install -q "schemathesis==$VERSION" >&2
fi
realpath "$VENV/bin/st"
