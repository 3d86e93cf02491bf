//! Herald's load generator. It speaks MQTT 3.1.1 through Herald's own codec (no client library
//! in the way, so the generator is not the bottleneck) to any broker on loopback, runs one
//! scenario bounded in time, and prints one JSON line.
//!
//!     herald-loadgen SCENARIO --port N [--broker-pid PID] [options]
//!
//! Scenarios: `fanin` (P publishers -> one `news/#` subscriber), `fanout` (one publisher -> N
//! `news/tech` subscribers), `conns` (C idle connections, resident memory per connection),
//! `retained` (R retained messages, then the time for a new `news/#` subscriber to get them),
//! `fill` (S offline persistent sessions and M messages queued for each, for start-up timing),
//! `sse` (one publisher -> N Server-Sent Events streams over HTTP).
//! `fanin --persistent true` makes the subscriber a persistent session: the durable rate.
//! Each payload carries its send time and a sequence number, so latency and loss are exact.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use herald::codec::{
    Connect, Decoder, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, Role, Subscribe,
    SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

mod breaking;
mod phones;
mod soak;
use breaking::breaking;
use phones::{conns, http_idle, storm, subscribe_packet};
use soak::soak;

const PAYLOAD: usize = 256;

fn clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    clock().elapsed().as_nanos() as u64
}

#[derive(Clone)]
struct Opts(HashMap<String, String>);

impl Opts {
    fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> T {
        self.0.get(key).map(|v| v.parse().unwrap_or_else(|_| panic!("bad --{key}"))).unwrap_or(default)
    }
}

fn payload(publisher: u32, seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD);
    b.put_u64(now_ns());
    b.put_u32(publisher);
    b.put_u64(seq);
    b.resize(PAYLOAD, b'n');
    b.freeze()
}

/// An MQTT 3.1.1 CONNECT with a keep-alive of 600 s, as every client of the generator sends.
fn connect_packet(client_id: &str, clean: bool) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: clean,
        keep_alive: 600,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }))
}

/// A connection split for concurrent reading and writing.
struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    decoder: Decoder,
    buf: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr, client_id: &str) -> Conn {
        Conn::open_session(addr, client_id, true).await
    }

    /// `clean` false opens (or resumes) a persistent session, whose messages the broker stores.
    async fn open_session(addr: SocketAddr, client_id: &str, clean: bool) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        let mut decoder = Decoder::new(Role::Client, u32::MAX);
        decoder.version = Some(ProtocolVersion::V3_1_1);
        let mut c = Conn { reader, writer, decoder, buf: BytesMut::with_capacity(64 * 1024) };
        c.send(&[connect_packet(client_id, clean)]).await;
        match c.next().await {
            Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS => c,
            other => panic!("CONNECT refused: {other:?}"),
        }
    }

    async fn send(&mut self, packets: &[Packet]) {
        let mut out = BytesMut::new();
        for p in packets {
            p.encode(ProtocolVersion::V3_1_1, &mut out);
        }
        self.writer.write_all(&out).await.expect("write");
    }

    async fn next(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf).expect("valid packet from the broker") {
                return Some(p);
            }
            reserve(&mut self.buf);
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Every complete packet now buffered, after at least one read.
    async fn next_batch(&mut self, out: &mut Vec<Packet>) -> bool {
        out.clear();
        while out.is_empty() {
            reserve(&mut self.buf);
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            while let Some(p) = self.decoder.decode(&mut self.buf).expect("valid packet from the broker") {
                out.push(p);
            }
        }
        true
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let s = Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![(filter.into(), SubscriptionOptions { qos, ..Default::default() })],
        };
        self.send(&[Packet::Subscribe(s)]).await;
        match self.next().await {
            Some(Packet::SubAck(a)) if a.reasons[0].0 < 0x80 => {}
            other => panic!("SUBSCRIBE refused: {other:?}"),
        }
    }
}

/// Keeps room for a large read: `read_buf` on a full `BytesMut` would read 64 bytes at a time.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
}

fn publish(topic: &str, qos: QoS, packet_id: u16, retain: bool, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload,
    })
}

/// What subscribers saw: deliveries, latencies in microseconds, and per-publisher sequence checks.
#[derive(Default)]
struct Received {
    count: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    /// When the last delivery arrived (`now_ns`).
    last_ns: AtomicU64,
}

impl Received {
    fn counted(&self, n: u64) {
        self.count.fetch_add(n, Relaxed);
        self.last_ns.fetch_max(now_ns(), Relaxed);
    }

    /// Deliveries per second from `start` to the last delivery. Unthrottled, a broker that
    /// buffers delivers long after the publisher stopped: dividing by the publishing time alone
    /// reported rumqttd at 9.39M deliveries/s for 0.22 us of CPU each, two cores' worth on one.
    fn rate_since(&self, start: Instant) -> f64 {
        let start_ns = start.duration_since(clock()).as_nanos() as u64;
        let secs = self.last_ns.load(Relaxed).saturating_sub(start_ns) as f64 / 1e9;
        self.count.load(Relaxed) as f64 / secs.max(1e-9)
    }
}

