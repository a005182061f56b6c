#!/usr/bin/env bash
# `pip install` that a person can follow: one numbered line per package pip fetches (with its
# download size), then the time it took; on failure, the end of pip's own log.
#   tools/pip_install.sh PYTHON [pip install args...]
set -uo pipefail
py=$1; shift
log=$(mktemp)
start=$SECONDS
"$py" -m pip install --progress-bar off "$@" 2>&1 | tee "$log" | awk '
  /^Collecting / { n++; printf "  [%3d] %s\n", n, $2; fflush() }
  /^Processing .*\.whl/ { n++; f = $2; sub(/.*\//, "", f); sub(/-py[23].*|-cp[0-9].*/, "", f); printf "  [%3d] %s (local wheel)\n", n, f; fflush() }
  /^ *Downloading / && match($0, /\(([0-9.]+ [kMG]B)\)/) { printf "        download %s\n", substr($0, RSTART + 1, RLENGTH - 2); fflush() }
  /^Installing collected packages/ { print "  installing (unpacking wheels; the largest, TensorFlow, takes a while)..."; fflush() }
'
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "pip failed (exit $rc); the end of its log:" >&2
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -25 >&2
else
  echo "  done in $((SECONDS - start)) s"
fi
rm -f "$log"
exit "$rc"
