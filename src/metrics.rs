//! The figures behind `$SYS` (`sys`) and `/metrics` (`http::prometheus`): relaxed atomic
//! counters and histograms cheap enough for the hot path, and `Snapshot`, the one reading both
//! publish from, so that the two always agree.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    /// Sockets accepted, and open now (including those that have not completed CONNECT).
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    /// Clients whose CONNECT succeeded and which are still connected, and the most ever.
    pub clients_connected: AtomicU64,
    pub clients_maximum: AtomicU64,
    /// Sessions that ended because their expiry interval ran out while disconnected.
    pub sessions_expired: AtomicU64,
    /// PUBLISH packets accepted from clients, wills and the HTTP API (not `$SYS` updates).
    pub messages_received: AtomicU64,
    /// Bumped on every read, write and delivery: PUBLISH packets written to clients, MQTT
    /// packets of every kind read and written, and the bytes (`Hot`).
    pub hot: Striped,
    /// QoS 1 and 2 deliveries the subscriber completed (PUBACK, PUBCOMP).
    pub deliveries_acknowledged: AtomicU64,
    /// Deliveries that found a session's queue full.
    pub messages_dropped_queue_full: AtomicU64,
    /// Deliveries larger than the subscriber's maximum packet size [MQTT-3.1.2-25].
    pub messages_dropped_too_large: AtomicU64,
    pub messages_expired: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Messages let go by an offline session's queue: the oldest to make room, the new one
    /// (`drop_new`, or larger than `max_queued_bytes`), or one superseded under `keep_latest`.
    pub queue_dropped_oldest: AtomicU64,
    pub queue_dropped_new: AtomicU64,
    pub queue_superseded: AtomicU64,
    /// CONNECTs refused for their credentials (0x86 / 0x04) or as anonymous (0x87 / 0x05).
    pub auth_failures: AtomicU64,
    /// PUBLISHes, subscriptions and deliveries the ACL refused.
    pub acl_denied_publish: AtomicU64,
    pub acl_denied_subscribe: AtomicU64,
    pub acl_denied_delivery: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub reloads: AtomicU64,
    /// Refusals by limit (docs/security.md): connections over `max_connections`, over
    /// `max_connections_per_ip`, over `connection_rate_per_ip`; subscriptions over
    /// `max_subscriptions_per_client`; PUBLISHes over `publish_rate_per_client`; topics over
    /// `max_topic_length`.
    pub limit_max_connections: AtomicU64,
    pub limit_connections_per_ip: AtomicU64,
    pub limit_connection_rate: AtomicU64,
    pub limit_subscriptions: AtomicU64,
    pub limit_publish_rate: AtomicU64,
    pub limit_topic_length: AtomicU64,
    /// Messages handed off as undelivered (expired or out of retries without an
    /// acknowledgement), QoS 1 resends to 3.1.1 subscribers, and PUBLISHes refused or shed in
    /// degraded mode.
    pub undelivered: AtomicU64,
    pub retries: AtomicU64,
    pub degraded_refused: AtomicU64,
    pub degraded_shed: AtomicU64,
    /// Microseconds from a PUBLISH's arrival to a subscriber's acknowledgement of it.
    pub ack_latency: Histogram<LATENCY_BUCKETS>,
    /// Microseconds from a PUBLISH's arrival to its delivery being written for a subscriber:
    /// every delivery of a message routed to at most 16 sessions, about 16 of a wider one.
    pub delivery_latency: Histogram<LATENCY_BUCKETS>,
    /// Length of an offline session's queue each time a message joins it.
    pub queue_depth: Histogram<DEPTH_BUCKETS>,
}

/// The counters of `Metrics::hot`.
#[derive(Clone, Copy)]
pub enum Hot {
    MessagesSent = 0,
    PacketsReceived = 1,
    PacketsSent = 2,
    BytesReceived = 3,
    BytesSent = 4,
}
const HOT_COUNTERS: usize = 5;

/// Counters bumped so often (per delivery, per read and write) that an atomic
/// read-modify-write on one shared word was measurable (a 1-to-1000 fan-out spent 4% of its
/// CPU on three of them): each thread adds into a stripe of its own with a plain load and
/// store, and a reading sums the stripes. A thread's stripe stays registered after the thread
/// ends, so nothing counted is lost; only the runtime's worker threads bump these.
pub struct Striped {
    /// Tells apart the brokers of one process (tests run several).
    instance: u64,
    stripes: std::sync::Mutex<Vec<std::sync::Arc<Stripe>>>,
}

#[derive(Default)]
#[repr(align(64))]
struct Stripe([AtomicU64; HOT_COUNTERS]);