/// Reads PUBLISHes until `stop`, acknowledging QoS 1 in batches, recording latency.
async fn subscriber_loop(mut c: Conn, received: Arc<Received>, stop: Arc<AtomicBool>) {
    let mut batch = Vec::new();
    let mut local = Vec::with_capacity(1 << 16);
    loop {
        let read = tokio::time::timeout(Duration::from_millis(200), c.next_batch(&mut batch)).await;
        match read {
            Err(_) => {
                if stop.load(Relaxed) {
                    break;
                }
                continue;
            }
            Ok(false) => break,
            Ok(true) => {}
        }
        let now = now_ns();
        let mut acks = Vec::new();
        for p in batch.drain(..) {
            if let Packet::Publish(p) = p {
                let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                local.push(((now.saturating_sub(sent)) / 1000).min(u32::MAX as u64) as u32);
                if p.qos == QoS::AtLeastOnce {
                    acks.push(Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS)));
                }
            }
        }
        received.counted(local.len() as u64);
        received.latencies_us.lock().unwrap().append(&mut local);
        if !acks.is_empty() {
            c.send(&acks).await;
        }
    }
}

/// One publisher: QoS 0 written in batches, or QoS 1 within a window of unacknowledged messages.
/// `rate` is messages per second for this publisher; 0 means as fast as possible.
/// Publishes `topic` at `rate` messages a second (0: as fast as acknowledgements allow) until
/// `until`. With `spread` > 0, `{}` in `topic` is replaced by 0, 1, ... `spread` - 1 in turn
/// (`users/{}/inbox`: one reader's inbox per message).
async fn publisher_loop(
    c: Conn,
    id: u32,
    topic: String,
    qos: QoS,
    rate: f64,
    until: Instant,
    spread: u64,
) -> (u64, u64) {
    let window = Arc::new(Semaphore::new(if qos == QoS::AtMostOnce { 0 } else { 100 }));
    let acked = Arc::new(AtomicU64::new(0));
    let Conn { mut reader, mut writer, mut decoder, mut buf } = c;
    let ack_task = {
        let window = window.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                reserve(&mut buf);
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while let Ok(Some(p)) = decoder.decode(&mut buf) {
                    if let Packet::PubAck(_) = p {
                        acked.fetch_add(1, Relaxed);
                        window.add_permits(1);
                    }
                }
            }
        })
    };
    let start = Instant::now();
    let mut seq = 0u64;
    let mut out = BytesMut::new();
    while Instant::now() < until {
        let due = if rate > 0.0 { ((start.elapsed().as_secs_f64() * rate) as u64).saturating_sub(seq) } else { 64 };
        if due == 0 {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let mut n = due.min(64);
        if qos != QoS::AtMostOnce {
            let Ok(p) = tokio::time::timeout(Duration::from_millis(100), window.acquire_many(1)).await else {
                continue;
            };
            p.expect("window semaphore").forget();
            n = 1 + (window.available_permits() as u64).min(n - 1);
            if n > 1 {
                window.acquire_many((n - 1) as u32).await.unwrap().forget();
            }
        }
        for _ in 0..n {
            seq += 1;
            let packet_id = if qos == QoS::AtMostOnce { 0 } else { (seq % 65535 + 1) as u16 };
            let topic = if spread > 0 { topic.replace("{}", &((seq - 1) % spread).to_string()) } else { topic.clone() };
            publish(&topic, qos, packet_id, false, payload(id, seq)).encode(ProtocolVersion::V3_1_1, &mut out);
        }
        if writer.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
        // Publishers share the generator's one core with the subscribers: let them read.
        tokio::task::yield_now().await;
    }
    // Give outstanding acknowledgements a moment to arrive.
    if qos != QoS::AtMostOnce {
        let deadline = Instant::now() + Duration::from_secs(10);
        while acked.load(Relaxed) < seq && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    ack_task.abort();
    let _ = writer.write_all(&[0xE0, 0]).await;
    (seq, acked.load(Relaxed))
}

/// CPU time (user + system) the broker process has used, in microseconds.
fn broker_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = 100; // USER_HZ on Linux
    Some(ticks * 1_000_000 / hz)
}

/// Context switches of every thread of `pid` (voluntary and not), summed.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    let mut n = 0;
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in status.lines().filter(|l| l.contains("ctxt_switches:")) {
            n += l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    n
}

fn broker_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return -1.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Report(Vec<(String, String)>);

impl Report {
    fn new(scenario: &str) -> Self {
        Report(vec![("scenario".into(), format!("\"{scenario}\""))])
    }
    fn num(&mut self, k: &str, v: f64) -> &mut Self {
        let v = if v.is_finite() { format!("{v:.3}") } else { "null".into() };
        self.0.push((k.into(), v));
        self
    }
    fn list(&mut self, k: &str, v: &[f64]) -> &mut Self {
        let items: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
        self.0.push((k.into(), format!("[{}]", items.join(","))));
        self
    }
    fn print(&self) {
        let body: Vec<String> = self.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        println!("{{{}}}", body.join(","));
    }
}

