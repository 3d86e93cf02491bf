//! Codec tests: every packet round-trips at both protocol levels, arbitrary bytes never panic,
//! feeding a packet a byte at a time decodes the same, and packets that the independent
//! `mqttbytes` crate encodes decode identically in ours.
#![allow(clippy::field_reassign_with_default)] // properties read best set one by one in tests

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn decode_one(version: ProtocolVersion, role: Role, bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut d = Decoder::new(role, u32::MAX);
    d.version = Some(version);
    let mut buf = BytesMut::from(bytes);
    let p = d.decode(&mut buf);
    if let Ok(Some(_)) = p {
        assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    }
    p
}

fn round_trip(packet: Packet, version: ProtocolVersion, decoded_by: Role) {
    let mut out = BytesMut::new();
    packet.encode(version, &mut out);
    assert_eq!(out.len(), packet.encoded_len(version));
    let back = if let Packet::Connect(_) = packet {
        let mut d = Decoder::new(Role::Server, u32::MAX);
        d.decode(&mut out).unwrap().unwrap()
    } else {
        decode_one(version, decoded_by, &out).unwrap().unwrap()
    };
    assert_eq!(back, packet, "{version:?}");
}

fn props_v5() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("story-id".into(), "s-1".into()), ("story-id".into(), "s-2".into())],
        ..Default::default()
    }
}

#[test]
fn every_packet_round_trips_at_3_1_1_and_5_0() {
    use ProtocolVersion::*;
    for v in [V3_1_1, V5] {
        let v5 = v == V5;
        let p = |x: Properties| if v5 { x } else { Properties::default() };
        let mut connect_props = Properties::default();
        connect_props.session_expiry_interval = Some(3600);
        connect_props.receive_maximum = Some(10);
        connect_props.maximum_packet_size = Some(4096);
        connect_props.topic_alias_maximum = Some(5);
        let mut will_props = Properties::default();
        will_props.will_delay_interval = Some(5);
        round_trip(
            Packet::Connect(Box::new(Connect {
                protocol: v,
                clean_start: true,
                keep_alive: 30,
                properties: p(connect_props),
                client_id: "phone-1".into(),
                will: Some(Will {
                    topic: "status/phone-1".into(),
                    payload: Bytes::from_static(b"offline"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: p(will_props),
                }),
                username: Some("reader".into()),
                password: Some(Bytes::from_static(b"secret")),
            })),
            v,
            Role::Server,
        );
        let mut ack_props = Properties::default();
        ack_props.assigned_client_identifier = Some("herald-1".into());
        ack_props.topic_alias_maximum = Some(10);
        ack_props.receive_maximum = Some(20);
        round_trip(
            Packet::ConnAck(ConnAck { session_present: true, code: ReasonCode::SUCCESS, properties: p(ack_props) }),
            v,
            Role::Client,
        );
        let mut pub_props = props_v5();
        pub_props.topic_alias = Some(3);
        for (qos, id) in [(QoS::AtMostOnce, 0), (QoS::AtLeastOnce, 7), (QoS::ExactlyOnce, 65535)] {
            round_trip(
                Packet::Publish(Publish {
                    dup: qos != QoS::AtMostOnce,
                    qos,
                    retain: true,
                    topic: "news/tech/ai".into(),
                    packet_id: id,
                    properties: p(pub_props.clone()),
                    payload: Bytes::from_static(b"a story"),
                }),
                v,
                Role::Server,
            );
        }
        let reason = if v5 { ReasonCode::NO_MATCHING_SUBSCRIBERS } else { ReasonCode::SUCCESS };
        round_trip(Packet::PubAck(PubResponse::new(1, reason)), v, Role::Server);
        round_trip(Packet::PubRec(PubResponse::new(2, ReasonCode::SUCCESS)), v, Role::Server);
        round_trip(Packet::PubRel(PubResponse::new(3, ReasonCode::SUCCESS)), v, Role::Server);
        let mut reason_props = Properties::default();
        reason_props.reason_string = Some("why".into());
        let comp_reason = if v5 { ReasonCode::PACKET_IDENTIFIER_NOT_FOUND } else { ReasonCode::SUCCESS };
        round_trip(
            Packet::PubComp(PubResponse { packet_id: 4, reason: comp_reason, properties: p(reason_props.clone()) }),
            v,
            Role::Server,
        );
        let mut sub_props = Properties::default();
        sub_props.subscription_identifiers = vec![268_435_455];
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: v5,
            retain_as_published: v5,
            retain_handling: if v5 { 2 } else { 0 },
        };
        round_trip(
            Packet::Subscribe(Subscribe {
                packet_id: 9,
                properties: p(sub_props),
                filters: vec![("news/#".into(), options), ("news/+/breaking".into(), SubscriptionOptions::default())],
            }),
            v,
            Role::Server,
        );
        round_trip(
            Packet::SubAck(SubAck {
                packet_id: 9,
                properties: p(reason_props.clone()),
                reasons: vec![ReasonCode(2), ReasonCode(0x80)],
            }),
            v,
            Role::Client,
        );
        round_trip(
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 10,
                properties: Properties::default(),
                filters: vec!["news/#".into()],
            }),
            v,
            Role::Server,
        );
        round_trip(
            Packet::UnsubAck(UnsubAck {
                packet_id: 10,
                properties: Properties::default(),
                reasons: if v5 { vec![ReasonCode::NO_SUBSCRIPTION_EXISTED] } else { vec![] },
            }),
            v,
            Role::Client,
        );
        round_trip(Packet::PingReq, v, Role::Server);
        round_trip(Packet::PingResp, v, Role::Client);
        let mut disc_props = Properties::default();
        disc_props.session_expiry_interval = Some(0);
        round_trip(
            Packet::Disconnect(Disconnect {
                reason: if v5 { ReasonCode::DISCONNECT_WITH_WILL } else { ReasonCode::SUCCESS },
                properties: p(disc_props),
            }),
            v,
            Role::Server,
        );
    }
    round_trip(
        Packet::Auth(Auth { reason: ReasonCode(0x18), properties: Properties::default() }),
        ProtocolVersion::V5,
        Role::Client,
    );
}

