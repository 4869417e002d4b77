//! The IPVS dataplane, as dcos-net's Minuteman did it: every VIP address on
//! a `minuteman` dummy link, an IPVS service per VIP (wlc, masquerading) with
//! the backends as destinations; unhealthy backends stay with weight 0 (no
//! new connections, established ones kept). Only services on addresses of
//! the `minuteman` link (or wanted now) are ours: other IPVS services on the
//! host are left alone. Runs on the realizer driver (`realize.rs`); the
//! kernel is behind [`IpvsKernel`] so the planner is tested on a fake.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context;
use skein_ipvs::{Destination, Ipvs, Op, Protocol, Service, ServiceKey, Table};

use crate::realize::Dataplane;
use crate::view::View;

pub(crate) const LINK: &str = "minuteman";
/// `table inet skein_conntrack`: only there so that conntrack runs.
const CONNTRACK_TABLE: &str = "skein_conntrack";

/// What the IPVS realizer reads and writes.
pub(crate) trait IpvsKernel: Send + 'static {
    /// Addresses on the VIP link (creating the link if needed).
    fn link_addresses(&mut self) -> anyhow::Result<BTreeSet<Ipv4Addr>>;
    fn add_address(&mut self, addr: Ipv4Addr) -> anyhow::Result<()>;
    fn del_address(&mut self, addr: Ipv4Addr) -> anyhow::Result<()>;
    /// Every IPVS service of the host with its destinations.
    fn table(&mut self) -> anyhow::Result<Table>;
    fn apply(&mut self, op: &Op) -> anyhow::Result<()>;
}

/// The host's IPVS over generic netlink and the link through `ip`.
pub(crate) struct HostIpvs {
    /// Opened on first use and again after an error (the socket may be
    /// what broke).
    ipvs: Option<Ipvs>,
    /// Turn connection tracking on for the VIP counts (`--vip-counts`).
    track: bool,
}

/// Removes `table inet skein_conntrack` if an earlier run made it (the
/// dataplane or `--vip-counts` changed since): connection tracking is then
/// no longer kept on for our sake. No table is no error.
pub(crate) fn untrack_connections() {
    let removed =
        skein_nftables::Nftables::open().and_then(|mut n| n.untrack_connections(CONNTRACK_TABLE));
    if let Err(e) = removed {
        tracing::warn!(error = %e, "cannot remove table inet {CONNTRACK_TABLE}");
    }
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    crate::command::run("ip", args, None, crate::command::COMMAND_TIMEOUT)
}

impl HostIpvs {
    pub(crate) fn new(track: bool) -> HostIpvs {
        HostIpvs { ipvs: None, track }
    }

    fn ipvs(&mut self) -> anyhow::Result<&mut Ipvs> {
        if self.ipvs.is_none() {
            self.ipvs = Some(Ipvs::open().context("IPVS unavailable")?);
            // IPVS's connections in conntrack too (as kube-proxy sets it):
            // their events carry the backend, and the VIP counts come from
            // them. The file exists once IPVS is loaded, as it now is. The
            // kernel tracks connections only while something needs it (no
            // NAT rule may exist here): a `ct` rule that never runs does.
            if !self.track {
                return self.ipvs.as_mut().context("IPVS unavailable");
            }
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/vs/conntrack", "1") {
                tracing::warn!(error = %e, "cannot set net.ipv4.vs.conntrack: VIP connections are not counted");
            }
            if let Err(e) = skein_nftables::Nftables::open()
                .and_then(|mut n| n.track_connections(CONNTRACK_TABLE))
            {
                tracing::warn!(error = %e, "cannot turn connection tracking on: VIP connections may not be counted");
            }
        }
        self.ipvs.as_mut().context("IPVS unavailable")
    }

    fn guard<T>(&mut self, r: Result<T, skein_ipvs::Error>) -> anyhow::Result<T> {
        if r.is_err() {
            self.ipvs = None;
        }
        Ok(r?)
    }
}

