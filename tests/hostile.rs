//! The hostile-input battery (docs/security.md, threat model): one test per class of attack,
//! each against its own `herald` process over real sockets, each bounded in time. After every
//! attack the broker must be alive, a fresh client must complete a QoS 1 round trip, and the
//! process's resident memory (read from /proc) must have grown by less than the bound the
//! test states. Every test here failed on the code before issue 13, for the reason its comment
//! gives, except where it says it guards a property that already held.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use herald::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::AsyncReadExt;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const MB: u64 = 1024 * 1024;

/// A `herald` process with an MQTT, a WebSocket and an HTTP listener (and, with `tls`, mqtts
/// and wss), its log drained into a channel.
struct Herald {
    child: Child,
    mqtt: SocketAddr,
    ws: SocketAddr,
    http: SocketAddr,
    mqtts: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    log: Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Herald {
    fn spawn(extra: &str) -> Herald {
        Herald::spawn_with(extra, false, None)
    }

    fn spawn_with(extra: &str, tls: bool, store: Option<&Path>) -> Herald {
        Herald::spawn_full(extra, "", tls, store)
    }

    /// `http_extra`: more keys of the `[http]` table.
    fn spawn_full(extra: &str, http_extra: &str, tls: bool, store: Option<&Path>) -> Herald {
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = String::from(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\n",
        );
        if tls {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/generate.sh");
            let out = std::process::Command::new("bash")
                .args([script, "device-1", dir.path().to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            for protocol in ["mqtts", "wss"] {
                listeners.push_str(&format!(
                    "[[listeners]]\nprotocol = \"{protocol}\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n",
                    toml_path(&dir.path().join("server.pem")),
                    toml_path(&dir.path().join("server.key"))
                ));
            }
        }
        let data = store.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("data"));
        let config = dir.path().join("herald.toml");
        std::fs::write(
            &config,
            format!(
                "{listeners}[http]\nbind = \"127.0.0.1:0\"\n{http_extra}\n[storage]\npath = {}\n[sys]\ninterval = 0\n{extra}\n",
                toml_path(&data)
            ),
        )
        .unwrap();
        let listeners = if tls { 4 } else { 2 };
        let (child, ports, log) = spawn_herald(&config, listeners);
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        // The HTTP port is logged after the listeners' ("http listening").
        let mut early = Vec::new();
        let http = loop {
            let line = log.recv_timeout(PATIENCE).expect("the HTTP listener's line");
            if let Some(rest) = line.split("addr=127.0.0.1:").nth(1).filter(|_| line.contains("http listening")) {
                break at(rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap());
            }
            early.push(line);
        };
        Herald {
            child,
            mqtt: at(ports[0]),
            ws: at(ports[1]),
            mqtts: tls.then(|| at(ports[2])),
            wss: tls.then(|| at(ports[3])),
            http,
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/PID/status in bytes (VmRSS, VmSize).
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("the broker is running");
        let line = status.lines().find(|l| l.starts_with(field)).expect(field);
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    fn vm_size(&self) -> u64 {
        self.status_bytes("VmSize:")
    }

    /// The broker is alive, a fresh client completes a QoS 1 round trip through it, and its
    /// resident memory is at most `bound` above `before`.
    async fn assert_healthy(&mut self, before: u64, bound: u64, what: &str) {
        assert!(self.child.try_wait().unwrap().is_none(), "{what}: the broker exited");
        let round_trip = async {
            let id = format!("check-{}", Instant::now().elapsed().as_nanos());
            let (mut c, _) = RawClient::connect(self.mqtt, connect_packet(V5, &id, true)).await;
            c.send(&subscribe(1, "check/rtt", QoS::AtLeastOnce)).await;
            expect_suback(&mut c).await;
            c.send(&publish("check/rtt", b"alive", QoS::AtLeastOnce, 2)).await;
            let mut got_ack = false;
            let mut got_msg = false;
            while !(got_ack && got_msg) {
                match c.recv().await {
                    Some(Packet::PubAck(a)) if a.packet_id == 2 => got_ack = true,
                    Some(Packet::Publish(p)) => {
                        assert_eq!(&p.payload[..], b"alive");
                        c.send(&Packet::PubAck(herald::codec::PubResponse::new(p.packet_id, ReasonCode::SUCCESS)))
                            .await;
                        got_msg = true;
                    }
                    other => panic!("{what}: unexpected {other:?}"),
                }
            }
        };
        tokio::time::timeout(PATIENCE, round_trip).await.unwrap_or_else(|_| panic!("{what}: no QoS 1 round trip"));
        let after = self.rss();
        let grown = after.saturating_sub(before);
        eprintln!(
            "{what}: resident memory {} MB -> {} MB (+{:.1} MB)",
            before / MB,
            after / MB,
            grown as f64 / MB as f64
        );
        assert!(grown < bound, "{what}: resident memory grew by {grown} bytes, bound {bound}");
    }

    /// The log lines written since the last call (or since start-up).
    fn new_log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Every log line written before now: connects a client named `marker` and reads the log
    /// until its connect line, which the broker wrote after everything before it.
    async fn log_until_marker(&self, marker: &str) -> Vec<String> {
        drop(RawClient::connect(self.mqtt, connect_packet(V311, marker, true)).await);
        let mut lines = Vec::new();
        loop {
            let line = self.log.recv_timeout(PATIENCE).expect("the marker's connect line");
            if line.contains("client connected") && line.contains(marker) {
                return lines;
            }
            lines.push(line);
        }
    }

    /// A figure of `/metrics`.
    async fn metric(&self, name: &'static str) -> u64 {
        let addr = self.http;
        bounded("metrics", PATIENCE, move || {
            let (_, _, b) = http_request(addr, "GET", "/metrics", &[], b"");
            let text = String::from_utf8(b).unwrap();
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} in /metrics")) as u64
        })
        .await
    }

    /// Waits until no socket is open on the MQTT listeners: every connection task has ended.
    async fn wait_all_closed(&self, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.metric("herald_connections_open").await > 0 {
            assert!(Instant::now() < deadline, "{what}: connections still open after {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until the broker has closed `s` (EOF or reset), failing after `PATIENCE`.
fn wait_closed(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
        assert!(Instant::now() < deadline, "{what}: the broker did not close the socket in {PATIENCE:?}");
    }
}

/// Runs blocking socket work on its own thread with a hard deadline, so a hung attack fails
/// the test instead of hanging the suite.
async fn bounded<T: Send + 'static>(what: &'static str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::time::timeout(limit, tokio::task::spawn_blocking(f))
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish in {limit:?}"))
        .unwrap()
}

/// Opens a WebSocket to `addr` and completes the upgrade with subprotocol `mqtt`.
fn ws_open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

fn encode(version: ProtocolVersion, packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in packets {
        p.encode(version, &mut out);
    }
    out.to_vec()
}

fn connect_bytes(version: ProtocolVersion, id: &str) -> Vec<u8> {
    encode(version, &[Packet::Connect(Box::new(connect_packet(version, id, true)))])
}

/// Finding 1. A fixed header that announces 268,435,455 bytes made the broker reserve the whole
/// packet before reading it (`buf.reserve(total)`), and a CONNECT could be as large as
/// `max_packet_size`: ten sockets streaming 20 MB each pinned 200 MB, and twenty that only sent
/// the header grew the virtual size by 5 GB. Now a first packet above
/// `max_connect_packet_size` (64 KiB) is refused from its header, and the buffer grows only
/// with bytes that arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_trickled_lengths_before_connect() {
    let mut h = Herald::spawn("");
    let (rss0, vm0) = (h.rss(), h.vm_size());
    let addr = h.mqtt;
    // Ten sockets announce 256 MB and stream 20 MB each, all at once.
    let streaming = bounded("streaming sockets", PATIENCE, move || {
        let writers: Vec<_> = (0..10)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                    let _ = s.write_all(&[0x10u8, 0xff, 0xff, 0xff, 0x7f]);
                    let chunk = vec![0u8; 64 * 1024];
                    for _ in 0..320 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                    s
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
    })
    .await;
    let rss_streamed = h.rss().saturating_sub(rss0);
    eprintln!("10 sockets that announced 256 MB and streamed 20 MB: +{} MB resident", rss_streamed / MB);
    assert!(rss_streamed < 16 * MB, "the broker buffered what was announced: +{rss_streamed} bytes");
    // Twenty sockets trickle the same header, a byte at a time, and then stall.
    let trickled = bounded("trickled headers", PATIENCE, move || {
        let mut socks: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for b in [0x10u8, 0xff, 0xff, 0xff, 0x7f] {
            for s in &mut socks {
                let _ = s.write_all(&[b]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        socks
    })
    .await;
    // And twenty announce 60 KiB (allowed) but send half of it: each pins at most what it sent.
    let half = bounded("half-sent CONNECTs", PATIENCE, move || {
        let mut socks: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut partial = vec![0x10u8, 0x80, 0xe0, 0x03]; // remaining length 61,440
        partial.extend(std::iter::repeat_n(0u8, 30 * 1024));
        for s in &mut socks {
            s.write_all(&partial).unwrap();
        }
        socks
    })
    .await;
    // The half-sent ones must have been read before the figure means anything.
    let port = addr.port();
    bounded("read by the broker", PATIENCE, move || {
        wait_until_blocking("the broker to read the half-sent CONNECTs", || receive_queues_empty(port))
    })
    .await;
    let vm_grown = h.vm_size().saturating_sub(vm0);
    eprintln!("virtual size grew by {} MB with 40 stalled sockets", vm_grown / MB);
    assert!(vm_grown < 256 * MB, "virtual size grew by {vm_grown} bytes");
    h.assert_healthy(rss0, 16 * MB, "oversized and trickled lengths").await;
    // The oversized ones were closed at once, the stalled ones by the connect timeout.
    bounded("sockets closed", PATIENCE * 2, move || {
        for mut s in streaming.into_iter().chain(trickled).chain(half) {
            wait_closed(&mut s, "a socket before CONNECT");
        }
    })
    .await;
}

/// Whether every socket on the broker's `port` has an empty receive queue (the broker read
/// everything sent to it), by `ss`.
fn receive_queues_empty(port: u16) -> bool {
    let out = std::process::Command::new("ss").args(["-tnH", &format!("sport = :{port}")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().all(|l| l.split_whitespace().nth(1) == Some("0"))
}

/// Finding 2 (fixed in issue 12, guarded here too): CONNECT, SUBSCRIBE and a QoS 1 PUBLISH in
/// one write are all handled without any further input [MQTT-3.1.4-5].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_pipelined_after_connect_are_handled_at_once() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    for version in [V311, V5] {
        let mut c = RawClient::connect_tcp(h.mqtt).await;
        c.send_together(&[
            Packet::Connect(Box::new(connect_packet(version, "pipeliner", true))),
            subscribe(1, "pipe/#", QoS::AtLeastOnce),
            publish("pipe/x", b"story", QoS::AtLeastOnce, 2),
        ])
        .await;
        let mut seen = Vec::new();
        while seen.len() < 4 {
            match c.recv().await {
                Some(Packet::Publish(p)) => {
                    c.send(&Packet::PubAck(herald::codec::PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
                    seen.push("PUBLISH")
                }
                Some(p) => seen.push(p.name()),
                None => panic!("closed after {seen:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, ["CONNACK", "PUBACK", "PUBLISH", "SUBACK"], "{version:?}");
    }
    h.assert_healthy(rss0, 16 * MB, "pipelined").await;
}

/// Finding 3. Herald closed a connection with DISCONNECT 0x93 (receive maximum exceeded) while
/// the client was still sending; closing with unread input made the kernel send a reset, and
/// the client's next write failed before it read the reason. Now Herald half-closes and
/// discards input for `close_linger_ms`: every write of the client succeeds and it reads the
/// DISCONNECT and then end-of-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closing_disconnect_reaches_a_client_that_is_still_sending() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    let addr = h.mqtt;
    let (writes_ok, packets) = bounded("receive maximum flood", PATIENCE, move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&connect_bytes(V5, "flooder")).unwrap();
        // 30 QoS 2 PUBLISHes never released: the server's Receive Maximum is 20 [MQTT-3.3.4-9].
        let flood: Vec<Packet> =
            (1..=30).map(|id| publish("flood/x", b"story", QoS::ExactlyOnce, id)).collect::<Vec<_>>();
        s.write_all(&encode(V5, &flood)).unwrap();
        // And it keeps sending QoS 0 stories, 4 MB of them, without reading.
        let more = encode(V5, &[publish("flood/y", &[7u8; 16 * 1024], QoS::AtMostOnce, 0)]);
        let mut writes_ok = true;
        for _ in 0..256 {
            if s.write_all(&more).is_err() {
                writes_ok = false;
                break;
            }
        }
        let mut raw = Vec::new();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = s.read_to_end(&mut raw);
        let mut buf = BytesMut::from(&raw[..]);
        let mut d = herald::codec::Decoder::new(herald::codec::Role::Client, u32::MAX);
        d.version = Some(V5);
        let mut packets = Vec::new();
        while let Ok(Some(p)) = d.decode(&mut buf) {
            packets.push(p);
        }
        (writes_ok, packets)
    })
    .await;
    assert!(writes_ok, "the client's writes were reset before it could read why it was closed");
    let last = packets.last().expect("packets from the broker");
    assert!(
        matches!(last, Packet::Disconnect(d) if d.reason == ReasonCode::RECEIVE_MAXIMUM_EXCEEDED),
        "the last packet is DISCONNECT 0x93: {last:?}"
    );
    h.assert_healthy(rss0, 16 * MB, "receive maximum flood").await;
}

/// Finding 4, first half. A WebSocket message in fragments was buffered up to tungstenite's
/// 64 MiB default before any CONNECT (two sockets: +122 MB). Now everything a WebSocket client
/// sends before its CONNECT is answered counts against `max_connect_packet_size` plus 16 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_fragments_before_connect_are_bounded() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    let addr = h.ws;
    let socks = bounded("fragmented WebSocket messages", PATIENCE * 2, move || {
        let writers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut s = ws_open(addr);
                    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                    // The first frame starts a binary message; the rest continue it, 30 MB in all.
                    let _ = s.write_all(&ws_frame(false, 0x2, &[0x10]));
                    let fragment = ws_frame(false, 0x0, &vec![0u8; 64 * 1024]);
                    for _ in 0..480 {
                        if s.write_all(&fragment).is_err() {
                            break;
                        }
                    }
                    s
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
    })
    .await;
    let grown = h.rss().saturating_sub(rss0);
    eprintln!("4 WebSockets streaming 30 MB of fragments before CONNECT: +{} MB resident", grown / MB);
    assert!(grown < 8 * MB, "the fragments were buffered: +{grown} bytes");
    bounded("closed", PATIENCE, move || {
        for mut s in socks {
            wait_closed(&mut s, "a WebSocket streaming fragments");
        }
    })
    .await;
    h.assert_healthy(rss0, 8 * MB, "WebSocket fragments").await;
}

/// Finding 4, second half. A WebSocket client that sends pings and never reads made the broker
/// queue a pong per ping without bound (about 10 MB per 100k pings); tungstenite's write buffer
/// is now bounded, so at most one pong waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_pings_from_a_client_that_never_reads_are_bounded() {
    let mut h = Herald::spawn("[mqtt]\nmax_keepalive = 0\n");
    let rss0 = h.rss();
    let addr = h.ws;
    bounded("ping flood", PATIENCE * 2, move || {
        let mut s = ws_open(addr);
        s.write_all(&ws_frame(true, 0x2, &connect_bytes(V311, "pinger"))).unwrap();
        // Shrink what the client's kernel takes for us, so the broker's writes back up soon.
        let ping = ws_frame(true, 0x9, &[0x5a; 125]);
        let batch: Vec<u8> = std::iter::repeat_n(ping, 1000).flatten().collect();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        // 200,000 pings, 26 MB of pongs owed to a client that never reads.
        for _ in 0..200 {
            if s.write_all(&batch).is_err() {
                break;
            }
        }
    })
    .await;
    h.assert_healthy(rss0, 8 * MB, "WebSocket ping flood").await;
}

/// An HTTP request on its own connection, returning the raw response bytes (read until the
/// server closes or `limit` passes).
fn http_raw(addr: SocketAddr, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    raw
}

/// Finding 5, smuggling. A request with two differing `Content-Length` headers was accepted
/// and its body read as a second request (RFC 9112 section 6.3: a recipient must treat such a
/// message as unrecoverable). hyper refuses it with 400 and closes; nothing behind it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_smuggling_is_refused() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    let addr = h.http;
    let raw = bounded("two content-lengths", PATIENCE, move || {
        http_raw(
            addr,
            b"POST /api/v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n\
              GET /api/v1/clients HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "refused: {text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "exactly one response, nothing smuggled: {text}");
    assert_eq!(h.metric("herald_reloads_total").await, 0, "the smuggled reload did not run");
    // A Content-Length together with Transfer-Encoding: the body is taken as chunked, as RFC
    // 9112 section 6.3 asks, and the connection closes after the response.
    let raw = bounded("CL and TE", PATIENCE, move || {
        http_raw(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
              GET /api/v1/clients HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.matches("HTTP/1.1").count() <= 1, "at most the first request is answered: {text}");
    h.assert_healthy(rss0, 16 * MB, "HTTP smuggling").await;
}

/// Issue 24, item 5: a request pipelined behind one answered 400 (or answered before its body
/// was read) must not run unanswered, so its client never has to guess whether a publish
/// happened. Such an answer closes the connection; what followed in it is not read. A good
/// request keeps the connection for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_runs_unanswered_behind_a_refused_http_request() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    let addr = h.http;
    let behind = "POST /api/v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    for (first, responses) in [
        ("GET /api/v1/%zz HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        ("POST /api/v1/%zz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 1),
        ("GET /api/v1/poll HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        ("POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 1),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 2),
    ] {
        let reloads = h.metric("herald_reloads_total").await;
        let request = format!("{first}{behind}").into_bytes();
        let raw = bounded("a pipelined pair", PATIENCE, move || http_raw(addr, &request, Duration::from_secs(5))).await;
        let text = String::from_utf8_lossy(&raw);
        assert_eq!(text.matches("HTTP/1.1 ").count(), responses, "{first:?}: {text}");
        let ran = h.metric("herald_reloads_total").await - reloads;
        assert_eq!(ran as usize, responses - 1, "{first:?}: the request behind ran exactly when answered: {text}");
        if responses == 1 {
            assert!(text.to_ascii_lowercase().contains("connection: close"), "{first:?}: {text}");
        }
    }
    h.assert_healthy(rss0, 16 * MB, "pipelined HTTP").await;
}

/// Issue 24: a stranger sending JWTs with made-up `kid`s. Each is refused 0x86 and the identity
/// provider is asked for its key set once at start and not again for them (at most once per
/// `jwks_refresh_secs`), however many arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_with_made_up_key_ids_cost_the_provider_nothing() {
    let dir = tempfile::tempdir().unwrap();
    generate_certs(dir.path());
    let (key, jwk) = common::auth::keypair(dir.path(), "RSA", "real");
    let jwks = dir.path().join("jwks.json");
    common::auth::write_jwks(&jwks, &[&jwk]);
    let (cert, tls_key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let provider = common::auth::Fixture::start(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        tls_key.to_str().unwrap(),
        "--jwks",
        jwks.to_str().unwrap(),
    ]);
    let mut h = Herald::spawn(&format!(
        "[auth]\n[auth.jwt]\njwks_url = \"{}\"\nca_file = {}\njwks_refresh_secs = 300\n",
        provider.url("/jwks.json"),
        toml_path(&dir.path().join("ca.pem"))
    ));
    wait_until("the key set fetched at start", || provider.stats()["jwks"] == 1).await;
    let rss0 = h.rss();
    let mqtt = h.mqtt;
    let sent = 1000;
    let tasks: Vec<_> = (0..sent)
        .map(|i| {
            let t = common::auth::token(&key, jsonwebtoken::Algorithm::RS256, &format!("kid-{i}-{}", i * 7919), "x");
            tokio::spawn(async move {
                let mut c = RawClient::connect_tcp(mqtt).await;
                let mut connect = connect_packet(V5, &format!("s{i}"), true);
                connect.password = Some(bytes::Bytes::from(t));
                c.send(&Packet::Connect(Box::new(connect))).await;
                matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::BAD_USER_NAME_OR_PASSWORD)
            })
        })
        .collect();
    let mut refused = Vec::new();
    for t in tasks {
        refused.push(t.await.unwrap());
    }
    assert_eq!(refused.iter().filter(|r| **r).count(), sent, "every made-up kid refused 0x86");
    assert_eq!(provider.stats()["jwks"], 1, "the provider was asked once, at start");
    let real = common::auth::token(&key, jsonwebtoken::Algorithm::RS256, "real", "rita");
    let mut connect = connect_packet(V5, "rita", true);
    connect.password = Some(bytes::Bytes::from(real));
    let (_c, ack) = RawClient::connect(mqtt, connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "the real key still works");
    h.assert_healthy(rss0, 16 * MB, "made-up kids").await;
}

/// Issue 24: an auth service that answers in 10 s, then one that is not there, while 300
/// strangers connect at once with made-up tokens. Every CONNECT is answered 0x87 within
/// `timeout_ms` (500 ms) plus scheduling, the service gets a trickle of calls through the
/// `max_in_flight` (4) slots rather than one per CONNECT, and the broker stays responsive and
/// small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_auth_service_never_holds_a_connect_past_its_timeout() {
    let service = common::auth::Fixture::start(&[]);
    service.control("slow", 10.0);
    for (url, what) in [(service.url("/auth"), "slow"), (format!("http://127.0.0.1:{}/auth", free_port()), "dead")] {
        let mut h = Herald::spawn(&format!(
            "[auth]\n[auth.http]\nurl = \"{url}\"\ntimeout_ms = 500\nmax_in_flight = 4\ncache_secs = 0\n"
        ));
        let rss0 = h.rss();
        let mqtt = h.mqtt;
        let calls0 = service.stats()["auth"].as_u64().unwrap();
        let started = Instant::now();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                tokio::spawn(async move {
                    let mut c = RawClient::connect_tcp(mqtt).await;
                    let mut connect = connect_packet(V5, &format!("s{i}"), true);
                    connect.username = Some(format!("stranger-{i}"));
                    connect.password = Some(bytes::Bytes::from(format!("tok-{i}")));
                    let sent = Instant::now();
                    c.send(&Packet::Connect(Box::new(connect))).await;
                    match c.recv_within(PATIENCE).await {
                        Ok(Some(Packet::ConnAck(a))) => (a.code, sent.elapsed()),
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        let mut answered = Vec::new();
        for t in tasks {
            answered.push(t.await.unwrap());
        }
        let slowest = answered.iter().map(|(_, t)| *t).max().unwrap();
        eprintln!("{what}: 300 CONNECTs answered in {:?}, the slowest in {slowest:?}", started.elapsed());
        assert!(answered.iter().all(|(code, _)| *code == ReasonCode::NOT_AUTHORIZED), "{what}: on_error deny");
        assert!(slowest < Duration::from_millis(500 + 1500), "{what}: a CONNECT waited {slowest:?}");
        // Four call slots, each freed when its CONNECT's deadline passes and taken by a waiting
        // one: a trickle of calls, not one per CONNECT (seen: 10 for 300).
        let calls = service.stats()["auth"].as_u64().unwrap() - calls0;
        assert!(calls <= 40, "{what}: {calls} calls for 300 CONNECTs");
        h.assert_healthy(rss0, 16 * MB, what).await;
    }
}

/// Slow HTTP requests: a head that never completes is closed after `header_timeout_ms`, a body
/// that stops coming gets 408 after `body_timeout_ms`, and a keep-alive connection that sends
/// nothing more is closed after `header_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_requests_are_timed_out() {
    let mut h = Herald::spawn_full("", "header_timeout_ms = 500\nbody_timeout_ms = 500\n", false, None);
    let rss0 = h.rss();
    let addr = h.http;
    bounded("slow requests", PATIENCE, move || {
        let started = Instant::now();
        let mut head = TcpStream::connect(addr).unwrap();
        head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
        wait_closed(&mut head, "a head that never completes");
        let raw = http_raw(
            addr,
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"topic\":",
            PATIENCE,
        );
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 408"), "a body that stops: {text}");
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        wait_closed(&mut idle, "an idle keep-alive connection");
        eprintln!("three slow requests dealt with in {:?}", started.elapsed());
    })
    .await;
    h.assert_healthy(rss0, 16 * MB, "slow HTTP requests").await;
}

/// Finding 5, slowloris. 500 connections sending a byte every 2 s took all 256 slots and
/// /healthz stopped answering. Now the oldest connection without a whole request head is closed
/// for a newcomer, so /healthz answers throughout; the evictions are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_under_an_http_slowloris() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    let addr = h.http;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut socks: Vec<TcpStream> = Vec::new();
            for _ in 0..500 {
                if let Ok(mut s) = TcpStream::connect(addr) {
                    let _ = s.write_all(b"GET /api/v1/clients HTTP/1.1\r\n");
                    socks.push(s);
                }
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut socks {
                    let _ = s.write_all(b"X");
                }
                // Closed ones come back, as an attacker's would.
                for s in &mut socks {
                    if s.take_error().ok().flatten().is_some() {
                        if let Ok(n) = TcpStream::connect(addr) {
                            *s = n;
                            let _ = s.write_all(b"GET / HTTP/1.1\r\n");
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            socks.len()
        })
    };
    // Give the attack time to take every slot (500 > 256), then probe as a kubelet would.
    bounded("probes", PATIENCE * 2, move || {
        std::thread::sleep(Duration::from_millis(1500));
        for probe in 0..10 {
            let started = Instant::now();
            let raw = http_raw(
                addr,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                Duration::from_secs(3),
            );
            let text = String::from_utf8_lossy(&raw);
            assert!(text.starts_with("HTTP/1.1 200"), "probe {probe} during the slowloris: {text:?}");
            assert!(started.elapsed() < Duration::from_secs(3));
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(attack.join().unwrap() >= 256, "the attack held more connections than there are slots");
    let (_, metrics) = {
        let addr = h.http;
        bounded("metrics", PATIENCE, move || {
            let (s, _, b) = http_request(addr, "GET", "/metrics", &[], b"");
            (s, String::from_utf8(b).unwrap())
        })
        .await
    };
    let evicted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("herald_http_evicted_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("herald_http_evicted_total");
    assert!(evicted > 0, "evictions are counted");
    h.assert_healthy(rss0, 32 * MB, "HTTP slowloris").await;
}

/// Finding 5, publish validation. `POST /api/v1/publish` accepted topics and user properties with
/// U+0000, control characters and newlines that MQTT refuses, routed them, and wrote them raw
/// into the log (a forged ERROR line). Now both paths use one check, and the log quotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_refuses_what_mqtt_refuses_and_cannot_forge_log_lines() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    let addr = h.http;
    let bodies = [
        r#"{"topic": "news/a\u0000b", "payload": "x"}"#,
        r#"{"topic": "news/x\n2026-11-30T00:00:00Z ERROR forged", "payload": "x"}"#,
        r#"{"topic": "news/\u0007bell", "payload": "x"}"#,
        r#"{"topic": "news/\u009fc1", "payload": "x"}"#,
        r#"{"topic": "news/#", "payload": "x"}"#,
        r#"{"topic": "news/ok", "payload": "x", "user_properties": {"k": "v\nERROR forged"}}"#,
        r#"{"topic": "news/ok", "payload": "x", "user_properties": [["k\u0000", "v"]]}"#,
        r#"{"topic": "news/ok", "payload": "x", "content_type": "text/\r\nplain"}"#,
        r#"{"topic": "news/ok", "payload": "x", "response_topic": "re/\u0001"}"#,
    ];
    let answers = bounded("publishes", PATIENCE, move || {
        bodies.iter().map(|b| http_json(addr, "POST", "/api/v1/publish", b)).collect::<Vec<_>>()
    })
    .await;
    for ((status, v), body) in answers.iter().zip(bodies) {
        assert_eq!(*status, 400, "{body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // The same topic over MQTT is refused by the decoder: a 5.0 client is disconnected.
    let mut c = RawClient::connect(h.mqtt, connect_packet(V5, "nul-publisher", true)).await.0;
    c.send(&publish("news/a\u{0}b", b"x", QoS::AtLeastOnce, 1)).await;
    expect_disconnect(&mut c, ReasonCode::MALFORMED_PACKET).await;
    // A client identifier built to look like a field or a line is quoted and escaped.
    let (c, _) = RawClient::connect(h.mqtt, connect_packet(V5, "x\" level=ERROR forged=\"", true)).await;
    drop(c);
    let mut seen = Vec::new();
    let line = loop {
        let line = h.log.recv_timeout(PATIENCE).expect("the connect line");
        if line.contains("client connected") && line.contains("forged") {
            break line;
        }
        seen.push(line);
    };
    assert!(line.contains(r#"client_id="x\" level=ERROR forged=\"""#), "quoted: {line}");
    seen.extend(h.new_log_lines());
    for l in &seen {
        // Every line is the broker's: a timestamp, then a level that is not ERROR; the client's
        // text appears only quoted.
        let level = l.split_whitespace().nth(1).unwrap_or("");
        assert!(l.starts_with("20") && level != "ERROR", "a forged line: {l}");
        assert!(!l.contains("forged") || l.contains(r#"client_id="x\" level=ERROR forged=\"""#), "unquoted: {l}");
    }
    h.assert_healthy(rss0, 16 * MB, "HTTP publish validation").await;
}

/// Finding 6. Assigned client identifiers were `herald-` and a counter that restarts at each
/// boot: after a restart a new anonymous 5.0 client was handed an offline persistent session's
/// identifier and with it that session. Now they are 128 random bits and never a known session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_client_identifiers_are_random_and_never_reuse_a_session() {
    let store = tempfile::tempdir().unwrap();
    let anonymous = || {
        let mut c = connect_packet(V5, "", false);
        c.properties.session_expiry_interval = Some(3600);
        c
    };
    let first = {
        let h = Herald::spawn_with("", false, Some(store.path()));
        let (mut c, ack) = RawClient::connect(h.mqtt, anonymous()).await;
        let id = ack.properties.assigned_client_identifier.clone().expect("an assigned identifier");
        c.send(&subscribe(1, "private/#", QoS::AtLeastOnce)).await;
        expect_suback(&mut c).await;
        drop(c);
        let (mut p, _) = RawClient::connect(h.mqtt, connect_packet(V5, "editor", true)).await;
        p.send(&publish("private/x", b"for the first reader only", QoS::AtLeastOnce, 1)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
        id
    };
    assert!(first.starts_with("herald-") && first.len() == "herald-".len() + 32, "128 bits in hex: {first}");
    let mut h = Herald::spawn_with("", false, Some(store.path()));
    let rss0 = h.rss();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let (mut c, ack) = RawClient::connect(h.mqtt, anonymous()).await;
        let id = ack.properties.assigned_client_identifier.clone().expect("an assigned identifier");
        assert_ne!(id, first, "a new client got the stored session's identifier");
        assert!(!ack.session_present, "a new anonymous client resumed someone's session");
        c.expect_silence(Duration::from_millis(20)).await;
        assert!(seen.insert(id));
    }
    // The first reader's session is still there, with its story.
    let mut again = connect_packet(V5, &first, false);
    again.properties.session_expiry_interval = Some(3600);
    let (mut c, ack) = RawClient::connect(h.mqtt, again).await;
    assert!(ack.session_present);
    assert_eq!(&expect_publish(&mut c).await.payload[..], b"for the first reader only");
    h.assert_healthy(rss0, 16 * MB, "assigned identifiers").await;
}

/// Finding 7. The listen backlog was 128 (2,000 connects in 0.1 s left sockets waiting for SYN
/// retries), and every connect and disconnect wrote an INFO line. Now the backlog is
/// `backlog` (default 1024) and the connection lines are sampled; the metrics count them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storms_meet_a_deep_backlog_and_sampled_logs() {
    let mut h = Herald::spawn("[log]\nconnection_lines_per_second = 50\n");
    let rss0 = h.rss();
    // The kernel reports a listener's backlog as its Send-Q.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    let ss = std::process::Command::new("ss").args(["-ltnH", &format!("sport = :{}", h.mqtt.port())]).output().unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let send_q: u32 = ss.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("ss: {ss}"));
    assert_eq!(send_q, 1024.min(somaxconn), "the listen backlog");
    // 2,000 phones reconnect at once.
    let addr = h.mqtt;
    let started = Instant::now();
    let mut phones = tokio::task::JoinSet::new();
    for i in 0..2000 {
        phones.spawn(async move {
            let (c, _) = RawClient::connect(addr, connect_packet(V311, &format!("storm-{i}"), true)).await;
            c
        });
    }
    let mut connected = Vec::new();
    while let Some(c) = tokio::time::timeout(PATIENCE * 2, phones.join_next()).await.expect("the storm connects") {
        connected.push(c.unwrap());
    }
    let took = started.elapsed();
    drop(connected);
    // A takeover storm: one client identifier, 300 connections in a row.
    for _ in 0..300 {
        let (c, _) = RawClient::connect(addr, connect_packet(V311, "same-phone", true)).await;
        drop(c);
    }
    h.wait_all_closed("the storm").await;
    let total = h.metric("herald_connections_total").await;
    assert!(total >= 2300, "every connection counted: {total}");
    let elapsed_secs = started.elapsed().as_secs() + 2;
    let lines = h.new_log_lines();
    let connection_lines =
        lines.iter().filter(|l| l.contains("client connected") || l.contains("client disconnected")).count();
    eprintln!("2,000 connects in {took:?}; {connection_lines} connection lines for 4,600 events over {elapsed_secs} s");
    assert!(connection_lines as u64 <= 50 * elapsed_secs, "{connection_lines} lines in {elapsed_secs} s");
    // The next connection event in a later second reports how many lines were left out.
    let mut reported = lines.iter().any(|l| l.contains("left out"));
    let deadline = Instant::now() + PATIENCE;
    while !reported {
        assert!(Instant::now() < deadline, "the left-out lines were never reported");
        drop(RawClient::connect(addr, connect_packet(V311, "after-the-storm", true)).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        reported = h.new_log_lines().iter().any(|l| l.contains("left out"));
    }
    h.assert_healthy(rss0, 64 * MB, "reconnect storm").await;
}

/// Finding 7, the last part: re-subscribing `#` beyond `max_pending_retained` wrote one WARN per
/// SUBSCRIBE; now one per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_beyond_max_pending_retained_warns_once() {
    let mut h = Herald::spawn("[mqtt]\nmax_pending_retained = 5\n");
    let rss0 = h.rss();
    let (mut p, _) = RawClient::connect(h.mqtt, connect_packet(V311, "retainer", true)).await;
    for i in 0..20u16 {
        let mut m =
            herald::codec::Publish { retain: true, ..publish_msg(&format!("r/{i}"), b"x", QoS::AtLeastOnce, i + 1) };
        m.retain = true;
        p.send(&Packet::Publish(m)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let (mut c, _) = RawClient::connect(h.mqtt, connect_packet(V311, "greedy", true)).await;
    for i in 0..50u16 {
        c.send(&subscribe(i + 1, "#", QoS::AtMostOnce)).await;
    }
    let mut subacks = 0;
    while subacks < 50 {
        if let Some(Packet::SubAck(_)) = c.recv().await {
            subacks += 1;
        }
    }
    let warnings =
        h.log_until_marker("marker").await.into_iter().filter(|l| l.contains("max_pending_retained")).count();
    assert_eq!(warnings, 1, "one warning for 50 SUBSCRIBEs");
    h.assert_healthy(rss0, 16 * MB, "retained overflow").await;
}

/// Slowloris on every MQTT listener: sockets that send a byte now and then and never finish a
/// CONNECT (or a TLS or WebSocket handshake) are closed by the connect timeout, and each pins
/// only what it sent. Guards a property that already held on plain MQTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_every_listener_is_closed_by_the_connect_timeout() {
    let mut h = Herald::spawn_with("[mqtt]\nconnect_timeout = 2\n", true, None);
    let rss0 = h.rss();
    let targets = [h.mqtt, h.ws, h.mqtts.unwrap(), h.wss.unwrap()];
    bounded("slowloris", PATIENCE * 3, move || {
        let started = Instant::now();
        let mut socks: Vec<TcpStream> =
            targets.iter().flat_map(|a| (0..100).map(move |_| TcpStream::connect(a).unwrap())).collect();
        // A byte every 500 ms: far slower than any handshake, faster than any idle timeout.
        let mut open = socks.len();
        while open > 0 {
            open = 0;
            for s in &mut socks {
                if s.write_all(&[0x16]).is_ok() {
                    open += 1;
                }
            }
            assert!(started.elapsed() < PATIENCE * 2, "{open} slow sockets still open");
            std::thread::sleep(Duration::from_millis(500));
            // A write to a socket the broker closed fails once the reset comes back.
            let closed = socks.iter().filter(|s| s.take_error().ok().flatten().is_some()).count();
            if closed == socks.len() {
                break;
            }
        }
        for s in &mut socks {
            wait_closed(s, "a slow socket");
        }
    })
    .await;
    h.assert_healthy(rss0, 32 * MB, "slowloris on every listener").await;
}

/// Floods within one accepted connection: thousands of properties, levels, filters and packet
/// identifiers, and QoS 2 identifier reuse. The broker refuses what the specification refuses
/// and delivers a reused QoS 2 identifier once [MQTT-4.3.3-10]. Guards properties that already
/// held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_properties_levels_filters_and_packet_identifiers() {
    let mut h = Herald::spawn("");
    let rss0 = h.rss();
    // A CONNECT with 5,000 user properties fits in 64 KiB and is accepted.
    let mut connect = connect_packet(V5, "propertied", true);
    connect.properties.user_properties = (0..5000).map(|i| (format!("k{i}"), "v".into())).collect();
    let (mut c, _) = RawClient::connect(h.mqtt, connect).await;
    // A PUBLISH whose topic has 30,001 levels: refused (0x90) without walking them.
    c.send(&publish(&"a/".repeat(30_000), b"x", QoS::AtLeastOnce, 1)).await;
    expect_disconnect(&mut c, ReasonCode::TOPIC_NAME_INVALID).await;
    // A SUBSCRIBE with 20,000 filters: one SUBACK with 20,000 codes.
    let (mut c, _) = RawClient::connect(h.mqtt, connect_packet(V5, "filters", true)).await;
    let filters = (0..20_000).map(|i| (format!("f/{i}/+"), herald::codec::SubscriptionOptions::default())).collect();
    c.send(&Packet::Subscribe(herald::codec::Subscribe { packet_id: 1, filters, properties: Default::default() }))
        .await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reasons.len(), 20_000),
        other => panic!("SUBACK expected: {other:?}"),
    }
    drop(c);
    // QoS 2 with one identifier, 1,000 times without PUBREL: one delivery.
    let (mut sub, _) = RawClient::connect(h.mqtt, connect_packet(V311, "once", true)).await;
    sub.send(&subscribe(1, "once/x", QoS::ExactlyOnce)).await;
    expect_suback(&mut sub).await;
    let (mut p, _) = RawClient::connect(h.mqtt, connect_packet(V311, "reuser", true)).await;
    let same: Vec<Packet> = (0..1000).map(|_| publish("once/x", b"exactly once", QoS::ExactlyOnce, 7)).collect();
    p.send_together(&same).await;
    for _ in 0..1000 {
        assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    }
    p.send(&Packet::PubRel(herald::codec::PubResponse::new(7, ReasonCode::SUCCESS))).await;
    assert!(matches!(p.recv().await, Some(Packet::PubComp(_))));
    let first = expect_publish(&mut sub).await;
    assert_eq!(&first.payload[..], b"exactly once");
    sub.send(&Packet::PubRec(herald::codec::PubResponse::new(first.packet_id, ReasonCode::SUCCESS))).await;
    assert!(matches!(sub.recv().await, Some(Packet::PubRel(_))));
    sub.send(&Packet::PubComp(herald::codec::PubResponse::new(first.packet_id, ReasonCode::SUCCESS))).await;
    sub.expect_silence(Duration::from_millis(300)).await;
    // Every packet identifier at once in QoS 1: each acknowledged.
    let all: Vec<Packet> = (1..=u16::MAX).map(|id| publish("ids/x", b"", QoS::AtLeastOnce, id)).collect();
    p.send_together(&all).await;
    for _ in 1..=u16::MAX {
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    h.assert_healthy(rss0, 48 * MB, "floods").await;
}

/// A subscriber that never reads: the broker keeps at most `max_outbound_bytes` and its queue
/// for it, other clients are unaffected, and it is closed once its keep-alive passes without
/// progress. Guards a property that already held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_costs_a_bounded_amount() {
    let mut h = Herald::spawn("[mqtt]\nmax_queued_messages = 100\n");
    let rss0 = h.rss();
    let mut sleeper = connect_packet(V311, "sleeper", true);
    sleeper.keep_alive = 2;
    let (mut s, _) = RawClient::connect(h.mqtt, sleeper).await;
    s.send(&subscribe(1, "flood/#", QoS::AtMostOnce)).await;
    expect_suback(&mut s).await;
    let (mut p, _) = RawClient::connect(h.mqtt, connect_packet(V311, "flooder", true)).await;
    // 100 MB of QoS 0 stories in 64 KiB payloads.
    let story = encode(V311, &[publish("flood/x", &[1u8; 64 * 1024], QoS::AtMostOnce, 0)]);
    let batch: Vec<u8> = std::iter::repeat_n(story, 16).flatten().collect();
    for _ in 0..100 {
        p.send_raw(&batch).await;
    }
    // The flooder is still served (its own round trip), and memory stays bounded.
    h.assert_healthy(rss0, 48 * MB, "a subscriber that never reads").await;
    // The sleeper is dropped: keep-alive 2 s with nothing read.
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match s.stream.read(&mut [0u8; 65536]).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the sleeper was closed");
    drop(p);
}

/// A TLS subscriber that never reads (openssl s_client whose output nobody reads): rustls holds
/// at most `edge_buffer_bytes` of records for it and the connection `max_outbound_bytes`; 300 MB
/// published at it leave memory bounded and other clients served. Guards `mqtt.edge_buffer_bytes`.
///
/// With the old pump task and Unix socket pair between the TLS stream and the connection, this
/// failed 2 runs in 3 beside the other hostile tests (+171 and +179 MB for the 300 MB sent).
/// With rustls driven in the connection's task [issue 14] three runs of the whole battery gave
/// +12.3 to +13.0 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_subscriber_that_never_reads_costs_a_bounded_amount() {
    let mut h = Herald::spawn_with("[mqtt]\nmax_queued_messages = 100\n", true, None);
    let rss0 = h.rss();
    let mqtts = h.mqtts.unwrap();
    let mut sleeper = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &mqtts.to_string(), "-CAfile"])
        .arg(h._dir.path().join("ca.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = sleeper.stdin.take().unwrap();
    stdin
        .write_all(&encode(
            V311,
            &[
                Packet::Connect(Box::new(connect_packet(V311, "tls-sleeper", true))),
                subscribe(1, "flood/#", QoS::AtMostOnce),
            ],
        ))
        .unwrap();
    stdin.flush().unwrap();
    let registry_has = |h: &Herald| {
        let addr = h.http;
        move || {
            let (_, _, b) = http_request(addr, "GET", "/api/v1/clients/tls-sleeper", &[], b"");
            String::from_utf8_lossy(&b).contains("\"subscriptions\": 1")
        }
    };
    let subscribed = registry_has(&h);
    bounded("the TLS sleeper subscribes", PATIENCE, move || {
        wait_until_blocking("the TLS sleeper's subscription", subscribed)
    })
    .await;
    let (mut p, _) = RawClient::connect(h.mqtt, connect_packet(V311, "tls-flooder", true)).await;
    let story = encode(V311, &[publish("flood/x", &[1u8; 64 * 1024], QoS::AtMostOnce, 0)]);
    let batch: Vec<u8> = std::iter::repeat_n(story, 16).flatten().collect();
    // 300 MB at a reader that takes nothing. What it may pin is configuration's: its queue (100
    // messages, each keeping its 64 KiB read buffer alive), `max_outbound_bytes`, the edge's
    // buffers; the allocator keeps some of what was freed. Far below what was sent.
    for _ in 0..300 {
        p.send_raw(&batch).await;
    }
    h.assert_healthy(rss0, 96 * MB, "a TLS subscriber that never reads").await;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    drop(stdin);
}

/// Malformed TLS and WebSocket handshakes: garbage, a ClientHello announcing 16 MB, an upgrade
/// without the subprotocol, a 100 KB header. Each is refused and closed; nothing else notices.
/// Guards properties that already held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tls_and_websocket_handshakes_are_refused() {
    let mut h = Herald::spawn_with("[mqtt]\nconnect_timeout = 3\n", true, None);
    let rss0 = h.rss();
    let (mqtts, wss, ws) = (h.mqtts.unwrap(), h.wss.unwrap(), h.ws);
    bounded("malformed handshakes", PATIENCE * 2, move || {
        let attacks: Vec<(SocketAddr, Vec<u8>)> = vec![
            (mqtts, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            (mqtts, vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff]),
            (mqtts, (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect()),
            (wss, vec![0x16, 0x03, 0x03, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00]),
            (
                ws,
                b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    .to_vec(),
            ),
            (ws, {
                let mut r = b"GET /mqtt HTTP/1.1\r\nX-Big: ".to_vec();
                r.extend(std::iter::repeat_n(b'a', 100_000));
                r
            }),
            (ws, b"\x00\x01\x02 not http at all\r\n\r\n".to_vec()),
        ];
        for (addr, bytes) in attacks {
            for _ in 0..20 {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = s.write_all(&bytes);
                wait_closed(&mut s, "a malformed handshake");
            }
        }
    })
    .await;
    h.assert_healthy(rss0, 32 * MB, "malformed handshakes").await;
}

/// Random mutations of valid sessions (bytes flipped, inserted, deleted, truncated), 600 of
/// them over their own sockets: once the clients have gone every connection task has ended,
/// and the broker is alive, serves a round trip and holds no more memory: no panic, hang or
/// leak. Guards properties that already held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mutations_of_valid_sessions() {
    let mut h = Herald::spawn("[mqtt]\nconnect_timeout = 2\nmax_keepalive = 2\n");
    let rss0 = h.rss();
    let sessions: Vec<Vec<u8>> = [V311, V5]
        .into_iter()
        .map(|v| {
            let mut will = connect_packet(v, "mutant", false);
            will.will = Some(herald::codec::Will {
                topic: "wills/x".into(),
                payload: bytes::Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Default::default(),
            });
            will.username = Some("user".into());
            will.password = Some(bytes::Bytes::from_static(b"pw"));
            encode(
                v,
                &[
                    Packet::Connect(Box::new(will)),
                    subscribe(1, "m/+/x", QoS::ExactlyOnce),
                    publish("m/a/x", b"zero", QoS::AtMostOnce, 0),
                    publish("m/a/x", b"one", QoS::AtLeastOnce, 2),
                    publish("m/a/x", b"two", QoS::ExactlyOnce, 3),
                    Packet::PubRel(herald::codec::PubResponse::new(3, ReasonCode::SUCCESS)),
                    Packet::Unsubscribe(herald::codec::Unsubscribe {
                        packet_id: 4,
                        filters: vec!["m/+/x".into()],
                        properties: Default::default(),
                    }),
                    Packet::PingReq,
                    Packet::Disconnect(herald::codec::Disconnect {
                        reason: ReasonCode::SUCCESS,
                        properties: Default::default(),
                    }),
                ],
            )
        })
        .collect();
    let addr = h.mqtt;
    bounded("mutations", PATIENCE * 4, move || {
        // xorshift: the same 600 mutants every run, so a failure can be replayed.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut open: Vec<TcpStream> = Vec::new();
        for round in 0..600 {
            let mut bytes = sessions[round % 2].clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                match next() % 4 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.insert(at, next() as u8),
                    2 => {
                        bytes.remove(at);
                    }
                    _ => bytes[at] = next() as u8,
                }
            }
            if next() % 5 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            }
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&bytes);
            // A mutant may be a valid session with a keep-alive of 0 or a packet that waits for
            // more bytes, which the broker rightly keeps open; the client goes away instead.
            open.push(s);
            if open.len() == 50 {
                open.clear();
            }
        }
    })
    .await;
    // Every connection task ended: nothing hung on a mutant.
    h.wait_all_closed("mutated sessions").await;
    h.assert_healthy(rss0, 32 * MB, "mutated sessions").await;
}

/// What one unauthenticated socket can pin, measured for docs/security.md: 1,000 sockets that
/// each sent a CONNECT's first 64 KiB minus one byte and stall. A measurement with a bound,
/// not a regression test: the figure was the same before issue 13 for a 64 KiB CONNECT (what
/// changed is that a CONNECT can no longer be larger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_one_unauthenticated_socket_can_pin() {
    let mut h = Herald::spawn("[mqtt]\nconnect_timeout = 30\n");
    let rss0 = h.rss();
    let addr = h.mqtt;
    const SOCKETS: u64 = 1000;
    let socks = bounded("stalled CONNECTs", PATIENCE * 2, move || {
        let mut partial = vec![0x10u8, 0xfa, 0xff, 0x03]; // remaining length 65,530: 65,534 in all
        partial.extend(std::iter::repeat_n(0u8, 65_530 - 1));
        (0..SOCKETS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&partial).unwrap();
                s
            })
            .collect::<Vec<_>>()
    })
    .await;
    // Wait until the broker has read what they sent (its receive queues are empty).
    let port = addr.port();
    bounded("read by the broker", PATIENCE, move || {
        wait_until_blocking("the broker to read every stalled CONNECT", || receive_queues_empty(port))
    })
    .await;
    let pinned = h.rss().saturating_sub(rss0) / SOCKETS;
    eprintln!("one unauthenticated socket pins {pinned} bytes (a 64 KiB CONNECT, less one byte, sent)");
    assert!(pinned < 160 * 1024, "{pinned} bytes per socket");
    h.assert_healthy(rss0, 160 * SOCKETS * 1024, "stalled CONNECTs").await;
    drop(socks);
}