/// Waits up to 10 s for the subscribers to have received `expect` messages.
async fn drain(received: &Received, expect: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.count.load(Relaxed) < expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn latency_fields(r: &mut Report, received: &Received) {
    let mut l = std::mem::take(&mut *received.latencies_us.lock().unwrap());
    l.sort_unstable();
    r.num("p50_ms", percentile(&l, 0.50)).num("p99_ms", percentile(&l, 0.99)).num("p999_ms", percentile(&l, 0.999));
    r.num("max_ms", percentile(&l, 1.0));
}

async fn fanin(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let publishers: u32 = o.get("publishers", 8);
    let qos = QoS::from_u8(o.get("qos", 0)).unwrap();
    let rate: f64 = o.get("rate", 0.0);
    let secs: f64 = o.get("duration", 10.0);
    // A persistent subscriber makes every QoS 1 message durable before its PUBACK.
    let persistent: bool = o.get("persistent", false);
    let received = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut sub = Conn::open_session(addr, "bench-fanin-sub", !persistent).await;
    sub.subscribe("news/#", qos).await;
    let sub_task = tokio::spawn(subscriber_loop(sub, received.clone(), stop.clone()));
    let mut pubs = Vec::new();
    for i in 0..publishers {
        pubs.push(Conn::open(addr, &format!("bench-fanin-pub-{i}")).await);
    }
    let cpu0 = pid.and_then(broker_cpu_us);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(publisher_loop(c, i as u32, format!("news/desk{i}"), qos, rate / publishers as f64, until, 0))
        })
        .collect();
    let (mut sent, mut acked) = (0, 0);
    for t in tasks {
        let (s, a) = t.await.unwrap();
        sent += s;
        acked += a;
    }
    let expect = if qos == QoS::AtMostOnce { sent } else { acked };
    drain(&received, expect).await;
    let cpu1 = pid.and_then(broker_cpu_us);
    stop.store(true, Relaxed);
    let _ = sub_task.await;
    let got = received.count.load(Relaxed);
    let mut r = Report::new("fanin");
    r.num("qos", qos as u8 as f64).num("publishers", publishers as f64).num("target_rate", rate);
    r.num("persistent", f64::from(u8::from(persistent)));
    r.num("sent", sent as f64).num("acked", acked as f64).num("delivered", got as f64);
    r.num("lost", expect.saturating_sub(got) as f64).num("rate_per_s", received.rate_since(start));
    latency_fields(&mut r, &received);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("cpu_us_per_msg", (b - a) as f64 / got.max(1) as f64);
    }
    r.print();
}

/// `count` subscribers, subscriber `i` as `client_and_filter(i)`, each reading in a task of its
/// own. `--sub-port P[,P...]`: on other nodes of a cluster than the publisher, spread over the
/// ports in turn (default: the publisher's).
async fn spread_subscribers(
    addr: SocketAddr,
    o: &Opts,
    count: u32,
    qos: QoS,
    received: &Arc<Received>,
    stop: &Arc<AtomicBool>,
    client_and_filter: impl Fn(u32) -> (String, String),
) -> Vec<tokio::task::JoinHandle<()>> {
    let sub_ports: Vec<u16> = o
        .get("sub-port", addr.port().to_string())
        .split(',')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("bad --sub-port")))
        .collect();
    let mut subs = Vec::new();
    for i in 0..count {
        let sub_addr = SocketAddr::from(([127, 0, 0, 1], sub_ports[i as usize % sub_ports.len()]));
        let (client_id, filter) = client_and_filter(i);
        let mut c = Conn::open(sub_addr, &client_id).await;
        c.subscribe(&filter, qos).await;
        subs.push(tokio::spawn(subscriber_loop(c, received.clone(), stop.clone())));
    }
    subs
}

async fn fanout(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let subscribers: u32 = o.get("subscribers", 1000);
    let qos = QoS::from_u8(o.get("qos", 0)).unwrap();
    let rate: f64 = o.get("rate", 0.0); // deliveries per second in total
    let secs: f64 = o.get("duration", 10.0);
    let received = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    let subs = spread_subscribers(addr, o, subscribers, qos, &received, &stop, |i| {
        (format!("bench-fanout-sub-{i}"), "news/tech".to_owned())
    })
    .await;
    let publisher = Conn::open(addr, "bench-fanout-pub").await;
    let cpu0 = pid.and_then(broker_cpu_us);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let pub_rate = if rate > 0.0 { rate / subscribers as f64 } else { 0.0 };
    let (sent, acked) = publisher_loop(publisher, 0, "news/tech".into(), qos, pub_rate, until, 0).await;
    let expect = subscribers as u64 * if qos == QoS::AtMostOnce { sent } else { acked };
    drain(&received, expect).await;
    let cpu1 = pid.and_then(broker_cpu_us);
    stop.store(true, Relaxed);
    for s in subs {
        let _ = s.await;
    }
    let got = received.count.load(Relaxed);
    let mut r = Report::new("fanout");
    r.num("qos", qos as u8 as f64).num("subscribers", subscribers as f64).num("target_rate", rate);
    r.num("published", sent as f64).num("delivered", got as f64).num("lost", expect.saturating_sub(got) as f64);
    // From the first publish to the last delivery, the window the CPU is sampled over.
    r.num("deliveries_per_s", received.rate_since(start));
    latency_fields(&mut r, &received);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("cpu_us_per_delivery", (b - a) as f64 / got.max(1) as f64);
    }
    r.print();
}

