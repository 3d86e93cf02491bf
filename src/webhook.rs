//! The hand-off of undelivered messages [issue 7]: each is published to
//! `$SYS/broker/herald/undelivered` and, with `[delivery] webhook`, POSTed as JSON to a URL, so
//! that a newsroom can fall back to app push notifications or SMS.
//!
//! A plain HTTP/1.1 client of our own (http:// only: a TLS client would need a root store and
//! more crates; put a local relay in front of an https endpoint). Events go through a bounded
//! queue to one task; when the endpoint is slower than the events, the excess is dropped and
//! counted, never waited for on the message path.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::HttpEndpoint as Endpoint;

/// Posts each event to the endpoint, one at a time, each with a 5 s timeout; failures are
/// logged and counted, and the event is not retried (the `$SYS` copy is the durable record of
/// the hand-off for anyone subscribed).
pub async fn run(
    endpoint: Endpoint,
    mut events: mpsc::Receiver<Vec<u8>>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    while let Some(body) = events.recv().await {
        let result = tokio::time::timeout(Duration::from_secs(5), post(&endpoint, &body)).await;
        let error = match result {
            Ok(Ok(status)) if (200..300).contains(&status) => continue,
            Ok(Ok(status)) => format!("status {status}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        warn!(host = %endpoint.host, port = endpoint.port, error = %error, "undelivered webhook failed");
    }
}

async fn post(endpoint: &Endpoint, body: &[u8]) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: {}:{}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nuser-agent: herald/{}\r\n\r\n",
        endpoint.path,
        endpoint.host,
        endpoint.port,
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    // The status line is all we need.
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&answer);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_http_urls_only() {
        assert_eq!(
            Endpoint::parse("http://push.internal:9000/herald/undelivered"),
            Some(Endpoint { host: "push.internal".into(), port: 9000, path: "/herald/undelivered".into() })
        );
        assert_eq!(Endpoint::parse("http://relay").unwrap().port, 80);
        assert_eq!(Endpoint::parse("http://relay").unwrap().path, "/");
        assert!(Endpoint::parse("https://relay/x").is_none());
        assert!(Endpoint::parse("http://:80/").is_none());
        assert!(Endpoint::parse("http://relay:notaport/").is_none());
    }
}
