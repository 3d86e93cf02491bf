//! The HTTP server of `[http] bind`: `/metrics`, `/healthz`, `/readyz` and the admin API under
//! `/api/v1` (docs/http-api.md).
//!
//! A small HTTP/1.1 server of our own rather than a framework: the API is a handful of JSON
//! endpoints, and every crate added rebuilds RocksDB's C++ in CI. It reads one request at a
//! time per connection (keep-alive, no pipelining), with bounded heads and bodies, a bounded
//! number of connections and an idle timeout; it never answers chunked request bodies.

mod api;
pub mod prometheus;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::broker::Broker;

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body: a publish of a large story with its payload in base64.
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// HTTP connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// How long a connection may sit between requests, or take to send one.
const IDLE: Duration = Duration::from_secs(30);

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

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Accepts HTTP connections until the task is aborted at shutdown.
pub async fn serve(broker: Arc<Broker>, listener: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(&broker, stream).await {
                debug!(%peer, error = %e, "http connection closed");
            }
            drop(permit);
        });
    }
}

async fn serve_connection(broker: &Arc<Broker>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let request = match tokio::time::timeout(IDLE, read_request(&mut stream, &mut buf)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(Err(refusal)))) => {
                write_response(&mut stream, &refusal, true).await?;
                return Ok(());
            }
            Ok(Ok(Some(Ok(r)))) => r,
        };
        let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let response = api::handle(broker, request).await;
        write_response(&mut stream, &response, close).await?;
        if close {
            return Ok(());
        }
    }
}

async fn write_response(stream: &mut TcpStream, r: &Response, close: bool) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
        r.status,
        reason_phrase(r.status),
        r.content_type,
        r.body.len()
    );
    for (k, v) in &r.extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&r.body).await?;
    stream.flush().await
}

/// Reads one request. `None`: the client closed between requests. `Some(Err)`: a request we
/// answer with an error and then close.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Result<Request, Response>>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Ok(Some(Err(Response::error(431, "request head larger than 16 KiB"))));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = match std::str::from_utf8(&buf[..head_end]) {
        Ok(h) => h.to_owned(),
        Err(_) => return Ok(Some(Err(Response::error(400, "request head is not UTF-8")))),
    };
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(Some(Err(Response::error(400, "malformed request line"))));
    };
    if !version.starts_with("HTTP/1.") {
        return Ok(Some(Err(Response::error(400, "only HTTP/1.x is served"))));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Ok(Some(Err(Response::error(400, "malformed header line"))));
        };
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    if header("transfer-encoding").is_some() {
        return Ok(Some(Err(Response::error(501, "chunked request bodies are not supported; send content-length"))));
    }
    let length = match header("content-length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(Ok(_)) => return Ok(Some(Err(Response::error(413, "request body larger than 8 MiB")))),
        Some(Err(_)) => return Ok(Some(Err(Response::error(400, "invalid content-length")))),
    };
    while buf.len() < length {
        let mut chunk = vec![0u8; (length - buf.len()).min(64 * 1024)];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(path) = percent_decode(path) else {
        return Ok(Some(Err(Response::error(400, "invalid percent-encoding in the path"))));
    };
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (percent_decode(k), percent_decode(v)) {
            (Some(k), Some(v)) => params.push((k, v)),
            _ => return Ok(Some(Err(Response::error(400, "invalid percent-encoding in the query")))),
        }
    }
    Ok(Some(Ok(Request { method: method.to_owned(), path, query: params, headers, body })))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes `%XX` escapes; None for a broken escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
