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
        let during = open_descriptors(pid);
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
