//! Addresses for named VIPs, agreed by every node without a coordinator,
//! and known the moment a node sees the VIP's task.
//!
//! dcos-net hashed a VIP name to an address on each node: two names that
//! collided could get different addresses on different nodes, and an address
//! could move when another VIP came or went. Here an address is a replicated
//! *claim* `(vip, ip, since)` published by every node that hosts a backend of
//! the VIP, and [`allocate`] is a pure function of all claims that every node
//! evaluates identically:
//!
//! 1. VIPs are ordered by their first claim `(settled first, since, vip)`;
//! 2. in that order, each VIP gets the address of its first claim (by
//!    `(settled first, since, ip, node)`) that no earlier VIP holds.
//!
//! `since` is the claimer's clock, so it cannot order a claim against one
//! its claimer never saw: a claim is marked *settled* once a host has seen
//! its VIP hold the address, uncontested, for a while in a view of the whole
//! cluster, and a settled claim ranks before every unsettled one whatever
//! the clocks say. A claim made before its node's first sync, with a clock
//! days behind, therefore never takes an address in use. A new claim's
//! `since` is also later than every claim its claimer saw ([`after_all`]).
//! Only settled claims made on two sides of a partition still meet on
//! `since` alone when it heals.
//!
//! Nodes then *adopt* the winning claim (same address, same `since`) so the
//! VIP keeps its place in the order when the original claimant leaves, and a
//! VIP with no usable claim gets a fresh one from [`propose`]: the first
//! free probe of a hash of its name. An assigned address never moves while
//! the VIP exists: newer VIPs are ordered after it, and a VIP that goes away
//! only frees an address nobody else was using.
//!
//! A new VIP need not wait for its claim to travel: [`propose`] is a pure
//! function of the claims, so any node that sees the VIP's task before its
//! claim computes the very address the hosting node is claiming.
//! [`resolve`] gives every VIP it is told of an [`Address`] with a
//! [`Standing`]: the winning claim, or that prediction, usable at once; or,
//! where something actually conflicts (two new names whose predictions
//! coincide, two claims on one address), an address that waits until the
//! claims settle the conflict. A prediction can only be wrong if the
//! predicting node lacks a claim the host had, or a task of another new VIP
//! that wants the same address: both mean two VIPs were created (or one
//! created and one deleted) on the same address within the time gossip
//! takes, or on two sides of a partition. Then the claims decide, as they
//! always did, and the newer VIP moves. Across a partition that is
//! unavoidable for any scheme that hands out addresses on both sides.

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
    /// (kept when another node adopts the claim), and later than every
    /// claim its claimer had seen ([`after_all`]).
    pub since: u64,
    /// A host saw the VIP hold this address, uncontested, for a while in a
    /// view of the whole cluster: the claim then ranks before every
    /// unsettled one, whatever the clocks say (`since` is the claimer's
    /// clock). Absent in claims of earlier versions (read as false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub settled: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ClaimValue {
    /// The order of claims: settled first, then oldest.
    fn rank(&self) -> (bool, u64) {
        (!self.settled, self.since)
    }
}

/// A new claim's `since`: the claimer's clock, but later than every claim
/// it has seen (a Lamport clock carried by the claims), so that a claim made
/// after seeing another ranks after it even when the claimer's clock lags.
pub fn after_all(seen: impl Iterator<Item = u64>, now_ms: u64) -> u64 {
    seen.map(|s| s.saturating_add(1)).fold(now_ms, u64::max)
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
    allocate_in(&Pool::VIPS, claims, reserved)
}

/// [`allocate`] in `pool`.
pub fn allocate_in(pool: &Pool, claims: &[Claim], reserved: &BTreeSet<Ipv4Addr>) -> Allocation {
    let mut by_vip: BTreeMap<&str, Vec<&Claim>> = BTreeMap::new();
    for c in claims {
        by_vip.entry(c.vip.as_str()).or_default().push(c);
    }
    let mut order: Vec<((bool, u64), &str)> = Vec::with_capacity(by_vip.len());
    for (vip, cs) in by_vip.iter_mut() {
        cs.sort_by(|a, b| {
            (a.value.rank(), a.value.ip, &a.node).cmp(&(b.value.rank(), b.value.ip, &b.node))
        });
        order.push((cs[0].value.rank(), vip));
    }
    order.sort();
    let mut taken: BTreeSet<Ipv4Addr> = reserved.clone();
    let mut out = Allocation::default();
    for (_, vip) in order {
        let winner = by_vip[vip]
            .iter()
            .find(|c| pool.contains(c.value.ip) && !taken.contains(&c.value.ip));
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
    Pool::VIPS.contains(ip)
}

/// A space of slots claims are made in, as addresses: 11.0.0.0/8 for
/// named VIPs, or a port range (a port `p` is the address `0.0.x.y` with
/// the value `p`) for the edge's service ports. Probes hash a name into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// The first slot's value.
    base: u32,
    /// How many slots probes spread over.
    span: u32,
    /// The first and last slots are never handed out (a network's own
    /// and broadcast addresses).
    skip_ends: bool,
}

