# A throwaway PostgreSQL for the tests (issue 14), sourced by scripts/test.
#
# TOLLGATE_TEST_DATABASE_URL set: used as is (a role that may CREATE
# DATABASE; each test makes its own database and drops it).
# Otherwise, where PostgreSQL's server binaries exist (or Debian's
# `postgresql` package can be installed), a cluster is made in a temp dir,
# run as an unprivileged user on a loopback port, and stopped on exit.
# Neither possible: the PostgreSQL tests say so loudly and skip.
#
# The cluster runs with fsync off: it is thrown away, and what the tests
# check is tollgate's logic across nodes, not PostgreSQL's durability.
# PG_DURABLE=1 keeps PostgreSQL's defaults (fsync, synchronous_commit),
# for benchmarks that compare it with SQLite's synchronous=FULL.

pg_bindir() {
  local d
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return
  fi
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/pg_ctl && -x $d/initdb ]] && { echo "$d"; return; }
  done
  return 1
}

pg_start() {
  if [[ -n ${TOLLGATE_TEST_DATABASE_URL:-} ]]; then
    echo "scripts/test: PostgreSQL from TOLLGATE_TEST_DATABASE_URL"
    return
  fi
  local bin
  if ! bin=$(pg_bindir); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      echo "scripts/test: installing Debian's postgresql (server binaries only are used)"
      export DEBIAN_FRONTEND=noninteractive
      { apt-get install -y -qq postgresql >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }; } || true
      # The package starts the system's cluster where an init runs; not ours.
      if command -v service >/dev/null; then service postgresql stop >/dev/null 2>&1 || true; fi
    fi
    bin=$(pg_bindir) || {
      echo "scripts/test: WARNING: no PostgreSQL server binaries and none can be installed; the PostgreSQL tests will SKIP" >&2
      return
    }
  fi
  PG_DIR=$(mktemp -d /tmp/tollgate-pg.XXXXXX)
  trap pg_stop EXIT
  local run=()
  if [[ $(id -u) == 0 ]]; then
    # PostgreSQL refuses to run as root.
    chown nobody "$PG_DIR"
    run=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
  fi
  PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # A password, not trust: other users of this machine can reach a
  # loopback port.
  local pw
  pw=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
  printf '%s\n' "$pw" >"$PG_DIR/pwfile"
  chmod 600 "$PG_DIR/pwfile"
  [[ $(id -u) == 0 ]] && chown nobody "$PG_DIR/pwfile"
  (cd "$PG_DIR" && "${run[@]}" "$bin/initdb" -D "$PG_DIR/data" -U tollgate -A scram-sha-256 \
    --pwfile="$PG_DIR/pwfile" -E UTF8 --no-sync >"$PG_DIR/initdb.log" 2>&1) || {
    cat "$PG_DIR/initdb.log" >&2
    echo "scripts/test: initdb failed" >&2
    exit 1
  }
  rm -f "$PG_DIR/pwfile"
  PG_RUN=("${run[@]}")
  PG_BIN=$bin
  local fast="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  [[ ${PG_DURABLE:-} == 1 ]] && fast=""
  (cd "$PG_DIR" && "${run[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -s \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_DIR $fast -c max_connections=300" start) || {
    cat "$PG_DIR/server.log" >&2
    echo "scripts/test: PostgreSQL did not start" >&2
    exit 1
  }
  export TOLLGATE_TEST_DATABASE_URL="postgres://tollgate:$pw@127.0.0.1:$PG_PORT/postgres"
  echo "scripts/test: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (data in $PG_DIR)"
}

pg_stop() {
  [[ -n ${PG_DIR:-} ]] || return 0
  if [[ -n ${PG_BIN:-} && -f $PG_DIR/data/postmaster.pid ]] &&
    ! (cd "$PG_DIR" && "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -s -w stop) >/dev/null 2>&1; then
    echo "scripts/test: PostgreSQL in $PG_DIR did not stop; left there" >&2
    PG_DIR=
    return 0
  fi
  rm -rf "$PG_DIR"
  PG_DIR=
}
