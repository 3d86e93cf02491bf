//! Test support: a real Herald broker on 127.0.0.1:0 in its own thread and runtime, and a raw
//! MQTT client that speaks bytes over a real socket, decoding what the broker sends with the
//! codec in client role.
#![allow(dead_code)]

pub mod auth;
pub mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use herald::broker::Broker;
use herald::codec::{Decoder, Packet, ProtocolVersion, Role};
use herald::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct TestBroker {
    pub addr: SocketAddr,
    /// Every listener's address, in configuration order (the plain one first).
    pub addrs: Vec<SocketAddr>,
    pub broker: Arc<Broker>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The store's directory, when the broker owns it (removed after the broker stops).
    _data: Option<tempfile::TempDir>,
}

impl TestBroker {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.broker.begin_shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a broker whose configuration is the default plus `extra` TOML for the `[mqtt]` table,
/// with its store in a temporary directory of its own.
pub fn start_with(mqtt_toml: &str) -> TestBroker {
    let data = tempfile::tempdir().expect("temporary directory");
    let mut b = start_at(data.path(), &format!("[mqtt]\n{mqtt_toml}\n"));
    b._data = Some(data);
    b
}

/// Starts a broker with whole extra tables of configuration and a store of its own.
pub fn start_toml(extra_toml: &str) -> TestBroker {
    let data = tempfile::tempdir().expect("temporary directory");
    let mut b = start_at(data.path(), extra_toml);
    b._data = Some(data);
    b
}

/// Starts a broker on the store in `dir` (which outlives it, for restart tests), its
/// configuration the default plus `extra_toml` (whole tables).
pub fn start_at(dir: &std::path::Path, extra_toml: &str) -> TestBroker {
    // `$SYS` is off unless a test asks for it: its retained updates would show up in tests that
    // count retained messages or expect silence on `$SYS/#`.
    let sys = if extra_toml.contains("[sys]") { "" } else { "[sys]\ninterval = 0\n" };
    let text = format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n{sys}{extra_toml}\n",
        dir.display().to_string()
    );
    let config = Config::parse(&text).expect("test configuration");
    let server = herald::server::open(config).expect("store opens");
    let broker = server.broker().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let (btx, brx) = tokio::sync::oneshot::channel();
            let server = tokio::spawn(herald::server::run(server, Some(btx)));
            let addrs = brx.await.expect("broker bound");
            tx.send(addrs).unwrap();
            server.await.unwrap().unwrap();
        });
    });
    let addrs: Vec<SocketAddr> = rx.recv_timeout(Duration::from_secs(10)).expect("broker started");
    TestBroker { addr: addrs[0], addrs, broker, thread: Some(thread), _data: None }
}

pub fn start() -> TestBroker {
    start_with("")
}

/// A client that sends raw bytes and reads whole packets, for the statements no client library
/// lets us break.
pub struct RawClient {
    pub stream: TcpStream,
    decoder: Decoder,
    buf: BytesMut,
    pub version: ProtocolVersion,
}

pub const WAIT: Duration = Duration::from_secs(5);

impl RawClient {
    pub async fn connect_tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            decoder: Decoder::new(Role::Client, u32::MAX),
            buf: BytesMut::new(),
            version: ProtocolVersion::V3_1_1,
        }
    }

    /// Opens a session: sends CONNECT and expects a successful CONNACK, which it returns.
    pub async fn connect(addr: SocketAddr, connect: herald::codec::Connect) -> (RawClient, herald::codec::ConnAck) {
        let mut c = RawClient::connect_tcp(addr).await;
        c.version = connect.protocol;
        c.decoder.version = Some(connect.protocol);
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert!(!ack.code.is_error() && ack.code.0 == 0, "CONNACK refused: {ack:?}");
                (c, ack)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// `connect` that may fail: None when the node is not there, refuses, or does not answer.
    pub async fn try_connect(
        addr: SocketAddr,
        connect: herald::codec::Connect,
    ) -> Option<(RawClient, herald::codec::ConnAck)> {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.ok()?.ok()?;
        stream.set_nodelay(true).ok()?;
        let mut c = RawClient {
            stream,
            decoder: Decoder::new(Role::Client, u32::MAX),
            buf: BytesMut::new(),
            version: connect.protocol,
        };
        c.decoder.version = Some(connect.protocol);
        if !c.try_send(&Packet::Connect(Box::new(connect))).await {
            return None;
        }
        match c.recv_within(WAIT).await {
            Ok(Some(Packet::ConnAck(ack))) if ack.code.0 == 0 => Some((c, ack)),
            _ => None,
        }
    }

    pub async fn send(&mut self, packet: &Packet) {
        if let Packet::Connect(c) = packet {
            self.version = c.protocol;
            self.decoder.version = Some(c.protocol);
        }
        let mut out = BytesMut::new();
        packet.encode(self.version, &mut out);
        self.stream.write_all(&out).await.expect("write");
    }

    /// Sends a packet; false if the connection is gone (for tests that kill the broker).
    pub async fn try_send(&mut self, packet: &Packet) -> bool {
        let mut out = BytesMut::new();
        packet.encode(self.version, &mut out);
        self.stream.write_all(&out).await.is_ok()
    }

    /// Sends several packets in one write (one TCP segment on loopback).
    pub async fn send_together(&mut self, packets: &[Packet]) {
        let mut out = BytesMut::new();
        for packet in packets {
            if let Packet::Connect(c) = packet {
                self.version = c.protocol;
                self.decoder.version = Some(c.protocol);
            }
            packet.encode(self.version, &mut out);
        }
        self.stream.write_all(&out).await.expect("write");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, or None once the broker has closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT).await.expect("timed out waiting for a packet")
    }

    /// Err(()) on timeout.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf).expect("broker sent a valid packet") {
                return Ok(Some(p));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(p) = self.recv_within(wait).await {
            panic!("expected nothing, got {p:?}");
        }
    }
}

