//! The endpoints: health, `/metrics` and the admin API. Every answer but `/metrics` is JSON;
//! every error is `{"error": "..."}` with its status.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::{Request, Response};
use crate::broker::{Broker, PublishRefusal};
use crate::codec::{Properties, QoS};
use crate::figures::Snapshot;
use crate::message::Message;
use crate::session::SessionShared;

/// Most clients one page of `GET /api/v1/clients` holds.
const MAX_PAGE: usize = 1000;

/// The answer a request gets from its head alone: the health checks (which need no token) and
/// a missing or wrong token, so no body is read for a caller without the token.
pub fn refuse_early(broker: &Broker, req: &Request) -> Option<Response> {
    let path = if req.path.len() > 1 { req.path.trim_end_matches('/') } else { req.path.as_str() };
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => Some(Response::json(200, &json!({ "status": "live" }))),
        ("GET", "/readyz") => Some(match (broker.is_ready(), broker.cluster()) {
            (false, _) => Response::json(503, &json!({ "status": "not ready", "error": "starting or shutting down" })),
            // Cluster mode: a node that cannot reach NATS cannot keep a QoS 1 promise; a load
            // balancer should send phones elsewhere.
            (true, Some(link)) if !link.is_connected() => {
                Response::json(503, &json!({ "status": "not ready", "error": "NATS unreachable", "node": link.node() }))
            }
            (true, Some(link)) => Response::json(
                200,
                &json!({ "status": "ready", "store": "open", "listeners": "up", "nats": "connected", "node": link.node() }),
            ),
            (true, None) => Response::json(200, &json!({ "status": "ready", "store": "open", "listeners": "up" })),
        }),
        _ => check_token(broker, req),
    }
}

/// Serves a request that `refuse_early` let through.
pub async fn handle(broker: &Arc<Broker>, req: Request) -> Response {
    let path = if req.path.len() > 1 { req.path.trim_end_matches('/') } else { req.path.as_str() }.to_owned();
    let method = req.method.as_str();
    let allowed = match path.as_str() {
        "/" | "/dashboard" | "/metrics" | "/api/v1/clients" | "/api/v1/topics" | "/api/v1/overview" => "GET",
        "/api/v1/publish" | "/api/v1/reload" => "POST",
        p if p.starts_with("/api/v1/clients/") => "GET, DELETE",
        p if receipt_key(p).is_some() => "GET",
        _ => return Response::error(404, format!("no such endpoint: {path}")),
    };
    match (method, path.as_str()) {
        ("GET", "/" | "/dashboard") => super::dashboard::page(broker, &req),
        ("GET", "/api/v1/overview") => overview(broker).await,
        ("GET", "/metrics") => metrics(broker).await,
        ("POST", "/api/v1/publish") => publish(broker, &req).await,
        ("GET", "/api/v1/clients") => list_clients(broker, &req).await,
        ("GET", "/api/v1/topics") => topics(broker, &req).await,
        ("POST", "/api/v1/reload") => reload(broker).await,
        ("GET", p) if p.starts_with("/api/v1/clients/") => get_client(broker, &p["/api/v1/clients/".len()..]),
        ("GET", p) if receipt_key(p).is_some() => receipts(broker, receipt_key(p).expect("checked")).await,
        ("DELETE", p) if p.starts_with("/api/v1/clients/") => {
            delete_client(broker, &p["/api/v1/clients/".len()..], &req).await
        }
        _ => {
            let mut r = Response::error(405, format!("{method} is not allowed on {path}; allowed: {allowed}"));
            r.extra_headers.push(("allow", allowed.to_owned()));
            r
        }
    }
}

/// `GET /api/v1/messages/{key}/receipts`: this node's receipt; in cluster mode the counts of
/// every node that has one, summed, with each node's own under `nodes`.
async fn receipts(broker: &Arc<Broker>, key: &str) -> Response {
    let local = broker.receipts().find(key).map(|r| r.to_json());
    let Some(link) = broker.cluster() else {
        return match local {
            Some(r) => Response::json(200, &r),
            None => Response::error(404, format!("no receipt for {key:?} (message id or story id)")),
        };
    };
    let mut all: Vec<(String, Value)> = local.into_iter().map(|r| (link.node().to_owned(), r)).collect();
    all.extend(link.receipts_elsewhere(key).await);
    if all.is_empty() {
        return Response::error(404, format!("no receipt for {key:?} (message id or story id) on any node"));
    }
    Response::json(200, &sum_receipts(all))
}

