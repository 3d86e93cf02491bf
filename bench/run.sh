#!/usr/bin/env bash
# Runs every benchmark scenario against Herald, Mosquitto and rumqttd back to back on this machine,
# each broker pinned to core 0 and the load generator to core 1, a fresh broker process for every
# scenario, and writes the side-by-side table to docs/benchmarks.md.
#
#   bash bench/run.sh                 # everything, about 10 minutes
#   BROKERS="herald" bash bench/run.sh
#   DURATION=5 bash bench/run.sh      # shorter timed scenarios
#   ONLY=breaking bash bench/run.sh   # the scenarios whose line contains this, the other rows kept
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS=${BROKERS:-"herald mosquitto rumqttd"}
ONLY=${ONLY:-}
DURATION=${DURATION:-10}
CONNS=${CONNS:-10000}
# Idle TLS connections held at once with keep-alive pings: within the 20,000 descriptors a
# process may have here (each broker needs one per connection, and a few of its own).
HELD=${HELD:-19000}
PORT=${PORT:-18883}
TLSPORT=$((PORT + 1)); WSPORT=$((PORT + 2)); WSSPORT=$((PORT + 3))

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
  if [ -n "$ONLY" ]; then
    # Only this broker's rows of the scenarios run now are replaced.
    grep -v "\"broker\":\"$broker\",\"args\":\"$ONLY" "$results" > "$work/keep" || true
  else
    grep -v "\"broker\":\"$broker\"" "$results" > "$work/keep" || true
  fi
  cp "$work/keep" "$results"
done

# Certificates for the TLS listeners; Mosquitto drops root for its own user before reading them.
bash certs/generate.sh device-1 "$work/certs" > /dev/null
chmod 755 "$work" "$work/certs"; chmod 644 "$work"/certs/*
ports() { sed -e "s/WSSPORT/$WSSPORT/; s/WSPORT/$WSPORT/; s/TLSPORT/$TLSPORT/; s/PORT/$PORT/; s#CERTS#$work/certs#g" "$1"; }
ports bench/herald.toml > "$work/herald.toml"
ports bench/mosquitto.conf > "$work/mosquitto.conf"
ports bench/rumqttd.toml > "$work/rumqttd.toml"

start_broker() {
  case "$1" in
    herald) taskset -c 0 target/release/herald --config "$work/herald.toml" > "$work/broker.log" 2>&1 & ;;
    mosquitto) taskset -c 0 mosquitto -c "$work/mosquitto.conf" > "$work/broker.log" 2>&1 & ;;
    rumqttd) taskset -c 0 rumqttd --config "$work/rumqttd.toml" > "$work/broker.log" 2>&1 & ;;
  esac
  BROKER_PID=$!
  # The last listener of the three brokers' configurations.
  local last=$WSSPORT
  [ "$1" = rumqttd ] && last=$PORT
  for _ in $(seq 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/$last) 2>/dev/null; then return 0; fi
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
  "conns --connections $CONNS --tls true --ca CA --port $TLSPORT"
  "conns --connections $CONNS --tls true --ca CA --subscribe true --port $TLSPORT"
  "conns --connections $CONNS --ws true --parallel 100 --port $WSPORT"
  "conns --connections $CONNS --ws true --tls true --ca CA --parallel 100 --port $WSSPORT"
  "conns --connections $HELD --tls true --ca CA --keepalive 10 --hold 30 --port $TLSPORT"
  "retained --qos 0 --messages 10000"
  "retained --qos 1 --messages 10000"
  "churn --rounds 12 --filters 100000"
  "breaking --subscribers $HELD --rate 2 --duration 10"
  "breaking --subscribers $HELD --rate 2 --duration 10 --tls true --ca CA --port $TLSPORT --plain-port $PORT"
)

for broker in $BROKERS; do
  for s in "${scenarios[@]}"; do
    if [ -n "$ONLY" ] && [[ "$s" != "$ONLY"* ]]; then continue; fi
    # rumqttd is benchmarked on plain MQTT only (its TLS needs a feature build, it has no wss).
    if [ "$broker" = rumqttd ] && [[ "$s" == *"--tls"* || "$s" == *"--ws"* ]]; then continue; fi
    start_broker "$broker"
    echo "== $broker: $s" >&2
    # The scenario's own --port, if it has one, comes last and wins.
    set -- ${s//CA/$work/certs/ca.pem}
    name=$1; shift
    line=$(timeout 300 taskset -c 1 target/release/herald-loadgen "$name" --port "$PORT" "$@" --broker-pid "$BROKER_PID" \
           || echo '{"scenario":"failed"}')
    echo "$line" >&2
    echo "{\"broker\":\"$broker\",\"args\":\"$s\",${line#\{}" >> "$results"
    stop_broker
  done
done

python3 bench/report.py "$results" > docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
