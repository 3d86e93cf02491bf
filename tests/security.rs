//! The secure edge [issue 5]: TLS and WebSocket listeners with real third-party clients,
//! password files (Mosquitto's format, written by `mosquitto_passwd` itself), JWT, ACLs and
//! reload, against a real broker over real sockets.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use herald::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

fn login(
    version: ProtocolVersion,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> herald::codec::Connect {
    let mut c = connect_packet(version, client_id, true);
    c.username = user.map(str::to_owned);
    c.password = password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    c
}

/// Sends CONNECT and returns the CONNACK's code (whatever it is).
async fn connack_code(addr: std::net::SocketAddr, connect: herald::codec::Connect) -> u8 {
    let mut c = RawClient::connect_tcp(addr).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => a.code.0,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn herald_passwd(file: &Path, user: &str, password: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["passwd", file.to_str().unwrap(), user, password])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// [MQTT-3.1.4-2] [MQTT-3.2.2-5] a password file written by `mosquitto_passwd` (and one by
/// `herald passwd`) is honoured: right passwords connect, wrong ones and unknown users get 0x86
/// (3.1.1: 0x04), and without `allow_anonymous` a client without credentials gets 0x87 (0x05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_files_from_mosquitto_passwd_and_herald_passwd() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    mosquitto_passwd(&file, "editor", "front page");
    herald_passwd(&file, "alice", "wonderland");
    let config = format!("[auth]\nallow_anonymous = false\npassword_file = {}\n", toml_path(&file));
    let b = start_at(&dir.path().join("data"), &config);
    for version in [V311, V5] {
        assert_eq!(connack_code(b.addr, login(version, "a", Some("editor"), Some("front page"))).await, 0);
        assert_eq!(connack_code(b.addr, login(version, "b", Some("alice"), Some("wonderland"))).await, 0);
        let bad = if version == V5 { 0x86 } else { 0x04 };
        assert_eq!(connack_code(b.addr, login(version, "c", Some("alice"), Some("wrong"))).await, bad);
        assert_eq!(connack_code(b.addr, login(version, "d", Some("mallory"), Some("x"))).await, bad);
        let anonymous = if version == V5 { 0x87 } else { 0x05 };
        assert_eq!(connack_code(b.addr, login(version, "e", None, None)).await, anonymous);
    }
    assert!(b.broker.metrics().auth_failures.load(std::sync::atomic::Ordering::Relaxed) >= 6);
}

const ACL: &str = "\
user editor
topic write news/#
topic read news/#
user alice
topic deny news/embargoed/#
user admin
topic read $SYS/#
pattern read news/#
pattern read users/%u/#
";

/// ACLs in Mosquitto's format: editors write `news/#`, apps read `news/#` and only their own
/// `users/%u/#`; a refused SUBSCRIBE gets 0x80 (3.1.1) or 0x87 (5.0), a refused PUBLISH is
/// acknowledged with 0x87 (5.0) or dropped (3.1.1); a user named `+` does not widen the pattern;
/// retained messages are checked against the rules when they are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_rules_for_editors_apps_and_the_percent_u_trick() {
    let dir = tempfile::tempdir().unwrap();
    let (acl, passwd) = (dir.path().join("acl"), dir.path().join("passwd"));
    std::fs::write(&acl, ACL).unwrap();
    // (`#` itself cannot be a user in a password file: a line starting with it is a comment.)
    for user in ["editor", "alice", "bob", "+"] {
        herald_passwd(&passwd, user, "pw");
    }
    let config = format!("[auth]\npassword_file = {}\nacl_file = {}\n", toml_path(&passwd), toml_path(&acl));
    let b = start_at(&dir.path().join("data"), &config);

    let (mut editor, _) = RawClient::connect(b.addr, login(V5, "cms", Some("editor"), Some("pw"))).await;
    let mut retained = publish_msg("news/embargoed/merger", b"not yet", QoS::AtLeastOnce, 1);
    retained.retain = true;
    editor.send(&Packet::Publish(retained)).await;
    assert!(matches!(editor.recv().await, Some(Packet::PubAck(a)) if !a.reason.is_error()));
    editor.send(&publish("users/bob/inbox", b"psst", QoS::AtLeastOnce, 2)).await;
    assert!(
        matches!(editor.recv().await, Some(Packet::PubAck(a)) if a.reason == ReasonCode::NOT_AUTHORIZED),
        "an editor may not write to an inbox"
    );

    let (mut alice, _) = RawClient::connect(b.addr, login(V5, "alice-phone", Some("alice"), Some("pw"))).await;
    let mut sub = subscribe(1, "news/#", QoS::AtLeastOnce);
    if let Packet::Subscribe(s) = &mut sub {
        s.filters.push(("users/alice/#".into(), Default::default()));
        s.filters.push(("users/bob/#".into(), Default::default()));
        s.filters.push(("$SYS/#".into(), Default::default()));
    }
    alice.send(&sub).await;
    assert_eq!(expect_suback(&mut alice).await, vec![1, 0, 0x87, 0x87]);
    // The embargoed retained message matches news/# but is denied when it would be delivered.
    alice.expect_silence(Duration::from_millis(300)).await;
    alice.send(&publish("news/tech", b"from an app", QoS::AtLeastOnce, 5)).await;
    assert!(matches!(alice.recv().await, Some(Packet::PubAck(a)) if a.reason == ReasonCode::NOT_AUTHORIZED));

    editor.send(&publish("news/tech", b"story", QoS::AtLeastOnce, 3)).await;
    assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
    let p = expect_publish(&mut alice).await;
    assert_eq!(&p.payload[..], b"story");
    alice.send(&Packet::PubAck(PubResponse::new(p.packet_id, ReasonCode::SUCCESS))).await;

    // 3.1.1: the refused SUBSCRIBE gets 0x80; `+` as a user name reads nobody's inbox.
    let (mut hash, _) = RawClient::connect(b.addr, login(V311, "x", Some("+"), Some("pw"))).await;
    hash.send(&subscribe(1, "users/#", QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut hash).await, vec![0x80]);
    hash.send(&subscribe(2, "users/+/inbox", QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut hash).await, vec![0x80]);
    // 3.1.1: a refused PUBLISH is acknowledged and dropped.
    hash.send(&publish("news/tech", b"forged", QoS::AtLeastOnce, 3)).await;
    assert!(matches!(hash.recv().await, Some(Packet::PubAck(_))));
    alice.expect_silence(Duration::from_millis(300)).await;
}