type StripeCache = std::cell::RefCell<Vec<(u64, std::sync::Arc<Stripe>)>>;

thread_local! {
    static STRIPES: StripeCache = const { std::cell::RefCell::new(Vec::new()) };
}

impl Default for Striped {
    fn default() -> Self {
        static INSTANCES: AtomicU64 = AtomicU64::new(1);
        Self { instance: INSTANCES.fetch_add(1, Relaxed), stripes: Default::default() }
    }
}

impl Striped {
    pub fn add(&self, counter: Hot, n: u64) {
        STRIPES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let stripe = match cache.iter().find(|(id, _)| *id == self.instance) {
                Some((_, s)) => s,
                None => {
                    let s = std::sync::Arc::new(Stripe::default());
                    self.stripes.lock().expect("stripes lock").push(s.clone());
                    cache.push((self.instance, s));
                    &cache.last().expect("just pushed").1
                }
            };
            // Only this thread writes this stripe: no read-modify-write needed.
            let slot = &stripe.0[counter as usize];
            slot.store(slot.load(Relaxed) + n, Relaxed);
        });
    }

    pub fn get(&self, counter: Hot) -> u64 {
        self.stripes.lock().expect("stripes lock").iter().map(|s| s.0[counter as usize].load(Relaxed)).sum()
    }
}

impl Metrics {
    pub fn message_routed(&self, dropped: usize) {
        self.messages_received.fetch_add(1, Relaxed);
        if dropped > 0 {
            self.messages_dropped_queue_full.fetch_add(dropped as u64, Relaxed);
        }
    }

    pub fn queue_dropped(&self, why: crate::session::QueueDrop) {
        use crate::session::QueueDrop;
        let counter = match why {
            QueueDrop::Oldest => &self.queue_dropped_oldest,
            QueueDrop::New => &self.queue_dropped_new,
            QueueDrop::Superseded => &self.queue_superseded,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn connections_now(&self) -> u64 {
        self.connections_open.load(Relaxed)
    }

    pub fn client_connected(&self) {
        let now = self.clients_connected.fetch_add(1, Relaxed) + 1;
        self.clients_maximum.fetch_max(now, Relaxed);
    }

    pub fn client_disconnected(&self) {
        self.clients_connected.fetch_sub(1, Relaxed);
    }

    /// Messages dropped for any reason but expiry: full queues, too large for the client, and
    /// the offline queue policies.
    pub fn publish_dropped(&self) -> u64 {
        [
            &self.messages_dropped_queue_full,
            &self.messages_dropped_too_large,
            &self.queue_dropped_oldest,
            &self.queue_dropped_new,
            &self.queue_superseded,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .sum()
    }
}

/// Upper bounds of the delivery latency buckets, in microseconds (100 us to 60 s).
pub const LATENCY_BUCKETS: usize = 14;
pub const LATENCY_BOUNDS_US: [u64; LATENCY_BUCKETS] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 10_000_000, 60_000_000];
/// Upper bounds of the store commit latency buckets, in microseconds (50 us to 1 s).
pub const COMMIT_BUCKETS: usize = 12;
pub const COMMIT_BOUNDS_US: [u64; COMMIT_BUCKETS] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 250_000, 1_000_000];
/// Upper bounds of the queue depth buckets, in messages.
pub const DEPTH_BUCKETS: usize = 10;
pub const DEPTH_BOUNDS: [u64; DEPTH_BUCKETS] = [1, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000];

/// A histogram of integer observations with fixed bucket bounds, as Prometheus keeps them:
/// per-bucket counts (not cumulative here; `read` makes them so), the count and the sum.
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    /// One more than the bounds: the last is +Inf.
    buckets: [AtomicU64; N],
    above: AtomicU64,
    sum: AtomicU64,
}

impl Default for Histogram<LATENCY_BUCKETS> {
    fn default() -> Self {
        Self::new(&LATENCY_BOUNDS_US)
    }
}

impl Default for Histogram<DEPTH_BUCKETS> {
    fn default() -> Self {
        Self::new(&DEPTH_BOUNDS)
    }
}

impl Default for Histogram<COMMIT_BUCKETS> {
    fn default() -> Self {
        Self::new(&COMMIT_BOUNDS_US)
    }
}

/// A histogram as read at one moment: cumulative counts per upper bound, then the count and
/// sum, in the unit it was observed in.
#[derive(Clone, Debug, Default)]
pub struct HistogramReading {
    pub cumulative: Vec<(u64, u64)>,
    pub count: u64,
    pub sum: u64,
}

