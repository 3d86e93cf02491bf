//! Arbitrary bytes as an HTTP connection to the admin server: hyper's parser with our
//! settings, our request conversion, the token check and every endpoint, over an in-memory
//! pipe to a real broker (its store in a temporary directory). Nothing may panic and the
//! connection must end once the input does.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    broker: Arc<herald::broker::Broker>,
    builder: hyper::server::conn::http1::Builder,
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
            "[http]\nbind = \"127.0.0.1:0\"\ntoken = \"secret\"\nheader_timeout_ms = 200\nbody_timeout_ms = 200\n\
             [storage]\npath = {:?}\n[sys]\ninterval = 0\n",
            dir.path().display().to_string()
        );
        let config = herald::config::Config::parse(&text).unwrap();
        let builder = herald::http::builder(config.http.as_ref().unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let server = herald::server::open(config).unwrap();
        World { rt, broker: server.broker().clone(), builder, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let conn = herald::http::serve_connection(&w.builder, w.broker.clone(), server, ([127, 0, 0, 1], 9).into(), || {});
        let conn = tokio::spawn(conn);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut sink)).await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(2), conn).await.expect("the connection ends with its input");
    });
});
