//! Cluster mode under faults (issue 25, docs/cluster.md "Failures, as measured"): three
//! clustered NATS servers and three Herald nodes started by each test and ended by their guards,
//! a steady QoS 1 stream from a publisher on one node, and readers that count what they get:
//! nothing acknowledged may be missing, and duplicates are measured and bounded.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use herald::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

/// A publisher on `node` sending `news/stream` 1, 2, 3... at QoS 1, about `per_second`, each
/// after the last one's PUBACK; the numbers acknowledged, until `stop`.
fn steady_publisher(
    node: &Node,
    per_second: u32,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<u32>>>, tokio::task::JoinHandle<()>) {
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let (addr, acked) = (node.addr(), acknowledged.clone());
    let task = tokio::spawn(async move {
        let (mut publisher, _) = RawClient::connect(addr, connect_packet(ProtocolVersion::V5, "editor", true)).await;
        let gap = Duration::from_secs(1) / per_second;
        let mut n = 0u32;
        while !stop.load(Ordering::Acquire) {
            n += 1;
            let packet_id = (n % 60_000 + 1) as u16;
            publisher.send(&publish("news/stream", n.to_string().as_bytes(), QoS::AtLeastOnce, packet_id)).await;
            match publisher.recv_within(PATIENCE).await {
                Ok(Some(Packet::PubAck(a))) if a.reason == ReasonCode::SUCCESS => acked.lock().unwrap().push(n),
                other => panic!("message {n}: {other:?}"),
            }
            tokio::time::sleep(gap).await;
        }
    });
    (acknowledged, task)
}

/// How a reader's connection ended, if it did.
#[derive(Debug, PartialEq)]
enum Ended {
    Open,
    Disconnect(ReasonCode),
    Closed,
}

/// Reads for `wait`, acknowledging every QoS 1 story and recording its number.
async fn read_for(reader: &mut RawClient, wait: Duration, got: &mut Vec<u32>) -> Ended {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ended::Open;
        }
        match reader.recv_within(left).await {
            Ok(Some(Packet::Publish(p))) => {
                if p.qos == QoS::AtLeastOnce {
                    reader.send(&Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
                }
                got.extend(std::str::from_utf8(&p.payload).ok().and_then(|s| s.parse::<u32>().ok()));
            }
            Ok(Some(Packet::Disconnect(d))) => return Ended::Disconnect(d.reason),
            Ok(Some(_)) => {}
            Ok(None) => return Ended::Closed,
            Err(()) => return Ended::Open,
        }
    }
}

/// Duplicates in `got`, and the acknowledged numbers missing from it.
fn tally(acknowledged: &[u32], got: &[u32]) -> (usize, Vec<u32>) {
    let set: std::collections::HashSet<u32> = got.iter().copied().collect();
    let missing = acknowledged.iter().copied().filter(|n| !set.contains(n)).collect();
    (got.len() - set.len(), missing)
}

/// Stops a `steady_publisher` and reads on until `reader` has every number it acknowledged;
/// returns them, and the rate they went at (a PUBACK waits for JetStream: below the asked one).
async fn finish_stream(
    stop: Arc<AtomicBool>,
    publisher: tokio::task::JoinHandle<()>,
    acknowledged: &Mutex<Vec<u32>>,
    publishing: Instant,
    reader: &mut RawClient,
    got: &mut Vec<u32>,
) -> (Vec<u32>, f64) {
    stop.store(true, Ordering::Release);
    publisher.await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let per_second = acknowledged.len() as f64 / publishing.elapsed().as_secs_f64();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, missing) = tally(&acknowledged, got);
        if missing.is_empty() {
            return (acknowledged, per_second);
        }
        assert!(Instant::now() < deadline, "acknowledged and never delivered: {missing:?}");
        read_for(reader, Duration::from_millis(200), got).await;
    }
}

fn signal(node: &Node, sig: &str) {
    assert!(Command::new("kill").args([sig, &node.child.id().to_string()]).status().unwrap().success());
}