/// One receipt with the counts of every node's summed; acknowledgement times the earliest and
/// latest of any node; the latency quantiles the node's own that published it (the first,
/// otherwise), since quantiles do not add up.
fn sum_receipts(all: Vec<(String, Value)>) -> Value {
    const SUMMED: [&str; 10] = [
        "routed",
        "delivered_qos0",
        "sent",
        "acknowledged",
        "queued",
        "expired",
        "dropped",
        "undelivered",
        "retries",
        "pending",
    ];
    let mut total = all[0].1.clone();
    for field in SUMMED {
        total[field] = json!(all.iter().map(|(_, r)| r[field].as_u64().unwrap_or(0)).sum::<u64>());
    }
    if let Some(causes) = all[0].1["dropped_by"].as_object() {
        for cause in causes.keys() {
            total["dropped_by"][cause] =
                json!(all.iter().map(|(_, r)| r["dropped_by"][cause].as_u64().unwrap_or(0)).sum::<u64>());
        }
    }
    total["first_ack_at_ms"] = json!(all.iter().filter_map(|(_, r)| r["first_ack_at_ms"].as_u64()).min());
    total["last_ack_at_ms"] = json!(all.iter().filter_map(|(_, r)| r["last_ack_at_ms"].as_u64()).max());
    total["nodes"] = Value::Object(all.into_iter().collect());
    total
}

/// The message id or story id of `/api/v1/messages/{key}/receipts`.
fn receipt_key(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1/messages/")?.strip_suffix("/receipts").filter(|k| !k.is_empty())
}

/// `[http] token`: every endpoint but the health checks needs `Authorization: Bearer <token>`.
fn check_token(broker: &Broker, req: &Request) -> Option<Response> {
    let expected = broker.config().http.as_ref()?.token.as_deref().filter(|t| !t.is_empty())?;
    let given = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) || has_api_cookie(broker, req) {
        return None;
    }
    if req.method == "GET" && (req.path == "/" || req.path == "/dashboard") {
        // A browser: the dashboard's sign-in page, whose form comes back here with the token
        // and gets the cookie.
        return Some(match req.param("token") {
            Some(t) if is_api_token(broker, t) => super::dashboard::signed_in(t),
            tried => super::dashboard::sign_in(tried.is_some()),
        });
    }
    let mut r = Response::error(401, "missing or wrong bearer token");
    r.extra_headers.push(("www-authenticate", "Bearer".to_owned()));
    Some(r)
}

/// Whether `token` is the API's token (`[http] token`).
pub fn is_api_token(broker: &Broker, token: &str) -> bool {
    let expected = broker.config().http.as_ref().and_then(|h| h.token.as_deref()).filter(|t| !t.is_empty());
    expected.is_some_and(|e| constant_time_eq(token.as_bytes(), e.as_bytes()))
}

