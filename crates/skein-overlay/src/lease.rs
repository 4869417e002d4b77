//! Leases from a pool (agent subnets of an overlay, or VTEP addresses),
//! agreed by every node without a coordinator.
//!
//! Each node publishes a claim `(slot, since, settled)` in its own keyspace.
//! [`resolve`] is a pure function of all claims, the same on every node:
//! settled claims first, then oldest first (`since`, then node id), and a
//! claim whose slot an earlier claim holds loses. A losing node proposes the
//! first free slot ([`propose`]); a winning node keeps its claim for as long
//! as it lives, so its lease never changes. A node's claim goes away only
//! with the node (after its grace period) or by an operator's explicit
//! delete.
//!
//! `since` is the claimer's own clock, so it cannot be trusted to order a
//! claim against one its claimer never saw: a node rejoining with a wiped
//! data dir and a clock an hour behind would otherwise beat the owner of a
//! lease that containers have used for days. Hence `settled`: a node marks
//! its claim settled once it has won, unchanged, for a while in a view that
//! includes the rest of the cluster (the agent's `LeaseSettling`), and a settled claim beats
//! every unsettled one whatever the clocks say. A claim made without seeing
//! a settled one (before the first sync) therefore loses to it, and its node
//! moves before it has used the slot. A new claim's `since` is also later
//! than every claim its node has seen ([`after_all`]).
//!
//! Only two *settled* claims on one slot are ordered by `since` alone. That
//! takes two nodes that each settled without seeing the other's claim:
//! claims made on two sides of a partition (or, for a partition longer than
//! the grace period, a claim on one side of a slot the other side's node
//! held before and is now forgotten there). One of them must move when the
//! partition heals; [`propose`] makes it unlikely by spreading first choices
//! by node id.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// A contiguous pool: `count` slots of `size` addresses from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub base: Ipv4Addr,
    /// Addresses per slot (256 for /24 agent subnets, 1 for VTEP IPs).
    pub size: u32,
    pub count: u32,
    /// Slots never handed out at the start and end (network/broadcast of
    /// a VTEP subnet, say).
    pub reserved_low: u32,
    pub reserved_high: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("prefix /{prefix} does not fit in {base}/{len}: it must be longer than the overlay's prefix and at most /30")]
    BadPrefix { base: Ipv4Addr, len: u8, prefix: u8 },
    #[error("{base}/{len} is not a network address (host bits set)")]
    NotANetwork { base: Ipv4Addr, len: u8 },
    #[error("all {0} leases of the pool are taken")]
    Exhausted(u32),
}

impl Pool {
    /// Agent subnets of length `prefix` in the overlay `base/len`.
    pub fn subnets(base: Ipv4Addr, len: u8, prefix: u8) -> Result<Pool, LeaseError> {
        if len >= prefix || prefix > 30 || len == 0 {
            return Err(LeaseError::BadPrefix { base, len, prefix });
        }
        if u32::from(base) & !(u32::MAX << (32 - len)) != 0 {
            return Err(LeaseError::NotANetwork { base, len });
        }
        Ok(Pool {
            base,
            size: 1 << (32 - prefix),
            count: 1 << (prefix - len),
            reserved_low: 0,
            reserved_high: 0,
        })
    }

    /// Single addresses of `base/len` without network and broadcast.
    pub fn addresses(base: Ipv4Addr, len: u8) -> Result<Pool, LeaseError> {
        if !(1..=30).contains(&len) {
            return Err(LeaseError::BadPrefix {
                base,
                len,
                prefix: 32,
            });
        }
        if u32::from(base) & !(u32::MAX << (32 - len)) != 0 {
            return Err(LeaseError::NotANetwork { base, len });
        }
        Ok(Pool {
            base,
            size: 1,
            count: 1 << (32 - len),
            reserved_low: 1,
            reserved_high: 1,
        })
    }

