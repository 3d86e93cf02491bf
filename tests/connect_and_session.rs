//! CONNECT, sessions, keep-alive, takeover and will messages [MQTT-3.1], [MQTT-4.1], over real
//! sockets with the raw client.
#![allow(clippy::field_reassign_with_default)] // properties read best set one by one in tests

mod common;

use std::time::Duration;

use common::*;
use herald::codec::{Disconnect, Packet, Properties, ProtocolVersion::*, QoS, ReasonCode, Will};

#[tokio::test]
async fn mqtt_3_2_2_2_session_present_after_resuming_a_persistent_session() {
    let b = start();
    let (c, ack) = RawClient::connect(b.addr, connect_packet(V3_1_1, "phone-1", false)).await;
    assert!(!ack.session_present);
    drop(c);
    wait_parked(&b, "phone-1").await;
    let (_c, ack) = RawClient::connect(b.addr, connect_packet(V3_1_1, "phone-1", false)).await;
    assert!(ack.session_present, "[MQTT-3.2.2-2] session present must be 1 for a resumed session");
    let (_c2, ack) = RawClient::connect(b.addr, connect_packet(V3_1_1, "phone-2", true)).await;
    assert!(!ack.session_present, "[MQTT-3.2.2-1] clean session gives session present 0");
}

#[tokio::test]
async fn mqtt_3_1_4_3_takeover_closes_the_old_connection_with_0x8e() {
    let b = start();
    let (mut old, _) = RawClient::connect(b.addr, connect_packet(V5, "editor", true)).await;
    let (_new, _) = RawClient::connect(b.addr, connect_packet(V5, "editor", true)).await;
    expect_disconnect(&mut old, ReasonCode::SESSION_TAKEN_OVER).await;
    assert_eq!(old.recv().await, None, "the old connection is closed");
}

#[tokio::test]
async fn mqtt_3_1_2_24_keep_alive_enforced_at_one_and_a_half_times() {
    let b = start();
    let mut connect = connect_packet(V5, "sleepy", true);
    connect.keep_alive = 1;
    let (mut c, _) = RawClient::connect(b.addr, connect).await;
    let started = std::time::Instant::now();
    expect_disconnect(&mut c, ReasonCode::KEEP_ALIVE_TIMEOUT).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4), "{waited:?}");
}

#[tokio::test]
async fn server_keep_alive_replaces_a_longer_one_in_the_connack() {
    let b = start_with("max_keepalive = 30");
    let mut connect = connect_packet(V5, "long-ka", true);
    connect.keep_alive = 600;
    let (_c, ack) = RawClient::connect(b.addr, connect).await;
    assert_eq!(ack.properties.server_keep_alive, Some(30));
    assert_eq!(ack.properties.receive_maximum, Some(20));
    assert_eq!(ack.properties.topic_alias_maximum, Some(10));
}

#[tokio::test]
async fn sockets_that_never_send_connect_are_closed_by_the_connect_timeout() {
    let b = start_with("connect_timeout = 1");
    let mut c = RawClient::connect_tcp(b.addr).await;
    let started = std::time::Instant::now();
    assert_eq!(c.recv().await, None);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn mqtt_3_2_2_assigned_client_identifier_for_an_empty_one() {
    let b = start();
    let (_c, ack) = RawClient::connect(b.addr, connect_packet(V5, "", true)).await;
    let id = ack.properties.assigned_client_identifier.expect("[MQTT-3.2.2-16] assigned client identifier");
    assert!(!id.is_empty());
}

#[tokio::test]
async fn mqtt_3_1_3_8_empty_client_id_without_clean_session_is_rejected() {
    let b = start();
    let mut c = RawClient::connect_tcp(b.addr).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V3_1_1, "", false)))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::V3_IDENTIFIER_REJECTED),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.recv().await, None);
}

