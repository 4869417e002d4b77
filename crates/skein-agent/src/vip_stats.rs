//! Connections through each VIP and to each of its backends, counted from
//! the kernel: conntrack's events in this node's network namespace, where
//! the nftables dataplane rewrites VIP connections (DNAT). A TCP connection
//! the kernel marks *assured* (traffic both ways past the handshake)
//! succeeded; one destroyed without ever being assured (refused, reset,
//! its handshake timed out) failed, as dcos-net counted them. Kept per
//! 10 s for the last minute and per minute for the last hour.
//!
//! [`Counts`] is the pure core; [`run`] feeds it from a thread.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skein_conntrack::{Event, EventKind};

/// Successes and failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    pub successes: u64,
    pub failures: u64,
}

impl Outcomes {
    fn add(&mut self, o: Outcomes) {
        self.successes += o.successes;
        self.failures += o.failures;
    }
}

/// `(VIP name, backend)`.
type Key = (String, SocketAddrV4);

/// Connections not yet over this many are tracked at once; beyond, the
/// oldest are forgotten (counted as lost).
const MAX_OPEN: usize = 1 << 20;

/// The counts, fed events in order.
#[derive(Debug, Default)]
pub struct Counts {
    /// VIP address → its name (`<app>.<framework>.l4lb.thisdcos.directory:<port>`).
    vips: HashMap<SocketAddrV4, String>,
    /// Connections seen and not yet destroyed: whether counted a success.
    open: HashMap<u32, bool>,
    totals: BTreeMap<Key, Outcomes>,
    /// `(10-second slot, counts)`, the last 6.
    recent: VecDeque<(u64, BTreeMap<Key, Outcomes>)>,
    /// `(minute, counts)`, the last 60.
    minutes: VecDeque<(u64, BTreeMap<Key, Outcomes>)>,
    pub lost: u64,
}

fn bump(
    ring: &mut VecDeque<(u64, BTreeMap<Key, Outcomes>)>,
    slot: u64,
    keep: usize,
    key: &Key,
    o: Outcomes,
) {
    if ring.back().is_none_or(|(s, _)| *s < slot) {
        ring.push_back((slot, BTreeMap::new()));
        while ring.len() > keep {
            ring.pop_front();
        }
    }
    if let Some((s, m)) = ring.back_mut() {
        if *s == slot {
            m.entry(key.clone()).or_default().add(o);
        }
    }
}

impl Counts {
    /// The VIPs to count (their address and name), from the current view.
    /// Counts of a VIP and backend that neither is a current VIP nor had a
    /// connection in the last hour are forgotten (tasks come and go: the
    /// pairs would grow for the agent's whole life).
    pub fn set_vips(&mut self, vips: HashMap<SocketAddrV4, String>) {
        self.vips = vips;
        let names: std::collections::HashSet<&String> = self.vips.values().collect();
        let minutes = &self.minutes;
        self.totals.retain(|key, _| {
            names.contains(&key.0) && minutes.iter().any(|(_, m)| m.contains_key(key))
        });
    }

    /// One event at `now_s` (Unix seconds).
    pub fn apply(&mut self, e: &Event, now_s: u64) {
        let c = &e.conn;
        if c.proto != 6 {
            return;
        }
        let Some(vip) = self.vips.get(&c.orig_dst) else {
            return;
        };
        let key = (vip.clone(), c.reply_src);
        let outcome = match e.kind {
            EventKind::New | EventKind::Update => {
                let counted = self.open.get(&c.id).copied();
                if c.assured() && counted != Some(true) {
                    self.open.insert(c.id, true);
                    Some(Outcomes {
                        successes: 1,
                        failures: 0,
                    })
                } else {
                    if counted.is_none() {
                        if self.open.len() >= MAX_OPEN {
                            // Undecided ones can go: their destroy still
                            // counts a failure (or their assured update a
                            // success). Forgetting counted ones would
                            // count them again.
                            self.open.retain(|_, counted| *counted);
                            if self.open.len() >= MAX_OPEN {
                                self.lost += self.open.len() as u64;
                                self.open.clear();
                            }
                        }
                        self.open.insert(c.id, false);
                    }
                    None
                }
            }
            EventKind::Destroy => match self.open.remove(&c.id) {
                Some(true) => None,
                // Assured at the end but never seen so (events lost, or
                // it began before we listened): a success all the same.
                _ if c.assured() => Some(Outcomes {
                    successes: 1,
                    failures: 0,
                }),
                _ => Some(Outcomes {
                    successes: 0,
                    failures: 1,
                }),
            },
        };
        if let Some(o) = outcome {
            self.totals.entry(key.clone()).or_default().add(o);
            bump(&mut self.recent, now_s / 10, 6, &key, o);
            bump(&mut self.minutes, now_s / 60, 60, &key, o);
        }
    }

