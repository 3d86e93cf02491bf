//! Session state [MQTT-4.1]: what lives while a client is offline (subscriptions, the queue of
//! messages routed to it, QoS 1 and 2 messages in flight, packet identifiers) and what is shared
//! with the router (the mailbox the router writes into).
//!
//! A session's mutable state, `SessionState`, is owned by exactly one task at a time: the task of
//! the connection that has it, or the session itself while it is parked between connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use crate::codec::{Properties, QoS, ReasonCode, SubscriptionOptions};
use crate::store::records::QueueEntry;
use crate::store::QueueRef;

/// A message as accepted from a publisher. Routing shares it through an `Arc`; its payload is
/// one `Bytes` for its whole life and is never copied per subscriber.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The publisher's properties that travel with the message [MQTT-3.3.2.3]: payload format,
    /// content type, response topic, correlation data and user properties, in that order.
    pub properties: Properties,
    pub expiry_interval: Option<u32>,
    pub received_at: Instant,
    /// The publishing session, for the no-local option [MQTT-3.8.3-3].
    pub publisher: Option<u64>,
    /// The QoS 0 PUBLISH as most subscribers get it, encoded once and shared: indexed by
    /// [3.1.1 or 5.0][retain flag]. See `connection::outbound`.
    pub shared_frames: [[std::sync::OnceLock<Bytes>; 2]; 2],
    /// How many sessions routing found for it; sharing an encoded frame pays only above one.
    pub fanout: std::sync::atomic::AtomicUsize,
    /// Its body's id in the store, once routing stored it for a persistent session.
    pub store_id: std::sync::OnceLock<u64>,
    /// The message id the broker gave it on acceptance (`Broker::next_message_id`); 0 for
    /// `$SYS` updates.
    pub id: u64,
    /// Its delivery receipt, when it is tracked (`receipts`): every outcome of a delivery of it
    /// is counted there.
    /// Set once: on acceptance, or when a queued message is read back from the store.
    pub receipt: std::sync::OnceLock<Arc<crate::receipts::Receipt>>,
    /// In the high priority class (`[[priority]]`), set when it is routed or read back.
    pub high: AtomicBool,
}

impl Message {
    /// A message received now, with no properties, expiry, publisher or id: set those with
    /// struct update syntax (`Message { id, ..Message::new(..) }`).
    pub fn new(topic: String, payload: Bytes, qos: QoS, retain: bool) -> Message {
        Message {
            topic,
            payload,
            qos,
            retain,
            properties: Properties::default(),
            expiry_interval: None,
            received_at: Instant::now(),
            publisher: None,
            shared_frames: Default::default(),
            fanout: Default::default(),
            store_id: Default::default(),
            id: 0,
            receipt: std::sync::OnceLock::new(),
            high: AtomicBool::new(false),
        }
    }

    /// Counts an outcome of one of its deliveries on its receipt, if it has one.
    pub fn count(&self, count: crate::receipts::Count) {
        if let Some(r) = self.receipt.get() {
            r.add(count, 1);
        }
    }

    pub fn is_high(&self) -> bool {
        self.high.load(Ordering::Relaxed)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        match self.expiry_interval {
            Some(secs) => now.duration_since(self.received_at).as_secs() >= u64::from(secs),
            None => false,
        }
    }

    /// The expiry interval to send on: what is left of the publisher's [MQTT-3.3.2-6].
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expiry_interval.map(|secs| secs.saturating_sub(now.duration_since(self.received_at).as_secs() as u32))
    }

    #[cfg(test)]
    pub fn new_for_test(topic: &str, payload: &'static [u8], qos: QoS, retain: bool) -> Message {
        Message::new(topic.into(), Bytes::from_static(payload), qos, retain)
    }
}

/// A message routed to one session, with what that session's subscriptions grant.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    /// Boxed slice rather than `Vec`: 8 bytes less in every mailbox slot, and no allocation
    /// when empty, which it almost always is.
    pub subscription_ids: Box<[u32]>,
    /// The sequence number of its entry in the session's durable queue, for a persistent
    /// session; the entry is removed when the client acknowledges it (or it is dropped or
    /// expires). A bare number rather than a `QueueRef` keeps every mailbox slot 8 bytes smaller;
    /// the body's id is on the message.
    pub stored: Option<std::num::NonZeroU64>,
}

