//! The TLS and WebSocket edge: the handshake (TLS, then for `ws`/`wss` the HTTP upgrade on path
//! `/mqtt` with subprotocol `mqtt` and the listener's allowed origins), then a pump between the
//! client's stream and one end of a Unix socket pair whose other end a normal connection task
//! serves. The MQTT core never sees TLS records or WebSocket frames.
//!
//! The pump costs a task and a copy per connection on these listeners; driving rustls and the
//! framing inside the connection task would remove both (bench/notes.md).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

use crate::broker::Broker;
use crate::config::ListenerProtocol;
use crate::connection::{Origin, Socket};

pub async fn serve(broker: Arc<Broker>, tcp: TcpStream, mut origin: Origin) {
    let listener = &broker.config().listeners[origin.listener];
    let timeout = Duration::from_secs(broker.config().mqtt.connect_timeout);
    let peer = origin.peer;
    match listener.protocol {
        ListenerProtocol::Mqtts | ListenerProtocol::Wss => {
            let Some(acceptor) = broker.tls_acceptor(origin.listener) else { return };
            let mut tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    broker.metrics().tls_handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                Err(_) => return,
            };
            // Plaintext rustls holds for a client that does not read: bounded by configuration
            // (rustls's own default is 64 KiB; the rest of its buffers are fixed, docs/architecture.md).
            tls.get_mut().1.set_buffer_limit(Some(broker.config().mqtt.edge_buffer_bytes));
            if listener.use_identity_as_username {
                origin.certificate_name = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::tls::common_name(c));
            }
            if listener.protocol == ListenerProtocol::Mqtts {
                pump_bytes(broker, tls, origin).await;
            } else {
                websocket(broker, tls, origin, timeout).await;
            }
        }
        ListenerProtocol::Ws => websocket(broker, tcp, origin, timeout).await,
        ListenerProtocol::Mqtt => unreachable!("plain MQTT does not go through the edge"),
    }
}

fn pair(broker: &Arc<Broker>, origin: Origin) -> Option<UnixStream> {
    let (inner, outer) = UnixStream::pair().ok()?;
    tokio::spawn(crate::connection::serve(broker.clone(), Socket::Edge(inner), origin));
    Some(outer)
}

async fn pump_bytes<S: AsyncRead + AsyncWrite + Unpin>(broker: Arc<Broker>, mut stream: S, origin: Origin) {
    let Some(mut outer) = pair(&broker, origin) else { return };
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut outer).await;
}

/// [MQTT-6.0.0-3] [MQTT-6.0.0-4] the client offers the subprotocol `mqtt` and the server
/// selects it; the path must be the listener's and the origin, if restricted, one it allows.
/// Public for the fuzz target, which drives it over an in-memory pipe.
pub async fn websocket<S: AsyncRead + AsyncWrite + Unpin>(
    broker: Arc<Broker>,
    stream: S,
    origin: Origin,
    timeout: Duration,
) {
    let listener = broker.config().listeners[origin.listener].clone();
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_owned()));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != listener.path {
            return Err(refuse(StatusCode::NOT_FOUND, "MQTT is served on another path"));
        }
        if !listener.allowed_origins.is_empty() {
            let given = req.headers().get("origin").and_then(|o| o.to_str().ok()).unwrap_or("");
            if !listener.allowed_origins.iter().any(|o| o == given) {
                return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
            }
        }
        let offers_mqtt = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "mqtt");
        if !offers_mqtt {
            return Err(refuse(StatusCode::BAD_REQUEST, "the subprotocol mqtt is required"));
        }
        resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        Ok(resp)
    };
    let peer = origin.peer;
    let mqtt = &broker.config().mqtt;
    // Before its CONNECT is answered a WebSocket client is a stranger: everything it sends (the
    // upgrade request, frame headers, fragments) counts against a small budget, and the budget
    // is lifted when the core first answers (the CONNACK). Afterwards a message may be as large
    // as the largest packet, and the write buffer holds one message and a pong, not one pong
    // per ping of a client that never reads.
    let budget = Arc::new(AtomicUsize::new(mqtt.max_connect_packet_size as usize + PRE_CONNECT_ALLOWANCE));
    let stream = Budget { inner: stream, left: budget.clone() };
    let max_message = mqtt.max_packet_size as usize;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .write_buffer_size(mqtt.edge_buffer_bytes)
        .max_write_buffer_size(mqtt.edge_buffer_bytes + CORE_CHUNK + 1024);
    let accept = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    let ws = match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "WebSocket handshake refused");
            return;
        }
        Err(_) => return,
    };
    let Some(outer) = pair(&broker, origin) else { return };
    let (mut from_core, mut to_core) = outer.into_split();
    let (mut to_client, mut from_client) = ws.split();
    let mut buf = vec![0u8; CORE_CHUNK];
    loop {
        tokio::select! {
            m = from_client.next() => match m {
                Some(Ok(Message::Binary(data))) => {
                    if to_core.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // [MQTT-6.0.0-1] MQTT travels in binary frames; anything else ends the connection.
                _ => break,
            },
            n = from_core.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    budget.store(usize::MAX, Ordering::Relaxed);
                    if to_client.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = to_client.close().await;
}

/// What a WebSocket client may send before its CONNECT is answered beyond the CONNECT itself:
/// the HTTP upgrade request and frame headers.
const PRE_CONNECT_ALLOWANCE: usize = 16 * 1024;
/// Largest read from the core, and so largest message to the client.
const CORE_CHUNK: usize = 16 * 1024;

/// A stream that fails reads once `left` bytes have been read; `usize::MAX` lifts the bound.
struct Budget<S> {
    inner: S,
    left: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Budget<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let left = self.left.load(Ordering::Relaxed);
        if left == usize::MAX {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        if left == 0 {
            return Poll::Ready(Err(std::io::Error::other("more input than a CONNECT may take before it is answered")));
        }
        let mut limited = buf.take(left);
        std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        // SAFETY: `limited` is a view of `buf`'s unfilled part, and the inner read initialised
        // and filled its first `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        // Lifted meanwhile by the pump: keep it lifted.
        let _ = self.left.compare_exchange(left, left - n, Ordering::Relaxed, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budget<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