impl Pool {
    /// 11.0.0.0/8, as in DC/OS (in unit tests a tiny space, to make
    /// collisions common enough to test).
    pub const VIPS: Pool = Pool {
        base: u32::from_be_bytes([11, 0, 0, 0]),
        span: PROBE_SPACE as u32,
        skip_ends: true,
    };

    /// The ports `first..=last` (`first <= last`).
    pub const fn ports(first: u16, last: u16) -> Pool {
        Pool {
            base: first as u32,
            span: last as u32 - first as u32 + 1,
            skip_ends: false,
        }
    }

    /// A port as a slot of a port pool.
    pub fn port_slot(port: u16) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(port))
    }

    /// A port pool's slot as the port (`None` if it is not one).
    pub fn slot_port(slot: Ipv4Addr) -> Option<u16> {
        u16::try_from(u32::from(slot)).ok()
    }

    pub fn contains(&self, slot: Ipv4Addr) -> bool {
        let v = u32::from(slot);
        // The VIP pool's membership is the whole /8, whatever the probes
        // spread over (an address claimed by a version with another probe
        // space is still ours).
        let span = if self.skip_ends { 1 << 24 } else { self.span };
        let Some(offset) = v.checked_sub(self.base) else {
            return false;
        };
        offset < span && !(self.skip_ends && (offset == 0 || offset == span - 1))
    }

    /// The `k`-th candidate slot of `name`.
    pub fn probe(&self, name: &str, k: u32) -> Ipv4Addr {
        let h = fnv1a(&[name.as_bytes(), &k.to_le_bytes()]);
        Ipv4Addr::from(self.base + (h % u64::from(self.span)) as u32)
    }
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
    Pool::VIPS.probe(vip, k)
}

/// A fresh claim for `vip`: its first probe address not used by any claim
/// or reservation. `None` only if 11.0.0.0/8 is (practically) full.
pub fn propose(
    vip: &str,
    claims: &[Claim],
    reserved: &BTreeSet<Ipv4Addr>,
    now_ms: u64,
) -> Option<ClaimValue> {
    propose_in(&Pool::VIPS, vip, claims, reserved, now_ms)
}

/// [`propose`] in `pool`.
pub fn propose_in(
    pool: &Pool,
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
        .map(|k| pool.probe(vip, k))
        .find(|ip| pool.contains(*ip) && !used.contains(ip))
        .map(|ip| ClaimValue {
            ip,
            since: after_all(claims.iter().map(|c| c.value.since), now_ms),
            settled: false,
        })
}

/// What one node should publish for the VIPs it hosts, given everything it
/// sees ([`resolve`]'s `resolution` of the same claims): adopt the winner
/// (marked settled where `settle` says so), or propose a new address when
/// there is none. Returns the desired claim per hosted VIP (VIPs not hosted
/// get none: the node withdraws its claim for them). Two VIPs proposed in
/// the same step never get the same address, and a proposal never takes
/// the address another VIP is predicted at (in use on nodes that saw its
/// task first): a loser of a collision moves past them.
pub fn desired_claims(
    hosted: &BTreeSet<String>,
    claims: &[Claim],
    resolution: &Resolution,
    now_ms: u64,
    settle: impl Fn(&str) -> bool,
) -> BTreeMap<String, ClaimValue> {
    desired_claims_in(&Pool::VIPS, hosted, claims, resolution, now_ms, settle)
}

/// [`desired_claims`] in `pool`.
pub fn desired_claims_in(
    pool: &Pool,
    hosted: &BTreeSet<String>,
    claims: &[Claim],
    resolution: &Resolution,
    now_ms: u64,
    settle: impl Fn(&str) -> bool,
) -> BTreeMap<String, ClaimValue> {
    let allocation = &resolution.allocation;
    let mut out = BTreeMap::new();
    let mut proposed = resolution.reserved.clone();
    for vip in hosted {
        let value = match allocation.assigned.get(vip) {
            Some(v) => Some(ClaimValue {
                settled: v.settled || settle(vip),
                ..v.clone()
            }),
            None => {
                let others_predicted = resolution.addresses.iter().filter_map(|(other, a)| {
                    (other != vip && a.standing == Standing::Predicted).then_some(a.ip)
                });
                let avoid: BTreeSet<Ipv4Addr> =
                    proposed.iter().copied().chain(others_predicted).collect();
                propose_in(pool, vip, claims, &avoid, now_ms)
            }
        };
        if let Some(v) = value {
            proposed.insert(v.ip);
            out.insert(vip.clone(), v);
        }
    }
    out
}

/// How far a node may trust the address [`resolve`] computed for a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The winning claim, and no other VIP claims the address: use it.
    Claimed,
    /// No claim seen yet: the address the VIP's hosts are claiming (the
    /// first free probe), and no other unclaimed VIP would claim it: use it.
    Predicted,
    /// The winning claim, but another VIP claims the address too: a
    /// collision the loser's hosts are about to resolve by claiming anew.
    /// `settled`: the winning claim is (it held the address before).
    Contested { settled: bool },
    /// A guess (two unclaimed VIPs would claim the same address, or every
    /// claim of this VIP lost its address): wait for the claims.
    Pending,
}

impl Standing {
    /// Whether the address may be handed out as soon as it is computed.
    pub fn immediate(self) -> bool {
        matches!(self, Standing::Claimed | Standing::Predicted)
    }
}