/// [issue 25, item 3] A node frozen (SIGSTOP, as a paused VM or a stalled host) past
/// `dead_after_secs` while a persistent reader is connected to it: the other nodes take its
/// session over; when the frozen node resumes it writes nothing more to the reader but
/// DISCONNECT 0x8E [MQTT-3.1.4-3] (its lease lapsed, `cluster::fence`), learns from the others
/// that the session moved, and ends its copy; the reader resumes on a third node with every
/// acknowledged story, duplicates within about a second of traffic, and one holder afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_writes_nothing_more_for_a_session_taken_over_meanwhile() {
    let nats = NatsCluster::start();
    let fast = "dead_after_secs = 3\n[http]\nbind = \"127.0.0.1:0\"\n";
    let a = Node::start_with("herald-a", &nats, fast);
    let b = Node::start_with("herald-b", &nats, fast);
    let c = Node::start_with("herald-c", &nats, fast);
    wait_until_every_node_hears_the_others(&[&a, &b, &c]).await;
    let (mut reader, _) = RawClient::connect(a.addr(), persistent("reader", true)).await;
    reader.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut reader).await;
    wait_for_holder(&c, "reader", "herald-a").await;
    let stop = Arc::new(AtomicBool::new(false));
    const RATE: u32 = 50;
    let (acknowledged, publisher) = steady_publisher(&b, RATE, stop.clone());
    let publishing = Instant::now();
    let mut got = Vec::new();
    assert_eq!(read_for(&mut reader, Duration::from_secs(2), &mut got).await, Ended::Open);
    assert!(!got.is_empty(), "the reader gets the stream on node a");

    signal(&a, "-STOP");
    let frozen_at = Instant::now();
    // Whatever node a wrote before it stopped is read now; nothing comes while it is stopped.
    let _ = read_for(&mut reader, Duration::from_millis(500), &mut got).await;
    let adopted = |n: &Node| metric(n, "herald_cluster_sessions_adopted_total");
    wait_until("node b or c takes the reader's session over", || adopted(&b) + adopted(&c) >= 1).await;
    let taken_after = frozen_at.elapsed();
    // A little more of the stream goes to the new holder while node a is still stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_resume = got.len();
    signal(&a, "-CONT");
    let resumed_at = Instant::now();
    let mut after_resume = Vec::new();
    let ended = read_for(&mut reader, PATIENCE, &mut after_resume).await;
    assert_eq!(ended, Ended::Disconnect(ReasonCode::SESSION_TAKEN_OVER), "node a closes the reader with 0x8E");
    assert!(
        after_resume.is_empty(),
        "node a wrote {} stories after it resumed (its lease lapsed): {:?}",
        after_resume.len(),
        &after_resume[..after_resume.len().min(20)]
    );
    eprintln!(
        "frozen node: session taken over {taken_after:?} after the freeze; DISCONNECT 0x8E {:?} after the resume, \
         {before_resume} stories read before it",
        resumed_at.elapsed()
    );
    wait_until("node a lets go of the session taken over", || metric(&a, "herald_cluster_fenced_sessions_total") == 1)
        .await;
    assert_eq!(metric(&a, "herald_cluster_fenced_total"), 1);

    // The reader comes back on node c and gets everything acknowledged.
    let (mut reader, ack) = RawClient::connect(c.addr(), persistent("reader", false)).await;
    assert!(ack.session_present, "[MQTT-3.2.2-3] the session lives on");
    assert_eq!(read_for(&mut reader, Duration::from_secs(2), &mut got).await, Ended::Open);
    let (acknowledged, per_second) =
        finish_stream(stop, publisher, &acknowledged, publishing, &mut reader, &mut got).await;
    let (duplicates, _) = tally(&acknowledged, &got);
    eprintln!(
        "frozen node: {} acknowledged ({per_second:.0}/s), {} received, {duplicates} duplicates",
        acknowledged.len(),
        got.len()
    );
    assert!(duplicates as f64 <= per_second, "duplicates at most one second of traffic: {duplicates}");
    // One holder: every node's lookup names node c, node a's included (node a holds no copy).
    wait_until("every node names node c as the reader's holder", || {
        [&a, &b, &c].iter().all(|n| {
            http_json(http_addr(n), "GET", "/api/v1/clients/reader", "").1["node"].as_str() == Some("herald-c")
        })
    })
    .await;
}

