//! Browsers in the test suite: Debian's headless Chromium, driven over the DevTools protocol by
//! playwright-core (tests/js/browser.mjs), on pages served by Herald (the dashboard) or by the
//! test (an EventSource reader, MQTT.js's browser bundle).

mod common;

use common::*;
use std::process::Command;

/// The dashboard signs in with the token, loads, and its figures change when a reader connects
/// and a story is published: the clients table, the topics, and the story with its receipt
/// (acknowledged by the MQTT reader, delivered to the dashboard's own stream). A screenshot is
/// kept in target/artifacts/dashboard.png.
#[test]
fn the_dashboard_shows_clients_stories_and_receipts_live() {
    let b = start_toml("[http]\nbind = \"127.0.0.1:0\"\ntoken = \"dash-token\"\n");
    let http = b.broker.http_addr().unwrap();
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mqtt = format!("mqtt://127.0.0.1:{}", b.port());
    let mut node = NodeScript::start(
        "browser.mjs",
        &["dashboard", &format!("http://{http}"), "dash-token", &mqtt, shot.to_str().unwrap()],
    );
    let loaded = node.step("loaded");
    assert_eq!(loaded["stories"], 0, "{loaded}");
    let changed = node.step("changed");
    node.finish();
    assert!(changed["clients"].as_u64().unwrap() >= loaded["clients"].as_u64().unwrap() + 2, "{changed}");
    let story = changed["story"].as_str().unwrap();
    assert!(story.contains("[elections-1] Polls close in the east"), "{story}");
    assert!(
        story.contains("routed 2") && story.contains("acknowledged 1") && story.contains("delivered (QoS 0) 1"),
        "{story}"
    );
    let rows = changed["rows"].to_string();
    assert!(rows.contains("httpsse1") && rows.contains("mqtt 5.0"), "clients by listener and protocol: {rows}");
    assert!(changed["topics"].to_string().contains("news/#1"), "{changed}");
    assert_eq!(changed["degraded"], "normal");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

fn publish(port: u16, topic: &str, payload: &str, story: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-V", "5", "-q", "1", "-t", topic, "-m", payload])
        .args(["-D", "publish", "user-property", "story-id", story])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// An EventSource page (client_id: a persistent session) receives two stories; the broker is
/// stopped and started again; a third story is published while the page is away. The browser
/// reconnects by itself with Last-Event-ID and gets the third, and not the first two again.
#[test]
fn an_eventsource_page_resumes_after_the_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {}\n\
             [http]\nbind = \"127.0.0.1:{http_port}\"\n[http.readers]\nretry_ms = 3000\n[sys]\ninterval = 0\n",
            toml_path(&dir.path().join("data"))
        ),
    )
    .unwrap();
    let (mut herald, ports, _log) = spawn_herald(&config, 1);
    let mut node = NodeScript::start("browser.mjs", &["eventsource", &format!("http://127.0.0.1:{http_port}")]);
    node.step("open");
    publish(ports[0], "news/a", "story 1", "es-1");
    publish(ports[0], "news/a", "story 2", "es-2");
    node.say("expect 2");
    let got = node.step("got");
    assert_eq!(got["events"].as_array().unwrap().len(), 2, "{got}");

    let _ = Command::new("kill").args(["-TERM", &herald.id().to_string()]).status();
    assert!(herald.wait().unwrap().success());
    let (mut herald, ports, _log) = spawn_herald(&config, 1);
    let http: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    wait_until_blocking("the HTTP server", || std::net::TcpStream::connect(http).is_ok());
    let (_, client) = http_json(http, "GET", "/api/v1/clients/browser-reader-1", "");
    assert_eq!(client["connected"], false, "the page has not come back yet (retry: 3 s): {client}");
    publish(ports[0], "news/a", "story 3", "es-3");
    let (_, receipt) = http_json(http, "GET", "/api/v1/messages/es-3/receipts", "");
    assert_eq!(receipt["queued"], 1, "story 3 waited in the page's session: {receipt}");
    node.say("reconnected?");
    assert_eq!(node.step("reconnected")["present"], true);
    node.say("expect 3");
    let got = node.step("got");
    let payloads: Vec<&str> =
        got["events"].as_array().unwrap().iter().map(|e| e["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["story 1", "story 2", "story 3"], "{got}");
    node.say("done");
    node.step("done");
    node.finish();
    let _ = herald.kill();
    let _ = herald.wait();
}

/// MQTT.js's browser bundle on a page served by the test connects over ws and wss, subscribes
/// to news/#, and shows a retained and a live story; the same page from an origin the
/// listeners do not allow is refused (403 on the upgrade).
#[test]
fn mqtt_js_in_a_page_over_ws_and_wss_and_the_origin_check() {
    let dir = tempfile::tempdir().unwrap();
    generate_certs(dir.path());
    let page_port = free_port();
    let origins = format!("allowed_origins = [\"http://localhost:{page_port}\"]");
    let b = start_toml(&format!(
        "[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\n{origins}\n\
         [[listeners]]\nprotocol = \"wss\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n{origins}\n",
        toml_path(&dir.path().join("server.pem")),
        toml_path(&dir.path().join("server.key"))
    ));
    let out = Command::new("mosquitto_pub")
        .args(["-p", &b.port().to_string(), "-t", "news/kept", "-m", "a retained story", "-r", "-q", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ws = format!("ws://127.0.0.1:{}/mqtt", b.addrs[1].port());
    let wss = format!("wss://127.0.0.1:{}/mqtt", b.addrs[2].port());
    let mqtt = format!("mqtt://127.0.0.1:{}", b.port());
    let mut node = NodeScript::start("browser.mjs", &["mqttjs", &ws, &wss, &mqtt, &page_port.to_string()]);
    for transport in ["ws", "wss"] {
        let page = node.step("page");
        assert_eq!(page["transport"], transport);
        let got: Vec<&str> = page["got"].as_array().unwrap().iter().map(|g| g.as_str().unwrap()).collect();
        assert_eq!(
            got,
            [
                "retained news/kept: a retained story".to_string(),
                format!("live news/live/{transport}: live over {transport}")
            ]
        );
        let refused = node.step("refused");
        assert!(refused["console"].to_string().contains("403"), "refused by the origin check: {refused}");
    }
    node.step("done");
    node.finish();
}
