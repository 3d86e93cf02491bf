//! Decoder and encoder micro-benchmarks: a 256-byte news PUBLISH at QoS 0 and 1, 3.1.1 and 5.0.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use herald::codec::{Decoder, Packet, Properties, ProtocolVersion, Publish, QoS, Role};

fn story(qos: QoS, v5: bool) -> Packet {
    let mut properties = Properties::default();
    if v5 {
        properties.message_expiry_interval = Some(3600);
        properties.user_properties.push(("story-id".into(), "2026-11-23-0042".into()));
    }
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: "news/tech/ai".into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { 42 },
        properties,
        payload: Bytes::from(vec![b'n'; 256]),
    })
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish");
    g.throughput(Throughput::Elements(1));
    for (name, version, qos) in [
        ("v311_qos0", ProtocolVersion::V3_1_1, QoS::AtMostOnce),
        ("v311_qos1", ProtocolVersion::V3_1_1, QoS::AtLeastOnce),
        ("v5_qos1", ProtocolVersion::V5, QoS::AtLeastOnce),
    ] {
        let packet = story(qos, version.is_v5());
        let mut wire = BytesMut::new();
        packet.encode(version, &mut wire);
        let wire = wire.freeze();
        g.bench_function(format!("decode_{name}"), |b| {
            let mut d = Decoder::new(Role::Server, u32::MAX);
            d.version = Some(version);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                black_box(d.decode(&mut buf).unwrap().unwrap());
            })
        });
        g.bench_function(format!("encode_{name}"), |b| {
            let mut out = BytesMut::with_capacity(1024);
            b.iter(|| {
                out.clear();
                black_box(&packet).encode(version, &mut out);
                black_box(out.len());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
