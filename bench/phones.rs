//! Phones over TLS and TCP: idle connections held with keep-alive pings (`conns`), and a
//! reconnect storm after a restart (`storm`).

use super::*;

/// Idle connections, as phones hold them: `--connections` clients over plain TCP, `--tls true`
/// (with `--ca PEM`), `--ws true`, or both (wss), each optionally subscribed to a topic of its
/// own. Reports connects (TCP, TLS handshake, WebSocket upgrade and CONNECT) per second and the
/// broker's resident memory per connection. With `--hold S` every client then sends PINGREQ each
/// `--keepalive` seconds for S seconds: the broker's CPU per PINGREQ and its memory at the end.
pub async fn conns(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let count: u32 = o.get("connections", 10_000);
    let subscribe: bool = o.get("subscribe", false);
    let tls: bool = o.get("tls", false);
    let ws: bool = o.get("ws", false);
    let keepalive: u16 = o.get("keepalive", 600);
    let hold: f64 = o.get("hold", 0.0);
    let connector = tls.then(|| tokio_rustls::TlsConnector::from(Arc::new(tls_client(&o.get("ca", String::new())))));
    let rss0 = pid.and_then(broker_rss_bytes);
    let start = Instant::now();
    // With --hold, each client pings every keep-alive from its own connect on, as a phone does.
    let pings = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let period = Duration::from_secs(u64::from(keepalive.max(1)));
    let mut open = Vec::with_capacity(count as usize);
    let mut pingers = Vec::new();
    // `--parallel N` connects N clients at a time (Mosquitto's WebSocket listener answers each
    // upgrade after about 200 ms, so one at a time would take an hour for 10,000).
    let parallel: u32 = o.get("parallel", 1);
    let connector = connector.map(Arc::new);
    let mut i = 0;
    while i < count {
        let batch: Vec<_> = (i..count.min(i + parallel.max(1)))
            .map(|i| {
                let connector = connector.clone();
                tokio::spawn(async move {
                    let mut c =
                        IdleConn::open(addr, connector.as_deref(), ws, &format!("bench-idle-{i}"), keepalive).await;
                    if subscribe {
                        c.exchange(&subscribe_packet(&format!("users/{i}/inbox"))).await;
                    }
                    c
                })
            })
            .collect();
        i += batch.len() as u32;
        for c in batch {
            connected(
                c.await.expect("a client failed to connect"),
                hold,
                &pings,
                &stop,
                period,
                &mut open,
                &mut pingers,
            );
        }
    }
    fn connected(
        c: IdleConn,
        hold: f64,
        pings: &Arc<AtomicU64>,
        stop: &Arc<AtomicBool>,
        period: Duration,
        open: &mut Vec<IdleConn>,
        pingers: &mut Vec<tokio::task::JoinHandle<IdleConn>>,
    ) {
        let mut c = c;
        if hold > 0.0 {
            let (pings, stop) = (pings.clone(), stop.clone());
            pingers.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    tick.tick().await;
                    if stop.load(Relaxed) {
                        return c;
                    }
                    c.exchange(&[0xC0, 0x00]).await;
                    pings.fetch_add(1, Relaxed);
                }
            }));
        } else {
            open.push(c);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Long enough for a broker that hibernates idle connections (Herald: after 1 s) to do so.
    let settle: f64 = o.get("settle", 3.0);
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let rss1 = pid.and_then(broker_rss_bytes);
    let mut r = Report::new("conns");
    r.num("connections", count as f64).num("subscribe", subscribe as u8 as f64);
    r.num("tls", tls as u8 as f64).num("ws", ws as u8 as f64);
    r.num("connects_per_s", count as f64 / elapsed);
    if let (Some(a), Some(b)) = (rss0, rss1) {
        r.num("rss_before_kb", a as f64 / 1024.0).num("rss_after_kb", b as f64 / 1024.0);
        r.num("bytes_per_connection", b.saturating_sub(a) as f64 / count as f64);
    }
    if hold > 0.0 {
        let (cpu0, pings0) = (pid.and_then(broker_cpu_us), pings.load(Relaxed));
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
        let (cpu1, pings1) = (pid.and_then(broker_cpu_us), pings.load(Relaxed));
        let rss2 = pid.and_then(broker_rss_bytes);
        stop.store(true, Relaxed);
        for p in pingers {
            open.push(p.await.expect("a client lost its connection while holding"));
        }
        let n = pings1 - pings0;
        r.num("hold_s", hold).num("keepalive_s", f64::from(keepalive)).num("pings", n as f64);
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            r.num("cpu_us_per_ping", (b - a) as f64 / n.max(1) as f64);
        }
        if let Some(b) = rss2 {
            r.num("rss_after_hold_kb", b as f64 / 1024.0);
        }
    }
    r.print();
    drop(open);
}

