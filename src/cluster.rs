//! Cluster mode's link to NATS (docs/cluster.md): how a node hands the messages its clients
//! publish to the other nodes, and what it receives from them. The broker above routes what
//! arrives (`server::cluster`); this module knows messages and their stored form, not sessions.
//!
//! QoS 0 travels over core NATS (`herald.q0`), at most once like the QoS itself. QoS 1 and 2 are
//! appended to a JetStream stream (`herald.log`, replicated): the publisher's acknowledgement
//! waits for JetStream's, through a ticket the connection waits for as it waits for the store's
//! (`replicated`). Each node reads the stream through one durable consumer of its own. Every
//! message carries its node's name, so a node skips what it published itself (routed locally
//! already).

pub mod bundle;
pub mod fence;
pub mod interest;
mod outbound;
pub mod sessions;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::codec::QoS;
use crate::config::ClusterConfig;
use crate::message::Message;
use crate::store::records;
use bundle::Outgoing;
use fence::FenceAnswer;
use sessions::{Directory, EntrySubscription, Floors, HandoverReply, SessionEntry};

/// Core NATS subject of QoS 0 messages.
pub const QOS0_SUBJECT: &str = "herald.q0";
/// Core NATS subject on which a node says a client connected to it (`Link::claimed`).
pub const CLAIM_SUBJECT: &str = "herald.claim";
/// The stream's subject: QoS 1 and 2 messages.
pub const LOG_SUBJECT: &str = "herald.log";
/// `herald.qos2.<client id in hex>`, in the stream beside the log: the QoS 2 messages a
/// session's client has received (PUBREC), by message id, with their packet identifiers; the
/// last one per session counts. A node taking the session over from a node that died does not
/// deliver those again [MQTT-4.3.3-1] (docs/cluster.md, "Exactly once across a node's death").
pub const QOS2_SUBJECT: &str = "herald.qos2";
/// How many received QoS 2 messages a session's ledger names at most: the newest.
pub const QOS2_LEDGER: usize = 256;
/// Subjects of retained messages, one per topic (`retained_subject`); the stream keeps the
/// last message of each: what a node that starts later reads. (A JetStream key-value bucket
/// would do the same, but async-nats 0.50 cannot read NATS 2.9's answer about one.)
pub const RETAINED_SUBJECTS: &str = "herald.retained.>";
/// The longest topic kept in the stream of retained messages: its subject holds the topic in
/// hex, and NATS subjects stay well inside its 4 KiB control line.
const MAX_RETAINED_TOPIC: usize = 1024;
/// Core NATS subject of receipt lookups: every node with a receipt of the message answers.
pub const RECEIPTS_SUBJECT: &str = "herald.receipts";
/// How long a receipt lookup waits for the other nodes' answers.
const RECEIPTS_WAIT: Duration = Duration::from_millis(500);
/// Core NATS subjects on which each node says it is alive, once a second: `herald.node.<node>`.
pub const NODE_PREFIX: &str = "herald.node.";
/// Header naming the node a message was published on.
pub const NODE_HEADER: &str = "Herald-Node";
/// Core NATS subject on which a fenced node asks the others which of its sessions they took.
pub const FENCE_SUBJECT: &str = "herald.fence";
/// How long a JetStream request for a takeover is tried again (`retrying`).
const API_PATIENCE: Duration = Duration::from_secs(10);
/// The longest wait between two attempts to reach NATS again.
const RECONNECT_EVERY: Duration = Duration::from_millis(250);
/// How long a fenced node waits for the other nodes' answers.
const FENCE_WAIT: Duration = Duration::from_secs(3);
/// Before an append that failed is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {servers}: {why}")]
    Connect { servers: String, why: String },
    #[error("JetStream stream {stream}: {why}")]
    Stream { stream: String, why: String },
}

/// What became of a message handed to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// On its way (QoS 0), nothing to wait for.
    Sent,
    /// Acknowledge the publisher once `replicated` reaches this ticket.
    Ticket(u64),
    /// Too many waiting already (`cluster.max_pending`): refuse the PUBLISH.
    Full,
}

/// Figures for `$SYS` and /metrics.
#[derive(Default)]
pub struct LinkFigures {
    pub sent_qos0: AtomicU64,
    pub dropped_qos0: AtomicU64,
    pub appended: AtomicU64,
    pub append_retries: AtomicU64,
    /// Bursts of QoS 0 copies and of appends handed to the NATS client (`cluster.linger_ms`).
    pub bursts: AtomicU64,
    /// Stories that went to NATS in one message with others (`bundle`).
    pub bundled: AtomicU64,
    pub received: AtomicU64,
    pub dropped_retained: AtomicU64,
    /// Checkpoints taken (four a second).
    pub checkpoints: AtomicU64,
    /// Sessions taken over from another node (`Broker::adopt`).
    pub adopted: AtomicU64,
    /// Stream messages not yet delivered to this node's consumer, as of the last one it got.
    pub log_lag: AtomicU64,
    /// Messages no other node wanted (interest): QoS 0 not sent, QoS 1/2 appended for no one.
    pub not_sent: AtomicU64,
    /// Appends acknowledged at a stream sequence below an earlier ticket's (order lost).
    pub append_reordered: AtomicU64,
    /// QoS 2 receptions not written to the ledger (the append queue was full).
    pub qos2_unrecorded: AtomicU64,
    /// Times this node's lease lapsed and it was fenced (`fence`).
    pub fenced: AtomicU64,
    /// Sessions ended here on coming back because another node had taken them over.
    pub fenced_sessions: AtomicU64,
}

pub struct Link {
    node: String,
    client: async_nats::Client,
    qos0: mpsc::Sender<Outgoing<()>>,
    /// Claims for the other nodes (`claimed`), on core NATS.
    claims: mpsc::Sender<Outgoing<()>>,
    /// Retained messages (an empty payload: removed) for the bucket, in order.
    retained: mpsc::Sender<(String, Option<Bytes>)>,
    appends: Mutex<Appends>,
    /// The highest ticket settled: acknowledged by JetStream (with every one before it, up to
    /// `acknowledged`) or given up on after `hold`.
    replicated: watch::Sender<u64>,
    acknowledged: AtomicU64,
    hold: Duration,
    pub figures: LinkFigures,
    js: jetstream::Context,
    stream: String,
    /// The last stream message routed here (and every one before it).
    processed: AtomicU64,
    floors: Mutex<Floors>,
    /// The checkpoint written to the directory last.
    checkpointed: AtomicU64,
    directory: Mutex<Directory>,
    /// Session records and checkpoints for the directory stream (None: remove), in order.
    directory_out: mpsc::Sender<(String, Option<Bytes>)>,
    /// `since` of the sessions this node holds (`sessions::SessionEntry`).
    since: Mutex<HashMap<String, u64>>,
    /// When each other node was last heard from (`alive`), and whether it was taken for dead.
    nodes: Mutex<HashMap<String, (tokio::time::Instant, bool)>>,
    /// `cluster.advertise` of this node (said with every heartbeat) and of the others (heard).
    advertise: Option<String>,
    advertised: Mutex<HashMap<String, String>>,
    dead_after: Duration,
    /// This node's lease and fence (one delivering holder per session).
    pub fence: fence::Fence,
    /// Sessions taken over from each node taken for dead, with when (wall-clock ms): what that
    /// node must let go of if it comes back.
    adopted_from: Mutex<HashMap<String, Vec<(u64, String)>>>,
    /// This node's durable consumer of the stream, to follow it afresh after an error.
    log_consumer: jetstream::consumer::PullConsumer,
    /// Every node's interest (`interest`), and this node's own.
    table: Arc<interest::Table>,
    pub own: Arc<interest::Own>,
    interest_kv: jetstream::kv::Store,
    /// Sessions taken over here, with the stream sequence from which this node's consumer
    /// gives them messages (`Broker::route_remote`): `u64::MAX` while they are read back from
    /// the stream, then what the reading covered (`open_to_consumer`).
    read_up_to: Mutex<HashMap<u64, u64>>,
    /// Asks the receiving task to open sessions to the consumer between two messages.
    opens: mpsc::Sender<Open>,
    has_floors: std::sync::atomic::AtomicBool,
    /// One takeover of a client's session at a time (by hash of its identifier): the client's
    /// own CONNECT and a leaving node's request may ask for the same session at once.
    adopting: [tokio::sync::Mutex<()>; 64],
    /// Sessions this node, shutting down, is handing to another node, and to which.
    moving: Mutex<HashMap<String, String>>,
}

