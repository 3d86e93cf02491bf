//! Cluster mode's receiving side: what the other nodes publish, routed to this node's sessions
//! as a local publish would be (`Broker::publish`). QoS 0 arrives over core NATS; QoS 1 and 2
//! from this node's durable JetStream consumer, acknowledged to JetStream once what persistent
//! sessions need of the message is in this node's store, so that a node that dies before that
//! gets the message again from the stream when it restarts.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::warn;

use crate::broker::Broker;
use crate::cluster::{self, Inbound, Link};

/// Stream messages routed here and waiting for this node's store before their JetStream ack.
const ACKS_WAITING: usize = 1024;

pub async fn receive(broker: Arc<Broker>, link: Arc<Link>, inbound: Inbound) {
    let Inbound { mut qos0, mut claims, mut log, mut retained, .. } = inbound;
    let (acks, waiting) = mpsc::channel(ACKS_WAITING);
    tokio::spawn(acknowledge(broker.clone(), waiting));
    loop {
        tokio::select! {
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
                    if let Some(r) = cluster::receive(&link, m.headers.as_ref(), &m.payload) {
                        broker.publish(Arc::new(r.message));
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
                    let ticket = match cluster::receive(&link, m.headers.as_ref(), &m.payload) {
                        Some(r) => broker.publish(Arc::new(r.message)).ticket,
                        None => 0,
                    };
                    if acks.send((ticket, m)).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "reading the cluster's stream failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
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
