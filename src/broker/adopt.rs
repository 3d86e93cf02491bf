//! Cluster mode: a persistent session another node holds, taken over when its client connects
//! here (docs/cluster.md, "Sessions across nodes"). The holder is asked to let go; if it does
//! not answer (it died), its last checkpoint stands in for its answer. Either way the session is
//! made here from its directory record and its messages are read back from the stream, so that
//! no acknowledged message is missing (some may come twice).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Broker;
use crate::cluster::sessions::{HandoverReply, SessionEntry};
use crate::session::Subscription;
use crate::store::records::SessionRecord;
use crate::store::Txn;
use crate::topic::parse_filter;

/// How long the holder has to answer a handover request before it is taken for dead: a
/// holder that is itself taking the session over (from a node shutting down) answers once it
/// has it, which on a loaded machine takes seconds. A holder that is gone answers at once
/// ("no responders").
const HANDOVER_WAIT: Duration = Duration::from_secs(10);
/// How long this node's own appends may take before the stream's end is read.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

impl Broker {
    /// The QoS 2 messages `client_id`'s client received (message id to packet identifier), by
    /// the ledger its holder wrote (`cluster::QOS2_SUBJECT`); empty when it has no QoS 2
    /// subscription, or when the ledger cannot be read (logged: such messages may come again).
    async fn qos2_received(&self, client_id: &str, entry: &SessionEntry) -> HashMap<u64, u16> {
        let Some(link) = self.cluster() else { return HashMap::new() };
        if !entry.subscriptions.iter().any(|s| s.qos == 2) {
            return HashMap::new();
        }
        link.qos2_received(client_id).await.unwrap_or_else(|e| {
            warn!(client_id, error = e.as_str(), "reading a session's received QoS 2 messages failed");
            HashMap::new()
        })
    }

    /// Messages read back from the stream that the client had received at QoS 2: not delivered
    /// again [MQTT-4.3.3-1], but in flight awaiting PUBCOMP with the packet identifier the client
    /// knows, so the PUBREL is sent again on resume [MQTT-4.4.0-1].
    fn install_received(
        &self,
        client_id: &str,
        shared: &Arc<crate::session::SessionShared>,
        received: Vec<(Arc<crate::message::Message>, u16)>,
    ) {
        if received.is_empty() {
            return;
        }
        let n = received.len();
        let entries = received
            .into_iter()
            .map(|(message, packet_id)| crate::cluster::sessions::HandedEntry {
                message: crate::cluster::hex(&crate::store::records::encode_message(&message)),
                qos: 2,
                retain: false,
                subscription_ids: Vec::new(),
                inflight: Some((packet_id, 3)),
            })
            .collect();
        self.install_handed(client_id, shared, entries, Vec::new());
        info!(client_id, messages = n, "QoS 2 messages the client had received: not delivered again");
    }

    /// Whether `session`, parked, already holds message `id`: one this node accepted while the
    /// session was being made here, routed to it then and read back from the stream now.
    fn holds(session: &crate::session::SessionShared, id: u64) -> bool {
        session
            .with_parked(|s| {
                s.pending.iter().any(|d| d.message.id == id) || s.inflight.iter().any(|m| m.delivery.message.id == id)
            })
            .unwrap_or(false)
    }

    /// Sessions read back from the stream up to `upto` are opened to this node's consumer,
    /// after reading what it routed while they were held (`Link::open_to_consumer`): each round
    /// reads what arrived during the one before, so a round is short; after
    /// `CATCH_UP_ROUNDS` the sessions are opened anyway and the last stretch read after.
    /// Returns how many messages were read.
    async fn catch_up(
        link: &crate::cluster::Link,
        sessions: Vec<u64>,
        upto: u64,
        route: &mut impl FnMut(u64, crate::message::Message),
    ) -> Result<u64, String> {
        let mut read_to = upto;
        let mut read = 0;
        for round in 0..=CATCH_UP_ROUNDS {
            let force = round == CATCH_UP_ROUNDS;
            let Some(routed) = link.open_to_consumer(sessions.clone(), read_to, force).await else { break };
            if routed <= read_to {
                break;
            }
            read += link.replay(read_to, routed, &mut *route).await?;
            read_to = routed;
        }
        Ok(read)
    }