impl<const N: usize> Histogram<N> {
    pub fn new(bounds: &'static [u64; N]) -> Self {
        Self {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            above: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        // Two atomic additions: the count is the sum of the buckets, read when scraped.
        match self.bounds.iter().position(|&b| value <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Relaxed),
            None => self.above.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(value, Relaxed);
    }

    pub fn read(&self) -> HistogramReading {
        let mut running = 0;
        let cumulative = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                running += c.load(Relaxed);
                (*b, running)
            })
            .collect();
        let count = running + self.above.load(Relaxed);
        HistogramReading { cumulative, count, sum: self.sum.load(Relaxed) }
    }
}

/// Whether a figure only grows (a counter) or goes up and down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One figure, named in both worlds: its `$SYS` topic (Mosquitto's where Mosquitto has one)
/// and its Prometheus metric name.
#[derive(Clone, Debug)]
pub struct Figure {
    pub sys_topic: &'static str,
    pub metric: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub value: u64,
}

/// Every figure at one moment, read once and rendered by both `$SYS` and `/metrics`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub uptime_secs: u64,
    pub figures: Vec<Figure>,
    pub delivery_latency_us: HistogramReading,
    pub ack_latency_us: HistogramReading,
    pub store_commit_us: HistogramReading,
    pub queue_depth: HistogramReading,
}

