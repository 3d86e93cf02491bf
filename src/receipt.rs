//! A delivery receipt [issue 7]: for one tracked message, what became of it per session (routed,
//! delivered at QoS 0, sent, acknowledged, queued, expired, dropped and by what, undelivered),
//! with acknowledgement times and latency. It hangs off its `Message`, so every place that
//! handles a delivery counts on it with a relaxed atomic add and no lookup; `receipts` indexes
//! them. docs/news-delivery.md explains the model.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde_json::{json, Value};

use crate::clock::wall_ms_now;

/// The user property a publisher names its story with.
pub const STORY_ID: &str = "story-id";
/// The user property Herald adds to a 5.0 PUBACK (and PUBREC) with the message id.
pub const MSG_ID_PROPERTY: &str = "herald-msg-id";
/// The user property with which a 5.0 publisher asks for the receipt on its response topic.
pub const RECEIPT_REQUEST: &str = "herald-receipt";

/// A message id as the API and the PUBACK property show it: 16 hex digits.
pub fn message_id_text(id: u64) -> String {
    format!("{id:016x}")
}

/// What a receipt counts, in order; `COUNTS` names them in the JSON and the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Routed = 0,
    DeliveredQos0,
    Sent,
    Acknowledged,
    Queued,
    Expired,
    DroppedQueueFull,
    DroppedOldest,
    DroppedNew,
    DroppedSuperseded,
    DroppedTooLarge,
    DroppedNotAuthorized,
    /// Normal QoS 0 shed in degraded mode.
    DroppedShed,
    Undelivered,
    Retries,
}

pub const COUNTS: [&str; 15] = [
    "routed",
    "delivered_qos0",
    "sent",
    "acknowledged",
    "queued",
    "expired",
    "queue_full",
    "drop_oldest",
    "drop_new",
    "keep_latest",
    "too_large",
    "not_authorized",
    "degraded",
    "undelivered",
    "retries",
];

/// Upper bounds of the acknowledgement latency buckets, in milliseconds.
pub const ACK_BOUNDS_MS: [u64; 12] = [5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 30_000, 300_000, 3_600_000];

/// A receipt for a message that asked for it on its response topic.
#[derive(Clone, Debug)]
pub struct ReportTo {
    pub response_topic: String,
    pub correlation_data: Option<bytes::Bytes>,
}

pub struct Receipt {
    pub id: u64,
    pub topic: String,
    pub story_id: Option<String>,
    pub qos: u8,
    pub published_ms: u64,
    pub(crate) received_at: Instant,
    counts: [AtomicU32; COUNTS.len()],
    first_ack_ms: AtomicU64,
    last_ack_ms: AtomicU64,
    /// Acknowledgements per latency bucket (`ACK_BOUNDS_MS`), the last for longer.
    ack_latency: [AtomicU32; ACK_BOUNDS_MS.len() + 1],
    /// Changed since the flusher last wrote it.
    pub(crate) dirty: AtomicBool,
    /// Whether the store keeps it (`[receipts] persist`).
    pub persist: AtomicBool,
    pub report_to: Option<ReportTo>,
    pub(crate) reported: AtomicBool,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipt").field("id", &self.id).field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Receipt {
    pub fn new(id: u64, topic: &str, story_id: Option<String>, qos: u8, received_at: Instant) -> Receipt {
        Receipt {
            id,
            topic: topic.to_owned(),
            story_id,
            qos,
            published_ms: crate::clock::wall_ms_of(received_at),
            received_at,
            counts: Default::default(),
            first_ack_ms: AtomicU64::new(0),
            last_ack_ms: AtomicU64::new(0),
            ack_latency: Default::default(),
            dirty: AtomicBool::new(true),
            persist: AtomicBool::new(false),
            report_to: None,
            reported: AtomicBool::new(false),
        }
    }

    pub fn add(&self, count: Count, n: u32) {
        self.counts[count as usize].fetch_add(n, Relaxed);
        self.dirty.store(true, Relaxed);
    }

    pub fn get(&self, count: Count) -> u32 {
        self.counts[count as usize].load(Relaxed)
    }

    /// A subscriber acknowledged its delivery (PUBACK, or PUBCOMP at QoS 2).
    pub fn acknowledged(&self, now: Instant) {
        let ms = wall_ms_now();
        let _ = self.first_ack_ms.compare_exchange(0, ms, Relaxed, Relaxed);
        self.last_ack_ms.fetch_max(ms, Relaxed);
        let latency = now.saturating_duration_since(self.received_at).as_millis() as u64;
        let bucket = ACK_BOUNDS_MS.iter().position(|&b| latency <= b).unwrap_or(ACK_BOUNDS_MS.len());
        self.ack_latency[bucket].fetch_add(1, Relaxed);
        self.add(Count::Acknowledged, 1);
    }

