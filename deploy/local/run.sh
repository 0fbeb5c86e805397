#!/usr/bin/env bash
# `make run`: services up, database migrated, one ingress and one worker
# running in the foreground.
#
# Ctrl-C (or SIGTERM to this script) stops exactly what this run started:
# the ingress and the worker get one SIGTERM each, and the worker drains
# (in-flight jobs finish within worker.grace_period_ms, the rest go back to
# the queue); then the servers ensure-services.sh started for this run are
# stopped, never ones that were already running. A second Ctrl-C passes a
# second SIGTERM on, which makes the worker exit at once.
#
# The two conveyor processes run in their own sessions (setsid), so the
# terminal's SIGINT reaches only this script, which forwards one SIGTERM: a
# signal from the terminal plus one from here would be two, and the second
# one makes the worker exit without draining (platform/src/shutdown.rs).
#
# Environment: every CONVEYOR_* variable is passed on to the conveyor
# processes (CONVEYOR_DATABASE_URL, CONVEYOR_AMQP_URL, CONVEYOR_NAMESPACE,
# CONVEYOR_INGRESS_ADDR, CONVEYOR_WORKER_METRICS_ADDR, …); this script reads
# CONVEYOR_INGRESS_ADDR for the URL it prints, and ensure-services.sh reads
# the two URLs. MAKE_RUN_BIN=PATH runs that conveyor binary instead of
# building one (cli/tests/it/make_run.rs does, while cargo holds its lock).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v setsid >/dev/null; then
  echo "run.sh: setsid (util-linux) is needed to give each process exactly one signal on Ctrl-C" >&2
  exit 1
fi

started="$(mktemp)" # servers started for this run, written by ensure-services.sh
pids=()             # the conveyor processes
names=()            # their roles, same order

# shellcheck disable=SC2317 # called from the traps below
signal_children() {
  if ((${#pids[@]})); then kill -TERM "${pids[@]}" 2>/dev/null || true; fi
}

# Waits for child `pid` and sets `reaped` to its exit status. A wait cut short
# by a trapped signal (a second Ctrl-C) returns while the child still runs.
# shellcheck disable=SC2317 # called from the traps below
reap() {
  local rc
  while :; do
    rc=0
    wait "$1" 2>/dev/null || rc=$?
    kill -0 "$1" 2>/dev/null || break
  done
  reaped=$rc
}

# Stops the conveyor processes (one SIGTERM each), waits for them, then stops
# the servers this run started. Exits with `status`, or 1 when a process
# did not exit 0.
# shellcheck disable=SC2317 # called from the traps below
shutdown() {
  local status=$1 i
  trap - EXIT
  trap 'echo "Second signal: the worker stops at once."; signal_children' INT TERM
  if ((${#pids[@]})); then
    echo
    echo "Stopping Conveyor: one SIGTERM each to the ingress and the worker; the worker drains first (Ctrl-C again to stop at once)..."
    signal_children
    for i in "${!pids[@]}"; do
      reap "${pids[$i]}"
      echo "${names[$i]} exited with status $reaped"
      ((reaped == 0)) || status=1
    done
  fi
  bash deploy/local/ensure-services.sh --stop-recorded "$started" || status=1
  rm -f "$started"
  exit "$status"
}
trap 'shutdown 0' INT TERM
trap 'shutdown 1' EXIT

bash deploy/local/ensure-services.sh --record "$started"

if [[ -n "${MAKE_RUN_BIN:-}" ]]; then
  BIN="$MAKE_RUN_BIN"
else
  echo "Building conveyor..."
  cargo build --quiet --bin conveyor
  target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  BIN="${target_dir:-target}/debug/conveyor"
fi

"$BIN" migrate run
# A development key (admin scope: jobs, campaigns, dashboard); the key is the last line.
KEY="$("$BIN" keys create --producer dev --scope admin --expires 7d | tail -n1)"
ADDR="${CONVEYOR_INGRESS_ADDR:-127.0.0.1:8080}"

setsid "$BIN" worker </dev/null &
pids+=("$!") names+=(worker)
setsid "$BIN" ingress </dev/null &
pids+=("$!") names+=(ingress)

alive() {
  local pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
}
ready=0
for _ in $(seq 1 300); do
  if curl -fsS -o /dev/null "http://$ADDR/readyz" 2>/dev/null; then
    ready=1
    break
  fi
  if ! alive; then
    echo "run.sh: a conveyor process exited during start-up (see its log above)" >&2
    exit 1
  fi
  sleep 0.2
done
if ((ready == 0)); then
  echo "run.sh: the ingress is not ready at http://$ADDR/readyz after 60 s (see the logs above); still waiting" >&2
fi

cat <<MSG

Conveyor is running: ingress http://$ADDR  (OpenAPI: http://$ADDR/openapi.json)

Development API key (admin scope, expires in 7 days; also the dashboard login at
http://$ADDR/dashboard). Paste this line into another terminal:

  KEY=$KEY

  curl -s -X POST http://$ADDR/v1/jobs -H "Authorization: Bearer \$KEY" \\
       -H 'content-type: application/json' -d '{"task": "diag.noop", "args": {}}'
  curl -s -H "Authorization: Bearer \$KEY" http://$ADDR/v1/jobs/<id from the answer above>

Operator commands use the binary this run built: $BIN --help

Press Ctrl-C to stop (the worker drains first).
MSG

# Returns when a conveyor process exits by itself (status 0 or not); a signal
# to this script interrupts it and runs `shutdown 0` instead.
wait -n "${pids[@]}" || true
echo "run.sh: a conveyor process exited by itself; stopping the rest" >&2
exit 1
