#!/bin/sh
# First start: create the cluster, the node's role and database (password from POSTGRES_PASSWORD or the file named
# by POSTGRES_PASSWORD_FILE). Every start: run the server in the foreground on PGPORT (default 5432), listening on
# POSTGRES_LISTEN (default 127.0.0.1). Its socket lies in /tmp: the root file system may be read-only.
set -eu
port="${PGPORT:-5432}"
db="${POSTGRES_DB:-dicomnode}"
user="${POSTGRES_USER:-dicomnode}"
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE"); fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres: set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) for the first start" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pwfile" -E UTF8 >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "host all all ::/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp -p $port" -w start >/dev/null
  psql -v ON_ERROR_STOP=1 -q -h /tmp -p "$port" -U postgres -d postgres \
    -v user="$user" -v db="$db" -v pw="$POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
SQL
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres: created database $db for $user"
fi
exec postgres -D "$PGDATA" -p "$port" -c listen_addresses="${POSTGRES_LISTEN:-127.0.0.1}" -c unix_socket_directories=/tmp
