//! The broker's shared state and its tasks: the subscription tree, retained messages and the
//! session registry, the listeners, and shutdown.
//!
//! Locks here are `std::sync` locks held for the length of an in-memory operation and never
//! across an `.await`; docs/concurrency.md gives the order in which they may nest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::net::TcpListener;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::Auth;
use crate::codec::QoS;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::retain::RetainedStore;
use crate::router::{parse_filter, MatchCache, Subscription, SubscriptionTree};
use crate::session::{Delivery, Message, QueuePolicies, SessionShared, SessionState};
use crate::store::{QueueRef, Store, StoreError, Txn};

pub struct Broker {
    pub config: Config,
    pub router: RwLock<SubscriptionTree>,
    match_cache: MatchCache,
    pub retained: RwLock<RetainedStore>,
    /// Client identifier to session. Lock order: `sessions`, then a session's `ownership`, then
    /// `router`.
    pub sessions: Mutex<HashMap<String, Arc<SessionShared>>>,
    pub metrics: Metrics,
    pub store: Store,
    pub queue_policies: QueuePolicies,
    /// Authentication and ACL, swapped whole on reload.
    auth: RwLock<Arc<Auth>>,
    /// Per listener, its TLS acceptor (None for plain listeners), swapped on reload.
    tls: Vec<RwLock<Option<tokio_rustls::TlsAcceptor>>>,
    limits: RwLock<Arc<crate::config::Limits>>,
    /// Open connections and recent CONNECTs per IP address, kept only while a per-IP limit is on.
    per_ip: Mutex<HashMap<std::net::IpAddr, IpUse>>,
    started: std::time::Instant,
    /// Sessions read back from the store, whose expiry and wills `run` schedules.
    pub(crate) restored: Mutex<Vec<crate::recovery::Restored>>,
    next_id: AtomicU64,
    /// Message ids handed out in this run (the low 40 bits of an id).
    message_ids: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Where the HTTP server listens, once bound.
    http_addr: std::sync::OnceLock<SocketAddr>,
    /// Set once every listener is bound and cleared when shutdown begins: /readyz.
    listening: std::sync::atomic::AtomicBool,
    /// Delivery receipts and recent story ids.
    pub receipts: crate::receipts::Receipts,
    /// Undelivered events for the webhook task (`[delivery] webhook`), and its receiving end
    /// until `run` starts the task.
    webhook: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    webhook_events: Mutex<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>>,
    pub webhook_failures: Arc<AtomicU64>,
    /// Topic filters of the high priority class.
    high_priority: Vec<String>,
    /// Degraded mode (docs/news-delivery.md): normal QoS 0 traffic is shed and new normal
    /// publishes are refused while set.
    pub degraded: std::sync::atomic::AtomicBool,
}

/// Where undelivered messages are announced.
pub const UNDELIVERED_TOPIC: &str = "$SYS/broker/herald/undelivered";

