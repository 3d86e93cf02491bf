//! Durability [issue 4]: what persistent sessions and retained messages keep across a broker
//! restart, with the store in a temporary directory and a real broker over real sockets.
//! Crashes (SIGKILL of the binary) are in tests/crash.rs.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use herald::codec::{Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

fn persistent(version: ProtocolVersion, client_id: &str, expiry: u32) -> herald::codec::Connect {
    let mut c = connect_packet(version, client_id, false);
    if version == V5 {
        c.properties.session_expiry_interval = Some(expiry);
    }
    c
}

/// Connects a persistent session and subscribes it to `filter`, then leaves (DISCONNECT).
async fn subscribe_and_leave(b: &TestBroker, version: ProtocolVersion, client_id: &str, filter: &str, qos: QoS) {
    let (mut c, _) = RawClient::connect(b.addr, persistent(version, client_id, 3600)).await;
    c.send(&subscribe(1, filter, qos)).await;
    assert_eq!(expect_suback(&mut c).await, vec![qos as u8]);
    disconnect(&mut c).await;
}

async fn disconnect(c: &mut RawClient) {
    c.send(&Packet::Disconnect(herald::codec::Disconnect {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    }))
    .await;
    let _ = c.recv_within(Duration::from_secs(2)).await;
}

/// Publishes QoS 1 messages and waits for each PUBACK: the broker's promise.
async fn publish_acked(b: &TestBroker, topic: &str, payloads: &[&str]) {
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V311, "editor", true)).await;
    for (i, payload) in payloads.iter().enumerate() {
        let id = i as u16 + 1;
        p.send(&publish(topic, payload.as_bytes(), QoS::AtLeastOnce, id)).await;
        match p.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    disconnect(&mut p).await;
}

async fn receive_acking(c: &mut RawClient, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        let p = expect_publish(c).await;
        if p.qos == QoS::AtLeastOnce {
            c.send(&Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
        }
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    got
}

fn restart(b: TestBroker, dir: &std::path::Path, extra: &str) -> TestBroker {
    drop(b);
    start_at(dir, extra)
}

/// [MQTT-3.1.2-4] [MQTT-4.1.0-1] a session with clean session 0 keeps its subscriptions and
/// its QoS 1 messages while offline; here across a graceful restart of the broker, in both
/// protocol versions, and acknowledged messages are not sent again after a second restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_survives_a_graceful_restart_mqtt_3_1_2_4() {
    for version in [V311, V5] {
        let dir = tempfile::tempdir().unwrap();
        let b = start_at(dir.path(), "");
        subscribe_and_leave(&b, version, "phone", "news/#", QoS::AtLeastOnce).await;
        publish_acked(&b, "news/tech/ai", &["one", "two", "three"]).await;
        let b = restart(b, dir.path(), "");
        let (mut c, ack) = RawClient::connect(b.addr, persistent(version, "phone", 3600)).await;
        assert!(ack.session_present, "[MQTT-3.2.2-2] session present after the restart");
        assert_eq!(receive_acking(&mut c, 3).await, vec!["one", "two", "three"]);
        // The subscription came back too: a new story reaches the resumed session.
        publish_acked(&b, "news/world", &["four"]).await;
        assert_eq!(receive_acking(&mut c, 1).await, vec!["four"]);
        c.send(&Packet::PingReq).await;
        assert!(matches!(c.recv().await, Some(Packet::PingResp)), "every PUBACK was read before");
        disconnect(&mut c).await;
        let b = restart(b, dir.path(), "");
        let (mut c, ack) = RawClient::connect(b.addr, persistent(version, "phone", 3600)).await;
        assert!(ack.session_present);
        c.expect_silence(Duration::from_millis(300)).await;
        drop(c);
        drop(b);
    }
}

/// [MQTT-3.3.1-5] a retained message, and the deletion of one [MQTT-3.3.1-6], survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_mqtt_3_3_1_5() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V311, "editor", true)).await;
    for (topic, payload) in [("news/breaking", &b"Quake"[..]), ("news/old", b"stale"), ("news/old", b"")] {
        let mut m = publish_msg(topic, payload, QoS::AtLeastOnce, 1);
        m.retain = true;
        p.send(&Packet::Publish(m)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    drop(p);
    let b = restart(b, dir.path(), "");
    let (mut s, _) = RawClient::connect(b.addr, connect_packet(V311, "reader", true)).await;
    s.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut s).await;
    let p = expect_publish(&mut s).await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("news/breaking", &b"Quake"[..], true));
    s.expect_silence(Duration::from_millis(300)).await;
}

