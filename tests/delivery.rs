//! Routing and delivery [MQTT-3.3], [MQTT-4.3], [MQTT-4.7], [MQTT-4.8], [MQTT-4.9]: QoS levels,
//! overlapping subscriptions, shared subscriptions, retained messages with flow control, topic
//! aliases, message expiry and maximum packet size, over real sockets.
#![allow(clippy::field_reassign_with_default)] // properties read best set one by one in tests

mod common;

use std::time::Duration;

use common::*;
use herald::codec::{
    Packet, Properties, ProtocolVersion::*, PubResponse, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};

#[tokio::test]
async fn mqtt_3_3_4_2_overlapping_subscriptions_deliver_one_copy_with_every_identifier() {
    let b = start();
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V5, "overlap", true)).await;
    for (pid, filter, qos, id) in [(1, "news/#", QoS::AtMostOnce, 11), (2, "news/+/ai", QoS::AtLeastOnce, 22)] {
        let mut properties = Properties::default();
        properties.subscription_identifiers = vec![id];
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: pid,
            properties,
            filters: vec![(filter.into(), SubscriptionOptions { qos, ..Default::default() })],
        }))
        .await;
        expect_suback(&mut c).await;
    }
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "pub", true)).await;
    p.send(&publish("news/tech/ai", b"x", QoS::AtLeastOnce, 1)).await;
    let got = expect_publish(&mut c).await;
    assert_eq!(got.qos, QoS::AtLeastOnce, "the highest granted QoS");
    let mut ids = got.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![11, 22]);
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn mqtt_4_3_3_qos2_both_ways_exactly_once() {
    let b = start();
    let mut s = subscriber(&b, "s2", "news/breaking", QoS::ExactlyOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "p2", true)).await;
    p.send(&publish("news/breaking", b"quake", QoS::ExactlyOnce, 9)).await;
    assert_eq!(p.recv().await, Some(Packet::PubRec(PubResponse::new(9, ReasonCode::SUCCESS))));
    // A retransmission before PUBREL is not routed twice [MQTT-4.3.3-10].
    let mut dup = publish_msg("news/breaking", b"quake", QoS::ExactlyOnce, 9);
    dup.dup = true;
    p.send(&Packet::Publish(dup)).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    p.send(&Packet::PubRel(PubResponse::new(9, ReasonCode::SUCCESS))).await;
    assert_eq!(p.recv().await, Some(Packet::PubComp(PubResponse::new(9, ReasonCode::SUCCESS))));
    let got = expect_publish(&mut s).await;
    assert_eq!(got.qos, QoS::ExactlyOnce);
    s.send(&Packet::PubRec(PubResponse::new(got.packet_id, ReasonCode::SUCCESS))).await;
    assert_eq!(s.recv().await, Some(Packet::PubRel(PubResponse::new(got.packet_id, ReasonCode::SUCCESS))));
    s.send(&Packet::PubComp(PubResponse::new(got.packet_id, ReasonCode::SUCCESS))).await;
    s.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn mqtt_4_8_2_shared_subscription_gives_each_message_to_one_member() {
    let b = start();
    let mut a = subscriber(&b, "a", "$share/workers/jobs/#", QoS::AtMostOnce).await;
    let mut c = subscriber(&b, "c", "$share/workers/jobs/#", QoS::AtMostOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "p", true)).await;
    for i in 0..10u8 {
        p.send(&publish("jobs/x", &[i], QoS::AtMostOnce, 0)).await;
    }
    let mut total = 0;
    for client in [&mut a, &mut c] {
        while let Ok(Some(Packet::Publish(_))) = client.recv_within(Duration::from_millis(300)).await {
            total += 1;
        }
    }
    assert_eq!(total, 10);
}

