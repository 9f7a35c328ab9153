#!/bin/bash
# bench/portal.sh: the portal's search page and certificate page under wrk, 64 connections,
# a signed-in session cookie, against a store of the shared harness's dataset (100,000
# devices, 201,005 certificates). The server is pinned to core 0 (its embedded PostgreSQL
# too), wrk to core 1; RUNS runs of DURATION per page, the median reported. Every import and
# wrk run holds /tmp/bench.lock, so it never overlaps another benchmark on this machine.
#
#   bench/portal.sh            # prints a Markdown table row per page, results in $W/results
#
# DATA: the harness dataset (default /tmp/smki-bench/data, made by ../shared/bench);
# W: our work folder (default /tmp/smki-portal-bench: data dir, logs, paths files);
# SMKI_BIN: the executable (default .venv/bin/smki-repository, else on PATH);
# PORT (8093), RUNS (5), DURATION (15s), CONNECTIONS (64), SAMPLE (2000 devices).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
DATA=${DATA:-/tmp/smki-bench/data}
W=${W:-/tmp/smki-portal-bench}
PORT=${PORT:-8093}
RUNS=${RUNS:-5}
DURATION=${DURATION:-15s}
CONNECTIONS=${CONNECTIONS:-64}
SAMPLE=${SAMPLE:-2000}
LOCK=/tmp/bench.lock
BIN=${SMKI_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x "$ROOT/.venv/bin/smki-repository" ]; then BIN=$ROOT/.venv/bin/smki-repository
  else BIN=smki-repository; fi
fi
CONFIG=$HERE/bench.toml
LUA=${LUA:-$ROOT/../shared/bench/wrk/paths.lua}
for v in $(compgen -e | grep '^SMKI_' || true); do unset "$v"; done
export PYTHONUNBUFFERED=1
mkdir -p "$W/results"
[ -f "$DATA/manifest.csv" ] || { echo "no dataset in $DATA (see ../shared/bench)" >&2; exit 1; }
[ -f "$LUA" ] || { echo "wrk script not found: $LUA" >&2; exit 1; }

if [ ! -d "$W/data/pgdata" ]; then
  echo "importing $DATA into $W/data ..."
  flock "$LOCK" "$BIN" import "$DATA" --allow-unverified-issuer --config "$CONFIG" \
    --data-dir "$W/data" </dev/null >"$W/import.log" 2>&1 || { tail "$W/import.log" >&2; exit 1; }
fi
# a portal user with a fresh temporary password, changed at sign-in below
if "$BIN" users list --config "$CONFIG" --data-dir "$W/data" | grep -q '^portal-bench '; then
  out=$("$BIN" users reset portal-bench --config "$CONFIG" --data-dir "$W/data")
else
  out=$("$BIN" users add portal-bench --no-api-key --config "$CONFIG" --data-dir "$W/data")
fi
TEMP=$(printf '%s\n' "$out" | sed -n 's/.*password.*: \([^ ]*\)$/\1/p' | tail -n1)

PIDFILE=$W/server.pid
# one session for the whole run, however long other benchmarks hold the lock between runs
export SMKI_PORTAL__SESSION_IDLE_SECONDS=86400 SMKI_PORTAL__SESSION_ABSOLUTE_SECONDS=86400
(taskset -c 0 "$BIN" serve --config "$CONFIG" --data-dir "$W/data" --http "127.0.0.1:$PORT" \
   --https '' --lodge '' --ldap '' --ldaps '' --pid-file "$PIDFILE" </dev/null >"$W/server.log" 2>&1 &)
trap '[ -s "$PIDFILE" ] && kill -INT "$(cat "$PIDFILE")" 2>/dev/null; sleep 3' EXIT
expect=$(($(wc -l <"$DATA/manifest.csv") - 1))
for _ in $(seq 100); do [ -s "$PIDFILE" ] && break; sleep 0.2; done
python3 "$HERE/wait_ready.py" --port "$PORT" --expect "$expect" --log "$W/server.log" \
  --pidfile "$PIDFILE" --timeout 600

# sign in as a browser does (form, cookie, CSRF token), then the forced password change
BASE=http://127.0.0.1:$PORT
JAR=$W/cookies.txt
rm -f "$JAR"
csrf() { sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -n1; }
token=$(curl -s -c "$JAR" -b "$JAR" "$BASE/portal/sign-in" | csrf)
curl -s -o /dev/null -c "$JAR" -b "$JAR" --data-urlencode "csrf=$token" \
  --data-urlencode "username=portal-bench" --data-urlencode "password=$TEMP" "$BASE/portal/sign-in"
NEW="bench $(date +%s) portal password"
token=$(curl -s -c "$JAR" -b "$JAR" "$BASE/portal/password" | csrf)
curl -s -o /dev/null -c "$JAR" -b "$JAR" --data-urlencode "csrf=$token" \
  --data-urlencode "current=$TEMP" --data-urlencode "new=$NEW" --data-urlencode "confirm=$NEW" \
  "$BASE/portal/password"
COOKIE=$(awk '$6 == "smki_portal" {print $7}' "$JAR")
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: smki_portal=$COOKIE" "$BASE/portal/")
[ "$code" = 200 ] || { echo "sign-in failed (GET /portal/ answered $code)" >&2; exit 1; }

# SAMPLE random devices: their EUI-64 (search) and one serial each (certificate page)
grep ',device,' "$DATA/manifest.csv" | shuf -n "$SAMPLE" --random-source=<(yes) >"$W/sample.csv"
awk -F, '{print "/portal/search?q=" $3}' "$W/sample.csv" >"$W/search.paths"
awk -F, '{print "/portal/certificates/" toupper($1)}' "$W/sample.csv" >"$W/certificate.paths"
for page in search certificate; do  # every path answers 200 before it is measured
  path=$(head -n1 "$W/$page.paths")
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: smki_portal=$COOKIE" "$BASE$path")
  [ "$code" = 200 ] || { echo "$page: $path answered $code" >&2; exit 1; }
done

# warm-up: every path once (a certificate page is decoded and its chain found on first view)
flock "$LOCK" python3 - "$PORT" "$COOKIE" "$W/search.paths" "$W/certificate.paths" <<'PY'
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
for name in sys.argv[3:]:
    for path in open(name).read().split():
        conn.request("GET", path, headers={"Cookie": "smki_portal=" + sys.argv[2]})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, (path, resp.status)
PY
for page in search certificate; do
  : >"$W/results/$page.txt"
  for run in $(seq "$RUNS"); do
    flock "$LOCK" taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --timeout 5s \
      -H "Cookie: smki_portal=$COOKIE" -s "$LUA" "$BASE" -- "$W/$page.paths" \
      | grep '^JSON ' | sed 's/^JSON //' >>"$W/results/$page.txt"
    echo "$page run $run: $(tail -n1 "$W/results/$page.txt")"
  done
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: smki_portal=$COOKIE" "$BASE/portal/")
  [ "$code" = 200 ] || { echo "the session ended during the runs ($code)" >&2; exit 1; }
  python3 - "$W/results/$page.txt" "$page" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
errors = sum(sum(r["errors"].values()) for r in runs)
rps = statistics.median(r["requests"] / (r["duration_us"] / 1e6) for r in runs)
p99 = statistics.median(r["lat_us"]["p99"] for r in runs) / 1000
p50 = statistics.median(r["lat_us"]["p50"] for r in runs) / 1000
print(f"| {sys.argv[2]} page | {rps:,.0f} req/s | p50 {p50:.1f} ms | p99 {p99:.1f} ms"
      f" | {len(runs)} runs, {errors} errors |")
EOF
done