/// Private stories (issue 25): `--readers` clients, each subscribed to its own
/// `users/<i>/inbox` at `--qos`, spread over the `--sub-port` nodes in turn; one publisher on
/// `--port` sends each story to the next reader's inbox at `--rate` stories a second for
/// `--duration` seconds. Every story has one reader: deliveries equal stories.
async fn inbox(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let readers: u32 = o.get("readers", 3000);
    let qos = QoS::from_u8(o.get("qos", 1)).unwrap();
    let rate: f64 = o.get("rate", 2000.0);
    let secs: f64 = o.get("duration", 10.0);
    let received = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    let subs = spread_subscribers(addr, o, readers, qos, &received, &stop, |i| {
        (format!("bench-inbox-{i}"), format!("users/{i}/inbox"))
    })
    .await;
    let publisher = Conn::open(addr, "bench-inbox-pub").await;
    // `--node-pids P,P,P` and `--nats-pids P,P,P`: every Herald node's and NATS server's CPU,
    // summed, from here on (the readers' connections made).
    let pids = |key: &str| -> Vec<u32> {
        let list: String = o.get(key, String::new());
        list.split(',').filter(|p| !p.is_empty()).map(|p| p.parse().expect("a pid")).collect()
    };
    let (nodes, nats) = (pids("node-pids"), pids("nats-pids"));
    let summed = |pids: &[u32]| pids.iter().filter_map(|p| broker_cpu_us(*p)).sum::<u64>();
    // The readers are subscribed, but a node may still be finishing what their connecting
    // started (a cluster node applies the others' interest and session records): measured
    // from when the nodes are quiet (under 2% of a core for 100 ms), for at most 5 s.
    for _ in 0..50 {
        let before = summed(&nodes);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if summed(&nodes) - before < 2_000 {
            break;
        }
    }
    let (nodes0, nats0) = (summed(&nodes), summed(&nats));
    let each0: Vec<u64> = nodes.iter().map(|p| broker_cpu_us(*p).unwrap_or(0)).collect();
    let switches0: u64 = nodes.iter().map(|p| context_switches(*p)).sum();
    let cpu0 = pid.and_then(broker_cpu_us);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let (sent, acked) =
        publisher_loop(publisher, 0, "users/{}/inbox".into(), qos, rate, until, u64::from(readers)).await;
    let expect = if qos == QoS::AtMostOnce { sent } else { acked };
    drain(&received, expect).await;
    let cpu1 = pid.and_then(broker_cpu_us);
    // Sampled before the readers leave: the stories are what is measured, as connecting is not
    // (leaving costs a cluster node more than one node alone: reported beside, per reader).
    let (nodes1, nats1) = (summed(&nodes), summed(&nats));
    let each1: Vec<u64> = nodes.iter().map(|p| broker_cpu_us(*p).unwrap_or(0)).collect();
    let switches1: u64 = nodes.iter().map(|p| context_switches(*p)).sum();
    stop.store(true, Relaxed);
    for s in subs {
        let _ = s.await;
    }
    let got = received.count.load(Relaxed);
    // The nodes' CPU while the readers leave and in the 2 s after (a cluster node tells the
    // others that their sessions and interests are gone).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nodes2 = summed(&nodes);
    let mut r = Report::new("inbox");
    r.num("qos", qos as u8 as f64).num("readers", readers as f64).num("target_rate", rate);
    r.num("published", sent as f64).num("delivered", got as f64).num("lost", expect.saturating_sub(got) as f64);
    r.num("deliveries_per_s", received.rate_since(start));
    latency_fields(&mut r, &received);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("cpu_us_per_delivery", (b - a) as f64 / got.max(1) as f64);
    }
    if !nodes.is_empty() {
        r.num("cpu_us_per_delivery_herald", (nodes1 - nodes0) as f64 / got.max(1) as f64);
        r.num("cpu_us_per_delivery_nats", (nats1 - nats0) as f64 / got.max(1) as f64);
        r.num("cpu_us_per_reader_leaving_herald", (nodes2 - nodes1) as f64 / f64::from(readers.max(1)));
        r.num("context_switches_per_delivery_herald", (switches1 - switches0) as f64 / got.max(1) as f64);
        // Each node's share, in the order of `--node-pids` (the publisher's node first).
        for (i, (a, b)) in each0.iter().zip(&each1).enumerate() {
            r.num(&format!("cpu_us_per_delivery_node_{}", i + 1), (b - a) as f64 / got.max(1) as f64);
        }
    }
    r.print();
}

