//! `GET /api/v1/stream`: Server-Sent Events. Retained messages first (per filter, as a new MQTT
//! subscriber gets them), then each new matching message as an event (`reader::event`), and a
//! heartbeat comment every `[http.readers] heartbeat_secs` while idle. A reader named by
//! `client_id` has a persistent session; reconnecting with `Last-Event-ID` confirms what it got
//! and receives the rest of what it missed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use tokio::sync::{mpsc, Semaphore};

use super::reader::{Ask, Next, Reader};
use super::{Request, Response};
use crate::broker::Broker;

/// A piece of the body (events sent together) grows to about this many bytes, or
/// `BURST_EVENTS` events, before it is handed on.
const BATCH_BYTES: usize = 64 * 1024;
const BURST_EVENTS: usize = 256;
/// A burst smaller than this lets the other tasks run once before it is written, and takes
/// what they queued meanwhile: under load the publisher fills every stream's queue in turn,
/// and a stream that wrote each event as it came paid a write per event (bench/notes.md).
const GATHER_AFTER_YIELD: usize = 8;

/// The body of a stream: events as the driver task writes them; dropped by hyper when the
/// client goes, which the driver sees as a closed channel.
pub struct EventBody {
    rx: mpsc::Receiver<Piece>,
    /// `buffer_events`, counted in events however they are joined: what the body takes from
    /// `rx` it gives back here (`Piece`).
    room: Arc<Semaphore>,
}

/// Events sent to the body together, and how many.
type Piece = (Bytes, u32);

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    /// Every event waiting goes out in one frame (one chunk, one write), up to `BATCH_BYTES`:
    /// a burst of stories costs the stream one write rather than one per story.
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let (first, n) = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(piece)) => piece,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        self.room.add_permits(n as usize);
        let Ok((second, n)) = self.rx.try_recv() else { return Poll::Ready(Some(Ok(Frame::data(first)))) };
        self.room.add_permits(n as usize);
        let mut batch = BytesMut::with_capacity((first.len() + second.len()) * 4);
        batch.extend_from_slice(&first);
        batch.extend_from_slice(&second);
        while batch.len() < BATCH_BYTES {
            match self.rx.try_recv() {
                Ok((next, n)) => {
                    self.room.add_permits(n as usize);
                    batch.extend_from_slice(&next);
                }
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(Frame::data(batch.freeze()))))
    }
}

/// Opens the reader and starts its driver; the body to answer with, or the refusal.
pub async fn open(broker: &Arc<Broker>, req: Request, peer: SocketAddr) -> Result<EventBody, Response> {
    let (opened, hello, cfg) = open_reader(broker, req, peer).await?;
    // The channel holds at most as many pieces as events; `room` is what bounds the events.
    let (tx, rx) = mpsc::channel(cfg.buffer_events);
    let room = Arc::new(Semaphore::new(cfg.buffer_events));
    let _ = tx.try_send((hello, 0));
    tokio::spawn(drive(broker.clone(), opened, tx, room.clone(), cfg));
    Ok(EventBody { rx, room })
}

/// The reader a stream request asks for, and the stream's first event (its session).
async fn open_reader(
    broker: &Arc<Broker>,
    req: Request,
    peer: SocketAddr,
) -> Result<(Reader, Bytes, crate::config::Readers), Response> {
    let Some(http) = broker.config().http.clone() else { return Err(Response::error(404, "no HTTP server")) };
    let cfg = http.readers;
    let filters: Vec<String> = req.query.iter().filter(|(k, _)| k == "filter").map(|(_, v)| v.clone()).collect();
    let client_id = req.param("client_id").map(str::to_owned);
    // Browsers send Last-Event-ID by themselves when they reconnect; a page that opens a new
    // EventSource can say it in the query instead.
    let last_event_id = req.header("last-event-id").or_else(|| req.param("last_event_id")).map(str::to_owned);
    let named = client_id.is_some();
    let ask = Ask {
        client_id,
        fresh_prefix: "herald-sse-",
        resume: named,
        expiry_interval: if named { cfg.session_expiry_secs } else { 0 },
        filters,
        protocol: crate::session::PROTOCOL_SSE,
        peer,
    };
    // The reader is opened in its own task, which a client hanging up cannot cancel halfway.
    let b = broker.clone();
    let opened = tokio::spawn(async move {
        let mut reader = Reader::open(&b, &req, ask).await?;
        if let Some(id) = last_event_id {
            reader.confirm(&id);
        }
        Ok::<_, Response>(reader)
    })
    .await
    .map_err(|_| Response::error(500, "the stream could not be opened"))??;
    let hello = format!(
        "retry: {}\nevent: session\ndata: {}\n\n",
        cfg.retry_ms,
        serde_json::json!({ "client_id": opened.client_id, "session_present": opened.present })
    );
    Ok((opened, Bytes::from(hello), cfg))
}

