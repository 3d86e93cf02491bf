//! Delivery receipts [issue 7]: for each tracked message, what became of it per session: routed,
//! delivered at QoS 0, sent at QoS 1/2, acknowledged, queued for offline sessions, expired,
//! dropped (and by what), undelivered (handed off), with first and last acknowledgement time and
//! acknowledgement latency. docs/news-delivery.md explains the model.
//!
//! A `Receipt` hangs off its `Message` (`Message::receipt`), so every place that already handles
//! a delivery bumps the receipt's counters with a relaxed atomic add and no lookup. The registry
//! here indexes the receipts by message id and story id, bounded by `[receipts] max_in_memory`,
//! and a flusher task writes the changed ones to the store once a second (kept there for
//! `[receipts] retention`). Story ids also drive deduplication: a PUBLISH whose `story-id` was seen
//! within `[receipts] dedup_window` is acknowledged and not routed again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::clock::wall_ms_now;
use crate::config::ReceiptsConfig;
use crate::receipt::{Receipt, ReportTo, RECEIPT_REQUEST, STORY_ID};

/// The receipts in memory and the story ids seen recently. The receipts are split into shards
/// by message id, each under its own lock, so that publishers on different threads rarely meet
/// (one lock for all cost a third of a QoS 1 fan-in's CPU in futex wake-ups); story ids have a
/// lock of their own, taken only for messages that carry one. Lock order: a shard, then
/// `stories`.
pub struct Receipts {
    pub config: ReceiptsConfig,
    shards: [Mutex<Shard>; SHARDS],
    stories: Mutex<Stories>,
    /// Summaries for /metrics: totals over every receipt.
    pub tracked: AtomicU64,
    pub duplicates: AtomicU64,
}

const SHARDS: usize = 16;

#[derive(Default)]
struct Shard {
    by_id: HashMap<u64, Arc<Receipt>>,
    /// Oldest first, for the `max_in_memory` bound.
    order: VecDeque<u64>,
}

#[derive(Default)]
struct Stories {
    /// Story id to the latest message id that carried it.
    by_story: HashMap<String, u64>,
    /// Story ids seen within the deduplication window: when, and under which message id.
    recent: HashMap<String, (Instant, u64)>,
    recent_order: VecDeque<(Instant, String)>,
}

/// What `Receipts::admit` decided for a new message.
pub enum Admission {
    /// Route it; its receipt, if it is tracked.
    New(Option<Arc<Receipt>>),
    /// A retry of a story already accepted within the window: acknowledge with that message id,
    /// do not route.
    Duplicate(u64),
}

/// Story ids remembered for deduplication at most (the oldest go first beyond this).
const MAX_RECENT_STORIES: usize = 1_000_000;

