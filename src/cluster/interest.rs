//! Interest-based routing (docs/cluster.md, "Interest"): a message crosses only to the nodes
//! with a subscription it matches.
//!
//! Each node has a *slot*, 0 to `MAX_NODES - 1`, claimed once in the key-value bucket
//! `HERALD_SLOTS` and kept for good. A message is appended once, to a subject with one token per
//! slot, `1` for the nodes that want it and `0` for the others (`herald.log.0.1.0...`); each
//! node's durable consumer filters on its own token (`herald.log.*.1.*...`), so JetStream hands
//! a node only what it wants, while reading the stream back (a session taken over) and shared
//! groups read every subject. QoS 0 travels the same way on core NATS (`herald.q0.<tokens>`).
//!
//! Which nodes want what is the *interest table*, the key-value bucket `HERALD_INTEREST`: one
//! key per node and filter (`<slot>.p.<filter in hex>`; `<slot>.s.<hex>` for a shared group's
//! filter, which makes QoS 0 cross at all), put when the node's first session subscribes to
//! the filter and deleted when its last one goes, parked sessions included. Every node follows
//! the bucket into a subscription tree of slots (`Table`, the router's own tree, so matching
//! follows MQTT's rules exactly) and the publishing node reads the tokens off it.
//!
//! A subscription takes effect across the cluster before its SUBACK: the node's new filters are
//! written to the bucket by one task (`announce`), which then asks every node heard from in the
//! last moment to confirm that it applied the bucket up to that write (`herald.interest.sync`);
//! only then does `synced` reach the SUBSCRIBE's ticket, which the SUBACK waits for as a PUBACK
//! waits for JetStream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::router::{Router, Subscriber, Subscription};

/// The most nodes a cluster has: one token per node in every message's subject.
pub const MAX_NODES: usize = 32;
pub const SLOTS_BUCKET: &str = "HERALD_SLOTS";
pub const INTEREST_BUCKET: &str = "HERALD_INTEREST";
/// Core NATS subject on which a node asks the others to confirm they applied its interest.
pub const SYNC_SUBJECT: &str = "herald.interest.sync";
/// Filters longer than this are announced as `#`: more than wanted, never less.
const MAX_FILTER: usize = 256;
/// How long a SUBACK waits for the other nodes' confirmations at most.
const SYNC_WAIT: Duration = Duration::from_secs(1);
/// How long a node waits for its own table to reach a revision another node asks about.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// The subject of a message for the nodes in `mask` (bit i: slot i), under `prefix`.
pub fn subject(prefix: &str, mask: u32) -> String {
    let mut s = String::with_capacity(prefix.len() + 2 * MAX_NODES);
    s.push_str(prefix);
    for slot in 0..MAX_NODES {
        s.push('.');
        s.push(if mask & (1 << slot) != 0 { '1' } else { '0' });
    }
    s
}

/// The filter of node `slot`'s subscription under `prefix`: its own token `1`, any other.
pub fn node_filter(prefix: &str, slot: u8) -> String {
    let mut s = String::with_capacity(prefix.len() + 2 * MAX_NODES);
    s.push_str(prefix);
    for i in 0..MAX_NODES {
        s.push('.');
        s.push(if i == slot as usize { '1' } else { '*' });
    }
    s
}

/// Claims this node's slot in `HERALD_SLOTS` (`slot.<i>` = node name), or finds the one it
/// claimed before. Slots are never given back: a node name keeps its slot.
pub async fn claim_slot(js: &jetstream::Context, node: &str, replicas: usize) -> Result<u8, String> {
    let kv = match js.get_key_value(SLOTS_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: SLOTS_BUCKET.into(),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?,
    };
    for slot in 0..MAX_NODES {
        let key = format!("slot.{slot}");
        match kv.get(key.as_str()).await.map_err(|e| e.to_string())? {
            Some(owner) if owner == node.as_bytes() => return Ok(slot as u8),
            Some(_) => continue,
            None => {}
        }
        // Created only if nobody took it meanwhile; another node may be claiming it now.
        if kv.create(key.as_str(), bytes::Bytes::copy_from_slice(node.as_bytes())).await.is_ok() {
            info!(node, slot, "cluster slot claimed");
            return Ok(slot as u8);
        }
        if kv.get(key.as_str()).await.map_err(|e| e.to_string())?.as_deref() == Some(node.as_bytes()) {
            return Ok(slot as u8);
        }
    }
    Err(format!("every one of the {MAX_NODES} cluster slots is taken (HERALD_SLOTS)"))
}

/// A slot in the tree: plain interest (id = slot) or a shared group's (id = MAX_NODES + slot).
#[derive(Clone)]
struct Slot(u64);

impl Subscriber for Slot {
    fn id(&self) -> u64 {
        self.0
    }
}