impl IpvsKernel for HostIpvs {
    fn link_addresses(&mut self) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
        if ip(&["link", "show", LINK]).is_err() {
            ip(&["link", "add", LINK, "type", "dummy"])?;
            tracing::info!(link = LINK, "created the VIP link");
        }
        ip(&["link", "set", LINK, "up"])?;
        let text = ip(&["-o", "-4", "addr", "show", "dev", LINK])?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
            .collect())
    }

    fn add_address(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip(&["addr", "add", &format!("{addr}/32"), "dev", LINK]).map(|_| ())
    }

    fn del_address(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip(&["addr", "del", &format!("{addr}/32"), "dev", LINK]).map(|_| ())
    }

    fn table(&mut self) -> anyhow::Result<Table> {
        let r = self.ipvs()?.table();
        self.guard(r)
    }

    fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
        let r = self.ipvs()?.apply(op);
        self.guard(r)
    }
}

/// What of IPVS is ours: the link's addresses and the services on them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IpvsState {
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Destinations sorted by (address, port).
    pub services: BTreeMap<ServiceKey, (Service, Vec<Destination>)>,
}

impl IpvsState {
    fn table(&self) -> Table {
        self.services.values().cloned().collect()
    }
}

/// The changes between two [`IpvsState`]s, in the order they are made.
#[derive(Debug, Default)]
pub(crate) struct IpvsPlan {
    pub add_addresses: Vec<Ipv4Addr>,
    pub ops: Vec<Op>,
    /// After the services on them are gone.
    pub del_addresses: Vec<Ipv4Addr>,
}

pub(crate) struct IpvsDataplane<K: IpvsKernel> {
    kernel: K,
    /// Addresses of the last desired state: services on them are ours even
    /// before the address is on the link.
    wanted: BTreeSet<Ipv4Addr>,
}

impl<K: IpvsKernel> IpvsDataplane<K> {
    pub(crate) fn new(kernel: K) -> Self {
        IpvsDataplane {
            kernel,
            wanted: BTreeSet::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn kernel(&self) -> &K {
        &self.kernel
    }

    #[cfg(test)]
    pub(crate) fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }
}

/// The desired IPVS state for a view's VIPs.
pub(crate) fn desired(view: &View) -> IpvsState {
    let mut state = IpvsState::default();
    for v in &view.vips {
        let Some(IpAddr::V4(addr)) = v.address else {
            continue;
        };
        let protocol = match v.protocol {
            skein_state::Protocol::Tcp => Protocol::Tcp,
            skein_state::Protocol::Udp => Protocol::Udp,
        };
        let mut dests: Vec<Destination> = v
            .backend
            .iter()
            // Down nodes' backends go; unhealthy ones drain at weight 0.
            .filter(|b| b.in_use || (b.node_status != skein_state::NodeStatus::Down && !b.healthy))
            .map(|b| Destination {
                addr: b.ip,
                port: b.port,
                weight: u32::from(b.in_use),
            })
            .collect();
        dests.sort_by_key(|d| (d.addr, d.port));
        dests.dedup_by_key(|d| (d.addr, d.port));
        let service = Service::new(IpAddr::V4(addr), v.port, protocol);
        state.addresses.insert(addr);
        state.services.insert(service.key(), (service, dests));
    }
    state
}

/// The plan from `from` to `to` (pure).
pub(crate) fn plan(from: Option<&IpvsState>, to: &IpvsState) -> Option<IpvsPlan> {
    let empty = IpvsState::default();
    let from = from.unwrap_or(&empty);
    let plan = IpvsPlan {
        add_addresses: to.addresses.difference(&from.addresses).copied().collect(),
        ops: skein_ipvs::diff(&to.table(), &from.table()),
        del_addresses: from.addresses.difference(&to.addresses).copied().collect(),
    };
    let empty =
        plan.add_addresses.is_empty() && plan.ops.is_empty() && plan.del_addresses.is_empty();
    (!empty).then_some(plan)
}

impl<K: IpvsKernel> Dataplane for IpvsDataplane<K> {
    type State = IpvsState;
    type Plan = IpvsPlan;

    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn desired(&mut self, view: &View) -> IpvsState {
        let state = desired(view);
        self.wanted = state.addresses.clone();
        state
    }

