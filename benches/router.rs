//! Topic matching with and without the match cache, at 1k, 100k and 1M subscriptions of which a
//! realistic share (about 20%) use wildcards: phones subscribe to sections (`news/<section>/#`),
//! stories of a region across sections (`news/+/<region>`), and most to exact topics.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use herald::codec::SubscriptionOptions;
use herald::router::{MatchCache, Subscriber};
use herald::topic::parse_filter;

/// A subscriber as costly to copy into a match result as the broker's `Arc<SessionShared>`:
/// one reference count.
#[derive(Clone)]
struct Session(std::sync::Arc<u64>);

impl Subscriber for Session {
    fn id(&self) -> u64 {
        *self.0
    }
}

type Subscription = herald::router::Subscription<Session>;
type SubscriptionTree = herald::router::SubscriptionTree<Session>;

fn filter_for(i: usize) -> String {
    let section = i % 50;
    let region = (i / 50) % 40;
    match i % 10 {
        0 => format!("news/s{section}/#"),
        1 => format!("news/+/r{region}"),
        _ => format!("news/s{section}/r{region}/story{}", i / 2000),
    }
}

fn build(n: usize) -> SubscriptionTree {
    let mut tree = SubscriptionTree::default();
    for i in 0..n {
        let session = Session(std::sync::Arc::new(i as u64));
        let filter = filter_for(i);
        tree.subscribe(
            &parse_filter(&filter).unwrap(),
            Subscription { session, options: SubscriptionOptions::default(), identifier: None },
        );
    }
    tree
}

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("match");
    g.sample_size(20);
    for n in [1_000usize, 100_000, 1_000_000] {
        let tree = build(n);
        let topics: Vec<String> = (0..64).map(|i| format!("news/s{}/r{}/story{}", i % 50, i % 40, i % 7)).collect();
        g.bench_with_input(BenchmarkId::new("uncached", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % topics.len();
                black_box(tree.matches(&topics[i]).0.len())
            })
        });
        let cache = MatchCache::new(10_000);
        g.bench_with_input(BenchmarkId::new("cached", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % topics.len();
                black_box(cache.matches(&tree, &topics[i]).len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
