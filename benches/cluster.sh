#!/usr/bin/env bash
# `make bench-cluster`: throughput of Conveyor with 1, 2 and 4 worker
# processes, on one RabbitMQ node and on a three-node cluster (quorum queues
# replicated 3 ways).
#
#   benches/cluster.sh [SECONDS_OF_LOAD]     (root; default 10; about 5 minutes)
#
# It starts a private PostgreSQL (5433) and private RabbitMQ nodes with
# deploy/cluster/{postgres,rabbit}.sh (a standalone node on 5684, the cluster on
# 5681..5683; never the shared 5672/5432), and for each setup: a fresh database
# and namespace, an API key (`enqueue:*`, rate limit far above the load), one
# ingress and N `conveyor worker` processes (release build). wrk (2 threads, 64
# connections) posts `diag.noop` jobs with that key for SECONDS_OF_LOAD, twice:
#   end to end: the workers run during the load; when every accepted job has
#     succeeded, jobs/s = accepted / (last finished_at - first enqueued_at), the
#     rate of the whole path HTTP → PostgreSQL → broker → worker → PostgreSQL
#     (bounded by the slower of the HTTP enqueue and the workers);
#   drain: the workers start only after the load, on the backlog it left;
#     jobs/s = jobs / (last finished_at - first started_at), what N workers
#     consume from that broker setup.
# A setup in which no job was accepted fails the run (with wrk's and the
# ingress's output), so a broken key or route never passes for a slow system.
#
# The table goes to stdout and, with machine, date and commit, into the section
# "Scaling: one node vs a three-node cluster" of benches/RESULTS.md and into
# "Measuring throughput" of deploy/RUNBOOK.md (between the `cluster-scaling`
# markers; BENCH_NO_WRITE=1 skips that). Everything runs on
# this one machine, so the load generator, both servers and all Conveyor
# processes share its cores: compare rows of one run, not absolute numbers.
# KEEP=1 leaves the nodes and the database running afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
HERE=deploy/cluster
LOAD_SECS="${1:-10}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
BIN="${BIN:-$CARGO_TARGET_DIR/release/conveyor}"