/// A named VIP's address as one node computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: Ipv4Addr,
    pub standing: Standing,
}

/// The result of [`resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// IP VIPs nobody may be assigned: those given, less any a named VIP's
    /// winning claim already holds (that named VIP keeps it; the IP VIP is
    /// the one refused).
    pub reserved: BTreeSet<Ipv4Addr>,
    /// The claims resolved by [`allocate`] against `reserved`.
    pub allocation: Allocation,
    /// Every claimed VIP and every VIP of `live`, with its address; no two
    /// share one.
    pub addresses: BTreeMap<String, Address>,
}

/// Every node's view of named-VIP addresses: `live` are the named VIPs the
/// node sees tasks for, `claims` every claim it sees, `ip_vips` the IP VIPs
/// in 11.0.0.0/8. Pure and deterministic, like [`allocate`]: nodes with the
/// same view compute the same addresses. VIPs with a winning claim get it;
/// VIPs without one get the first probe of their name that no claim or
/// reservation holds, which is what their hosts claim ([`desired_claims`]
/// runs [`propose`] on the same view), so the claim, when it arrives,
/// confirms the address already in use.
pub fn resolve(
    live: &BTreeSet<String>,
    claims: &[Claim],
    ip_vips: &BTreeSet<Ipv4Addr>,
) -> Resolution {
    resolve_in(&Pool::VIPS, live, claims, ip_vips)
}

