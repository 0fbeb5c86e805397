#!/usr/bin/env bash
# `make fuzz`: schemathesis over /openapi.json against a real ingress on a scratch
# database, with an admin key. Fails on any 5xx or crash (`not_a_server_error`).
# FUZZ_EXAMPLES bounds the examples per operation (default 25).
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$TARGET/fuzz-venv"
if [ ! -x "$VENV/bin/st" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q schemathesis
fi
cargo build --quiet --bin conveyor
BIN="$TARGET/debug/conveyor"

PORT="${FUZZ_PORT:-18090}"
DB="conveyor_fuzz_$$"
export CONVEYOR_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export CONVEYOR_NAMESPACE="fuzz$$"
export CONVEYOR_INGRESS_ADDR="127.0.0.1:$PORT"
export CONVEYOR_LOG_LEVEL=warn
"$BIN" migrate run >/dev/null
KEY="$("$BIN" keys create --producer fuzz --scope admin --rate 100000 --burst 100000 | tail -n1)"

"$BIN" ingress & INGRESS=$!
cleanup() {
  kill -TERM "$INGRESS" 2>/dev/null || true
  wait "$INGRESS" 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rabbitmqctl -q list_queues name 2>/dev/null | grep "^fuzz$$\." | xargs -r -n1 rabbitmqctl -q delete_queue >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 1 50); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done

"$VENV/bin/st" run "http://127.0.0.1:$PORT/openapi.json" \
  -H "Authorization: Bearer $KEY" \
  --checks not_a_server_error \
  --max-examples "${FUZZ_EXAMPLES:-25}" \
  --request-timeout 10 \
  --workers 2
