//! The HTTP server of `[http] bind`: `/metrics`, `/healthz`, `/readyz` and the admin API under
//! `/api/v1` (docs/http-api.md).
//!
//! hyper parses and frames HTTP/1.1 (keep-alive, pipelining, chunked bodies, and the refusals
//! RFC 9112 asks for: two differing `Content-Length`s, a malformed head). What is ours is the
//! edge around it, because the server sits in front of strangers:
//! - at most `max_connections` connections; when all are taken, the oldest connection that has
//!   not yet sent a whole request head is closed for the new one, so a slowloris never starves
//!   `/healthz` (a probe sends its request at once, an attacker's connections are the old ones);
//! - a request head must arrive within `header_timeout_ms` (also the keep-alive idle timeout)
//!   and be at most `max_head_bytes`; a body within `body_timeout_ms` and at most
//!   `max_body_bytes`;
//! - the bearer token is checked on the head, before any body is read.

mod api;
mod dashboard;
mod lean;
mod poll;
pub mod prometheus;
mod reader;
mod stream;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::broker::Broker;

pub struct Request {
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// Query parameters, percent-decoded (`+` stays `+`: it is a topic wildcard here).
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub extra_headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).expect("JSON values serialize");
        body.push(b'\n');
        Response { status, content_type: "application/json", body, extra_headers: Vec::new() }
    }

    /// An error: JSON with a message, the same shape for every endpoint.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

/// The connections that have not yet sent a whole request head, oldest first: the ones to
/// close when a new connection needs a slot.
#[derive(Default)]
struct Unstarted {
    next: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
}

/// Accepts HTTP connections until the task is aborted at shutdown.
pub async fn serve(broker: Arc<Broker>, listener: TcpListener) {
    let Some(config) = broker.config().http.clone() else { return };
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let unstarted = Arc::new(Mutex::new(Unstarted::default()));
    let builder = builder(&config);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room by closing the oldest connection still sending its first head.
                let oldest = unstarted.lock().expect("unstarted").waiting.pop_first();
                match oldest {
                    Some((_, evict)) => {
                        broker.metrics().http_evicted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        evict.notify_one();
                        match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned()).await {
                            Ok(Ok(p)) => p,
                            _ => continue,
                        }
                    }
                    // Every slot serves a request: this connection waits in the backlog's stead.
                    None => match slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        let evict = Arc::new(Notify::new());
        let id = {
            let mut u = unstarted.lock().expect("unstarted");
            let id = u.next;
            u.next += 1;
            u.waiting.insert(id, evict.clone());
            id
        };
        let broker = broker.clone();
        let unstarted = unstarted.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let started = unstarted.clone();
            // A whole head arrived: this connection is no longer a candidate for eviction.
            let on_head = move || {
                started.lock().expect("unstarted").waiting.remove(&id);
            };
            tokio::select! {
                r = lean::serve(&builder, broker, stream, peer, on_head) => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "http connection closed");
                    }
                }
                _ = evict.notified() => debug!(%peer, "http connection closed for a newer one: no request head yet"),
            }
            unstarted.lock().expect("unstarted").waiting.remove(&id);
            drop(permit);
        });
    }
}

/// hyper's HTTP/1.1 connection settings for `[http]`.
pub fn builder(config: &crate::config::Http) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_timeout_ms))
        .max_header_size(config.max_head_bytes)
        .keep_alive(true);
    builder
}

/// Serves one HTTP connection on any byte stream: a socket from the accept loop, or the fuzz
/// target's in-memory pipe. `on_head` runs for every complete request head.
pub async fn serve_connection<I>(
    builder: &hyper::server::conn::http1::Builder,
    broker: Arc<Broker>,
    io: I,
    peer: std::net::SocketAddr,
    on_head: impl Fn() + Send + Sync + 'static,
) -> hyper::Result<()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let on_head = Arc::new(on_head);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        on_head();
        let broker = broker.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(&broker, req, peer).await) }
    });
    builder.serve_connection(TokioIo::new(io), service).await
}

/// An answer's body: whole, or a stream of events.
type Body = Either<Full<Bytes>, stream::EventBody>;

