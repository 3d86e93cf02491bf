//! Configuration: TOML read with serde, every key with a default, unknown keys refused, and
//! `validate()` naming the key of any value out of range.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration in {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: `{key}` {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listeners")]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub mqtt: Mqtt,
    #[serde(default)]
    pub log: Log,
    /// Overflow policies of offline session queues, by topic filter; the first that matches a
    /// message's topic applies, and `drop_oldest` when none does.
    #[serde(default)]
    pub queue_policy: Vec<QueuePolicyRule>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub sys: Sys,
    /// The HTTP admin API and /metrics; off when absent.
    #[serde(default)]
    pub http: Option<Http>,
    #[serde(default)]
    pub shutdown: Shutdown,
    /// TLS session resumption, for every TLS listener.
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub receipts: ReceiptsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Priority classes by topic filter, first match wins; other topics are normal.
    #[serde(default)]
    pub priority: Vec<PriorityRule>,
    #[serde(default)]
    pub degraded: DegradedConfig,
    /// Cluster mode on NATS JetStream (docs/cluster.md); one node with its own store when absent.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// The file this configuration was read from, for reloads; not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[cluster]`: this node's name and the NATS servers the nodes share (docs/cluster.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster: messages carry it so that a node does not route
    /// its own messages twice.
    pub node: String,
    /// NATS server URLs (`nats://host:port`); the client reconnects to any of them.
    pub nats: Vec<String>,
    /// The JetStream stream holding QoS 1 and 2 messages.
    #[serde(default = "default_cluster_stream")]
    pub stream: String,
    /// Replicas of the stream (at most the number of NATS servers; 3 survives one server's death).
    #[serde(default = "default_cluster_replicas")]
    pub replicas: usize,
    /// How long the stream keeps a message, in seconds.
    #[serde(default = "default_cluster_max_age")]
    pub max_age_secs: u64,
    /// QoS 1 and 2 messages handed to JetStream and not yet acknowledged by it; a PUBLISH that
    /// finds this many waiting is refused (5.0: 0x97) rather than queued without bound.
    #[serde(default = "default_cluster_max_pending")]
    pub max_pending: usize,
    /// How long a story for the other nodes waits for others to go with it, in milliseconds:
    /// a QoS 0 copy, or a QoS 1/2 append (its PUBACK waits that much longer). 0: each goes at
    /// once. At a few thousand stories a second, each crossing alone costs both nodes their
    /// threads' wake-ups; gathered, a burst costs them once (docs/cluster.md, "What it costs").
    #[serde(default = "default_cluster_linger_ms")]
    pub linger_ms: u64,
    /// How long a QoS 1 or 2 PUBLISH waits for JetStream while NATS is unreachable before its
    /// publisher is refused (5.0: 0x80; 3.1.1: disconnected without an acknowledgement).
    #[serde(default = "default_cluster_hold_secs")]
    pub hold_secs: u64,
    /// A node not heard from for this long is taken for dead: its sessions are spread over the
    /// live nodes, each taking over its share (their expiry and wills).
    #[serde(default = "default_cluster_dead_after_secs")]
    pub dead_after_secs: u64,
    /// The address clients reach this node at (`host:port`), told to the other nodes: an MQTT 5
    /// client of a node that shuts down gets another node's as the DISCONNECT's Server
    /// Reference. Unset: none is given.
    pub advertise: Option<String>,
}

fn default_cluster_linger_ms() -> u64 {
    5
}

fn default_cluster_dead_after_secs() -> u64 {
    10
}

fn default_cluster_hold_secs() -> u64 {
    // Longer than a stream leader's election (5-9 s measured, more on a loaded machine): a
    // NATS server's death must not refuse publishers.
    30
}

fn default_cluster_stream() -> String {
    "HERALD_MSGS".into()
}

fn default_cluster_replicas() -> usize {
    3
}

fn default_cluster_max_age() -> u64 {
    86_400
}

fn default_cluster_max_pending() -> usize {
    10_000
}

