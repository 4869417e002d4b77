//! Addresses for named VIPs, agreed by every node without a coordinator.
//!
//! dcos-net hashed a VIP name to an address on each node: two names that
//! collided could get different addresses on different nodes, and an address
//! could move when another VIP came or went. Here an address is a replicated
//! *claim* `(vip, ip, since)` published by every node that hosts a backend of
//! the VIP, and [`allocate`] is a pure function of all claims that every node
//! evaluates identically:
//!
//! 1. VIPs are ordered by their oldest claim `(since, vip)`;
//! 2. in that order, each VIP gets the address of its oldest claim (by
//!    `(since, ip, node)`) that no earlier VIP holds.
//!
//! Nodes then *adopt* the winning claim (same address, same `since`) so the
//! VIP keeps its place in the order when the original claimant leaves, and a
//! VIP with no usable claim gets a fresh one from [`propose`]: the first
//! free probe of a hash of its name. An assigned address never moves while
//! the VIP exists: newer VIPs are ordered after it, and a VIP that goes away
//! only frees an address nobody else was using.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Named VIPs get addresses from 11.0.0.0/8, as in DC/OS.
pub const VIP_NET: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 0);
pub const VIP_PREFIX_LEN: u8 = 8;

/// A node's claim, published in its keyspace as `vipip:<vip>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClaimValue {
    pub ip: Ipv4Addr,
    /// Unix milliseconds when the address was first claimed for this VIP
    /// (kept when another node adopts the claim).
    pub since: u64,
}

/// A claim as seen in the replica.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    /// `name.framework`, the unit that owns one address.
    pub vip: String,
    pub node: String,
    pub value: ClaimValue,
}

/// The result of [`allocate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// VIP → its address and the `since` of the winning claim.
    pub assigned: BTreeMap<String, ClaimValue>,
    /// VIPs whose every claim lost its address to an older VIP.
    pub conflicted: BTreeSet<String>,
}

/// Resolves all claims into addresses. Deterministic: the same set of claims
/// gives the same allocation on every node, whatever order they arrive in.
/// `reserved` are addresses nobody may be assigned (IP VIPs taken as given).
pub fn allocate(claims: &[Claim], reserved: &BTreeSet<Ipv4Addr>) -> Allocation {
    let mut by_vip: BTreeMap<&str, Vec<&Claim>> = BTreeMap::new();
    for c in claims {
        by_vip.entry(c.vip.as_str()).or_default().push(c);
    }
    let mut order: Vec<(u64, &str)> = Vec::with_capacity(by_vip.len());
    for (vip, cs) in by_vip.iter_mut() {
        cs.sort_by(|a, b| {
            (a.value.since, a.value.ip, &a.node).cmp(&(b.value.since, b.value.ip, &b.node))
        });
        order.push((cs[0].value.since, vip));
    }
    order.sort();
    let mut taken: BTreeSet<Ipv4Addr> = reserved.clone();
    let mut out = Allocation::default();
    for (_, vip) in order {
        let winner = by_vip[vip]
            .iter()
            .find(|c| in_vip_net(c.value.ip) && !taken.contains(&c.value.ip));
        match winner {
            Some(c) => {
                taken.insert(c.value.ip);
                out.assigned.insert(vip.to_string(), c.value.clone());
            }
            None => {
                out.conflicted.insert(vip.to_string());
            }
        }
    }
    out
}

pub fn in_vip_net(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    // Network and broadcast addresses of 11.0.0.0/8 are never handed out.
    o[0] == 11 && ip != Ipv4Addr::new(11, 0, 0, 0) && ip != Ipv4Addr::new(11, 255, 255, 255)
}

/// FNV-1a: stable across versions and platforms, unlike std's hasher.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// How many host addresses probes spread over: all of 11.0.0.0/8, except in
/// unit tests, where a tiny space makes collisions common enough to test.
#[cfg(not(test))]
const PROBE_SPACE: u64 = 1 << 24;
#[cfg(test)]
const PROBE_SPACE: u64 = 64;

/// The `k`-th candidate address of a VIP.
pub fn probe(vip: &str, k: u32) -> Ipv4Addr {
    let h = fnv1a(&[vip.as_bytes(), &k.to_le_bytes()]);
    let host = (h % PROBE_SPACE) as u32;
    Ipv4Addr::from(u32::from(VIP_NET) | host)
}