/// The nodes' addresses as they are now, and the one being restarted (clients go elsewhere).
#[derive(Clone, Default)]
struct Roster {
    addrs: Arc<Mutex<Vec<std::net::SocketAddr>>>,
    down: Arc<Mutex<Option<usize>>>,
}

impl Roster {
    /// The next node after `after` that is not being restarted.
    fn next(&self, after: usize) -> (usize, std::net::SocketAddr) {
        let addrs = self.addrs.lock().unwrap();
        let down = *self.down.lock().unwrap();
        let i = (1..=addrs.len()).map(|k| (after + k) % addrs.len()).find(|i| Some(*i) != down).unwrap();
        (i, addrs[i])
    }

    /// Connects `connect` to the first node after `after` that takes it, trying for `PATIENCE`.
    async fn connect(&self, after: usize, connect: herald::codec::Connect) -> (usize, RawClient, bool) {
        let deadline = Instant::now() + PATIENCE;
        let mut at = after;
        loop {
            let (i, addr) = self.next(at);
            if let Some((client, ack)) = RawClient::try_connect(addr, connect.clone()).await {
                return (i, client, ack.session_present);
            }
            assert!(Instant::now() < deadline, "{}: no node took the connection", connect.client_id);
            at = i;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A persistent QoS 1 reader of `news/#` that starts on node `start` and, whenever its node
/// closes the connection, resumes its session on the next node; what it received, and how often
/// it moved, once `stop` is set and it has read for a last second.
/// Returns the numbers received and the longest time without a new one (the pause a reader
/// sees, to 200 ms).
async fn roaming_reader(id: String, start: usize, roster: Roster, stop: Arc<AtomicBool>) -> (Vec<u32>, Duration) {
    let (mut at, mut reader, _) = roster.connect(start + 2, persistent(&id, true)).await;
    assert_eq!(at, start);
    reader.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    let mut got = Vec::new();
    let (mut last_new, mut longest) = (None::<Instant>, Duration::ZERO);
    loop {
        let before = got.len();
        let ended = read_for(&mut reader, Duration::from_millis(200), &mut got).await;
        if got.len() > before {
            if let Some(last) = last_new {
                longest = longest.max(last.elapsed());
            }
            last_new = Some(Instant::now());
        }
        match ended {
            Ended::Open if stop.load(Ordering::Acquire) => {
                read_for(&mut reader, Duration::from_secs(1), &mut got).await;
                return (got, longest);
            }
            Ended::Open => {}
            Ended::Disconnect(_) | Ended::Closed => {
                let (i, next, present) = roster.connect(at, persistent(&id, false)).await;
                assert!(present, "{id}: [MQTT-3.2.2-3] the session lives on at node {i}");
                (at, reader) = (i, next);
            }
        }
    }
}

/// A QoS 1 publisher of `news/stream` 1, 2, 3... that moves to the next node when its node
/// closes, sending again the message it had no PUBACK for; the numbers acknowledged.
async fn roaming_publisher(roster: Roster, per_second: u32, stop: Arc<AtomicBool>) -> (Vec<u32>, Vec<u32>) {
    let editor = || connect_packet(ProtocolVersion::V5, "editor", true);
    let (mut at, mut publisher, _) = roster.connect(0, editor()).await;
    let mut acknowledged = Vec::new();
    // Numbers sent again after their node closed the connection before its PUBACK: the node may
    // have taken the first copy (a new clean session cannot tell the second from a new
    // message), so every subscriber may get such a number twice (QoS 1 is at least once).
    let mut resent = Vec::new();
    let mut sent = 0u32;
    let mut n = 1u32;
    while !stop.load(Ordering::Acquire) {
        let packet_id = (n % 60_000 + 1) as u16;
        let message = publish("news/stream", n.to_string().as_bytes(), QoS::AtLeastOnce, packet_id);
        if sent == n && resent.last() != Some(&n) {
            resent.push(n);
        }
        if !publisher.try_send(&message).await {
            (at, publisher, _) = roster.connect(at, editor()).await;
            continue;
        }
        sent = n;
        match publisher.recv_within(PATIENCE).await {
            Ok(Some(Packet::PubAck(a))) if a.reason == ReasonCode::SUCCESS => {
                acknowledged.push(n);
                n += 1;
                tokio::time::sleep(Duration::from_secs(1) / per_second).await;
            }
            // Refused (the cluster busy): the same message again, a little later.
            Ok(Some(Packet::PubAck(_))) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(Some(Packet::Disconnect(_))) | Ok(None) => {
                (at, publisher, _) = roster.connect(at, editor()).await;
            }
            other => panic!("message {n}: {other:?}"),
        }
    }
    (acknowledged, resent)
}

/// The numbers `got` holds more than once.
fn repeated(got: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    let mut twice: Vec<u32> = got.iter().copied().filter(|n| !seen.insert(*n)).collect();
    twice.sort_unstable();
    twice.dedup();
    twice
}

/// [issue 25, items 4 and 6] A rolling restart of all three nodes (SIGTERM, wait for the exit,
/// start again with the same store) under a steady QoS 1 stream: each node hands its persistent
/// sessions whole to the live nodes before it exits (`Broker::leave`), its clients get
/// DISCONNECT 0x8B [MQTT-3.14.2-1] and resume elsewhere with their session [MQTT-3.2.2-3];
/// nothing acknowledged is lost and nothing is delivered twice beyond what was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_and_duplicates_nothing_beyond_in_flight() {
    let nats = NatsCluster::start();
    let config = "dead_after_secs = 6\n[http]\nbind = \"127.0.0.1:0\"\n";
    let mut nodes: Vec<Node> =
        ["herald-a", "herald-b", "herald-c"].iter().map(|n| Node::start_with(n, &nats, config)).collect();
    let all_up = |nodes: &[Node]| nodes.iter().all(|n| metric(n, "herald_cluster_nodes_up") == 3);
    wait_until("every node hears the others", || all_up(&nodes)).await;
    let roster = Roster::default();
    *roster.addrs.lock().unwrap() = nodes.iter().map(Node::addr).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> =
        (0..3).map(|i| tokio::spawn(roaming_reader(format!("reader-{i}"), i, roster.clone(), stop.clone()))).collect();
    for (i, node) in nodes.iter().enumerate() {
        wait_until("each reader is in every node's directory", || {
            let (_, body) = http_json(http_addr(node), "GET", &format!("/api/v1/clients/reader-{i}"), "");
            body["subscriptions"] == 1
        })
        .await;
    }
    // And a parked session on each node, offline throughout: its queue moves with it.
    for (i, node) in nodes.iter().enumerate() {
        let (mut phone, _) = RawClient::connect(node.addr(), persistent(&format!("offline-{i}"), true)).await;
        phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
        expect_suback(&mut phone).await;
        let bye = herald::codec::Disconnect { reason: ReasonCode::SUCCESS, properties: Default::default() };
        phone.send(&Packet::Disconnect(bye)).await;
    }
    const RATE: u32 = 50;
    let publisher = tokio::spawn(roaming_publisher(roster.clone(), RATE, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..nodes.len() {
        *roster.down.lock().unwrap() = Some(i);
        let took = tokio::task::block_in_place(|| nodes[i].terminate());
        let handed: Vec<String> = nodes[i].log_lines("persistent sessions handed to the live nodes");
        eprintln!("node {i} exited {took:?} after SIGTERM: {handed:?}");
        assert!(handed.len() == 1 && handed[0].contains("left=0"), "node {i} handed every session over: {handed:?}");
        tokio::task::block_in_place(|| nodes[i].restart());
        roster.addrs.lock().unwrap()[i] = nodes[i].addr();
        *roster.down.lock().unwrap() = None;
        wait_until("every node hears the others again", || all_up(&nodes)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Release);
    let (acknowledged, resent) = publisher.await.unwrap();
    eprintln!("the publisher sent again after its node closed before the PUBACK: {resent:?}");
    for (n, node) in nodes.iter().enumerate() {
        for l in node.log_lines("session taken over from another node") {
            eprintln!("node {n}: {l}");
        }
    }
    assert!(acknowledged.len() > 100, "the stream went on: {}", acknowledged.len());
    for (i, reader) in readers.into_iter().enumerate() {
        let (got, pause) = match reader.await {
            Ok(r) => r,
            Err(e) => {
                for (n, node) in nodes.iter().enumerate() {
                    for l in node.log_lines(&format!("reader-{i}")) {
                        eprintln!("node {n}: {l}");
                    }
                }
                panic!("reader-{i}: {e}");
            }
        };
        let (duplicates, missing) = tally(&acknowledged, &got);
        eprintln!(
            "reader-{i}: {} acknowledged, {} received, {duplicates} duplicates {:?}, longest pause {pause:?}",
            acknowledged.len(),
            got.len(),
            repeated(&got)
        );
        assert!(missing.is_empty(), "reader-{i}: acknowledged and never delivered: {missing:?}");
        // In flight at a restart: a story sent and not yet acknowledged by the reader when its
        // node let go, and the publisher's message whose PUBACK its node did not send.
        if duplicates > 6 || !missing.is_empty() {
            for (n, node) in nodes.iter().enumerate() {
                for l in node.log_lines(&format!("reader-{i}")) {
                    eprintln!("node {n}: {l}");
                }
            }
        }
        assert!(duplicates <= 6, "reader-{i}: {duplicates} duplicates, more than was in flight");
    }
    // The parked sessions went from node to node whole: everything, once, in order.
    for i in 0..3 {
        let (mut phone, ack) =
            RawClient::connect(nodes[(i + 1) % 3].addr(), persistent(&format!("offline-{i}"), false)).await;
        assert!(ack.session_present);
        let mut got = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        while got.len() < acknowledged.len() && Instant::now() < deadline {
            read_for(&mut phone, Duration::from_millis(200), &mut got).await;
        }
        read_for(&mut phone, Duration::from_millis(500), &mut got).await;
        let (duplicates, missing) = tally(&acknowledged, &got);
        let twice = repeated(&got);
        eprintln!(
            "offline-{i}: {} acknowledged, {} received, {duplicates} duplicates {twice:?}",
            acknowledged.len(),
            got.len()
        );
        let beyond: Vec<u32> = twice.iter().copied().filter(|n| !resent.contains(n)).collect();
        if !beyond.is_empty() || !missing.is_empty() {
            for (n, node) in nodes.iter().enumerate() {
                for l in node.log_lines(&format!("offline-{i}")) {
                    eprintln!("node {n}: {l}");
                }
            }
        }
        assert!(missing.is_empty(), "offline-{i}: acknowledged and never delivered: {missing:?}");
        // Nothing was in flight to a parked session: what it gets twice is only what the
        // publisher itself sent twice (stored twice by the cluster), each at most twice.
        assert!(beyond.is_empty(), "offline-{i}: duplicates the publisher did not send twice: {beyond:?}");
        assert!(duplicates <= twice.len(), "offline-{i}: a story three times: {got:?}");
        // Every story's first delivery is in order [MQTT-4.6.0-2].
        let mut seen = std::collections::HashSet::new();
        let first: Vec<u32> = got.iter().copied().filter(|n| seen.insert(*n)).collect();
        assert!(first.windows(2).all(|w| w[0] < w[1]), "offline-{i}: [MQTT-4.6.0-2] in order: {got:?}");
    }
}

/// [issue 25, items 5 and 6] The NATS server leading the stream killed twice (restarted with its
/// store in between) under a pipelined QoS 1 stream, up to 50 PUBLISHes unacknowledged at once,
/// from a publisher on node a to a reader on node b: every acknowledged message arrives, and in
/// the publisher's order [MQTT-4.6.0-5] (a message appends that failed are sent again from the
/// first failed on, and a node routes each publisher's messages in the order they were
/// published, `cluster::Reorder`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leader_killed_twice_loses_nothing_and_keeps_the_publishers_order() {
    let mut nats = NatsCluster::start();
    let config = "hold_secs = 120\n[http]\nbind = \"127.0.0.1:0\"\n";
    let a = Node::start_with("herald-a", &nats, config);
    let b = Node::start_with("herald-b", &nats, config);
    let (mut reader, _) = RawClient::connect(b.addr(), connect_packet(ProtocolVersion::V5, "reader", true)).await;
    reader.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut reader).await;
    let received = Arc::new(Mutex::new(Vec::<u32>::new()));
    let reading = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let ended = read_for(&mut reader, Duration::from_millis(100), &mut got).await;
                received.lock().unwrap().append(&mut got);
                if ended != Ended::Open {
                    return;
                }
            }
        })
    };
    let (mut publisher, _) = RawClient::connect(a.addr(), connect_packet(ProtocolVersion::V5, "editor", true)).await;
    const TOTAL: u32 = 900;
    const IN_FLIGHT: u32 = 50;
    let mut acknowledged = Vec::new();
    let mut sent = 0u32;
    let mut kills = Vec::new();
    let mut longest = Duration::ZERO;
    let mut last_ack = Instant::now();
    while acknowledged.len() < TOTAL as usize {
        if (sent == 300 && kills.is_empty()) || (sent == 600 && kills.len() == 1) {
            if let Some(&i) = kills.last() {
                // The server killed first is back and caught up: three again, then the next.
                nats.restart(i);
                let deadline = Instant::now() + PATIENCE;
                while !stream_replicas_current(&nats).await {
                    assert!(Instant::now() < deadline, "the restarted NATS server did not catch up");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let leader = stream_leader(&nats).await;
            let i = nats.servers.iter().position(|s| s.name == leader).unwrap();
            eprintln!("killing the stream leader {leader} at message {sent}");
            nats.kill(i);
            kills.push(i);
        }
        while sent < TOTAL && sent - (acknowledged.len() as u32) < IN_FLIGHT {
            sent += 1;
            let packet_id = (sent % 60_000 + 1) as u16;
            publisher.send(&publish("news/stream", sent.to_string().as_bytes(), QoS::AtLeastOnce, packet_id)).await;
            if sent == 300 || sent == 600 {
                break;
            }
        }
        match publisher.recv_within(Duration::from_secs(60)).await {
            Ok(Some(Packet::PubAck(ack))) if ack.reason == ReasonCode::SUCCESS => {
                acknowledged.push((ack.packet_id as u32 + 59_999) % 60_000);
                longest = longest.max(last_ack.elapsed());
                last_ack = Instant::now();
            }
            other => panic!("after {} PUBACKs: {other:?}", acknowledged.len()),
        }
    }
    let reordered = metric(&a, "herald_cluster_append_reordered_total");
    let retries = metric(&a, "herald_cluster_append_retries_total");
    eprintln!(
        "{} acknowledged; longest gap between PUBACKs {longest:?}; {retries} appends sent again, {reordered} stored out of order",
        acknowledged.len()
    );
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let got = received.lock().unwrap().clone();
        let (duplicates, missing) = tally(&acknowledged, &got);
        if missing.is_empty() {
            eprintln!("received {} for {} acknowledged ({duplicates} duplicates)", got.len(), acknowledged.len());
            // The first time each number arrives, in increasing order: the publisher's order.
            let mut seen = std::collections::HashSet::new();
            let first: Vec<u32> = got.iter().copied().filter(|n| seen.insert(*n)).collect();
            let out_of_order: Vec<(u32, u32)> =
                first.windows(2).filter(|w| w[0] > w[1]).map(|w| (w[0], w[1])).collect();
            assert!(out_of_order.is_empty(), "[MQTT-4.6.0-5] out of order: {out_of_order:?}");
            break;
        }
        assert!(Instant::now() < deadline, "acknowledged and never delivered: {missing:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reading.abort();
}

/// [issue 25, items 3, 5 and 6] A node cut off from NATS (its only NATS connection goes through a
/// TCP proxy the test cuts) for longer than `dead_after_secs`, with a persistent reader and a
/// plain (clean) reader connected to it: the other nodes take the persistent session over; the
/// cut-off node's lease lapses and it is fenced; when the proxy is restored it learns that the
/// session moved, closes the reader with DISCONNECT 0x8E [MQTT-3.1.4-3], and the reader resumes on
/// a third node with every acknowledged story. The clean reader stays, and stories reach it again
/// soon after NATS is back (the time is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_is_fenced_and_its_reader_resumes_elsewhere() {
    let nats = NatsCluster::start();
    let proxy = Proxy::start(nats.servers[0].client_port).await;
    let fast = "dead_after_secs = 3\n[http]\nbind = \"127.0.0.1:0\"\n";
    let a = Node::start_with_urls("herald-a", &[proxy.url()], fast);
    let b = Node::start_with("herald-b", &nats, fast);
    let c = Node::start_with("herald-c", &nats, fast);
    wait_until_every_node_hears_the_others(&[&a, &b, &c]).await;
    let (mut reader, _) = RawClient::connect(a.addr(), persistent("reader", true)).await;
    reader.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut reader).await;
    let (mut plain, _) = RawClient::connect(a.addr(), connect_packet(ProtocolVersion::V5, "plain", true)).await;
    plain.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    expect_suback(&mut plain).await;
    wait_for_holder(&c, "reader", "herald-a").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acknowledged, publisher) = steady_publisher(&b, 50, stop.clone());
    let publishing = Instant::now();
    let mut got = Vec::new();
    assert_eq!(read_for(&mut reader, Duration::from_secs(2), &mut got).await, Ended::Open);
    assert!(!got.is_empty(), "the reader gets the stream on node a");

    proxy.cut();
    let cut_at = Instant::now();
    let adopted = |n: &Node| metric(n, "herald_cluster_sessions_adopted_total");
    while adopted(&b) + adopted(&c) == 0 {
        if cut_at.elapsed() > PATIENCE {
            for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
                for l in node.log_lines("") {
                    if !l.contains("client connected") && !l.contains("client disconnected") {
                        eprintln!("{name}: {l}");
                    }
                }
            }
            panic!("node b or c takes the reader's session over");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until("node a is fenced", || metric(&a, "herald_cluster_fenced_total") == 1).await;
    eprintln!("cut off: session taken over and node a fenced {:?} after the cut", cut_at.elapsed());
    assert_eq!(read_for(&mut reader, Duration::from_millis(500), &mut got).await, Ended::Open);
    let mut plain_got = Vec::new();
    read_for(&mut plain, Duration::ZERO, &mut plain_got).await;

    proxy.restore();
    let restored_at = Instant::now();
    let mut after = Vec::new();
    let ended = read_for(&mut reader, PATIENCE, &mut after).await;
    assert_eq!(ended, Ended::Disconnect(ReasonCode::SESSION_TAKEN_OVER), "node a closes the reader with 0x8E");
    assert!(after.is_empty(), "node a wrote {} stories to a session another node holds", after.len());
    let closed_after = restored_at.elapsed();
    // The clean reader stayed on node a: stories from node b reach it again.
    let before = plain_got.len();
    while plain_got.len() == before {
        assert!(restored_at.elapsed() < PATIENCE, "node a receives nothing after NATS came back");
        assert_eq!(read_for(&mut plain, Duration::from_millis(20), &mut plain_got).await, Ended::Open);
    }
    eprintln!(
        "cut off: reader closed with 0x8E {closed_after:?} after NATS was back; the plain reader's next story {:?} after",
        restored_at.elapsed()
    );
    wait_until("node a lets go of the session taken over", || metric(&a, "herald_cluster_fenced_sessions_total") == 1)
        .await;

    let (mut reader, ack) = RawClient::connect(c.addr(), persistent("reader", false)).await;
    assert!(ack.session_present, "[MQTT-3.2.2-3] the session lives on");
    assert_eq!(read_for(&mut reader, Duration::from_secs(1), &mut got).await, Ended::Open);
    let (acknowledged, per_second) =
        finish_stream(stop, publisher, &acknowledged, publishing, &mut reader, &mut got).await;
    let (duplicates, _) = tally(&acknowledged, &got);
    eprintln!("cut off: {} acknowledged ({per_second:.0}/s), {duplicates} duplicates", acknowledged.len());
    assert!(duplicates as f64 <= per_second, "duplicates at most one second of traffic: {duplicates}");
    wait_until("every node names node c as the reader's holder", || {
        [&a, &b, &c].iter().all(|n| {
            http_json(http_addr(n), "GET", "/api/v1/clients/reader", "").1["node"].as_str() == Some("herald-c")
        })
    })
    .await;
}
