#!/usr/bin/env bash
# The MLflow tracking server a kdtune cluster shares: PostgreSQL backend store, artifacts on shared storage.
#
#   launch/mlflow-server.sh start [--host H] [--port P] [--auth] [--backend-store-uri URI]
#                                 [--artifacts-destination DIR|s3://...] [--workers N]
#   launch/mlflow-server.sh stop     # stops the server's whole process group (uvicorn + its workers)
#   launch/mlflow-server.sh status   # exit 0 when running, 3 when not
#   launch/mlflow-server.sh url      # the tracking URI to give a sweep (tracking_uri:, MLFLOW_TRACKING_URI)
#
# Settings, flags first, else the environment, else the default:
#   MLFLOW_BACKEND_STORE_URI  backend store       postgresql://kdtune@127.0.0.1:5432/mlflow
#                             put no password in it: libpq reads PGPASSWORD or ~/.pgpass
#   MLFLOW_ARTIFACTS_DESTINATION  artifact store  $KDTUNE_SHARED/mlflow-artifacts (shared by every node)
#   KDTUNE_MLFLOW_HOST        bind address        127.0.0.1 (loopback: only this machine can log; on a
#                             cluster pass the head's private address and turn auth on)
#   KDTUNE_MLFLOW_PORT        port                5000
#   KDTUNE_MLFLOW_WORKERS     server processes    2
#   KDTUNE_MLFLOW_STATE       pid, log, auth db   ~/.kdtune/mlflow-server
#   KDTUNE_MLFLOW_AUTH=1      basic auth (MLflow's `--app-name basic-auth`), which reads from the environment:
#     MLFLOW_AUTH_ADMIN_USERNAME  (default admin) and MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters): the admin
#       account created on first start; clients log in with MLFLOW_TRACKING_USERNAME/PASSWORD
#     MLFLOW_FLASK_SERVER_SECRET_KEY  (a random one per start when unset)
#     KDTUNE_MLFLOW_AUTH_DB   the users database  sqlite:///$KDTUNE_MLFLOW_STATE/basic_auth.db
#   KDTUNE_MLFLOW_JOBS=1      keep MLflow's job runner (huey consumers for GenAI jobs; kdtune needs none, so
#                             it is off unless asked: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)
#   KDTUNE_MLFLOW_ALLOWED_HOSTS  --allowed-hosts when clients use a host name (default: localhost, private IPs)
#   MLFLOW_BIN                the mlflow executable (default: `mlflow` on PATH)
#
# Credentials only ever travel in the environment: none is put on a command line (visible in `ps`), in
# the spec, in the state directory or in the log. The server runs in its own session and process group
# (setsid), recorded in $KDTUNE_MLFLOW_STATE/server.pgid; `stop` signals that group (TERM, then KILL).
set -euo pipefail

die() { echo "mlflow-server: $*" >&2; exit 2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
HOST="${KDTUNE_MLFLOW_HOST:-127.0.0.1}"
PORT="${KDTUNE_MLFLOW_PORT:-5000}"
WORKERS="${KDTUNE_MLFLOW_WORKERS:-2}"
STATE="${KDTUNE_MLFLOW_STATE:-$HOME/.kdtune/mlflow-server}"
AUTH="${KDTUNE_MLFLOW_AUTH:-0}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-postgresql://kdtune@127.0.0.1:5432/mlflow}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-${KDTUNE_SHARED:+$KDTUNE_SHARED/mlflow-artifacts}}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
START_TIMEOUT="${KDTUNE_MLFLOW_START_TIMEOUT:-90}"
if [ -z "${PYTHON:-}" ]; then  # the interpreter mlflow runs in (it has mlflow's extras), else python3
  PYTHON="$(dirname "$(command -v "$MLFLOW_BIN" || echo /nonexistent/mlflow)")/python"
  [ -x "$PYTHON" ] || PYTHON=python3
fi

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --auth) AUTH=1; shift ;;
    --no-auth) AUTH=0; shift ;;
    --backend-store-uri) BACKEND="$2"; shift 2 ;;
    --artifacts-destination) ARTIFACTS="$2"; shift 2 ;;
    --state-dir) STATE="$2"; shift 2 ;;
    *) die "unknown option $1; see the top of $0" ;;
  esac
done

PGID_FILE="$STATE/server.pgid"
LOG="$STATE/server.log"

url_host() { case "$HOST" in 0.0.0.0 | "") echo 127.0.0.1 ;; *:*) echo "[$HOST]" ;; *) echo "$HOST" ;; esac; }
URL="http://$(url_host):$PORT"

group_alive() { [ -n "${1:-}" ] && kill -0 -- "-$1" 2>/dev/null; }
current_pgid() { [ -f "$PGID_FILE" ] && cat "$PGID_FILE" || true; }