pub fn subscribe_packet(filter: &str) -> Vec<u8> {
    let mut out = vec![0x82];
    let len = 2 + 2 + filter.len() + 1;
    let mut rest = BytesMut::new();
    herald::codec::wire::put_varint(&mut rest, len as u32);
    out.extend_from_slice(&rest);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    out.extend_from_slice(filter.as_bytes());
    out.push(1);
    out
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A client connection for the idle scenario; MQTT 3.1.1 bytes, in masked binary WebSocket
/// frames with `ws`. Each exchange sends one packet and reads one answer.
struct IdleConn {
    stream: Box<dyn Stream>,
    ws: bool,
}

impl IdleConn {
    async fn open(
        addr: SocketAddr,
        tls: Option<&tokio_rustls::TlsConnector>,
        ws: bool,
        client_id: &str,
        keepalive: u16,
    ) -> IdleConn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).unwrap();
        let mut stream: Box<dyn Stream> = match tls {
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                Box::new(c.connect(name, tcp).await.expect("TLS handshake"))
            }
            None => Box::new(tcp),
        };
        if ws {
            stream
                .write_all(
                    b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                      Sec-WebSocket-Protocol: mqtt\r\n\r\n",
                )
                .await
                .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(stream.read_u8().await.expect("upgrade response"));
            }
            assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        }
        let mut c = IdleConn { stream, ws };
        let mut connect = vec![0x10];
        let body_len = 10 + 2 + client_id.len();
        connect.push(body_len as u8);
        connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
        connect.extend_from_slice(&keepalive.to_be_bytes());
        connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        connect.extend_from_slice(client_id.as_bytes());
        let ack = c.exchange(&connect).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
        c
    }

    /// Sends one packet and returns the one that answers it.
    async fn exchange(&mut self, packet: &[u8]) -> Vec<u8> {
        if self.ws {
            let mut frame = vec![0x82, 0x80 | packet.len() as u8, 1, 2, 3, 4];
            frame.extend(packet.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
            self.stream.write_all(&frame).await.expect("write");
        } else {
            self.stream.write_all(packet).await.expect("write");
        }
        let mut bytes = Vec::new();
        loop {
            // Small answers only (CONNACK, SUBACK, PINGRESP): one frame, short lengths.
            let mut take = 2;
            if self.ws {
                let h = [self.stream.read_u8().await.expect("frame"), self.stream.read_u8().await.expect("frame")];
                take = usize::from(h[1] & 0x7F);
            }
            for _ in 0..take {
                bytes.push(self.stream.read_u8().await.expect("answer"));
            }
            if !self.ws {
                let rest = usize::from(bytes[1]);
                for _ in 0..rest {
                    bytes.push(self.stream.read_u8().await.expect("answer"));
                }
            }
            if bytes.len() >= 2 && bytes.len() >= 2 + usize::from(bytes[1]) {
                return bytes;
            }
        }
    }
}

