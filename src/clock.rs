//! Wall-clock time as the store and the API record it (milliseconds since the epoch), and its
//! conversion to and from `Instant`, so that ages and expiry intervals carry over a restart.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn wall_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The `Instant` at which something happened `wall_ms` (milliseconds since the epoch), so that
/// ages and remaining expiry intervals carry over a restart. A time in the future (a clock set
/// back) counts as now.
pub fn instant_of(wall_ms: u64) -> Instant {
    let age = Duration::from_millis(wall_ms_now().saturating_sub(wall_ms));
    let now = Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

/// Milliseconds since the epoch at which `at` happened.
pub fn wall_ms_of(at: Instant) -> u64 {
    wall_ms_now().saturating_sub(at.elapsed().as_millis() as u64)
}