#[tokio::test]
async fn mqtt_3_8_3_3_no_local_and_3_3_1_9_retain_as_published() {
    let b = start();
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V5, "self", true)).await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![
            ("mine".into(), SubscriptionOptions { no_local: true, ..Default::default() }),
            ("rap".into(), SubscriptionOptions { retain_as_published: true, ..Default::default() }),
        ],
    }))
    .await;
    expect_suback(&mut c).await;
    c.send(&publish("mine", b"x", QoS::AtMostOnce, 0)).await;
    c.expect_silence(Duration::from_millis(300)).await;
    let mut retained = publish_msg("rap", b"kept", QoS::AtMostOnce, 0);
    retained.retain = true;
    c.send(&Packet::Publish(retained)).await;
    assert!(expect_publish(&mut c).await.retain, "retain as published keeps the flag");
}

#[tokio::test]
async fn retained_news_all_delivered_to_a_new_subscriber_with_flow_control() {
    let b = start();
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "cms", true)).await;
    const N: usize = 3000;
    for i in 0..N {
        let mut m = publish_msg(&format!("news/story/{i}"), b"headline", QoS::AtLeastOnce, (i % 60000 + 1) as u16);
        m.retain = true;
        p.send(&Packet::Publish(m)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(b.broker.retained_count(), N);
    let mut c = connect_packet(V5, "fresh-phone", true);
    c.properties.receive_maximum = Some(5);
    let (mut phone, _) = RawClient::connect(b.addr, c).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut phone).await;
    let mut seen = std::collections::HashSet::new();
    let mut unacked = 0usize;
    while seen.len() < N {
        let m = expect_publish(&mut phone).await;
        assert!(m.retain, "[MQTT-3.3.1-8] retained on subscribe");
        unacked += 1;
        assert!(unacked <= 5, "[MQTT-4.9.0-2] never more than the receive maximum in flight");
        seen.insert(m.topic.clone());
        phone.send(&Packet::PubAck(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
        unacked -= 1;
    }
    phone.expect_silence(Duration::from_millis(200)).await;
    // At QoS 0 nothing paces the queue; all of it must still arrive, never a truncated set.
    let (mut reader, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "qos0-reader", true)).await;
    reader.send(&subscribe(1, "news/#", QoS::AtMostOnce)).await;
    expect_suback(&mut reader).await;
    let mut count = 0;
    while count < N {
        assert!(expect_publish(&mut reader).await.retain);
        count += 1;
    }
}

#[tokio::test]
async fn mqtt_3_3_1_6_empty_retained_publish_deletes_and_retain_handling_2_sends_none() {
    let b = start();
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let retained = |payload: &'static [u8]| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: "news/top".into(),
            packet_id: 0,
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(payload),
        })
    };
    p.send(&retained(b"story")).await;
    p.send(&Packet::PingReq).await;
    assert_eq!(p.recv().await, Some(Packet::PingResp));
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V5, "rh2", true)).await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![("news/#".into(), SubscriptionOptions { retain_handling: 2, ..Default::default() })],
    }))
    .await;
    expect_suback(&mut c).await;
    c.expect_silence(Duration::from_millis(300)).await;
    p.send(&retained(b"")).await;
    p.send(&Packet::PingReq).await;
    assert_eq!(p.recv().await, Some(Packet::PingResp));
    assert_eq!(b.broker.retained_count(), 0);
}

#[tokio::test]
async fn topic_aliases_outbound_when_the_client_allows_them() {
    let b = start();
    let mut c = connect_packet(V5, "alias-phone", true);
    c.properties.topic_alias_maximum = Some(4);
    let (mut phone, _) = RawClient::connect(b.addr, c).await;
    phone.send(&subscribe(1, "news/#", QoS::AtMostOnce)).await;
    expect_suback(&mut phone).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    p.send(&publish("news/tech", b"1", QoS::AtMostOnce, 0)).await;
    p.send(&publish("news/tech", b"2", QoS::AtMostOnce, 0)).await;
    let first = expect_publish(&mut phone).await;
    assert_eq!(first.topic, "news/tech");
    let alias = first.properties.topic_alias.expect("an alias is assigned");
    let second = expect_publish(&mut phone).await;
    assert_eq!(second.topic, "", "[MQTT-3.3.2-12] the alias stands for the topic");
    assert_eq!(second.properties.topic_alias, Some(alias));
}