pub fn connect_packet(version: ProtocolVersion, client_id: &str, clean: bool) -> herald::codec::Connect {
    herald::codec::Connect {
        protocol: version,
        clean_start: clean,
        keep_alive: 60,
        properties: Default::default(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

pub fn publish(topic: &str, payload: &[u8], qos: herald::codec::QoS, packet_id: u16) -> Packet {
    Packet::Publish(herald::codec::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Default::default(),
        payload: bytes::Bytes::copy_from_slice(payload),
    })
}

/// The PUBLISH itself, for tests that set flags or properties before sending it.
pub fn publish_msg(topic: &str, payload: &[u8], qos: herald::codec::QoS, packet_id: u16) -> herald::codec::Publish {
    match publish(topic, payload, qos, packet_id) {
        Packet::Publish(p) => p,
        _ => unreachable!("publish() builds a PUBLISH"),
    }
}

pub fn subscribe(packet_id: u16, filter: &str, qos: herald::codec::QoS) -> Packet {
    Packet::Subscribe(herald::codec::Subscribe {
        packet_id,
        properties: Default::default(),
        filters: vec![(filter.into(), herald::codec::SubscriptionOptions { qos, ..Default::default() })],
    })
}

/// Waits for a whole SUBACK and returns its reason codes.
pub async fn expect_suback(c: &mut RawClient) -> Vec<u8> {
    match c.recv().await {
        Some(Packet::SubAck(s)) => s.reasons.iter().map(|r| r.0).collect(),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

pub async fn expect_publish(c: &mut RawClient) -> herald::codec::Publish {
    match c.recv().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// A 5.0 client subscribed to `filter`, its SUBACK checked.
pub async fn subscriber(b: &TestBroker, id: &str, filter: &str, qos: herald::codec::QoS) -> RawClient {
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(ProtocolVersion::V5, id, true)).await;
    c.send(&subscribe(1, filter, qos)).await;
    assert_eq!(expect_suback(&mut c).await, vec![qos as u8]);
    c
}

/// Expects a DISCONNECT with `reason` from the broker.
pub async fn expect_disconnect(c: &mut RawClient, reason: herald::codec::ReasonCode) {
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason),
        other => panic!("expected DISCONNECT 0x{:02X}, got {other:?}", reason.0),
    }
}

/// Starts the `herald` binary with `config` and waits until its `listeners` listeners have
/// logged their addresses. Returns the process (the caller stops it), their ports in order, and
/// the rest of its log, line by line (the log is always drained, so the broker never blocks on
/// a full pipe).
pub fn spawn_herald(
    config: &std::path::Path,
    listeners: usize,
) -> (std::process::Child, Vec<u16>, std::sync::mpsc::Receiver<String>) {
    // HERALD_BIN runs the black-box tests against another build (an older commit's, to show a
    // regression test fails there).
    let binary = std::env::var("HERALD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_herald").to_owned());
    let mut command = std::process::Command::new(binary);
    command.args(["--config", config.to_str().unwrap()]);
    spawn_herald_command(command, listeners)
}

/// `spawn_herald` with a command of the caller's that ends up running the herald binary (under
/// `unshare`, say).
pub fn spawn_herald_command(
    mut command: std::process::Command,
    listeners: usize,
) -> (std::process::Child, Vec<u16>, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        // Only a fatal error goes to standard error: read when the broker exits before listening.
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ports = Vec::new();
    let mut seen = Vec::new();
    while ports.len() < listeners {
        let Some(Ok(line)) = lines.next() else {
            let mut error = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut error);
            panic!("broker exited before listening: {error}\nits log:\n{}", seen.join("\n"));
        };
        seen.push(line.clone());
        // Text lines carry `addr=127.0.0.1:PORT`, JSON lines `"addr":"127.0.0.1:PORT"`.
        if let Some(rest) = line.split("addr=127.0.0.1:").nth(1).or_else(|| line.split("\"addr\":\"127.0.0.1:").nth(1))
        {
            ports.push(rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap());
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, ports, rx)
}

/// An HTTP/1.1 response head (without its blank line): the status and the headers, their
/// names in lower case.
pub fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let head = std::str::from_utf8(head).expect("an ASCII response head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

/// An HTTP/1.1 exchange over a real socket, one request per connection: (status, headers
/// lower-cased, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP server");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let (status, headers) = parse_head(&raw[..split]);
    let body = raw[split + 4..].to_vec();
    let length: usize = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap();
    assert_eq!(body.len(), length, "content-length matches the body");
    (status, headers, body)
}

/// `http` with a JSON answer.
pub fn http_json(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, headers, body) = http_request(addr, method, path, &[], body.as_bytes());
    assert!(
        headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("application/json")),
        "{path}: {headers:?}"
    );
    (status, serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}")))
}

