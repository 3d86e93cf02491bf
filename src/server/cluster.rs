//! Cluster mode's receiving side: what the other nodes publish, routed to this node's sessions
//! as a local publish would be (`Broker::publish`). QoS 0 arrives over core NATS; QoS 1 and 2
//! from this node's durable JetStream consumer, acknowledged to JetStream once what persistent
//! sessions need of the message is in this node's store, so that a node that dies before that
//! gets the message again from the stream when it restarts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::cluster::sessions::HandoverReply;
use crate::cluster::{self, Inbound, Link};

/// Stream messages routed here and waiting for this node's store before their JetStream ack.
const ACKS_WAITING: usize = 1024;
/// How often a shared group's reader looks whether the group still has members here.
const SHARED_IDLE_CHECK: Duration = Duration::from_secs(5);
/// How often the node's checkpoint is taken (and written to the directory when it moved).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Shared groups with members on this node: those at start, and those that get one later.
pub struct SharedGroups {
    pub now: Vec<(String, String)>,
    pub joined: mpsc::Receiver<(String, String)>,
}

pub async fn receive(broker: Arc<Broker>, link: Arc<Link>, inbound: Inbound, groups: SharedGroups) {
    let Inbound {
        mut qos0,
        mut claims,
        mut log,
        mut retained,
        mut directory,
        mut handovers,
        alive,
        mut receipts,
        fences,
        mut takes,
        mut opens,
        ..
    } = inbound;
    let (acks, waiting) = mpsc::channel(ACKS_WAITING);
    // The connection the stream is followed on (`Link::connects`).
    let mut followed_at = link.connects();
    // No message came through the pull stream since it was made.
    let mut untouched = true;
    tokio::spawn(acknowledge(broker.clone(), waiting));
    tokio::spawn(checkpoints(broker.clone(), link.clone()));
    tokio::spawn(heartbeats(link.clone(), alive));
    tokio::spawn(watch_nodes(broker.clone(), link.clone(), fences));
    let SharedGroups { now, mut joined } = groups;
    let mut readers: HashMap<(String, String), tokio::task::JoinHandle<()>> = HashMap::new();
    let mut read_group = |key: (String, String)| {
        if readers.get(&key).is_none_or(|r| r.is_finished()) {
            let task = tokio::spawn(read_shared(broker.clone(), link.clone(), key.0.clone(), key.1.clone()));
            readers.insert(key, task);
        }
    };
    for key in now {
        read_group(key);
    }
    loop {
        tokio::select! {
            Some(key) = joined.recv() => read_group(key),
            Some(m) = receipts.next() => {
                // Another node's API asks for this node's receipt of a message or story.
                if let (Some(reply), Ok(key)) = (m.reply.clone(), std::str::from_utf8(&m.payload)) {
                    if !link.is_own(m.headers.as_ref()) {
                        if let Some(r) = broker.receipts().find(key) {
                            link.answer_receipt(reply, r.to_json()).await;
                        }
                    }
                }
            }
            // Between two stream messages: sessions taken over here start taking from the
            // consumer exactly where reading them back ended.
            Some(open) = opens.recv() => link.open(open),
            m = takes.next() => match m {
                Some(m) => {
                    // A node shutting down hands a session over (`Broker::leave`).
                    let (broker, link) = (broker.clone(), link.clone());
                    tokio::spawn(async move {
                        let (Some(reply), Ok(client_id)) = (m.reply, std::str::from_utf8(&m.payload)) else { return };
                        let result = broker.take_over(client_id).await;
                        link.answer_take(reply, result).await;
                    });
                }
                None => break,
            },
            m = handovers.next() => match m {
                Some(m) => {
                    let (broker, link) = (broker.clone(), link.clone());
                    tokio::spawn(async move { hand_over(&broker, &link, m).await });
                }
                None => break,
            },
            m = directory.next() => match m {
                Some(Ok(m)) => {
                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    link.apply_directory(m.subject.as_str(), seq, &m.payload);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "reading the cluster's session directory failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => break,
            },
            m = claims.next() => match m {
                Some(m) => {
                    if let Some((client_id, clean_start)) = cluster::receive_claim(&link, m.headers.as_ref(), &m.payload) {
                        // Not awaited here: ending a session waits for its connection to let go.
                        let broker = broker.clone();
                        tokio::spawn(async move {
                            broker.registry().taken_over_elsewhere(&client_id, clean_start).await;
                        });
                    }
                }
                None => break,
            },
            m = qos0.next() => match m {
                Some(m) => {
                    for message in cluster::receive(&link, m.headers.as_ref(), &m.payload) {
                        broker.publish(broker.remote_message(message));
                    }
                }
                None => break,
            },
            m = retained.next() => match m {
                Some(Ok(m)) => {
                    if let Some(r) = cluster::retained_entry(m.subject.as_str(), &m.payload) {
                        broker.restore_retained(Arc::new(r));
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "reading the cluster's retained messages failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => break,
            },
            m = log.next() => match m {
                Some(Ok(m)) => {
                    untouched = false;
                    // A bundle's stories all stand at its sequence, and are routed before it
                    // counts as processed (`cluster::bundle`).
                    let seq = m.info().map_or(0, |i| i.stream_sequence);
                    let mut ticket = 0;
                    for message in cluster::receive(&link, m.headers.as_ref(), &m.payload) {
                        // As a publisher's connection does: a subscriber whose queue is full
                        // is waited for (up to `max_publish_wait_ms`), and meanwhile this
                        // node reads no further in the stream; JetStream keeps the rest.
                        let outcome = broker.route_remote(broker.remote_message(message), seq);
                        wait_for_room(&broker, outcome.blocked).await;
                        ticket = ticket.max(outcome.ticket);
                    }
                    if let Ok(info) = m.info() {
                        link.processed_up_to(info.stream_sequence);
                        link.figures.log_lag.store(info.pending, std::sync::atomic::Ordering::Relaxed);
                    }
                    if acks.send((ticket, m)).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "reading the cluster's stream failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    // After a reconnection the failed pull would be asked again only when it
                    // expires (10 s): a new one asks at once, so delivery resumes as soon as
                    // JetStream answers. (What the old one held was lost with the connection.)
                    // Also when the stream made afresh fails before it gave anything: it holds
                    // nothing to lose, and JetStream may not have answered it yet.
                    if link.connects() != followed_at || untouched {
                        match link.follow_log().await {
                            Ok(fresh) => {
                                log = fresh;
                                followed_at = link.connects();
                                untouched = true;
                            }
                            Err(e) => warn!(error = e.as_str(), "following the cluster's stream afresh failed; trying again"),
                        }
                    }
                }
                None => break,
            },
        }
    }
    warn!("the cluster's subscriptions ended");
}

/// Acknowledges stream messages to JetStream once their store ticket is committed here.
async fn acknowledge(broker: Arc<Broker>, mut waiting: mpsc::Receiver<(u64, async_nats::jetstream::Message)>) {
    let mut committed = broker.store().committed();
    while let Some((ticket, m)) = waiting.recv().await {
        if ticket > 0 && committed.wait_for(|c| *c >= ticket).await.is_err() {
            return;
        }
        if let Err(e) = m.ack().await {
            // Unacknowledged, JetStream delivers it again after `ack_wait`: a duplicate, not a loss.
            warn!(error = %e, "acknowledging a cluster message failed");
        }
    }
}

/// Another node's client resumes a session held here: the checkpoint is taken while the
/// session's messages are still in the store, then the session ends here (its connection, if
/// any, closes with 0x8E) and the answer says where the other node reads the stream from.
async fn hand_over(broker: &Broker, link: &Link, request: async_nats::Message) {
    let Some(reply_to) = request.reply else { return };
    let Ok(client_id) = std::str::from_utf8(&request.payload) else { return };
    // A takeover of this session under way here finishes first: then there is a session to hand.
    let _one_at_a_time = link.adopting(client_id).await;
    // Both read while the session's messages are still here: everything routed to it later is
    // above `processed`, and everything it holds above `checkpoint`.
    let checkpoint = link.checkpoint_now(broker.store().oldest_body());
    let processed = broker.registry().get(client_id).map_or_else(|| link.processed(), |s| link.complete_up_to(s.id));
    let handed = broker.registry().hand_over(client_id, handed_entries).await;
    let answer = match handed {
        None => HandoverReply { held: false, checkpoint, moved_to: link.moved_to(client_id), ..Default::default() },
        Some(None) => HandoverReply { held: true, checkpoint, ..Default::default() },
        Some(Some((entries, incoming_qos2))) => {
            HandoverReply { held: true, checkpoint, processed, entries: Some(entries), incoming_qos2, moved_to: None }
        }
    };
    if answer.held {
        let messages = answer.entries.as_ref().map(Vec::len);
        info!(client_id, checkpoint, ?messages, "session handed over to another node");
    }
    link.answer_handover(reply_to, &answer).await;
}

/// Four times a second: the checkpoint below which this node's sessions need nothing more from the
/// stream, for another node to read a session back from if this one dies (`cluster::sessions`).
async fn checkpoints(broker: Arc<Broker>, link: Arc<Link>) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // In this order: a body numbered after `next` was routed after `processed` was read.
        let processed = link.processed();
        let next = broker.store().peek_next_seq();
        let oldest = broker.store().oldest_body();
        link.checkpoint_tick(processed, next, oldest);
    }
}

/// Reads one shared group's messages from the cluster while it has members here: each message
/// goes to one member on this node (`Broker::deliver_shared`), and a stream message is
/// acknowledged once the store has what that member needs. When the last member here is gone
/// the message in hand goes back to JetStream (another node's members get it) and reading stops;
/// the next member to join starts it again.
async fn read_shared(broker: Arc<Broker>, link: Arc<Link>, group: String, filter: String) {
    use async_nats::jetstream::AckKind;
    let max_pending = broker.config().cluster.as_ref().map_or(1024, |c| c.max_pending);
    // Tried again while the group has members here: JetStream may be busy or electing.
    let (mut log, mut qos0) = loop {
        match link.shared_inbound(&group, &filter, max_pending).await {
            Ok(inbound) => break inbound,
            Err(e) => {
                warn!(
                    group = group.as_str(),
                    filter = filter.as_str(),
                    error = e.as_str(),
                    "cannot read a shared group from the cluster yet; trying again"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !broker.has_shared_member(&group, &filter) {
                    return;
                }
            }
        }
    };
    info!(group = group.as_str(), filter = filter.as_str(), "reading a shared group from the cluster");
    let mut followed_at = link.connects();
    let (acks, waiting) = mpsc::channel(ACKS_WAITING);
    tokio::spawn(acknowledge(broker.clone(), waiting));
    let mut idle = tokio::time::interval(SHARED_IDLE_CHECK);
    // The group's stories in a message: one, or a bundle's (`cluster::bundle`).
    let decode = |payload: &[u8]| {
        cluster::bundle::stories(payload)
            .filter_map(Result::ok)
            .filter(|m| crate::topic::filter_matches(&filter, &m.topic))
            .collect::<Vec<_>>()
    };
    loop {
        tokio::select! {
            m = log.next() => match m {
                Some(Ok(m)) => {
                    // Not for this group's filter: nothing to do but let it go (ticket 0).
                    let mut ticket = Some(0);
                    for message in decode(&m.payload) {
                        match broker.deliver_shared(broker.remote_message(message), &group, &filter) {
                            Some(outcome) => ticket = ticket.map(|t| t.max(outcome.ticket)),
                            None => {
                                // The last member here left: JetStream gives the message to
                                // another node's. Of a bundle, the stories delivered here
                                // before go again (a duplicate, not a loss).
                                ticket = None;
                                break;
                            }
                        }
                    }
                    let Some(ticket) = ticket else {
                        let _ = m.ack_with(AckKind::Nak(None)).await;
                        break;
                    };
                    if acks.send((ticket, m)).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "reading a shared group from the cluster failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if link.connects() != followed_at {
                        if let Ok((fresh, _)) = link.shared_inbound(&group, &filter, max_pending).await {
                            log = fresh;
                            followed_at = link.connects();
                        }
                    }
                }
                None => break,
            },
            m = qos0.next() => match m {
                Some(m) => {
                    let delivered = decode(&m.payload)
                        .into_iter()
                        .all(|message| broker.deliver_shared(broker.remote_message(message), &group, &filter).is_some());
                    if !delivered {
                        break;
                    }
                }
                None => break,
            },
            _ = idle.tick() => {
                if !broker.has_shared_member(&group, &filter) {
                    break;
                }
            }
        }
    }
    info!(
        group = group.as_str(),
        filter = filter.as_str(),
        "no member of the shared group here any more: stopped reading it"
    );
}

/// Says once a second that this node is alive, and hears the others (and itself: its lease,
/// `cluster::fence`). A task of its own, so that neither routing nor taking sessions over delays
/// a heartbeat.
async fn heartbeats(link: Arc<Link>, mut alive: async_nats::Subscriber) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => link.say_alive().await,
            m = alive.next() => match m {
                Some(m) => link.heard(m.subject.as_str(), &m.payload),
                None => return,
            },
        }
    }
}

