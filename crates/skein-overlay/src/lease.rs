//! Leases from a pool (agent subnets of an overlay, or VTEP addresses),
//! agreed by every node without a coordinator.
//!
//! Each node publishes a claim `(slot, since)` in its own keyspace.
//! [`resolve`] is a pure function of all claims, the same on every node:
//! claims are taken oldest first (`since`, then node id) and a claim whose
//! slot an older claim holds loses. A losing node proposes the first free
//! slot ([`propose`]); a winning node keeps its claim for as long as it
//! lives, so its lease never changes. A node's claim goes away only with the
//! node (after its grace period) or by an operator's explicit delete.

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
}

/// Node → its settled slot, for every node whose claim wins. Deterministic:
/// the same claims give the same leases on every node, in any order.
pub fn resolve(pool: &Pool, claims: &BTreeMap<String, Claim>) -> BTreeMap<String, u32> {
    let mut order: Vec<(&Claim, &String)> = claims.iter().map(|(n, c)| (c, n)).collect();
    order.sort_by(|a, b| (a.0.since, a.1).cmp(&(b.0.since, b.1)));
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

/// What `node` should claim given every claim it sees: its own if it wins,
/// else the first free slot after a per-node starting point.
pub fn propose(
    pool: &Pool,
    node: &str,
    claims: &BTreeMap<String, Claim>,
    now_ms: u64,
) -> Result<Claim, LeaseError> {
    let leases = resolve(pool, claims);
    if let (Some(&slot), Some(claim)) = (leases.get(node), claims.get(node)) {
        return Ok(Claim {
            slot,
            since: claim.since,
        });
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
            since: now_ms,
        })
        .ok_or(LeaseError::Exhausted(pool.capacity()))
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
    fn settle(
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
            settle(&pool, &mut claims, &nodes, &partial, 1_000);
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
            let clock = settle(&pool, &mut claims, &nodes, &[], 1_000);
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
            settle(&pool, &mut claims, &nodes, &partial, clock);
            let after = resolve(&pool, &claims);
            for (node, slot) in &before {
                if !gone.contains(node) {
                    prop_assert_eq!(after.get(node), Some(slot), "{} moved", node);
                }
            }
        }
    }
}