    pub fn usable(&self, slot: u32) -> bool {
        slot >= self.reserved_low && slot < self.count.saturating_sub(self.reserved_high)
    }

    /// First address of a slot.
    pub fn address(&self, slot: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + slot * self.size)
    }

    pub fn capacity(&self) -> u32 {
        self.count
            .saturating_sub(self.reserved_low + self.reserved_high)
    }
}

/// A node's claim, published in its keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Claim {
    pub slot: u32,
    /// Unix milliseconds when the node first claimed this slot.
    pub since: u64,
    /// The claim has won, unchanged, in a view of the whole cluster for a
    /// while (the agent decides when); it then beats any unsettled claim. Absent in
    /// claims of earlier versions (read as false, which orders them as
    /// before).
    #[serde(default, skip_serializing_if = "is_false")]
    pub settled: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Claim {
    /// The order in which claims take slots: settled before unsettled,
    /// then oldest first, then by node id.
    fn rank<'a>(&self, node: &'a str) -> (bool, u64, &'a str) {
        (!self.settled, self.since, node)
    }
}

/// Node → its winning slot, for every node whose claim wins. Deterministic:
/// the same claims give the same leases on every node, in any order.
pub fn resolve(pool: &Pool, claims: &BTreeMap<String, Claim>) -> BTreeMap<String, u32> {
    let mut order: Vec<(&Claim, &String)> = claims.iter().map(|(n, c)| (c, n)).collect();
    order.sort_by(|a, b| a.0.rank(a.1).cmp(&b.0.rank(b.1)));
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (claim, node) in order {
        if pool.usable(claim.slot) && taken.insert(claim.slot) {
            out.insert(node.clone(), claim.slot);
        }
    }
    out
}

fn start_slot(pool: &Pool, node: &str) -> u32 {
    // Spread first choices by node id so concurrent joiners rarely collide.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(pool.count.max(1))) as u32
}

/// What `node` should claim given every claim it sees: its own if it wins
/// (as it is, settled or not), else the first free slot after a per-node
/// starting point.
pub fn propose(
    pool: &Pool,
    node: &str,
    claims: &BTreeMap<String, Claim>,
    now_ms: u64,
) -> Result<Claim, LeaseError> {
    let leases = resolve(pool, claims);
    if let (Some(&slot), Some(claim)) = (leases.get(node), claims.get(node)) {
        return Ok(Claim { slot, ..*claim });
    }
    let used: BTreeSet<u32> = claims
        .iter()
        .filter(|(n, _)| n.as_str() != node)
        .map(|(_, c)| c.slot)
        .collect();
    let start = start_slot(pool, node);
    (0..pool.count)
        .map(|i| (start + i) % pool.count)
        .find(|s| pool.usable(*s) && !used.contains(s))
        .map(|slot| Claim {
            slot,
            since: after_all(claims.values().map(|c| c.since), now_ms),
            settled: false,
        })
        .ok_or(LeaseError::Exhausted(pool.capacity()))
}

/// A new claim's `since`: the claimer's clock, but later than every claim
/// it has seen (a Lamport clock carried by the claims), so that among
/// unsettled claims one made after seeing another is ordered after it
/// even when the claimer's clock lags.
pub fn after_all(seen: impl Iterator<Item = u64>, now_ms: u64) -> u64 {
    seen.map(|s| s.saturating_add(1)).fold(now_ms, u64::max)
}

