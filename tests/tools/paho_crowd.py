"""A crowd of paho-mqtt clients on one transport, for tests/transports.rs.

usage: paho_crowd.py PORT mqtt|mqtts|ws|wss CA N PAYLOAD_BYTES

Connects N subscribers to `crowd/#` (QoS 1, MQTT 5), then one more client publishes a message of
PAYLOAD_BYTES (QoS 1) and a small one; prints `ready` once every subscriber has both, intact,
then holds every connection open until stdin closes, and prints `done`.
"""
import sys, ssl, threading, hashlib, paho.mqtt.client as mqtt

port, transport, ca, n, size = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
payload = bytes((i * 7 + 3) % 251 for i in range(size))
digest = hashlib.sha256(payload).hexdigest()
lock = threading.Lock()
connected = threading.Semaphore(0)
received = {}
all_in = threading.Event()


def client(cid):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5,
                    transport="websockets" if transport in ("ws", "wss") else "tcp")
    if transport in ("ws", "wss"):
        c.ws_set_options(path="/mqtt")
    if transport in ("mqtts", "wss"):
        c.tls_set(ca_certs=ca)
    return c


subs = []
for i in range(n):
    c = client(f"crowd-{i}")

    def on_connect(c, u, f, rc, p):
        c.subscribe("crowd/#", qos=1)

    def on_subscribe(c, u, mid, rcs, p):
        connected.release()

    def on_message(c, u, m, i=i):
        ok = (m.topic == "crowd/big" and hashlib.sha256(m.payload).hexdigest() == digest) or \
             (m.topic == "crowd/small" and m.payload == b"small")
        if not ok:
            print(f"crowd-{i}: bad message on {m.topic} ({len(m.payload)} bytes)", flush=True)
            return
        with lock:
            received.setdefault(i, set()).add(m.topic)
            if sum(len(v) for v in received.values()) == 2 * n:
                all_in.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect("localhost", port, keepalive=60)
    c.loop_start()
    subs.append(c)
for _ in range(n):
    if not connected.acquire(timeout=60):
        print("not every subscriber connected", flush=True)
        sys.exit(1)
pub = client("crowd-publisher")
pub.connect("localhost", port)
pub.loop_start()
pub.publish("crowd/big", payload, qos=1).wait_for_publish(60)
pub.publish("crowd/small", b"small", qos=1).wait_for_publish(60)
pub.disconnect()
pub.loop_stop()
if not all_in.wait(60):
    print(f"only {sum(len(v) for v in received.values())} of {2 * n} messages arrived", flush=True)
    sys.exit(1)
print("ready", flush=True)
sys.stdin.read()
for c in subs:
    c.disconnect()
    c.loop_stop()
print("done", flush=True)