#[test]
fn statement_violations_get_the_specified_reason() {
    use ErrorKind::*;
    use ProtocolVersion::V5;
    let cases: &[(&[u8], ErrorKind)] = &[
        (&[0x36, 0x04, 0, 1, b't', 0], Malformed),           // [MQTT-3.3.1-4] QoS 3
        (&[0x38, 0x04, 0, 1, b't', 0], Malformed),           // [MQTT-3.3.1-2] DUP on QoS 0
        (&[0x30, 0x04, 0, 1, b'+', 0], Malformed),           // [MQTT-3.3.2-2] wildcard in topic name
        (&[0x32, 0x06, 0, 1, b't', 0, 0, 0], ProtocolError), // [MQTT-2.2.1-3] packet id 0
        (&[0x30, 0x06, 0, 1, b't', 2, 0x01, 0x02], ProtocolError), // payload format 2
        (&[0x30, 0x08, 0, 1, b't', 4, 0x01, 1, 0x01, 1], ProtocolError), // property twice
        (&[0x30, 0x06, 0, 1, b't', 2, 0x11, 0], Malformed),  // truncated property value
        (&[0x30, 0x06, 0, 1, b't', 2, 0x04, 1], Malformed),  // unknown property
        (&[0x30, 0x06, 0, 1, b't', 2, 0x17, 0], ProtocolError), // not allowed on PUBLISH
        (&[0x20, 0x03, 0, 0, 0], ProtocolError),             // CONNACK from a client
        (&[0x82, 0x03, 0, 1, 0], Malformed),                 // [MQTT-3.8.3-3] no filter
        (&[0x82, 0x06, 0, 1, 0, 0, 1, b'a'], Malformed),     // truncated options
        (&[0x80, 0x07, 0, 1, 0, 0, 1, b'a', 0], Malformed),  // [MQTT-3.8.1-1] flags
        (&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30], Malformed), // retain handling 3
        (&[0x30, 0x06, 0, 2, b'a', 0, 0, b'x'], Malformed),  // U+0000 [MQTT-1.5.4-2]
        (&[0xE1, 0x00], Malformed),                          // [MQTT-3.14.1-1]
        (&[0xF0, 0x00], ProtocolError),                      // AUTH without a method
        (&[0x00, 0x00], ProtocolError),                      // reserved type
    ];
    for (bytes, kind) in cases {
        let e = decode_one(V5, Role::Server, bytes).unwrap_err();
        assert_eq!(e.kind, *kind, "{bytes:02x?}: {e}");
    }
}

