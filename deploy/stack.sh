#!/usr/bin/env bash
# The multi-host stack on one machine, for trying the distributed path (README: "From one
# machine to many"):
#
#   PostgreSQL   Dagster's runs/events/schedules, the MLflow backend store, the teacher cache and
#                the promotion lock (databases dagster, mlflow, maemi)
#   Redis        the Celery broker and result backend
#   mlflow server  on PostgreSQL, serving artifacts (--serve-artifacts): workers need its URL, not a disk
#   dagster-daemon + dagster-webserver  on PostgreSQL, run queue and pools from deploy/dagster-stack.yaml
#   N celery workers  each in its own working folder, the stand-ins for N hosts
#
#   deploy/stack.sh up | down | status | env | purge
#
# Idempotent: `up` starts what is not running, `down` stops what is (by the PIDs it recorded,
# never by name). Ports and folders: deploy/stack.env. `env` prints the variables a client (a
# test, `dagster job launch`, `maemi`) needs, for `eval "$(deploy/stack.sh env)"`. `purge` is
# `down` plus deleting the stack's data (databases, artifacts, logs).
#
# The database password never goes on a command line (every user sees those in `ps`): the
# services read it from their environment (MAEMI_PG_PASSWORD, PGPASSWORD, MLflow's
# MLFLOW_BACKEND_STORE_URI) or from files of mode 0600 ($S/pg_password, initdb's --pwfile).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=deploy/stack.env
source deploy/stack.env
BIN=${MAEMI_VENV:-$ROOT/.venv}/bin
S=$MAEMI_STACK_DIR
H=$MAEMI_STACK_HOST
mkdir -p "$S/logs" "$S/pids"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
# PostgreSQL refuses to run as root: as root it runs as the `postgres` user of the Debian package,
# with its data where that user can reach (a private temp folder may be closed to it).
if [ "$(id -u)" -eq 0 ]; then
  as_pg() { runuser -u postgres -- "$@"; }
  if runuser -u postgres -- test -x "$S" 2>/dev/null; then
    PGDATA_DIR=$S/postgres
  else
    PGDATA_DIR=/var/lib/postgresql/maemi-stack-$(printf %s "$S" | sha256sum | cut -c1-12)
  fi
else
  as_pg() { "$@"; }
  PGDATA_DIR=$S/postgres
fi
PGLOG=$PGDATA_DIR/server.log

password() {
  if [ -n "${MAEMI_PG_PASSWORD:-}" ]; then printf %s "$MAEMI_PG_PASSWORD"; return; fi
  if [ ! -s "$S/pg_password" ]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$S/pg_password")
  fi
  cat "$S/pg_password"
}

client_env() {
  local pw; pw=$(password)
  cat <<EOF
export MAEMI_PG_USER=$MAEMI_PG_USER
export MAEMI_PG_PASSWORD=$pw
export MAEMI_PG_HOST=$H
export MAEMI_PG_PORT=$MAEMI_PG_PORT
export MAEMI_SHARED_DATABASE_URL=postgresql://$MAEMI_PG_USER:$pw@$H:$MAEMI_PG_PORT/maemi
export MAEMI_CELERY_BROKER=redis://$H:$MAEMI_REDIS_PORT/0
export MAEMI_CELERY_BACKEND=redis://$H:$MAEMI_REDIS_PORT/1
export MAEMI_EXECUTOR=celery
export MAEMI_CELERY_CONFIG=$MAEMI_CELERY_CONFIG
export MLFLOW_TRACKING_URI=http://$H:$MAEMI_MLFLOW_PORT
export MAEMI_ROOT=$ROOT
export DAGSTER_HOME=$S/dagster_home
export MAEMI_STACK_DIR=$S
export MAEMI_DAGSTER_URL=http://$H:$MAEMI_DAGSTER_PORT
export MAEMI_CONFIG=$(cat "$S/profile" 2>/dev/null || echo "${MAEMI_CONFIG:-configs/default.yaml}")
EOF
}

alive() { [ -s "$S/pids/$1" ] && kill -0 "$(cat "$S/pids/$1")" 2>/dev/null; }

# start NAME CMD...: a new session (process group) with its PID recorded, output to logs/NAME.log
start() {
  local name=$1; shift
  if alive "$name"; then echo "$name: running (pid $(cat "$S/pids/$name"))"; return; fi
  # MAEMI_STACK_MEMBER marks the process and everything it starts as this stack's (see leftovers)
  setsid env MAEMI_STACK_MEMBER="$S" "$@" >>"$S/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$S/pids/$name"
  echo "$name: started (pid $!)"
}

