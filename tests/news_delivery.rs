//! News delivery [issue 7]: receipts per message, `herald-msg-id` on the PUBACK, story
//! deduplication, retries to 3.1.1 subscribers, the hand-off of undelivered messages (`$SYS` and
//! a webhook), the high-priority lane and degraded mode, end to end over real sockets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use herald::codec::{Packet, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode};
use serde_json::Value;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

fn broker(extra: &str) -> (TestBroker, SocketAddr) {
    let b = start_toml(&format!("[http]\nbind = \"127.0.0.1:0\"\n{extra}"));
    let http = b.broker.http_addr().unwrap();
    (b, http)
}

fn story(topic: &str, payload: &str, story_id: &str, packet_id: u16) -> Publish {
    let mut p = publish_msg(topic, payload.as_bytes(), QoS::AtLeastOnce, packet_id);
    p.properties.user_properties.push(("story-id".into(), story_id.into()));
    p
}

/// Sends a QoS 1 PUBLISH and returns its PUBACK.
async fn publish_acked(c: &mut RawClient, p: Publish) -> PubResponse {
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => a,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn msg_id(ack: &PubResponse) -> String {
    ack.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == "herald-msg-id")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no herald-msg-id on {ack:?}"))
}

async fn puback(c: &mut RawClient, packet_id: u16) {
    c.send(&Packet::PubAck(PubResponse::new(packet_id, ReasonCode::SUCCESS))).await;
}

fn receipt(http: SocketAddr, key: &str) -> Value {
    let (status, v) = http_json(http, "GET", &format!("/api/v1/messages/{key}/receipts"), "");
    assert_eq!(status, 200, "{key}: {v}");
    v
}