async fn retained(addr: SocketAddr, o: &Opts) {
    let count: u64 = o.get("messages", 10_000);
    let qos = QoS::from_u8(o.get("qos", 1)).unwrap();
    let mut p = Conn::open(addr, "bench-retained-pub").await;
    // Stored at QoS 1 in acknowledged windows so that every one is known to be there.
    let mut seq = 0;
    while seq < count {
        let n = (count - seq).min(100);
        let batch: Vec<Packet> = (0..n)
            .map(|i| {
                publish(&format!("news/story/{}", seq + i), QoS::AtLeastOnce, (i + 1) as u16, true, payload(0, seq + i))
            })
            .collect();
        p.send(&batch).await;
        let mut acks = 0;
        while acks < n {
            match p.next().await {
                Some(Packet::PubAck(_)) => acks += 1,
                Some(_) => {}
                None => panic!("publisher closed"),
            }
        }
        seq += n;
    }
    let mut sub = Conn::open(addr, "bench-retained-sub").await;
    let s = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![("news/#".into(), SubscriptionOptions { qos, ..Default::default() })],
    };
    let start = Instant::now();
    sub.send(&[Packet::Subscribe(s)]).await;
    let mut got = 0u64;
    let mut batch = Vec::new();
    let deadline = start + Duration::from_secs(10);
    while got < count {
        match tokio::time::timeout_at(deadline.into(), sub.next_batch(&mut batch)).await {
            Ok(true) => {}
            _ => break,
        }
        let (n, acks) = take_publishes(&mut batch);
        got += n;
        if !acks.is_empty() {
            sub.send(&acks).await;
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut r = Report::new("retained");
    r.num("qos", qos as u8 as f64).num("retained", count as f64).num("delivered", got as f64).num("ms", ms);
    r.print();
    // Clear them so the next scenario starts from an empty store.
    let clear: Vec<Packet> =
        (0..count).map(|i| publish(&format!("news/story/{i}"), QoS::AtMostOnce, 0, true, Bytes::new())).collect();
    for chunk in clear.chunks(1000) {
        p.send(chunk).await;
    }
}

/// Fills the broker's store: `sessions` persistent sessions subscribe to `news/#` and go
/// offline, then `messages` QoS 1 messages are published to them, each queued for every session
/// (sessions x messages queue entries, `messages` bodies).
async fn fill(addr: SocketAddr, o: &Opts) {
    let sessions: u32 = o.get("sessions", 1000);
    let messages: u64 = o.get("messages", 1000);
    let start = Instant::now();
    for i in 0..sessions {
        let mut c = Conn::open_session(addr, &format!("bench-fill-{i}"), false).await;
        c.subscribe("news/#", QoS::AtLeastOnce).await;
        let _ = c.writer.write_all(&[0xE0, 0]).await;
    }
    let c = Conn::open(addr, "bench-fill-pub").await;
    let until = Instant::now() + Duration::from_secs(3600);
    // One message at a time: each is fanned out to every offline session.
    let (sent, acked) = fill_publish(c, messages, until).await;
    let mut r = Report::new("fill");
    r.num("sessions", sessions as f64).num("messages", sent as f64).num("acked", acked as f64);
    r.num("queued", (acked * u64::from(sessions)) as f64).num("seconds", start.elapsed().as_secs_f64());
    r.print();
}

/// Counts the PUBLISHes of a batch and makes the PUBACKs for those at QoS 1.
fn take_publishes(batch: &mut Vec<Packet>) -> (u64, Vec<Packet>) {
    let mut acks = Vec::new();
    let mut n = 0;
    for p in batch.drain(..) {
        if let Packet::Publish(p) = p {
            n += 1;
            if p.qos == QoS::AtLeastOnce {
                acks.push(Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS)));
            }
        }
    }
    (n, acks)
}

