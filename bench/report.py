#!/usr/bin/env python3
"""Turns bench/results.jsonl (one JSON line per broker and scenario, from bench/run.sh) into
docs/benchmarks.md: the target table with Herald / peer ratios, then every raw figure."""
import datetime
import json
import platform
import subprocess
import sys


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
brokers = []
for r in rows:
    if r["broker"] not in brokers:
        brokers.append(r["broker"])
brokers.sort(key=lambda b: (b != "herald", b))
rows.sort(key=lambda r: brokers.index(r["broker"]))


def find(broker, scenario, **want):
    for r in rows:
        if r["broker"] == broker and r.get("scenario") == scenario and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


CONNS = 10000.0
for r in rows:
    if r.get("scenario") == "conns" and r.get("tls") == 0 and r.get("ws") == 0 and r.get("subscribe") == 0:
        CONNS = r.get("connections", CONNS)


def herald(scenario, want, key):
    r = find("herald", scenario, **want)
    return r[key] if r else float("nan")


def vs(peer, row, scenario, want, key, factor, higher=False):
    """Herald's figure against `factor` times the peer's (at most, or at least if `higher`)."""
    p = find(peer, scenario, **want)
    if p is None:
        raise KeyError(peer)
    return row[key] >= factor * p[key] if higher else row[key] <= factor * p[key]


