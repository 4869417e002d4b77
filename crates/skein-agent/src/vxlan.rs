//! Realizes the overlay in this node's kernel with rtnetlink: the VXLAN
//! device `vtep1024`, the bridges `m-<overlay>` / `d-<overlay>` holding the
//! halves of this node's agent subnet, forwarding and masquerade, and for
//! every remote agent the static neighbour / FDB / route entries
//! (`skein_overlay::realize`). Entries are compared with what the kernel
//! holds, so a restart or a hand edit converges to the same state.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use skein_overlay::realize::{bridge_halves, plan, Change, Entries, Mac, RemoteAgent};

use crate::overlay::NodeLeases;
use crate::Agent;

/// Our routes carry this protocol number (`ip route show proto 83`), so we
/// only ever list, change or delete our own.
pub const ROUTE_PROTOCOL: u8 = 83;
pub const VNI: u32 = 1024;
pub const VXLAN_PORT: u16 = 64000;
pub const VTEP_NAME: &str = "vtep1024";

/// The local half of the overlay: device and bridges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOverlay {
    pub underlay: Ipv4Addr,
    pub vtep_ip: Ipv4Addr,
    pub vtep_prefix: u8,
    pub vtep_mac: Mac,
    pub vtep_mtu: u32,
    /// (bridge name, gateway address, prefix) for every bridge.
    pub bridges: Vec<(String, Ipv4Addr, u8)>,
}

pub struct Netlink {
    handle: Handle,
}

fn vxlan_info(m: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
            _ => None,
        }),
        _ => None,
    })
}

fn mac_of(m: &LinkMessage) -> Option<&[u8]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

fn mtu_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

