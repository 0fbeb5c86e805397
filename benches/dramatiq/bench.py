"""Dramatiq 2.2.1 under the same scenarios as Conveyor (see benches/run.sh).

    bench.py enqueue --confirm 0|1 --seconds S
    bench.py drain --variant noop|pg --jobs N --processes P --threads T
    bench.py latency --rate R --seconds S
    bench.py cleanup

Every number is appended as a JSON line to $BENCH_RESULTS, in the format of
the Rust scenarios (scenario, system, metric, value, unit, run).
"""

import argparse
import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def put(args, scenario, metric, value, unit):
    line = json.dumps({"scenario": scenario, "system": "dramatiq", "metric": metric,
                       "value": value, "unit": unit, "run": args.run})
    print(line, flush=True)
    with open(os.environ["BENCH_RESULTS"], "a") as f:
        f.write(line + "\n")


def quantile(samples, q):
    if not samples:
        return 0.0
    samples = sorted(samples)
    rank = min(max(math.ceil(q * len(samples)), 1), len(samples))
    return samples[rank - 1]


def queue_name():
    return os.environ["BENCH_QUEUE"]


def load_actors(confirm):
    os.environ["BENCH_CONFIRM"] = "1" if confirm else "0"
    sys.path.insert(0, HERE)
    import actors

    return actors


def ready_messages(actors):
    """Ready messages in the work queue (a passive declare through Dramatiq's own channel)."""
    channel = actors.broker.channel
    frame = channel.queue_declare(queue=queue_name(), durable=True, passive=True)
    return frame.method.message_count


def start_worker(processes, threads, log):
    env = dict(os.environ, PYTHONPATH=HERE)
    return subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "actors", "--processes", str(processes),
         "--threads", str(threads)],
        cwd=HERE, env=env, stdout=log, stderr=log, start_new_session=True)


def stop_worker(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def enqueue(args):
    actors = load_actors(args.confirm)
    actors.broker.declare_queue(queue_name())
    actors.broker.flush(queue_name())
    latencies = []
    deadline = time.monotonic() + args.seconds
    started = time.monotonic()
    sent = 0
    while time.monotonic() < deadline:
        t = time.perf_counter()
        actors.noop.send()
        latencies.append((time.perf_counter() - t) * 1000)
        sent += 1
    rate = sent / (time.monotonic() - started)
    scenario = "http_enqueue" if args.confirm else "http_enqueue_noconfirm"
    put(args, scenario, "rate", rate, "jobs/s")
    put(args, scenario, "p50_ms", quantile(latencies, 0.5), "ms")
    put(args, scenario, "p99_ms", quantile(latencies, 0.99), "ms")
    actors.broker.flush(queue_name())


def drain(args):
    actors = load_actors(False)
    import psycopg2

    pg = psycopg2.connect(os.environ["BENCH_PG_DSN"])
    pg.autocommit = True
    with pg.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS dramatiq_rows "
                    "(id bigserial PRIMARY KEY, n int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")
        cur.execute("TRUNCATE dramatiq_rows")
    actors.broker.declare_queue(queue_name())
    actors.broker.flush(queue_name())
    actor = actors.pg_write if args.variant == "pg" else actors.noop
    for n in range(args.jobs):
        if args.variant == "pg":
            actor.send(n)
        else:
            actor.send()
    # Without confirms, send() returns before the broker has routed the message.
    settle = time.monotonic() + 10
    while ready_messages(actors) < args.jobs and time.monotonic() < settle:
        time.sleep(0.05)
    assert ready_messages(actors) == args.jobs, "not every message was queued"
    with open(os.path.join(os.environ.get("BENCH_OUT", "."), "dramatiq-worker.log"), "a") as log:
        spawned = time.monotonic()
        proc = start_worker(args.processes, args.threads, log)
        first = None
        deadline = spawned + args.timeout
        while True:
            if args.variant == "pg" and ready_messages(actors) > 0:
                # Counting the table is a sequential scan that takes CPU from the
                # workers being measured: only count once the queue is empty.
                done = False
            elif args.variant == "pg":
                with pg.cursor() as cur:
                    cur.execute("SELECT count(*) FROM dramatiq_rows")
                    done = cur.fetchone()[0] >= args.jobs
            else:
                ready = ready_messages(actors)
                if first is None and ready < args.jobs:
                    first = time.monotonic()
                done = ready == 0
            if done:
                break
            if time.monotonic() > deadline:
                stop_worker(proc)
                raise SystemExit(f"dramatiq did not drain {args.jobs} jobs in {args.timeout} s")
            time.sleep(0.02)
        finished = time.monotonic()
        stop_worker(proc)
    if args.variant == "pg":
        with pg.cursor() as cur:
            cur.execute("SELECT extract(epoch FROM max(at) - min(at))::float8 FROM dramatiq_rows")
            busy = cur.fetchone()[0]
    else:
        busy = finished - (first or spawned)
    scenario = "drain_1w_pg" if args.variant == "pg" else "drain_1w"
    put(args, scenario, "rate", args.jobs / busy, "jobs/s")
    put(args, scenario, "rate_from_spawn", args.jobs / (finished - spawned), "jobs/s")
    actors.broker.flush(queue_name())


