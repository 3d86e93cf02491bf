//! One delivering holder per session (docs/cluster.md, "Fencing"). The other nodes take a node
//! for dead once they have not heard it for `dead_after_secs`, and take its sessions over; a node
//! that was merely paused (SIGSTOP, a stalled VM) or cut off from NATS must then not go on
//! delivering for those sessions when it comes back.
//!
//! The node's *lease*: its heartbeat carries the time it was sent, and hearing its own heartbeat
//! back from NATS proves that the other nodes heard it too, no earlier than it was sent. So no
//! node can take this one for dead before `sent + dead_after`: that is the lease. Past it, a
//! connection of a persistent session here writes nothing more (`may_deliver`, checked before
//! every write, so it holds from the first instant after a pause, whichever task runs first): it
//! closes with DISCONNECT 0x8E and its session parks. The node is then *fenced*: it refuses to
//! resume persistent sessions until it has asked every live node which of its sessions they
//! took over, and has ended those here (`server::cluster::watch_nodes`).
//!
//! The clock is the process's monotonic clock: it runs on through SIGSTOP, so a paused process
//! finds its lease lapsed when it resumes. (A virtual machine whose monotonic clock stops while
//! it is paused would not; its NATS connection, silent past the server's ping interval, is then
//! what fences it.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Fence {
    epoch: Instant,
    dead_after_ms: u64,
    /// Monotonic ms (since `epoch`) until which no other node can have taken this one for dead.
    lease_until: AtomicU64,
    /// Since when the lease has been valid without a gap (the first renewal after a lapse).
    valid_since: AtomicU64,
    /// Set when the lease lapsed; cleared once the other nodes said which sessions they took.
    fenced: AtomicBool,
    /// Wall-clock ms of the last time this node was known to hold all its sessions (joining, or
    /// the fence lifted): what the other nodes took over since then is what it must let go.
    held_since_wall: AtomicU64,
}

impl Fence {
    /// A node joining now: nobody can take it for dead within `dead_after` of now.
    pub fn new(dead_after: Duration) -> Fence {
        let dead_after_ms = dead_after.as_millis() as u64;
        Fence {
            epoch: Instant::now(),
            dead_after_ms,
            lease_until: AtomicU64::new(dead_after_ms),
            valid_since: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            held_since_wall: AtomicU64::new(crate::clock::wall_ms_now()),
        }
    }

    /// Now, on the lease's clock: what a heartbeat carries.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a connection of a persistent session here may write now. One atomic load and a
    /// clock read: checked before each write of such a connection, in cluster mode only.
    pub fn may_deliver(&self) -> bool {
        !self.fenced.load(Ordering::Acquire) && self.now_ms() < self.lease_until.load(Ordering::Acquire)
    }

    /// This node heard its own heartbeat, sent at `sent_ms`, back from NATS.
    pub fn renewed(&self, sent_ms: u64) {
        let now = self.now_ms();
        if now >= self.lease_until.load(Ordering::Acquire) {
            self.valid_since.store(now, Ordering::Release);
        }
        self.lease_until.fetch_max(sent_ms + self.dead_after_ms, Ordering::AcqRel);
    }

    pub fn lapsed(&self) -> bool {
        self.now_ms() >= self.lease_until.load(Ordering::Acquire)
    }

    /// How long the lease has been valid without a gap (zero while lapsed).
    pub fn valid_for(&self) -> Duration {
        if self.lapsed() {
            return Duration::ZERO;
        }
        Duration::from_millis(self.now_ms().saturating_sub(self.valid_since.load(Ordering::Acquire)))
    }

    /// Fences the node; true if it was not fenced already.
    pub fn fence(&self) -> bool {
        !self.fenced.swap(true, Ordering::AcqRel)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Since when (wall-clock ms) this node has held its sessions: sessions the other nodes took
    /// over after that are no longer its own.
    pub fn held_since(&self) -> u64 {
        self.held_since_wall.load(Ordering::Acquire)
    }

    /// The other nodes said which sessions they took over, and those ended here.
    pub fn lift(&self) {
        self.held_since_wall.store(crate::clock::wall_ms_now(), Ordering::Release);
        self.fenced.store(false, Ordering::Release);
    }
}

/// A fenced node's question to the others, and their answer.
#[derive(serde::Serialize, serde::Deserialize, Default, Debug)]
pub struct FenceAnswer {
    pub node: String,
    /// Sessions of the asking node the answering node took over since the asker's `held_since`.
    pub adopted: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_runs_from_the_heartbeat_heard_back_and_a_lapse_is_seen() {
        let fence = Fence::new(Duration::from_millis(50));
        assert!(fence.may_deliver());
        std::thread::sleep(Duration::from_millis(60));
        assert!(fence.lapsed() && !fence.may_deliver(), "no heartbeat heard back: the lease lapsed");
        assert_eq!(fence.valid_for(), Duration::ZERO);
        let sent = fence.now_ms();
        fence.renewed(sent);
        assert!(fence.may_deliver());
        assert!(fence.fence());
        assert!(!fence.fence(), "fenced once");
        assert!(!fence.may_deliver(), "fenced: nothing is written until the fence is lifted");
        fence.lift();
        assert!(fence.may_deliver());
        // An old heartbeat heard late does not shorten the lease.
        fence.renewed(0);
        assert!(fence.may_deliver());
    }
}
