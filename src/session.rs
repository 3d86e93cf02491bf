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
}

impl Message {
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
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos,
            retain,
            properties: Properties::default(),
            expiry_interval: None,
            received_at: Instant::now(),
            publisher: None,
            shared_frames: Default::default(),
            fanout: Default::default(),
        }
    }
}

/// A message routed to one session, with what that session's subscriptions grant.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
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
}

/// The part of a session that one task owns at a time and that survives reconnection.
pub struct SessionState {
    pub mailbox: mpsc::Receiver<Delivery>,
    /// Messages to send before the mailbox: retained messages on subscribe, in order.
    pub pending: VecDeque<Delivery>,
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
            inflight: VecDeque::new(),
            incoming_qos2: HashSet::new(),
            next_packet_id: 1,
            allocations: 0,
            subscriptions: HashMap::new(),
            expiry_interval: 0,
        }
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
        });
        (shared, SessionState::new(rx))
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
            subscription_ids: Vec::new(),
        }
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