# (case, scenario, filter, value key, unit, lower is better, target text, target check on Herald's row)
cases = [
    ("fan-in QoS0, broker CPU per message", "fanin", dict(qos=0, target_rate=0), "cpu_us_per_msg", "us", True,
     "<= 1.3 us", lambda r: r["cpu_us_per_msg"] <= 1.3),
    ("fan-in QoS1 unthrottled, delivered/s", "fanin", dict(qos=1, target_rate=0), "rate_per_s", "msg/s", False,
     ">= rumqttd, 0 lost, p99 < 50 ms", None),
    ("fan-in QoS1 unthrottled, lost", "fanin", dict(qos=1, target_rate=0), "lost", "msgs", True, "0", lambda r: r["lost"] == 0),
    ("fan-in QoS1 unthrottled, p99", "fanin", dict(qos=1, target_rate=0), "p99_ms", "ms", True, "< 50 ms",
     lambda r: r["p99_ms"] < 50),
    ("fan-in QoS0 at 20k/s, p99", "fanin", dict(qos=0, target_rate=20000), "p99_ms", "ms", True, "< 2 ms",
     lambda r: r["p99_ms"] < 2),
    ("fan-out QoS0 1->1000, CPU per delivery", "fanout", dict(qos=0, target_rate=0), "cpu_us_per_delivery", "us", True,
     "<= 0.25 us", lambda r: r["cpu_us_per_delivery"] <= 0.25),
    ("fan-out QoS0 1->1000, CPU per delivery against rumqttd (issue 14)", "fanout", dict(qos=0, target_rate=0),
     "cpu_us_per_delivery", "us", True, "<= rumqttd",
     lambda r: vs("rumqttd", r, "fanout", dict(qos=0, target_rate=0), "cpu_us_per_delivery", 1.0)),
    ("fan-out QoS0 1->1000, deliveries/s", "fanout", dict(qos=0, target_rate=0), "deliveries_per_s", "/s", False, "", None),
    ("fan-out QoS1 1->1000, deliveries/s", "fanout", dict(qos=1, target_rate=0), "deliveries_per_s", "/s", False, "", None),
    ("fan-out QoS1 1->1000, lost", "fanout", dict(qos=1, target_rate=0), "lost", "msgs", True, "0", lambda r: r["lost"] == 0),
    ("fan-out QoS0 at 100k deliveries/s, p99", "fanout", dict(qos=0, target_rate=100000), "p99_ms", "ms", True, "< 10 ms",
     lambda r: r["p99_ms"] < 10),
    ("memory per idle TCP connection", "conns", dict(subscribe=0, tls=0, ws=0), "bytes_per_connection", "B", True,
     "<= Mosquitto", lambda r: vs("mosquitto", r, "conns", dict(subscribe=0, tls=0, ws=0), "bytes_per_connection", 1.0)),
    ("memory per idle TCP connection with 1 subscription", "conns", dict(subscribe=1, tls=0, ws=0), "bytes_per_connection",
     "B", True, "<= Mosquitto",
     lambda r: vs("mosquitto", r, "conns", dict(subscribe=1, tls=0, ws=0), "bytes_per_connection", 1.0)),
    ("memory per idle TLS connection", "conns", dict(subscribe=0, tls=1, ws=0, connections=CONNS), "bytes_per_connection",
     "B", True, "<= 0.4 x Mosquitto",
     lambda r: vs("mosquitto", r, "conns", dict(subscribe=0, tls=1, ws=0, connections=CONNS), "bytes_per_connection", 0.4)),
    ("memory per idle TLS connection with 1 subscription", "conns", dict(subscribe=1, tls=1, ws=0), "bytes_per_connection",
     "B", True, "<= 0.4 x Mosquitto",
     lambda r: vs("mosquitto", r, "conns", dict(subscribe=1, tls=1, ws=0), "bytes_per_connection", 0.4)),
    ("memory per idle WebSocket connection", "conns", dict(subscribe=0, tls=0, ws=1), "bytes_per_connection", "B", True,
     "within 1 KB of TCP", lambda r: r["bytes_per_connection"] <= herald("conns", dict(subscribe=0, tls=0, ws=0),
                                                                          "bytes_per_connection") + 1024),
    ("memory per idle secure WebSocket connection", "conns", dict(subscribe=0, tls=1, ws=1), "bytes_per_connection", "B",
     True, "within 1 KB of TLS",
     lambda r: r["bytes_per_connection"] <= herald("conns", dict(subscribe=0, tls=1, ws=0, connections=CONNS),
                                                   "bytes_per_connection") + 1024),
    ("TCP connects (CONNECT to CONNACK) per second", "conns", dict(subscribe=0, tls=0, ws=0), "connects_per_s", "/s",
     False, ">= Mosquitto", lambda r: vs("mosquitto", r, "conns", dict(subscribe=0, tls=0, ws=0), "connects_per_s", 1.0,
                                          higher=True)),
    ("TLS handshakes and CONNECTs per second", "conns", dict(subscribe=0, tls=1, ws=0, connections=CONNS),
     "connects_per_s", "/s", False, ">= Mosquitto",
     lambda r: vs("mosquitto", r, "conns", dict(subscribe=0, tls=1, ws=0, connections=CONNS), "connects_per_s", 1.0,
                  higher=True)),
    ("19,000 idle TLS connections pinging every 10 s: CPU per PINGREQ", "conns", dict(hold_s=30.0), "cpu_us_per_ping",
     "us", True, "measured", None),
    ("19,000 idle TLS connections: resident memory at the end, KB", "conns", dict(hold_s=30.0), "rss_after_hold_kb", "KB",
     True, "measured", None),
    ("10k retained, new news/# subscriber QoS1, delivered", "retained", dict(qos=1), "delivered", "msgs", False,
     "all 10k", lambda r: r["delivered"] >= 10000),
    ("10k retained, new news/# subscriber QoS1, time", "retained", dict(qos=1), "ms", "ms", True, "< 50 ms",
     lambda r: r["ms"] < 50 and r["delivered"] >= 10000),
    ("10k retained, new news/# subscriber QoS0, delivered", "retained", dict(qos=0), "delivered", "msgs", False, "", None),
    ("12 rounds of 100k SUBSCRIBE then UNSUBSCRIBE: resident growth after round 1, MB", "churn", dict(same=0),
     "growth_after_first_round_mb", "MB", True, "within one round's size",
     lambda r: r["growth_after_first_round_mb"] <= r["rss_after_subscribe_mb"][0] - r["rss_before_mb"]),
    ("12 rounds of 100k SUBSCRIBE then UNSUBSCRIBE: resident 12 s after, MB", "churn", dict(same=0),
     "rss_settled_mb", "MB", True, "measured", None),
    ("breaking news to 19,000 TCP phones: time to the last, p50 ms", "breaking", dict(tls=0), "last_p50_ms", "ms",
     True, "measured (floor: floor_ms)", None),
    ("breaking news to 19,000 TCP phones: time to the last, p99 ms", "breaking", dict(tls=0), "last_p99_ms", "ms",
     True, "measured", None),
    ("breaking news to 19,000 TCP phones: time to the last, max ms", "breaking", dict(tls=0), "last_max_ms", "ms",
     True, "measured", None),
    ("breaking news to 19,000 TCP phones: one core's floor, ms", "breaking", dict(tls=0), "floor_ms", "ms",
     True, "19,000 writes on one core", None),
    ("breaking news to 19,000 TLS phones: time to the last, p50 ms", "breaking", dict(tls=1), "last_p50_ms", "ms",
     True, "measured", None),
    ("breaking news to 19,000 TLS phones: time to the last, p99 ms", "breaking", dict(tls=1), "last_p99_ms", "ms",
     True, "measured", None),
    ("breaking news to 19,000 TLS phones: time to the last, max ms", "breaking", dict(tls=1), "last_max_ms", "ms",
     True, "measured", None),
    ("breaking news: broker CPU per delivery, TCP", "breaking", dict(tls=0), "cpu_us_per_delivery", "us", True,
     "measured", None),
    ("breaking news: broker CPU per delivery, TLS", "breaking", dict(tls=1), "cpu_us_per_delivery", "us", True,
     "measured", None),
]

