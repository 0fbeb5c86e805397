#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer at the configured URLs.
# Order: use what answers; else start the locally installed server; else, on
# Debian as root, install it with apt and start it; else say exactly what to do.
set -euo pipefail

DB_URL="${CONVEYOR_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/conveyor}"
AMQP_URL="${CONVEYOR_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

hostport() { # url default_port -> "host port"
  local rest="${1#*://}"; rest="${rest#*@}"; rest="${rest%%/*}"; rest="${rest%%,*}"
  local host="${rest%%:*}" port="${rest##*:}"
  [[ "$port" == "$rest" ]] && port="$2"
  echo "$host $port"
}
answers() { timeout 2 bash -c "</dev/tcp/$1/$2" 2>/dev/null; }
is_local() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }
can_apt() { [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; }
wait_for() { # host port name seconds
  for _ in $(seq 1 "$4"); do answers "$1" "$2" && return 0; sleep 1; done
  echo "ensure-services: $3 did not start listening on $1:$2 within $4 s" >&2; return 1
}

read -r PG_HOST PG_PORT <<<"$(hostport "$DB_URL" 5432)"
read -r MQ_HOST MQ_PORT <<<"$(hostport "$AMQP_URL" 5672)"

if answers "$PG_HOST" "$PG_PORT"; then
  echo "PostgreSQL answers at $PG_HOST:$PG_PORT"
elif ! is_local "$PG_HOST"; then
  echo "ensure-services: PostgreSQL at $PG_HOST:$PG_PORT does not answer, and it is not local; start it or fix CONVEYOR_DATABASE_URL" >&2; exit 1
else
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if can_apt; then
      echo "Installing PostgreSQL with apt..."
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    else
      echo "ensure-services: PostgreSQL is not installed. Run: sudo apt-get install postgresql (or point CONVEYOR_DATABASE_URL at a server)" >&2; exit 1
    fi
  fi
  version="$(ls /etc/postgresql | sort -V | tail -1)"
  echo "Starting PostgreSQL $version..."
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for "$PG_HOST" "$PG_PORT" PostgreSQL 30
  # Local development uses trust auth for the postgres user over TCP, as Conveyor's defaults expect.
  if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -c 'select 1' >/dev/null 2>&1; then
    echo "ensure-services: PostgreSQL runs but user postgres cannot log in over TCP without a password; set CONVEYOR_DATABASE_URL with credentials" >&2; exit 1
  fi
fi

if answers "$MQ_HOST" "$MQ_PORT"; then
  echo "RabbitMQ answers at $MQ_HOST:$MQ_PORT"
elif ! is_local "$MQ_HOST"; then
  echo "ensure-services: RabbitMQ at $MQ_HOST:$MQ_PORT does not answer, and it is not local; start it or fix CONVEYOR_AMQP_URL" >&2; exit 1
else
  if ! command -v rabbitmq-server >/dev/null; then
    if can_apt; then
      echo "Installing RabbitMQ with apt..."
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
    else
      echo "ensure-services: RabbitMQ is not installed. Run: sudo apt-get install rabbitmq-server (3.10 or newer; or point CONVEYOR_AMQP_URL at a broker)" >&2; exit 1
    fi
  fi
  echo "Starting RabbitMQ..."
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for "$MQ_HOST" "$MQ_PORT" RabbitMQ 90
fi