/// Answers one request. A request answered 400 (its framing or its head may not be what the
/// client meant), or answered without its announced body being read, closes the connection after
/// the answer: hyper would otherwise go on to what follows in the same connection, which the
/// client cannot tell apart from a body, and a pipelined publish behind it could run unanswered.
async fn respond(
    broker: &Arc<Broker>,
    req: hyper::Request<Incoming>,
    peer: std::net::SocketAddr,
) -> hyper::Response<Body> {
    let has_body = req.headers().contains_key(hyper::header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0));
    let (mut response, body_read) = answer(broker, req, peer).await;
    if response.status() == hyper::StatusCode::BAD_REQUEST || (has_body && !body_read) {
        response.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    response
}

/// Turns one hyper request into ours, reading its body only once the token allows it; says
/// whether the body was read.
async fn answer(
    broker: &Arc<Broker>,
    req: hyper::Request<Incoming>,
    peer: std::net::SocketAddr,
) -> (hyper::Response<Body>, bool) {
    let (parts, body) = req.into_parts();
    let request = match Request::from_head(&parts) {
        Ok(r) => r,
        Err(refusal) => return (refusal.into_hyper(), false),
    };
    // Readers authenticate as MQTT clients do (reader.rs), not with the API's token.
    match (request.method.as_str(), request.path.trim_end_matches('/')) {
        ("GET", "/api/v1/stream") => {
            let answer = match stream::open(broker, request, peer).await {
                Ok(events) => {
                    let mut r = hyper::Response::new(Either::Right(events));
                    let h = r.headers_mut();
                    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/event-stream"));
                    h.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
                    // nginx would otherwise hold events back in its buffer.
                    h.insert("x-accel-buffering", hyper::header::HeaderValue::from_static("no"));
                    r
                }
                Err(refusal) => refusal.into_hyper(),
            };
            return (answer, false);
        }
        ("GET", "/api/v1/poll") => return (poll::poll(broker, request, peer).await.into_hyper(), false),
        _ => {}
    }
    let mut request = request;
    if let Some(refusal) = api::refuse_early(broker, &request) {
        return (refusal.into_hyper(), false);
    }
    let (max_body, body_timeout) = match &broker.config().http {
        Some(http) => (http.max_body_bytes, Duration::from_millis(http.body_timeout_ms)),
        None => (0, Duration::ZERO),
    };
    let too_large = || Response::error(413, format!("request body larger than {max_body} bytes (max_body_bytes)"));
    let announced = parts.headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max_body as u64) {
        return (too_large().into_hyper(), false);
    }
    let collected = tokio::time::timeout(body_timeout, Limited::new(body, max_body).collect()).await;
    request.body = match collected {
        Ok(Ok(b)) => b.to_bytes().to_vec(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return (too_large().into_hyper(), false);
        }
        Ok(Err(_)) => return (Response::error(400, "the request body could not be read").into_hyper(), false),
        Err(_) => return (Response::error(408, "the request body did not arrive in time").into_hyper(), false),
    };
    (api::handle(broker, request).await.into_hyper(), true)
}

impl Request {
    fn from_head(parts: &hyper::http::request::Parts) -> Result<Request, Response> {
        let Some(path) = percent_decode(parts.uri.path()) else {
            return Err(Response::error(400, "invalid percent-encoding in the path"));
        };
        let mut query = Vec::new();
        for pair in parts.uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(k), percent_decode(v)) {
                (Some(k), Some(v)) => query.push((k, v)),
                _ => return Err(Response::error(400, "invalid percent-encoding in the query")),
            }
        }
        let mut headers = Vec::new();
        for (k, v) in &parts.headers {
            // A header that is not text is kept out rather than guessed at.
            if let Ok(v) = v.to_str() {
                headers.push((k.as_str().to_owned(), v.to_owned()));
            }
        }
        Ok(Request { method: parts.method.as_str().to_owned(), path, query, headers, body: Vec::new() })
    }
}

impl Response {
    fn into_hyper(self) -> hyper::Response<Body> {
        let mut r = hyper::Response::new(Either::Left(Full::new(Bytes::from(self.body))));
        *r.status_mut() = hyper::StatusCode::from_u16(self.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = r.headers_mut();
        headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(self.content_type));
        for (k, v) in self.extra_headers {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
                headers.insert(k, v);
            }
        }
        r
    }
}

/// Decodes `%XX` escapes; None for a broken escape or a result that is not UTF-8.
/// (`percent-encoding` passes a broken escape through as it is; we refuse it.)
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
        let hex = bytes.get(i + 1..i + 3)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
    }
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_plus_and_refuses_broken_escapes() {
        assert_eq!(percent_decode("news/%23").as_deref(), Some("news/#"));
        assert_eq!(percent_decode("news/+/x").as_deref(), Some("news/+/x"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }
}
