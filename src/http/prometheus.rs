//! `GET /metrics`: a `figures::Snapshot` in the Prometheus text exposition format (0.0.4), the
//! same reading `$SYS` publishes, so the two agree.

use std::fmt::Write;

use crate::figures::{Kind, Snapshot};
use crate::metrics::HistogramReading;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// In cluster mode every sample carries `node="<cluster.node>"`, so that one Prometheus can
/// scrape every node and sum or tell them apart.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // `{node="x"}` alone, and `,node="x"` after other labels. Node names are [A-Za-z0-9_-]
    // (validated), so they need no escaping.
    let (alone, after) = match &s.node {
        Some(n) => (format!("{{node=\"{n}\"}}"), format!(",node=\"{n}\"")),
        None => (String::new(), String::new()),
    };
    let _ = writeln!(out, "# HELP herald_build_info Herald's version.\n# TYPE herald_build_info gauge");
    let _ = writeln!(out, "herald_build_info{{version=\"{}\"{after}}} 1", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "# HELP herald_uptime_seconds Seconds since the broker started.");
    let _ = writeln!(out, "# TYPE herald_uptime_seconds gauge\nherald_uptime_seconds{alone} {}", s.uptime_secs);
    for f in &s.figures {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {} ($SYS/broker/{})", f.metric, f.help, f.sys_topic);
        let _ = writeln!(out, "# TYPE {} {}\n{}{alone} {}", f.metric, kind, f.metric, f.value);
    }
    histogram(
        &mut out,
        "herald_delivery_latency_seconds",
        "Time from a PUBLISH's arrival to its delivery being written for a subscriber.",
        &s.delivery_latency_us,
        1e-6,
        &after,
    );
    histogram(
        &mut out,
        "herald_ack_latency_seconds",
        "Time from a PUBLISH's arrival to a subscriber's acknowledgement (PUBACK, PUBCOMP).",
        &s.ack_latency_us,
        1e-6,
        &after,
    );
    histogram(
        &mut out,
        "herald_store_commit_seconds",
        "Time to write one store batch, fsync included in sync mode.",
        &s.store_commit_us,
        1e-6,
        &after,
    );
    histogram(
        &mut out,
        "herald_offline_queue_depth",
        "Length of an offline session's queue each time a message joins it.",
        &s.queue_depth,
        1.0,
        &after,
    );
    out
}

/// One histogram; `scale` turns the observed unit into the metric's (microseconds to seconds).
fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramReading, scale: f64, node: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, count) in &h.cumulative {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"{node}}} {count}", *bound as f64 * scale);
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"{node}}} {}", h.count);
    let alone = node.strip_prefix(',').map(|l| format!("{{{l}}}")).unwrap_or_default();
    let _ = writeln!(out, "{name}_sum{alone} {}", h.sum as f64 * scale);
    let _ = writeln!(out, "{name}_count{alone} {}", h.count);
}