/// Waits until the session of `client_id` is parked (its connection task saw the socket close),
/// so that what is published next goes to its offline queue.
pub async fn wait_parked(b: &TestBroker, client_id: &str) {
    let registry = b.broker.registry();
    wait_until(&format!("{client_id} to be parked"), || registry.get(client_id).is_some_and(|s| !s.is_online())).await;
}

/// A persistent 3.1.1 session subscribed to `filter` at QoS 1 whose client has gone offline.
pub async fn offline_session(b: &TestBroker, client_id: &str, filter: &str) {
    let connect = connect_packet(ProtocolVersion::V3_1_1, client_id, false);
    let (mut c, _) = RawClient::connect(b.addr, connect).await;
    c.send(&subscribe(1, filter, herald::codec::QoS::AtLeastOnce)).await;
    expect_suback(&mut c).await;
    drop(c);
    wait_parked(b, client_id).await;
}

/// How long a test waits for a condition before it fails: generous, because the suite runs on
/// two loaded cores; a condition that holds returns at once.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Waits until `cond` holds, polling every 10 ms, and fails the test naming `what` after
/// `PATIENCE`. For tests that must wait for the broker to reach a state (a session parked, a
/// subscription in place, a counter moved) rather than sleep for a time they hope is enough.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `wait_until` for tests without a runtime of their own.
pub fn wait_until_blocking(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A masked client WebSocket frame [RFC 6455 5.2].
pub fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x11, 0x22, 0x33, 0x44];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The directory of the JavaScript clients (MQTT.js, playwright-core), installed by
/// scripts/install-deps.sh with `npm ci`.
pub fn js_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/mqtt").exists() && dir.join("node_modules/playwright-core").exists(),
        "tests/js/node_modules is missing: run scripts/install-deps.sh"
    );
    dir
}

/// A Node script of tests/js running, its JSON lines read with a deadline.
pub struct NodeScript {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl NodeScript {
    pub fn start(script: &str, args: &[&str]) -> NodeScript {
        use std::io::BufRead;
        let mut child = std::process::Command::new("node")
            .arg(script)
            .args(args)
            .current_dir(js_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        NodeScript { child, lines, seen: Vec::new() }
    }

    /// The next line whose `step` is `step`, within a minute (a browser's start included);
    /// fails the test on a `failed` step, an exit, or the deadline.
    pub fn step(&mut self, step: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line =
                self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no {step:?} step; saw {:#?}", self.seen));
            self.seen.push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
            if v["step"] == step {
                return v;
            }
            assert_ne!(v["step"], "failed", "the script failed: {:#?}", self.seen);
        }
    }

    pub fn say(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the script's exit and checks it succeeded.
    pub fn finish(mut self) {
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        assert!(status.success(), "exit {status}: {:#?}", self.seen);
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on 127.0.0.1 now, for a configuration that must name it before the broker
/// starts (an allowed origin, an address that must survive a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A development CA, a server certificate for localhost and 127.0.0.1 and a client
/// certificate (CN device-1) in `dir`, by certs/generate.sh.
pub fn generate_certs(dir: &std::path::Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/generate.sh");
    let out = std::process::Command::new("bash").args([script, "device-1", dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "certs/generate.sh: {}", String::from_utf8_lossy(&out.stderr));
}

/// A path as a TOML string.
pub fn toml_path(p: &std::path::Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Adds `user` to a password file with Mosquitto's own `mosquitto_passwd` (creating the file).
pub fn mosquitto_passwd(file: &std::path::Path, user: &str, password: &str) {
    let mut cmd = std::process::Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let out = cmd.args(["-b", file.to_str().unwrap(), user, password]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