/// Polls the receipt until `ok` holds (deliveries settle asynchronously).
async fn receipt_when(http: SocketAddr, key: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = receipt(http, key);
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "receipt {key} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_counts_every_outcome_of_a_story() {
    let (b, http) = broker("");
    // A acknowledges, B subscribed at QoS 0, C is offline with a persistent session, D never
    // acknowledges.
    let mut a = subscriber(&b, "a", "news/#", QoS::AtLeastOnce).await;
    let mut bq0 = subscriber(&b, "b", "news/#", QoS::AtMostOnce).await;
    offline_session(&b, "c", "news/#").await;
    let mut d = subscriber(&b, "d", "news/#", QoS::AtLeastOnce).await;

    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let ack = publish_acked(&mut cms, story("news/world/quake", "Quake hits coast", "s-42", 1)).await;
    let id = msg_id(&ack);
    assert_eq!(id.len(), 16);
    let p = expect_publish(&mut a).await;
    puback(&mut a, p.packet_id).await;
    expect_publish(&mut bq0).await;
    expect_publish(&mut d).await;

    let v = receipt_when(http, &id, |v| v["acknowledged"] == 1).await;
    for (field, n) in [("routed", 4), ("delivered_qos0", 1), ("sent", 2), ("acknowledged", 1), ("queued", 1)] {
        assert_eq!(v[field].as_u64(), Some(n), "{field}: {v}");
    }
    assert_eq!((v["expired"].as_u64(), v["dropped"].as_u64(), v["pending"].as_u64()), (Some(0), Some(0), Some(2)));
    assert!(v["first_ack_at_ms"].as_u64().is_some() && v["ack_latency_ms"]["p50"].as_u64().is_some());
    assert_eq!(receipt(http, "s-42")["id"], id, "found by story id too");

    // C comes back and acknowledges: its queued delivery completes.
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V311, "c", false)).await;
    let p = expect_publish(&mut c).await;
    puback(&mut c, p.packet_id).await;
    let v = receipt_when(http, &id, |v| v["acknowledged"] == 2).await;
    assert_eq!((v["sent"].as_u64(), v["pending"].as_u64()), (Some(3), Some(1)), "{v}");
    assert_eq!(http_json(http, "GET", "/api/v1/messages/ffffffffffffffff/receipts", "").0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_id_on_the_puback_only_when_asked_for() {
    let (b, _) = broker("");
    let (mut plain, _) = RawClient::connect(b.addr, connect_packet(V5, "plain", true)).await;
    let ack = publish_acked(&mut plain, publish_msg("news/x", b"x", QoS::AtLeastOnce, 1)).await;
    assert!(ack.properties.user_properties.is_empty(), "a bare PUBACK unless asked: {ack:?}");
    let ack = publish_acked(&mut plain, story("news/x", "x", "s-1", 2)).await;
    msg_id(&ack);
    let mut asking = connect_packet(V5, "asking", true);
    asking.properties.user_properties.push(("herald-msg-id".into(), "1".into()));
    let (mut asking, _) = RawClient::connect(b.addr, asking).await;
    let ack = publish_acked(&mut asking, publish_msg("news/x", b"x", QoS::AtLeastOnce, 1)).await;
    msg_id(&ack);
    // [MQTT-3.1.2-29] no user property on a PUBACK to a client that asked for no problem information.
    let mut quiet = connect_packet(V5, "quiet", true);
    quiet.properties.request_problem_information = Some(0);
    quiet.properties.user_properties.push(("herald-msg-id".into(), "1".into()));
    let (mut quiet, _) = RawClient::connect(b.addr, quiet).await;
    let ack = publish_acked(&mut quiet, story("news/x", "x", "s-2", 1)).await;
    assert!(ack.properties.user_properties.is_empty());
}

#[test]
fn paho_reads_herald_msg_id_from_its_puback() {
    let b = start_toml("");
    let script = format!(
        r#"
import sys, threading, paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
done = threading.Event()
got = {{}}
def on_publish(client, userdata, mid, reason_code, properties):
    got["props"] = dict(properties.UserProperty) if hasattr(properties, "UserProperty") else {{}}
    got["rc"] = reason_code.value
    done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-cms", protocol=mqtt.MQTTv5)
c.on_publish = on_publish
c.connect("127.0.0.1", {port})
c.loop_start()
p = Properties(PacketTypes.PUBLISH)
p.UserProperty = ("story-id", "s-paho")
c.publish("news/paho", b"story", qos=1, properties=p)
done.wait(10)
c.loop_stop()
print(got["props"].get("herald-msg-id", "missing"), got["rc"])
"#,
        port = b.port()
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let mut words = text.split_whitespace();
    let id = words.next().unwrap();
    assert_eq!(id.len(), 16, "paho saw herald-msg-id {id:?}");
    assert_eq!(words.next(), Some("16"), "0x10 no matching subscribers");
    assert!(b.broker.receipts().find("s-paho").is_some_and(|r| format!("{:016x}", r.id) == id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_survive_a_restart_and_keep_counting() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[http]\nbind = \"127.0.0.1:0\"\n";
    let id = {
        let b = start_at(dir.path(), extra);
        offline_session(&b, "phone", "news/#").await;
        let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
        msg_id(&publish_acked(&mut cms, story("news/a", "story", "s-restart", 1)).await)
    };
    let b = start_at(dir.path(), extra);
    let http = b.broker.http_addr().unwrap();
    let v = receipt(http, &id);
    assert_eq!((v["routed"].as_u64(), v["queued"].as_u64(), v["pending"].as_u64()), (Some(1), Some(1), Some(1)));
    assert_eq!(receipt(http, "s-restart")["id"], id);
    let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "phone", false)).await;
    let p = expect_publish(&mut phone).await;
    puback(&mut phone, p.packet_id).await;
    let v = receipt_when(http, &id, |v| v["acknowledged"] == 1).await;
    assert_eq!(v["pending"], 0, "the delivery read back from the store counts on the same receipt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receipt_is_published_on_the_response_topic_when_asked() {
    let (b, _) = broker("");
    let mut reader = subscriber(&b, "reader", "news/#", QoS::AtLeastOnce).await;
    let mut cms = subscriber(&b, "cms", "cms/receipts", QoS::AtLeastOnce).await;
    let mut p = story("news/tech", "AI story", "s-report", 7);
    p.properties.response_topic = Some("cms/receipts".into());
    p.properties.correlation_data = Some(bytes::Bytes::from_static(b"corr-7"));
    p.properties.user_properties.push(("herald-receipt".into(), "1".into()));
    cms.send(&Packet::Publish(p)).await;
    let id = match cms.recv().await {
        Some(Packet::PubAck(a)) => msg_id(&a),
        other => panic!("{other:?}"),
    };
    let delivered = expect_publish(&mut reader).await;
    puback(&mut reader, delivered.packet_id).await;
    let report = expect_publish(&mut cms).await;
    assert_eq!(report.topic, "cms/receipts");
    assert_eq!(report.properties.correlation_data.as_deref(), Some(&b"corr-7"[..]));
    let v: Value = serde_json::from_slice(&report.payload).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["acknowledged"].as_u64(), v["pending"].as_u64()),
        (Some(id.as_str()), Some(1), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_story_id_is_delivered_once() {
    let (b, http) = broker("[receipts]\ndedup_window = 60\n");
    let mut reader = subscriber(&b, "reader", "news/#", QoS::AtLeastOnce).await;
    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let first = msg_id(&publish_acked(&mut cms, story("news/a", "v1", "s-dup", 1)).await);
    let p = expect_publish(&mut reader).await;
    puback(&mut reader, p.packet_id).await;
    // The CMS did not see its PUBACK and sends the story again, on a new connection.
    let (mut cms2, _) = RawClient::connect(b.addr, connect_packet(V5, "cms-2", true)).await;
    let again = publish_acked(&mut cms2, story("news/a", "v1", "s-dup", 1)).await;
    assert_eq!((again.reason, msg_id(&again)), (ReasonCode::SUCCESS, first.clone()), "acknowledged with the first id");
    let body = r#"{"topic": "news/a", "payload": "v1", "qos": 1, "user_properties": {"story-id": "s-dup"}}"#;
    let (_, v) = http_json(http, "POST", "/api/v1/publish", body);
    assert_eq!((v["id"].as_str(), v["duplicate"].as_bool()), (Some(first.as_str()), Some(true)));
    reader.expect_silence(Duration::from_millis(500)).await;
    // Another story goes through.
    publish_acked(&mut cms, story("news/a", "v2", "s-other", 2)).await;
    assert_eq!(&expect_publish(&mut reader).await.payload[..], b"v2");
    assert_eq!(b.broker.receipts().duplicates.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// A one-shot HTTP server that records the bodies POSTed to it.
fn webhook_server() -> (String, std::sync::mpsc::Receiver<Value>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/herald/undelivered", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let mut s = stream.unwrap();
            let mut raw = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = s.read(&mut chunk).unwrap();
                raw.extend_from_slice(&chunk[..n]);
                if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..i]).to_lowercase();
                    assert!(head.starts_with("post /herald/undelivered http/1.1"), "{head}");
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap();
                    while raw.len() < i + 4 + len {
                        let n = s.read(&mut chunk).unwrap();
                        raw.extend_from_slice(&chunk[..n]);
                    }
                    break raw[i + 4..i + 4 + len].to_vec();
                }
            };
            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").unwrap();
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_3_1_1_subscriber_gets_retries_then_the_story_is_handed_off() {
    let (url, hook) = webhook_server();
    let (b, http) = broker(&format!("[delivery]\nretry_after = 1\nmax_retries = 1\nwebhook = {url:?}\n"));
    let mut watcher = subscriber(&b, "watcher", "$SYS/broker/herald/undelivered", QoS::AtMostOnce).await;
    let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "old-phone", true)).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut phone).await;
    let mut modern = subscriber(&b, "modern", "news/#", QoS::AtLeastOnce).await;
    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let id = msg_id(&publish_acked(&mut cms, story("news/breaking/q", "Quake", "s-retry", 1)).await);

    let first = expect_publish(&mut phone).await;
    assert!(!first.dup);
    let started = Instant::now();
    let retry = expect_publish(&mut phone).await;
    assert!(retry.dup, "sent again with DUP");
    assert_eq!(retry.packet_id, first.packet_id);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800), "after retry_after: {waited:?}");
    phone.expect_silence(Duration::from_millis(1500)).await; // max_retries = 1

    let event = match watcher.recv().await {
        Some(Packet::Publish(p)) => serde_json::from_slice::<Value>(&p.payload).unwrap(),
        other => panic!("{other:?}"),
    };
    for (k, v) in
        [("client_id", "old-phone"), ("id", id.as_str()), ("topic", "news/breaking/q"), ("story_id", "s-retry")]
    {
        assert_eq!(event[k], v, "{event}");
    }
    assert!(event["reason"].as_str().unwrap().contains("retries"), "{event}");
    let posted = hook.recv_timeout(Duration::from_secs(5)).expect("the webhook got the event");
    assert_eq!(posted, event, "the webhook gets what $SYS shows");

    // 5.0 may not be resent to on the same connection [MQTT-4.4.0-1]: one PUBLISH only.
    expect_publish(&mut modern).await;
    modern.expect_silence(Duration::from_millis(300)).await;

    // A late PUBACK still completes the delivery.
    puback(&mut phone, first.packet_id).await;
    let v = receipt_when(http, &id, |v| v["acknowledged"] == 1).await;
    assert_eq!((v["retries"].as_u64(), v["undelivered"].as_u64()), (Some(1), Some(1)), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_story_that_expires_in_an_offline_queue_is_handed_off() {
    let (b, http) = broker("");
    let mut watcher = subscriber(&b, "watcher", "$SYS/broker/herald/undelivered", QoS::AtMostOnce).await;
    offline_session(&b, "phone", "news/#").await;
    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let mut p = story("news/flash", "Flash", "s-expire", 1);
    p.properties.message_expiry_interval = Some(1);
    let id = msg_id(&publish_acked(&mut cms, p).await);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "phone", false)).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    let event = match watcher.recv().await {
        Some(Packet::Publish(p)) => serde_json::from_slice::<Value>(&p.payload).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!((event["reason"].as_str(), event["client_id"].as_str()), (Some("expired"), Some("phone")));
    let v = receipt(http, &id);
    assert_eq!((v["expired"].as_u64(), v["undelivered"].as_u64(), v["pending"].as_u64()), (Some(1), Some(1), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaking_news_overtakes_a_backlog_of_features() {
    let (b, _) = broker(
        "[mqtt]\nmax_inflight_messages = 4\n[delivery]\nretry_after = 0\n\
         [[priority]]\nfilter = \"news/breaking/#\"\nclass = \"high\"\n",
    );
    // A connected 3.1.1 reader with a window of 4 that acknowledges nothing yet: normal stories
    // may take 2 slots (2 are kept for high priority).
    let (mut reader, _) = RawClient::connect(b.addr, connect_packet(V311, "reader", true)).await;
    reader.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut reader).await;
    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    for i in 1..=20u16 {
        publish_acked(&mut cms, publish_msg("news/features/x", format!("feature {i}").as_bytes(), QoS::AtLeastOnce, i))
            .await;
    }
    assert_eq!(&expect_publish(&mut reader).await.payload[..], b"feature 1");
    assert_eq!(&expect_publish(&mut reader).await.payload[..], b"feature 2");
    reader.expect_silence(Duration::from_millis(200)).await;
    publish_acked(&mut cms, publish_msg("news/breaking/quake", b"Quake", QoS::AtLeastOnce, 100)).await;
    let p = expect_publish(&mut reader).await;
    assert_eq!(&p.payload[..], b"Quake", "the breaking story is not stuck behind 18 features");

    // Offline: a returning phone gets the breaking story before its backlog.
    offline_session(&b, "phone", "news/#").await;
    for i in 1..=10u16 {
        publish_acked(&mut cms, publish_msg("news/features/y", format!("f{i}").as_bytes(), QoS::AtLeastOnce, 200 + i))
            .await;
    }
    publish_acked(&mut cms, publish_msg("news/breaking/fire", b"Fire", QoS::AtLeastOnce, 300)).await;
    let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "phone", false)).await;
    assert_eq!(&expect_publish(&mut phone).await.payload[..], b"Fire");
    assert_eq!(&expect_publish(&mut phone).await.payload[..], b"f1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_mode_sheds_normal_traffic_and_keeps_breaking_news_flowing() {
    let (b, http) = broker(
        "[sys]\ninterval = 1\n[degraded]\nmax_queued_messages = 50\n\
         [[priority]]\nfilter = \"news/breaking/#\"\nclass = \"high\"\n",
    );
    let mut reader = subscriber(&b, "reader", "news/breaking/#", QoS::AtLeastOnce).await;
    let mut ops = subscriber(&b, "ops", "$SYS/broker/herald/degraded", QoS::AtMostOnce).await;
    // An offline phone's queue builds the pressure.
    offline_session(&b, "phone", "news/features/#").await;
    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    // Features until the pressure is noticed (measured every 50 ms: it may come before all 60).
    let mut accepted = 0;
    for i in 1..=60u16 {
        let ack = publish_acked(&mut cms, publish_msg("news/features/x", b"feature", QoS::AtLeastOnce, i)).await;
        if ack.reason == ReasonCode::QUOTA_EXCEEDED {
            break;
        }
        assert_eq!(ack.reason, ReasonCode::SUCCESS);
        accepted += 1;
    }
    assert!(accepted >= 50, "the bound was crossed first: {accepted}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.broker.is_degraded() {
        assert!(Instant::now() < deadline, "entered degraded mode");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, samples) = (0, http_request(http, "GET", "/metrics", &[], b"").2);
    assert!(String::from_utf8_lossy(&samples).contains("\nherald_degraded 1\n"));
    // `$SYS` is never shed: the mode itself is announced there.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = expect_publish(&mut ops).await;
        if &p.payload[..] == b"1" {
            break;
        }
        assert!(Instant::now() < deadline, "$SYS/broker/herald/degraded never said 1");
    }
    // Normal: 0x97 for 5.0; high priority: accepted and delivered.
    let ack = publish_acked(&mut cms, publish_msg("news/features/x", b"more", QoS::AtLeastOnce, 61)).await;
    assert_eq!(ack.reason, ReasonCode::QUOTA_EXCEEDED);
    let ack = publish_acked(&mut cms, publish_msg("news/breaking/x", b"Quake", QoS::AtLeastOnce, 62)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert_eq!(&expect_publish(&mut reader).await.payload[..], b"Quake");
    // 3.1.1 cannot be told 0x97: its normal QoS 1 PUBLISH closes the connection unacknowledged.
    let (mut old, _) = RawClient::connect(b.addr, connect_packet(V311, "old-cms", true)).await;
    old.send(&publish("news/features/x", b"more", QoS::AtLeastOnce, 1)).await;
    assert!(old.recv().await.is_none(), "closed without PUBACK");
    let (status, _) = http_json(http, "POST", "/api/v1/publish", r#"{"topic": "news/features/x", "payload": "x"}"#);
    assert_eq!(status, 503);
    // The phone drains its queue: the pressure falls and Herald leaves degraded mode by itself.
    let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "phone", false)).await;
    for _ in 0..accepted {
        let p = expect_publish(&mut phone).await;
        puback(&mut phone, p.packet_id).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.broker.is_degraded() {
        assert!(Instant::now() < deadline, "left degraded mode");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ack = publish_acked(&mut cms, publish_msg("news/features/x", b"again", QoS::AtLeastOnce, 63)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
}

/// With Mosquitto's command-line clients: a story published twice with the same `story-id`
/// (mosquitto_pub -D publish user-property) reaches a mosquitto_sub reader once.
#[test]
fn mosquitto_clients_see_a_repeated_story_once() {
    use std::process::{Command, Stdio};
    let b = start_toml("");
    let port = b.port().to_string();
    let reader = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1", "-t", "news/#", "-W", "3", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub runs (scripts/install-deps.sh installs it)");
    wait_until_blocking("mosquitto_sub to subscribe", || b.broker.subscription_count() == 1);
    for payload in ["Quake hits coast", "Quake hits coast (resent)"] {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1", "-t", "news/world/quake"])
            .args(["-D", "publish", "user-property", "story-id", "s-mosq", "-m", payload])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let out = reader.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().collect::<Vec<_>>(), ["news/world/quake Quake hits coast"], "{text}");
    assert_eq!(b.broker.receipts().duplicates.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(b.broker.receipts().find("s-mosq").is_some(), "the story has a receipt");
}

/// An https receiver (Python's http.server behind its ssl module, with a certificate from a
/// private CA) that answers 503 to the first POST and 204 to the next, printing each body.
const HTTPS_HOOK: &str = r#"
import http.server, ssl, sys
class Hook(http.server.BaseHTTPRequestHandler):
    calls = 0
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Hook.calls += 1
        self.send_response(503 if Hook.calls == 1 else 204)
        self.send_header("content-length", "0")
        self.end_headers()
        print(Hook.calls, self.path, body.decode(), flush=True)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The webhook speaks https (rustls, the CA from `webhook_ca_file`) and tries a failed POST
/// again: the receiver's first answer is 503, the event arrives with the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_posts_over_https_and_retries_a_failure() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    generate_certs(dir.path());
    let mut receiver = std::process::Command::new("python3")
        .args(["-c", HTTPS_HOOK])
        .arg(dir.path().join("server.pem"))
        .arg(dir.path().join("server.key"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let port = lines.next().unwrap().unwrap();
    let url = format!("https://localhost:{port}/herald/undelivered");
    let ca = dir.path().join("ca.pem");
    let (b, _http) = broker(&format!(
        "[delivery]\nretry_after = 1\nmax_retries = 0\nwebhook = {url:?}\nwebhook_ca_file = {:?}\n",
        ca.display().to_string()
    ));
    // A 3.1.1 phone that never acknowledges: its story is handed off once its retry is spent.
    let (mut phone, _) = RawClient::connect(b.addr, connect_packet(V311, "silent-phone", true)).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut phone).await;
    let (mut cms, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let id = msg_id(&publish_acked(&mut cms, story("news/breaking/q", "Quake", "s-https", 1)).await);
    expect_publish(&mut phone).await;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = rx.recv_timeout(PATIENCE).expect("the first POST");
    assert!(first.starts_with("1 /herald/undelivered "), "{first}");
    let second = rx.recv_timeout(PATIENCE).expect("the POST tried again after the 503");
    assert!(second.starts_with("2 /herald/undelivered "), "{second}");
    let event: Value = serde_json::from_str(second.splitn(3, ' ').nth(2).unwrap()).unwrap();
    assert_eq!((event["id"].as_str(), event["story_id"].as_str()), (Some(id.as_str()), Some("s-https")), "{event}");
    assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err(), "delivered once: not posted a third time");
    assert_eq!(b.broker.webhook_failures().load(std::sync::atomic::Ordering::Relaxed), 0);
    let _ = receiver.kill();
    let _ = receiver.wait();
}