out = []
out.append("# Benchmarks\n")
out.append("Written by `bash bench/run.sh` (see bench/README.md); do not edit by hand.\n")
out.append(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
mem = sh("free -g | awk '/Mem:/{print $2}'")
out.append(f"- machine: {sh('nproc')} cores, {cpu}, {mem} GiB, Linux {platform.release()}")
out.append(f"- Herald: {sh('git rev-parse --short HEAD')} (release build); Mosquitto: {sh('mosquitto -h | head -1')}; "
           f"rumqttd: {sh('cargo install --list | grep ^rumqttd') or 'not installed'}")
out.append("- each broker pinned to core 0 (`taskset -c 0`), the load generator to core 1; a fresh broker "
           "process per scenario; 256-byte payloads; MQTT 3.1.1; CPU from /proc/PID/stat (10 ms ticks)\n")
peers = [b for b in brokers if b != "herald"]
header = "| case | " + " | ".join(brokers) + " | " + " | ".join(f"Herald / {p}" for p in peers) + " | target | met |"
out.append(header)
out.append("|" + "---|" * (header.count("|") - 1))
for name, scen, want, key, unit, lower, target, check in cases:
    vals = {}
    for b in brokers:
        r = find(b, scen, **want)
        vals[b] = r.get(key) if r else None
    cells = [f"{fmt(vals[b])} {unit}" if vals[b] is not None else "n/a" for b in brokers]
    ratios = []
    for p in peers:
        h, v = vals.get("herald"), vals.get(p)
        ratios.append(f"{h / v:.2f}" if h is not None and v not in (None, 0) else "n/a")
    met = ""
    herald_row = find("herald", scen, **want)
    if check and herald_row:
        try:
            met = "yes" if check(herald_row) else "**no**"
        except (KeyError, TypeError):
            met = "n/a"
    if name.startswith("fan-in QoS1 unthrottled, delivered") and herald_row and find("rumqttd", scen, **want):
        met = "yes" if herald_row["rate_per_s"] >= find("rumqttd", scen, **want)["rate_per_s"] else "**no**"
    out.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {target} | {met} |")

out.append("\nRatios are Herald's figure divided by the peer's: below 1 is better where less is better "
           "(CPU, latency, memory, time), above 1 is better for rates.\n")
out.append("## Every run\n")
out.append("| broker | scenario | figures |")
out.append("|---|---|---|")
for r in rows:
    figures = ", ".join(f"{k}={fmt(v) if isinstance(v, (int, float)) else v}" for k, v in r.items()
                        if k not in ("broker", "args", "scenario"))
    out.append(f"| {r['broker']} | `{r['args']}` | {figures} |")
durable_path = __file__.replace("report.py", "durability.jsonl")
try:
    durable = [json.loads(line) for line in open(durable_path) if line.strip()]
except OSError:
    durable = []
if durable:
    out.append("\n## Durability\n")
    out.append("Written by `bash bench/durability.sh`. Durable rate: `fanin --qos 1 --persistent true` (8 "
               "publishers with 100 QoS 1 messages in flight each, one connected persistent subscriber, 256-byte "
               "payloads): every message is stored before its PUBACK. Mosquitto runs with `persistence true`, "
               "which saves its database at shutdown and on autosave, not per message: it promises less. "
               "Start-up: 1000 offline persistent sessions with 1000 queued messages each (1M queue entries).\n")
    sync = next((r for r in durable if r["broker"] == "herald-sync" and r.get("scenario") == "fanin"), None)
    wal = next((r for r in durable if r["broker"] == "herald-wal" and r.get("scenario") == "fanin"), None)
    mosq = next((r for r in durable if r["broker"] == "mosquitto" and r.get("scenario") == "fanin"), None)
    out.append("| case | Herald sync | Herald wal | Mosquitto (persistence true) | Herald sync / Mosquitto | target | met |")
    out.append("|---|---|---|---|---|---|---|")
    def cell(r, k):
        return fmt(r.get(k)) if r and r.get(k) is not None else "n/a"
    def ratio(a, b, k):
        return f"{a[k] / b[k]:.2f}" if a and b and b.get(k) else "n/a"
    met = ("yes" if sync["rate_per_s"] >= 20000 and sync["lost"] == 0 else "**no**") if sync else "n/a"
    out.append(f"| durable QoS 1, acknowledged and delivered msg/s | {cell(sync, 'rate_per_s')} | {cell(wal, 'rate_per_s')} | "
               f"{cell(mosq, 'rate_per_s')} | {ratio(sync, mosq, 'rate_per_s')} | >= 20,000 in sync, 0 lost | {met} |")
    out.append(f"| durable QoS 1, lost | {cell(sync, 'lost')} | {cell(wal, 'lost')} | {cell(mosq, 'lost')} | | 0 | |")
    out.append(f"| durable QoS 1, p99 latency ms | {cell(sync, 'p99_ms')} | {cell(wal, 'p99_ms')} | {cell(mosq, 'p99_ms')} | "
               f"{ratio(sync, mosq, 'p99_ms')} | | |")
    for after in ("TERM", "KILL"):
        h = next((r for r in durable if r["broker"] == "herald" and r.get("scenario") == "startup" and r.get("after") == after), None)
        m = next((r for r in durable if r["broker"] == "mosquitto" and r.get("scenario") == "startup" and r.get("after") == after), None)
        target = "<= Mosquitto (issue 14)" if m else "measured"
        met_t = ("yes" if h["start_ms"] <= m["start_ms"] else "**no**") if h and m else ""
        met_m = ("yes" if h["rss_mb"] <= m["rss_mb"] else "**no**") if h and m else ""
        out.append(f"| start-up with {cell(h, 'queued')} queued, after SIG{after}, ms to listening | {cell(h, 'start_ms')} | | "
                   f"{cell(m, 'start_ms')} | {ratio(h, m, 'start_ms')} | {target} | {met_t} |")
        out.append(f"| resident memory after that start-up, MB | {cell(h, 'rss_mb')} | | {cell(m, 'rss_mb')} | "
                   f"{ratio(h, m, 'rss_mb')} | {target if m else ''} | {met_m} |")
    h = next((r for r in durable if r["broker"] == "herald" and r.get("scenario") == "drain"), None)
    m = next((r for r in durable if r["broker"] == "mosquitto" and r.get("scenario") == "drain"), None)
    if h or m:
        for key, what in (("first_p50_ms", "then all sessions return, 100 at a time: ms to a session's first message, p50"),
                          ("first_p99_ms", "ms to a session's first message, p99"),
                          ("seconds", "seconds until every queued message is delivered and acknowledged"),
                          ("rss_mb", "resident memory after the drain, MB")):
            out.append(f"| {what} | {cell(h, key)} | | {cell(m, key)} | {ratio(h, m, key)} | measured | |")
    out.append("")
    out.append("| broker | run | figures |")
    out.append("|---|---|---|")
    for r in durable:
        figures = ", ".join(f"{k}={fmt(v) if isinstance(v, (int, float)) else v}" for k, v in r.items()
                            if k not in ("broker", "args", "scenario"))
        out.append(f"| {r['broker']} | `{r['args']}` | {figures} |")
cluster_path = __file__.replace("report.py", "cluster.jsonl")
try:
    clustered = [json.loads(line) for line in open(cluster_path) if line.strip()]
except OSError:
    clustered = []
if clustered:
    out.append("\n## Cluster (issue 15)\n")
    out.append("Written by `bash bench/cluster.sh`: three clustered `nats-server -js` (2.15.1) and three Herald nodes on "
               "this 2-core machine, against one Herald without `[cluster]`. `fanout` with 100 subscribers; "
               "`cross`: publisher on node 1, subscribers on node 2; `local`: both on node 1 of the cluster; "
               "`3-nodes`: publisher on node 1, subscribers spread over the three nodes. "
               "Latency is from publish to delivery; CPU per delivery sums every Herald and NATS process. "
               "`failover`: 10 subscribers on node 2, QoS 1 at 2,000 deliveries/s from node 1, the NATS server "
               "leading the stream killed 5 s in; the max is the pause (tests/cluster.rs measures it too, "
               "docs/cluster.md).\n")
    out.append("| broker | QoS | target deliveries/s | deliveries/s | lost | p50 ms | p99 ms | max ms | CPU us per delivery (all processes) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in clustered:
        if r.get("scenario") == "inbox" or r.get("args", "").startswith("inbox"):
            continue
        if r.get("scenario") != "fanout":
            out.append(f"| {r['broker']} | failed: `{r['args']}` | | | | | | | |")
            continue
        target = fmt(r["target_rate"]) if r.get("target_rate") else "unthrottled"
        out.append(f"| {r['broker']} | {int(r['qos'])} | {target} | {fmt(r['deliveries_per_s'])} | {fmt(r['lost'])} | "
                   f"{fmt(r.get('p50_ms'))} | {fmt(r.get('p99_ms'))} | {fmt(r.get('max_ms'))} | "
                   f"{fmt(r.get('cpu_us_per_delivery_all'))} |")
inboxes = [r for r in clustered if r.get("scenario") == "inbox" or r.get("args", "").startswith("inbox")]
if inboxes:
    out.append("\n### Private stories across nodes (issue 25)\n")
    out.append("Each story goes to one of 3,000 readers of `users/<i>/inbox` (spread over the three nodes in turn; "
               "on one node without `[cluster]` for the comparison), one publisher on node 1. CPU per delivery is "
               "Herald's, summed over its nodes, with the NATS servers' beside it. Goal: the cluster's Herald CPU "
               "per delivery at most 1.3x one node's (interest-based routing: a story crosses only to its reader's "
               "node).\n")
    out.append("| broker | QoS | target stories/s | delivered/s | lost | p50 ms | p99 ms | Herald CPU us per delivery | NATS CPU us per delivery | Herald ratio to one node |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    single = {(int(r["qos"]), r["target_rate"]): r.get("cpu_us_per_delivery_herald") for r in inboxes
              if r["broker"] == "herald-single" and "qos" in r}
    for r in inboxes:
        base = single.get((int(r.get("qos", -1)), r.get("target_rate")))
        ratio = f"{r['cpu_us_per_delivery_herald'] / base:.2f}x" if base else ""
        if r.get("scenario") != "inbox" or "cpu_us_per_delivery_herald" not in r:
            out.append(f"| {r['broker']} | failed: `{r['args']}` | | | | | | | | |")
            continue
        target = fmt(r["target_rate"]) if r.get("target_rate") else "unthrottled"
        out.append(f"| {r['broker']} | {int(r['qos'])} | {target} | {fmt(r['deliveries_per_s'])} | "
                   f"{fmt(r['lost'])} | {fmt(r.get('p50_ms'))} | {fmt(r.get('p99_ms'))} | "
                   f"{fmt(r.get('cpu_us_per_delivery_herald'))} | {fmt(r.get('cpu_us_per_delivery_nats'))} | {ratio} |")
overload_path = __file__.replace("report.py", "overload.jsonl")
try:
    overload = [json.loads(line) for line in open(overload_path) if line.strip()]
except OSError:
    overload = []
if overload:
    out.append("\n## Overload: the breaking-news lane\n")
    out.append("Written by `bash bench/overload.sh`. 200 readers of `news/#` (QoS 1 subscriptions), 8 publishers of "
               "features at QoS 0 as fast as they go, so the broker (pinned to one core) is saturated, and one newsroom "
               "publishing a breaking story (`news/breaking/x`) at QoS 1 ten times a second. `herald-lanes` has "
               "`[[priority]] news/breaking/# high` and `[degraded] max_queued_messages = 20000`; `herald-plain` "
               "and Mosquitto have no priority class. Target: breaking stories delivered with p99 < 100 ms.\n")
    out.append("| broker | breaking p50 ms | breaking p99 ms | breaking max ms | breaking delivered / expected | "
               "features delivered/s | p99 < 100 ms |")
    out.append("|---|---|---|---|---|---|---|")
    for r in overload:
        if r.get("scenario") != "overload":
            out.append(f"| {r['broker']} | failed | | | | | |")
            continue
        expected = r["breaking_published"] * r["subscribers"]
        met = "yes" if r["breaking_p99_ms"] < 100 and r["breaking_lost"] == 0 else "**no**"
        out.append(f"| {r['broker']} | {fmt(r['breaking_p50_ms'])} | {fmt(r['breaking_p99_ms'])} | "
                   f"{fmt(r['breaking_max_ms'])} | {fmt(r['breaking_delivered'])} / {fmt(expected)} | "
                   f"{fmt(r['features_delivered_per_s'])} | {met} |")
soak_path = __file__.replace("report.py", "soak.jsonl")
try:
    soak = [json.loads(line) for line in open(soak_path) if line.strip()]
except OSError:
    soak = []
samples = [r for r in soak if r.get("scenario") == "soak"]
final = next((r for r in soak if r.get("scenario") == "soak_final"), None)
if samples:
    out.append("\n## Soak (issue 26)\n")
    out.append(f"Written by `bash bench/soak.sh` ({samples[-1]['t'] / 60:.0f} minutes): Herald (defaults, store on disk) "
               "under publishers at 200 stories/s (QoS 1, 4 topics), a burst of 1,000 breaking stories every 3 minutes, "
               "10 persistent readers of `news/#` (QoS 1) that record every story, 10,000 idle phones pinging every 60 s, "
               "1,000 phones reconnecting in churn (persistent sessions, 5-30 s connected, 1-5 s away), 50 SSE streams, "
               "50 long polls, 10 retained updates a second; a SIGHUP reload every 5 minutes and one restart "
               "(SIGTERM, start) halfway, after which every client comes back by itself. A line every 10 s in "
               "`bench/soak.jsonl`; the plot below (dashed lines: reloads, red: the restart).\n")
    out.append("![soak: memory, latency, throughput](../bench/soak.svg)\n")
    pids = []
    for r in samples:
        if r.get("pid") not in pids:
            pids.append(r.get("pid"))
    out.append("| process | from min | to min | resident after warm-up (first at 5 min), MB | resident at the end, MB | "
               "change | max MB | fds at the end | p99 ms, median of its 10-s windows | p99 ms, worst window | worst window's minute |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for pid in pids:
        part = [r for r in samples if r.get("pid") == pid]
        t0 = part[0]["t"]
        warm = [r for r in part if r["t"] - t0 >= 300] or part
        first, end = warm[0].get("rss_mb"), part[-1].get("rss_mb")
        p99s = sorted(r["p99_ms"] for r in part if r.get("p99_ms", -1) >= 0)
        worst = max(part, key=lambda r: r.get("p99_ms", -1))
        change = f"{(end - first) / first * 100:+.1f}%" if first and end else "n/a"
        out.append(f"| {'first' if pid == pids[0] else 'after the restart'} | {t0 / 60:.1f} | {part[-1]['t'] / 60:.1f} | "
                   f"{fmt(first)} | {fmt(end)} | {change} | {fmt(max(r.get('rss_mb', 0) for r in part))} | "
                   f"{fmt(part[-1].get('fds'))} | {fmt(p99s[len(p99s) // 2] if p99s else None)} | "
                   f"{fmt(worst.get('p99_ms'))} | {worst['t'] / 60:.1f} |")
    if final:
        out.append(f"\nAt the end: {fmt(final['acked'])} stories acknowledged, each due to all {int(final['readers'])} "
                   f"readers; **{fmt(final['lost'])} lost**, {fmt(final['duplicates'])} duplicates (stories delivered "
                   f"again after the restart: in flight, unacknowledged by a reader when it went), "
                   f"{fmt(final['reconnects'])} reconnects of the generator's clients.\n")
storm_path = __file__.replace("report.py", "storm.jsonl")
try:
    storm = [json.loads(line) for line in open(storm_path) if line.strip()]
except OSError:
    storm = []
if storm:
    out.append("\n## Reconnect storm (issue 26)\n")
    out.append("Written by `bash bench/storm.sh`: 19,000 persistent phones over TLS (RSA-2048 server certificate), each "
               "subscribed at QoS 1 to its own inbox, disconnect; a story is queued for each; the broker restarts "
               "(SIGTERM, start); then every phone reconnects at once (each with the TLS session it had, if it can "
               "resume it), a phone that gets no CONNACK within 10 s closes and tries again a second later. A live "
               "reader (plain TCP) gets a story every 10 ms through the storm. `herald`: `[tls] ticket_key_file` (the "
               "phones resume across the restart); `herald-nokey`: random ticket keys, lost with the process (full "
               "handshakes, as after a restart of Mosquitto, whose OpenSSL keys are random too). Times are from the "
               "moment the phones start reconnecting. CPU per phone is the broker's over the storm (handshake, session, "
               "story) divided by the phones; the generator's own CPU beside it says when the generator, not the "
               "broker, set the pace.\n")
    out.append("| broker | all back with their story, s | CONNACK p50 / p99 ms | TLS resumed | retries | broker CPU per phone us | "
               "broker CPU s | generator CPU s | live reader p50 / p99 / max ms | resident MB after |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in storm:
        if r.get("scenario") != "storm":
            out.append(f"| {r['broker']} | failed | | | | | | | | |")
            continue
        out.append(f"| {r['broker']} | {fmt(r['all_back_s'])} | {fmt(r['connack_p50_ms'])} / {fmt(r['connack_p99_ms'])} | "
                   f"{fmt(r['resumed'])} of {fmt(r['phones'])} | {fmt(r['retries'])} | {fmt(r.get('cpu_us_per_phone'))} | "
                   f"{fmt(r.get('broker_cpu_s'))} | {fmt(r.get('generator_cpu_s'))} | "
                   f"{fmt(r['live_p50_ms'])} / {fmt(r['live_p99_ms'])} / {fmt(r['live_max_ms'])} | {fmt(r.get('rss_mb'))} |")
try:
    out.append("\n" + open(__file__.replace("report.py", "notes.md")).read())
except OSError:
    pass
print("\n".join(out))