impl Netlink {
    pub fn new() -> anyhow::Result<Netlink> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    async fn link(&self, name: &str) -> anyhow::Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read link {name}")),
        }
    }

    /// Makes `vtep1024` exactly what it should be; returns its index.
    pub async fn ensure_vtep(&self, local: &LocalOverlay) -> anyhow::Result<u32> {
        if let Some(link) = self.link(VTEP_NAME).await? {
            let info = vxlan_info(&link);
            let matches = info.is_some_and(|info| {
                info.contains(&InfoVxlan::Id(VNI))
                    && info.contains(&InfoVxlan::Local(local.underlay))
                    && info.contains(&InfoVxlan::Port(VXLAN_PORT))
                    && info.contains(&InfoVxlan::Learning(false))
            });
            if matches {
                let index = link.header.index;
                let up = link.header.flags.contains(LinkFlags::Up);
                if mac_of(&link) != Some(&local.vtep_mac[..])
                    || mtu_of(&link) != Some(local.vtep_mtu)
                    || !up
                {
                    self.handle
                        .link()
                        .set(
                            LinkUnspec::new_with_index(index)
                                .address(local.vtep_mac.to_vec())
                                .mtu(local.vtep_mtu)
                                .up()
                                .build(),
                        )
                        .execute()
                        .await
                        .context("cannot set vtep1024's MAC, MTU or state")?;
                }
                self.ensure_only_address(index, local.vtep_ip, local.vtep_prefix)
                    .await?;
                return Ok(index);
            }
            tracing::warn!("{VTEP_NAME} exists with other VXLAN parameters; recreating it");
            self.handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .context("cannot delete the stale vtep1024")?;
        }
        self.handle
            .link()
            .add(
                LinkVxlan::new(VTEP_NAME, VNI)
                    .local(local.underlay)
                    .port(VXLAN_PORT)
                    .learning(false)
                    .mtu(local.vtep_mtu)
                    .address(local.vtep_mac.to_vec())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .context("cannot create vtep1024 (does the kernel have VXLAN?)")?;
        let index = self
            .link(VTEP_NAME)
            .await?
            .map(|l| l.header.index)
            .context("vtep1024 vanished after creation")?;
        self.ensure_only_address(index, local.vtep_ip, local.vtep_prefix)
            .await?;
        Ok(index)
    }

    /// Makes `name` a bridge that is up with exactly `gateway/prefix`.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> anyhow::Result<()> {
        let link = match self.link(name).await? {
            Some(l) => l,
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).up().build())
                    .execute()
                    .await
                    .with_context(|| format!("cannot create bridge {name}"))?;
                self.link(name)
                    .await?
                    .with_context(|| format!("bridge {name} vanished after creation"))?
            }
        };
        if !link.header.flags.contains(LinkFlags::Up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(link.header.index).up().build())
                .execute()
                .await
                .with_context(|| format!("cannot bring {name} up"))?;
        }
        self.ensure_only_address(link.header.index, gateway, prefix)
            .await
    }

    async fn ensure_only_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> anyhow::Result<()> {
        let mut have = false;
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut stale = Vec::new();
        while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            });
            if addr == Some(ip) && msg.header.prefix_len == prefix {
                have = true;
            } else {
                stale.push(msg);
            }
        }
        for msg in stale {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .context("cannot remove a stale address")?;
        }
        if !have {
            self.handle
                .address()
                .add(index, IpAddr::V4(ip), prefix)
                .execute()
                .await
                .with_context(|| format!("cannot add {ip}/{prefix}"))?;
        }
        Ok(())
    }

    /// Our entries on the device as the kernel holds them.
    pub async fn entries(&self, index: u32) -> anyhow::Result<Entries> {
        let mut out = Entries::default();
        let mut neigh = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(n) = neigh.try_next().await.context("cannot list neighbours")? {
            if n.header.ifindex != index || n.header.state != NeighbourState::Permanent {
                continue;
            }
            if let (Some(ip), Some(mac)) = (neigh_ip(&n), neigh_mac(&n)) {
                out.neighbours.insert(ip, mac);
            }
        }
        let mut fdb = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(n) = fdb.try_next().await.context("cannot list the FDB")? {
            if n.header.ifindex != index || !n.header.flags.contains(NeighbourFlags::Own) {
                continue;
            }
            if let (Some(ip), Some(mac)) = (neigh_ip(&n), neigh_mac(&n)) {
                // The all-zeros default destination is not ours.
                if mac != [0; 6] {
                    out.fdb.insert(mac, ip);
                }
            }
        }
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes.try_next().await.context("cannot list routes")? {
            if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let via = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            if let (Some(dst), Some(via)) = (dst, via) {
                out.routes
                    .insert((dst, r.header.destination_prefix_length), via);
            }
        }
        Ok(out)
    }

    /// Applies changes in order; the first failure stops and is returned
    /// with how many were applied.
    pub async fn apply(
        &self,
        index: u32,
        changes: &[Change],
    ) -> Result<(), (usize, anyhow::Error)> {
        for (i, c) in changes.iter().enumerate() {
            self.apply_one(index, c).await.map_err(|e| (i, e))?;
        }
        Ok(())
    }

    async fn apply_one(&self, index: u32, change: &Change) -> anyhow::Result<()> {
        let n = self.handle.neighbours();
        let route = |dst: (Ipv4Addr, u8), via: Ipv4Addr| {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.0, dst.1)
                .gateway(via)
                .output_interface(index)
                .onlink()
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .build()
        };
        match *change {
            Change::SetNeighbour(ip, mac) => n
                .add(index, IpAddr::V4(ip))
                .link_layer_address(&mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .with_context(|| format!("neighbour {ip}")),
            Change::DelNeighbour(ip, _) => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = index;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
                tolerate_missing(n.del(m).execute().await)
                    .with_context(|| format!("neighbour {ip}"))
            }
            Change::SetFdb(mac, dst) => n
                .add_bridge(index, &mac)
                .destination(IpAddr::V4(dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .with_context(|| format!("FDB entry for {dst}")),
            Change::DelFdb(mac, dst) => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = index;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
                tolerate_missing(n.del(m).execute().await)
                    .with_context(|| format!("FDB entry for {dst}"))
            }
            Change::SetRoute(dst, via) => self
                .handle
                .route()
                .add(route(dst, via))
                .replace()
                .execute()
                .await
                .with_context(|| format!("route {}/{} via {via}", dst.0, dst.1)),
            Change::DelRoute(dst, via) => {
                tolerate_missing(self.handle.route().del(route(dst, via)).execute().await)
                    .with_context(|| format!("route {}/{}", dst.0, dst.1))
            }
        }
    }
}

/// Deleting what is already gone is success: the goal is its absence.
fn tolerate_missing(r: Result<(), rtnetlink::Error>) -> anyhow::Result<()> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -libc::ENOENT || e.raw_code() == -libc::ESRCH =>
        {
            Ok(())
        }
        other => Ok(other?),
    }
}

fn neigh_ip(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // FDB entries (family AF_BRIDGE) carry their IPv4 destination as
        // raw bytes: the decoder does not know the address family.
        NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
            <[u8; 4]>::try_from(raw.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

fn neigh_mac(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
        _ => None,
    })
}

