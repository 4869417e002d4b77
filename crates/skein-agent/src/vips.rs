//! This node's part in named-VIP address allocation: publish a claim for
//! every named VIP it hosts a backend of (adopting the cluster's winner, or
//! proposing an address), withdraw claims for VIPs it no longer hosts, and
//! report each VIP's address once it has been stable for a settle period.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use skein_l4lb::alloc::{self, Allocation, Claim, ClaimValue};
use skein_l4lb::{VipKey, VipTarget};
use skein_state::Replica;

/// Prefix of claim keys in a node's keyspace: `vipip:<name>.<framework>`.
pub const CLAIM_PREFIX: &str = "vipip:";

/// An address is handed to users (DNS, rules) only after it has been the
/// winner, unchanged, for this long: longer than propagation takes, so that
/// concurrent claims from other nodes have arrived and been resolved.
pub const SETTLE: Duration = Duration::from_secs(2);

/// `name.framework`: one address per named VIP, shared by all its ports.
pub fn vip_id(key: &VipKey) -> Option<String> {
    match &key.target {
        VipTarget::Named { name, framework } => Some(format!("{name}.{framework}")),
        VipTarget::Ip { .. } => None,
    }
}

/// Every claim published in the replica (down nodes' too: their claims keep
/// the order of VIPs stable until the node is forgotten).
pub fn claims_in(replica: &Replica) -> Vec<Claim> {
    let mut out = Vec::new();
    for (node, keyspace) in replica.nodes() {
        for (key, value) in keyspace.live() {
            let Some(vip) = key.strip_prefix(CLAIM_PREFIX) else {
                continue;
            };
            match serde_json::from_str::<ClaimValue>(value) {
                Ok(value) => out.push(Claim {
                    vip: vip.to_string(),
                    node: node.clone(),
                    value,
                }),
                Err(e) => tracing::debug!(%node, key, error = %e, "ignoring undecodable VIP claim"),
            }
        }
    }
    out
}

/// IPv4 IP VIPs inside 11.0.0.0/8: taken as given, so never allocated.
pub fn reserved<'a>(keys: impl Iterator<Item = &'a VipKey>) -> BTreeSet<Ipv4Addr> {
    keys.filter_map(|k| match k.target {
        VipTarget::Ip { ip: IpAddr::V4(ip) } if alloc::in_vip_net(ip) => Some(ip),
        _ => None,
    })
    .collect()
}

/// Tracks how long each VIP's winning address has been unchanged here.
/// An address this process sees for the first time whose claim is already
/// older than `SETTLE` (a restarted agent reading its persisted replica) is
/// settled at once: it was settled cluster-wide before, and answering
/// NXDOMAIN for it during a restart would fail clients that hit this node.
#[derive(Default)]
pub struct Settling {
    seen: HashMap<String, (Ipv4Addr, Instant, bool)>,
}

impl Settling {
    /// Updates with the latest allocation; returns VIP → (address, settled).
    pub fn observe(
        &mut self,
        allocation: &Allocation,
        now: Instant,
        now_unix_ms: u64,
    ) -> BTreeMap<String, (Ipv4Addr, bool)> {
        self.seen
            .retain(|vip, _| allocation.assigned.contains_key(vip));
        let old = |since: u64| now_unix_ms.saturating_sub(since) >= SETTLE.as_millis() as u64;
        allocation
            .assigned
            .iter()
            .map(|(vip, value)| {
                let entry =
                    self.seen
                        .entry(vip.clone())
                        .or_insert((value.ip, now, old(value.since)));
                if entry.0 != value.ip {
                    *entry = (value.ip, now, false);
                }
                let settled = entry.2 || now.duration_since(entry.1) >= SETTLE;
                (vip.clone(), (value.ip, settled))
            })
            .collect()
    }
}

/// What [`Allocator::reconcile`] decided.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Claims this node should publish (new or changed), VIP → value.
    pub publish: BTreeMap<String, ClaimValue>,
    /// Claims of this node to withdraw.
    pub withdraw: Vec<String>,
    /// VIP → (address, whether it may be handed to users yet).
    pub addresses: BTreeMap<String, (Ipv4Addr, bool)>,
}

/// This node's side of named-VIP allocation, as a pure step per refresh.
#[derive(Default)]
pub struct Allocator {
    settling: Settling,
}

impl Allocator {
    /// From the replica: the claims this node should publish or withdraw
    /// for the VIPs it hosts, and the cluster's addresses as of `now`.
    pub fn reconcile(
        &mut self,
        me: &str,
        replica: &Replica,
        liveness: &BTreeMap<String, skein_state::Liveness>,
        now: Instant,
        now_unix_ms: u64,
    ) -> Reconciled {
        let (tasks, _) = skein_state::tasks(replica, liveness);
        let (vip_map, _) = skein_l4lb::vips_of(&tasks);
        let hosted: BTreeSet<String> = vip_map
            .iter()
            .filter(|(_, backends)| backends.iter().any(|b| b.node_id == me))
            .filter_map(|(key, _)| vip_id(key))
            .collect();
        let claims = claims_in(replica);
        // IP VIPs already on a named VIP's address do not displace it.
        let settled_named = alloc::allocate(&claims, &Default::default());
        let named_ips: BTreeSet<_> = settled_named.assigned.values().map(|v| v.ip).collect();
        let reserved: BTreeSet<_> = reserved(vip_map.keys())
            .into_iter()
            .filter(|ip| !named_ips.contains(ip))
            .collect();
        let desired = alloc::desired_claims(&hosted, &claims, &reserved, now_unix_ms);
        let published: BTreeMap<String, ClaimValue> = claims
            .iter()
            .filter(|c| c.node == me)
            .map(|c| (c.vip.clone(), c.value.clone()))
            .collect();
        let publish = desired
            .iter()
            .filter(|(vip, value)| published.get(*vip) != Some(value))
            .map(|(vip, value)| (vip.clone(), value.clone()))
            .collect();
        let withdraw = published
            .keys()
            .filter(|v| !desired.contains_key(*v))
            .cloned()
            .collect();
        let allocation = alloc::allocate(&claims, &reserved);
        let addresses = self.settling.observe(&allocation, now, now_unix_ms);
        Reconciled {
            publish,
            withdraw,
            addresses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocation(ip: Ipv4Addr, since: u64) -> Allocation {
        let mut a = Allocation::default();
        a.assigned
            .insert("web.marathon".into(), ClaimValue { ip, since });
        a
    }

    #[test]
    fn new_claims_settle_after_a_while_and_old_ones_at_once() {
        let t0 = Instant::now();
        let ip = Ipv4Addr::new(11, 0, 0, 1);
        let mut fresh = Settling::default();
        let got = fresh.observe(&allocation(ip, 10_000), t0, 10_500);
        assert_eq!(
            got["web.marathon"],
            (ip, false),
            "a claim made 0.5 s ago waits"
        );
        let got = fresh.observe(&allocation(ip, 10_000), t0 + SETTLE, 12_500);
        assert_eq!(got["web.marathon"], (ip, true));
        let mut restarted = Settling::default();
        let got = restarted.observe(&allocation(ip, 10_000), t0, 60_000);
        assert_eq!(
            got["web.marathon"],
            (ip, true),
            "an old claim is settled at once"
        );
        // A different winner always waits, however old its claim.
        let other = Ipv4Addr::new(11, 0, 0, 2);
        let got = restarted.observe(&allocation(other, 1_000), t0, 60_000);
        assert_eq!(got["web.marathon"], (other, false));
    }
}
