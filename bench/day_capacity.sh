#!/bin/bash
# bench/day_capacity.sh — one node's capacity under the forecast-derived day mix (issue 15).
#
# Starts `smki-repository demo` (DEVICES test devices, its own data dir) pinned to CPU 0 and
# gives the demo's relying party (dcc-boxed, whose key the load test sends) a forecast of
# PER_DAY requests a day split 10/5/70/15 % over the SEC time bands (UK 00-07, 07-08, 08-20,
# 20-24): at demand factor 1.0 the busiest band (08-20) is offered PER_DAY x 0.70 / 43,200 s
# requests a second. Then, for each demand factor, Locust (loadtest/locustfile.py, an open
# model: arrivals on time whether or not answers come) pinned to CPU 1 runs the shipped day
# profile (conf/loadtest/day.toml: web service, downloads and LDAP in its mix; no lodging)
# compressed into MINUTES minutes, its rates read from the server's forecasts
# (/ops/reports/demand) times --demand-factor. Each level prints the requests made, the p99,
# the client's percent within the 3 s TRT (CPM 8's target 99, minimum 96), the server's own
# CPM 8 count for the run, and the server process's CPU share. The capacity is the highest
# factor whose verdict meets the target.
#
#   bench/day_capacity.sh [FACTORS...]        (default: 1 2 4 8 16)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${SMKI_BIN:-$ROOT/.venv/bin/smki-repository}
PY=$(dirname "$BIN")/python
W=${CAPACITY_WORK:-/tmp/smki-day-capacity}
DEVICES=${DEVICES:-2000}
PER_DAY=${PER_DAY:-3085714}   # 50 requests/s in 08-20 at factor 1.0
MINUTES=${MINUTES:-2}
FACTORS=${*:-1 2 4 8 16}
OPS_KEY=capacity-ops-key-0c1d
for v in $(compgen -e | grep '^SMKI_' || true); do unset "$v"; done
rm -rf "$W"; mkdir -p "$W"
export SMKI_LOG__ACCESS_LOG=false PYTHONUNBUFFERED=1
taskset -c 0 "$BIN" demo --devices "$DEVICES" --data-dir "$W/data" --pid-file "$W/server.pid" \
  </dev/null >"$W/demo.log" 2>&1 &
trap '[ -s "$W/server.pid" ] && kill "$(cat "$W/server.pid")" 2>/dev/null; wait' EXIT
for _ in $(seq 1200); do grep -q "demo is up" "$W/demo.log" && break; sleep 0.5; done
grep -q "demo is up" "$W/demo.log" || { tail -20 "$W/demo.log"; exit 1; }
"$BIN" users add capacity-ops --operator --api-key "$OPS_KEY" --data-dir "$W/data" >/dev/null
"$BIN" users forecast dcc-boxed --per-day "$PER_DAY" --bands 10,5,70,15 --data-dir "$W/data" \
  >/dev/null
SPID=$(cat "$W/server.pid")
sed "s/^minutes = .*/minutes = $MINUTES/; s/^per_minute = .*/per_minute = 0/" \
  "$ROOT/conf/loadtest/day.toml" >"$W/day.toml"
echo "demo up with $DEVICES devices; forecast $PER_DAY requests/day (08-20 band:" \
  "$(( PER_DAY * 70 / 100 / 43200 )) requests/s at factor 1); day in $MINUTES min per level"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
"$PY" "$HERE/level_row.py" header factor
for f in $FACTORS; do
  s0=$(ticks "$SPID"); t0=$(date +%s.%N)
  set +e
  taskset -c 1 "$(dirname "$BIN")/locust" -f "$ROOT/loadtest/locustfile.py" --headless \
    --host http://127.0.0.1:8083 --load-profile "$W/day.toml" --demand-factor "$f" \
    --api-key u3bg9gt38htd0j2 --operator-key "$OPS_KEY" \
    --ldap-host ldap://127.0.0.1:3890 --ldap-user dcc-boxed \
    --csv "$W/f$f" --only-summary >"$W/f$f.log" 2>&1
  rc=$?
  set -e
  s1=$(ticks "$SPID"); t1=$(date +%s.%N)
  "$PY" "$HERE/level_row.py" row "$f" "$W/f$f" "$W/f$f.log" "$rc" "$s0" "$s1" "$t0" "$t1" "$HZ"
done