/// The cookie the dashboard's sign-in sets (`dashboard::COOKIE`): a browser's page cannot put
/// a bearer token on an `EventSource`.
pub fn has_api_cookie(broker: &Broker, req: &Request) -> bool {
    let Some(cookies) = req.header("cookie") else { return false };
    cookies
        .split(';')
        .filter_map(|c| c.trim().strip_prefix(super::dashboard::COOKIE).and_then(|v| v.strip_prefix('=')))
        .any(|v| is_api_token(broker, v))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(broker: &Arc<Broker>) -> Response {
    let b = broker.clone();
    match tokio::task::spawn_blocking(move || Snapshot::take(&b)).await {
        Ok(snapshot) => Response {
            status: 200,
            content_type: super::prometheus::CONTENT_TYPE,
            body: super::prometheus::render(&snapshot).into_bytes(),
            extra_headers: Vec::new(),
        },
        Err(_) => Response::error(500, "reading the metrics failed"),
    }
}

/// `GET /api/v1/overview`: what the dashboard shows, in one answer: every figure of `/metrics`
/// by its `$SYS` name, connected clients by listener and protocol, and degraded mode.
async fn overview(broker: &Arc<Broker>) -> Response {
    let b = broker.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let snapshot = Snapshot::take(&b);
        let mut by: std::collections::BTreeMap<(String, &'static str), u64> = Default::default();
        for s in b.registry().list().iter().filter(|s| s.is_online()) {
            let c = s.client_info();
            let listener = match b.config().listeners.get(usize::from(c.listener)) {
                _ if c.listener == crate::session::LISTENER_HTTP => "http".to_owned(),
                Some(l) => format!("{} {}", l.protocol.name(), l.bind),
                None => format!("listener {}", c.listener),
            };
            *by.entry((listener, protocol_name(c.protocol))).or_default() += 1;
        }
        (snapshot, by)
    })
    .await;
    let Ok((snapshot, by)) = taken else { return Response::error(500, "reading the figures failed") };
    let figures: serde_json::Map<String, Value> =
        snapshot.figures.iter().map(|f| (f.sys_topic.to_owned(), json!(f.value))).collect();
    let clients: Vec<Value> = by
        .into_iter()
        .map(|((listener, protocol), n)| json!({ "listener": listener, "protocol": protocol, "connected": n }))
        .collect();
    Response::json(
        200,
        &json!({
            "uptime_secs": snapshot.uptime_secs,
            "degraded": broker.is_degraded(),
            "node": snapshot.node,
            "clients": clients,
            "figures": figures,
        }),
    )
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        3 => "mqtt 3.1",
        4 => "mqtt 3.1.1",
        5 => "mqtt 5.0",
        crate::session::PROTOCOL_SSE => "sse",
        crate::session::PROTOCOL_POLL => "poll",
        _ => "unknown",
    }
}

async fn reload(broker: &Arc<Broker>) -> Response {
    let b = broker.clone();
    match tokio::task::spawn_blocking(move || b.reload_config_file()).await {
        Ok(Ok(())) => Response::json(200, &json!({ "reloaded": true })),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reload failed; keeping the previous configuration");
            Response::error(400, format!("reload failed, previous configuration kept: {e}"))
        }
        Err(_) => Response::error(500, "reload failed"),
    }
}