/// The filter announced for `filter`: itself, or `#` when it is too long for a key.
pub fn key_filter(filter: &str) -> &str {
    if filter.len() > MAX_FILTER {
        "#"
    } else {
        filter
    }
}

/// The key of `filter` for `slot` (`shared`: a shared group's filter).
fn key(slot: u8, shared: bool, filter: &str) -> String {
    format!("{slot}.{}.{}", if shared { 's' } else { 'p' }, super::hex(key_filter(filter).as_bytes()))
}

/// `parse_key`, for the link.
pub fn parse_key_pub(key: &str) -> Option<(u8, bool, String)> {
    parse_key(key)
}

fn parse_key(key: &str) -> Option<(u8, bool, String)> {
    let mut parts = key.splitn(3, '.');
    let slot: u8 = parts.next()?.parse().ok().filter(|s: &u8| (*s as usize) < MAX_NODES)?;
    let shared = match parts.next()? {
        "s" => true,
        "p" => false,
        _ => return None,
    };
    let filter = String::from_utf8(super::unhex(parts.next()?)?).ok()?;
    Some((slot, shared, filter))
}

/// Every node's interest, as followed from the bucket.
pub struct Table {
    tree: Router<Slot>,
    /// The bucket's last revision applied here.
    applied: watch::Sender<u64>,
}

impl Default for Table {
    fn default() -> Self {
        Table::new()
    }
}

impl Table {
    pub fn new() -> Table {
        Table { tree: Router::new(4096), applied: watch::channel(0).0 }
    }

    /// Applies one entry of the bucket.
    pub fn apply(&self, entry: &jetstream::kv::Entry) {
        if let Some((slot, shared, filter)) = parse_key(&entry.key) {
            if let Ok(parsed) = crate::topic::parse_filter(&filter) {
                let id = if shared { MAX_NODES as u64 + u64::from(slot) } else { u64::from(slot) };
                match entry.operation {
                    jetstream::kv::Operation::Put => {
                        let sub = Subscription { session: Slot(id), options: Default::default(), identifier: None };
                        self.tree.subscribe(&parsed, sub);
                    }
                    _ => {
                        self.tree.unsubscribe(&parsed, id);
                    }
                }
            }
        }
        self.applied.send_if_modified(|r| std::mem::replace(r, (*r).max(entry.revision)) < entry.revision);
    }

    /// The nodes with a plain subscription `topic` matches (bit i: slot i), and whether a
    /// shared group's filter somewhere matches it.
    pub fn wanted(&self, topic: &str) -> (u32, bool) {
        let mut mask = 0u32;
        let mut shared = false;
        for t in self.tree.matches(topic).iter() {
            match t.session.0 {
                id if id < MAX_NODES as u64 => mask |= 1 << id,
                _ => shared = true,
            }
        }
        (mask, shared)
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the table has applied the bucket up to `revision`, at most `APPLY_WAIT`.
    pub async fn wait_applied(&self, revision: u64) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(APPLY_WAIT, applied.wait_for(|r| *r >= revision)).await.is_ok_and(|r| r.is_ok())
    }
}

/// This node's own interest: how many of its sessions hold each filter, and the changes the
/// announcing task has yet to write.
pub struct Own {
    pub slot: u8,
    counts: Mutex<HashMap<(bool, String), u32>>,
    /// Filters whose presence changed and is not yet written: (shared, filter) -> present.
    dirty: Mutex<HashMap<(bool, String), bool>>,
    wake: Notify,
    /// Tickets: one per filter that became present; `synced` follows the last confirmed.
    issued: AtomicU64,
    synced: watch::Sender<u64>,
}

impl Own {
    pub fn new(slot: u8) -> Own {
        Own {
            slot,
            counts: Mutex::default(),
            dirty: Mutex::default(),
            wake: Notify::new(),
            issued: AtomicU64::new(0),
            synced: watch::channel(0).0,
        }
    }

    /// A session of this node subscribed to `filter`; the ticket to wait for if the node had no
    /// session on it before.
    pub fn add(&self, shared: bool, filter: &str) -> Option<u64> {
        let mut counts = self.counts.lock().expect("interest lock");
        let count = counts.entry((shared, filter.to_owned())).or_insert(0);
        *count += 1;
        if *count > 1 {
            return None;
        }
        drop(counts);
        self.dirty.lock().expect("interest lock").insert((shared, filter.to_owned()), true);
        let ticket = self.issued.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake.notify_one();
        Some(ticket)
    }

    /// A session of this node no longer holds `filter`.
    pub fn remove(&self, shared: bool, filter: &str) {
        let mut counts = self.counts.lock().expect("interest lock");
        let k = (shared, filter.to_owned());
        let Some(count) = counts.get_mut(&k) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        counts.remove(&k);
        drop(counts);
        self.dirty.lock().expect("interest lock").insert(k, false);
        self.wake.notify_one();
    }

