//! One client connection: the CONNECT handshake, the session it takes or resumes, the loop that
//! reads packets, drains the session's queue within the client's receive window, enforces the
//! keep-alive, and on the way out publishes the will and parks or ends the session.

mod handshake;
mod inbound;
pub mod outbound;
mod socket;

pub use socket::{Layer, Socket, Tls, Ws};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::info;

use crate::broker::{Broker, Outcome};
use crate::clock::wall_ms_now;
use crate::codec::{DecodeError, Decoder, Disconnect, Packet, Properties, ReasonCode, Role, Will};
use crate::message::{Delivery, OutState};
use crate::session::registry::Release;
use crate::session::{Kick, SessionShared, SessionState};
use crate::store::Txn;
use outbound::{Outbound, Written};

/// Why a connection ended; decides the DISCONNECT sent (5.0), the will and the log line.
#[derive(Debug)]
pub enum Close {
    /// The client sent DISCONNECT; `with_will` for reason 0x04 [MQTT-3.14.4-3].
    ClientDisconnect {
        with_will: bool,
    },
    Decode(DecodeError),
    /// A protocol violation found after decoding, with the reason code it earns.
    Violation(ReasonCode, &'static str),
    KeepAliveTimeout,
    Kicked(ReasonCode),
    /// Cluster mode: the client connected to another node (DISCONNECT 0x8E); the session is
    /// released as after an ordinary disconnection.
    TakenOverElsewhere,
    ServerShutdown,
    SocketClosed,
    /// Closed without any answer and without a session: handshake failures.
    Refused(&'static str),
    /// The client read nothing for a whole keep-alive period while we had data for it.
    WriteStalled,
    /// Cluster mode: this node's lease lapsed (`cluster::fence`); a persistent session's
    /// connection closes with DISCONNECT 0x8E before it writes anything more, its session parks,
    /// and no will is published here (the node that took the session over, if any, has it).
    Fenced,
    /// A 3.1.1 client published normal traffic in degraded mode (5.0 gets PUBACK 0x97).
    Overloaded,
    /// Cluster mode: a 3.1.1 client's QoS 1/2 message that JetStream did not take within
    /// `cluster.hold_secs` (3.1.1 has no negative acknowledgement).
    ClusterUnavailable,
}

impl Close {
    fn reason_code(&self) -> Option<ReasonCode> {
        match self {
            Close::Decode(e) => e.disconnect_reason(),
            Close::Violation(code, _) => Some(*code),
            Close::KeepAliveTimeout => Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
            Close::Kicked(code) => Some(*code),
            Close::TakenOverElsewhere | Close::Fenced => Some(ReasonCode::SESSION_TAKEN_OVER),
            Close::ServerShutdown => Some(ReasonCode::SERVER_SHUTTING_DOWN),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Close::ClientDisconnect { with_will: false } => "client disconnected".into(),
            Close::ClientDisconnect { with_will: true } => "client disconnected with will".into(),
            Close::Decode(e) => format!("bad packet: {e}"),
            Close::Violation(code, why) => format!("protocol violation (0x{:02X}): {why}", code.0),
            Close::KeepAliveTimeout => "keep-alive timeout [MQTT-3.1.2-24]".into(),
            Close::Kicked(code) if *code == ReasonCode::SESSION_TAKEN_OVER => {
                "session taken over [MQTT-3.1.4-3]".into()
            }
            Close::Kicked(code) => format!("disconnected by the server (0x{:02X})", code.0),
            Close::TakenOverElsewhere => "session taken over on another node [MQTT-3.1.4-3]".into(),
            Close::Fenced => "this node's cluster lease lapsed: the session may live on another node now".into(),
            Close::ServerShutdown => "server shutting down".into(),
            Close::SocketClosed => "connection lost".into(),
            Close::Refused(why) => format!("refused: {why}"),
            Close::WriteStalled => "client stopped reading; its outbound buffer stayed full".into(),
            Close::Overloaded => "degraded mode: a normal-priority QoS 1/2 PUBLISH from a 3.1.1 client".into(),
            Close::ClusterUnavailable => "NATS did not take a QoS 1/2 message within cluster.hold_secs".into(),
        }
    }
}

pub type Step = Result<(), Close>;

struct OpenGuard(Arc<Broker>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.metrics().connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a connection came from.
#[derive(Clone, Debug)]
pub struct Origin {
    pub peer: SocketAddr,
    /// Whether it arrived on a loopback listener (anonymous clients' default).
    pub loopback: bool,
    /// Index of its listener in the configuration.
    pub listener: usize,
    /// The common name of its verified TLS client certificate, where the listener takes it as
    /// the user name.
    pub certificate_name: Option<String>,
}

/// Runs a connection from accept to close, in one task that both reads and writes: the
/// handshake first, which yields the session, then the connection proper, which always has one.
///
/// The task's own future stays small: the handshake, the event loop (`run`) and the close each
/// run in a boxed future that exists only while that phase does, and the connection's state is
/// boxed. An idle connection hibernates (`hibernate`): it keeps its state and a small future,
/// and the event loop's future is freed until something happens.
pub async fn serve(broker: Arc<Broker>, stream: Socket, origin: Origin) {
    broker.metrics().connections_total.fetch_add(1, Ordering::Relaxed);
    broker.metrics().connections_open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(broker.clone());
    let Some(mut conn) = Box::pin(open(broker, stream, origin)).await else { return };
    let close = conn.live().await;
    Box::pin(conn.end(close)).await;
}

/// The CONNECT handshake; None when the connection was refused (and answered).
async fn open(broker: Arc<Broker>, stream: Socket, origin: Origin) -> Option<Box<Connection>> {
    let (kick_tx, kick_rx) = tokio::sync::oneshot::channel();
    let mut handshake = handshake::Handshake {
        conn_id: broker.next_id(),
        peer: origin.peer,
        io: Io {
            stream,
            // Until its CONNECT is accepted a socket is a stranger's: the smaller bound.
            decoder: {
                let mqtt = &broker.config().mqtt;
                Decoder::new(Role::Server, mqtt.max_packet_size.min(mqtt.max_connect_packet_size))
            },
            inbuf: BytesMut::new(),
            out: Outbound::new(),
            last_inbound: Instant::now(),
            last_write_progress: None,
        },
        client: Client {
            client_id: String::new(),
            keep_alive_ms: 0,
            receive_window: 0,
            session_expiry: 0,
            will: None,
            acl: None,
            limits: broker.limits(),
            counted_ip: false,
            high_reserve: 0,
            lanes: false,
            warned_retained: false,
            msg_id_on_ack: MsgIdOnAck::Never,
            inbound_aliases: HashMap::new(),
            publish_second: 0,
            publishes_this_second: 0,
        },
        retry: Retry { enabled: false, next_retry: None, retry_tick: 0 },
        kick_tx: Some(kick_tx),
        loopback: origin.loopback,
        listener: origin.listener.min(usize::from(crate::session::LISTENER_HTTP - 1)) as u8,
        certificate_name: origin.certificate_name.map(String::into_boxed_str),
        broker,
    };
    let (session, present) = match handshake.handshake().await {
        Ok(claimed) => claimed,
        Err(close) => {
            handshake.refused(close).await;
            return None;
        }
    };
    let handshake::Handshake {
        broker,
        conn_id,
        peer,
        io,
        client,
        retry,
        kick_tx,
        loopback: _,
        listener: _,
        certificate_name,
    } = handshake;
    drop((kick_tx, certificate_name));
    let mut conn = Box::new(Connection {
        broker,
        conn_id,
        peer,
        io,
        client,
        retry,
        session,
        flow: Flow::default(),
        kick_rx,
        quiet: Quiet::default(),
    });
    if present {
        conn.resend_inflight();
    }
    Some(conn)
}

/// The socket side of a connection, before and after CONNECT.
struct Io {
    stream: Socket,
    decoder: Decoder,
    inbuf: BytesMut,
    out: Outbound,
    last_inbound: Instant,
    /// While output is queued: when the socket last took bytes from us (or the output began),
    /// to give up on a client that stopped reading. None while nothing is queued.
    last_write_progress: Option<Instant>,
}

impl Io {
    /// Whether output waits for the socket: the connection's own, or a TLS or WebSocket
    /// layer's (records, a pong).
    fn writing(&self) -> bool {
        self.out.has_pending() || self.stream.wants_write()
    }
}

impl Client {
    /// How long the client may stay silent: one and a half keep-alives [MQTT-3.1.2-24].
    fn keep_alive(&self) -> Option<Duration> {
        (self.keep_alive_ms > 0).then(|| Duration::from_millis(u64::from(self.keep_alive_ms)))
    }
}

/// The session a connection holds: always there once the handshake is done.
struct Held {
    shared: Arc<SessionShared>,
    state: SessionState,
}

/// What CONNECT settled about the client, and its own limits.
struct Client {
    client_id: String,
    /// 1.5 times the negotiated keep-alive in milliseconds [MQTT-3.1.2-24]; 0 when keep-alive is 0.
    keep_alive_ms: u32,
    /// How many QoS 1 and 2 messages may be in flight towards the client [MQTT-4.9.0-2].
    receive_window: usize,
    session_expiry: u32,
    /// Boxed, like `held_ack`: both are rare and a `Properties` is 400 bytes that every idle
    /// connection would otherwise carry.
    will: Option<Box<Will>>,
    /// The client's ACL rules; None when no ACL file is configured.
    acl: Option<Box<crate::auth::acl::ClientAcl>>,
    /// The limits as they were when the client connected.
    limits: Arc<crate::config::Limits>,
    /// Whether the per-IP limits counted this connection (released when it ends).
    counted_ip: bool,
    /// In-flight slots of the receive window only high-priority messages may take (0 without
    /// `[[priority]]` rules).
    high_reserve: u16,
    /// Whether the session has a high-priority lane (there are `[[priority]]` rules).
    lanes: bool,
    /// Whether the retained-overflow warning was written for this connection.
    warned_retained: bool,
    /// When 5.0 acknowledgements carry the `herald-msg-id` user property.
    msg_id_on_ack: MsgIdOnAck,
    inbound_aliases: HashMap<u16, Arc<str>>,
    /// `publish_rate_per_client`: the current second (of the broker's uptime) and its count.
    publish_second: u32,
    publishes_this_second: u32,
}

/// Flow control of this client's publishes: waiting for subscribers' room and for the store.
/// Retained messages waiting for their SUBACK, by its packet identifier.
type RetainedAfterSuback = std::collections::VecDeque<(u16, Vec<Delivery>)>;

#[derive(Default)]
struct Flow {
    /// Deliveries of the last PUBLISH still waiting for room in a subscriber's queue; input is
    /// not read and `held_ack` not sent until they are placed (or given up on).
    blocked: std::collections::VecDeque<(Arc<SessionShared>, Delivery)>,
    blocked_deadline: Option<tokio::time::Instant>,
    /// The acknowledgement of the PUBLISH in `blocked`, with its store ticket.
    held_ack: Option<Box<(u64, u64, Packet)>>,
    /// Acknowledgements waiting, in order [MQTT-4.6.0-2], for their store ticket to commit and,
    /// in cluster mode, their cluster ticket to be replicated and their interest ticket to be
    /// confirmed by the other nodes (`cluster::interest`; 0: nothing to wait for).
    acks: std::collections::VecDeque<(u64, u64, u64, Packet)>,
    /// Follows the store's committed ticket while `acks` is not empty; None otherwise, so that
    /// an idle connection carries no receiver.
    committed: Option<tokio::sync::watch::Receiver<u64>>,
    /// Follows the cluster's replicated ticket while an acknowledgement waits for it.
    replicated: Option<tokio::sync::watch::Receiver<u64>>,
    /// Follows the cluster's confirmed interest while a SUBACK waits for it.
    interest: Option<tokio::sync::watch::Receiver<u64>>,
    /// Retained messages of SUBSCRIBEs whose SUBACK waits, by packet identifier: queued once
    /// their SUBACK is written, so that they follow it.
    after_suback: Option<Box<RetainedAfterSuback>>,
    /// Input is not read until then: a publisher of refused normal traffic in degraded mode.
    paused_until: Option<Instant>,
}

/// Retries to a 3.1.1 client (`[delivery] retry_after`).
struct Retry {
    /// Whether unacknowledged messages are sent again: for 3.1.1; 5.0 may not be resent to on
    /// the same connection [MQTT-4.4.0-1].
    enabled: bool,
    /// The next retry tick, while QoS 1/2 messages are in flight to a 3.1.1 client.
    next_retry: Option<Instant>,
    /// Retry ticks so far (`retry_unacknowledged`).
    retry_tick: u32,
}

pub struct Connection {
    broker: Arc<Broker>,
    conn_id: u64,
    peer: SocketAddr,
    io: Io,
    client: Client,
    session: Held,
    flow: Flow,
    retry: Retry,
    kick_rx: tokio::sync::oneshot::Receiver<Kick>,
    quiet: Quiet,
}

/// When to hibernate: `run` counts its events, and at each check (one clock reading per
/// `hibernate_after_ms`) a connection that had none and is idle returns to hibernate.
#[derive(Default)]
struct Quiet {
    check_at: Option<Instant>,
    events: u32,
    seen: u32,
}

/// How `run` ended.
enum Run {
    Closed(Close),
    /// Idle since the last check: hibernate.
    Idle,
}

/// Deliveries per message the latency histogram records, at least (see `start_delivery`).
const LATENCY_SAMPLES: u64 = 16;

/// When a 5.0 client's PUBACK/PUBREC carries `herald-msg-id` [issue 7]: never for 3.1.1 or a
/// client that set Request Problem Information to 0 [MQTT-3.1.2-29]; always when its CONNECT
/// asked (user property `herald-msg-id`); otherwise for PUBLISHes with a `story-id` or
/// `herald-receipt` user property. Not unasked: clients and conformance vectors expect a bare
/// acknowledgement.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgIdOnAck {
    Never,
    OnRequest,
    Always,
}

/// Encoded output above which a session with a high-priority lane takes no more normal
/// deliveries (`mqtt.max_outbound_bytes` still bounds the whole).
const NORMAL_OUTPUT_WITH_LANES: usize = 64 * 1024;

/// How long a publisher whose normal PUBLISH was refused in degraded mode is not read from.
const SHED_PAUSE: Duration = Duration::from_millis(100);

/// Acknowledgements a client may have waiting for the store before its input is no longer
/// read: bounds the memory a publisher can hold while the disk is slow.
const MAX_UNCOMMITTED_ACKS: usize = 1024;

enum Event {
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    WriteStalled,
    Delivery(Delivery),
    Kick(Option<Kick>),
    Committed,
    /// The keep-alive deadline or a retry fell due.
    Timer,
    /// A high-priority delivery arrived.
    Urgent,
    /// Pending messages (retained ones after a SUBSCRIBE) remain and the window allows more.
    MorePending,
}

impl Connection {
    /// The connection's life: hibernation while there is nothing to do, the event loop while
    /// there is. A wake-up that leaves nothing to do (a PINGREQ answered, a QoS 0 story or a
    /// SUBACK written) is handled in place, and the connection goes on hibernating; the loop's
    /// future is boxed and exists only while the loop runs. A phone that connects and
    /// subscribes never allocates it.
    async fn live(&mut self) -> Close {
        let hibernates = self.broker.config().mqtt.hibernate_after_ms > 0;
        // What the client sent right behind its CONNECT, in the same read [MQTT-3.1.4]: input is
        // handled only when the socket becomes readable again, which may be never.
        if !self.io.inbuf.is_empty() {
            if let Err(close) = self.handle_input() {
                return close;
            }
        }
        // Counted in the gauge from entering hibernation to leaving it for the event loop or
        // the close, not once per wake-up handled in place: a shared counter touched twice per
        // wake-up would be two contended atomics per delivery to a hibernating subscriber.
        let mut counted = false;
        let gauge = |broker: &Broker, on: bool| {
            let g = &broker.metrics().connections_hibernating;
            if on {
                g.fetch_add(1, Ordering::Relaxed);
            } else {
                g.fetch_sub(1, Ordering::Relaxed);
            }
        };
        loop {
            let released = self.release_acks();
            self.drain_deliveries();
            if let Err(close) = released.and_then(|()| self.write_some()) {
                if counted {
                    gauge(&self.broker, false);
                }
                return close;
            }
            if hibernates && self.idle() {
                if !counted {
                    gauge(&self.broker, true);
                    counted = true;
                }
                self.release_buffers();
                if let Err(close) = self.hibernate().await {
                    gauge(&self.broker, false);
                    return close;
                }
                continue;
            }
            if counted {
                gauge(&self.broker, false);
                counted = false;
            }
            self.quiet.check_at = None;
            match Box::pin(self.run()).await {
                Run::Closed(close) => return close,
                Run::Idle => {}
            }
        }
    }

    /// Nothing in flight, queued, half-read or waiting to be written.
    fn idle(&self) -> bool {
        !self.io.writing()
            && self.io.inbuf.is_empty()
            && self.flow.blocked.is_empty()
            && self.flow.acks.is_empty()
            && self.flow.held_ack.is_none()
            && self.flow.paused_until.is_none()
            && self.retry.next_retry.is_none()
            && self.session.state.pending.is_empty()
            && self.session.state.inflight.is_empty()
    }

    /// Frees the capacity of empty buffers and queues before hibernating, unless it is small:
    /// a connection woken now and then (a ping, a story) does not allocate them again each time.
    fn release_buffers(&mut self) {
        fn release<T>(q: &mut std::collections::VecDeque<T>) {
            if q.is_empty() && q.capacity() > 8 {
                *q = Default::default();
            }
        }
        if self.io.inbuf.capacity() > 0 {
            self.io.inbuf = BytesMut::new();
        }
        self.io.out.release();
        let state = &mut self.session.state;
        release(&mut state.pending);
        release(&mut state.inflight);
        if state.incoming_qos2.is_empty() && state.incoming_qos2.capacity() > 8 {
            state.incoming_qos2 = Default::default();
        }
        state.mailbox.release();
        release(&mut self.flow.blocked);
        release(&mut self.flow.acks);
    }

    /// Waits in a small future for the one thing that ends hibernation, and handles it: input,
    /// a delivery, a high-priority signal, a kick, or the keep-alive deadline.
    async fn hibernate(&mut self) -> Step {
        let keep_alive = self.client.keep_alive().map(|k| tokio::time::Instant::from_std(self.io.last_inbound + k));
        let urgent = self.session.shared.urgent_if_made();
        let event = tokio::select! {
            biased;
            k = &mut self.kick_rx => Event::Kick(k.ok()),
            r = self.io.stream.readable() => Event::Readable(r),
            _ = urgent_notified(urgent) => Event::Urgent,
            d = self.session.state.mailbox.recv() => Event::Delivery(d),
            _ = sleep_until(keep_alive) => Event::Timer,
        };
        match event {
            Event::Kick(k) => Err(kicked(k)),
            Event::Readable(Ok(())) => self.read_input(),
            Event::Readable(Err(_)) => Err(Close::SocketClosed),
            Event::Delivery(d) => {
                self.start_delivery(d, &mut None);
                Ok(())
            }
            Event::Timer if self.client.keep_alive().is_some_and(|k| Instant::now() >= self.io.last_inbound + k) => {
                Err(Close::KeepAliveTimeout)
            }
            _ => Ok(()),
        }
    }

    /// Settles the session and closes the socket.
    async fn end(self: Box<Self>, close: Close) {
        // Settling is synchronous and takes the connection apart; only the socket is left to flush.
        let (mut io, broker, peer, counted_ip) = self.finish(&close);
        let answered = io.close(&broker, peer, counted_ip, &close).await;
        io.end(&broker, answered);
    }

    async fn run(&mut self) -> Run {
        let limit = self.broker.config().mqtt.max_outbound_bytes;
        let hibernate_after = self.broker.config().mqtt.hibernate_after_ms;
        let hibernate_after = (hibernate_after > 0).then(|| Duration::from_millis(hibernate_after));
        loop {
            let released = self.release_acks();
            self.drain_deliveries();
            if let Err(close) = released.and_then(|()| self.write_some()) {
                return Run::Closed(close);
            }
            if !self.flow.blocked.is_empty() {
                if let Err(close) = self.wait_for_room().await {
                    return Run::Closed(close);
                }
                continue;
            }
            // Above the outbound limit the client reads slower than we write: stop taking on
            // more (its queue fills, publishers wait or drop for it) and stop reading its input
            // until the socket has taken some.
            if self.flow.paused_until.is_some_and(|t| Instant::now() >= t) {
                self.flow.paused_until = None;
            }
            let room = self.io.out.pending_bytes() < limit && self.flow.acks.len() < MAX_UNCOMMITTED_ACKS;
            let reading = room && self.flow.paused_until.is_none();
            // With a high-priority lane, normal deliveries stop at a small amount of encoded
            // output, so that a breaking story finds little ahead of it in the byte stream;
            // the backlog waits in the mailbox, which the lane overtakes.
            let window_open = room
                && self.window_open()
                && !(self.client.lanes && self.io.out.pending_bytes() >= NORMAL_OUTPUT_WITH_LANES);
            let high_window_open = room && self.client.lanes && self.high_window_open();
            let writing = self.io.writing();
            let keep_alive = self.client.keep_alive().map(|k| self.io.last_inbound + k);
            // The next hibernation check, while idle.
            let check = match hibernate_after {
                Some(after) if self.idle() => Some(*self.quiet.check_at.get_or_insert_with(|| Instant::now() + after)),
                _ => None,
            };
            let deadline = [keep_alive, self.retry.next_retry, self.flow.paused_until, check]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std);
            let stall = self.io.last_write_progress.map(|t| {
                tokio::time::Instant::from_std(t + self.client.keep_alive().unwrap_or(Duration::from_secs(60)))
            });
            let (shared, state) = (&self.session.shared, &mut self.session.state);
            let more_pending = window_open && !state.pending.is_empty();
            let urgent = shared.urgent_if_made();
            let event = tokio::select! {
                biased;
                k = &mut self.kick_rx => Event::Kick(k.ok()),
                _ = committed_changed(&mut self.flow.committed) => Event::Committed,
                _ = committed_changed(&mut self.flow.replicated) => Event::Committed,
                _ = committed_changed(&mut self.flow.interest) => Event::Committed,
                r = self.io.stream.writable(), if writing => Event::Writable(r),
                r = self.io.stream.readable(), if reading => Event::Readable(r),
                _ = urgent_notified(urgent), if high_window_open => Event::Urgent,
                d = state.mailbox.recv(), if window_open => Event::Delivery(d),
                _ = sleep_until(deadline) => Event::Timer,
                _ = sleep_until(stall), if writing => Event::WriteStalled,
                // Ready at once: the loop goes round to send the next part of the pending queue
                // after input and timers have had their turn.
                _ = std::future::ready(()), if more_pending => Event::MorePending,
            };
            if !matches!(event, Event::Timer) {
                self.quiet.events = self.quiet.events.wrapping_add(1);
            }
            let step = match event {
                Event::Kick(k) => Err(kicked(k)),
                Event::Timer => {
                    let now = Instant::now();
                    if keep_alive.is_some_and(|k| now >= k) {
                        Err(Close::KeepAliveTimeout)
                    } else {
                        if let (Some(after), Some(at)) = (hibernate_after, self.quiet.check_at) {
                            if now >= at {
                                if self.quiet.events == self.quiet.seen && self.idle() {
                                    return Run::Idle;
                                }
                                self.quiet.seen = self.quiet.events;
                                self.quiet.check_at = Some(now + after);
                            }
                        }
                        // Also woken for the end of a pause: a retry tick only when one is due.
                        if self.retry.next_retry.is_some_and(|t| now >= t) {
                            self.retry_unacknowledged(now);
                        }
                        Ok(())
                    }
                }
                Event::WriteStalled => Err(Close::WriteStalled),
                Event::Writable(Ok(())) => Ok(()),
                Event::Readable(Ok(())) => self.read_input(),
                Event::Writable(Err(_)) | Event::Readable(Err(_)) => Err(Close::SocketClosed),
                Event::Delivery(d) => {
                    self.start_delivery(d, &mut None);
                    Ok(())
                }
                Event::MorePending | Event::Committed | Event::Urgent => Ok(()),
            };
            if let Err(close) = step {
                return Run::Closed(close);
            }
        }
    }

    /// Writes what the socket takes now.
    fn write_some(&mut self) -> Step {
        if !self.io.writing() {
            self.io.last_write_progress = None;
            return Ok(());
        }
        // Cluster mode: a persistent session is written only under this node's lease, so that a
        // node back from a pause sends nothing for a session another node took over meanwhile.
        if self.client.session_expiry > 0 {
            if let Some(link) = self.broker.cluster() {
                if !link.fence.may_deliver() {
                    self.io.out.discard_unsent();
                    return Err(Close::Fenced);
                }
            }
        }
        let flushed = self.io.out.try_flush(&mut self.io.stream);
        count_output(&self.broker, &mut self.io.out, flushed.as_ref().copied().unwrap_or(0));
        match flushed {
            Err(_) => Err(Close::SocketClosed),
            // Everything went: nothing to watch, and no clock read on the common path.
            Ok(_) if !self.io.writing() => {
                self.io.last_write_progress = None;
                Ok(())
            }
            Ok(n) => {
                if n > 0 || self.io.last_write_progress.is_none() {
                    self.io.last_write_progress = Some(Instant::now());
                }
                Ok(())
            }
        }
    }

    /// Reads what the socket has and handles every complete packet.
    fn read_input(&mut self) -> Step {
        if self.io.inbuf.capacity() - self.io.inbuf.len() < 4096 {
            self.io.inbuf.reserve(16 * 1024);
        }
        let step = match self.io.stream.try_read_buf(&mut self.io.inbuf) {
            Ok(0) => Err(Close::SocketClosed),
            Ok(n) => {
                self.broker.metrics().hot.add(crate::metrics::Hot::BytesReceived, n as u64);
                self.handle_input()
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(Close::SocketClosed),
        };
        if self.io.inbuf.is_empty() {
            // Everything read was handled, or the wake-up was spurious (readiness left over
            // from the handshake's read): an idle connection holds no input buffer.
            self.io.inbuf = BytesMut::new();
        }
        step
    }

    /// Waits for room in the queue of the first subscriber that the last PUBLISH could not be
    /// given to, while still sending this session's own messages. Once every delivery is placed
    /// (or given up on after `max_publish_wait_ms`), the PUBLISH is acknowledged and reading
    /// resumes with whatever input is already buffered.
    async fn wait_for_room(&mut self) -> Step {
        let (target, _) = self.flow.blocked.front().expect("blocked is not empty");
        let target = target.clone();
        let wait = Duration::from_millis(self.broker.config().mqtt.max_publish_wait_ms);
        let deadline = *self.flow.blocked_deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
        if !target.is_online() {
            // Parked while we waited: its queue drains only when it comes back.
            return self.give_up_blocked(false);
        }
        let window_open = self.window_open();
        let state = &mut self.session.state;
        tokio::select! {
            biased;
            k = &mut self.kick_rx => Err(kicked(k.ok())),
            r = self.io.stream.writable(), if self.io.writing() => match r {
                Ok(()) => self.write_some(),
                Err(_) => Err(Close::SocketClosed),
            },
            permit = target.mailbox.reserve() => {
                let (_, delivery) = self.flow.blocked.pop_front().expect("front exists");
                if let Ok(permit) = permit {
                    permit.send(delivery);
                }
                self.flow.blocked_deadline = None;
                self.after_blocked()
            }
            d = state.mailbox.recv(), if window_open => {
                self.start_delivery(d, &mut None);
                Ok(())
            }
            _ = tokio::time::sleep_until(deadline) => self.give_up_blocked(true),
        }
    }

    /// Drops the first blocked delivery for its subscriber, counted, and marks that subscriber
    /// congested if it is the one that kept us waiting.
    fn give_up_blocked(&mut self, congested: bool) -> Step {
        let (target, delivery) = self.flow.blocked.pop_front().expect("front exists");
        if congested {
            target.set_congested(true);
        }
        if let Some(at) = delivery.queue_ref() {
            let mut txn = Txn::default();
            txn.remove_entry(&target.client_id, at);
            self.broker.store().commit(txn);
        }
        self.broker.record(&delivery.message, Outcome::QueueFull);
        self.flow.blocked_deadline = None;
        self.after_blocked()
    }

    fn after_blocked(&mut self) -> Step {
        if !self.flow.blocked.is_empty() {
            return Ok(());
        }
        if let Some(held) = self.flow.held_ack.take() {
            let (ticket, replicated, ack) = *held;
            self.send_ack_after(ticket, replicated, ack);
        }
        self.handle_input()
    }

    /// Decodes and handles every complete packet in the input buffer.
    fn handle_input(&mut self) -> Step {
        self.io.last_inbound = Instant::now();
        let mut packets = 0;
        let step = loop {
            if !self.flow.blocked.is_empty() {
                break Ok(());
            }
            match self.io.decoder.decode(&mut self.io.inbuf) {
                Ok(Some(packet)) => {
                    packets += 1;
                    if let Err(close) = self.handle_packet(packet) {
                        break Err(close);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(Close::Decode(e)),
            }
        };
        if packets > 0 {
            self.broker.metrics().hot.add(crate::metrics::Hot::PacketsReceived, packets);
        }
        step
    }

    /// Sends an acknowledgement once `ticket` is committed to the store, after every earlier
    /// acknowledgement that still waits for its own.
    fn send_ack(&mut self, ticket: u64, ack: Packet) {
        self.send_ack_after(ticket, 0, ack);
    }

    /// `send_ack`, and in cluster mode once JetStream has the message too (`replicated`, a
    /// ticket of `cluster::Link`; 0 for none).
    fn send_ack_after(&mut self, ticket: u64, replicated: u64, ack: Packet) {
        self.send_ack_when(ticket, replicated, 0, ack);
    }

    /// `send_ack`, and in cluster mode once the other nodes confirmed this node's interest up
    /// to `interest` (a SUBACK: the subscription holds across the cluster, `cluster::interest`).
    fn send_suback(&mut self, ticket: u64, interest: u64, ack: Packet) {
        self.send_ack_when(ticket, 0, interest, ack);
    }

    fn send_ack_when(&mut self, ticket: u64, replicated: u64, interest: u64, ack: Packet) {
        let link = self.broker.cluster();
        let stored = ticket == 0 || self.broker.store().is_committed(ticket);
        let copied = replicated == 0 || link.is_some_and(|l| l.is_replicated(replicated));
        let known = interest == 0 || link.is_some_and(|l| l.own.is_synced(interest));
        if self.flow.acks.is_empty() && stored && copied && known {
            self.io.out.packet(&ack);
            return;
        }
        if self.flow.committed.is_none() {
            self.flow.committed = Some(self.broker.store().committed());
        }
        if replicated > 0 && self.flow.replicated.is_none() {
            self.flow.replicated = link.map(|l| l.replicated());
        }
        if interest > 0 && self.flow.interest.is_none() {
            self.flow.interest = link.map(|l| l.own.synced());
        }
        self.flow.acks.push_back((ticket, replicated, interest, ack));
    }

    fn release_acks(&mut self) -> Step {
        let Some(committed) = &mut self.flow.committed else { return Ok(()) };
        let upto = *committed.borrow_and_update();
        // Entries wait for a cluster ticket only once `replicated` follows it: the ticket is
        // settled, JetStream acknowledged it or the node gave up on it (`cluster.hold_secs`).
        let settled = self.flow.replicated.as_mut().map_or(0, |r| *r.borrow_and_update());
        let known = self.flow.interest.as_mut().map_or(0, |r| *r.borrow_and_update());
        while self.flow.acks.front().is_some_and(|(t, r, i, _)| *t <= upto && *r <= settled && *i <= known) {
            let (_, replicated, _, mut ack) = self.flow.acks.pop_front().expect("front exists");
            if replicated > 0 && !self.broker.cluster().is_some_and(|l| l.is_replicated(replicated)) {
                // Never acknowledged as if the cluster had it: 5.0 hears why, 3.1.1 is closed
                // without an acknowledgement and sends the message again when it reconnects.
                self.broker.metrics().cluster_refused.fetch_add(1, Ordering::Relaxed);
                if !self.io.out.version.is_v5() {
                    return Err(Close::ClusterUnavailable);
                }
                match &mut ack {
                    Packet::PubAck(r) => r.reason = ReasonCode::UNSPECIFIED_ERROR,
                    Packet::PubRec(r) => {
                        r.reason = ReasonCode::UNSPECIFIED_ERROR;
                        // A PUBREC with an error ends the exchange [MQTT-4.3.3]: the identifier is free.
                        self.session.state.incoming_qos2.remove(&r.packet_id);
                    }
                    _ => {}
                }
            }
            self.io.out.packet(&ack);
            if let (Packet::SubAck(a), Some(after)) = (&ack, self.flow.after_suback.as_mut()) {
                if after.front().is_some_and(|(id, _)| *id == a.packet_id) {
                    let (_, retained) = after.pop_front().expect("front exists");
                    for d in retained {
                        self.session.state.push_pending(d);
                    }
                }
                if after.is_empty() {
                    self.flow.after_suback = None;
                }
            }
        }
        if self.flow.acks.is_empty() {
            self.flow.committed = None;
            self.flow.replicated = None;
            self.flow.interest = None;
        }
        Ok(())
    }

    /// Commits store writes for this connection's session, if it is persistent.
    fn commit(&self, txn: Txn) -> u64 {
        self.broker.store().commit(txn)
    }

    /// Room in the client's receive window for a normal message: all of it but the slots kept
    /// for high-priority ones.
    fn window_open(&self) -> bool {
        self.session.state.inflight.len() + usize::from(self.client.high_reserve) < self.client.receive_window
    }

    /// Room for a high-priority message: the whole window, which is the client's Receive
    /// Maximum at most [MQTT-4.9.0-2].
    fn high_window_open(&self) -> bool {
        self.session.state.inflight.len() < self.client.receive_window
    }

    /// Sends queued messages while the client's receive window allows: first the session's
    /// pending ones (retained on subscribe), then whatever the router has queued.
    fn drain_deliveries(&mut self) {
        let mut budget = 256;
        // One clock reading for the whole batch: the deliveries go out within microseconds.
        let mut now = None;
        if self.client.lanes {
            // The high-priority lane first, then high-priority messages of an offline replay
            // (they lead `pending`), each within the whole window [issue 7].
            let shared = self.session.shared.clone();
            while budget > 0 && self.high_window_open() {
                let state = &mut self.session.state;
                let next = match shared.urgent_if_made().and_then(|u| u.queue.lock().expect("urgent lock").pop_front())
                {
                    Some(d) => d,
                    None if state.pending.front().is_some_and(|d| d.message.is_high()) => {
                        state.pop_pending().expect("front exists")
                    }
                    None => break,
                };
                self.start_delivery(next, &mut now);
                budget -= 1;
            }
        }
        while budget > 0
            && self.window_open()
            && !(self.client.lanes && self.io.out.pending_bytes() >= NORMAL_OUTPUT_WITH_LANES)
        {
            let state = &mut self.session.state;
            let next = match state.pop_pending() {
                Some(d) => d,
                None => match state.mailbox.try_recv() {
                    Some(d) => d,
                    None => break,
                },
            };
            self.start_delivery(next, &mut now);
            budget -= 1;
        }
        let shared = &self.session.shared;
        if shared.is_congested() && shared.mailbox.capacity() * 2 >= shared.mailbox.max_capacity() {
            shared.set_congested(false);
        }
    }

    /// Sends one routed message: QoS 0 goes out and is forgotten; QoS 1 and 2 take a packet
    /// identifier and wait in flight for their acknowledgement.
    fn start_delivery(&mut self, d: Delivery, now: &mut Option<Instant>) {
        let metrics = self.broker.metrics();
        // The latency histogram samples wide fan-outs: every delivery of a message routed to
        // at most LATENCY_SAMPLES sessions, about that many of a wider one. A clock reading per
        // delivery was 7% of the CPU of a 1-to-1000 fan-out.
        let fanout = d.message.fanout.load(Ordering::Relaxed) as u64;
        // A mask rather than a remainder: a division per delivery costs as much as the clock.
        let stride_mask = (fanout / LATENCY_SAMPLES).next_power_of_two() - 1;
        let sampled = fanout <= LATENCY_SAMPLES || self.conn_id & stride_mask == 0;
        let now = if sampled || d.message.expiry_interval.is_some() {
            Some(*now.get_or_insert_with(Instant::now))
        } else {
            None
        };
        let latency_us = match (sampled, now) {
            (true, Some(now)) => Some(now.saturating_duration_since(d.message.received_at).as_micros() as u64),
            _ => None,
        };
        if self.broker.withhold(&d, now, self.client.acl.as_deref(), &self.client.client_id).is_some() {
            self.forget_stored(&d);
            return;
        }
        let expiry = match (now, d.message.expiry_interval) {
            (Some(now), Some(_)) => d.message.remaining_expiry(now),
            _ => None,
        };
        let state = &mut self.session.state;
        if d.qos == crate::codec::QoS::AtMostOnce {
            if let Written::TooLarge = self.io.out.publish(&d, 0, false, expiry) {
                self.broker.record(&d.message, Outcome::TooLarge);
            } else {
                self.broker.record(&d.message, Outcome::DeliveredQos0);
                if let Some(us) = latency_us {
                    metrics.delivery_latency.observe(us);
                }
            }
            return;
        }
        let Some(packet_id) = state.allocate_packet_id() else {
            state.unpop_pending(d);
            return;
        };
        match self.io.out.publish(&d, packet_id, false, expiry) {
            Written::TooLarge => {
                self.broker.record(&d.message, Outcome::TooLarge);
                self.forget_stored(&d);
            }
            Written::Sent => {
                self.broker.record(&d.message, Outcome::Sent);
                if let (Some(after), None) = (self.retry_after(), self.retry.next_retry) {
                    // The first message in flight starts the retry ticks: one clock reading per
                    // busy period, not per message.
                    self.retry.next_retry = Some(now.unwrap_or_else(Instant::now) + after);
                }
                if let Some(us) = latency_us {
                    metrics.delivery_latency.observe(us);
                }
                let out_state =
                    if d.qos == crate::codec::QoS::AtLeastOnce { OutState::AwaitPubAck } else { OutState::AwaitPubRec };
                if let Some(at) = d.queue_ref() {
                    // The packet identifier goes to the store with the entry, so that after a
                    // restart the message is resent with the identifier the client knows.
                    let mut txn = Txn::default();
                    txn.update_entry(
                        &self.client.client_id,
                        at,
                        &crate::store::records::QueueEntry::of(&d, Some((packet_id, out_state))),
                    );
                    self.commit(txn);
                }
                let state = &mut self.session.state;
                let serial = state.allocations;
                state.inflight.push_back(crate::session::OutInflight {
                    packet_id,
                    serial,
                    delivery: d,
                    state: out_state,
                    sent_tick: self.retry.retry_tick,
                    retries: 0,
                });
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry.enabled.then(|| Duration::from_secs(self.broker.config().delivery.retry_after))
    }

    /// Sends again, with DUP, the QoS 1 and 2 messages a 3.1.1 client has not acknowledged
    /// (doubling the wait after each retry), at most `max_retries` times; after that the
    /// message is handed off as undelivered once and stays in flight, so that it is still resent
    /// when the client reconnects [MQTT-4.4.0-1] [issue 7].
    ///
    /// Runs once per tick of `retry_after` while messages are in flight. A message is due when
    /// `2^retries + 1` ticks have passed since it was sent: the first retry comes between one and
    /// two `retry_after` after sending, and sending never reads the clock.
    fn retry_unacknowledged(&mut self, now: Instant) {
        let Some(base) = self.retry_after() else { return };
        self.retry.retry_tick = self.retry.retry_tick.wrapping_add(1);
        let tick = self.retry.retry_tick;
        let max_retries = self.broker.config().delivery.max_retries.min(20) as u8;
        let mut handoff = Vec::new();
        let mut waiting = false;
        let state = &mut self.session.state;
        for m in state.inflight.iter_mut() {
            if !matches!(m.state, OutState::AwaitPubAck | OutState::AwaitPubRec) || m.retries > max_retries {
                continue; // past PUBREC, or handed off already
            }
            waiting = true;
            if tick.wrapping_sub(m.sent_tick) < (1u32 << m.retries) + 1 {
                continue;
            }
            if m.retries == max_retries {
                m.retries += 1;
                handoff.push(m.delivery.message.clone());
                continue;
            }
            let expiry = m.delivery.message.remaining_expiry(now);
            if let Written::Sent = self.io.out.publish(&m.delivery, m.packet_id, true, expiry) {
                m.retries += 1;
                m.sent_tick = tick;
                self.broker.record(&m.delivery.message, Outcome::Retried);
            }
        }
        self.retry.next_retry = waiting.then(|| now + base);
        for message in handoff {
            self.broker.undelivered(&self.client.client_id, &message, "no acknowledgement after retries");
        }
    }

    /// Removes a delivery's durable queue entry: it was acknowledged, dropped or expired.
    fn forget_stored(&self, d: &Delivery) {
        if let Some(at) = d.queue_ref() {
            let mut txn = Txn::default();
            txn.remove_entry(&self.client.client_id, at);
            self.commit(txn);
        }
    }

    /// Resends what was in flight when the session was last connected [MQTT-4.4.0-1]: PUBLISH
    /// with DUP set, or PUBREL for messages already past PUBREC.
    fn resend_inflight(&mut self) {
        let now = Instant::now();
        let retry_after = self.retry_after();
        let state = &mut self.session.state;
        let mut keep = std::collections::VecDeque::new();
        for m in std::mem::take(&mut state.inflight) {
            match m.state {
                OutState::AwaitPubComp => {
                    self.io
                        .out
                        .packet(&Packet::PubRel(crate::codec::PubResponse::new(m.packet_id, ReasonCode::SUCCESS)));
                    keep.push_back(m);
                }
                _ => {
                    let expiry = m.delivery.message.remaining_expiry(now);
                    if let Written::Sent = self.io.out.publish(&m.delivery, m.packet_id, true, expiry) {
                        let mut m = m;
                        if let Some(after) = retry_after {
                            m.sent_tick = self.retry.retry_tick;
                            self.retry.next_retry.get_or_insert(now + after);
                        }
                        keep.push_back(m);
                    } else if let Some(at) = m.delivery.queue_ref() {
                        let mut txn = Txn::default();
                        txn.remove_entry(&self.client.client_id, at);
                        self.broker.store().commit(txn);
                    }
                }
            }
        }
        state.inflight = keep;
    }

    /// Queues the closing DISCONNECT if there is one to send, publishes or schedules the will,
    /// and parks or ends the session; returns the socket side for its last flush. The session is
    /// settled before that flush, so a new connection taking it over never waits on this
    /// client's socket.
    fn finish(self, close: &Close) -> (Io, Arc<Broker>, SocketAddr, bool) {
        let v5 = self.io.decoder.version.is_some_and(|v| v.is_v5());
        let Connection { broker, conn_id, peer, mut io, client, session, .. } = self;
        if v5 {
            if let Some(reason) = close.reason_code() {
                let mut properties = Properties::default();
                if matches!(close, Close::ServerShutdown) {
                    // Cluster mode: the node to come back to (`cluster.advertise`).
                    properties.server_reference = broker.cluster().and_then(|l| l.server_reference(&client.client_id));
                }
                io.out.packet(&Packet::Disconnect(Disconnect { reason, properties }));
            }
        }
        if crate::logging::connection_line() {
            info!(client_id = client.client_id.as_str(), peer = %peer, reason = %close.describe(), "client disconnected");
        }
        broker.metrics().client_disconnected();
        let publish_will = !matches!(close, Close::ClientDisconnect { with_will: false } | Close::Fenced);
        let taken_over = matches!(close, Close::Kicked(r) if *r == ReasonCode::SESSION_TAKEN_OVER);
        let ends_now = client.session_expiry == 0 && !taken_over;
        let now_ms = wall_ms_now();
        let mut will_due = None;
        if let Some(will) = client.will.filter(|_| publish_will).map(|w| *w) {
            let delay = will.properties.will_delay_interval.unwrap_or(0).min(client.session_expiry);
            if delay == 0 || ends_now {
                broker.publish_will_now(session.shared.id, will);
            } else {
                will_due = Some(will.clone());
                broker.schedule_will(&session.shared, will, u64::from(delay), now_ms);
            }
        }
        let release = Release { conn_id, expiry_interval: client.session_expiry, will_due, taken_over, now_ms };
        broker.registry().release(session.shared, session.state, release);
        (io, broker, peer, client.counted_ip)
    }
}

impl Io {
    /// Counts a protocol error, releases the client's per-IP count and flushes what is queued
    /// (a CONNACK or DISCONNECT with its reason). Returns whether a final answer was written
    /// (see `end`).
    async fn close(&mut self, broker: &Broker, peer: SocketAddr, counted_ip: bool, close: &Close) -> bool {
        if matches!(close, Close::Decode(_) | Close::Violation(..)) {
            broker.metrics().protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        if counted_ip {
            broker.release_ip(peer.ip());
        }
        let before = self.out.pending_bytes();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.out.flush_all(&mut self.stream)).await;
        let written = before - self.out.pending_bytes();
        count_output(broker, &mut self.out, written);
        written > 0 && !matches!(close, Close::SocketClosed)
    }

    /// Ends the connection after `close`. When its last answer was a reason code, closing a
    /// socket with unread input would make the kernel send a reset, and a reset destroys what
    /// the client has not read yet: the very CONNACK or DISCONNECT that says why. So the client
    /// gets until it closes, or `close_linger_ms`, to read it, while its input is discarded.
    /// The linger runs in a task of its own that holds only the socket: the connection's task
    /// and state are gone by then, and its future does not grow by the linger's (a task is
    /// rounded up to 128 bytes; 16 bytes more there cost 128 per idle connection).
    /// Without a final answer the socket is simply closed (dropped).
    fn end(self, broker: &Broker, answered: bool) {
        if answered {
            tokio::spawn(linger(self.stream, broker.config().mqtt.close_linger_ms));
        }
    }
}

/// Half-closes (our FIN follows the answer) and discards the client's input until it closes or
/// `ms` pass.
async fn linger(mut stream: Socket, ms: u64) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    if ms > 0 {
        let _ = tokio::time::timeout(Duration::from_millis(ms), stream.discard_until_closed()).await;
    }
}

/// Why a kick closes the connection; a dropped sender means the server is going away.
fn kicked(kick: Option<Kick>) -> Close {
    match kick {
        Some(k) if k.reason == ReasonCode::SERVER_SHUTTING_DOWN => Close::ServerShutdown,
        Some(k) if k.elsewhere => Close::TakenOverElsewhere,
        Some(k) => Close::Kicked(k.reason),
        None => Close::ServerShutdown,
    }
}

/// Adds what was written to the broker's byte and packet counters: once per write, not per
/// packet.
fn count_output(broker: &Broker, out: &mut Outbound, bytes: usize) {
    let metrics = broker.metrics();
    if bytes > 0 {
        metrics.hot.add(crate::metrics::Hot::BytesSent, bytes as u64);
    }
    let packets = std::mem::take(&mut out.packets_encoded);
    if packets > 0 {
        metrics.hot.add(crate::metrics::Hot::PacketsSent, packets);
    }
}

/// Ready when a high-priority delivery is signalled; never for a session without the lane.
async fn urgent_notified(urgent: Option<&crate::session::Urgent>) {
    match urgent {
        Some(u) => u.notify.notified().await,
        None => std::future::pending().await,
    }
}

/// Ready when the store's committed ticket moves; never while nothing waits for it.
async fn committed_changed(committed: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match committed {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every idle connection carries for as long as it lives (bench/notes.md, issue 14):
    /// the task's future (a tokio cell adds a 128-byte header and rounds to 128 bytes) and the
    /// boxed connection state. The event loop's future is not among them: it is boxed and exists
    /// only while the connection is busy.
    #[tokio::test]
    async fn an_idle_connection_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse(&format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[sys]\ninterval = 0\n",
            dir.path().display().to_string()
        ))
        .unwrap();
        let (broker, _) = Broker::open(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let origin = Origin { peer, loopback: true, listener: 0, certificate_name: None };
        let task = serve(broker, Socket::Tcp(stream), origin);
        let (future, state) = (std::mem::size_of_val(&task), std::mem::size_of::<Connection>());
        eprintln!("connection task future {future} B, Connection {state} B");
        assert!(future <= 640, "the connection task's future grew to {future} bytes (624 in issue 14)");
        assert!(state <= 1024, "Connection grew to {state} bytes");
    }
}