    /// After a session taken over here was read back from the stream: what this node accepted
    /// since `mark` (taken before the session was made) and routed to it meanwhile goes behind
    /// what was read back, which is older [MQTT-4.6.0-2]. (The store keeps the order the messages were queued in: after a restart
    /// of this node before they are sent, they go in that order.)
    fn put_routed_last(&self, session: &crate::session::SessionShared, mark: u64) {
        session.with_parked(|s| s.move_to_back(|d| self.accepted_here_since(d.message.id, mark)));
    }

    /// A session from its directory record, parked here with its subscriptions in the router
    /// and its record in the store; returns it with its park generation.
    fn make_adopted(
        &self,
        client_id: &str,
        entry: &SessionEntry,
        record: Option<&SessionRecord>,
    ) -> (Arc<crate::session::SessionShared>, u64) {
        let expiry = entry.expiry;
        let owner = record.and_then(|r| r.owner.clone()).or_else(|| entry.stored().and_then(|r| r.owner));
        let made = self.registry().restore(client_id.to_owned(), owner.clone(), |shared, state| {
            state.expiry_interval = expiry;
            if let Some(link) = self.cluster() {
                // Read back from the stream first; the consumer gives it nothing until then.
                link.hold_from_consumer(shared.id);
            }
            for sub in &entry.subscriptions {
                let Ok(parsed) = parse_filter(&sub.filter) else { continue };
                let options = sub.options();
                self.subscribe(&parsed, Subscription { session: shared.clone(), options, identifier: sub.identifier });
                state.subscriptions.insert(sub.filter.clone(), (options, sub.identifier));
            }
        });
        let mut txn = Txn::default();
        let now_ms = crate::clock::wall_ms_now();
        let record = record.cloned().unwrap_or(SessionRecord {
            expiry_interval: expiry,
            disconnected_at_ms: now_ms,
            will: None,
            owner,
        });
        txn.put_session(client_id, &record);
        for sub in &entry.subscriptions {
            txn.put_subscription(client_id, &sub.filter, &sub.options(), sub.identifier);
        }
        self.store().commit(txn);
        made
    }

    /// Puts what the holder handed over into the session made here: stored like routed
    /// deliveries (QoS 1 and 2), in flight with their packet identifiers, queued in order.
    /// Returns the handed messages' ids, which reading the stream then skips.
    fn install_handed(
        &self,
        client_id: &str,
        shared: &Arc<crate::session::SessionShared>,
        entries: Vec<crate::cluster::sessions::HandedEntry>,
        incoming_qos2: Vec<u16>,
    ) -> std::collections::HashSet<u64> {
        use crate::message::QueueRef;
        let mut given = std::collections::HashSet::new();
        let mut txn = Txn::default();
        let mut loaded = Vec::with_capacity(entries.len());
        for handed in entries {
            let Some((message, mut entry)) = handed.decode() else {
                warn!(client_id, "an undecodable message in a handed-over session; skipped");
                continue;
            };
            given.insert(message.id);
            self.prepare_loaded(&message);
            let mut at = QueueRef { seq: 0, message_id: 0 };
            if entry.qos > crate::codec::QoS::AtMostOnce {
                let id = self.store().next_seq();
                let _ = message.store_id.set(id);
                txn.put_message(id, &message);
                entry.message_id = id;
                at = QueueRef { seq: self.store().next_seq(), message_id: id };
                txn.enqueue(client_id, at, &entry);
            }
            loaded.push((at, entry, Arc::new(message)));
        }
        for packet_id in &incoming_qos2 {
            txn.put_incoming(client_id, *packet_id);
        }
        self.store().commit(txn);
        shared.with_parked(|state| {
            state.install(loaded);
            state.incoming_qos2.extend(incoming_qos2);
            // Handed identifiers may sit anywhere in the identifier space.
            state.allocations = u64::from(u16::MAX);
        });
        given
    }