#[test]
fn remaining_length_is_checked_before_buffering() {
    let mut d = Decoder::new(Role::Server, 1024);
    d.version = Some(ProtocolVersion::V5);
    // Announces 2 MB; only the header has arrived.
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PacketTooLarge);
    assert!(buf.capacity() < 4096, "no allocation for the announced size");
}

#[test]
fn first_packet_must_be_connect_mqtt_3_1_0_1() {
    let mut d = Decoder::new(Role::Server, 1024);
    let mut buf = BytesMut::from(&[0xC0u8, 0x00][..]);
    assert_eq!(d.decode(&mut buf).unwrap_err().kind, ErrorKind::CloseSilently);
}

#[test]
fn unsupported_protocol_level_mqtt_3_1_2_2() {
    let mut d = Decoder::new(Role::Server, 1024);
    let mut buf = BytesMut::from(&[0x10u8, 0x0D, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 10, 0, 1, b'p'][..]);
    assert_eq!(d.decode(&mut buf).unwrap_err().kind, ErrorKind::UnacceptableProtocolVersion);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), v5 in any::<bool>()) {
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        for role in [Role::Server, Role::Client] {
            let mut d = Decoder::new(role, 1 << 20);
            d.version = Some(version);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
            let mut fresh = Decoder::new(Role::Server, 1 << 20);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = fresh.decode(&mut buf);
        }
    }

    #[test]
    fn byte_at_a_time_decodes_like_all_at_once(topic in "[a-z/]{1,20}", payload in proptest::collection::vec(any::<u8>(), 0..200), id in 1u16..) {
        let packet = Packet::Publish(Publish {
            dup: false, qos: QoS::AtLeastOnce, retain: false, topic, packet_id: id,
            properties: props_v5(), payload: Bytes::from(payload),
        });
        let mut wire = BytesMut::new();
        packet.encode(ProtocolVersion::V5, &mut wire);
        let mut d = Decoder::new(Role::Server, u32::MAX);
        d.version = Some(ProtocolVersion::V5);
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = d.decode(&mut buf).unwrap();
            if i + 1 < wire.len() { prop_assert!(r.is_none()); } else { got = r; }
        }
        prop_assert_eq!(got, Some(packet));
    }

    /// `mqttbytes` is an independent encoder: what it writes, we read as the same packet.
    #[test]
    fn mqttbytes_v4_publish_decodes_identically(topic in "[a-z0-9/]{1,30}", payload in proptest::collection::vec(any::<u8>(), 0..300), qos in 0u8..3, retain in any::<bool>(), pkid in 1u16..) {
        let mut theirs = mqttbytes::v4::Publish::new(topic.clone(), mqttbytes::qos(qos).unwrap(), payload.clone());
        theirs.retain = retain;
        if qos > 0 { theirs.pkid = pkid; }
        let mut wire = BytesMut::new();
        theirs.write(&mut wire).unwrap();
        let ours = decode_one(ProtocolVersion::V3_1_1, Role::Server, &wire).unwrap().unwrap();
        let Packet::Publish(p) = ours else { panic!("not a PUBLISH") };
        prop_assert_eq!(p.topic, topic);
        prop_assert_eq!(p.qos as u8, qos);
        prop_assert_eq!(p.retain, retain);
        prop_assert_eq!(p.packet_id, if qos > 0 { pkid } else { 0 });
        prop_assert_eq!(&p.payload[..], &payload[..]);
    }

    #[test]
    fn mqttbytes_v5_publish_decodes_identically(topic in "[a-z0-9/]{1,30}", payload in proptest::collection::vec(any::<u8>(), 0..300), expiry in any::<u32>(), key in "[a-z]{1,8}", value in "[a-z ]{0,12}", ct in proptest::option::of("[a-z/]{1,12}")) {
        let mut theirs = mqttbytes::v5::Publish::new(topic.clone(), mqttbytes::QoS::AtLeastOnce, payload.clone());
        theirs.pkid = 42;
        theirs.properties = Some(mqttbytes::v5::PublishProperties {
            payload_format_indicator: None,
            message_expiry_interval: Some(expiry),
            topic_alias: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![(key.clone(), value.clone())],
            subscription_identifiers: vec![],
            content_type: ct.clone(),
        });
        let mut wire = BytesMut::new();
        theirs.write(&mut wire).unwrap();
        let Packet::Publish(p) = decode_one(ProtocolVersion::V5, Role::Server, &wire).unwrap().unwrap() else { panic!() };
        prop_assert_eq!(p.topic, topic);
        prop_assert_eq!(p.packet_id, 42);
        prop_assert_eq!(p.properties.message_expiry_interval, Some(expiry));
        prop_assert_eq!(p.properties.user_properties, vec![(key, value)]);
        prop_assert_eq!(p.properties.content_type, ct);
        prop_assert_eq!(&p.payload[..], &payload[..]);
    }

    #[test]
    fn mqttbytes_v5_subscribe_decodes_identically(filter in "[a-z]{1,8}(/[a-z+]{1,8}){0,3}(/#)?", qos in 0u8..3, nolocal in any::<bool>(), rap in any::<bool>(), id in 1usize..268_435_455) {
        let mut f = mqttbytes::v5::SubscribeFilter::new(filter.clone(), mqttbytes::qos(qos).unwrap());
        f.nolocal = nolocal;
        f.preserve_retain = rap;
        let mut theirs = mqttbytes::v5::Subscribe::new_many([f]);
        theirs.pkid = 5;
        theirs.properties = Some(mqttbytes::v5::SubscribeProperties { id: Some(id), user_properties: vec![] });
        let mut wire = BytesMut::new();
        theirs.write(&mut wire).unwrap();
        let Packet::Subscribe(s) = decode_one(ProtocolVersion::V5, Role::Server, &wire).unwrap().unwrap() else { panic!() };
        prop_assert_eq!(s.packet_id, 5);
        prop_assert_eq!(s.properties.subscription_identifiers, vec![id as u32]);
        prop_assert_eq!(s.filters.len(), 1);
        prop_assert_eq!(&s.filters[0].0, &filter);
        prop_assert_eq!(s.filters[0].1.qos as u8, qos);
        prop_assert_eq!(s.filters[0].1.no_local, nolocal);
        prop_assert_eq!(s.filters[0].1.retain_as_published, rap);
    }

    #[test]
    fn mqttbytes_v4_connect_decodes_identically(id in "[a-zA-Z0-9-]{1,23}", ka in any::<u16>(), clean in any::<bool>(), user in "[a-z]{1,10}", pass in "[a-z0-9]{1,10}") {
        let mut theirs = mqttbytes::v4::Connect::new(id.clone());
        theirs.keep_alive = ka;
        theirs.clean_session = clean;
        theirs.login = Some(mqttbytes::v4::Login::new(user.clone(), pass.clone()));
        let mut wire = BytesMut::new();
        theirs.write(&mut wire).unwrap();
        let mut d = Decoder::new(Role::Server, u32::MAX);
        let Packet::Connect(c) = d.decode(&mut wire).unwrap().unwrap() else { panic!() };
        prop_assert_eq!(c.protocol, ProtocolVersion::V3_1_1);
        prop_assert_eq!(c.client_id, id);
        prop_assert_eq!(c.keep_alive, ka);
        prop_assert_eq!(c.clean_start, clean);
        prop_assert_eq!(c.username, Some(user));
        prop_assert_eq!(c.password.as_deref(), Some(pass.as_bytes()));
    }
}

