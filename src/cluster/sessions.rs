//! Sessions across nodes (docs/cluster.md, "Sessions across nodes"): the directory of which node
//! holds which persistent session, and the checkpoint below which a node's sessions need nothing
//! more from the stream.
//!
//! A node that holds a persistent session writes its record (subscriptions, expiry, `since`) to
//! the directory stream, one subject per client and node, so that another node can resume the
//! session when its client comes there: it asks the holder to let go (`herald.handover.<node>`),
//! or, when the holder does not answer (it died), takes the holder's last checkpoint, and reads
//! the session's messages back from the stream (`Link::replay`). Duplicates are possible; a
//! missing acknowledged message is not.
//!
//! The checkpoint is a stream sequence number C with: every stream message that one of this
//! node's persistent sessions still needs has a sequence above C. It comes from the oldest
//! message body that a queue entry of this node still refers to: each body gets its number when
//! routing stores it, and the node samples, four times a second, the next body number together with
//! `processed` (the last stream message routed here). Every body numbered after a sample was
//! routed after it, so its message is above the sample's `processed`. Sessions read back from
//! the stream on this node are pinned at their own floor until their bodies are gone.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::codec::{QoS, SubscriptionOptions};

/// Subjects of the directory stream: session records and checkpoints.
pub const DIRECTORY_SUBJECTS: &str = "herald.dir.>";
const SESSION_PREFIX: &str = "herald.dir.s.";
const CHECKPOINT_PREFIX: &str = "herald.dir.c.";
/// Requests to a node to let go of a session: `herald.handover.<node>`.
pub const HANDOVER_PREFIX: &str = "herald.handover.";
/// Core NATS subjects on which a node shutting down asks another to take a session over now:
/// `herald.take.<node>`.
pub const TAKE_PREFIX: &str = "herald.take.";
/// Samples kept at most; beyond it the second oldest is dropped, which only makes the
/// checkpoint older (more duplicates after a node's death, never a loss).
const MAX_SAMPLES: usize = 100_000;

/// The live node that takes over `client_id`'s session when its node dies: the one with the
/// highest weight for it (rendezvous hashing), so a dead node's sessions spread evenly over the
/// live nodes, every node that sees the same live nodes names the same heir without a word
/// between them, and a node joining or leaving moves only the sessions it wins or held.
pub fn heir<'a>(client_id: &str, live: &'a [String]) -> Option<&'a str> {
    use sha2::{Digest, Sha256};
    let weight = |node: &str| {
        let mut h = Sha256::new();
        h.update((node.len() as u64).to_be_bytes());
        h.update(node.as_bytes());
        h.update(client_id.as_bytes());
        let d = h.finalize();
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    };
    live.iter().max_by_key(|n| (weight(n), n.as_str())).map(String::as_str)
}

/// A persistent session as the directory holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionEntry {
    /// Stream messages at or below this were routed before the session existed on its node:
    /// reading the session back starts above it.
    pub since: u64,
    pub expiry: u32,
    pub subscriptions: Vec<EntrySubscription>,
    /// The session's store record (`records::encode_session`) in hex: whether a connection
    /// holds it (`disconnected_at_ms` 0) and the will still due, for the node that takes the
    /// session over if its holder dies.
    #[serde(default)]
    pub record: String,
}

impl SessionEntry {
    /// The session's store record, if the entry carries a readable one.
    pub fn stored(&self) -> Option<crate::store::records::SessionRecord> {
        crate::store::records::decode_session(&super::unhex(&self.record)?).ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntrySubscription {
    pub filter: String,
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default)]
    pub retain_handling: u8,
    #[serde(default)]
    pub identifier: Option<u32>,
}

impl EntrySubscription {
    pub fn new(filter: &str, options: &SubscriptionOptions, identifier: Option<u32>) -> Self {
        EntrySubscription {
            filter: filter.to_owned(),
            qos: options.qos as u8,
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            retain_handling: options.retain_handling,
            identifier,
        }
    }

    pub fn options(&self) -> SubscriptionOptions {
        let qos = match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        SubscriptionOptions {
            qos,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling,
        }
    }
}