/// Takes for dead a node silent for `cluster.dead_after_secs`: its sessions are spread over the
/// live nodes by rendezvous hashing on the client identifier (`sessions::heir`), and each live
/// node takes over its share (`Broker::adopt_all`). Nothing is decided while this node itself
/// cannot reach NATS (every other node would look dead).
///
/// Fencing (`cluster::fence`): when this node's own lease lapses (it was paused, or cut off from
/// NATS, for about `dead_after_secs`), it is fenced; once it hears itself again it asks every
/// live node which of its sessions they took over meanwhile, ends those here (their
/// connections close with 0x8E, their clients resume at the new holder), and lifts the fence.
/// The other nodes' questions are answered here, between takeovers: an answer never misses a
/// takeover under way.
async fn watch_nodes(broker: Arc<Broker>, link: Arc<Link>, mut fences: async_nats::Subscriber) {
    let dead_after = Duration::from_secs(broker.config().cluster.as_ref().map_or(10, |c| c.dead_after_secs));
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected_since = None;
    // Dead nodes whose share of sessions is still to be taken over here, with the live nodes
    // it was shared among.
    let mut unadopted: Vec<(String, Vec<String>)> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = every.tick() => {}
            m = fences.next() => match m {
                Some(m) => {
                    if let Some(reply) = m.reply {
                        link.reply_fence(reply, &m.payload).await;
                    }
                    continue;
                }
                None => return,
            },
        }
        if link.fence.lapsed() {
            if link.fence.fence() {
                link.figures.fenced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(
                    dead_after_secs = dead_after.as_secs(),
                    "this node has not heard itself through NATS for dead_after_secs: fenced; its persistent \
                     sessions write nothing until the other nodes say which of them they took over"
                );
            }
            connected_since = None;
            continue;
        }
        if link.fence.is_fenced() {
            // Heard again: the others' heartbeats come within a second, then they are asked.
            if link.fence.valid_for() < Duration::from_millis(1500) {
                continue;
            }
            match link.ask_fence().await {
                Ok(moved) => {
                    let mut ended = 0;
                    for client_id in &moved {
                        if broker.registry().hand_over(client_id, |_| ()).await.is_some() {
                            ended += 1;
                        }
                    }
                    link.figures.fenced_sessions.fetch_add(ended, std::sync::atomic::Ordering::Relaxed);
                    link.everyone_heard_now();
                    link.fence.lift();
                    warn!(
                        taken_over_elsewhere = moved.len(),
                        ended, "back in touch: the sessions other nodes took over meanwhile ended here; fence lifted"
                    );
                }
                Err(why) => warn!(reason = why.as_str(), "fenced: the other nodes did not all answer; asking again"),
            }
            continue;
        }
        if !link.is_connected() {
            connected_since = None;
            continue;
        }
        // After a NATS outage everyone gets `dead_after` to be heard again.
        let since = *connected_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < dead_after {
            continue;
        }
        let (dead, live) = link.newly_dead(dead_after);
        for node in dead {
            warn!(
                node = node.as_str(),
                live = live.len(),
                "node silent: taken for dead; taking over this node's share of its sessions"
            );
            unadopted.push((node, live.clone()));
        }
        // A takeover that failed (the stream could not be read) is tried again every second:
        // nobody else takes this node's share.
        let mut failed = Vec::new();
        for (node, live) in unadopted.drain(..) {
            let mine = |client_id: &str| cluster::sessions::heir(client_id, &live) == Some(link.node());
            if let Err(e) = broker.adopt_all(&node, &mine).await {
                warn!(
                    node = node.as_str(),
                    error = e.as_str(),
                    "taking over a dead node's sessions failed; trying again"
                );
                failed.push((node, live));
            }
        }
        unadopted = failed;
    }
}