    /// Every VIP's counts at `now_s`.
    pub fn report(&self, now_s: u64) -> Vec<VipStats> {
        let mut by_vip: BTreeMap<&str, VipStats> = BTreeMap::new();
        let first_recent = (now_s / 10).saturating_sub(5);
        let first_minute = (now_s / 60).saturating_sub(59);
        for ((vip, backend), total) in &self.totals {
            let v = by_vip.entry(vip.as_str()).or_insert_with(|| VipStats {
                vip: vip.clone(),
                ..VipStats::default()
            });
            v.total.add(*total);
            v.backends.push(BackendStats {
                backend: backend.to_string(),
                total: *total,
                last_minute: Outcomes::default(),
            });
        }
        for (slot, m) in &self.recent {
            if *slot < first_recent {
                continue;
            }
            for ((vip, backend), o) in m {
                if let Some(v) = by_vip.get_mut(vip.as_str()) {
                    v.last_minute.add(*o);
                    let b = backend.to_string();
                    if let Some(row) = v.backends.iter_mut().find(|r| r.backend == b) {
                        row.last_minute.add(*o);
                    }
                }
            }
        }
        for (minute, m) in &self.minutes {
            if *minute < first_minute {
                continue;
            }
            for ((vip, _), o) in m {
                if let Some(v) = by_vip.get_mut(vip.as_str()) {
                    match v.per_minute.last_mut() {
                        Some(last) if last.minute == *minute => last.outcomes.add(*o),
                        _ => v.per_minute.push(MinuteStats {
                            minute: *minute,
                            outcomes: *o,
                        }),
                    }
                }
            }
        }
        by_vip.into_values().collect()
    }
}

/// One VIP's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStats {
    pub vip: String,
    /// The last 60 s (six 10 s slots).
    pub last_minute: Outcomes,
    /// Since the agent started (pairs quiet for an hour are forgotten).
    pub total: Outcomes,
    pub backends: Vec<BackendStats>,
    /// Per minute (Unix minute), the last hour, minutes with none left out.
    pub per_minute: Vec<MinuteStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub backend: String,
    pub last_minute: Outcomes,
    pub total: Outcomes,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteStats {
    pub minute: u64,
    #[serde(flatten)]
    pub outcomes: Outcomes,
}