impl Snapshot {
    pub fn take(broker: &crate::broker::Broker) -> Snapshot {
        let m = &broker.metrics;
        let c = |a: &AtomicU64| a.load(Relaxed);
        let sessions = broker.session_counts();
        let store = broker.store.stats();
        let (retained, retained_bytes) = {
            let r = broker.retained.read().expect("retained lock");
            (r.len() as u64, r.payload_bytes() as u64)
        };
        let subscriptions = broker.router.read().expect("router lock").len() as u64;
        use Kind::{Counter, Gauge};
        let f = |sys_topic, metric, kind, help, value| Figure { sys_topic, metric, help, kind, value };
        let connected = c(&m.clients_connected);
        let figures = vec![
            f("clients/connected", "herald_clients_connected", Gauge, "Clients connected now.", connected),
            f(
                "clients/disconnected",
                "herald_clients_disconnected",
                Gauge,
                "Persistent sessions whose client is not connected.",
                sessions.total.saturating_sub(sessions.online),
            ),
            f("clients/total", "herald_sessions", Gauge, "Sessions, connected or not.", sessions.total),
            f(
                "clients/maximum",
                "herald_clients_maximum",
                Gauge,
                "Most clients connected at once.",
                c(&m.clients_maximum),
            ),
            f(
                "clients/expired",
                "herald_sessions_expired_total",
                Counter,
                "Sessions ended by their expiry interval.",
                c(&m.sessions_expired),
            ),
            f(
                "connections/total",
                "herald_connections_total",
                Counter,
                "TCP connections accepted.",
                c(&m.connections_total),
            ),
            f(
                "messages/received",
                "herald_packets_received_total",
                Counter,
                "MQTT packets received.",
                m.hot.get(Hot::PacketsReceived),
            ),
            f("messages/sent", "herald_packets_sent_total", Counter, "MQTT packets sent.", m.hot.get(Hot::PacketsSent)),
            f(
                "messages/stored",
                "herald_messages_stored",
                Gauge,
                "Messages held: retained messages plus message bodies kept for persistent sessions.",
                retained + store.stored_messages as u64,
            ),
            f(
                "publish/messages/received",
                "herald_publish_received_total",
                Counter,
                "PUBLISH packets accepted (clients, wills, HTTP).",
                c(&m.messages_received),
            ),
            f(
                "publish/messages/sent",
                "herald_publish_sent_total",
                Counter,
                "PUBLISH packets sent to subscribers.",
                m.hot.get(Hot::MessagesSent),
            ),
            f(
                "publish/messages/dropped",
                "herald_publish_dropped_total",
                Counter,
                "Deliveries dropped: full queues, too large, queue policies.",
                m.publish_dropped(),
            ),
            f(
                "bytes/received",
                "herald_bytes_received_total",
                Counter,
                "Bytes read from clients.",
                m.hot.get(Hot::BytesReceived),
            ),
            f("bytes/sent", "herald_bytes_sent_total", Counter, "Bytes written to clients.", m.hot.get(Hot::BytesSent)),
            f(
                "subscriptions/count",
                "herald_subscriptions",
                Gauge,
                "Subscriptions in the subscription tree.",
                subscriptions,
            ),
            f("retained messages/count", "herald_retained_messages", Gauge, "Retained messages.", retained),
            f(
                "store/messages/count",
                "herald_store_messages",
                Gauge,
                "Same as messages/stored (Mosquitto publishes both).",
                retained + store.stored_messages as u64,
            ),
            f(
                "store/messages/bytes",
                "herald_store_message_bytes",
                Gauge,
                "Payload bytes of retained messages and of offline sessions' queues.",
                retained_bytes + sessions.queued_bytes,
            ),
            f(
                "herald/store/bodies",
                "herald_store_bodies",
                Gauge,
                "Message bodies in the store for persistent sessions (each stored once).",
                store.stored_messages as u64,
            ),
            f(
                "herald/store/disk_bytes",
                "herald_store_disk_bytes",
                Gauge,
                "Bytes of the store's files on disk.",
                broker.store.disk_bytes(),
            ),
            f(
                "herald/queued",
                "herald_queued_messages",
                Gauge,
                "Messages waiting in session queues (mailboxes and offline queues).",
                sessions.queued,
            ),
            f(
                "herald/inflight",
                "herald_inflight_messages",
                Gauge,
                "QoS 1 and 2 messages sent to disconnected sessions and not yet acknowledged.",
                sessions.inflight,
            ),
            f(
                "herald/deliveries/acknowledged",
                "herald_deliveries_acknowledged_total",
                Counter,
                "QoS 1 and 2 deliveries completed by the subscriber.",
                c(&m.deliveries_acknowledged),
            ),
            f(
                "herald/dropped/queue_full",
                "herald_dropped_queue_full_total",
                Counter,
                "Deliveries dropped: the subscriber's queue was full.",
                c(&m.messages_dropped_queue_full),
            ),
            f(
                "herald/dropped/too_large",
                "herald_dropped_too_large_total",
                Counter,
                "Deliveries dropped: larger than the client's maximum packet size.",
                c(&m.messages_dropped_too_large),
            ),
            f(
                "herald/dropped/policy/oldest",
                "herald_dropped_policy_oldest_total",
                Counter,
                "Offline queue: oldest message dropped to make room.",
                c(&m.queue_dropped_oldest),
            ),
            f(
                "herald/dropped/policy/new",
                "herald_dropped_policy_new_total",
                Counter,
                "Offline queue: new message dropped (drop_new or over max_queued_bytes).",
                c(&m.queue_dropped_new),
            ),
            f(
                "herald/dropped/policy/superseded",
                "herald_dropped_policy_superseded_total",
                Counter,
                "Offline queue: message replaced under keep_latest.",
                c(&m.queue_superseded),
            ),
            f(
                "herald/expired",
                "herald_messages_expired_total",
                Counter,
                "Messages whose expiry interval ran out before delivery.",
                c(&m.messages_expired),
            ),
            f(
                "herald/limits/max_connections",
                "herald_limit_max_connections_total",
                Counter,
                "CONNECTs refused by max_connections.",
                c(&m.limit_max_connections),
            ),
            f(
                "herald/limits/connections_per_ip",
                "herald_limit_connections_per_ip_total",
                Counter,
                "CONNECTs refused by max_connections_per_ip.",
                c(&m.limit_connections_per_ip),
            ),
            f(
                "herald/limits/connection_rate",
                "herald_limit_connection_rate_total",
                Counter,
                "CONNECTs refused by connection_rate_per_ip.",
                c(&m.limit_connection_rate),
            ),
            f(
                "herald/limits/subscriptions",
                "herald_limit_subscriptions_total",
                Counter,
                "Subscriptions refused by max_subscriptions_per_client.",
                c(&m.limit_subscriptions),
            ),
            f(
                "herald/limits/publish_rate",
                "herald_limit_publish_rate_total",
                Counter,
                "PUBLISHes refused by publish_rate_per_client.",
                c(&m.limit_publish_rate),
            ),
            f(
                "herald/limits/topic_length",
                "herald_limit_topic_length_total",
                Counter,
                "Topics refused by max_topic_length.",
                c(&m.limit_topic_length),
            ),
            f(
                "herald/auth/failures",
                "herald_auth_failures_total",
                Counter,
                "CONNECTs refused for their credentials.",
                c(&m.auth_failures),
            ),
            f(
                "herald/acl/denied/publish",
                "herald_acl_denied_publish_total",
                Counter,
                "PUBLISHes the ACL refused.",
                c(&m.acl_denied_publish),
            ),
            f(
                "herald/acl/denied/subscribe",
                "herald_acl_denied_subscribe_total",
                Counter,
                "Subscriptions the ACL refused.",
                c(&m.acl_denied_subscribe),
            ),
            f(
                "herald/acl/denied/delivery",
                "herald_acl_denied_delivery_total",
                Counter,
                "Deliveries the ACL stopped.",
                c(&m.acl_denied_delivery),
            ),
            f(
                "herald/tls/handshake_failures",
                "herald_tls_handshake_failures_total",
                Counter,
                "TLS handshakes that failed.",
                c(&m.tls_handshake_failures),
            ),
            f(
                "herald/protocol_errors",
                "herald_protocol_errors_total",
                Counter,
                "Connections closed for a malformed packet or a protocol violation.",
                c(&m.protocol_errors),
            ),
            f(
                "herald/reloads",
                "herald_reloads_total",
                Counter,
                "Successful reloads of auth, limits and certificates.",
                c(&m.reloads),
            ),
            f(
                "herald/receipts/tracked",
                "herald_receipts_tracked_total",
                Counter,
                "Messages given a delivery receipt.",
                broker.receipts.tracked.load(Relaxed),
            ),
            f(
                "herald/receipts/in_memory",
                "herald_receipts_in_memory",
                Gauge,
                "Receipts held in memory (readable through the API).",
                broker.receipts.len() as u64,
            ),
            f(
                "herald/stories/duplicates",
                "herald_story_duplicates_total",
                Counter,
                "PUBLISHes not routed: their story-id was seen within the deduplication window.",
                broker.receipts.duplicates.load(Relaxed),
            ),
            f(
                "herald/undelivered",
                "herald_undelivered_total",
                Counter,
                "Messages handed off as undelivered to a session (expired, or out of retries).",
                c(&m.undelivered),
            ),
            f(
                "herald/retries",
                "herald_retries_total",
                Counter,
                "QoS 1/2 messages sent again with DUP to 3.1.1 subscribers that did not acknowledge.",
                c(&m.retries),
            ),
            f(
                "herald/webhook/failures",
                "herald_webhook_failures_total",
                Counter,
                "Undelivered events the webhook did not take (error, timeout or full queue).",
                broker.webhook_failures.load(Relaxed),
            ),
            f(
                "herald/degraded",
                "herald_degraded",
                Gauge,
                "1 while in degraded mode (normal traffic shed, high priority kept).",
                u64::from(broker.degraded.load(Relaxed)),
            ),
            f(
                "herald/degraded/refused",
                "herald_degraded_refused_total",
                Counter,
                "Normal-priority PUBLISHes refused (0x97) in degraded mode.",
                c(&m.degraded_refused),
            ),
            f(
                "herald/degraded/shed",
                "herald_degraded_shed_total",
                Counter,
                "Normal-priority QoS 0 deliveries shed in degraded mode.",
                c(&m.degraded_shed),
            ),
            f(
                "herald/store/batches",
                "herald_store_batches_total",
                Counter,
                "Store write batches (one WAL write, and one fsync in sync mode, each).",
                store.batches,
            ),
            f(
                "herald/store/writes",
                "herald_store_writes_total",
                Counter,
                "Store writes in those batches.",
                store.writes,
            ),
        ];
        Snapshot {
            uptime_secs: broker.uptime_secs(),
            figures,
            delivery_latency_us: m.delivery_latency.read(),
            ack_latency_us: m.ack_latency.read(),
            store_commit_us: broker.store.commit_latency(),
            queue_depth: m.queue_depth.read(),
        }
    }

    pub fn get(&self, sys_topic: &str) -> Option<u64> {
        self.figures.iter().find(|f| f.sys_topic == sys_topic).map(|f| f.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counters_sum_every_thread_and_keep_instances_apart() {
        let a = std::sync::Arc::new(Striped::default());
        let b = Striped::default();
        a.add(Hot::BytesSent, 5);
        b.add(Hot::BytesSent, 7);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| a.add(Hot::BytesSent, 1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(a.get(Hot::BytesSent), 4005, "ended threads' counts are kept");
        assert_eq!(b.get(Hot::BytesSent), 7);
        assert_eq!(a.get(Hot::PacketsSent), 0);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_includes_overflow() {
        let h = Histogram::new(&DEPTH_BOUNDS);
        for v in [0, 1, 2, 10, 11, 1_000_000] {
            h.observe(v);
        }
        let r = h.read();
        assert_eq!(r.cumulative[0], (1, 2), "0 and 1 are <= 1");
        assert_eq!(r.cumulative[1], (10, 4));
        assert_eq!(r.cumulative[2], (50, 5));
        assert_eq!(r.cumulative.last().unwrap().1, 5, "one above the last bound");
        assert_eq!((r.count, r.sum), (6, 1_000_024));
    }
}
