//! The server: opens the broker and rebuilds what the store held (`recovery`), binds the
//! listeners and the HTTP server, starts the broker's tasks (`$SYS`, receipts, pressure, the
//! webhook) and runs until shutdown or a store write failure. The top layer: nothing imports it
//! but `main` and the tests.

mod cluster;
mod receipts;
mod recovery;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::store::StoreError;

pub use receipts::flush as flush_receipts;

/// A broker opened with its state restored, before it runs.
pub struct Server {
    broker: Arc<Broker>,
    /// Restored sessions' expiry and will timers, started by `run`.
    restored: Vec<recovery::Restored>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(StoreError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl ServerError {
    /// The process exit status `main` ends with: 74 (EX_IOERR) after a store write failure,
    /// 1 otherwise (docs/operations.md).
    pub fn exit_status(&self) -> u8 {
        match self {
            ServerError::Store(StoreError::Write { .. }) => crate::store::EXIT_WRITE_FAILED,
            _ => 1,
        }
    }
}

/// Shared groups getting their first member here, waiting for `server::cluster` to start reading
/// them (cluster mode).
const SHARED_JOINS: usize = 1024;

/// Opens the broker and rebuilds the retained messages and persistent sessions the store holds.
pub fn open(config: Config) -> Result<Server, ServerError> {
    crate::logging::set_connection_lines_per_second(config.log.connection_lines_per_second);
    let (broker, recovered) = Broker::open(config)?;
    let restored = recovery::restore(&broker, recovered);
    Ok(Server { broker, restored })
}

impl Server {
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }
}

/// Binds every configured listener (and the HTTP server) and serves until shutdown. Returns
/// the bound addresses through `bound` as soon as they are known, so tests can use port 0.
///
/// Shutdown: the listeners stop accepting, every connection is asked to close (5.0 clients get
/// DISCONNECT 0x8B) and flushes its acknowledgements, and once all are closed or
/// `[shutdown] grace_period` has run out, the store writes what is gathered and closes.
pub async fn run(
    server: Server,
    bound: Option<tokio::sync::oneshot::Sender<Vec<SocketAddr>>>,
) -> Result<(), ServerError> {
    let Server { broker, restored } = server;
    let mut shutdown = broker.shutdown_signal();
    // Cluster mode: joined before any client is accepted, so that every message a client
    // publishes reaches the other nodes.
    let inbound = match &broker.config().cluster {
        Some(c) => {
            let (link, mut inbound) = crate::cluster::Link::connect(c, broker.store().boot()).await?;
            // The cluster's retained messages, before any client can subscribe here.
            for m in inbound.retained_now.drain(..) {
                broker.restore_retained(Arc::new(m));
            }
            broker.set_cluster(link.clone());
            // What the sessions restored from the store want, known to every node before any
            // client connects here; and what an earlier run wanted and nobody does now, removed.
            link.seed_interest(broker.subscribed_filters());
            match link.prune_interest().await {
                Ok(n) if n > 0 => info!(filters = n, "stale interest of an earlier run removed"),
                Ok(_) => {}
                Err(e) => warn!(error = e.as_str(), "reading the cluster's interest table failed"),
            }
            link.interest_settled().await;
            // Shared groups with members here (restored sessions' now, new ones as they come).
            let (joins, joined) = tokio::sync::mpsc::channel(SHARED_JOINS);
            let groups = broker.follow_shared_groups(joins);
            Some((link, inbound, cluster::SharedGroups { now: groups, joined }))
        }
        None => None,
    };
    let mut listeners = Vec::new();
    for l in &broker.config().listeners {
        let listener = bind(&l.bind, l.backlog).await?;
        let addr = listener.local_addr()?;
        info!(%addr, protocol = ?l.protocol, "listening");
        listeners.push(listener);
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(http) = &broker.config().http {
        let listener = bind(&http.bind, http.backlog).await?;
        let addr = listener.local_addr()?;
        broker.set_http_addr(addr);
        info!(%addr, "http listening");
        tasks.spawn(crate::http::serve(broker.clone(), listener));
    }
    broker.set_listening(true);
    if let Some(tx) = bound {
        let addrs = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
        let _ = tx.send(addrs);
    }
    recovery::schedule(&broker, restored);
    for (index, listener) in listeners.into_iter().enumerate() {
        tasks.spawn(crate::listener::accept_loop(broker.clone(), listener, index));
    }
    if broker.config().sys.interval > 0 {
        tasks.spawn(crate::sys::publish_loop(broker.clone()));
    }
    tasks.spawn(receipts::maintain(broker.clone()));
    // Not in `tasks`: a node shutting down answers handovers until its sessions are handed over.
    let cluster_task =
        inbound.map(|(link, inbound, groups)| tokio::spawn(cluster::receive(broker.clone(), link, inbound, groups)));
    tasks.spawn(crate::pressure::monitor(broker.clone()));
    let webhook_events = broker.take_webhook_events();
    if let (Some(url), Some(events)) = (&broker.config().delivery.webhook, webhook_events) {
        let endpoint = crate::config::HttpEndpoint::parse(url).expect("validated with the configuration");
        let delivery = broker.config().delivery.clone();
        let tls =
            crate::tls::client_config(delivery.webhook_ca_file.as_deref()).expect("validated with the configuration");
        // Not in `tasks`: it drains what is queued after shutdown begins too, until the broker goes.
        tokio::spawn(crate::webhook::run(endpoint, delivery, tls, events, broker.webhook_failures().clone()));
    }
    let failure = tokio::select! {
        _ = shutdown.wait_for(|s| *s) => None,
        e = broker.store().write_failure() => {
            error!(error = %e, "the store cannot be written: shutting down");
            broker.begin_shutdown();
            Some(e)
        }
    };
    let grace = std::time::Duration::from_secs(broker.config().shutdown.grace_period);
    info!(grace_secs = grace.as_secs(), "shutting down: no longer accepting connections");
    broker.set_listening(false);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let deadline = tokio::time::Instant::now() + grace;
    while broker.metrics().connections_now() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if broker.metrics().connections_now() > 0 {
        warn!(open = broker.metrics().connections_now(), "connections still open when the grace period ran out");
    }
    if let Some(task) = cluster_task {
        // Cluster mode: the persistent sessions, parked now, go whole to the live nodes.
        if failure.is_none() {
            broker.leave(grace.max(std::time::Duration::from_secs(5))).await;
        }
        task.abort();
    }
    receipts::flush(&broker);
    broker.store().close();
    info!("store closed");
    match failure {
        Some(e) => Err(ServerError::Store(e)),
        None => Ok(()),
    }
}

/// Binds `addr` with the configured listen backlog (tokio's `bind` asks for 128, and
/// offers no setting; a reconnect storm needs the operator's say).
async fn bind(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")))
}
