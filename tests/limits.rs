//! Limits [issue 5]: each limit hit once, with its reason code and its counter, and half-open
//! sockets closed by the CONNECT timeout while a live client's messages keep flowing.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use herald::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

async fn connack(addr: std::net::SocketAddr, version: ProtocolVersion, id: &str) -> (RawClient, u8) {
    let mut c = RawClient::connect_tcp(addr).await;
    c.send(&Packet::Connect(Box::new(connect_packet(version, id, true)))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => (c, a.code.0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// `max_connections`: CONNACK 0x89 server busy (3.1.1: 0x03 server unavailable) [MQTT-3.2.2-6].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_answers_server_busy() {
    let b = start_toml("[limits]\nmax_connections = 2\n");
    let (_a, code) = connack(b.addr, V5, "a").await;
    assert_eq!(code, 0);
    let (_b, code) = connack(b.addr, V5, "b").await;
    assert_eq!(code, 0);
    assert_eq!(connack(b.addr, V5, "c").await.1, 0x89);
    assert_eq!(connack(b.addr, V311, "d").await.1, 0x03);
    assert_eq!(b.broker.metrics().limit_max_connections.load(Relaxed), 2);
}

/// `max_connections_per_ip`: CONNACK 0x97 quota exceeded; a slot is free again once a client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_ip_answers_quota_exceeded() {
    let b = start_toml("[limits]\nmax_connections_per_ip = 2\n");
    let (first, _) = connack(b.addr, V5, "a").await;
    let (_second, _) = connack(b.addr, V5, "b").await;
    assert_eq!(connack(b.addr, V5, "c").await.1, 0x97);
    assert_eq!(connack(b.addr, V311, "c").await.1, 0x03);
    drop(first);
    let metrics = b.broker.metrics();
    wait_until("the first connection to close", || metrics.connections_now() <= 1).await;
    assert_eq!(connack(b.addr, V5, "d").await.1, 0);
    assert_eq!(b.broker.metrics().limit_connections_per_ip.load(Relaxed), 2);
}

/// `connection_rate_per_ip`: CONNECTs beyond the rate within a second get 0x9F.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rate_per_ip_answers_rate_exceeded() {
    let b = start_toml("[limits]\nconnection_rate_per_ip = 3\n");
    let mut codes = Vec::new();
    for i in 0..8 {
        codes.push(connack(b.addr, V5, &format!("c{i}")).await.1);
    }
    // Eight CONNECTs fall in at most two one-second windows of three each.
    assert!(codes.iter().filter(|&&c| c == 0x9F).count() >= 2, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 0 || c == 0x9F), "{codes:?}");
    assert!(b.broker.metrics().limit_connection_rate.load(Relaxed) >= 2);
}

/// `max_subscriptions_per_client`: filters beyond it get SUBACK 0x97 (3.1.1: 0x80); renewing an
/// existing subscription is not a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_subscriptions_per_client_answers_quota_exceeded() {
    let b = start_toml("[limits]\nmax_subscriptions_per_client = 2\n");
    for (version, refused) in [(V5, 0x97), (V311, 0x80)] {
        let (mut c, _) = RawClient::connect(b.addr, connect_packet(version, "s", true)).await;
        let mut sub = subscribe(1, "news/a", QoS::AtMostOnce);
        if let Packet::Subscribe(s) = &mut sub {
            s.filters.push(("news/b".into(), Default::default()));
            s.filters.push(("news/c".into(), Default::default()));
        }
        c.send(&sub).await;
        assert_eq!(expect_suback(&mut c).await, vec![0, 0, refused]);
        c.send(&subscribe(2, "news/a", QoS::AtLeastOnce)).await;
        assert_eq!(expect_suback(&mut c).await, vec![1], "a renewal is not a new subscription");
    }
    assert_eq!(b.broker.metrics().limit_subscriptions.load(Relaxed), 2);
}

/// `publish_rate_per_client`: PUBLISHes beyond the rate are dropped; 5.0 QoS 1 learns it from
/// PUBACK 0x97.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_per_client_answers_quota_exceeded() {
    let b = start_toml("[limits]\npublish_rate_per_client = 5\n");
    let (mut sub, _) = RawClient::connect(b.addr, connect_packet(V5, "reader", true)).await;
    sub.send(&subscribe(1, "news/#", QoS::AtMostOnce)).await;
    expect_suback(&mut sub).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "flood", true)).await;
    let mut refused = 0;
    for i in 1..=20u16 {
        p.send(&publish("news/x", b"x", QoS::AtLeastOnce, i)).await;
        match p.recv().await {
            Some(Packet::PubAck(a)) if a.reason == ReasonCode::QUOTA_EXCEEDED => refused += 1,
            Some(Packet::PubAck(_)) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // Twenty PUBLISHes fall in at most two one-second windows of five each.
    assert!(refused >= 10, "refused {refused}");
    let mut delivered = 0;
    while let Ok(Some(Packet::Publish(_))) = sub.recv_within(Duration::from_millis(300)).await {
        delivered += 1;
    }
    assert_eq!(delivered, 20 - refused, "what was refused was not delivered");
    assert_eq!(b.broker.metrics().limit_publish_rate.load(Relaxed), refused);
}

/// `max_topic_length`: a longer topic name is refused like a malformed one (5.0: DISCONNECT
/// 0x90), a longer filter gets SUBACK 0x8F.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_topic_length_refuses_long_topics_and_filters() {
    let b = start_toml("[limits]\nmax_topic_length = 16\n");
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V5, "long", true)).await;
    c.send(&subscribe(1, "news/a-very-long-filter", QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut c).await, vec![0x8F]);
    c.send(&publish("news/a-very-long-topic", b"x", QoS::AtMostOnce, 0)).await;
    assert!(matches!(c.recv().await, Some(Packet::Disconnect(d)) if d.reason == ReasonCode::TOPIC_NAME_INVALID));
    assert_eq!(b.broker.metrics().limit_topic_length.load(Relaxed), 2);
}

/// 5000 sockets that never send CONNECT are closed by the CONNECT timeout, while a connected
/// publisher's messages keep reaching their subscriber throughout [MQTT-3.1.4-1 timeout].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_sockets_are_closed_by_the_connect_timeout_while_live_traffic_flows() {
    let b = start_toml("[mqtt]\nconnect_timeout = 1\n");
    let (mut sub, _) = RawClient::connect(b.addr, connect_packet(V311, "reader", true)).await;
    sub.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut sub).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V311, "editor", true)).await;

    let mut idle = Vec::with_capacity(5000);
    for _ in 0..5000 {
        idle.push(tokio::net::TcpStream::connect(b.addr).await.expect("socket"));
    }
    let started = std::time::Instant::now();
    let mut sent = 0u16;
    let mut received = 0u16;
    while started.elapsed() < Duration::from_millis(2500) {
        sent += 1;
        p.send(&publish("news/live", b"still flowing", QoS::AtLeastOnce, sent)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
        let m = expect_publish(&mut sub).await;
        sub.send(&Packet::PubAck(herald::codec::PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
        received += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sent, received);
    assert!(sent > 50, "the live pair exchanged {sent} messages");
    use tokio::io::AsyncReadExt;
    let mut closed = 0;
    for s in &mut idle {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut byte)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 5000, "every half-open socket was closed");
}