impl Delivery {
    /// Where the delivery is in the store, if it is.
    pub fn queue_ref(&self) -> Option<QueueRef> {
        let seq = self.stored?.get();
        Some(QueueRef { seq, message_id: *self.message.store_id.get()? })
    }

    pub fn queue_entry(&self, inflight: Option<(u16, OutState)>) -> QueueEntry {
        QueueEntry {
            message_id: self.message.store_id.get().copied().unwrap_or(0),
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.to_vec(),
            inflight,
        }
    }
}

/// What an offline session's queue does when a message arrives and the queue is full (or, for
/// `KeepLatest`, when it already holds that many messages of the same topic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowPolicy {
    DropOldest,
    DropNew,
    KeepLatest(usize),
}

/// The overflow policies of `[[queue_policy]]`, first match wins.
#[derive(Default)]
pub struct QueuePolicies {
    rules: Vec<(String, OverflowPolicy)>,
}

impl QueuePolicies {
    pub fn new(rules: &[crate::config::QueuePolicyRule]) -> Self {
        use crate::config::OverflowPolicyName;
        let rules = rules
            .iter()
            .map(|r| {
                let policy = match (r.policy, r.keep_latest) {
                    (_, Some(n)) => OverflowPolicy::KeepLatest(n),
                    (Some(OverflowPolicyName::DropNew), None) => OverflowPolicy::DropNew,
                    _ => OverflowPolicy::DropOldest,
                };
                (r.filter.clone(), policy)
            })
            .collect();
        QueuePolicies { rules }
    }

    pub fn for_topic(&self, topic: &str) -> OverflowPolicy {
        self.rules
            .iter()
            .find(|(filter, _)| crate::router::filter_matches(filter, topic))
            .map_or(OverflowPolicy::DropOldest, |(_, p)| *p)
    }
}

/// Why an offline session's queue let a message go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueDrop {
    Oldest,
    New,
    /// Replaced by a later message of the same topic (`keep_latest`).
    Superseded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

#[derive(Debug)]
pub struct OutInflight {
    pub packet_id: u16,
    /// `SessionState::allocations` when the identifier was taken.
    pub serial: u64,
    pub delivery: Delivery,
    pub state: OutState,
    /// The connection's retry tick when it was last sent (`Connection::retry_tick`): retries
    /// are counted in ticks of `[delivery] retry_after`, so that sending needs no clock.
    pub sent_tick: u32,
    /// Times it was sent again on the same connection; one more than `max_retries` once it
    /// was handed off as undelivered.
    pub retries: u8,
}

/// The part of a session that one task owns at a time and that survives reconnection.
pub struct SessionState {
    pub mailbox: mpsc::Receiver<Delivery>,
    /// Messages to send before the mailbox, in order: retained messages on subscribe, and what
    /// was queued while the session was offline. Changed through `push_pending` and
    /// `pop_pending`, which keep `pending_bytes`.
    pub pending: VecDeque<Delivery>,
    pub pending_bytes: usize,
    /// Outgoing QoS 1 and 2 messages not yet completed, in the order they were sent [MQTT-4.6.0-1].
    pub inflight: VecDeque<OutInflight>,
    /// Incoming QoS 2 packet identifiers between PUBREC and PUBREL [MQTT-4.3.3-9].
    pub incoming_qos2: HashSet<u16>,
    pub next_packet_id: u16,
    /// Packet identifiers handed out so far.
    pub allocations: u64,
    /// Filter (as subscribed, `$share/...` included) to its options and identifier.
    pub subscriptions: HashMap<String, (SubscriptionOptions, Option<u32>)>,
    pub expiry_interval: u32,
}

impl SessionState {
    pub fn new(mailbox: mpsc::Receiver<Delivery>) -> Self {
        Self {
            mailbox,
            pending: VecDeque::new(),
            pending_bytes: 0,
            inflight: VecDeque::new(),
            incoming_qos2: HashSet::new(),
            next_packet_id: 1,
            allocations: 0,
            subscriptions: HashMap::new(),
            expiry_interval: 0,
        }
    }

    /// Queues a delivery at the end of its class: a high-priority one after the other
    /// high-priority ones, ahead of every normal one [issue 7], so `pending` always holds the
    /// high-priority deliveries first.
    pub fn push_pending(&mut self, d: Delivery) {
        self.pending_bytes += d.message.payload.len();
        if d.message.is_high() && self.pending.back().is_some_and(|last| !last.message.is_high()) {
            let at = self.pending.iter().position(|p| !p.message.is_high()).unwrap_or(self.pending.len());
            self.pending.insert(at, d);
        } else {
            self.pending.push_back(d);
        }
    }

