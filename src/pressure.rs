//! Degraded mode [issue 7]: when the messages waiting in session queues or the resident memory
//! cross `[degraded]` bounds, Herald sheds normal-priority QoS 0 deliveries and refuses new
//! normal publishes (5.0: 0x97; 3.1.1 QoS 1/2: the connection is closed unacknowledged) while
//! high-priority traffic keeps flowing, and leaves the mode by itself once every measure is
//! below `recover_at` of its bound. The mode is reported in `$SYS/broker/herald/degraded`, in
//! /metrics and in the log.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::broker::Broker;

/// How often the pressure is measured at most: a flood refills queues within tenths of a
/// second. Measuring walks the session registry, so the pause after each measurement is also at
/// least 20 times what it took (a million sessions: about a second), keeping the walk under 5% of
/// a core.
const EVERY: Duration = Duration::from_millis(50);

/// Resident memory in bytes, from /proc/self/statm (0 where there is none).
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The fraction of its bound each configured measure is at; the highest decides.
fn pressure(broker: &Broker) -> (f64, u64, u64) {
    let c = &broker.config().degraded;
    let mut worst: f64 = 0.0;
    let mut queued = 0;
    let mut memory = 0;
    if c.max_queued_messages > 0 {
        queued = broker.session_counts().queued;
        worst = worst.max(queued as f64 / c.max_queued_messages as f64);
    }
    if c.max_memory_mb > 0 {
        memory = resident_bytes();
        worst = worst.max(memory as f64 / (c.max_memory_mb as f64 * 1024.0 * 1024.0));
    }
    (worst, queued, memory)
}

pub async fn monitor(broker: Arc<Broker>) {
    let c = &broker.config().degraded;
    if c.max_queued_messages == 0 && c.max_memory_mb == 0 {
        return;
    }
    let mut pause = EVERY;
    let mut entered = std::time::Instant::now();
    let hold = Duration::from_millis(broker.config().degraded.min_duration_ms);
    loop {
        tokio::time::sleep(pause).await;
        let b = broker.clone();
        let started = std::time::Instant::now();
        let Ok((level, queued, memory)) = tokio::task::spawn_blocking(move || pressure(&b)).await else { continue };
        pause = EVERY.max(started.elapsed() * 20);
        let degraded = broker.is_degraded();
        if !degraded && level >= 1.0 {
            broker.set_degraded(true);
            entered = std::time::Instant::now();
            warn!(queued, resident_mb = memory >> 20, "entering degraded mode: shedding normal traffic");
        } else if degraded && level < broker.config().degraded.recover_at && entered.elapsed() >= hold {
            // Held for `min_duration_ms` at least: every exit lets the flood that caused the
            // mode back in at once, and each such burst is what a breaking story may wait behind.
            broker.set_degraded(false);
            info!(queued, resident_mb = memory >> 20, "leaving degraded mode");
        }
    }
}
