#!/usr/bin/env bash
# The breaking-news lane under overload (issue 7), written to bench/overload.jsonl and, through
# report.py, to the "Overload" section of docs/benchmarks.md. `herald-loadgen overload`: 200
# readers of news/#, 8 publishers of features at QoS 0 as fast as they go (the broker, pinned
# to one core, is saturated), one newsroom publishing a breaking story at QoS 1 ten times a
# second; the figure is the latency of the breaking stories at the readers.
#  - herald-lanes: `[[priority]] news/breaking/# high` and `[degraded] max_queued_messages`
#  - herald-plain: the default configuration (no priority class)
#  - mosquitto: its defaults (no priority exists)
#
#   bash bench/overload.sh
#   BROKERS=herald-lanes DURATION=5 bash bench/overload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS=${BROKERS:-"herald-lanes herald-plain mosquitto"}
DURATION=${DURATION:-10}
SUBSCRIBERS=${SUBSCRIBERS:-200}
PORT=${PORT:-18885}

cargo build --release --bin herald --bin herald-loadgen
command -v mosquitto >/dev/null || bash scripts/install-deps.sh

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
results=bench/overload.jsonl
touch "$results"
for broker in $BROKERS; do
  grep -v "\"broker\":\"$broker\"" "$results" > "$work/keep" || true
  cp "$work/keep" "$results"
done

cat > "$work/herald-plain.toml" <<CONF
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$PORT"
[storage]
path = "$work/data-plain"
[log]
level = "warn"
CONF
cat > "$work/herald-lanes.toml" <<CONF
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$PORT"
[storage]
path = "$work/data-lanes"
[log]
level = "warn"
[[priority]]
filter = "news/breaking/#"
class = "high"
[degraded]
max_queued_messages = 20000
CONF
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\n' "$PORT" > "$work/mosquitto.conf"

for broker in $BROKERS; do
  case "$broker" in
    herald-*) taskset -c 0 target/release/herald --config "$work/$broker.toml" > "$work/broker.log" 2>&1 & ;;
    mosquitto) taskset -c 0 mosquitto -c "$work/mosquitto.conf" > "$work/broker.log" 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.05; done
  echo "== $broker" >&2
  line=$(timeout 120 taskset -c 1 target/release/herald-loadgen overload --subscribers "$SUBSCRIBERS" \
         --duration "$DURATION" --port "$PORT" --broker-pid "$pid" || echo '{"scenario":"failed"}')
  echo "$line" >&2
  echo "{\"broker\":\"$broker\",\"args\":\"overload --subscribers $SUBSCRIBERS --duration $DURATION\",${line#\{}" >> "$results"
  grep -E "degraded" "$work/broker.log" | head -3 >&2 || true
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; sleep 0.5
done
python3 bench/report.py bench/results.jsonl > docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