    /// Takes the oldest normal delivery, or the oldest of all if every one is high priority:
    /// what an offline queue lets go first when it is full.
    fn pop_oldest_for_room(&mut self) -> Option<Delivery> {
        let at = self.pending.iter().position(|p| !p.message.is_high()).unwrap_or(0);
        let d = self.pending.remove(at)?;
        self.pending_bytes -= d.message.payload.len();
        Some(d)
    }

    pub fn pop_pending(&mut self) -> Option<Delivery> {
        let d = self.pending.pop_front()?;
        self.pending_bytes -= d.message.payload.len();
        Some(d)
    }

    /// Puts back a delivery that could not be sent yet, ahead of the others.
    pub fn unpop_pending(&mut self, d: Delivery) {
        self.pending_bytes += d.message.payload.len();
        self.pending.push_front(d);
    }

    /// Moves what the router put in the mailbox to the end of `pending`, when the session is
    /// parked, so that the offline queue's policies see one queue.
    pub fn absorb_mailbox(&mut self) {
        while let Ok(d) = self.mailbox.try_recv() {
            self.push_pending(d);
        }
    }

    /// Queues a message for this session while it is offline, within `max_messages` and
    /// `max_bytes` (0: no byte bound) as `policy` says. Returns what was let go, with why.
    pub fn offer_offline(
        &mut self,
        d: Delivery,
        policy: OverflowPolicy,
        max_messages: usize,
        max_bytes: usize,
    ) -> Vec<(Delivery, QueueDrop)> {
        let mut dropped = Vec::new();
        if let OverflowPolicy::KeepLatest(n) = policy {
            let topic = d.message.topic.as_str();
            let mut same = self.pending.iter().filter(|p| p.message.topic == topic).count();
            while same >= n {
                let pos = self.pending.iter().position(|p| p.message.topic == topic).expect("counted");
                let old = self.pending.remove(pos).expect("position exists");
                self.pending_bytes -= old.message.payload.len();
                dropped.push((old, QueueDrop::Superseded));
                same -= 1;
            }
        }
        let size = d.message.payload.len();
        if max_bytes > 0 && size > max_bytes {
            dropped.push((d, QueueDrop::New));
            return dropped;
        }
        let over = |s: &Self| s.pending.len() >= max_messages || (max_bytes > 0 && s.pending_bytes + size > max_bytes);
        while over(self) {
            if policy == OverflowPolicy::DropNew || self.pending.is_empty() {
                dropped.push((d, QueueDrop::New));
                return dropped;
            }
            let old = self.pop_oldest_for_room().expect("not empty");
            dropped.push((old, QueueDrop::Oldest));
        }
        self.push_pending(d);
        dropped
    }

    /// Every durable queue reference the state holds, taking what is left in the mailbox.
    pub fn take_stored_refs(&mut self) -> Vec<QueueRef> {
        self.absorb_mailbox();
        let pending = self.pending.iter().filter_map(|d| d.queue_ref());
        pending.chain(self.inflight.iter().filter_map(|m| m.delivery.queue_ref())).collect()
    }

    /// Takes every durable queue reference out of the state's deliveries: the session stopped
    /// being persistent, and its messages are no longer the store's.
    pub fn forget_stored(&mut self) -> Vec<QueueRef> {
        self.absorb_mailbox();
        let pending = self.pending.iter_mut();
        let all = pending.chain(self.inflight.iter_mut().map(|m| &mut m.delivery));
        all.filter_map(|d| {
            let at = d.queue_ref();
            d.stored = None;
            at
        })
        .collect()
    }

    /// The next packet identifier not in use by an in-flight message [MQTT-2.2.1-2].
    /// Identifiers go out in sequence, so while the oldest message in flight was sent less than
    /// a lap of identifiers ago, the next one cannot be in use and no search is needed.
    pub fn allocate_packet_id(&mut self) -> Option<u16> {
        if self.inflight.len() >= usize::from(u16::MAX) {
            return None;
        }
        let lapped = self.inflight.front().is_some_and(|m| self.allocations - m.serial >= u64::from(u16::MAX) - 1);
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            self.allocations += 1;
            if !lapped || !self.inflight.iter().any(|m| m.packet_id == id) {
                return Some(id);
            }
        }
    }
}