/// A stream that was its connection's first request (`lean`): one task writes the reader's
/// deliveries straight to the socket, a burst in one chunk, the socket's own buffer the only
/// one (`[mqtt]`-like: a client that takes nothing for `stall_ms` is dropped and counted). What
/// it holds while idle is the reader and this task's state: no body channel, no driver task, no
/// hyper buffers.
pub async fn serve_lean(
    broker: Arc<Broker>,
    mut tcp: tokio::net::TcpStream,
    req: Request,
    peer: SocketAddr,
    http11: bool,
) {
    use tokio::io::AsyncWriteExt;
    // Boxed: its state (the request, the session's claim) lives only until the stream starts,
    // and would otherwise size this task's allocation for as long as the stream is open.
    let (mut reader, hello, cfg) = match Box::pin(open_reader(&broker, req, peer)).await {
        Ok(opened) => opened,
        Err(refusal) => {
            let _ = super::lean::answer(&mut tcp, refusal, true).await;
            return;
        }
    };
    let mut out = super::lean::stream_head(http11);
    super::lean::chunk(http11, &hello, &mut out);
    drop(hello);
    let most = BURST_EVENTS.min(cfg.buffer_events.max(1));
    let heartbeat = Duration::from_secs(cfg.heartbeat_secs);
    let stall = Duration::from_millis(cfg.stall_ms);
    // The client sends nothing more on a stream: input is a close (or bytes to ignore). One
    // wait for it across the whole stream (made again only after stray bytes): registering a
    // new one at every turn cost a third of a delivery's CPU under load.
    let mut gone = Box::pin(client_gone(&tcp));
    // Where `out`'s bytes start: a burst's chunk-size line is put in front of its events,
    // in room left for it (`lean::open_chunk`), so the events are copied once, into `out`.
    let mut from = 0;
    let why = 'serving: loop {
        if out.len() > from {
            match write_out(&tcp, &out[from..], stall).await {
                Ok(()) if out.capacity() > 4096 => out = Vec::new(),
                Ok(()) => out.clear(),
                Err(why) => {
                    if why.starts_with("too slow") {
                        broker.metrics().http_readers_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    break 'serving why;
                }
            }
            from = 0;
        }
        // What is waiting is taken without a timer or a wait: under load that is every turn.
        let next = match reader.try_next() {
            Some(d) => Next::Delivery(d),
            None => {
                let until = tokio::time::Instant::now() + heartbeat;
                tokio::select! {
                    next = reader.next(Some(until)) => next,
                    closed = &mut gone => {
                        if closed {
                            break 'serving "closed by the client";
                        }
                        gone = Box::pin(client_gone(&tcp));
                        continue;
                    }
                }
            }
        };
        match next {
            Next::Delivery(d) => {
                // `out` was written above: it is empty.
                super::lean::open_chunk(http11, &mut out);
                out.extend_from_slice(&super::reader::event(&d));
                // Counted as written once in `out`, as for a body that took them.
                reader.written(d);
                let mut events = 1;
                let mut yielded = false;
                while out.len() < BATCH_BYTES && events < most {
                    let Some(next) = reader.try_next() else {
                        if yielded || events >= GATHER_AFTER_YIELD {
                            break;
                        }
                        yielded = true;
                        tokio::task::yield_now().await;
                        continue;
                    };
                    out.extend_from_slice(&super::reader::event(&next));
                    reader.written(next);
                    events += 1;
                }
                from = super::lean::close_chunk(http11, &mut out);
            }
            Next::Kicked(kick) if kick.reason == crate::codec::ReasonCode::SESSION_TAKEN_OVER && !kick.elsewhere => {
                break 'serving "session taken over"
            }
            Next::Kicked(_) => break 'serving "asked to close",
            Next::Idle => super::lean::chunk(http11, b": heartbeat\n\n", &mut out),
        }
    };
    if !why.starts_with("closed") && !why.starts_with("too slow") {
        // The end of the body: the last chunk, then the close.
        let mut end = out.split_off(from);
        if http11 {
            end.extend_from_slice(b"0\r\n\r\n");
        }
        let _ = write_out(&tcp, &end, stall).await;
    }
    drop(gone);
    let _ = tcp.shutdown().await;
    reader.close(why);
}