#[tokio::test]
async fn mqtt_3_3_2_8_inbound_topic_alias_out_of_range_is_0x94() {
    let b = start();
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let mut m = publish_msg("news/tech", b"1", QoS::AtMostOnce, 0);
    m.properties.topic_alias = Some(11);
    p.send(&Packet::Publish(m)).await;
    expect_disconnect(&mut p, ReasonCode::TOPIC_ALIAS_INVALID).await;
}

#[tokio::test]
async fn mqtt_3_3_4_9_exceeding_our_receive_maximum_is_0x93() {
    let b = start_with("receive_maximum = 2");
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "greedy", true)).await;
    for id in 1..=3 {
        p.send(&publish("t", b"x", QoS::ExactlyOnce, id)).await;
    }
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    expect_disconnect(&mut p, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED).await;
}

#[tokio::test]
async fn mqtt_3_3_2_6_message_expiry_counts_down_and_expired_messages_are_not_sent() {
    let b = start();
    let mut c = connect_packet(V5, "offline-phone", false);
    c.properties.session_expiry_interval = Some(300);
    let (mut phone, _) = RawClient::connect(b.addr, c.clone()).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut phone).await;
    drop(phone);
    wait_parked(&b, "offline-phone").await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    for (payload, expiry, id) in [(&b"short"[..], 1u32, 1u16), (&b"long"[..], 100, 2)] {
        let mut m = publish_msg("news/x", payload, QoS::AtLeastOnce, id);
        m.properties.message_expiry_interval = Some(expiry);
        p.send(&Packet::Publish(m)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut phone, _) = RawClient::connect(b.addr, c).await;
    let m = expect_publish(&mut phone).await;
    assert_eq!(&m.payload[..], b"long", "the expired message is never delivered");
    let left = m.properties.message_expiry_interval.unwrap();
    assert!((97..=98).contains(&left), "remaining expiry {left}");
}

#[tokio::test]
async fn mqtt_3_1_2_25_message_too_large_for_a_subscriber_is_dropped_for_it_alone() {
    let b = start();
    let mut c = connect_packet(V5, "small", true);
    c.properties.maximum_packet_size = Some(64);
    let (mut small, _) = RawClient::connect(b.addr, c).await;
    small.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut small).await;
    let mut big = subscriber(&b, "big", "news/#", QoS::AtLeastOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    p.send(&publish("news/long", &[b'x'; 200], QoS::AtLeastOnce, 1)).await;
    p.send(&publish("news/short", b"ok", QoS::AtLeastOnce, 2)).await;
    assert_eq!(expect_publish(&mut big).await.payload.len(), 200);
    assert_eq!(expect_publish(&mut small).await.topic, "news/short");
}

