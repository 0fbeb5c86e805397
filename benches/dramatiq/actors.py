"""The Dramatiq side of `make bench`: the same workload as Conveyor's `diag.noop`.

Configured by environment variables set by bench.py:
BENCH_QUEUE (queue name), BENCH_AMQP_URL, BENCH_CONFIRM ("1" = publisher
confirms on), BENCH_PG_DSN (for pg_write), BENCH_LAT_DIR (for latency).
Dramatiq's default middleware stays on: that is what its users run.
"""

import os
import threading
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

QUEUE = os.environ["BENCH_QUEUE"]
broker = RabbitmqBroker(
    url=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    confirm_delivery=os.environ.get("BENCH_CONFIRM", "0") == "1",
)
dramatiq.set_broker(broker)

_local = threading.local()


def _pg():
    """One autocommit connection per worker thread, as a Dramatiq app would keep."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        import psycopg2

        conn = psycopg2.connect(os.environ["BENCH_PG_DSN"])
        conn.autocommit = True
        _local.conn = conn
    return conn


@dramatiq.actor(queue_name=QUEUE)
def noop():
    """Does nothing: the broker and the framework are all that is measured."""


@dramatiq.actor(queue_name=QUEUE)
def pg_write(n):
    """Commits one row, as Conveyor commits each job's state."""
    with _pg().cursor() as cur:
        cur.execute("INSERT INTO dramatiq_rows (n) VALUES (%s)", (n,))


_lat_lock = threading.Lock()
_lat_file = None


@dramatiq.actor(queue_name=QUEUE)
def latency(sent_at):
    """A no-op that notes how long after its send() it started and finished."""
    global _lat_file
    started = time.time()
    finished = time.time()
    with _lat_lock:
        if _lat_file is None:
            path = os.path.join(os.environ["BENCH_LAT_DIR"], f"lat-{os.getpid()}.txt")
            _lat_file = open(path, "a", buffering=1)
        _lat_file.write(f"{(started - sent_at) * 1000:.3f} {(finished - sent_at) * 1000:.3f}\n")