/// Writes `out` to the socket: at once if it takes it all (no timer), else within `stall`.
async fn write_out(tcp: &tokio::net::TcpStream, out: &[u8], stall: Duration) -> Result<(), &'static str> {
    let mut at = 0;
    let write = |at: &mut usize| -> Result<bool, &'static str> {
        while *at < out.len() {
            match tcp.try_write(&out[*at..]) {
                Ok(n) => *at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(_) => return Err("closed by the client"),
            }
        }
        Ok(true)
    };
    if write(&mut at)? {
        return Ok(());
    }
    let rest = async {
        loop {
            tcp.writable().await.map_err(|_| "closed by the client")?;
            if write(&mut at)? {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(stall, rest).await.unwrap_or(Err("too slow: its socket stayed full for stall_ms"))
}

/// Waits until the socket has input: true when the client closed it (or it failed), false
/// when it sent bytes, which are read and dropped.
async fn client_gone(tcp: &tokio::net::TcpStream) -> bool {
    loop {
        if tcp.readable().await.is_err() {
            return true;
        }
        let mut sink = [0u8; 256];
        match tcp.try_read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return true,
        }
    }
}

/// Writes the reader's deliveries into the body until the client goes, the session is taken
/// over, or the client stops reading for `stall_ms` (then it is dropped and counted).
async fn drive(
    broker: Arc<Broker>,
    mut reader: Reader,
    tx: mpsc::Sender<Piece>,
    room: Arc<Semaphore>,
    cfg: crate::config::Readers,
) {
    let most = BURST_EVENTS.min(cfg.buffer_events.max(1));
    let heartbeat = Duration::from_secs(cfg.heartbeat_secs);
    let stall = Duration::from_millis(cfg.stall_ms);
    let why = loop {
        let until = tokio::time::Instant::now() + heartbeat;
        let next = tokio::select! {
            next = reader.next(Some(until)) => next,
            _ = tx.closed() => break "closed by the client",
        };
        match next {
            Next::Delivery(d) => {
                // What else is waiting goes with it, as one piece of the body: a burst of
                // stories costs one send to the body and one write, not one per story.
                let mut event = super::reader::event(&d);
                let mut burst = vec![d];
                if let Some(second) = reader.try_next() {
                    let mut joined = BytesMut::with_capacity(event.len() * 8);
                    joined.extend_from_slice(&event);
                    joined.extend_from_slice(&super::reader::event(&second));
                    burst.push(second);
                    while joined.len() < BATCH_BYTES && burst.len() < most {
                        let Some(next) = reader.try_next() else { break };
                        joined.extend_from_slice(&super::reader::event(&next));
                        burst.push(next);
                    }
                    event = joined.freeze();
                }
                // Room for this many events in the stream's buffer, waited for up to `stall_ms`.
                let n = burst.len() as u32;
                let roomy = match room.try_acquire_many(n) {
                    Ok(permit) => Ok(permit),
                    Err(_) => tokio::select! {
                        got = tokio::time::timeout(stall, room.acquire_many(n)) => match got {
                            Ok(Ok(permit)) => Ok(permit),
                            Ok(Err(_)) => Err("closed by the client"),
                            Err(_) => Err("too slow: its buffer stayed full for stall_ms"),
                        },
                        _ = tx.closed() => Err("closed by the client"),
                    },
                };
                let sent = roomy.and_then(|permit| {
                    // The body gives the room back as it takes the piece.
                    permit.forget();
                    tx.try_send((event, n)).map_err(|e| match e {
                        // Full of heartbeats only: a client that has read nothing for that long.
                        mpsc::error::TrySendError::Full(_) => "too slow: its buffer stayed full for stall_ms",
                        mpsc::error::TrySendError::Closed(_) => "closed by the client",
                    })
                });
                match sent {
                    Ok(()) => burst.into_iter().for_each(|d| reader.written(d)),
                    Err(why) => {
                        // Back in front of the queue, in their order.
                        burst.into_iter().rev().for_each(|d| reader.give_back(d));
                        if why.starts_with("too slow") {
                            broker.metrics().http_readers_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        break why;
                    }
                }
            }
            Next::Kicked(kick) if kick.reason == crate::codec::ReasonCode::SESSION_TAKEN_OVER && !kick.elsewhere => {
                break "session taken over"
            }
            Next::Kicked(_) => break "asked to close",
            Next::Idle => {
                // A comment: EventSource ignores it, a proxy sees traffic. Skipped when full.
                let _ = tx.try_send((Bytes::from_static(b": heartbeat\n\n"), 0));
            }
        }
    };
    reader.close(why);
}