/// A session's subscriptions as its directory record holds them.
pub fn entry_subscriptions(
    subscriptions: &HashMap<String, (SubscriptionOptions, Option<u32>)>,
) -> Vec<EntrySubscription> {
    let mut out: Vec<_> =
        subscriptions.iter().map(|(filter, (options, id))| EntrySubscription::new(filter, options, *id)).collect();
    out.sort_by(|a, b| a.filter.cmp(&b.filter));
    out
}

/// The answer to a handover request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandoverReply {
    /// Whether the node held the session (and has now ended it).
    pub held: bool,
    /// The node's checkpoint, taken before the session ended.
    pub checkpoint: u64,
    /// The last stream message routed on the node before the session ended; with `entries`,
    /// the new holder reads the stream from above it (what reached the old one after it
    /// ended), skipping the messages it was given.
    #[serde(default)]
    pub processed: u64,
    /// The session's queue and in-flight messages, in order, when they fit in one answer
    /// (`MAX_HANDOVER_BYTES`); None otherwise (the new holder reads from the checkpoint).
    #[serde(default)]
    pub entries: Option<Vec<HandedEntry>>,
    /// Incoming QoS 2 packet identifiers between PUBREC and PUBREL [MQTT-4.3.3-9].
    #[serde(default)]
    pub incoming_qos2: Vec<u16>,
    /// Not held: the node, shutting down, handed the session to this node (ask it instead).
    #[serde(default)]
    pub moved_to: Option<String>,
}

/// The most message bytes a handover answer carries (NATS's default payload limit is 1 MiB;
/// hex doubles them).
pub const MAX_HANDOVER_BYTES: usize = 400 * 1024;

/// One queued or in-flight message of a session handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedEntry {
    /// `records::encode_message`, in hex.
    pub message: String,
    pub qos: u8,
    pub retain: bool,
    #[serde(default)]
    pub subscription_ids: Vec<u32>,
    /// Packet identifier and state (1: awaiting PUBACK, 2: PUBREC, 3: PUBCOMP) while in flight.
    #[serde(default)]
    pub inflight: Option<(u16, u8)>,
}

impl HandedEntry {
    /// The message and its queue entry (with no store numbers yet).
    pub fn decode(&self) -> Option<(crate::message::Message, crate::store::records::QueueEntry)> {
        use crate::message::OutState;
        let message = crate::store::records::decode_message(&super::unhex(&self.message)?).ok()?;
        let qos = match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let inflight = match self.inflight {
            None => None,
            Some((id, 1)) => Some((id, OutState::AwaitPubAck)),
            Some((id, 2)) => Some((id, OutState::AwaitPubRec)),
            Some((id, _)) => Some((id, OutState::AwaitPubComp)),
        };
        let entry = crate::store::records::QueueEntry {
            message_id: 0,
            qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
            inflight,
        };
        Some((message, entry))
    }
}

/// What a directory subject names.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectoryKey {
    Session { client_id: String, node: String },
    Checkpoint { node: String },
}

pub fn session_subject(client_id: &str, node: &str) -> String {
    format!("{SESSION_PREFIX}{}.{node}", super::hex(client_id.as_bytes()))
}

pub fn checkpoint_subject(node: &str) -> String {
    format!("{CHECKPOINT_PREFIX}{node}")
}

pub fn parse_subject(subject: &str) -> Option<DirectoryKey> {
    if let Some(node) = subject.strip_prefix(CHECKPOINT_PREFIX) {
        return Some(DirectoryKey::Checkpoint { node: node.to_owned() });
    }
    let (hex, node) = subject.strip_prefix(SESSION_PREFIX)?.split_once('.')?;
    let client_id = String::from_utf8(super::unhex(hex)?).ok()?;
    Some(DirectoryKey::Session { client_id, node: node.to_owned() })
}

/// Every node's session records and checkpoints, as read from the directory stream.
#[derive(Default)]
pub struct Directory {
    /// Client identifier to the records of the nodes holding a session for it, with the stream
    /// sequence of each (the newest wins).
    sessions: HashMap<String, HashMap<String, (u64, SessionEntry)>>,
    checkpoints: HashMap<String, u64>,
}