/// The TLS client configuration of the phones: the benchmark's CA.
pub fn tls_client(ca: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("--ca PEM file") {
        roots.add(c.expect("a certificate")).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// One phone of the storm: MQTT 3.1.1 over TLS through Herald's codec.
struct Phone {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    decoder: Decoder,
    buf: BytesMut,
    resumed: bool,
    session_present: bool,
}

impl Phone {
    /// TCP, TLS and CONNECT (a persistent session) up to its CONNACK, within `limit`.
    async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        id: &str,
        limit: Duration,
    ) -> Result<Phone, String> {
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            tcp.set_nodelay(true).unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let stream =
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
            let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            let mut decoder = Decoder::new(Role::Client, u32::MAX);
            decoder.version = Some(ProtocolVersion::V3_1_1);
            let mut p = Phone { stream, decoder, buf: BytesMut::with_capacity(1024), resumed, session_present: false };
            p.send(&[connect_packet(id, false)]).await?;
            match p.next().await? {
                Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS => {
                    p.session_present = a.session_present;
                    Ok(p)
                }
                other => Err(format!("CONNECT refused: {other:?}")),
            }
        };
        tokio::time::timeout(limit, attempt).await.map_err(|_| "no CONNACK in time".to_string())?
    }

    async fn send(&mut self, packets: &[Packet]) -> Result<(), String> {
        let mut out = BytesMut::new();
        for p in packets {
            p.encode(ProtocolVersion::V3_1_1, &mut out);
        }
        self.stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
        self.stream.flush().await.map_err(|e| format!("write: {e}"))
    }

    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf).map_err(|e| format!("decode: {e:?}"))? {
                return Ok(p);
            }
            self.buf.reserve(1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("closed".into()),
                Err(e) => return Err(format!("read: {e}")),
                Ok(_) => {}
            }
        }
    }
}

/// What one phone of the storm saw after the restart, in microseconds from the storm's start.
struct Back {
    connack_us: u64,
    story_us: u64,
    resumed: bool,
    session_present: bool,
    attempts: u32,
}

