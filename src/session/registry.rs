//! The session registry: client identifier to session, and the one writer of every session's
//! lifecycle [MQTT-4.1]. A connection claims a session (a new one, the parked one, or one another
//! connection holds, which is then asked to let go [MQTT-3.1.4-3]) and releases it when it
//! closes (parked, or ended); recovery puts back what the store held; the admin API removes one;
//! timers expire parked sessions [MQTT-3.1.2-23] and publish delayed wills [MQTT-3.1.3-9].
//!
//! Who holds a session, whether it is online, persistent or stored, its parked state, its will
//! and its expiry all change here and nowhere else, each change under the session's `ownership`
//! lock, so that going offline and parking are one step (see `release`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{debug, error};

use super::{ClientInfo, Kick, Router, SessionShared, SessionState};
use crate::codec::{ReasonCode, Will};
use crate::metrics::Metrics;
use crate::store::records::SessionRecord;
use crate::store::{Store, Txn};

/// How long a claim waits for the connection that holds the session to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

pub struct Registry {
    /// Lock order: `sessions`, then a session's `ownership`, then the router's tree.
    sessions: Mutex<HashMap<String, Arc<SessionShared>>>,
    router: Arc<Router>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    /// Each session's mailbox bound (`mqtt.max_queued_messages`).
    queue_capacity: usize,
    /// Gives a body read back from the store what the broker above knows of it (its priority
    /// class and its receipt); set once by the broker.
    prepare: std::sync::OnceLock<Prepare>,
    /// Restored queues being read at once (`storage.queue_readers`): a thousand phones returning
    /// together after a restart wait here instead of occupying a thousand blocking threads.
    loads: tokio::sync::Semaphore,
    /// Cluster mode: a persistent session that ends here has its directory record removed.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Link>>,
}

/// See `Registry::set_prepare`.
pub type Prepare = Arc<dyn Fn(&crate::message::Message) + Send + Sync>;

/// What a connection asks for when it claims a session.
pub struct Claim {
    pub client_id: String,
    pub clean_start: bool,
    /// 0: the session ends with the connection; `u32::MAX`: it never expires.
    pub expiry_interval: u32,
    /// Stored with a persistent session's record, so that a restart still publishes it.
    pub will: Option<Will>,
    pub conn_id: u64,
    /// How the registry asks this connection to let go later.
    pub kick: oneshot::Sender<Kick>,
    pub client: ClientInfo,
    /// The identity claiming the session (`auth::Login::owner`), recorded as the owner of a
    /// session it makes (or of one with no owner yet); None for the operator, who owns nothing.
    pub owner: Option<String>,
    /// Whether a session of another owner is refused (`auth.session_owner`).
    pub enforce_owner: bool,
}

/// A claimed session: the connection owns `state` until it releases it.
pub struct Claimed {
    pub shared: Arc<SessionShared>,
    pub state: SessionState,
    /// Whether an existing session was resumed [MQTT-3.2.2-2].
    pub present: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("the session's previous connection did not let go")]
    TakeoverTimeout,
    /// The session belongs to another identity: nothing of it was changed.
    #[error("the session belongs to another identity")]
    NotOwner { owner: String },
}

/// How a connection lets go of its session.
pub struct Release {
    pub conn_id: u64,
    pub expiry_interval: u32,
    /// A will scheduled for later (see `schedule_will`), kept in the stored record until then.
    pub will_due: Option<Will>,
    /// Another connection took the session over: it is parked for that one, with no record
    /// rewritten and no expiry timer.
    pub taken_over: bool,
    pub now_ms: u64,
}

/// Session figures for `$SYS` and the API, counted over the registry.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionCounts {
    pub total: u64,
    pub online: u64,
    /// Messages waiting: in mailboxes, and in parked sessions' queues.
    pub queued: u64,
    /// Messages in flight in parked sessions (a connected session's in-flight window is its own).
    pub inflight: u64,
    /// Payload bytes queued in parked sessions.
    pub queued_bytes: u64,
}

