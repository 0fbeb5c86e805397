# shellcheck shell=bash
# The decisions and actions of ensure-services.sh, as functions: sourced by it,
# and by the tests in cli/tests/it/local_services.rs, which call the
# `svc_*_actions` functions with made-up facts in dry-run mode, and
# local_broker_repair.rs, which gives `svc_rabbitmq_ensure_dlx` a stand-in
# `rabbitmqctl`.
#
# Sourcing this file changes nothing. Every command that changes the system
# goes through `svc_do`, which only prints it when SERVICES_DRY_RUN=1.
# When SERVICES_STARTED_FILE names a file, every server started here is
# recorded in it, one per line (`postgresql <version> <cluster>` or
# `rabbitmq`), so that `svc_stop_recorded` can stop exactly those later.

SERVICES_DRY_RUN="${SERVICES_DRY_RUN:-0}"
SERVICES_STARTED_FILE="${SERVICES_STARTED_FILE:-}"
svc_apt_updated=0

svc_say() { echo "$*"; }
svc_err() { echo "ensure-services: $*" >&2; }
svc_dry() { [[ "$SERVICES_DRY_RUN" == 1 ]]; }

# Runs a command that changes the system; in dry-run mode prints it instead.
svc_do() {
  if svc_dry; then
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Notes that this run started a server, so that the caller may stop it later.
svc_record() {
  [[ -n "$SERVICES_STARTED_FILE" ]] || return 0
  if svc_dry; then
    echo "would record: $*"
  else
    echo "$*" >>"$SERVICES_STARTED_FILE"
  fi
}

# --- facts --------------------------------------------------------------------

svc_hostport() { # url default_port -> "host port" (the first node of a list)
  local rest="${1#*://}" host port
  rest="${rest%%,*}"; rest="${rest##*@}"; rest="${rest%%/*}"; rest="${rest%%\?*}"
  if [[ "$rest" == \[* ]]; then # [::1]:5432
    host="${rest%%]*}"; host="${host#[}"; port="${rest#*]}"; port="${port#:}"
  elif [[ "$rest" == *:* ]]; then
    host="${rest%:*}"; port="${rest##*:}"
  else
    host="$rest"; port=""
  fi
  echo "${host:-127.0.0.1} ${port:-$2}"
}
svc_answers() { timeout 2 bash -c "</dev/tcp/$1/$2" 2>/dev/null; }
svc_is_local() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }
svc_root() { # yes|no; SERVICES_AS_ROOT=1 pretends to be root, in dry-run mode only
  if [[ $EUID -eq 0 ]] || { svc_dry && [[ "${SERVICES_AS_ROOT:-0}" == 1 ]]; }; then
    echo yes
  else
    echo no
  fi
}
svc_package_manager() { # apt|dnf|yum|zypper|pacman|apk|brew|none
  local tool
  for tool in apt-get dnf yum zypper pacman apk brew; do
    if command -v "$tool" >/dev/null 2>&1; then
      echo "${tool%-get}"
      return
    fi
  done
  echo none
}
svc_pg_debian_version() { # the newest Debian cluster `main` (e.g. 15), or nothing
  local dir
  for dir in /etc/postgresql/*/main; do
    [[ -d "$dir" ]] && basename "$(dirname "$dir")"
  done | sort -V | tail -n1
}
svc_pg_binary_present() { # yes|no: a PostgreSQL server is installed in a way we do not start
  if command -v postgres >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
    echo yes
  else
    echo no
  fi
}
svc_rabbitmq_present() {
  if command -v rabbitmq-server >/dev/null 2>&1; then echo yes; else echo no; fi
}

# --- what to tell people --------------------------------------------------------

# How to install and start `service` (postgresql|rabbitmq) with `manager`.
svc_install_hint() { # service manager
  case "$1:$2" in
    postgresql:apt)
      echo "sudo apt-get update && sudo apt-get install postgresql  (or run this as root: it installs it and allows the passwordless local login the default URL needs)" ;;
    postgresql:dnf | postgresql:yum)
      echo "sudo $2 install postgresql-server && sudo postgresql-setup --initdb && sudo systemctl start postgresql" ;;
    postgresql:zypper)
      echo "sudo zypper install postgresql-server && sudo systemctl start postgresql" ;;
    postgresql:pacman)
      echo "sudo pacman -S postgresql && sudo -u postgres initdb -D /var/lib/postgres/data && sudo systemctl start postgresql" ;;
    postgresql:apk)
      echo "sudo apk add postgresql && sudo rc-service postgresql setup && sudo rc-service postgresql start" ;;
    postgresql:brew)
      echo "brew install postgresql@16 && brew services start postgresql@16, then CONVEYOR_DATABASE_URL=postgres://$(id -un)@127.0.0.1:5432/conveyor (Homebrew's superuser is you, not postgres)" ;;
    postgresql:*)
      echo "install PostgreSQL (https://www.postgresql.org/download/) and start it" ;;
    rabbitmq:apt)
      echo "sudo apt-get update && sudo apt-get install rabbitmq-server  (3.10 or newer; or run this as root: it installs it)" ;;
    rabbitmq:dnf | rabbitmq:yum)
      echo "install rabbitmq-server 3.10 or newer (https://www.rabbitmq.com/docs/install-rpm), then sudo systemctl start rabbitmq-server" ;;
    rabbitmq:zypper)
      echo "sudo zypper install rabbitmq-server && sudo systemctl start rabbitmq-server  (3.10 or newer)" ;;
    rabbitmq:pacman)
      echo "sudo pacman -S rabbitmq && sudo systemctl start rabbitmq" ;;
    rabbitmq:apk)
      echo "sudo apk add rabbitmq-server && sudo rc-service rabbitmq-server start  (3.10 or newer)" ;;
    rabbitmq:brew)
      echo "brew install rabbitmq && brew services start rabbitmq" ;;
    rabbitmq:*)
      echo "install RabbitMQ 3.10 or newer (https://www.rabbitmq.com/docs/download) and start it" ;;
  esac
}

# --- actions --------------------------------------------------------------------

svc_apt_install() { # package…: apt-get update (once per run), then install
  if [[ $svc_apt_updated == 0 ]]; then
    svc_do apt-get update -q
    svc_apt_updated=1
  fi
  svc_do env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

svc_wait_for() { # host port name seconds
  if svc_dry; then
    echo "would wait up to $4 s for $3 at $1:$2"
    return 0
  fi
  local _
  for _ in $(seq 1 "$4"); do
    svc_answers "$1" "$2" && return 0
    sleep 1
  done
  svc_err "$3 did not start listening on $1:$2 within $4 s"
  return 1
}

# The rules that let user postgres log in over loopback TCP without a password,
# as the default URL postgres://postgres@127.0.0.1:5432/conveyor expects.
SVC_PG_TRUST_MARKER="# Added by Conveyor's deploy/local/ensure-services.sh, which installed this server for local development:"
SVC_PG_TRUST_RULES=$'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust'

# Puts the trust rules first in `pg_hba.conf` (the first matching rule wins).
# Only for a server this script has just installed; idempotent.
svc_pg_trust_local_tcp() { # pg_hba.conf
  local hba="$1" tmp
  if svc_dry; then
    echo "would prepend to $hba: ${SVC_PG_TRUST_RULES//$'\n'/; }"
    return 0
  fi
  if grep -qxF "$SVC_PG_TRUST_MARKER" "$hba"; then
    return 0
  fi
  tmp="$(mktemp "$hba.XXXXXX")"
  { echo "$SVC_PG_TRUST_MARKER"; echo "$SVC_PG_TRUST_RULES"; echo; cat "$hba"; } >"$tmp"
  chown --reference="$hba" "$tmp" 2>/dev/null || true
  chmod --reference="$hba" "$tmp" 2>/dev/null || chmod 640 "$tmp"
  mv "$tmp" "$hba"
  svc_say "PostgreSQL: user postgres may now log in over 127.0.0.1/::1 without a password ($hba)"
}

# Checks that `conveyor` will be able to log in, without a password prompt:
# with CONVEYOR_DATABASE_URL when it is set (a database it names that does not
# exist yet is fine: `conveyor migrate run` creates it), else as user postgres
# without a password, as the default URL does. Run whether this script started
# the server or found it running (skipped in dry-run mode and without psql).
svc_pg_check_login() { # host port
  svc_dry && return 0
  command -v psql >/dev/null 2>&1 || return 0
  local why
  if [[ -n "${CONVEYOR_DATABASE_URL:-}" ]]; then
    why="$(PGCONNECT_TIMEOUT=5 psql -d "$CONVEYOR_DATABASE_URL" -w -X -c 'select 1' 2>&1 >/dev/null)" && return 0
  else
    why="$(PGCONNECT_TIMEOUT=5 psql -h "$1" -p "$2" -U postgres -d postgres -w -X -c 'select 1' 2>&1 >/dev/null)" && return 0
  fi
  if [[ "$why" == *"database \""*"\" does not exist"* ]]; then
    return 0
  fi
  if [[ -n "${CONVEYOR_DATABASE_URL:-}" ]]; then
    svc_err "PostgreSQL runs at $1:$2, but the login in CONVEYOR_DATABASE_URL does not work:"
  else
    svc_err "PostgreSQL runs at $1:$2, but user postgres cannot log in over TCP without a password:"
  fi
  svc_err "  ${why//$'\n'/ }"
  svc_err "Either set CONVEYOR_DATABASE_URL=postgres://USER:PASSWORD@$1:$2/conveyor, or put"
  svc_err "  ${SVC_PG_TRUST_RULES//$'\n'/ | }"
  svc_err "first in pg_hba.conf and reload PostgreSQL (local development only)."
  return 1
}

# What to do about PostgreSQL, given the facts (each `yes` or `no` unless noted):
# host port answers is_local debian_version(or empty) binary_present root manager.
svc_postgres_actions() {
  local host="$1" port="$2" answers="$3" is_local="$4" version="$5" binary="$6" root="$7" manager="$8"
  if [[ "$answers" == yes ]]; then
    svc_say "PostgreSQL answers at $host:$port"
    svc_pg_check_login "$host" "$port"
    return
  fi
  if [[ "$is_local" != yes ]]; then
    svc_err "PostgreSQL at $host:$port does not answer, and it is not local; start it or fix CONVEYOR_DATABASE_URL"
    return 1
  fi
  if [[ -n "$version" ]]; then
    svc_say "Starting PostgreSQL $version..."
    if ! svc_do pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
      svc_err "pg_ctlcluster could not start PostgreSQL $version main (it needs root: sudo pg_ctlcluster $version main start)"
      return 1
    fi
    svc_record "postgresql $version main"
    svc_wait_for "$host" "$port" PostgreSQL 30 || return 1
    svc_pg_check_login "$host" "$port"
    return
  fi
  if [[ "$binary" == yes ]]; then
    svc_err "PostgreSQL is installed but does not answer at $host:$port, and it is not a Debian cluster this script can start."
    svc_err "Start it (e.g. sudo systemctl start postgresql, or brew services start postgresql@16), or fix CONVEYOR_DATABASE_URL"
    return 1
  fi
  if [[ "$root" != yes || "$manager" != apt ]]; then
    svc_err "PostgreSQL is not installed; to install it: $(svc_install_hint postgresql "$manager")"
    svc_err "Or point CONVEYOR_DATABASE_URL at a server."
    return 1
  fi
  svc_say "Installing PostgreSQL with apt..."
  svc_apt_install postgresql || return 1
  version="$(svc_pg_debian_version)"
  if svc_dry; then
    version="${version:-VERSION}"
  elif [[ -z "$version" ]]; then
    svc_err "apt installed postgresql, but there is no cluster in /etc/postgresql/*/main"
    return 1
  fi
  # This script installed the server, so it may set its authentication up.
  svc_pg_trust_local_tcp "/etc/postgresql/$version/main/pg_hba.conf" || return 1
  # apt may have started the cluster already (then a reload applies the new
  # rules); where it did not (no init system), start it.
  svc_say "Starting PostgreSQL $version..."
  if ! svc_do pg_ctlcluster "$version" main reload 2>/dev/null; then
    svc_do pg_ctlcluster --skip-systemctl-redirect "$version" main start || return 1
  fi
  svc_record "postgresql $version main"
  svc_wait_for "$host" "$port" PostgreSQL 30 || return 1
  svc_pg_check_login "$host" "$port"
}

# What to do about RabbitMQ, given the facts:
# host port answers is_local installed root manager.
svc_rabbitmq_actions() {
  local host="$1" port="$2" answers="$3" is_local="$4" installed="$5" root="$6" manager="$7"
  if [[ "$answers" == yes ]]; then
    svc_say "RabbitMQ answers at $host:$port"
    return 0
  fi
  if [[ "$is_local" != yes ]]; then
    svc_err "RabbitMQ at $host:$port does not answer, and it is not local; start it or fix CONVEYOR_AMQP_URL"
    return 1
  fi
  if [[ "$installed" != yes ]]; then
    if [[ "$root" != yes || "$manager" != apt ]]; then
      svc_err "RabbitMQ is not installed; to install it: $(svc_install_hint rabbitmq "$manager")"
      svc_err "Or point CONVEYOR_AMQP_URL at a broker."
      return 1
    fi
    svc_say "Installing RabbitMQ with apt..."
    svc_apt_install rabbitmq-server || return 1
    # Installed by this run, so stopped with it, whether apt started it or we do.
    svc_record "rabbitmq"
    if ! svc_dry && svc_wait_quietly "$host" "$port" 10; then
      return 0
    fi
  fi
  svc_say "Starting RabbitMQ..."
  if ! svc_do rabbitmq-server -detached; then
    svc_err "rabbitmq-server -detached failed"
    return 1
  fi
  [[ "$installed" == yes ]] && svc_record "rabbitmq"
  svc_wait_for "$host" "$port" RabbitMQ 90
}

# A broker can answer on its port and still be unusable. On RabbitMQ 3.10 the
# supervisor of the quorum queues' at-least-once dead-letter workers
# (rabbit_fifo_dlx_sup) gives up after two worker crashes within 5 s (seen when
# many such queues are deleted at once, as the tests do) and is not restarted:
# from then on every declaration of a queue with at-least-once dead-lettering,
# which Conveyor's work queues and inboxes all are, fails with `noproc`, and the
# ingress answers 503. Restarting the app (stop_app; start_app) rebuilds it.
#
# The check: `rabbitmqctl eval` declares, on the local node, a quorum queue with
# the arguments platform/src/amqp/topology.rs gives a work queue (one replica,
# a scratch name), then deletes it. It prints `ok`, `{failed,Why}`, or
# `{unsupported,Why}` (a broker whose internals differ: not checked). About 1 s;
# it runs in dry-run mode too (it leaves nothing behind).
SVC_RABBITMQ_DLX_CHECK='User = <<"conveyor-ensure-services">>,
VHost = case rabbit_vhost:exists(<<"/">>) of true -> <<"/">>; false -> hd(rabbit_vhost:list_names()) end,
Name = iolist_to_binary(io_lib:format("conveyor.ensure-services.check.~b.~b",
                                      [erlang:system_time(millisecond), erlang:unique_integer([positive])])),
QName = rabbit_misc:r(VHost, queue, Name),
Args = [{<<"x-queue-type">>, longstr, <<"quorum">>},
        {<<"x-quorum-initial-group-size">>, long, 1},
        {<<"x-delivery-limit">>, long, 1},
        {<<"x-dead-letter-exchange">>, longstr, <<>>},
        {<<"x-dead-letter-routing-key">>, longstr, <<Name/binary, ".dlq">>},
        {<<"x-dead-letter-strategy">>, longstr, <<"at-least-once">>},
        {<<"x-overflow">>, longstr, <<"reject-publish">>}],
Result = try rabbit_amqqueue:declare(QName, true, false, Args, none, User) of
           {new, _} -> ok;
           {new, _, _} -> ok;
           Other -> {failed, Other}
         catch
           error:undef:Stack -> {unsupported, {undef, hd(Stack)}};
           Class:Why -> {failed, {Class, Why}}
         end,
_ = case catch rabbit_amqqueue:lookup(QName) of
      {ok, Q} -> catch rabbit_amqqueue:delete(Q, false, false, User);
      _ -> ok
    end,
Result.'

# Runs the check once. Returns 0 (it works), 1 (it does not, or took over 60
# s: svc_dlx_why says why) or 2 (not checked: svc_dlx_why says why). Only a
# `{failed,…}` answer or the timeout count as broken, never a CLI that cannot
# reach the node or prints something unexpected.
svc_rabbitmq_dlx_check() {
  local out errors rc=0
  errors="$(mktemp)"
  out="$(timeout 60 rabbitmqctl -q eval "$SVC_RABBITMQ_DLX_CHECK" 2>"$errors")" || rc=$?
  out="$(tr -s ' \t\n' ' ' <<<"$out")"; out="${out# }"; out="${out% }"
  svc_dlx_why="$out"
  ((${#out} <= 160)) || svc_dlx_why="${out:0:160}…"
  if [[ -z "$out" || $rc != 0 ]]; then
    svc_dlx_why="$(tr -s ' \t\n' ' ' <"$errors")"; svc_dlx_why="${svc_dlx_why% }"
    svc_dlx_why="${svc_dlx_why:0:160}"
    svc_dlx_why="${svc_dlx_why:-exit status $rc}"
  fi
  rm -f "$errors"
  if [[ $rc == 124 ]]; then
    svc_dlx_why="the declaration did not finish within 60 s"
    return 1
  elif [[ $rc == 0 && "$out" == ok ]]; then
    return 0
  elif [[ $rc == 0 && "$out" == "{failed,"* ]]; then
    return 1
  fi
  return 2
}

# After RabbitMQ answered at host:port: makes sure it can declare what Conveyor
# declares (see SVC_RABBITMQ_DLX_CHECK), restarting the app of a local node
# that cannot. A remote broker, or one the local rabbitmqctl cannot
# administer, is not checked (one line says so).
svc_rabbitmq_ensure_dlx() { # host port is_local
  local host="$1" port="$2" is_local="$3" what="a quorum queue with at-least-once dead-lettering" status
  if [[ "$is_local" != yes ]]; then
    svc_say "RabbitMQ at $host:$port is not local: not checking that it can declare $what"
    return 0
  fi
  if ! command -v rabbitmqctl >/dev/null 2>&1; then
    svc_say "RabbitMQ: no rabbitmqctl here, so not checking that it can declare $what"
    return 0
  fi
  status=0; svc_rabbitmq_dlx_check || status=$?
  case $status in
    0) svc_say "RabbitMQ declares $what"; return 0 ;;
    2) svc_say "RabbitMQ: not checking that it can declare $what (rabbitmqctl eval: $svc_dlx_why)"; return 0 ;;
  esac
  svc_err "RabbitMQ at $host:$port answers but cannot declare $what: $svc_dlx_why"
  svc_say "Restarting RabbitMQ's app (rabbitmqctl stop_app, start_app)..."
  if ! svc_do rabbitmqctl stop_app || ! svc_do rabbitmqctl start_app; then
    svc_err "rabbitmqctl could not restart RabbitMQ's app; restart the broker by hand (e.g. sudo systemctl restart rabbitmq-server)"
    return 1
  fi
  svc_wait_for "$host" "$port" RabbitMQ 60 || return 1
  if svc_dry; then
    echo "would check again that RabbitMQ can declare $what"
    return 0
  fi
  status=0; svc_rabbitmq_dlx_check || status=$?
  case $status in
    0) svc_say "RabbitMQ declares $what again" ;;
    1) svc_err "RabbitMQ at $host:$port still cannot declare $what after an app restart ($svc_dlx_why); restart the broker (sudo systemctl restart rabbitmq-server) and read its log in /var/log/rabbitmq/"
       return 1 ;;
    2) svc_say "RabbitMQ's app restarted, but not checked again (rabbitmqctl eval: $svc_dlx_why)" ;;
  esac
}

