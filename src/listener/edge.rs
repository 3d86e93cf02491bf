//! The TLS and WebSocket handshakes: TLS (rustls, through tokio-rustls's acceptor), then for
//! `ws`/`wss` the HTTP upgrade on the listener's path with subprotocol `mqtt` and its allowed
//! origins. The handshake runs in a task of its own; once done, the TCP stream and the layers
//! on it become the connection's `Socket` and this task ends, so an established connection is
//! one task and one file descriptor, whatever its transport (connection::socket).

use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::debug;
use tungstenite::handshake::derive_accept_key;

use crate::broker::Broker;
use crate::config::{Listener, ListenerProtocol};
use crate::connection::{Layer, Origin, Socket, Tls, Ws};
use std::sync::Arc;

pub async fn serve(broker: Arc<Broker>, tcp: TcpStream, origin: Origin) {
    let timeout = Duration::from_secs(broker.config().mqtt.connect_timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    if let Some((socket, origin)) = handshake(&broker, tcp, origin, deadline).await {
        tokio::spawn(crate::connection::serve(broker, socket, origin));
    }
}

async fn handshake(
    broker: &Arc<Broker>,
    tcp: TcpStream,
    mut origin: Origin,
    deadline: tokio::time::Instant,
) -> Option<(Socket, Origin)> {
    let listener = &broker.config().listeners[origin.listener];
    let peer = origin.peer;
    match listener.protocol {
        ListenerProtocol::Mqtts | ListenerProtocol::Wss => {
            let acceptor = broker.tls_acceptor(origin.listener)?;
            let failed = |e: std::io::Error| -> Option<(Socket, Origin)> {
                debug!(%peer, error = %e, "TLS handshake failed");
                broker.metrics().tls_handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            };
            let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
            let start = match tokio::time::timeout_at(deadline, hello).await {
                Ok(Ok(start)) => start,
                Ok(Err(e)) => return failed(e),
                Err(_) => return None,
            };
            // The costly step of a handshake (key exchange, and for a full one the signature)
            // is computed when the ClientHello is taken in, and in turn: at most
            // `mqtt.max_handshakes` of them wait in the scheduler at once, first come first
            // served. In a reconnect storm, thousands of ClientHellos computed as they come
            // would queue every handshake's last step (and every other client's work) behind
            // all of them: all would finish late together, past the phones' own timeouts.
            // Only the computing is bounded, not the round trip after it, so a phone's
            // distance costs no throughput.
            let Ok(Ok(turn)) = tokio::time::timeout_at(deadline, broker.handshake_turn()).await else {
                broker.metrics().handshake_waits_abandoned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return None;
            };
            // A phone that gave up while it waited (its own timeout: it closed its end) is not
            // answered: that would spend a handshake's CPU on nobody when CPU is what is short.
            let ready = tokio::time::timeout(Duration::ZERO, start.io.ready(tokio::io::Interest::READABLE)).await;
            if ready.is_ok_and(|r| r.is_ok_and(|r| r.is_read_closed())) {
                broker.metrics().handshake_waits_abandoned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            let accept = start.into_stream(acceptor.config().clone());
            drop(turn);
            let tls = match tokio::time::timeout_at(deadline, accept).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return failed(e),
                Err(_) => return None,
            };
            let (tcp, mut conn) = tls.into_inner();
            if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                broker.metrics().tls_resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // Records rustls holds for a client that does not read: one write's worth, and
            // at most this (its own default is 64 KiB).
            conn.set_buffer_limit(Some(broker.config().mqtt.edge_buffer_bytes));
            if listener.use_identity_as_username {
                origin.certificate_name =
                    conn.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::tls::common_name(c));
            }
            let tls = Tls::new(tcp, conn);
            if listener.protocol == ListenerProtocol::Mqtts {
                Some((Socket::Tls(Box::new(tls)), origin))
            } else {
                let ws = upgrade(broker, listener, tls, peer, deadline).await?;
                Some((Socket::Wss(Box::new(ws)), origin))
            }
        }
        ListenerProtocol::Ws => {
            let ws = upgrade(broker, listener, tcp, peer, deadline).await?;
            Some((Socket::Ws(Box::new(ws)), origin))
        }
        ListenerProtocol::Mqtt => unreachable!("plain MQTT does not go through the edge"),
    }
}

/// The upgrade on a `ws` listener, then the connection, in this task: for the fuzz target,
/// which waits for it to end.
pub async fn websocket(broker: Arc<Broker>, tcp: TcpStream, origin: Origin, timeout: Duration) {
    let listener = broker.config().listeners[origin.listener].clone();
    let deadline = tokio::time::Instant::now() + timeout;
    if let Some(ws) = upgrade(&broker, &listener, tcp, origin.peer, deadline).await {
        crate::connection::serve(broker, Socket::Ws(Box::new(ws)), origin).await;
    }
}

