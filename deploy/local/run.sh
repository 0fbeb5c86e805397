#!/usr/bin/env bash
# `make run`: services up, database migrated, one ingress and one worker
# running in the foreground. Ctrl-C stops what this script started.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/ensure-services.sh
echo "Building conveyor..."
cargo build --quiet --bin conveyor
BIN=target/debug/conveyor

"$BIN" migrate run
# A development key (admin scope: jobs, campaigns, dashboard); the key is the last line.
KEY="$("$BIN" keys create --producer dev --scope admin --expires 7d | tail -n1)"
ADDR="${CONVEYOR_INGRESS_ADDR:-127.0.0.1:8080}"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "Stopping Conveyor (draining the worker)..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap cleanup INT TERM EXIT

"$BIN" worker & pids+=($!)
"$BIN" ingress & pids+=($!)

for _ in $(seq 1 50); do
  curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done

cat <<MSG

Conveyor is running: ingress http://$ADDR  (OpenAPI: http://$ADDR/openapi.json)

Development API key (admin scope, expires in 7 days; also the dashboard login at
http://$ADDR/dashboard):

  KEY=$KEY

  curl -s -X POST http://$ADDR/v1/jobs -H "Authorization: Bearer \$KEY" \\
       -H 'content-type: application/json' -d '{"task": "diag.noop", "args": {}}'
  curl -s -H "Authorization: Bearer \$KEY" http://$ADDR/v1/jobs/<id from the answer above>

Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