svc_wait_quietly() { # host port seconds: true once it answers
  local _
  for _ in $(seq 1 "$3"); do
    svc_answers "$1" "$2" && return 0
    sleep 1
  done
  return 1
}

# Makes sure both servers answer at the URLs (CONVEYOR_DATABASE_URL, CONVEYOR_AMQP_URL).
svc_ensure_all() {
  local db_url="${CONVEYOR_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/conveyor}"
  local amqp_url="${CONVEYOR_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  local host port answers is_local root manager
  root="$(svc_root)"
  manager="$(svc_package_manager)"

  read -r host port <<<"$(svc_hostport "$db_url" 5432)"
  answers=no; svc_answers "$host" "$port" && answers=yes
  is_local=no; svc_is_local "$host" && is_local=yes
  svc_postgres_actions "$host" "$port" "$answers" "$is_local" \
    "$(svc_pg_debian_version)" "$(svc_pg_binary_present)" "$root" "$manager" || return 1

  read -r host port <<<"$(svc_hostport "$amqp_url" 5672)"
  answers=no; svc_answers "$host" "$port" && answers=yes
  is_local=no; svc_is_local "$host" && is_local=yes
  svc_rabbitmq_actions "$host" "$port" "$answers" "$is_local" \
    "$(svc_rabbitmq_present)" "$root" "$manager" || return 1
  # A broker this run started is fresh; one that was running may have decayed.
  if [[ "$answers" == yes ]]; then
    svc_rabbitmq_ensure_dlx "$host" "$port" "$is_local"
  fi
}

# Stops the servers recorded in `file`, newest first; never anything else.
svc_stop_recorded() { # file
  local file="$1" line status=0
  [[ -s "$file" ]] || return 0
  local -a lines=()
  mapfile -t lines <"$file"
  local i
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    line="${lines[$i]}"
    case "$line" in
      "postgresql "*)
        local version cluster
        read -r _ version cluster <<<"$line"
        svc_say "Stopping PostgreSQL $version $cluster (started by this run)..."
        svc_do pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" stop -m fast || status=1
        ;;
      rabbitmq)
        svc_say "Stopping RabbitMQ (started by this run)..."
        svc_do rabbitmqctl shutdown || status=1
        ;;
      "") ;;
      *)
        svc_err "unknown entry in $file: $line"
        status=1
        ;;
    esac
  done
  return "$status"
}
