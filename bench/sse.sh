#!/usr/bin/env bash
# Server-Sent Events fan-out against MQTT fan-out on the same Herald: 1,000 SSE streams on
# /api/v1/stream, then 1,000 MQTT subscribers, each fed by one QoS 0 publisher of news/tech, at
# a fixed rate and unthrottled. Broker on core 0, load generator on core 1, a fresh broker per
# run. Appends to bench/sse.jsonl; the table is in docs/benchmarks.md ("HTTP readers").
#
#   bash bench/sse.sh                 # about 2 minutes
#   DURATION=5 STREAMS=500 bash bench/sse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
STREAMS=${STREAMS:-1000}
RATE=${RATE:-100000}
PORT=${PORT:-18983}
HTTP=$((PORT + 1))
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
max_connections = $((STREAMS + 64))
[log]
level = "warn"
TOML
results=bench/sse.jsonl
: > "$results"
run() {
  rm -rf "$work/data"
  taskset -c 0 target/release/herald --config "$work/herald.toml" > "$work/broker.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$HTTP) 2>/dev/null && break; sleep 0.05; done
  taskset -c 1 target/release/herald-loadgen "$@" --port "$PORT" --http-port "$HTTP" --broker-pid "$pid" \
    | sed 's/^{/{"broker":"herald",/' | tee -a "$results"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for rate in "$RATE" 0; do
  run sse --streams "$STREAMS" --rate "$rate" --duration "$DURATION"
  run fanout --subscribers "$STREAMS" --qos 0 --rate "$rate" --duration "$DURATION"
done
