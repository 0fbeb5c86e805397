#!/usr/bin/env bash
# A private three-node RabbitMQ cluster on this machine, for the failover proof
# and the benchmark. It never touches the node on 5672 (other tests use it).
#
#   rabbit.sh up          start c1..c3 (AMQP 5681..5683), join them, wait until clustered
#   rabbit.sh solo        start c4 (AMQP 5684), a standalone node, for one-node benchmarks
#                         and the broker-fault proofs (stop_app, memory alarm)
#   rabbit.sh solo-url    the AMQP URL of c4
#   rabbit.sh ctl N ARGS  rabbitmqctl ARGS against node N (1..4), e.g. `ctl 4 stop_app`
#   rabbit.sh down        stop every node this script started and delete their data
#   rabbit.sh stop N      stop node N (1..3) the hard way (the Erlang VM exits)
#   rabbit.sh start N     start node N again; it rejoins the cluster by itself
#   rabbit.sh leader Q    the node (c1@localhost...) leading quorum queue Q
#   rabbit.sh members Q   how many nodes hold a replica of quorum queue Q
#   rabbit.sh urls        the comma-separated AMQP URLs of the three nodes
#
# Each node has its own name, ports, data, log, feature-flag and plugin files,
# owned by the `rabbitmq` user, and shares the Erlang cookie of the installed server.
set -euo pipefail

BASE="${CLUSTER_TEST_DIR:-/tmp/conveyor-rabbit-cluster}"
PORT0="${CLUSTER_TEST_PORT0:-5680}"   # node N listens on PORT0+N
DIST0="${CLUSTER_TEST_DIST0:-25680}"  # and distributes on DIST0+N
NODES=(1 2 3)

node_name() { echo "c$1@localhost"; }

node_env() { # N -> exported environment for node N
  local n=$1 dir="$BASE/c$1"
  export RABBITMQ_NODENAME="c$n@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$((PORT0 + n))
  export RABBITMQ_DIST_PORT=$((DIST0 + n))
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_MNESIA_DIR="$dir/mnesia/c$n@localhost"
  export RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_PID_FILE="$dir/c$n.pid"
  export RABBITMQ_FEATURE_FLAGS_FILE="$dir/feature_flags"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  export RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
  export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
}

ctl() { # N args... : rabbitmqctl against node N
  local n=$1; shift
  rabbitmqctl -q -n "$(node_name "$n")" "$@"
}

start_node() {
  local n=$1 dir="$BASE/c$1"
  mkdir -p "$dir/mnesia" "$dir/log" "$dir/plugins-expand"
  [[ -f "$dir/enabled_plugins" ]] || echo '[].' >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$((PORT0 + n))
loopback_users = none
CONF
  echo 'ERL_EPMD_ADDRESS=127.0.0.1' >"$dir/rabbitmq-env.conf"
  echo '[].' >"$dir/advanced.config"
  chown -R rabbitmq:rabbitmq "$BASE"
  (node_env "$n"; cd /var/lib/rabbitmq
   export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
   # Each proof leaves its quorum queues (segment and WAL files) on the node:
   # at su's soft limit of 1 024 descriptors, a dozen proofs in a row starve it.
   su rabbitmq -s /bin/sh -c 'ulimit -n "$(ulimit -Hn)"; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached' \
     >"$dir/log/startup.out" 2>&1)
  ctl "$n" await_startup --timeout 120 >/dev/null 2>&1 || rabbitmqctl -q -n "$(node_name "$n")" wait --timeout 120 "$dir/c$n.pid"
}

stop_node() {
  local n=$1
  ctl "$n" stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  up)
    mkdir -p "$BASE"
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in 2 3; do
      { ctl "$n" stop_app; ctl "$n" reset; ctl "$n" join_cluster "$(node_name 1)"; ctl "$n" start_app; } \
        >"$BASE/c$n/log/join.out" 2>&1 || { cat "$BASE/c$n/log/join.out" >&2; exit 1; }
    done
    running=$(ctl 1 eval 'length(rabbit_nodes:all_running()).')
    [[ "$running" == "3" ]] || { echo "rabbit.sh: cluster has $running running nodes, expected 3" >&2; exit 1; }
    echo "three-node cluster up: $("$0" urls)"
    ;;
  solo)
    start_node 4
    echo "standalone node up: amqp://guest:guest@127.0.0.1:$((PORT0 + 4))/%2f"
    ;;
  down)
    for n in 1 2 3 4; do [[ -d "$BASE/c$n" ]] && stop_node "$n"; done
    rm -rf "$BASE"
    ;;
  solo-url) echo "amqp://guest:guest@127.0.0.1:$((PORT0 + 4))/%2f" ;;
  ctl) n=$2; shift 2; ctl "$n" "$@" ;;
  stop) stop_node "$2" ;;
  start) start_node "$2" ;;
  leader|members)
    # `list_queues name leader members` works on quorum queues in 3.10; ask any node that answers.
    for n in "${NODES[@]}"; do
      if out=$(ctl "$n" list_queues name leader members --no-table-headers 2>/dev/null); then
        if [[ "$1" == leader ]]; then
          awk -v q="$2" '$1 == q { print $2 }' <<<"$out"
        else
          awk -v q="$2" '$1 == q { n = 0; for (i = 3; i <= NF; i++) n += gsub(/@/, "@", $i); print n }' <<<"$out"
        fi
        exit 0
      fi
    done
    echo "rabbit.sh: no node answered" >&2; exit 1
    ;;
  urls)
    urls=()
    for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$((PORT0 + n))/%2f"); done
    (IFS=,; echo "${urls[*]}")
    ;;
  *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
