#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer at the configured URLs
# (CONVEYOR_DATABASE_URL, CONVEYOR_AMQP_URL, else the defaults).
# Order: use what answers; else start the locally installed server; else, on
# Debian/Ubuntu as root, `apt-get update`, install it with apt and start it (a
# PostgreSQL installed this way is set up for the passwordless local login the
# default URL needs); else say what to install on this system.
# A RabbitMQ that was already running must also be able to declare a quorum
# queue with at-least-once dead-lettering (RabbitMQ 3.10 can lose that while
# its port still answers): checked with `rabbitmqctl eval` on a local node this
# user can administer (about 1 s), and if it cannot, its app is restarted
# (stop_app, start_app) and checked again; a remote broker is not checked.
#
#   ensure-services.sh [--dry-run] [--record FILE]
#       --dry-run      print what would be installed, configured, started or restarted; change
#                      nothing (the RabbitMQ check still declares and deletes its scratch queue)
#       --record FILE  append each server this run starts to FILE (see services.sh)
#   ensure-services.sh [--dry-run] --stop-recorded FILE
#       stop exactly the servers listed in FILE, newest first
#
# `make run` records and stops what it started; `make services` and .ci/run
# leave the servers running. A server that was already running is never stopped.
set -euo pipefail
# shellcheck source=deploy/local/services.sh
source "$(dirname "$0")/services.sh"

stop_file=""
while (($#)); do
  case "$1" in
    --dry-run) SERVICES_DRY_RUN=1 ;;
    --record) SERVICES_STARTED_FILE="${2:?--record needs a file}"; shift ;;
    --stop-recorded) stop_file="${2:?--stop-recorded needs a file}"; shift ;;
    *) echo "usage: $0 [--dry-run] [--record FILE | --stop-recorded FILE]" >&2; exit 2 ;;
  esac
  shift
done

if [[ -n "$stop_file" ]]; then
  svc_stop_recorded "$stop_file"
else
  svc_ensure_all
fi