/// Delivery receipts and story deduplication (docs/news-delivery.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsConfig {
    /// Which messages get a receipt: "stories" (a `story-id` user property, the HTTP API, or a
    /// topic matching `topics`), "all" (every QoS 1 and 2 message, and QoS 0 with `qos0`;
    /// costs about 1 us of CPU per message, docs/benchmarks.md), or "none".
    pub track: TrackReceipts,
    /// Topic filters whose messages are tracked as stories even without a `story-id`.
    pub topics: Vec<String>,
    /// With `track = "all"`, QoS 0 messages too.
    pub qos0: bool,
    /// Receipts held in memory (and so readable), the newest.
    pub max_in_memory: usize,
    /// Seconds a receipt is kept (in memory and in the store) after its message was published.
    pub retention: u64,
    /// Which receipts the store keeps: "stories" (messages with a `story-id` user property or
    /// published through the HTTP API), "all", or "none". Every tracked receipt is in memory.
    pub persist: PersistReceipts,
    /// Seconds within which a PUBLISH with a `story-id` seen before is a duplicate; 0: off.
    pub dedup_window: u64,
    /// Seconds after which a receipt asked for on a response topic is sent even if deliveries
    /// are still pending.
    pub report_after: u64,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        Self {
            track: TrackReceipts::Stories,
            topics: Vec::new(),
            qos0: false,
            max_in_memory: 100_000,
            retention: 86_400,
            persist: PersistReceipts::Stories,
            dedup_window: 600,
            report_after: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackReceipts {
    Stories,
    All,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersistReceipts {
    Stories,
    All,
    None,
}

/// Retries for 3.1.1 subscribers and the hand-off of undelivered messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Seconds a 3.1.1 subscriber has to acknowledge a QoS 1/2 message before it is sent again
    /// with DUP; the wait doubles after each retry. 0: no retries.
    pub retry_after: u64,
    pub max_retries: u32,
    /// Of a client's receive window, the in-flight messages kept for high-priority messages
    /// (at most half the window): normal ones stop short of it.
    pub high_priority_inflight: usize,
    /// An http:// or https:// URL that gets a POST with each undelivered message (JSON).
    pub webhook: Option<String>,
    /// Events waiting for the webhook at most; beyond it they are dropped and counted.
    pub webhook_queue: usize,
    /// PEM CA certificates an https webhook's certificate may chain to, besides Mozilla's roots.
    pub webhook_ca_file: Option<PathBuf>,
    /// Times an event is posted again after a failure (a connection error, a timeout, a 5xx or
    /// 429), waiting 0.5 s, 1 s, 2 s, ... in between; then it is counted as failed.
    pub webhook_retries: u32,
    /// Milliseconds one POST may take.
    pub webhook_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            retry_after: 30,
            max_retries: 2,
            high_priority_inflight: 10,
            webhook: None,
            webhook_queue: 10_000,
            webhook_ca_file: None,
            webhook_retries: 3,
            webhook_timeout_ms: 5000,
        }
    }
}

/// `[[priority]] filter = "news/breaking/#"`, `class = "high"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityRule {
    pub filter: String,
    pub class: PriorityClass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PriorityClass {
    High,
    #[default]
    Normal,
}

/// When Herald sheds normal traffic to keep high-priority traffic flowing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DegradedConfig {
    /// Enter degraded mode above this many messages waiting in session queues; 0: no bound.
    pub max_queued_messages: u64,
    /// Enter degraded mode above this resident memory in MiB; 0: no bound.
    pub max_memory_mb: u64,
    /// Leave it when every measure is below this fraction of its bound.
    pub recover_at: f64,
    /// Stay in it at least this long (ms) once entered.
    pub min_duration_ms: u64,
}

impl Default for DegradedConfig {
    fn default() -> Self {
        Self { max_queued_messages: 0, max_memory_mb: 0, recover_at: 0.8, min_duration_ms: 1000 }
    }
}

/// The `$SYS` tree (docs/operations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sys {
    /// Seconds between publications of `$SYS`; 0 turns `$SYS` off.
    pub interval: u64,
}

impl Default for Sys {
    fn default() -> Self {
        Self { interval: 10 }
    }
}

/// The HTTP server: /metrics, /healthz, /readyz and the admin API (docs/http-api.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub bind: String,
    /// The bearer token every request but /healthz and /readyz must carry. Required when `bind`
    /// is not a loopback address; optional (and then enforced) on loopback.
    #[serde(default)]
    pub token: Option<String>,
    /// HTTP connections open at once. When all are taken, the oldest connection that has not yet
    /// sent a whole request head is closed to make room, so a slow client cannot starve /healthz.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// Milliseconds a connection has to send a request head, from its first byte or from the end
    /// of its previous response; also the idle timeout between requests.
    #[serde(default = "default_http_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Milliseconds a request's body has to arrive, once its head has.
    #[serde(default = "default_http_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// The listen backlog of the HTTP port.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// Largest request head (request line and headers); larger: 431.
    #[serde(default = "default_http_max_head_bytes")]
    pub max_head_bytes: usize,
    /// Largest request body (a publish of a large story, base64 in JSON); larger: 413.
    #[serde(default = "default_http_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Delivery over HTTP (`/api/v1/stream`, `/api/v1/poll`; docs/http-api.md).
    #[serde(default)]
    pub readers: Readers,
}

