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

/// `herald --version` prints the version; `herald check-config PATH` validates a file without
/// starting anything: 0 and "valid" for the packaged config.toml, non-zero naming the key for a
/// bad value, non-zero naming the file for one that is missing; an unknown flag is a usage
/// error (2), as before clap.
#[test]
fn version_and_check_config() {
    let herald = env!("CARGO_BIN_EXE_herald");
    let out = Command::new(herald).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("herald {}", env!("CARGO_PKG_VERSION")));

    let packaged = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = Command::new(herald).args(["check-config", packaged]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    let bad = temp_config("check-bad", "[cluster]\nnode = \"a.b\"\nnats = [\"nats://127.0.0.1:4222\"]\n");
    let out = Command::new(herald).args(["check-config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster.node"), "{err}");

    let out = Command::new(herald).args(["check-config", "/nonexistent/herald.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/herald.toml"));

    let out = Command::new(herald).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
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

/// [issue 12] README's run command, read from README.md and run exactly as written from the
/// repository's root, starts a broker with the default `config.toml` that a real client
/// (mosquitto_pub, QoS 1) can use on 127.0.0.1:1883, and that stops cleanly on SIGTERM. The
/// command once found two binaries and started neither; this keeps it from breaking unnoticed.
#[test]
fn the_readme_run_command_starts_a_broker_a_client_can_use() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let after =
        readme.split("Run the broker with the default `config.toml`").nth(1).expect("README names the run command");
    let command = after.lines().find(|l| l.starts_with("    ")).expect("an indented command").trim().to_owned();
    assert_eq!(command, "bash scripts/run.sh", "README's run command changed: update this test with it");
    // Two suites on one machine (a stress loop and a CI run, say) would both want 1883: one at
    // a time, across processes.
    let lock = std::fs::File::create(std::env::temp_dir().join("herald-readme-run-1883.lock")).unwrap();
    lock.lock().unwrap();
    if std::net::TcpListener::bind("127.0.0.1:1883").is_err() {
        panic!("127.0.0.1:1883 is taken by another program: the default config.toml needs it");
    }
    let log_path = std::env::temp_dir().join(format!("herald-readme-run-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    // A session of its own, so that SIGTERM reaches whatever process the command ends as. The
    // environment is a shell's: without the `CARGO_*` variables cargo set for this test (ring's
    // build script watches CARGO_MANIFEST_DIR, CARGO_PKG_NAME and more, so inheriting them made
    // the inner cargo rebuild ring, rustls and Herald, and the next `cargo test` rebuild them
    // back).
    let mut shell = Command::new("setsid");
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key == "CARGO" || key.starts_with("CARGO_")) && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            shell.env_remove(&key);
        }
    }
    let mut child = shell
        .args(["bash", "-c", &command])
        .current_dir(root)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // The build is normally done already (the suite built the same profile); a cold one takes
    // minutes.
    let deadline = Instant::now() + Duration::from_secs(1200);
    while std::net::TcpStream::connect("127.0.0.1:1883").is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("`{command}` exited with {status} before listening:\n{}", output());
        }
        assert!(Instant::now() < deadline, "`{command}` never listened on 1883:\n{}", output());
        std::thread::sleep(Duration::from_millis(100));
    }
    let published = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", "news/readme", "-m", "It runs"])
        .output()
        .unwrap();
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            panic!("`{command}` did not stop on SIGTERM:\n{}", output());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(published.status.success(), "mosquitto_pub: {}\n{}", String::from_utf8_lossy(&published.stderr), output());
    assert!(status.success(), "exit status {status}:\n{}", output());
    assert!(output().contains("client connected"), "{}", output());
    let _ = std::fs::remove_file(&log_path);
}

/// [issue 12] A store write that fails while running (here: the disk is full) stops the broker
/// through the server, not from inside the store: the publish that could not be written is never
/// acknowledged, the failure is logged, and the process exits with the documented status 74.
/// The store lives on a 64 MB tmpfs mounted in a mount namespace of the broker's own
/// (`unshare`, util-linux), so the test needs no root and fills no real disk.
#[test]
fn a_store_write_failure_stops_the_broker_with_status_74() {
    let dir = test_dir("disk-full");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = temp_config(
        "disk-full",
        &format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {:?}\ndurability = \"wal\"\n[log]\nlevel = \"info\"\n",
            data.display().to_string()
        ),
    );
    let mut command = Command::new("unshare");
    command.args([
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs -o size=64m tmpfs \"$1\" && exec \"$2\" --config \"$3\"",
    ]);
    command.args(["sh", data.to_str().unwrap(), env!("CARGO_BIN_EXE_herald"), config.to_str().unwrap()]);
    let (mut broker, ports, log) = common::spawn_herald_command(command, 1);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Distinct retained topics of 256 KiB each, at QoS 1: each PUBACK waits for its write. The
    // payloads are pseudo-random: the store compresses with LZ4, and repeated bytes would never
    // fill anything.
    let (acked, unacked) = rt.block_on(async {
        use herald::codec::{Packet, ProtocolVersion, QoS};
        let connect = common::connect_packet(ProtocolVersion::V3_1_1, "filler", true);
        let (mut c, _) = common::RawClient::connect(addr, connect).await;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut acked = 0u32;
        for i in 1..=2000u16 {
            let payload: Vec<u8> = (0..256 * 1024 / 8)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()
                })
                .collect();
            let mut p = common::publish_msg(&format!("archive/{i}"), &payload, QoS::AtLeastOnce, i);
            p.retain = true;
            if !c.try_send(&Packet::Publish(p)).await {
                return (acked, i);
            }
            match c.recv_within(Duration::from_secs(20)).await {
                Ok(Some(Packet::PubAck(a))) if a.packet_id == i => acked += 1,
                _ => return (acked, i),
            }
        }
        panic!("2000 x 256 KiB fitted in a 64 MB store");
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = broker.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the broker kept running after the write failed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<String> = log.try_iter().collect();
    assert_eq!(status.code(), Some(74), "exit status; log:\n{}", lines.join("\n"));
    assert!(acked > 10, "the store took {acked} messages before it was full");
    assert!(
        lines.iter().any(|l| l.contains("writing to the store failed")),
        "the failure is logged:\n{}",
        lines.join("\n")
    );
    println!("{acked} messages acknowledged; message {unacked} was not, and the broker exited 74");
    let _ = std::fs::remove_dir_all(dir);
}
