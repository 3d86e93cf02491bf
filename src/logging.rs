//! Log output: tracing-subscriber's human-readable lines, or with `[log] format = "json"` its
//! JSON formatter, one object per line (`timestamp`, `level`, `message` and the event's fields),
//! for log shippers.
//!
//! Whatever a client chose (client identifier, user name, topic) is logged as a string field:
//! the text format quotes and escapes it, the JSON format makes it a JSON string, so a newline
//! in a client identifier cannot start a forged line.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Installs the global subscriber: the filter from RUST_LOG if set, else `[log] level`.
pub fn init(config: &Log) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
        LogFormat::Text => {
            // Colour only for a terminal: log files and pipes get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
            builder.with_ansi(ansi).init()
        }
    }
}

/// The bound on connection lines per second (`[log] connection_lines_per_second`), 0 for none.
static LINES_PER_SECOND: AtomicU32 = AtomicU32::new(100);
/// The second the counts below belong to, and the lines written and left out in it.
static SECOND: AtomicU64 = AtomicU64::new(0);
static WRITTEN: AtomicU32 = AtomicU32::new(0);
static LEFT_OUT: AtomicU64 = AtomicU64::new(0);

pub fn set_connection_lines_per_second(n: u32) {
    LINES_PER_SECOND.store(n, Ordering::Relaxed);
}

/// Whether a line about one client connecting, disconnecting or hitting a limit may be written
/// now. A reconnect storm of 100,000 phones would otherwise write 200,000 lines a minute and
/// bury everything else; the metrics count every event, the log samples them. The first line
/// of each second says how many the previous second left out.
pub fn connection_line() -> bool {
    let limit = LINES_PER_SECOND.load(Ordering::Relaxed);
    if limit == 0 {
        return true;
    }
    let now = crate::clock::wall_ms_now() / 1000;
    let second = SECOND.load(Ordering::Relaxed);
    if now != second && SECOND.compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        WRITTEN.store(0, Ordering::Relaxed);
        let left_out = LEFT_OUT.swap(0, Ordering::Relaxed);
        if left_out > 0 {
            tracing::info!(
                left_out,
                limit,
                "connection lines left out in the last second (connection_lines_per_second)"
            );
        }
    }
    if WRITTEN.fetch_add(1, Ordering::Relaxed) < limit {
        true
    } else {
        LEFT_OUT.fetch_add(1, Ordering::Relaxed);
        false
    }
}
