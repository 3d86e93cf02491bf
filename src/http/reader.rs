//! A reader over HTTP: what a Server-Sent Events stream (`stream.rs`) and a poller (`poll.rs`)
//! have in common. Each is a session in the registry like an MQTT connection's (the same claim,
//! subscriptions, queue, policies, limits and receipts), driven by this instead of by a
//! `Connection`.
//!
//! HTTP has no acknowledgement, so a delivery counts as delivered when it is written (like QoS 0)
//! and a persistent reader keeps its last `[http.readers] window` deliveries unconfirmed: the
//! reader confirms them by naming the last one it got (`Last-Event-ID`, a poll's `after`), and
//! what it did not confirm goes back to the front of its queue when it goes away, to be sent
//! again. A restart keeps them too, since they leave the store only when confirmed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use serde_json::json;

use super::{Request, Response};
use crate::broker::{Broker, ConnectionRefusal, Outcome};
use crate::codec::{QoS, SubscriptionOptions};
use crate::message::Delivery;
use crate::session::registry::{Claim, ClaimError, Release};
use crate::session::{Kick, SessionShared, SessionState, Subscription};
use crate::store::Txn;
use crate::topic::parse_filter;

/// Who a reader is: a login as a CONNECT's, or the operator (the API's token), who reads all
/// and owns no session.
pub struct Identity {
    pub login: crate::auth::Login,
    pub operator: bool,
}

/// Checks a reader's credentials as a CONNECT's: `Authorization: Basic` (user name and password,
/// or any name and a JWT), `Authorization: Bearer` (a JWT, or the API's token), or none
/// (anonymous, where the configuration allows it).
pub async fn identify(
    broker: &Broker,
    req: &Request,
    client_id: &str,
    peer: SocketAddr,
    protocol: &'static str,
) -> Result<Identity, Response> {
    let operator = Identity { login: crate::auth::Login::anonymous(), operator: true };
    let (mut username, mut password) = (None, None);
    match req.header("authorization") {
        Some(v) if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") => {
            let token = v[7..].trim();
            if super::api::is_api_token(broker, token) {
                return Ok(operator);
            }
            password = Some(bytes::Bytes::copy_from_slice(token.as_bytes()));
        }
        Some(v) if v.len() > 6 && v[..6].eq_ignore_ascii_case("basic ") => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(v[6..].trim()).ok();
            let Some((user, pass)) = decoded.as_deref().and_then(|d| std::str::from_utf8(d).ok()?.split_once(':'))
            else {
                return Err(unauthorized("malformed basic credentials"));
            };
            if !user.is_empty() {
                username = Some(user.to_owned());
            }
            password = Some(bytes::Bytes::copy_from_slice(pass.as_bytes()));
        }
        Some(_) => return Err(unauthorized("unsupported authorization scheme (Basic or Bearer)")),
        None if super::api::has_api_cookie(broker, req) => return Ok(operator),
        None => {}
    }
    let loopback = broker.config().http.as_ref().is_some_and(|h| h.is_loopback());
    let credentials = crate::auth::Credentials {
        client_id: client_id.to_owned(),
        username,
        password,
        certificate_name: None,
        peer,
        protocol,
        loopback,
    };
    match broker.auth().login(credentials).await {
        crate::auth::Verdict::Allowed(login) => Ok(Identity { login, operator: false }),
        crate::auth::Verdict::BadCredentials(why) => {
            broker.metrics().auth_failures.fetch_add(1, Ordering::Relaxed);
            if crate::logging::connection_line() {
                tracing::info!(reason = why.as_str(), "http reader refused");
            }
            Err(unauthorized("bad user name, password or token"))
        }
        crate::auth::Verdict::NotAuthorized(why) => {
            broker.metrics().auth_failures.fetch_add(1, Ordering::Relaxed);
            Err(unauthorized(why))
        }
    }
}

fn unauthorized(why: impl Into<String>) -> Response {
    let mut r = Response::error(401, why);
    r.extra_headers.push(("www-authenticate", "Basic realm=\"herald\", charset=\"UTF-8\"".to_owned()));
    r
}

/// What a reader asks for.
pub struct Ask {
    /// A persistent identity, or None for a session of its own.
    pub client_id: Option<String>,
    /// Prefix of the identifier a reader without one gets (`herald-sse-`, `herald-poll-`).
    pub fresh_prefix: &'static str,
    /// Resume the session if there is one (a named reader, a poll with a cursor).
    pub resume: bool,
    pub expiry_interval: u32,
    pub filters: Vec<String>,
    pub protocol: u8,
    pub peer: SocketAddr,
}