/// JWT as the password: HS256 and RS256 tokens with `exp` connect as the `sub` claim (which the
/// ACL then knows); an expired or forged token gets 0x86.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_hs256_and_rs256() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |sub: &str, exp: u64| serde_json::json!({ "sub": sub, "exp": exp });
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "pattern read users/%u/#\n").unwrap();

    let secret = "newsroom-shared-secret";
    let config = format!("[auth]\nacl_file = {}\n[auth.jwt]\nhs256_secret = \"{secret}\"\n", toml_path(&acl));
    let b = start_at(&dir.path().join("hs"), &config);
    let key = EncodingKey::from_secret(secret.as_bytes());
    let good = encode(&Header::new(Algorithm::HS256), &claims("alice", now + 600), &key).unwrap();
    let expired = encode(&Header::new(Algorithm::HS256), &claims("alice", now - 60), &key).unwrap();
    let forged =
        encode(&Header::new(Algorithm::HS256), &claims("alice", now + 600), &EncodingKey::from_secret(b"x")).unwrap();
    let (mut c, _) = RawClient::connect(b.addr, login(V5, "app", Some("anything"), Some(&good))).await;
    c.send(&subscribe(1, "users/alice/#", QoS::AtMostOnce)).await;
    assert_eq!(expect_suback(&mut c).await, vec![0], "the token's sub claim is the user name");
    assert_eq!(connack_code(b.addr, login(V5, "app2", Some("x"), Some(&expired))).await, 0x86);
    assert_eq!(connack_code(b.addr, login(V311, "app3", Some("x"), Some(&forged))).await, 0x04);
    drop((c, b));

    let key_pem = dir.path().join("jwt.key");
    let pub_pem = dir.path().join("jwt.pub");
    assert!(Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key_pem.to_str().unwrap()])
        .output()
        .unwrap()
        .status
        .success());
    assert!(Command::new("openssl")
        .args(["rsa", "-in", key_pem.to_str().unwrap(), "-pubout", "-out", pub_pem.to_str().unwrap()])
        .output()
        .unwrap()
        .status
        .success());
    let config = format!("[auth]\n[auth.jwt]\nrs256_public_key = {}\n", toml_path(&pub_pem));
    let b = start_at(&dir.path().join("rs"), &config);
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&key_pem).unwrap()).unwrap();
    let good = encode(&Header::new(Algorithm::RS256), &claims("bob", now + 600), &key).unwrap();
    let expired = encode(&Header::new(Algorithm::RS256), &claims("bob", now - 1), &key).unwrap();
    assert_eq!(connack_code(b.addr, login(V5, "r1", None, Some(&good))).await, 0);
    assert_eq!(connack_code(b.addr, login(V5, "r2", None, Some(&expired))).await, 0x86);
}

