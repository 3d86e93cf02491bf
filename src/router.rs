//! The subscription tree: topic filters in a trie of levels, each node with its literal children,
//! a dedicated `+` child and the subscribers of `#` below it; shared subscriptions per group.
//! Matching a topic name yields one target per session [MQTT-3.3.4-2], at the highest QoS of its
//! overlapping subscriptions and with all their subscription identifiers [MQTT-3.3.4-3..5].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::codec::{QoS, SubscriptionOptions};
use crate::topic::ParsedFilter;

/// What the tree stores per subscriber: a cheap handle with a stable id (the session layer's
/// `Arc<SessionShared>`). Generic so that the tree sits below the sessions it points to.
pub trait Subscriber: Clone {
    fn id(&self) -> u64;
}

/// One session's subscription to one filter.
#[derive(Clone)]
pub struct Subscription<S> {
    pub session: S,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

struct SharedGroup<S> {
    members: Vec<Subscription<S>>,
    next: AtomicUsize,
}

impl<S> Default for SharedGroup<S> {
    fn default() -> Self {
        SharedGroup { members: Vec::new(), next: AtomicUsize::new(0) }
    }
}

/// A node's literal children: a vector sized exactly while there are few (most levels of a
/// news tree below the first two have one or two children, and hashbrown's smallest table for
/// one entry is four slots: about 350 bytes per per-client level like `users/N`), a map beyond.
enum Children<S> {
    Few(Vec<(Box<str>, Node<S>)>),
    Many(HashMap<Box<str>, Node<S>>),
}

/// Children kept in a vector up to this many.
const FEW_CHILDREN: usize = 8;

impl<S> Children<S> {
    fn get(&self, level: &str) -> Option<&Node<S>> {
        match self {
            Children::Few(v) => v.iter().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node<S>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut Node<S> {
        if let Children::Few(v) = self {
            if v.len() >= FEW_CHILDREN && !v.iter().any(|(l, _)| &**l == level) {
                let map = std::mem::take(v).into_iter().collect();
                *self = Children::Many(map);
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(l, _)| &**l == level) {
                    Some(i) => i,
                    None => {
                        v.reserve_exact(1);
                        v.push((level.into(), Node::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(level.into()).or_default(),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => {
                v.retain(|(l, _)| &**l != level);
                v.shrink_to_fit();
            }
            Children::Many(m) => {
                m.remove(level);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (&Box<str>, &Node<S>)> + '_> {
        match self {
            Children::Few(v) => Box::new(v.iter().map(|(l, n)| (l, n))),
            Children::Many(m) => Box::new(m.iter()),
        }
    }
}

/// A level of the tree. Most nodes are inner levels with no subscriber of their own, so the
/// subscriber tables sit behind one optional box.
struct Node<S> {
    literal: Children<S>,
    plus: Option<Box<Node<S>>>,
    subs: Option<Box<NodeSubscribers<S>>>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node { literal: Children::Few(Vec::new()), plus: None, subs: None }
    }
}

struct NodeSubscribers<S> {
    /// Subscribers of `filter/#`, which also match `filter` itself [MQTT-4.7.1-2].
    hash: HashMap<u64, Subscription<S>>,
    hash_shared: HashMap<Box<str>, SharedGroup<S>>,
    exact: HashMap<u64, Subscription<S>>,
    exact_shared: HashMap<Box<str>, SharedGroup<S>>,
}

impl<S> Default for NodeSubscribers<S> {
    fn default() -> Self {
        NodeSubscribers {
            hash: HashMap::new(),
            hash_shared: HashMap::new(),
            exact: HashMap::new(),
            exact_shared: HashMap::new(),
        }
    }
}

impl<S> NodeSubscribers<S> {
    fn is_empty(&self) -> bool {
        self.hash.is_empty() && self.hash_shared.is_empty() && self.exact.is_empty() && self.exact_shared.is_empty()
    }
}

impl<S> Node<S> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.plus.is_none() && self.subs.is_none()
    }
}

/// A matched session with what its subscriptions grant.
pub struct Target<S> {
    pub session: S,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub identifiers: Vec<u32>,
}

pub struct SubscriptionTree<S> {
    root: Node<S>,
    count: usize,
    /// Bumped by every change, so cached match results can tell they are stale.
    generation: u64,
    /// Cluster mode: shared groups take their messages from the cluster (`pick_shared`), one
    /// delivery per group across the nodes; `matches` leaves them out.
    shared_elsewhere: bool,
}

impl<S> Default for SubscriptionTree<S> {
    fn default() -> Self {
        SubscriptionTree { root: Node::default(), count: 0, generation: 0, shared_elsewhere: false }
    }
}

/// A bounded cache from topic name to its match result, valid for one tree generation. Results
/// that went through a shared subscription are not cached: each needs a fresh pick of member.
/// A cached match result and the tree generation it was computed at.
type CachedMatch<S> = (u64, Arc<Vec<Target<S>>>);

pub struct MatchCache<S> {
    entries: std::sync::Mutex<HashMap<Box<str>, CachedMatch<S>>>,
    capacity: usize,
}

/// The subscription tree behind its lock, with its match cache: what the broker routes with
/// and what the session registry unsubscribes from. The tree's lock is held for one lookup or
/// one change, never across an `.await`; the cache's lock is taken after it, never before.
pub struct Router<S> {
    tree: std::sync::RwLock<SubscriptionTree<S>>,
    cache: MatchCache<S>,
}

impl<S: Subscriber> Router<S> {
    pub fn new(match_cache_size: usize) -> Self {
        Router { tree: std::sync::RwLock::default(), cache: MatchCache::new(match_cache_size) }
    }

    /// Adds or replaces a subscription; returns whether the session already had that filter.
    pub fn subscribe(&self, filter: &ParsedFilter<'_>, sub: Subscription<S>) -> bool {
        self.tree.write().expect("router lock").subscribe(filter, sub)
    }

    pub fn unsubscribe(&self, filter: &ParsedFilter<'_>, session_id: u64) -> bool {
        self.tree.write().expect("router lock").unsubscribe(filter, session_id)
    }

    /// Removes every listed filter of one session under one write lock.
    pub fn unsubscribe_all<'a>(&self, filters: impl Iterator<Item = ParsedFilter<'a>>, session_id: u64) {
        let mut tree = self.tree.write().expect("router lock");
        for f in filters {
            tree.unsubscribe(&f, session_id);
        }
    }

    /// Cluster mode: shared groups are served through `pick_shared`, not `matches`.
    pub fn set_shared_elsewhere(&self) {
        let mut tree = self.tree.write().expect("router lock");
        tree.shared_elsewhere = true;
        tree.generation += 1;
    }

    /// See `SubscriptionTree::pick_shared`.
    pub fn pick_shared(&self, group: &str, filter: &str) -> Option<Target<S>>
    where
        S: Clone,
    {
        self.tree.read().expect("router lock").pick_shared(group, filter)
    }

    /// The targets of a message on `topic` (from the cache when it is current).
    pub fn matches(&self, topic: &str) -> Arc<Vec<Target<S>>> {
        let tree = self.tree.read().expect("router lock");
        self.cache.matches(&tree, topic)
    }

    pub fn len(&self) -> usize {
        self.tree.read().expect("router lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many sessions a message on `topic` would reach; see `SubscriptionTree::subscriber_count`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.tree.read().expect("router lock").subscriber_count(topic)
    }

    /// Every filter with its number of subscribers; see `SubscriptionTree::filters`.
    pub fn filters(&self) -> Vec<(String, usize)> {
        self.tree.read().expect("router lock").filters()
    }
}

impl<S: Subscriber> MatchCache<S> {
    pub fn new(capacity: usize) -> Self {
        Self { entries: Default::default(), capacity }
    }

    /// The targets of `topic`, from the cache when it holds a result of this generation.
    pub fn matches(&self, tree: &SubscriptionTree<S>, topic: &str) -> Arc<Vec<Target<S>>> {
        if self.capacity == 0 {
            return Arc::new(tree.matches(topic).0);
        }
        if let Some((generation, hit)) = self.entries.lock().expect("match cache lock").get(topic) {
            if *generation == tree.generation {
                return hit.clone();
            }
        }
        let (targets, shared) = tree.matches(topic);
        let targets = Arc::new(targets);
        if !shared {
            let mut entries = self.entries.lock().expect("match cache lock");
            if entries.len() >= self.capacity {
                // Crude but bounded: start over rather than track recency on the hot path.
                entries.clear();
            }
            entries.insert(topic.into(), (tree.generation, targets.clone()));
        }
        targets
    }
}

impl<S: Subscriber> SubscriptionTree<S> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces the subscription; returns true if it replaced an existing one.
    pub fn subscribe(&mut self, filter: &ParsedFilter<'_>, sub: Subscription<S>) -> bool {
        let mut node = &mut self.root;
        let mut at_hash = false;
        for level in filter.filter.split('/') {
            if level == "#" {
                at_hash = true;
                break;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.literal.get_or_insert(level)
            };
        }
        let key = sub.session.id();
        let existed = match (filter.share, at_hash) {
            (None, false) => node.subs.get_or_insert_with(Default::default).exact.insert(key, sub).is_some(),
            (None, true) => node.subs.get_or_insert_with(Default::default).hash.insert(key, sub).is_some(),
            (Some(g), hash) => {
                let subs = node.subs.get_or_insert_with(Default::default);
                let groups = if hash { &mut subs.hash_shared } else { &mut subs.exact_shared };
                let group = groups.entry(g.into()).or_default();
                if let Some(slot) = group.members.iter_mut().find(|m| m.session.id() == key) {
                    *slot = sub;
                    true
                } else {
                    group.members.push(sub);
                    false
                }
            }
        };
        if !existed {
            self.count += 1;
        }
        self.generation += 1;
        existed
    }

    /// The next member of shared group `group` of `filter` (the filter as subscribed after
    /// `$share/<group>/`), as a target; None when the group has no member here.
    pub fn pick_shared(&self, group: &str, filter: &str) -> Option<Target<S>>
    where
        S: Clone,
    {
        let mut node = &self.root;
        let mut at_hash = false;
        for level in filter.split('/') {
            if level == "#" {
                at_hash = true;
                break;
            }
            node = if level == "+" { node.plus.as_deref()? } else { node.literal.get(level)? };
        }
        let subs = node.subs.as_ref()?;
        let group = if at_hash { subs.hash_shared.get(group)? } else { subs.exact_shared.get(group)? };
        if group.members.is_empty() {
            return None;
        }
        let sub = &group.members[group.next.fetch_add(1, Ordering::Relaxed) % group.members.len()];
        Some(Target {
            session: sub.session.clone(),
            qos: sub.options.qos,
            no_local: sub.options.no_local,
            retain_as_published: sub.options.retain_as_published,
            identifiers: sub.identifier.into_iter().collect(),
        })
    }

    /// Removes the session's subscription to the filter; returns whether there was one.
    pub fn unsubscribe(&mut self, filter: &ParsedFilter<'_>, session_id: u64) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        let removed = remove(&mut self.root, &levels, filter.share, session_id);
        if removed {
            self.count -= 1;
            self.generation += 1;
        }
        removed
    }

    /// Every session whose subscriptions match `topic`, one target per session, and whether a
    /// shared subscription took part.
    pub fn matches(&self, topic: &str) -> (Vec<Target<S>>, bool) {
        let mut found: Vec<&Subscription<S>> = Vec::new();
        let mut shared: Vec<&SharedGroup<S>> = Vec::new();
        let levels: Vec<&str> = topic.split('/').collect();
        // [MQTT-4.7.2-1] a filter starting with a wildcard does not match a `$` topic.
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, 0, dollar, &mut found, &mut shared);
        if self.shared_elsewhere {
            shared.clear();
        }
        let any_shared = !shared.is_empty();
        for group in shared {
            if group.members.is_empty() {
                continue;
            }
            let i = group.next.fetch_add(1, Ordering::Relaxed) % group.members.len();
            found.push(&group.members[i]);
        }
        let mut targets: Vec<Target<S>> = Vec::with_capacity(found.len());
        let mut index: HashMap<u64, usize> = HashMap::new();
        for sub in found {
            let id = sub.session.id();
            if let Some(&i) = index.get(&id) {
                let t = &mut targets[i];
                t.qos = t.qos.max(sub.options.qos);
                t.no_local &= sub.options.no_local;
                t.retain_as_published |= sub.options.retain_as_published;
                if let Some(i) = sub.identifier {
                    t.identifiers.push(i);
                }
            } else {
                index.insert(id, targets.len());
                targets.push(Target {
                    session: sub.session.clone(),
                    qos: sub.options.qos,
                    no_local: sub.options.no_local,
                    retain_as_published: sub.options.retain_as_published,
                    identifiers: sub.identifier.into_iter().collect(),
                });
            }
        }
        (targets, any_shared)
    }
}

impl<S: Subscriber> SubscriptionTree<S> {
    /// How many sessions a message on `topic` would reach (a shared group counts once), without
    /// advancing any group's turn: for the admin API.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        let mut found: Vec<&Subscription<S>> = Vec::new();
        let mut shared: Vec<&SharedGroup<S>> = Vec::new();
        let levels: Vec<&str> = topic.split('/').collect();
        collect(&self.root, &levels, 0, topic.starts_with('$'), &mut found, &mut shared);
        let sessions: std::collections::HashSet<u64> = found.iter().map(|s| s.session.id()).collect();
        sessions.len() + shared.iter().filter(|g| !g.members.is_empty()).count()
    }

    /// Every filter in the tree (shared ones as `$share/group/filter`) with its number of
    /// subscribers, for the admin API.
    pub fn filters(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        list_filters(&self.root, &mut Vec::new(), &mut out);
        out
    }
}

fn list_filters<S>(node: &Node<S>, path: &mut Vec<String>, out: &mut Vec<(String, usize)>) {
    if let Some(subs) = &node.subs {
        let here = path.join("/");
        let hash = if path.is_empty() { "#".to_owned() } else { format!("{here}/#") };
        for (filter, n) in [(&here, subs.exact.len()), (&hash, subs.hash.len())] {
            if n > 0 {
                out.push((filter.clone(), n));
            }
        }
        for (filter, groups) in [(&here, &subs.exact_shared), (&hash, &subs.hash_shared)] {
            for (group, g) in groups {
                out.push((format!("$share/{group}/{filter}"), g.members.len()));
            }
        }
    }
    for (level, child) in node.literal.iter() {
        path.push(level.to_string());
        list_filters(child, path, out);
        path.pop();
    }
    if let Some(plus) = &node.plus {
        path.push("+".to_owned());
        list_filters(plus, path, out);
        path.pop();
    }
}

fn collect<'a, S>(
    node: &'a Node<S>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    found: &mut Vec<&'a Subscription<S>>,
    shared: &mut Vec<&'a SharedGroup<S>>,
) {
    let first = depth == 0 && dollar;
    if let (false, Some(subs)) = (first, &node.subs) {
        found.extend(subs.hash.values());
        shared.extend(subs.hash_shared.values());
    }
    let Some(level) = levels.get(depth) else {
        if let Some(subs) = &node.subs {
            found.extend(subs.exact.values());
            shared.extend(subs.exact_shared.values());
        }
        return;
    };
    if let Some(child) = node.literal.get(level) {
        collect(child, levels, depth + 1, dollar, found, shared);
    }
    if !first {
        if let Some(plus) = &node.plus {
            collect(plus, levels, depth + 1, dollar, found, shared);
        }
    }
}

fn remove<S: Subscriber>(node: &mut Node<S>, levels: &[&str], share: Option<&str>, session_id: u64) -> bool {
    let at_hash = levels == ["#"];
    if levels.is_empty() || at_hash {
        let Some(subs) = node.subs.as_mut() else {
            return false;
        };
        let removed = if at_hash {
            remove_here(&mut subs.hash, &mut subs.hash_shared, share, session_id)
        } else {
            remove_here(&mut subs.exact, &mut subs.exact_shared, share, session_id)
        };
        if subs.is_empty() {
            node.subs = None;
        }
        return removed;
    }
    let (&level, rest) = levels.split_first().expect("not empty");
    let removed;
    if level == "+" {
        let Some(child) = node.plus.as_mut() else {
            return false;
        };
        removed = remove(child, rest, share, session_id);
        if child.is_empty() {
            node.plus = None;
        }
    } else {
        let Some(child) = node.literal.get_mut(level) else {
            return false;
        };
        removed = remove(child, rest, share, session_id);
        if child.is_empty() {
            node.literal.remove(level);
        }
    }
    removed
}

fn remove_here<S: Subscriber>(
    subs: &mut HashMap<u64, Subscription<S>>,
    groups: &mut HashMap<Box<str>, SharedGroup<S>>,
    share: Option<&str>,
    session_id: u64,
) -> bool {
    match share {
        None => subs.remove(&session_id).is_some(),
        Some(g) => {
            let Some(group) = groups.get_mut(g) else {
                return false;
            };
            let before = group.members.len();
            group.members.retain(|m| m.session.id() != session_id);
            let removed = group.members.len() != before;
            if group.members.is_empty() {
                groups.remove(g);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{filter_matches, parse_filter, FilterError};

    #[test]
    fn filter_matches_follows_the_wildcard_rules_mqtt_4_7_1() {
        assert!(filter_matches("news/#", "news"), "[MQTT-4.7.1-2] # matches its parent level");
        assert!(filter_matches("news/+/breaking", "news/world/breaking"));
        assert!(!filter_matches("news/+", "news/world/breaking"));
        assert!(filter_matches("+/+", "/x"));
        assert!(!filter_matches("#", "$SYS/broker/uptime"));
        assert!(!filter_matches("news/tech", "news/tech/ai"));
    }

    /// A subscriber that is only its id: the tree needs nothing more.
    #[derive(Clone, Debug)]
    struct Id(u64);

    impl Subscriber for Id {
        fn id(&self) -> u64 {
            self.0
        }
    }

    type Subscription = super::Subscription<Id>;
    type SubscriptionTree = super::SubscriptionTree<Id>;

    fn sub(id: u64, qos: QoS, identifier: Option<u32>) -> Subscription {
        Subscription { session: Id(id), options: SubscriptionOptions { qos, ..Default::default() }, identifier }
    }

    fn add(tree: &mut SubscriptionTree, filter: &str, s: Subscription) {
        tree.subscribe(&parse_filter(filter).unwrap(), s);
    }

    fn ids(tree: &SubscriptionTree, topic: &str) -> Vec<u64> {
        let mut v: Vec<u64> = tree.matches(topic).0.iter().map(|t| t.session.id()).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_match_as_section_4_7_describes() {
        let mut t = SubscriptionTree::default();
        add(&mut t, "news/#", sub(1, QoS::AtMostOnce, None));
        add(&mut t, "news/+/breaking", sub(2, QoS::AtMostOnce, None));
        add(&mut t, "news/tech", sub(3, QoS::AtMostOnce, None));
        add(&mut t, "#", sub(4, QoS::AtMostOnce, None));
        add(&mut t, "+/+", sub(5, QoS::AtMostOnce, None));
        assert_eq!(ids(&t, "news"), vec![1, 4]);
        assert_eq!(ids(&t, "news/tech"), vec![1, 3, 4, 5]);
        assert_eq!(ids(&t, "news/tech/breaking"), vec![1, 2, 4]);
        assert_eq!(ids(&t, "sport/x"), vec![4, 5]);
        assert_eq!(ids(&t, "/x"), vec![4, 5]);
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
        let mut t = SubscriptionTree::default();
        add(&mut t, "#", sub(1, QoS::AtMostOnce, None));
        add(&mut t, "+/broker/uptime", sub(2, QoS::AtMostOnce, None));
        add(&mut t, "$SYS/#", sub(3, QoS::AtMostOnce, None));
        assert_eq!(ids(&t, "$SYS/broker/uptime"), vec![3]);
    }

    #[test]
    fn overlapping_subscriptions_give_one_target_with_max_qos_and_all_ids_mqtt_3_3_4_2() {
        let mut t = SubscriptionTree::default();
        let s = Id(7);
        let mk = |qos, id| Subscription {
            session: s.clone(),
            options: SubscriptionOptions { qos, ..Default::default() },
            identifier: Some(id),
        };
        add(&mut t, "news/#", mk(QoS::AtMostOnce, 1));
        add(&mut t, "news/tech", mk(QoS::ExactlyOnce, 2));
        let (m, shared) = t.matches("news/tech");
        assert!(!shared);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].qos, QoS::ExactlyOnce);
        let mut ids = m[0].identifiers.clone();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn shared_subscriptions_deliver_to_one_member_in_turn() {
        let mut t = SubscriptionTree::default();
        add(&mut t, "$share/g/news/#", sub(1, QoS::AtMostOnce, None));
        add(&mut t, "$share/g/news/#", sub(2, QoS::AtMostOnce, None));
        let a = ids(&t, "news/x");
        let b = ids(&t, "news/x");
        assert_eq!(a.len(), 1);
        assert_eq!(b.len(), 1);
        assert_ne!(a, b);
    }

    /// A level's children live in a vector while few and in a map beyond FEW_CHILDREN: matching
    /// and unsubscribing give the same answers on either side of the change.
    #[test]
    fn many_children_at_one_level_match_like_few() {
        let mut t = SubscriptionTree::default();
        for i in 0..20u64 {
            add(&mut t, &format!("users/{i}/inbox"), sub(i, QoS::AtMostOnce, None));
            add(&mut t, "users/+/inbox", sub(100, QoS::AtMostOnce, None));
            for j in 0..=i {
                assert_eq!(ids(&t, &format!("users/{j}/inbox")), vec![j, 100], "{i} children");
            }
            assert!(ids(&t, "users/x/inbox") == vec![100]);
        }
        assert!(matches!(t.root.literal.get("users").unwrap().literal, Children::Many(_)));
        for i in 0..20u64 {
            assert!(t.unsubscribe(&parse_filter(&format!("users/{i}/inbox")).unwrap(), i));
            assert_eq!(ids(&t, &format!("users/{i}/inbox")), vec![100]);
        }
        assert!(t.unsubscribe(&parse_filter("users/+/inbox").unwrap(), 100));
        assert!(t.root.is_empty(), "every level pruned");
    }

    #[test]
    fn unsubscribe_prunes_and_counts() {
        let mut t = SubscriptionTree::default();
        add(&mut t, "a/+/c", sub(1, QoS::AtMostOnce, None));
        add(&mut t, "$share/g/a/#", sub(1, QoS::AtMostOnce, None));
        assert_eq!(t.len(), 2);
        assert!(t.unsubscribe(&parse_filter("a/+/c").unwrap(), 1));
        assert!(!t.unsubscribe(&parse_filter("a/+/c").unwrap(), 1));
        assert!(t.unsubscribe(&parse_filter("$share/g/a/#").unwrap(), 1));
        assert!(t.root.is_empty());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn match_cache_serves_hits_and_notices_changes() {
        let mut t = SubscriptionTree::default();
        let cache = MatchCache::new(2);
        add(&mut t, "news/#", sub(1, QoS::AtMostOnce, None));
        let a = cache.matches(&t, "news/x");
        let b = cache.matches(&t, "news/x");
        assert!(Arc::ptr_eq(&a, &b), "second lookup is a hit");
        add(&mut t, "news/x", sub(2, QoS::AtMostOnce, None));
        assert_eq!(cache.matches(&t, "news/x").len(), 2, "a subscribe invalidates");
        t.unsubscribe(&parse_filter("news/#").unwrap(), 1);
        assert_eq!(cache.matches(&t, "news/x").len(), 1, "an unsubscribe invalidates");
        for topic in ["a", "b", "c", "news/x"] {
            cache.matches(&t, topic);
        }
        assert!(cache.entries.lock().unwrap().len() <= 2, "bounded");
        add(&mut t, "$share/g/s", sub(3, QoS::AtMostOnce, None));
        cache.matches(&t, "s");
        assert!(!cache.entries.lock().unwrap().contains_key("s"), "shared results are not cached");
    }

    #[test]
    fn share_syntax_errors() {
        assert_eq!(parse_filter("$share/p"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share/p/"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share//x"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("a/#/b"), Err(FilterError::Invalid));
        assert_eq!(parse_filter("$share/g/x").unwrap().share, Some("g"));
    }
}