/// What the agent shares with the feed thread.
#[derive(Debug, Default)]
pub struct Shared {
    pub counts: Mutex<Counts>,
    /// Events read, and whether the feed runs (1).
    pub events: AtomicU64,
    pub running: AtomicU64,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads conntrack's events in this process's network namespace until the
/// agent is gone, counting VIP connections. Runs on a thread of its own
/// (the socket read blocks).
pub(crate) fn run(agent: Weak<crate::Agent>, shared: std::sync::Arc<Shared>) {
    let mut events = match skein_conntrack::Events::open() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read conntrack events: VIP connections are not counted");
            return;
        }
    };
    shared.running.store(1, Ordering::Relaxed);
    let mut seq = u64::MAX;
    loop {
        let Some(a) = agent.upgrade() else { return };
        let view = a.view();
        if view.seq != seq {
            seq = view.seq;
            let vips = view
                .vips
                .iter()
                .filter(|v| v.protocol == skein_state::Protocol::Tcp)
                .filter_map(|v| match v.address {
                    Some(std::net::IpAddr::V4(ip)) => {
                        Some((SocketAddrV4::new(ip, v.port), v.vip.clone()))
                    }
                    _ => None,
                })
                .collect();
            lock(&shared.counts).set_vips(vips);
        }
        drop((view, a));
        match events.recv(Duration::from_millis(500)) {
            Ok(got) => {
                let now = now_s();
                let mut c = lock(&shared.counts);
                if got.lost {
                    c.lost += 1;
                }
                shared
                    .events
                    .fetch_add(got.events.len() as u64, Ordering::Relaxed);
                for e in &got.events {
                    c.apply(e, now);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "conntrack events failed: VIP connections are no longer counted");
                shared.running.store(0, Ordering::Relaxed);
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use skein_conntrack::Conn;
    use std::net::Ipv4Addr;

    const VIP: &str = "web.marathon.l4lb.thisdcos.directory:80";

    fn vip_addr() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(11, 0, 0, 1), 80)
    }

    fn conn(id: u32, backend: u8, assured: bool) -> Conn {
        Conn {
            id,
            proto: 6,
            orig_src: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 40000 + id as u16),
            orig_dst: vip_addr(),
            reply_src: SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, backend), 8080),
            reply_dst: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 40000 + id as u16),
            status: if assured {
                skein_conntrack::wire::ASSURED
            } else {
                0
            },
            tcp_state: None,
        }
    }

    fn counts() -> Counts {
        let mut c = Counts::default();
        c.set_vips([(vip_addr(), VIP.to_string())].into());
        c
    }

    /// A connection's life as events: created, maybe assured (any number
    /// of updates after), maybe destroyed.
    #[derive(Debug, Clone)]
    struct Life {
        backend: u8,
        assured: bool,
        updates: u8,
        destroyed: bool,
    }

    fn life() -> impl Strategy<Value = Life> {
        (1u8..4, any::<bool>(), 0u8..3, any::<bool>()).prop_map(
            |(backend, assured, updates, destroyed)| Life {
                backend,
                assured,
                updates,
                destroyed,
            },
        )
    }

    proptest! {
        /// However connections' events interleave, each connection is
        /// counted at most once: a success once assured, a failure when
        /// destroyed without; the totals per backend say so, and the last
        /// minute equals the totals when it all happened within it.
        #[test]
        fn each_connection_counts_once(lives in proptest::collection::vec(life(), 0..40), seed in any::<u64>()) {
            // Each life's events in order; lives interleaved by `seed`.
            let mut queues: Vec<Vec<Event>> = lives.iter().enumerate().map(|(i, l)| {
                let id = i as u32 + 1;
                let mut q = vec![Event { kind: EventKind::New, conn: conn(id, l.backend, false) }];
                for _ in 0..l.updates {
                    q.push(Event { kind: EventKind::Update, conn: conn(id, l.backend, l.assured) });
                }
                if l.destroyed {
                    q.push(Event { kind: EventKind::Destroy, conn: conn(id, l.backend, l.assured && l.updates > 0) });
                }
                q.reverse();
                q
            }).collect();
            let mut c = counts();
            let mut x = seed | 1;
            while queues.iter().any(|q| !q.is_empty()) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
                let i = live[(x as usize) % live.len()];
                if let Some(e) = queues[i].pop() {
                    c.apply(&e, 1_000_000);
                }
            }
            let mut want: BTreeMap<u8, Outcomes> = BTreeMap::new();
            for l in &lives {
                let o = want.entry(l.backend).or_default();
                if l.assured && l.updates > 0 {
                    o.successes += 1;
                } else if l.destroyed {
                    o.failures += 1;
                }
            }
            let report = c.report(1_000_005);
            let got: BTreeMap<u8, Outcomes> = report
                .iter()
                .flat_map(|v| v.backends.iter())
                .map(|b| {
                    let ip: SocketAddrV4 = b.backend.parse().expect("addr");
                    (ip.ip().octets()[3], b.total)
                })
                .collect();
            want.retain(|_, o| *o != Outcomes::default());
            prop_assert_eq!(&got, &want);
            for v in &report {
                prop_assert_eq!(v.last_minute, v.total);
                let per_minute: u64 = v.per_minute.iter().map(|m| m.outcomes.successes + m.outcomes.failures).sum();
                prop_assert_eq!(per_minute, v.total.successes + v.total.failures);
            }
        }
    }

    #[test]
    fn pairs_of_gone_vips_or_quiet_backends_are_forgotten() {
        let mut c = counts();
        c.apply(
            &Event {
                kind: EventKind::Destroy,
                conn: conn(1, 1, false),
            },
            600,
        );
        c.set_vips([(vip_addr(), VIP.to_string())].into());
        assert_eq!(c.report(610).len(), 1, "active in the hour: kept");
        c.set_vips(HashMap::new());
        assert!(c.report(610).is_empty(), "the VIP is gone");
    }

    #[test]
    fn other_addresses_and_udp_are_not_counted() {
        let mut c = counts();
        let mut other = conn(1, 1, false);
        other.orig_dst = SocketAddrV4::new(Ipv4Addr::new(11, 0, 0, 2), 80);
        c.apply(
            &Event {
                kind: EventKind::Destroy,
                conn: other,
            },
            10,
        );
        let mut udp = conn(2, 1, false);
        udp.proto = 17;
        c.apply(
            &Event {
                kind: EventKind::Destroy,
                conn: udp,
            },
            10,
        );
        assert!(c.report(10).is_empty());
    }

    #[test]
    fn the_last_minute_forgets_and_the_hour_keeps() {
        let mut c = counts();
        c.apply(
            &Event {
                kind: EventKind::Destroy,
                conn: conn(1, 1, false),
            },
            600,
        );
        c.apply(
            &Event {
                kind: EventKind::Update,
                conn: conn(2, 1, true),
            },
            660,
        );
        let r = c.report(700);
        assert_eq!(
            r[0].last_minute,
            Outcomes {
                successes: 1,
                failures: 0
            }
        );
        assert_eq!(
            r[0].total,
            Outcomes {
                successes: 1,
                failures: 1
            }
        );
        assert_eq!(r[0].per_minute.len(), 2);
        let r = c.report(600 + 3700);
        assert_eq!(r[0].last_minute, Outcomes::default());
        assert!(r[0].per_minute.is_empty());
        assert_eq!(
            r[0].total,
            Outcomes {
                successes: 1,
                failures: 1
            }
        );
    }
}
