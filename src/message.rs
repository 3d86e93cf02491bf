//! A message as the broker carries it (`Message`, shared by every delivery through an `Arc`), one
//! delivery of it to one session (`Delivery`), where that delivery sits in the store
//! (`QueueRef`), and the states of an outgoing QoS 1 or 2 exchange (`OutState`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::codec::{Properties, QoS};

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
    /// The Server-Sent Event of it (`http::reader::event`), made once for every HTTP reader.
    pub event: std::sync::OnceLock<Bytes>,
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
    pub receipt: std::sync::OnceLock<Arc<crate::receipt::Receipt>>,
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
            event: Default::default(),
            fanout: Default::default(),
            store_id: Default::default(),
            id: 0,
            receipt: std::sync::OnceLock::new(),
            high: AtomicBool::new(false),
        }
    }

    /// Counts an outcome of one of its deliveries on its receipt, if it has one.
    pub fn count(&self, count: crate::receipt::Count) {
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
}

/// A message's place in a session's durable queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRef {
    pub seq: u64,
    pub message_id: u64,
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
