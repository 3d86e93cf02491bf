//! Rebuilding the broker's state from the store at start: retained messages into the retained
//! tree, persistent sessions parked with their subscriptions in the router, their queue in
//! `pending` and their in-flight messages with the packet identifiers the client knows, and the
//! timers that expire them and publish their wills once the runtime runs.

use std::sync::Arc;

use tracing::info;

use crate::broker::Broker;
use crate::clock::wall_ms_now;
use crate::codec::Will;
use crate::message::Delivery;
use crate::session::{OutInflight, SessionShared, Subscription};
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
        let (shared, generation) = broker.registry().restore(s.client_id, |shared, state| {
            state.expiry_interval = expiry_interval;
            for (filter, options, identifier) in s.subscriptions {
                let Ok(parsed) = parse_filter(&filter) else { continue };
                broker.subscribe(&parsed, Subscription { session: shared.clone(), options, identifier });
                state.subscriptions.insert(filter, (options, identifier));
            }
            // Restored identifiers may sit anywhere in the identifier space: have every
            // allocation check them until they are acknowledged (see `allocate_packet_id`).
            state.allocations = u64::from(u16::MAX);
            let mut highest = 0u16;
            for (at, entry, message) in s.queue {
                if broker.is_high_priority(&message.topic) {
                    message.high.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let delivery = Delivery {
                    message,
                    qos: entry.qos,
                    retain: entry.retain,
                    subscription_ids: entry.subscription_ids.into_boxed_slice(),
                    stored: std::num::NonZeroU64::new(at.seq),
                };
                match entry.inflight {
                    Some((packet_id, out_state)) => {
                        highest = highest.max(packet_id);
                        state.inflight.push_back(OutInflight {
                            packet_id,
                            serial: 0,
                            delivery,
                            state: out_state,
                            sent_tick: 0,
                            retries: 0,
                        });
                    }
                    None => state.push_pending(delivery),
                }
            }
            state.next_packet_id = highest.checked_add(1).unwrap_or(1);
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
