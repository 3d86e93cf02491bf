//! Topic filters and names from arbitrary strings: parsing, subscribing, matching and
//! unsubscribing must never panic, and unsubscribing must leave the tree empty again.
#![no_main]

use herald::router::{Subscriber, Subscription, SubscriptionTree};
use herald::topic::parse_filter;
use libfuzzer_sys::fuzz_target;

/// The tree needs only an id of its subscribers.
#[derive(Clone)]
struct Id(u64);

impl Subscriber for Id {
    fn id(&self) -> u64 {
        self.0
    }
}

fuzz_target!(|data: (&str, &str)| {
    let (filter, topic) = data;
    let Ok(parsed) = parse_filter(filter) else { return };
    let session = Id(1);
    let mut tree = SubscriptionTree::default();
    tree.subscribe(&parsed, Subscription { session, options: Default::default(), identifier: None });
    let (targets, _) = tree.matches(topic);
    assert!(targets.len() <= 1);
    if topic == parsed.filter && !topic.starts_with('$') && parsed.share.is_none() && !topic.contains(['+', '#']) {
        assert_eq!(targets.len(), 1, "a topic name matches the identical filter");
    }
    assert!(tree.unsubscribe(&parsed, 1));
    assert!(tree.is_empty());
});
