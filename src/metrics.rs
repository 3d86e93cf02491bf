//! Counters behind the log lines and, later, `$SYS` and `/metrics`: plain relaxed atomics,
//! cheap enough for the hot path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
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
}