impl Registry {
    pub fn new(
        router: Arc<Router>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        queue_capacity: usize,
        queue_readers: usize,
    ) -> Registry {
        Registry {
            sessions: Mutex::default(),
            router,
            store,
            metrics,
            next_id: AtomicU64::new(1),
            queue_capacity,
            prepare: std::sync::OnceLock::new(),
            loads: tokio::sync::Semaphore::new(queue_readers.max(1)),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// How a body read back from the store is made ready for delivery (see `warm`).
    pub fn set_cluster(&self, link: Arc<crate::cluster::Link>) {
        let _ = self.cluster.set(link);
    }

    pub fn set_prepare(&self, prepare: Prepare) {
        let _ = self.prepare.set(prepare);
    }

    fn prepare(&self) -> Prepare {
        self.prepare.get().cloned().unwrap_or_else(|| Arc::new(|_| {}))
    }

    /// Reads a restored session's queue from the store on a blocking thread, when it is still
    /// there: a session coming back. A read error leaves it cold (counted, and read again at the
    /// next claim) and is logged; nothing is dropped for it.
    async fn warm(&self, client_id: &str, state: &mut SessionState) {
        if !state.is_cold() {
            return;
        }
        let _permit = self.loads.acquire().await.expect("never closed");
        let (store, id, prepare) = (self.store.clone(), client_id.to_owned(), self.prepare());
        let loaded = tokio::task::spawn_blocking(move || store.load_queue(&id, &*prepare).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        install(client_id, state, loaded);
    }

    /// `warm`, on the calling thread: for routing, when a full cold queue's policy must see its
    /// entries (`SessionState::needs_entries`), once per restored session at most.
    pub fn warm_now(&self, client_id: &str, state: &mut SessionState) {
        if !state.is_cold() {
            return;
        }
        install(client_id, state, self.store.load_queue(client_id, &*self.prepare()).map_err(|e| e.to_string()));
    }

    fn new_session(&self, client_id: String) -> (Arc<SessionShared>, SessionState) {
        SessionShared::new(self.next_id.fetch_add(1, Ordering::Relaxed), client_id, self.queue_capacity)
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<SessionShared>> {
        self.sessions.lock().expect("sessions lock").get(client_id).cloned()
    }

    /// A copy of the session list; the registry's lock is held only to copy it.
    pub fn list(&self) -> Vec<Arc<SessionShared>> {
        self.sessions.lock().expect("sessions lock").values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().expect("sessions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts sessions, those connected, and what waits in their queues. Walks every session:
    /// for `$SYS` and scrapes, never the hot path.
    pub fn counts(&self) -> SessionCounts {
        let sessions = self.list();
        let mut counts = SessionCounts { total: sessions.len() as u64, ..Default::default() };
        for s in &sessions {
            counts.queued += (s.mailbox.max_capacity() - s.mailbox.capacity()) as u64;
            if s.is_online() {
                counts.online += 1;
            } else if let Some(p) = s.parked_figures() {
                counts.queued += p.queued as u64;
                counts.queued_bytes += p.queued_bytes as u64;
                counts.inflight += p.inflight as u64;
            }
        }
        counts
    }

    /// Takes the session of `claim.client_id` for a connection: a new one, the parked one, or the
    /// one another connection holds, which is asked to close with 0x8E [MQTT-3.1.4-3] and waited
    /// for (with no lock held) until it has parked the state. A clean start, or a parked session
    /// that was not persistent, ends the old session first [MQTT-3.1.2-4]. A delayed will of the
    /// previous connection is cancelled [MQTT-3.1.3-9]. Then the session's record is written
    /// (or, for a session no longer persistent, removed) before any SUBSCRIBE can be handled.
    ///
    /// A session that belongs to another identity is refused first, before anything of it (its
    /// holder, its will, its queue) changes.
    pub async fn claim(&self, claim: Claim) -> Result<Claimed, ClaimError> {
        let give_up = tokio::time::Instant::now() + TAKEOVER_WAIT;
        let mut kick = Some(claim.kick);
        let client_id = claim.client_id.as_str();
        let (shared, mut state, present) = loop {
            let existing = {
                let mut sessions = self.sessions.lock().expect("sessions lock");
                match sessions.get(client_id).cloned() {
                    None => {
                        let (shared, state) = self.new_session(client_id.to_owned());
                        {
                            let mut own = shared.ownership.lock().expect("ownership lock");
                            own.owner = claim.owner.clone();
                            own.holder = Some((claim.conn_id, kick.take()));
                            shared.online.store(true, Ordering::SeqCst);
                        }
                        sessions.insert(client_id.to_owned(), shared.clone());
                        break (shared, state, false);
                    }
                    Some(existing) => {
                        let mut own = existing.ownership.lock().expect("ownership lock");
                        if let (true, Some(owner), Some(claimant)) =
                            (claim.enforce_owner, own.owner.as_ref(), claim.owner.as_ref())
                        {
                            if owner != claimant {
                                return Err(ClaimError::NotOwner { owner: owner.clone() });
                            }
                        }
                        if own.owner.is_none() {
                            own.owner = claim.owner.clone();
                        }
                        if let Some(cancel) = own.pending_will.take() {
                            let _ = cancel.send(());
                        }
                        if let Some(state) = own.parked.take() {
                            if claim.clean_start || state.expiry_interval == 0 {
                                drop(own);
                                sessions.remove(client_id);
                                drop(sessions);
                                self.end(&existing, state);
                                continue;
                            }
                            own.holder = Some((claim.conn_id, kick.take()));
                            existing.online.store(true, Ordering::SeqCst);
                            drop(own);
                            break (existing, state, true);
                        }
                        own.kick(ReasonCode::SESSION_TAKEN_OVER);
                        drop(own);
                        existing
                    }
                }
            };
            let notified = existing.parked_notify.notified();
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            if tokio::time::Instant::now() > give_up {
                return Err(ClaimError::TakeoverTimeout);
            }
        };
        // A session restored at start comes back with its queue still in the store.
        self.warm(client_id, &mut state).await;
        let expiry = claim.expiry_interval;
        shared.persistent.store(expiry > 0, Ordering::Release);
        state.expiry_interval = expiry;
        if expiry > 0 {
            // Written before any SUBSCRIBE of this connection, whose SUBACK waits for the store.
            let mut txn = Txn::default();
            let owner = shared.owner();
            let record = SessionRecord { expiry_interval: expiry, disconnected_at_ms: 0, will: claim.will, owner };
            txn.put_session(client_id, &record);
            self.store.commit(txn);
            shared.stored.store(true, Ordering::Release);
        } else if shared.stored.swap(false, Ordering::AcqRel) {
            // A stored session resumed without an expiry interval ends with this connection.
            let mut txn = Txn::default();
            txn.remove_session(client_id, state.forget_stored());
            self.store.commit(txn);
        }
        let mut client = claim.client;
        client.subscriptions = state.subscriptions.len();
        shared.ownership.lock().expect("ownership lock").client = client;
        Ok(Claimed { shared, state, present })
    }

    /// Lets go of a session when its connection closes: ends it if it does not outlive the
    /// connection, parks it otherwise. Parking is one step under the session's lock: what the
    /// high-priority lane and the mailbox hold moves to the parked queue, the session goes
    /// offline, and the state is parked, so that no message routed meanwhile can land behind a
    /// later one (`SessionShared::absorb_stragglers` covers a delivery already on its way).
    pub fn release(self: &Arc<Self>, shared: Arc<SessionShared>, mut state: SessionState, r: Release) {
        state.expiry_interval = r.expiry_interval;
        shared.ownership.lock().expect("ownership lock").client.disconnected_at_ms = r.now_ms;
        if r.expiry_interval == 0 && !r.taken_over {
            {
                let mut own = shared.ownership.lock().expect("ownership lock");
                shared.online.store(false, Ordering::SeqCst);
                if own.holder.as_ref().is_some_and(|(id, _)| *id == r.conn_id) {
                    own.holder = None;
                }
            }
            self.end(&shared, state);
            return;
        }
        if shared.is_persistent() && !r.taken_over {
            let mut txn = Txn::default();
            let record = SessionRecord {
                expiry_interval: r.expiry_interval,
                disconnected_at_ms: r.now_ms,
                will: r.will_due,
                owner: shared.owner(),
            };
            txn.put_session(&shared.client_id, &record);
            self.store.commit(txn);
            shared.stored.store(true, Ordering::Release);
            if let Some(link) = self.cluster.get() {
                // For the node that takes the session over if this one dies: offline since
                // now, and the will still due.
                let subscriptions = crate::cluster::sessions::entry_subscriptions(&state.subscriptions);
                link.record_session(&shared.client_id, &record, subscriptions);
            }
        }
        let generation = {
            let mut own = shared.ownership.lock().expect("ownership lock");
            shared.online.store(false, Ordering::SeqCst);
            if let Some(urgent) = shared.urgent.get() {
                for d in urgent.queue.lock().expect("urgent lock").drain(..) {
                    state.push_pending(d);
                }
            }
            state.absorb_mailbox();
            own.holder = None;
            own.parked = Some(state);
            own.park_generation += 1;
            own.park_generation
        };
        shared.parked_notify.notify_one();
        if r.expiry_interval != u32::MAX && !r.taken_over {
            self.schedule_expiry(shared, u64::from(r.expiry_interval), generation);
        }
    }

    /// Ends a parked session after `secs` unless it was resumed (or parked again) meanwhile.
    pub fn schedule_expiry(self: &Arc<Self>, shared: Arc<SessionShared>, secs: u64, generation: u64) {
        let registry = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            registry.expire(&shared, generation);
        });
    }

    /// Ends a parked session whose expiry interval has passed, unless it was resumed meanwhile.
    pub fn expire(&self, shared: &Arc<SessionShared>, generation: u64) {
        let state = {
            let mut own = shared.ownership.lock().expect("ownership lock");
            if own.holder.is_some() || own.park_generation != generation {
                return;
            }
            own.parked.take()
        };
        if let Some(state) = state {
            debug!(client_id = shared.client_id.as_str(), "session expired");
            self.metrics.sessions_expired.fetch_add(1, Ordering::Relaxed);
            self.end(shared, state);
        }
    }

    /// Publishes a will after `delay` seconds unless the session is resumed first
    /// [MQTT-3.1.3-9]; once published, the stored session record no longer carries it.
    /// `publish` is the broker's: the registry sits below it.
    pub fn schedule_will(
        &self,
        shared: &Arc<SessionShared>,
        will: Will,
        delay: u64,
        disconnected_at_ms: u64,
        publish: impl FnOnce(Will) + Send + 'static,
    ) {
        let (tx, rx) = oneshot::channel::<()>();
        shared.ownership.lock().expect("ownership lock").pending_will = Some(tx);
        let shared = shared.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(delay)) => {
                    publish(will);
                    let mut own = shared.ownership.lock().expect("ownership lock");
                    own.pending_will = None;
                    if let (Some(parked), true) = (own.parked.as_ref(), shared.stored.load(Ordering::Acquire)) {
                        let mut txn = Txn::default();
                        let record = SessionRecord {
                            expiry_interval: parked.expiry_interval,
                            disconnected_at_ms,
                            will: None,
                            owner: own.owner.clone(),
                        };
                        txn.put_session(&shared.client_id, &record);
                        store.commit(txn);
                    }
                }
                _ = rx => {}
            }
        });
    }

