#!/usr/bin/env bash
# A throw-away PostgreSQL server for the store's tests.
#
#   eval "$(bash scripts/postgres.sh start)"   # exports GRAPHTUNE_TEST_POSTGRES_URL (and _PGDIR)
#   bash scripts/postgres.sh stop              # stops it and removes its data
#
# `start` installs the Debian packages if no server binaries are found (apt-get; needs
# root), initialises a cluster in a temporary directory owned by a non-root user
# (PostgreSQL refuses to run as root: the `postgres` user when we are root), starts it on
# 127.0.0.1 on a free port, creates the database `graphtune_test` and prints
# `export GRAPHTUNE_TEST_POSTGRES_URL=postgresql+psycopg://...`. With GRAPHTUNE_PG_NO_INSTALL
# set, a missing server is an error (exit 1) instead of an apt-get install. State lives in
# ${GRAPHTUNE_PG_STATE:-/tmp/graphtune-pg.state} so that `stop` finds the cluster.
set -euo pipefail
STATE=${GRAPHTUNE_PG_STATE:-/tmp/graphtune-pg.state}
DB=graphtune_test

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

install_server() {
  if [ -n "${GRAPHTUNE_PG_NO_INSTALL:-}" ]; then
    log "PostgreSQL is not installed (GRAPHTUNE_PG_NO_INSTALL is set: not installing it)"; exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "PostgreSQL is not installed and we are not root; install the 'postgresql' package"; exit 1
  fi
  log "installing PostgreSQL (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

as_user() {  # run a command as the cluster's owner
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$PGUSER_OS" -- "$@"
  else
    "$@"
  fi
}

start() {
  if [ -f "$STATE" ]; then
    # shellcheck disable=SC1090
    . "$STATE"
    if [ -n "${PGDIR:-}" ] && as_user_check "$BINDIR" "$PGDIR"; then
      echo "export GRAPHTUNE_TEST_POSTGRES_URL=$URL"
      return 0
    fi
  fi
  BINDIR=$(find_bindir) || { install_server; BINDIR=$(find_bindir); }
  if [ "$(id -u)" -eq 0 ]; then
    PGUSER_OS=postgres
    id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  else
    PGUSER_OS=$(id -un)
  fi
  PGDIR=$(mktemp -d /tmp/graphtune-pg.XXXXXX)
  chmod 700 "$PGDIR"
  [ "$(id -u)" -eq 0 ] && chown "$PGUSER_OS" "$PGDIR"
  PORT=$(free_port)
  as_user "$BINDIR/initdb" -D "$PGDIR/data" -U graphtune --auth=trust -E UTF8 --no-sync >/dev/null
  as_user "$BINDIR/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDIR -c fsync=off -c full_page_writes=off" start >/dev/null
  as_user "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U graphtune "$DB"
  URL="postgresql+psycopg://graphtune@127.0.0.1:$PORT/$DB"
  cat >"$STATE" <<EOS
BINDIR=$BINDIR
PGDIR=$PGDIR
PGUSER_OS=$PGUSER_OS
PORT=$PORT
URL=$URL
EOS
  log "started on 127.0.0.1:$PORT (data in $PGDIR)"
  echo "export GRAPHTUNE_TEST_POSTGRES_URL=$URL"
}

as_user_check() {  # is the cluster in $2 running?
  as_user "$1/pg_ctl" -D "$2/data" status >/dev/null 2>&1
}

stop() {
  [ -f "$STATE" ] || { log "not running"; return 0; }
  # shellcheck disable=SC1090
  . "$STATE"
  as_user "$BINDIR/pg_ctl" -D "$PGDIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$PGDIR" "$STATE"
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash scripts/postgres.sh start|stop" >&2; exit 2 ;;
esac