[[ $EUID -eq 0 ]] || { echo "bench-cluster: run as root (it starts RabbitMQ and PostgreSQL as their users)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "bench-cluster: needs wrk (apt-get install wrk)" >&2; exit 1; }
if [[ -z "${BIN_PREBUILT:-}" ]]; then
  cargo build --release --quiet --bin conveyor
fi
[[ -x "$BIN" ]] || { echo "bench-cluster: no binary at $BIN (set BIN=...)" >&2; exit 1; }

started_at=$(date +%s)
out=$(mktemp -d /tmp/conveyor-bench-cluster.XXXXXX)
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
wait_ready() { for _ in $(seq 1 120); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "bench-cluster: $1 never became ready" >&2; return 1; }

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
bash "$HERE/postgres.sh" up >/dev/null
PG="$(bash "$HERE/postgres.sh" url)"
bash "$HERE/rabbit.sh" solo >/dev/null
bash "$HERE/rabbit.sh" up >/dev/null
SOLO="$(bash "$HERE/rabbit.sh" solo-url)"
CLUSTER="$(bash "$HERE/rabbit.sh" urls)"

rows=()
start_workers() { # n log: all at once (a drain lasts seconds), then wait until each consumes
  local wports=()
  for _ in $(seq 1 "$1"); do
    local wport; wport=$(free_port)
    CONVEYOR_WORKER_METRICS_ADDR="127.0.0.1:$wport" "$BIN" worker 2>>"$2" & pids+=($!)
    wports+=("$wport")
  done
  for wport in "${wports[@]}"; do wait_ready "http://127.0.0.1:$wport/readyz"; done
}
run_one() { # label urls workers mode(e2e|drain)
  local label=$1 urls=$2 workers=$3 mode=$4
  local ns="bench$(date +%s%N | tail -c 9)"
  local db="$PG/$ns"
  export CONVEYOR_DATABASE_URL="$db" CONVEYOR_AMQP_URL="$urls" CONVEYOR_NAMESPACE="$ns" CONVEYOR_LOG_LEVEL=warn
  "$BIN" migrate run >/dev/null
  local key
  key=$("$BIN" keys create --producer bench --scope 'enqueue:*' --rate 10000000 --burst 10000000 | tail -1)
  local lua="$out/$ns.lua"
  cat >"$lua" <<LUA
wrk.method = "POST"
wrk.body = '{"task":"diag.noop","args":{}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
  local port; port=$(free_port)
  CONVEYOR_INGRESS_ADDR="127.0.0.1:$port" "$BIN" ingress 2>"$out/$ns.ingress.log" & pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz"
  [[ $mode == e2e ]] && start_workers "$workers" "$out/$ns.workers.log"
  wrk -t2 -c64 -d"${LOAD_SECS}s" -s "$lua" "http://127.0.0.1:$port/v1/jobs" >"$out/$ns.wrk.txt"
  local non2xx
  non2xx=$(awk '/Non-2xx/ { print $NF }' "$out/$ns.wrk.txt")
  local accepted
  # Only the benchmark's jobs: the built-in schedules (stats rollups…) enqueue their own.
  accepted=$(psql -tA "$db" -c "select count(*) from jobs where task = 'diag.noop'")
  if [[ "$accepted" == 0 ]]; then
    echo "bench-cluster: $label, $workers worker(s): the ingress accepted no job. wrk said:" >&2
    cat "$out/$ns.wrk.txt" >&2
    echo "-- a request by hand:" >&2
    curl -sS -i -X POST -H 'Content-Type: application/json' -H "Authorization: Bearer $key" \
      -d '{"task":"diag.noop","args":{}}' "http://127.0.0.1:$port/v1/jobs" >&2 || true
    echo "-- ingress log (tail):" >&2
    tail -20 "$out/$ns.ingress.log" >&2
    exit 1
  fi
  [[ $mode == drain ]] && start_workers "$workers" "$out/$ns.workers.log"
  local left
  for _ in $(seq 1 600); do
    left=$(psql -tA "$db" -c "select count(*) from jobs where task = 'diag.noop' and state <> 'succeeded'")
    [[ "$left" == 0 ]] && break
    sleep 0.5
  done
  local jobs secs from=enqueued_at
  [[ $mode == drain ]] && from=started_at
  read -r jobs secs < <(psql -tA -F' ' "$db" -c \
    "select count(*), extract(epoch from max(finished_at) - min($from)) from jobs where task = 'diag.noop' and state = 'succeeded'")
  local rate; rate=$(printf '%.0f' "$(echo "$jobs / $secs" | bc -l)")
  local note=""
  [[ "$left" == 0 ]] || note="$left of $accepted not finished after 300 s"
  [[ -n "$non2xx" ]] && note="${note:+$note; }$non2xx non-2xx answers"
  local what="end to end"; [[ $mode == drain ]] && what="drain"
  printf '%-20s %-11s %7s %8s %8.1f %8s  %s\n' "$label" "$what" "$workers" "$jobs" "$secs" "$rate" "$note"
  rows+=("| $label | $what | $workers | $jobs | $(printf '%.1f' "$secs") | $rate | ${note:-} |")
  stop_processes
  unset CONVEYOR_DATABASE_URL CONVEYOR_AMQP_URL CONVEYOR_NAMESPACE CONVEYOR_LOG_LEVEL
}

printf '%-20s %-11s %7s %8s %8s %8s\n' setup measure workers jobs seconds "jobs/s"
for mode in e2e drain; do
  for workers in 1 2 4; do run_one "one node" "$SOLO" "$workers" "$mode"; done
  for workers in 1 2 4; do run_one "three-node cluster" "$CLUSTER" "$workers" "$mode"; done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - started_at))

[[ -n "${BENCH_NO_WRITE:-}" ]] && exit 0
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- . ':!benches/RESULTS.md' || commit="$commit + uncommitted changes"
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
section="$out/section.md"
{
  echo "<!-- cluster-scaling:begin (written by benches/cluster.sh) -->"
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit \`$commit\`, release build; $cpu, $(nproc) cores,"
  echo "$(free -g | awk '/^Mem:/ { print $2 }') GB; load average $load_start at the start, $load_end at the end;"
  echo "$LOAD_SECS s of load per row, whole run ${elapsed} s. End to end: workers running during the load,"
  echo "accepted ÷ (last finished − first enqueued). Drain: workers started after the load, on its backlog,"
  echo "jobs ÷ (last finished − first started)."
  echo
  echo "| setup | measure | workers | jobs | seconds | jobs/s | note |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | --- |"
  printf '%s\n' "${rows[@]}"
  echo "<!-- cluster-scaling:end -->"
} >"$section"
# The same block replaces the one in deploy/RUNBOOK.md ("Measuring throughput"), so the two agree.
python3 - "$section" "$root/benches/RESULTS.md" "$root/deploy/RUNBOOK.md" <<'PY'
import sys
section = open(sys.argv[1]).read().rstrip("\n")
begin, end = "<!-- cluster-scaling:begin", "<!-- cluster-scaling:end -->"
for path in sys.argv[2:]:
    text = open(path).read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    elif path.endswith("RESULTS.md"):
        text = text.rstrip("\n") + "\n\n## Scaling: one node vs a three-node cluster\n\n" + section + "\n"
    open(path, "w").write(text)
PY
echo "bench-cluster: wrote the table into benches/RESULTS.md and deploy/RUNBOOK.md (${elapsed} s)"
