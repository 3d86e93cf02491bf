//! The broker's shared state and its tasks: the subscription tree, retained messages and the
//! session registry, the listeners, and shutdown.
//!
//! Locks here are `std::sync` locks held for the length of an in-memory operation and never
//! across an `.await`; docs/concurrency.md gives the order in which they may nest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::session::mailbox::TrySendError;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::Auth;
use crate::codec::{QoS, Will};
use crate::config::Config;
use crate::message::{Delivery, Message, QueueRef};
use crate::metrics::Metrics;
use crate::receipt::Count;
use crate::retain::RetainedStore;
use crate::session::registry::Registry;
use crate::session::{QueueDrop, QueuePolicies, Router, SessionShared, Subscription};
use crate::store::{Recovered, Store, StoreError, Txn};
use crate::topic::ParsedFilter;

mod adopt;

pub struct Broker {
    config: Config,
    router: Arc<Router>,
    retained: RwLock<RetainedStore>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    queue_policies: QueuePolicies,
    /// Authentication and ACL, swapped whole on reload.
    auth: RwLock<Arc<Auth>>,
    /// Per listener, its TLS acceptor (None for plain listeners), swapped on reload.
    tls: Vec<RwLock<Option<tokio_rustls::TlsAcceptor>>>,
    /// Ticket keys and session cache, kept across reloads (a reload must not end resumption).
    resumption: crate::tls::Resumption,
    /// `mqtt.max_handshakes` turns for TLS handshakes and WebSocket upgrades.
    handshakes: tokio::sync::Semaphore,
    limits: RwLock<Arc<crate::config::Limits>>,
    /// Open connections and recent CONNECTs per IP address, kept only while a per-IP limit is on.
    per_ip: Mutex<HashMap<std::net::IpAddr, IpUse>>,
    started: std::time::Instant,
    next_id: AtomicU64,
    /// Message ids handed out in this run (the low 40 bits of an id).
    message_ids: AtomicU64,
    /// The high 24 bits of this broker's message ids (`next_message_id`).
    id_high: u64,
    shutdown: watch::Sender<bool>,
    /// Where the HTTP server listens, once bound.
    http_addr: std::sync::OnceLock<SocketAddr>,
    /// Set once every listener is bound and cleared when shutdown begins: /readyz.
    listening: std::sync::atomic::AtomicBool,
    /// Delivery receipts and recent story ids.
    receipts: crate::receipts::Receipts,
    /// Undelivered events for the webhook task (`[delivery] webhook`), and its receiving end
    /// until the server starts the task.
    webhook: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    webhook_events: Mutex<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>>,
    webhook_failures: Arc<AtomicU64>,
    /// Topic filters of the high priority class.
    high_priority: Vec<String>,
    /// Degraded mode (docs/news-delivery.md): normal QoS 0 traffic is shed and new normal
    /// publishes are refused while set.
    degraded: std::sync::atomic::AtomicBool,
    /// Cluster mode's link to NATS (docs/cluster.md), set once before the listeners start.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Link>>,
    /// Cluster mode: shared groups getting a member here, for `server::cluster` to read.
    shared_joins: std::sync::OnceLock<tokio::sync::mpsc::Sender<(String, String)>>,
}

/// Where undelivered messages are announced.
pub const UNDELIVERED_TOPIC: &str = "$SYS/broker/herald/undelivered";

pub use crate::session::registry::SessionCounts;

/// Open connections and CONNECTs in the current second from one IP address.
#[derive(Default)]
pub struct IpUse {
    open: u32,
    second: u64,
    connects: u32,
}

/// Why a connection limit refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// `max_connections`: 0x89 server busy.
    ServerBusy,
    /// `max_connections_per_ip`: 0x97 quota exceeded.
    QuotaExceeded,
    /// `connection_rate_per_ip`: 0x9F connection rate exceeded.
    RateExceeded,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reload: {0}; restart the broker for that")]
    Restart(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What became of one delivery, counted once in the broker's metrics and on the message's
/// receipt (`Broker::record`), wherever it happened: routing, a parked queue, a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent at QoS 0: done.
    DeliveredQos0,
    /// Sent at QoS 1 or 2: in flight until acknowledged.
    Sent,
    /// Sent again with DUP to a 3.1.1 client that had not acknowledged it.
    Retried,
    /// Its message expired before it could be sent [MQTT-3.3.2-5].
    Expired,
    /// Larger than the client's Maximum Packet Size [MQTT-3.1.2-25].
    TooLarge,
    /// The reader's ACL no longer lets it read the topic.
    NotAuthorized,
    /// Normal QoS 0 shed in degraded mode.
    Shed,
    /// A connected session's queue stayed full for longer than its publisher could wait.
    QueueFull,
    /// Let go by an offline queue's overflow policy.
    QueueDropped(QueueDrop),
}

/// Why a PUBLISH (MQTT or HTTP) was not admitted; each path answers in its own protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishRefusal {
    /// Longer than `limits.max_topic_length`: 5.0 DISCONNECT 0x90, HTTP 400.
    TopicTooLong,
    /// More levels than `mqtt.max_topic_levels`: 5.0 DISCONNECT 0x90, HTTP 400.
    TooManyLevels,
    /// `$SYS/...` belongs to the broker [MQTT-4.7.2-1]: 5.0 PUBACK 0x87, HTTP 400.
    SysTopic,
    /// Degraded mode and the topic is not high priority: 5.0 PUBACK 0x97, 3.1.1 QoS 1/2 closed
    /// unacknowledged, HTTP 503.
    Degraded,
}

/// What routing one message did.
#[derive(Default)]
pub struct RouteOutcome {
    pub matched: usize,
    pub dropped: usize,
    /// The store ticket the message's acknowledgement waits for: its body and queue entries
    /// for persistent sessions, and the retained message (0: nothing was stored).
    pub ticket: u64,
    /// Deliveries to connected sessions whose queue was full, for a publisher that can wait for
    /// room (see `route`).
    pub blocked: Vec<(Arc<SessionShared>, Delivery)>,
}