    /// Drops a session for good: its subscriptions leave the tree, its records leave the store
    /// and it leaves the registry, unless a newer session has taken its client identifier since.
    pub fn end(&self, shared: &Arc<SessionShared>, mut state: SessionState) {
        let mut held = state.take_stored_refs();
        if state.is_cold() {
            // Never came back since the start: its entries' bodies are released without being read.
            match self.store.cold_refs(&shared.client_id) {
                Ok(refs) => held.extend(refs),
                Err(e) => {
                    error!(client_id = shared.client_id.as_str(), error = %e, "reading an ended session's queue failed; its bodies stay until the next start")
                }
            }
        }
        let stored = shared.stored.swap(false, Ordering::AcqRel);
        if stored || !held.is_empty() {
            let mut txn = Txn::default();
            txn.remove_session(&shared.client_id, held);
            self.store.commit(txn);
        }
        if let (true, Some(link)) = (stored, self.cluster.get()) {
            link.forget_session(&shared.client_id);
        }
        let filters = state.subscriptions.keys().filter_map(|f| crate::topic::parse_filter(f).ok());
        self.router.unsubscribe_all(filters, shared.id);
        if let Some(link) = self.cluster.get() {
            for parsed in state.subscriptions.keys().filter_map(|f| crate::topic::parse_filter(f).ok()) {
                link.interest_remove(parsed.share.is_some(), parsed.filter);
            }
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if sessions.get(&shared.client_id).is_some_and(|s| s.id == shared.id) {
            sessions.remove(&shared.client_id);
        }
    }

    /// Asks the connection holding `client_id`'s session to close with `reason` and, with
    /// `remove_session`, ends the session once it is parked (waiting up to 5 s for that, with no
    /// lock held). A delayed will stays scheduled: removing the session must not lose it.
    /// Returns false if there is no such session.
    pub async fn disconnect(&self, client_id: &str, reason: ReasonCode, remove_session: bool) -> bool {
        self.disconnect_with(client_id, super::Kick { reason, elsewhere: false }, remove_session).await
    }

    /// Cluster mode: `client_id` connected to another node. The connection here closes with
    /// 0x8E [MQTT-3.1.4-3] and parks the session as after an ordinary disconnection (its expiry
    /// runs); with a clean start the session ends here too [MQTT-3.1.2-4].
    pub async fn taken_over_elsewhere(&self, client_id: &str, clean_start: bool) -> bool {
        let kick = super::Kick { reason: ReasonCode::SESSION_TAKEN_OVER, elsewhere: true };
        self.disconnect_with(client_id, kick, clean_start).await
    }

    async fn disconnect_with(&self, client_id: &str, kick: super::Kick, remove_session: bool) -> bool {
        let Some(session) = self.get(client_id) else {
            return false;
        };
        let was_online = {
            let mut own = session.ownership.lock().expect("ownership lock");
            own.send_kick(kick);
            own.holder.is_some()
        };
        if !remove_session {
            return true;
        }
        // None: ended with its connection (not persistent), never held, or not let go in time.
        if let Some(state) = self.take_parked(&session, was_online).await {
            self.end(&session, state);
        }
        true
    }

    /// Waits (with `wait`, up to 5 s, with no lock held) until no connection holds the session,
    /// and takes its parked state; None if it has none (it ended with its connection) or was
    /// still held.
    async fn take_parked(&self, session: &SessionShared, wait: bool) -> Option<SessionState> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = session.parked_notify.notified();
            {
                let mut own = session.ownership.lock().expect("ownership lock");
                if own.holder.is_none() {
                    own.park_generation += 1;
                    return own.parked.take();
                }
            }
            if !wait || tokio::time::Instant::now() > deadline {
                return None;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// Cluster mode: another node takes `client_id`'s session. Its connection, if any, closes
    /// with 0x8E [MQTT-3.1.4-3]; once the session is parked (waiting up to 5 s, with no lock
    /// held) its state, with a restored queue read back, is given to `take`, and the session
    /// ends here. None when there is no such session or it did not park in time.
    pub async fn hand_over<T>(&self, client_id: &str, take: impl FnOnce(&SessionState) -> T) -> Option<T> {
        let session = self.get(client_id)?;
        session
            .ownership
            .lock()
            .expect("ownership lock")
            .send_kick(super::Kick { reason: ReasonCode::SESSION_TAKEN_OVER, elsewhere: true });
        let mut state = self.take_parked(&session, true).await?;
        self.warm(client_id, &mut state).await;
        let taken = take(&state);
        self.end(&session, state);
        Some(taken)
    }

    /// Asks every connection that holds a session to close with `reason` (shutdown).
    pub fn kick_all(&self, reason: ReasonCode) {
        for s in self.list() {
            s.ownership.lock().expect("ownership lock").kick(reason);
        }
    }

    /// A session read back from the store at start, parked with its state; its subscriptions are
    /// the caller's to put in the router. Returns its handle and its park generation, for the
    /// expiry timer.
    pub fn restore(
        &self,
        client_id: String,
        owner: Option<String>,
        fill: impl FnOnce(&Arc<SessionShared>, &mut SessionState),
    ) -> (Arc<SessionShared>, u64) {
        let (shared, mut state) = self.new_session(client_id.clone());
        shared.persistent.store(true, Ordering::Release);
        shared.stored.store(true, Ordering::Release);
        fill(&shared, &mut state);
        {
            let mut own = shared.ownership.lock().expect("ownership lock");
            own.owner = owner;
            own.parked = Some(state);
            own.park_generation = 1;
        }
        self.sessions.lock().expect("sessions lock").insert(client_id, shared.clone());
        (shared, 1)
    }
}

/// Puts a restored queue read back into the state; a read that failed leaves it cold (counted,
/// read again next time) and is logged.
fn install(client_id: &str, state: &mut SessionState, loaded: Result<Vec<crate::store::LoadedEntry>, String>) {
    match loaded {
        Ok(loaded) => state.warm(loaded),
        Err(e) => error!(client_id, error = e.as_str(), "reading a restored session's queue failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{QoS, SubscriptionOptions};
    use crate::config::Durability;

    struct Fixture {
        registry: Arc<Registry>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Durability::Wal, 8 << 20).unwrap();
        let router = Arc::new(Router::new(16));
        let registry = Arc::new(Registry::new(router, Arc::new(store), Arc::default(), 16, 2));
        Fixture { registry, _dir: dir }
    }

    fn claim(client_id: &str, conn_id: u64, expiry: u32, clean: bool) -> (Claim, oneshot::Receiver<Kick>) {
        let (kick, kicked) = oneshot::channel();
        let claim = Claim {
            client_id: client_id.into(),
            clean_start: clean,
            expiry_interval: expiry,
            will: None,
            conn_id,
            kick,
            client: ClientInfo::default(),
            owner: Some("bob".into()),
            enforce_owner: true,
        };
        (claim, kicked)
    }

    fn release(conn_id: u64, expiry: u32, taken_over: bool) -> Release {
        Release { conn_id, expiry_interval: expiry, will_due: None, taken_over, now_ms: 1 }
    }

    #[tokio::test]
    async fn a_claimed_session_parks_and_resumes_with_its_state_mqtt_3_2_2_2() {
        let f = fixture();
        let (c, _k) = claim("phone", 1, 60, false);
        let mut claimed = f.registry.claim(c).await.unwrap();
        assert!(!claimed.present, "[MQTT-3.2.2-1] a new session");
        assert!(claimed.shared.is_online() && claimed.shared.is_persistent());
        claimed.state.subscriptions.insert("news/#".into(), (SubscriptionOptions::default(), None));
        f.registry.release(claimed.shared.clone(), claimed.state, release(1, 60, false));
        assert!(!claimed.shared.is_online());
        assert_eq!(claimed.shared.parked_figures().unwrap().subscriptions, 1, "parked with its state");

        let (c, _k) = claim("phone", 2, 60, false);
        let resumed = f.registry.claim(c).await.unwrap();
        assert!(resumed.present, "[MQTT-3.2.2-2] the session was resumed");
        assert_eq!(resumed.shared.id, claimed.shared.id);
        assert!(resumed.state.subscriptions.contains_key("news/#"));
        assert!(resumed.shared.parked_figures().is_none(), "held, not parked");
    }

    #[tokio::test]
    async fn a_session_of_another_owner_is_refused_and_left_as_it_was() {
        let f = fixture();
        let (c, _k) = claim("bob-phone", 1, 60, false);
        let mut claimed = f.registry.claim(c).await.unwrap();
        claimed.state.subscriptions.insert("users/bob/inbox".into(), (SubscriptionOptions::default(), None));
        f.registry.release(claimed.shared.clone(), claimed.state, release(1, 60, false));
        for clean in [false, true] {
            let (mut c, _k) = claim("bob-phone", 2, 60, clean);
            c.owner = Some("alice".into());
            match f.registry.claim(c).await {
                Err(ClaimError::NotOwner { owner }) => assert_eq!(owner, "bob"),
                _ => panic!("alice took bob's session (clean start {clean})"),
            }
            let parked = claimed.shared.parked_figures().expect("still parked");
            assert_eq!(parked.subscriptions, 1, "untouched");
            assert!(f.registry.get("bob-phone").is_some_and(|s| s.id == claimed.shared.id));
        }
        // Without enforcement (auth.session_owner = false) anyone may take it, as before.
        let (mut c, _k) = claim("bob-phone", 3, 60, false);
        (c.owner, c.enforce_owner) = (Some("alice".into()), false);
        assert!(f.registry.claim(c).await.unwrap().present);
    }

    #[tokio::test]
    async fn a_session_without_an_owner_takes_its_next_claimant_as_owner() {
        let f = fixture();
        let (mut c, _k) = claim("old", 1, 60, false);
        c.owner = None;
        let claimed = f.registry.claim(c).await.unwrap();
        assert_eq!(claimed.shared.owner(), None);
        f.registry.release(claimed.shared.clone(), claimed.state, release(1, 60, false));
        let (c, _k) = claim("old", 2, 60, false);
        let claimed = f.registry.claim(c).await.unwrap();
        assert_eq!(claimed.shared.owner().as_deref(), Some("bob"));
    }

    #[tokio::test]
    async fn a_clean_start_ends_the_parked_session_mqtt_3_1_2_4() {
        let f = fixture();
        let (c, _k) = claim("phone", 1, 60, false);
        let claimed = f.registry.claim(c).await.unwrap();
        f.registry.release(claimed.shared.clone(), claimed.state, release(1, 60, false));
        let (c, _k) = claim("phone", 2, 60, true);
        let fresh = f.registry.claim(c).await.unwrap();
        assert!(!fresh.present);
        assert_ne!(fresh.shared.id, claimed.shared.id, "a new session");
        assert_eq!(f.registry.len(), 1);
    }

    #[tokio::test]
    async fn a_takeover_asks_the_holder_to_let_go_and_waits_for_it_mqtt_3_1_4_3() {
        let f = fixture();
        let (c, kicked) = claim("editor", 1, 60, false);
        let first = f.registry.claim(c).await.unwrap();
        let registry = f.registry.clone();
        let (c, _k) = claim("editor", 2, 60, false);
        let second = tokio::spawn(async move { registry.claim(c).await });
        let kick = tokio::time::timeout(Duration::from_secs(5), kicked).await.unwrap().unwrap();
        assert_eq!(kick.reason, ReasonCode::SESSION_TAKEN_OVER);
        assert!(!second.is_finished(), "the new connection waits for the old one to park");
        f.registry.release(first.shared.clone(), first.state, release(1, 60, true));
        let second = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().unwrap();
        assert!(second.present);
        assert_eq!(second.shared.id, first.shared.id);
        assert!(second.shared.is_online());
    }

    #[tokio::test]
    async fn a_parked_session_expires_after_its_interval_unless_resumed_mqtt_3_1_2_23() {
        let f = fixture();
        let (c, _k) = claim("brief", 1, 1, false);
        let claimed = f.registry.claim(c).await.unwrap();
        let shared = claimed.shared.clone();
        f.registry.release(claimed.shared, claimed.state, release(1, 1, false));
        // A timer from an earlier parking (generation 0) finds a newer one and does nothing.
        f.registry.expire(&shared, 0);
        assert!(f.registry.get("brief").is_some(), "a stale timer ends nothing");
        let parked_at = std::time::Instant::now();
        let deadline = parked_at + Duration::from_secs(10);
        while f.registry.get("brief").is_some() {
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(parked_at.elapsed() >= Duration::from_millis(950), "expired after {:?}", parked_at.elapsed());
        assert_eq!(f.registry.metrics.sessions_expired.load(Ordering::Relaxed), 1);

        // Resumed before its timer: the timer finds it held and does nothing.
        let (c, _k) = claim("kept", 2, 1, false);
        let claimed = f.registry.claim(c).await.unwrap();
        f.registry.release(claimed.shared, claimed.state, release(2, 1, false));
        let (c, _k) = claim("kept", 3, 1, false);
        let held = f.registry.claim(c).await.unwrap();
        assert!(held.present);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(f.registry.get("kept").is_some(), "a held session never expires");
    }

    #[tokio::test]
    async fn a_session_without_expiry_ends_with_its_connection() {
        let f = fixture();
        let (c, _k) = claim("once", 1, 0, true);
        let claimed = f.registry.claim(c).await.unwrap();
        assert!(!claimed.shared.is_persistent());
        f.registry.release(claimed.shared.clone(), claimed.state, release(1, 0, false));
        assert!(f.registry.get("once").is_none());
        assert!(!claimed.shared.is_online());
    }

    #[tokio::test]
    async fn a_delivery_left_in_the_mailbox_at_parking_joins_the_parked_queue_in_order() {
        let f = fixture();
        let (c, _k) = claim("phone", 1, 60, false);
        let claimed = f.registry.claim(c).await.unwrap();
        let shared = claimed.shared.clone();
        let delivery = |n: &'static [u8]| crate::message::Delivery {
            message: Arc::new(crate::message::Message::new(
                "t".into(),
                bytes::Bytes::from_static(n),
                QoS::AtLeastOnce,
                false,
            )),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Box::default(),
            stored: None,
        };
        shared.mailbox.try_send(delivery(b"1")).unwrap();
        f.registry.release(shared.clone(), claimed.state, release(1, 60, false));
        // A router that saw the session online delivers to the mailbox after it was parked,
        // then finds it offline and moves its delivery behind the parked queue...
        shared.mailbox.try_send(delivery(b"2")).unwrap();
        assert!(!shared.is_online());
        shared.absorb_stragglers();
        // ...before the next message, routed to the parked queue.
        shared.with_parked(|p| p.push_pending(delivery(b"3"))).unwrap();
        let order = shared.with_parked(|p| p.pending.iter().map(|d| d.message.payload.clone()).collect::<Vec<_>>());
        assert_eq!(order.unwrap(), vec!["1", "2", "3"]);
    }
}
