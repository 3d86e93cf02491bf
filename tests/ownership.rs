//! Every session belongs to its reader [issue 24]: a persistent session records the identity
//! that made it, and a CONNECT, stream or poll naming a session of another identity is refused
//! (MQTT 5 CONNACK 0x87, 3.1.1 0x05, HTTP 403) before anything of that session changes; the
//! owner survives `kill -9`. The clients are mosquitto_sub/pub, curl and raw CONNECTs against
//! the real binary.

mod common;

use std::process::Command;

use common::*;
use herald::codec::{Packet, ProtocolVersion};

/// The CONNACK code a raw CONNECT gets.
async fn connack(port: u16, version: ProtocolVersion, client_id: &str, clean: bool, user: &str, pw: &str) -> u8 {
    let mut connect = connect_packet(version, client_id, clean);
    if version == ProtocolVersion::V5 && !clean {
        connect.properties.session_expiry_interval = Some(3600);
    }
    connect.username = Some(user.into());
    connect.password = Some(bytes::Bytes::copy_from_slice(pw.as_bytes()));
    let mut c = RawClient::connect_tcp(format!("127.0.0.1:{port}").parse().unwrap()).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => a.code.0,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// curl's status code and body for a GET with basic credentials.
fn curl(http: u16, path: &str, user: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-u", user, "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{http}{path}"))
        .output()
        .unwrap();
    // A stream that was let in runs until --max-time: its status is still printed.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn metric(http: u16, name: &str) -> f64 {
    let out = Command::new("curl").args(["-sS", &format!("http://127.0.0.1:{http}/metrics")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn publish(port: u16, user: &str, pw: &str, topic: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", user, "-P", pw, "-q", "1", "-t", topic, "-m", payload])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
}

struct Herald(std::process::Child);

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scenario. bob's phone (`bob-phone`, MQTT, persistent) and bob's web reader
/// (`bob-web`, a poller) are offline while the editor publishes two private stories to bob.
/// alice, logged in as herself, names bob's sessions over MQTT 5, MQTT 3.1.1 (raw and
/// mosquitto_sub), polling and a stream: each is refused, counted and logged with both
/// identities. After `kill -9` and a restart the owner is still known; then bob's phone and web
/// reader each receive both stories: nothing was lost by the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_belongs_to_the_identity_that_made_it_mqtt_and_http() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for (user, pw) in [("alice", "alice-pw"), ("bob", "bob-pw"), ("editor", "editor-pw")] {
        mosquitto_passwd(&passwd, user, pw);
    }
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user editor\ntopic readwrite #\npattern read news/#\npattern read users/%u/#\n").unwrap();
    let (port, http) = (free_port(), free_port());
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n[storage]\npath = {}\n\
             [http]\nbind = \"127.0.0.1:{http}\"\n[sys]\ninterval = 0\n\
             [auth]\nallow_anonymous = false\npassword_file = {}\nacl_file = {}\n",
            toml_path(&dir.path().join("data")),
            toml_path(&passwd),
            toml_path(&acl)
        ),
    )
    .unwrap();
    let (child, _, log) = spawn_herald(&config, 1);
    let herald = Herald(child);
    wait_until_blocking("the HTTP server", || std::net::TcpStream::connect(("127.0.0.1", http)).is_ok());

    // bob's phone subscribes and goes away; bob's web reader makes its poll session.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311", "-c", "-i", "bob-phone"])
        .args(["-u", "bob", "-P", "bob-pw", "-q", "1", "-t", "users/bob/inbox", "-E"])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&out.stderr));
    let (status, body) = curl(http, "/api/v1/poll?client_id=bob-web&filter=users/bob/inbox&wait=0", "bob:bob-pw");
    assert_eq!(status, 200, "{body}");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cursor = first["next"].as_str().unwrap().to_owned();

    publish(port, "editor", "editor-pw", "users/bob/inbox", "private story 1");
    publish(port, "editor", "editor-pw", "users/bob/inbox", "private story 2");

    // alice names bob's sessions: refused every way, before anything of them changes.
    assert_eq!(connack(port, ProtocolVersion::V5, "bob-phone", false, "alice", "alice-pw").await, 0x87);
    assert_eq!(connack(port, ProtocolVersion::V5, "bob-phone", true, "alice", "alice-pw").await, 0x87, "clean start");
    assert_eq!(connack(port, ProtocolVersion::V3_1_1, "bob-phone", true, "alice", "alice-pw").await, 0x05);
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311", "-c", "-i", "bob-phone"])
        .args(["-u", "alice", "-P", "alice-pw", "-q", "1", "-t", "news/#", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "mosquitto_sub as alice was let into bob's session");
    let poll = curl(http, "/api/v1/poll?client_id=bob-web&filter=news/%23&wait=0", "alice:alice-pw");
    assert_eq!(poll.0, 403, "{}", poll.1);
    let poll = curl(http, "/api/v1/poll?client_id=bob-phone&filter=news/%23&wait=0", "alice:alice-pw");
    assert_eq!(poll.0, 403, "{}", poll.1);
    let stream = curl(http, "/api/v1/stream?client_id=bob-phone&filter=news/%23", "alice:alice-pw");
    assert_eq!(stream.0, 403, "{}", stream.1);
    assert!(stream.1.contains("another user"), "{}", stream.1);
    assert_eq!(metric(http, "herald_session_owner_refused_total"), 7.0);
    let refused: Vec<String> = log.try_iter().filter(|l| l.contains("belongs to another identity")).collect();
    assert!(
        refused.iter().any(|l| l.contains("owner=\"bob\"") && l.contains("identity=\"alice\"")),
        "one line with both identities: {refused:?}"
    );

    // kill -9 and back: the owner was in the store.
    drop(herald);
    let (child, _, _log) = spawn_herald(&config, 1);
    let _herald = Herald(child);
    wait_until_blocking("the HTTP server", || std::net::TcpStream::connect(("127.0.0.1", http)).is_ok());
    assert_eq!(connack(port, ProtocolVersion::V5, "bob-phone", false, "alice", "alice-pw").await, 0x87);
    let poll = curl(http, "/api/v1/poll?client_id=bob-web&filter=news/%23&wait=0", "alice:alice-pw");
    assert_eq!(poll.0, 403, "{}", poll.1);

    // bob comes back to both: every private story is there.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311", "-c", "-i", "bob-phone"])
        .args(["-u", "bob", "-P", "bob-pw", "-q", "1", "-t", "users/bob/inbox", "-C", "2", "-W", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "private story 1\nprivate story 2\n");
    let (status, body) = curl(
        http,
        &format!("/api/v1/poll?client_id=bob-web&filter=users/bob/inbox&after={cursor}&wait=5"),
        "bob:bob-pw",
    );
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    let payloads: Vec<&str> =
        got["messages"].as_array().unwrap().iter().map(|m| m["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["private story 1", "private story 2"], "{got}");
    assert_eq!(got["session_present"], true, "{got}");
}

/// With `auth.session_owner = false` a client identifier is anyone's, as in Mosquitto; the
/// API token still ends any session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_owner_off_and_the_api_token_ends_any_session() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    mosquitto_passwd(&passwd, "alice", "alice-pw");
    mosquitto_passwd(&passwd, "bob", "bob-pw");
    let base = format!(
        "[http]\nbind = \"127.0.0.1:0\"\ntoken = \"ops\"\n[auth]\nallow_anonymous = false\npassword_file = {}\n",
        toml_path(&passwd)
    );
    for (owned, want) in [(true, 0x87), (false, 0)] {
        let b = start_toml(&format!("{base}session_owner = {owned}\n"));
        let port = b.port();
        assert_eq!(connack(port, ProtocolVersion::V5, "bob-phone", false, "bob", "bob-pw").await, 0);
        wait_parked(&b, "bob-phone").await;
        assert_eq!(connack(port, ProtocolVersion::V5, "bob-phone", false, "alice", "alice-pw").await, want);
        if owned {
            let http = b.broker.http_addr().unwrap();
            let (status, _, _) = http_request(
                http,
                "DELETE",
                "/api/v1/clients/bob-phone?remove_session=true",
                &[("authorization", "Bearer ops")],
                b"",
            );
            assert!((200..300).contains(&status), "{status}");
            wait_until("bob's session to end", || b.broker.registry().get("bob-phone").is_none()).await;
            assert_eq!(connack(port, ProtocolVersion::V5, "bob-phone", false, "alice", "alice-pw").await, 0);
        }
    }
}
