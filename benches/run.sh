#!/usr/bin/env bash
# `make bench`: Conveyor, Dramatiq 2.2.1 and the bare broker, side by side, in one run.
#
# Every scenario runs BENCH_RUNS times (default 3), systems interleaved within
# each repetition so that the machine's noise hits all of them alike. Numbers go
# to benches/out/<stamp>/results.jsonl; report.py turns them into benches/RESULTS.md.
# A private database and broker namespace are created and removed again.
#
# Knobs (environment): BENCH_RUNS, BENCH_HTTP_SECONDS, BENCH_WEBHOOK_SECONDS, BENCH_DRAIN_JOBS,
# BENCH_DRAMATIQ_DRAIN_JOBS, BENCH_LATENCY_SECONDS, BENCH_SKIP_DRAMATIQ=1,
# BENCH_SKIP_CRITERION=1, PG_SERVER, AMQP_URL.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${BENCH_RUNS:-3}
http_seconds=${BENCH_HTTP_SECONDS:-10}
webhook_seconds=${BENCH_WEBHOOK_SECONDS:-10}
drain_jobs=${BENCH_DRAIN_JOBS:-100000}
dramatiq_drain_jobs=${BENCH_DRAMATIQ_DRAIN_JOBS:-30000}
latency_seconds=${BENCH_LATENCY_SECONDS:-20}
pg_server=${PG_SERVER:-postgres://postgres@127.0.0.1:5432}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
release=$CARGO_TARGET_DIR/release
started_at=$(date +%s)

log() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - started_at))"; }

log "building release binaries"
cargo build --release -q -p conveyor -p conveyor-benches --bins
[[ -z ${BENCH_SKIP_CRITERION:-} ]] && cargo bench -q -p conveyor-benches --bench envelope --bench validation --bench templates --no-run 2>/dev/null
started_at=$(date +%s) # the reported run time excludes compiling

if [[ ! -x /usr/sbin/smtp-sink ]] && command -v apt-get >/dev/null && [[ $EUID -eq 0 ]]; then
  log "installing postfix for its smtp-sink (the mail fan-out's SMTP sink)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi

venv=$root/benches/.venv
if [[ -z ${BENCH_SKIP_DRAMATIQ:-} && ! -x $venv/bin/python ]]; then
  log "creating $venv with Dramatiq 2.2.1"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "dramatiq[rabbitmq]==2.2.1" psycopg2-binary
fi

suffix=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$root/benches/out/$stamp
mkdir -p "$out"
export BENCH_RESULTS=$out/results.jsonl BENCH_OUT=$out
export CONVEYOR_NAMESPACE=bench-$suffix
export CONVEYOR_DATABASE_URL=$pg_server/conveyor_bench_$suffix
export CONVEYOR_AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export CONVEYOR_LOG_LEVEL=warn
export BENCH_QUEUE=bench_dramatiq_$suffix BENCH_AMQP_URL=$CONVEYOR_AMQP_URL
export BENCH_PG_DSN="host=127.0.0.1 user=postgres dbname=conveyor_bench_$suffix"
: > "$BENCH_RESULTS"

ingress_pid=
cleanup() {
  set +e
  [[ -n $ingress_pid ]] && kill -TERM "$ingress_pid" 2>/dev/null && wait "$ingress_pid" 2>/dev/null
  "$release/bench-cleanup" >/dev/null 2>&1
  [[ -z ${BENCH_SKIP_DRAMATIQ:-} ]] && "$venv/bin/python" benches/dramatiq/bench.py cleanup >/dev/null 2>&1
  psql -q "$pg_server/postgres" -c "DROP DATABASE IF EXISTS conveyor_bench_$suffix WITH (FORCE)" >/dev/null 2>&1
}
trap cleanup EXIT

log "database conveyor_bench_$suffix, namespace $CONVEYOR_NAMESPACE"
"$release/conveyor" migrate run >/dev/null
BENCH_API_KEY=$("$release/conveyor" keys create --producer bench --scope 'enqueue:*' --rate 10000000 --burst 10000000 | tail -1)
export BENCH_API_KEY

# The webhook source `bench`, with throwaway keys: an Ed25519 pair (v1a, what the
# membership producer uses) and an HMAC secret (v1). bench-webhooks signs with either.
webhook_pair=$("$release/conveyor" webhook keygen --ed25519)
BENCH_WEBHOOK_ED25519=$(sed -n 's/^signing-key: //p' <<<"$webhook_pair")
webhook_public=$(sed -n 's/^verifying-key: //p' <<<"$webhook_pair")
BENCH_WEBHOOK_HMAC=$("$release/conveyor" webhook keygen --hmac | tail -1)
cat > "$out/conveyor.toml" <<TOML
[webhooks.sources.bench]
keys = ["$webhook_public", "$BENCH_WEBHOOK_HMAC"]
TOML