    /// Deliveries with no outcome yet: routed, and not acknowledged, delivered at QoS 0,
    /// expired or dropped.
    pub fn pending(&self) -> u32 {
        let done = [
            Count::Acknowledged,
            Count::DeliveredQos0,
            Count::Expired,
            Count::DroppedQueueFull,
            Count::DroppedOldest,
            Count::DroppedNew,
            Count::DroppedSuperseded,
            Count::DroppedTooLarge,
            Count::DroppedNotAuthorized,
            Count::DroppedShed,
        ];
        self.get(Count::Routed).saturating_sub(done.iter().map(|c| self.get(*c)).sum())
    }

    pub fn dropped(&self) -> u32 {
        (Count::DroppedQueueFull as usize..=Count::DroppedShed as usize).map(|i| self.counts[i].load(Relaxed)).sum()
    }

    /// The acknowledgement latency at quantile `q`, as the upper bound of its bucket (ms).
    fn ack_quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.ack_latency.iter().map(|c| u64::from(c.load(Relaxed))).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(ACK_BOUNDS_MS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }

    pub fn to_json(&self) -> Value {
        let ms = |a: &AtomicU64| match a.load(Relaxed) {
            0 => Value::Null,
            v => Value::from(v),
        };
        let mut dropped_by = serde_json::Map::new();
        let causes = Count::DroppedQueueFull as usize..=Count::DroppedShed as usize;
        for (name, count) in COUNTS[causes.clone()].iter().zip(&self.counts[causes]) {
            dropped_by.insert((*name).to_owned(), Value::from(count.load(Relaxed)));
        }
        json!({
            "id": message_id_text(self.id),
            "topic": self.topic,
            "story_id": self.story_id,
            "qos": self.qos,
            "published_at_ms": self.published_ms,
            "routed": self.get(Count::Routed),
            "delivered_qos0": self.get(Count::DeliveredQos0),
            "sent": self.get(Count::Sent),
            "acknowledged": self.get(Count::Acknowledged),
            "queued": self.get(Count::Queued),
            "expired": self.get(Count::Expired),
            "dropped": self.dropped(),
            "dropped_by": dropped_by,
            "undelivered": self.get(Count::Undelivered),
            "retries": self.get(Count::Retries),
            "pending": self.pending(),
            "first_ack_at_ms": ms(&self.first_ack_ms),
            "last_ack_at_ms": ms(&self.last_ack_ms),
            "ack_latency_ms": {
                "p50": self.ack_quantile(0.50),
                "p90": self.ack_quantile(0.90),
                "p99": self.ack_quantile(0.99),
            },
        })
    }

    /// The record the store keeps: the JSON minus what is derived.
    pub fn encode(&self) -> Vec<u8> {
        let mut counts: Vec<u32> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        counts.extend(self.ack_latency.iter().map(|c| c.load(Relaxed)));
        let v = json!({
            "id": self.id,
            "topic": self.topic,
            "story_id": self.story_id,
            "qos": self.qos,
            "published_ms": self.published_ms,
            "counts": counts,
            "first_ack_ms": self.first_ack_ms.load(Relaxed),
            "last_ack_ms": self.last_ack_ms.load(Relaxed),
        });
        serde_json::to_vec(&v).expect("JSON values serialize")
    }

    pub fn decode(value: &[u8]) -> Option<Receipt> {
        let v: Value = serde_json::from_slice(value).ok()?;
        let published_ms = v["published_ms"].as_u64()?;
        let r = Receipt::new(
            v["id"].as_u64()?,
            v["topic"].as_str()?,
            v["story_id"].as_str().map(str::to_owned),
            v["qos"].as_u64()? as u8,
            crate::clock::instant_of(published_ms),
        );
        let counts = v["counts"].as_array()?;
        for (slot, c) in r.counts.iter().chain(r.ack_latency.iter()).zip(counts) {
            slot.store(c.as_u64()? as u32, Relaxed);
        }
        r.first_ack_ms.store(v["first_ack_ms"].as_u64().unwrap_or(0), Relaxed);
        r.last_ack_ms.store(v["last_ack_ms"].as_u64().unwrap_or(0), Relaxed);
        r.dirty.store(false, Relaxed);
        r.persist.store(true, Relaxed);
        Some(Receipt { published_ms, ..r })
    }
}
