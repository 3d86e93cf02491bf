//! The soak (issue 26, `bench/soak.sh`): an hour of a newsroom's day against one broker, with
//! every client coming back on its own after the broker restarts. Publishers at a steady rate
//! and a breaking-news burst every few minutes (QoS 1, each story's acknowledgement recorded),
//! persistent readers of `news/#` that record every story they get, idle phones pinging, phones
//! reconnecting in churn, SSE streams and long polls, retained updates. Every `--every` seconds
//! one line of figures goes to `--out`; at the end, every acknowledged story a reader never got
//! is counted as lost.

use super::*;

/// Which stories of each publisher were acknowledged, or received by one reader.
struct Seen {
    bits: Mutex<Vec<Vec<u64>>>,
}

impl Seen {
    fn new(publishers: usize) -> Seen {
        Seen { bits: Mutex::new(vec![Vec::new(); publishers]) }
    }

    /// True when new.
    fn mark(&self, publisher: usize, seq: u64) -> bool {
        let mut bits = self.bits.lock().unwrap();
        let Some(b) = bits.get_mut(publisher) else { return false };
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if b.len() <= word {
            b.resize(word + 1, 0);
        }
        let new = b[word] & (1 << bit) == 0;
        b[word] |= 1 << bit;
        new
    }

    /// Stories marked here and not in `other`.
    fn missing_from(&self, other: &Seen) -> u64 {
        let a = self.bits.lock().unwrap();
        let b = other.bits.lock().unwrap();
        a.iter()
            .enumerate()
            .map(|(p, words)| {
                words
                    .iter()
                    .enumerate()
                    .map(|(i, w)| (w & !b[p].get(i).copied().unwrap_or(0)).count_ones() as u64)
                    .sum::<u64>()
            })
            .sum()
    }
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    reconnects: AtomicU64,
    idle_up: AtomicU64,
    pings: AtomicU64,
    churn_connects: AtomicU64,
    sse_events: AtomicU64,
    poll_messages: AtomicU64,
    retained: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

/// A fallible MQTT 3.1.1 connection over TCP: CONNECT up to its CONNACK.
async fn open(addr: SocketAddr, client_id: &str, clean: bool, keepalive: u16) -> std::io::Result<TcpStream> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    s.set_nodelay(true)?;
    let mut connect =
        vec![0x10, (12 + client_id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, if clean { 2 } else { 0 }];
    connect.extend_from_slice(&keepalive.to_be_bytes());
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id.as_bytes());
    s.write_all(&connect).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(std::io::Error::other(format!("CONNACK {ack:?}")));
    }
    Ok(s)
}

/// Wraps a connected stream in the generator's `Conn` (codec and buffer).
fn conn(s: TcpStream) -> Conn {
    let (reader, writer) = s.into_split();
    let mut decoder = Decoder::new(Role::Client, u32::MAX);
    decoder.version = Some(ProtocolVersion::V3_1_1);
    Conn { reader, writer, decoder, buf: BytesMut::with_capacity(64 * 1024) }
}