/// DC/OS's VTEP MAC: the OUI 70:B3:D5 and the low 24 bits of the VTEP IP.
pub fn vtep_mac(vtep_ip: Ipv4Addr) -> [u8; 6] {
    let o = vtep_ip.octets();
    [0x70, 0xB3, 0xD5, o[1], o[2], o[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `node`'s claim marked settled, if it is the one `claims` give it (the
    /// model settles where the agent would: after convergence). `None` if
    /// it does not win.
    fn settle(pool: &Pool, node: &str, claims: &BTreeMap<String, Claim>) -> Option<Claim> {
        let claim = claims.get(node)?;
        (resolve(pool, claims).get(node) == Some(&claim.slot)).then_some(Claim {
            settled: true,
            ..*claim
        })
    }

    fn dcos() -> Pool {
        Pool::subnets(Ipv4Addr::new(9, 0, 0, 0), 8, 24).expect("pool")
    }

    #[test]
    fn pools_and_macs() {
        let p = dcos();
        assert_eq!(p.count, 65_536);
        assert_eq!(p.address(3), Ipv4Addr::new(9, 0, 3, 0));
        let v = Pool::addresses(Ipv4Addr::new(44, 128, 0, 0), 20).expect("vtep pool");
        assert_eq!(v.capacity(), 4094);
        assert!(!v.usable(0) && !v.usable(4095) && v.usable(1));
        assert_eq!(
            vtep_mac(Ipv4Addr::new(44, 128, 0, 1)),
            [0x70, 0xB3, 0xD5, 0x80, 0x00, 0x01]
        );
        assert!(matches!(
            Pool::subnets(Ipv4Addr::new(9, 0, 0, 0), 8, 8),
            Err(LeaseError::BadPrefix { .. })
        ));
        assert!(matches!(
            Pool::subnets(Ipv4Addr::new(9, 1, 0, 0), 8, 24),
            Err(LeaseError::NotANetwork { .. })
        ));
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let tiny = Pool::subnets(Ipv4Addr::new(10, 0, 0, 0), 24, 25).expect("two /25s");
        let mut claims = BTreeMap::new();
        for n in ["a", "b"] {
            let c = propose(&tiny, n, &claims, 1).expect("room");
            claims.insert(n.to_string(), c);
        }
        let err = propose(&tiny, "c", &claims, 2).expect_err("full");
        assert_eq!(err.to_string(), "all 2 leases of the pool are taken");
    }

    /// Nodes claim with stale views (each sees a random subset of the
    /// others' claims), then with full views until nothing changes.
    fn converge(
        pool: &Pool,
        claims: &mut BTreeMap<String, Claim>,
        nodes: &[String],
        partial: &[(usize, Vec<bool>)],
        mut clock: u64,
    ) -> u64 {
        for (who, visible) in partial {
            let node = &nodes[who % nodes.len()];
            let view: BTreeMap<String, Claim> = claims
                .iter()
                .enumerate()
                .filter(|(i, (n, _))| *n == node || visible.get(*i).copied().unwrap_or(false))
                .map(|(_, (n, c))| (n.clone(), *c))
                .collect();
            clock += 1;
            if let Ok(c) = propose(pool, node, &view, clock) {
                claims.insert(node.clone(), c);
            }
        }
        for _ in 0..200 {
            let before = claims.clone();
            for node in nodes {
                clock += 1;
                if let Ok(c) = propose(pool, node, claims, clock) {
                    claims.insert(node.clone(), c);
                }
            }
            if *claims == before {
                return clock;
            }
        }
        panic!("leases did not settle");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100))]

        /// Up to 100 nodes claiming concurrently from a pool barely larger
        /// than they need: no two nodes share a lease, every node has one,
        /// and every node computes the same leases from the same claims.
        #[test]
        fn concurrent_claims_end_unique_and_agreed(
            n in 1usize..100,
            partial in prop::collection::vec((any::<usize>(), prop::collection::vec(any::<bool>(), 0..100)), 0..200),
            seed in any::<u64>(),
        ) {
            let pool = Pool::subnets(Ipv4Addr::new(10, 0, 0, 0), 16, 23).expect("128 slots");
            let nodes: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
            let mut claims = BTreeMap::new();
            converge(&pool, &mut claims, &nodes, &partial, 1_000);
            let leases = resolve(&pool, &claims);
            prop_assert_eq!(leases.len(), n);
            let slots: BTreeSet<u32> = leases.values().copied().collect();
            prop_assert_eq!(slots.len(), n);
            // Same claims in another order (as another node received them).
            let mut shuffled: Vec<(String, Claim)> = claims.clone().into_iter().collect();
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let again: BTreeMap<String, Claim> = shuffled.into_iter().collect();
            prop_assert_eq!(resolve(&pool, &again), leases);
        }

        /// A settled lease never changes while its node lives, whatever
        /// other nodes join (with stale views) or leave.
        #[test]
        fn settled_leases_never_move(
            n in 1usize..40,
            joiners in 1usize..40,
            leavers in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            partial in prop::collection::vec((any::<usize>(), prop::collection::vec(any::<bool>(), 0..80)), 0..100),
        ) {
            let pool = Pool::subnets(Ipv4Addr::new(10, 0, 0, 0), 16, 22).expect("64 slots");
            let mut nodes: Vec<String> = (0..n).map(|i| format!("old-{i}")).collect();
            let mut claims = BTreeMap::new();
            let clock = converge(&pool, &mut claims, &nodes, &[], 1_000);
            let before = resolve(&pool, &claims);
            // Some leave for good (their claims are removed), others join.
            let mut gone = BTreeSet::new();
            for l in &leavers {
                let node = nodes[l.index(nodes.len())].clone();
                claims.remove(&node);
                gone.insert(node);
            }
            nodes.retain(|n| !gone.contains(n));
            nodes.extend((0..joiners).map(|i| format!("new-{i}")));
            converge(&pool, &mut claims, &nodes, &partial, clock);
            let after = resolve(&pool, &claims);
            for (node, slot) in &before {
                if !gone.contains(node) {
                    prop_assert_eq!(after.get(node), Some(slot), "{} moved", node);
                }
            }
        }
    }

    /// A cluster's claims and the clocks of its nodes, for the skew and
    /// partition properties.
    struct Cluster {
        pool: Pool,
        claims: BTreeMap<String, Claim>,
        /// Per node, its clock's offset from true time (ms).
        skew: BTreeMap<String, i64>,
        now: u64,
    }

    impl Cluster {
        /// `n` nodes `old-<i>` settled in a 64-slot pool, and the names of
        /// `joiners` more, `new-<i>`; clocks off by `offsets` (old first).
        fn settled(
            n: usize,
            joiners: usize,
            offsets: &[i64],
        ) -> (Cluster, Vec<String>, Vec<String>) {
            let old: Vec<String> = (0..n).map(|i| format!("old-{i}")).collect();
            let new: Vec<String> = (0..joiners).map(|i| format!("new-{i}")).collect();
            let all: Vec<String> = old.iter().chain(&new).cloned().collect();
            let mut c = Cluster {
                pool: Pool::subnets(Ipv4Addr::new(10, 0, 0, 0), 16, 22).expect("64 slots"),
                claims: BTreeMap::new(),
                skew: skews(&all, offsets),
                now: 1_800_000_000_000,
            };
            c.settle(&old);
            (c, old, new)
        }

        fn clock(&mut self, node: &str) -> u64 {
            self.now += 1;
            self.now
                .saturating_add_signed(self.skew.get(node).copied().unwrap_or(0))
        }

        /// `node` claims from a view holding only the claims `visible`
        /// picks (its own always).
        fn claim(&mut self, node: &str, visible: impl Fn(&str) -> bool) {
            let view: BTreeMap<String, Claim> = self
                .claims
                .iter()
                .filter(|(n, _)| *n == node || visible(n))
                .map(|(n, c)| (n.clone(), *c))
                .collect();
            let now = self.clock(node);
            if let Ok(c) = propose(&self.pool, node, &view, now) {
                self.claims.insert(node.to_string(), c);
            }
        }

        /// Every node of `group` claims with a view of the group's claims
        /// until nothing changes, then marks its winning claim settled (the
        /// group is all the node can see: the whole cluster, or its side of
        /// a partition).
        fn settle(&mut self, group: &[String]) {
            let members: BTreeSet<&String> = group.iter().collect();
            for _ in 0..200 {
                let before = self.claims.clone();
                for node in group {
                    self.claim(node, |n| members.contains(&n.to_string()));
                }
                if self.claims == before {
                    let view: BTreeMap<String, Claim> = self
                        .claims
                        .iter()
                        .filter(|(n, _)| members.contains(n))
                        .map(|(n, c)| (n.clone(), *c))
                        .collect();
                    for node in group {
                        if let Some(c) = settle(&self.pool, node, &view) {
                            self.claims.insert(node.clone(), c);
                        }
                    }
                    return;
                }
            }
            panic!("leases did not settle");
        }

        fn leases(&self) -> BTreeMap<String, u32> {
            resolve(&self.pool, &self.claims)
        }
    }

    fn skews(names: &[String], offsets: &[i64]) -> BTreeMap<String, i64> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), offsets.get(i).copied().unwrap_or(0)))
            .collect()
    }

    const HOUR_MS: i64 = 3_600_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Settled leases beat every claim made later by a node that had
        /// not seen them, whatever its clock says: joiners and nodes
        /// rejoining with a wiped data dir (their old claims gone), with
        /// clocks days behind or ahead, claim from views missing any of the
        /// settled claims (before their first sync), then sync. No settled
        /// lease of a node that kept its data moves; every node ends with a
        /// lease of its own.
        #[test]
        fn settled_leases_beat_later_claims_whatever_the_clocks(
            n in 1usize..40,
            joiners in 0usize..25,
            wiped in prop::collection::btree_set(0usize..40, 0..5),
            offsets in prop::collection::vec(-72 * HOUR_MS..72 * HOUR_MS, 80),
            partial in prop::collection::vec((any::<prop::sample::Index>(), prop::collection::vec(any::<bool>(), 0..80)), 0..60),
        ) {
            let (mut c, old, new) = Cluster::settled(n, joiners, &offsets);
            let all: Vec<String> = old.iter().chain(&new).cloned().collect();
            let before = c.leases();
            prop_assert_eq!(before.len(), n);
            let wiped: BTreeSet<String> =
                wiped.into_iter().filter(|i| *i < n).map(|i| old[i].clone()).collect();
            for w in &wiped {
                c.claims.remove(w);
            }
            let unsynced: Vec<String> = new.iter().chain(&wiped).cloned().collect();
            if !unsynced.is_empty() {
                for (who, visible) in &partial {
                    let node = who.get(&unsynced).clone();
                    let names: Vec<String> = c.claims.keys().cloned().collect();
                    c.claim(&node, |n| {
                        names.iter().position(|x| x == n)
                            .is_some_and(|i| visible.get(i).copied().unwrap_or(false))
                    });
                }
            }
            c.settle(&all);
            let after = c.leases();
            prop_assert_eq!(after.len(), all.len());
            let slots: BTreeSet<u32> = after.values().copied().collect();
            prop_assert_eq!(slots.len(), all.len());
            for (node, slot) in &before {
                if !wiped.contains(node) {
                    prop_assert_eq!(after.get(node), Some(slot), "{} moved", node);
                }
            }
        }

        /// A partition: each side keeps claiming and settling on its own,
        /// with skewed clocks, nodes joining on both sides; with a
        /// partition longer than the grace period each side has forgotten
        /// the other's nodes (their claims gone from its view). After the
        /// heal every node has a lease of its own, and a lease moved only
        /// where both sides settled the same slot: shorter than the grace,
        /// only claims made during the partition can collide; longer, a
        /// side may also have handed out a slot of a node it forgot.
        #[test]
        fn partitions_heal_to_unique_leases_moving_only_collisions(
            n in 2usize..30,
            joiners in 1usize..30,
            sides in prop::collection::vec(any::<bool>(), 60),
            offsets in prop::collection::vec(-72 * HOUR_MS..72 * HOUR_MS, 60),
            beyond_grace in any::<bool>(),
        ) {
            let (mut c, old, new) = Cluster::settled(n, joiners, &offsets);
            let all: Vec<String> = old.iter().chain(&new).cloned().collect();
            let before = c.leases();
            let side_of: BTreeMap<String, bool> =
                all.iter().enumerate().map(|(i, n)| (n.clone(), sides[i])).collect();
            let side = |s: bool| all.iter().filter(|n| side_of[*n] == s).cloned().collect::<Vec<_>>();
            let (a, b) = (side(true), side(false));
            // Each side settles with only its own claims in view when the
            // partition outlived the grace period; with both sides' claims
            // (the other side's as they were) otherwise.
            let mut during: BTreeMap<String, Claim> = BTreeMap::new();
            for group in [&a, &b] {
                let mut s = Cluster {
                    pool: c.pool,
                    claims: c.claims.iter()
                        .filter(|(node, _)| !beyond_grace || group.contains(node))
                        .map(|(k, v)| (k.clone(), *v)).collect(),
                    skew: c.skew.clone(),
                    now: c.now,
                };
                // The other side's claims stay as they were: only this
                // side claims and settles.
                for _ in 0..200 {
                    let before_round = s.claims.clone();
                    for node in group.iter() {
                        s.claim(node, |_| true);
                    }
                    if s.claims == before_round { break; }
                }
                for node in group.iter() {
                    if let Some(cl) = settle(&s.pool, node, &s.claims) {
                        s.claims.insert(node.clone(), cl);
                    }
                }
                c.now = c.now.max(s.now);
                for node in group.iter() {
                    if let Some(cl) = s.claims.get(node) {
                        during.insert(node.clone(), *cl);
                    }
                }
            }
            c.claims = during.clone();
            c.settle(&all);
            let after = c.leases();
            prop_assert_eq!(after.len(), all.len());
            let slots: BTreeSet<u32> = after.values().copied().collect();
            prop_assert_eq!(slots.len(), all.len());
            for node in &all {
                let held = during[node].slot;
                if after[node] != held {
                    // Moved: someone on the other side settled that slot.
                    let other = during.iter().any(|(m, cl)| {
                        side_of[m] != side_of[node] && cl.slot == held && cl.settled
                    });
                    prop_assert!(other, "{} moved from {} with no collision", node, held);
                    if !beyond_grace {
                        prop_assert!(!before.contains_key(node), "{} (settled before) moved", node);
                    }
                }
            }
        }
    }

    #[test]
    fn a_settled_lease_beats_an_older_unsettled_claim() {
        let pool = dcos();
        let mut claims = BTreeMap::new();
        claims.insert(
            "owner".to_string(),
            Claim {
                slot: 7,
                since: 2_000,
                settled: true,
            },
        );
        // A rejoining node whose clock lags claims slot 7 "earlier".
        claims.insert(
            "rejoiner".to_string(),
            Claim {
                slot: 7,
                since: 1_000,
                settled: false,
            },
        );
        let leases = resolve(&pool, &claims);
        assert_eq!(leases.get("owner"), Some(&7));
        assert_eq!(leases.get("rejoiner"), None);
        let next = propose(&pool, "rejoiner", &claims, 1_500).expect("room");
        assert_ne!(next.slot, 7);
        assert!(next.since > 2_000, "later than every claim seen");
        assert!(!next.settled);
        // Read by an earlier version's JSON shape, and written without the
        // flag while unsettled.
        let old: Claim = serde_json::from_str(r#"{"slot":3,"since":9}"#).expect("old claim");
        assert!(!old.settled);
        assert_eq!(
            serde_json::to_string(&next).expect("json"),
            format!(r#"{{"slot":{},"since":{}}}"#, next.slot, next.since)
        );
        assert!(settle(&pool, "rejoiner", &claims).is_none());
        assert!(settle(&pool, "owner", &claims).expect("wins").settled);
    }
}
