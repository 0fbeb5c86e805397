#!/usr/bin/env bash
# `make fuzz`: the OpenAPI fuzz test of `make test` (cli/tests/it/fuzz.rs) alone,
# with more examples: schemathesis over /openapi.json against a real ingress on
# a scratch database, with an admin key; fails on any 5xx or crash.
# FUZZ_EXAMPLES bounds the examples per operation (here 100; `make test` uses 25).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/schemathesis.sh >/dev/null
export FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-100}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run -p conveyor --test it --no-capture 'fuzz::'
else
  cargo test -p conveyor --test it -- --nocapture 'fuzz::'
fi