fn certs(dir: &Path, client_cn: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/generate.sh");
    let out = Command::new("bash").args([script, client_cn, dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// TLS (`mqtts`) with mosquitto_pub/sub and `--cafile`; a client certificate's common name is the
/// user name the ACL sees; a client without a certificate is refused where one is required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_with_mosquitto_clients_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "device-7");
    let d = |f: &str| toml_path(&dir.path().join(f));
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "pattern readwrite devices/%u/#\npattern read news/#\nuser editor\ntopic write news/#\n")
        .unwrap();
    let config = format!(
        "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\nca = {}\nuse_identity_as_username = true\n\
         [auth]\nallow_anonymous = true\nacl_file = {}\n",
        d("server.pem"),
        d("server.key"),
        d("ca.pem"),
        toml_path(&acl)
    );
    let b = start_at(&dir.path().join("data"), &config);
    let tls_port = b.addrs[1].port().to_string();
    let ca = dir.path().join("ca.pem");
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    let sub = {
        let (tls_port, ca, cert, key) = (tls_port.clone(), ca.clone(), cert.clone(), key.clone());
        std::thread::spawn(move || {
            Command::new("mosquitto_sub")
                .args(["-h", "localhost", "-p", &tls_port, "--cafile", ca.to_str().unwrap()])
                .args(["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()])
                .args(["-t", "devices/device-7/#", "-C", "1", "-W", "10", "-v"])
                .output()
                .unwrap()
        })
    };
    wait_until("mosquitto_sub to subscribe over TLS", || b.broker.subscription_count() == 1).await;
    // The device publishes to its own topic over TLS, identified by its certificate.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &tls_port, "--cafile", ca.to_str().unwrap()])
        .args(["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()])
        .args(["-t", "devices/device-7/status", "-m", "online", "-q", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = sub.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "devices/device-7/status online");
    // Without the CA the client refuses the server; a plain-TCP client gets no MQTT from the TLS port.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &tls_port, "-t", "x", "-m", "y", "--capath", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    drop(b);

    let config = format!(
        "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\nca = {}\nrequire_client_cert = true\n",
        d("server.pem"),
        d("server.key"),
        d("ca.pem")
    );
    let b = start_at(&dir.path().join("data2"), &config);
    let tls_port = b.addrs[1].port().to_string();
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &tls_port, "--cafile", ca.to_str().unwrap(), "-t", "x", "-m", "y"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no client certificate: refused");
    // The client gives up as soon as the handshake fails; the broker counts it a moment later.
    let metrics = b.broker.metrics();
    wait_until("the TLS handshake failure to be counted", || {
        metrics.tls_handshake_failures.load(std::sync::atomic::Ordering::Relaxed) >= 1
    })
    .await;
}

/// WebSocket (`ws`) and WebSocket over TLS (`wss`) on path /mqtt with subprotocol mqtt
/// [MQTT-6.0.0-3] [MQTT-6.0.0-4], with paho-mqtt's websockets transport; a disallowed Origin and
/// a wrong path are refused at the HTTP upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_listeners_with_paho() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "device-1");
    let d = |f: &str| toml_path(&dir.path().join(f));
    let config = format!(
        "[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\nallowed_origins = [\"https://news.example\"]\n\
         [[listeners]]\nprotocol = \"wss\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n",
        d("server.pem"),
        d("server.key")
    );
    let b = start_at(&dir.path().join("data"), &config);
    let (ws, wss) = (b.addrs[1].port(), b.addrs[2].port());
    let script = r#"
import sys, ssl, threading, paho.mqtt.client as mqtt
port, tls, ca = int(sys.argv[1]), sys.argv[2] == "tls", sys.argv[3]
got = threading.Event()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="web-reader", transport="websockets", protocol=mqtt.MQTTv5)
c.ws_set_options(path="/mqtt", headers={"Origin": "https://news.example"})
if tls:
    c.tls_set(ca_certs=ca)
c.on_connect = lambda c, u, f, rc, p: c.subscribe("news/#", qos=1)
c.on_subscribe = lambda c, u, mid, rcs, p: c.publish("news/web", "over websocket", qos=1)
def on_message(c, u, m):
    print(m.topic, m.payload.decode()); got.set()
c.on_message = on_message
c.connect("localhost", port)
c.loop_start()
ok = got.wait(10)
c.disconnect(); c.loop_stop()
sys.exit(0 if ok else 1)
"#;
    let ca = dir.path().join("ca.pem");
    for (port, mode) in [(ws, "plain"), (wss, "tls")] {
        let out = Command::new("python3")
            .args(["-c", script, &port.to_string(), mode, ca.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "news/web over websocket", "{mode}");
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (path, origin, expect) in [
        ("/mqtt", "https://evil.example", "403"),
        ("/other", "https://news.example", "404"),
        ("/mqtt", "https://news.example", "101"),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ws)).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\nOrigin: {origin}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with(&format!("HTTP/1.1 {expect}")), "{path} {origin}: {head}");
        if expect == "101" {
            assert!(head.to_ascii_lowercase().contains("sec-websocket-protocol: mqtt"), "{head}");
        }
    }
}

/// Reload [issue 5]: a new password file and ACL take effect for new connections without
/// dropping the connected ones; a reload that fails keeps the old configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_passwords_and_acl_and_keeps_connections() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    herald_passwd(&passwd, "alice", "old");
    let config = format!("[auth]\npassword_file = {}\n", toml_path(&passwd));
    let b = start_at(&dir.path().join("data"), &config);
    let (mut connected, _) = RawClient::connect(b.addr, login(V5, "kept", Some("alice"), Some("old"))).await;
    herald_passwd(&passwd, "alice", "new");
    b.broker.reload().unwrap();
    assert_eq!(connack_code(b.addr, login(V5, "n1", Some("alice"), Some("old"))).await, 0x86);
    assert_eq!(connack_code(b.addr, login(V5, "n2", Some("alice"), Some("new"))).await, 0);
    std::fs::write(&passwd, "alice:not-a-hash\n").unwrap();
    let err = b.broker.reload().unwrap_err().to_string();
    assert!(err.contains("passwd:1"), "{err}");
    assert_eq!(connack_code(b.addr, login(V5, "n3", Some("alice"), Some("new"))).await, 0, "old file kept");
    connected.send(&Packet::PingReq).await;
    assert!(matches!(connected.recv().await, Some(Packet::PingResp)), "the connection survived both reloads");
}

/// SIGHUP on the real binary: a changed password file and new TLS certificates (a new CA) take
/// effect without a restart, and the client connected before keeps its connection.
#[test]
fn sighup_reloads_passwords_and_certificates_in_the_running_binary() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "device-1");
    let passwd = dir.path().join("passwd");
    herald_passwd(&passwd, "alice", "old");
    let d = |f: &str| toml_path(&dir.path().join(f));
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n\
             [storage]\npath = {}\n[auth]\npassword_file = {}\n",
            d("server.pem"),
            d("server.key"),
            d("data"),
            toml_path(&passwd)
        ),
    )
    .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (child, ports, log_rx) = spawn_herald(&config, 2);
    let child = KillOnDrop(child);
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let pub_with = |user: &str, pw: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &ports[0], "-u", user, "-P", pw, "-t", "t", "-m", "m"])
            .output()
            .unwrap()
            .status
            .success()
    };
    let tls_pub = || {
        Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &ports[1], "--cafile", dir.path().join("ca.pem").to_str().unwrap()])
            .args(["-u", "alice", "-P", "new", "-t", "t", "-m", "m"])
            .output()
            .unwrap()
            .status
            .success()
    };
    // A raw 3.1.1 client that stays connected across the reload.
    let mut kept = std::net::TcpStream::connect(("127.0.0.1", ports[0].parse::<u16>().unwrap())).unwrap();
    let connect = [
        0x10, 0x1C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 4, b'k', b'e', b'p', b't', 0, 5, b'a', b'l', b'i',
        b'c', b'e', 0, 3, b'o', b'l', b'd',
    ];
    kept.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    kept.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    assert!(pub_with("alice", "old"));
    herald_passwd(&passwd, "alice", "new");
    let old_ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    certs(dir.path(), "device-1"); // a new CA and server certificate
    assert_ne!(old_ca, std::fs::read(dir.path().join("ca.pem")).unwrap());
    assert!(!tls_pub(), "before the reload the server still shows the old certificate");
    assert!(Command::new("kill").args(["-HUP", &child.0.id().to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let line = log_rx.recv_timeout(Duration::from_secs(10)).expect("a reload line in the log");
        if line.contains("reloaded") {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
    }
    assert!(!pub_with("alice", "old"));
    assert!(pub_with("alice", "new"));
    assert!(tls_pub(), "after the reload the new certificate is served");
    kept.write_all(&[0xC0, 0]).unwrap();
    let mut pingresp = [0u8; 2];
    kept.read_exact(&mut pingresp).unwrap();
    assert_eq!(pingresp, [0xD0, 0], "the connection made before the reload is still served");
}

/// [issue 5] a resumed session's queued messages are checked against the ACL of the new
/// connection: rules tightened by a reload while the phone was away stop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_obeys_the_acl_of_its_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite news/#\n").unwrap();
    let b = start_at(&dir.path().join("data"), &format!("[auth]\nacl_file = {}\n", toml_path(&acl)));
    let mut persistent = connect_packet(V311, "phone", false);
    persistent.clean_start = false;
    let (mut phone, _) = RawClient::connect(b.addr, persistent.clone()).await;
    phone.send(&subscribe(1, "news/#", QoS::AtLeastOnce)).await;
    assert_eq!(expect_suback(&mut phone).await, vec![1]);
    drop(phone);
    wait_parked(&b, "phone").await;
    let (mut editor, _) = RawClient::connect(b.addr, connect_packet(V311, "cms", true)).await;
    for (i, topic) in ["news/open", "news/embargoed/x"].iter().enumerate() {
        editor.send(&publish(topic, b"story", QoS::AtLeastOnce, i as u16 + 1)).await;
        assert!(matches!(editor.recv().await, Some(Packet::PubAck(_))));
    }
    std::fs::write(&acl, "topic readwrite news/#\ntopic deny news/embargoed/#\n").unwrap();
    b.broker.reload().unwrap();
    let (mut phone, ack) = RawClient::connect(b.addr, persistent).await;
    assert!(ack.session_present);
    let m = expect_publish(&mut phone).await;
    assert_eq!(m.topic, "news/open");
    phone.send(&Packet::PubAck(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(b.broker.metrics().acl_denied_delivery.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// `openssl s_client` against `port`, saving or reusing a TLS session in `session`; whether
/// the handshake was a resumption ("Reused") or a full one ("New").
fn s_client(port: u16, ca: &Path, session: &Path, save: bool, extra: &[&str]) -> &'static str {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
        .args(["-CAfile", ca.to_str().unwrap(), if save { "-sess_out" } else { "-sess_in" }])
        .arg(session)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl (scripts/install-deps.sh)");
    let stdin = child.stdin.take().unwrap();
    if save {
        // The client writes the file when a session arrives (a TLS 1.3 ticket comes after the
        // handshake): it stays connected until then; its input closed ends it.
        wait_until_blocking("openssl s_client to save a TLS session", || {
            std::fs::read_to_string(session).is_ok_and(|t| t.contains("END SSL SESSION PARAMETERS"))
        });
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    if out.lines().any(|l| l.starts_with("Reused,")) {
        "Reused"
    } else if out.lines().any(|l| l.starts_with("New,")) {
        "New"
    } else {
        panic!("no handshake: {out}")
    }
}

/// TLS session resumption (RFC 8446 section 2.2, RFC 5077): a client that comes back resumes
/// without a full handshake, by ticket or (TLS 1.2) by session id; with a `[tls]
/// ticket_key_file` a ticket opens on another process given the same secret (a restart, another
/// node), and not on one without it; a reload keeps resumption working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_by_ticket_on_any_process_sharing_the_key_and_by_session_id() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "device-1");
    let d = |f: &str| toml_path(&dir.path().join(f));
    let ca = dir.path().join("ca.pem");
    let key = dir.path().join("ticket.key");
    std::fs::write(&key, (0..64u8).map(|i| i.wrapping_mul(37)).collect::<Vec<_>>()).unwrap();
    let listener = format!(
        "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n",
        d("server.pem"),
        d("server.key")
    );
    let shared = format!("{listener}[tls]\nticket_key_file = {}\n", toml_path(&key));
    let a = start_at(&dir.path().join("a"), &shared);
    let b = start_at(&dir.path().join("b"), &shared);
    let alone = start_at(&dir.path().join("c"), &listener);
    let ticket = dir.path().join("a.session");
    assert_eq!(s_client(a.addrs[1].port(), &ca, &ticket, true, &[]), "New");
    assert_eq!(s_client(a.addrs[1].port(), &ca, &ticket, false, &[]), "Reused", "the same process");
    let ticket = dir.path().join("a2.session");
    assert_eq!(s_client(a.addrs[1].port(), &ca, &ticket, true, &[]), "New");
    assert_eq!(s_client(b.addrs[1].port(), &ca, &ticket, false, &[]), "Reused", "another process, same secret");
    let ticket = dir.path().join("a3.session");
    assert_eq!(s_client(a.addrs[1].port(), &ca, &ticket, true, &[]), "New");
    assert_eq!(s_client(alone.addrs[1].port(), &ca, &ticket, false, &[]), "New", "another secret: full handshake");

    // Random keys of its own: resumption on the same process, kept across a reload.
    let port = alone.addrs[1].port();
    let ticket = dir.path().join("c.session");
    assert_eq!(s_client(port, &ca, &ticket, true, &[]), "New");
    alone.broker.reload().unwrap();
    assert_eq!(s_client(port, &ca, &ticket, false, &[]), "Reused", "after a reload");
    // TLS 1.2 without tickets: the server's session cache.
    let id = dir.path().join("c.id");
    let tls12 = ["-tls1_2", "-no_ticket"];
    assert_eq!(s_client(port, &ca, &id, true, &tls12), "New");
    assert_eq!(s_client(port, &ca, &id, false, &tls12), "Reused", "by session id");
    let resumed = |b: &TestBroker| b.broker.metrics().tls_resumed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((resumed(&a), resumed(&b), resumed(&alone)), (1, 1, 2), "herald_tls_resumed_total");
}

/// A reconnect storm's admission (`mqtt.max_handshakes`, docs/security.md): with one
/// handshake computed at a time, fifty TLS clients arriving together (rustls, as phones'
/// libraries) are all taken in turn and get their CONNACK; none is refused or left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_arriving_together_are_all_served_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "device-1");
    let d = |f: &str| toml_path(&dir.path().join(f));
    let config = format!(
        "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n[mqtt]\nmax_handshakes = 1\n",
        d("server.pem"),
        d("server.key")
    );
    let b = start_at(&dir.path().join("data"), &config);
    let tls = Arc::new(herald::tls::client_config(Some(&dir.path().join("ca.pem"))).unwrap());
    let addr = b.addrs[1];
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let tls = tls.clone();
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.expect("handshake");
                let mut out = bytes::BytesMut::new();
                Packet::Connect(Box::new(connect_packet(ProtocolVersion::V3_1_1, &format!("storm-{i}"), true)))
                    .encode(ProtocolVersion::V3_1_1, &mut out);
                tokio::io::AsyncWriteExt::write_all(&mut s, &out).await.unwrap();
                let mut ack = [0u8; 4];
                tokio::io::AsyncReadExt::read_exact(&mut s, &mut ack).await.unwrap();
                assert_eq!(ack, [0x20, 2, 0, 0], "accepted, no session present [MQTT-3.2.2-1]");
                s
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in clients {
        held.push(tokio::time::timeout(Duration::from_secs(30), c).await.expect("served in turn").unwrap());
    }
    assert_eq!(b.broker.metrics().handshake_waits_abandoned.load(std::sync::atomic::Ordering::Relaxed), 0);
    wait_until("fifty TLS clients connected", || b.broker.metrics().connections_now() == 50).await;
}
