#!/usr/bin/env bash
# Run every test that draws fresh noise, masks or keys (marker `statistical`) N times in a row
# (default 200), each time with fresh randomness, and report passes, failures and the time.
# Their bounds are meant to fail less than once in a million runs: N runs without a failure is
# the check that no bound is off by orders of magnitude (issue 16).
#   scripts/repeat_statistical.sh            # 200 runs
#   scripts/repeat_statistical.sh 20 -n 2    # 20 runs on two workers (pytest-xdist)
set -uo pipefail
cd "$(dirname "$0")/.."
N="${1:-200}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
start=$(date +%s)
"$PY" -m pytest tests/unit tests/inprocess -m statistical --repeat-statistical "$N" -q -p no:cacheprovider \
    -o console_output_style=count -rf "$@" | tail -n 30
rc=${PIPESTATUS[0]}
echo "repeat_statistical: $N runs of every statistical test, exit $rc, $(( $(date +%s) - start )) s"
exit "$rc"