/// A whole client session, CONNECT first, as the server decodes it: every packet type a client
/// sends, with properties, at the given version.
fn whole_session(version: ProtocolVersion, payload: Vec<u8>, topic: String) -> Vec<Packet> {
    let v5 = version.is_v5();
    let props = if v5 { props_v5() } else { Properties::default() };
    let mut connect = Connect {
        protocol: version,
        clean_start: false,
        keep_alive: 30,
        properties: Properties::default(),
        client_id: "chunked".into(),
        will: Some(Will {
            topic: "wills/chunked".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        }),
        username: Some("reader".into()),
        password: Some(Bytes::from_static(b"secret")),
    };
    if v5 {
        connect.properties.session_expiry_interval = Some(3600);
        connect.properties.user_properties = vec![("app".into(), "news".into())];
    }
    let publish = |qos, packet_id, payload: Vec<u8>| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.clone(),
            packet_id,
            properties: props.clone(),
            payload: Bytes::from(payload),
        })
    };
    let ack = |id| PubResponse::new(id, ReasonCode::SUCCESS);
    vec![
        Packet::Connect(Box::new(connect)),
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![("news/#".into(), SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() })],
        }),
        publish(QoS::AtMostOnce, 0, payload.clone()),
        publish(QoS::AtLeastOnce, 2, payload.clone()),
        publish(QoS::ExactlyOnce, 3, payload),
        Packet::PubRel(PubResponse { packet_id: 3, reason: ReasonCode::SUCCESS, properties: Properties::default() }),
        Packet::PubAck(ack(4)),
        Packet::PubRec(ack(5)),
        Packet::PubComp(ack(6)),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 7,
            properties: Properties::default(),
            filters: vec!["news/#".into()],
        }),
        Packet::PingReq,
        Packet::Disconnect(Disconnect { reason: ReasonCode::SUCCESS, properties: Properties::default() }),
    ]
}