impl Broker {
    /// Loads the auth files and TLS material and opens the store. Returns what the store held
    /// (retained messages and persistent sessions) for the server to restore; receipts are
    /// restored here, and queued messages read back keep counting on theirs.
    pub fn open(config: Config) -> Result<(Arc<Broker>, Recovered), BrokerError> {
        let metrics = Arc::new(Metrics::default());
        let auth = Auth::load(&config.auth, metrics.clone())?;
        let resumption = crate::tls::Resumption::new(&config.tls)?;
        let handshakes = tokio::sync::Semaphore::new(match config.mqtt.max_handshakes {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n,
        });
        let tls = config
            .listeners
            .iter()
            .map(|l| {
                let acceptor = if l.is_tls() { Some(crate::tls::acceptor(l, &config.tls, &resumption)?) } else { None };
                Ok(RwLock::new(acceptor))
            })
            .collect::<Result<Vec<_>, crate::tls::TlsError>>()?;
        let (store, recovered) =
            Store::open(&config.storage.path, config.storage.durability, config.storage.block_cache_mb << 20)?;
        let store = Arc::new(store);
        let (shutdown, _) = watch::channel(false);
        let router = Arc::new(Router::new(config.mqtt.match_cache_size));
        let registry = Arc::new(Registry::new(
            router.clone(),
            store.clone(),
            metrics.clone(),
            config.mqtt.max_queued_messages,
            config.storage.queue_readers,
        ));
        let limits = Arc::new(config.limits.clone());
        let (webhook, webhook_events) = match &config.delivery.webhook {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(config.delivery.webhook_queue.max(1));
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let receipts = crate::receipts::Receipts::new(config.receipts.clone());
        receipts.restore(recovered.receipts.iter().filter_map(|v| crate::receipt::Receipt::decode(v)).collect());
        let high_priority = config
            .priority
            .iter()
            .filter(|r| r.class == crate::config::PriorityClass::High)
            .map(|r| r.filter.clone())
            .collect();
        let id_high = message_id_high(store.boot(), config.cluster.as_ref().map(|c| c.node.as_str()));
        let broker = Arc::new(Broker {
            queue_policies: QueuePolicies::new(&config.queue_policy),
            config,
            router,
            retained: RwLock::default(),
            registry,
            metrics,
            store,
            auth: RwLock::new(Arc::new(auth)),
            tls,
            resumption,
            handshakes,
            limits: RwLock::new(limits),
            per_ip: Mutex::default(),
            started: std::time::Instant::now(),
            next_id: AtomicU64::new(1),
            message_ids: AtomicU64::new(1),
            id_high,
            shutdown,
            http_addr: std::sync::OnceLock::new(),
            listening: std::sync::atomic::AtomicBool::new(false),
            receipts,
            webhook,
            webhook_events: Mutex::new(webhook_events),
            webhook_failures: Arc::default(),
            high_priority,
            degraded: std::sync::atomic::AtomicBool::new(false),
            cluster: std::sync::OnceLock::new(),
            shared_joins: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&broker);
        broker.registry.set_prepare(Arc::new(move |m| {
            if let Some(broker) = weak.upgrade() {
                broker.prepare_loaded(m);
            }
        }));
        Ok((broker, recovered))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Cluster mode's link to NATS, once `server::run` has joined the cluster.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Link>> {
        self.cluster.get()
    }

    pub fn set_cluster(&self, link: Arc<crate::cluster::Link>) {
        self.router.set_shared_elsewhere();
        self.registry.set_cluster(link.clone());
        let _ = self.cluster.set(link);
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn receipts(&self) -> &crate::receipts::Receipts {
        &self.receipts
    }

    pub fn queue_policies(&self) -> &QueuePolicies {
        &self.queue_policies
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Enters or leaves degraded mode (`pressure` decides).
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Relaxed);
    }

    pub fn webhook_failures(&self) -> &Arc<AtomicU64> {
        &self.webhook_failures
    }

    /// The webhook's queue, taken once by the server to start the webhook task.
    pub fn take_webhook_events(&self) -> Option<tokio::sync::mpsc::Receiver<Vec<u8>>> {
        self.webhook_events.lock().expect("webhook lock").take()
    }

    /// Retained messages whose topic matches `filter` [MQTT-3.3.1-6].
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        self.retained.read().expect("retained lock").matching(filter)
    }

    /// Puts a retained message read back from the store.
    pub fn restore_retained(&self, message: Arc<Message>) {
        self.retained.write().expect("retained lock").set(message);
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().expect("retained lock").len()
    }

    /// Retained messages and their payload bytes, read together.
    pub fn retained_figures(&self) -> (usize, usize) {
        let r = self.retained.read().expect("retained lock");
        (r.len(), r.payload_bytes())
    }

    pub fn subscription_count(&self) -> usize {
        self.router.len()
    }

    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.router.subscriber_count(topic)
    }

    pub fn subscribed_filters(&self) -> Vec<(String, usize)> {
        self.router.filters()
    }