/// A reconnect storm (issue 26): `--phones` persistent phones over TLS (`--port` the TLS
/// listener, `--ca`), each subscribed at QoS 1 to its own inbox, disconnect; a story is queued
/// for each (published at QoS 1 over `--plain-port`); the generator writes `--ready FILE` and
/// waits for the script to restart the broker and write its new pid into `--go FILE`. Then
/// a live reader (plain TCP, `news/live`, a story every 10 ms) is connected and every phone
/// reconnects at once, resuming its TLS session if it can (each phone keeps its own tickets) and
/// its MQTT session. A phone that fails (refused, reset, no CONNACK within `--connack-timeout`
/// seconds) tries again a second later, as phones do. Reports the time until every phone is
/// back with its story, CONNACK and story p50/p99/max, the TLS handshakes resumed, the live
/// reader's latency during the storm, and the broker's CPU per phone.
pub async fn storm(addr: SocketAddr, o: &Opts, _pid: Option<u32>) {
    let phones: u32 = o.get("phones", 19_000);
    let ca: String = o.get("ca", String::new());
    let plain = SocketAddr::from(([127, 0, 0, 1], o.get::<u16>("plain-port", 0)));
    let ready: String = o.get("ready", String::new());
    let go: String = o.get("go", String::new());
    let parallel: usize = o.get("parallel", 200);
    let connack_limit = Duration::from_secs_f64(o.get("connack-timeout", 10.0));
    let base = tls_client(&ca);
    // A clone shares `base`'s resumption store: each phone gets a store of its own.
    let configs: Vec<Arc<rustls::ClientConfig>> = (0..phones)
        .map(|_| {
            let mut c = base.clone();
            c.resumption = rustls::client::Resumption::in_memory_sessions(4);
            Arc::new(c)
        })
        .collect();

    // The phones' first visit: a full handshake, a persistent session subscribed to its inbox.
    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for (i, tls) in configs.iter().enumerate() {
        let (tls, sem) = (tls.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let mut p =
                Phone::connect(addr, tls, &format!("storm-{i}"), Duration::from_secs(60)).await.expect("first visit");
            let s = Subscribe {
                packet_id: 1,
                properties: Properties::default(),
                filters: vec![(
                    format!("users/{i}/inbox"),
                    SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
                )],
            };
            p.send(&[Packet::Subscribe(s)]).await.unwrap();
            match p.next().await.unwrap() {
                Packet::SubAck(a) if a.reasons[0].0 == 1 => {}
                other => panic!("SUBACK: {other:?}"),
            }
            p.stream.write_all(&[0xE0, 0]).await.unwrap();
            let _ = p.stream.shutdown().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let first_visit_s = start.elapsed().as_secs_f64();

    // A story queued for each: QoS 1, acknowledged (stored) before the restart.
    let mut publisher = Conn::open(plain, "storm-editor").await;
    let mut acked = 0u32;
    let mut sent = 0u32;
    while acked < phones {
        let mut batch = Vec::new();
        while sent < phones && sent - acked < 100 {
            batch.push(publish(
                &format!("users/{sent}/inbox"),
                QoS::AtLeastOnce,
                (sent % 65535 + 1) as u16,
                false,
                payload(0, u64::from(sent)),
            ));
            sent += 1;
        }
        if !batch.is_empty() {
            publisher.send(&batch).await;
        }
        match publisher.next().await {
            Some(Packet::PubAck(_)) => acked += 1,
            other => panic!("PUBACK: {other:?}"),
        }
    }
    drop(publisher);
    std::fs::write(&ready, "queued\n").expect("--ready FILE");

    // The script restarts the broker and says its new pid.
    let deadline = Instant::now() + Duration::from_secs(300);
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&go).ok().and_then(|t| t.trim().parse().ok()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no --go FILE with the broker's pid");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The live reader, and a story for it every 10 ms through the storm, on a thread of their
    // own: among the phones' tasks in one runtime, the generator's own queue would be measured.
    let live = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let live_thread = {
        let (live, stop) = (live.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut reader = Conn::open(plain, "storm-live-reader").await;
                reader.subscribe("news/live", QoS::AtMostOnce).await;
                let reading = tokio::spawn(subscriber_loop(reader, live, stop.clone()));
                let mut editor = Conn::open(plain, "storm-live-publisher").await;
                up_tx.send(()).unwrap();
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut seq = 0;
                while !stop.load(Relaxed) {
                    tick.tick().await;
                    seq += 1;
                    editor.send(&[publish("news/live", QoS::AtMostOnce, 0, false, payload(1, seq))]).await;
                }
                let _ = reading.await;
            })
        })
    };
    up_rx.recv().expect("the live reader connected");

    let cpu0 = broker_cpu_us(pid);
    let gen0 = broker_cpu_us(std::process::id());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, tls) in configs.iter().enumerate() {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let mut p = match Phone::connect(addr, tls.clone(), &format!("storm-{i}"), connack_limit).await {
                    Ok(p) => p,
                    Err(_) if t0.elapsed() < Duration::from_secs(280) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => panic!("phone {i} never came back: {e}"),
                };
                let connack_us = t0.elapsed().as_micros() as u64;
                let topic = format!("users/{i}/inbox");
                let story = async {
                    loop {
                        match p.next().await? {
                            Packet::Publish(m) if m.topic == topic => {
                                if m.qos == QoS::AtLeastOnce {
                                    p.send(&[Packet::PubAck(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))])
                                        .await?;
                                }
                                return Ok::<_, String>(());
                            }
                            _ => {}
                        }
                    }
                };
                match tokio::time::timeout(Duration::from_secs(60), story).await {
                    Ok(Ok(())) => {
                        let back = Back {
                            connack_us,
                            story_us: t0.elapsed().as_micros() as u64,
                            resumed: p.resumed,
                            session_present: p.session_present,
                            attempts,
                        };
                        return (back, p);
                    }
                    _ if t0.elapsed() < Duration::from_secs(280) => continue,
                    _ => panic!("phone {i}: no story"),
                }
            }
        }));
    }
    let mut backs = Vec::new();
    let mut held = Vec::new();
    for t in tasks {
        let (b, p) = t.await.expect("a phone");
        backs.push(b);
        held.push(p);
    }
    let all_back_s = t0.elapsed().as_secs_f64();
    let cpu1 = broker_cpu_us(pid);
    let gen1 = broker_cpu_us(std::process::id());
    stop.store(true, Relaxed);
    live_thread.join().unwrap();
    let rss = broker_rss_bytes(pid);

    let mut connack: Vec<u32> = backs.iter().map(|b| (b.connack_us.min(u64::from(u32::MAX))) as u32).collect();
    let mut story: Vec<u32> = backs.iter().map(|b| (b.story_us.min(u64::from(u32::MAX))) as u32).collect();
    connack.sort_unstable();
    story.sort_unstable();
    let mut r = Report::new("storm");
    r.num("phones", f64::from(phones)).num("first_visit_s", first_visit_s);
    r.num("all_back_s", all_back_s);
    r.num("resumed", backs.iter().filter(|b| b.resumed).count() as f64);
    r.num("session_present", backs.iter().filter(|b| b.session_present).count() as f64);
    r.num("retries", backs.iter().map(|b| f64::from(b.attempts - 1)).sum());
    r.num("connack_p50_ms", percentile(&connack, 0.5)).num("connack_p99_ms", percentile(&connack, 0.99));
    r.num("connack_max_ms", percentile(&connack, 1.0));
    r.num("story_p50_ms", percentile(&story, 0.5)).num("story_p99_ms", percentile(&story, 0.99));
    r.num("story_max_ms", percentile(&story, 1.0));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("broker_cpu_s", (b - a) as f64 / 1e6).num("cpu_us_per_phone", (b - a) as f64 / f64::from(phones));
    }
    // The generator's own CPU over the storm: near all_back_s, the generator is what was measured.
    if let (Some(a), Some(b)) = (gen0, gen1) {
        r.num("generator_cpu_s", (b - a) as f64 / 1e6);
    }
    if let Some(b) = rss {
        r.num("rss_mb", b as f64 / 1048576.0);
    }
    r.num("live_stories", live.count.load(Relaxed) as f64);
    let mut l = std::mem::take(&mut *live.latencies_us.lock().unwrap());
    l.sort_unstable();
    r.num("live_p50_ms", percentile(&l, 0.5))
        .num("live_p99_ms", percentile(&l, 0.99))
        .num("live_max_ms", percentile(&l, 1.0));
    r.print();
    drop(held);
}