    /// Takes over the sessions a node that died held for which `mine` says this node is the heir
    /// (each live node takes its share, when the node has been silent for
    /// `cluster.dead_after_secs`): each is made here from its
    /// directory record, the stream is read once from the oldest `since` for all of them, their
    /// expiry runs from their disconnection (from now for those connected when the node died)
    /// and their wills are published when due, once [MQTT-3.1.2-8] [MQTT-3.1.3-9].
    pub async fn adopt_all(
        self: &Arc<Self>,
        node: &str,
        mine: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<usize, String> {
        let Some(link) = self.cluster().cloned() else { return Ok(0) };
        let started = Instant::now();
        let checkpoint = link.checkpoint_of(node).unwrap_or(0);
        // Messages accepted here from now on may reach the sessions as they are made (below)
        // and again from the stream: `holds` tells.
        let making = self.message_id_mark();
        let mut made = Vec::new();
        let mut since_of = std::collections::HashMap::new();
        for (client_id, entry) in link.held_by(node) {
            if !mine(&client_id) || self.registry().get(&client_id).is_some() {
                continue;
            }
            let since = checkpoint.max(entry.since);
            let now_ms = crate::clock::wall_ms_now();
            let mut record = entry.stored().unwrap_or(SessionRecord {
                expiry_interval: entry.expiry,
                disconnected_at_ms: 0,
                will: None,
                owner: None,
            });
            // Connected when its node died: offline from now.
            if record.disconnected_at_ms == 0 {
                record.disconnected_at_ms = now_ms;
            }
            let (shared, generation) = self.make_adopted(&client_id, &entry, Some(&record));
            link.adopted(&client_id, since);
            since_of.insert(shared.id, since);
            made.push((client_id, entry, record, shared, generation));
        }
        if made.is_empty() {
            return Ok(0);
        }
        // Said to `node` if it comes back (`cluster::fence`): these are no longer its own.
        link.record_adopted(node, made.iter().map(|m| m.0.clone()));
        // The other nodes send what these sessions want here from now on; what came before is
        // read from the stream below.
        link.interest_settled().await;
        // Messages this node accepts from now on reach the sessions as they are routed: the
        // stream's copies of them are not routed to them again.
        let mark = self.message_id_mark();
        let from = since_of.values().copied().min().unwrap_or(0);
        let pin = link.pin(from);
        let mut ledgers: HashMap<u64, HashMap<u64, u16>> = HashMap::new();
        for m in &made {
            let ledger = self.qos2_received(&m.0, &m.1).await;
            if !ledger.is_empty() {
                ledgers.insert(m.3.id, ledger);
            }
        }
        let mut received: HashMap<u64, Vec<(Arc<crate::message::Message>, u16)>> = HashMap::new();
        let shared_of: HashMap<u64, Arc<crate::session::SessionShared>> =
            made.iter().map(|m| (m.3.id, m.3.clone())).collect();
        let read = async {
            let upto = link.settled_end(SETTLE_WAIT).await?;
            let mut route = |seq: u64, message: crate::message::Message| {
                if self.accepted_here_since(message.id, mark) {
                    return;
                }
                let message = Arc::new(message);
                let received_by = |id: u64| ledgers.get(&id).and_then(|l| l.get(&message.id)).copied();
                // Only the sessions with a ledger (a QoS 2 subscription): not every session per message.
                for (session, ledger) in &ledgers {
                    let Some(packet_id) = ledger.get(&message.id) else { continue };
                    if since_of.get(session).is_some_and(|since| *since < seq) {
                        received.entry(*session).or_default().push((message.clone(), *packet_id));
                    }
                }
                let raced = self.accepted_here_since(message.id, making);
                let wanted = |id: u64| {
                    since_of.get(&id).is_some_and(|since| *since < seq)
                        && received_by(id).is_none()
                        && !(raced && shared_of.get(&id).is_some_and(|s| Self::holds(s, message.id)))
                };
                self.route_to(message.clone(), false, Some(&wanted), None);
            };
            let mut read = link.replay(from, upto, &mut route).await?;
            // The consumer takes over where this reading ends; what it routed meanwhile
            // (held from these sessions) is read here.
            let sessions: Vec<u64> = made.iter().map(|m| m.3.id).collect();
            read += Self::catch_up(&link, sessions, upto, &mut route).await?;
            Ok::<_, String>(read)
        }
        .await;
        link.unpin(pin, self.store().peek_next_seq());
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                // Not half made: the sessions go, the dead node's records stay, and the caller
                // tries again.
                for (client_id, _, _, shared, _) in made {
                    link.forget_floor(shared.id);
                    drop(shared);
                    self.registry().disconnect(&client_id, crate::codec::ReasonCode::SERVER_UNAVAILABLE, true).await;
                }
                return Err(e);
            }
        };
        let now_ms = crate::clock::wall_ms_now();
        for (client_id, entry, record, shared, generation) in &made {
            self.install_received(client_id, shared, received.remove(&shared.id).unwrap_or_default());
            self.put_routed_last(shared, making);
            link.record_session(client_id, record, entry.subscriptions.clone());
            link.forget_record(client_id, node);
            let elapsed = now_ms.saturating_sub(record.disconnected_at_ms) / 1000;
            if let Some(will) = record.will.clone() {
                let delay = will.properties.will_delay_interval.unwrap_or(0).min(record.expiry_interval);
                self.schedule_will(shared, will, u64::from(delay).saturating_sub(elapsed), record.disconnected_at_ms);
            }
            if record.expiry_interval != u32::MAX {
                let left = u64::from(record.expiry_interval).saturating_sub(elapsed);
                self.registry().schedule_expiry(shared.clone(), left, *generation);
            }
        }
        link.figures.adopted.fetch_add(made.len() as u64, std::sync::atomic::Ordering::Relaxed);
        info!(
            node,
            sessions = made.len(),
            from,
            read,
            ms = started.elapsed().as_millis() as u64,
            "sessions of a node that died taken over"
        );
        Ok(made.len())
    }

    /// Takes over `client_id`'s session from the node holding it, if the directory names one
    /// and this node holds none. Err when the stream cannot be read (the CONNECT is refused,
    /// and the directory keeps the holder's record for the next try).
    pub async fn adopt(&self, client_id: &str) -> Result<(), String> {
        self.adopt_as(client_id, false).await
    }

    /// `adopt` for a session whose client is not connecting here: a node shutting down hands it
    /// over (`leave`). It stays parked here, in the directory under this node, its expiry
    /// running from now.
    pub async fn take_over(&self, client_id: &str) -> Result<(), String> {
        self.adopt_as(client_id, true).await
    }

    async fn adopt_as(&self, client_id: &str, offline: bool) -> Result<(), String> {
        let Some(link) = self.cluster().cloned() else { return Ok(()) };
        if !link.fence.may_deliver() {
            // Until the other nodes said which sessions they took over (`cluster::fence`).
            return Err("this node is fenced: it was out of touch with the cluster".into());
        }
        let _one_at_a_time = link.adopting(client_id).await;
        if self.registry().get(client_id).is_some() {
            return Ok(());
        }
        let Some((mut holder, entry)) = link.holder(client_id) else { return Ok(()) };
        let started = Instant::now();
        let mut asked = link.ask_handover(&holder, client_id, HANDOVER_WAIT).await;
        if let Ok(HandoverReply { held: false, moved_to: Some(heir), .. }) = &asked {
            // The holder, shutting down, handed it to another node just now: ask that one.
            if heir.as_str() != link.node() {
                holder = heir.clone();
                asked = link.ask_handover(&holder, client_id, HANDOVER_WAIT).await;
            }
        }
        let (floor, holder_alive, handed, processed) = match asked {
            Ok(reply) if !reply.held => {
                // The holder's session ended meanwhile (its record's removal is on its way).
                return Ok(());
            }
            Ok(reply) => {
                let handed = reply.entries.map(|entries| (entries, reply.incoming_qos2));
                (reply.checkpoint, true, handed, reply.processed)
            }
            Err(why) => {
                let checkpoint = link.checkpoint_of(&holder).unwrap_or(0);
                warn!(
                    client_id,
                    node = holder.as_str(),
                    reason = why.as_str(),
                    checkpoint,
                    "the node holding this session does not answer: reading it back from its last checkpoint"
                );
                (checkpoint, false, None, 0)
            }
        };
        let since = floor.max(entry.since);
        if self.registry().get(client_id).is_some() {
            return Ok(());
        }
        let offline_record = offline.then(|| {
            let mut record = entry.stored().unwrap_or(SessionRecord {
                expiry_interval: entry.expiry,
                disconnected_at_ms: 0,
                will: None,
                owner: None,
            });
            record.disconnected_at_ms = crate::clock::wall_ms_now();
            record
        });
        // Messages accepted here from now on may reach the session as it is made and again from
        // the stream: `holds` tells.
        let making = self.message_id_mark();
        let (shared, generation) = self.make_adopted(client_id, &entry, offline_record.as_ref());
        // Routed to it as they are accepted from now on: not read back from the stream too.
        let mark = self.message_id_mark();
        link.adopted(client_id, since);
        // Bodies numbered from here on (what the holder handed over, what the stream gives back)
        // may hold messages as old as `since`.
        let pin = link.pin(since);
        // Handed over whole: its queue and in-flight messages as the holder had them (in-flight
        // ones are sent again with DUP on resume [MQTT-4.4.0-1]); only what reached the holder
        // after it let go is read from the stream. Otherwise everything above `since` is.
        let (from, given) = match handed {
            Some((entries, incoming)) => {
                (processed.max(entry.since), self.install_handed(client_id, &shared, entries, incoming))
            }
            None => (since, std::collections::HashSet::new()),
        };
        // Its subscriptions are in the router, and the other nodes know this node wants them
        // (`cluster::interest`): what is routed from now on reaches it. What came before, back
        // to `from`, is read from the stream, up to an end that includes every append this node
        // started before now.
        link.interest_settled().await;
        let ledger = self.qos2_received(client_id, &entry).await;
        let mut received = Vec::new();
        let read = async {
            let upto = link.settled_end(SETTLE_WAIT).await?;
            let session = shared.id;
            let mut route = |_: u64, message: crate::message::Message| {
                let handed = message.id != 0 && given.contains(&message.id);
                let routed_here = self.accepted_here_since(message.id, mark)
                    || (self.accepted_here_since(message.id, making) && Self::holds(&shared, message.id));
                if handed || routed_here {
                    return;
                }
                match ledger.get(&message.id) {
                    Some(packet_id) => received.push((Arc::new(message), *packet_id)),
                    None => {
                        self.route_to(Arc::new(message), false, Some(&|id| id == session), None);
                    }
                }
            };
            let mut read = link.replay(from, upto, &mut route).await?;
            // The consumer takes over where this reading ends; what it routed meanwhile (held
            // from this session) is read here.
            read += Self::catch_up(&link, vec![session], upto, &mut route).await?;
            Ok::<_, String>((upto, read))
        }
        .await;
        link.unpin(pin, self.store().peek_next_seq());
        self.install_received(client_id, &shared, received);
        match read {
            Ok((upto, read)) => {
                self.put_routed_last(&shared, making);
                if !holder_alive {
                    link.forget_record(client_id, &holder);
                }
                if let Some(record) = offline_record {
                    // No CONNECT writes its record here: this does, and its expiry runs.
                    link.record_session(client_id, &record, entry.subscriptions.clone());
                    if record.expiry_interval != u32::MAX {
                        self.registry().schedule_expiry(shared.clone(), u64::from(record.expiry_interval), generation);
                    }
                }
                link.figures.adopted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(
                    client_id,
                    from = holder.as_str(),
                    alive = holder_alive,
                    handed = given.len(),
                    since,
                    upto,
                    read,
                    ms = started.elapsed().as_millis() as u64,
                    "session taken over from another node"
                );
                Ok(())
            }
            Err(why) if holder_alive => {
                // The holder ended its copy when it handed the session over: this one is all
                // there is, so it stays, with what was handed; what reached the old holder after
                // it let go may be missing.
                link.forget_floor(shared.id);
                tracing::error!(
                    client_id,
                    from = holder.as_str(),
                    reason = why.as_str(),
                    "a session handed over could not be read up from the stream: kept with what was handed"
                );
                Ok(())
            }
            Err(why) => {
                // Not half made: the session goes, the holder's record stays for the next try.
                link.forget_floor(shared.id);
                drop(shared);
                self.registry().disconnect(client_id, crate::codec::ReasonCode::SERVER_UNAVAILABLE, true).await;
                Err(why)
            }
        }
    }
}

