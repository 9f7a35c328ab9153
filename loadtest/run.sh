#!/bin/sh
# Run one load profile headless with HTML and CSV reports.
#   loadtest/run.sh day --host http://127.0.0.1:8083 --api-key KEY [--operator-key KEY] [locust options…]
# Reports go to ${LOADTEST_OUT:-loadtest/results}/<profile>-<UTC time>{.html,_stats.csv,…}.
# The exit status is the verdict's: 0 at or above the minimum, 1 below it.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
profile=${1:?usage: loadtest/run.sh PROFILE (day|peak|spike|soak|FILE.toml) [locust options]}
shift
case $profile in
  *.toml) file=$profile; name=$(basename "$profile" .toml) ;;
  *) file=$root/conf/loadtest/$profile.toml; name=$profile ;;
esac
out=${LOADTEST_OUT:-$root/loadtest/results}
mkdir -p "$out"
stamp=$name-$(date -u +%Y%m%dT%H%M%SZ)
locust=${LOCUST:-locust}
exec "$locust" -f "$here/locustfile.py" --headless --load-profile "$file" \
  --html "$out/$stamp.html" --csv "$out/$stamp" --only-summary "$@"