/// What a new connection sends to the connection that holds its session.
#[derive(Debug, Clone, Copy)]
pub struct Kick {
    pub reason: ReasonCode,
}

impl Ownership {
    /// Asks the connection holding the session to close with `reason`, unless it was asked already.
    pub fn kick(&mut self, reason: ReasonCode) {
        if let Some(tx) = self.holder.as_mut().and_then(|(_, tx)| tx.take()) {
            let _ = tx.send(Kick { reason });
        }
    }
}

#[derive(Default)]
pub struct Ownership {
    /// The connection that holds the session, and how to ask it (once) to let go.
    pub holder: Option<(u64, Option<tokio::sync::oneshot::Sender<Kick>>)>,
    /// The state, while no connection holds it.
    pub parked: Option<SessionState>,
    /// Cancels a delayed will of the previous connection [MQTT-3.1.3-9].
    pub pending_will: Option<tokio::sync::oneshot::Sender<()>>,
    /// Bumped each time the state is parked, so a stale expiry timer can tell.
    pub park_generation: u64,
    /// What the admin API shows of the client.
    pub client: ClientInfo,
}

/// The client of a session as the admin API lists it; updated on CONNECT, SUBSCRIBE,
/// UNSUBSCRIBE and disconnection, never on the message path.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub peer: Option<std::net::SocketAddr>,
    /// 3, 4 or 5: MQTT 3.1, 3.1.1, 5.0.
    pub protocol: u8,
    pub username: Option<String>,
    pub connected_at_ms: u64,
    pub disconnected_at_ms: u64,
    pub subscriptions: usize,
}

/// The router's and registry's handle on a session.
pub struct SessionShared {
    pub id: u64,
    pub client_id: String,
    pub mailbox: mpsc::Sender<Delivery>,
    /// Whether a connection holds the session now.
    pub online: AtomicBool,
    /// Whether the session outlives its connection, so QoS 1 and 2 messages queue while offline.
    pub persistent: AtomicBool,
    pub ownership: Mutex<Ownership>,
    /// Set when the session kept its queue full longer than a publisher may wait; publishers
    /// then drop for it at once instead of waiting, until it has drained half its queue.
    pub congested: AtomicBool,
    /// Signalled whenever a holder parks the state.
    pub parked_notify: Notify,
    /// Whether the store holds a record of this session, to be removed when it ends.
    pub stored: AtomicBool,
    /// The high-priority lane, made on first use (only with `[[priority]]` rules): its
    /// deliveries go out ahead of the mailbox.
    pub urgent: std::sync::OnceLock<Box<Urgent>>,
}

/// A connected session's high-priority deliveries, bounded like the mailbox.
#[derive(Default)]
pub struct Urgent {
    pub queue: Mutex<VecDeque<Delivery>>,
    pub notify: Notify,
}

impl SessionShared {
    pub fn new(id: u64, client_id: String, queue_capacity: usize) -> (Arc<SessionShared>, SessionState) {
        let (tx, rx) = mpsc::channel(queue_capacity.max(1));
        let shared = Arc::new(SessionShared {
            id,
            client_id,
            mailbox: tx,
            online: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            ownership: Mutex::new(Ownership::default()),
            congested: AtomicBool::new(false),
            parked_notify: Notify::new(),
            stored: AtomicBool::new(false),
            urgent: std::sync::OnceLock::new(),
        });
        (shared, SessionState::new(rx))
    }

