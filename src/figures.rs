//! The figure table: every figure `$SYS` and `/metrics` show, read once from the broker's
//! accessors into a `Snapshot` that both render, so that they cannot disagree. Each figure is
//! named in both worlds: its `$SYS` topic (Mosquitto's where Mosquitto has one) and its
//! Prometheus metric name.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::broker::Broker;
use crate::metrics::{HistogramReading, Hot};

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
    /// This node's name in cluster mode (`cluster.node`), for /metrics labels.
    pub node: Option<String>,
    pub figures: Vec<Figure>,
    pub delivery_latency_us: HistogramReading,
    pub ack_latency_us: HistogramReading,
    pub store_commit_us: HistogramReading,
    pub queue_depth: HistogramReading,
}

impl Snapshot {
    pub fn take(broker: &Broker) -> Snapshot {
        let m = broker.metrics();
        let c = |a: &AtomicU64| a.load(Relaxed);
        let sessions = broker.session_counts();
        let store = broker.store().stats();
        let (retained, retained_bytes) = broker.retained_figures();
        let (retained, retained_bytes) = (retained as u64, retained_bytes as u64);
        let subscriptions = broker.subscription_count() as u64;
        use Kind::{Counter, Gauge};
        let f = |sys_topic, metric, kind, help, value| Figure { sys_topic, metric, help, kind, value };
        let connected = c(&m.clients_connected);
        let mut figures = vec![
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
                "connections/open",
                "herald_connections_open",
                Gauge,
                "Sockets open on the MQTT listeners, CONNECT accepted or not.",
                c(&m.connections_open),
            ),
            f(
                "connections/hibernating",
                "herald_connections_hibernating",
                Gauge,
                "Connections idle long enough (mqtt.hibernate_after_ms) to have freed their event loop.",
                c(&m.connections_hibernating),
            ),
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
                broker.store().disk_bytes(),
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
                "herald/auth/session_owner_refused",
                "herald_session_owner_refused_total",
                Counter,
                "CONNECTs and HTTP readers refused for naming a session another identity owns.",
                c(&m.session_owner_refused),
            ),
            f(
                "herald/auth/service/calls",
                "herald_auth_service_calls_total",
                Counter,
                "Calls made to the auth service ([auth.http]).",
                c(&m.auth_service_calls),
            ),
            f(
                "herald/auth/service/cached",
                "herald_auth_service_cached_total",
                Counter,
                "Auth service answers taken from the cache.",
                c(&m.auth_service_cached),
            ),
            f(
                "herald/auth/service/errors",
                "herald_auth_service_errors_total",
                Counter,
                "Auth service calls that failed (timeout, error status, unreachable).",
                c(&m.auth_service_errors),
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
                "herald/tls/resumed",
                "herald_tls_resumed_total",
                Counter,
                "TLS handshakes that resumed a session instead of a full handshake.",
                c(&m.tls_resumed),
            ),
            f(
                "herald/handshakes/waits_abandoned",
                "herald_handshake_waits_abandoned_total",
                Counter,
                "Connections closed while waiting for a handshake slot (mqtt.max_handshakes): connect_timeout passed or the client left.",
                c(&m.handshake_waits_abandoned),
            ),
            f(
                "herald/http/evicted",
                "herald_http_evicted_total",
                Counter,
                "HTTP connections closed before their first request, to make room for a newer one.",
                c(&m.http_evicted),
            ),
            f(
                "herald/http/readers_dropped",
                "herald_http_readers_dropped_total",
                Counter,
                "Server-Sent Events streams closed for not reading their events (http.readers.stall_ms).",
                c(&m.http_readers_dropped),
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
                broker.receipts().tracked.load(Relaxed),
            ),
            f(
                "herald/receipts/in_memory",
                "herald_receipts_in_memory",
                Gauge,
                "Receipts held in memory (readable through the API).",
                broker.receipts().len() as u64,
            ),
            f(
                "herald/stories/duplicates",
                "herald_story_duplicates_total",
                Counter,
                "PUBLISHes not routed: their story-id was seen within the deduplication window.",
                broker.receipts().duplicates.load(Relaxed),
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
                broker.webhook_failures().load(Relaxed),
            ),
            f(
                "herald/degraded",
                "herald_degraded",
                Gauge,
                "1 while in degraded mode (normal traffic shed, high priority kept).",
                u64::from(broker.is_degraded()),
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
        if let Some(link) = broker.cluster() {
            let l = &link.figures;
            figures.extend([
                f(
                    "cluster/nats_connected",
                    "herald_cluster_nats_connected",
                    Gauge,
                    "1 while this node is connected to a NATS server.",
                    u64::from(link.is_connected()),
                ),
                f(
                    "cluster/appended",
                    "herald_cluster_appended_total",
                    Counter,
                    "QoS 1 and 2 messages of this node's publishers acknowledged by JetStream.",
                    c(&l.appended),
                ),
                f(
                    "cluster/append_pending",
                    "herald_cluster_append_pending",
                    Gauge,
                    "QoS 1 and 2 messages handed to JetStream and not yet acknowledged by it.",
                    link.pending(),
                ),
                f(
                    "cluster/append_retries",
                    "herald_cluster_append_retries_total",
                    Counter,
                    "Appends to JetStream that failed and were sent again.",
                    c(&l.append_retries),
                ),
                f(
                    "cluster/bursts",
                    "herald_cluster_bursts_total",
                    Counter,
                    "Bursts of QoS 0 copies and of appends handed to NATS together (cluster.linger_ms).",
                    c(&l.bursts),
                ),
                f(
                    "cluster/bundled",
                    "herald_cluster_bundled_total",
                    Counter,
                    "Stories that went to NATS in one message with others for the same nodes.",
                    c(&l.bundled),
                ),
                f(
                    "cluster/refused",
                    "herald_cluster_refused_total",
                    Counter,
                    "PUBLISHes refused because cluster.max_pending appends were waiting.",
                    c(&m.cluster_refused),
                ),
                f(
                    "cluster/qos0_sent",
                    "herald_cluster_qos0_sent_total",
                    Counter,
                    "QoS 0 messages sent to the other nodes over core NATS.",
                    c(&l.sent_qos0),
                ),
                f(
                    "cluster/qos0_dropped",
                    "herald_cluster_qos0_dropped_total",
                    Counter,
                    "QoS 0 messages not sent to the other nodes (NATS unreachable or its queue full).",
                    c(&l.dropped_qos0),
                ),
                f(
                    "cluster/retained_dropped",
                    "herald_cluster_retained_dropped_total",
                    Counter,
                    "Retained messages not written to the cluster's bucket (its queue full).",
                    c(&l.dropped_retained),
                ),
                f(
                    "cluster/received",
                    "herald_cluster_received_total",
                    Counter,
                    "Messages received from the other nodes and routed here.",
                    c(&l.received),
                ),
                f(
                    "cluster/log_processed",
                    "herald_cluster_log_processed",
                    Gauge,
                    "The last sequence of the cluster's stream routed here.",
                    link.processed(),
                ),
                f(
                    "cluster/log_lag",
                    "herald_cluster_log_lag",
                    Gauge,
                    "Stream messages not yet delivered to this node, as of the last one it received.",
                    c(&l.log_lag),
                ),
                f(
                    "cluster/checkpoint",
                    "herald_cluster_checkpoint",
                    Gauge,
                    "Stream sequence below which this node's sessions need nothing more (docs/cluster.md).",
                    link.checkpointed(),
                ),
                f(
                    "cluster/checkpoints",
                    "herald_cluster_checkpoints_total",
                    Counter,
                    "Checkpoints taken (four a second).",
                    c(&l.checkpoints),
                ),
                f(
                    "cluster/sessions_adopted",
                    "herald_cluster_sessions_adopted_total",
                    Counter,
                    "Sessions taken over from another node when their client connected here.",
                    c(&l.adopted),
                ),
                f(
                    "cluster/not_sent",
                    "herald_cluster_not_sent_total",
                    Counter,
                    "Messages published here that no other node wanted (interest): QoS 0 not sent, QoS 1/2 appended for no one.",
                    c(&l.not_sent),
                ),
                f(
                    "cluster/append_reordered",
                    "herald_cluster_append_reordered_total",
                    Counter,
                    "QoS 1/2 appends JetStream stored after a later one of this node (a resend after a failure): order lost.",
                    c(&l.append_reordered),
                ),
                f(
                    "cluster/qos2_unrecorded",
                    "herald_cluster_qos2_unrecorded_total",
                    Counter,
                    "QoS 2 messages a client received whose record for a takeover could not be written (append queue full): they may come again if this node dies.",
                    c(&l.qos2_unrecorded),
                ),
                f(
                    "cluster/fenced",
                    "herald_cluster_fenced_total",
                    Counter,
                    "Times this node's lease lapsed (paused or cut off for dead_after_secs) and it was fenced.",
                    c(&l.fenced),
                ),
                f(
                    "cluster/fenced_sessions",
                    "herald_cluster_fenced_sessions_total",
                    Counter,
                    "Sessions ended here on coming back because another node had taken them over meanwhile.",
                    c(&l.fenced_sessions),
                ),
                f(
                    "cluster/nodes_up",
                    "herald_cluster_nodes_up",
                    Gauge,
                    "Nodes heard from in the last 3 seconds, this one included.",
                    link.nodes_up(std::time::Duration::from_secs(3)) as u64,
                ),
                f(
                    "cluster/directory_sessions",
                    "herald_cluster_directory_sessions",
                    Gauge,
                    "Persistent sessions in the cluster's directory, every node's.",
                    link.directory_sessions() as u64,
                ),
            ]);
        }
        Snapshot {
            uptime_secs: broker.uptime_secs(),
            node: broker.config().cluster.as_ref().map(|c| c.node.clone()),
            figures,
            delivery_latency_us: m.delivery_latency.read(),
            ack_latency_us: m.ack_latency.read(),
            store_commit_us: broker.store().commit_latency(),
            queue_depth: m.queue_depth.read(),
        }
    }

    pub fn get(&self, sys_topic: &str) -> Option<u64> {
        self.figures.iter().find(|f| f.sys_topic == sys_topic).map(|f| f.value)
    }
}
