//! Every transport in the connection's own task [issue 14]: TLS and WebSocket framing are
//! layers on the one TCP stream, so a connection costs one file descriptor on every listener,
//! and whole messages of any size cross `ws` and `wss` intact in both directions. Black-box:
//! the `herald` binary and paho-mqtt clients (tests/tools/paho_crowd.py).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{spawn_herald, toml_path};

const DEADLINE: Duration = Duration::from_secs(90);

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
    let (child, ports, log) = spawn_herald(&path, 4);
    // Stopped however the test ends, a failed assertion included.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Stop(child);
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
    let pid = child.0.id();
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
    drop(child);
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

/// Reads one server frame: (opcode, payload). Server frames are not masked.
async fn read_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(h[1] & 0x80, 0, "a server frame is never masked");
    let len = match h[1] & 0x7F {
        126 => s.read_u16().await.unwrap() as usize,
        127 => s.read_u64().await.unwrap() as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (h[0] & 0x0F, payload)
}

/// The WebSocket framing layer [MQTT-6.0.0-2] [RFC 6455]: frames that arrive in the same write
/// as the upgrade request are served (they wait in the layer, not in the socket: the layer says
/// so through `has_buffered_input`, though tokio's leftover readiness hides it here); a CONNECT split over three frames of a fragmented
/// message, with a ping between the fragments, is one CONNECT and the ping gets its pong;
/// two packets in one frame are two packets; every server frame is binary and unmasked; a
/// close frame is answered with a close frame; a text frame is refused with 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_carry_the_mqtt_byte_stream_however_it_is_cut() {
    use common::*;
    use herald::codec::{Packet, ProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The test broker's plain listener is first; ours is second.
    let b = start_toml("[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\n");
    let ws = b.addrs[1];
    let upgrade = b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
    let v5 = ProtocolVersion::V5;
    let mut connect = bytes::BytesMut::new();
    Packet::Connect(Box::new(connect_packet(v5, "framed", true))).encode(v5, &mut connect);
    let mut s = tokio::net::TcpStream::connect(ws).await.unwrap();
    // The request and the CONNECT's three fragments, a ping between the second and the third,
    // all in one write.
    let third = connect.len() / 3;
    let mut out = upgrade.to_vec();
    out.extend(ws_frame(false, 0x2, &connect[..third]));
    out.extend(ws_frame(false, 0x0, &connect[third..2 * third]));
    out.extend(ws_frame(true, 0x9, b"are you there"));
    out.extend(ws_frame(true, 0x0, &connect[2 * third..]));
    s.write_all(&out).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let mut frames = Vec::new();
    while frames.len() < 2 {
        frames.push(tokio::time::timeout(WAIT, read_frame(&mut s)).await.expect("the pong and the CONNACK"));
    }
    assert!(frames.contains(&(0xA, b"are you there".to_vec())), "{frames:?}");
    let connack = frames.iter().find(|(op, _)| *op == 0x2).expect("a binary frame");
    assert_eq!(connack.1[0], 0x20, "CONNACK");
    // Two PINGREQs in one frame: two PINGRESPs (in one or two frames).
    s.write_all(&ws_frame(true, 0x2, &[0xC0, 0x00, 0xC0, 0x00])).await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let (op, payload) = tokio::time::timeout(WAIT, read_frame(&mut s)).await.unwrap();
        assert_eq!(op, 0x2);
        answers.extend(payload);
    }
    assert_eq!(answers, [0xD0, 0x00, 0xD0, 0x00]);
    // A close frame is answered with a close frame.
    s.write_all(&ws_frame(true, 0x8, &1000u16.to_be_bytes())).await.unwrap();
    let (op, payload) = tokio::time::timeout(WAIT, read_frame(&mut s)).await.unwrap();
    assert_eq!((op, &payload[..]), (0x8, &1000u16.to_be_bytes()[..]));
    // A text frame: close 1002 [MQTT-6.0.0-1].
    let mut s = tokio::net::TcpStream::connect(ws).await.unwrap();
    s.write_all(upgrade).await.unwrap();
    s.write_all(&ws_frame(true, 0x1, b"hello")).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect("the connection is closed");
    let at = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("the 101") + 4;
    assert_eq!(&rest[at..], &[0x88, 0x02, 0x03, 0xEA], "close frame 1002");
}

/// A TLS client whose CONNECT travels in the same TCP write as its handshake's Finished (here
/// rustls's own client, its last flight held back and sent with the CONNECT): the server
/// decrypts the CONNECT while completing the handshake, before the connection task exists, and
/// must answer it all the same. Before the fix such a client waited for the connect timeout:
/// the socket had nothing more to say, and the decrypted CONNECT sat in rustls.
#[test]
fn a_connect_that_arrives_with_the_tls_handshake_is_answered() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/generate.sh");
    let out = Command::new("bash").args([script, "device-1", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let b = common::start_toml(&format!(
        "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n",
        toml_path(&dir.path().join("server.pem")),
        toml_path(&dir.path().join("server.key"))
    ));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let connect = [0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'i', b'd'];
    for i in 0..10 {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        let mut sock = std::net::TcpStream::connect(b.addrs[1]).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The handshake, up to the client's last flight, which stays queued.
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            conn.read_tls(&mut sock).unwrap();
            conn.process_new_packets().unwrap();
        }
        // Finished and the CONNECT, encrypted behind it, in one write.
        conn.writer().write_all(&connect).unwrap();
        let mut flight = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut flight).unwrap();
        }
        sock.write_all(&flight).unwrap();
        let mut ack = Vec::new();
        while ack.len() < 4 {
            let n = conn.read_tls(&mut sock).unwrap_or_else(|e| panic!("connection {i}: no CONNACK: {e}"));
            assert!(n > 0, "connection {i}: closed without a CONNACK");
            conn.process_new_packets().unwrap();
            let mut buf = [0u8; 64];
            if let Ok(n) = conn.reader().read(&mut buf) {
                ack.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "connection {i}");
    }
}
