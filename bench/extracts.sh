#!/usr/bin/env bash
# Extract production time, size and memory (BENCHMARKS.md, "Extracts").
#   bench/extracts.sh DATA [WORK]
# DATA: a directory of certificates and CRLs (the shared harness's 100,000-device dataset is
# /tmp/smki-bench/data; `smki-repository testpki --out DIR` makes one too). It is imported,
# once, into WORK's own embedded PostgreSQL (default /tmp/smki-extract-bench), so a running
# benchmark's store is never touched, and the node's read replica is built from it (as a
# server would at its first start). Then: a full extract gzip and uncompressed, and an empty
# delta, each timed with its peak RSS; the extract is read from the replica (a full extract
# read from PostgreSQL, with the replica moved aside, is timed beside them).
set -euo pipefail
DATA=${1:?usage: bench/extracts.sh DATA [WORK]}
WORK=${2:-/tmp/smki-extract-bench}
BIN=${SMKI_BIN:-$(dirname "$0")/../.venv/bin/smki-repository}
export SMKI_LISTENERS__SFTP=""
mkdir -p "$WORK"
if [ ! -f "$WORK/imported" ]; then
  /usr/bin/time -f "import: %e s" "$BIN" import "$DATA" --data-dir "$WORK" --skip-signature-check \
    > "$WORK/import.log" 2>&1 || { tail "$WORK/import.log"; exit 1; }
  grep imported "$WORK/import.log"
  touch "$WORK/imported"
fi
if [ ! -f "$WORK/replica/data.mdb" ]; then
  /usr/bin/time -f "replica build: %e s" "$BIN" replica rebuild --data-dir "$WORK" \
    > "$WORK/replica.log" 2>&1 || { tail "$WORK/replica.log"; exit 1; }
fi
run() {  # label, then the command's extra environment
  local label=$1; shift
  env "$@" /usr/bin/time -f "$label: %e s wall, %U s user CPU, peak RSS %M KB" \
    "$BIN" extract "${label%% *}" --json --data-dir "$WORK" > "$WORK/out.json"
  python3 -c "import json; d = json.load(open('$WORK/out.json')); print('  ', d['name'], d['size'], 'bytes', d['counts'], 'read from', d.get('read_from', 'postgresql'))"
}
mv "$WORK/replica" "$WORK/replica.aside"  # no replica on this node: read from PostgreSQL
trap 'mv "$WORK/replica.aside" "$WORK/replica" 2>/dev/null || true' EXIT
run "full gzip, from PostgreSQL" SMKI_EXTRACTS__COMPRESSION=gzip
mv "$WORK/replica.aside" "$WORK/replica"
run "full gzip" SMKI_EXTRACTS__COMPRESSION=gzip
run "full uncompressed" SMKI_EXTRACTS__COMPRESSION=none
run "delta (nothing new)" SMKI_EXTRACTS__COMPRESSION=gzip
