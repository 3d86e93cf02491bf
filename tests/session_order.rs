//! Order across a session's offline spells [MQTT-4.6.0-6] [MQTT-4.6.0-5]: a phone with a
//! persistent session that drops and reconnects again and again, while a newsroom system
//! publishes a numbered story stream at QoS 1, receives every story, and every story it had not
//! seen before comes after all those it had. Before issue 12, a story routed in the moment the
//! session went offline but before it was parked went to the mailbox while later ones went to
//! the parked queue ahead of it, and the phone got them out of order.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use herald::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

/// Publishes numbered QoS 1 stories as fast as the broker reads them (PUBACKs are read by a
/// task of their own), until told to stop; returns the last number published.
async fn newsroom(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (c, _) = RawClient::connect(addr, connect_packet(ProtocolVersion::V3_1_1, "newsroom", true)).await;
    let (mut reader, mut writer) = c.stream.into_split();
    let acks = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let mut seq = 0u64;
    let mut out = bytes::BytesMut::new();
    // Unpaced: the window this test looks for is microseconds wide, so stories must be routed
    // at every moment; bounded, so that the last visit reads a bounded backlog.
    while !stop.load(Ordering::Relaxed) && seq < 600_000 {
        for _ in 0..16 {
            seq += 1;
            let packet_id = (seq % 65_535 + 1) as u16;
            publish("news/ticker", seq.to_string().as_bytes(), QoS::AtLeastOnce, packet_id)
                .encode(ProtocolVersion::V3_1_1, &mut out);
        }
        writer.write_all(&out).await.expect("the newsroom writes");
        out.clear();
    }
    // Every story is acknowledged before the phone's last visit counts them: a QoS 1 story
    // acknowledged is a promise [MQTT-4.3.2].
    writer.shutdown().await.unwrap();
    let _ = tokio::time::timeout(WAIT, acks).await;
    seq
}

/// What the phone has seen: every story number, the newest, and each new story that arrived
/// after a later one (with that later one).
#[derive(Default)]
struct Tally {
    seen: HashSet<u64>,
    newest: u64,
    out_of_order: Vec<(u64, u64)>,
}

impl Tally {
    /// Counts a story and returns its PUBACK.
    fn take(&mut self, p: herald::codec::Publish) -> Packet {
        let seq: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
        if self.seen.insert(seq) {
            if seq < self.newest {
                self.out_of_order.push((seq, self.newest));
            }
            self.newest = self.newest.max(seq);
        }
        Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_6_0_6_stories_stay_in_order_across_many_reconnects() {
    // Room for everything published while the phone is away: nothing may be dropped either.
    let b = start_with("max_queued_messages = 1000000");
    let phone = |clean| connect_packet(ProtocolVersion::V3_1_1, "phone-order", clean);
    let (c, _) = RawClient::connect(b.addr, phone(true)).await;
    drop(c);
    let (mut sub, _) = RawClient::connect(b.addr, phone(false)).await;
    sub.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut sub).await;
    drop(sub);

    let stop = Arc::new(AtomicBool::new(false));
    let newsroom = tokio::spawn(newsroom(b.addr, stop.clone()));

    let mut tally = Tally::default();
    // Many short visits: each reads a few stories and goes away without a DISCONNECT, while the
    // stream goes on.
    let cycles = 300;
    for cycle in 0..cycles {
        let (mut c, ack) = RawClient::connect(b.addr, phone(false)).await;
        assert!(ack.session_present, "cycle {cycle}: the session was kept");
        let until = Instant::now() + Duration::from_millis(5 + (cycle % 7) as u64);
        while Instant::now() < until {
            match c.recv_within(Duration::from_millis(2)).await {
                Ok(Some(Packet::Publish(p))) => {
                    let ack = tally.take(p);
                    c.send(&ack).await;
                }
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) => break,
                Err(()) => {}
            }
        }
        drop(c);
    }
    stop.store(true, Ordering::Relaxed);
    let last = newsroom.await.unwrap();
    assert!(last > 1000, "the stream was too slow to test anything: {last} stories");

    // The last visit stays until it has everything.
    let (mut c, _) = RawClient::connect(b.addr, phone(false)).await;
    let deadline = Instant::now() + PATIENCE * 3;
    while tally.seen.len() < last as usize {
        assert!(Instant::now() < deadline, "only {} of {last} stories arrived", tally.seen.len());
        match c.recv_within(WAIT).await {
            Ok(Some(Packet::Publish(p))) => {
                let ack = tally.take(p);
                c.send(&ack).await;
            }
            other => panic!("expected the rest of the stories, got {other:?} with {} of {last}", tally.seen.len()),
        }
    }
    assert!(
        tally.out_of_order.is_empty(),
        "{} stories came after a later one (first: {:?}) [MQTT-4.6.0-6]",
        tally.out_of_order.len(),
        tally.out_of_order.first()
    );
    println!("{cycles} reconnects, {last} stories, all in order");
}