#[tokio::test]
async fn dollar_sys_is_not_matched_by_hash_and_cannot_be_published() {
    let b = start();
    let mut all = subscriber(&b, "all", "#", QoS::AtMostOnce).await;
    let mut sys = subscriber(&b, "sys", "$SYS/#", QoS::AtMostOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    p.send(&publish("$SYS/broker/fake", b"x", QoS::AtMostOnce, 0)).await;
    p.send(&publish("$other/x", b"x", QoS::AtMostOnce, 0)).await;
    all.expect_silence(Duration::from_millis(300)).await;
    sys.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn malformed_input_gets_0x81_and_other_clients_keep_receiving() {
    let b = start();
    let mut s = subscriber(&b, "bystander", "news/#", QoS::AtMostOnce).await;
    let (mut bad, _) = RawClient::connect(b.addr, connect_packet(V5, "bad", true)).await;
    bad.send_raw(&[0x30, 0x05, 0x00, 0x09, b'a', b'b', b'c']).await; // topic length past the end
    expect_disconnect(&mut bad, ReasonCode::MALFORMED_PACKET).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    p.send(&publish("news/x", b"still here", QoS::AtMostOnce, 0)).await;
    assert_eq!(&expect_publish(&mut s).await.payload[..], b"still here");
}

#[tokio::test]
async fn packet_larger_than_our_maximum_is_0x95() {
    let b = start_with("max_packet_size = 1024");
    let (mut p, ack) = RawClient::connect(b.addr, connect_packet(V5, "big", true)).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    p.send(&publish("news/x", &[0u8; 2000], QoS::AtMostOnce, 0)).await;
    expect_disconnect(&mut p, ReasonCode::PACKET_TOO_LARGE).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_only_its_own_messages_and_can_be_taken_over() {
    let b = start_with("max_outbound_bytes = 65536\nmax_queued_messages = 50");
    let (mut stuck, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "stuck", true)).await;
    stuck.send(&subscribe(1, "news/#", QoS::AtMostOnce)).await;
    expect_suback(&mut stuck).await;
    let mut healthy = subscriber(&b, "healthy", "news/#", QoS::AtMostOnce).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "cms", true)).await;
    let big = vec![b'x'; 64 * 1024];
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < 400 {
            match healthy.recv().await {
                Some(Packet::Publish(_)) => n += 1,
                other => panic!("{other:?}"),
            }
        }
        n
    });
    // Paced by PUBACK, so the healthy subscriber keeps up while the stuck one falls behind.
    for i in 0..400u16 {
        p.send(&publish("news/feature", &big, QoS::AtLeastOnce, i + 1)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap(), 400);
    assert!(b.broker.metrics().messages_dropped_queue_full.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // The stuck connection's writer is full; a takeover must still get through promptly.
    let started = std::time::Instant::now();
    let (_again, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "stuck", true)).await;
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    drop(stuck);
}

#[tokio::test]
async fn qos1_burst_to_a_slow_subscriber_is_not_lost_the_publisher_is_slowed_instead() {
    let b = start_with("max_queued_messages = 10");
    let (mut slow, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "slow-phone", true)).await;
    slow.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut slow).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "cms", true)).await;
    const N: u16 = 500;
    // Pipelined: all 500 go out before any acknowledgement is read.
    let mut wire = bytes::BytesMut::new();
    for i in 1..=N {
        publish("news/x", &i.to_be_bytes(), QoS::AtLeastOnce, i).encode(V3_1_1, &mut wire);
    }
    p.send_raw(&wire).await;
    let mut seen = Vec::new();
    while seen.len() < usize::from(N) {
        let m = expect_publish(&mut slow).await;
        seen.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
        if seen.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // a slow reader
        }
        slow.send(&Packet::PubAck(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
    }
    assert_eq!(seen, (1..=N).collect::<Vec<_>>(), "every message, in order");
    for _ in 0..N {
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(b.broker.metrics().messages_dropped_queue_full.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_subscriber_that_never_acknowledges_holds_publishers_up_once_then_is_marked_congested() {
    let b = start_with("max_queued_messages = 5\nmax_publish_wait_ms = 300");
    let mut c = connect_packet(V5, "stalled-phone", true);
    c.properties.receive_maximum = Some(1);
    let (mut stalled, _) = RawClient::connect(b.addr, c).await;
    stalled.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut stalled).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "cms", true)).await;
    let started = std::time::Instant::now();
    let mut wire = bytes::BytesMut::new();
    for i in 1..=100u16 {
        publish("news/x", b"story", QoS::AtLeastOnce, i).encode(V3_1_1, &mut wire);
    }
    p.send_raw(&wire).await;
    for _ in 0..100 {
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "the publisher waited for room first: {waited:?}");
    assert!(waited < Duration::from_secs(2), "and then stopped waiting for that subscriber: {waited:?}");
    let dropped = b.broker.metrics().messages_dropped_queue_full.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 100 - 6, "1 in flight and 5 queued, the rest counted as dropped");
}