impl Broker {
    /// Cluster mode, shutting down (after the connections closed with 0x8B): hands every
    /// persistent session this node holds to a live node, whole, as a live handover does. Each
    /// goes to its heir among the live nodes (`sessions::heir`, the node its clients' Server
    /// Reference names), which takes it over from here (`take_over`) while this node still
    /// answers handovers. At most `LEAVE_AT_ONCE` at a time, within `within`; a session not
    /// handed over in time stays here and moves when its client reconnects elsewhere, read back
    /// from the stream (docs/cluster.md). Returns (handed over, left here).
    pub async fn leave(&self, within: Duration) -> (usize, usize) {
        use futures_util::StreamExt;
        let Some(link) = self.cluster().cloned() else { return (0, 0) };
        let sessions = link.own_sessions();
        let live = link.live_others();
        if sessions.is_empty() {
            return (0, 0);
        }
        if live.is_empty() || !link.fence.may_deliver() {
            warn!(sessions = sessions.len(), "no live node to hand the sessions to: they stay here");
            return (0, sessions.len());
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + within;
        // Owned futures, each with its own copies: a borrowed stream makes the server's future
        // not `Send` (a higher-ranked lifetime the compiler cannot prove).
        let asks: Vec<_> = sessions
            .iter()
            .map(|client_id| {
                let heir = crate::cluster::sessions::heir(client_id, &live).expect("live is not empty").to_owned();
                let (link, client_id) = (link.clone(), client_id.clone());
                async move {
                    let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match link.ask_take(&heir, &client_id, wait).await {
                        Ok(()) => true,
                        Err(why) => {
                            let (client_id, node) = (client_id.as_str(), heir.as_str());
                            warn!(client_id, node, reason = why.as_str(), "session not handed over");
                            false
                        }
                    }
                }
            })
            .collect();
        let mut running = futures_util::stream::iter(asks).buffer_unordered(LEAVE_AT_ONCE);
        let mut handed = 0;
        while let Some(ok) = running.next().await {
            handed += usize::from(ok);
        }
        info!(
            handed,
            left = sessions.len() - handed,
            nodes = live.len(),
            ms = started.elapsed().as_millis() as u64,
            "shutting down: persistent sessions handed to the live nodes"
        );
        (handed, sessions.len() - handed)
    }
}

/// Rounds of reading what the consumer routed meanwhile before a session taken over is opened
/// to it regardless (`Broker::catch_up`).
const CATCH_UP_ROUNDS: usize = 8;

/// Sessions a node shutting down hands over at once.
const LEAVE_AT_ONCE: usize = 32;