/// Waits for room in the queues of the subscribers a stream message found full, until
/// `mqtt.max_publish_wait_ms` from now; a subscriber still full then loses the message
/// (counted) and is marked congested, as with a local publisher.
async fn wait_for_room(broker: &Broker, blocked: Vec<(Arc<crate::session::SessionShared>, crate::message::Delivery)>) {
    if blocked.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(broker.config().mqtt.max_publish_wait_ms);
    for (target, delivery) in blocked {
        if !target.is_online() {
            broker.give_up_delivery(&target, delivery, false);
            continue;
        }
        match tokio::time::timeout_at(deadline, target.mailbox.reserve()).await {
            Ok(Ok(permit)) => permit.send(delivery),
            Ok(Err(_)) => broker.give_up_delivery(&target, delivery, false),
            Err(_) => broker.give_up_delivery(&target, delivery, true),
        }
    }
}

/// What a session's state hands over: its in-flight messages, then its queue; None when the
/// messages exceed `MAX_HANDOVER_BYTES`.
fn handed_entries(
    state: &crate::session::SessionState,
) -> Option<(Vec<crate::cluster::sessions::HandedEntry>, Vec<u16>)> {
    use crate::message::OutState;
    let mut bytes = 0;
    let mut out = Vec::with_capacity(state.inflight.len() + state.pending.len());
    let entry = |d: &crate::message::Delivery, inflight: Option<(u16, u8)>| crate::cluster::sessions::HandedEntry {
        message: crate::cluster::hex(&crate::store::records::encode_message(&d.message)),
        qos: d.qos as u8,
        retain: d.retain,
        subscription_ids: d.subscription_ids.to_vec(),
        inflight,
    };
    for f in &state.inflight {
        let code = match f.state {
            OutState::AwaitPubAck => 1,
            OutState::AwaitPubRec => 2,
            OutState::AwaitPubComp => 3,
        };
        bytes += f.delivery.message.payload.len() + f.delivery.message.topic.len();
        out.push(entry(&f.delivery, Some((f.packet_id, code))));
    }
    for d in &state.pending {
        bytes += d.message.payload.len() + d.message.topic.len();
        out.push(entry(d, None));
    }
    (bytes <= crate::cluster::sessions::MAX_HANDOVER_BYTES)
        .then(|| (out, state.incoming_qos2.iter().copied().collect()))
}
