#!/usr/bin/env bash
# Install (Debian) and start a throw-away PostgreSQL server on 127.0.0.1 for the many-worker
# tuning tests, then export METAFIT_TEST_POSTGRES_URL. Source it (". .ci/postgres.sh", as
# .ci/run does) to get the variable in the calling shell, or run it to print the URL.
#
#   METAFIT_TEST_POSTGRES_URL  already set: nothing to do (an external server is used)
#   METAFIT_PG_PORT            port to listen on (default 54329; the next free one is taken)
#
# The server runs from a temporary data directory as the "postgres" user (initdb refuses
# root) with password authentication on TCP; stop it with the printed pg_ctl command.

_metafit_pg_main() {
  if [ -n "${METAFIT_TEST_POSTGRES_URL:-}" ]; then
    echo "postgres.sh: using METAFIT_TEST_POSTGRES_URL from the environment"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo="sudo"
  fi

  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "postgres.sh: installing the Debian package postgresql"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
      || return 1
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi

  local port="${METAFIT_PG_PORT:-54329}"
  local tries=0
  while (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    port=$((port + 1))
    tries=$((tries + 1))
    if [ "$tries" -gt 20 ]; then
      echo "postgres.sh: no free port from ${METAFIT_PG_PORT:-54329}" >&2
      return 1
    fi
  done

  local dir run_as=()
  dir=$(mktemp -d /tmp/metafit-pg.XXXXXX)
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$dir"
    run_as=(runuser -u postgres --)
  fi
  printf '%s\n' postgres > "$dir/pw" && chmod 644 "$dir/pw"
  (
    cd / &&
    "${run_as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pw" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 &&
    "${run_as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200" start \
      >/dev/null
  ) || {
    echo "postgres.sh: could not start PostgreSQL; see $dir/initdb.log and $dir/server.log" >&2
    tail -n 20 "$dir/initdb.log" "$dir/server.log" >&2 2>/dev/null || true
    return 1
  }
  (
    cd / &&
    "${run_as[@]}" "$bin/psql" -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres \
      -d postgres -c "CREATE USER metafit PASSWORD 'metafit'" \
      -c "CREATE DATABASE metafit OWNER metafit" >/dev/null
  ) || { echo "postgres.sh: could not create the metafit user and database" >&2; return 1; }

  export METAFIT_TEST_POSTGRES_URL="postgresql://metafit:metafit@127.0.0.1:$port/metafit"
  export METAFIT_PG_DATA="$dir/data"
  echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on" \
    "127.0.0.1:$port"
  echo "export METAFIT_TEST_POSTGRES_URL=$METAFIT_TEST_POSTGRES_URL"
  echo "postgres.sh: stop with: ${run_as[*]} $bin/pg_ctl -D $dir/data stop"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  _metafit_pg_main
else
  _metafit_pg_main
fi