/// What `POST /api/v1/publish` accepts, checked field by field so that the error names the field.
fn parse_publish(broker: &Broker, body: &[u8]) -> Result<Message, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("body must be a JSON object")?;
    const KNOWN: [&str; 9] = [
        "topic",
        "payload",
        "payload_base64",
        "qos",
        "retain",
        "user_properties",
        "message_expiry_interval",
        "content_type",
        "response_topic",
    ];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?}"));
    }
    let topic = obj.get("topic").and_then(Value::as_str).ok_or("`topic` (a string) is required")?;
    check_topic(broker, topic, "topic")?;
    let payload = match (obj.get("payload"), obj.get("payload_base64")) {
        (Some(_), Some(_)) => return Err("give `payload` or `payload_base64`, not both".into()),
        (Some(p), None) => p.as_str().ok_or("`payload` must be a string")?.as_bytes().to_vec(),
        (None, Some(p)) => base64::engine::general_purpose::STANDARD
            .decode(p.as_str().ok_or("`payload_base64` must be a string")?)
            .map_err(|e| format!("`payload_base64` is not base64: {e}"))?,
        (None, None) => Vec::new(),
    };
    if payload.len() > broker.config().mqtt.max_packet_size as usize {
        return Err("payload larger than mqtt.max_packet_size".into());
    }
    let qos = match obj.get("qos").map(Value::as_u64) {
        None | Some(Some(0)) => QoS::AtMostOnce,
        Some(Some(1)) => QoS::AtLeastOnce,
        Some(Some(2)) => QoS::ExactlyOnce,
        _ => return Err("`qos` must be 0, 1 or 2".into()),
    };
    let retain = match obj.get("retain") {
        None => false,
        Some(r) => r.as_bool().ok_or("`retain` must be true or false")?,
    };
    let mut properties = Properties::default();
    match obj.get("user_properties") {
        None => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let v = v.as_str().ok_or("`user_properties` values must be strings")?;
                properties.user_properties.push((k.clone(), v.to_owned()));
            }
        }
        Some(Value::Array(pairs)) => {
            for pair in pairs {
                let (k, v) = match pair {
                    Value::Array(kv) if kv.len() == 2 => (kv[0].as_str(), kv[1].as_str()),
                    Value::Object(o) => (o.get("key").and_then(Value::as_str), o.get("value").and_then(Value::as_str)),
                    _ => (None, None),
                };
                let (Some(k), Some(v)) = (k, v) else {
                    return Err("`user_properties` items must be [key, value] or {\"key\", \"value\"} strings".into());
                };
                properties.user_properties.push((k.to_owned(), v.to_owned()));
            }
        }
        Some(_) => return Err("`user_properties` must be an object or an array of pairs".into()),
    }
    let expiry_interval = match obj.get("message_expiry_interval") {
        None => None,
        Some(e) => Some(
            e.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or("`message_expiry_interval` must be seconds (0 to 4294967295)")?,
        ),
    };
    if let Some(ct) = obj.get("content_type") {
        properties.content_type = Some(ct.as_str().ok_or("`content_type` must be a string")?.to_owned());
    }
    for (k, v) in &properties.user_properties {
        crate::codec::check_string(k)
            .and_then(|()| crate::codec::check_string(v))
            .map_err(|e| format!("`user_properties`: {e}"))?;
    }
    if let Some(ct) = &properties.content_type {
        crate::codec::check_string(ct).map_err(|e| format!("`content_type`: {e}"))?;
    }
    if let Some(rt) = obj.get("response_topic") {
        let rt = rt.as_str().ok_or("`response_topic` must be a string")?;
        check_topic(broker, rt, "response_topic")?;
        properties.response_topic = Some(rt.to_owned());
    }
    Ok(Message { properties, expiry_interval, ..Message::new(topic.to_owned(), payload.into(), qos, retain) })
}

fn check_topic(broker: &Broker, topic: &str, field: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err(format!("`{field}` is not a valid topic name: it is empty"));
    }
    // The same check as an MQTT PUBLISH's topic, reason included.
    crate::codec::check_topic_name(topic).map_err(|e| format!("`{field}` is not a valid topic name: {e}"))?;
    if topic.starts_with('$') {
        return Err(format!("`{field}`: topics starting with `$` belong to the broker [MQTT-4.7.2-1]"));
    }
    // The publish topic's length and depth are admission rules (`Broker::admit_publish`), the
    // same as for MQTT; a response topic is only bounded here.
    if field != "topic" {
        if topic.len() > broker.limits().max_topic_length {
            return Err(format!("`{field}` is longer than limits.max_topic_length"));
        }
        if crate::topic::levels(topic) > broker.config().mqtt.max_topic_levels {
            return Err(format!("`{field}` has more levels than mqtt.max_topic_levels"));
        }
    }
    Ok(())
}

