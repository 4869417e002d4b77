//! Connections through each VIP and to each of its backends, counted from
//! the kernel: conntrack's events in this node's network namespace, where
//! the nftables dataplane rewrites VIP connections (DNAT). A TCP connection
//! the kernel marks *assured* (traffic both ways past the handshake)
//! succeeded; one destroyed without ever being assured (refused, reset,
//! its handshake timed out) failed, as dcos-net counted them. Kept per
//! 10 s for the last minute and per minute for the last hour.
//!
//! Connect latency: the kernel marks a TCP connection assured when the
//! client acknowledges the backend's SYN-ACK, so the time from the
//! connection's New event (its SYN) to its assured event is the handshake
//! as the client lived it, including SYNs lost and sent again. It is
//! measured when the agent reads each event (conntrack's events carry no
//! time), so it is an estimate: both reads wait alike for the thread,
//! and a connection first seen assured has no figure. The last minute's
//! p99 is kept per VIP and backend, within a bucket's 12.5 %.
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

/// Connect times in log-linear buckets: each power of two (µs) split in
/// eight, so a bucket is at most 12.5 % wide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectTimes {
    buckets: BTreeMap<u16, u32>,
    count: u64,
}

impl ConnectTimes {
    fn bucket(us: u64) -> u16 {
        // The octave, then the three bits after the leading one.
        let us = us.max(1);
        let int = 63 - us.leading_zeros() as u64;
        let frac = if int >= 3 {
            (us >> (int - 3)) & 7
        } else {
            (us << (3 - int)) & 7
        };
        (int * 8 + frac) as u16
    }

    /// The upper edge of bucket `i`, in µs.
    fn upper_us(i: u16) -> f64 {
        let (octave, eighth) = (i32::from(i / 8), f64::from(i % 8));
        2f64.powi(octave) * (1.0 + (eighth + 1.0) / 8.0)
    }

    pub fn record(&mut self, us: u64) {
        *self.buckets.entry(Self::bucket(us)).or_default() += 1;
        self.count += 1;
    }

    fn merge(&mut self, other: &ConnectTimes) {
        for (b, n) in &other.buckets {
            *self.buckets.entry(*b).or_default() += n;
        }
        self.count += other.count;
    }

    /// The `q` quantile in ms (the upper edge of its bucket), if any.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (b, n) in &self.buckets {
            seen += u64::from(*n);
            if seen >= rank {
                return Some((Self::upper_us(*b) / 10.0).round() / 100.0);
            }
        }
        None
    }
}

/// The upper bounds (seconds) of the Prometheus histogram of connect times.
pub const CONNECT_LE: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Connect times since the agent started, as Prometheus counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnectTotals {
    /// Per bound of [`CONNECT_LE`], not cumulative.
    pub below: [u64; CONNECT_LE.len()],
    pub count: u64,
    pub sum_us: u64,
}

impl ConnectTotals {
    fn record(&mut self, us: u64) {
        let s = us as f64 / 1e6;
        if let Some(i) = CONNECT_LE.iter().position(|le| s <= *le) {
            self.below[i] += 1;
        }
        self.count += 1;
        self.sum_us += us;
    }
}

/// A connection seen and not yet destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Not assured yet; its New event was read at this time (µs on the
    /// feed's clock), if it was seen.
    Pending(Option<u64>),
    /// Counted a success.
    Counted,
}

/// Connections not yet over this many are tracked at once; beyond, the
/// oldest are forgotten (counted as lost).
const MAX_OPEN: usize = 1 << 20;