/// One publisher: `rate` stories a second to `topic` at QoS 1 (with `burst`, `burst` stories
/// every `every` seconds instead), at most 100 unacknowledged; what was not acknowledged when
/// the connection broke is sent again after reconnecting.
#[allow(clippy::too_many_arguments)]
async fn publisher(
    addr: SocketAddr,
    id: usize,
    topic: String,
    rate: f64,
    burst: (u64, f64),
    until: Instant,
    acked: Arc<Seen>,
    k: Arc<Counters>,
) {
    let start = Instant::now();
    let mut seq = 0u64;
    // packet id -> seq, for the stories in flight; resent in order after a reconnect.
    let mut flight: std::collections::BTreeMap<u16, u64> = Default::default();
    let mut next_id: u16 = 0;
    while Instant::now() < until {
        let Ok(s) = open(addr, &format!("soak-pub-{id}"), true, 60).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut c = conn(s);
        let resend: Vec<u64> = std::mem::take(&mut flight).into_values().collect();
        let mut out = Vec::new();
        for s in resend {
            next_id = next_id % 65535 + 1;
            flight.insert(next_id, s);
            out.push(publish(&topic, QoS::AtLeastOnce, next_id, false, payload(id as u32, s)));
        }
        if !out.is_empty() {
            c.send(&out).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        'connected: while Instant::now() < until {
            tokio::select! {
                _ = tick.tick() => {
                    let due = if burst.0 > 0 {
                        // Each burst's stories at once, every `burst.1` seconds.
                        ((start.elapsed().as_secs_f64() / burst.1) as u64 + 1) * burst.0
                    } else {
                        (start.elapsed().as_secs_f64() * rate) as u64
                    };
                    let mut out = Vec::new();
                    while seq < due && flight.len() < 100 {
                        seq += 1;
                        next_id = next_id % 65535 + 1;
                        flight.insert(next_id, seq);
                        out.push(publish(&topic, QoS::AtLeastOnce, next_id, false, payload(id as u32, seq)));
                    }
                    if !out.is_empty() {
                        k.published.fetch_add(out.len() as u64, Relaxed);
                        if c.writer.write_all(&{
                            let mut b = BytesMut::new();
                            for p in &out { p.encode(ProtocolVersion::V3_1_1, &mut b); }
                            b
                        }).await.is_err() {
                            break 'connected;
                        }
                    }
                }
                p = c.next() => match p {
                    Some(Packet::PubAck(a)) => {
                        if let Some(s) = flight.remove(&a.packet_id) {
                            if acked.mark(id, s) {
                                k.acked.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Some(_) => {}
                    None => break 'connected,
                },
            }
        }
        k.reconnects.fetch_add(u64::from(Instant::now() < until), Relaxed);
    }
}

/// A persistent reader of `news/#` at QoS 1: every story it gets is marked, duplicates counted.
async fn reader(addr: SocketAddr, id: usize, until: Instant, got: Arc<Seen>, k: Arc<Counters>) {
    let mut subscribed = false;
    while Instant::now() < until {
        let Ok(s) = open(addr, &format!("soak-reader-{id}"), false, 60).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut c = conn(s);
        if !subscribed {
            c.subscribe("news/#", QoS::AtLeastOnce).await;
            subscribed = true;
        }
        let mut batch = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(500), c.next_batch(&mut batch)).await {
                Err(_) if Instant::now() < until => continue,
                Err(_) | Ok(false) => break,
                Ok(true) => {}
            }
            let now = now_ns();
            let mut acks = Vec::new();
            let mut lat = Vec::new();
            for p in batch.drain(..) {
                if let Packet::Publish(p) = p {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                    let publisher = u32::from_be_bytes(p.payload[8..12].try_into().unwrap()) as usize;
                    let seq = u64::from_be_bytes(p.payload[12..20].try_into().unwrap());
                    if got.mark(publisher, seq) {
                        k.received.fetch_add(1, Relaxed);
                        lat.push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                    } else {
                        k.duplicates.fetch_add(1, Relaxed);
                    }
                    acks.push(Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS)));
                }
            }
            k.latencies_us.lock().unwrap().append(&mut lat);
            if !acks.is_empty() {
                c.send(&acks).await;
            }
        }
        k.reconnects.fetch_add(u64::from(Instant::now() < until), Relaxed);
    }
}

/// An idle phone: a clean session that pings every `keepalive` seconds, reconnecting when the
/// connection breaks.
async fn idle_phone(addr: SocketAddr, id: u32, keepalive: u16, until: Instant, k: Arc<Counters>) {
    // Spread the pings over the period, as phones that connected at different times do.
    let offset = Duration::from_millis(u64::from(id) * 7919 % (u64::from(keepalive) * 1000));
    while Instant::now() < until {
        let Ok(mut s) = open(addr, &format!("soak-idle-{id}"), true, keepalive).await else {
            tokio::time::sleep(Duration::from_millis(500 + u64::from(id % 1000))).await;
            continue;
        };
        k.idle_up.fetch_add(1, Relaxed);
        // A phone learns at once that the server closed its connection (the FIN), not at its
        // next ping: after a restart they all come back together, as phones do.
        let mut wait = offset;
        loop {
            let mut one = [0u8; 1];
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = s.read(&mut one) => break,
            }
            wait = Duration::from_secs(u64::from(keepalive));
            let mut pong = [0u8; 2];
            let ok = s.write_all(&[0xC0, 0]).await.is_ok()
                && tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut pong))
                    .await
                    .is_ok_and(|r| r.is_ok())
                && pong == [0xD0, 0];
            if !ok {
                break;
            }
            k.pings.fetch_add(1, Relaxed);
            if Instant::now() >= until {
                return;
            }
        }
        k.idle_up.fetch_sub(1, Relaxed);
        k.reconnects.fetch_add(1, Relaxed);
    }
}

/// A phone in churn: a persistent session subscribed to its inbox, connected for 5 to 30 s,
/// away for 1 to 5 s, again and again.
async fn churn_phone(addr: SocketAddr, id: u32, until: Instant, k: Arc<Counters>) {
    let mut rng = u64::from(id).wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move |lo: u64, hi: u64| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        lo + (rng >> 33) % (hi - lo)
    };
    tokio::time::sleep(Duration::from_millis(next(0, 5000))).await;
    while Instant::now() < until {
        if let Ok(mut s) = open(addr, &format!("soak-churn-{id}"), false, 60).await {
            k.churn_connects.fetch_add(1, Relaxed);
            let _ = s.write_all(&subscribe_packet(&format!("users/{id}/inbox"))).await;
            let mut suback = [0u8; 5];
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut suback)).await;
            tokio::time::sleep(Duration::from_millis(next(5000, 30000))).await;
            let _ = s.write_all(&[0xE0, 0]).await;
        }
        tokio::time::sleep(Duration::from_millis(next(1000, 5000))).await;
    }
}