health() {
  # /health answers without credentials under basic auth too; curl is not needed
  "$PYTHON" - "$URL/health" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

start() {
  local pgid
  pgid="$(current_pgid)"
  if group_alive "$pgid"; then
    die "already running (process group $pgid, $URL); run '$0 stop' first"
  fi
  command -v "$MLFLOW_BIN" >/dev/null 2>&1 || die "$MLFLOW_BIN not found; install kdtune (it depends on mlflow) or set MLFLOW_BIN"
  case "$BACKEND" in
    postgresql* | mysql* | sqlite:*) ;;
    *) die "backend store $BACKEND: use postgresql://user@host:port/db (or sqlite:///path for one machine)" ;;
  esac
  case "$BACKEND" in
    *://*:*@*) die "the backend store URI holds a password; remove it and set PGPASSWORD (or use ~/.pgpass)" ;;
  esac
  [ -n "$ARTIFACTS" ] || die "no artifact destination: set MLFLOW_ARTIFACTS_DESTINATION or KDTUNE_SHARED (shared storage), or pass --artifacts-destination"
  case "$ARTIFACTS" in
    *://*) ;;
    *) mkdir -p "$ARTIFACTS" ;;
  esac
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  local app=()
  if [ "$AUTH" = 1 ]; then
    [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || die "basic auth needs MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters) in the environment"
    [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -ge 12 ] || die "MLFLOW_AUTH_ADMIN_PASSWORD must have 12 or more characters"
    "$PYTHON" -c "import flask_wtf" 2>/dev/null || die "basic auth needs mlflow[auth]: pip install 'mlflow[auth]>=3.17,<3.19'"
    export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      MLFLOW_FLASK_SERVER_SECRET_KEY="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    # the ini holds no secret: the admin account comes from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD
    cat >"$STATE/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${KDTUNE_MLFLOW_AUTH_DB:-sqlite:///$STATE/basic_auth.db}
admin_username = $MLFLOW_AUTH_ADMIN_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# cache a verified password for a minute: without it every request of every trial pays a PBKDF2 hash
auth_cache_ttl_seconds = ${KDTUNE_MLFLOW_AUTH_CACHE_S:-60}
INI
    export MLFLOW_AUTH_CONFIG_PATH="$STATE/basic_auth.ini"
    app=(--app-name basic-auth)
  fi
  local extra=()
  [ -n "${KDTUNE_MLFLOW_ALLOWED_HOSTS:-}" ] && extra=(--allowed-hosts "$KDTUNE_MLFLOW_ALLOWED_HOSTS")

  if [ "${KDTUNE_MLFLOW_JOBS:-0}" != 1 ]; then
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
  fi
  # The store URIs go through MLflow's own environment variables, not argv.
  export MLFLOW_BACKEND_STORE_URI="$BACKEND" MLFLOW_ARTIFACTS_DESTINATION="$ARTIFACTS"
  : >"$LOG"
  chmod 600 "$LOG"
  setsid "$MLFLOW_BIN" server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    ${app[@]+"${app[@]}"} ${extra[@]+"${extra[@]}"} </dev/null >>"$LOG" 2>&1 &
  local pid=$!
  # setsid made the server the leader of a new session and process group: its pgid is its pid
  echo "$pid" >"$PGID_FILE"
  local waited=0
  until health; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$LOG" >&2
      rm -f "$PGID_FILE"
      die "the server exited during start-up (log: $LOG)"
    fi
    if [ "$waited" -ge $((START_TIMEOUT * 2)) ]; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      rm -f "$PGID_FILE"
      die "no answer from $URL/health after ${START_TIMEOUT}s (log: $LOG)"
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "mlflow-server: running at $URL (process group $pid, backend ${BACKEND%%://*}, artifacts $ARTIFACTS, auth $([ "$AUTH" = 1 ] && echo on || echo off), log $LOG)"
}

stop() {
  local pgid
  pgid="$(current_pgid)"
  if ! group_alive "$pgid"; then
    rm -f "$PGID_FILE"
    echo "mlflow-server: not running"
    return 0
  fi
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    group_alive "$pgid" || break
    sleep 0.25
  done
  if group_alive "$pgid"; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$PGID_FILE"
  echo "mlflow-server: stopped process group $pgid"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status)
    pgid="$(current_pgid)"
    if group_alive "$pgid"; then echo "mlflow-server: running at $URL (process group $pgid)"; else echo "mlflow-server: not running"; exit 3; fi
    ;;
  url) echo "$URL" ;;
  *) die "usage: $0 start|stop|status|url [options]; see the top of the file" ;;
esac