/// An advertised address longer than this is ignored (it travels in every heartbeat).
const MAX_ADVERTISE: usize = 256;

struct Appends {
    next: u64,
    tx: mpsc::Sender<Outgoing<u64>>,
    /// When each unsettled ticket was handed over, oldest first: what `cluster.hold_secs`
    /// counts from.
    since: VecDeque<(u64, tokio::time::Instant)>,
}

impl Appends {
    /// Hands `payload` to the append task; its ticket, or None when the queue is full. `topic`
    /// (its hash) lets it share a message with others (`bundle`).
    fn issue(&mut self, subject: String, topic: Option<u64>, payload: Bytes) -> Option<u64> {
        let ticket = self.next;
        self.tx.try_send(Outgoing { subject, topic, payload, tag: ticket }).ok()?;
        self.next += 1;
        self.since.push_back((ticket, tokio::time::Instant::now()));
        Some(ticket)
    }
}

/// What the other nodes send this one, for `server::cluster` to route.
pub struct Inbound {
    pub qos0: async_nats::Subscriber,
    /// Clients connecting to other nodes.
    pub claims: async_nats::Subscriber,
    pub log: jetstream::consumer::pull::Stream,
    /// The cluster's retained messages when the node joined (applied before it listens).
    pub retained_now: Vec<Message>,
    /// Retained messages since then, every node's own included.
    pub retained: jetstream::consumer::pull::Stream,
    /// Session records and checkpoints since the node joined (those before are in the Link).
    pub directory: jetstream::consumer::pull::Stream,
    /// Other nodes asking this one to let go of a session.
    pub handovers: async_nats::Subscriber,
    /// Every node saying it is alive.
    pub alive: async_nats::Subscriber,
    /// Receipt lookups of the other nodes' APIs.
    pub receipts: async_nats::Subscriber,
    /// Fenced nodes asking which of their sessions this one took over.
    pub fences: async_nats::Subscriber,
    /// Nodes shutting down asking this one to take a session over now.
    pub takes: async_nats::Subscriber,
    /// Sessions taken over here to open to the consumer (`Link::open_to_consumer`).
    pub opens: mpsc::Receiver<Open>,
}

/// Sessions read back from the stream up to `upto`, to be given what the consumer routes from
/// now on above max(`upto`, what it routed so far); the answer is what it routed so far.
pub struct Open {
    pub sessions: Vec<u64>,
    pub upto: u64,
    /// Open even if the consumer routed past `upto` meanwhile (see `open_to_consumer`).
    pub force: bool,
    pub answer: tokio::sync::oneshot::Sender<u64>,
}