/// [MQTT-4.4.0-1] after a restart, QoS 2 messages in flight towards a subscriber are resent
/// with the packet identifiers the client knows: PUBREL for one past PUBREC, PUBLISH with DUP for
/// one not yet acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_in_flight_survives_a_restart_mqtt_4_4_0_1() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    subscribe_and_leave(&b, V5, "phone", "news/#", QoS::ExactlyOnce).await;
    let (mut c, _) = RawClient::connect(b.addr, persistent(V5, "phone", 3600)).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "editor", true)).await;
    for (id, payload) in [(1u16, "first"), (2, "second")] {
        p.send(&publish("news/x", payload.as_bytes(), QoS::ExactlyOnce, id)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
        p.send(&Packet::PubRel(PubResponse::new(id, ReasonCode::SUCCESS))).await;
        assert!(matches!(p.recv().await, Some(Packet::PubComp(_))));
    }
    let first = expect_publish(&mut c).await;
    let second = expect_publish(&mut c).await;
    assert_eq!(&first.payload[..], b"first");
    c.send(&Packet::PubRec(PubResponse::new(first.packet_id, ReasonCode::SUCCESS))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRel(r)) if r.packet_id == first.packet_id));
    // The PUBREC's state change was committed before the PUBREL was sent; the restart's
    // shutdown writes everything committed.
    drop((c, p));
    let b = restart(b, dir.path(), "");
    let (mut c, ack) = RawClient::connect(b.addr, persistent(V5, "phone", 3600)).await;
    assert!(ack.session_present);
    let mut saw_pubrel = false;
    let mut saw_dup = false;
    for _ in 0..2 {
        match c.recv().await {
            Some(Packet::PubRel(r)) => {
                assert_eq!(r.packet_id, first.packet_id);
                saw_pubrel = true;
                c.send(&Packet::PubComp(PubResponse::new(r.packet_id, ReasonCode::SUCCESS))).await;
            }
            Some(Packet::Publish(m)) => {
                assert!(m.dup, "[MQTT-3.3.1-1] a resent PUBLISH has DUP set");
                assert_eq!((m.packet_id, &m.payload[..]), (second.packet_id, &b"second"[..]));
                saw_dup = true;
            }
            other => panic!("expected PUBREL or PUBLISH, got {other:?}"),
        }
    }
    assert!(saw_pubrel && saw_dup);
}

/// [MQTT-4.3.3-10] a QoS 2 PUBLISH that was PUBREC'd before a restart and is sent again (DUP)
/// after it is not delivered a second time: the identifier's state is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_qos2_state_survives_a_restart_mqtt_4_3_3_10() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    subscribe_and_leave(&b, V311, "phone", "news/#", QoS::ExactlyOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, persistent(V311, "editor", 0)).await;
    p.send(&publish("news/x", b"once", QoS::ExactlyOnce, 7)).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 7));
    drop(p);
    let b = restart(b, dir.path(), "");
    let (mut p, ack) = RawClient::connect(b.addr, persistent(V311, "editor", 0)).await;
    assert!(ack.session_present);
    let mut again = publish_msg("news/x", b"once", QoS::ExactlyOnce, 7);
    again.dup = true;
    p.send(&Packet::Publish(again)).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 7));
    p.send(&Packet::PubRel(PubResponse::new(7, ReasonCode::SUCCESS))).await;
    assert!(matches!(p.recv().await, Some(Packet::PubComp(r)) if r.packet_id == 7));
    let (mut c, _) = RawClient::connect(b.addr, persistent(V311, "phone", 0)).await;
    let m = expect_publish(&mut c).await;
    assert_eq!(&m.payload[..], b"once");
    c.send(&Packet::PubRec(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRel(_))));
    c.send(&Packet::PubComp(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
    c.expect_silence(Duration::from_millis(300)).await;
}

/// [MQTT-4.1.0-2] [MQTT-3.1.2-23] a session whose expiry interval passed while the broker was
/// down is gone at the restart, queue and all; one with time left is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_expired_while_down_are_removed_mqtt_3_1_2_23() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    for (id, expiry) in [("short", 1u32), ("long", 3600)] {
        let (mut c, _) = RawClient::connect(b.addr, persistent(V5, id, expiry)).await;
        c.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
        expect_suback(&mut c).await;
        disconnect(&mut c).await;
    }
    publish_acked(&b, "news/x", &["queued"]).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = start_at(dir.path(), "");
    let (mut c, ack) = RawClient::connect(b.addr, persistent(V5, "short", 1)).await;
    assert!(!ack.session_present, "the expired session is gone");
    c.expect_silence(Duration::from_millis(300)).await;
    let (mut c, ack) = RawClient::connect(b.addr, persistent(V5, "long", 3600)).await;
    assert!(ack.session_present);
    assert_eq!(receive_acking(&mut c, 1).await, vec!["queued"]);
}