/// `[http.readers]`: Server-Sent Events streams and long polls. Each is a session like an MQTT
/// connection's, so the MQTT limits (`[limits]`, `mqtt.max_queued_messages`) bound them too;
/// these bound what is HTTP's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Readers {
    /// Seconds between heartbeat comments on an idle stream, so that proxies keep it open.
    pub heartbeat_secs: u64,
    /// The `retry:` a stream announces: milliseconds a browser waits before reconnecting.
    pub retry_ms: u64,
    /// Events written to a stream and not yet taken by its socket; a stream whose buffer stays
    /// full for `stall_ms` is closed and counted (`herald_http_readers_dropped_total`).
    pub buffer_events: usize,
    pub stall_ms: u64,
    /// Deliveries of a persistent stream or poll kept until the reader confirms them (a
    /// `Last-Event-ID`, a poll's `after`), to be sent again when it does not. Older ones count
    /// as received.
    pub window: usize,
    /// Session expiry of a stream or poll that names its `client_id`, in seconds.
    pub session_expiry_secs: u32,
    /// Session expiry of a poller that names no `client_id` (its cursor names its session).
    pub poll_session_expiry_secs: u32,
    /// Longest `wait` a long poll may ask for, in seconds.
    pub poll_max_wait_secs: u64,
    /// Most messages in one poll answer.
    pub poll_max_messages: usize,
}

impl Default for Readers {
    fn default() -> Self {
        Readers {
            heartbeat_secs: 15,
            retry_ms: 3000,
            buffer_events: 1024,
            stall_ms: 10_000,
            window: 100,
            session_expiry_secs: 3600,
            poll_session_expiry_secs: 60,
            poll_max_wait_secs: 30,
            poll_max_messages: 1000,
        }
    }
}

fn default_http_max_head_bytes() -> usize {
    16 * 1024
}

fn default_http_max_body_bytes() -> usize {
    8 * 1024 * 1024
}

fn default_http_max_connections() -> usize {
    256
}

fn default_http_header_timeout_ms() -> u64 {
    10_000
}

fn default_http_body_timeout_ms() -> u64 {
    30_000
}

impl Http {
    pub fn is_loopback(&self) -> bool {
        self.bind.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
    }
}

/// `[tls]`: how a returning client resumes its TLS session without a full handshake
/// (docs/security.md, "TLS session resumption").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A secret of at least 32 bytes from which the session ticket keys are derived; every node
    /// of a cluster given the same file resumes the others' sessions, also after a restart.
    /// Without it, each process makes random keys (resumption on the same process only).
    pub ticket_key_file: Option<PathBuf>,
    /// Ticket keys rotate this often; a ticket opens for one to two periods.
    pub ticket_rotate_secs: u64,
    /// TLS sessions remembered by the server for clients that resume by session id rather
    /// than by ticket (TLS 1.2 clients without ticket support); the oldest are forgotten.
    pub session_cache: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { ticket_key_file: None, ticket_rotate_secs: 6 * 3600, session_cache: 4096 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// Seconds between SIGTERM/SIGINT and exit: connections are asked to close at once, and
    /// the store is flushed and closed once they have, or when this runs out.
    pub grace_period: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { grace_period: 10 }
    }
}

/// Limits against abuse and overload (docs/security.md), reloaded on SIGHUP. 0 turns a limit
/// off; each has a reason code and a counter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections open at once; beyond: CONNACK 0x89 server busy (3.1.1: 0x03).
    pub max_connections: usize,
    /// Connections open at once from one IP address; beyond: CONNACK 0x97 quota exceeded (0x03).
    pub max_connections_per_ip: usize,
    /// CONNECTs per second from one IP address; beyond: CONNACK 0x9F connection rate exceeded (0x03).
    pub connection_rate_per_ip: u32,
    /// Subscriptions one session may hold; beyond: SUBACK 0x97 (3.1.1: 0x80) for the excess filters.
    pub max_subscriptions_per_client: usize,
    /// PUBLISHes per second from one client; beyond: dropped, PUBACK/PUBREC 0x97 for 5.0 QoS 1/2.
    pub publish_rate_per_client: u32,
    /// Bytes in a topic name or filter; longer: as `max_topic_levels`.
    pub max_topic_length: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 0,
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            max_subscriptions_per_client: 0,
            publish_rate_per_client: 0,
            max_topic_length: 65_535,
        }
    }
}