impl Link {
    /// Connects to NATS (retrying until `deadline`), makes sure the stream and this node's
    /// consumer exist, and starts the tasks that publish. `boot` makes this process's message
    /// ids for JetStream's duplicate detection unique across restarts.
    pub async fn connect(config: &ClusterConfig, boot: u64) -> Result<(Arc<Link>, Inbound), ClusterError> {
        let servers = config.nats.join(",");
        let connect_error = |why: String| ClusterError::Connect { servers: servers.clone(), why };
        let addrs = config
            .nats
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| connect_error(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("herald-{}", config.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            // async-nats backs off up to 4 s between attempts: a node would then wait that long
            // after NATS is back before it delivers again. A connection attempt costs little.
            .reconnect_delay_callback(|attempts| RECONNECT_EVERY.min(Duration::from_millis(50) * attempts as u32))
            .connect(addrs)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let stream_error = |why: String| ClusterError::Stream { stream: config.stream.clone(), why };
        // JetStream answers only once its servers have elected a leader: a cluster starting
        // together needs a few seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let stream = loop {
            let wanted = jetstream::stream::Config {
                name: config.stream.clone(),
                // `herald.log` alone: what nodes before interest-based routing appended.
                subjects: vec![LOG_SUBJECT.into(), format!("{LOG_SUBJECT}.>"), format!("{QOS2_SUBJECT}.>")],
                num_replicas: config.replicas,
                max_age: Duration::from_secs(config.max_age_secs),
                storage: jetstream::stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            };
            match js.get_or_create_stream(wanted.clone()).await {
                Ok(s) if s.cached_info().config.subjects != wanted.subjects => {
                    // Made by an older node: it takes the per-slot subjects too.
                    match js.update_stream(&wanted).await {
                        Ok(_) => break js.get_stream(&config.stream).await.map_err(|e| stream_error(e.to_string()))?,
                        Err(e) => return Err(stream_error(e.to_string())),
                    }
                }
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "JetStream not ready; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(stream_error(e.to_string())),
            }
        };
        // JetStream answers "no responders" now and then while it settles: each step is tried
        // again for a while (`retrying`) rather than failing the start.
        let slot = retrying(|| interest::claim_slot(&js, &config.node, config.replicas)).await.map_err(stream_error)?;
        // Made, or updated from an older node's filter: only what this node's slot wants.
        let consumer: jetstream::consumer::PullConsumer = retrying(|| async {
            stream
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some(format!("herald-{}", config.node)),
                    deliver_policy: jetstream::consumer::DeliverPolicy::New,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: config.max_pending as i64,
                    filter_subject: interest::node_filter(LOG_SUBJECT, slot),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(stream_error)?;
        let (interest_kv, table, interest_watch) =
            retrying(|| follow_interest(&js, config)).await.map_err(stream_error)?;
        // What this node's consumer acknowledged before (or, made just now, the stream's end):
        // routed here already.
        let processed = consumer.cached_info().ack_floor.stream_sequence;
        let log = retrying(|| follow(&consumer)).await.map_err(stream_error)?;
        let qos0_in = client
            .subscribe(interest::node_filter(QOS0_SUBJECT, slot))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let syncs = client.subscribe(interest::SYNC_SUBJECT).await.map_err(|e| connect_error(e.to_string()))?;
        let claims_in = client.subscribe(CLAIM_SUBJECT).await.map_err(|e| connect_error(e.to_string()))?;
        // Tried again like the other JetStream steps: a stress run saw "no responders" here
        // while JetStream settled, and the node exit.
        let (retained_now, retained_in) = retrying(|| async {
            let mut now = Vec::new();
            let stream = read_last_per_subject(&js, config, "RETAINED", RETAINED_SUBJECTS, |m| {
                now.extend(retained_entry(m.subject.as_str(), &m.payload).filter(|r| !r.payload.is_empty()));
            })
            .await?;
            Ok((now, stream))
        })
        .await
        .map_err(stream_error)?;
        let (directory, directory_in) = retrying(|| read_directory(&js, config)).await.map_err(stream_error)?;
        let base = directory.checkpoint(&config.node).unwrap_or(0);
        let handovers = client
            .subscribe(format!("{}{}", sessions::HANDOVER_PREFIX, config.node))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let (directory_out, directory_rx) = mpsc::channel(config.max_pending);
        let alive = client.subscribe(format!("{NODE_PREFIX}*")).await.map_err(|e| connect_error(e.to_string()))?;
        let receipts = client.subscribe(RECEIPTS_SUBJECT).await.map_err(|e| connect_error(e.to_string()))?;
        let fences = client.subscribe(FENCE_SUBJECT).await.map_err(|e| connect_error(e.to_string()))?;
        let takes = client
            .subscribe(format!("{}{}", sessions::TAKE_PREFIX, config.node))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        // The nodes the directory names count as heard from now: one that died before this node
        // started is taken for dead once `dead_after_secs` pass without a word from it.
        let now = tokio::time::Instant::now();
        let known = directory.nodes().into_iter().filter(|n| *n != config.node).map(|n| (n, (now, false))).collect();
        let (opens, opens_rx) = mpsc::channel(64);
        let (qos0, qos0_rx) = mpsc::channel(config.max_pending);
        let (claims, claims_rx) = mpsc::channel(config.max_pending);
        let (retained, retained_rx) = mpsc::channel(config.max_pending);
        let (tx, rx) = mpsc::channel(config.max_pending);
        let (replicated, _) = watch::channel(0);
        let link = Arc::new(Link {
            node: config.node.clone(),
            client,
            qos0,
            claims,
            retained,
            appends: Mutex::new(Appends { next: 1, tx, since: VecDeque::new() }),
            replicated,
            acknowledged: AtomicU64::new(0),
            hold: Duration::from_secs(config.hold_secs),
            figures: LinkFigures::default(),
            js: js.clone(),
            stream: config.stream.clone(),
            processed: AtomicU64::new(processed),
            floors: Mutex::new(Floors::new(base)),
            checkpointed: AtomicU64::new(base),
            directory: Mutex::new(directory),
            directory_out,
            since: Mutex::default(),
            nodes: Mutex::new(known),
            advertise: config.advertise.clone(),
            advertised: Mutex::default(),
            dead_after: Duration::from_secs(config.dead_after_secs),
            fence: fence::Fence::new(Duration::from_secs(config.dead_after_secs)),
            adopted_from: Mutex::default(),
            log_consumer: consumer.clone(),
            table: table.clone(),
            own: Arc::new(interest::Own::new(slot)),
            interest_kv: interest_kv.clone(),
            read_up_to: Mutex::default(),
            opens,
            has_floors: std::sync::atomic::AtomicBool::new(false),
            adopting: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            moving: Mutex::default(),
        });
        let linger = Duration::from_millis(config.linger_ms);
        tokio::spawn(outbound::send_core(link.clone(), Some(linger), qos0_rx));
        tokio::spawn(outbound::send_core(link.clone(), None, claims_rx));
        tokio::spawn(apply_interest(table, interest_watch));
        tokio::spawn(answer_syncs(link.clone(), syncs));
        {
            let confirming = link.clone();
            let confirm = move |revision: u64| {
                let link = confirming.clone();
                Box::pin(async move { link.confirm_interest(revision).await })
                    as futures_util::future::BoxFuture<'static, ()>
            };
            let hold = Duration::from_secs(config.hold_secs);
            tokio::spawn(interest::announce(link.own.clone(), interest_kv, confirm, hold));
        }
        tokio::spawn(put_last(link.clone(), js.clone(), retained_rx));
        tokio::spawn(put_last(link.clone(), js.clone(), directory_rx));
        tokio::spawn(outbound::append(link.clone(), js, rx, boot, linger));
        info!(node = config.node.as_str(), nats = servers.as_str(), stream = config.stream.as_str(), "cluster joined");
        Ok((
            link,
            Inbound {
                qos0: qos0_in,
                claims: claims_in,
                log,
                retained_now,
                retained: retained_in,
                directory: directory_in,
                handovers,
                alive,
                receipts,
                fences,
                takes,
                opens: opens_rx,
            },
        ))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Follows this node's consumer afresh: after the connection to NATS was lost and made
    /// again, the old pull stream would ask JetStream again only when its pull expires (10 s).
    /// While the connection stayed up the old one is kept: what it holds undelivered would
    /// come again only after `ack_wait`, behind newer messages.
    pub async fn follow_log(&self) -> Result<jetstream::consumer::pull::Stream, String> {
        follow(&self.log_consumer).await
    }

    /// Times the connection to NATS was made (the first included).
    pub fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// Whether the client is connected to a NATS server now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Hands a message accepted on this node to the others. Never waits.
    pub fn forward(&self, message: &Message) -> Forward {
        let payload = Bytes::from(records::encode_message(message));
        if message.retain {
            self.retain(message, &payload);
        }
        if message.qos == QoS::AtMostOnce {
            let (mask, shared) = self.wanted(message);
            let mask = mask & !(1 << self.own.slot);
            if mask == 0 && !shared {
                // No other node wants it: nothing crosses.
                self.figures.not_sent.fetch_add(1, Ordering::Relaxed);
                return Forward::Sent;
            }
            let subject = interest::subject(QOS0_SUBJECT, mask);
            let topic = Some(bundle::topic_hash(&message.topic));
            if self.qos0.try_send(Outgoing { subject, topic, payload, tag: () }).is_err() {
                self.figures.dropped_qos0.fetch_add(1, Ordering::Relaxed);
            }
            return Forward::Sent;
        }
        // The nodes that want it are looked up again under the appends lock: a node confirming
        // another's new interest (`answer_syncs`) takes that lock after applying it, so every
        // append addressed without the new interest has its ticket by then, and is in the
        // stream before the confirmation goes (`cluster.linger_ms` holds appends a while).
        let mut appends = self.appends.lock().expect("appends lock");
        let (mask, _) = self.wanted(message);
        // Appended even when no other node wants it: a node taking this one's sessions over
        // reads it back from the stream. And for this node too, which skips it but so knows it
        // routed everything up to it (`processed`, what a session handed over is read above).
        if mask & !(1 << self.own.slot) == 0 {
            self.figures.not_sent.fetch_add(1, Ordering::Relaxed);
        }
        let mask = mask | (1 << self.own.slot);
        let topic = Some(bundle::topic_hash(&message.topic));
        match appends.issue(interest::subject(LOG_SUBJECT, mask), topic, payload) {
            Some(ticket) => Forward::Ticket(ticket),
            None => Forward::Full,
        }
    }

    /// The last append ticket issued.
    fn appends_started(&self) -> u64 {
        self.appends.lock().expect("appends lock").next - 1
    }

    /// Hands `payload` to the append task, in order with the messages; the ticket `replicated`
    /// reaches once JetStream has it. None when the append queue is full.
    fn append(&self, subject: String, payload: Bytes) -> Option<u64> {
        self.appends.lock().expect("appends lock").issue(subject, None, payload)
    }

    /// Writes `client_id`'s ledger of received QoS 2 messages (message id, packet identifier;
    /// `QOS2_SUBJECT`): the ticket its PUBRELs wait for, so that a message whose exchange the
    /// client completed is in the ledger. None when the append queue is full.
    pub fn record_qos2_received(&self, client_id: &str, ledger: &VecDeque<(u64, u16)>) -> Option<u64> {
        let mut payload = Vec::with_capacity(ledger.len() * 10);
        for (id, packet_id) in ledger {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&packet_id.to_be_bytes());
        }
        self.append(format!("{QOS2_SUBJECT}.{}", hex(client_id.as_bytes())), Bytes::from(payload))
    }

    /// The last ledger of received QoS 2 messages written for `client_id`, message id to
    /// packet identifier; empty when none was. Err when JetStream cannot be asked.
    pub async fn qos2_received(&self, client_id: &str) -> Result<HashMap<u64, u16>, String> {
        use jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{QOS2_SUBJECT}.{}", hex(client_id.as_bytes()));
        let last = retrying(|| async {
            let stream = self.js.get_stream(&self.stream).await.map_err(|e| e.to_string())?;
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => Ok(Some(m.payload)),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
        let Some(payload) = last else { return Ok(HashMap::new()) };
        Ok(payload
            .chunks_exact(10)
            .map(|c| {
                let id = u64::from_be_bytes(c[..8].try_into().expect("8 bytes"));
                (id, u16::from_be_bytes([c[8], c[9]]))
            })
            .collect())
    }

    /// The nodes that want `message` (bit i: slot i), and whether a shared group's filter
    /// somewhere matches it. A story id goes to every node: each keeps the story ids it saw, so
    /// that a retry on any node is recognised (`receipts`).
    fn wanted(&self, message: &Message) -> (u32, bool) {
        if message.properties.user_properties.iter().any(|(k, _)| k == crate::receipt::STORY_ID) {
            return (u32::MAX, true);
        }
        self.table.wanted(&message.topic)
    }

    /// This node's slot (`interest`).
    pub fn slot(&self) -> u8 {
        self.own.slot
    }

    /// A session here subscribed to `filter` (a shared group's, with `shared`): the ticket its
    /// SUBACK waits for (`interest_synced`) when the node did not want it before.
    pub fn interest_add(&self, shared: bool, filter: &str) -> Option<u64> {
        self.own.add(shared, filter)
    }

    pub fn interest_remove(&self, shared: bool, filter: &str) {
        self.own.remove(shared, filter)
    }

    /// Every session's filters here, those of sessions restored from the store before the node
    /// joined, as the router lists them (`$share/<group>/<filter>` for shared groups).
    pub fn seed_interest(&self, filters: Vec<(String, usize)>) {
        for (filter, n) in filters {
            let (shared, f) = match crate::topic::parse_filter(&filter) {
                Ok(p) => (p.share.is_some(), p.filter.to_owned()),
                Err(_) => continue,
            };
            for _ in 0..n {
                self.own.add(shared, &f);
            }
        }
    }

    /// Removes what the bucket still says this node wants from an earlier run and it no longer
    /// does (called once at start, after `seed_interest`).
    pub async fn prune_interest(&self) -> Result<usize, String> {
        use futures_util::StreamExt;
        let mut keys = self.interest_kv.keys().await.map_err(|e| e.to_string())?;
        let mut stale = Vec::new();
        let present = self.own.present();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if let Some((slot, shared, filter)) = interest::parse_key_pub(&key) {
                if slot == self.own.slot
                    && !present.iter().any(|(s, f)| *s == shared && interest::key_filter(f) == filter)
                {
                    stale.push((shared, filter));
                }
            }
        }
        let n = stale.len();
        self.own.forget(stale);
        Ok(n)
    }

    /// Waits until every interest change of this node up to now is confirmed by the live nodes.
    pub async fn interest_settled(&self) {
        let ticket = self.own.issued();
        let mut synced = self.own.synced();
        let _ = synced.wait_for(|s| *s >= ticket).await;
    }

    /// Asks every node heard from in the last two seconds to confirm that it applied the
    /// interest table up to `revision`; returns when all did, or after `interest::sync_wait`.
    async fn confirm_interest(&self, revision: u64) {
        use futures_util::StreamExt;
        let now = tokio::time::Instant::now();
        let heard = self.heard_within(Duration::from_secs(2));
        let mut waiting = heard.clone();
        // A node that joined moments ago may not have heard every other node yet: it also waits
        // for every node the directory names (live ones answer at once; one that is gone costs
        // the whole round), and with none known, the whole round for whoever answers. (Waiting
        // the whole round always made each session a restarted node took over in a rolling
        // restart wait a second.)
        let young = self.fence.now_ms() < 2_500;
        if young {
            waiting.extend(self.directory_nodes().into_iter().filter(|n| *n != self.node));
        }
        let wait_round = young && waiting.is_empty();
        if waiting.is_empty() && !wait_round {
            return;
        }
        let inbox = self.client.new_inbox();
        let Ok(mut answers) = self.client.subscribe(inbox.clone()).await else { return };
        let payload = Bytes::copy_from_slice(&revision.to_be_bytes());
        if self.client.publish_with_reply(interest::SYNC_SUBJECT, inbox, payload).await.is_err() {
            return;
        }
        let deadline = now + interest::sync_wait();
        while !waiting.is_empty() || wait_round {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(m)) => {
                    if let Ok(node) = std::str::from_utf8(&m.payload) {
                        waiting.remove(node);
                    }
                }
                _ if waiting.iter().all(|n| !heard.contains(n)) => return,
                _ => {
                    warn!(revision, missing = ?waiting, "nodes did not confirm this node's new interest in time");
                    return;
                }
            }
        }
    }

    /// Records a retained message of this node's publishers in the cluster's bucket (an empty
    /// payload removes the topic's) [MQTT-3.3.1-5] [MQTT-3.3.1-6]. Never waits; the message
    /// itself reaches the running nodes through `forward`, the bucket serves those that start
    /// later.
    fn retain(&self, message: &Message, encoded: &Bytes) {
        if message.topic.len() > MAX_RETAINED_TOPIC {
            warn!(
                length = message.topic.len(),
                "retained topic too long for the cluster's stream; kept on this node only"
            );
            self.figures.dropped_retained.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // An empty message removes the topic's: the stream keeps only the last of a subject.
        let value = (!message.payload.is_empty()).then(|| encoded.clone());
        if self.retained.try_send((retained_subject(&message.topic), value)).is_err() {
            self.figures.dropped_retained.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tells the other nodes that `client_id` connected here, so that a connection they hold
    /// for it is closed (5.0: DISCONNECT 0x8E) [MQTT-3.1.4-3], and with a clean start the
    /// session they keep for it ends [MQTT-3.1.2-4]. At most once, like QoS 0: a node that
    /// misses it keeps the old connection until that one's keep-alive runs out.
    pub fn claimed(&self, client_id: &str, clean_start: bool) {
        let mut payload = Vec::with_capacity(1 + client_id.len());
        payload.push(u8::from(clean_start));
        payload.extend_from_slice(client_id.as_bytes());
        let claim = Outgoing { subject: CLAIM_SUBJECT.to_owned(), topic: None, payload: Bytes::from(payload), tag: () };
        let _ = self.claims.try_send(claim);
    }

    /// Follows the highest settled ticket: JetStream acknowledged its message and every one
    /// before it (`is_replicated`), or the node gave up waiting (`cluster.hold_secs`).
    pub fn replicated(&self) -> watch::Receiver<u64> {
        self.replicated.subscribe()
    }

    /// Appends handed to JetStream and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        let next = self.appends.lock().expect("appends lock").next;
        (next - 1).saturating_sub(self.acknowledged.load(Ordering::Acquire))
    }

    /// Whether JetStream acknowledged the message of `ticket` (and every one before it).
    pub fn is_replicated(&self, ticket: u64) -> bool {
        self.acknowledged.load(Ordering::Acquire) >= ticket
    }

    /// JetStream acknowledged every ticket up to `ticket`.
    fn acknowledge(&self, ticket: u64) {
        self.acknowledged.fetch_max(ticket, Ordering::AcqRel);
        let mut appends = self.appends.lock().expect("appends lock");
        while appends.since.front().is_some_and(|(t, _)| *t <= ticket) {
            appends.since.pop_front();
        }
        drop(appends);
        self.replicated.send_if_modified(|r| std::mem::replace(r, (*r).max(ticket)) < ticket);
    }

    /// Gives up on the tickets handed over more than `hold` ago: their publishers are told
    /// (5.0: reason 0x80; 3.1.1: closed without an acknowledgement). Their appends go on being
    /// tried, so such a message may still reach the other nodes once NATS is back; it was never
    /// acknowledged, and its publisher may send it again (a duplicate, allowed at QoS 1).
    fn give_up_on_old(&self) {
        let now = tokio::time::Instant::now();
        let mut refused = 0;
        {
            let mut appends = self.appends.lock().expect("appends lock");
            while let Some(&(t, at)) = appends.since.front() {
                if now.duration_since(at) < self.hold {
                    break;
                }
                refused = t;
                appends.since.pop_front();
            }
        }
        if refused > 0 {
            warn!(
                up_to_ticket = refused,
                hold_secs = self.hold.as_secs(),
                "NATS has not taken QoS 1/2 messages in time: their publishers are refused"
            );
            self.replicated.send_if_modified(|r| std::mem::replace(r, (*r).max(refused)) < refused);
        }
    }

    /// The stream message `seq` is routed here (this node's own, skipped, included).
    pub fn processed_up_to(&self, seq: u64) {
        self.processed.fetch_max(seq, Ordering::AcqRel);
        if self.has_floors.load(Ordering::Acquire) {
            let mut floors = self.read_up_to.lock().expect("floors lock");
            floors.retain(|_, upto| *upto > seq);
            self.has_floors.store(!floors.is_empty(), Ordering::Release);
        }
    }

    /// A session about to be read back from the stream here: this node's consumer gives it
    /// nothing until `open_to_consumer`.
    pub fn hold_from_consumer(&self, session: u64) {
        self.read_up_to.lock().expect("floors lock").insert(session, u64::MAX);
        self.has_floors.store(true, Ordering::Release);
    }

    /// The sessions were read back from the stream up to `upto`. Returns what this node's
    /// consumer had routed so far (None if the receiving task is gone), decided by the
    /// receiving task between two messages. If that is not above `upto`, the sessions are open:
    /// the consumer gives them what it routes from now on. If it is, they stay held and the
    /// caller reads the stream above `upto` up to there itself (what the consumer routed while
    /// they were held) and asks again: opening first would let the consumer's newer messages
    /// overtake that reading's older ones [MQTT-4.6.0-2] (a chaos test saw a story arrive
    /// after the nine that followed it). `force` opens at once whatever was routed, above
    /// max(`upto`, that); the caller then reads the rest, as a last resort for a reading that
    /// never catches up.
    pub async fn open_to_consumer(&self, sessions: Vec<u64>, upto: u64, force: bool) -> Option<u64> {
        let (answer, routed) = tokio::sync::oneshot::channel();
        self.opens.send(Open { sessions, upto, force, answer }).await.ok()?;
        routed.await.ok()
    }

    /// The receiving task's side of `open_to_consumer`.
    pub fn open(&self, open: Open) {
        let routed = self.processed();
        if routed > open.upto && !open.force {
            let _ = open.answer.send(routed);
            return;
        }
        let from = routed.max(open.upto);
        {
            let mut floors = self.read_up_to.lock().expect("floors lock");
            for session in open.sessions {
                floors.insert(session, from);
            }
        }
        let _ = open.answer.send(routed);
    }

    /// A session that was held from the consumer and is gone (its takeover failed).
    pub fn forget_floor(&self, session: u64) {
        self.read_up_to.lock().expect("floors lock").remove(&session);
    }

    /// The stream sequence up to which `session` has everything it wants: what this node's
    /// consumer routed, or what the session was read back up to when it came here, whichever is
    /// further (a node's consumer sees only what was sent to it, so `processed` can trail a
    /// session taken over just now).
    pub fn complete_up_to(&self, session: u64) -> u64 {
        let floor = self.read_up_to.lock().expect("floors lock").get(&session).copied().unwrap_or(0);
        self.processed().max(if floor == u64::MAX { 0 } else { floor })
    }

    pub fn has_floors(&self) -> bool {
        self.has_floors.load(Ordering::Acquire)
    }

    /// Whether stream message `seq` is still to be given to `session` by this node's consumer.
    pub fn wants(&self, session: u64, seq: u64) -> bool {
        self.read_up_to.lock().expect("floors lock").get(&session).is_none_or(|upto| seq > *upto)
    }

    /// The second's checkpoint (`sessions`), given the store's next body number and oldest live
    /// body (read in that order, after this reads `processed`); written to the directory when it
    /// moved.
    pub fn checkpoint_tick(&self, processed: u64, next_body: u64, oldest: Option<u64>) -> u64 {
        let checkpoint = self.floors.lock().expect("floors lock").tick(next_body, oldest, processed);
        self.figures.checkpoints.fetch_add(1, Ordering::Relaxed);
        if self.checkpointed.swap(checkpoint, Ordering::AcqRel) != checkpoint {
            let value = Bytes::copy_from_slice(&checkpoint.to_be_bytes());
            let _ = self.directory_out.try_send((sessions::checkpoint_subject(&self.node), Some(value)));
        }
        checkpoint
    }

    /// The checkpoint now, without sampling.
    pub fn checkpoint_now(&self, oldest: Option<u64>) -> u64 {
        let processed = self.processed.load(Ordering::Acquire);
        self.floors.lock().expect("floors lock").checkpoint(oldest, processed)
    }

    /// The checkpoint written to the directory last.
    pub fn checkpointed(&self) -> u64 {
        self.checkpointed.load(Ordering::Acquire)
    }

    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Acquire)
    }

    /// Applies a directory message read from the stream.
    pub fn apply_directory(&self, subject: &str, seq: u64, payload: &[u8]) {
        self.directory.lock().expect("directory lock").apply(subject, seq, payload);
    }

    /// Another node holding a session for `client_id`, by the directory, with its record.
    pub fn holder(&self, client_id: &str) -> Option<(String, SessionEntry)> {
        self.directory.lock().expect("directory lock").holder(client_id, &self.node)
    }

    /// The last checkpoint `node` wrote.
    pub fn checkpoint_of(&self, node: &str) -> Option<u64> {
        self.directory.lock().expect("directory lock").checkpoint(node)
    }

    /// Persistent sessions in the directory, cluster-wide.
    pub fn directory_sessions(&self) -> usize {
        self.directory.lock().expect("directory lock").sessions()
    }

    /// Writes this node's record of a persistent session it holds. `since` stays what it was
    /// when the session came to this node: its own directory record's, the one `adopted` gave,
    /// or, for a new session, the last stream message routed here.
    pub fn record_session(
        &self,
        client_id: &str,
        record: &records::SessionRecord,
        subscriptions: Vec<EntrySubscription>,
    ) {
        let since = {
            let mut since = self.since.lock().expect("since lock");
            *since.entry(client_id.to_owned()).or_insert_with(|| {
                let directory = self.directory.lock().expect("directory lock");
                directory.own(client_id, &self.node).map_or_else(|| self.processed(), |e| e.since)
            })
        };
        let entry = SessionEntry {
            since,
            expiry: record.expiry_interval,
            subscriptions,
            record: hex(&records::encode_session(record)),
        };
        let value = Bytes::from(serde_json::to_vec(&entry).expect("a record serialises"));
        if self.directory_out.try_send((sessions::session_subject(client_id, &self.node), Some(value))).is_err() {
            warn!(client_id, "the directory's queue is full: this session's record is not written");
        }
    }

    /// `record_session` for a session a connection (or an HTTP reader) holds here now: no
    /// disconnection time, the will it would leave, its subscriptions as they are.
    pub fn record_connected(
        &self,
        client_id: &str,
        expiry_interval: u32,
        will: Option<crate::codec::Will>,
        subscriptions: &HashMap<String, (crate::codec::SubscriptionOptions, Option<u32>)>,
        owner: Option<String>,
    ) {
        let record = records::SessionRecord { expiry_interval, disconnected_at_ms: 0, will, owner };
        self.record_session(client_id, &record, sessions::entry_subscriptions(subscriptions));
    }

    /// A session read back from the stream here starts above `since`.
    pub fn adopted(&self, client_id: &str, since: u64) {
        self.since.lock().expect("since lock").insert(client_id.to_owned(), since);
    }

    /// Whether a core NATS message came from this node.
    pub fn is_own(&self, headers: Option<&async_nats::HeaderMap>) -> bool {
        origin(headers) == self.node
    }

    /// The other nodes' receipts of the message or story `key`, with their names: those that
    /// answer within half a second (every live node that has one, normally well before).
    pub async fn receipts_elsewhere(&self, key: &str) -> Vec<(String, serde_json::Value)> {
        use futures_util::StreamExt;
        let others = self.nodes_up(Duration::from_secs(3)) - 1;
        let inbox = self.client.new_inbox();
        let Ok(mut answers) = self.client.subscribe(inbox.clone()).await else { return Vec::new() };
        let payload = Bytes::copy_from_slice(key.as_bytes());
        if self.client.publish_with_reply_and_headers(RECEIPTS_SUBJECT, inbox, self.headers(), payload).await.is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + RECEIPTS_WAIT;
        while out.len() < others {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(m)) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                        let node = v["node"].as_str().unwrap_or_default().to_owned();
                        out.push((node, v["receipt"].clone()));
                    }
                }
                _ => break,
            }
        }
        out
    }

    /// Answers another node's receipt lookup with this node's receipt.
    pub async fn answer_receipt(&self, reply_to: async_nats::Subject, receipt: serde_json::Value) {
        let answer = serde_json::json!({ "node": self.node, "receipt": receipt });
        let payload = Bytes::from(serde_json::to_vec(&answer).expect("an answer serialises"));
        let _ = self.client.publish(reply_to, payload).await;
    }

    /// Says this node is alive: the time on its lease's clock (read back by this node itself,
    /// `fence`), then the address it advertises.
    pub async fn say_alive(&self) {
        let mut said = Vec::with_capacity(8 + self.advertise.as_ref().map_or(0, String::len));
        said.extend_from_slice(&self.fence.now_ms().to_be_bytes());
        said.extend_from_slice(self.advertise.as_deref().unwrap_or_default().as_bytes());
        let _ = self.client.publish(format!("{NODE_PREFIX}{}", self.node), Bytes::from(said)).await;
    }

    /// A node said it is alive: another node, with the address it advertises; or this one, whose
    /// word coming back renews its lease.
    pub fn heard(&self, subject: &str, said: &[u8]) {
        let Some(node) = subject.strip_prefix(NODE_PREFIX) else { return };
        let Some((sent, address)) = said.split_first_chunk::<8>() else { return };
        if node == self.node {
            self.fence.renewed(u64::from_be_bytes(*sent));
            return;
        }
        self.nodes.lock().expect("nodes lock").insert(node.to_owned(), (tokio::time::Instant::now(), false));
        if let Ok(address) = std::str::from_utf8(address) {
            if !address.is_empty() && address.len() <= MAX_ADVERTISE {
                self.advertised.lock().expect("advertised lock").insert(node.to_owned(), address.to_owned());
            }
        }
    }

    /// Every other node counts as heard from now: after this node was out of touch, each gets
    /// `dead_after_secs` to be heard again before it is taken for dead.
    pub fn everyone_heard_now(&self) {
        let now = tokio::time::Instant::now();
        for (at, _) in self.nodes.lock().expect("nodes lock").values_mut() {
            *at = now;
        }
    }

    /// This node took over `sessions` of `node`, taken for dead.
    pub fn record_adopted(&self, node: &str, sessions: impl IntoIterator<Item = String>) {
        let now = crate::clock::wall_ms_now();
        let mut adopted = self.adopted_from.lock().expect("adopted lock");
        adopted.entry(node.to_owned()).or_default().extend(sessions.into_iter().map(|s| (now, s)));
    }

    /// Answers a fenced node: the sessions this node took over from it since `held_since`
    /// (older ones it had let go of since, and forgets now). The node is heard from now: having
    /// asked, it is alive, and is not taken for dead again unless it falls silent again.
    pub fn answer_fence(&self, asker: &str, held_since: u64) -> FenceAnswer {
        self.nodes.lock().expect("nodes lock").insert(asker.to_owned(), (tokio::time::Instant::now(), false));
        let mut adopted = self.adopted_from.lock().expect("adopted lock");
        let mut answer = FenceAnswer { node: self.node.clone(), adopted: Vec::new() };
        if let Some(list) = adopted.get_mut(asker) {
            list.retain(|(at, _)| *at >= held_since);
            answer.adopted = list.iter().map(|(_, id)| id.clone()).collect();
        }
        answer
    }

    /// A fenced node asks every node heard from in the last two seconds which of its sessions
    /// they took over; the union, once every one of them answered (Err: who did not).
    pub async fn ask_fence(&self) -> Result<Vec<String>, String> {
        use futures_util::StreamExt;
        let now = tokio::time::Instant::now();
        let mut waiting = self.heard_within(Duration::from_secs(2));
        let inbox = self.client.new_inbox();
        let mut answers = self.client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
        let question = serde_json::json!({ "node": self.node, "held_since": self.fence.held_since() });
        let payload = Bytes::from(serde_json::to_vec(&question).expect("a question serialises"));
        self.client.publish_with_reply(FENCE_SUBJECT, inbox, payload).await.map_err(|e| e.to_string())?;
        let _ = self.client.flush().await;
        let deadline = now + FENCE_WAIT;
        let mut adopted = Vec::new();
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(m)) => {
                    if let Ok(answer) = serde_json::from_slice::<FenceAnswer>(&m.payload) {
                        waiting.remove(&answer.node);
                        adopted.extend(answer.adopted);
                    }
                }
                _ => break,
            }
        }
        if waiting.is_empty() {
            Ok(adopted)
        } else {
            Err(format!("no answer from {:?}", waiting))
        }
    }

    /// Answers a fenced node's question (`ask_fence`).
    pub async fn reply_fence(&self, reply_to: async_nats::Subject, question: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Question {
            node: String,
            held_since: u64,
        }
        let Ok(q) = serde_json::from_slice::<Question>(question) else { return };
        if q.node == self.node {
            return;
        }
        let answer = self.answer_fence(&q.node, q.held_since);
        if !answer.adopted.is_empty() {
            info!(
                node = q.node.as_str(),
                sessions = answer.adopted.len(),
                "a node that was out of touch asks: told which of its sessions moved here"
            );
        }
        let payload = Bytes::from(serde_json::to_vec(&answer).expect("an answer serialises"));
        let _ = self.client.publish(reply_to, payload).await;
    }

    /// Where `client_id` should go when this node shuts down: the advertised address of its heir
    /// among the other nodes heard from within `dead_after_secs` that advertise one (the node
    /// that would take its session over), so clients spread as sessions do.
    pub fn server_reference(&self, client_id: &str) -> Option<String> {
        let advertised = self.advertised.lock().expect("advertised lock");
        let candidates: Vec<String> = self.live_others().into_iter().filter(|n| advertised.contains_key(n)).collect();
        let heir = sessions::heir(client_id, &candidates)?;
        advertised.get(heir).cloned()
    }

    /// The other nodes heard from within `within`: those a question to every node waits for.
    fn heard_within(&self, within: Duration) -> std::collections::HashSet<String> {
        let now = tokio::time::Instant::now();
        let nodes = self.nodes.lock().expect("nodes lock");
        nodes.iter().filter(|(_, (at, _))| now.duration_since(*at) < within).map(|(n, _)| n.clone()).collect()
    }

    /// The other nodes heard from within `dead_after_secs` and not taken for dead.
    pub fn live_others(&self) -> Vec<String> {
        let now = tokio::time::Instant::now();
        let nodes = self.nodes.lock().expect("nodes lock");
        nodes
            .iter()
            .filter(|(_, (at, taken))| !taken && now.duration_since(*at) < self.dead_after)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The persistent sessions this node has in the directory.
    pub fn own_sessions(&self) -> Vec<String> {
        self.since.lock().expect("since lock").keys().cloned().collect()
    }

    /// Waits until no other takeover of `client_id`'s session runs here.
    pub async fn adopting(&self, client_id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let hash =
            client_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        self.adopting[(hash % 64) as usize].lock().await
    }

    /// Where this node, shutting down, handed `client_id`'s session (a node asking for it is
    /// told to ask there).
    pub fn moved_to(&self, client_id: &str) -> Option<String> {
        self.moving.lock().expect("moving lock").get(client_id).cloned()
    }

    /// Asks `node` to take `client_id`'s session over from this node now (this node is shutting
    /// down); Ok once it has it.
    pub async fn ask_take(&self, node: &str, client_id: &str, wait: Duration) -> Result<(), String> {
        self.moving.lock().expect("moving lock").insert(client_id.to_owned(), node.to_owned());
        let subject = format!("{}{node}", sessions::TAKE_PREFIX);
        let payload = Bytes::copy_from_slice(client_id.as_bytes());
        let reply = tokio::time::timeout(wait, self.client.request(subject, payload))
            .await
            .map_err(|_| format!("no answer within {} ms", wait.as_millis()))?
            .map_err(|e| e.to_string())?;
        match &reply.payload[..] {
            b"ok" => Ok(()),
            why => Err(String::from_utf8_lossy(why).into_owned()),
        }
    }

    /// Answers a `take` request.
    pub async fn answer_take(&self, reply_to: async_nats::Subject, result: Result<(), String>) {
        let payload = match result {
            Ok(()) => Bytes::from_static(b"ok"),
            Err(why) => Bytes::from(why.into_bytes()),
        };
        let _ = self.client.publish(reply_to, payload).await;
    }

    /// Nodes heard from within `within`, this one included.
    pub fn nodes_up(&self, within: Duration) -> usize {
        let now = tokio::time::Instant::now();
        1 + self.nodes.lock().expect("nodes lock").values().filter(|(at, _)| now.duration_since(*at) < within).count()
    }

    /// Nodes silent for `after` and not taken for dead before, now taken for dead; and the
    /// nodes still alive, this one included, among which their sessions are spread
    /// (`sessions::heir`).
    pub fn newly_dead(&self, after: Duration) -> (Vec<String>, Vec<String>) {
        let now = tokio::time::Instant::now();
        let mut nodes = self.nodes.lock().expect("nodes lock");
        let mut dead = Vec::new();
        for (node, (at, taken)) in nodes.iter_mut() {
            if !*taken && now.duration_since(*at) >= after {
                *taken = true;
                dead.push(node.clone());
            }
        }
        let mut live: Vec<String> = nodes.iter().filter(|(_, (_, taken))| !taken).map(|(n, _)| n.clone()).collect();
        live.push(self.node.clone());
        (dead, live)
    }

    /// The sessions `node` holds, by the directory.
    pub fn held_by(&self, node: &str) -> Vec<(String, SessionEntry)> {
        self.directory.lock().expect("directory lock").held_by(node)
    }

    /// Every node the directory names.
    pub fn directory_nodes(&self) -> Vec<String> {
        self.directory.lock().expect("directory lock").nodes()
    }

    /// This node's session for `client_id` ended: its record goes.
    pub fn forget_session(&self, client_id: &str) {
        self.since.lock().expect("since lock").remove(client_id);
        self.forget_record(client_id, &self.node.clone());
    }

    /// Removes `node`'s record of `client_id` (a node that died: its session lives here now).
    pub fn forget_record(&self, client_id: &str, node: &str) {
        let _ = self.directory_out.try_send((sessions::session_subject(client_id, node), None));
    }

    /// Asks `node` to let go of `client_id`'s session; its answer, or why there is none (the
    /// node is gone, or slower than `wait`).
    pub async fn ask_handover(&self, node: &str, client_id: &str, wait: Duration) -> Result<HandoverReply, String> {
        let subject = format!("{}{node}", sessions::HANDOVER_PREFIX);
        let payload = Bytes::copy_from_slice(client_id.as_bytes());
        let reply = tokio::time::timeout(wait, self.client.request(subject, payload))
            .await
            .map_err(|_| format!("no answer within {} ms", wait.as_millis()))?
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())
    }

    /// Answers a handover request.
    pub async fn answer_handover(&self, reply_to: async_nats::Subject, answer: &HandoverReply) {
        let payload = Bytes::from(serde_json::to_vec(answer).expect("an answer serialises"));
        if let Err(e) = self.client.publish(reply_to, payload).await {
            warn!(error = %e, "answering a handover request failed");
        }
    }

    /// What shared group `group` of `filter` takes from the cluster, one delivery per group:
    /// the stream through a durable consumer every node with members pulls from (JetStream
    /// hands each message to one of them), and QoS 0 through a queue subscription (NATS hands
    /// each to one subscriber of the queue group). Every node's messages, this one's included.
    pub async fn shared_inbound(
        &self,
        group: &str,
        filter: &str,
        max_pending: usize,
    ) -> Result<(jetstream::consumer::pull::Stream, async_nats::Subscriber), String> {
        let name = shared_consumer_name(group, filter);
        let stream = self.js.get_stream(&self.stream).await.map_err(|e| e.to_string())?;
        let consumer = stream
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy: jetstream::consumer::DeliverPolicy::New,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: max_pending as i64,
                    // Every message, whichever nodes it was for: the group is not in the table.
                    filter_subjects: vec![LOG_SUBJECT.into(), format!("{LOG_SUBJECT}.>")],
                    // A group whose members all left goes away with its consumer.
                    inactive_threshold: Duration::from_secs(3600),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let log = follow(&consumer).await?;
        let qos0 = self.client.queue_subscribe(format!("{QOS0_SUBJECT}.>"), name).await.map_err(|e| e.to_string())?;
        Ok((log, qos0))
    }

    /// Bodies numbered from now on hold messages as old as `floor` (a session read back from the
    /// stream), until `unpin` says where they end.
    pub fn pin(&self, floor: u64) -> u64 {
        self.floors.lock().expect("floors lock").pin(floor)
    }

    pub fn unpin(&self, pin: u64, end: u64) {
        self.floors.lock().expect("floors lock").unpin(pin, end);
    }

    /// The stream's last sequence once every append this node started so far is acknowledged
    /// (waiting up to `wait` for them): what a session read back from the stream must read up
    /// to, so that nothing routed here before its subscriptions were in the router is missed.
    pub async fn settled_end(&self, wait: Duration) -> Result<u64, String> {
        let started = self.appends_started();
        let mut replicated = self.replicated();
        tokio::time::timeout(wait, replicated.wait_for(|r| *r >= started))
            .await
            .map_err(|_| "appends not acknowledged in time".to_string())?
            .map_err(|e| e.to_string())?;
        retrying(|| async {
            let mut stream = self.js.get_stream(&self.stream).await.map_err(|e| e.to_string())?;
            let info = stream.info().await.map_err(|e| e.to_string())?;
            Ok(info.state.last_sequence)
        })
        .await
    }

    /// Reads the stream's messages after `after` up to `upto`, in order, through a consumer of
    /// its own that goes when done. A reading that fails part way (a missed heartbeat on a
    /// loaded machine, a server restarting) goes on from the last message read, with a new
    /// consumer, for up to `API_PATIENCE` without progress.
    pub async fn replay(&self, after: u64, upto: u64, mut each: impl FnMut(u64, Message)) -> Result<u64, String> {
        let mut cursor = after;
        let mut read = 0;
        let mut stalled_since = None;
        loop {
            let before = cursor;
            match self.replay_from(&mut cursor, upto, &mut read, &mut each).await {
                Ok(()) => return Ok(read),
                Err(e) => {
                    if cursor > before {
                        stalled_since = None;
                    }
                    let stalled = *stalled_since.get_or_insert_with(tokio::time::Instant::now);
                    if stalled.elapsed() >= API_PATIENCE {
                        return Err(e);
                    }
                    warn!(error = e.as_str(), cursor, upto, "reading the stream back failed part way; going on");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// One consumer's part of `replay`: from `cursor` on, which it moves past each message read.
    async fn replay_from(
        &self,
        cursor: &mut u64,
        upto: u64,
        read: &mut u64,
        each: &mut impl FnMut(u64, Message),
    ) -> Result<(), String> {
        use futures_util::StreamExt;
        if upto <= *cursor {
            return Ok(());
        }
        let start_sequence = *cursor + 1;
        let (stream, consumer, mut messages) = retrying(|| async {
            let stream = self.js.get_stream(&self.stream).await.map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::Config {
                    deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence },
                    ack_policy: jetstream::consumer::AckPolicy::None,
                    // Every message, whichever nodes it was for.
                    filter_subjects: vec![LOG_SUBJECT.into(), format!("{LOG_SUBJECT}.>")],
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let messages = follow(&consumer).await?;
            Ok((stream, consumer, messages))
        })
        .await?;
        let name = consumer.cached_info().name.clone();
        let result = loop {
            let Some(m) = messages.next().await else { break Err("the stream ended".to_string()) };
            let m = match m {
                Ok(m) => m,
                Err(e) => break Err(e.to_string()),
            };
            let (seq, pending) = match m.info() {
                Ok(i) => (i.stream_sequence, i.pending),
                Err(e) => break Err(e.to_string()),
            };
            if seq > upto {
                break Ok(());
            }
            // A bundle's stories all stand at its sequence (`bundle`).
            for story in bundle::stories(&m.payload) {
                match story {
                    Ok(message) => {
                        *read += 1;
                        each(seq, message);
                    }
                    Err(e) => warn!(seq, error = %e, "undecodable message in the stream; skipped"),
                }
            }
            *cursor = seq;
            if seq == upto || pending == 0 {
                break Ok(());
            }
        };
        let _ = stream.delete_consumer(&name).await;
        result
    }

    fn headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NODE_HEADER, self.node.as_str());
        headers
    }
}

/// The durable consumer (and queue group) of a shared group: the same name on every node.
/// FNV-1a of the group and filter: consumer names allow no `.`, `*`, `>` or whitespace, and a
/// filter can be long.
pub fn shared_consumer_name(group: &str, filter: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.bytes().chain([0]).chain(filter.bytes()) {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("herald-share-{hash:016x}")
}

/// The node a message or claim came from (`NODE_HEADER`); empty when it carries none.
fn origin(headers: Option<&async_nats::HeaderMap>) -> String {
    headers.and_then(|h| h.get(NODE_HEADER)).map(|v| v.as_str().to_owned()).unwrap_or_default()
}

/// A claim another node sent: the client identifier and whether it asked for a clean start;
/// None for this node's own.
pub fn receive_claim(link: &Link, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<(String, bool)> {
    let node = origin(headers);
    let (&clean, id) = payload.split_first()?;
    (node != link.node).then(|| Some((std::str::from_utf8(id).ok()?.to_owned(), clean == 1))).flatten()
}

/// Decodes what another node sent: its stories, one or a bundle's (`bundle`); none for this
/// node's own messages (routed here already), and none for what cannot be decoded (logged).
pub fn receive(link: &Link, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Vec<Message> {
    let node = origin(headers);
    if node == link.node {
        return Vec::new();
    }
    let mut stories = Vec::new();
    for story in bundle::stories(payload) {
        match story {
            Ok(message) => stories.push(message),
            Err(e) => warn!(node = node.as_str(), error = %e, "undecodable message from another node; skipped"),
        }
    }
    link.figures.received.fetch_add(stories.len() as u64, Ordering::Relaxed);
    stories
}

/// The subject of a topic's retained message: the topic's bytes in hex (subjects allow no
/// `.`, `*`, `>` or whitespace in a token; topics are any UTF-8).
pub fn retained_subject(topic: &str) -> String {
    format!("herald.retained.t{}", hex(topic.as_bytes()))
}

/// The topic of a retained message's subject, if it is one of ours.
pub fn retained_topic(subject: &str) -> Option<String> {
    String::from_utf8(unhex(subject.strip_prefix("herald.retained.t")?)?).ok()
}

/// Bytes as a subject token: lowercase hex (subjects allow no `.`, `*`, `>` or whitespace).
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

pub(crate) fn unhex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()).collect()
}

/// The retained message a stream message holds, or the empty message that removes its topic's.
pub fn retained_entry(subject: &str, payload: &[u8]) -> Option<Message> {
    let topic = retained_topic(subject)?;
    if payload.is_empty() {
        return Some(Message::new(topic, Bytes::new(), QoS::AtMostOnce, true));
    }
    match records::decode_message(payload) {
        Ok(m) => Some(m),
        Err(e) => {
            warn!(topic = topic.as_str(), error = %e, "undecodable retained message in the cluster's stream");
            None
        }
    }
}

/// A consumer's messages as they come. Short pulls with frequent heartbeats: after NATS comes
/// back, a missed heartbeat is how the consumer notices and pulls again (with the defaults,
/// 15 s heartbeats, a node took 10 s to receive again).
async fn follow(consumer: &jetstream::consumer::PullConsumer) -> Result<jetstream::consumer::pull::Stream, String> {
    consumer
        .stream()
        .expires(Duration::from_secs(5))
        .heartbeat(Duration::from_secs(1))
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Reads the `pending` messages the consumer had when it was made (the last message of every
/// subject: retained messages, directory records).
async fn read_pending(
    stream: &mut jetstream::consumer::pull::Stream,
    pending: u64,
    mut each: impl FnMut(&jetstream::Message),
) -> Result<(), String> {
    use futures_util::StreamExt;
    let mut left = pending;
    while left > 0 {
        let Some(m) = stream.next().await else { return Err("a stream being read at start ended".into()) };
        let m = m.map_err(|e| e.to_string())?;
        left = m.info().map(|i| i.pending).unwrap_or(0).min(left - 1);
        each(&m);
    }
    Ok(())
}

/// Makes sure the directory stream exists and reads it: every node's session records and
/// checkpoints now, and the consumer that follows it from there.
async fn read_directory(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(Directory, jetstream::consumer::pull::Stream), String> {
    let mut directory = Directory::default();
    let stream = read_last_per_subject(js, config, "SESSIONS", sessions::DIRECTORY_SUBJECTS, |m| {
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        directory.apply(m.subject.as_str(), seq, &m.payload);
    })
    .await?;
    Ok((directory, stream))
}

/// Makes sure the stream `<stream>_<suffix>` keeping the last message of each of `subjects`
/// exists (retained messages, the directory), gives `each` that last message of every subject
/// through a consumer made afresh at every start, and returns the consumer, which then follows.
async fn read_last_per_subject(
    js: &jetstream::Context,
    config: &ClusterConfig,
    suffix: &str,
    subjects: &str,
    each: impl FnMut(&jetstream::Message),
) -> Result<jetstream::consumer::pull::Stream, String> {
    let name = format!("{}_{suffix}", config.stream);
    let store = js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subjects.into()],
            num_replicas: config.replicas,
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    let reader = format!("herald-{}-{}", config.node, suffix.to_lowercase());
    let _ = store.delete_consumer(&reader).await;
    let consumer = store
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(reader.clone()),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            ack_policy: jetstream::consumer::AckPolicy::None,
            filter_subject: subjects.into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("{reader}: {e}"))?;
    let mut stream = follow(&consumer).await?;
    read_pending(&mut stream, consumer.cached_info().num_pending, each).await?;
    Ok(stream)
}

/// Writes what `rx` gives to a stream keeping the last message per subject (retained messages,
/// directory records; None writes the empty message that removes the subject's value).
async fn put_last(link: Arc<Link>, js: jetstream::Context, mut rx: mpsc::Receiver<(String, Option<Bytes>)>) {
    while let Some((subject, value)) = rx.recv().await {
        // Tried again while NATS is away: a retained message or session record that never
        // reaches the stream would be missing on every node started later.
        loop {
            let payload = value.clone().unwrap_or_default();
            let done = match js.publish_with_headers(subject.clone(), link.headers(), payload).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match done {
                Ok(()) => break,
                Err(e) => {
                    warn!(
                        error = e.as_str(),
                        subject = subject.as_str(),
                        "writing to the cluster's stream failed; trying again"
                    );
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }
}

/// Opens (or makes) the interest bucket and reads it whole into a table before the node
/// listens; returns the bucket, the table, and the watch that goes on from there.
async fn follow_interest(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(jetstream::kv::Store, Arc<interest::Table>, jetstream::kv::Watch), String> {
    use futures_util::StreamExt;
    let kv = match js.get_key_value(interest::INTEREST_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: interest::INTEREST_BUCKET.into(),
                history: 1,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?,
    };
    let mut stream = js.get_stream(format!("KV_{}", interest::INTEREST_BUCKET)).await.map_err(|e| e.to_string())?;
    let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
    let table = Arc::new(interest::Table::new());
    let mut watch = kv.watch_with_history(">").await.map_err(|e| e.to_string())?;
    while table.applied() < last {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(entry))) => table.apply(&entry),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("the interest bucket's watch ended".into()),
            // Everything up to `last` was deleted and purged: nothing more to read.
            Err(_) => break,
        }
    }
    Ok((kv, table, watch))
}

/// Follows the interest bucket into the table.
async fn apply_interest(table: Arc<interest::Table>, mut watch: jetstream::kv::Watch) {
    use futures_util::StreamExt;
    while let Some(entry) = watch.next().await {
        match entry {
            Ok(entry) => table.apply(&entry),
            Err(e) => warn!(error = %e, "following the cluster's interest table failed"),
        }
    }
    warn!("the cluster's interest table is no longer followed");
}

/// Confirms to a node that asks (`Link::confirm_interest`) that this node's table has applied
/// the interest bucket up to the revision it names.
async fn answer_syncs(link: Arc<Link>, mut syncs: async_nats::Subscriber) {
    use futures_util::StreamExt;
    while let Some(m) = syncs.next().await {
        let (Some(reply), Ok(revision)) = (m.reply.clone(), <[u8; 8]>::try_from(&m.payload[..])) else { continue };
        let link = link.clone();
        tokio::spawn(async move {
            if link.table.wait_applied(u64::from_be_bytes(revision)).await {
                // What this node appended before it knew of the new interest was addressed
                // without it: it is in the stream before the asking node reads the stream's end
                // (taking a session over), or that node would miss it. A chaos test lost a story
                // so once appends lingered (`cluster.linger_ms`).
                let started = link.appends_started();
                let mut replicated = link.replicated();
                let _ = tokio::time::timeout(interest::sync_wait(), replicated.wait_for(|r| *r >= started)).await;
                let _ = link.client.publish(reply, Bytes::from(link.node.clone())).await;
            }
        });
    }
}

/// Tries a JetStream API call again for up to `API_PATIENCE` while it fails: on a loaded or
/// electing cluster its requests meet "no responders" or time out now and then, and a session
/// being taken over must not be given up for that.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + API_PATIENCE;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(error = e.as_str(), "a JetStream request failed; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