impl Directory {
    /// Applies one directory message; an empty payload removes the record.
    pub fn apply(&mut self, subject: &str, seq: u64, payload: &[u8]) {
        match parse_subject(subject) {
            Some(DirectoryKey::Checkpoint { node }) => {
                if let Ok(bytes) = <[u8; 8]>::try_from(payload) {
                    self.checkpoints.insert(node, u64::from_be_bytes(bytes));
                }
            }
            Some(DirectoryKey::Session { client_id, node }) => {
                if payload.is_empty() {
                    if let Some(nodes) = self.sessions.get_mut(&client_id) {
                        nodes.remove(&node);
                        if nodes.is_empty() {
                            self.sessions.remove(&client_id);
                        }
                    }
                } else if let Ok(entry) = serde_json::from_slice::<SessionEntry>(payload) {
                    self.sessions.entry(client_id).or_default().insert(node, (seq, entry));
                }
            }
            None => {}
        }
    }

    /// The newest record of `client_id` held by a node other than `me`.
    pub fn holder(&self, client_id: &str, me: &str) -> Option<(String, SessionEntry)> {
        let nodes = self.sessions.get(client_id)?;
        nodes
            .iter()
            .filter(|(node, _)| node.as_str() != me)
            .max_by_key(|(_, (seq, _))| *seq)
            .map(|(node, (_, entry))| (node.clone(), entry.clone()))
    }

    /// The sessions whose newest record is `node`'s.
    pub fn held_by(&self, node: &str) -> Vec<(String, SessionEntry)> {
        self.sessions
            .iter()
            .filter_map(|(client_id, nodes)| {
                let (holder, (_, entry)) = nodes.iter().max_by_key(|(_, (seq, _))| *seq)?;
                (holder == node).then(|| (client_id.clone(), entry.clone()))
            })
            .collect()
    }

