// Headless Chromium (Debian's, at CHROMIUM or /usr/bin/chromium) driven over the DevTools
// protocol by playwright-core, for the browser tests of tests/browser.rs. One mode per run;
// each prints JSON lines (`{"step": ...}`) the Rust test reads, and exits 1 on failure.
//
//   node browser.mjs dashboard <http base> <token> <mqtt url> <screenshot.png>
//   node browser.mjs eventsource <http base>        (steps driven by lines on stdin)
//   node browser.mjs mqttjs <ws url> <wss url> <mqtt url> <port for the pages>
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import mqtt from "mqtt";

const here = path.dirname(fileURLToPath(import.meta.url));
const [mode, ...args] = process.argv.slice(2);
const say = (step, extra = {}) => console.log(JSON.stringify({ step, ...extra }));
const fail = (e) => { say("failed", { error: String(e && e.stack || e) }); process.exit(1); };
const WAIT = 20000;
let onFailure = async () => {};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The tests' certificates come from a throwaway CA the browser does not know.
  args: ["--no-sandbox", "--ignore-certificate-errors", "--disable-gpu"],
});
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

async function publish(url, topic, payload, options) {
  const client = mqtt.connect(url, { protocolVersion: 5, reconnectPeriod: 0 });
  await new Promise((resolve, reject) => { client.once("connect", resolve); client.once("error", reject); });
  await client.publishAsync(topic, payload, options);
  return client;
}

async function dashboard([base, token, mqttUrl, screenshot]) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  onFailure = async () => {
    say("page at failure", { text: await page.evaluate(() => document.body.innerText) });
    await page.screenshot({ path: screenshot, fullPage: true });
  };
  page.on("pageerror", (e) => say("page error", { error: String(e) }));
  // The sign-in form, as an operator would use it.
  await page.goto(base + "/");
  await page.fill("input[name=token]", token);
  await Promise.all([page.waitForURL(base + "/"), page.click("button")]);
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: WAIT });
  await page.waitForFunction(() => document.getElementById("rate-in").textContent !== "-", null, { timeout: WAIT });
  const before = await page.evaluate(() => ({
    clients: Number(document.getElementById("clients-total").textContent),
    stories: document.querySelectorAll("#stories li[data-id]").length,
  }));
  say("loaded", before);
  // A reader and a story: the page must show both without being reloaded.
  const reader = mqtt.connect(mqttUrl, { protocolVersion: 5, clientId: "dashboard-test-reader", reconnectPeriod: 0 });
  await new Promise((resolve) => reader.once("connect", resolve));
  await reader.subscribeAsync("news/#", { qos: 1 });
  const editor = await publish(mqttUrl, "news/world/elections/live", "update 0", { qos: 0 });
  for (let i = 1; i < 30; i++) await editor.publishAsync("news/world/elections/live", "update " + i, { qos: 0 });
  await editor.publishAsync("news/world/elections", "Polls close in the east", {
    qos: 1, properties: { userProperties: { "story-id": "elections-1" } },
  });
  await page.waitForFunction(() => [...document.querySelectorAll("#stories li[data-id]")]
    .some((li) => li.textContent.includes("elections-1") && / acknowledged 1 /.test(li.textContent)), null, { timeout: WAIT });
  await page.waitForFunction((n) => Number(document.getElementById("clients-total").textContent) >= n + 2, before.clients, { timeout: WAIT });
  await page.waitForFunction(() => [...document.querySelectorAll("#topics td")].some((td) => td.textContent === "news/#"), null, { timeout: WAIT });
  const after = await page.evaluate(() => ({
    clients: Number(document.getElementById("clients-total").textContent),
    story: [...document.querySelectorAll("#stories li[data-id]")].find((li) => li.textContent.includes("elections-1")).textContent,
    rateIn: document.getElementById("rate-in").textContent,
    rows: [...document.querySelectorAll("#clients tbody tr")].map((tr) => tr.textContent),
    topics: [...document.querySelectorAll("#topics tbody tr")].map((tr) => tr.textContent),
    degraded: document.getElementById("degraded").textContent,
  }));
  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });
  say("changed", { ...after, screenshot });
  await Promise.all([reader.endAsync(), editor.endAsync()]);
}