/// Routes the message like a PUBLISH from a client, and answers once it is as safe as a
/// PUBACK would promise: stored for persistent sessions (and retained) when the store has
/// committed it.
async fn publish(broker: &Arc<Broker>, req: &Request) -> Response {
    let message = match parse_publish(broker, &req.body) {
        Ok(m) => m,
        Err(e) => return Response::error(400, e),
    };
    let (topic, qos, retain) = (message.topic.clone(), message.qos as u8, message.retain);
    match broker.admit_publish(&topic, &broker.limits()) {
        Ok(()) => {}
        Err(PublishRefusal::Degraded) => {
            return Response::error(503, "degraded mode: only high-priority topics are accepted now (0x97)");
        }
        Err(PublishRefusal::TopicTooLong) => {
            return Response::error(400, "`topic` is longer than limits.max_topic_length")
        }
        Err(PublishRefusal::TooManyLevels) => {
            return Response::error(400, "`topic` has more levels than mqtt.max_topic_levels");
        }
        Err(PublishRefusal::SysTopic) => {
            return Response::error(400, "`topic`: topics starting with `$` belong to the broker [MQTT-4.7.2-1]");
        }
    }
    let message = match broker.accept_message(message) {
        Ok(m) => m,
        Err(original) => {
            let id = crate::receipt::message_id_text(original);
            return Response::json(200, &json!({ "id": id, "subscribers": 0, "duplicate": true }));
        }
    };
    let id = message.id;
    // Cluster mode: the other nodes' subscribers get it too; at QoS 1/2 the answer waits for
    // JetStream, as a PUBACK does.
    let replicated = match broker.cluster().map(|link| (link, link.forward(&message))) {
        Some((_, crate::cluster::Forward::Full)) => {
            return Response::error(503, "too many messages wait for the cluster (cluster.max_pending)");
        }
        Some((link, crate::cluster::Forward::Ticket(t))) => Some((link.clone(), t)),
        _ => None,
    };
    let outcome = broker.route(message, false);
    if let Some((link, ticket)) = replicated {
        let mut copied = link.replicated();
        let wait = copied.wait_for(|t| *t >= ticket);
        if !matches!(tokio::time::timeout(Duration::from_secs(30), wait).await, Ok(Ok(_))) {
            return Response::error(503, "JetStream did not acknowledge the message in 30 s");
        }
    }
    if outcome.ticket != 0 {
        let mut committed = broker.store().committed();
        let wait = committed.wait_for(|t| *t >= outcome.ticket);
        if !matches!(tokio::time::timeout(Duration::from_secs(30), wait).await, Ok(Ok(_))) {
            return Response::error(503, "the store did not commit the message in 30 s");
        }
    }
    tracing::info!(id = %crate::receipt::message_id_text(id), topic = topic.as_str(), qos, retain, subscribers = outcome.matched, "published over HTTP");
    Response::json(200, &json!({ "id": crate::receipt::message_id_text(id), "subscribers": outcome.matched }))
}

fn client_json(s: &SessionShared) -> Value {
    let connected = s.is_online();
    let mailbox = (s.mailbox.max_capacity() - s.mailbox.capacity()) as u64;
    let c = s.client_info();
    let (queued, inflight, subscriptions) = match s.parked_figures() {
        Some(p) => (mailbox + p.queued as u64, Some(p.inflight), p.subscriptions),
        None => (mailbox, None, c.subscriptions),
    };
    let protocol = match c.protocol {
        3 => "3.1",
        4 => "3.1.1",
        5 => "5.0",
        crate::session::PROTOCOL_SSE => "sse",
        crate::session::PROTOCOL_POLL => "poll",
        _ => "unknown",
    };
    json!({
        "client_id": s.client_id,
        "connected": connected,
        "address": c.peer.map(|p| p.to_string()),
        "protocol_version": protocol,
        "username": c.username,
        "persistent": s.is_persistent(),
        "subscriptions": subscriptions,
        "queued": queued,
        "inflight": inflight,
        "connected_at_ms": (c.connected_at_ms > 0).then_some(c.connected_at_ms),
        "disconnected_at_ms": (!connected && c.disconnected_at_ms > 0).then_some(c.disconnected_at_ms),
    })
}

/// `GET /api/v1/clients?limit=N&after=ID`: clients in client id order, a page at a time;
/// `next` is the `after` of the following page (null on the last).
async fn list_clients(broker: &Arc<Broker>, req: &Request) -> Response {
    let limit = match req.param("limit").map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
        _ => return Response::error(400, format!("`limit` must be 1 to {MAX_PAGE}")),
    };
    let after = req.param("after").unwrap_or("").to_owned();
    let b = broker.clone();
    let page = tokio::task::spawn_blocking(move || {
        let sessions: Vec<Arc<SessionShared>> = b.registry().list();
        let total = sessions.len();
        // The first `limit + 1` ids after the cursor, without sorting everything.
        let mut heap: std::collections::BinaryHeap<(String, usize)> = Default::default();
        for (i, s) in sessions.iter().enumerate() {
            if s.client_id.as_str() > after.as_str() {
                heap.push((s.client_id.clone(), i));
                if heap.len() > limit + 1 {
                    heap.pop();
                }
            }
        }
        let mut chosen = heap.into_sorted_vec();
        let more = chosen.len() > limit;
        chosen.truncate(limit);
        let next = if more { chosen.last().map(|(id, _)| id.clone()) } else { None };
        let data: Vec<Value> = chosen.iter().map(|(_, i)| client_json(&sessions[*i])).collect();
        json!({ "data": data, "total": total, "limit": limit, "next": next })
    })
    .await;
    match page {
        Ok(v) => Response::json(200, &v),
        Err(_) => Response::error(500, "listing clients failed"),
    }
}

