#!/usr/bin/env bash
# `make cluster-test`: the failover proof of issue 9 and the broker faults of issue 7.
#
# Starts a private three-node RabbitMQ cluster (AMQP 5681..5683), a private
# standalone node (5684) and a private PostgreSQL (5433), runs the `#[ignore]`d
# tests in cli/tests/it/cluster.rs and broker_faults.rs one at a time against
# them, and tears everything down, also on failure or Ctrl-C.
# The shared broker on 5672 and database on 5432 are never touched.
# Needs root (the nodes run as the `rabbitmq` user, the database as `postgres`).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=deploy/cluster

if [[ $EUID -ne 0 ]]; then
  echo "cluster-test: must run as root (it starts RabbitMQ nodes as the rabbitmq user and PostgreSQL as postgres)" >&2
  exit 1
fi
for tool in rabbitmq-server rabbitmqctl su; do
  command -v "$tool" >/dev/null || { echo "cluster-test: $tool is not installed" >&2; exit 1; }
done

teardown() {
  echo "cluster-test: tearing down the private cluster and database"
  bash "$HERE/rabbit.sh" down || true
  bash "$HERE/postgres.sh" down || true
}
trap teardown EXIT

# Build first, so node start-up time is not spent waiting for the compiler.
cargo build --quiet --bin conveyor
cargo nextest run --no-run -p conveyor --test it >/dev/null 2>&1 || cargo test --no-run -p conveyor --test it >/dev/null

bash "$HERE/postgres.sh" up
bash "$HERE/rabbit.sh" up
bash "$HERE/rabbit.sh" solo
# Read by cli/tests/it/{cluster,broker_faults}.rs. Not CONVEYOR_* names: every
# conveyor process reads those as configuration keys and rejects unknown ones.
CLUSTER_TEST_AMQP_URLS="$(bash "$HERE/rabbit.sh" urls)"
CLUSTER_TEST_SOLO_AMQP_URL="$(bash "$HERE/rabbit.sh" solo-url)"
CLUSTER_TEST_PG="$(bash "$HERE/postgres.sh" url)"
export CLUSTER_TEST_AMQP_URLS CLUSTER_TEST_SOLO_AMQP_URL CLUSTER_TEST_PG

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run -p conveyor --test it --run-ignored ignored-only -j 1 --no-capture 'cluster::' 'broker_faults::'
else
  cargo test -p conveyor --test it -- --ignored --test-threads 1 --nocapture 'cluster::' 'broker_faults::'
fi