/// Routed traffic between containers and the outside: forwarding on, and
/// traffic from an overlay to anything but the overlays masqueraded (as
/// DC/OS did), in a table of our own.
pub fn overlay_nat_ruleset(overlays: &[(Ipv4Addr, u8)]) -> String {
    let nets: Vec<String> = overlays
        .iter()
        .map(|(ip, len)| format!("{ip}/{len}"))
        .collect();
    let set = nets.join(", ");
    format!(
        "table ip skein-overlay {{}}\ndelete table ip skein-overlay\n\
         table ip skein-overlay {{\n  chain postrouting {{\n    \
         type nat hook postrouting priority 100; policy accept;\n    \
         ip saddr {{ {set} }} ip daddr != {{ {set} }} masquerade\n  }}\n}}\n"
    )
}

pub fn enable_forwarding() -> anyhow::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    // A container's /proc/sys is often read-only: say how to set it there.
    std::fs::write(PATH, "1").context(
        "cannot enable IPv4 forwarding (in a container, set the sysctl \
         net.ipv4.ip_forward=1 from outside, e.g. compose `sysctls`)",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayDataplane {
    Vxlan,
    /// Lease and report, change nothing in the kernel.
    None,
}

impl OverlayDataplane {
    pub fn parse(s: &str) -> anyhow::Result<OverlayDataplane> {
        match s {
            "vxlan" => Ok(OverlayDataplane::Vxlan),
            "none" => Ok(OverlayDataplane::None),
            other => anyhow::bail!("--overlay-dataplane must be vxlan or none, not {other:?}"),
        }
    }
}

#[derive(Default)]
pub struct OverlayCounters {
    pub peers_programmed: AtomicU64,
    pub entries_programmed: AtomicU64,
    pub netlink_errors: AtomicU64,
    pub drift_repaired: AtomicU64,
    pub last_reconcile_us: AtomicU64,
    pub reconciles: AtomicU64,
}

/// Leases become usable only after they have been the winner, unchanged,
/// for `SETTLE` on this node: a claim still in flight from a partitioned
/// node could otherwise move a subnet under a running container. Leaving is
/// settled the same way: a peer whose leases vanish from the view for less
/// than `SETTLE` (its agent restarting with a new generation, whose keys
/// arrive a moment later) keeps its entries, so its containers stay
/// reachable throughout.
#[derive(Default)]
struct Settling {
    seen: BTreeMap<String, (NodeLeases, Instant)>,
    settled: BTreeMap<String, NodeLeases>,
    absent_since: BTreeMap<String, Instant>,
}

impl Settling {
    fn observe(
        &mut self,
        leases: BTreeMap<String, NodeLeases>,
        now: Instant,
    ) -> BTreeMap<String, NodeLeases> {
        let settle = crate::vips::SETTLE;
        self.seen.retain(|node, _| leases.contains_key(node));
        for (node, lease) in &leases {
            self.absent_since.remove(node);
            let entry = self
                .seen
                .entry(node.clone())
                .or_insert_with(|| (lease.clone(), now));
            if entry.0 != *lease {
                *entry = (lease.clone(), now);
            }
            if now.duration_since(entry.1) >= settle {
                self.settled.insert(node.clone(), lease.clone());
            }
        }
        let gone: Vec<String> = self
            .settled
            .keys()
            .filter(|node| !leases.contains_key(*node))
            .cloned()
            .collect();
        for node in gone {
            let since = *self.absent_since.entry(node.clone()).or_insert(now);
            if now.duration_since(since) >= settle {
                self.settled.remove(&node);
                self.absent_since.remove(&node);
            }
        }
        self.settled.clone()
    }
}

/// The CNI network configuration for one bridge (read by `skein-cni`).
fn cni_config(
    name: &str,
    bridge: &str,
    subnet: (Ipv4Addr, u8),
    gateway: Ipv4Addr,
    mtu: u32,
    ipam_dir: &Path,
) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "skein-cni",
        "bridge": bridge,
        "subnet": format!("{}/{}", subnet.0, subnet.1),
        "gateway": gateway.to_string(),
        "mtu": mtu,
        "dataDir": ipam_dir.display().to_string(),
    })
    .to_string()
}

fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The local part: device, bridges, forwarding, masquerade, CNI files.
async fn realize_local(
    nl: &Netlink,
    agent: &Agent,
    local: &LocalOverlay,
    mine: &NodeLeases,
) -> anyhow::Result<u32> {
    let index = nl.ensure_vtep(local).await?;
    for (name, gateway, prefix) in &local.bridges {
        nl.ensure_bridge(name, *gateway, *prefix).await?;
    }
    enable_forwarding()?;
    let overlays: Vec<(Ipv4Addr, u8)> = agent.overlay.overlays.iter().map(|o| o.subnet).collect();
    let ruleset = overlay_nat_ruleset(&overlays);
    tokio::task::spawn_blocking(move || crate::l4lb::nft(&["-f", "-"], Some(&ruleset)))
        .await
        .context("nft task failed")?
        .context("cannot install the overlay masquerade rules")?;
    let cni_dir = agent.config().data_dir.join("cni");
    let ipam_dir = agent.config().data_dir.join("cni-ipam");
    for (overlay, subnet, prefix) in &mine.subnets {
        let [m, d] = bridge_halves(*subnet, *prefix);
        let mtu = agent.overlay.container_mtu;
        write_if_changed(
            &cni_dir.join(format!("{overlay}.conf")),
            &cni_config(
                overlay,
                &format!("m-{overlay}"),
                (m.0, m.1),
                m.2,
                mtu,
                &ipam_dir,
            ),
        )?;
        write_if_changed(
            &cni_dir.join(format!("{overlay}-docker.conf")),
            &cni_config(
                &format!("{overlay}-docker"),
                &format!("d-{overlay}"),
                (d.0, d.1),
                d.2,
                mtu,
                &ipam_dir,
            ),
        )?;
    }
    Ok(index)
}