/// Who may connect and what they may do (docs/security.md). Reloaded on SIGHUP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether clients without credentials may connect. Unset: only on loopback listeners.
    pub allow_anonymous: Option<bool>,
    /// A Mosquitto-format password file (`user:$7$...` lines), managed by `herald passwd`.
    pub password_file: Option<PathBuf>,
    /// A Mosquitto-format ACL file; once given, what it does not allow is denied.
    pub acl_file: Option<PathBuf>,
    pub jwt: Option<JwtConfig>,
    /// The site's own auth service (`[auth.http]`), asked about credentials that neither the
    /// password file nor the JWT settings take.
    pub http: Option<AuthHttpConfig>,
    /// Whether a persistent session belongs to the identity that made it: a CONNECT or HTTP
    /// reader naming a session of another identity is refused (docs/security.md).
    #[serde(default = "yes")]
    pub session_owner: bool,
}

fn yes() -> bool {
    true
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            jwt: None,
            http: None,
            session_owner: true,
        }
    }
}

/// What `[auth.http]` does when the service cannot answer (timeout, 5xx, unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Refuse the client (CONNACK 0x86 / 0x04, HTTP 401).
    #[default]
    Deny,
    /// Admit the client as anonymous (the ACL's anonymous rules; its sessions belong to
    /// "anonymous"), never as the user it claims to be.
    Allow,
}

/// The site's auth service: Herald POSTs a client's credentials as JSON and the service says
/// who the client is (docs/security.md, "The site's auth service").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthHttpConfig {
    /// `http://` or `https://` URL the credentials are POSTed to.
    pub url: String,
    /// The longest a CONNECT waits for the service, queueing for a call included.
    #[serde(default = "default_auth_timeout_ms")]
    pub timeout_ms: u64,
    /// How long an answer (allowed or refused) is reused for the same credentials; 0: never.
    #[serde(default = "default_auth_cache_secs")]
    pub cache_secs: u64,
    /// Answers kept at most in the cache.
    #[serde(default = "default_auth_cache_entries")]
    pub cache_entries: usize,
    /// Calls to the service running at once at most; more CONNECTs wait (within `timeout_ms`).
    #[serde(default = "default_auth_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default)]
    pub on_error: OnError,
    /// PEM certificates of a private CA for an `https://` service (Mozilla's roots otherwise).
    pub ca_file: Option<PathBuf>,
}

fn default_auth_timeout_ms() -> u64 {
    2000
}
fn default_auth_cache_secs() -> u64 {
    60
}
fn default_auth_cache_entries() -> usize {
    100_000
}
fn default_auth_max_in_flight() -> usize {
    64
}

/// JSON Web Tokens accepted as the CONNECT password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub hs256_secret: Option<String>,
    /// PEM file of the issuer's RSA public key.
    pub rs256_public_key: Option<PathBuf>,
    /// An identity provider's published key set (`https://`): RS256, ES256 and EdDSA keys by
    /// `kid`, fetched at start, every `jwks_refresh_secs`, and on a token with an unknown `kid`
    /// (at most once per `jwks_refresh_secs`).
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh_secs")]
    pub jwks_refresh_secs: u64,
    /// PEM certificates of a private CA for `jwks_url` (Mozilla's roots otherwise).
    pub ca_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim (one of), when set.
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    #[serde(default)]
    pub leeway_secs: u64,
    /// The claim taken as the user name.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
}

fn default_jwks_refresh_secs() -> u64 {
    300
}

fn default_username_claim() -> String {
    "sub".into()
}

