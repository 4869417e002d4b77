//! What wakes a realizer (nftables, IPVS, VXLAN): a refreshed replica, or
//! its periodic resync, when it compares with the kernel to repair drift.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

pub struct Wakeups {
    tick: Interval,
    changes: watch::Receiver<u64>,
}

impl Wakeups {
    pub fn new(changes: watch::Receiver<u64>, resync: Duration) -> Wakeups {
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Wakeups { tick, changes }
    }

    /// `Some(true)` on a resync tick, `Some(false)` after a refresh, `None`
    /// once the agent (the sender) is gone.
    pub async fn next(&mut self) -> Option<bool> {
        tokio::select! {
            _ = self.tick.tick() => Some(true),
            changed = self.changes.changed() => changed.ok().map(|()| false),
        }
    }
}