    pub fn urgent(&self) -> &Urgent {
        self.urgent.get_or_init(Box::default)
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub fn new_for_test(id: u64) -> Arc<SessionShared> {
        Self::new(id, format!("test-{id}"), 4).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Delivery {
        Delivery {
            message: Arc::new(Message::new_for_test("t", b"x", QoS::AtLeastOnce, false)),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Box::default(),
            stored: None,
        }
    }

    fn on(topic: &str, payload: &'static [u8]) -> Delivery {
        Delivery {
            message: Arc::new(Message::new_for_test(topic, payload, QoS::AtLeastOnce, false)),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Box::default(),
            stored: None,
        }
    }

    fn queued(s: &SessionState) -> Vec<(String, Bytes)> {
        s.pending.iter().map(|d| (d.message.topic.clone(), d.message.payload.clone())).collect()
    }

    #[test]
    fn a_delivery_stays_small_since_every_mailbox_slot_holds_one() {
        // tokio's mailbox allocates its first block of 32 slots with each session: 8 bytes here
        // are 256 bytes per idle connection (docs/benchmarks.md).
        assert!(std::mem::size_of::<Delivery>() <= 40, "{}", std::mem::size_of::<Delivery>());
    }

    #[test]
    fn offline_queue_policies_drop_oldest_drop_new_and_keep_latest() {
        let (_, mut s) = SessionShared::new(1, "c".into(), 1);
        for p in [&b"1"[..], b"2", b"3"] {
            assert!(s.offer_offline(on("a", p), OverflowPolicy::DropOldest, 2, 0).len() <= 1);
        }
        assert_eq!(queued(&s), vec![("a".into(), Bytes::from_static(b"2")), ("a".into(), Bytes::from_static(b"3"))]);
        let dropped = s.offer_offline(on("a", b"4"), OverflowPolicy::DropNew, 2, 0);
        assert_eq!((dropped.len(), dropped[0].1), (1, QueueDrop::New));
        assert_eq!(s.pending.len(), 2);

        let (_, mut s) = SessionShared::new(2, "c".into(), 1);
        for (t, p) in [("h", &b"h1"[..]), ("x", b"x1"), ("h", b"h2"), ("h", b"h3")] {
            s.offer_offline(on(t, p), OverflowPolicy::KeepLatest(2), 100, 0);
        }
        assert_eq!(queued(&s).iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), vec!["x1", "h2", "h3"]);
        assert_eq!(s.pending_bytes, 6);

        let (_, mut s) = SessionShared::new(3, "c".into(), 1);
        s.offer_offline(on("a", b"12345"), OverflowPolicy::DropOldest, 100, 8);
        let dropped = s.offer_offline(on("a", b"6789"), OverflowPolicy::DropOldest, 100, 8);
        assert_eq!((dropped.len(), dropped[0].1, s.pending_bytes), (1, QueueDrop::Oldest, 4));
        let dropped = s.offer_offline(on("a", b"too large for the queue"), OverflowPolicy::DropOldest, 100, 8);
        assert_eq!((dropped.len(), dropped[0].1), (1, QueueDrop::New), "larger than the bound on its own");
        assert_eq!(s.pending_bytes, 4, "and nothing else is let go for it");
    }

    #[test]
    fn high_priority_goes_ahead_of_normal_and_is_dropped_last() {
        let high = |p: &'static [u8]| {
            let d = on("news/breaking/x", p);
            d.message.high.store(true, Ordering::Relaxed);
            d
        };
        let (_, mut s) = SessionShared::new(1, "c".into(), 1);
        for d in [on("news/f", b"f1"), high(b"b1"), on("news/f", b"f2"), high(b"b2")] {
            s.offer_offline(d, OverflowPolicy::DropOldest, 4, 0);
        }
        let order: Vec<Bytes> = queued(&s).into_iter().map(|(_, p)| p).collect();
        assert_eq!(order, vec!["b1", "b2", "f1", "f2"]);
        let dropped = s.offer_offline(high(b"b3"), OverflowPolicy::DropOldest, 4, 0);
        assert_eq!(&dropped[0].0.message.payload[..], b"f1", "the oldest normal one makes room");
        let order: Vec<Bytes> = queued(&s).into_iter().map(|(_, p)| p).collect();
        assert_eq!(order, vec!["b1", "b2", "b3", "f2"]);
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight_after_a_lap_mqtt_2_2_1_2() {
        let (_, mut s) = SessionShared::new(1, "c".into(), 1);
        let first = s.allocate_packet_id().unwrap();
        assert_eq!(first, 1);
        s.inflight.push_back(OutInflight {
            packet_id: first,
            serial: s.allocations,
            delivery: delivery(),
            state: OutState::AwaitPubAck,
            sent_tick: 0,
            retries: 0,
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200_000 {
            let id = s.allocate_packet_id().unwrap();
            assert_ne!(id, 0);
            assert_ne!(id, first, "the identifier still in flight is never reused");
            seen.insert(id);
        }
        assert_eq!(seen.len(), 65_534, "every other identifier is used");
    }
}
