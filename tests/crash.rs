//! Crashes [issue 4]: the `herald` binary killed with SIGKILL and started again on the same store.
//! What a client was promised (a PUBACK, a SUBACK) must still hold afterwards.
//!
//! `crash_loop_loses_no_acknowledged_message` runs HERALD_CRASH_CYCLES cycles (default 5, so
//! that CI stays quick); docs/storage.md gives the figures of a longer run.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::*;
use herald::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

struct Herald {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Herald {
    /// Starts the binary on the store in `dir`, on an ephemeral port read from its log.
    fn start(dir: &Path, durability: &str) -> Herald {
        let config = dir.join("herald.toml");
        std::fs::write(
            &config,
            format!(
                "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {:?}\ndurability = \"{durability}\"\n",
                dir.join("data").display().to_string()
            ),
        )
        .unwrap();
        let (child, ports, _log) = spawn_herald(&config, 1);
        let port = ports[0];
        Herald { child, addr: ([127, 0, 0, 1], port).into() }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn subscriber(client_id: &str) -> herald::codec::Connect {
    connect_packet(V311, client_id, false)
}

/// The simple case, with SIGKILL: a persistent session's queue, a retained message and a QoS 2
/// message in flight all come back after the broker is killed and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_retained_and_qos2_in_flight_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let h = Herald::start(dir.path(), "sync");
    let (mut phone, _) = RawClient::connect(h.addr, subscriber("phone")).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut phone).await;
    drop(phone);
    let (mut tablet, _) = RawClient::connect(h.addr, subscriber("tablet")).await;
    tablet.send(&subscribe(1, "news/#", QoS::ExactlyOnce)).await;
    expect_suback(&mut tablet).await;

    // QoS 2 from the editor, so the tablet's subscription gets QoS 2 and the phone's QoS 1.
    let (mut editor, _) = RawClient::connect(h.addr, connect_packet(V311, "editor", true)).await;
    for i in 1..=50u16 {
        let mut m = publish_msg("news/tech", format!("story {i}").as_bytes(), QoS::ExactlyOnce, i);
        if i == 1 {
            m.topic = "news/breaking".into();
            m.payload = bytes::Bytes::from_static(b"Quake");
            m.retain = true;
        }
        editor.send(&Packet::Publish(m)).await;
        assert!(matches!(editor.recv().await, Some(Packet::PubRec(_))));
        editor.send(&Packet::PubRel(PubResponse::new(i, ReasonCode::SUCCESS))).await;
        assert!(matches!(editor.recv().await, Some(Packet::PubComp(_))));
    }
    // The tablet (QoS 2) receives the first story and does not answer it before the crash.
    let first = expect_publish(&mut tablet).await;
    assert_eq!(first.qos, QoS::ExactlyOnce);
    // Its packet identifier went to the store's batch before the PUBLISH went out. One more
    // story, acknowledged only once its own (later) write is on disk, proves that batch is
    // written too: no sleep that hopes for it.
    editor.send(&publish("news/tech", b"story 51", QoS::AtLeastOnce, 51)).await;
    assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
    h.kill9();
    drop((tablet, editor));