#[tokio::test]
async fn topics_deeper_than_max_topic_levels_are_refused_not_walked() {
    let b = start_with("max_topic_levels = 8");
    let (mut c, _) = RawClient::connect(b.addr, connect_packet(V5, "deep", true)).await;
    let deep = ["a"; 9].join("/");
    c.send(&subscribe(1, &deep, QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut c).await, vec![ReasonCode::TOPIC_FILTER_INVALID.0]);
    let ok = ["a"; 8].join("/");
    c.send(&subscribe(2, &ok, QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut c).await, vec![0]);
    c.send(&publish(&ok, b"fine", QoS::AtMostOnce, 0)).await;
    assert_eq!(&expect_publish(&mut c).await.payload[..], b"fine");
    c.send(&publish(&deep, b"too deep", QoS::AtMostOnce, 0)).await;
    expect_disconnect(&mut c, ReasonCode::TOPIC_NAME_INVALID).await;
}

#[tokio::test]
async fn retained_replay_is_bounded_per_session_by_max_pending_retained() {
    let b = start_with("max_pending_retained = 50");
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "cms", true)).await;
    for i in 0..100u16 {
        let mut m = publish_msg(&format!("news/{i}"), b"h", QoS::AtLeastOnce, i + 1);
        m.retain = true;
        p.send(&Packet::Publish(m)).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let mut c = connect_packet(V5, "greedy", true);
    c.properties.receive_maximum = Some(1); // nothing drains while we count
    let (mut g, _) = RawClient::connect(b.addr, c).await;
    g.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut g).await;
    let mut got = 0;
    while let Ok(Some(Packet::Publish(m))) = g.recv_within(Duration::from_millis(300)).await {
        got += 1;
        g.send(&Packet::PubAck(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
    }
    assert_eq!(got, 50);
    assert_eq!(b.broker.metrics().messages_dropped_queue_full.load(std::sync::atomic::Ordering::Relaxed), 50);
}

#[tokio::test]
async fn one_message_to_many_subscribers_gives_each_its_own_correct_packet() {
    let b = start();
    let mut v3 = {
        let (mut c, _) = RawClient::connect(b.addr, connect_packet(V3_1_1, "v3", true)).await;
        c.send(&subscribe(1, "news/#", QoS::AtMostOnce)).await;
        expect_suback(&mut c).await;
        c
    };
    let mut v5 = subscriber(&b, "v5", "news/#", QoS::AtMostOnce).await;
    let (mut v5id, _) = RawClient::connect(b.addr, connect_packet(V5, "v5-id", true)).await;
    let mut properties = Properties::default();
    properties.subscription_identifiers = vec![9];
    v5id.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties,
        filters: vec![("news/#".into(), SubscriptionOptions::default())],
    }))
    .await;
    expect_suback(&mut v5id).await;
    let (mut p, _) = RawClient::connect(b.addr, connect_packet(V5, "cms", true)).await;
    let mut m = publish_msg("news/x", &[7u8; 300], QoS::AtMostOnce, 0);
    m.properties.user_properties = vec![("story-id".into(), "s-9".into())];
    p.send(&Packet::Publish(m)).await;
    let a = expect_publish(&mut v3).await;
    assert_eq!((a.topic.as_str(), a.payload.len()), ("news/x", 300));
    let b5 = expect_publish(&mut v5).await;
    assert_eq!(b5.properties.user_properties, vec![("story-id".to_string(), "s-9".to_string())]);
    assert!(b5.properties.subscription_identifiers.is_empty());
    let c = expect_publish(&mut v5id).await;
    assert_eq!(c.properties.subscription_identifiers, vec![9]);
    assert_eq!(c.payload, b5.payload);
}
