#!/usr/bin/env bash
# Runs every benchmark scenario against Herald, Mosquitto and rumqttd back to back on this machine,
# each broker pinned to core 0 and the load generator to core 1, a fresh broker process for every
# scenario, and writes the side-by-side table to docs/benchmarks.md.
#
#   bash bench/run.sh                 # everything, about 10 minutes
#   BROKERS="herald" bash bench/run.sh
#   DURATION=5 bash bench/run.sh      # shorter timed scenarios
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS=${BROKERS:-"herald mosquitto rumqttd"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-10000}
PORT=${PORT:-18883}

cargo build --release --bin herald --bin herald-loadgen
if [[ " $BROKERS " == *" rumqttd "* ]] && ! command -v rumqttd >/dev/null; then
  cargo install rumqttd
fi
command -v mosquitto >/dev/null || bash scripts/install-deps.sh

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
results=bench/results.jsonl
# Keep the other brokers' rows of an earlier run when only some brokers are run now.
touch "$results"
for broker in $BROKERS; do
  grep -v "\"broker\":\"$broker\"" "$results" > "$work/keep" || true
  cp "$work/keep" "$results"
done

sed "s/PORT/$PORT/" bench/herald.toml > "$work/herald.toml"
sed "s/PORT/$PORT/" bench/mosquitto.conf > "$work/mosquitto.conf"
sed "s/PORT/$PORT/" bench/rumqttd.toml > "$work/rumqttd.toml"

start_broker() {
  case "$1" in
    herald) taskset -c 0 target/release/herald --config "$work/herald.toml" > "$work/broker.log" 2>&1 & ;;
    mosquitto) taskset -c 0 mosquitto -c "$work/mosquitto.conf" > "$work/broker.log" 2>&1 & ;;
    rumqttd) taskset -c 0 rumqttd --config "$work/rumqttd.toml" > "$work/broker.log" 2>&1 & ;;
  esac
  BROKER_PID=$!
  for _ in $(seq 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "broker $1 did not start:" >&2; cat "$work/broker.log" >&2; exit 1
}

stop_broker() {
  kill "$BROKER_PID" 2>/dev/null || true
  wait "$BROKER_PID" 2>/dev/null || true
  sleep 0.5
}

scenarios=(
  "fanin --qos 0 --duration $DURATION"
  "fanin --qos 1 --duration $DURATION"
  "fanin --qos 0 --rate 20000 --duration $DURATION"
  "fanout --qos 0 --subscribers 1000 --duration $DURATION"
  "fanout --qos 1 --subscribers 1000 --duration $DURATION"
  "fanout --qos 0 --subscribers 1000 --rate 100000 --duration $DURATION"
  "conns --connections $CONNS"
  "conns --connections $CONNS --subscribe true"
  "retained --qos 0 --messages 10000"
  "retained --qos 1 --messages 10000"
)

for broker in $BROKERS; do
  for s in "${scenarios[@]}"; do
    start_broker "$broker"
    echo "== $broker: $s" >&2
    line=$(timeout 120 taskset -c 1 target/release/herald-loadgen $s --port "$PORT" --broker-pid "$BROKER_PID" \
           || echo '{"scenario":"failed"}')
    echo "$line" >&2
    echo "{\"broker\":\"$broker\",\"args\":\"$s\",${line#\{}" >> "$results"
    stop_broker
  done
done

python3 bench/report.py "$results" > docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