pub enum Next {
    Delivery(Delivery),
    /// The registry asked this reader to let go (takeover, the admin API, shutdown).
    Kicked(Kick),
    /// The deadline passed with nothing to send.
    Idle,
}

pub struct Reader {
    broker: Arc<Broker>,
    pub shared: Arc<SessionShared>,
    state: SessionState,
    pub client_id: String,
    conn_id: u64,
    acl: Option<Box<crate::auth::acl::ClientAcl>>,
    kick: tokio::sync::oneshot::Receiver<Kick>,
    kicked: bool,
    /// Deliveries written and not yet confirmed, oldest first (persistent readers only).
    unconfirmed: VecDeque<Delivery>,
    window: usize,
    expiry_interval: u32,
    peer: SocketAddr,
    counted_ip: bool,
    /// Whether the session existed before (its subscriptions and queue were resumed).
    pub present: bool,
}

/// An HTTP answer for a refused connection, in the words the MQTT limits use.
fn refusal(r: ConnectionRefusal) -> Response {
    match r {
        ConnectionRefusal::ServerBusy => Response::error(503, "too many connections (limits.max_connections)"),
        ConnectionRefusal::RateExceeded => {
            Response::error(429, "too many connections from this address per second (limits.connection_rate_per_ip)")
        }
        ConnectionRefusal::QuotaExceeded => {
            Response::error(429, "too many connections from this address (limits.max_connections_per_ip)")
        }
    }
}