/// The counts, fed events in order.
#[derive(Debug, Default)]
pub struct Counts {
    /// VIP address → its name (`<app>.<framework>.l4lb.thisdcos.directory:<port>`).
    vips: HashMap<SocketAddrV4, String>,
    /// Connections seen and not yet destroyed.
    open: HashMap<u32, Open>,
    totals: BTreeMap<Key, Outcomes>,
    connect_totals: BTreeMap<Key, ConnectTotals>,
    /// `(10-second slot, connect times)`, the last 6.
    recent_connect: VecDeque<(u64, BTreeMap<Key, ConnectTimes>)>,
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
        let totals = &self.totals;
        self.connect_totals
            .retain(|key, _| totals.contains_key(key));
    }

    /// One event read at `now_s` (Unix seconds) and `at_us` (µs on a
    /// monotonic clock of the caller's).
    pub fn apply(&mut self, e: &Event, now_s: u64, at_us: u64) {
        let c = &e.conn;
        if c.proto != 6 {
            return;
        }
        let Some(vip) = self.vips.get(&c.orig_dst) else {
            return;
        };
        if c.reply_src == c.orig_dst {
            // Not rewritten (the dataplane had not programmed the VIP yet):
            // no backend had it.
            return;
        }
        let key = (vip.clone(), c.reply_src);
        let outcome = match e.kind {
            EventKind::New | EventKind::Update => {
                let seen = self.open.get(&c.id).copied();
                if c.assured() && seen != Some(Open::Counted) {
                    self.open.insert(c.id, Open::Counted);
                    if let Some(Open::Pending(Some(since))) = seen {
                        self.connect(&key, now_s, at_us.saturating_sub(since));
                    }
                    Some(Outcomes {
                        successes: 1,
                        failures: 0,
                    })
                } else {
                    if seen.is_none() {
                        if self.open.len() >= MAX_OPEN {
                            // Undecided ones can go: their destroy still
                            // counts a failure (or their assured update a
                            // success). Forgetting counted ones would
                            // count them again.
                            self.open.retain(|_, o| *o == Open::Counted);
                            if self.open.len() >= MAX_OPEN {
                                self.lost += self.open.len() as u64;
                                self.open.clear();
                            }
                        }
                        // Only a New event starts the clock: an update of
                        // a connection we never saw begin has no start.
                        let since = (e.kind == EventKind::New).then_some(at_us);
                        self.open.insert(c.id, Open::Pending(since));
                    }
                    None
                }
            }
            EventKind::Destroy => match self.open.remove(&c.id) {
                Some(Open::Counted) => None,
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

    fn connect(&mut self, key: &Key, now_s: u64, us: u64) {
        self.connect_totals
            .entry(key.clone())
            .or_default()
            .record(us);
        let slot = now_s / 10;
        let ring = &mut self.recent_connect;
        if ring.back().is_none_or(|(s, _)| *s < slot) {
            ring.push_back((slot, BTreeMap::new()));
            while ring.len() > 6 {
                ring.pop_front();
            }
        }
        if let Some((s, m)) = ring.back_mut() {
            if *s == slot {
                m.entry(key.clone()).or_default().record(us);
            }
        }
    }

    /// Connect times since the start, per VIP and backend, for `/metrics`.
    pub fn connect_totals(&self) -> &BTreeMap<Key, ConnectTotals> {
        &self.connect_totals
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
                connect_p99_ms: None,
            });
        }
        // p99 of the last minute's connect times, per VIP and backend.
        let mut per_vip: BTreeMap<&str, ConnectTimes> = BTreeMap::new();
        let mut per_backend: BTreeMap<&Key, ConnectTimes> = BTreeMap::new();
        for (slot, m) in &self.recent_connect {
            if *slot < first_recent {
                continue;
            }
            for (key, t) in m {
                per_vip.entry(key.0.as_str()).or_default().merge(t);
                per_backend.entry(key).or_default().merge(t);
            }
        }
        for ((vip, backend), t) in per_backend {
            if let Some(v) = by_vip.get_mut(vip.as_str()) {
                let b = backend.to_string();
                if let Some(row) = v.backends.iter_mut().find(|r| r.backend == b) {
                    row.connect_p99_ms = t.quantile_ms(0.99);
                }
            }
        }
        for (vip, t) in per_vip {
            if let Some(v) = by_vip.get_mut(vip) {
                v.connect_p99_ms = t.quantile_ms(0.99);
            }
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VipStats {
    pub vip: String,
    /// The last 60 s (six 10 s slots).
    pub last_minute: Outcomes,
    /// The 99th percentile of the last minute's connect times (ms), if
    /// any connection was timed.
    pub connect_p99_ms: Option<f64>,
    /// Since the agent started (pairs quiet for an hour are forgotten).
    pub total: Outcomes,
    pub backends: Vec<BackendStats>,
    /// Per minute (Unix minute), the last hour, minutes with none left out.
    pub per_minute: Vec<MinuteStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStats {
    pub backend: String,
    pub last_minute: Outcomes,
    pub total: Outcomes,
    pub connect_p99_ms: Option<f64>,
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
    let clock = std::time::Instant::now();
    loop {
        let got = match events.recv(Duration::from_millis(500)) {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "conntrack events failed: VIP connections are no longer counted");
                shared.running.store(0, Ordering::Relaxed);
                return;
            }
        };
        let (now, at_us) = (now_s(), clock.elapsed().as_micros() as u64);
        // The VIPs as of now, after the read: a connection to a VIP exists
        // only once the view that made it was published, so its events
        // always find it here.
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
        let mut c = lock(&shared.counts);
        if got.lost {
            c.lost += 1;
        }
        shared
            .events
            .fetch_add(got.events.len() as u64, Ordering::Relaxed);
        for e in &got.events {
            c.apply(e, now, at_us);
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
                    c.apply(&e, 1_000_000, 0);
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

    proptest! {
        /// The quantile is the upper edge of the bucket holding the true
        /// one: never below it, at most a bucket (12.5 %, and the 10 µs
        /// rounding) above.
        #[test]
        fn connect_quantiles_bound_the_true_ones(
            mut times in proptest::collection::vec(1u64..20_000_000, 1..300),
            q in 0.5f64..1.0,
        ) {
            let mut t = ConnectTimes::default();
            for us in &times {
                t.record(*us);
            }
            times.sort_unstable();
            let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
            let truth_ms = times[rank - 1] as f64 / 1000.0;
            let got = t.quantile_ms(q).expect("some");
            prop_assert!(got + 0.005 >= truth_ms, "{got} below {truth_ms}");
            prop_assert!(got <= truth_ms * 1.125 + 0.01, "{got} too far above {truth_ms}");
        }
    }

    #[test]
    fn connect_time_is_new_to_assured_and_p99_follows_the_slow_backend() {
        let mut c = counts();
        // 98 connections to backend 1 in 200 µs, two to backend 2 in 1 s.
        for id in 1..=100u32 {
            let backend = if id <= 98 { 1 } else { 2 };
            let start = u64::from(id) * 10_000_000;
            let took = if backend == 1 { 200 } else { 1_000_000 };
            c.apply(
                &Event {
                    kind: EventKind::New,
                    conn: conn(id, backend, false),
                },
                1000,
                start,
            );
            c.apply(
                &Event {
                    kind: EventKind::Update,
                    conn: conn(id, backend, true),
                },
                1000,
                start + took,
            );
        }
        // Seen first assured (began before we listened): counted, not timed.
        c.apply(
            &Event {
                kind: EventKind::Update,
                conn: conn(500, 1, true),
            },
            1000,
            5,
        );
        let r = c.report(1001);
        let p99 = |addr: u8| {
            r[0].backends
                .iter()
                .find(|b| b.backend == format!("10.0.1.{addr}:8080"))
                .and_then(|b| b.connect_p99_ms)
        };
        let fast = p99(1).expect("timed");
        assert!((0.2..=0.23).contains(&fast), "{fast}");
        let slow = p99(2).expect("timed");
        assert!((1000.0..=1125.0).contains(&slow), "{slow}");
        let vip = r[0].connect_p99_ms.expect("timed");
        assert!((1000.0..=1125.0).contains(&vip), "2 % were slow: {vip}");
        let totals = c.connect_totals();
        let all: u64 = totals.values().map(|t| t.count).sum();
        assert_eq!(all, 100, "the untimed one is not in the histogram");
        // A minute later the p99 is gone, the totals stay.
        let later = c.report(1070);
        assert_eq!(later[0].connect_p99_ms, None);
        assert_eq!(later[0].total.successes, 101);
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
            0,
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
            0,
        );
        let mut udp = conn(2, 1, false);
        udp.proto = 17;
        c.apply(
            &Event {
                kind: EventKind::Destroy,
                conn: udp,
            },
            10,
            0,
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
            0,
        );
        c.apply(
            &Event {
                kind: EventKind::Update,
                conn: conn(2, 1, true),
            },
            660,
            0,
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