/// What a persistent session's acknowledgements promise on a crash (docs/storage.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged once in the write-ahead log and fsynced: survives a power cut.
    #[default]
    Sync,
    /// Acknowledged once in the write-ahead log, not fsynced: survives a crash of the broker,
    /// not of the machine.
    Wal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuePolicyRule {
    pub filter: String,
    /// `drop_oldest` or `drop_new`; give this or `keep_latest`.
    pub policy: Option<OverflowPolicyName>,
    /// Keep at most this many queued messages per topic, the latest.
    pub keep_latest: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicyName {
    DropOldest,
    DropNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerProtocol {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ListenerProtocol::Mqtt => "mqtt",
            ListenerProtocol::Mqtts => "mqtts",
            ListenerProtocol::Ws => "ws",
            ListenerProtocol::Wss => "wss",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub protocol: ListenerProtocol,
    pub bind: String,
    /// PEM certificate chain and private key (`mqtts`, `wss`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM CA certificates that client certificates are checked against.
    pub ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `ca`.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Take a client certificate's common name as the user name (no password needed).
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// WebSocket: the Origin headers accepted; empty accepts any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// WebSocket: the HTTP path.
    #[serde(default = "default_ws_path")]
    pub path: String,
    /// Connections the kernel may hold completed but not yet accepted (`listen(2)`'s backlog,
    /// capped by `net.core.somaxconn`). A reconnect storm beyond it waits for SYN retries.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

pub fn default_backlog() -> u32 {
    1024
}

impl Listener {
    pub fn plain(bind: &str) -> Listener {
        Listener {
            protocol: ListenerProtocol::Mqtt,
            bind: bind.into(),
            cert: None,
            key: None,
            ca: None,
            require_client_cert: false,
            use_identity_as_username: false,
            allowed_origins: Vec::new(),
            path: default_ws_path(),
            backlog: default_backlog(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.protocol, ListenerProtocol::Mqtts | ListenerProtocol::Wss)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    #[serde(default)]
    pub durability: Durability,
    /// Restored sessions whose queue is read from the store at the same time when they come
    /// back after a restart; the others wait their turn (a reconnection storm takes this many
    /// blocking threads, not one per phone).
    #[serde(default = "default_queue_readers")]
    pub queue_readers: usize,
    /// MB of RocksDB's cache of table blocks, shared by the store's column families.
    #[serde(default = "default_block_cache_mb")]
    pub block_cache_mb: usize,
}

fn default_block_cache_mb() -> usize {
    8
}

fn default_queue_readers() -> usize {
    16
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            path: default_storage_path(),
            durability: Durability::default(),
            queue_readers: default_queue_readers(),
            block_cache_mb: default_block_cache_mb(),
        }
    }
}

/// Protocol limits. The defaults of `receive_maximum` and `topic_alias_maximum` are Mosquitto's,
/// so a CONNACK of ours carries the same properties as one of Mosquitto's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    /// Largest packet accepted from a client, in bytes; above the protocol maximum is refused.
    pub max_packet_size: u32,
    /// How many QoS 2 PUBLISHes a 5.0 client may have unacknowledged towards us [MQTT-3.3.4-9].
    pub receive_maximum: u16,
    /// How many topic aliases a 5.0 client may use towards us; 0 turns them off.
    pub topic_alias_maximum: u16,
    /// The longest keep-alive a 5.0 client is allowed, in seconds; longer or 0 is replaced by this
    /// value, reported as Server Keep Alive. 0 disables the maximum.
    pub max_keepalive: u16,
    /// Outgoing QoS 1 and 2 messages in flight for a client that states no Receive Maximum (3.1.1).
    pub max_inflight_messages: u16,
    /// Bound of each session's queue of routed messages. While the session is connected a full
    /// queue holds publishers back (see `max_publish_wait_ms`); while it is offline the queue
    /// policy of the message's topic decides what is dropped, and the drop is counted.
    pub max_queued_messages: usize,
    /// Bound of the payload bytes queued for an offline session; 0 for no bound but the count.
    pub max_queued_bytes: usize,
    /// Seconds a new socket has to send its CONNECT.
    pub connect_timeout: u64,
    /// Bytes encoded for one client and not yet taken by its socket above which its session
    /// stops draining its queue and its input is not read until the socket takes some.
    pub max_outbound_bytes: usize,
    /// Topic names whose match results are cached; 0 turns the cache off.
    pub match_cache_size: usize,
    /// Longest a publisher's QoS 1 or 2 message waits for room in a connected subscriber's full
    /// queue, in milliseconds, before it is dropped for that subscriber (which is then marked
    /// congested and no longer waited for until it drains).
    pub max_publish_wait_ms: u64,
    /// Most levels in a topic name or filter; deeper PUBLISHes are refused (5.0: DISCONNECT 0x90)
    /// and deeper filters get SUBACK 0x8F (3.1.1: 0x80).
    pub max_topic_levels: usize,
    /// Most retained messages waiting to be sent to one session after its SUBSCRIBEs; beyond it
    /// further retained messages for that session are dropped and counted.
    pub max_pending_retained: usize,
    /// Largest first packet (the CONNECT, will and credentials included) a new socket may send,
    /// in bytes: before it is authenticated a socket is a stranger's, so it gets a small bound
    /// rather than `max_packet_size`. Larger: the socket is closed.
    pub max_connect_packet_size: u32,
    /// After Herald closes a connection with a DISCONNECT or refusing CONNACK, it stops sending
    /// and reads and discards what the client still sends for at most this many milliseconds
    /// (or until the client closes), so the close does not turn into a TCP reset that destroys
    /// the reason code before the client reads it. 0 closes at once.
    pub close_linger_ms: u64,
    /// Bytes of TLS records rustls holds on their way to a client that is slow to read (at most
    /// one write's worth is taken while any are waiting). WebSocket framing holds none: a frame
    /// header and one pong at most.
    pub edge_buffer_bytes: usize,
    /// TLS handshakes whose costly step (key exchange, signature) may wait to be computed at
    /// once; the others wait their turn, first come first served, within `connect_timeout`
    /// (docs/security.md, "A reconnect storm"). 0: no bound.
    pub max_handshakes: usize,
    /// A connection with nothing in flight, queued or half-read for this long hibernates: it
    /// gives up the state of its event loop and buffers and waits in a small future for input, a
    /// delivery, a kick or its keep-alive deadline (docs/architecture.md). 0: never.
    pub hibernate_after_ms: u64,
}

impl Default for Mqtt {
    fn default() -> Self {
        Self {
            max_packet_size: crate::codec::wire::VARINT_MAX + 5,
            receive_maximum: 20,
            topic_alias_maximum: 10,
            max_keepalive: 60,
            max_inflight_messages: 100,
            max_queued_messages: 1000,
            max_queued_bytes: 0,
            connect_timeout: 10,
            max_outbound_bytes: 1 << 20,
            match_cache_size: 10_000,
            max_publish_wait_ms: 2000,
            max_topic_levels: 128,
            max_pending_retained: 1_000_000,
            max_connect_packet_size: 65_536,
            close_linger_ms: 1_000,
            edge_buffer_bytes: 64 * 1024,
            max_handshakes: 16,
            hibernate_after_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A tracing filter such as "info" or "herald=debug"; RUST_LOG overrides it.
    pub level: String,
    /// "text" (one human-readable line per event) or "json" (one JSON object per line).
    pub format: LogFormat,
    /// Most INFO lines per second about clients connecting and disconnecting (and WARN lines
    /// about one client's repeated limits); beyond it lines are counted, not written, and one
    /// line a second says how many were left out. Metrics count every event. 0: no bound.
    pub connection_lines_per_second: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Log {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text, connection_lines_per_second: 100 }
    }
}

fn default_listeners() -> Vec<Listener> {
    vec![Listener::plain("127.0.0.1:1883")]
}

fn default_storage_path() -> PathBuf {
    PathBuf::from("data")
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listeners: default_listeners(),
            storage: Storage::default(),
            mqtt: Mqtt::default(),
            log: Log::default(),
            queue_policy: Vec::new(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            sys: Sys::default(),
            http: None,
            shutdown: Shutdown::default(),
            tls: TlsConfig::default(),
            receipts: ReceiptsConfig::default(),
            delivery: DeliveryConfig::default(),
            priority: Vec::new(),
            degraded: DegradedConfig::default(),
            cluster: None,
            source: None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.into(), message },
            other => other,
        })?;
        config.source = Some(path.into());
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if let Some(c) = &self.cluster {
            if c.node.is_empty() || !c.node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return invalid("cluster.node", "must be a non-empty name of letters, digits, '-' and '_'");
            }
            if c.nats.is_empty() {
                return invalid("cluster.nats", "must name at least one NATS server");
            }
            if c.stream.is_empty() || !c.stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return invalid("cluster.stream", "must be a name of letters, digits, '-' and '_'");
            }
            if !(1..=5).contains(&c.replicas) {
                return invalid("cluster.replicas", "must be between 1 and 5 (JetStream's limit)");
            }
            if c.dead_after_secs < 3 {
                return invalid(
                    "cluster.dead_after_secs",
                    "must be at least 3 (nodes say they are alive once a second)",
                );
            }
            if c.hold_secs == 0 {
                return invalid("cluster.hold_secs", "must be at least 1");
            }
            if c.max_pending == 0 {
                return invalid("cluster.max_pending", "must be at least 1");
            }
            if c.linger_ms > 1000 {
                return invalid("cluster.linger_ms", "must be at most 1000 (a PUBACK waits for it)");
            }
        }
        if self.listeners.is_empty() {
            return invalid("listeners", "must name at least one listener");
        }
        for l in &self.listeners {
            if l.bind.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    key: "listeners.bind",
                    message: format!("{:?} is not an address:port", l.bind),
                });
            }
            if l.is_tls() && (l.cert.is_none() || l.key.is_none()) {
                return Err(ConfigError::Invalid {
                    key: "listeners.cert",
                    message: format!("listener {} is TLS and needs `cert` and `key`", l.bind),
                });
            }
            if (l.require_client_cert || l.use_identity_as_username) && l.ca.is_none() {
                return Err(ConfigError::Invalid {
                    key: "listeners.ca",
                    message: format!("listener {} checks client certificates and needs `ca`", l.bind),
                });
            }
        }
        if let Some(j) = &self.auth.jwt {
            if j.hs256_secret.is_some() && j.rs256_public_key.is_some() {
                return invalid("auth.jwt", "takes at most one of hs256_secret and rs256_public_key");
            }
            if j.hs256_secret.is_none() && j.rs256_public_key.is_none() && j.jwks_url.is_none() {
                return invalid("auth.jwt", "needs one of hs256_secret, rs256_public_key and jwks_url");
            }
            if let Some(url) = &j.jwks_url {
                if HttpEndpoint::parse(url).is_none_or(|e| e.uri.scheme_str() != Some("https")) {
                    return invalid("auth.jwt.jwks_url", "must be an https://host[:port]/path URL");
                }
            }
            if j.jwks_refresh_secs == 0 {
                return invalid("auth.jwt.jwks_refresh_secs", "must be at least 1");
            }
            check_ca_file("auth.jwt.ca_file", j.ca_file.as_deref())?;
        }
        if let Some(h) = &self.auth.http {
            if HttpEndpoint::parse(&h.url).is_none() {
                return invalid("auth.http.url", "must be an http:// or https://host[:port]/path URL");
            }
            for (key, value) in [
                ("auth.http.timeout_ms", h.timeout_ms as usize),
                ("auth.http.max_in_flight", h.max_in_flight),
                ("auth.http.cache_entries", h.cache_entries),
            ] {
                if value == 0 {
                    return invalid(key, "must be at least 1");
                }
            }
            check_ca_file("auth.http.ca_file", h.ca_file.as_deref())?;
        }
        let m = &self.mqtt;
        if m.max_packet_size < 64 || m.max_packet_size > crate::codec::wire::VARINT_MAX + 5 {
            return invalid("mqtt.max_packet_size", "must be between 64 and 268435460");
        }
        if m.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum", "must be at least 1");
        }
        if m.max_inflight_messages == 0 {
            return invalid("mqtt.max_inflight_messages", "must be at least 1");
        }
        if m.max_queued_messages == 0 {
            return invalid("mqtt.max_queued_messages", "must be at least 1");
        }
        if m.edge_buffer_bytes < 4096 {
            return invalid("mqtt.edge_buffer_bytes", "must be at least 4096");
        }
        if m.max_connect_packet_size < 64 {
            return invalid("mqtt.max_connect_packet_size", "must be at least 64");
        }
        if m.connect_timeout == 0 {
            return invalid("mqtt.connect_timeout", "must be at least 1 second");
        }
        if m.max_outbound_bytes < 4096 {
            return invalid("mqtt.max_outbound_bytes", "must be at least 4096");
        }
        if m.max_topic_levels == 0 {
            return invalid("mqtt.max_topic_levels", "must be at least 1");
        }
        for rule in &self.queue_policy {
            let rule_invalid = |message: String| Err(ConfigError::Invalid { key: "queue_policy", message });
            if !crate::codec::is_valid_topic_filter(&rule.filter) || rule.filter.starts_with("$share/") {
                return rule_invalid(format!("filter {:?} is not a topic filter", rule.filter));
            }
            match (rule.policy, rule.keep_latest) {
                (Some(_), None) => {}
                (None, Some(n)) if n > 0 => {}
                (None, Some(_)) => {
                    return rule_invalid(format!("keep_latest for {:?} must be at least 1", rule.filter))
                }
                _ => return rule_invalid(format!("{:?} needs exactly one of `policy` and `keep_latest`", rule.filter)),
            }
        }
        if let Some(http) = &self.http {
            if http.bind.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    key: "http.bind",
                    message: format!("{:?} is not an address:port", http.bind),
                });
            }
            if !http.is_loopback() && http.token.as_deref().unwrap_or("").is_empty() {
                return invalid("http.token", "is required when http.bind is not a loopback address");
            }
            if http.max_connections == 0 {
                return invalid("http.max_connections", "must be at least 1");
            }
            if http.max_head_bytes < 1024 {
                return invalid("http.max_head_bytes", "must be at least 1024");
            }
            if http.header_timeout_ms == 0 || http.body_timeout_ms == 0 {
                return invalid("http.header_timeout_ms", "timeouts must be at least 1 ms");
            }
            let r = &http.readers;
            for (key, value) in [
                ("http.readers.heartbeat_secs", r.heartbeat_secs as usize),
                ("http.readers.buffer_events", r.buffer_events),
                ("http.readers.stall_ms", r.stall_ms as usize),
                ("http.readers.window", r.window),
                ("http.readers.poll_session_expiry_secs", r.poll_session_expiry_secs as usize),
                ("http.readers.session_expiry_secs", r.session_expiry_secs as usize),
                ("http.readers.poll_max_messages", r.poll_max_messages),
            ] {
                if value == 0 {
                    return invalid(key, "must be at least 1");
                }
            }
        }
        for rule in &self.priority {
            if !crate::codec::is_valid_topic_filter(&rule.filter) || rule.filter.starts_with("$share/") {
                return Err(ConfigError::Invalid {
                    key: "priority.filter",
                    message: format!("{:?} is not a topic filter", rule.filter),
                });
            }
        }
        if let Some(url) = &self.delivery.webhook {
            if HttpEndpoint::parse(url).is_none() {
                return invalid("delivery.webhook", "must be an http:// or https://host[:port]/path URL");
            }
        }
        check_ca_file("delivery.webhook_ca_file", self.delivery.webhook_ca_file.as_deref())?;
        if !(0.0..1.0).contains(&self.degraded.recover_at) {
            return invalid("degraded.recover_at", "must be between 0 and 1");
        }
        if let Some(f) = self.receipts.topics.iter().find(|f| !crate::codec::is_valid_topic_filter(f)) {
            return Err(ConfigError::Invalid {
                key: "receipts.topics",
                message: format!("{f:?} is not a topic filter"),
            });
        }
        if self.receipts.max_in_memory == 0 {
            return invalid("receipts.max_in_memory", "must be at least 1");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid("log.level", "is not a valid log filter");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_toml_parses() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.listeners[0].bind, "127.0.0.1:1883");
        assert_eq!(c.storage.path, PathBuf::from("data"));
    }

    #[test]
    fn the_packaged_config_parses_and_the_http_token_rule_holds() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/config.toml")).unwrap();
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.storage.path, PathBuf::from("/var/lib/herald"));
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.http.as_ref().is_some_and(Http::is_loopback));
        let e = Config::parse("[http]\nbind = \"0.0.0.0:8080\"\n").unwrap_err().to_string();
        assert!(e.contains("http.token"), "{e}");
        assert!(Config::parse("[http]\nbind = \"0.0.0.0:8080\"\ntoken = \"t\"\n").is_ok());
        let e = Config::parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
        assert!(e.contains("xml"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = Config::parse("[mqtt]\nmax_packet_sise = 10\n").unwrap_err().to_string();
        assert!(e.contains("max_packet_sise"), "{e}");
        let e = Config::parse("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"x\"\nport = 1\n").unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn invalid_values_are_refused_by_name() {
        let e = Config::parse("[mqtt]\nreceive_maximum = 0\n").unwrap_err().to_string();
        assert!(e.contains("mqtt.receive_maximum"), "{e}");
        let e = Config::parse("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"nowhere\"\n").unwrap_err().to_string();
        assert!(e.contains("listeners.bind"), "{e}");
        let e =
            Config::parse("[[listeners]]\nprotocol = \"gopher\"\nbind = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(e.contains("gopher"), "{e}");
        let e = Config::parse("[[queue_policy]]\nfilter = \"news/#\"\npolicy = \"drop_new\"\nkeep_latest = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue_policy") && e.contains("exactly one"), "{e}");
        let e = Config::parse("[storage]\ndurability = \"never\"\n").unwrap_err().to_string();
        assert!(e.contains("never"), "{e}");
        let cluster = "[cluster]\nnode = \"n1\"\nnats = [\"nats://127.0.0.1:4222\"]\n";
        let e = Config::parse(&format!("{cluster}linger_ms = 1001\n")).unwrap_err().to_string();
        assert!(e.contains("cluster.linger_ms"), "{e}");
        assert_eq!(Config::parse(cluster).unwrap().cluster.unwrap().linger_ms, 5);
    }
}

/// A private CA file, when given, must hold at least one PEM certificate.
fn check_ca_file(key: &'static str, path: Option<&std::path::Path>) -> Result<(), ConfigError> {
    use rustls::pki_types::pem::PemObject;
    let Some(path) = path else { return Ok(()) };
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path).map(|i| i.filter_map(Result::ok).count());
    if !matches!(certs, Ok(n) if n > 0) {
        return Err(ConfigError::Invalid { key, message: format!("{} holds no PEM certificate", path.display()) });
    }
    Ok(())
}

/// The webhook's URL: `http://` or `https://`, a host, an optional port and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpEndpoint {
    pub uri: hyper::Uri,
}

impl HttpEndpoint {
    pub fn parse(url: &str) -> Option<HttpEndpoint> {
        let uri: hyper::Uri = url.parse().ok()?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
        let host_ok = uri.host().is_some_and(|h| !h.is_empty());
        let authority = uri.authority()?.as_str();
        if let Some((_, port)) = authority.rsplit_once(':').filter(|_| !authority.ends_with(']')) {
            port.parse::<u16>().ok()?;
        }
        (scheme_ok && host_ok).then_some(HttpEndpoint { uri })
    }
}
