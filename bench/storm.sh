#!/usr/bin/env bash
# The reconnect storm (issue 26, docs/benchmarks.md "Reconnect storm"): PHONES persistent TLS
# phones, each with a story queued, reconnect at once after the broker restarts. Herald with a
# ticket key file (the phones resume their TLS sessions across the restart), Herald without one
# (random keys die with the process: full handshakes), and Mosquitto (persistence on), side by
# side; broker on core 0, generator on core 1, as bench/run.sh.
#
#   bash bench/storm.sh                 # 19,000 phones each, about 5 minutes
#   PHONES=2000 BROKERS="herald" bash bench/storm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS=${BROKERS:-"herald herald-nokey mosquitto"}
PHONES=${PHONES:-19000}
PORT=${PORT:-18983}
TLSPORT=$((PORT + 1))

cargo build --release --bin herald --bin herald-loadgen
command -v mosquitto >/dev/null || bash scripts/install-deps.sh

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
results=bench/storm.jsonl
touch "$results"
for broker in $BROKERS; do
  grep -v "\"broker\":\"$broker\"" "$results" > "$work/keep" || true
  cp "$work/keep" "$results"
done
bash certs/generate.sh device-1 "$work/certs" > /dev/null
chmod 755 "$work" "$work/certs"; chmod 644 "$work"/certs/*
head -c 64 /dev/urandom > "$work/ticket.key"

herald_conf() { # with a ticket key or not
  cat > "$work/herald.toml" <<EOF
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$PORT"
[[listeners]]
protocol = "mqtts"
bind = "127.0.0.1:$TLSPORT"
cert = "$work/certs/server.pem"
key = "$work/certs/server.key"
[storage]
path = "$work/herald-data"
[log]
level = "warn"
EOF
  if [ "$1" = key ]; then printf '[tls]\nticket_key_file = "%s"\n' "$work/ticket.key" >> "$work/herald.toml"; fi
}

mosquitto_conf() {
  cat > "$work/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
set_tcp_nodelay true
persistence true
persistence_location $work/mosq-data/
log_type error
user root
listener $PORT 127.0.0.1
listener $TLSPORT 127.0.0.1
certfile $work/certs/server.pem
keyfile $work/certs/server.key
EOF
  mkdir -p "$work/mosq-data"
}

start() {
  case "$1" in
    herald*) taskset -c 0 target/release/herald --config "$work/herald.toml" >> "$work/broker.log" 2>&1 & ;;
    mosquitto) taskset -c 0 mosquitto -c "$work/mosquitto.conf" >> "$work/broker.log" 2>&1 & ;;
  esac
  BROKER_PID=$!
  for _ in $(seq 6000); do
    if (exec 3<>/dev/tcp/127.0.0.1/$TLSPORT) 2>/dev/null; then return 0; fi
    sleep 0.01
  done
  echo "broker $1 did not start" >&2; cat "$work/broker.log" >&2; exit 1
}

for broker in $BROKERS; do
  rm -rf "$work/herald-data" "$work/mosq-data" "$work/ready" "$work/go" "$work/broker.log"
  case "$broker" in
    herald) herald_conf key ;;
    herald-nokey) herald_conf none ;;
    mosquitto) mosquitto_conf ;;
  esac
  start "$broker"
  echo "== $broker: storm of $PHONES phones" >&2
  taskset -c 1 target/release/herald-loadgen storm --port "$TLSPORT" --plain-port "$PORT" --ca "$work/certs/ca.pem" \
    --phones "$PHONES" --ready "$work/ready" --go "$work/go" > "$work/line" &
  gen=$!
  while [ ! -f "$work/ready" ]; do
    kill -0 "$gen" 2>/dev/null || { echo "the generator stopped before the restart" >&2; exit 1; }
    sleep 0.1
  done
  # A clean restart (Mosquitto writes its sessions at exit); the phones' connections are closed.
  kill -TERM "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
  start "$broker"
  echo "$BROKER_PID" > "$work/go"
  wait "$gen" || echo '{"scenario":"failed"}' > "$work/line"
  line=$(cat "$work/line")
  echo "$line" >&2
  echo "{\"broker\":\"$broker\",\"args\":\"storm --phones $PHONES\",${line#\{}" >> "$results"
  kill -TERM "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true
done
