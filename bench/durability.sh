#!/usr/bin/env bash
# Durability benchmarks (issue 4), written to bench/durability.jsonl and, through report.py, to
# the "Durability" section of docs/benchmarks.md:
#  - durable QoS 1 rate: `fanin --qos 1 --persistent true` (8 publishers, 100 in flight each, one
#    connected persistent subscriber): Herald in `sync` and `wal` mode, Mosquitto with
#    `persistence true` (which writes its database only on shutdown and every autosave_interval,
#    so it promises less);
#  - start-up with a full store: 1000 offline persistent sessions x 1000 queued messages (1M queue
#    entries), then the time from starting the broker to its port accepting connections, after a
#    clean stop and after SIGKILL, and then every session coming back and draining its queue
#    (time to its first message, time to drain all).
#
#   bash bench/durability.sh
#   BROKERS=herald DURATION=5 bash bench/durability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS=${BROKERS:-"herald mosquitto"}
DURATION=${DURATION:-10}
SESSIONS=${SESSIONS:-1000}
MESSAGES=${MESSAGES:-1000}
PORT=${PORT:-18884}

cargo build --release --bin herald --bin herald-loadgen
command -v mosquitto >/dev/null || bash scripts/install-deps.sh

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
results=bench/durability.jsonl
touch "$results"
for broker in $BROKERS; do
  grep -v "\"broker\":\"$broker" "$results" > "$work/keep" || true
  cp "$work/keep" "$results"
done

herald_conf() { # durability
  cat > "$work/herald.toml" <<EOF
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$PORT"
[storage]
path = "$work/herald-data"
durability = "$1"
[log]
level = "info"
EOF
}

mosquitto_conf() {
  cat > "$work/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence true
persistence_location $work/mosq-data/
max_queued_messages 1000
log_type error
# Started as root (as here), Mosquitto would switch to the mosquitto user, which cannot write
# to this directory, and save nothing.
user root
EOF
  mkdir -p "$work/mosq-data"
}

wait_port() {
  for _ in $(seq 6000); do
    if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then return 0; fi
    sleep 0.01
  done
  echo "broker did not start" >&2; cat "$work/broker.log" >&2; exit 1
}

start() { # broker
  case "$1" in
    herald*) taskset -c 0 target/release/herald --config "$work/herald.toml" > "$work/broker.log" 2>&1 & ;;
    mosquitto) taskset -c 0 mosquitto -c "$work/mosquitto.conf" > "$work/broker.log" 2>&1 & ;;
  esac
  BROKER_PID=$!
}

stop() { # signal
  kill -"$1" "$BROKER_PID" 2>/dev/null || true
  wait "$BROKER_PID" 2>/dev/null || true
  sleep 0.3
}

record() { # broker args json
  echo "$3" >&2
  echo "{\"broker\":\"$1\",\"args\":\"$2\",${3#\{}" >> "$results"
}

rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

for broker in $BROKERS; do
  modes="x"
  [ "$broker" = herald ] && modes="sync wal"
  for mode in $modes; do
    name=$broker; [ "$broker" = herald ] && name="herald-$mode"
    rm -rf "$work/herald-data" "$work/mosq-data"
    if [ "$broker" = herald ]; then herald_conf "$mode"; else mosquitto_conf; fi
    start "$broker"; wait_port
    args="fanin --qos 1 --persistent true --duration $DURATION"
    echo "== $name: $args" >&2
    line=$(timeout 120 taskset -c 1 target/release/herald-loadgen $args --port "$PORT" --broker-pid "$BROKER_PID" \
           || echo '{"scenario":"failed"}')
    record "$name" "$args" "$line"
    stop TERM
  done

  # Start-up with SESSIONS x MESSAGES queued.
  rm -rf "$work/herald-data" "$work/mosq-data"
  if [ "$broker" = herald ]; then herald_conf sync; else mosquitto_conf; fi
  start "$broker"; wait_port
  args="fill --sessions $SESSIONS --messages $MESSAGES"
  echo "== $broker: $args" >&2
  fill=$(timeout 1200 taskset -c 1 target/release/herald-loadgen $args --port "$PORT")
  echo "$fill" >&2
  queued=$(python3 -c "import json,sys; print(int(json.loads(sys.argv[1])['queued']))" "$fill")
  fill_s=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$fill")
  du_before=$( (du -sk "$work/herald-data" "$work/mosq-data" 2>/dev/null || true) | awk '{s+=$1} END {print s}')
  # Herald: first SIGKILL right after filling (the start replays the write-ahead log), then
  # SIGTERM (a clean stop flushes the tables). Mosquitto writes its database only at shutdown and
  # on autosave: after SIGKILL it would have nothing, so only SIGTERM.
  stops="KILL TERM"; [ "$broker" = mosquitto ] && stops="TERM"
  for how in $stops; do
    stop "$how"
    t0=$(date +%s%N)
    start "$broker"; wait_port
    t1=$(date +%s%N)
    sleep 0.5
    rss=$(rss_kb "$BROKER_PID")
    store_ms=$(grep -o 'store opened.*' "$work/broker.log" | grep -o 'ms=[0-9]*' | head -1 | cut -d= -f2 || true)
    record "$broker" "startup after SIG$how" \
      "{\"scenario\":\"startup\",\"after\":\"$how\",\"queued\":$queued,\"fill_s\":$fill_s,\"store_kb\":${du_before:-0},\"start_ms\":$(( (t1 - t0) / 1000000 )),\"store_open_ms\":${store_ms:-null},\"rss_mb\":$(( rss / 1024 ))}"
  done
  # Then every session comes back (100 at a time) and reads its queue: Herald reads each queue
  # from the store at this point (issue 14), Mosquitto has them in memory since its start.
  args="drain --sessions $SESSIONS --messages $MESSAGES --parallel 100"
  echo "== $broker: $args" >&2
  line=$(timeout 600 taskset -c 1 target/release/herald-loadgen $args --port "$PORT" --broker-pid "$BROKER_PID" \
         || echo '{"scenario":"failed"}')
  record "$broker" "$args" "$line"
  stop TERM
done

python3 bench/report.py bench/results.jsonl > docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
