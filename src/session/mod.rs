//! Session state [MQTT-4.1]: what lives while a client is offline (subscriptions, the queue of
//! messages routed to it, QoS 1 and 2 messages in flight, packet identifiers) and what is shared
//! with the router (the mailbox the router writes into).
//!
//! A session's mutable state, `SessionState`, is owned by exactly one task at a time: the task of
//! the connection that has it, or the session itself while it is parked between connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub mod mailbox;
pub mod registry;

use crate::codec::{ReasonCode, SubscriptionOptions};
use crate::message::{Delivery, OutState, QueueRef};
use crate::store::{ColdQueue, LoadedEntry};

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
            .find(|(filter, _)| crate::topic::filter_matches(filter, topic))
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

/// An emptied `pending` keeps its room up to this many deliveries; beyond, the room goes.
const PENDING_KEPT: usize = 16;

/// The part of a session that one task owns at a time and that survives reconnection.
pub struct SessionState {
    pub mailbox: mailbox::Receiver<Delivery>,
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
    /// The part of a restored session's queue still in the store, older than all of `pending`:
    /// counted in the queue's bounds and figures, read by `warm` when the session comes back (or
    /// a full queue's policy must look at it).
    cold: Option<Box<ColdQueue>>,
    /// Cluster mode: the QoS 2 messages the client received (PUBREC), for the node that takes
    /// the session over if this one dies (`cluster::QOS2_SUBJECT`). Boxed: most sessions never
    /// receive at QoS 2.
    pub qos2_received: Option<Box<Qos2Ledger>>,
}

/// A session's newest received QoS 2 messages (message id, packet identifier), at most
/// `cluster::QOS2_LEDGER`, and the append ticket of the last time they were written.
#[derive(Debug, Default)]
pub struct Qos2Ledger {
    pub received: VecDeque<(u64, u16)>,
    pub ticket: u64,
}