/// A fresh claim for `vip`: its first probe address not used by any claim
/// or reservation. `None` only if 11.0.0.0/8 is (practically) full.
pub fn propose(
    vip: &str,
    claims: &[Claim],
    reserved: &BTreeSet<Ipv4Addr>,
    now_ms: u64,
) -> Option<ClaimValue> {
    let used: BTreeSet<Ipv4Addr> = claims
        .iter()
        .filter(|c| c.vip != vip)
        .map(|c| c.value.ip)
        .chain(reserved.iter().copied())
        .collect();
    (0..4096)
        .map(|k| probe(vip, k))
        .find(|ip| in_vip_net(*ip) && !used.contains(ip))
        .map(|ip| ClaimValue { ip, since: now_ms })
}

/// What one node should publish for the VIPs it hosts, given everything it
/// sees: adopt the winner, or propose a new address when there is none.
/// Returns the desired claim per hosted VIP (VIPs not hosted get none: the
/// node withdraws its claim for them).
pub fn desired_claims(
    hosted: &BTreeSet<String>,
    claims: &[Claim],
    reserved: &BTreeSet<Ipv4Addr>,
    now_ms: u64,
) -> BTreeMap<String, ClaimValue> {
    let allocation = allocate(claims, reserved);
    let mut out = BTreeMap::new();
    for vip in hosted {
        let value = match allocation.assigned.get(vip) {
            Some(v) => Some(v.clone()),
            None => propose(vip, claims, reserved, now_ms),
        };
        if let Some(v) = value {
            out.insert(vip.clone(), v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claim(vip: &str, node: &str, ip: [u8; 4], since: u64) -> Claim {
        Claim {
            vip: vip.into(),
            node: node.into(),
            value: ClaimValue {
                ip: Ipv4Addr::from(ip),
                since,
            },
        }
    }

    #[test]
    fn older_vip_keeps_a_contested_address() {
        let claims = vec![
            claim("b.marathon", "n2", [11, 0, 0, 7], 20),
            claim("a.marathon", "n1", [11, 0, 0, 7], 10),
        ];
        let a = allocate(&claims, &BTreeSet::new());
        assert_eq!(a.assigned["a.marathon"].ip, Ipv4Addr::new(11, 0, 0, 7));
        assert!(a.conflicted.contains("b.marathon"));
        // b's hosts propose a new address that differs from a's.
        let hosted: BTreeSet<String> = ["b.marathon".to_string()].into();
        let d = desired_claims(&hosted, &claims, &BTreeSet::new(), 30);
        assert_ne!(d["b.marathon"].ip, Ipv4Addr::new(11, 0, 0, 7));
    }

    #[test]
    fn reserved_and_out_of_range_addresses_are_never_assigned() {
        let reserved: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(11, 0, 0, 7)].into();
        let claims = vec![
            claim("a.marathon", "n1", [11, 0, 0, 7], 10),
            claim("c.marathon", "n1", [10, 0, 0, 1], 10),
        ];
        let a = allocate(&claims, &reserved);
        assert!(a.assigned.is_empty());
        assert_eq!(a.conflicted.len(), 2);
    }

    /// A small model of the protocol: nodes host VIPs, see some subset of
    /// claims (delivery is arbitrary), and publish `desired_claims`.
    #[derive(Debug, Clone)]
    struct Node {
        hosted: BTreeSet<String>,
        published: BTreeMap<String, ClaimValue>,
    }

    fn all_claims(nodes: &[Node]) -> Vec<Claim> {
        nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.published.iter().map(move |(vip, v)| Claim {
                    vip: vip.clone(),
                    node: format!("n{i}"),
                    value: v.clone(),
                })
            })
            .collect()
    }

    /// Runs rounds in which each node reacts to a possibly stale view (only
    /// claims of nodes in `visible`), then full-visibility rounds until
    /// nothing changes.
    fn run(nodes: &mut [Node], partial_rounds: &[(usize, Vec<bool>)], mut clock: u64) -> u64 {
        for (who, visible) in partial_rounds {
            let who = who % nodes.len();
            let view: Vec<Claim> = all_claims(nodes)
                .into_iter()
                .filter(|c| {
                    let i: usize = c.node[1..].parse().expect("node index");
                    i == who || visible.get(i).copied().unwrap_or(false)
                })
                .collect();
            clock += 1;
            nodes[who].published =
                desired_claims(&nodes[who].hosted, &view, &BTreeSet::new(), clock);
        }
        for _ in 0..50 {
            let before: Vec<_> = nodes.iter().map(|n| n.published.clone()).collect();
            for i in 0..nodes.len() {
                clock += 1;
                let view = all_claims(nodes);
                nodes[i].published =
                    desired_claims(&nodes[i].hosted, &view, &BTreeSet::new(), clock);
            }
            if nodes
                .iter()
                .map(|n| n.published.clone())
                .collect::<Vec<_>>()
                == before
            {
                return clock;
            }
        }
        panic!("claims did not settle in 50 rounds");
    }

    fn arb_nodes(max_nodes: usize, vips: usize) -> impl Strategy<Value = Vec<Node>> {
        prop::collection::vec(prop::collection::btree_set(0..vips, 0..4), 1..max_nodes).prop_map(
            |hs| {
                hs.into_iter()
                    .map(|h| Node {
                        hosted: h.into_iter().map(|v| format!("vip{v}.marathon")).collect(),
                        published: BTreeMap::new(),
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Every node computes the same allocation from the same claims in
        /// any order; no two VIPs share an address; every hosted VIP gets one.
        #[test]
        fn converges_to_one_unique_allocation(
            mut nodes in arb_nodes(100, 30),
            partial in prop::collection::vec((any::<usize>(), prop::collection::vec(any::<bool>(), 0..100)), 0..60),
            seed in any::<u64>(),
        ) {
            run(&mut nodes, &partial, 1000);
            let claims = all_claims(&nodes);
            let reference = allocate(&claims, &BTreeSet::new());
            let mut shuffled = claims.clone();
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(allocate(&shuffled, &BTreeSet::new()), reference.clone());
            let ips: BTreeSet<Ipv4Addr> = reference.assigned.values().map(|v| v.ip).collect();
            prop_assert_eq!(ips.len(), reference.assigned.len());
            prop_assert!(reference.conflicted.is_empty());
            let hosted: BTreeSet<&String> = nodes.iter().flat_map(|n| n.hosted.iter()).collect();
            prop_assert_eq!(hosted.len(), reference.assigned.len());
            // Every host of a VIP publishes the same (winning) claim.
            for n in &nodes {
                for (vip, v) in &n.published {
                    prop_assert_eq!(&reference.assigned[vip], v);
                }
            }
        }

        /// Once settled, an address never moves while its VIP exists, however
        /// other VIPs come and go (with stale views along the way).
        #[test]
        fn settled_addresses_are_stable(
            mut nodes in arb_nodes(30, 20),
            changes in prop::collection::vec((any::<usize>(), 0..20usize, any::<bool>()), 1..20),
            partial in prop::collection::vec((any::<usize>(), prop::collection::vec(any::<bool>(), 0..30)), 0..30),
        ) {
            let clock = run(&mut nodes, &[], 1000);
            let before = allocate(&all_claims(&nodes), &BTreeSet::new()).assigned;
            // Other VIPs come and go on random nodes; the VIPs settled
            // before stay hosted by at least one of their original hosts.
            let keep: BTreeSet<String> = before.keys().cloned().collect();
            for (who, vip, add) in &changes {
                let who = who % nodes.len();
                let vip = format!("new{vip}.marathon");
                if *add { nodes[who].hosted.insert(vip); } else { nodes[who].hosted.remove(&vip); }
            }
            run(&mut nodes, &partial, clock);
            let after = allocate(&all_claims(&nodes), &BTreeSet::new()).assigned;
            for vip in &keep {
                prop_assert_eq!(before.get(vip).map(|v| v.ip), after.get(vip).map(|v| v.ip), "{} moved", vip);
            }
        }

        /// Names whose first probes collide still get distinct addresses.
        #[test]
        fn probes_stay_in_range(vip in "[a-z0-9-]{1,20}\\.marathon", k in 0u32..100) {
            let ip = probe(&vip, k);
            prop_assert_eq!(ip.octets()[0], 11);
        }
    }

    #[test]
    fn colliding_first_probes_are_resolved() {
        // Force a collision: two VIPs both claim the same address at once.
        let mut nodes = vec![
            Node {
                hosted: ["x.marathon".to_string()].into(),
                published: BTreeMap::new(),
            },
            Node {
                hosted: ["y.marathon".to_string()].into(),
                published: BTreeMap::new(),
            },
        ];
        let ip = ClaimValue {
            ip: Ipv4Addr::new(11, 1, 2, 3),
            since: 5,
        };
        nodes[0].published.insert("x.marathon".into(), ip.clone());
        nodes[1].published.insert("y.marathon".into(), ip);
        run(&mut nodes, &[], 10);
        let a = allocate(&all_claims(&nodes), &BTreeSet::new());
        assert_eq!(a.assigned.len(), 2);
        assert_ne!(a.assigned["x.marathon"].ip, a.assigned["y.marathon"].ip);
        // The tie on `since` is broken by name: x keeps the address.
        assert_eq!(a.assigned["x.marathon"].ip, Ipv4Addr::new(11, 1, 2, 3));
    }
}
