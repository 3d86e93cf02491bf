//! Accept loops: one per listener, each accepted socket handed to its own connection task;
//! TLS and WebSocket listeners go through `edge` first.

mod edge;

pub use edge::websocket as serve_websocket;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::warn;

use crate::broker::Broker;
use crate::config::ListenerProtocol;
use crate::connection::{Origin, Socket};

pub async fn accept_loop(broker: Arc<Broker>, listener: TcpListener, index: usize) {
    let protocol = broker.config().listeners[index].protocol;
    // Anonymous clients are allowed by default only where they can only be local.
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let origin = Origin { peer, loopback, listener: index, certificate_name: None };
                match protocol {
                    ListenerProtocol::Mqtt => {
                        tokio::spawn(crate::connection::serve(broker.clone(), Socket::Tcp(stream), origin));
                    }
                    _ => {
                        tokio::spawn(edge::serve(broker.clone(), stream, origin));
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