/// What a WebSocket client may send before its CONNECT is answered beyond the CONNECT itself:
/// the HTTP upgrade request and frame headers.
const PRE_CONNECT_ALLOWANCE: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

/// [MQTT-6.0.0-3] [MQTT-6.0.0-4] the client offers the subprotocol `mqtt` and the server
/// selects it; the path must be the listener's and the origin, if restricted, one it allows.
/// The request (at most PRE_CONNECT_ALLOWANCE bytes) is parsed with httparse; the framing
/// layer gets what followed it, and a budget for the rest of what may come before the CONNACK.
async fn upgrade<T: Layer>(
    broker: &Broker,
    listener: &Listener,
    mut inner: T,
    peer: std::net::SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<Ws<T>> {
    let mut buf = BytesMut::new();
    let (answer, consumed) = loop {
        if let Some(parsed) = parse(&buf, listener) {
            break parsed;
        }
        // Reads of 1 KiB: a browser's upgrade request is a few hundred bytes, and whatever this
        // task allocates leaves a hole when it ends.
        let room = PRE_CONNECT_ALLOWANCE - buf.len();
        let start = buf.len();
        buf.resize(start + room.min(1024), 0);
        let read = tokio::time::timeout_at(deadline, read_some(&mut inner, &mut buf[start..])).await;
        match read {
            Ok(Ok(n)) if n > 0 => buf.truncate(start + n),
            _ => return None,
        }
    };
    let response = match &answer {
        Ok(accept) => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        ),
        Err((status, why)) => {
            debug!(%peer, status, why, "WebSocket upgrade refused");
            format!(
                "HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{why}",
                reason_phrase(*status),
                why.len()
            )
        }
    };
    if tokio::time::timeout_at(deadline, write_all(&mut inner, response.as_bytes())).await.is_err() {
        return None;
    }
    answer.ok()?;
    let _ = buf.split_to(consumed);
    if buf.is_empty() {
        buf = BytesMut::new();
    }
    let budget = broker.config().mqtt.max_connect_packet_size as usize + PRE_CONNECT_ALLOWANCE - consumed;
    Some(Ws::new(inner, buf, budget))
}

/// The request so far: None while it is incomplete and may grow; otherwise the answer and the
/// request's length. A function of its own, so that httparse's header array is not kept in the
/// handshake's future across its reads.
fn parse(buf: &[u8], listener: &Listener) -> Option<(Answer, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some((check(&req, listener), n)),
        Ok(httparse::Status::Partial) if buf.len() < PRE_CONNECT_ALLOWANCE => None,
        Ok(httparse::Status::Partial) => Some((Err((431, "request header too large")), 0)),
        Err(_) => Some((Err((400, "malformed upgrade request")), 0)),
    }
}

/// The upgrade's answer: the Sec-WebSocket-Accept value, or a status and why.
type Answer = Result<String, (u16, &'static str)>;

/// The upgrade's checks; Ok holds the Sec-WebSocket-Accept value [RFC 6455 4.2.1].
fn check(req: &httparse::Request<'_, '_>, listener: &Listener) -> Answer {
    fn values<'a>(req: &'a httparse::Request<'_, '_>, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    }
    let header = |name: &'static str| values(req, name);
    let has_token = |name: &'static str, token: &str| {
        header(name).flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Err((400, "a WebSocket upgrade is a GET over HTTP/1.1"));
    }
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err((400, "not a WebSocket upgrade"));
    }
    if !header("sec-websocket-version").any(|v| v.trim() == "13") {
        return Err((400, "WebSocket version 13 is required"));
    }
    let Some(key) = header("sec-websocket-key").next() else {
        return Err((400, "Sec-WebSocket-Key is missing"));
    };
    let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
    if path != listener.path {
        return Err((404, "MQTT is served on another path"));
    }
    if !listener.allowed_origins.is_empty() {
        let given = header("origin").next().unwrap_or("");
        if !listener.allowed_origins.iter().any(|o| o == given) {
            return Err((403, "origin not allowed"));
        }
    }
    if !has_token("sec-websocket-protocol", "mqtt") {
        return Err((400, "the subprotocol mqtt is required"));
    }
    Ok(derive_accept_key(key.trim().as_bytes()))
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

async fn read_some<T: Layer>(inner: &mut T, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        if !inner.has_buffered_input() {
            inner.tcp().readable().await?;
        }
        match inner.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all<T: Layer>(inner: &mut T, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() || inner.wants_write() {
        if !data.is_empty() {
            match inner.try_write_vectored(&[std::io::IoSlice::new(data)]) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        } else {
            inner.flush_buffered()?;
        }
        if !data.is_empty() || inner.wants_write() {
            inner.tcp().writable().await?;
        }
    }
    Ok(())
}
