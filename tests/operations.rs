//! Operations [issue 6]: `$SYS`, `/metrics` parsed by the Prometheus client library's parser,
//! every HTTP endpoint (with our raw HTTP client, curl and Python's urllib), JSON logs, and a
//! graceful shutdown of the real binary that loses nothing acknowledged.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use herald::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use serde_json::Value;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// A broker with the HTTP server on an ephemeral loopback port and `$SYS` every `sys` seconds.
fn ops_broker(sys: u64, extra: &str) -> (TestBroker, SocketAddr) {
    let b = start_toml(&format!("[http]\nbind = \"127.0.0.1:0\"\n[sys]\ninterval = {sys}\n{extra}"));
    let http = b.broker.http_addr().expect("the HTTP server is bound");
    (b, http)
}

/// Every `$SYS` message a rumqttc client subscribed to `$SYS/#` has seen, latest value per topic.
struct SysWatcher {
    values: std::sync::Arc<std::sync::Mutex<HashMap<String, String>>>,
    _client: rumqttc::AsyncClient,
}

impl SysWatcher {
    async fn start(port: u16, id: &str) -> SysWatcher {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (client, mut event_loop) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 1000);
        client.subscribe("$SYS/#", QoS::AtMostOnce).await.unwrap();
        let values = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
        let v = values.clone();
        tokio::spawn(async move {
            while let Ok(event) = event_loop.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let value = String::from_utf8_lossy(&p.payload).into_owned();
                    v.lock().unwrap().insert(p.topic.clone(), value);
                }
            }
        });
        SysWatcher { values, _client: client }
    }

    fn get(&self, topic: &str) -> Option<String> {
        self.values.lock().unwrap().get(&format!("$SYS/broker/{topic}")).cloned()
    }

    fn number(&self, topic: &str) -> Option<f64> {
        self.get(topic).and_then(|v| v.parse().ok())
    }

    /// Waits until `topic`'s value satisfies `ok`; panics with the last value after 10 s.
    async fn wait_for(&self, topic: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.number(topic).filter(|v| ok(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "$SYS/broker/{topic} stayed at {:?}", self.get(topic));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_counters_move_as_clients_connect_and_publish() {
    let (b, _) = ops_broker(1, "");
    let sys = SysWatcher::start(b.port(), "ops-dashboard").await;
    sys.wait_for("clients/connected", |v| v >= 1.0).await;
    assert_eq!(sys.get("version").as_deref(), Some(concat!("herald ", env!("CARGO_PKG_VERSION"))));
    assert!(sys.get("uptime").unwrap().ends_with(" seconds"), "Mosquitto's uptime format");
    let connected = sys.number("clients/connected").unwrap();
    let received = sys.number("publish/messages/received").unwrap();
    let total = sys.number("connections/total").unwrap();

    // [MQTT-4.7.2-1] a subscriber to `#` sees no `$SYS` topic.
    let mut everything = subscriber(&b, "wildcard", "#", QoS::AtMostOnce).await;
    let (mut editor, _) = RawClient::connect(b.addr, connect_packet(V5, "editor", true)).await;
    for i in 1..=5u16 {
        editor.send(&publish("news/tech/ai", format!("story {i}").as_bytes(), QoS::AtLeastOnce, i)).await;
        assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
    }
    for _ in 1..=5 {
        assert_eq!(expect_publish(&mut everything).await.topic, "news/tech/ai");
    }
    sys.wait_for("clients/connected", |v| v >= connected + 2.0).await;
    sys.wait_for("publish/messages/received", |v| v >= received + 5.0).await;
    sys.wait_for("connections/total", |v| v >= total + 2.0).await;
    sys.wait_for("subscriptions/count", |v| v >= 2.0).await;
    sys.wait_for("load/publish/received/1min", |v| v > 0.0).await;
    sys.wait_for("bytes/received", |v| v > 0.0).await;
    everything.expect_silence(Duration::from_millis(1500)).await;

    // No client may publish under `$SYS`: 5.0 is told 0x87, and nothing is routed.
    editor.send(&publish("$SYS/broker/version", b"forged", QoS::AtLeastOnce, 9)).await;
    match editor.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(sys.get("version").as_deref(), Some("forged"));

    drop(editor);
    sys.wait_for("clients/connected", |v| v <= connected + 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_users_the_acl_allows_read_sys() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic read news/#\nuser ops\ntopic read $SYS/#\n").unwrap();
    let (b, _) =
        ops_broker(1, &format!("[auth]\nallow_anonymous = true\nacl_file = {:?}\n", acl.display().to_string()));
    let mut reader_connect = connect_packet(V5, "reader", true);
    reader_connect.username = Some("reader".into());
    let (mut reader, _) = RawClient::connect(b.addr, reader_connect).await;
    reader.send(&subscribe(1, "$SYS/#", QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut reader).await, vec![0x87], "not allowed to read $SYS");
    let mut ops_connect = connect_packet(V5, "ops", true);
    ops_connect.username = Some("ops".into());
    let (mut ops, _) = RawClient::connect(b.addr, ops_connect).await;
    ops.send(&subscribe(1, "$SYS/broker/clients/connected", QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut ops).await, vec![0]);
    // The retained figure may be from a round before anyone connected (0); the next rounds,
    // every second, count the two clients.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let p = expect_publish(&mut ops).await;
        assert_eq!(p.topic, "$SYS/broker/clients/connected");
        if std::str::from_utf8(&p.payload).unwrap().parse::<u64>().unwrap() >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "clients/connected never counted the clients");
    }
}

/// Runs tests/tools/parse_prometheus.py, which fetches /metrics with urllib and parses it with
/// prometheus_client's parser; returns (content type, samples, family types).
fn scrape(http: SocketAddr, token: Option<&str>) -> (String, HashMap<String, f64>, HashMap<String, String>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/parse_prometheus.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(format!("http://{http}/metrics"));
    if let Some(t) = token {
        cmd.arg(t);
    }
    let out = cmd.output().expect("python3 runs (scripts/install-deps.sh installs prometheus-client)");
    assert!(out.status.success(), "the Prometheus parser refused /metrics: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = v["samples"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect();
    let types = v["types"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().into())).collect();
    (v["content_type"].as_str().unwrap().to_owned(), samples, types)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_agree_with_sys() {
    let (b, http) = ops_broker(1, "");
    let sys = SysWatcher::start(b.port(), "ops-dashboard").await;
    let mut reader = subscriber(&b, "reader", "news/#", QoS::AtLeastOnce).await;
    let (mut editor, _) = RawClient::connect(b.addr, connect_packet(V311, "editor", true)).await;
    let mut retained = publish_msg("news/breaking", b"Quake", QoS::AtLeastOnce, 1);
    retained.retain = true;
    editor.send(&Packet::Publish(retained)).await;
    for i in 2..=4u16 {
        editor.send(&publish("news/tech", b"story", QoS::AtLeastOnce, i)).await;
    }
    for _ in 1..=4 {
        assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
        expect_publish(&mut reader).await;
    }
    // Quiet now: wait for a `$SYS` round that shows all of it, then one more.
    sys.wait_for("publish/messages/received", |v| v >= 4.0).await;
    sys.wait_for("clients/connected", |v| v >= 3.0).await;
    // Every round starts with `uptime`: once a second later round has begun, the round before
    // it has arrived whole.
    for _ in 0..2 {
        let before = sys.get("uptime");
        let deadline = Instant::now() + PATIENCE;
        while sys.get("uptime") == before {
            assert!(Instant::now() < deadline, "no new `$SYS` round");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let (content_type, samples, types) = scrape(http, None);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let pairs = [
        ("clients/connected", "herald_clients_connected"),
        ("clients/total", "herald_sessions"),
        ("publish/messages/received", "herald_publish_received_total"),
        ("subscriptions/count", "herald_subscriptions"),
        ("retained messages/count", "herald_retained_messages"),
        ("connections/total", "herald_connections_total"),
        ("herald/dropped/queue_full", "herald_dropped_queue_full_total"),
    ];
    for (topic, metric) in pairs {
        let from_sys = sys.number(topic).unwrap_or_else(|| panic!("$SYS/broker/{topic} missing"));
        assert_eq!(samples.get(metric).copied(), Some(from_sys), "{metric} vs $SYS/broker/{topic}");
    }
    assert_eq!(samples["herald_publish_received_total"], 4.0);
    assert_eq!(samples["herald_clients_connected"], 3.0);
    assert_eq!(types["herald_publish_received"], "counter");
    assert_eq!(types["herald_clients_connected"], "gauge");
    for h in ["herald_delivery_latency_seconds", "herald_store_commit_seconds", "herald_offline_queue_depth"] {
        assert_eq!(types[h], "histogram", "{h}");
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&format!("{h}_bucket{{le="))?.strip_suffix('}')?;
                Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(buckets.len() >= 10, "{h}: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{h} buckets are cumulative: {buckets:?}");
        assert_eq!(buckets.last().unwrap().1, samples[&format!("{h}_count")], "{h}: +Inf bucket is the count");
    }
    assert!(samples["herald_delivery_latency_seconds_count"] >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histograms_count_every_delivery_store_commit_and_offline_queue() {
    let (b, http) = ops_broker(0, "");
    // A persistent 3.1.1 session, offline, gathers 3 messages; a connected one gets 100.
    offline_session(&b, "phone", "alerts/#").await;
    let mut reader = subscriber(&b, "reader", "news/#", QoS::AtMostOnce).await;
    let (mut editor, _) = RawClient::connect(b.addr, connect_packet(V311, "editor", true)).await;
    for i in 1..=100u16 {
        editor.send(&publish("news/tech", b"story", QoS::AtMostOnce, 0)).await;
        if i <= 3 {
            editor.send(&publish("alerts/x", b"alert", QoS::AtLeastOnce, i)).await;
            assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
        }
    }
    for _ in 0..100 {
        expect_publish(&mut reader).await;
    }
    let (_, samples, _) = scrape(http, None);
    assert_eq!(samples["herald_publish_sent_total"], 100.0);
    assert_eq!(samples["herald_delivery_latency_seconds_count"], 100.0, "one latency per delivery written");
    assert!(samples["herald_store_commit_seconds_count"] >= 1.0, "the offline session's messages were stored");
    assert_eq!(samples["herald_offline_queue_depth_count"], 3.0);
    assert_eq!(samples["herald_offline_queue_depth_sum"], 6.0, "depths 1, 2, 3");
    assert_eq!(samples["herald_queued_messages"], 3.0);
    assert_eq!(samples["herald_clients_disconnected"], 1.0);
    assert_eq!(samples["herald_store_bodies"], 3.0, "one body per message, stored for the offline session");
    assert_eq!(samples["herald_store_message_bytes"], 15.0, "three queued payloads of 5 bytes");
    assert!(samples["herald_store_disk_bytes"] > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_404_405_and_malformed_requests() {
    let (_b, http) = ops_broker(0, "");
    let (status, v) = http_json(http, "GET", "/healthz", "");
    assert_eq!((status, v["status"].as_str()), (200, Some("live")));
    let (status, v) = http_json(http, "GET", "/readyz", "");
    assert_eq!((status, v["status"].as_str(), v["store"].as_str()), (200, Some("ready"), Some("open")));
    let (status, v) = http_json(http, "GET", "/api/v1/nothing", "");
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("/api/v1/nothing"));
    let (status, headers, _) = http_request(http, "DELETE", "/metrics", &[], b"");
    assert_eq!(status, 405);
    assert!(headers.iter().any(|(k, v)| k == "allow" && v == "GET"));
    // A chunked body is read (hyper frames it).
    {
        use std::io::{Read, Write};
        let body = r#"{"topic": "news/chunked", "payload": "in chunks"}"#;
        let mut s = std::net::TcpStream::connect(http).unwrap();
        let req = format!(
            "POST /api/v1/publish HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
             {:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            10,
            &body[..10],
            body.len() - 10,
            &body[10..]
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // A body announced larger than 8 MiB is refused from its head, before any of it is sent.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(http).unwrap();
        s.write_all(b"POST /api/v1/publish HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n").unwrap();
        let mut answer = [0u8; 12];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413");
    }
    let (status, _, _) = http_request(http, "GET", "/api/v1/topics?filter=%zz", &[], b"");
    assert_eq!(status, 400);
    // A request line that is not HTTP at all, then the server still serves the next client.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(http).unwrap();
        s.write_all(b"HELLO\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    assert_eq!(http_json(http, "GET", "/healthz", "").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_several_requests_on_one_connection() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (_b, http) = ops_broker(0, "");
    let mut s = std::net::TcpStream::connect(http).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for _ in 0..3 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_reaches_mqtt_subscribers_with_its_properties() {
    let (b, http) = ops_broker(0, "");
    let mut reader = subscriber(&b, "reader", "news/#", QoS::AtLeastOnce).await;
    let body = r#"{"topic": "news/tech/ai", "payload": "Model beats benchmark", "qos": 1,
        "user_properties": {"story-id": "s-42", "desk": "tech"}, "message_expiry_interval": 3600,
        "content_type": "text/plain"}"#;
    let (status, v) = http_json(http, "POST", "/api/v1/publish", body);
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap();
    assert_eq!(id.len(), 16, "16 hex digits: {id}");
    assert!(u64::from_str_radix(id, 16).is_ok());
    assert_eq!(v["subscribers"], 1);
    let p = expect_publish(&mut reader).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.qos),
        ("news/tech/ai", &b"Model beats benchmark"[..], QoS::AtLeastOnce)
    );
    assert_eq!(
        p.properties.user_properties,
        vec![("desk".to_owned(), "tech".to_owned()), ("story-id".to_owned(), "s-42".to_owned())]
    );
    assert!(p.properties.message_expiry_interval.is_some_and(|e| (3598..=3600).contains(&e)));
    assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));

    // Binary payloads as base64, user properties as pairs (order kept), and ids that differ.
    let body = r#"{"topic": "news/raw", "payload_base64": "AAEC/w==", "user_properties": [["a", "1"], ["a", "2"]]}"#;
    let (status, v2) = http_json(http, "POST", "/api/v1/publish", body);
    assert_eq!(status, 200);
    assert_ne!(v2["id"], v["id"]);
    let p = expect_publish(&mut reader).await;
    assert_eq!((&p.payload[..], p.qos), (&[0u8, 1, 2, 255][..], QoS::AtMostOnce));
    assert_eq!(p.properties.user_properties, vec![("a".into(), "1".into()), ("a".into(), "2".into())]);

    // With curl, as a CMS would; retained, so a later subscriber gets it too.
    let out = Command::new("curl")
        .args(["-sS", "-X", "POST", "-H", "content-type: application/json", "--data"])
        .arg(r#"{"topic": "news/breaking", "payload": "Quake hits coast", "retain": true, "qos": 1}"#)
        .arg(format!("http://{http}/api/v1/publish"))
        .output()
        .expect("curl runs (scripts/install-deps.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"].as_str().map(str::len), Some(16), "{v}");
    assert_eq!(&expect_publish(&mut reader).await.payload[..], b"Quake hits coast");
    let mut late = subscriber(&b, "late", "news/breaking", QoS::AtMostOnce).await;
    let p = expect_publish(&mut late).await;
    assert!(p.retain, "[MQTT-3.3.1-6] the retained message goes to a new subscriber");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_refuses_bad_requests_with_a_json_error() {
    let (b, http) = ops_broker(0, "[limits]\nmax_topic_length = 64\n");
    let mut everything = subscriber(&b, "everything", "#", QoS::AtMostOnce).await;
    let long = format!(r#"{{"topic": "{}"}}"#, "x".repeat(65));
    let cases: [(&str, &str); 12] = [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (r#"{"payload": "x"}"#, "`topic`"),
        (r#"{"topic": "news/#"}"#, "not a valid topic name"),
        (r#"{"topic": "news/+/x"}"#, "not a valid topic name"),
        (r#"{"topic": ""}"#, "not a valid topic name"),
        (r#"{"topic": "$SYS/broker/version"}"#, "belong to the broker"),
        (r#"{"topic": "news", "qos": 3}"#, "`qos`"),
        (r#"{"topic": "news", "payload": "a", "payload_base64": "YQ=="}"#, "not both"),
        (r#"{"topic": "news", "payload_base64": "***"}"#, "not base64"),
        (r#"{"topic": "news", "colour": "red"}"#, "unknown field"),
        (&long, "max_topic_length"),
    ];
    for (body, expected) in cases {
        let (status, v) = http_json(http, "POST", "/api/v1/publish", body);
        assert_eq!(status, 400, "{body}");
        let error = v["error"].as_str().unwrap_or_else(|| panic!("{body}: {v}"));
        assert!(error.contains(expected), "{body}: {error}");
    }
    everything.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_answers_once_a_persistent_session_has_the_message_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[http]\nbind = \"127.0.0.1:0\"\n[sys]\ninterval = 0\n";
    {
        let b = start_at(dir.path(), extra);
        let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "phone", false)).await;
        phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
        expect_suback(&mut phone).await;
        drop(phone);
        let http = b.broker.http_addr().unwrap();
        for i in 0..20 {
            let body = format!(r#"{{"topic": "news/{i}", "payload": "story {i}", "qos": 1}}"#);
            assert_eq!(http_json(http, "POST", "/api/v1/publish", &body).0, 200);
        }
    }
    let b = start_at(dir.path(), extra);
    let (mut phone, ack) = RawClient::connect(b.addr, connect_packet(V311, "phone", false)).await;
    assert!(ack.session_present);
    for i in 0..20 {
        let p = expect_publish(&mut phone).await;
        assert_eq!(p.payload, format!("story {i}").into_bytes());
        phone.send(&Packet::PubAck(herald::codec::PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_listed_a_page_at_a_time_with_their_state() {
    let (b, http) = ops_broker(0, "");
    // An offline persistent session with 3 queued messages.
    offline_session(&b, "c-phone", "news/#").await;
    let mut connected = Vec::new();
    for (id, version) in [("c-a", V5), ("c-b", V311), ("c-c", V5), ("c-d", V311)] {
        let (c, _) = RawClient::connect(b.addr, connect_packet(version, id, true)).await;
        connected.push(c);
    }
    connected[0].send(&subscribe(1, "news/+/breaking", QoS::AtMostOnce)).await;
    expect_suback(&mut connected[0]).await;
    connected[0].send(&subscribe(2, "sport/#", QoS::AtMostOnce)).await;
    expect_suback(&mut connected[0]).await;
    for i in 1..=3u16 {
        connected[1].send(&publish("news/x", b"s", QoS::AtLeastOnce, i)).await;
        assert!(matches!(connected[1].recv().await, Some(Packet::PubAck(_))));
    }

    let mut seen = Vec::new();
    let mut path = "/api/v1/clients?limit=2".to_owned();
    loop {
        let (status, v) = http_json(http, "GET", &path, "");
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["total"], 5);
        let data = v["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().cloned());
        match v["next"].as_str() {
            Some(next) => path = format!("/api/v1/clients?limit=2&after={next}"),
            None => break,
        }
    }
    let ids: Vec<&str> = seen.iter().map(|c| c["client_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c-a", "c-b", "c-c", "c-d", "c-phone"], "every client once, in order");
    let a = &seen[0];
    assert_eq!((a["connected"].as_bool(), a["protocol_version"].as_str()), (Some(true), Some("5.0")));
    assert_eq!(a["address"].as_str(), Some(connected[0].stream.local_addr().unwrap().to_string().as_str()));
    assert_eq!(a["subscriptions"], 2);
    assert_eq!(seen[1]["protocol_version"], "3.1.1");
    let phone = &seen[4];
    assert_eq!((phone["connected"].as_bool(), phone["persistent"].as_bool()), (Some(false), Some(true)));
    assert_eq!((phone["queued"].as_u64(), phone["subscriptions"].as_u64()), (Some(3), Some(1)));
    assert!(phone["disconnected_at_ms"].as_u64().is_some());

    let (status, v) = http_json(http, "GET", "/api/v1/clients/c-phone", "");
    assert_eq!((status, v["queued"].as_u64()), (200, Some(3)));
    assert_eq!(v["filters"], serde_json::json!(["news/#"]));
    let (status, v) = http_json(http, "GET", "/api/v1/clients/nobody", "");
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("nobody"));
    assert_eq!(http_json(http, "GET", "/api/v1/clients?limit=0", "").0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_disconnects_a_client_and_can_remove_its_session() {
    let (b, http) = ops_broker(0, "");
    let mut keep = connect_packet(V5, "tablet", false);
    keep.properties.session_expiry_interval = Some(3600);
    let (mut tablet, _) = RawClient::connect(b.addr, keep.clone()).await;
    tablet.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut tablet).await;

    let (status, v) = http_json(http, "DELETE", "/api/v1/clients/tablet", "");
    assert_eq!((status, v["disconnected"].as_bool()), (200, Some(true)));
    expect_disconnect(&mut tablet, ReasonCode::ADMINISTRATIVE_ACTION).await;
    wait_parked(&b, "tablet").await;
    let (status, v) = http_json(http, "GET", "/api/v1/clients/tablet", "");
    assert_eq!((status, v["connected"].as_bool()), (200, Some(false)), "the session stays");

    let (mut tablet, ack) = RawClient::connect(b.addr, keep.clone()).await;
    assert!(ack.session_present);
    let (status, v) = http_json(http, "DELETE", "/api/v1/clients/tablet?remove_session=true", "");
    assert_eq!((status, v["session_removed"].as_bool()), (200, Some(true)));
    expect_disconnect(&mut tablet, ReasonCode::ADMINISTRATIVE_ACTION).await;
    assert_eq!(http_json(http, "GET", "/api/v1/clients/tablet", "").0, 404);
    let (_, ack) = RawClient::connect(b.addr, keep).await;
    assert!(!ack.session_present, "the session was removed");
    assert_eq!(http_json(http, "DELETE", "/api/v1/clients/ghost", "").0, 404);
    assert_eq!(http_json(http, "DELETE", "/api/v1/clients/tablet?remove_session=maybe", "").0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_show_retained_messages_and_subscriber_counts() {
    let (b, http) = ops_broker(0, "");
    let _all_news = subscriber(&b, "s1", "news/#", QoS::AtMostOnce).await;
    let _breaking = subscriber(&b, "s2", "news/+/breaking", QoS::AtMostOnce).await;
    let _sport = subscriber(&b, "s3", "sport/#", QoS::AtMostOnce).await;
    let (mut s4, _) = RawClient::connect(b.addr, connect_packet(V5, "s4", true)).await;
    s4.send(&subscribe(1, "$share/app/news/#", QoS::AtMostOnce)).await;
    expect_suback(&mut s4).await;
    for (topic, payload) in [("news/world/breaking", "Quake"), ("news/tech", "AI"), ("sport/f1", "Race")] {
        let body = format!(r#"{{"topic": "{topic}", "payload": "{payload}", "retain": true}}"#);
        assert_eq!(http_json(http, "POST", "/api/v1/publish", &body).0, 200);
    }
    let (status, v) = http_json(http, "GET", "/api/v1/topics?filter=news/%23", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["filter"], "news/#");
    assert_eq!(v["retained"], 2);
    assert_eq!(
        v["topics"],
        serde_json::json!([
            {"topic": "news/tech", "retained": true, "subscribers": 2},
            {"topic": "news/world/breaking", "retained": true, "subscribers": 3},
        ])
    );
    assert_eq!(
        v["subscriptions"],
        serde_json::json!([
            {"filter": "$share/app/news/#", "subscribers": 1},
            {"filter": "news/#", "subscribers": 1},
            {"filter": "news/+/breaking", "subscribers": 1},
        ])
    );
    let (_, all) = http_json(http, "GET", "/api/v1/topics", "");
    assert_eq!(all["retained"], 3);
    assert_eq!(http_json(http, "GET", "/api/v1/topics?filter=news/%23/x", "").0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_endpoint_swaps_the_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let set = |password: &str| {
        let ok = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["passwd", passwd.to_str().unwrap(), "alice", password])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    set("first");
    let (b, http) = ops_broker(
        0,
        &format!("[auth]\nallow_anonymous = false\npassword_file = {:?}\n", passwd.display().to_string()),
    );
    let login = |password: &str| {
        let mut c = connect_packet(V5, "alice-phone", true);
        c.username = Some("alice".into());
        c.password = Some(bytes::Bytes::copy_from_slice(password.as_bytes()));
        c
    };
    let code = |c: herald::codec::Connect| async move {
        let mut raw = RawClient::connect_tcp(b.addr).await;
        raw.send(&Packet::Connect(Box::new(c))).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => a.code.0,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code(login("second")).await, 0x86);
    set("second");
    let (status, v) = http_json(http, "POST", "/api/v1/reload", "");
    assert_eq!((status, v["reloaded"].as_bool()), (200, Some(true)));
    assert_eq!(code(login("second")).await, 0);
    assert_eq!(code(login("first")).await, 0x86);
    // A password file that no longer reads: 400 with the reason, the previous one kept.
    std::fs::write(&passwd, "alice:not-a-hash\n").unwrap();
    let (status, v) = http_json(http, "POST", "/api/v1/reload", "");
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("previous configuration kept"));
    assert_eq!(code(login("second")).await, 0);
    assert_eq!(http_json(http, "GET", "/api/v1/reload", "").0, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_protects_everything_but_health_checks() {
    let e = herald::config::Config::parse("[http]\nbind = \"0.0.0.0:8080\"\n").unwrap_err().to_string();
    assert!(e.contains("http.token"), "a non-loopback bind needs a token: {e}");
    let b = start_toml("[http]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n");
    let http = b.broker.http_addr().unwrap();
    assert_eq!(http_json(http, "GET", "/healthz", "").0, 200);
    assert_eq!(http_json(http, "GET", "/readyz", "").0, 200);
    for path in ["/metrics", "/api/v1/clients", "/api/v1/topics"] {
        let (status, headers, _) = http_request(http, "GET", path, &[], b"");
        assert_eq!(status, 401, "{path}");
        assert!(headers.iter().any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
        let (status, _, _) = http_request(http, "GET", path, &[("authorization", "Bearer wrong!")], b"");
        assert_eq!(status, 401, "{path}");
        let (status, _, _) = http_request(http, "GET", path, &[("authorization", "Bearer s3cret")], b"");
        assert_eq!(status, 200, "{path}");
    }
    let (status, _, _) = http_request(http, "POST", "/api/v1/publish", &[], br#"{"topic": "x"}"#);
    assert_eq!(status, 401);
    let (_, samples, _) = scrape(http, Some("s3cret"));
    assert!(samples.contains_key("herald_uptime_seconds"));
}

/// A `[http]`, `[sys]` and store configuration for the binary, written to `dir/herald.toml`.
fn binary_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[http]\nbind = \"127.0.0.1:0\"\n\
             [storage]\npath = {:?}\n{extra}\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    config
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), "[log]\nformat = \"json\"\n");
    let (child, ports, log) = spawn_herald(&config, 2);
    let child = Child(child);
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (c, _) = RawClient::connect(addr, connect_packet(V5, "json-logger", true)).await;
        drop(c);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    let connected = loop {
        let line = log.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("log lines");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(v[key].is_string(), "{key} in {line}");
        }
        lines.push(v.clone());
        if v["message"] == "client connected" {
            break v;
        }
    };
    assert_eq!(connected["client_id"], "json-logger");
    assert_eq!(connected["level"], "INFO");
    assert_eq!(connected["protocol"], 5, "numbers stay numbers");
    assert!(connected["timestamp"].as_str().unwrap().contains('T'), "RFC 3339 time");
    drop(child);
}

#[test]
fn sigterm_disconnects_clients_flushes_the_store_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(
        dir.path(),
        "[shutdown]\ngrace_period = 5\n[sys]\ninterval = 0\n[mqtt]\nmax_queued_messages = 1000000\n",
    );
    let (child, ports, log) = spawn_herald(&config, 2);
    let mut child = Child(child);
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acknowledged = rt.block_on(async {
        let (mut phone, _) = RawClient::connect(addr, connect_packet(V311, "phone", false)).await;
        phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
        expect_suback(&mut phone).await;
        drop(phone);
        let (mut watcher, _) = RawClient::connect(addr, connect_packet(V5, "watcher", true)).await;
        // Four editors publish QoS 1 as fast as they are acknowledged, until the broker goes.
        let mut editors = Vec::new();
        for e in 0..4 {
            editors.push(tokio::spawn(async move {
                let (mut c, _) = RawClient::connect(addr, connect_packet(V311, &format!("editor-{e}"), true)).await;
                let mut acked = Vec::new();
                for i in 0..u32::MAX {
                    let id = (i % 60_000 + 1) as u16;
                    let payload = format!("{e}-{i}");
                    if !c.try_send(&publish("news/live", payload.as_bytes(), QoS::AtLeastOnce, id)).await {
                        break;
                    }
                    match c.recv_within(WAIT).await {
                        Ok(Some(Packet::PubAck(a))) if a.packet_id == id => acked.push(payload),
                        _ => break,
                    }
                }
                acked
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let pid = child.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let started = Instant::now();
        expect_disconnect(&mut watcher, ReasonCode::SERVER_SHUTTING_DOWN).await;
        let mut acknowledged = Vec::new();
        for e in editors {
            acknowledged.extend(e.await.unwrap());
        }
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(8), "exited within the grace period");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
        println!("exited {:?} after SIGTERM; {} acknowledged", started.elapsed(), acknowledged.len());
        acknowledged
    });
    let rest: Vec<String> = log.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("store closed")), "the store was closed: {rest:?}");
    assert!(acknowledged.len() > 100, "the editors were publishing: {}", acknowledged.len());

    let (child, ports, _log) = spawn_herald(&config, 2);
    let _child = Child(child);
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    rt.block_on(async {
        let (mut phone, ack) = RawClient::connect(addr, connect_packet(V311, "phone", false)).await;
        assert!(ack.session_present);
        let mut received = std::collections::HashSet::new();
        while let Ok(Some(Packet::Publish(p))) = phone.recv_within(Duration::from_secs(2)).await {
            received.insert(String::from_utf8(p.payload.to_vec()).unwrap());
            phone.send(&Packet::PubAck(herald::codec::PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
        }
        let lost: Vec<&String> = acknowledged.iter().filter(|a| !received.contains(*a)).collect();
        println!("{} acknowledged, {} received after restart, {} lost", acknowledged.len(), received.len(), lost.len());
        assert!(lost.is_empty(), "{} acknowledged messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    });
}

/// A shutdown asked for before `run` starts watching for it is not lost: `run` returns at once.
/// (A `watch::Sender::send` with no receiver yet drops the value; a test that ended within
/// microseconds of its broker starting hung on it.)
#[test]
fn a_shutdown_asked_for_before_the_broker_runs_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n",
        dir.path().display().to_string()
    );
    let server = herald::server::open(herald::config::Config::parse(&text).unwrap()).unwrap();
    server.broker().begin_shutdown();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ran =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), herald::server::run(server, None)).await });
    assert!(matches!(ran, Ok(Ok(()))), "run returned: {ran:?}");
}
