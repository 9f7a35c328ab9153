#!/bin/bash
# bench/loadtest_capacity.sh — one node's capacity under the day profile's mix (issue 5).
#
# Starts `smki-repository demo` (DEVICES test devices, its own data dir) pinned to CPU 0, then
# runs Locust (loadtest/locustfile.py: an open model, arrivals at a set rate) pinned to CPU 1
# at increasing offered rates (requests/s), LEVEL_SECONDS each, in the day profile's mix of
# web service and downloads (60 : 30; the lodger is left out: it writes). For each level it
# prints the requests made and the verdict (percent within the 3 s TRT, target 99, minimum
# 96). The capacity is the highest rate whose verdict meets the target. server_cpu: the
# server process's share of its core (the embedded PostgreSQL is a separate daemon, idle
# here: everything is cached). The operator `capacity-ops` reads the test data.
#
#   bench/loadtest_capacity.sh [RATES...]        (default: 100 200 400 800 1600)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${SMKI_BIN:-$ROOT/.venv/bin/smki-repository}
PY=$(dirname "$BIN")/python
LOCUST=${LOCUST:-$(dirname "$BIN")/locust}
W=${CAPACITY_WORK:-/tmp/smki-capacity}
DEVICES=${DEVICES:-2000}
LEVEL_SECONDS=${LEVEL_SECONDS:-30}
LEVELS=${*:-100 200 400 800 1600}
OPS_KEY=capacity-ops-key-0c1d
for v in $(compgen -e | grep '^SMKI_' || true); do unset "$v"; done
mkdir -p "$W"
export SMKI_LOG__ACCESS_LOG=false PYTHONUNBUFFERED=1
taskset -c 0 "$BIN" demo --devices "$DEVICES" --data-dir "$W/data" --pid-file "$W/server.pid" \
  </dev/null >"$W/demo.log" 2>&1 &
trap '[ -s "$W/server.pid" ] && kill "$(cat "$W/server.pid")" 2>/dev/null; wait' EXIT
for _ in $(seq 600); do grep -q "demo is up" "$W/demo.log" && break; sleep 0.5; done
grep -q "demo is up" "$W/demo.log" || { tail -20 "$W/demo.log"; exit 1; }
"$BIN" users add capacity-ops --operator --api-key "$OPS_KEY" --data-dir "$W/data" >/dev/null \
  || "$BIN" users apikey capacity-ops --set "$OPS_KEY" --data-dir "$W/data" >/dev/null
echo "demo up with $DEVICES devices; levels: $LEVELS requests/s, $LEVEL_SECONDS s each"
SPID=$(cat "$W/server.pid")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime of the server (all threads)
HZ=$(getconf CLK_TCK)
"$PY" "$HERE/level_row.py" header rate
for users in $LEVELS; do
  prof=$W/level-$users.toml
  cat >"$prof" <<TOML
name = "capacity-$users"
kind = "stages"
[[stage]]
seconds = $LEVEL_SECONDS
rate = $users
[mix]
WebServiceUser = 60
DownloadUser = 30
[lodging]
per_minute = 0
TOML
  s0=$(ticks "$SPID"); t0=$(date +%s.%N)
  set +e
  taskset -c 1 "$LOCUST" -f "$ROOT/loadtest/locustfile.py" --headless --host http://127.0.0.1:8083 \
    --load-profile "$prof" --api-key u3bg9gt38htd0j2 --operator-key "$OPS_KEY" \
    --csv "$W/level-$users" --only-summary >"$W/level-$users.log" 2>&1
  rc=$?
  set -e
  s1=$(ticks "$SPID"); t1=$(date +%s.%N)
  "$PY" "$HERE/level_row.py" row "$users" "$W/level-$users" "$W/level-$users.log" "$rc" "$s0" "$s1" "$t0" "$t1" "$HZ"
done