async function eventsource([base]) {
  const page = await browser.newPage();
  // A page of the test's own, on Herald's origin (the stream needs no CORS that way); the
  // browser resumes with Last-Event-ID by itself when the stream breaks.
  await page.route(base + "/test/reader.html", (route) => route.fulfill({
    contentType: "text/html",
    body: `<!doctype html><ul id=got></ul><script>
      window.events = [];
      const es = new EventSource("/api/v1/stream?filter=news/%23&client_id=browser-reader-1");
      es.addEventListener("session", (e) => { window.sessions = (window.sessions || 0) + 1; window.present = JSON.parse(e.data).session_present; });
      es.onmessage = (e) => { const m = JSON.parse(e.data); window.events.push({ id: e.lastEventId, payload: m.payload });
        const li = document.createElement("li"); li.textContent = m.payload; document.getElementById("got").append(li); };
    </script>`,
  }));
  await page.goto(base + "/test/reader.html");
  await page.waitForFunction(() => window.sessions === 1, null, { timeout: WAIT });
  say("open");
  for (;;) {
    const line = await nextLine();
    if (line.startsWith("expect ")) {
      const n = Number(line.slice(7));
      await page.waitForFunction((n) => window.events.length >= n, n, { timeout: WAIT });
      const state = await page.evaluate(() => ({ events: window.events, sessions: window.sessions, present: window.present, items: document.querySelectorAll("#got li").length }));
      say("got", state);
    } else if (line === "reconnected?") {
      await page.waitForFunction(() => window.sessions >= 2, null, { timeout: WAIT });
      say("reconnected", { present: await page.evaluate(() => window.present) });
    } else if (line === "done") {
      return;
    }
  }
}

async function mqttjs([wsUrl, wssUrl, mqttUrl, pagePort]) {
  const bundle = fs.readFileSync(path.join(here, "node_modules/mqtt/dist/mqtt.min.js"), "utf8");
  const pageHtml = (url) => `<!doctype html><script src="/mqtt.min.js"></script><ul id=got></ul><p id=state>starting</p><script>
    const client = mqtt.connect(${JSON.stringify(url)}, { protocolVersion: 5, reconnectPeriod: 0, connectTimeout: 10000 });
    client.on("error", (e) => { document.getElementById("state").textContent = "error: " + e.message; });
    client.on("close", () => { if (document.getElementById("state").textContent !== "subscribed") document.getElementById("state").textContent = "closed"; });
    client.on("connect", () => client.subscribe("news/#", { qos: 1 }, () => { document.getElementById("state").textContent = "subscribed"; }));
    client.on("message", (topic, payload, packet) => { const li = document.createElement("li");
      li.textContent = (packet.retain ? "retained " : "live ") + topic + ": " + payload.toString(); document.getElementById("got").append(li); });
  </script>`;
  // The pages come from a web server of the test's own on 127.0.0.1, reached under two
  // origins: http://localhost:P (the listener's allowed_origins) and http://127.0.0.1:P (not).
  const server = http.createServer((req, res) => {
    if (req.url === "/mqtt.min.js") { res.writeHead(200, { "content-type": "text/javascript" }); res.end(bundle); return; }
    const name = req.url.replace(/^\/|\.html$/g, "");
    const url = { ws: wsUrl, wss: wssUrl }[name];
    if (!url) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { "content-type": "text/html" }); res.end(pageHtml(url));
  });
  await new Promise((resolve) => server.listen(Number(pagePort), "127.0.0.1", resolve));
  const port = server.address().port;
  const allowed = "http://localhost:" + port, other = "http://127.0.0.1:" + port;
  say("serving", { allowed, other });
  const context = await browser.newContext();
  for (const [name] of [["ws", wsUrl], ["wss", wssUrl]]) {
    const page = await context.newPage();
    page.on("console", (m) => say("console", { text: m.text() }));
    onFailure = async () => say("page at failure", { text: await page.evaluate(() => document.body.innerText) });
    await page.goto(allowed + "/" + name + ".html");
    await page.waitForFunction(() => document.getElementById("state").textContent === "subscribed", null, { timeout: WAIT });
    await page.waitForFunction(() => document.querySelectorAll("#got li").length >= 1, null, { timeout: WAIT });
    const editor = await publish(mqttUrl, "news/live/" + name, "live over " + name, { qos: 1 });
    await page.waitForFunction((n) => [...document.querySelectorAll("#got li")].some((li) => li.textContent === "live news/live/" + n + ": live over " + n), name, { timeout: WAIT });
    const got = await page.evaluate(() => [...document.querySelectorAll("#got li")].map((li) => li.textContent));
    say("page", { transport: name, origin: allowed, got });
    await editor.endAsync();
    await page.close();
    const refused = await context.newPage();
    const said = [];
    refused.on("console", (m) => said.push(m.text()));
    await refused.goto(other + "/" + name + ".html");
    await refused.waitForFunction(() => /^(error|closed)/.test(document.getElementById("state").textContent), null, { timeout: WAIT });
    say("refused", { transport: name, origin: other, state: await refused.evaluate(() => document.getElementById("state").textContent), console: said });
    await refused.close();
  }
  server.close();
}

try {
  if (mode === "dashboard") await dashboard(args);
  else if (mode === "eventsource") await eventsource(args);
  else if (mode === "mqttjs") await mqttjs(args);
  else throw new Error("unknown mode " + mode);
  say("done");
  await browser.close();
  process.exit(0);
} catch (e) {
  await onFailure().catch(() => {});
  fail(e);
}
