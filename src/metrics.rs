//! The figures behind `$SYS` (`sys`) and `/metrics` (`http::prometheus`): relaxed atomic
//! counters and histograms cheap enough for the hot path, and `Snapshot`, the one reading both
//! publish from, so that the two always agree.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    /// Sockets accepted, and open now (including those that have not completed CONNECT).
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    /// Connections hibernating now (idle, their event loop freed).
    pub connections_hibernating: AtomicU64,
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
    /// CONNECTs and HTTP readers refused for naming a session another identity owns.
    pub session_owner_refused: AtomicU64,
    /// `[auth.http]`: calls made, answers taken from the cache, and calls that failed (timeout,
    /// 5xx, unreachable; `on_error` decided).
    pub auth_service_calls: AtomicU64,
    pub auth_service_cached: AtomicU64,
    pub auth_service_errors: AtomicU64,
    /// PUBLISHes, subscriptions and deliveries the ACL refused.
    pub acl_denied_publish: AtomicU64,
    pub acl_denied_subscribe: AtomicU64,
    pub acl_denied_delivery: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// TLS handshakes that resumed a session (a ticket or a session id) instead of a full one.
    pub tls_resumed: AtomicU64,
    /// Connections that waited for one of `mqtt.max_handshakes` and were closed without a
    /// handshake: `connect_timeout` passed, or the client closed its end meanwhile.
    pub handshake_waits_abandoned: AtomicU64,
    /// HTTP connections closed, before their first request head was complete, to make room for
    /// a newer connection when all `[http] max_connections` were taken.
    pub http_evicted: AtomicU64,
    /// HTTP readers (streams) closed because they did not take their events for
    /// `[http.readers] stall_ms`.
    pub http_readers_dropped: AtomicU64,
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
    /// PUBLISHes refused because `cluster.max_pending` appends to JetStream were waiting.
    pub cluster_refused: AtomicU64,
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