    /// Records where the HTTP server listens, and that every listener is bound (or no longer).
    pub fn set_http_addr(&self, addr: SocketAddr) {
        let _ = self.http_addr.set(addr);
    }

    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
    }

    pub fn auth(&self) -> Arc<Auth> {
        self.auth.read().expect("auth lock").clone()
    }

    /// Cluster mode: the owner of `client_id`'s session when another node holds it and that
    /// owner is not `claimant`, by the directory. Checked before the session moves here (and
    /// before a clean start ends it there); a session on this node is checked by the claim.
    pub fn owned_elsewhere_by_other(&self, client_id: &str, claimant: &str) -> Option<String> {
        let link = self.cluster()?;
        if self.registry().get(client_id).is_some() {
            return None;
        }
        let owner = link.holder(client_id)?.1.stored()?.owner?;
        (owner != claimant).then_some(owner)
    }

    /// A client refused a session another identity owns: counted, and one line (sampled like
    /// every connection line) with both identities as string fields, so neither can forge it.
    pub fn owner_refused(&self, client_id: &str, owner: &str, claimant: &str, peer: std::net::SocketAddr) {
        self.metrics.session_owner_refused.fetch_add(1, Ordering::Relaxed);
        if crate::logging::connection_line() {
            warn!(
                client_id,
                owner = crate::auth::owner_name(owner),
                identity = crate::auth::owner_name(claimant),
                peer = %peer,
                "refused: the session belongs to another identity"
            );
        }
    }

    /// A turn to run a TLS handshake or WebSocket upgrade (`mqtt.max_handshakes`), in order.
    pub async fn handshake_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, tokio::sync::AcquireError> {
        self.handshakes.acquire().await
    }

    pub fn tls_acceptor(&self, listener: usize) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.get(listener)?.read().expect("tls lock").clone()
    }

    /// Reloads the password file, the ACL file, the JWT key and the TLS certificates from the
    /// paths in the configuration. Everything is loaded before anything is swapped: a reload that
    /// fails anywhere keeps the whole old configuration. Connected clients keep their
    /// connections; new connections see the new files.
    pub fn reload(&self) -> Result<(), BrokerError> {
        self.reload_from(&self.config)
    }

    /// `reload` with the reloadable parts of a freshly read configuration: `[auth]`, `[limits]`
    /// and the listeners' TLS files. The listeners themselves must be the same ones.
    pub fn reload_from(&self, config: &Config) -> Result<(), BrokerError> {
        let same_listeners = config.listeners.len() == self.config.listeners.len()
            && config
                .listeners
                .iter()
                .zip(&self.config.listeners)
                .all(|(a, b)| a.bind == b.bind && a.protocol == b.protocol);
        if !same_listeners {
            return Err(BrokerError::Restart("the listeners changed"));
        }
        let auth = Auth::load(&config.auth, self.metrics.clone())?;
        let mut acceptors = Vec::new();
        for l in &config.listeners {
            acceptors.push(if l.is_tls() {
                Some(crate::tls::acceptor(l, &config.tls, &self.resumption)?)
            } else {
                None
            });
        }
        *self.auth.write().expect("auth lock") = Arc::new(auth);
        *self.limits.write().expect("limits lock") = Arc::new(config.limits.clone());
        for (slot, a) in self.tls.iter().zip(acceptors) {
            *slot.write().expect("tls lock") = a;
        }
        self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        info!("reloaded the password file, ACL, JWT key, limits and TLS certificates");
        Ok(())
    }

    /// Reloads from the file the configuration came from (SIGHUP, `POST /api/v1/reload`), or
    /// from the configuration in memory when it came from no file.
    pub fn reload_config_file(&self) -> Result<(), String> {
        match &self.config.source {
            Some(path) => {
                let config = Config::load(path).map_err(|e| e.to_string())?;
                self.reload_from(&config).map_err(|e| e.to_string())
            }
            None => self.reload().map_err(|e| e.to_string()),
        }
    }

    /// A message id unique across restarts: the store's boot count in the high 24 bits, a
    /// counter of this run in the low 40. Shown as 16 hex digits (`message_id_text`).
    /// Where message ids given from now on start (`routed_here_since`).
    pub fn message_id_mark(&self) -> u64 {
        self.message_ids.load(Ordering::Relaxed) & ((1 << 40) - 1)
    }

    /// Whether message `id` was accepted on this node at or after `mark` (`message_id_mark`):
    /// routed here from the start, so a session made before `mark` already has it.
    pub fn accepted_here_since(&self, id: u64, mark: u64) -> bool {
        id >> 40 == self.id_high && (id & ((1 << 40) - 1)) >= mark
    }

    pub fn next_message_id(&self) -> u64 {
        (self.id_high << 40) | (self.message_ids.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1))
    }

    /// Gives a message accepted from a publisher its id and, if it is tracked, its receipt; or
    /// finds it to be a retry of a story accepted within the deduplication window, and returns
    /// `Err` with that story's message id.
    pub fn accept_message(&self, mut message: Message) -> Result<Arc<Message>, u64> {
        message.id = self.next_message_id();
        match self.receipts.admit(message.id, &message, message.received_at) {
            crate::receipts::Admission::Duplicate(original) => {
                debug!(topic = message.topic.as_str(), original = %crate::receipt::message_id_text(original), "duplicate story not routed");
                Err(original)
            }
            crate::receipts::Admission::New(receipt) => {
                if let Some(r) = receipt {
                    let _ = message.receipt.set(r);
                }
                Ok(Arc::new(message))
            }
        }
    }

    /// Whether any topic is in the high priority class: connections then keep a lane for it.
    pub fn has_priority_lanes(&self) -> bool {
        !self.high_priority.is_empty()
    }

    /// A queued message read back from the store: its priority class under the current rules,
    /// and its receipt, so that delivering it keeps counting there.
    fn prepare_loaded(&self, message: &crate::message::Message) {
        if self.is_high_priority(&message.topic) {
            message.high.store(true, Ordering::Relaxed);
        }
        if message.id != 0 && message.receipt.get().is_none() {
            if let Some(r) = self.receipts.by_id(message.id) {
                let _ = message.receipt.set(r);
            }
        }
    }

    /// Whether a topic is in the high priority class (`[[priority]]`).
    pub fn is_high_priority(&self, topic: &str) -> bool {
        !self.high_priority.is_empty() && self.high_priority.iter().any(|f| crate::topic::filter_matches(f, topic))
    }

    /// The admission rules every publish path shares, in order: topic length and depth, `$SYS`,
    /// degraded mode. Counts the refusals it makes (length; degraded).
    pub fn admit_publish(&self, topic: &str, limits: &crate::config::Limits) -> Result<(), PublishRefusal> {
        if topic.len() > limits.max_topic_length {
            self.metrics.limit_topic_length.fetch_add(1, Ordering::Relaxed);
            return Err(PublishRefusal::TopicTooLong);
        }
        if crate::topic::levels(topic) > self.config.mqtt.max_topic_levels {
            // The trees are walked level by level; an absurdly deep topic is refused rather
            // than let it cost unbounded depth.
            return Err(PublishRefusal::TooManyLevels);
        }
        if crate::topic::is_sys(topic) {
            return Err(PublishRefusal::SysTopic);
        }
        if self.is_degraded() && !self.is_high_priority(topic) {
            self.metrics.degraded_refused.fetch_add(1, Ordering::Relaxed);
            return Err(PublishRefusal::Degraded);
        }
        Ok(())
    }

    /// Counts what became of one delivery of `message`, in the metrics and on its receipt.
    pub fn record(&self, message: &Message, outcome: Outcome) {
        use crate::metrics::Hot;
        let m = &self.metrics;
        let count = match outcome {
            Outcome::DeliveredQos0 => {
                m.hot.add(Hot::MessagesSent, 1);
                Count::DeliveredQos0
            }
            Outcome::Sent => {
                m.hot.add(Hot::MessagesSent, 1);
                Count::Sent
            }
            Outcome::Retried => {
                m.retries.fetch_add(1, Ordering::Relaxed);
                Count::Retries
            }
            Outcome::Expired => {
                m.messages_expired.fetch_add(1, Ordering::Relaxed);
                Count::Expired
            }
            Outcome::TooLarge => {
                m.messages_dropped_too_large.fetch_add(1, Ordering::Relaxed);
                Count::DroppedTooLarge
            }
            Outcome::NotAuthorized => {
                m.acl_denied_delivery.fetch_add(1, Ordering::Relaxed);
                Count::DroppedNotAuthorized
            }
            Outcome::Shed => {
                m.degraded_shed.fetch_add(1, Ordering::Relaxed);
                Count::DroppedShed
            }
            Outcome::QueueFull => {
                m.messages_dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                Count::DroppedQueueFull
            }
            Outcome::QueueDropped(why) => {
                let (counter, count) = match why {
                    QueueDrop::Oldest => (&m.queue_dropped_oldest, Count::DroppedOldest),
                    QueueDrop::New => (&m.queue_dropped_new, Count::DroppedNew),
                    QueueDrop::Superseded => (&m.queue_superseded, Count::DroppedSuperseded),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                count
            }
        };
        message.count(count);
    }

    /// What every deliverer (an MQTT connection, an HTTP reader) checks before it sends a
    /// delivery: its message's expiry (`now` must be given when the message has one), degraded
    /// mode's shedding of normal QoS 0 [issue 7], and the reader's ACL at delivery time (a
    /// retained message or a resumed session's queue obeys the rules of this connection, which
    /// may be newer than the subscription). A withheld delivery is counted here; the caller
    /// takes it out of its session's stored queue.
    pub fn withhold(
        &self,
        d: &Delivery,
        now: Option<std::time::Instant>,
        acl: Option<&crate::auth::acl::ClientAcl>,
        client_id: &str,
    ) -> Option<Outcome> {
        if let (Some(now), Some(_)) = (now, d.message.expiry_interval) {
            if d.message.is_expired(now) {
                self.record(&d.message, Outcome::Expired);
                if d.qos > QoS::AtMostOnce {
                    self.undelivered(client_id, &d.message, "expired");
                }
                return Some(Outcome::Expired);
            }
        }
        if d.qos == QoS::AtMostOnce
            && !d.message.is_high()
            && self.is_degraded()
            && !crate::topic::is_sys(&d.message.topic)
        {
            self.record(&d.message, Outcome::Shed);
            return Some(Outcome::Shed);
        }
        if acl.is_some_and(|acl| !acl.can_read(&d.message.topic)) {
            self.record(&d.message, Outcome::NotAuthorized);
            return Some(Outcome::NotAuthorized);
        }
        None
    }

    /// Counts a delivery the client acknowledged (PUBACK, or PUBCOMP) at `read_at`: in the
    /// metrics, the acknowledgement latency histogram and on the message's receipt.
    pub fn record_acknowledged(&self, message: &Message, read_at: std::time::Instant) {
        self.metrics.deliveries_acknowledged.fetch_add(1, Ordering::Relaxed);
        self.metrics.ack_latency.observe(read_at.saturating_duration_since(message.received_at).as_micros() as u64);
        if let Some(r) = message.receipt.get() {
            r.acknowledged(read_at);
        }
    }

    /// Hands off a message that did not reach a session [issue 7]: counted on its receipt,
    /// published to `$SYS/broker/herald/undelivered` and queued for the webhook.
    pub fn undelivered(&self, client_id: &str, message: &Message, reason: &'static str) {
        message.count(crate::receipt::Count::Undelivered);
        self.metrics.undelivered.fetch_add(1, Ordering::Relaxed);
        let story_id = message.properties.user_properties.iter().find(|(k, _)| k == crate::receipt::STORY_ID);
        let event = serde_json::json!({
            "client_id": client_id,
            "id": crate::receipt::message_id_text(message.id),
            "story_id": story_id.map(|(_, v)| v),
            "topic": message.topic,
            "reason": reason,
            "at_ms": crate::clock::wall_ms_now(),
        });
        let body = serde_json::to_vec(&event).expect("JSON values serialize");
        info!(client_id, id = %crate::receipt::message_id_text(message.id), topic = message.topic.as_str(), reason, "undelivered");
        if let Some(tx) = &self.webhook {
            if tx.try_send(body.clone()).is_err() {
                self.webhook_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sys = Message::new(UNDELIVERED_TOPIC.into(), body.into(), QoS::AtMostOnce, false);
        self.publish(Arc::new(sys));
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr.get().copied()
    }

    /// Whether the broker serves: the store is open and every listener is bound.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Acquire) && !*self.shutdown.borrow()
    }

    /// Counts sessions, those connected, and what waits in their queues (`Registry::counts`).
    pub fn session_counts(&self) -> SessionCounts {
        self.registry.counts()
    }

    /// Disconnects the client holding `client_id`'s session with DISCONNECT 0x98 (5.0), and
    /// with `remove_session` ends the session too, queued messages and all. Returns false if
    /// there is no such session.
    pub async fn disconnect_client(&self, client_id: &str, remove_session: bool) -> bool {
        let found =
            self.registry.disconnect(client_id, crate::codec::ReasonCode::ADMINISTRATIVE_ACTION, remove_session).await;
        if found {
            info!(client_id, remove_session, "disconnected by the admin API");
        }
        found
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn limits(&self) -> Arc<crate::config::Limits> {
        self.limits.read().expect("limits lock").clone()
    }

    /// Admits a new client from `ip` against the connection limits. `Ok(true)` means it was
    /// counted against its address, and `release_ip` must be called when it closes.
    pub fn admit(&self, ip: std::net::IpAddr, limits: &crate::config::Limits) -> Result<bool, ConnectionRefusal> {
        if limits.max_connections > 0 && self.metrics.connections_now() as usize > limits.max_connections {
            self.metrics.limit_max_connections.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectionRefusal::ServerBusy);
        }
        if limits.max_connections_per_ip == 0 && limits.connection_rate_per_ip == 0 {
            return Ok(false);
        }
        let second = self.started.elapsed().as_secs();
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        let used = per_ip.entry(ip).or_default();
        if used.second != second {
            used.second = second;
            used.connects = 0;
        }
        used.connects += 1;
        if limits.connection_rate_per_ip > 0 && used.connects > limits.connection_rate_per_ip {
            self.metrics.limit_connection_rate.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectionRefusal::RateExceeded);
        }
        if limits.max_connections_per_ip > 0 && used.open as usize >= limits.max_connections_per_ip {
            self.metrics.limit_connections_per_ip.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectionRefusal::QuotaExceeded);
        }
        used.open += 1;
        Ok(true)
    }

    pub fn release_ip(&self, ip: std::net::IpAddr) {
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        if let Some(used) = per_ip.get_mut(&ip) {
            used.open = used.open.saturating_sub(1);
            if used.open == 0 && used.second != self.started.elapsed().as_secs() {
                per_ip.remove(&ip);
            }
        }
        // Addresses that only ever got refused leave no entry behind for long.
        if per_ip.len() > 100_000 {
            let now = self.started.elapsed().as_secs();
            per_ip.retain(|_, u| u.open > 0 || u.second == now);
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Stops the listeners and asks every connection that holds a session to close with
    /// DISCONNECT 0x8B. Connections learn it through their kick channel, which they watch anyway,
    /// rather than through a shared signal polled on every event.
    pub fn begin_shutdown(&self) {
        // `send_replace`, not `send`: `send` drops the value when no receiver exists yet, and a
        // shutdown asked for before `run` starts watching would then be lost (a hang, seen in a
        // test that ended within microseconds of its broker starting).
        self.shutdown.send_replace(true);
        self.registry.kick_all(crate::codec::ReasonCode::SERVER_SHUTTING_DOWN);
    }

    /// Routes a message to every matching session and stores it if retained. Never waits: a
    /// session whose queue is full loses this message and the loss is counted. For messages with
    /// no publisher connection to slow down, such as wills.
    pub fn publish(&self, message: Arc<Message>) -> RouteOutcome {
        self.route(message, false)
    }

    /// Gives up a delivery that waited for room in a subscriber's full queue: dropped, counted,
    /// its stored entry removed; with `congested`, the subscriber is not waited for again until
    /// it drains (`SessionShared::set_congested`).
    pub fn give_up_delivery(&self, target: &SessionShared, delivery: Delivery, congested: bool) {
        if congested {
            target.set_congested(true);
        }
        if let Some(at) = delivery.queue_ref() {
            let mut txn = Txn::default();
            txn.remove_entry(&target.client_id, at);
            self.store.commit(txn);
        }
        self.record(&delivery.message, Outcome::QueueFull);
    }

    /// Cluster mode: a message another node accepted, with this node's receipt of it (counted
    /// under the other node's id) and its story id in this node's deduplication window.
    pub fn remote_message(&self, message: Message) -> Arc<Message> {
        if let Some(r) = self.receipts.admit_remote(&message, std::time::Instant::now()) {
            let _ = message.receipt.set(r);
        }
        Arc::new(message)
    }

    /// Routes a message. With `can_wait`, a delivery that finds a connected subscriber's queue
    /// full is handed back in `blocked` instead of being dropped, so that the publisher's
    /// connection can wait for room before reading on (and, at QoS 1 and 2, before
    /// acknowledging): a slow reader slows the publisher down rather than losing stories. A
    /// subscriber marked congested (it kept its queue full for longer than a publisher may wait)
    /// is not waited for.
    pub fn route(&self, message: Arc<Message>, can_wait: bool) -> RouteOutcome {
        self.route_to(message, can_wait, None, None)
    }

    /// Cluster mode: routes stream message `seq` from another node as `route` does, except to a
    /// session taken over here that already had it read back from the stream
    /// (`Link::read_up_to`): a consumer behind the stream's end would give it a second time.
    pub fn route_remote(&self, message: Arc<Message>, seq: u64) -> RouteOutcome {
        match self.cluster() {
            Some(link) if link.has_floors() => {
                let only = |session: u64| link.wants(session, seq);
                self.route_to(message, true, Some(&only), None)
            }
            _ => self.route_to(message, true, None, None),
        }
    }

    /// Cluster mode: delivers a message taken from shared group `group` of `filter` to one member
    /// of the group on this node; None when the group has no member here (any more).
    pub fn deliver_shared(&self, message: Arc<Message>, group: &str, filter: &str) -> Option<RouteOutcome> {
        let target = self.router.pick_shared(group, filter)?;
        Some(self.route_to(message, false, None, Some(Arc::new(vec![target]))))
    }

    /// Whether shared group `group` of `filter` has a member on this node.
    pub fn has_shared_member(&self, group: &str, filter: &str) -> bool {
        self.router.pick_shared(group, filter).is_some()
    }

    /// Cluster mode: the shared groups this node has members of, as (group, filter), and a way
    /// to hear of the ones that get their first member later (`subscribe`).
    pub fn follow_shared_groups(&self, joins: tokio::sync::mpsc::Sender<(String, String)>) -> Vec<(String, String)> {
        let _ = self.shared_joins.set(joins);
        self.router
            .filters()
            .into_iter()
            .filter_map(|(f, _)| {
                let parsed = crate::topic::parse_filter(&f).ok()?;
                Some((parsed.share?.to_owned(), parsed.filter.to_owned()))
            })
            .collect()
    }

    /// Routes a message to every matching session; with `only`, to the sessions it accepts
    /// (sessions read back from the cluster's stream); with `given`, to those targets (a shared
    /// group's member). Only a message routed to every matching session touches the retained
    /// tree.
    fn route_to(
        &self,
        message: Arc<Message>,
        can_wait: bool,
        only: Option<&dyn Fn(u64) -> bool>,
        given: Option<Arc<Vec<crate::router::Target<Arc<SessionShared>>>>>,
    ) -> RouteOutcome {
        let mut txn = Txn::default();
        // `$SYS` updates are the broker's own: not counted as received, and their retained
        // values are not stored (they would be stale after a restart anyway).
        let sys = crate::topic::is_sys(&message.topic);
        if message.retain && only.is_none() && given.is_none() {
            if !sys {
                txn.set_retained(&message);
            }
            self.retained.write().expect("retained lock").set(message.clone());
        }
        let targets = given.unwrap_or_else(|| self.router.matches(&message.topic));
        message.fanout.store(targets.len(), std::sync::atomic::Ordering::Relaxed);
        let high = self.is_high_priority(&message.topic);
        if high {
            message.high.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Degraded mode sheds normal QoS 0 deliveries first [issue 7]; never `$SYS`, which is
        // how operators (and the undelivered hand-off) hear about it.
        let shed_qos0 = !high && !sys && self.degraded.load(std::sync::atomic::Ordering::Relaxed);
        let mut routed = 0u32;
        let mut outcome = RouteOutcome::default();
        // Deliveries to persistent sessions are placed only once their queue entries are
        // committed to the batch, so that an acknowledgement's removal never overtakes them.
        let mut durable: Vec<(Arc<SessionShared>, Delivery)> = Vec::new();
        let mut message_id = None;
        let mut after = Txn::default();
        for t in targets.iter() {
            if t.no_local && message.publisher == Some(t.session.id) {
                continue;
            }
            if only.is_some_and(|only| !only(t.session.id)) {
                continue;
            }
            outcome.matched += 1;
            let qos = t.qos.min(message.qos);
            let online = t.session.is_online();
            // An offline session keeps only QoS 1 and 2 messages, and only if it is persistent;
            // those are the messages the store keeps for it.
            let durable_target = t.session.is_persistent() && qos > QoS::AtMostOnce;
            if !online && !durable_target {
                continue;
            }
            routed += 1;
            if shed_qos0 && qos == QoS::AtMostOnce {
                self.record(&message, Outcome::Shed);
                continue;
            }
            let mut delivery = Delivery {
                message: message.clone(),
                qos,
                retain: t.retain_as_published && message.retain,
                subscription_ids: t.identifiers.as_slice().into(),
                stored: None,
            };
            if durable_target {
                let id = *message_id.get_or_insert_with(|| {
                    let id = self.store.next_seq();
                    let _ = message.store_id.set(id);
                    txn.put_message(id, &message);
                    id
                });
                let at = QueueRef { seq: self.store.next_seq(), message_id: id };
                delivery.stored = std::num::NonZeroU64::new(at.seq);
                txn.enqueue(&t.session.client_id, at, &crate::store::records::QueueEntry::of(&delivery, None));
                durable.push((t.session.clone(), delivery));
                continue;
            }
            self.place(&t.session, delivery, can_wait, &mut outcome, &mut after);
        }
        outcome.ticket = self.store.commit(txn);
        for (session, delivery) in durable {
            self.place(&session, delivery, can_wait, &mut outcome, &mut after);
        }
        self.store.commit(after);
        if !sys {
            self.metrics.message_routed(outcome.dropped);
        }
        if let Some(r) = message.receipt.get() {
            r.add(crate::receipt::Count::Routed, routed);
        }
        outcome
    }

    /// Hands one delivery to its session: the parked state's queue (with its overflow policy)
    /// while offline, the mailbox while connected.
    fn place(
        &self,
        session: &Arc<SessionShared>,
        mut delivery: Delivery,
        can_wait: bool,
        outcome: &mut RouteOutcome,
        after: &mut Txn,
    ) {
        let online = session.is_online();
        if !online {
            let policy = self.queue_policies.for_topic(&delivery.message.topic);
            let mqtt = &self.config.mqtt;
            let (max, max_bytes) = (mqtt.max_queued_messages, mqtt.max_queued_bytes);
            let mut offered = Some(delivery);
            let parked = session.with_parked(|parked| {
                let delivery = offered.take().expect("offered once");
                delivery.message.count(Count::Queued);
                if parked.needs_entries(policy, max, max_bytes, delivery.message.payload.len()) {
                    self.registry.warm_now(&session.client_id, parked);
                }
                for (d, why) in parked.offer_offline(delivery, policy, max, max_bytes) {
                    self.record(&d.message, Outcome::QueueDropped(why));
                    if let Some(at) = d.queue_ref() {
                        after.remove_entry(&session.client_id, at);
                    }
                }
                parked.queued_len()
            });
            if let Some(depth) = parked {
                self.metrics.queue_depth.observe(depth as u64);
                return;
            }
            // Offline but not parked yet: its connection is still letting go, and parks what
            // the mailbox holds.
            delivery = offered.take().expect("not offered");
        }
        let refused = if delivery.message.is_high() {
            // The high-priority lane: ahead of whatever backlog the mailbox holds, and never
            // waited for (a breaking story must not hold its publisher up either).
            let urgent = session.urgent();
            let mut queue = urgent.queue.lock().expect("urgent lock");
            if queue.len() < self.config.mqtt.max_queued_messages {
                queue.push_back(delivery);
                drop(queue);
                urgent.notify.notify_one();
                if online && !session.is_online() {
                    session.absorb_stragglers();
                }
                None
            } else {
                Some(delivery)
            }
        } else {
            match session.mailbox.try_send(delivery) {
                Ok(()) => {
                    if online && !session.is_online() {
                        // It went offline between our look and our delivery: if it is parked
                        // already, our delivery must join the parked queue before anything
                        // routed after it does (the reorder window of issue 12).
                        session.absorb_stragglers();
                    }
                    None
                }
                Err(TrySendError::Full(d)) if can_wait && online && !session.is_congested() => {
                    outcome.blocked.push((session.clone(), d));
                    None
                }
                Err(TrySendError::Full(d)) | Err(TrySendError::Closed(d)) => Some(d),
            }
        };
        if let Some(d) = refused {
            outcome.dropped += 1;
            d.message.count(Count::DroppedQueueFull);
            if let Some(at) = d.queue_ref() {
                after.remove_entry(&session.client_id, at);
            }
        }
    }

    /// Adds a subscription to the tree; returns whether the session already had that filter.
    pub fn subscribe(&self, filter: &ParsedFilter<'_>, sub: Subscription) -> bool {
        if let (Some(group), Some(joins)) = (filter.share, self.shared_joins.get()) {
            // Cluster mode: the group's messages come from the cluster (`server::cluster`).
            if joins.try_send((group.to_owned(), filter.filter.to_owned())).is_err() {
                tracing::warn!(
                    group,
                    filter = filter.filter,
                    "too many shared groups joining at once: this one waits for its next member"
                );
            }
        }
        let existed = self.router.subscribe(filter, sub);
        if let (false, Some(link)) = (existed, self.cluster()) {
            // Cluster mode: the other nodes learn that this node wants these topics
            // (`cluster::interest`); a SUBACK waits for `link.own.issued()`.
            link.interest_add(filter.share.is_some(), filter.filter);
        }
        existed
    }

    pub fn unsubscribe(&self, session_id: u64, filter: &ParsedFilter<'_>) -> bool {
        let removed = self.router.unsubscribe(filter, session_id);
        if let (true, Some(link)) = (removed, self.cluster()) {
            link.interest_remove(filter.share.is_some(), filter.filter);
        }
        removed
    }

    /// The PUBLISH of a will, from the session that left it.
    pub fn will_message(&self, will: Will, publisher: u64) -> Arc<Message> {
        let mut properties = will.properties;
        let expiry_interval = properties.message_expiry_interval.take();
        properties.will_delay_interval = None;
        Arc::new(Message {
            properties,
            expiry_interval,
            publisher: Some(publisher),
            id: self.next_message_id(),
            ..Message::new(will.topic, will.payload, will.qos, will.retain)
        })
    }

    /// Publishes a will now: its delay is 0, or its session ends with the connection.
    pub fn publish_will_now(&self, publisher: u64, will: Will) {
        let message = self.will_message(will, publisher);
        // Cluster mode: a will is for the whole cluster's subscribers. Nobody waits for its
        // acknowledgement; the append is still retried until JetStream has it.
        if let Some(link) = self.cluster() {
            link.forward(&message);
        }
        self.publish(message);
    }

    /// Publishes a session's will `delay` seconds from now unless the session is resumed first
    /// [MQTT-3.1.3-9]; then its stored record no longer carries it.
    pub fn schedule_will(
        self: &Arc<Self>,
        session: &Arc<SessionShared>,
        will: Will,
        delay: u64,
        disconnected_at_ms: u64,
    ) {
        let broker = self.clone();
        let publisher = session.id;
        self.registry.schedule_will(session, will, delay, disconnected_at_ms, move |will| {
            broker.publish_will_now(publisher, will);
        });
    }
}

/// The high 24 bits of message ids: the store's boot count; in cluster mode 16 bits of the
/// node's name (FNV-1a) and the low 8 bits of the boot count, so that two nodes' ids differ
/// (receipts and handed-over sessions find messages by id across nodes). A node's ids repeat
/// after 256 restarts, long after any receipt of the old ones has gone.
fn message_id_high(boot: u64, node: Option<&str>) -> u64 {
    match node {
        None => boot & 0xFF_FFFF,
        Some(node) => {
            let mut hash: u32 = 0x811c_9dc5;
            for b in node.bytes() {
                hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
            (u64::from((hash >> 16) ^ (hash & 0xFFFF)) << 8) | (boot & 0xFF)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SubscriptionOptions;
    use crate::session::registry::{Claim, Claimed, Release};

    fn open(extra: &str) -> (Arc<Broker>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[storage]\npath = {:?}\ndurability = \"wal\"\n{extra}", dir.path().display().to_string());
        let (broker, _) = Broker::open(Config::parse(&text).unwrap()).unwrap();
        (broker, dir)
    }

    /// A session claimed by a connection that is not there, subscribed to `filter` at QoS 1.
    async fn session(broker: &Broker, client_id: &str, expiry: u32, filter: &str) -> Claimed {
        let (kick, _) = tokio::sync::oneshot::channel();
        let claim = Claim {
            client_id: client_id.into(),
            clean_start: false,
            expiry_interval: expiry,
            will: None,
            conn_id: 1,
            kick,
            client: Default::default(),
            owner: None,
            enforce_owner: false,
        };
        let mut claimed = broker.registry().claim(claim).await.unwrap();
        let options = SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() };
        let parsed = crate::topic::parse_filter(filter).unwrap();
        broker.subscribe(&parsed, Subscription { session: claimed.shared.clone(), options, identifier: None });
        claimed.state.subscriptions.insert(filter.into(), (options, None));
        claimed
    }

    fn park(broker: &Broker, claimed: Claimed, expiry: u32) -> Arc<SessionShared> {
        let shared = claimed.shared.clone();
        let release = Release { conn_id: 1, expiry_interval: expiry, will_due: None, taken_over: false, now_ms: 1 };
        broker.registry().release(claimed.shared, claimed.state, release);
        shared
    }

    fn story(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new(topic.into(), bytes::Bytes::from_static(payload), QoS::AtLeastOnce, false))
    }

    #[tokio::test]
    async fn routing_reaches_a_connected_session_through_its_mailbox() {
        let (b, _dir) = open("");
        let mut phone = session(&b, "phone", 0, "news/#").await;
        let outcome = b.route(story("news/tech/ai", b"x"), false);
        assert_eq!((outcome.matched, outcome.dropped, outcome.ticket), (1, 0, 0), "not persistent: nothing stored");
        let d = phone.state.mailbox.try_recv().unwrap();
        assert_eq!(&d.message.payload[..], b"x");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert_eq!(b.route(story("sport/x", b"y"), false).matched, 0);
    }

    #[tokio::test]
    async fn routing_queues_for_an_offline_persistent_session_and_stores_it() {
        let (b, _dir) = open("");
        let phone = park(&b, session(&b, "phone", 3600, "news/#").await, 3600);
        let outcome = b.route(story("news/tech/ai", b"x"), false);
        assert_eq!(outcome.matched, 1);
        assert!(outcome.ticket > 0, "the queued message is written to the store");
        assert_eq!(phone.parked_figures().unwrap().queued, 1);
        assert_eq!(b.session_counts().queued, 1);
        // QoS 0 is not kept for an offline session [MQTT-3.1.2-5].
        let qos0 = Arc::new(Message::new("news/x".into(), bytes::Bytes::new(), QoS::AtMostOnce, false));
        b.route(qos0, false);
        assert_eq!(phone.parked_figures().unwrap().queued, 1);
    }

    #[tokio::test]
    async fn offline_queues_follow_their_topic_policy() {
        let extra = "[mqtt]\nmax_queued_messages = 2\n[[queue_policy]]\nfilter = \"scores/#\"\nkeep_latest = 1\n";
        let (b, _dir) = open(extra);
        let phone = park(&b, session(&b, "phone", 3600, "#").await, 3600);
        for p in [&b"1"[..], b"2", b"3"] {
            b.route(
                Arc::new(Message::new("news/a".into(), bytes::Bytes::from_static(p), QoS::AtLeastOnce, false)),
                false,
            );
        }
        let payloads = |s: &SessionShared| {
            s.with_parked(|p| p.pending.iter().map(|d| d.message.payload.clone()).collect::<Vec<_>>()).unwrap()
        };
        assert_eq!(payloads(&phone), vec!["2", "3"], "drop_oldest by default");
        assert_eq!(b.metrics().queue_dropped_oldest.load(Ordering::Relaxed), 1);
        b.route(story("scores/final", b"a"), false);
        b.route(story("scores/final", b"b"), false);
        assert_eq!(payloads(&phone), vec!["3", "b"], "keep_latest = 1 replaced a; b made room by dropping 2");
        assert_eq!(b.metrics().queue_superseded.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn admission_refuses_long_deep_sys_and_degraded_publishes() {
        let extra = "[mqtt]\nmax_topic_levels = 3\n[limits]\nmax_topic_length = 20\n[[priority]]\nfilter = \"news/breaking/#\"\nclass = \"high\"\n";
        let (b, _dir) = open(extra);
        let limits = b.limits();
        assert_eq!(b.admit_publish("news/tech", &limits), Ok(()));
        assert_eq!(b.admit_publish("news/tech/a-very-long-name", &limits), Err(PublishRefusal::TopicTooLong));
        assert_eq!(b.metrics().limit_topic_length.load(Ordering::Relaxed), 1);
        assert_eq!(b.admit_publish("a/b/c/d", &limits), Err(PublishRefusal::TooManyLevels));
        assert_eq!(b.admit_publish("$SYS/broker/x", &limits), Err(PublishRefusal::SysTopic));
        b.set_degraded(true);
        assert_eq!(b.admit_publish("news/tech", &limits), Err(PublishRefusal::Degraded));
        assert_eq!(b.admit_publish("news/breaking/q", &limits), Ok(()), "high priority flows in degraded mode");
        assert_eq!(b.metrics().degraded_refused.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_outcome_is_counted_in_the_metrics_and_on_the_receipt() {
        let (b, _dir) = open("[receipts]\ntrack = \"all\"\n");
        let m = b.accept_message(Message::new("news/x".into(), bytes::Bytes::new(), QoS::AtLeastOnce, false)).unwrap();
        b.record(&m, Outcome::TooLarge);
        b.record(&m, Outcome::QueueDropped(QueueDrop::New));
        assert_eq!(b.metrics().messages_dropped_too_large.load(Ordering::Relaxed), 1);
        assert_eq!(b.metrics().queue_dropped_new.load(Ordering::Relaxed), 1);
        let r = m.receipt.get().unwrap();
        assert_eq!((r.get(Count::DroppedTooLarge), r.get(Count::DroppedNew)), (1, 1));
    }
}