wait_port() {   # wait_port NAME PORT SECONDS
  local i
  for ((i = 0; i < $3 * 2; i++)); do
    if (exec 3<>"/dev/tcp/$H/$2") 2>/dev/null; then return 0; fi
    if [ -s "$S/pids/$1" ] && ! alive "$1"; then break; fi
    sleep 0.5
  done
  echo "$1 did not come up on $H:$2; its log: $S/logs/$1.log" >&2
  tail -20 "$S/logs/$1.log" >&2 || true
  return 1
}

up_postgres() {
  local pgbin; pgbin=$(pg_bin)
  [ -x "$pgbin/postgres" ] || { echo "PostgreSQL is not installed: run deploy/install_services.sh" >&2; exit 1; }
  if as_pg "$pgbin/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    echo "postgres: running ($PGDATA_DIR)"
  else
    if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
      if [ "$(id -u)" -eq 0 ]; then install -d -o postgres -g postgres -m 0700 "$PGDATA_DIR"; else mkdir -p "$PGDATA_DIR"; fi
      local pwfile; pwfile=$(mktemp); password > "$pwfile"
      [ "$(id -u)" -eq 0 ] && chown postgres "$pwfile"
      local rc=0     # the password file goes whether initdb succeeds or not
      as_pg "$pgbin/initdb" -D "$PGDATA_DIR" -U "$MAEMI_PG_USER" --pwfile="$pwfile" -A scram-sha-256 \
        --no-instructions >"$S/logs/initdb.log" 2>&1 || rc=$?
      rm -f "$pwfile"
      [ "$rc" -eq 0 ] || { echo "initdb failed: $S/logs/initdb.log" >&2; exit 1; }
    fi
    as_pg "$pgbin/pg_ctl" -D "$PGDATA_DIR" -l "$PGLOG" -w -t 60 \
      -o "-p $MAEMI_PG_PORT -c listen_addresses=$H -k $PGDATA_DIR -c max_connections=200" start >/dev/null
    echo "postgres: started on $H:$MAEMI_PG_PORT ($PGDATA_DIR)"
  fi
  echo "$PGDATA_DIR" > "$S/pids/postgres.datadir"
  local db
  for db in dagster mlflow maemi; do
    PGPASSWORD=$(password) psql -h "$H" -p "$MAEMI_PG_PORT" -U "$MAEMI_PG_USER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 || \
    PGPASSWORD=$(password) psql -h "$H" -p "$MAEMI_PG_PORT" -U "$MAEMI_PG_USER" -d postgres -qc "CREATE DATABASE $db"
  done
}

up_redis() {
  if alive redis; then echo "redis: running"; return; fi
  mkdir -p "$S/redis"
  redis-server --bind "$H" --port "$MAEMI_REDIS_PORT" --dir "$S/redis" --save "" --appendonly no \
    --daemonize yes --pidfile "$S/pids/redis" --logfile "$S/logs/redis.log"
  wait_port redis "$MAEMI_REDIS_PORT" 20
  echo "redis: started on $H:$MAEMI_REDIS_PORT"
}

dagster_home() {
  mkdir -p "$S/dagster_home"
  # dagster-celery writes the broker and backend URLs (with the broker's password, where a site's
  # Redis has one) into config modules under here: a folder only this user can enter.
  install -d -m 0700 "$S/dagster_home/dagster_celery"
  cp deploy/dagster-stack.yaml "$S/dagster_home/dagster.yaml"
}