/// Idle HTTP readers (issue 26, item 3): `--readers` SSE streams (`--kind sse`) or long polls
/// waiting for a message (`--kind poll`, `wait=--wait` s after a first poll that makes the
/// session), each on `users/<i>/inbox` where nothing is published; the broker's resident memory
/// per reader after `--settle` s.
pub async fn http_idle(o: &Opts, pid: Option<u32>) {
    let readers: u32 = o.get("readers", 1000);
    let kind: String = o.get("kind", "sse".to_string());
    let wait: u32 = o.get("wait", 60);
    let http = SocketAddr::from(([127, 0, 0, 1], o.get::<u16>("http-port", 8080)));
    let rss0 = pid.and_then(broker_rss_bytes);
    let mut held = Vec::new();
    for i in 0..readers {
        let mut s = TcpStream::connect(http).await.expect("the HTTP port");
        if kind == "poll" {
            // The first poll makes the session and answers at once; the second waits.
            let first = format!("GET /api/v1/poll?filter=users/{i}/inbox HTTP/1.1\r\nhost: bench\r\n\r\n");
            s.write_all(first.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "poll refused");
                answer.extend_from_slice(&chunk[..n]);
                if let Some(h) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&answer[..h]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .expect("content-length");
                    if answer.len() >= h + 4 + len {
                        break answer[h + 4..h + 4 + len].to_vec();
                    }
                }
            };
            let v: serde_json::Value = serde_json::from_slice(&body).expect("poll JSON");
            let next = v["next"].as_str().expect("a cursor").to_owned();
            let second = format!(
                "GET /api/v1/poll?filter=users/{i}/inbox&after={next}&wait={wait} HTTP/1.1\r\nhost: bench\r\n\r\n"
            );
            s.write_all(second.as_bytes()).await.unwrap();
        } else {
            let req = format!(
                "GET /api/v1/stream?filter=users/{i}/inbox HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let mut chunk = [0u8; 4096];
            while !head.windows(15).any(|w| w == b"event: session\n") {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "stream refused: {}", String::from_utf8_lossy(&head));
                head.extend_from_slice(&chunk[..n]);
            }
        }
        held.push(s);
    }
    let settle: f64 = o.get("settle", 3.0);
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let rss1 = pid.and_then(broker_rss_bytes);
    let mut r = Report::new("http_idle");
    r.num("readers", f64::from(readers)).num("poll", f64::from(u8::from(kind == "poll")));
    if let (Some(a), Some(b)) = (rss0, rss1) {
        r.num("bytes_per_reader", b.saturating_sub(a) as f64 / f64::from(readers));
    }
    r.print();
    drop(held);
}
