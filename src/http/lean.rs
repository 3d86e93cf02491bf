//! The requests of readers, read here before hyper sees them: an SSE stream (`GET
//! /api/v1/stream`) is served on the socket by one small task of our own for as long as it
//! lives, a poll (`GET /api/v1/poll`, long or short) is answered here and the connection kept
//! for the next request; the first request that is anything else goes to hyper, with the bytes
//! already read put back in front, and hyper has the connection from then on.
//!
//! Why: hyper keeps two buffers of 8 KiB on every connection (its read buffer, grown at the
//! first read, and its buffer of response heads) for as long as the connection lives. For a
//! request that is answered at once that does not matter; a stream or a long poll is held open
//! by a phone or a kiosk and mostly waits, and those 16 KiB were most of what an idle stream
//! cost (17 KiB against an MQTT phone's 3). Their answers are simple to frame (a head, then
//! chunks; or a head and a body of known length), so they are framed here; parsing stays
//! httparse's, and a request with a body, or one httparse refuses, goes to hyper.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{percent_decode, Request, Response};
use crate::broker::Broker;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Poll,
}

/// What the next request of a connection turned out to be.
pub enum Next {
    /// A reader's request, whole: its kind, the request, HTTP/1.1 (else 1.0), whether the
    /// client asked for the connection to close after it, and what followed its head.
    Lean(Kind, Request, bool, bool, Vec<u8>),
    /// Anything else: for hyper, with what was read.
    Other(Vec<u8>),
    /// Nothing usable in time (closed, or no head within `header_timeout_ms`).
    Gone,
}

const LEAN: [(&[u8], Kind); 2] = [(b"GET /api/v1/stream", Kind::Stream), (b"GET /api/v1/poll", Kind::Poll)];

/// Reads the start of the next request (after `buf`, what was read already): as soon as the
/// bytes cannot be a reader's request line they go to hyper; a reader's head is read whole (at
/// most `max_head`).
pub async fn next(tcp: &mut TcpStream, mut buf: Vec<u8>, max_head: usize, timeout: Duration) -> Next {
    let read = async {
        loop {
            let kind =
                LEAN.iter().find(|(p, _)| buf.len() >= p.len() && buf.starts_with(p)).map(|(p, k)| (p.len(), *k));
            let could_be = LEAN.iter().any(|(p, _)| buf.len() < p.len() && p.starts_with(&buf));
            if kind.is_none() && !could_be {
                return Next::Other(std::mem::take(&mut buf));
            }
            if let Some((len, kind)) = kind {
                // Only the path itself (or with `/`), with or without a query.
                if let Some(&next) = buf.get(len) {
                    if !matches!(next, b' ' | b'?' | b'/') {
                        return Next::Other(std::mem::take(&mut buf));
                    }
                }
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let path = if kind == Kind::Stream { "/api/v1/stream" } else { "/api/v1/poll" };
                    return match parse(&buf[..end + 4]) {
                        // The path itself once decoded (hyper's router answers anything below it).
                        Some((req, http11, close)) if req.path.trim_end_matches('/') == path => {
                            Next::Lean(kind, req, http11, close, buf.split_off(end + 4))
                        }
                        // What httparse refuses (or a body), hyper answers as RFC 9112 says.
                        _ => Next::Other(std::mem::take(&mut buf)),
                    };
                }
                if buf.len() >= max_head {
                    return Next::Other(std::mem::take(&mut buf));
                }
            }
            // Into the head's own buffer: a buffer on this future's stack would stay in every
            // waiting reader's task.
            buf.reserve(1024);
            match tokio::io::AsyncReadExt::read_buf(tcp, &mut buf).await {
                Ok(0) | Err(_) => return Next::Gone,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Next::Gone)
}

/// The request, HTTP/1.1 or not, and whether it asks to close; None for what is not a plain
/// GET head (a body announced, a head httparse refuses).
fn parse(head: &[u8]) -> Option<(Request, bool, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(path)?;
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((percent_decode(k)?, percent_decode(v)?));
    }
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .filter_map(|h| Some((h.name.to_ascii_lowercase(), std::str::from_utf8(h.value).ok()?.to_owned())))
        .collect();
    if headers.iter().any(|(k, v)| (k == "content-length" && v.trim() != "0") || k == "transfer-encoding") {
        return None;
    }
    let close = headers.iter().any(|(k, v)| k == "connection" && v.to_ascii_lowercase().contains("close"));
    let request = Request { method: req.method?.to_owned(), path, query: pairs, headers, body: Vec::new() };
    Some((request, req.version == Some(1), close))
}

/// A whole answer, as hyper would write it; with `close`, the connection is closed after it.
pub async fn answer(tcp: &mut TcpStream, response: Response, close: bool) -> std::io::Result<()> {
    let status = hyper::StatusCode::from_u16(response.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}date: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        response.content_type,
        response.body.len(),
        if close { "connection: close\r\n" } else { "" },
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    for (k, v) in &response.extra_headers {
        // A value with a line break would be a header of the client's making.
        if !v.contains(['\r', '\n']) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&response.body);
    tcp.write_all(&bytes).await?;
    if close {
        tcp.shutdown().await?;
    }
    Ok(())
}

