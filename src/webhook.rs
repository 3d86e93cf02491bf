//! The hand-off of undelivered messages [issue 7]: each is published to
//! `$SYS/broker/herald/undelivered` and, with `[delivery] webhook`, POSTed as JSON to a URL, so
//! that a newsroom can fall back to app push notifications or SMS.
//!
//! The client is hyper-util's, over rustls (ring) for `https://` with Mozilla's roots and an
//! optional private CA (`delivery.webhook_ca_file`). Events go through a bounded queue
//! (`delivery.webhook_queue`) to one task, which posts them in order and tries a failed one
//! again `webhook_retries` times with a doubling wait; when the endpoint is slower than the
//! events, the excess is dropped and counted where it is queued, never waited for on the
//! message path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::{DeliveryConfig, HttpEndpoint as Endpoint};

/// Posts each event to the endpoint, one at a time, trying a failed one again; failures are
/// logged and counted (the `$SYS` copy is the durable record of the hand-off).
pub async fn run(
    endpoint: Endpoint,
    config: DeliveryConfig,
    tls: rustls::ClientConfig,
    mut events: mpsc::Receiver<Vec<u8>>,
    failures: Arc<AtomicU64>,
) {
    let client = crate::tls::https_client(tls);
    let timeout = Duration::from_millis(config.webhook_timeout_ms);
    while let Some(body) = events.recv().await {
        let body = Bytes::from(body);
        let mut wait = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            let error = match tokio::time::timeout(timeout, post(&client, &endpoint, body.clone())).await {
                Ok(Ok(status)) if (200..300).contains(&status) => break,
                Ok(Ok(status)) => format!("status {status}"),
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_owned(),
            };
            let again = attempt < config.webhook_retries && retryable(&error);
            warn!(
                url = %endpoint.uri,
                error = %error,
                attempt = attempt + 1,
                retrying = again,
                "undelivered webhook failed"
            );
            if !again {
                failures.fetch_add(1, Ordering::Relaxed);
                break;
            }
            attempt += 1;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

/// A client error (4xx but 429) will not get better by asking again.
fn retryable(error: &str) -> bool {
    match error.strip_prefix("status ").and_then(|s| s.parse::<u16>().ok()) {
        Some(status) => status >= 500 || status == 429,
        None => true,
    }
}

async fn post(client: &crate::tls::HttpsClient, endpoint: &Endpoint, body: Bytes) -> Result<u16, String> {
    let request = hyper::Request::post(endpoint.uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| crate::tls::error_text(&e))?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_http_and_https_urls() {
        let e = Endpoint::parse("http://push.internal:9000/herald/undelivered").unwrap();
        assert_eq!(
            (e.uri.host(), e.uri.port_u16(), e.uri.path()),
            (Some("push.internal"), Some(9000), "/herald/undelivered")
        );
        assert!(Endpoint::parse("https://relay/x").is_some());
        assert!(Endpoint::parse("ftp://relay/x").is_none());
        assert!(Endpoint::parse("http://:80/").is_none());
        assert!(Endpoint::parse("http://relay:notaport/").is_none());
        assert!(Endpoint::parse("relay/x").is_none());
    }

    #[test]
    fn client_errors_are_not_retried() {
        assert!(retryable("status 503") && retryable("status 429") && retryable("timed out"));
        assert!(!retryable("status 404") && !retryable("status 400"));
    }
}
