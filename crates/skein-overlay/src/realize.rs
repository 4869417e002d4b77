//! What a node's kernel should hold for the overlay, and the smallest set of
//! changes from what it holds. Flannel's static VXLAN scheme: for every
//! remote agent a permanent neighbour (its VTEP IP → its VTEP MAC) and an FDB
//! entry (that MAC → its underlay IP) on `vtep1024`, and a route to each of
//! its agent subnets via its VTEP IP, onlink. No learning, no multicast:
//! everything a packet needs is programmed before it is sent.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

#[cfg(doc)]
use crate::vtep_mac;

pub type Mac = [u8; 6];

/// A remote agent as the overlay sees it, from the settled leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAgent {
    pub underlay: Ipv4Addr,
    pub vtep_ip: Ipv4Addr,
    /// The cluster's OUI + the VTEP IP's low 24 bits ([`vtep_mac`] for
    /// DC/OS's default OUI).
    pub vtep_mac: Mac,
    /// Its agent subnets, one per overlay.
    pub subnets: Vec<(Ipv4Addr, u8)>,
}

/// The entries of ours on the VXLAN device, keyed as the kernel keys them:
/// a neighbour by IP, an FDB entry by MAC, a route by destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    pub routes: BTreeMap<(Ipv4Addr, u8), Ipv4Addr>,
}

impl Entries {
    /// What the device should hold for these remote agents.
    pub fn desired(remotes: &[RemoteAgent]) -> Entries {
        let mut out = Entries::default();
        for r in remotes {
            let mac = r.vtep_mac;
            out.neighbours.insert(r.vtep_ip, mac);
            out.fdb.insert(mac, r.underlay);
            for subnet in &r.subnets {
                out.routes.insert(*subnet, r.vtep_ip);
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.neighbours.len() + self.fdb.len() + self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies changes, as the kernel would: the model the property tests
    /// check `plan` against.
    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match *c {
                Change::SetNeighbour(ip, mac) => {
                    self.neighbours.insert(ip, mac);
                }
                Change::DelNeighbour(ip, _) => {
                    self.neighbours.remove(&ip);
                }
                Change::SetFdb(mac, dst) => {
                    self.fdb.insert(mac, dst);
                }
                Change::DelFdb(mac, _) => {
                    self.fdb.remove(&mac);
                }
                Change::SetRoute(dst, via) => {
                    self.routes.insert(dst, via);
                }
                Change::DelRoute(dst, _) => {
                    self.routes.remove(&dst);
                }
            }
        }
    }
}

/// One kernel change. `Set*` replaces an entry with the same key (one
/// netlink request with NLM_F_REPLACE, no gap); `Del*` carries the value
/// the kernel has, which some deletions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    SetNeighbour(Ipv4Addr, Mac),
    DelNeighbour(Ipv4Addr, Mac),
    SetFdb(Mac, Ipv4Addr),
    DelFdb(Mac, Ipv4Addr),
    SetRoute((Ipv4Addr, u8), Ipv4Addr),
    DelRoute((Ipv4Addr, u8), Ipv4Addr),
}

/// The changes that turn `current` into `desired`: new and changed entries
/// are set (neighbours and FDB before the routes that use them), stale ones
/// deleted after (routes first). Empty when they agree.
pub fn plan(current: &Entries, desired: &Entries) -> Vec<Change> {
    let mut out = Vec::new();
    for (ip, mac) in &desired.neighbours {
        if current.neighbours.get(ip) != Some(mac) {
            out.push(Change::SetNeighbour(*ip, *mac));
        }
    }
    for (mac, dst) in &desired.fdb {
        if current.fdb.get(mac) != Some(dst) {
            out.push(Change::SetFdb(*mac, *dst));
        }
    }
    for (net, via) in &desired.routes {
        if current.routes.get(net) != Some(via) {
            out.push(Change::SetRoute(*net, *via));
        }
    }
    for (net, via) in &current.routes {
        if !desired.routes.contains_key(net) {
            out.push(Change::DelRoute(*net, *via));
        }
    }
    for (mac, dst) in &current.fdb {
        if !desired.fdb.contains_key(mac) {
            out.push(Change::DelFdb(*mac, *dst));
        }
    }
    for (ip, mac) in &current.neighbours {
        if !desired.neighbours.contains_key(ip) {
            out.push(Change::DelNeighbour(*ip, *mac));
        }
    }
    out
}

