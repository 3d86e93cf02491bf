//! Herald, an MQTT 3.1.1 and 5.0 broker for pushing news.
//!
//! The path of a message:
//!
//! ```text
//! socket -> listener -> connection: decode -> router -> each matching session's mailbox
//!                            |                  \-> retain (retained store)
//!                            \-> session state      connection of that session: encode -> vectored write -> socket
//! ```
//!
//! A PUBLISH is decoded once (`codec`), its payload stays one `Bytes` for its whole life, the
//! `router` finds the matching sessions in the subscription tree, and each target session gets
//! an `Arc` of the message in its bounded mailbox (`session`). The connection that holds the
//! session drains the mailbox within the client's receive window and writes with non-blocking vectored
//! writes from the same task (`connection::outbound`). No lock is held across an `.await`.
//!
//! Modules, by layer (each imports only its own layer or lower ones; `tests/layers.rs` checks):
//! `codec` (bytes <-> packets); `clock`, `topic` (filters, `$SYS`), `metrics` (counters,
//! histograms); `config`, `logging`, `tls`, `auth`; `receipt` and `message` (one message, one
//! delivery, one receipt); `router` (subscription tree), `retain`, `store` (RocksDB, group
//! commit), `receipts` (the index, story deduplication), `cluster` (cluster mode's NATS link); `session` (session state and the
//! registry, the one writer of session lifecycles); `broker` (routing, admission, outcomes);
//! `connection` (handshake, packets, outbound writing); `listener`, `http`, `sys`, `figures`,
//! `pressure` (degraded mode), `webhook`; `server` (opens, recovers, starts the tasks, runs).

// Layers, bottom to top (docs/architecture.md; tests/layers.rs fails on an import upwards or
// a cycle between these modules):
//  0 codec
//  1 clock, topic, metrics
//  2 config, logging, tls, auth
//  3 receipt, message
//  4 router, retain, store, receipts, cluster (the NATS link of cluster mode)
//  5 session (state, and the registry: the one writer of session lifecycles)
//  6 broker (routing, admission, outcome counting)
//  7 connection
//  8 listener, http, sys, figures, pressure, webhook
//  9 server (opens, recovers, starts the tasks, runs)
pub mod auth;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connection;
pub mod figures;
pub mod http;
pub mod listener;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod pressure;
pub mod receipt;
pub mod receipts;
pub mod retain;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod sys;
pub mod tls;
pub mod topic;
pub mod webhook;
