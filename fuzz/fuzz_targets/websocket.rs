//! Arbitrary bytes after a valid WebSocket upgrade request, through the edge Herald runs for a
//! `ws` listener: the upgrade, the framing layer with its pre-CONNECT budget, and the MQTT
//! connection behind it, over a real loopback TCP connection (the connection drives its socket
//! by readiness). The first byte picks whether the upgrade request is sent first
//! (mostly) or the data alone is the whole input. Nothing may panic or hang.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    broker: Arc<herald::broker::Broker>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // A Rust binary's runtime ignores SIGPIPE before `main` (so does `herald`); libFuzzer's
        // `main` does not, and a write to a socket the other side closed would kill the run.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\n[mqtt]\nconnect_timeout = 1\n\
             [storage]\npath = {:?}\n[sys]\ninterval = 0\n",
            dir.path().display().to_string()
        );
        let config = herald::config::Config::parse(&text).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let server = herald::server::open(config).unwrap();
        World { rt, broker: server.broker().clone(), _dir: dir }
    })
}

const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else { return };
    let w = world();
    w.rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let origin = herald::connection::Origin {
            peer: "127.0.0.1:1".parse().unwrap(),
            loopback: true,
            listener: 0,
            certificate_name: None,
        };
        let edge = tokio::spawn(herald::listener::serve_websocket(w.broker.clone(), server, origin, Duration::from_secs(1)));
        if selector % 8 != 0 {
            let _ = client.write_all(UPGRADE).await;
        }
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut sink)).await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(3), edge).await.expect("the edge ends with its input").unwrap();
    });
});