/// The two halves of an agent subnet: the Mesos bridge (`m-<overlay>`) gets
/// the first, the Docker bridge (`d-<overlay>`) the second, each with its
/// first address as the gateway (DC/OS's layout).
pub fn bridge_halves(subnet: Ipv4Addr, prefix: u8) -> [(Ipv4Addr, u8, Ipv4Addr); 2] {
    let base = u32::from(subnet);
    let half = 1u32 << (32 - u32::from(prefix) - 1);
    let p = prefix + 1;
    [
        (Ipv4Addr::from(base), p, Ipv4Addr::from(base + 1)),
        (
            Ipv4Addr::from(base + half),
            p,
            Ipv4Addr::from(base + half + 1),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn agent(i: u8, subnets: u8) -> RemoteAgent {
        RemoteAgent {
            underlay: Ipv4Addr::new(10, 0, 0, i),
            vtep_ip: Ipv4Addr::new(44, 128, 0, i),
            vtep_mac: crate::vtep_mac(Ipv4Addr::new(44, 128, 0, i)),
            subnets: (0..subnets)
                .map(|s| (Ipv4Addr::new(9, s, i, 0), 24))
                .collect(),
        }
    }

    #[test]
    fn desired_entries_are_flannels() {
        let e = Entries::desired(&[agent(3, 1)]);
        let mac = [0x70, 0xb3, 0xd5, 0x80, 0x00, 0x03];
        assert_eq!(e.neighbours.get(&Ipv4Addr::new(44, 128, 0, 3)), Some(&mac));
        assert_eq!(e.fdb.get(&mac), Some(&Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(
            e.routes.get(&(Ipv4Addr::new(9, 0, 3, 0), 24)),
            Some(&Ipv4Addr::new(44, 128, 0, 3))
        );
    }

    #[test]
    fn halves_follow_dcos() {
        let [m, d] = bridge_halves(Ipv4Addr::new(9, 0, 1, 0), 24);
        assert_eq!(
            m,
            (Ipv4Addr::new(9, 0, 1, 0), 25, Ipv4Addr::new(9, 0, 1, 1))
        );
        assert_eq!(
            d,
            (Ipv4Addr::new(9, 0, 1, 128), 25, Ipv4Addr::new(9, 0, 1, 129))
        );
    }

    #[test]
    fn one_peer_changing_among_many_is_one_peers_changes() {
        let many: Vec<RemoteAgent> = (1..=200).map(|i| agent(i, 1)).collect();
        let before = Entries::desired(&many);
        let mut moved = many.clone();
        moved[7].underlay = Ipv4Addr::new(10, 1, 1, 1);
        let changes = plan(&before, &Entries::desired(&moved));
        assert_eq!(changes.len(), 1, "{changes:?}");
        let gone = plan(&before, &Entries::desired(&many[1..]));
        assert_eq!(gone.len(), 3, "route, FDB and neighbour: {gone:?}");
    }

    fn entries() -> impl Strategy<Value = Entries> {
        let agents = prop::collection::vec((1u8..40, 1u8..40, 0u8..3), 0..30);
        agents.prop_map(|v| {
            let remotes: Vec<RemoteAgent> = v
                .into_iter()
                .map(|(u, t, n)| RemoteAgent {
                    underlay: Ipv4Addr::new(10, 0, 0, u),
                    vtep_ip: Ipv4Addr::new(44, 128, 0, t),
                    vtep_mac: crate::vtep_mac(Ipv4Addr::new(44, 128, 0, t)),
                    subnets: (0..n).map(|s| (Ipv4Addr::new(9, s, t, 0), 24)).collect(),
                })
                .collect();
            Entries::desired(&remotes)
        })
    }

    proptest! {
        #[test]
        fn plan_reaches_desired_and_then_is_empty(current in entries(), desired in entries()) {
            let changes = plan(&current, &desired);
            let mut kernel = current.clone();
            kernel.apply(&changes);
            prop_assert_eq!(&kernel, &desired);
            prop_assert!(plan(&kernel, &desired).is_empty());
            // Never more changes than entries involved.
            prop_assert!(changes.len() <= current.len() + desired.len());
        }

        #[test]
        fn sets_come_before_deletes_and_routes_after_their_neighbours(
            current in entries(), desired in entries()
        ) {
            let changes = plan(&current, &desired);
            let first_delete = changes.iter().position(|c| matches!(c,
                Change::DelRoute(..) | Change::DelFdb(..) | Change::DelNeighbour(..)));
            if let Some(i) = first_delete {
                prop_assert!(changes[i..].iter().all(|c| matches!(c,
                    Change::DelRoute(..) | Change::DelFdb(..) | Change::DelNeighbour(..))));
            }
            for (i, c) in changes.iter().enumerate() {
                if let Change::SetRoute(_, via) = c {
                    prop_assert!(!changes[i..].iter().any(|d| matches!(d,
                        Change::SetNeighbour(ip, _) if ip == via)));
                }
            }
        }
    }
}
