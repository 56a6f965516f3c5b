#!/usr/bin/env bash
# CI: a PostgreSQL server on loopback for tests/test_tracking_server.py (the MLflow tracking server's backend
# store). Installs Debian's `postgresql` package when it is missing (CI runs as root), starts the cluster
# listening on 127.0.0.1 only, and creates a login role that may create databases (each test makes its own).
#
#   .ci/setup-postgres.sh            # idempotent: a second run only checks
#
# Role, password, port and database come from the environment (defaults below); the tests read the same
# variables, or KDTUNE_TEST_POSTGRES_URI. Whenever PostgreSQL cannot be had (no root, no apt, no network),
# this prints why and exits 0, so the tests that need it skip with that reason instead of failing.
set -uo pipefail

PGPORT="${KDTUNE_TEST_PGPORT:-5432}"
PGROLE="${KDTUNE_TEST_PGUSER:-kdtune}"
PGPASS="${KDTUNE_TEST_PGPASSWORD:-kdtune-ci-only}"
PGDB="${KDTUNE_TEST_PGDATABASE:-kdtune_test}"

say() { echo "setup-postgres: $*"; }
give_up() { say "$* - tests that need PostgreSQL will be skipped"; exit 0; }

[ "$(id -u)" -eq 0 ] || give_up "not root: cannot install or start PostgreSQL here"

if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || give_up "PostgreSQL is not installed and there is no apt-get"
  say "installing postgresql from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || give_up "apt-get update failed"
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null || give_up "apt-get install postgresql failed"
fi

VER="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
[ -n "$VER" ] || give_up "no PostgreSQL version under /usr/lib/postgresql"
if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$VER main"; then
  say "creating cluster $VER/main"
  pg_createcluster "$VER" main --port "$PGPORT" >/dev/null || give_up "pg_createcluster $VER main failed"
fi
CONF_DIR="/etc/postgresql/$VER/main"
# loopback only, whatever the packaged default says
if ! grep -q "^listen_addresses = '127.0.0.1'" "$CONF_DIR/postgresql.conf"; then
  sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "$CONF_DIR/postgresql.conf"
  grep -q "^listen_addresses" "$CONF_DIR/postgresql.conf" || echo "listen_addresses = '127.0.0.1'" >>"$CONF_DIR/postgresql.conf"
fi
sed -i "s/^#\?port = .*/port = $PGPORT/" "$CONF_DIR/postgresql.conf"

status="$(pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $4}')"
if [ "$status" != "online" ]; then
  say "starting cluster $VER/main on 127.0.0.1:$PGPORT"
  pg_ctlcluster "$VER" main start || give_up "pg_ctlcluster $VER main start failed (see /var/log/postgresql/)"
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p "$PGPORT" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PGPORT" || give_up "the server does not answer on 127.0.0.1:$PGPORT"

psql_admin() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PGPORT" "$@"; }
# Role and password are passed as psql variables (:'pw' quotes them), never spliced into SQL by the shell.
psql_admin -v role="$PGROLE" -v pw="$PGPASS" <<'SQL' || give_up "could not create role"
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'role', :'pw') \gexec
SQL
psql_admin -v role="$PGROLE" -v db="$PGDB" <<'SQL' || give_up "could not create database"
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL

PGPASSWORD="$PGPASS" psql -X -q -h 127.0.0.1 -p "$PGPORT" -U "$PGROLE" -d "$PGDB" -c "SELECT 1" >/dev/null \
  || give_up "role $PGROLE cannot log in over TCP (check pg_hba.conf)"
say "ready: postgresql://$PGROLE@127.0.0.1:$PGPORT/$PGDB (PostgreSQL $VER)"