impl Receipts {
    pub fn new(config: ReceiptsConfig) -> Receipts {
        Receipts {
            config,
            shards: Default::default(),
            stories: Mutex::default(),
            tracked: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Decides whether a message accepted now with `id` is new or a retry of a story, and opens
    /// its receipt if it is tracked (`[receipts] track`).
    /// Cluster mode: a message another node accepted (with that node's id) arrives here. Its
    /// story id joins this node's deduplication window, so that a retry of the story on this
    /// node is recognised; its deliveries here are counted on a receipt of this node under the
    /// same id (found again when the stream delivers the message twice). Never refuses: the
    /// other node accepted it. Receipts of other nodes' messages are not stored.
    pub fn admit_remote(&self, message: &crate::message::Message, now: Instant) -> Option<Arc<Receipt>> {
        if let Some(r) = self.by_id(message.id) {
            return Some(r);
        }
        match self.admit_as(message.id, message, now, true) {
            Admission::New(receipt) => {
                if let Some(r) = &receipt {
                    r.persist.store(false, Relaxed);
                }
                receipt
            }
            // This node accepted the same story meanwhile: both are delivered.
            Admission::Duplicate(_) => None,
        }
    }

    pub fn admit(&self, id: u64, message: &crate::message::Message, now: Instant) -> Admission {
        self.admit_as(id, message, now, false)
    }

    fn admit_as(&self, id: u64, message: &crate::message::Message, now: Instant, remote: bool) -> Admission {
        let story_id = message.properties.user_properties.iter().find(|(k, _)| k == STORY_ID).map(|(_, v)| v.clone());
        let window = std::time::Duration::from_secs(self.config.dedup_window);
        use crate::config::TrackReceipts;
        let track = match self.config.track {
            TrackReceipts::None => false,
            TrackReceipts::All => message.qos as u8 > 0 || self.config.qos0,
            TrackReceipts::Stories => {
                story_id.is_some()
                    || (message.publisher.is_none() && !remote)
                    || self.config.topics.iter().any(|f| crate::topic::filter_matches(f, &message.topic))
            }
        };
        if let (Some(story), false) = (&story_id, window.is_zero()) {
            let mut stories = self.stories.lock().expect("stories lock");
            while stories.recent_order.front().is_some_and(|(t, _)| now.duration_since(*t) > window)
                || stories.recent_order.len() > MAX_RECENT_STORIES
            {
                let (t, s) = stories.recent_order.pop_front().expect("front exists");
                if stories.recent.get(&s).is_some_and(|(seen, _)| *seen == t) {
                    stories.recent.remove(&s);
                }
            }
            if let Some((_, original)) = stories.recent.get(story) {
                self.duplicates.fetch_add(1, Relaxed);
                return Admission::Duplicate(*original);
            }
            stories.recent.insert(story.clone(), (now, id));
            stories.recent_order.push_back((now, story.clone()));
        }
        if !track {
            return Admission::New(None);
        }
        let mut receipt = Receipt::new(id, &message.topic, story_id, message.qos as u8, message.received_at);
        let asked = message.properties.user_properties.iter().any(|(k, _)| k == RECEIPT_REQUEST);
        if let (true, Some(topic)) = (asked, &message.properties.response_topic) {
            receipt.report_to = Some(ReportTo {
                response_topic: topic.clone(),
                correlation_data: message.properties.correlation_data.clone(),
            });
        }
        use crate::config::PersistReceipts;
        let persist = match self.config.persist {
            PersistReceipts::All => true,
            PersistReceipts::Stories => receipt.story_id.is_some() || message.publisher.is_none(),
            PersistReceipts::None => false,
        };
        receipt.persist.store(persist, Relaxed);
        let receipt = Arc::new(receipt);
        self.insert(receipt.clone());
        self.tracked.fetch_add(1, Relaxed);
        Admission::New(Some(receipt))
    }

    fn insert(&self, receipt: Arc<Receipt>) {
        if let Some(story) = &receipt.story_id {
            self.stories.lock().expect("stories lock").by_story.insert(story.clone(), receipt.id);
        }
        let cap = (self.config.max_in_memory / SHARDS).max(1);
        let mut shard = self.shard(receipt.id).lock().expect("receipts lock");
        shard.order.push_back(receipt.id);
        shard.by_id.insert(receipt.id, receipt);
        while shard.order.len() > cap {
            let old = shard.order.pop_front().expect("not empty");
            if let Some(r) = shard.by_id.remove(&old) {
                self.forget_story(&r);
            }
        }
    }

    fn forget_story(&self, r: &Receipt) {
        if let Some(story) = &r.story_id {
            let mut stories = self.stories.lock().expect("stories lock");
            if stories.by_story.get(story) == Some(&r.id) {
                stories.by_story.remove(story);
            }
        }
    }

    /// Puts back receipts read from the store at start (oldest first).
    pub fn restore(&self, mut receipts: Vec<Receipt>) {
        receipts.sort_by_key(|r| r.id);
        for r in receipts {
            self.insert(Arc::new(r));
        }
    }

    /// A receipt by message id (16 hex digits) or by story id.
    pub fn find(&self, key: &str) -> Option<Arc<Receipt>> {
        let id = u64::from_str_radix(key, 16).ok().filter(|_| key.len() == 16);
        if let Some(r) = id.and_then(|id| self.by_id(id)) {
            return Some(r);
        }
        let id = *self.stories.lock().expect("stories lock").by_story.get(key)?;
        self.by_id(id)
    }

    /// The receipt of a message recovered from the store, so that its remaining deliveries
    /// still count.
    pub fn by_id(&self, id: u64) -> Option<Arc<Receipt>> {
        self.shard(id).lock().expect("receipts lock").by_id.get(&id).cloned()
    }

    /// Receipts the store keeps that changed since the last call (their dirty flag cleared),
    /// and ids of those older than the retention, which leave memory.
    pub fn take_changes(&self) -> (Vec<Arc<Receipt>>, Vec<u64>) {
        let retention_ms = self.config.retention.saturating_mul(1000);
        let now_ms = wall_ms_now();
        let mut changed = Vec::new();
        let mut expired = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().expect("receipts lock");
            while let Some(&oldest) = shard.order.front() {
                if !past_retention(shard.by_id.get(&oldest), now_ms, retention_ms) {
                    break;
                }
                shard.order.pop_front();
                if let Some(r) = shard.by_id.remove(&oldest) {
                    self.forget_story(&r);
                }
                expired.push(oldest);
            }
            changed.extend(
                shard.by_id.values().filter(|r| r.persist.load(Relaxed) && r.dirty.swap(false, Relaxed)).cloned(),
            );
        }
        (changed, expired)
    }

    /// Receipts asked for on a response topic whose deliveries are all settled, or that have
    /// waited `report_after`; each is reported once.
    pub fn due_reports(&self, now: Instant) -> Vec<Arc<Receipt>> {
        let after = std::time::Duration::from_secs(self.config.report_after);
        let mut due = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().expect("receipts lock");
            due.extend(
                shard
                    .by_id
                    .values()
                    .filter(|r| r.report_to.is_some() && !r.reported.load(Relaxed))
                    // A moment's grace: a receipt is opened just before its message is routed.
                    .filter(|r| {
                        let age = now.duration_since(r.received_at);
                        (r.pending() == 0 && age >= std::time::Duration::from_millis(200)) || age >= after
                    })
                    .filter(|r| !r.reported.swap(true, Relaxed))
                    .cloned(),
            );
        }
        due
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expect("receipts lock").by_id.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the receipt is gone or older than the retention.
fn past_retention(r: Option<&Arc<Receipt>>, now_ms: u64, retention_ms: u64) -> bool {
    r.is_none_or(|r| now_ms.saturating_sub(r.published_ms) > retention_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;
    use crate::message::Message;
    use crate::receipt::Count;

    fn config() -> ReceiptsConfig {
        ReceiptsConfig { max_in_memory: 16, track: crate::config::TrackReceipts::All, ..ReceiptsConfig::default() }
    }

    fn story(id: &str) -> Message {
        let mut m = Message::new("news/x".into(), bytes::Bytes::from_static(b"s"), QoS::AtLeastOnce, false);
        m.properties.user_properties.push((STORY_ID.into(), id.into()));
        m
    }

    #[test]
    fn counts_pending_and_quantiles() {
        let r = Receipt::new(1, "news/x", None, 1, Instant::now());
        r.add(Count::Routed, 5);
        r.add(Count::DeliveredQos0, 1);
        r.add(Count::DroppedOldest, 1);
        r.acknowledged(Instant::now());
        assert_eq!((r.pending(), r.dropped()), (2, 1));
        let v = r.to_json();
        assert_eq!(
            (v["routed"].as_u64(), v["acknowledged"].as_u64(), v["pending"].as_u64()),
            (Some(5), Some(1), Some(2))
        );
        assert_eq!(v["ack_latency_ms"]["p99"].as_u64(), Some(5));
        assert_eq!(v["dropped_by"]["drop_oldest"], 1);
        let back = Receipt::decode(&r.encode()).unwrap();
        assert_eq!(back.to_json(), v, "the store keeps everything the JSON shows");
    }

    #[test]
    fn a_story_id_within_the_window_is_a_duplicate_and_memory_is_bounded() {
        let receipts = Receipts::new(config());
        let now = Instant::now();
        assert!(matches!(receipts.admit(10, &story("a"), now), Admission::New(Some(_))));
        assert!(matches!(receipts.admit(11, &story("a"), now), Admission::Duplicate(10)));
        assert!(matches!(receipts.admit(12, &story("b"), now), Admission::New(Some(_))));
        assert_eq!(receipts.find("a").unwrap().id, 10);
        assert_eq!(receipts.find(&format!("{:016x}", 12)).unwrap().id, 12);
        for id in 13..(10 + 16 * 3) {
            let m = Message::new("t".into(), bytes::Bytes::new(), QoS::AtLeastOnce, false);
            receipts.admit(id, &m, now);
        }
        assert_eq!(receipts.len(), 16, "max_in_memory: one per shard here");
        assert!(receipts.find("a").is_none(), "evicted with its receipt");
        let qos0 = Message::new("t".into(), bytes::Bytes::new(), QoS::AtMostOnce, false);
        assert!(matches!(receipts.admit(30, &qos0, now), Admission::New(None)), "QoS 0 is not tracked by default");
    }
}