fn with_will(mut c: herald::codec::Connect, topic: &str, delay: Option<u32>) -> herald::codec::Connect {
    let mut properties = Properties::default();
    properties.will_delay_interval = delay;
    c.will = Some(Will {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties,
    });
    c
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_published_when_the_connection_drops() {
    let b = start();
    let mut watcher = subscriber(&b, "watcher", "status/#", QoS::AtLeastOnce).await;
    let (dying, _) =
        RawClient::connect(b.addr, with_will(connect_packet(V5, "dying", true), "status/dying", None)).await;
    drop(dying);
    let p = expect_publish(&mut watcher).await;
    assert_eq!(p.topic, "status/dying");
    assert_eq!(&p.payload[..], b"gone");
}

#[tokio::test]
async fn mqtt_3_14_4_3_normal_disconnect_discards_the_will() {
    let b = start();
    let mut watcher = subscriber(&b, "watcher", "status/#", QoS::AtLeastOnce).await;
    let (mut polite, _) =
        RawClient::connect(b.addr, with_will(connect_packet(V5, "polite", true), "status/polite", None)).await;
    polite
        .send(&Packet::Disconnect(Disconnect { reason: ReasonCode::SUCCESS, properties: Properties::default() }))
        .await;
    watcher.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn mqtt_3_1_3_9_will_delay_cancelled_by_a_reconnect() {
    let b = start();
    let mut watcher = subscriber(&b, "watcher", "status/#", QoS::AtLeastOnce).await;
    let mut c = with_will(connect_packet(V5, "flaky", false), "status/flaky", Some(2));
    c.properties.session_expiry_interval = Some(60);
    let (flaky, _) = RawClient::connect(b.addr, c.clone()).await;
    drop(flaky);
    wait_parked(&b, "flaky").await;
    let (_back, ack) = RawClient::connect(b.addr, c.clone()).await;
    assert!(ack.session_present);
    watcher.expect_silence(Duration::from_millis(2500)).await;
    // Without a reconnect the will comes after its delay.
    let mut c2 = with_will(connect_packet(V5, "gone-for-good", false), "status/gone", Some(1));
    c2.properties.session_expiry_interval = Some(60);
    let (gone, _) = RawClient::connect(b.addr, c2).await;
    drop(gone);
    let p = expect_publish(&mut watcher).await;
    assert_eq!(p.topic, "status/gone");
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_qos1_is_resent_with_dup_on_resume() {
    let b = start();
    let mut c = connect_packet(V3_1_1, "train-phone", false);
    c.keep_alive = 60;
    let (mut phone, _) = RawClient::connect(b.addr, c.clone()).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut phone).await;
    let (mut editor, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "editor", true)).await;
    editor.send(&publish("news/tech", b"story-1", QoS::AtLeastOnce, 7)).await;
    assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
    let first = expect_publish(&mut phone).await;
    assert!(!first.dup);
    drop(phone); // never acknowledged
    wait_parked(&b, "train-phone").await;
    // Published while the phone is offline: queued for the persistent session.
    editor.send(&publish("news/tech", b"story-2", QoS::AtLeastOnce, 8)).await;
    assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
    let (mut phone, ack) = RawClient::connect(b.addr, c).await;
    assert!(ack.session_present);
    let again = expect_publish(&mut phone).await;
    assert!(again.dup, "[MQTT-3.3.1-1] a resent PUBLISH has DUP set");
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(&again.payload[..], b"story-1");
    let queued = expect_publish(&mut phone).await;
    assert_eq!(&queued.payload[..], b"story-2");
}

#[tokio::test]
async fn mqtt_3_1_2_23_session_expiry_ends_the_session() {
    let b = start();
    let mut c = connect_packet(V5, "brief", false);
    c.properties.session_expiry_interval = Some(1);
    let (s, _) = RawClient::connect(b.addr, c.clone()).await;
    drop(s);
    let left = std::time::Instant::now();
    let registry = b.broker.registry();
    wait_until("the session to expire", || registry.get("brief").is_none()).await;
    assert!(left.elapsed() >= Duration::from_millis(900), "expired after {:?}, not 1 s", left.elapsed());
    let (_s, ack) = RawClient::connect(b.addr, c).await;
    assert!(!ack.session_present, "the session expired after 1 s");
}

#[tokio::test]
async fn mqtt_3_1_0_2_second_connect_is_a_protocol_error() {
    let b = start();
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V5, "twice", true)).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, "twice", true)))).await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn a_will_topic_deeper_than_max_topic_levels_is_refused_with_0x90() {
    let b = start_with("max_topic_levels = 4");
    let mut c = RawClient::connect_tcp(b.addr).await;
    c.send(&Packet::Connect(Box::new(with_will(connect_packet(V5, "deep-will", true), "a/b/c/d/e", None)))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::TOPIC_NAME_INVALID),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.recv().await, None);
}

/// [MQTT-3.1.4] "Clients are allowed to send further Control Packets immediately after sending
/// a CONNECT Packet": a SUBSCRIBE that arrives in the same read as its CONNECT is answered at
/// once, not when the next bytes happen to arrive. (Found through paho-mqtt, which subscribes
/// right after connecting: its test lost the SUBSCRIBE now and then, and waited in vain for the
/// SUBACK, before issue 12.)
#[tokio::test]
async fn mqtt_3_1_4_packets_sent_right_after_connect_in_the_same_segment_are_handled() {
    let b = start();
    for version in [V3_1_1, V5] {
        let mut c = RawClient::connect_tcp(b.addr).await;
        let connect = Packet::Connect(Box::new(connect_packet(version, "eager", true)));
        c.send_together(&[connect, subscribe(1, "news/#", QoS::AtLeastOnce)]).await;
        match c.recv_within(WAIT).await {
            Ok(Some(Packet::ConnAck(a))) => assert_eq!(a.code, ReasonCode::SUCCESS),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        match c.recv_within(WAIT).await {
            Ok(Some(Packet::SubAck(a))) => assert_eq!(a.packet_id, 1),
            other => panic!("{version:?}: expected the SUBACK of the SUBSCRIBE sent with CONNECT, got {other:?}"),
        }
    }
}
