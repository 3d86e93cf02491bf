//! Every transport in the connection's own task [issue 14]: TLS and WebSocket framing are
//! layers on the one TCP stream, so a connection costs one file descriptor on every listener,
//! and whole messages of any size cross `ws` and `wss` intact in both directions. Black-box:
//! the `herald` binary and paho-mqtt clients (tests/tools/paho_crowd.py).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::spawn_herald;

const DEADLINE: Duration = Duration::from_secs(90);

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the broker is running").count()
}

/// Waits until `f` holds, or panics after the deadline.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 50 paho subscribers on each of mqtt, mqtts, ws and wss: each connection adds exactly one
/// descriptor to the broker (before, a TLS or WebSocket connection took three: its TCP socket
/// and a Unix socket pair to a pump task), a 300 KB message and a small one reach every
/// subscriber intact, and the descriptors are returned when the clients leave.
#[test]
fn one_descriptor_per_connection_and_whole_messages_on_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/generate.sh");
    let out = Command::new("bash").args([script, "device-1", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cert, key) = (toml_path(&dir.path().join("server.pem")), toml_path(&dir.path().join("server.key")));
    let mut config = String::new();
    for protocol in ["mqtt", "mqtts", "ws", "wss"] {
        config.push_str(&format!("[[listeners]]\nprotocol = \"{protocol}\"\nbind = \"127.0.0.1:0\"\n"));
        if protocol.ends_with('s') {
            config.push_str(&format!("cert = {cert}\nkey = {key}\n"));
        }
    }
    config.push_str(&format!(
        "[http]\nbind = \"127.0.0.1:0\"\n[storage]\npath = {}\n[sys]\ninterval = 0\n",
        toml_path(&dir.path().join("data"))
    ));
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, config).unwrap();
    let (mut child, ports, log) = spawn_herald(&path, 4);
    let http = loop {
        let line = log.recv_timeout(DEADLINE).expect("the HTTP listener's line");
        if let Some(rest) = line.split("addr=127.0.0.1:").nth(1).filter(|_| line.contains("http listening")) {
            let port: u16 = rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
            break std::net::SocketAddr::from(([127, 0, 0, 1], port));
        }
    };
    // The broker's own count of connection tasks (`herald_connections_open`).
    let open_connections = || {
        let (_, _, body) = common::http_request(http, "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("herald_connections_open ").map(|v| v.trim().parse::<usize>().unwrap()))
            .expect("herald_connections_open in /metrics")
    };
    let pid = child.id();
    let crowd = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/paho_crowd.py");
    let ca = dir.path().join("ca.pem");
    const N: usize = 50;
    for (port, transport) in ports.iter().zip(["mqtt", "mqtts", "ws", "wss"]) {
        let before = open_descriptors(pid);
        let mut py = Command::new("python3")
            .args([crowd, &port.to_string(), transport, ca.to_str().unwrap(), &N.to_string(), "300000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.by_ref().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let first = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("{transport}: the crowd never got ready"));
        assert_eq!(first, "ready", "{transport}: {first}");
        // The publisher has left; its socket is closed once its connection task has ended.
        wait_for(&format!("{transport}: the publisher's connection to end"), || open_connections() == N);
        // Sockets of the HTTP probes above may still be closing: wait for the count to settle
        // on one descriptor per connection, and say what it was if it does not.
        let start = Instant::now();
        let mut during = open_descriptors(pid);
        while during - before != N && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
            during = open_descriptors(pid);
        }
        eprintln!("{transport}: {N} connections took {} descriptors", during - before);
        assert_eq!(during - before, N, "{transport}: one descriptor per connection");
        drop(py.stdin.take());
        assert_eq!(rx.recv_timeout(DEADLINE).as_deref(), Ok("done"), "{transport}: the crowd did not finish");
        assert!(py.wait().unwrap().success(), "{transport}: the crowd failed");
        wait_for(&format!("{transport}: the connections to end"), || open_connections() == 0);
        wait_for(&format!("{transport}: the descriptors to be returned"), || open_descriptors(pid) <= before);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn hibernating(b: &common::TestBroker) -> u64 {
    b.broker.metrics().connections_hibernating.load(std::sync::atomic::Ordering::Relaxed)
}

/// Hibernation [issue 14]: an idle connection (here after 100 ms) frees its event loop and still
/// does everything a connection does: a delivery wakes it, a PINGREQ is answered, a takeover
/// closes it with 0x8E [MQTT-3.1.4-3], a silent client is closed at 1.5 keep-alives
/// [MQTT-3.1.2-24] with 0x8D, and a client that sends half a packet stays awake until the
/// rest comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernating_connections_wake_for_everything_a_connection_does() {
    use common::*;
    use herald::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
    let b = start_with("hibernate_after_ms = 100");
    let v5 = ProtocolVersion::V5;
    let mut phone = subscriber(&b, "phone", "news/#", QoS::AtLeastOnce).await;
    wait_until("the phone to hibernate", || hibernating(&b) == 1).await;
    // A delivery wakes it.
    let (mut desk, _) = RawClient::connect(b.addr, connect_packet(v5, "desk", true)).await;
    desk.send(&publish("news/tech", b"story", QoS::AtLeastOnce, 1)).await;
    assert!(matches!(desk.recv().await, Some(Packet::PubAck(_))));
    let p = expect_publish(&mut phone).await;
    assert_eq!(&p.payload[..], b"story");
    phone.send(&Packet::PubAck(herald::codec::PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;
    wait_until("both to hibernate", || hibernating(&b) == 2).await;
    // A PINGREQ is answered.
    phone.send(&Packet::PingReq).await;
    assert!(matches!(phone.recv().await, Some(Packet::PingResp)));
    wait_until("the phone to hibernate again", || hibernating(&b) == 2).await;
    // Half a packet: read, kept, and completed later (the connection does not hibernate with
    // partial input, and loses nothing).
    let mut bytes = bytes::BytesMut::new();
    publish("news/half", b"in two parts", QoS::AtMostOnce, 0).encode(v5, &mut bytes);
    desk.send_raw(&bytes[..5]).await;
    wait_until("the desk to wake", || hibernating(&b) == 1).await;
    desk.send_raw(&bytes[5..]).await;
    assert_eq!(&expect_publish(&mut phone).await.payload[..], b"in two parts");
    // A takeover closes the hibernating connection with 0x8E.
    wait_until("both to hibernate", || hibernating(&b) == 2).await;
    let (_new_phone, _) = RawClient::connect(b.addr, connect_packet(v5, "phone", false)).await;
    expect_disconnect(&mut phone, ReasonCode::SESSION_TAKEN_OVER).await;
    // Keep-alive 1 s: a silent client is closed with 0x8D after 1.5 s, hibernating or not.
    let mut quiet = connect_packet(v5, "quiet", true);
    quiet.keep_alive = 1;
    let (mut quiet, _) = RawClient::connect(b.addr, quiet).await;
    let start = std::time::Instant::now();
    expect_disconnect(&mut quiet, ReasonCode::KEEP_ALIVE_TIMEOUT).await;
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5), "{waited:?}");
}