impl SessionState {
    pub fn new(mailbox: mailbox::Receiver<Delivery>) -> Self {
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
            cold: None,
            qos2_received: None,
        }
    }

    /// Messages queued for the session, those still in the store included.
    pub fn queued_len(&self) -> usize {
        self.pending.len() + self.cold.as_ref().map_or(0, |c| c.messages)
    }

    /// Payload bytes queued for the session, those still in the store included.
    pub fn queued_bytes(&self) -> usize {
        self.pending_bytes + self.cold.as_ref().map_or(0, |c| c.bytes)
    }

    pub fn is_cold(&self) -> bool {
        self.cold.is_some()
    }

    /// Leaves a restored session's queue in the store, counted (`recovery`).
    pub fn set_cold(&mut self, cold: ColdQueue) {
        self.cold = (cold.messages > 0).then(|| Box::new(cold));
    }

    /// Puts a restored session's queue, read back from the store, ahead of what was queued since
    /// the start: queued entries into `pending` (high-priority ones first, as always), entries
    /// that were in flight into `inflight` with the packet identifiers the client knows.
    pub fn warm(&mut self, loaded: Vec<LoadedEntry>) {
        if self.cold.take().is_none() {
            return;
        }
        self.install(loaded);
    }

    /// Puts queue entries ahead of what is queued: `warm`'s work, also for a session handed
    /// over by another node (cluster mode).
    pub fn install(&mut self, loaded: Vec<LoadedEntry>) {
        let newer = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let mut highest = 0u16;
        for (at, entry, message) in loaded {
            let delivery = Delivery {
                message,
                qos: entry.qos,
                retain: entry.retain,
                subscription_ids: entry.subscription_ids.into_boxed_slice(),
                stored: std::num::NonZeroU64::new(at.seq),
            };
            match entry.inflight {
                Some((packet_id, state)) => {
                    highest = highest.max(packet_id);
                    self.inflight.push_back(OutInflight {
                        packet_id,
                        serial: 0,
                        delivery,
                        state,
                        sent_tick: 0,
                        retries: 0,
                    });
                }
                None => self.push_pending(delivery),
            }
        }
        if highest > 0 {
            self.next_packet_id = highest.checked_add(1).unwrap_or(1);
        }
        for d in newer {
            self.push_pending(d);
        }
    }

    /// Moves the queued deliveries `last` picks behind the others, each group in its order: a
    /// session taken over from another node gets what was read back from the stream (older)
    /// ahead of what this node routed to it meanwhile (newer) [MQTT-4.6.0-2].
    pub fn move_to_back(&mut self, last: impl Fn(&Delivery) -> bool) {
        if !self.pending.iter().any(&last) {
            return;
        }
        let (back, front): (VecDeque<Delivery>, VecDeque<Delivery>) = self.pending.drain(..).partition(&last);
        self.pending = front;
        self.pending.extend(back);
    }

    /// Whether offering a message of `size` bytes needs the queue's entries rather than its
    /// counts: a cold queue that is full and drops its oldest, or that keeps the latest per topic.
    pub fn needs_entries(&self, policy: OverflowPolicy, max_messages: usize, max_bytes: usize, size: usize) -> bool {
        self.cold.is_some()
            && match policy {
                OverflowPolicy::KeepLatest(_) => true,
                OverflowPolicy::DropNew => false,
                OverflowPolicy::DropOldest => {
                    self.queued_len() >= max_messages || (max_bytes > 0 && self.queued_bytes() + size > max_bytes)
                }
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
        if self.pending.is_empty() && self.pending.capacity() > PENDING_KEPT {
            // A restored queue or a burst of retained messages, sent: its room goes too (1,000
            // sessions that drained 1,000 stories each held 40 MB of empty queues).
            self.pending = VecDeque::new();
        }
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
        while let Some(d) = self.mailbox.try_recv() {
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
        let over = |s: &Self| s.queued_len() >= max_messages || (max_bytes > 0 && s.queued_bytes() + size > max_bytes);
        while over(self) {
            // A cold queue's oldest entries are in the store: unless the caller read them
            // (`needs_entries`), the new message is the one let go, never a newer one ahead of them.
            if policy == OverflowPolicy::DropNew || self.pending.is_empty() || self.cold.is_some() {
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
    /// A connection on another node of the cluster took the client: this node's connection
    /// closes with `reason` (0x8E) but lets go of the session as after an ordinary
    /// disconnection, since no connection here will claim it.
    pub elsewhere: bool,
}

/// Who holds a session and what waits for it: written only by the `registry`, under the
/// session's `ownership` lock.
#[derive(Default)]
struct Ownership {
    /// The connection that holds the session, and how to ask it (once) to let go.
    holder: Option<(u64, Option<tokio::sync::oneshot::Sender<Kick>>)>,
    /// The state, while no connection holds it.
    parked: Option<SessionState>,
    /// Cancels a delayed will of the previous connection [MQTT-3.1.3-9].
    pending_will: Option<tokio::sync::oneshot::Sender<()>>,
    /// Bumped each time the state is parked, so a stale expiry timer can tell.
    park_generation: u64,
    /// What the admin API shows of the client.
    client: ClientInfo,
    /// The identity the session belongs to (see `registry::Claim::owner`).
    owner: Option<String>,
}

impl Ownership {
    /// Asks the connection holding the session to close with `reason`, unless it was asked already.
    fn kick(&mut self, reason: ReasonCode) {
        self.send_kick(Kick { reason, elsewhere: false });
    }

    fn send_kick(&mut self, kick: Kick) {
        if let Some(tx) = self.holder.as_mut().and_then(|(_, tx)| tx.take()) {
            let _ = tx.send(kick);
        }
    }
}

/// The client of a session as the admin API lists it; updated on CONNECT, SUBSCRIBE,
/// UNSUBSCRIBE and disconnection, never on the message path.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub peer: Option<std::net::SocketAddr>,
    /// 3, 4 or 5: MQTT 3.1, 3.1.1, 5.0; `PROTOCOL_SSE` or `PROTOCOL_POLL` for a reader over HTTP.
    pub protocol: u8,
    /// Index of the MQTT listener in the configuration; `LISTENER_HTTP` for a reader over HTTP.
    pub listener: u8,
    pub username: Option<String>,
    pub connected_at_ms: u64,
    pub disconnected_at_ms: u64,
    pub subscriptions: usize,
}

impl ClientInfo {
    /// A client connecting now, with no subscriptions yet.
    pub fn connecting(peer: std::net::SocketAddr, protocol: u8, listener: u8, username: Option<String>) -> ClientInfo {
        ClientInfo {
            peer: Some(peer),
            protocol,
            listener,
            username,
            connected_at_ms: crate::clock::wall_ms_now(),
            disconnected_at_ms: 0,
            subscriptions: 0,
        }
    }
}

/// `ClientInfo::protocol` of a Server-Sent Events stream and of a poller (`http::reader`).
pub const PROTOCOL_SSE: u8 = 100;
pub const PROTOCOL_POLL: u8 = 101;
/// `ClientInfo::listener` of a reader over HTTP.
pub const LISTENER_HTTP: u8 = u8::MAX;

/// What the admin API and `$SYS` read of a parked session's queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParkedFigures {
    pub queued: usize,
    pub queued_bytes: usize,
    pub inflight: usize,
    pub subscriptions: usize,
}

/// The router's and registry's handle on a session. Its lifecycle (who holds it, whether it is
/// online, persistent or stored, its parked state, its will and expiry timers) is private to
/// this module and written only by `registry::Registry`.
pub struct SessionShared {
    pub id: u64,
    pub client_id: String,
    pub mailbox: mailbox::Sender<Delivery>,
    /// Whether a connection holds the session now.
    online: AtomicBool,
    /// Whether the session outlives its connection, so QoS 1 and 2 messages queue while offline.
    persistent: AtomicBool,
    ownership: Mutex<Ownership>,
    /// Set when the session kept its queue full longer than a publisher may wait; publishers
    /// then drop for it at once instead of waiting, until it has drained half its queue.
    congested: AtomicBool,
    /// Signalled whenever a holder parks the state.
    parked_notify: Notify,
    /// Whether the store holds a record of this session, to be removed when it ends.
    stored: AtomicBool,
    /// The high-priority lane, made on first use (only with `[[priority]]` rules): its
    /// deliveries go out ahead of the mailbox.
    urgent: std::sync::OnceLock<Box<Urgent>>,
}

/// A connected session's high-priority deliveries, bounded like the mailbox.
#[derive(Default)]
pub struct Urgent {
    pub queue: Mutex<VecDeque<Delivery>>,
    pub notify: Notify,
}

impl crate::router::Subscriber for Arc<SessionShared> {
    fn id(&self) -> u64 {
        self.id
    }
}

/// The router's types as the broker uses them: subscribers are sessions.
pub type Router = crate::router::Router<Arc<SessionShared>>;
pub type Subscription = crate::router::Subscription<Arc<SessionShared>>;
pub type Target = crate::router::Target<Arc<SessionShared>>;

impl SessionShared {
    fn new(id: u64, client_id: String, queue_capacity: usize) -> (Arc<SessionShared>, SessionState) {
        let (tx, rx) = mailbox::channel(queue_capacity.max(1));
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

    /// The high-priority lane, made on first use.
    pub fn urgent(&self) -> &Urgent {
        self.urgent.get_or_init(Box::default)
    }

    /// The high-priority lane if it was ever made.
    pub fn urgent_if_made(&self) -> Option<&Urgent> {
        self.urgent.get().map(|u| &**u)
    }

    /// Sequentially consistent: routing reads it right after putting a delivery in the mailbox,
    /// and parking writes it right before emptying the mailbox (see `absorb_stragglers`).
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::SeqCst)
    }

    pub fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }

    pub fn set_congested(&self, congested: bool) {
        self.congested.store(congested, Ordering::Relaxed);
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    /// Runs `f` on the parked state, if the session is parked: how routing queues a message for
    /// an offline session under its overflow policy.
    pub fn with_parked<R>(&self, f: impl FnOnce(&mut SessionState) -> R) -> Option<R> {
        self.ownership.lock().expect("ownership lock").parked.as_mut().map(f)
    }

    /// The queue figures of a parked session, for the admin API and `$SYS`.
    pub fn parked_figures(&self) -> Option<ParkedFigures> {
        self.with_parked(|p| ParkedFigures {
            queued: p.queued_len(),
            queued_bytes: p.queued_bytes(),
            inflight: p.inflight.len(),
            subscriptions: p.subscriptions.len(),
        })
    }

    /// The filters of a parked session, for the admin API (a connected session's are its
    /// connection's).
    pub fn parked_filters(&self) -> Option<Vec<String>> {
        self.with_parked(|p| p.subscriptions.keys().cloned().collect())
    }

    pub fn client_info(&self) -> ClientInfo {
        self.ownership.lock().expect("ownership lock").client.clone()
    }

    /// The identity the session belongs to (None: made by the operator, or before owners).
    pub fn owner(&self) -> Option<String> {
        self.ownership.lock().expect("ownership lock").owner.clone()
    }

    pub fn set_subscription_count(&self, n: usize) {
        self.ownership.lock().expect("ownership lock").client.subscriptions = n;
    }

    /// Whether a connection holds the session (under the ownership lock, unlike `is_online`).
    pub fn is_held(&self) -> bool {
        self.ownership.lock().expect("ownership lock").holder.is_some()
    }

    /// Closes the reorder window of a delivery that found the session online and was put in its
    /// mailbox (or lane) just as the session went offline: once parked, anything left there is
    /// moved behind the parked queue, so that later messages, which go straight to the parked
    /// queue, cannot overtake it. Routing calls it when it finds the session offline right
    /// after such a delivery.
    pub fn absorb_stragglers(&self) {
        let mut own = self.ownership.lock().expect("ownership lock");
        if let Some(parked) = own.parked.as_mut() {
            if let Some(urgent) = self.urgent.get() {
                for d in urgent.queue.lock().expect("urgent lock").drain(..) {
                    parked.push_pending(d);
                }
            }
            parked.absorb_mailbox();
        }
    }

    #[cfg(test)]
    pub fn new_for_test(id: u64) -> Arc<SessionShared> {
        Self::new(id, format!("test-{id}"), 4).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;
    use crate::message::Message;
    use bytes::Bytes;

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
        // Every message waiting in a mailbox or a pending queue is one Delivery; a session that
        // received a burst keeps up to 32 slots (mailbox::KEEP_CAPACITY).
        assert!(std::mem::size_of::<Delivery>() <= 40, "{}", std::mem::size_of::<Delivery>());
    }

    #[test]
    fn what_was_routed_during_a_takeover_goes_behind_what_was_read_back_each_in_order() {
        // MQTT-4.6.0-2: handed "h", routed here meanwhile "n1" "n2", read back "r1" "r2".
        let (_, mut s) = SessionShared::new(1, "c".into(), 8);
        for p in [&b"h"[..], b"n1", b"r1", b"n2", b"r2"] {
            s.push_pending(on("t", p));
        }
        s.move_to_back(|d| d.message.payload.starts_with(b"n"));
        let order: Vec<Bytes> = queued(&s).into_iter().map(|(_, p)| p).collect();
        assert_eq!(order, ["h", "r1", "r2", "n1", "n2"].map(|p| Bytes::from_static(p.as_bytes())));
        assert_eq!(s.pending_bytes, 9);
    }

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        // A session that came back to 1,000 queued stories holds no room for 1,000 once sent.
        let (_, mut s) = SessionShared::new(1, "c".into(), 8);
        for _ in 0..1000 {
            s.push_pending(delivery());
        }
        while s.pop_pending().is_some() {}
        assert!(s.pending.capacity() <= PENDING_KEPT, "{} slots kept", s.pending.capacity());
        assert_eq!(s.pending_bytes, 0);
        // A small queue keeps its room (no allocation per burst of a few).
        s.push_pending(delivery());
        s.pop_pending();
        assert!(s.pending.capacity() > 0);
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
