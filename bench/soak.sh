#!/usr/bin/env bash
# The soak (issue 26): Herald for DURATION minutes (default 60) under a newsroom's day, with a
# SIGHUP reload every five minutes and one restart halfway. Writes bench/soak.jsonl (a line of
# figures every 10 s, then the final count of lost stories) and bench/soak.svg (memory, latency,
# throughput over time); docs/benchmarks.md shows both ("Soak"). CI does not run it.
#
#   bash bench/soak.sh            # 60 minutes
#   bash bench/soak.sh 5          # a 5-minute look
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-60}
PORT=${PORT:-19883}
HTTP=$((PORT + 1))
IDLE=${IDLE:-10000}
CHURN=${CHURN:-1000}

cargo build --release --bin herald --bin herald-loadgen
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/herald.toml" <<TOML
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$PORT"
[storage]
path = "$work/data"
[http]
bind = "127.0.0.1:$HTTP"
max_connections = 1024
[log]
level = "warn"
TOML

start() {
  taskset -c 0 target/release/herald --config "$work/herald.toml" >> "$work/broker.log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 6000); do
    if (exec 3<>/dev/tcp/127.0.0.1/$HTTP) 2>/dev/null; then break; fi
    sleep 0.01
  done
  echo "$BROKER_PID" > "$work/pid"
}
event() { echo "$1" >> "$work/events"; echo "$(date -u +%T) $1" >&2; }

touch "$work/events"
start
secs=$((MINUTES * 60))
taskset -c 1 target/release/herald-loadgen soak --port "$PORT" --http-port "$HTTP" --duration "$secs" \
  --idle "$IDLE" --churn "$CHURN" --pid-file "$work/pid" --events "$work/events" --out bench/soak.jsonl \
  > "$work/final" 2> "$work/gen.log" &
gen=$!
t0=$(date +%s)
restarted=0
next_hup=300
while kill -0 "$gen" 2>/dev/null; do
  sleep 1
  now=$(( $(date +%s) - t0 ))
  if [ "$restarted" = 0 ] && [ "$now" -ge $((secs / 2)) ]; then
    event "restart"
    kill -TERM "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
    start
    restarted=1
  fi
  if [ "$now" -ge "$next_hup" ] && [ "$now" -lt "$secs" ]; then
    event "sighup"
    kill -HUP "$BROKER_PID"
    next_hup=$((next_hup + 300))
  fi
done
wait "$gen" || { echo "the generator failed:" >&2; tail -20 "$work/gen.log" >&2; exit 1; }
cat "$work/final"
echo "broker log lines: $(wc -l < "$work/broker.log")" >&2
grep -i "panic\|error" "$work/broker.log" | head -5 >&2 || true
kill -TERM "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true
python3 bench/soak_plot.py bench/soak.jsonl bench/soak.svg
python3 bench/report.py bench/results.jsonl > docs/benchmarks.md
echo "wrote bench/soak.jsonl, bench/soak.svg, docs/benchmarks.md" >&2