fn get_client(broker: &Broker, client_id: &str) -> Response {
    let session = broker.registry().get(client_id);
    let Some(session) = session else {
        // Cluster mode: a persistent session another node holds, from the directory.
        if let Some((node, entry)) = broker.cluster().and_then(|link| link.holder(client_id)) {
            let mut filters: Vec<&str> = entry.subscriptions.iter().map(|s| s.filter.as_str()).collect();
            filters.sort();
            return Response::json(
                200,
                &json!({
                    "client_id": client_id,
                    "node": node,
                    // Where this node would read the session back from, were that node dead.
                    "checkpoint": broker.cluster().and_then(|link| link.checkpoint_of(&node)),
                    "persistent": true,
                    "session_expiry_interval": entry.expiry,
                    "subscriptions": filters.len(),
                    "filters": filters,
                }),
            );
        }
        return Response::error(404, format!("no session for client id {client_id:?}"));
    };
    let mut v = client_json(&session);
    if let Some(link) = broker.cluster() {
        v["node"] = json!(link.node());
    }
    // One client's view also lists its subscriptions, where its state is at hand (parked).
    if let Some(mut filters) = session.parked_filters() {
        filters.sort();
        v["filters"] = json!(filters);
    }
    Response::json(200, &v)
}

/// `DELETE /api/v1/clients/{id}[?remove_session=true]`.
async fn delete_client(broker: &Arc<Broker>, client_id: &str, req: &Request) -> Response {
    let remove_session = match req.param("remove_session") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Response::error(400, "`remove_session` must be true or false"),
    };
    if broker.disconnect_client(client_id, remove_session).await {
        Response::json(200, &json!({ "client_id": client_id, "disconnected": true, "session_removed": remove_session }))
    } else {
        Response::error(404, format!("no session for client id {client_id:?}"))
    }
}

/// `GET /api/v1/topics?filter=F` (default `#`): retained topics matching F with their
/// subscriber counts, and the subscribed filters under F with theirs.
async fn topics(broker: &Arc<Broker>, req: &Request) -> Response {
    let filter = req.param("filter").unwrap_or("#").to_owned();
    if !crate::codec::is_valid_topic_filter(&filter) || filter.starts_with("$share/") {
        return Response::error(400, format!("`filter` {filter:?} is not a topic filter"));
    }
    let b = broker.clone();
    let result = tokio::task::spawn_blocking(move || {
        let retained = b.retained_matching(&filter);
        let mut topics: Vec<Value> = retained
            .iter()
            .map(|m| json!({ "topic": m.topic, "retained": true, "subscribers": b.subscriber_count(&m.topic) }))
            .collect();
        topics.sort_by(|a, b| a["topic"].as_str().cmp(&b["topic"].as_str()));
        let mut filters: Vec<(String, usize)> = b
            .subscribed_filters()
            .into_iter()
            .filter(|(f, _)| {
                let plain = f.strip_prefix("$share/").and_then(|r| r.split_once('/')).map_or(f.as_str(), |(_, f)| f);
                crate::topic::filter_matches(&filter, plain)
            })
            .collect();
        filters.sort();
        let subscriptions: Vec<Value> =
            filters.into_iter().map(|(f, n)| json!({ "filter": f, "subscribers": n })).collect();
        json!({ "filter": filter, "retained": topics.len(), "topics": topics, "subscriptions": subscriptions })
    })
    .await;
    match result {
        Ok(v) => Response::json(200, &v),
        Err(_) => Response::error(500, "listing topics failed"),
    }
}
