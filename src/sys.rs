//! The `$SYS` tree: every `[sys] interval` seconds, each figure of a `figures::Snapshot` that
//! changed since the last round is published as a retained QoS 0 message under `$SYS/broker/`,
//! with Mosquitto's topic names where Mosquitto has one so that existing dashboards work, and
//! Herald's own under `$SYS/broker/herald/`. docs/operations.md lists them.
//!
//! `$SYS` messages are routed like any other (the ACL decides who may read them; no client may
//! publish under `$SYS`) but are not counted as received and not written to the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::Broker;
use crate::codec::QoS;
use crate::figures::Snapshot;
use crate::message::Message;

/// Exponentially weighted per-minute rates over 1, 5 and 15 minutes, as Mosquitto computes
/// its `$SYS/broker/load/...` figures.
#[derive(Default)]
struct Load {
    last: Option<u64>,
    averages: [f64; 3],
}

const WINDOWS: [(f64, &str); 3] = [(1.0, "1min"), (5.0, "5min"), (15.0, "15min")];

impl Load {
    fn update(&mut self, value: u64, elapsed_secs: f64) {
        let Some(last) = self.last.replace(value) else { return };
        if elapsed_secs <= 0.0 {
            return;
        }
        let per_minute = value.saturating_sub(last) as f64 * 60.0 / elapsed_secs;
        for (avg, (minutes, _)) in self.averages.iter_mut().zip(WINDOWS) {
            let decay = (-elapsed_secs / (minutes * 60.0)).exp();
            *avg = per_minute + decay * (*avg - per_minute);
        }
    }
}

/// The `$SYS/broker/load/...` series: topic stem and the `$SYS` figure it is the rate of.
const LOADS: [(&str, &str); 7] = [
    ("load/messages/received", "messages/received"),
    ("load/messages/sent", "messages/sent"),
    ("load/publish/received", "publish/messages/received"),
    ("load/publish/sent", "publish/messages/sent"),
    ("load/bytes/received", "bytes/received"),
    ("load/bytes/sent", "bytes/sent"),
    ("load/connections", "connections/total"),
];

/// Every `$SYS` topic and its value for one snapshot, the load averages updated with it.
fn render(snapshot: &Snapshot, loads: &mut [Load; LOADS.len()], elapsed_secs: f64) -> Vec<(String, String)> {
    let mut out = vec![
        ("$SYS/broker/version".to_owned(), concat!("herald ", env!("CARGO_PKG_VERSION")).to_owned()),
        ("$SYS/broker/uptime".to_owned(), format!("{} seconds", snapshot.uptime_secs)),
    ];
    for f in &snapshot.figures {
        out.push((format!("$SYS/broker/{}", f.sys_topic), f.value.to_string()));
    }
    for (load, (stem, figure)) in loads.iter_mut().zip(LOADS) {
        load.update(snapshot.get(figure).unwrap_or(0), elapsed_secs);
        for (avg, (_, window)) in load.averages.iter().zip(WINDOWS) {
            out.push((format!("$SYS/broker/{stem}/{window}"), format!("{avg:.2}")));
        }
    }
    out
}

pub async fn publish_loop(broker: Arc<Broker>) {
    let interval = Duration::from_secs(broker.config().sys.interval);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loads: [Load; LOADS.len()] = Default::default();
    let mut published: HashMap<String, String> = HashMap::new();
    let mut last_round = Instant::now();
    loop {
        ticker.tick().await;
        // Counting sessions walks the registry: off the async workers.
        let b = broker.clone();
        let Ok(snapshot) = tokio::task::spawn_blocking(move || Snapshot::take(&b)).await else { continue };
        let now = Instant::now();
        let elapsed = now.duration_since(last_round).as_secs_f64();
        last_round = now;
        for (topic, value) in render(&snapshot, &mut loads, elapsed) {
            if published.get(&topic) == Some(&value) {
                continue;
            }
            let payload = Bytes::from(value.clone().into_bytes());
            broker.publish(Arc::new(Message::new(topic.clone(), payload, QoS::AtMostOnce, true)));
            published.insert(topic, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_a_per_minute_rate_that_converges() {
        let mut load = Load::default();
        load.update(0, 10.0);
        assert_eq!(load.averages, [0.0; 3], "the first reading only sets the base");
        let mut value = 0;
        for _ in 0..600 {
            value += 100; // 100 per 10 s = 600 per minute
            load.update(value, 10.0);
        }
        for avg in load.averages {
            assert!((avg - 600.0).abs() < 1.0, "{avg}");
        }
        load.update(value, 10.0);
        assert!(load.averages[0] < load.averages[1] && load.averages[1] < load.averages[2], "1 min falls fastest");
    }
}
