#!/usr/bin/env bash
# A private PostgreSQL instance for the failover proof, so restarting it mid-load
# never disturbs the shared server on 5432 that other test runs use.
#
#   postgres.sh up        initdb (trust auth) and start on port 5433
#   postgres.sh restart   fast shutdown (drops every connection) and start again
#   postgres.sh stop|start   the two halves, for a longer outage
#   postgres.sh down      stop it and delete its data
#   postgres.sh url       the server URL (no database)
set -euo pipefail

DIR="${CLUSTER_TEST_PG_DIR:-/tmp/conveyor-pg-cluster}"
PORT="${CLUSTER_TEST_PG_PORT:-5433}"
BIN="${PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)}"

as_postgres() { su postgres -s /bin/sh -c "$*"; }
pg_ctl() { as_postgres "$BIN/pg_ctl -D $DIR/data -l $DIR/log -w -t 60 $*"; }
OPTS="-o '-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200'"

case "${1:-}" in
  up)
    if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
      mkdir -p "$DIR"; chown postgres:postgres "$DIR"
      as_postgres "$BIN/initdb -D $DIR/data -U postgres --auth=trust -E UTF8 >/dev/null"
    fi
    pg_ctl "$OPTS start" >/dev/null
    echo "private PostgreSQL up: $("$0" url)"
    ;;
  restart) pg_ctl "-m fast restart" >/dev/null ;;
  stop) pg_ctl "-m fast stop" >/dev/null ;;
  start) pg_ctl "$OPTS start" >/dev/null ;;
  down)
    if [[ -f "$DIR/data/postmaster.pid" ]]; then pg_ctl "-m immediate stop" >/dev/null || true; fi
    rm -rf "$DIR"
    ;;
  url) echo "postgres://postgres@127.0.0.1:$PORT" ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