impl Reader {
    /// Authenticates, checks the filters against the limits and the ACL, claims the session
    /// and subscribes. The answer to send instead when any of that refuses.
    pub async fn open(broker: &Arc<Broker>, req: &Request, ask: Ask) -> Result<Reader, Response> {
        let client_id = match ask.client_id.clone() {
            Some(id) if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) => {
                return Err(Response::error(400, "client_id must be 1 to 256 bytes of text"));
            }
            Some(id) => id,
            None => fresh_client_id(broker, ask.fresh_prefix),
        };
        let protocol = if ask.protocol == crate::session::PROTOCOL_SSE { "sse" } else { "poll" };
        let identity = identify(broker, req, &client_id, ask.peer, protocol).await?;
        let limits = broker.limits();
        let config = &broker.config().mqtt;
        if ask.filters.is_empty() {
            return Err(Response::error(400, "at least one filter= is required"));
        }
        if limits.max_subscriptions_per_client > 0 && ask.filters.len() > limits.max_subscriptions_per_client {
            broker.metrics().limit_subscriptions.fetch_add(1, Ordering::Relaxed);
            return Err(Response::error(400, "more filters than limits.max_subscriptions_per_client"));
        }
        let acl =
            if identity.operator { None } else { broker.auth().client_acl(&identity.login, &client_id).map(Box::new) };
        for filter in &ask.filters {
            let parsed = match parse_filter(filter) {
                Ok(p) if p.share.is_none() => p,
                Ok(_) => {
                    return Err(Response::error(400, format!("shared subscriptions are for MQTT clients: {filter:?}")))
                }
                Err(_) => return Err(Response::error(400, format!("invalid topic filter {filter:?}"))),
            };
            if filter.len() > limits.max_topic_length || crate::topic::levels(parsed.filter) > config.max_topic_levels {
                broker.metrics().limit_topic_length.fetch_add(1, Ordering::Relaxed);
                return Err(Response::error(400, format!("topic filter too long or too deep: {filter:?}")));
            }
            if acl.as_ref().is_some_and(|acl| !acl.can_subscribe(parsed.filter)) {
                broker.metrics().acl_denied_subscribe.fetch_add(1, Ordering::Relaxed);
                return Err(Response::error(403, format!("the ACL does not allow reading {filter:?}")));
            }
        }
        let counted_ip = broker.admit(ask.peer.ip(), &limits).map_err(refusal)?;
        match Reader::claim(broker, identity, client_id, acl, &ask).await {
            Ok(mut reader) => {
                reader.counted_ip = counted_ip;
                Ok(reader)
            }
            Err(r) => {
                if counted_ip {
                    broker.release_ip(ask.peer.ip());
                }
                Err(r)
            }
        }
    }

    async fn claim(
        broker: &Arc<Broker>,
        identity: Identity,
        client_id: String,
        acl: Option<Box<crate::auth::acl::ClientAcl>>,
        ask: &Ask,
    ) -> Result<Reader, Response> {
        let owner = (!identity.operator).then(|| identity.login.owner().to_owned());
        let enforce_owner = broker.auth().session_owner && !identity.operator;
        let not_owner = |session_owner: &str| {
            broker.owner_refused(&client_id, session_owner, owner.as_deref().unwrap_or_default(), ask.peer);
            Response::error(403, "this session belongs to another user")
        };
        if let (true, Some(claimant)) = (enforce_owner, owner.as_deref()) {
            if let Some(session_owner) = broker.owned_elsewhere_by_other(&client_id, claimant) {
                return Err(not_owner(&session_owner));
            }
        }
        if ask.expiry_interval > 0 && broker.cluster().is_some_and(|l| !l.fence.may_deliver()) {
            // Fenced (`cluster::fence`), as for CONNECT: no persistent session here for now.
            return Err(Response::error(503, "this node is fenced (out of touch with the cluster); try again"));
        }
        if ask.resume && ask.expiry_interval > 0 && broker.cluster().is_some() {
            // A session another node holds comes here first, as for CONNECT (docs/cluster.md).
            if let Err(why) = broker.adopt(&client_id).await {
                tracing::warn!(client_id = client_id.as_str(), reason = why.as_str(), "session not taken over");
                return Err(Response::error(503, "the session could not be taken over from another node"));
            }
        }
        let conn_id = broker.next_id();
        let (kick_tx, kick) = tokio::sync::oneshot::channel();
        let claim = Claim {
            client_id: client_id.clone(),
            clean_start: !ask.resume,
            expiry_interval: ask.expiry_interval,
            will: None,
            conn_id,
            kick: kick_tx,
            client: crate::session::ClientInfo::connecting(
                ask.peer,
                ask.protocol,
                crate::session::LISTENER_HTTP,
                identity.login.user.clone(),
            ),
            owner: owner.clone(),
            enforce_owner,
        };
        let claimed = match broker.registry().claim(claim).await {
            Ok(claimed) => claimed,
            Err(ClaimError::NotOwner { owner: session_owner }) => return Err(not_owner(&session_owner)),
            Err(ClaimError::TakeoverTimeout) => {
                return Err(Response::error(503, "the session's previous reader did not let go"))
            }
        };
        let metrics = broker.metrics();
        metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        metrics.client_connected();
        if let Some(link) = broker.cluster() {
            link.claimed(&client_id, !ask.resume);
        }
        let window =
            if ask.expiry_interval > 0 { broker.config().http.as_ref().map_or(100, |h| h.readers.window) } else { 0 };
        let mut reader = Reader {
            broker: broker.clone(),
            shared: claimed.shared,
            state: claimed.state,
            client_id,
            conn_id,
            acl,
            kick,
            kicked: false,
            unconfirmed: VecDeque::new(),
            window,
            expiry_interval: ask.expiry_interval,
            peer: ask.peer,
            counted_ip: false,
            present: claimed.present,
        };
        reader.subscribe(&ask.filters);
        if let Some(link) = broker.cluster() {
            // As a SUBACK does: nothing published after the answer starts is missed.
            link.interest_settled().await;
        }
        if crate::logging::connection_line() {
            tracing::info!(
                client_id = reader.client_id.as_str(),
                peer = %ask.peer,
                protocol = if ask.protocol == crate::session::PROTOCOL_SSE { "sse" } else { "poll" },
                session_present = reader.present,
                "http reader connected"
            );
        }
        Ok(reader)
    }

    /// Sets the window of unconfirmed deliveries (a poll keeps its whole answer).
    pub fn set_window(&mut self, window: usize) {
        if self.expiry_interval > 0 {
            self.window = window;
        }
    }

    /// Subscribes the filters the session does not have yet, at QoS 2 so that each message
    /// keeps its own QoS; retained messages for the new ones, as for a new MQTT subscription
    /// (retain handling 1: a reader coming back with the same URL gets them once).
    fn subscribe(&mut self, filters: &[String]) {
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 1,
        };
        let persistent = self.shared.is_persistent();
        let mut txn = Txn::default();
        let mut retained = Vec::new();
        for filter in filters {
            if self.state.subscriptions.contains_key(filter.as_str()) {
                continue;
            }
            let Ok(parsed) = parse_filter(filter) else { continue };
            let sub = Subscription { session: self.shared.clone(), options, identifier: None };
            let existed = self.broker.subscribe(&parsed, sub);
            self.state.subscriptions.insert(filter.clone(), (options, None));
            if persistent {
                txn.put_subscription(&self.client_id, filter, &options, None);
            }
            if !existed {
                retained.extend(self.broker.retained_matching(parsed.filter));
            }
        }
        let room = self.broker.config().mqtt.max_pending_retained.saturating_sub(self.state.pending.len());
        if retained.len() > room {
            let dropped = retained.len() - room;
            self.broker.metrics().messages_dropped_queue_full.fetch_add(dropped as u64, Ordering::Relaxed);
            retained.truncate(room);
        }
        for message in retained {
            let qos = message.qos;
            self.state.push_pending(Delivery {
                message,
                qos,
                retain: true,
                subscription_ids: Box::new([]),
                stored: None,
            });
        }
        self.shared.set_subscription_count(self.state.subscriptions.len());
        if let (Some(link), true) = (self.broker.cluster(), persistent) {
            link.record_connected(
                &self.client_id,
                self.expiry_interval,
                None,
                &self.state.subscriptions,
                self.shared.owner(),
            );
        }
        self.broker.store().commit(txn);
    }

    /// The reader got everything up to and including the message `id` (hex, as sent): those
    /// deliveries leave its queue. Looked for among the first `window` queued, where a previous
    /// connection's unconfirmed deliveries went back; an id not found there confirms nothing.
    pub fn confirm(&mut self, id: &str) {
        let Ok(id) = u64::from_str_radix(id.trim(), 16) else { return };
        let look = self.window.max(1);
        let Some(at) = self.state.pending.iter().take(look).position(|d| d.message.id == id) else { return };
        for _ in 0..=at {
            if let Some(d) = self.state.pop_pending() {
                self.forget_stored(&d);
            }
        }
    }

    /// The next delivery to write: queued ones first, then the mailbox, waiting until `until`.
    pub async fn next(&mut self, until: Option<tokio::time::Instant>) -> Next {
        loop {
            let d = match self.state.pop_pending().or_else(|| self.state.mailbox.try_recv()) {
                Some(d) => d,
                None => {
                    if self.kicked {
                        return Next::Kicked(Kick {
                            reason: crate::codec::ReasonCode::SESSION_TAKEN_OVER,
                            elsewhere: false,
                        });
                    }
                    let sleep = async {
                        match until {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        kick = &mut self.kick => {
                            self.kicked = true;
                            let kick = kick.unwrap_or(Kick { reason: crate::codec::ReasonCode::SESSION_TAKEN_OVER, elsewhere: false });
                            return Next::Kicked(kick);
                        }
                        d = self.state.mailbox.recv() => d,
                        _ = sleep => return Next::Idle,
                    }
                }
            };
            if self.fenced() {
                self.give_back(d);
                return Next::Kicked(Kick { reason: crate::codec::ReasonCode::SESSION_TAKEN_OVER, elsewhere: true });
            }
            if let Some(d) = self.admit(d) {
                return Next::Delivery(d);
            }
        }
    }

    /// Cluster mode: a persistent reader is written to only under this node's lease
    /// (`cluster::fence`); past it, the reader is closed as if taken over elsewhere.
    fn fenced(&mut self) -> bool {
        let fenced = self.expiry_interval > 0 && self.broker.cluster().is_some_and(|l| !l.fence.may_deliver());
        self.kicked |= fenced;
        fenced
    }

    /// A delivery without waiting, or None.
    pub fn try_next(&mut self) -> Option<Delivery> {
        while let Some(d) = self.state.pop_pending().or_else(|| self.state.mailbox.try_recv()) {
            if self.fenced() {
                self.give_back(d);
                return None;
            }
            if let Some(d) = self.admit(d) {
                return Some(d);
            }
        }
        None
    }

    /// Whether the registry has asked this reader to go, without waiting.
    pub fn is_kicked(&mut self) -> bool {
        if !self.kicked && self.kick.try_recv().is_ok() {
            self.kicked = true;
        }
        self.kicked
    }

    /// What a connection checks before sending (`Broker::withhold`).
    fn admit(&mut self, d: Delivery) -> Option<Delivery> {
        let now = d.message.expiry_interval.map(|_| Instant::now());
        if self.broker.withhold(&d, now, self.acl.as_deref(), &self.client_id).is_some() {
            self.forget_stored(&d);
            return None;
        }
        Some(d)
    }

    /// Counts a delivery as written: delivered, like QoS 0. A persistent reader keeps it until
    /// confirmed, within its window.
    pub fn written(&mut self, d: Delivery) {
        self.broker.record(&d.message, Outcome::DeliveredQos0);
        let latency = Instant::now().saturating_duration_since(d.message.received_at).as_micros() as u64;
        self.broker.metrics().delivery_latency.observe(latency);
        if self.window == 0 {
            self.forget_stored(&d);
        } else {
            self.unconfirmed.push_back(d);
            if self.unconfirmed.len() > self.window {
                if let Some(old) = self.unconfirmed.pop_front() {
                    self.forget_stored(&old);
                }
            }
        }
        let shared = &self.shared;
        if shared.is_congested() && shared.mailbox.capacity() * 2 >= shared.mailbox.max_capacity() {
            shared.set_congested(false);
        }
    }

    /// A delivery that could not be written goes back to the front of the queue.
    pub fn give_back(&mut self, d: Delivery) {
        self.state.unpop_pending(d);
    }

    fn forget_stored(&self, d: &Delivery) {
        if let Some(at) = d.queue_ref() {
            let mut txn = Txn::default();
            txn.remove_entry(&self.client_id, at);
            self.broker.store().commit(txn);
        }
    }

    /// Lets go of the session: unconfirmed deliveries go back to the front of its queue, and the
    /// session parks (persistent) or ends, as after an MQTT client's disconnection.
    pub fn close(mut self, why: &str) {
        while let Some(d) = self.unconfirmed.pop_back() {
            self.state.unpop_pending(d);
        }
        let metrics = self.broker.metrics();
        metrics.client_disconnected();
        metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        if self.counted_ip {
            self.broker.release_ip(self.peer.ip());
        }
        if crate::logging::connection_line() {
            tracing::info!(client_id = self.client_id.as_str(), peer = %self.peer, reason = why, "http reader disconnected");
        }
        let release = Release {
            conn_id: self.conn_id,
            expiry_interval: self.expiry_interval,
            will_due: None,
            taken_over: self.kicked && why == "session taken over",
            now_ms: crate::clock::wall_ms_now(),
        };
        self.broker.registry().release(self.shared, self.state, release);
    }
}