/// An SSE stream of `news/soak/0`, counting its events, opened again when it ends.
async fn sse_reader(http: SocketAddr, until: Instant, k: Arc<Counters>) {
    while Instant::now() < until {
        let Ok(mut s) = TcpStream::connect(http).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let req = b"GET /api/v1/stream?filter=news/soak/0 HTTP/1.1\r\nhost: soak\r\naccept: text/event-stream\r\n\r\n";
        if s.write_all(req).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 16384];
        let mut tail = Vec::new();
        loop {
            let n = match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                Err(_) if Instant::now() < until => continue,
                Err(_) | Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
            };
            const MARK: &[u8] = b"data: {\"content_type\"";
            tail.extend_from_slice(&buf[..n]);
            let events = tail.windows(MARK.len()).filter(|w| *w == MARK).count();
            k.sse_events.fetch_add(events as u64, Relaxed);
            // Keep what may hold the start of a marker cut by the read, and no whole one.
            let keep = tail.len().saturating_sub(MARK.len() - 1);
            tail.drain(..keep);
        }
    }
}

/// A long poller of `news/soak/1`: each answer's `next` cursor confirms what it got.
async fn poller(http: SocketAddr, until: Instant, k: Arc<Counters>) {
    let mut after = String::new();
    while Instant::now() < until {
        let query = if after.is_empty() { String::new() } else { format!("&after={after}") };
        let req = format!(
            "GET /api/v1/poll?filter=news/soak/1{query}&wait=20&max=1000 HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n\r\n"
        );
        let answer = async {
            let mut s = TcpStream::connect(http).await?;
            s.write_all(req.as_bytes()).await?;
            let mut all = Vec::new();
            s.read_to_end(&mut all).await?;
            Ok::<_, std::io::Error>(all)
        };
        let Ok(Ok(all)) = tokio::time::timeout(Duration::from_secs(30), answer).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let Some(body) = all.windows(4).position(|w| w == b"\r\n\r\n").map(|i| &all[i + 4..]) else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            // A session the broker no longer has (a restart of a non-persistent poller): start again.
            after.clear();
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let n = v["messages"].as_array().map_or(0, |m| m.len());
        k.poll_messages.fetch_add(n as u64, Relaxed);
        match v["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => after.clear(),
        }
    }
}

/// Retained updates: `status/<i>` for i in 0..100, ten a second.
async fn retained_updates(addr: SocketAddr, until: Instant, k: Arc<Counters>) {
    let mut i = 0u64;
    while Instant::now() < until {
        let Ok(s) = open(addr, "soak-retained", true, 60).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut c = conn(s);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while Instant::now() < until {
            tick.tick().await;
            i += 1;
            let p = publish(&format!("status/{}", i % 100), QoS::AtMostOnce, 0, true, payload(999, i));
            let mut b = BytesMut::new();
            p.encode(ProtocolVersion::V3_1_1, &mut b);
            if c.writer.write_all(&b).await.is_err() {
                break;
            }
            k.retained.fetch_add(1, Relaxed);
        }
    }
}

fn fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count())
}

