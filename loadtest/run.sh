#!/bin/sh
# Run one load profile headless with HTML and CSV reports and the verdict's own CSV and JUnit XML.
#   loadtest/run.sh day --host http://127.0.0.1:8083 --api-key KEY --operator-key KEY [locust options…]
# Reports go to ${LOADTEST_OUT:-loadtest/results}/<profile>-<UTC time>{.html,_stats.csv,
# _verdict.csv,_verdict.xml,…}.
# The exit status is the verdict's: 0 pass, 1 below the minimum (or the target with
# --fail-below-target), 2 usage or configuration error, 3 the load itself broke.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
if [ $# -lt 1 ]; then
  echo "usage: loadtest/run.sh PROFILE (day|peak|spike|soak|FILE.toml) [locust options]" >&2
  exit 2
fi
profile=$1
shift
case $profile in
  *.toml) file=$profile; name=$(basename "$profile" .toml) ;;
  *) file=$root/conf/loadtest/$profile.toml; name=$profile ;;
esac
if [ ! -f "$file" ]; then
  echo "loadtest/run.sh: no profile $file" >&2
  exit 2
fi
out=${LOADTEST_OUT:-$root/loadtest/results}
mkdir -p "$out"
stamp=$name-$(date -u +%Y%m%dT%H%M%SZ)
locust=${LOCUST:-locust}
exec "$locust" -f "$here/locustfile.py" --headless --load-profile "$file" \
  --html "$out/$stamp.html" --csv "$out/$stamp" --only-summary "$@"