/// [MQTT-3.3.2-5] a queued message whose expiry interval passed, here while the broker was down,
/// is never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_queued_messages_are_not_delivered_after_a_restart_mqtt_3_3_2_5() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    subscribe_and_leave(&b, V5, "phone", "news/#", QoS::AtLeastOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "editor", true)).await;
    for (id, payload, expiry) in [(1u16, "brief", Some(1u32)), (2, "lasting", None)] {
        let mut m = publish_msg("news/x", payload.as_bytes(), QoS::AtLeastOnce, id);
        m.properties.message_expiry_interval = expiry;
        p.send(&Packet::Publish(m)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    drop(p);
    drop(b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = start_at(dir.path(), "");
    let (mut c, _) = RawClient::connect(b.addr, persistent(V5, "phone", 3600)).await;
    assert_eq!(receive_acking(&mut c, 1).await, vec!["lasting"]);
    c.expect_silence(Duration::from_millis(300)).await;
}

/// Offline queue bounds [issue 4]: `drop_oldest` by default keeps the latest
/// `max_queued_messages`; `drop_new` keeps the first; `keep_latest = N` keeps the latest N per
/// topic; `max_queued_bytes` bounds the payload bytes. Every drop is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_policies_bound_what_a_session_gets_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[mqtt]\nmax_queued_messages = 3\n\
        [[queue_policy]]\nfilter = \"alerts/#\"\npolicy = \"drop_new\"\n\
        [[queue_policy]]\nfilter = \"news/headlines/+\"\nkeep_latest = 1\n";
    let b = start_at(dir.path(), config);
    for (id, filter) in [("a", "news/feature"), ("b", "alerts/#"), ("c", "news/headlines/+")] {
        subscribe_and_leave(&b, V5, id, filter, QoS::AtLeastOnce).await;
    }
    publish_acked(&b, "news/feature", &["f1", "f2", "f3", "f4", "f5"]).await;
    publish_acked(&b, "alerts/flood", &["a1", "a2", "a3", "a4"]).await;
    publish_acked(&b, "news/headlines/world", &["w1", "w2", "w3"]).await;
    publish_acked(&b, "news/headlines/tech", &["t1", "t2"]).await;
    let m = b.broker.metrics();
    assert_eq!(m.queue_dropped_oldest.load(Ordering::Relaxed), 2);
    assert_eq!(m.queue_dropped_new.load(Ordering::Relaxed), 1);
    assert_eq!(m.queue_superseded.load(Ordering::Relaxed), 3);
    // The policies shaped what is in the store as well: the same after a restart.
    let b = restart(b, dir.path(), config);
    for (id, expected) in [("a", vec!["f3", "f4", "f5"]), ("b", vec!["a1", "a2", "a3"]), ("c", vec!["w3", "t2"])] {
        let (mut c, _) = RawClient::connect(b.addr, persistent(V5, id, 3600)).await;
        assert_eq!(receive_acking(&mut c, expected.len()).await, expected, "session {id}");
        c.expect_silence(Duration::from_millis(200)).await;
    }
    drop(b);

    let b = start_with("max_queued_bytes = 10");
    subscribe_and_leave(&b, V5, "d", "news/#", QoS::AtLeastOnce).await;
    publish_acked(&b, "news/x", &["12345", "67890", "abcde"]).await;
    let (mut c, _) = RawClient::connect(b.addr, persistent(V5, "d", 3600)).await;
    assert_eq!(receive_acking(&mut c, 2).await, vec!["67890", "abcde"]);
}

/// A 5.0 session resumed with session expiry 0 stops being persistent: its stored record goes,
/// and after a restart there is nothing to resume [MQTT-3.1.2-23].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_without_expiry_leaves_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    subscribe_and_leave(&b, V5, "phone", "news/#", QoS::AtLeastOnce).await;
    publish_acked(&b, "news/x", &["queued"]).await;
    let (mut c, ack) = RawClient::connect(b.addr, persistent(V5, "phone", 0)).await;
    assert!(ack.session_present);
    assert_eq!(receive_acking(&mut c, 1).await, vec!["queued"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    let b = restart(b, dir.path(), "");
    let (_c, ack) = RawClient::connect(b.addr, persistent(V5, "phone", 3600)).await;
    assert!(!ack.session_present);
}

/// Bodies are stored once [issue 4]: a story queued for 40 offline sessions is one body in the
/// store, and the body goes once the last of them has acknowledged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_story_for_many_offline_sessions_is_stored_once() {
    let b = start();
    for i in 0..40 {
        subscribe_and_leave(&b, V311, &format!("phone-{i}"), "news/#", QoS::AtLeastOnce).await;
    }
    publish_acked(&b, "news/x", &["one story"]).await;
    assert_eq!(b.broker.store().stats().stored_messages, 1);
    for i in 0..40 {
        let (mut c, _) = RawClient::connect(b.addr, persistent(V311, &format!("phone-{i}"), 0)).await;
        assert_eq!(receive_acking(&mut c, 1).await, vec!["one story"]);
        c.send(&Packet::PingReq).await;
        assert!(matches!(c.recv().await, Some(Packet::PingResp)));
        assert_eq!(b.broker.store().stats().stored_messages, usize::from(i < 39), "after {} acknowledgements", i + 1);
    }
}

/// [MQTT-3.1.2-23] a session that expires while the broker runs leaves the store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expired_while_up_is_gone_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    let (mut c, _) = RawClient::connect(b.addr, persistent(V5, "brief", 1)).await;
    c.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut c).await;
    disconnect(&mut c).await;
    publish_acked(&b, "news/x", &["queued"]).await;
    let registry = b.broker.registry();
    wait_until("the session to expire", || registry.get("brief").is_none()).await;
    assert_eq!(b.broker.store().stats().stored_messages, 0, "its queue went with it");
    let b = restart(b, dir.path(), "");
    let (_c, ack) = RawClient::connect(b.addr, persistent(V5, "brief", 1)).await;
    assert!(!ack.session_present);
}