up() {
  command -v redis-server >/dev/null || { echo "Redis is not installed: run deploy/install_services.sh" >&2; exit 1; }
  up_postgres
  up_redis
  dagster_home
  # The profile the stack runs (MAEMI_CONFIG at `up`); `env` hands the same one to clients.
  alive daemon || echo "${MAEMI_CONFIG:-configs/default.yaml}" > "$S/profile"
  eval "$(client_env)"
  export PATH="$BIN:$PATH"
  # The profile's workdir is the volume every worker shares (here: this machine's disk); steps check
  # the mark, so a worker that mounts something else fails clearly.
  "$BIN/maemi" workdir declare-shared >/dev/null
  # Create (or upgrade) Dagster's tables once, before several processes would race to create them.
  "$BIN/dagster" instance migrate >"$S/logs/dagster-migrate.log" 2>&1 || {
    echo "dagster instance migrate failed: $S/logs/dagster-migrate.log" >&2; tail -5 "$S/logs/dagster-migrate.log" >&2; exit 1; }
  mkdir -p "$S/mlflow-artifacts"
  # (no MLflow server jobs: their consumer pool is ten idle-polling processes per server)
  # The backend store's URL holds the password: `mlflow server` reads it from MLFLOW_BACKEND_STORE_URI
  # (the option's environment variable), set for this one command, and hands it to its workers in
  # their environment too.
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$MAEMI_PG_USER:$MAEMI_PG_PASSWORD@$H:$MAEMI_PG_PORT/mlflow" \
    start mlflow env MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$BIN/mlflow" server \
    --serve-artifacts --artifacts-destination "$S/mlflow-artifacts" --host "$H" --port "$MAEMI_MLFLOW_PORT" --workers 1
  local i
  for ((i = 1; i <= MAEMI_CELERY_WORKERS; i++)); do
    mkdir -p "$S/worker$i"
    # One step at a time per worker; each is a separate "host" with its own working folder.
    start "worker$i" bash -c "cd '$S/worker$i' && exec '$BIN/dagster-celery' worker start -A dagster_celery.app \
      -y '$MAEMI_CELERY_CONFIG' --name worker$i -- --concurrency 1 --without-mingle --without-gossip"
  done
  start daemon "$BIN/dagster-daemon" run -w "$ROOT/workspace.yaml"
  start webserver "$BIN/dagster-webserver" -w "$ROOT/workspace.yaml" -h "$H" -p "$MAEMI_DAGSTER_PORT"
  wait_port mlflow "$MAEMI_MLFLOW_PORT" 120
  wait_port webserver "$MAEMI_DAGSTER_PORT" 180
  echo "stack up: Dagster http://$H:$MAEMI_DAGSTER_PORT, MLflow http://$H:$MAEMI_MLFLOW_PORT (folders under $S)"
}

stop_group() {   # stop_group NAME: TERM the process group, KILL what is left after 20 s
  local name=$1 pid i
  [ -s "$S/pids/$name" ] || return 0
  pid=$(cat "$S/pids/$name")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name: stopped"
  fi
  rm -f "$S/pids/$name"
}

leftovers() {   # PIDs of live processes that a `start` of this stack began, in any process group
  local p
  for p in /proc/[0-9]*; do
    { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qxF "MAEMI_STACK_MEMBER=$S" && echo "${p#/proc/}"
  done
  return 0
}

down() {
  local name
  for name in webserver daemon mlflow $(cd "$S/pids" && ls -d worker* 2>/dev/null); do stop_group "$name"; done
  if alive redis; then
    local rpid; rpid=$(cat "$S/pids/redis")   # redis removes its pidfile as it shuts down: wait on the PID
    kill -TERM "$rpid"
    for _ in $(seq 80); do kill -0 "$rpid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$rpid" 2>/dev/null && kill -KILL "$rpid"
    echo "redis: stopped"
  fi
  rm -f "$S/pids/redis"
  local data; data=$(cat "$S/pids/postgres.datadir" 2>/dev/null || echo "$PGDATA_DIR")
  if as_pg "$(pg_bin)/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_pg "$(pg_bin)/pg_ctl" -D "$data" -m fast -w stop >/dev/null && echo "postgres: stopped"
  fi
  # Processes that left their group (Dagster's code servers run in sessions of their own) end by
  # their heartbeat once the daemon is gone; wait for them, then stop what is left by PID.
  local left i
  for ((i = 0; i < 60; i++)); do
    left=$(leftovers)
    [ -z "$left" ] && return 0
    sleep 0.5
  done
  echo "stopping leftover processes of the stack: $left"
  kill -KILL $left 2>/dev/null || true
}

status() {
  local name rc=0
  for name in mlflow daemon webserver $(cd "$S/pids" && ls -d worker* 2>/dev/null) redis; do
    if alive "$name"; then echo "$name: running (pid $(cat "$S/pids/$name"))"; else echo "$name: stopped"; rc=1; fi
  done
  if as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then echo "postgres: running"; else echo "postgres: stopped"; rc=1; fi
  return $rc
}

purge() {   # down, then delete every data folder of the stack (databases, artifacts, logs)
  down
  local data; data=$(cat "$S/pids/postgres.datadir" 2>/dev/null || echo "$PGDATA_DIR")
  case "$data" in
    "$S"/*|/var/lib/postgresql/maemi-stack-*) rm -rf "$data" ;;
  esac
  rm -rf "$S"
  echo "purged $S"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  purge) purge ;;
  status) status ;;
  env) client_env ;;
  *) echo "usage: $0 up|down|status|env|purge" >&2; exit 2 ;;
esac