/// The head of a stream's answer: chunked for HTTP/1.1, the body delimited by the close for 1.0.
pub fn stream_head(http11: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\nx-accel-buffering: no\r\n{}date: {}\r\n\r\n",
        if http11 { "transfer-encoding: chunked\r\n" } else { "connection: close\r\n" },
        httpdate::fmt_http_date(std::time::SystemTime::now())
    )
    .into_bytes()
}

/// `data` as one chunk (HTTP/1.1) or as it is (HTTP/1.0).
pub fn chunk(http11: bool, data: &[u8], out: &mut Vec<u8>) {
    if http11 {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// Room `open_chunk` leaves for a chunk-size line: the size in at most 8 hex digits, CRLF.
const CHUNK_HEAD: usize = 10;

/// Starts a chunk in an empty `out` whose data is then appended to it, so the data is copied
/// once (HTTP/1.1: room for the size line; HTTP/1.0: nothing). `close_chunk` ends it.
pub fn open_chunk(http11: bool, out: &mut Vec<u8>) {
    debug_assert!(out.is_empty());
    out.resize(if http11 { CHUNK_HEAD } else { 0 }, 0);
}

/// Ends the chunk `open_chunk` started: returns where `out`'s bytes to write begin.
pub fn close_chunk(http11: bool, out: &mut Vec<u8>) -> usize {
    if !http11 {
        return 0;
    }
    let size = format!("{:x}\r\n", out.len() - CHUNK_HEAD);
    let from = CHUNK_HEAD - size.len();
    out[from..CHUNK_HEAD].copy_from_slice(size.as_bytes());
    out.extend_from_slice(b"\r\n");
    from
}

/// A connection's stream with the bytes already read from it in front, for hyper.
pub struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    io: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, io: TcpStream) -> Prefixed {
        Prefixed { prefix, at: 0, io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves a connection: readers' requests here, until one that is not (then hyper).
pub async fn serve(
    builder: &hyper::server::conn::http1::Builder,
    broker: Arc<Broker>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    on_head: impl Fn() + Send + Sync + 'static,
) -> hyper::Result<()> {
    let (max_head, timeout) = match &broker.config().http {
        Some(h) => (h.max_head_bytes, Duration::from_millis(h.header_timeout_ms)),
        None => return Ok(()),
    };
    let mut read = Vec::new();
    loop {
        match next(&mut tcp, read, max_head, timeout).await {
            Next::Lean(Kind::Stream, req, http11, _, _) => {
                on_head();
                // Boxed: a poll's connection, which waits in this same future, does not carry a
                // stream's state.
                Box::pin(super::stream::serve_lean(broker, tcp, req, peer, http11)).await;
                return Ok(());
            }
            Next::Lean(Kind::Poll, req, http11, close, rest) => {
                on_head();
                let response = super::poll::poll(&broker, req, peer).await;
                // A 400 closes, as on hyper's path (`respond`): the client's framing may not be
                // what it meant.
                let close = close || !http11 || response.status == 400;
                if answer(&mut tcp, response, close).await.is_err() || close {
                    return Ok(());
                }
                read = rest;
            }
            Next::Other(read) => {
                // Boxed: hyper's connection future is large, and unboxed it would size the task
                // of every reader's connection too.
                let hyper = super::serve_connection(builder, broker, Prefixed::new(read, tcp), peer, on_head);
                return Box::pin(hyper).await;
            }
            Next::Gone => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk framed in place is the chunk `chunk` frames, for sizes of one to eight hex digits.
    #[test]
    fn a_chunk_framed_in_place_is_the_same_chunk() {
        for len in [1usize, 15, 16, 4095, 65_536 + 300, 0x0fff_ffff] {
            let data = vec![b'x'; len];
            for http11 in [true, false] {
                let mut expected = Vec::new();
                chunk(http11, &data, &mut expected);
                let mut out = Vec::new();
                open_chunk(http11, &mut out);
                out.extend_from_slice(&data);
                let from = close_chunk(http11, &mut out);
                assert!(out[from..] == expected[..], "{len} bytes, HTTP/1.1 {http11}");
            }
        }
    }

    /// What an idle reader's tasks hold is, for most of it, the size of their futures (a task
    /// is allocated at its future's largest state): printed, and kept from growing unnoticed.
    #[tokio::test]
    async fn a_waiting_readers_futures_stay_small() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            format!("[storage]\npath = {:?}\n[http]\nbind = \"127.0.0.1:0\"\n", dir.path().display().to_string());
        let (broker, _) = Broker::open(crate::config::Config::parse(&text).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        let req = || Request { method: "GET".into(), path: "/".into(), query: vec![], headers: vec![], body: vec![] };
        let builder = super::super::builder(broker.config().http.as_ref().unwrap());
        let poll = super::super::poll::poll(&broker, req(), peer);
        let sizes = (
            std::mem::size_of_val(&serve(&builder, broker.clone(), tcp, peer, || ())),
            std::mem::size_of_val(&poll),
            std::mem::size_of::<super::super::reader::Reader>(),
        );
        eprintln!("a connection's task {} B, poll {} B, Reader {} B", sizes.0, sizes.1, sizes.2);
        assert!(sizes.0 < 1024 && sizes.1 < 1024, "{sizes:?}");
    }
}
