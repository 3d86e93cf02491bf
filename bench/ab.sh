#!/usr/bin/env bash
# A/B of two Herald binaries on the hot-path scenarios, alternating OLD and NEW, a fresh broker
# per run (core 0) and the load generator on core 1. Prints one JSON line per run.
#
#   OLD=/path/to/old/herald NEW=target/release/herald ROUNDS=2 DURATION=8 bash bench/ab.sh
#   ONLY="qos 0" ...    # only the scenarios whose arguments contain this
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD:?the binary before the change}"
NEW=${NEW:-target/release/herald}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8}
PORT=${PORT:-18883}
cargo build --release --bin herald-loadgen >&2
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/herald.toml" <<TOML
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$PORT"
[storage]
path = "$work/data"
[log]
level = "warn"
TOML
scenarios=(
  "fanin --qos 0 --duration $DURATION"
  "fanin --qos 1 --duration $DURATION"
  "fanout --qos 0 --subscribers 1000 --duration $DURATION"
  "fanout --qos 1 --subscribers 1000 --duration $DURATION"
)
for round in $(seq "$ROUNDS"); do
  for s in "${scenarios[@]}"; do
    [[ "$s" == *"${ONLY:-}"* ]] || continue
    for side in OLD NEW; do
      bin=${!side}
      rm -rf "$work/data"
      taskset -c 0 "$bin" --config "$work/herald.toml" > "$work/broker.log" 2>&1 &
      pid=$!
      for _ in $(seq 200); do
        (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
        sleep 0.05
      done
      # shellcheck disable=SC2086
      line=$(timeout 300 taskset -c 1 target/release/herald-loadgen $s --port "$PORT" --broker-pid "$pid" || echo '{"scenario":"failed"}')
      echo "{\"round\":$round,\"side\":\"$side\",\"args\":\"$s\",${line#\{}"
      kill "$pid"; wait "$pid" 2>/dev/null || true
    done
  done
done