/// Runs until the agent is dropped: realizes the overlay after every
/// replica refresh that changed it, and compares with the kernel every
/// `resync` (a hand-deleted route or neighbour comes back then).
pub async fn run(agent: Weak<Agent>, changes: tokio::sync::watch::Receiver<u64>, resync: Duration) {
    let nl = match Netlink::new() {
        Ok(nl) => nl,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "overlay disabled");
            return;
        }
    };
    let mut settling = Settling::default();
    // Device index and the entries we know it holds.
    let mut programmed: Option<(u32, Entries)> = None;
    let mut local_done: Option<LocalOverlay> = None;
    let mut wakeups = crate::wakeups::Wakeups::new(changes, resync);
    loop {
        let Some(resyncing) = wakeups.next().await else {
            return;
        };
        let Some(agent) = agent.upgrade() else { return };
        let started = Instant::now();
        let counters = &agent.overlay_counters;
        let snap = agent.view();
        let leases = match crate::overlay::node_leases(&agent.overlay, &snap.replica) {
            Ok(l) => l,
            Err(e) => {
                agent.set_overlay_status(&format!("{e:#}")).await;
                continue;
            }
        };
        let settled = settling.observe(leases, started);
        let lease_errors = agent.lease_errors().await;
        let Some(mine) = settled.get(&agent.config().node_id).cloned() else {
            if !lease_errors.is_empty() {
                agent.set_overlay_status(&lease_errors.join("; ")).await;
            }
            continue;
        };
        let IpAddr::V4(underlay) = agent.config().advertise else {
            agent
                .set_overlay_status("the overlay needs an IPv4 --advertise address")
                .await;
            continue;
        };
        let mut bridges = Vec::new();
        for (overlay, subnet, prefix) in &mine.subnets {
            let [m, d] = bridge_halves(*subnet, *prefix);
            bridges.push((format!("m-{overlay}"), m.2, m.1));
            bridges.push((format!("d-{overlay}"), d.2, d.1));
        }
        let local = LocalOverlay {
            underlay,
            vtep_ip: mine.vtep_ip,
            vtep_prefix: agent.overlay.vtep_subnet.1,
            vtep_mac: agent.overlay.vtep_mac(mine.vtep_ip),
            vtep_mtu: agent.overlay.vtep_mtu,
            bridges,
        };
        if resyncing || local_done.as_ref() != Some(&local) {
            match realize_local(&nl, &agent, &local, &mine).await {
                Ok(index) => {
                    if programmed.as_ref().is_some_and(|(i, _)| *i != index) {
                        programmed = None;
                    }
                    local_done = Some(local.clone());
                    if programmed.is_none() {
                        match nl.entries(index).await {
                            Ok(e) => programmed = Some((index, e)),
                            Err(e) => {
                                counters.netlink_errors.fetch_add(1, Ordering::Relaxed);
                                agent.set_overlay_status(&format!("{e:#}")).await;
                                continue;
                            }
                        }
                    }
                }
                Err(e) => {
                    counters.netlink_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %format!("{e:#}"), "cannot realize the overlay");
                    agent.set_overlay_status(&format!("{e:#}")).await;
                    local_done = None;
                    continue;
                }
            }
        }
        let Some((index, known)) = programmed.take() else {
            continue;
        };
        // On a resync, what the kernel really holds; otherwise what we
        // left there (a change costs O(changed), not a dump).
        let current = if resyncing {
            match nl.entries(index).await {
                Ok(now) => {
                    if now != known {
                        tracing::warn!("overlay entries changed behind our back; repairing");
                        counters.drift_repaired.fetch_add(1, Ordering::Relaxed);
                    }
                    now
                }
                Err(e) => {
                    counters.netlink_errors.fetch_add(1, Ordering::Relaxed);
                    agent.set_overlay_status(&format!("{e:#}")).await;
                    continue;
                }
            }
        } else {
            known
        };
        let ips: BTreeMap<String, IpAddr> = skein_state::nodes(&snap.replica, &snap.liveness)
            .into_iter()
            .filter_map(|n| n.private_ip.map(|ip| (n.node_id, ip)))
            .collect();
        let remotes: Vec<RemoteAgent> = settled
            .iter()
            .filter(|(node, _)| **node != agent.config().node_id)
            .filter_map(|(node, lease)| {
                let IpAddr::V4(underlay) = *ips.get(node)? else {
                    return None;
                };
                Some(RemoteAgent {
                    underlay,
                    vtep_ip: lease.vtep_ip,
                    vtep_mac: agent.overlay.vtep_mac(lease.vtep_ip),
                    subnets: lease.subnets.iter().map(|(_, s, p)| (*s, *p)).collect(),
                })
            })
            .collect();
        let desired = Entries::desired(&remotes);
        let changes = plan(&current, &desired);
        match nl.apply(index, &changes).await {
            Ok(()) => {
                if !changes.is_empty() {
                    tracing::info!(
                        peers = remotes.len(),
                        changes = changes.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "overlay entries programmed"
                    );
                }
                counters
                    .peers_programmed
                    .store(remotes.len() as u64, Ordering::Relaxed);
                counters
                    .entries_programmed
                    .store(desired.len() as u64, Ordering::Relaxed);
                programmed = Some((index, desired));
                // Realized, but an overlay without a subnet for us is not OK.
                if lease_errors.is_empty() {
                    agent.set_overlay_status("ok").await;
                } else {
                    agent.set_overlay_status(&lease_errors.join("; ")).await;
                }
            }
            Err((done, e)) => {
                counters.netlink_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), applied = done, "cannot program overlay entries");
                agent.set_overlay_status(&format!("{e:#}")).await;
                // Re-read the kernel next time.
                programmed = None;
                local_done = None;
            }
        }
        counters.reconciles.fetch_add(1, Ordering::Relaxed);
        counters
            .last_reconcile_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(vtep: u8) -> NodeLeases {
        NodeLeases {
            vtep_ip: Ipv4Addr::new(44, 128, 0, vtep),
            subnets: vec![("dcos".into(), Ipv4Addr::new(9, 0, vtep, 0), 24)],
        }
    }

    #[test]
    fn leases_settle_arriving_and_leaving() {
        let mut s = Settling::default();
        let t0 = Instant::now();
        let settle = crate::vips::SETTLE;
        let both = BTreeMap::from([("a".to_string(), lease(1)), ("b".to_string(), lease(2))]);
        assert!(
            s.observe(both.clone(), t0).is_empty(),
            "nothing is used at once"
        );
        assert_eq!(s.observe(both.clone(), t0 + settle).len(), 2);
        // b vanishes briefly (a restart): still there.
        let only_a = BTreeMap::from([("a".to_string(), lease(1))]);
        let t1 = t0 + settle + Duration::from_millis(100);
        assert_eq!(s.observe(only_a.clone(), t1).len(), 2);
        assert_eq!(s.observe(both.clone(), t1 + settle / 2).len(), 2);
        // b gone for good: removed after SETTLE.
        let t2 = t1 + settle;
        assert_eq!(s.observe(only_a.clone(), t2).len(), 2);
        assert_eq!(s.observe(only_a.clone(), t2 + settle).len(), 1);
        // A changed lease keeps the old value until the new one settled.
        let moved = BTreeMap::from([("a".to_string(), lease(9))]);
        let t3 = t2 + settle * 2;
        assert_eq!(s.observe(moved.clone(), t3)["a"], lease(1));
        assert_eq!(s.observe(moved, t3 + settle)["a"], lease(9));
    }
}
