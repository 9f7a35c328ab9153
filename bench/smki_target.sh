#!/bin/bash
# smki_target.sh load|start [nocpm|python]|stop [nocpm|python] — smki-repository as a candidate of the shared benchmark
# harness (../../shared/bench); called by bench/smki-target.json. Serves HTTP and LDAP.
#
# The harness runs this with its bench folder as working directory and sets BENCH, BENCH_WORK,
# DATA, SERVER_CPU, HTTP_PORT, RUN_DIR, TARGET_DIR. Everything of ours lives in
# $BENCH_WORK/smki-repository:
#   data/            --data-dir: data/pgdata is the embedded PostgreSQL (started by our process)
#   server.pid       pid of `smki-repository serve` (the harness pins its tree and reads its CPU)
#   server.log       its stdout/stderr;  import.log: the last import's output
#
# SMKI_BIN: the smki-repository executable. Default: $RUN_DIR/.venv/bin/smki-repository if it
# exists, else smki-repository on PATH.
# SMKI_CONFIG: the TOML settings (default: bench.toml next to this script).
# SMKI_READY_TIMEOUT: seconds to wait for readiness (default 1800).
#
# Variant `before` (load before | start before | stop before, bench/compare-target.json): an
# earlier version of the server, SMKI_BEFORE_BIN (e.g. a `git worktree` of an older commit with
# its own venv), with its own data in $BENCH_WORK/smki-before and bench-before.toml (or
# SMKI_BEFORE_CONFIG: that version's own bench.toml when it is a replica version), measured
# side by side with the current one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${BENCH_WORK:=/tmp/smki-bench}"
: "${DATA:=$BENCH_WORK/data}"
: "${SERVER_CPU:=0}"
: "${HTTP_PORT:=8083}"
: "${LDAP_PORT:=3890}"
: "${BENCH:=$HERE/../../shared/bench}"
VARIANT=${2:-}
BIN=${SMKI_BIN:-}
if [ "$VARIANT" = before ]; then
  BIN=${SMKI_BEFORE_BIN:?set SMKI_BEFORE_BIN to the earlier version\'s smki-repository}
fi
if [ -z "$BIN" ]; then
  if [ -n "${RUN_DIR:-}" ] && [ -x "$RUN_DIR/.venv/bin/smki-repository" ]; then
    BIN=$RUN_DIR/.venv/bin/smki-repository
  else
    BIN=smki-repository
  fi
fi
CONFIG=${SMKI_CONFIG:-$HERE/bench.toml}
W=$BENCH_WORK/smki-repository
if [ "$VARIANT" = before ]; then
  CONFIG=${SMKI_BEFORE_CONFIG:-$HERE/bench-before.toml}  # the earlier version's own settings
  W=$BENCH_WORK/smki-before
fi
DATA_DIR=$W/data
# `start nocpm` / `stop nocpm`: a second server on the same data (its own port, pid file and
# log: the harness keeps every target running for the whole run).
PIDFILE=$W/server${VARIANT:+-$VARIANT}.pid
LOG=$W/server${VARIANT:+-$VARIANT}.log
READY_TIMEOUT=${SMKI_READY_TIMEOUT:-1800}
# The server reads every SMKI_<SECTION>__<KEY> variable as a setting and refuses unknown ones
# ("configuration error: bin: unknown setting"): drop them all (ours included) before running it.
for v in $(compgen -e | grep '^SMKI_' || true); do unset "$v"; done
export SMKI_LOG__ACCESS_LOG=false PYTHONUNBUFFERED=1
# The API key the targets file gives the harness (web service and certificate downloads).
BENCH_API_KEY=bench-api-key-2026

stop_postgres() {  # a PostgreSQL left running in our data dir (by a crashed run): stop it by pid
  local pm=$DATA_DIR/pgdata/postmaster.pid pid
  [ -s "$pm" ] || return 0
  pid=$(head -n1 "$pm")
  kill -0 "$pid" 2>/dev/null || return 0
  echo "stopping a PostgreSQL left running in $DATA_DIR/pgdata (pid $pid)"
  kill -INT "$pid"  # fast shutdown
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  echo "PostgreSQL $pid did not stop" >&2; return 1
}

case "${1:-}" in
  load)
    command -v "$BIN" >/dev/null || { echo "SMKI_BIN=$BIN: not found" >&2; exit 1; }
    "$BENCH/stop_pid.sh" "$PIDFILE" >/dev/null 2>&1
    stop_postgres
    rm -rf "$DATA_DIR"
    mkdir -p "$W"
    # the bulk load: a fresh data dir, its own embedded PostgreSQL (initdb'd here, stopped at the end)
    set +e
    "$BIN" import "$DATA" --allow-unverified-issuer --config "$CONFIG" --data-dir "$DATA_DIR" \
      </dev/null >"$W/import.log" 2>&1
    rc=$?
    set -e
    grep -v -e '^skipped ' -e '^import: ' "$W/import.log" | tail -n 20
    if [ $rc -ne 0 ]; then
      echo "import failed (rc=$rc); full output: $W/import.log" >&2
      exit $rc
    fi
    "$BIN" users add bench --api-key "$BENCH_API_KEY" --config "$CONFIG" --data-dir "$DATA_DIR" \
      </dev/null >"$W/users.log" 2>&1 || { cat "$W/users.log" >&2; exit 1; }
    if [ "$VARIANT" != before ]; then
      # the node's read replica, built now rather than at the first start (timed here)
      "$BIN" replica rebuild --config "$CONFIG" --data-dir "$DATA_DIR" </dev/null \
        >"$W/replica.log" 2>&1 || { tail -n 20 "$W/replica.log" >&2; exit 1; }
      tail -n 1 "$W/replica.log"
    fi
    echo "user bench added with the targets file's API key"
    ;;
  start)
    [ -d "$DATA_DIR/pgdata" ] || { echo "no data in $DATA_DIR: run the load first" >&2; exit 1; }
    "$BENCH/stop_pid.sh" "$PIDFILE" >/dev/null 2>&1
    rm -f "$PIDFILE"
    # `start nocpm`: the same server with CPM 8 / demand counting off (its cost, side by side)
    if [ "$VARIANT" = nocpm ]; then export SMKI_SERVICE_LEVELS__ENABLED=false; fi
    # `start python` (bench/hot-target.json): the LDAP short way's inner loops in Python
    if [ "$VARIANT" = python ]; then export SMKI_LDAP__COMPILED=false; fi
    # pinned: the embedded PostgreSQL started by the server inherits the pinning
    (taskset -c "$SERVER_CPU" "$BIN" serve --config "$CONFIG" --data-dir "$DATA_DIR" \
       --http "127.0.0.1:$HTTP_PORT" --https '' --lodge '' --ldap "127.0.0.1:$LDAP_PORT" --ldaps '' \
       --pid-file "$PIDFILE" </dev/null >"$LOG" 2>&1 &)
    "$BENCH/wait_port.sh" "$HTTP_PORT" "$LDAP_PORT" || { tail -n 30 "$LOG" >&2; exit 1; }
    expect=$(($(wc -l <"$DATA/manifest.csv") - 1))
    python3 "$HERE/wait_ready.py" --port "$HTTP_PORT" --expect "$expect" --log "$LOG" \
      --pidfile "$PIDFILE" --timeout "$READY_TIMEOUT"
    ;;
  stop)
    "$BENCH/stop_pid.sh" "$PIDFILE"
    ;;
  *)
    echo "usage: $0 load|start|stop" >&2; exit 2 ;;
esac