/// Brings back what `fill` left: the `sessions` persistent sessions reconnect, `--parallel` at
/// a time, and each reads and acknowledges `messages` queued messages. Reports the time from
/// CONNECT to the first message (what a phone waits for, a lazily read queue included) and the
/// time to drain everything.
async fn drain_sessions(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let sessions: u32 = o.get("sessions", 1000);
    let messages: u64 = o.get("messages", 1000);
    let parallel: usize = o.get("parallel", 100);
    let gate = Arc::new(Semaphore::new(parallel));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let asked = Instant::now();
            let mut c = Conn::open_session(addr, &format!("bench-fill-{i}"), false).await;
            let (mut first_us, mut got, mut batch) = (None, 0u64, Vec::new());
            // What came with the CONNACK is already buffered: `next_batch` reads before decoding.
            while let Some(p) = c.decoder.decode(&mut c.buf).expect("valid packet from the broker") {
                batch.push(p);
            }
            while got < messages {
                if batch.is_empty() {
                    match tokio::time::timeout(Duration::from_secs(30), c.next_batch(&mut batch)).await {
                        Ok(true) => {}
                        _ => break,
                    }
                }
                first_us.get_or_insert(asked.elapsed().as_micros().min(u32::MAX as u128) as u32);
                let (n, acks) = take_publishes(&mut batch);
                got += n;
                c.send(&acks).await;
            }
            let _ = c.writer.write_all(&[0xE0, 0]).await;
            (first_us.unwrap_or(u32::MAX), got)
        }));
    }
    let (mut firsts, mut received, mut short) = (Vec::new(), 0, 0);
    for t in tasks {
        let (first, got) = t.await.unwrap();
        firsts.push(first);
        received += got;
        short += u32::from(got < messages);
    }
    let secs = start.elapsed().as_secs_f64();
    firsts.sort_unstable();
    let mut r = Report::new("drain");
    r.num("sessions", sessions as f64).num("received", received as f64).num("short", short as f64);
    r.num("seconds", secs);
    r.num("msgs_per_s", received as f64 / secs);
    r.num("first_p50_ms", percentile(&firsts, 0.50)).num("first_p99_ms", percentile(&firsts, 0.99));
    if let Some(rss) = pid.and_then(broker_rss_bytes) {
        r.num("rss_mb", rss as f64 / 1e6);
    }
    // And after `--settle` seconds of quiet: what the broker gave back (allocators return freed
    // memory after a delay; the sessions are parked, their queues empty).
    let settle: f64 = o.get("settle", 3.0);
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    if let Some(rss) = pid.and_then(broker_rss_bytes) {
        r.num("rss_settled_mb", rss as f64 / 1e6);
    }
    r.print();
}

async fn fill_publish(mut c: Conn, messages: u64, until: Instant) -> (u64, u64) {
    let mut acked = 0;
    for seq in 1..=messages {
        if Instant::now() > until {
            return (seq - 1, acked);
        }
        let packet_id = (seq % 65535 + 1) as u16;
        c.send(&[publish("news/fill", QoS::AtLeastOnce, packet_id, false, payload(0, seq))]).await;
        if let Some(Packet::PubAck(_)) = c.next().await {
            acked += 1;
        }
    }
    (messages, acked)
}

/// Reads PUBLISHes until `stop`, recording the latency of breaking stories (topics under
/// `news/breaking/`) apart from the rest, which are only counted.
async fn overload_subscriber(mut c: Conn, breaking: Arc<Received>, normal: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut batch = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), c.next_batch(&mut batch)).await {
            Err(_) if stop.load(Relaxed) => break,
            Err(_) => continue,
            Ok(false) => break,
            Ok(true) => {}
        }
        let now = now_ns();
        let mut acks = Vec::new();
        let mut features = 0;
        for p in batch.drain(..) {
            if let Packet::Publish(p) = p {
                if p.topic.starts_with("news/breaking/") {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                    let us = (now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32;
                    breaking.latencies_us.lock().unwrap().push(us);
                    breaking.counted(1);
                } else {
                    features += 1;
                }
                if p.qos == QoS::AtLeastOnce {
                    acks.push(Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS)));
                }
            }
        }
        normal.fetch_add(features, Relaxed);
        if !acks.is_empty() {
            c.send(&acks).await;
        }
    }
}

