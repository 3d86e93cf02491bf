//! Interoperability with real third-party clients: the `rumqttc` crate (3.1.1 and 5.0),
//! Mosquitto's `mosquitto_pub` / `mosquitto_sub`, and Python `paho-mqtt` 2.x.
#![allow(clippy::field_reassign_with_default)] // properties read best set one by one in tests

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn rumqttc_v4_publish_and_subscribe_at_every_qos() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let b = start();
    let mut opts = MqttOptions::new("rumqttc-sub", "127.0.0.1", b.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_loop) = AsyncClient::new(opts, 100);
    sub.subscribe("news/#", QoS::ExactlyOnce).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Some((p.topic.clone(), p.qos, p.payload.to_vec())));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap(), Some(None), "SUBACK");
    let (publisher, mut pub_loop) = AsyncClient::new(MqttOptions::new("rumqttc-pub", "127.0.0.1", b.port()), 100);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        publisher.publish(format!("news/{i}"), qos, false, format!("story {i}")).await.unwrap();
    }
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        let got = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, (format!("news/{i}"), qos, format!("story {i}").into_bytes()));
    }
}

#[tokio::test]
async fn rumqttc_v5_receives_subscription_identifier_and_user_properties() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let b = start();
    let (sub, mut sub_loop) = AsyncClient::new(MqttOptions::new("v5-sub", "127.0.0.1", b.port()), 100);
    let props = SubscribeProperties { id: Some(42), user_properties: vec![] };
    sub.subscribe_with_properties("news/+/breaking", QoS::AtLeastOnce, props).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Some(p));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    assert!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().is_none());
    let (publisher, mut pub_loop) = AsyncClient::new(MqttOptions::new("v5-pub", "127.0.0.1", b.port()), 100);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let props = PublishProperties {
        user_properties: vec![("story-id".into(), "s-1".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    publisher.publish_with_properties("news/world/breaking", QoS::AtLeastOnce, false, "flash", props).await.unwrap();
    let p = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(&p.payload[..], b"flash");
    let props = p.properties.expect("properties pass through");
    assert_eq!(props.subscription_identifiers, vec![42]);
    assert_eq!(props.user_properties, vec![("story-id".to_string(), "s-1".to_string())]);
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
}

fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--help").output().is_ok()
}

#[test]
fn mosquitto_sub_receives_what_mosquitto_pub_sends_v311_and_v5() {
    assert!(have("mosquitto_sub"), "mosquitto-clients missing: run scripts/install-deps.sh");
    let b = start();
    let port = b.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let topic = format!("news/tech/{version}");
        let sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", "news/tech/#", "-q", "1"])
            .args(["-C", "2", "-W", "10", "-v"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_until_blocking("mosquitto_sub to subscribe", || b.broker.subscription_count() == 1);
        for (qos, msg) in [("1", "first story"), ("2", "second story")] {
            let st = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", &topic, "-q", qos, "-m", msg])
                .status()
                .unwrap();
            assert!(st.success());
        }
        let out = sub.wait_with_output().unwrap();
        assert!(out.status.success(), "mosquitto_sub failed");
        wait_until_blocking("mosquitto_sub's session to end", || b.broker.subscription_count() == 0);
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text, format!("{topic} first story\n{topic} second story\n"));
    }
}

#[test]
fn mosquitto_sub_gets_retained_message_and_sys_topics_stay_out_of_hash() {
    let b = start();
    let port = b.port().to_string();
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", "news/top", "-r", "-q", "1", "-m", "headline"])
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", "#", "-C", "1", "-W", "5", "-v"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "news/top headline\n");
}

const PAHO_SCRIPT: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port = int(sys.argv[1]); proto = mqtt.MQTTv5 if sys.argv[2] == "5" else mqtt.MQTTv311
got = []; done = threading.Event(); subscribed = threading.Event()
def on_message(c, u, m):
    got.append((m.topic, m.qos, m.payload.decode(), m.retain))
    if len(got) == 3: done.set()
sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="paho-sub", protocol=proto)
sub.on_message = on_message
sub.on_subscribe = lambda *a: subscribed.set()
sub.connect("127.0.0.1", port, 30)
sub.loop_start()
sub.subscribe("news/#", qos=2)
assert subscribed.wait(5), "no SUBACK"
pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=proto)
pub.connect("127.0.0.1", port, 30)
pub.loop_start()
for q in (0, 1, 2):
    pub.publish("news/paho/%d" % q, "story %d" % q, qos=q).wait_for_publish(5)
assert done.wait(5), "received %r" % got
assert sorted(got) == [("news/paho/%d" % q, q, "story %d" % q, False) for q in (0, 1, 2)], got
print("paho ok", len(got))
"#;

#[test]
fn paho_mqtt_2_publish_and_subscribe_v311_and_v5() {
    let b = start();
    for version in ["4", "5"] {
        let out = Command::new("python3")
            .args(["-c", PAHO_SCRIPT, &b.port().to_string(), version])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "paho (protocol {version}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("paho ok 3"));
    }
}

/// Node's MQTT.js over TCP, ws and wss, 3.1.1 and 5.0: retained and live messages at every QoS
/// in order, user properties and subscription identifiers on 5.0 (tests/js/interop.mjs).
#[test]
fn mqtt_js_over_tcp_ws_and_wss_v311_and_v5() {
    let dir = tempfile::tempdir().unwrap();
    generate_certs(dir.path());
    let path = |f: &str| format!("{:?}", dir.path().join(f).display().to_string());
    let b = start_toml(&format!(
        "[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"wss\"\nbind = \"127.0.0.1:0\"\ncert = {}\nkey = {}\n",
        path("server.pem"),
        path("server.key")
    ));
    let urls = [
        format!("mqtt://127.0.0.1:{}", b.addrs[0].port()),
        format!("ws://127.0.0.1:{}/mqtt", b.addrs[1].port()),
        // The certificate names localhost; MQTT.js checks it.
        format!("wss://localhost:{}/mqtt", b.addrs[2].port()),
    ];
    let ca = dir.path().join("ca.pem");
    let out =
        Command::new("node").arg("interop.mjs").arg(&ca).args(&urls).current_dir(js_dir()).output().expect("node");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "MQTT.js: {text}{}", String::from_utf8_lossy(&out.stderr));
    let ok = text.lines().filter(|l| l.contains("\"ok\":true")).count();
    assert_eq!(ok, 6, "three transports, two versions: {text}");
}
