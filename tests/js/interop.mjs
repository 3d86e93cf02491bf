// Node's MQTT.js against Herald: for each URL given (mqtt://, ws://, wss://) and each protocol
// version (3.1.1 and 5), a subscriber and a publisher exchange a retained message and live
// messages at QoS 0, 1 and 2; MQTT 5 adds a user property and a subscription identifier.
// Prints one JSON line per case and exits 1 on the first failure.
//
//   node interop.mjs <ca.pem> mqtt://127.0.0.1:P ws://127.0.0.1:P/mqtt wss://localhost:P/mqtt
import fs from "node:fs";
import mqtt from "mqtt";

const [caPath, ...urls] = process.argv.slice(2);
const ca = fs.readFileSync(caPath);
const deadline = (ms, what) => new Promise((_, reject) => setTimeout(() => reject(new Error("timed out: " + what)), ms));

function connect(url, protocolVersion, clientId) {
  const client = mqtt.connect(url, { protocolVersion, clientId, clean: true, ca, reconnectPeriod: 0, connectTimeout: 10000 });
  return Promise.race([
    new Promise((resolve, reject) => {
      client.once("connect", (connack) => resolve({ client, connack }));
      client.once("error", reject);
    }),
    deadline(15000, "CONNACK from " + url),
  ]);
}

async function oneCase(url, protocolVersion) {
  const tag = url.split(":")[0] + "-v" + protocolVersion + "-" + process.pid;
  const topic = "interop/" + tag;
  const { client: pub } = await connect(url, protocolVersion, "pub-" + tag);
  await pub.publishAsync(topic + "/retained", "kept for later", { qos: 1, retain: true });
  const { client: sub } = await connect(url, protocolVersion, "sub-" + tag);
  const got = [];
  const all = new Promise((resolve) => {
    sub.on("message", (t, payload, packet) => {
      got.push({ topic: t, payload: payload.toString(), qos: packet.qos, retain: packet.retain, properties: packet.properties || null });
      if (got.length === 4) resolve();
    });
  });
  const subOptions = protocolVersion === 5 ? { qos: 2, properties: { subscriptionIdentifier: 42 } } : { qos: 2 };
  const granted = await sub.subscribeAsync(topic + "/#", subOptions);
  if (granted[0].qos !== 2) throw new Error("granted " + JSON.stringify(granted));
  // Each story its own id: Herald drops a repeated story id as a duplicate (docs/news-delivery.md).
  for (const qos of [0, 1, 2]) {
    const properties = protocolVersion === 5 ? { userProperties: { "story-id": "s-" + tag + "-" + qos } } : undefined;
    await pub.publishAsync(topic + "/live", "story at qos " + qos, { qos, properties });
  }
  await Promise.race([all, deadline(15000, "4 messages on " + url + " v" + protocolVersion)]);
  const retained = got.find((m) => m.topic.endsWith("/retained"));
  if (!retained || !retained.retain || retained.payload !== "kept for later") throw new Error("retained: " + JSON.stringify(got));
  const live = got.filter((m) => m.topic.endsWith("/live"));
  const expected = [0, 1, 2].map((q) => "story at qos " + q);
  if (JSON.stringify(live.map((m) => m.payload)) !== JSON.stringify(expected)) throw new Error("live, in order: " + JSON.stringify(live));
  if (JSON.stringify(live.map((m) => m.qos)) !== "[0,1,2]") throw new Error("QoS: " + JSON.stringify(live));
  if (protocolVersion === 5) {
    for (const m of live) {
      if (!m.properties || m.properties.userProperties?.["story-id"] !== "s-" + tag + "-" + m.qos) throw new Error("user property: " + JSON.stringify(m));
      const ids = [].concat(m.properties.subscriptionIdentifier);
      if (ids[0] !== 42) throw new Error("subscription identifier: " + JSON.stringify(m));
    }
  }
  await pub.publishAsync(topic + "/retained", "", { qos: 1, retain: true });
  await Promise.all([pub.endAsync(), sub.endAsync()]);
  return { url, protocolVersion, messages: got.length };
}

for (const url of urls) {
  for (const v of [4, 5]) {
    try {
      console.log(JSON.stringify({ ok: true, ...(await oneCase(url, v)) }));
    } catch (e) {
      console.log(JSON.stringify({ ok: false, url, protocolVersion: v, error: String(e && e.message || e) }));
      process.exit(1);
    }
  }
}
process.exit(0);