/// [`resolve`] in `pool`; `ip_vips` are the slots reserved in it.
pub fn resolve_in(
    pool: &Pool,
    live: &BTreeSet<String>,
    claims: &[Claim],
    ip_vips: &BTreeSet<Ipv4Addr>,
) -> Resolution {
    let named = allocate_in(pool, claims, &BTreeSet::new());
    let named_ips: BTreeSet<Ipv4Addr> = named.assigned.values().map(|v| v.ip).collect();
    let reserved: BTreeSet<Ipv4Addr> = ip_vips
        .iter()
        .filter(|ip| !named_ips.contains(ip))
        .copied()
        .collect();
    let allocation = allocate_in(pool, claims, &reserved);
    // Addresses claimed by more than one VIP (the losers' claims are still
    // in the view until their hosts claim anew).
    let mut claimants: BTreeMap<Ipv4Addr, BTreeSet<&str>> = BTreeMap::new();
    for c in claims {
        claimants.entry(c.value.ip).or_default().insert(&c.vip);
    }
    let mut addresses = BTreeMap::new();
    let mut taken: BTreeSet<Ipv4Addr> = reserved.clone();
    for (vip, value) in &allocation.assigned {
        let contested = claimants.get(&value.ip).is_some_and(|s| s.len() > 1);
        let standing = if contested {
            Standing::Contested {
                settled: value.settled,
            }
        } else {
            Standing::Claimed
        };
        taken.insert(value.ip);
        addresses.insert(
            vip.clone(),
            Address {
                ip: value.ip,
                standing,
            },
        );
    }
    // What each unassigned VIP's hosts would propose on this view.
    let mut predicted: BTreeMap<&str, Option<Ipv4Addr>> = BTreeMap::new();
    for vip in live {
        if !allocation.assigned.contains_key(vip) {
            predicted.insert(
                vip,
                propose_in(pool, vip, claims, &reserved, 0).map(|v| v.ip),
            );
        }
    }
    let mut wanted: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for ip in predicted.values().flatten() {
        *wanted.entry(*ip).or_default() += 1;
    }
    let has_claims: BTreeSet<&str> = claims.iter().map(|c| c.vip.as_str()).collect();
    let mut guesses = Vec::new();
    for (vip, ip) in &predicted {
        match ip {
            Some(ip) if wanted[ip] == 1 && !has_claims.contains(vip) => {
                taken.insert(*ip);
                addresses.insert(
                    vip.to_string(),
                    Address {
                        ip: *ip,
                        standing: Standing::Predicted,
                    },
                );
            }
            _ => guesses.push(*vip),
        }
    }
    // The rest, by name, get distinct guesses (never handed out as such).
    for vip in guesses {
        let guess = (0..4096)
            .map(|k| pool.probe(vip, k))
            .find(|ip| pool.contains(*ip) && !taken.contains(ip));
        if let Some(ip) = guess {
            taken.insert(ip);
            addresses.insert(
                vip.to_string(),
                Address {
                    ip,
                    standing: Standing::Pending,
                },
            );
        }
    }
    Resolution {
        reserved,
        allocation,
        addresses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a node hosting `hosted` (and seeing only its own tasks) claims:
    /// [`desired_claims`] on [`resolve`] of the same claims, settling
    /// nothing.
    fn desire(
        hosted: &BTreeSet<String>,
        claims: &[Claim],
        ip_vips: &BTreeSet<Ipv4Addr>,
        now_ms: u64,
    ) -> BTreeMap<String, ClaimValue> {
        let r = resolve(hosted, claims, ip_vips);
        desired_claims(hosted, claims, &r, now_ms, |_| false)
    }

    fn claim(vip: &str, node: &str, ip: [u8; 4], since: u64) -> Claim {
        Claim {
            vip: vip.into(),
            node: node.into(),
            value: ClaimValue {
                ip: Ipv4Addr::from(ip),
                since,
                settled: false,
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
        let d = desire(&hosted, &claims, &BTreeSet::new(), 30);
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
            nodes[who].published = desire(&nodes[who].hosted, &view, &BTreeSet::new(), clock);
        }
        for _ in 0..50 {
            let before: Vec<_> = nodes.iter().map(|n| n.published.clone()).collect();
            for i in 0..nodes.len() {
                clock += 1;
                let view = all_claims(nodes);
                nodes[i].published = desire(&nodes[i].hosted, &view, &BTreeSet::new(), clock);
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
            // Every node resolves every VIP to its winner, usable at once,
            // whatever order it holds the claims in.
            let live: BTreeSet<String> = hosted.into_iter().cloned().collect();
            let resolved = resolve(&live, &claims, &BTreeSet::new());
            prop_assert_eq!(&resolve(&live, &shuffled, &BTreeSet::new()), &resolved);
            for vip in &live {
                prop_assert_eq!(
                    resolved.addresses[vip],
                    Address { ip: reference.assigned[vip].ip, standing: Standing::Claimed }
                );
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
            settled: false,
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

    #[test]
    fn a_new_vip_is_predicted_then_confirmed_by_its_claim() {
        let live: BTreeSet<String> = ["a.marathon".to_string()].into();
        let predicted = resolve(&live, &[], &BTreeSet::new()).addresses["a.marathon"];
        assert_eq!(predicted.standing, Standing::Predicted);
        // The host computes the same address, and claims it.
        let claimed = desire(&live, &[], &BTreeSet::new(), 7);
        assert_eq!(claimed["a.marathon"].ip, predicted.ip);
        let claims = vec![Claim {
            vip: "a.marathon".into(),
            node: "n1".into(),
            value: claimed["a.marathon"].clone(),
        }];
        assert_eq!(
            resolve(&live, &claims, &BTreeSet::new()).addresses["a.marathon"],
            Address {
                ip: predicted.ip,
                standing: Standing::Claimed
            }
        );
    }

    /// Two names whose first probes coincide (common in the tiny test space).
    fn colliding_pair() -> (String, String) {
        let mut first: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for i in 0.. {
            let name = format!("c{i}.marathon");
            let ip = probe(&name, 0);
            if !in_vip_net(ip) {
                continue;
            }
            if let Some(other) = first.insert(ip, name.clone()) {
                return (other, name);
            }
        }
        unreachable!("the probe space is finite")
    }

    #[test]
    fn colliding_new_names_wait_for_their_claims() {
        let (x, y) = colliding_pair();
        let p = probe(&x, 0);
        let live: BTreeSet<String> = [x.clone(), y.clone()].into();
        let r = resolve(&live, &[], &BTreeSet::new());
        assert_eq!(r.addresses[&x].standing, Standing::Pending);
        assert_eq!(r.addresses[&y].standing, Standing::Pending);
        assert_ne!(r.addresses[&x].ip, r.addresses[&y].ip);
        // Their hosts, unaware of each other, both claim p; y's claim is
        // older, so y keeps p (once x's host has moved on) and x moves.
        let claims = vec![
            claim(&x, "n1", p.octets(), 20),
            claim(&y, "n2", p.octets(), 10),
        ];
        let r = resolve(&live, &claims, &BTreeSet::new());
        assert_eq!(
            r.addresses[&y],
            Address {
                ip: p,
                standing: Standing::Contested { settled: false }
            }
        );
        assert_eq!(r.addresses[&x].standing, Standing::Pending);
        let again = desire(&[x.clone()].into(), &claims, &BTreeSet::new(), 30);
        assert_eq!(
            again[&x].ip, r.addresses[&x].ip,
            "the guess is what x's host claims next"
        );
        let claims = vec![
            Claim {
                vip: x.clone(),
                node: "n1".into(),
                value: again[&x].clone(),
            },
            claim(&y, "n2", p.octets(), 10),
        ];
        let r = resolve(&live, &claims, &BTreeSet::new());
        assert_eq!(r.addresses[&y].standing, Standing::Claimed);
        assert_eq!(r.addresses[&x].standing, Standing::Claimed);
        assert_eq!(r.addresses[&y].ip, p);
    }

    #[test]
    fn one_host_never_proposes_one_address_for_two_vips() {
        let (x, y) = colliding_pair();
        let d = desire(&[x.clone(), y.clone()].into(), &[], &BTreeSet::new(), 1);
        assert_ne!(d[&x].ip, d[&y].ip);
    }

    #[test]
    fn ip_vips_are_avoided_and_never_displace_a_named_vip() {
        let live: BTreeSet<String> = ["a.marathon".to_string()].into();
        let first = resolve(&live, &[], &BTreeSet::new()).addresses["a.marathon"].ip;
        // An IP VIP on a's predicted address: a's prediction, and what its
        // host claims, move on.
        let r = resolve(&live, &[], &[first].into());
        let a = r.addresses["a.marathon"];
        assert_ne!(a.ip, first);
        assert_eq!(a.standing, Standing::Predicted);
        assert_eq!(
            desire(&live, &[], &[first].into(), 1)["a.marathon"].ip,
            a.ip
        );
        // Once a holds the address by claim, an IP VIP on it is refused.
        let claims = vec![claim("a.marathon", "n1", first.octets(), 5)];
        let r = resolve(&live, &claims, &[first].into());
        assert!(r.reserved.is_empty());
        assert_eq!(
            r.addresses["a.marathon"],
            Address {
                ip: first,
                standing: Standing::Claimed
            }
        );
    }

    /// What a node published at one point: its tasks' VIPs and its claims.
    #[derive(Debug, Clone, PartialEq)]
    struct Published {
        hosted: BTreeSet<String>,
        claims: BTreeMap<String, ClaimValue>,
    }

    /// The protocol with gossip's kind of staleness: each node keeps the
    /// history of what it published, and sees every other node through
    /// some version of it, at or after `floor` (a version everyone had
    /// seen: replicas only grow). A node's task and its claims travel as
    /// its versions do, so a task can be seen before its claim.
    struct Sim {
        history: Vec<Vec<Published>>,
        floor: Vec<usize>,
        ip_vips: BTreeSet<Ipv4Addr>,
        clock: u64,
        /// Per node, how far its clock is off (ms; none: exact).
        skew: Vec<i64>,
        /// Every `(vip, ip)` claimed since the floor.
        claimed: BTreeSet<(String, Ipv4Addr)>,
        /// Every address a node computed for a VIP it saw, since the floor.
        observed: Vec<(String, Address)>,
    }

    impl Sim {
        fn new(hosted: Vec<BTreeSet<String>>, ip_vips: BTreeSet<Ipv4Addr>) -> Sim {
            Sim {
                floor: vec![0; hosted.len()],
                history: hosted
                    .into_iter()
                    .map(|hosted| {
                        vec![Published {
                            hosted,
                            claims: BTreeMap::new(),
                        }]
                    })
                    .collect(),
                ip_vips,
                clock: 1000,
                skew: Vec::new(),
                claimed: BTreeSet::new(),
                observed: Vec::new(),
            }
        }

        /// Node `who`'s clock at the next step.
        fn now(&mut self, who: usize) -> u64 {
            self.clock += 1;
            self.clock
                .saturating_add_signed(self.skew.get(who).copied().unwrap_or(0))
        }

        fn latest(&self, i: usize) -> &Published {
            self.history[i].last().expect("a node has a version")
        }

        /// Node `who`'s view: its own latest version, and `version(i)`
        /// (clamped to what exists since the floor) of every other node.
        fn view(
            &self,
            who: usize,
            version: impl Fn(usize) -> usize,
        ) -> (BTreeSet<String>, Vec<Claim>) {
            let mut live = BTreeSet::new();
            let mut claims = Vec::new();
            for (i, versions) in self.history.iter().enumerate() {
                let v = if i == who {
                    versions.len() - 1
                } else {
                    version(i).clamp(self.floor[i], versions.len() - 1)
                };
                let p = &versions[v];
                live.extend(p.hosted.iter().cloned());
                claims.extend(p.claims.iter().map(|(vip, value)| Claim {
                    vip: vip.clone(),
                    node: format!("n{i}"),
                    value: value.clone(),
                }));
            }
            (live, claims)
        }

        /// Node `who` computes addresses from its view and publishes what
        /// it should claim. Returns whether it published anything.
        fn step(&mut self, who: usize, version: impl Fn(usize) -> usize) -> bool {
            self.step_settling(who, version, false)
        }

        /// [`Sim::step`]; with `synced`, the view is the whole cluster's
        /// and the node marks settled the claims whose VIP it sees
        /// uncontested (as the agent does after a settling period).
        fn step_settling(
            &mut self,
            who: usize,
            version: impl Fn(usize) -> usize,
            synced: bool,
        ) -> bool {
            let (live, claims) = self.view(who, version);
            let r = resolve(&live, &claims, &self.ip_vips);
            for (vip, a) in &r.addresses {
                if live.contains(vip) {
                    self.observed.push((vip.clone(), *a));
                }
            }
            let me = self.latest(who).clone();
            let desired = desired_claims(&me.hosted, &claims, &r, self.now(who), |vip| {
                synced && r.addresses.get(vip).map(|a| a.standing) == Some(Standing::Claimed)
            });
            if desired == me.claims {
                return false;
            }
            for (vip, value) in &desired {
                self.claimed.insert((vip.clone(), value.ip));
            }
            self.history[who].push(Published {
                hosted: me.hosted,
                claims: desired,
            });
            true
        }

        /// A new task on node `who`: a version with `vip` hosted.
        fn host(&mut self, who: usize, vip: &str) {
            let mut next = self.latest(who).clone();
            next.hosted.insert(vip.to_string());
            self.history[who].push(next);
        }

        /// Rounds with every node seeing everything, until nothing changes.
        fn settle(&mut self) {
            let all: Vec<usize> = (0..self.history.len()).collect();
            self.settle_group(&all, |_, _| true);
        }

        /// Rounds in which the nodes of `group` see the latest version of
        /// every node `sees` picks and the oldest since the floor of the
        /// others (all they can see is all they know of: they settle),
        /// until nothing changes.
        fn settle_group(&mut self, group: &[usize], sees: impl Fn(usize, usize) -> bool) {
            for _ in 0..50 {
                let mut changed = false;
                for &i in group {
                    changed |=
                        self.step_settling(i, |j| if sees(i, j) { usize::MAX } else { 0 }, true);
                }
                if !changed {
                    return;
                }
            }
            panic!("claims did not settle in 50 rounds");
        }

        /// Everyone has seen everything so far: start counting from here.
        fn mark_floor(&mut self) {
            self.floor = self.history.iter().map(|h| h.len() - 1).collect();
            self.claimed.clear();
            self.observed.clear();
        }

        /// New VIPs `new<k>.marathon`, each on host `h % nodes`; their names.
        fn create(&mut self, batch: &[(usize, usize)]) -> BTreeSet<String> {
            let n = self.history.len();
            let mut names = BTreeSet::new();
            for (host, k) in batch {
                let vip = format!("new{k}.marathon");
                self.host(host % n, &vip);
                names.insert(vip);
            }
            names
        }

        /// Steps of nodes that see each other node at a version the picks
        /// choose (clamped to the floor).
        fn stale_steps(&mut self, steps: &[(usize, Vec<usize>)]) {
            let n = self.history.len();
            for (who, picks) in steps {
                self.step(who % n, |i| picks[i % picks.len()] % 4);
            }
        }

        /// Everyone sees everything again: the converged addresses, which
        /// must be distinct.
        fn heal(&mut self) -> Result<Resolution, TestCaseError> {
            self.settle();
            let after = self.converged();
            let ips: BTreeSet<Ipv4Addr> = after.addresses.values().map(|a| a.ip).collect();
            prop_assert_eq!(ips.len(), after.addresses.len());
            Ok(after)
        }

        /// The converged addresses (every node's, once it sees everything).
        fn converged(&self) -> Resolution {
            let (live, claims) = self.view(0, |_| usize::MAX);
            resolve(&live, &claims, &self.ip_vips)
        }
    }

    fn arb_hosting(max_nodes: usize, vips: usize) -> impl Strategy<Value = Vec<BTreeSet<String>>> {
        prop::collection::vec(prop::collection::btree_set(0..vips, 0..4), 1..max_nodes).prop_map(
            |hs| {
                hs.into_iter()
                    .map(|h| h.into_iter().map(|v| format!("vip{v}.marathon")).collect())
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// New VIPs appear on random nodes of a converged cluster while
        /// nodes compute addresses from stale per-origin views (a restarted
        /// node reading its persisted replica is one such view): the task
        /// seen before its claim, some claims seen and not others. Every
        /// address a node computed as usable at once is the one the cluster
        /// converges on, except for a new VIP that genuinely collided (some
        /// other VIP claimed an address it was given or claimed); an old
        /// VIP's address never moves and is never computed otherwise; and a
        /// lone new VIP is usable everywhere at once, at its final address.
        #[test]
        fn addresses_used_at_once_are_the_converged_ones(
            base in arb_hosting(100, 30),
            ip_vips in prop::collection::btree_set(1u32..64, 0..4),
            batch in prop::collection::vec((any::<usize>(), 0..20usize), 1..6),
            steps in prop::collection::vec(
                (any::<usize>(), prop::collection::vec(any::<usize>(), 1..8)), 0..80),
        ) {
            let ip_vips: BTreeSet<Ipv4Addr> =
                ip_vips.into_iter().map(|h| Ipv4Addr::from(u32::from(VIP_NET) | h)).collect();
            let mut sim = Sim::new(base, ip_vips);
            sim.settle();
            let before = sim.converged();
            sim.mark_floor();
            let new_names = sim.create(&batch);
            sim.stale_steps(&steps);
            let after = sim.heal()?;
            let (live, _) = sim.view(0, |_| usize::MAX);
            for vip in &live {
                prop_assert_eq!(after.addresses[vip].standing, Standing::Claimed, "{}", vip);
                prop_assert!(!after.reserved.contains(&after.addresses[vip].ip));
            }
            for (vip, a) in &before.addresses {
                prop_assert_eq!(after.addresses[vip].ip, a.ip, "{} moved", vip);
            }
            for (vip, a) in &sim.observed {
                let converged = after.addresses[vip].ip;
                if a.standing.immediate() && a.ip != converged {
                    prop_assert!(new_names.contains(vip),
                        "{} (not new) was given {} at once, converged on {}", vip, a.ip, converged);
                    let mine: BTreeSet<Ipv4Addr> = sim.claimed.iter()
                        .filter(|(v, _)| v == vip).map(|(_, ip)| *ip)
                        .chain([a.ip]).collect();
                    prop_assert!(
                        sim.claimed.iter().any(|(v, ip)| v != vip && mine.contains(ip)),
                        "{} was given {} at once, converged on {}, and collided with nothing",
                        vip, a.ip, converged);
                }
                if new_names.len() == 1 && new_names.contains(vip) {
                    prop_assert_eq!(*a, Address { ip: converged, standing: a.standing });
                    prop_assert!(a.standing.immediate(), "{} waited: {:?}", vip, a);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// VIPs created at the same moment on different nodes, each host
        /// claiming from the converged view, then losers claiming anew with
        /// everything in view: any node that sees the new tasks before any
        /// of their claims (a restarted node reading that replica too) uses
        /// at once exactly the VIPs whose predictions no other new VIP
        /// shares, each at the address the cluster settles on.
        #[test]
        fn simultaneous_new_vips_are_predicted_unless_they_collide(
            base in arb_hosting(100, 30),
            ip_vips in prop::collection::btree_set(1u32..64, 0..4),
            batch in prop::collection::vec((any::<usize>(), 0..20usize), 1..8),
            observer in any::<usize>(),
        ) {
            let ip_vips: BTreeSet<Ipv4Addr> =
                ip_vips.into_iter().map(|h| Ipv4Addr::from(u32::from(VIP_NET) | h)).collect();
            let mut sim = Sim::new(base, ip_vips);
            sim.settle();
            sim.mark_floor();
            let n = sim.history.len();
            let mut new_names = BTreeSet::new();
            for (host, k) in &batch {
                let vip = format!("new{k}.marathon");
                sim.host(host % n, &vip);
                new_names.insert(vip);
            }
            // Tasks everywhere, no claim yet: what the observer computes.
            let (live, claims) = sim.view(observer % n, |_| usize::MAX);
            let seen = resolve(&live, &claims, &sim.ip_vips);
            // Every host claims from the converged view (its own tasks aside).
            let floor = sim.floor.clone();
            let hosts: BTreeSet<usize> = batch.iter().map(|(h, _)| h % n).collect();
            for &h in &hosts {
                sim.step(h, |i| floor[i] + 1);
            }
            sim.settle();
            let after = sim.converged();
            let mut first_free: BTreeMap<&String, Ipv4Addr> = BTreeMap::new();
            for vip in &new_names {
                let p = propose(vip, &claims, &seen.reserved, 0).expect("room in the space").ip;
                first_free.insert(vip, p);
            }
            for vip in &new_names {
                let a = seen.addresses[vip];
                let shared = first_free.iter().any(|(w, p)| *w != vip && *p == first_free[vip]);
                prop_assert_eq!(a.standing.immediate(), !shared, "{}: {:?}", vip, a);
                if a.standing.immediate() {
                    prop_assert_eq!(a.ip, after.addresses[vip].ip, "{} moved", vip);
                }
            }
        }
    }

    #[test]
    fn a_partition_hands_out_on_both_sides_and_heals_to_one_allocation() {
        let (x, y) = colliding_pair();
        let p = probe(&x, 0);
        let mut sim = Sim::new(vec![BTreeSet::new(); 4], BTreeSet::new());
        sim.mark_floor();
        // Nodes 0, 1 | 2, 3: x is created on side A, then y on side B.
        let side = |i: usize| i / 2;
        let partitioned =
            |who: usize| move |i: usize| if side(i) == side(who) { usize::MAX } else { 0 };
        sim.host(0, &x);
        for who in 0..4 {
            sim.step(who, partitioned(who));
        }
        sim.host(2, &y);
        for who in 0..4 {
            sim.step(who, partitioned(who));
        }
        let on = |sim: &Sim, who: usize, vip: &str| {
            sim.observed
                .iter()
                .rev()
                .find(|(v, _)| v == vip && sim.view(who, partitioned(who)).0.contains(v))
                .map(|(_, a)| *a)
        };
        // Each side uses its own VIP at p at once.
        assert_eq!(
            on(&sim, 1, &x),
            Some(Address {
                ip: p,
                standing: Standing::Claimed
            })
        );
        assert_eq!(
            on(&sim, 3, &y),
            Some(Address {
                ip: p,
                standing: Standing::Claimed
            })
        );
        // Healed: x, claimed first, keeps p; y moves, and everyone agrees.
        sim.settle();
        let after = sim.converged();
        assert_eq!(after.addresses[&x].ip, p);
        assert_ne!(after.addresses[&y].ip, p);
        assert_eq!(after.addresses[&y].standing, Standing::Claimed);
    }

    const HOUR_MS: i64 = 3_600_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Settled addresses beat every claim made later by a node that
        /// had not seen them, whatever its clock says: new VIPs created on
        /// nodes with clocks days behind or ahead, computed from views that
        /// miss any of the settled claims (down to nothing at all, as
        /// before a first sync). No settled address moves; all end unique.
        #[test]
        fn settled_addresses_beat_later_claims_whatever_the_clocks(
            base in arb_hosting(40, 30),
            skew in prop::collection::vec(-72 * HOUR_MS..72 * HOUR_MS, 40),
            batch in prop::collection::vec((any::<usize>(), 0..20usize), 1..6),
            steps in prop::collection::vec(
                (any::<usize>(), prop::collection::vec(any::<usize>(), 1..8)), 0..60),
        ) {
            let mut sim = Sim::new(base, BTreeSet::new());
            sim.clock = 1_800_000_000_000;
            sim.skew = skew;
            sim.settle();
            let before = sim.converged();
            sim.create(&batch);
            // The floor stays at the start: a view may hold nothing of a
            // node but its first, empty version.
            sim.stale_steps(&steps);
            let after = sim.heal()?;
            for (vip, a) in &before.addresses {
                prop_assert_eq!(after.addresses[vip].ip, a.ip, "{} moved", vip);
            }
        }

        /// A partition: both sides create VIPs and settle them on their
        /// own, with skewed clocks; past the grace period each side has
        /// forgotten the other's nodes (their tasks and claims gone from its
        /// view). After the heal every VIP has an address of its own, and
        /// an address moved only where the other side had settled it for
        /// another VIP (or this VIP, created on both sides, at another):
        /// shorter than the grace, no address settled before the partition
        /// moves.
        #[test]
        fn partitions_heal_to_unique_addresses_moving_only_collisions(
            base in arb_hosting(30, 30),
            sides in prop::collection::vec(any::<bool>(), 30),
            skew in prop::collection::vec(-72 * HOUR_MS..72 * HOUR_MS, 30),
            batch in prop::collection::vec((any::<usize>(), 0..20usize), 1..8),
            beyond_grace in any::<bool>(),
        ) {
            let mut sim = Sim::new(base, BTreeSet::new());
            sim.clock = 1_800_000_000_000;
            sim.skew = skew;
            sim.settle();
            let before = sim.converged();
            if !beyond_grace {
                sim.mark_floor();
            }
            let n = sim.history.len();
            let side = |i: usize| sides[i % sides.len()];
            sim.create(&batch);
            let mut during: Vec<(bool, Resolution)> = Vec::new();
            for s in [true, false] {
                let group: Vec<usize> = (0..n).filter(|&i| side(i) == s).collect();
                sim.settle_group(&group, |i, j| side(i) == side(j));
                if let Some(&who) = group.first() {
                    let (live, claims) =
                        sim.view(who, |j| if side(j) == s { usize::MAX } else { 0 });
                    let r = resolve(&live, &claims, &sim.ip_vips);
                    // What this side settled (a task of a node it forgot
                    // may still be predicted from an old version: not
                    // settled, never compared).
                    let mut settled = r.clone();
                    settled.addresses.retain(|vip, a| {
                        live.contains(vip) && a.standing == Standing::Claimed
                    });
                    during.push((s, settled));
                }
            }
            let after = sim.heal()?;
            for (s, r) in &during {
                for (vip, a) in &r.addresses {
                    let Some(now) = after.addresses.get(vip) else { continue };
                    if now.ip == a.ip {
                        continue;
                    }
                    // The other side settled another VIP at this address,
                    // or this VIP (created on both sides) at another.
                    let collided = during.iter().any(|(t, other)| {
                        t != s
                            && other.addresses.iter().any(|(v, b)| {
                                (v != vip && b.ip == a.ip) || (v == vip && b.ip != a.ip)
                            })
                    });
                    prop_assert!(collided, "{} moved from {} with no collision", vip, a.ip);
                    if !beyond_grace {
                        prop_assert!(!before.addresses.contains_key(vip),
                            "{} (settled before the partition) moved", vip);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A port pool (the edge's service ports): names settle on distinct
        /// ports inside the range, as many as there are ports; a name
        /// keeps its port while names come and go around it.
        #[test]
        fn port_pools_hand_out_each_port_once_and_keep_it(
            first in 1000u16..60000,
            len in 1u16..12,
            names in prop::collection::btree_set("[a-z]{1,4}#[0-2]", 1..20),
            leaving in prop::collection::vec(any::<bool>(), 20),
        ) {
            let pool = Pool::ports(first, first + len - 1);
            let names: Vec<String> = names.into_iter().collect();
            // Each name claimed in turn by its own node, as hosts do.
            let mut claims: Vec<Claim> = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let live: BTreeSet<String> = names[..=i].iter().cloned().collect();
                let r = resolve_in(&pool, &live, &claims, &BTreeSet::new());
                let hosted = BTreeSet::from([name.clone()]);
                let want = desired_claims_in(&pool, &hosted, &claims, &r, i as u64, |_| false);
                for (vip, value) in want {
                    claims.push(Claim { vip, node: format!("n{i}"), value });
                }
            }
            let live: BTreeSet<String> = names.iter().cloned().collect();
            let r = resolve_in(&pool, &live, &claims, &BTreeSet::new());
            let ports: Vec<u16> = r.allocation.assigned.values()
                .map(|v| Pool::slot_port(v.ip).expect("a port"))
                .collect();
            let unique: BTreeSet<u16> = ports.iter().copied().collect();
            prop_assert_eq!(unique.len(), ports.len(), "a port given twice");
            prop_assert!(ports.iter().all(|p| (first..first + len).contains(p)));
            prop_assert_eq!(ports.len(), names.len().min(usize::from(len)));
            // Some names leave (their claims withdrawn): the rest keep theirs.
            let kept: Vec<Claim> = claims.iter()
                .filter(|c| !leaving[names.iter().position(|n| *n == c.vip).unwrap_or(0)])
                .cloned()
                .collect();
            let live: BTreeSet<String> = kept.iter().map(|c| c.vip.clone()).collect();
            let after = resolve_in(&pool, &live, &kept, &BTreeSet::new());
            for (vip, v) in &after.allocation.assigned {
                prop_assert_eq!(Some(v), r.allocation.assigned.get(vip), "{} moved", vip);
            }
        }
    }
}