port=$((18000 + RANDOM % 2000))
export CONVEYOR_INGRESS_ADDR=127.0.0.1:$port
"$release/conveyor" --config "$out/conveyor.toml" ingress > "$out/ingress.log" 2>&1 &
ingress_pid=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "ingress did not become ready"; cat "$out/ingress.log"; exit 1; }

dramatiq() { [[ -z ${BENCH_SKIP_DRAMATIQ:-} ]] && "$venv/bin/python" benches/dramatiq/bench.py --run "$run" "$@"; return 0; }

# Scenario 4 is scenario_fanout above.
# Scenario 4, mail fan-out: FANOUT_RECIPIENTS (default 5 000 per repetition, to stay in the
# 15-minute budget; the 100 000-recipient figure in RESULTS.md comes from
# `bench-fanout --recipients 100000`, see there) with 1, 2 and 4 workers, and bare lettre,
# against Postfix's smtp-sink (installed here when missing: the embedded sink is slower).
scenario_fanout() {
  "$release/bench-fanout" --run "$run" --recipients "${FANOUT_RECIPIENTS:-5000}" --workers 1,2,4 \
    --conveyor-bin "$release/conveyor"
}

for run in $(seq "$runs"); do
  log "run $run/$runs: 1. HTTP enqueue"
  "$release/bench-http" --run "$run" --addr "127.0.0.1:$port" --seconds "$http_seconds" --ingress-pid "$ingress_pid"
  dramatiq enqueue --confirm 1 --seconds 5
  dramatiq enqueue --confirm 0 --seconds 5
  "$release/bench-broker" --run "$run"
  # Where the enqueue's rate goes: the recorder alone, and the bare publisher, at 64 in flight.
  "$release/bench-record" --run "$run"
  "$release/bench-broker" --run "$run" --publish-only --window 64

  log "run $run/$runs: 2. drain"
  "$release/bench-drain" --run "$run" --jobs "$drain_jobs" --workers 1 --conveyor-bin "$release/conveyor"
  "$release/bench-drain" --run "$run" --jobs "$drain_jobs" --workers 2 --conveyor-bin "$release/conveyor"
  dramatiq drain --variant noop --jobs "$dramatiq_drain_jobs"
  dramatiq drain --variant pg --jobs "$dramatiq_drain_jobs"

  log "run $run/$runs: 3. latency"
  "$release/bench-latency" --run "$run" --addr "127.0.0.1:$port" --rate 1000 --seconds "$latency_seconds" --conveyor-bin "$release/conveyor"
  dramatiq latency --rate 1000 --seconds "$latency_seconds"

  log "run $run/$runs: 4. mail fan-out"
  scenario_fanout
done

# Signed webhooks and batched enqueues, after every HTTP-enqueue repetition so that the
# ingress peak RSS read by bench-http stays the one of plain enqueue load.
for run in $(seq "$runs"); do
  log "run $run/$runs: 1b. batched enqueue (POST /v1/jobs/batch, 16 connections x 100 jobs)"
  "$release/bench-http" --run "$run" --addr "127.0.0.1:$port" --seconds "$http_seconds" --connections 16 --batch 100
  log "run $run/$runs: 5. signed webhooks (v1a Ed25519, then v1 HMAC)"
  BENCH_WEBHOOK_KEY=$BENCH_WEBHOOK_ED25519 "$release/bench-webhooks" --run "$run" --addr "127.0.0.1:$port" --seconds "$webhook_seconds"
  BENCH_WEBHOOK_KEY=$BENCH_WEBHOOK_HMAC "$release/bench-webhooks" --run "$run" --addr "127.0.0.1:$port" --seconds "$webhook_seconds"
done

log "memory"
"$release/bench-memory" --conveyor-bin "$release/conveyor"

if [[ -z ${BENCH_SKIP_CRITERION:-} ]]; then
  log "criterion micro-benchmarks"
  cargo bench -q -p conveyor-benches --bench envelope --bench validation --bench templates -- --warm-up-time 1 --measurement-time 2 > "$out/criterion.txt" 2>&1
fi

log "report"
python3 benches/report.py --results "$BENCH_RESULTS" --criterion "$CARGO_TARGET_DIR/criterion" \
  --seconds "$(($(date +%s) - started_at))" --out benches/RESULTS.md
log "done: benches/RESULTS.md"