    /// Every node named in the directory (holding a session or with a checkpoint).
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.checkpoints.keys().cloned().collect();
        nodes.extend(self.sessions.values().flat_map(|n| n.keys().cloned()));
        nodes.sort();
        nodes.dedup();
        nodes
    }

    pub fn own(&self, client_id: &str, me: &str) -> Option<&SessionEntry> {
        self.sessions.get(client_id)?.get(me).map(|(_, e)| e)
    }

    pub fn checkpoint(&self, node: &str) -> Option<u64> {
        self.checkpoints.get(node).copied()
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

/// The samples and pins the checkpoint is computed from (see the module's comment).
pub struct Floors {
    /// (the next body number, `processed`) four times a second, oldest first.
    samples: VecDeque<(u64, u64)>,
    /// Bodies numbered up to `end` may hold messages above `floor` only; by key.
    pins: HashMap<u64, (u64, u64)>,
    next_pin: u64,
    /// The floor of bodies older than every sample: what this node checkpointed last before
    /// this start (0 when it never did).
    base: u64,
}

impl Floors {
    pub fn new(base: u64) -> Self {
        Floors { samples: VecDeque::new(), pins: HashMap::new(), next_pin: 0, base }
    }

    /// The checkpoint now, given the oldest live body. Bodies numbered since the latest sample
    /// count as live whatever `oldest` says: routing numbers a body before the store counts it.
    pub fn checkpoint(&self, oldest: Option<u64>, processed: u64) -> u64 {
        let cutoff = match (oldest, self.samples.back()) {
            (Some(o), Some(&(s, _))) => o.min(s),
            (None, Some(&(s, _))) => s,
            (_, None) => return self.base.min(processed),
        };
        let mut floor = self.samples.iter().rev().find(|(seq, _)| *seq <= cutoff).map_or(self.base, |&(_, w)| w);
        for &(end, pinned) in self.pins.values() {
            if cutoff <= end {
                floor = floor.min(pinned);
            }
        }
        floor
    }

    /// Takes the second's sample and drops what no live body needs any more; returns the
    /// checkpoint.
    pub fn tick(&mut self, next_body: u64, oldest: Option<u64>, processed: u64) -> u64 {
        let checkpoint = self.checkpoint(oldest, processed);
        if let Some(&(latest, _)) = self.samples.back() {
            let cutoff = oldest.map_or(latest, |o| o.min(latest));
            while self.samples.len() > 1 && self.samples[1].0 <= cutoff {
                self.samples.pop_front();
            }
            self.pins.retain(|_, (end, _)| cutoff <= *end);
        }
        if self.samples.len() >= MAX_SAMPLES {
            self.samples.remove(1);
        }
        self.samples.push_back((next_body, processed));
        checkpoint
    }

    /// Bodies numbered from now on may hold messages as old as `floor`, until `unpin` says where
    /// they end.
    pub fn pin(&mut self, floor: u64) -> u64 {
        self.next_pin += 1;
        self.pins.insert(self.next_pin, (u64::MAX, floor));
        self.next_pin
    }

    pub fn unpin(&mut self, pin: u64, end: u64) {
        if let Some(p) = self.pins.get_mut(&pin) {
            p.0 = end;
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_dead_nodes_sessions_spread_over_the_live_nodes_and_every_node_agrees() {
        let live = vec!["herald-b".to_owned(), "herald-c".to_owned(), "herald-d".to_owned()];
        let mut shares = std::collections::HashMap::new();
        for i in 0..3000 {
            let id = format!("phone-{i}");
            let heir = heir(&id, &live).unwrap();
            let mut reordered = live.clone();
            reordered.reverse();
            assert_eq!(heir, super::heir(&id, &reordered).unwrap(), "the order of the list does not matter");
            *shares.entry(heir.to_owned()).or_insert(0) += 1;
        }
        for node in &live {
            let share = shares[node];
            assert!((800..1200).contains(&share), "{node}: {share} of 3000");
        }
        // A node leaving moves only the sessions it would have taken.
        let fewer = vec!["herald-b".to_owned(), "herald-c".to_owned()];
        for i in 0..1000 {
            let id = format!("phone-{i}");
            let before = heir(&id, &live).unwrap();
            if before != "herald-d" {
                assert_eq!(heir(&id, &fewer).unwrap(), before);
            }
        }
        assert_eq!(heir("x", &[]), None);
    }

    use super::*;

    #[test]
    fn subjects_round_trip() {
        let s = session_subject("phone 1.é", "herald-2");
        assert!(!s[SESSION_PREFIX.len()..].contains(' '));
        assert_eq!(
            parse_subject(&s),
            Some(DirectoryKey::Session { client_id: "phone 1.é".into(), node: "herald-2".into() })
        );
        assert_eq!(parse_subject(&checkpoint_subject("n1")), Some(DirectoryKey::Checkpoint { node: "n1".into() }));
        assert_eq!(parse_subject("herald.dir.s.zz.n1"), None);
    }

    #[test]
    fn the_newest_record_of_another_node_is_the_holder() {
        let mut d = Directory::default();
        let entry = |since| {
            serde_json::to_vec(&SessionEntry { since, expiry: 60, subscriptions: vec![], record: String::new() })
                .unwrap()
        };
        d.apply(&session_subject("c", "a"), 5, &entry(1));
        d.apply(&session_subject("c", "b"), 9, &entry(2));
        d.apply(&session_subject("c", "me"), 12, &entry(3));
        assert_eq!(d.holder("c", "me").unwrap().0, "b");
        d.apply(&session_subject("c", "b"), 13, &[]);
        assert_eq!(d.holder("c", "me").unwrap().0, "a");
        d.apply(&checkpoint_subject("a"), 14, &77u64.to_be_bytes());
        assert_eq!(d.checkpoint("a"), Some(77));
        assert_eq!(d.own("c", "me").unwrap().since, 3);
    }

    #[test]
    fn the_checkpoint_stays_below_every_live_body() {
        let mut f = Floors::new(3);
        // First tick: nothing sampled yet, the base holds.
        assert_eq!(f.tick(100, None, 10), 3);
        // Bodies 100.. were numbered after `processed` was 10.
        assert_eq!(f.tick(150, Some(120), 20), 10);
        // Body 120 still live: the sample at 100 still holds it.
        assert_eq!(f.tick(200, Some(120), 30), 10);
        // It went; the oldest is 160, after the sample at 150 (processed 20).
        assert_eq!(f.tick(210, Some(160), 40), 20);
        // Nothing live: everything since the latest sample counts as live.
        assert_eq!(f.tick(220, None, 50), 40);
        // A body older than every sample: the base.
        assert_eq!(f.checkpoint(Some(5), 50), 3);
        // A pin holds while its bodies live.
        let pin = f.pin(7);
        assert_eq!(f.tick(230, None, 60), 7);
        f.unpin(pin, 235);
        assert_eq!(f.tick(240, Some(233), 70), 7);
        // Gone from the pin's bodies: the samples alone.
        assert_eq!(f.tick(250, Some(245), 80), 70);
        assert_eq!(f.tick(260, None, 90), 80);
    }
}