/// The breaking-news lane under overload [issue 7]: `subscribers` readers of `news/#`, 8
/// publishers of features at QoS 0 as fast as they can (saturating the broker), and one
/// newsroom publishing a breaking story at QoS 1 `--breaking-rate` times a second. Reports the
/// latency of the breaking stories at the readers and how many arrived.
async fn overload(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let subscribers: u32 = o.get("subscribers", 200);
    let secs: f64 = o.get("duration", 10.0);
    let breaking_rate: f64 = o.get("breaking-rate", 10.0);
    let breaking = Arc::new(Received::default());
    let normal = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::new();
    for i in 0..subscribers {
        let mut c = Conn::open(addr, &format!("bench-overload-sub-{i}")).await;
        c.subscribe("news/#", QoS::AtLeastOnce).await;
        subs.push(tokio::spawn(overload_subscriber(c, breaking.clone(), normal.clone(), stop.clone())));
    }
    let cpu0 = pid.and_then(broker_cpu_us);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut pubs = Vec::new();
    for p in 0..8u32 {
        let c = Conn::open(addr, &format!("bench-overload-features-{p}")).await;
        pubs.push(tokio::spawn(publisher_loop(c, p, "news/features/x".into(), QoS::AtMostOnce, 0.0, until, 0)));
    }
    let newsroom = Conn::open(addr, "bench-overload-newsroom").await;
    let (sent, _) =
        publisher_loop(newsroom, 99, "news/breaking/x".into(), QoS::AtLeastOnce, breaking_rate, until, 0).await;
    let mut features_sent = 0;
    for p in pubs {
        features_sent += p.await.map(|(s, _)| s).unwrap_or(0);
    }
    // Breaking stories still on their way get a few seconds; features are not waited for.
    let expect = sent * subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while breaking.count.load(Relaxed) < expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = pid.and_then(broker_cpu_us);
    stop.store(true, Relaxed);
    for s in subs {
        let _ = s.await;
    }
    let got = breaking.count.load(Relaxed);
    let mut lat = std::mem::take(&mut *breaking.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let mut r = Report::new("overload");
    r.num("subscribers", subscribers as f64).num("breaking_published", sent as f64);
    r.num("breaking_delivered", got as f64).num("breaking_lost", expect.saturating_sub(got) as f64);
    r.num("breaking_p50_ms", percentile(&lat, 0.50)).num("breaking_p99_ms", percentile(&lat, 0.99));
    r.num("breaking_max_ms", lat.last().copied().unwrap_or(0) as f64 / 1000.0);
    r.num("features_published", features_sent as f64);
    r.num("features_delivered_per_s", normal.load(Relaxed) as f64 / secs);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("broker_cpu_share", (b - a) as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    r.print();
}

/// Server-Sent Events fan-out: `--streams` readers of `/api/v1/stream?filter=news/tech` on
/// `--http-port`, one MQTT publisher as in `fanout` (QoS 0, `--rate` deliveries per second in
/// all, or unthrottled). Events are counted in the raw bytes (every message event's data starts
/// with `{"content_type"`); latency is read from the payload's send time (base64 in the event)
/// of every 16th event of each stream.
async fn sse(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    use base64::Engine;
    let streams: u32 = o.get("streams", 1000);
    let http_port: u16 = o.get("http-port", 8080);
    let rate: f64 = o.get("rate", 0.0);
    let secs: f64 = o.get("duration", 10.0);
    let received = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    const MARK: &[u8] = b"data: {\"content_type\"";
    const PAYLOAD_AT: &[u8] = b"\"payload\":\"";
    let mut readers = Vec::new();
    for _ in 0..streams {
        let mut s = TcpStream::connect(("127.0.0.1", http_port)).await.expect("the HTTP port");
        s.write_all(
            b"GET /api/v1/stream?filter=news/tech HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
        // The head and the session event: the stream is subscribed once it is here.
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(15).any(|w| w == b"event: session\n") || !head.ends_with(b"\n\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "stream refused: {}", String::from_utf8_lossy(&head));
            head.extend_from_slice(&chunk[..n]);
        }
        let (received, stop) = (received.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            let mut carry: Vec<u8> = Vec::new();
            let mut seen = 0u64;
            let mut local = Vec::new();
            while !stop.load(Relaxed) {
                let n = match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Err(_) => continue,
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => n,
                };
                carry.extend_from_slice(&buf[..n]);
                let mut at = 0;
                let mut count = 0;
                while let Some(p) = carry[at..].windows(MARK.len()).position(|w| w == MARK) {
                    let start = at + p;
                    // The whole event is needed for its payload; otherwise wait for more bytes.
                    let Some(end) = carry[start..].windows(2).position(|w| w == b"\n\n") else { break };
                    count += 1;
                    seen += 1;
                    if seen.is_multiple_of(16) {
                        let event = &carry[start..start + end];
                        if let Some(q) = event.windows(PAYLOAD_AT.len()).position(|w| w == PAYLOAD_AT) {
                            let b64 = &event[q + PAYLOAD_AT.len()..];
                            if let Ok(bytes) =
                                base64::engine::general_purpose::STANDARD.decode(&b64[..12.min(b64.len())])
                            {
                                if bytes.len() >= 8 {
                                    let sent = u64::from_be_bytes(bytes[..8].try_into().unwrap());
                                    local.push(((now_ns().saturating_sub(sent)) / 1000) as u32);
                                }
                            }
                        }
                    }
                    at = start + end + 2;
                }
                received.counted(count);
                carry.drain(..at);
            }
            received.latencies_us.lock().unwrap().extend(local);
        }));
    }
    let publisher = Conn::open(addr, "bench-sse-pub").await;
    let cpu0 = pid.and_then(broker_cpu_us);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let pub_rate = if rate > 0.0 { rate / streams as f64 } else { 0.0 };
    let (sent, _) = publisher_loop(publisher, 0, "news/tech".into(), QoS::AtMostOnce, pub_rate, until, 0).await;
    let expect = streams as u64 * sent;
    drain(&received, expect).await;
    let cpu1 = pid.and_then(broker_cpu_us);
    stop.store(true, Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let got = received.count.load(Relaxed);
    let mut r = Report::new("sse");
    r.num("streams", streams as f64).num("target_rate", rate);
    r.num("published", sent as f64).num("delivered", got as f64).num("lost", expect.saturating_sub(got) as f64);
    // Until the last delivery arrived: unthrottled, readers finish well after the publisher.
    r.num("deliveries_per_s", received.rate_since(start));
    latency_fields(&mut r, &received);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("cpu_us_per_delivery", (b - a) as f64 / got.max(1) as f64);
    }
    r.print();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| {
        eprintln!(
            "usage: herald-loadgen fanin|fanout|inbox|conns|retained --port N [--broker-pid PID] [--key value ...]"
        );
        std::process::exit(2);
    });
    let mut map = HashMap::new();
    while let Some(k) = args.next() {
        let k = k.trim_start_matches("--").to_string();
        let v = args.next().unwrap_or_else(|| panic!("--{k} needs a value"));
        map.insert(k, v);
    }
    let o = Opts(map);
    let addr: SocketAddr = format!("127.0.0.1:{}", o.get::<u16>("port", 1883)).parse().unwrap();
    let pid: Option<u32> = o.0.get("broker-pid").map(|p| p.parse().unwrap());
    clock();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        match scenario.as_str() {
            "fanin" => fanin(addr, &o, pid).await,
            "fanout" => fanout(addr, &o, pid).await,
            "inbox" => inbox(addr, &o, pid).await,
            "conns" => conns(addr, &o, pid).await,
            "retained" => retained(addr, &o).await,
            "fill" => fill(addr, &o).await,
            "drain" => drain_sessions(addr, &o, pid).await,
            "overload" => overload(addr, &o, pid).await,
            "sse" => sse(addr, &o, pid).await,
            "churn" => churn(addr, &o, pid).await,
            "storm" => storm(addr, &o, pid).await,
            "soak" => soak(addr, &o).await,
            "breaking" => breaking(addr, &o, pid).await,
            "http-idle" => http_idle(&o, pid).await,
            other => panic!("unknown scenario {other}"),
        }
    });
}