/// Session figures for `$SYS` and the API, counted over the registry.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionCounts {
    pub total: u64,
    pub online: u64,
    /// Messages waiting: in mailboxes, and in parked sessions' queues.
    pub queued: u64,
    /// Messages in flight in parked sessions (a connected session's in-flight window is its own).
    pub inflight: u64,
    /// Payload bytes queued in parked sessions.
    pub queued_bytes: u64,
}

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
    /// Loads the auth files and TLS material, opens the store and rebuilds the retained messages
    /// and persistent sessions it holds.
    pub fn open(config: Config) -> Result<Arc<Broker>, BrokerError> {
        let auth = Auth::load(&config.auth)?;
        let tls = config
            .listeners
            .iter()
            .map(|l| Ok(RwLock::new(if l.is_tls() { Some(crate::tls::acceptor(l)?) } else { None })))
            .collect::<Result<Vec<_>, crate::tls::TlsError>>()?;
        let (store, recovered) = Store::open(&config.storage.path, config.storage.durability)?;
        let (shutdown, _) = watch::channel(false);
        let match_cache = MatchCache::new(config.mqtt.match_cache_size);
        let limits = Arc::new(config.limits.clone());
        let (webhook, webhook_events) = match &config.delivery.webhook {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(crate::webhook::QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let receipts = crate::receipts::Receipts::new(config.receipts.clone());
        receipts.restore(recovered.receipts.iter().filter_map(|v| crate::receipts::Receipt::decode(v)).collect());
        let high_priority = config
            .priority
            .iter()
            .filter(|r| r.class == crate::config::PriorityClass::High)
            .map(|r| r.filter.clone())
            .collect();
        let broker = Arc::new(Broker {
            queue_policies: QueuePolicies::new(&config.queue_policy),
            config,
            router: RwLock::default(),
            match_cache,
            retained: RwLock::default(),
            sessions: Mutex::default(),
            metrics: Metrics::default(),
            store,
            auth: RwLock::new(Arc::new(auth)),
            tls,
            limits: RwLock::new(limits),
            per_ip: Mutex::default(),
            started: std::time::Instant::now(),
            restored: Mutex::default(),
            next_id: AtomicU64::new(1),
            message_ids: AtomicU64::new(1),
            shutdown,
            http_addr: std::sync::OnceLock::new(),
            listening: std::sync::atomic::AtomicBool::new(false),
            receipts,
            webhook,
            webhook_events: Mutex::new(webhook_events),
            webhook_failures: Arc::default(),
            high_priority,
            degraded: std::sync::atomic::AtomicBool::new(false),
        });
        // Queued messages read back keep counting on their receipts.
        for session in &recovered.sessions {
            for (_, _, body) in &session.queue {
                if body.id != 0 && body.receipt.get().is_none() {
                    if let Some(r) = broker.receipts.by_id(body.id) {
                        let _ = body.receipt.set(r);
                    }
                }
            }
        }
        crate::recovery::restore(&broker, recovered);
        Ok(broker)
    }

    pub fn auth(&self) -> Arc<Auth> {
        self.auth.read().expect("auth lock").clone()
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
        let auth = Auth::load(&config.auth)?;
        let mut acceptors = Vec::new();
        for l in &config.listeners {
            acceptors.push(if l.is_tls() { Some(crate::tls::acceptor(l)?) } else { None });
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
    pub fn next_message_id(&self) -> u64 {
        (self.store.boot() << 40) | (self.message_ids.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1))
    }

    /// Gives a message accepted from a publisher its id and, if it is tracked, its receipt; or
    /// finds it to be a retry of a story accepted within the deduplication window, and returns
    /// `Err` with that story's message id.
    pub fn accept_message(&self, mut message: Message) -> Result<Arc<Message>, u64> {
        message.id = self.next_message_id();
        match self.receipts.admit(message.id, &message, message.received_at) {
            crate::receipts::Admission::Duplicate(original) => {
                debug!(topic = %message.topic, original = %crate::receipts::message_id_text(original), "duplicate story not routed");
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

    /// Whether a topic is in the high priority class (`[[priority]]`).
    pub fn is_high_priority(&self, topic: &str) -> bool {
        !self.high_priority.is_empty() && self.high_priority.iter().any(|f| crate::router::filter_matches(f, topic))
    }

    /// Hands off a message that did not reach a session [issue 7]: counted on its receipt,
    /// published to `$SYS/broker/herald/undelivered` and queued for the webhook.
    pub fn undelivered(&self, client_id: &str, message: &Message, reason: &'static str) {
        message.count(crate::receipts::Count::Undelivered);
        self.metrics.undelivered.fetch_add(1, Ordering::Relaxed);
        let story_id = message.properties.user_properties.iter().find(|(k, _)| k == crate::receipts::STORY_ID);
        let event = serde_json::json!({
            "client_id": client_id,
            "id": crate::receipts::message_id_text(message.id),
            "story_id": story_id.map(|(_, v)| v),
            "topic": message.topic,
            "reason": reason,
            "at_ms": crate::store::records::wall_ms_now(),
        });
        let body = serde_json::to_vec(&event).expect("JSON values serialize");
        info!(client_id, id = %crate::receipts::message_id_text(message.id), topic = %message.topic, reason, "undelivered");
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

    /// Counts sessions, those connected, and what waits in their queues. Walks every session:
    /// for `$SYS` and scrapes, never the hot path. The registry lock is held only to copy the
    /// list.
    pub fn session_counts(&self) -> SessionCounts {
        let sessions: Vec<Arc<SessionShared>> =
            self.sessions.lock().expect("sessions lock").values().cloned().collect();
        let mut counts = SessionCounts { total: sessions.len() as u64, ..Default::default() };
        for s in &sessions {
            counts.queued += (s.mailbox.max_capacity() - s.mailbox.capacity()) as u64;
            if s.is_online() {
                counts.online += 1;
            } else if let Some(parked) = s.ownership.lock().expect("ownership lock").parked.as_ref() {
                counts.queued += parked.pending.len() as u64;
                counts.queued_bytes += parked.pending_bytes as u64;
                counts.inflight += parked.inflight.len() as u64;
            }
        }
        counts
    }

    /// Disconnects the client holding `client_id`'s session with DISCONNECT 0x98 (5.0), and
    /// with `remove_session` ends the session too, queued messages and all. Returns false if
    /// there is no such session.
    pub async fn disconnect_client(&self, client_id: &str, remove_session: bool) -> bool {
        let Some(session) = self.sessions.lock().expect("sessions lock").get(client_id).cloned() else {
            return false;
        };
        let was_online = {
            let mut own = session.ownership.lock().expect("ownership lock");
            own.kick(crate::codec::ReasonCode::ADMINISTRATIVE_ACTION);
            own.holder.is_some()
        };
        info!(client_id, remove_session, "disconnected by the admin API");
        if !remove_session {
            return true;
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let notified = session.parked_notify.notified();
            let parked = {
                let mut own = session.ownership.lock().expect("ownership lock");
                if own.holder.is_none() {
                    // A delayed will stays scheduled: removing the session must not lose it.
                    own.park_generation += 1;
                    Some(own.parked.take())
                } else {
                    None
                }
            };
            match parked {
                Some(Some(mut state)) => {
                    self.end_session(&session, &mut state);
                    return true;
                }
                // Ended with its connection (not persistent), or never held.
                Some(None) => return true,
                None if !was_online || tokio::time::Instant::now() > deadline => return true,
                None => {
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
                }
            }
        }
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

    pub fn new_session(&self, client_id: String) -> (Arc<SessionShared>, SessionState) {
        SessionShared::new(self.next_id(), client_id, self.config.mqtt.max_queued_messages)
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
        let sessions: Vec<Arc<SessionShared>> =
            self.sessions.lock().expect("sessions lock").values().cloned().collect();
        for s in sessions {
            s.ownership.lock().expect("ownership lock").kick(crate::codec::ReasonCode::SERVER_SHUTTING_DOWN);
        }
    }

    /// Routes a message to every matching session and stores it if retained. Never waits: a
    /// session whose queue is full loses this message and the loss is counted. For messages with
    /// no publisher connection to slow down, such as wills.
    pub fn publish(&self, message: Arc<Message>) -> RouteOutcome {
        self.route(message, false)
    }

    /// Routes a message. With `can_wait`, a delivery that finds a connected subscriber's queue
    /// full is handed back in `blocked` instead of being dropped, so that the publisher's
    /// connection can wait for room before reading on (and, at QoS 1 and 2, before
    /// acknowledging): a slow reader slows the publisher down rather than losing stories. A
    /// subscriber marked congested (it kept its queue full for longer than a publisher may wait)
    /// is not waited for.
    pub fn route(&self, message: Arc<Message>, can_wait: bool) -> RouteOutcome {
        let mut txn = Txn::default();
        // `$SYS` updates are the broker's own: not counted as received, and their retained
        // values are not stored (they would be stale after a restart anyway).
        let sys = message.topic.starts_with("$SYS/");
        if message.retain {
            if !sys {
                txn.set_retained(&message);
            }
            self.retained.write().expect("retained lock").set(message.clone());
        }
        let targets = {
            let router = self.router.read().expect("router lock");
            self.match_cache.matches(&router, &message.topic)
        };
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
                self.metrics.degraded_shed.fetch_add(1, Ordering::Relaxed);
                message.count(crate::receipts::Count::DroppedShed);
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
                txn.enqueue(&t.session.client_id, at, &delivery.queue_entry(None));
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
            r.add(crate::receipts::Count::Routed, routed);
        }
        outcome
    }

    /// Hands one delivery to its session: the parked state's queue (with its overflow policy)
    /// while offline, the mailbox while connected.
    fn place(
        &self,
        session: &Arc<SessionShared>,
        delivery: Delivery,
        can_wait: bool,
        outcome: &mut RouteOutcome,
        after: &mut Txn,
    ) {
        let online = session.is_online();
        if !online {
            let mut own = session.ownership.lock().expect("ownership lock");
            if let Some(parked) = own.parked.as_mut() {
                let policy = self.queue_policies.for_topic(&delivery.message.topic);
                let mqtt = &self.config.mqtt;
                delivery.message.count(crate::receipts::Count::Queued);
                for (d, why) in parked.offer_offline(delivery, policy, mqtt.max_queued_messages, mqtt.max_queued_bytes)
                {
                    self.metrics.queue_dropped(why);
                    d.message.count(match why {
                        crate::session::QueueDrop::Oldest => crate::receipts::Count::DroppedOldest,
                        crate::session::QueueDrop::New => crate::receipts::Count::DroppedNew,
                        crate::session::QueueDrop::Superseded => crate::receipts::Count::DroppedSuperseded,
                    });
                    if let Some(at) = d.queue_ref() {
                        after.remove_entry(&session.client_id, at);
                    }
                }
                self.metrics.queue_depth.observe(parked.pending.len() as u64);
                return;
            }
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
                None
            } else {
                Some(delivery)
            }
        } else {
            match session.mailbox.try_send(delivery) {
                Ok(()) => None,
                Err(TrySendError::Full(d)) if can_wait && online && !session.is_congested() => {
                    outcome.blocked.push((session.clone(), d));
                    None
                }
                Err(TrySendError::Full(d)) | Err(TrySendError::Closed(d)) => Some(d),
            }
        };
        if let Some(d) = refused {
            outcome.dropped += 1;
            d.message.count(crate::receipts::Count::DroppedQueueFull);
            if let Some(at) = d.queue_ref() {
                after.remove_entry(&session.client_id, at);
            }
        }
    }

    /// Adds a subscription to the tree; returns whether the session already had that filter.
    pub fn subscribe(&self, filter: &str, sub: Subscription) -> bool {
        let parsed = parse_filter(filter).expect("validated by the caller");
        self.router.write().expect("router lock").subscribe(&parsed, sub)
    }

    pub fn unsubscribe(&self, session_id: u64, filter: &str) -> bool {
        match parse_filter(filter) {
            Ok(parsed) => self.router.write().expect("router lock").unsubscribe(&parsed, session_id),
            Err(_) => false,
        }
    }

    /// Drops a session for good: its subscriptions leave the tree, its records leave the store
    /// and it leaves the registry, unless a newer session has taken its client identifier since.
    pub fn end_session(&self, session: &Arc<SessionShared>, state: &mut SessionState) {
        let held = state.take_stored_refs();
        if session.stored.swap(false, Ordering::AcqRel) || !held.is_empty() {
            let mut txn = Txn::default();
            txn.remove_session(&session.client_id, held);
            self.store.commit(txn);
        }
        {
            let mut router = self.router.write().expect("router lock");
            for filter in state.subscriptions.keys() {
                if let Ok(parsed) = parse_filter(filter) {
                    router.unsubscribe(&parsed, session.id);
                }
            }
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if sessions.get(&session.client_id).is_some_and(|s| s.id == session.id) {
            sessions.remove(&session.client_id);
        }
    }
}

/// Binds every configured listener (and the HTTP server) and serves until shutdown. Returns
/// the bound addresses through `bound` as soon as they are known, so tests can use port 0.
///
/// Shutdown: the listeners stop accepting, every connection is asked to close (5.0 clients get
/// DISCONNECT 0x8B) and flushes its acknowledgements, and once all are closed or
/// `[shutdown] grace_period` has run out, the store writes what is gathered and closes.
pub async fn run(
    broker: Arc<Broker>,
    bound: Option<tokio::sync::oneshot::Sender<Vec<SocketAddr>>>,
) -> std::io::Result<()> {
    let mut shutdown = broker.shutdown_signal();
    let mut listeners = Vec::new();
    for l in &broker.config.listeners {
        let listener = TcpListener::bind(&l.bind).await?;
        let addr = listener.local_addr()?;
        info!(%addr, protocol = ?l.protocol, "listening");
        listeners.push(listener);
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(http) = &broker.config.http {
        let listener = TcpListener::bind(&http.bind).await?;
        let addr = listener.local_addr()?;
        let _ = broker.http_addr.set(addr);
        info!(%addr, "http listening");
        tasks.spawn(crate::http::serve(broker.clone(), listener));
    }
    broker.listening.store(true, Ordering::Release);
    if let Some(tx) = bound {
        let addrs = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
        let _ = tx.send(addrs);
    }
    crate::recovery::schedule(&broker);
    for (index, listener) in listeners.into_iter().enumerate() {
        tasks.spawn(crate::listener::accept_loop(broker.clone(), listener, index));
    }
    if broker.config.sys.interval > 0 {
        tasks.spawn(crate::sys::publish_loop(broker.clone()));
    }
    tasks.spawn(crate::receipts::maintain(broker.clone()));
    tasks.spawn(crate::pressure::monitor(broker.clone()));
    let webhook_events = broker.webhook_events.lock().expect("webhook lock").take();
    if let (Some(url), Some(events)) = (&broker.config.delivery.webhook, webhook_events) {
        let endpoint = crate::webhook::Endpoint::parse(url).expect("validated with the configuration");
        // Not in `tasks`: it drains what is queued after shutdown begins too, until the broker goes.
        tokio::spawn(crate::webhook::run(endpoint, events, broker.webhook_failures.clone()));
    }
    let _ = shutdown.wait_for(|s| *s).await;
    let grace = std::time::Duration::from_secs(broker.config.shutdown.grace_period);
    info!(grace_secs = grace.as_secs(), "shutting down: no longer accepting connections");
    broker.listening.store(false, Ordering::Release);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let deadline = tokio::time::Instant::now() + grace;
    while broker.metrics.connections_now() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if broker.metrics.connections_now() > 0 {
        warn!(open = broker.metrics.connections_now(), "connections still open when the grace period ran out");
    }
    crate::receipts::flush(&broker);
    broker.store.close();
    info!("store closed");
    Ok(())
}