    fn observe(&mut self) -> anyhow::Result<Option<IpvsState>> {
        let addresses = self.kernel.link_addresses()?;
        let ours: BTreeSet<IpAddr> = addresses
            .union(&self.wanted)
            .map(|a| IpAddr::V4(*a))
            .collect();
        let mut services = BTreeMap::new();
        for (service, mut dests) in self.kernel.table()? {
            if ours.contains(&service.addr) {
                dests.sort_by_key(|d| (d.addr, d.port));
                services.insert(service.key(), (service, dests));
            }
        }
        Ok(Some(IpvsState {
            addresses,
            services,
        }))
    }

    fn plan(&self, from: Option<&IpvsState>, to: &IpvsState) -> Option<IpvsPlan> {
        plan(from, to)
    }

    fn apply(&mut self, plan: &IpvsPlan) -> anyhow::Result<usize> {
        for a in &plan.add_addresses {
            self.kernel.add_address(*a)?;
        }
        for op in &plan.ops {
            self.kernel.apply(op)?;
        }
        for a in &plan.del_addresses {
            self.kernel.del_address(*a)?;
        }
        Ok(plan.add_addresses.len() + plan.ops.len() + plan.del_addresses.len())
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! IPVS and the VIP link in memory, with a foreign service of the host.

    use super::*;
    use anyhow::bail;

    /// A service's destinations by (address, port).
    pub(crate) type Dests = BTreeMap<(IpAddr, u16), Destination>;

    #[derive(Debug, Default)]
    pub(crate) struct FakeIpvs {
        pub addresses: BTreeSet<Ipv4Addr>,
        pub table: BTreeMap<ServiceKey, (Service, Dests)>,
        pub fail_ops: usize,
        pub writes: usize,
    }

    impl IpvsKernel for FakeIpvs {
        fn link_addresses(&mut self) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
            Ok(self.addresses.clone())
        }

        fn add_address(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
            self.writes += 1;
            if !self.addresses.insert(addr) {
                bail!("RTNETLINK answers: File exists");
            }
            Ok(())
        }

        fn del_address(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
            self.writes += 1;
            if !self.addresses.remove(&addr) {
                bail!("RTNETLINK answers: Cannot assign requested address");
            }
            Ok(())
        }

        fn table(&mut self) -> anyhow::Result<Table> {
            Ok(self
                .table
                .values()
                .map(|(s, d)| (s.clone(), d.values().cloned().collect()))
                .collect())
        }

        fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
            self.writes += 1;
            if self.fail_ops > 0 {
                self.fail_ops -= 1;
                bail!("injected netlink failure");
            }
            let service_of = |s: &Service| s.key();
            match op {
                Op::AddService(s) => {
                    if self.table.contains_key(&s.key()) {
                        bail!("service exists");
                    }
                    self.table.insert(s.key(), (s.clone(), BTreeMap::new()));
                }
                Op::UpdateService(s) => {
                    let e = self.table.get_mut(&s.key()).context("no such service")?;
                    e.0 = s.clone();
                }
                Op::DelService(s) => {
                    self.table.remove(&s.key()).context("no such service")?;
                }
                Op::AddDestination(s, d) => {
                    let e = self
                        .table
                        .get_mut(&service_of(s))
                        .context("no such service")?;
                    if e.1.insert((d.addr, d.port), d.clone()).is_some() {
                        bail!("destination exists");
                    }
                }
                Op::UpdateDestination(s, d) => {
                    let e = self
                        .table
                        .get_mut(&service_of(s))
                        .context("no such service")?;
                    e.1.get_mut(&(d.addr, d.port))
                        .context("no such destination")?
                        .weight = d.weight;
                }
                Op::DelDestination(s, d) => {
                    let e = self
                        .table
                        .get_mut(&service_of(s))
                        .context("no such service")?;
                    e.1.remove(&(d.addr, d.port))
                        .context("no such destination")?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::fake::FakeIpvs;
    use super::*;
    use crate::realize::{Driver, Wake};
    use crate::view::test_support::view_with_tasks;

    fn driver() -> Driver<IpvsDataplane<FakeIpvs>> {
        let mut kernel = FakeIpvs::default();
        // Somebody else's service on the host: never touched.
        let foreign = Service::new("192.0.2.1".parse().unwrap(), 80, Protocol::Tcp);
        kernel
            .table
            .insert(foreign.key(), (foreign, BTreeMap::new()));
        Driver::new(IpvsDataplane::new(kernel), Arc::default())
    }

    fn web(backends: &[(&str, bool)]) -> View {
        view_with_tasks(
            backends
                .iter()
                .enumerate()
                .map(|(i, (ip, healthy))| (format!("t{i}"), *ip, "/web:80", *healthy))
                .collect(),
        )
    }

    /// (VIP, port, [(destination, weight)]).
    type Programmed = (Ipv4Addr, u16, Vec<(String, u32)>);

    fn services(d: &Driver<IpvsDataplane<FakeIpvs>>) -> Vec<Programmed> {
        d.dataplane()
            .kernel()
            .table
            .values()
            .filter_map(|(s, dests)| match s.addr {
                IpAddr::V4(a) if a.octets()[0] == 11 => Some((
                    a,
                    s.port,
                    dests
                        .values()
                        .map(|d| (d.addr.to_string(), d.weight))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn programs_vips_and_keeps_unhealthy_backends_draining() {
        let mut d = driver();
        let view = web(&[("10.0.0.1", true), ("10.0.0.2", false)]);
        assert!(d.step(&view, Wake::View).unwrap() > 0);
        let s = services(&d);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(
            s[0].2,
            [("10.0.0.1".to_string(), 1), ("10.0.0.2".to_string(), 0)]
        );
        let addr = s[0].0;
        assert!(d.dataplane().kernel().addresses.contains(&addr));
        assert_eq!(
            d.dataplane().kernel().table.len(),
            2,
            "the foreign service stays"
        );
    }

    #[test]
    fn warm_start_changes_nothing() {
        let view = web(&[("10.0.0.1", true)]);
        let mut first = driver();
        first.step(&view, Wake::View).unwrap();
        // A restarted agent finds the kernel as the previous one left it.
        let FakeIpvs {
            addresses, table, ..
        } = std::mem::take(first.dataplane_mut().kernel_mut());
        let mut restarted = Driver::new(
            IpvsDataplane::new(FakeIpvs {
                addresses,
                table,
                ..Default::default()
            }),
            Arc::default(),
        );
        assert_eq!(restarted.step(&view, Wake::View).unwrap(), 0);
        assert_eq!(restarted.dataplane().kernel().writes, 0);
    }

    #[test]
    fn drift_is_repaired_on_resync() {
        let view = web(&[("10.0.0.1", true), ("10.0.0.2", true)]);
        let mut d = driver();
        d.step(&view, Wake::View).unwrap();
        let k = d.dataplane_mut().kernel_mut();
        let key = *k
            .table
            .keys()
            .find(|k| k.port == 80 && k.addr.to_string().starts_with("11."))
            .unwrap();
        k.table.get_mut(&key).unwrap().1.clear(); // `ipvsadm -d` by hand
        let addr = *k.addresses.iter().next().unwrap();
        k.addresses.remove(&addr);
        assert_eq!(
            d.step(&view, Wake::Resync).unwrap(),
            3,
            "address + 2 destinations"
        );
        assert_eq!(d.counters().drift_repaired.load(Ordering::Relaxed), 1);
        assert_eq!(services(&d)[0].2.len(), 2);
    }

    #[test]
    fn a_failed_apply_is_counted_and_retried() {
        let mut d = driver();
        d.dataplane_mut().kernel_mut().fail_ops = 1;
        let view = web(&[("10.0.0.1", true)]);
        assert!(d.step(&view, Wake::View).is_err());
        assert_eq!(d.counters().errors.load(Ordering::Relaxed), 1);
        // The address made it before the failure: the retry reads the
        // kernel and does only the rest.
        assert_eq!(
            d.step(&view, Wake::Retry).unwrap(),
            2,
            "service + destination"
        );
        assert_eq!(services(&d).len(), 1);
    }

    #[test]
    fn removed_vips_go_with_their_address() {
        let mut d = driver();
        d.step(&web(&[("10.0.0.1", true)]), Wake::View).unwrap();
        d.step(&web(&[]), Wake::View).unwrap();
        assert!(services(&d).is_empty());
        assert!(d.dataplane().kernel().addresses.is_empty());
        assert_eq!(
            d.dataplane().kernel().table.len(),
            1,
            "the foreign service stays"
        );
    }
}