/// Feeds `wire` to a fresh server decoder in the given pieces, decoding after each.
fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Vec<Packet> {
    let mut d = Decoder::new(Role::Server, 1 << 20);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
        let cut = cut.clamp(at, wire.len());
        buf.extend_from_slice(&wire[at..cut]);
        at = cut;
        while let Some(p) = d.decode(&mut buf).expect("a valid session decodes") {
            out.push(p);
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    out
}

proptest! {
    /// Decoding does not depend on how the stream is split: a whole session one byte at a time,
    /// at random cuts, and in one piece gives the same packets.
    #[test]
    fn a_session_decodes_the_same_however_the_stream_is_split(
        v5 in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        topic in "news/[a-z]{1,12}(/[a-z]{1,8}){0,3}",
        mut cuts in proptest::collection::vec(0usize..4000, 0..40),
    ) {
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        let session = whole_session(version, payload, topic);
        let mut wire = BytesMut::new();
        for p in &session {
            p.encode(version, &mut wire);
        }
        cuts.sort_unstable();
        let whole = decode_in_pieces(&wire, &[]);
        prop_assert_eq!(&whole, &session);
        let every_byte: Vec<usize> = (1..wire.len()).collect();
        prop_assert_eq!(&decode_in_pieces(&wire, &every_byte), &session);
        prop_assert_eq!(&decode_in_pieces(&wire, &cuts), &session);
    }
}

#[test]
fn a_first_packet_above_the_connect_bound_is_refused_from_its_header() {
    let mut d = Decoder::new(Role::Server, 1024);
    // Five bytes of fixed header announce 268,435,455 bytes: refused before any body arrives,
    // and nothing is reserved for it.
    let mut buf = BytesMut::from(&[0x10u8, 0xff, 0xff, 0xff, 0x7f][..]);
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PacketTooLarge);
    assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());
    // An allowed length of 2 MB that has not all arrived reserves at most one read ahead.
    let mut d = Decoder::new(Role::Server, u32::MAX);
    let mut buf = BytesMut::from(&[0x10u8, 0xff, 0xff, 0x7f][..]);
    assert!(d.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= 4 + RESERVE_AHEAD, "capacity {}", buf.capacity());
    // After CONNECT the server's larger `max_packet_size` applies.
    let mut d = Decoder::new(Role::Server, 64);
    let mut wire = BytesMut::new();
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: "c".into(),
        will: None,
        username: None,
        password: None,
    }))
    .encode(ProtocolVersion::V3_1_1, &mut wire);
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: 0,
        properties: Properties::default(),
        payload: Bytes::from(vec![0u8; 1000]),
    })
    .encode(ProtocolVersion::V3_1_1, &mut wire);
    assert!(matches!(d.decode(&mut wire), Ok(Some(Packet::Connect(_)))));
    // The connection raises the bound once the CONNECT is accepted.
    d.max_packet_size = 4096;
    assert!(matches!(d.decode(&mut wire), Ok(Some(Packet::Publish(_)))));
}