    /// Removes keys of this node that no session wants any more (left from an earlier run).
    pub fn forget(&self, stale: Vec<(bool, String)>) {
        if stale.is_empty() {
            return;
        }
        let mut dirty = self.dirty.lock().expect("interest lock");
        for k in stale {
            dirty.entry(k).or_insert(false);
        }
        drop(dirty);
        self.wake.notify_one();
    }

    /// The last ticket given out.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Acquire)
    }

    pub fn synced(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    pub fn is_synced(&self, ticket: u64) -> bool {
        *self.synced.borrow() >= ticket
    }

    /// The filters this node holds now.
    pub fn present(&self) -> Vec<(bool, String)> {
        self.counts.lock().expect("interest lock").keys().cloned().collect()
    }
}

/// Writes this node's interest changes to the bucket, in the order they happened per filter,
/// then has the live nodes confirm they applied them (`confirm`), then moves `synced`. While
/// NATS cannot take them the SUBACKs are not held past `hold` (the writes go on being tried).
pub async fn announce(
    own: Arc<Own>,
    kv: jetstream::kv::Store,
    confirm: impl Fn(u64) -> futures_util::future::BoxFuture<'static, ()>,
    hold: Duration,
) {
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        if own.dirty.lock().expect("interest lock").is_empty() {
            own.wake.notified().await;
        }
        let ticket = own.issued();
        let batch: Vec<((bool, String), bool)> = own.dirty.lock().expect("interest lock").drain().collect();
        let mut revision = 0;
        let mut failed = Vec::new();
        for chunk in batch.chunks(64) {
            let writes = chunk.iter().map(|((shared, filter), present)| {
                let kv = &kv;
                let key = key(own.slot, *shared, filter);
                async move {
                    if *present {
                        kv.put(key.as_str(), bytes::Bytes::from_static(b"1")).await.map_err(|e| e.to_string())
                    } else {
                        kv.delete(key.as_str()).await.map(|()| 0).map_err(|e| e.to_string())
                    }
                }
            });
            for (result, change) in futures_util::future::join_all(writes).await.into_iter().zip(chunk) {
                match result {
                    Ok(r) => revision = revision.max(r),
                    Err(e) => failed.push((change.clone(), e)),
                }
            }
        }
        if !failed.is_empty() {
            let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
            warn!(
                filters = failed.len(),
                error = failed[0].1.as_str(),
                "the cluster's interest table could not be written; trying again"
            );
            {
                let mut dirty = own.dirty.lock().expect("interest lock");
                for ((k, present), _) in failed {
                    // A newer change of the same filter wins.
                    dirty.entry(k).or_insert(present);
                }
            }
            if since.elapsed() >= hold {
                own.synced.send_if_modified(|s| std::mem::replace(s, (*s).max(ticket)) < ticket);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        failing_since = None;
        if revision > 0 {
            confirm(revision).await;
        }
        own.synced.send_if_modified(|s| std::mem::replace(s, (*s).max(ticket)) < ticket);
    }
}

/// How long the SUBACK's confirmation round waits at most.
pub fn sync_wait() -> Duration {
    SYNC_WAIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_filters_agree_on_the_slot_tokens() {
        let s = subject("herald.log", 0b101);
        assert!(s.starts_with("herald.log.1.0.1.0."));
        assert_eq!(s.split('.').count(), 2 + MAX_NODES);
        let f = node_filter("herald.log", 2);
        assert!(f.starts_with("herald.log.*.*.1.*"));
        assert_eq!(f.split('.').count(), 2 + MAX_NODES);
    }

    #[test]
    fn keys_round_trip_and_long_filters_become_everything() {
        assert_eq!(parse_key(&key(3, false, "users/bob/inbox")), Some((3, false, "users/bob/inbox".into())));
        assert_eq!(parse_key(&key(31, true, "news/#")), Some((31, true, "news/#".into())));
        let long = "a/".repeat(200);
        assert_eq!(parse_key(&key(0, false, &long)), Some((0, false, "#".into())));
        assert_eq!(parse_key("40.p.23"), None);
    }

    #[test]
    fn own_interest_counts_sessions_and_tickets_only_new_filters() {
        let own = Own::new(0);
        assert_eq!(own.add(false, "news/#"), Some(1));
        assert_eq!(own.add(false, "news/#"), None, "a second session on the same filter");
        own.remove(false, "news/#");
        assert_eq!(own.present(), vec![(false, "news/#".to_owned())]);
        own.remove(false, "news/#");
        assert!(own.present().is_empty());
        assert_eq!(own.dirty.lock().unwrap().get(&(false, "news/#".to_owned())), Some(&false));
    }
}