def latency(args):
    actors = load_actors(False)
    actors.broker.declare_queue(queue_name())
    actors.broker.flush(queue_name())
    lat_dir = tempfile.mkdtemp(prefix="dramatiq-lat-")
    os.environ["BENCH_LAT_DIR"] = lat_dir
    total = args.rate * args.seconds
    with open(os.path.join(os.environ.get("BENCH_OUT", "."), "dramatiq-worker.log"), "a") as log:
        proc = start_worker(args.processes, args.threads, log)
        time.sleep(3)
        period = 1.0 / args.rate
        t0 = time.monotonic() + 0.1
        for i in range(total):
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            actors.latency.send(time.time())
        achieved = total / (time.monotonic() - t0)
        rows = []
        deadline = time.monotonic() + 60
        while len(rows) < total and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = [line.split() for path in glob.glob(os.path.join(lat_dir, "lat-*.txt"))
                    for line in open(path) if line.strip()]
        stop_worker(proc)
    start = [float(r[0]) for r in rows]
    finish = [float(r[1]) for r in rows]
    print(f"dramatiq latency: {len(rows)}/{total} at {achieved:.0f}/s", flush=True)
    put(args, "latency", "achieved_rate", achieved, "jobs/s")
    put(args, "latency", "start_p50_ms", quantile(start, 0.5), "ms")
    put(args, "latency", "start_p99_ms", quantile(start, 0.99), "ms")
    put(args, "latency", "finish_p50_ms", quantile(finish, 0.5), "ms")
    put(args, "latency", "finish_p99_ms", quantile(finish, 0.99), "ms")


def cleanup(args):
    actors = load_actors(False)
    channel = actors.broker.channel
    for suffix in ("", ".DQ", ".XQ"):
        channel.queue_delete(queue=queue_name() + suffix)
    print(f"removed dramatiq queues {queue_name()}*")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("enqueue")
    p.add_argument("--confirm", type=int, choices=[0, 1], required=True)
    p.add_argument("--seconds", type=float, default=5)
    p = sub.add_parser("drain")
    p.add_argument("--variant", choices=["noop", "pg"], required=True)
    p.add_argument("--jobs", type=int, default=50_000)
    p.add_argument("--processes", type=int, default=os.cpu_count())
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300)
    p = sub.add_parser("latency")
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--processes", type=int, default=os.cpu_count())
    p.add_argument("--threads", type=int, default=8)
    sub.add_parser("cleanup")
    args = parser.parse_args()
    {"enqueue": enqueue, "drain": drain, "latency": latency, "cleanup": cleanup}[args.command](args)


if __name__ == "__main__":
    main()