/// The same with third-party clients: a `mosquitto_sub -c` session (clean session 0) gets the
/// story published by `mosquitto_pub` while it was away, after the broker restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_persistent_session_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), "");
    let port = b.port().to_string();
    let sub = |port: &str, extra: &[&str]| {
        let mut args = vec!["-h", "127.0.0.1", "-p", port, "-c", "-i", "phone", "-q", "1", "-t", "news/#"];
        args.extend_from_slice(extra);
        std::process::Command::new("mosquitto_sub").args(args).output().expect("mosquitto_sub runs")
    };
    let out = tokio::task::block_in_place(|| sub(&port, &["-E"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "news/tech/ai", "-m", "while you were away"])
            .output()
            .unwrap()
    });
    assert!(out.status.success());
    let b = restart(b, dir.path(), "");
    let port = b.port().to_string();
    let out = tokio::task::block_in_place(|| sub(&port, &["-C", "1", "-W", "5"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "while you were away");
}

/// Issue 14: a restored session's queue stays in the store, counted, until the session comes
/// back. Its bounds and policies still hold against what arrives meanwhile (a full queue that
/// drops its oldest reads its entries first; one that drops the new message does not), the
/// priority lane still orders it, a session ended without coming back releases its bodies
/// unread, and in the end every body is gone from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_queue_is_read_when_its_session_returns() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[mqtt]\nmax_queued_messages = 4\n\
        [[queue_policy]]\nfilter = \"alerts/#\"\npolicy = \"drop_new\"\n\
        [[queue_policy]]\nfilter = \"news/headlines/+\"\nkeep_latest = 1\n\
        [[priority]]\nfilter = \"news/d/breaking\"\nclass = \"high\"\n";
    let b = start_at(dir.path(), config);
    for (id, filter) in [
        ("a", "news/feature"),
        ("b", "alerts/#"),
        ("c", "news/headlines/+"),
        ("d", "news/d/#"),
        ("e1", "news/e"),
        ("e2", "news/e"),
    ] {
        subscribe_and_leave(&b, V5, id, filter, QoS::AtLeastOnce).await;
    }
    publish_acked(&b, "news/feature", &["f1", "f2", "f3", "f4"]).await;
    publish_acked(&b, "alerts/flood", &["a1", "a2", "a3", "a4"]).await;
    publish_acked(&b, "news/headlines/world", &["w1"]).await;
    publish_acked(&b, "news/headlines/tech", &["t1"]).await;
    publish_acked(&b, "news/d/x", &["x1"]).await;
    publish_acked(&b, "news/d/breaking", &["b1"]).await;
    publish_acked(&b, "news/e", &["shared"]).await;
    let b = restart(b, dir.path(), config);

    let cold = |id: &str| b.broker.registry().get(id).unwrap().with_parked(|p| p.is_cold()).unwrap();
    let counts = b.broker.registry().counts();
    assert_eq!((counts.queued, counts.queued_bytes), (4 + 4 + 2 + 2 + 1 + 1, 4 * 2 + 4 * 2 + 2 * 2 + 2 * 2 + 2 * 6));
    for id in ["a", "b", "c", "d", "e1", "e2"] {
        assert!(cold(id), "{id} is not read at start");
    }
    assert_eq!(b.broker.store().stats().stored_messages, 4 + 4 + 2 + 2 + 1);

    publish_acked(&b, "news/feature", &["f5"]).await;
    publish_acked(&b, "alerts/flood", &["a5"]).await;
    publish_acked(&b, "news/headlines/world", &["w2"]).await;
    publish_acked(&b, "news/d/x", &["x2"]).await;
    publish_acked(&b, "news/d/breaking", &["b2"]).await;
    let m = b.broker.metrics();
    assert_eq!(m.queue_dropped_oldest.load(Ordering::Relaxed), 1, "f1 made room for f5");
    assert_eq!(m.queue_dropped_new.load(Ordering::Relaxed), 1, "a5 was let go");
    assert_eq!(m.queue_superseded.load(Ordering::Relaxed), 1, "w2 replaced w1");
    assert!(!cold("a") && !cold("c"), "read to choose what to drop");
    assert!(cold("b") && cold("d"), "drop_new and room to spare need only the counts");

    // e1 comes back with a clean start: its session ends without its queue being read.
    let mut clean = connect_packet(V5, "e1", true);
    clean.properties.session_expiry_interval = Some(0);
    let (c, ack) = RawClient::connect(b.addr, clean).await;
    assert!(!ack.session_present);
    drop(c);

    for (id, expected) in [
        ("a", vec!["f2", "f3", "f4", "f5"]),
        ("b", vec!["a1", "a2", "a3", "a4"]),
        ("c", vec!["t1", "w2"]),
        ("d", vec!["b1", "b2", "x1", "x2"]),
        ("e2", vec!["shared"]),
    ] {
        let (mut c, ack) = RawClient::connect(b.addr, persistent(V5, id, 3600)).await;
        assert!(ack.session_present, "{id} [MQTT-3.2.2-2]");
        assert_eq!(receive_acking(&mut c, expected.len()).await, expected, "session {id}");
        c.expect_silence(Duration::from_millis(100)).await;
        disconnect(&mut c).await;
    }
    let store = b.broker.store();
    wait_until("every body released", || store.stats().stored_messages == 0).await;
}