fn fresh_client_id(broker: &Broker, prefix: &str) -> String {
    loop {
        let mut bits = [0u8; 16];
        getrandom::fill(&mut bits).expect("the operating system's random source");
        let id = format!("{prefix}{:032x}", u128::from_be_bytes(bits));
        if broker.registry().get(&id).is_none() {
            return id;
        }
    }
}

/// A delivery as a Server-Sent Event: `id: <message id>`, then one `data:` line of JSON (see
/// `message_json`), then a blank line. A live message's event is made once and shared by every
/// reader (`Message::event`); a retained one sent on subscribe carries `"retain": true` and is
/// made for its reader.
pub fn event(d: &Delivery) -> Bytes {
    if d.retain {
        return make_event(d);
    }
    d.message.event.get_or_init(|| make_event(d)).clone()
}

/// Where the JSON sits in an event: after `id: ` and 16 hex digits, `\ndata: `, before `\n\n`.
const JSON_AT: usize = "id: ".len() + 16 + "\ndata: ".len();

/// The JSON object of an event, shared with it.
pub fn event_json(event: &Bytes) -> Bytes {
    event.slice(JSON_AT..event.len() - 2)
}

fn make_event(d: &Delivery) -> Bytes {
    let m = &d.message;
    let (payload, encoding) = match std::str::from_utf8(&m.payload) {
        Ok(text) => (json!(text), "utf8"),
        Err(_) => (json!(base64::engine::general_purpose::STANDARD.encode(&m.payload)), "base64"),
    };
    let p = &m.properties;
    let story = p.user_properties.iter().find(|(k, _)| k == crate::receipt::STORY_ID).map(|(_, v)| v.as_str());
    let value = json!({
        "id": crate::receipt::message_id_text(m.id),
        "topic": m.topic,
        "payload": payload,
        "payload_encoding": encoding,
        "qos": d.qos as u8,
        "retain": d.retain,
        "content_type": p.content_type,
        "story_id": story,
        "user_properties": p.user_properties.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
    });
    let mut out = Vec::with_capacity(JSON_AT + m.payload.len() + 160);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(crate::receipt::message_id_text(m.id).as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // serde_json escapes every control character, so the JSON is one line: no event can be
    // split or forged by a payload holding a newline.
    serde_json::to_writer(&mut out, &value).expect("JSON values serialize");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