/// Subscription churn (issue 26): one client subscribes `--filters` filters (a hundred per
/// SUBSCRIBE), then unsubscribes them all, `--rounds` times; each round's filters are new
/// (`churn/<round>/<i>/#`) unless `--same true`. Reports the broker's resident memory after each
/// round's SUBSCRIBEs and after its UNSUBSCRIBEs, and the growth from the first round's end to
/// the last's (memory that does not come back grows with the rounds), and after `--settle`
/// seconds of quiet.
async fn churn(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let rounds: u32 = o.get("rounds", 12);
    let filters: u32 = o.get("filters", 100_000);
    let same: bool = o.get("same", false);
    const PER_PACKET: u32 = 100;
    let mut c = Conn::open(addr, "bench-churn").await;
    let rss0 = pid.and_then(broker_rss_bytes);
    let mut after_sub = Vec::new();
    let mut after_unsub = Vec::new();
    let start = Instant::now();
    for round in 0..rounds {
        let name = |i: u32| format!("churn/{}/{i}/#", if same { 0 } else { round });
        for unsubscribe in [false, true] {
            let mut first = 0;
            let mut packet_id: u16 = 0;
            // A window of packets in flight, acknowledged in order.
            let mut waiting = 0u32;
            while first < filters || waiting > 0 {
                while first < filters && waiting < 16 {
                    packet_id = packet_id.wrapping_add(1).max(1);
                    let last = (first + PER_PACKET).min(filters);
                    let packet = if unsubscribe {
                        Packet::Unsubscribe(herald::codec::Unsubscribe {
                            packet_id,
                            properties: Properties::default(),
                            filters: (first..last).map(name).collect(),
                        })
                    } else {
                        Packet::Subscribe(Subscribe {
                            packet_id,
                            properties: Properties::default(),
                            filters: (first..last)
                                .map(|i| (name(i), SubscriptionOptions { qos: QoS::AtMostOnce, ..Default::default() }))
                                .collect(),
                        })
                    };
                    c.send(&[packet]).await;
                    first = last;
                    waiting += 1;
                }
                match c.next().await {
                    Some(Packet::SubAck(_)) | Some(Packet::UnsubAck(_)) => waiting -= 1,
                    other => panic!("expected SUBACK or UNSUBACK: {other:?}"),
                }
            }
            let rss = pid.and_then(broker_rss_bytes).unwrap_or(0) as f64 / 1048576.0;
            if unsubscribe {
                after_unsub.push(rss)
            } else {
                after_sub.push(rss)
            }
        }
    }
    // What comes back once the client is quiet: allocators give freed memory back to the
    // system after a delay (jemalloc's decay is 10 s), an operator watches over minutes.
    let settle: f64 = o.get("settle", 12.0);
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let settled = pid.and_then(broker_rss_bytes);
    let mut r = Report::new("churn");
    r.num("rounds", f64::from(rounds)).num("filters", f64::from(filters)).num("same", f64::from(u8::from(same)));
    r.num("secs", start.elapsed().as_secs_f64());
    if let Some(b) = rss0 {
        r.num("rss_before_mb", b as f64 / 1048576.0);
    }
    r.list("rss_after_subscribe_mb", &after_sub).list("rss_after_unsubscribe_mb", &after_unsub);
    if let (Some(first), Some(last)) = (after_unsub.first(), after_unsub.last()) {
        r.num("growth_after_first_round_mb", last - first);
    }
    if let Some(b) = settled {
        r.num("rss_settled_mb", b as f64 / 1048576.0);
    }
    r.print();
}
