#!/usr/bin/env bash
# End-to-end throughput of Conveyor with 1, 2 and 4 worker processes, on one
# RabbitMQ node and on a three-node cluster (quorum queues replicated 3 ways).
#
#   deploy/cluster/bench.sh [SECONDS_OF_LOAD]     (root; default 15)
#
# For each setup it starts a private PostgreSQL (5433) and private RabbitMQ
# nodes (a standalone node on 5684, the cluster on 5681..5683; never the shared
# 5672), one ingress and N `conveyor worker` processes (release build), offers
# `diag.noop` jobs with wrk (2 threads, 64 connections) for SECONDS_OF_LOAD,
# waits until every accepted job has succeeded, and reports
#   jobs/s = accepted jobs / (last finished_at - first enqueued_at),
# i.e. the rate of the whole path HTTP → PostgreSQL → broker → worker → PostgreSQL.
# Everything runs on this one machine, so the load generator, both servers and
# all Conveyor processes share its cores: read the ratios, not the absolutes.
# Set KEEP=1 to leave the nodes and database running afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=deploy/cluster
LOAD_SECS="${1:-15}"
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/conveyor}"

[[ $EUID -eq 0 ]] || { echo "bench.sh: run as root (it starts RabbitMQ and PostgreSQL as their users)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "bench.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
if [[ -z "${BIN_PREBUILT:-}" ]]; then
  cargo build --release --quiet --bin conveyor
fi
[[ -x "$BIN" ]] || { echo "bench.sh: no binary at $BIN (set BIN=...)" >&2; exit 1; }

pids=()
stop_processes() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
teardown() {
  stop_processes
  if [[ -z "${KEEP:-}" ]]; then
    bash "$HERE/rabbit.sh" down || true
    bash "$HERE/postgres.sh" down || true
  fi
}
trap teardown EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 1 120); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "bench.sh: $1 never became ready" >&2; return 1; }

bash "$HERE/postgres.sh" up >/dev/null
PG="$(bash "$HERE/postgres.sh" url)"
bash "$HERE/rabbit.sh" solo >/dev/null
bash "$HERE/rabbit.sh" up >/dev/null
SOLO="amqp://guest:guest@127.0.0.1:5684/%2f"
CLUSTER="$(bash "$HERE/rabbit.sh" urls)"

LUA="$(mktemp)"
cat >"$LUA" <<'LUA'
wrk.method = "POST"
wrk.body = '{"task":"diag.noop","args":{}}'
wrk.headers["Content-Type"] = "application/json"
LUA

run_one() { # label urls workers
  local label=$1 urls=$2 workers=$3
  local ns
  ns="bench$(date +%s%N | tail -c 9)"
  local db="$PG/$ns"
  export CONVEYOR_DATABASE_URL="$db" CONVEYOR_AMQP_URL="$urls" CONVEYOR_NAMESPACE="$ns" CONVEYOR_LOG_LEVEL=warn
  "$BIN" migrate run >/dev/null
  local port; port=$(free_port)
  CONVEYOR_INGRESS_ADDR="127.0.0.1:$port" "$BIN" ingress 2>/dev/null & pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz"
  for _ in $(seq 1 "$workers"); do
    local wport; wport=$(free_port)
    CONVEYOR_WORKER_METRICS_ADDR="127.0.0.1:$wport" "$BIN" worker 2>/dev/null & pids+=($!)
    wait_ready "http://127.0.0.1:$wport/readyz"
  done
  wrk -t2 -c64 -d"${LOAD_SECS}s" -s "$LUA" "http://127.0.0.1:$port/v1/jobs" >/dev/null
  local left
  for _ in $(seq 1 600); do
    left=$(psql -tA "$db" -c "select count(*) from jobs where state <> 'succeeded'")
    [[ "$left" == 0 ]] && break
    sleep 0.5
  done
  read -r jobs secs < <(psql -tA -F' ' "$db" -c \
    "select count(*), extract(epoch from max(finished_at) - min(enqueued_at)) from jobs where state = 'succeeded'")
  printf '%-22s %7s %8s %9.1f %9.0f%s\n' "$label" "$workers" "$jobs" "$secs" "$(echo "$jobs / $secs" | bc -l)" \
    "$([[ "$left" == 0 ]] || echo "  ($left not finished)")"
  stop_processes
  unset CONVEYOR_DATABASE_URL CONVEYOR_AMQP_URL CONVEYOR_NAMESPACE CONVEYOR_LOG_LEVEL
}

printf '%-22s %7s %8s %9s %9s\n' setup workers jobs seconds "jobs/s"
for workers in 1 2 4; do run_one "one node" "$SOLO" "$workers"; done
for workers in 1 2 4; do run_one "three-node cluster" "$CLUSTER" "$workers"; done
rm -f "$LUA"