pub async fn soak(addr: SocketAddr, o: &Opts) {
    let secs: f64 = o.get("duration", 3600.0);
    let every: f64 = o.get("every", 10.0);
    let http = SocketAddr::from(([127, 0, 0, 1], o.get::<u16>("http-port", 0)));
    let pid_file: String = o.get("pid-file", String::new());
    let events_file: String = o.get("events", String::new());
    let out_path: String = o.get("out", "bench/soak.jsonl".to_string());
    let rate: f64 = o.get("rate", 200.0);
    let publishers: usize = o.get("publishers", 4);
    let readers: usize = o.get("readers", 10);
    let idle: u32 = o.get("idle", 10_000);
    let churners: u32 = o.get("churn", 1_000);
    let streams: u32 = o.get("sse", 50);
    let pollers: u32 = o.get("pollers", 50);
    let burst: u64 = o.get("burst", 1000);
    let burst_every: f64 = o.get("burst-every", 180.0);
    let keepalive: u16 = o.get("keepalive", 60);

    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let k = Arc::new(Counters::default());
    // Publisher ids: 0..publishers steady, `publishers` the breaking-news desk.
    let acked = Arc::new(Seen::new(publishers + 1));
    let got: Vec<Arc<Seen>> = (0..readers).map(|_| Arc::new(Seen::new(publishers + 1))).collect();
    let mut tasks = Vec::new();
    for (i, g) in got.iter().enumerate() {
        tasks.push(tokio::spawn(reader(addr, i, until + Duration::from_secs(60), g.clone(), k.clone())));
    }
    // The readers' sessions exist before the first story.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let topic = format!("news/soak/{p}");
        pubs.push(tokio::spawn(publisher(
            addr,
            p,
            topic,
            rate / publishers as f64,
            (0, 0.0),
            until,
            acked.clone(),
            k.clone(),
        )));
    }
    pubs.push(tokio::spawn(publisher(
        addr,
        publishers,
        "news/breaking".into(),
        0.0,
        (burst, burst_every),
        until,
        acked.clone(),
        k.clone(),
    )));
    for i in 0..idle {
        tasks.push(tokio::spawn(idle_phone(addr, i, keepalive, until, k.clone())));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in 0..churners {
        tasks.push(tokio::spawn(churn_phone(addr, i, until, k.clone())));
    }
    for _ in 0..streams {
        tasks.push(tokio::spawn(sse_reader(http, until, k.clone())));
    }
    for _ in 0..pollers {
        tasks.push(tokio::spawn(poller(http, until, k.clone())));
    }
    tasks.push(tokio::spawn(retained_updates(addr, until, k.clone())));

    let mut out = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&out_path).expect("--out");
    let mut events_seen = 0;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs_f64(every),
        Duration::from_secs_f64(every),
    );
    let mut last = (0u64, 0u64);
    let sample = |r: &mut Report, pid: Option<u32>| {
        if let Some(pid) = pid {
            r.num("pid", f64::from(pid));
            if let Some(b) = broker_rss_bytes(pid) {
                r.num("rss_mb", b as f64 / 1048576.0);
            }
            if let Some(n) = fds(pid) {
                r.num("fds", n as f64);
            }
        }
    };
    while Instant::now() < until {
        tick.tick().await;
        let pid: Option<u32> = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok());
        let mut r = Report::new("soak");
        r.num("t", start.elapsed().as_secs_f64());
        sample(&mut r, pid);
        let mut l = std::mem::take(&mut *k.latencies_us.lock().unwrap());
        l.sort_unstable();
        r.num("p50_ms", percentile(&l, 0.5)).num("p99_ms", percentile(&l, 0.99)).num("max_ms", percentile(&l, 1.0));
        let (acked_n, received_n) = (k.acked.load(Relaxed), k.received.load(Relaxed));
        r.num("acked", acked_n as f64).num("received", received_n as f64);
        r.num("acked_per_s", (acked_n - last.0) as f64 / every)
            .num("received_per_s", (received_n - last.1) as f64 / every);
        last = (acked_n, received_n);
        r.num("published", k.published.load(Relaxed) as f64).num("duplicates", k.duplicates.load(Relaxed) as f64);
        r.num("idle_connected", k.idle_up.load(Relaxed) as f64).num("pings", k.pings.load(Relaxed) as f64);
        r.num("churn_connects", k.churn_connects.load(Relaxed) as f64)
            .num("reconnects", k.reconnects.load(Relaxed) as f64);
        r.num("sse_events", k.sse_events.load(Relaxed) as f64)
            .num("poll_messages", k.poll_messages.load(Relaxed) as f64);
        r.num("retained_updates", k.retained.load(Relaxed) as f64);
        // What the script did since the last line (a reload, the restart).
        let events = std::fs::read_to_string(&events_file).unwrap_or_default();
        let new: Vec<&str> = events.lines().skip(events_seen).collect();
        events_seen += new.len();
        let line = format!("{{{}}}", {
            let mut body: Vec<String> = r.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            body.push(format!("\"events\":{:?}", new));
            body.join(",")
        });
        use std::io::Write;
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
        eprintln!("{line}");
    }
    for p in pubs {
        let _ = p.await;
    }
    // Every acknowledged story reaches every reader, or is lost: wait up to a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && got.iter().any(|g| acked.missing_from(g) > 0) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lost: u64 = got.iter().map(|g| acked.missing_from(g)).sum();
    let mut r = Report::new("soak_final");
    r.num("t", start.elapsed().as_secs_f64()).num("readers", readers as f64);
    r.num("acked", k.acked.load(Relaxed) as f64).num("received", k.received.load(Relaxed) as f64);
    r.num("lost", lost as f64).num("duplicates", k.duplicates.load(Relaxed) as f64);
    r.num("reconnects", k.reconnects.load(Relaxed) as f64);
    let line = format!("{{{}}}", r.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(","));
    use std::io::Write;
    writeln!(out, "{line}").unwrap();
    println!("{line}");
    for t in tasks {
        t.abort();
    }
}
