//! The `herald` binary as an operator runs it: configuration errors, the third-party conformance
//! vectors replayed against it, and a clean exit on SIGTERM.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

mod common;
use std::time::{Duration, Instant};

fn test_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("herald-test-{}-{name}", std::process::id()))
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = test_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the binary on an ephemeral port and returns it with the port it logged.
fn spawn_broker(name: &str) -> (Child, u16) {
    let dir = test_dir(name);
    let _ = std::fs::remove_dir_all(dir.join("data"));
    let config = temp_config(
        name,
        &format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[log]\nlevel = \"info\"\n",
            dir.join("data").display().to_string()
        ),
    );
    let (child, ports, _log) = common::spawn_herald(&config, 1);
    (child, ports[0])
}

#[test]
fn unknown_key_in_config_is_refused_with_its_name() {
    let config = temp_config("unknown", "[mqtt]\nmax_qeued_messages = 5\n");
    let out = Command::new(env!("CARGO_BIN_EXE_herald")).args(["--config", config.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_qeued_messages"), "{err}");
}

#[test]
fn invalid_value_in_config_is_refused_with_its_key() {
    let config = temp_config("invalid", "[mqtt]\nmax_inflight_messages = 0\n");
    let out = Command::new(env!("CARGO_BIN_EXE_herald")).args(["--config", config.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.max_inflight_messages"), "{err}");
}

/// The 1483 packet vectors of ../shared/conformance, each tied to a specification statement.
#[test]
fn conformance_vectors_all_pass() {
    let replay = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/conformance/replay.py");
    assert!(std::path::Path::new(replay).exists(), "{replay} is missing");
    let (mut broker, port) = spawn_broker("vectors");
    let out = Command::new("python3").args([replay, "--port", &port.to_string()]).output().unwrap();
    let _ = broker.kill();
    let _ = broker.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(text.contains("vectors: 1483 passed, 0 failed"), "{text}");
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(test_dir("vectors"));
}

#[test]
fn sigterm_stops_the_broker_cleanly() {
    let (mut broker, port) = spawn_broker("sigterm");
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    // A 5.0 client learns of the shutdown: DISCONNECT 0x8B.
    sock.write_all(&[0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 3, b's', b'i', b'g']).unwrap();
    let mut connack = [0u8; 2];
    sock.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 9]);
    let mut rest = [0u8; 9];
    sock.read_exact(&mut rest).unwrap();
    let status = Command::new("kill").args(["-TERM", &broker.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut disconnect = [0u8; 3];
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.read_exact(&mut disconnect).unwrap();
    assert_eq!(disconnect, [0xE0, 0x01, 0x8B]);
    let started = Instant::now();
    loop {
        if let Some(status) = broker.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "broker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(test_dir("sigterm"));
}

/// [issue 4] A store RocksDB cannot read stops the broker with an error naming it; the broker
/// never starts afresh over it, and leaves its files where they are.
#[test]
fn a_corrupted_store_stops_the_broker_with_a_clear_error() {
    let (mut broker, _) = spawn_broker("corrupt");
    let _ = broker.kill();
    let _ = broker.wait();
    let dir = test_dir("corrupt");
    let current = dir.join("data").join("CURRENT");
    assert!(current.exists(), "the first run created a store");
    std::fs::write(&current, b"garbage").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--config", dir.join("config.toml").to_str().unwrap()])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store at") && err.contains("data"), "{err}");
    assert_eq!(std::fs::read(&current).unwrap(), b"garbage", "the store was left as it was");
    let _ = std::fs::remove_dir_all(dir);
}
