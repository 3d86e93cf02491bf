//! What a node hands to NATS for the others: QoS 0 copies and claims on core NATS, QoS 1/2
//! appends to the stream, each a task of its own fed by a bounded queue (`cluster.max_pending`),
//! so that a publisher's connection never waits on NATS. Stories gathered over
//! `cluster.linger_ms` go in one burst, those for the same nodes as one message (`bundle`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::warn;

use super::bundle::{self, Outgoing};
use super::{Link, RETRY_AFTER};

/// At most this many QoS 0 copies go to the client in one burst; a burst this full goes
/// without lingering.
const BURST: usize = 1024;
/// A burst of appends this full goes without lingering (under load, bursts fill faster than
/// `linger_ms`: the linger would only slow them).
const APPEND_BURST: usize = 32;
/// Appends handed to the client and not yet acknowledged by JetStream, at most.
const APPEND_WINDOW: usize = 256;

/// Publishes what `rx` gives on core NATS (at most once): QoS 0 messages, gathered for
/// `linger` (`cluster.linger_ms`) and handed to the client in one burst, which it writes in one
/// go, those for the same nodes bundled; claims (`linger` None) at once, each alone.
pub(super) async fn send_core(link: Arc<Link>, linger: Option<Duration>, mut rx: mpsc::Receiver<Outgoing<()>>) {
    let mut burst = Vec::with_capacity(BURST);
    while rx.recv_many(&mut burst, BURST).await > 0 {
        let Some(linger) = linger else {
            for o in burst.drain(..) {
                let _ = link.client.publish_with_headers(o.subject, link.headers(), o.payload).await;
            }
            continue;
        };
        if !linger.is_zero() && burst.len() < BURST {
            tokio::time::sleep(linger).await;
            let room = BURST.saturating_sub(burst.len());
            rx.recv_many(&mut burst, room).now_or_never();
        }
        link.figures.bursts.fetch_add(1, Ordering::Relaxed);
        for g in bundle::group(burst.drain(..)) {
            let n = g.stories.len() as u64;
            let sent = link.client.publish_with_headers(g.subject.clone(), link.headers(), g.payload()).await.is_ok();
            let counter = if sent { &link.figures.sent_qos0 } else { &link.figures.dropped_qos0 };
            counter.fetch_add(n, Ordering::Relaxed);
            if n > 1 {
                link.figures.bundled.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Resolves to the stream sequence JetStream stored the message at (the first copy's, for a
/// duplicate).
type AckFuture = Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send>>;

/// One message handed to the client for the stream, waiting for JetStream's acknowledgement.
struct InFlight {
    /// The ticket of its first story: its message id, the same when sent again.
    id: u64,
    /// The ticket JetStream's acknowledgement of this message settles, with every one before
    /// it; 0 for a bundle of a burst that is not the burst's last (the last settles the burst).
    settles: u64,
    stories: u64,
    subject: String,
    payload: Bytes,
    ack: AckFuture,
}

/// Hands one append to the client and returns the wait for JetStream's acknowledgement.
async fn start_append(
    js: jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
) -> AckFuture {
    match js.publish_with_headers(subject, headers, payload).await {
        Ok(ack) => Box::pin(async move { ack.await.map(|a| a.sequence).map_err(|e| e.to_string()) }),
        Err(e) => Box::pin(std::future::ready(Err(e.to_string()))),
    }
}

/// Appends QoS 1 and 2 messages to the stream in ticket order, up to `APPEND_WINDOW` waiting
/// for their acknowledgement at once, and moves `replicated` as the oldest is acknowledged. An
/// append that fails is sent again with the same message id (JetStream drops the copy if the
/// first one arrived after all), so the publisher's acknowledgement waits while NATS is away
/// instead of being sent for a message that is not in the stream. With `linger`
/// (`cluster.linger_ms`), what comes within it of the first goes to the client together,
/// bundled by subject (`bundle::group`).
pub(super) async fn append(
    link: Arc<Link>,
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Outgoing<u64>>,
    boot: u64,
    linger: Duration,
) {
    // The publish is handed to the client at once (so appends are pipelined); only the
    // acknowledgement is waited for in order.
    let send = |id: u64, subject: String, payload: Bytes| {
        let mut headers = link.headers();
        headers.insert("Nats-Msg-Id", format!("{}.{boot}.{id}", link.node).as_str());
        start_append(js.clone(), subject, headers, payload)
    };
    let mut waiting: VecDeque<InFlight> = VecDeque::new();
    let mut open = true;
    // The stream sequence of the last append acknowledged: in ticket order, each is above it,
    // unless a resent append landed after a later one that had arrived the first time.
    let mut last_sequence = 0;
    let mut check = tokio::time::interval(RETRY_AFTER);
    // Appends received and not yet sent, while `linger` runs from the first of them.
    let mut gathered: Vec<Outgoing<u64>> = Vec::new();
    let gathering = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(gathering);
    while open || !waiting.is_empty() || !gathered.is_empty() {
        tokio::select! {
            biased;
            _ = check.tick(), if !waiting.is_empty() => link.give_up_on_old(),
            _ = &mut gathering, if !gathered.is_empty() => {
                link.figures.bursts.fetch_add(1, Ordering::Relaxed);
                // Tickets come in order, so the burst holds every ticket up to its highest.
                let highest = gathered.iter().map(|o| o.tag).max().unwrap_or(0);
                let groups = bundle::group(gathered.drain(..));
                let last = groups.len().saturating_sub(1);
                for (i, g) in groups.into_iter().enumerate() {
                    let (id, stories, payload) = (g.stories[0].1, g.stories.len() as u64, g.payload());
                    if stories > 1 {
                        link.figures.bundled.fetch_add(stories, Ordering::Relaxed);
                    }
                    let ack = send(id, g.subject.clone(), payload.clone()).await;
                    let settles = if i == last { highest } else { 0 };
                    waiting.push_back(InFlight { id, settles, stories, subject: g.subject, payload, ack });
                }
            }
            result = async { (&mut waiting.front_mut().expect("not empty").ack).await }, if !waiting.is_empty() => {
                match result {
                    Ok(sequence) => {
                        let done = waiting.pop_front().expect("not empty");
                        if sequence < last_sequence {
                            link.figures.append_reordered.fetch_add(1, Ordering::Relaxed);
                            warn!(ticket = done.id, sequence, after = last_sequence, "a resent append landed after a later one: the other nodes get these two out of order");
                        }
                        last_sequence = last_sequence.max(sequence);
                        link.figures.appended.fetch_add(done.stories, Ordering::Relaxed);
                        if done.settles > 0 {
                            link.acknowledge(done.settles);
                        }
                        if waiting.is_empty() && !gathered.is_empty() {
                            // Nothing in flight any more: what was gathered meanwhile goes now
                            // (its publishers may be waiting for these PUBACKs to send more).
                            gathering.as_mut().reset(tokio::time::Instant::now());
                        }
                    }
                    Err(e) => {
                        // Every waiting append is sent again, in order, not only the first:
                        // after a failover each would otherwise wait for its own timeout in
                        // turn (measured: a 22 s pause at 200 messages/s, instead of the
                        // election's few seconds). JetStream drops the copies of those that
                        // had arrived (same message id).
                        link.figures.append_retries.fetch_add(waiting.len() as u64, Ordering::Relaxed);
                        warn!(error = e.as_str(), waiting = waiting.len(), "appending to JetStream failed; sending again");
                        tokio::time::sleep(RETRY_AFTER).await;
                        for entry in waiting.iter_mut() {
                            entry.ack = send(entry.id, entry.subject.clone(), entry.payload.clone()).await;
                        }
                    }
                }
            }
            next = rx.recv(), if open && waiting.len() + gathered.len() < APPEND_WINDOW => match next {
                Some(o) if linger.is_zero() => {
                    link.figures.bursts.fetch_add(1, Ordering::Relaxed);
                    let ack = send(o.tag, o.subject.clone(), o.payload.clone()).await;
                    waiting.push_back(InFlight { id: o.tag, settles: o.tag, stories: 1, subject: o.subject, payload: o.payload, ack });
                }
                Some(o) => {
                    if gathered.is_empty() {
                        gathering.as_mut().reset(tokio::time::Instant::now() + linger);
                    }
                    gathered.push(o);
                    if gathered.len() >= APPEND_BURST {
                        gathering.as_mut().reset(tokio::time::Instant::now());
                    }
                }
                None => {
                    open = false;
                    gathering.as_mut().reset(tokio::time::Instant::now());
                }
            },
        }
    }
}
