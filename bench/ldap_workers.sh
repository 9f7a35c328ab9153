#!/bin/bash
# ldap_workers.sh: LDAP searches per second with 1 and with 2 server processes sharing the
# LDAP port (listeners.reuse_port: SO_REUSEPORT, the kernel spreads connections), on this
# 2-core machine, the load generator unpinned (it shares the cores), plus slapd with its 16
# threads unpinned in the same run for reference.
#
#   SMKI_BIN=.venv/bin/smki-repository bench/ldap_workers.sh
#
# Uses the harness's loaded data (run ../shared/bench/run_anchors.sh with
# CANDIDATE=bench/smki-target.json once first): our data dir $BENCH_WORK/smki-repository/data
# and slapd's database. Each process has its own response cache, so every process set is
# first walked once over all 200,000 device searches (WARM seconds) before measuring.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${BENCH_WORK:=/tmp/smki-bench}"
: "${BENCH:=$HERE/../../shared/bench}"
: "${REPS:=3}" "${DURATION:=10}" "${WARM:=45}" "${CONNS:=64}"
BIN=${SMKI_BIN:-$HERE/../.venv/bin/smki-repository}
PY=${BENCH_PY:-/tmp/benchvenv/bin/python}
DATA_DIR=$BENCH_WORK/smki-repository/data
W=$BENCH_WORK/smki-workers
mkdir -p "$W"
for v in $(compgen -e | grep '^SMKI_' || true); do unset "$v"; done
export SMKI_LOG__ACCESS_LOG=false SMKI_LISTENERS__REUSE_PORT=true PYTHONUNBUFFERED=1
LDAP_PORT=3897 HTTP_PORT=8087
OUT=$W/results.md

load() {  # load NAME PORT WORKLOAD -> one JSON line (slapd: the harness's own spelling)
  local spelling=()
  [ "$1" = slapd ] || spelling=(--targets "$HERE/smki-target.json" --target "$1")
  "$PY" "$BENCH/ldapload.py" "${spelling[@]}" --port "$2" --workload "$3" -c "$CONNS" \
    -t "$DURATION" -w 3 2>/dev/null | tail -n 1
}

row() {  # row LABEL JSON
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
lat = r["lat_us"]
print(f"| {sys.argv[1]} | {r['label']} | {r['ops_per_s']:,.0f} | {lat['p50']:,.0f} | "
      f"{lat['p99']:,.0f} | {sum(r['errors'].values())} |")
PY
}

start_ours() {  # start_ours N
  for i in $(seq "$1"); do
    ("$BIN" serve --config "$HERE/bench.toml" --data-dir "$DATA_DIR" --http "127.0.0.1:$HTTP_PORT" \
       --ldap "127.0.0.1:$LDAP_PORT" --https '' --lodge '' --ldaps '' --pid-file "$W/w$i.pid" \
       </dev/null >"$W/w$i.log" 2>&1 &)
  done
  for i in $(seq "$1"); do
    for _ in $(seq 600); do grep -q "read replica ready" "$W/w$i.log" 2>/dev/null && break; sleep 0.5; done
  done
}

stop_ours() {
  for f in "$W"/w*.pid; do [ -f "$f" ] && "$BENCH/stop_pid.sh" "$f" >/dev/null 2>&1; rm -f "$f"; done
}
trap stop_ours EXIT

{
  echo "| server | workload | ops/s | p50 µs | p99 µs | errors |"
  echo "|---|---|---:|---:|---:|---:|"
} >"$OUT"
for n in 1 2; do
  stop_ours
  start_ours "$n"
  echo "$n process(es) up; warming their response caches for ${WARM}s" >&2
  "$PY" "$BENCH/ldapload.py" --targets "$HERE/smki-target.json" --target smki-repository \
    --port "$LDAP_PORT" --workload device -c "$CONNS" -t "$WARM" -w 0 >/dev/null 2>&1 || true
  for wl in device crl; do
    for r in $(seq "$REPS"); do
      row "smki-repository × $n" "$(load smki-repository "$LDAP_PORT" "$wl")" >>"$OUT"
    done
  done
done
stop_ours
# slapd, unpinned (all 16 threads on both cores), same load
SLAPD_PORT=3998
/usr/sbin/slapd -f "$BENCH_WORK/slapd/slapd.conf" -h "ldap://127.0.0.1:$SLAPD_PORT/" -n smki-workers-slapd
sleep 1
for wl in device crl; do
  for r in $(seq "$REPS"); do
    row "slapd (16 threads)" "$(load slapd "$SLAPD_PORT" "$wl")" >>"$OUT"
  done
done
pkill -f "smki-workers-slapd" || true
cat "$OUT"
