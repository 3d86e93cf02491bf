#!/usr/bin/env bash
# Runs the whole test suite N times in a row (default 20) while busy loops keep both cores
# loaded, and stops at the first failing run: the check that no test depends on timing it
# cannot control. Each run's output is kept in $STRESS_LOGS (default /tmp/herald-stress).
#
#   bash scripts/stress.sh 20
#   STRESS_ARGS="--test chaos -- --include-ignored" bash scripts/stress.sh 3   # one test binary
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
logs=${STRESS_LOGS:-/tmp/herald-stress}
mkdir -p "$logs"
bash scripts/install-deps.sh
# nats-server 2.15.1 from the Python package, ahead of any older one the system has.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
cargo test --release --no-run >/dev/null 2>&1 || cargo test --release --no-run
busy=()
for _ in $(seq "$(nproc)"); do
  ( while :; do :; done ) &
  busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null || true' EXIT
passed=0
for i in $(seq "$runs"); do
  started=$(date +%s)
  # shellcheck disable=SC2086 # STRESS_ARGS is a list of arguments
  if cargo test --release ${STRESS_ARGS:-} >"$logs/run-$i.log" 2>&1; then
    passed=$((passed + 1))
    tests=$(grep -E '^test result: ok' "$logs/run-$i.log" | awk '{s += $4} END {print s}')
    echo "run $i: ok ($tests tests, $(( $(date +%s) - started )) s, under load)"
  else
    echo "run $i: FAILED (log: $logs/run-$i.log)"
    grep -E '^(test .* FAILED|---- |thread .* panicked)' "$logs/run-$i.log" | head -20
    echo "$passed passed, 1 failed"
    exit 1
  fi
done
echo "$passed passed, 0 failed"