    let h = Herald::start(dir.path(), "sync");
    let (mut phone, ack) = RawClient::connect(h.addr, subscriber("phone")).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..51 {
        let p = expect_publish(&mut phone).await;
        phone.send(&Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let expected: Vec<String> =
        std::iter::once("Quake".to_string()).chain((2..=51).map(|i| format!("story {i}"))).collect();
    assert_eq!(got, expected);

    let (mut tablet, ack) = RawClient::connect(h.addr, subscriber("tablet")).await;
    assert!(ack.session_present);
    let again = expect_publish(&mut tablet).await;
    assert!(again.dup, "[MQTT-4.4.0-1] resent with DUP");
    assert_eq!((again.packet_id, again.payload.clone()), (first.packet_id, first.payload.clone()));

    let (mut reader, _) = RawClient::connect(h.addr, connect_packet(V311, "reader", true)).await;
    reader.send(&subscribe(1, "news/breaking", QoS::AtMostOnce)).await;
    expect_suback(&mut reader).await;
    let r = expect_publish(&mut reader).await;
    assert!(r.retain && &r.payload[..] == b"Quake");
}

/// Publishes numbered QoS 1 stories with up to `window` in flight until the connection dies;
/// returns the numbers whose PUBACK arrived.
async fn publish_until_killed(addr: std::net::SocketAddr, first: u32, window: usize) -> Vec<u32> {
    let Ok(p) = tokio::time::timeout(WAIT, RawClient::connect(addr, connect_packet(V311, "editor", true))).await else {
        return Vec::new();
    };
    let mut p = p.0;
    let mut in_flight: HashMap<u16, u32> = HashMap::new();
    let mut acked = Vec::new();
    let mut next = first;
    let mut packet_id = 0u16;
    loop {
        while in_flight.len() < window {
            packet_id = packet_id % 60_000 + 1;
            if !p.try_send(&publish("news/live", &next.to_be_bytes(), QoS::AtLeastOnce, packet_id)).await {
                return acked;
            }
            in_flight.insert(packet_id, next);
            next += 1;
        }
        match p.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::PubAck(a))) => {
                if let Some(n) = in_flight.remove(&a.packet_id) {
                    acked.push(n);
                }
            }
            _ => return acked,
        }
    }
}

/// Receives stories as the persistent session "phone", acknowledging each, until the
/// connection dies or nothing comes for `quiet`.
async fn receive_until_closed(addr: std::net::SocketAddr, quiet: Duration) -> Vec<u32> {
    let Ok((mut c, _)) = tokio::time::timeout(WAIT, RawClient::connect(addr, subscriber("phone"))).await else {
        return Vec::new();
    };
    let mut got = Vec::new();
    loop {
        match c.recv_within(quiet).await {
            Ok(Some(Packet::Publish(p))) => {
                got.push(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
                if !c.try_send(&Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await {
                    return got;
                }
            }
            Ok(Some(_)) => {}
            _ => return got,
        }
    }
}

/// [issue 4] SIGKILL during QoS 1 publishing to a persistent subscriber, again and again: every
/// message whose PUBACK the publisher received is delivered after the restarts. Duplicates are
/// allowed (QoS 1) and counted; a loss fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_no_acknowledged_message() {
    let cycles: u32 = std::env::var("HERALD_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let durability = std::env::var("HERALD_CRASH_DURABILITY").unwrap_or_else(|_| "sync".into());
    let dir = tempfile::tempdir().unwrap();
    {
        let h = Herald::start(dir.path(), &durability);
        let (mut phone, _) = RawClient::connect(h.addr, subscriber("phone")).await;
        phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
        expect_suback(&mut phone).await;
    }
    let mut acked: Vec<u32> = Vec::new();
    let mut received: Vec<u32> = Vec::new();
    let mut next = 0u32;
    for cycle in 0..cycles {
        let h = Herald::start(dir.path(), &durability);
        let addr = h.addr;
        let receiver = tokio::spawn(receive_until_closed(addr, Duration::from_secs(30)));
        let publisher = tokio::spawn(publish_until_killed(addr, next, 50));
        // Vary the moment of the kill from cycle to cycle.
        let run_ms = 150 + (u64::from(cycle) * 137) % 500;
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        h.kill9();
        let a = publisher.await.unwrap();
        received.extend(receiver.await.unwrap());
        next = a.iter().max().map_or(next, |m| m + 1).max(next + 100_000);
        acked.extend(a);
    }
    let h = Herald::start(dir.path(), &durability);
    received.extend(receive_until_closed(h.addr, Duration::from_secs(2)).await);
    drop(h);

    let got: HashSet<u32> = received.iter().copied().collect();
    let lost: Vec<u32> = acked.iter().copied().filter(|n| !got.contains(n)).collect();
    let duplicates = received.len() - got.len();
    println!(
        "crash loop ({durability}): {cycles} cycles, {} acknowledged, {} received ({} distinct, {duplicates} duplicates), {} lost",
        acked.len(),
        received.len(),
        got.len(),
        lost.len()
    );
    assert!(acked.len() > cycles as usize * 10, "the publisher got too few acknowledgements to prove anything");
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {} messages, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}
