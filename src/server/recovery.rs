//! Rebuilding the broker's state from the store at start: retained messages into the retained
//! tree, persistent sessions parked with their subscriptions in the router and their queue
//! counted but left in the store (read when the session comes back: `Registry::claim`), and the
//! timers that expire them and publish their wills once the runtime runs.

use std::sync::Arc;

use tracing::info;

use crate::broker::Broker;
use crate::clock::wall_ms_now;
use crate::codec::Will;
use crate::session::{SessionShared, Subscription};
use crate::store::Recovered;
use crate::topic::parse_filter;

/// A restored session's timers, scheduled by `schedule` when the broker runs.
pub struct Restored {
    session: Arc<SessionShared>,
    /// Seconds until it expires; None for never.
    expires_in: Option<u64>,
    /// Its last connection's will and the seconds until it is due.
    will: Option<(Will, u64)>,
    disconnected_at_ms: u64,
    generation: u64,
}

/// Puts the retained messages back and parks every persistent session with its subscriptions
/// in the router; returns their timers, for `schedule` once the runtime runs.
pub fn restore(broker: &Broker, recovered: Recovered) -> Vec<Restored> {
    for m in recovered.retained {
        broker.restore_retained(Arc::new(m));
    }
    let now_ms = wall_ms_now();
    let mut restored = Vec::new();
    for s in recovered.sessions {
        let expiry_interval = s.record.expiry_interval;
        let (shared, generation) = broker.registry().restore(s.client_id, s.record.owner.clone(), |shared, state| {
            state.expiry_interval = expiry_interval;
            for (filter, options, identifier) in s.subscriptions {
                let Ok(parsed) = parse_filter(&filter) else { continue };
                broker.subscribe(&parsed, Subscription { session: shared.clone(), options, identifier });
                state.subscriptions.insert(filter, (options, identifier));
            }
            // Restored identifiers may sit anywhere in the identifier space: have every
            // allocation check them until they are acknowledged (see `allocate_packet_id`).
            state.allocations = u64::from(u16::MAX);
            // The queue stays in the store until the session comes back (`Registry::claim`).
            state.set_cold(s.cold);
            state.incoming_qos2.extend(s.incoming_qos2);
        });
        // A session that was connected when the broker stopped counts from now.
        let elapsed = match s.record.disconnected_at_ms {
            0 => 0,
            at => now_ms.saturating_sub(at) / 1000,
        };
        let expires_in =
            (s.record.expiry_interval != u32::MAX).then(|| u64::from(s.record.expiry_interval).saturating_sub(elapsed));
        let will = s.record.will.map(|w| {
            let delay = w.properties.will_delay_interval.unwrap_or(0).min(s.record.expiry_interval);
            (w, u64::from(delay).saturating_sub(elapsed))
        });
        let disconnected_at_ms = match s.record.disconnected_at_ms {
            0 => now_ms,
            at => at,
        };
        restored.push(Restored { session: shared, expires_in, will, disconnected_at_ms, generation });
    }
    if !restored.is_empty() {
        info!(sessions = restored.len(), "persistent sessions restored");
    }
    restored
}

/// Starts the expiry timers and will timers of the restored sessions.
pub fn schedule(broker: &Arc<Broker>, restored: Vec<Restored>) {
    for r in restored {
        if let Some((will, delay)) = r.will {
            broker.schedule_will(&r.session, will, delay, r.disconnected_at_ms);
        }
        if let Some(secs) = r.expires_in {
            broker.registry().schedule_expiry(r.session, secs, r.generation);
        }
    }
}
