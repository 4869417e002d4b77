//! Realizes the overlay in this node's kernel, on the realizer driver
//! (`realize.rs`): the VXLAN device `vtep1024`, the bridges `m-<overlay>` /
//! `d-<overlay>` holding the halves of this node's agent subnet, forwarding
//! and masquerade, the CNI network files, and for every remote agent the
//! static neighbour / FDB / route entries (`skein_overlay::realize`).
//!
//! The desired state comes from the view: this node's and the remote
//! agents' leases once they have settled ([`Settling`]). The kernel is
//! behind [`VxlanKernel`] (rtnetlink, `nft` and files on the host; memory in
//! tests), and what it holds is read back as the same [`Overlay`] model, so
//! the driver's cache, drift check and retries work as for nftables and
//! IPVS. How the last step went ([`Outcome`]) becomes `overlay:status`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
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

use tokio::sync::watch;

use crate::overlay::{NodeLeases, OverlayConfig};
use crate::realize::{self, RealizerCounters};
use crate::view::View;
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

    /// `vtep1024`'s index, if it exists.
    pub async fn vtep_index(&self) -> anyhow::Result<Option<u32>> {
        Ok(self.link(VTEP_NAME).await?.map(|l| l.header.index))
    }

    /// `vtep1024` as the kernel has it (what [`Netlink::ensure_vtep`]
    /// checks), or `None` when there is no such link.
    pub async fn vtep(&self) -> anyhow::Result<Option<Vtep>> {
        let Some(link) = self.link(VTEP_NAME).await? else {
            return Ok(None);
        };
        let vxlan = vxlan_info(&link).and_then(|info| {
            let (mut vni, mut local, mut port, mut learning) = (None, None, None, None);
            for i in info {
                match i {
                    InfoVxlan::Id(v) => vni = Some(*v),
                    InfoVxlan::Local(ip) => local = Some(*ip),
                    InfoVxlan::Port(p) => port = Some(*p),
                    InfoVxlan::Learning(l) => learning = Some(*l),
                    _ => {}
                }
            }
            Some(VxlanParams {
                vni: vni?,
                local: local?,
                port: port?,
                learning: learning?,
            })
        });
        Ok(Some(Vtep {
            vxlan,
            mac: mac_of(&link).and_then(|m| m.try_into().ok()),
            mtu: mtu_of(&link),
            up: link.header.flags.contains(LinkFlags::Up),
            addresses: self.addresses(link.header.index).await?,
        }))
    }

    /// Bridge `name` as the kernel has it (what [`Netlink::ensure_bridge`]
    /// checks), or `None` when there is no such link.
    pub async fn bridge(&self, name: &str) -> anyhow::Result<Option<Bridge>> {
        let Some(link) = self.link(name).await? else {
            return Ok(None);
        };
        Ok(Some(Bridge {
            up: link.header.flags.contains(LinkFlags::Up),
            addresses: self.addresses(link.header.index).await?,
        }))
    }

    /// The IPv4 addresses of a link.
    async fn addresses(&self, index: u32) -> anyhow::Result<BTreeSet<(Ipv4Addr, u8)>> {
        let mut out = BTreeSet::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            });
            if let Some(ip) = addr {
                out.insert((ip, msg.header.prefix_len));
            }
        }
        Ok(out)
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
        self.entries_on(Some(index)).await
    }

    /// Our entries; neighbours and FDB entries only on the device `index`
    /// (none without it), routes by their protocol.
    async fn entries_on(&self, index: Option<u32>) -> anyhow::Result<Entries> {
        let mut out = Entries::default();
        if let Some(index) = index {
            self.neighbour_entries(index, &mut out).await?;
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

    /// Permanent neighbours and our FDB entries on the device `index`.
    async fn neighbour_entries(&self, index: u32, out: &mut Entries) -> anyhow::Result<()> {
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
        Ok(())
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

/// `vtep1024`'s VXLAN parameters; a device whose parameters differ is
/// deleted and created again (losing its entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub local: Ipv4Addr,
    pub port: u16,
    pub learning: bool,
}

/// `vtep1024` as it is or should be: what [`Netlink::ensure_vtep`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vtep {
    /// `None`: not a VXLAN device, or parameters missing.
    pub vxlan: Option<VxlanParams>,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// Every IPv4 address on it (ours is the only one it should have).
    pub addresses: BTreeSet<(Ipv4Addr, u8)>,
}

impl Vtep {
    /// What `local` asks of the device.
    pub fn of(local: &LocalOverlay) -> Vtep {
        Vtep {
            vxlan: Some(VxlanParams {
                vni: VNI,
                local: local.underlay,
                port: VXLAN_PORT,
                learning: false,
            }),
            mac: Some(local.vtep_mac),
            mtu: Some(local.vtep_mtu),
            up: true,
            addresses: BTreeSet::from([(local.vtep_ip, local.vtep_prefix)]),
        }
    }

    /// The [`LocalOverlay`] (without bridges) this desired device is.
    fn local(&self) -> anyhow::Result<LocalOverlay> {
        let vxlan = self.vxlan.context("no VXLAN parameters")?;
        let &(vtep_ip, vtep_prefix) = self.addresses.first().context("no VTEP address")?;
        Ok(LocalOverlay {
            underlay: vxlan.local,
            vtep_ip,
            vtep_prefix,
            vtep_mac: self.mac.context("no VTEP MAC")?,
            vtep_mtu: self.mtu.context("no VTEP MTU")?,
            bridges: Vec::new(),
        })
    }
}

/// A bridge as it is or should be: what [`Netlink::ensure_bridge`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub up: bool,
    /// Every IPv4 address on it (the gateway is the only one it should have).
    pub addresses: BTreeSet<(Ipv4Addr, u8)>,
}

impl Bridge {
    pub fn of(gateway: Ipv4Addr, prefix: u8) -> Bridge {
        Bridge {
            up: true,
            addresses: BTreeSet::from([(gateway, prefix)]),
        }
    }
}

/// Everything of the overlay on this node, as the kernel holds it or as it
/// should: the local part (device, bridges, forwarding, masquerade, CNI
/// files) and the remote agents' entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub vtep: Option<Vtep>,
    /// The bridges of this node's agent subnets (read back: those of them
    /// that exist).
    pub bridges: BTreeMap<String, Bridge>,
    pub forwarding: bool,
    /// The overlays masqueraded by `table ip skein-overlay`; `None` when
    /// there is no such table, or not in our shape.
    pub masquerade: Option<BTreeSet<(Ipv4Addr, u8)>>,
    /// CNI network files and their text (read back: those that exist).
    pub cni: BTreeMap<PathBuf, String>,
    pub entries: Entries,
}

/// The overlay realizer's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayState {
    /// This node has no settled lease yet: nothing to realize, the kernel
    /// is left as it is.
    Waiting,
    Realized(Box<Overlay>),
}

/// The changes that bring the kernel from one [`Overlay`] to another, in
/// the order they are made: device, bridges, forwarding, masquerade, CNI
/// files, then entries (neighbours and FDB before the routes using them).
#[derive(Debug, Default)]
pub struct Changes {
    /// Make the device this (recreated if its VXLAN parameters differ).
    pub vtep: Option<Vtep>,
    pub bridges: Vec<(String, Bridge)>,
    pub forwarding: bool,
    pub masquerade: Option<BTreeSet<(Ipv4Addr, u8)>>,
    pub cni: Vec<(PathBuf, String)>,
    pub entries: Vec<Change>,
}

impl Changes {
    fn len(&self) -> usize {
        usize::from(self.vtep.is_some())
            + self.bridges.len()
            + usize::from(self.forwarding)
            + usize::from(self.masquerade.is_some())
            + self.cni.len()
            + self.entries.len()
    }

    /// The changes from `from` to `to`, or `None` when they agree.
    pub fn between(from: &Overlay, to: &Overlay) -> Option<Changes> {
        let mut out = Changes::default();
        if from.vtep != to.vtep {
            out.vtep = to.vtep.clone();
        }
        // A device created (or recreated with other parameters) holds no
        // entries: all of them are set again.
        let fresh = match (&from.vtep, &to.vtep) {
            (Some(f), Some(t)) => f.vxlan != t.vxlan,
            (None, Some(_)) => true,
            _ => false,
        };
        for (name, bridge) in &to.bridges {
            if from.bridges.get(name) != Some(bridge) {
                out.bridges.push((name.clone(), bridge.clone()));
            }
        }
        out.forwarding = to.forwarding && !from.forwarding;
        if from.masquerade != to.masquerade {
            out.masquerade = to.masquerade.clone();
        }
        for (path, text) in &to.cni {
            if from.cni.get(path) != Some(text) {
                out.cni.push((path.clone(), text.clone()));
            }
        }
        out.entries = if fresh {
            plan(&Entries::default(), &to.entries)
        } else {
            plan(&from.entries, &to.entries)
        };
        (out.len() > 0).then_some(out)
    }
}

/// How the overlay realizer moves.
#[derive(Debug)]
pub enum OverlayPlan {
    /// What the kernel holds is not known (nothing was ours to read before
    /// this node's leases settled): read it, then change what differs.
    Converge(Box<Overlay>),
    Change(Changes),
}

/// What the overlay realizer reads and writes.
pub trait VxlanKernel: Send + 'static {
    /// `vtep1024`, or `None` when there is none.
    fn vtep(&mut self) -> anyhow::Result<Option<Vtep>>;
    /// Bridge `name`, or `None` when there is none.
    fn bridge(&mut self, name: &str) -> anyhow::Result<Option<Bridge>>;
    /// Whether IPv4 forwarding is on.
    fn forwarding(&mut self) -> anyhow::Result<bool>;
    /// The overlays `table ip skein-overlay` masquerades; `None` when there
    /// is no such table or it is not in our shape.
    fn masquerade(&mut self) -> anyhow::Result<Option<BTreeSet<(Ipv4Addr, u8)>>>;
    /// A file's text, `None` when it does not exist.
    fn read_file(&mut self, path: &Path) -> anyhow::Result<Option<String>>;
    /// Our neighbour / FDB / route entries.
    fn entries(&mut self) -> anyhow::Result<Entries>;
    fn ensure_vtep(&mut self, local: &LocalOverlay) -> anyhow::Result<()>;
    fn ensure_bridge(&mut self, name: &str, gateway: Ipv4Addr, prefix: u8) -> anyhow::Result<()>;
    fn enable_forwarding(&mut self) -> anyhow::Result<()>;
    /// Replaces `table ip skein-overlay` with one masquerading `overlays`.
    fn set_masquerade(&mut self, overlays: &BTreeSet<(Ipv4Addr, u8)>) -> anyhow::Result<()>;
    fn write_file(&mut self, path: &Path, text: &str) -> anyhow::Result<()>;
    /// Entry changes on `vtep1024`, in order; stops at the first failure.
    fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()>;
}

/// The host: rtnetlink for links and entries, `nft` for the masquerade,
/// files for CNI. The driver steps on tokio's blocking pool, so the async
/// netlink calls are run to completion with the runtime's handle.
pub struct HostVxlan {
    nl: Netlink,
    runtime: tokio::runtime::Handle,
}

impl HostVxlan {
    /// Must be called on the runtime (the netlink connection is a task).
    pub fn new() -> anyhow::Result<HostVxlan> {
        Ok(HostVxlan {
            nl: Netlink::new()?,
            runtime: tokio::runtime::Handle::try_current()
                .context("the overlay realizer needs a tokio runtime")?,
        })
    }
}

const OVERLAY_TABLE: &str = "skein-overlay";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl VxlanKernel for HostVxlan {
    fn vtep(&mut self) -> anyhow::Result<Option<Vtep>> {
        self.runtime.block_on(self.nl.vtep())
    }

    fn bridge(&mut self, name: &str) -> anyhow::Result<Option<Bridge>> {
        self.runtime.block_on(self.nl.bridge(name))
    }

    fn forwarding(&mut self) -> anyhow::Result<bool> {
        Ok(std::fs::read_to_string(IP_FORWARD).is_ok_and(|v| v.trim() == "1"))
    }

    fn masquerade(&mut self) -> anyhow::Result<Option<BTreeSet<(Ipv4Addr, u8)>>> {
        match crate::l4lb::nft(&["-j", "list", "table", "ip", OVERLAY_TABLE], None) {
            Ok(json) => parse_masquerade(&json),
            // No table of ours: `nft` says "No such file or directory".
            Err(e) if format!("{e:#}").contains("No such file") => Ok(None),
            Err(e) => Err(e).context("cannot read the overlay masquerade rules"),
        }
    }

    fn read_file(&mut self, path: &Path) -> anyhow::Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn entries(&mut self) -> anyhow::Result<Entries> {
        self.runtime.block_on(async {
            let index = self.nl.vtep_index().await?;
            self.nl.entries_on(index).await
        })
    }

    fn ensure_vtep(&mut self, local: &LocalOverlay) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.nl.ensure_vtep(local))
            .map(|_| ())
    }

    fn ensure_bridge(&mut self, name: &str, gateway: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.nl.ensure_bridge(name, gateway, prefix))
    }

    fn enable_forwarding(&mut self) -> anyhow::Result<()> {
        enable_forwarding()
    }

    fn set_masquerade(&mut self, overlays: &BTreeSet<(Ipv4Addr, u8)>) -> anyhow::Result<()> {
        let overlays: Vec<(Ipv4Addr, u8)> = overlays.iter().copied().collect();
        crate::l4lb::nft(&["-f", "-"], Some(&overlay_nat_ruleset(&overlays)))
            .map(|_| ())
            .context("cannot install the overlay masquerade rules")
    }

    fn write_file(&mut self, path: &Path, text: &str) -> anyhow::Result<()> {
        write_if_changed(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            let index = self.nl.vtep_index().await?.context("vtep1024 vanished")?;
            self.nl.apply(index, changes).await.map_err(|(done, e)| {
                e.context(format!(
                    "cannot program overlay entries ({done} of {} made)",
                    changes.len()
                ))
            })
        })
    }
}

/// An address or prefix (`"9.0.0.1"`, `{"prefix": {...}}`) or a set of
/// them, as `nft -j` writes the right side of a match.
fn json_nets(v: &serde_json::Value) -> Option<BTreeSet<(Ipv4Addr, u8)>> {
    if let Some(s) = v.as_str() {
        return Some(BTreeSet::from([(s.parse().ok()?, 32)]));
    }
    if let Some(p) = v.get("prefix") {
        let addr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        return Some(BTreeSet::from([(addr, len)]));
    }
    let mut out = BTreeSet::new();
    for e in v.get("set")?.as_array()? {
        out.extend(json_nets(e)?);
    }
    Some(out)
}

/// Reads `nft -j list table ip skein-overlay`: the overlays masqueraded,
/// when the table is exactly what [`overlay_nat_ruleset`] writes (one nat
/// chain on postrouting, one rule `ip saddr S ip daddr != S masquerade`);
/// `None` for anything else (it is then written again).
pub fn parse_masquerade(json: &str) -> anyhow::Result<Option<BTreeSet<(Ipv4Addr, u8)>>> {
    let doc: serde_json::Value = serde_json::from_str(json).context("nft -j output")?;
    let items = doc
        .get("nftables")
        .and_then(|v| v.as_array())
        .context("nft -j output without `nftables`")?;
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "metainfo" | "table" => {}
            "chain" => chains.push(body),
            "rule" => rules.push(body),
            _ => return Ok(None),
        }
    }
    let chain_ok = |c: &&serde_json::Value| {
        c.get("name").and_then(|v| v.as_str()) == Some("postrouting")
            && c.get("type").and_then(|v| v.as_str()) == Some("nat")
            && c.get("hook").and_then(|v| v.as_str()) == Some("postrouting")
    };
    let ([chain], [rule]) = (chains.as_slice(), rules.as_slice()) else {
        return Ok(None);
    };
    if !chain_ok(chain) {
        return Ok(None);
    }
    let Some(expr) = rule.get("expr").and_then(|e| e.as_array()) else {
        return Ok(None);
    };
    let matching = |m: &serde_json::Value, field: &str, op: &str| {
        let m = m.get("match")?;
        let left = m.get("left")?.get("payload")?;
        (left.get("protocol")?.as_str()? == "ip"
            && left.get("field")?.as_str()? == field
            && m.get("op")?.as_str()? == op)
            .then(|| json_nets(m.get("right")?))
            .flatten()
    };
    let [saddr, daddr, masquerade] = expr.as_slice() else {
        return Ok(None);
    };
    let (Some(from), Some(to)) = (
        matching(saddr, "saddr", "=="),
        matching(daddr, "daddr", "!="),
    ) else {
        return Ok(None);
    };
    Ok((from == to && masquerade.get("masquerade").is_some()).then_some(from))
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

    /// Whether a later `observe` of the same leases would settle or drop
    /// something: a lease seen but not yet settled, or a settled one gone.
    fn waiting(&self) -> bool {
        !self.absent_since.is_empty()
            || self
                .seen
                .iter()
                .any(|(node, (lease, _))| self.settled.get(node) != Some(lease))
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

/// How the overlay realizer's last step went; `overlay:status` is made of
/// it and this node's lease errors ([`status_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No settled lease of this node yet: nothing realized.
    Waiting,
    /// The kernel holds this node's overlay.
    Realized,
    /// Why it could not be realized (retried).
    Failed(String),
}

/// What `overlay:status` says for an outcome: the realizer's error first,
/// then the pools this node could not lease from (an overlay without a
/// subnet for us is not OK), else `ok` once realized; `None`: nothing to
/// say yet.
pub fn status_of(outcome: &Outcome, lease_errors: &[String]) -> Option<String> {
    match outcome {
        Outcome::Failed(e) => Some(e.clone()),
        _ if !lease_errors.is_empty() => Some(lease_errors.join("; ")),
        Outcome::Realized => Some("ok".to_string()),
        Outcome::Waiting => None,
    }
}

/// The overlay realizer's counters: the driver's (`skein_realizer_*`
/// with `realizer="vxlan"`, and the `skein_overlay_*` counters) and two
/// gauges of what is programmed.
#[derive(Debug, Default)]
pub struct OverlayCounters {
    pub realizer: Arc<RealizerCounters>,
    /// Remote agents whose entries are in the kernel.
    pub peers_programmed: AtomicU64,
    /// Neighbour + FDB + route entries of ours.
    pub entries_programmed: AtomicU64,
}

/// The bridges and CNI files of a desired [`Overlay`]: what is read back.
#[derive(Debug, Clone, Default)]
struct Names {
    bridges: Vec<String>,
    cni: Vec<PathBuf>,
}

impl Names {
    fn of(o: &Overlay) -> Names {
        Names {
            bridges: o.bridges.keys().cloned().collect(),
            cni: o.cni.keys().cloned().collect(),
        }
    }
}

/// The overlay as a [`realize::Dataplane`].
pub struct VxlanDataplane<K: VxlanKernel> {
    kernel: K,
    node_id: String,
    /// `None` when `--advertise` is not IPv4 (the overlay needs it).
    underlay: Option<Ipv4Addr>,
    config: OverlayConfig,
    cni_dir: PathBuf,
    ipam_dir: PathBuf,
    settling: Settling,
    clock: Box<dyn FnMut() -> Instant + Send>,
    /// What is read back: the names of the last realized desire; `None`
    /// before this node's leases first settled (nothing is ours yet).
    wanted: Option<Names>,
    /// Why the current view cannot be realized, when that is a problem.
    problem: Option<String>,
    /// (remote agents, entries) of the current desire, when realizing.
    realizing: Option<(usize, usize)>,
    counters: Arc<OverlayCounters>,
    outcome: watch::Sender<Outcome>,
}

impl<K: VxlanKernel> VxlanDataplane<K> {
    /// The overlay of node `node_id` (underlay address `advertise`); CNI
    /// files under `data_dir`.
    pub fn new(
        kernel: K,
        node_id: &str,
        advertise: IpAddr,
        config: OverlayConfig,
        data_dir: &Path,
        counters: Arc<OverlayCounters>,
    ) -> Self {
        VxlanDataplane {
            kernel,
            node_id: node_id.to_string(),
            underlay: match advertise {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            },
            config,
            cni_dir: data_dir.join("cni"),
            ipam_dir: data_dir.join("cni-ipam"),
            settling: Settling::default(),
            clock: Box::new(Instant::now),
            wanted: None,
            problem: None,
            realizing: None,
            counters,
            outcome: watch::channel(Outcome::Waiting).0,
        }
    }

    /// Reads the time from `clock` instead of [`Instant::now`] (leases
    /// settle over time).
    pub fn with_clock(mut self, clock: impl FnMut() -> Instant + Send + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Every step's [`Outcome`].
    pub fn outcome(&self) -> watch::Receiver<Outcome> {
        self.outcome.subscribe()
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// The overlay for this node's settled leases `mine` and the remote
    /// agents' in `settled`, reached at their addresses in `ips`.
    fn overlay(
        &self,
        underlay: Ipv4Addr,
        mine: &NodeLeases,
        settled: &BTreeMap<String, NodeLeases>,
        ips: &BTreeMap<String, IpAddr>,
    ) -> (Overlay, usize) {
        let mut bridges = BTreeMap::new();
        let mut cni = BTreeMap::new();
        let mtu = self.config.container_mtu;
        for (overlay, subnet, prefix) in &mine.subnets {
            let [m, d] = bridge_halves(*subnet, *prefix);
            for (bridge, half, file, name) in [
                (
                    format!("m-{overlay}"),
                    m,
                    format!("{overlay}.conf"),
                    overlay.clone(),
                ),
                (
                    format!("d-{overlay}"),
                    d,
                    format!("{overlay}-docker.conf"),
                    format!("{overlay}-docker"),
                ),
            ] {
                let (net, len, gateway) = half;
                cni.insert(
                    self.cni_dir.join(file),
                    cni_config(&name, &bridge, (net, len), gateway, mtu, &self.ipam_dir),
                );
                bridges.insert(bridge, Bridge::of(gateway, len));
            }
        }
        let local = LocalOverlay {
            underlay,
            vtep_ip: mine.vtep_ip,
            vtep_prefix: self.config.vtep_subnet.1,
            vtep_mac: self.config.vtep_mac(mine.vtep_ip),
            vtep_mtu: self.config.vtep_mtu,
            bridges: Vec::new(),
        };
        let remotes: Vec<RemoteAgent> = settled
            .iter()
            .filter(|(node, _)| **node != self.node_id)
            .filter_map(|(node, lease)| {
                let IpAddr::V4(underlay) = *ips.get(node)? else {
                    return None;
                };
                Some(RemoteAgent {
                    underlay,
                    vtep_ip: lease.vtep_ip,
                    vtep_mac: self.config.vtep_mac(lease.vtep_ip),
                    subnets: lease.subnets.iter().map(|(_, s, p)| (*s, *p)).collect(),
                })
            })
            .collect();
        let overlay = Overlay {
            vtep: Some(Vtep::of(&local)),
            bridges,
            forwarding: true,
            masquerade: Some(self.config.overlays.iter().map(|o| o.subnet).collect()),
            cni,
            entries: Entries::desired(&remotes),
        };
        (overlay, remotes.len())
    }

    /// What the kernel holds of the overlay, for these bridges and files.
    fn read(&mut self, names: &Names) -> anyhow::Result<Overlay> {
        let vtep = self.kernel.vtep()?;
        let mut bridges = BTreeMap::new();
        for name in &names.bridges {
            if let Some(b) = self.kernel.bridge(name)? {
                bridges.insert(name.clone(), b);
            }
        }
        let forwarding = self.kernel.forwarding()?;
        let masquerade = self.kernel.masquerade()?;
        let mut cni = BTreeMap::new();
        for path in &names.cni {
            if let Some(text) = self.kernel.read_file(path)? {
                cni.insert(path.clone(), text);
            }
        }
        let entries = self.kernel.entries()?;
        Ok(Overlay {
            vtep,
            bridges,
            forwarding,
            masquerade,
            cni,
            entries,
        })
    }

    fn make(&mut self, c: &Changes) -> anyhow::Result<usize> {
        if let Some(vtep) = &c.vtep {
            self.kernel.ensure_vtep(&vtep.local()?)?;
        }
        for (name, bridge) in &c.bridges {
            let &(gateway, prefix) = bridge
                .addresses
                .first()
                .with_context(|| format!("no gateway for {name}"))?;
            self.kernel.ensure_bridge(name, gateway, prefix)?;
        }
        if c.forwarding {
            self.kernel.enable_forwarding()?;
        }
        if let Some(overlays) = &c.masquerade {
            self.kernel.set_masquerade(overlays)?;
        }
        for (path, text) in &c.cni {
            self.kernel.write_file(path, text)?;
        }
        if !c.entries.is_empty() {
            self.kernel.apply(&c.entries)?;
        }
        Ok(c.len())
    }
}

impl<K: VxlanKernel> realize::Dataplane for VxlanDataplane<K> {
    type State = OverlayState;
    type Plan = OverlayPlan;

    fn name(&self) -> &'static str {
        "vxlan"
    }

    fn waits_on_time(&self) -> bool {
        self.settling.waiting()
    }

    fn desired(&mut self, view: &View) -> OverlayState {
        let now = (self.clock)();
        self.problem = None;
        self.realizing = None;
        let leases = match crate::overlay::node_leases(&self.config, &view.replica) {
            Ok(l) => l,
            Err(e) => {
                self.problem = Some(format!("{e:#}"));
                return OverlayState::Waiting;
            }
        };
        let settled = self.settling.observe(leases, now);
        let Some(mine) = settled.get(&self.node_id) else {
            return OverlayState::Waiting;
        };
        let Some(underlay) = self.underlay else {
            self.problem = Some("the overlay needs an IPv4 --advertise address".into());
            return OverlayState::Waiting;
        };
        let (overlay, peers) = self.overlay(underlay, mine, &settled, &view.node_ips());
        self.realizing = Some((peers, overlay.entries.len()));
        self.wanted = Some(Names::of(&overlay));
        OverlayState::Realized(Box::new(overlay))
    }

    fn observe(&mut self) -> anyhow::Result<Option<OverlayState>> {
        let Some(names) = self.wanted.clone() else {
            return Ok(None);
        };
        let overlay = self.read(&names)?;
        Ok(Some(OverlayState::Realized(Box::new(overlay))))
    }

    fn plan(&self, from: Option<&OverlayState>, to: &OverlayState) -> Option<OverlayPlan> {
        let OverlayState::Realized(to) = to else {
            return None;
        };
        match from {
            Some(OverlayState::Realized(from)) => {
                Changes::between(from, to).map(OverlayPlan::Change)
            }
            _ => Some(OverlayPlan::Converge(to.clone())),
        }
    }

    fn apply(&mut self, plan: &OverlayPlan) -> anyhow::Result<usize> {
        match plan {
            OverlayPlan::Change(changes) => self.make(changes),
            OverlayPlan::Converge(to) => {
                let now = self.read(&Names::of(to))?;
                match Changes::between(&now, to) {
                    Some(changes) => self.make(&changes),
                    None => Ok(0),
                }
            }
        }
    }

    fn stepped(&mut self, result: Result<usize, &anyhow::Error>) {
        let outcome = match (result, &self.problem, self.realizing) {
            (Err(e), _, _) => Outcome::Failed(format!("{e:#}")),
            (Ok(_), Some(problem), _) => Outcome::Failed(problem.clone()),
            (Ok(_), None, Some((peers, entries))) => {
                let c = &self.counters;
                c.peers_programmed.store(peers as u64, Ordering::Relaxed);
                c.entries_programmed
                    .store(entries as u64, Ordering::Relaxed);
                Outcome::Realized
            }
            (Ok(_), None, None) => Outcome::Waiting,
        };
        self.outcome.send_if_modified(move |current| {
            let changed = *current != outcome;
            *current = outcome;
            changed
        });
    }
}

/// Starts the overlay realizer on the driver, and the task that publishes
/// its outcome as `overlay:status`. Both end with the agent.
pub fn start(agent: &Arc<Agent>) {
    let kernel = match HostVxlan::new() {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "overlay disabled");
            return;
        }
    };
    let config = agent.config();
    let dataplane = VxlanDataplane::new(
        kernel,
        &config.node_id,
        config.advertise,
        agent.overlay.clone(),
        &config.data_dir,
        agent.overlay_counters.clone(),
    );
    let outcome = dataplane.outcome();
    let driver = realize::Driver::new(dataplane, agent.overlay_counters.realizer.clone());
    // No warm-up: nothing is touched before this node's leases settle, and
    // then only what differs from what the kernel holds.
    let pacing = realize::Pacing {
        warm_up: Duration::ZERO,
        resync: config.overlay_resync,
        retry: Duration::from_millis(250),
    };
    tokio::spawn(realize::run(
        driver,
        agent.subscribe_view(),
        pacing,
        Instant::now(),
    ));
    tokio::spawn(publish_status(
        Arc::downgrade(agent),
        outcome,
        agent.subscribe_view(),
    ));
}

/// Publishes `overlay:status` when the realizer's outcome or this node's
/// lease errors change (these are re-evaluated at every view).
async fn publish_status(
    agent: Weak<Agent>,
    mut outcome: watch::Receiver<Outcome>,
    mut views: watch::Receiver<Arc<View>>,
) {
    loop {
        let Some(a) = agent.upgrade() else { return };
        let current = outcome.borrow_and_update().clone();
        let lease_errors = a.lease_errors().await;
        if let Some(status) = status_of(&current, &lease_errors) {
            a.set_overlay_status(&status).await;
        }
        drop(a);
        tokio::select! {
            changed = outcome.changed() => if changed.is_err() { return },
            changed = views.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! The overlay's kernel in memory: the device, bridges, forwarding,
    //! masquerade, files and entries, changed the way the kernel changes
    //! them (a device deleted or recreated takes its entries with it).

    use super::*;

    #[derive(Debug, Default, Clone)]
    pub(crate) struct FakeVxlan {
        pub vtep: Option<Vtep>,
        pub bridges: BTreeMap<String, Bridge>,
        pub forwarding: bool,
        pub masquerade: Option<BTreeSet<(Ipv4Addr, u8)>>,
        pub files: BTreeMap<PathBuf, String>,
        pub entries: Entries,
        pub fail_next: bool,
        /// Changes made to the kernel or files.
        pub writes: usize,
    }

    impl FakeVxlan {
        fn fail(&mut self) -> anyhow::Result<()> {
            if std::mem::take(&mut self.fail_next) {
                anyhow::bail!("injected failure");
            }
            Ok(())
        }

        /// `ip link del vtep1024`: its neighbours, FDB and routes go too.
        pub(crate) fn delete_vtep(&mut self) {
            self.vtep = None;
            self.entries = Entries::default();
        }

        /// `ip link set vtep1024 down`: the kernel drops the routes
        /// through it.
        pub(crate) fn vtep_down(&mut self) {
            if let Some(v) = &mut self.vtep {
                v.up = false;
            }
            self.entries.routes.clear();
        }
    }

    impl VxlanKernel for FakeVxlan {
        fn vtep(&mut self) -> anyhow::Result<Option<Vtep>> {
            Ok(self.vtep.clone())
        }

        fn bridge(&mut self, name: &str) -> anyhow::Result<Option<Bridge>> {
            Ok(self.bridges.get(name).cloned())
        }

        fn forwarding(&mut self) -> anyhow::Result<bool> {
            Ok(self.forwarding)
        }

        fn masquerade(&mut self) -> anyhow::Result<Option<BTreeSet<(Ipv4Addr, u8)>>> {
            Ok(self.masquerade.clone())
        }

        fn read_file(&mut self, path: &Path) -> anyhow::Result<Option<String>> {
            Ok(self.files.get(path).cloned())
        }

        fn entries(&mut self) -> anyhow::Result<Entries> {
            Ok(self.entries.clone())
        }

        fn ensure_vtep(&mut self, local: &LocalOverlay) -> anyhow::Result<()> {
            self.fail()?;
            let want = Vtep::of(local);
            match &mut self.vtep {
                Some(v) if v.vxlan == want.vxlan => {
                    if *v != want {
                        *v = want;
                        self.writes += 1;
                    }
                }
                _ => {
                    self.delete_vtep();
                    self.vtep = Some(want);
                    self.writes += 1;
                }
            }
            Ok(())
        }

        fn ensure_bridge(
            &mut self,
            name: &str,
            gateway: Ipv4Addr,
            prefix: u8,
        ) -> anyhow::Result<()> {
            self.fail()?;
            let want = Bridge::of(gateway, prefix);
            if self.bridges.get(name) != Some(&want) {
                self.bridges.insert(name.to_string(), want);
                self.writes += 1;
            }
            Ok(())
        }

        fn enable_forwarding(&mut self) -> anyhow::Result<()> {
            self.fail()?;
            if !self.forwarding {
                self.forwarding = true;
                self.writes += 1;
            }
            Ok(())
        }

        fn set_masquerade(&mut self, overlays: &BTreeSet<(Ipv4Addr, u8)>) -> anyhow::Result<()> {
            self.fail()?;
            self.masquerade = Some(overlays.clone());
            self.writes += 1;
            Ok(())
        }

        fn write_file(&mut self, path: &Path, text: &str) -> anyhow::Result<()> {
            self.fail()?;
            if self.files.get(path).map(String::as_str) != Some(text) {
                self.files.insert(path.to_path_buf(), text.to_string());
                self.writes += 1;
            }
            Ok(())
        }

        fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
            self.fail()?;
            anyhow::ensure!(self.vtep.is_some(), "no vtep1024");
            self.entries.apply(changes);
            self.writes += changes.len();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use skein_gossip::ClusterSnapshot;
    use skein_state::{Liveness, NodeStatus, Replica, Update};

    use super::fake::FakeVxlan;
    use super::*;
    use crate::realize::{Dataplane, Driver, Wake};
    use crate::vips::SETTLE;

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
        assert!(!s.waiting(), "nothing seen");
        assert!(
            s.observe(both.clone(), t0).is_empty(),
            "nothing is used at once"
        );
        // Only time changes the outcome now: the realizer must be woken by
        // time, since no new view comes while nothing changes.
        assert!(s.waiting());
        assert_eq!(s.observe(both.clone(), t0 + settle).len(), 2);
        assert!(!s.waiting(), "all settled");
        // b vanishes briefly (a restart): still there.
        let only_a = BTreeMap::from([("a".to_string(), lease(1))]);
        let t1 = t0 + settle + Duration::from_millis(100);
        assert_eq!(s.observe(only_a.clone(), t1).len(), 2);
        assert!(s.waiting(), "b's leaving is settling");
        assert_eq!(s.observe(both.clone(), t1 + settle / 2).len(), 2);
        // b gone for good: removed after SETTLE.
        let t2 = t1 + settle;
        assert_eq!(s.observe(only_a.clone(), t2).len(), 2);
        assert_eq!(s.observe(only_a.clone(), t2 + settle).len(), 1);
        assert!(!s.waiting());
        // A changed lease keeps the old value until the new one settled.
        let moved = BTreeMap::from([("a".to_string(), lease(9))]);
        let t3 = t2 + settle * 2;
        assert_eq!(s.observe(moved.clone(), t3)["a"], lease(1));
        assert_eq!(s.observe(moved, t3 + settle)["a"], lease(9));
    }

    /// A view from `n1` of nodes `n<i>` (address 10.0.0.i) holding VTEP
    /// lease slot i and agent subnet slot i of DC/OS's default overlay.
    fn view(nodes: &[u8]) -> View {
        leased(nodes, nodes)
    }

    /// A view of `nodes`, of which only `leased` publish leases.
    fn leased(nodes: &[u8], leased: &[u8]) -> View {
        let config = OverlayConfig::default();
        let mut replica = Replica::new();
        let mut version = 0;
        let mut liveness = BTreeMap::new();
        for &i in nodes {
            let node = format!("n{i}");
            let mut put = |key: &str, value: String| {
                version += 1;
                replica.apply(&Update {
                    node: node.clone(),
                    generation: 1,
                    key: key.into(),
                    version,
                    value: Some(value),
                });
            };
            put(
                skein_state::META_KEY,
                format!(
                    r#"{{"hostname":"n{i}","private_ip":"10.0.0.{i}","agent_version":"t","started_ms":1}}"#
                ),
            );
            put(crate::overlay::CONFIG_KEY, config.fingerprint());
            if leased.contains(&i) {
                put("lease:vtep", format!(r#"{{"slot":{i},"since":1}}"#));
                put("lease:overlay/dcos", format!(r#"{{"slot":{i},"since":1}}"#));
            }
            liveness.insert(
                node,
                Liveness {
                    status: NodeStatus::Alive,
                    updated: 1,
                },
            );
        }
        View::build(
            1,
            "n1",
            ClusterSnapshot { replica, liveness },
            BTreeMap::new(),
            &config,
        )
    }

    /// What n1's kernel should hold of the remote agents in `view`.
    fn entries_for(view: &View, remotes: &[u8]) -> Entries {
        let config = OverlayConfig::default();
        let leases = crate::overlay::node_leases(&config, &view.replica).unwrap();
        let remotes: Vec<RemoteAgent> = remotes
            .iter()
            .map(|i| {
                let l = &leases[&format!("n{i}")];
                RemoteAgent {
                    underlay: Ipv4Addr::new(10, 0, 0, *i),
                    vtep_ip: l.vtep_ip,
                    vtep_mac: config.vtep_mac(l.vtep_ip),
                    subnets: l.subnets.iter().map(|(_, s, p)| (*s, *p)).collect(),
                }
            })
            .collect();
        Entries::desired(&remotes)
    }

    struct Test {
        d: Driver<VxlanDataplane<FakeVxlan>>,
        clock: Arc<Mutex<Instant>>,
        outcome: watch::Receiver<Outcome>,
        counters: Arc<OverlayCounters>,
    }

    impl Test {
        fn new(kernel: FakeVxlan) -> Test {
            Test::with_advertise(kernel, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
        }

        fn with_advertise(kernel: FakeVxlan, advertise: IpAddr) -> Test {
            let clock = Arc::new(Mutex::new(Instant::now()));
            let counters = Arc::new(OverlayCounters::default());
            let now = clock.clone();
            let dataplane = VxlanDataplane::new(
                kernel,
                "n1",
                advertise,
                OverlayConfig::default(),
                Path::new("/data"),
                counters.clone(),
            )
            .with_clock(move || *now.lock().unwrap());
            let outcome = dataplane.outcome();
            Test {
                d: Driver::new(dataplane, counters.realizer.clone()),
                clock,
                outcome,
                counters,
            }
        }

        fn later(&self, by: Duration) {
            *self.clock.lock().unwrap() += by;
        }

        fn kernel(&mut self) -> &mut FakeVxlan {
            self.d.dataplane_mut().kernel_mut()
        }

        fn outcome(&self) -> Outcome {
            self.outcome.borrow().clone()
        }

        fn load(&self, f: fn(&RealizerCounters) -> &AtomicU64) -> u64 {
            f(&self.counters.realizer).load(Ordering::Relaxed)
        }

        /// Steps at once and again once leases have settled.
        fn settle(&mut self, view: &View) -> usize {
            let first = self.d.step(view, Wake::View).unwrap();
            self.later(SETTLE);
            first + self.d.step(view, Wake::View).unwrap()
        }
    }

    /// A kernel holding n1's overlay with n2 and n3, as the realizer left it.
    fn realized() -> FakeVxlan {
        let mut t = Test::new(FakeVxlan::default());
        t.settle(&view(&[1, 2, 3]));
        let mut k = t.kernel().clone();
        k.writes = 0;
        k
    }

    #[test]
    fn nothing_before_our_leases_settle_then_everything() {
        let mut t = Test::new(FakeVxlan::default());
        let v = view(&[1, 2, 3]);
        assert_eq!(t.d.step(&v, Wake::View).unwrap(), 0);
        assert_eq!(t.kernel().writes, 0, "nothing before the leases settle");
        assert_eq!(t.outcome(), Outcome::Waiting);
        t.later(SETTLE);
        assert!(t.d.step(&v, Wake::View).unwrap() > 0);
        assert_eq!(t.outcome(), Outcome::Realized);
        let leases = crate::overlay::node_leases(&OverlayConfig::default(), &v.replica).unwrap();
        let mine = &leases["n1"];
        let k = t.kernel().clone();
        let vtep = k.vtep.expect("vtep1024");
        assert_eq!(
            vtep.vxlan,
            Some(VxlanParams {
                vni: VNI,
                local: Ipv4Addr::new(10, 0, 0, 1),
                port: VXLAN_PORT,
                learning: false
            })
        );
        assert!(vtep.up);
        assert_eq!(vtep.mtu, Some(1450));
        assert_eq!(vtep.addresses, BTreeSet::from([(mine.vtep_ip, 20)]));
        let (_, subnet, _) = mine.subnets[0].clone();
        let [m, d] = bridge_halves(subnet, 24);
        assert_eq!(k.bridges["m-dcos"], Bridge::of(m.2, 25));
        assert_eq!(k.bridges["d-dcos"], Bridge::of(d.2, 25));
        assert!(k.forwarding);
        assert_eq!(
            k.masquerade,
            Some(BTreeSet::from([(Ipv4Addr::new(9, 0, 0, 0), 8)]))
        );
        let files: Vec<&PathBuf> = k.files.keys().collect();
        assert_eq!(
            files,
            [
                Path::new("/data/cni/dcos-docker.conf"),
                Path::new("/data/cni/dcos.conf")
            ]
        );
        assert!(k.files[Path::new("/data/cni/dcos.conf")].contains("\"bridge\":\"m-dcos\""));
        assert_eq!(k.entries, entries_for(&v, &[2, 3]));
        assert_eq!(k.entries.len(), 6);
        assert_eq!(t.counters.peers_programmed.load(Ordering::Relaxed), 2);
        assert_eq!(t.counters.entries_programmed.load(Ordering::Relaxed), 6);
        // Later views ask nothing more: no read, no write.
        let writes = t.kernel().writes;
        assert_eq!(t.d.step(&v, Wake::View).unwrap(), 0);
        assert_eq!(t.kernel().writes, writes);
        assert_eq!(t.load(|c| &c.observes), 1, "only the start-up read");
    }

    #[test]
    fn warm_start_changes_nothing() {
        let mut t = Test::new(realized());
        let v = view(&[1, 2, 3]);
        assert_eq!(t.settle(&v), 0);
        assert_eq!(t.kernel().writes, 0, "nothing rewritten");
        assert_eq!(t.outcome(), Outcome::Realized);
        // A resync finds what we left: no drift.
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 0);
        assert_eq!(t.load(|c| &c.drift_repaired), 0);
        assert_eq!(t.kernel().writes, 0);
    }

    #[test]
    fn a_remote_agent_arriving_and_leaving_after_settle() {
        let mut t = Test::new(FakeVxlan::default());
        let two = view(&[1, 2]);
        t.settle(&two);
        assert_eq!(t.kernel().entries, entries_for(&two, &[2]));
        // n3's leases appear: used once they have held for SETTLE.
        let three = view(&[1, 2, 3]);
        assert_eq!(t.d.step(&three, Wake::View).unwrap(), 0);
        t.later(SETTLE);
        assert_eq!(
            t.d.step(&three, Wake::View).unwrap(),
            3,
            "n3's neighbour, FDB entry and route"
        );
        assert_eq!(t.kernel().entries, entries_for(&three, &[2, 3]));
        assert_eq!(t.counters.peers_programmed.load(Ordering::Relaxed), 2);
        // n3's leases vanish (a restart would bring them back at once):
        // its entries stay for SETTLE, then go.
        let gone = leased(&[1, 2, 3], &[1, 2]);
        assert_eq!(t.d.step(&gone, Wake::View).unwrap(), 0);
        t.later(SETTLE / 2);
        assert_eq!(t.d.step(&gone, Wake::View).unwrap(), 0);
        t.later(SETTLE);
        assert_eq!(t.d.step(&gone, Wake::View).unwrap(), 3);
        assert_eq!(t.kernel().entries, entries_for(&two, &[2]));
        assert_eq!(t.counters.peers_programmed.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.entries_programmed.load(Ordering::Relaxed), 3);
        assert_eq!(t.load(|c| &c.observes), 1, "changes planned from the cache");
    }

    #[test]
    fn drift_is_repaired_on_resync_and_counted() {
        let mut t = Test::new(FakeVxlan::default());
        let v = view(&[1, 2, 3]);
        t.settle(&v);
        let want = t.kernel().clone();
        let same = |k: &FakeVxlan| {
            (
                &k.vtep,
                &k.bridges,
                k.forwarding,
                &k.masquerade,
                &k.files,
                &k.entries,
            ) == (
                &want.vtep,
                &want.bridges,
                want.forwarding,
                &want.masquerade,
                &want.files,
                &want.entries,
            )
        };
        // `ip route del` by hand: seen at the next resync, not before.
        let route = *t.kernel().entries.routes.keys().next().unwrap();
        t.kernel().entries.routes.remove(&route);
        assert_eq!(t.d.step(&v, Wake::View).unwrap(), 0);
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 1);
        assert_eq!(t.load(|c| &c.drift_repaired), 1);
        assert!(same(t.kernel()));
        // A resync that finds what we left counts nothing.
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 0);
        assert_eq!(t.load(|c| &c.drift_repaired), 1);
        // `ip link del vtep1024`: the device and all its entries come back.
        t.kernel().delete_vtep();
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 1 + 6);
        assert_eq!(t.load(|c| &c.drift_repaired), 2);
        assert!(same(t.kernel()));
        // `ip link set vtep1024 down`: up again, its routes restored.
        t.kernel().vtep_down();
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 1 + 2);
        assert_eq!(t.load(|c| &c.drift_repaired), 3);
        assert!(same(t.kernel()));
        // The masquerade table and a CNI file removed.
        t.kernel().masquerade = None;
        t.kernel()
            .files
            .remove(Path::new("/data/cni/dcos-docker.conf"));
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 2);
        assert_eq!(t.load(|c| &c.drift_repaired), 4);
        assert!(same(t.kernel()));
        assert_eq!(t.d.step(&v, Wake::Resync).unwrap(), 0);
        assert_eq!(t.load(|c| &c.drift_repaired), 4);
        assert_eq!(t.outcome(), Outcome::Realized);
    }

    #[test]
    fn a_failed_apply_is_counted_and_retried() {
        let mut t = Test::new(FakeVxlan::default());
        t.settle(&view(&[1, 2]));
        let three = view(&[1, 2, 3]);
        t.d.step(&three, Wake::View).unwrap();
        t.later(SETTLE);
        t.kernel().fail_next = true;
        assert!(t.d.step(&three, Wake::View).is_err());
        assert!(t.d.failing());
        assert_eq!(t.load(|c| &c.errors), 1);
        assert_eq!(t.outcome(), Outcome::Failed("injected failure".into()));
        let observes = t.load(|c| &c.observes);
        assert_eq!(t.d.step(&three, Wake::Retry).unwrap(), 3);
        assert!(!t.d.failing());
        assert_eq!(t.load(|c| &c.observes), observes + 1, "read first");
        assert_eq!(t.kernel().entries, entries_for(&three, &[2, 3]));
        assert_eq!(t.outcome(), Outcome::Realized);
        assert_eq!(t.load(|c| &c.drift_repaired), 0, "a failure is not drift");
    }

    #[test]
    fn a_failure_with_nothing_left_to_do_still_ends_ok() {
        // The failure was the read: the retry finds nothing to change.
        let mut t = Test::new(realized());
        let v = view(&[1, 2, 3]);
        t.settle(&v);
        t.kernel().vtep = Some(Vtep {
            up: false,
            ..t.kernel().vtep.clone().unwrap()
        });
        t.kernel().fail_next = true;
        assert!(t.d.step(&v, Wake::Resync).is_err());
        assert!(matches!(t.outcome(), Outcome::Failed(_)));
        t.kernel().vtep.as_mut().unwrap().up = true;
        assert_eq!(t.d.step(&v, Wake::Retry).unwrap(), 0);
        assert_eq!(t.outcome(), Outcome::Realized);
    }

    #[test]
    fn statuses() {
        let mut t = Test::with_advertise(FakeVxlan::default(), "fd00::1".parse().unwrap());
        t.settle(&view(&[1, 2]));
        assert_eq!(t.kernel().writes, 0);
        let Outcome::Failed(why) = t.outcome() else {
            panic!("{:?}", t.outcome())
        };
        assert!(why.contains("IPv4 --advertise"), "{why}");
        let exhausted = ["cannot lease from overlay/dcos: taken".to_string()];
        assert_eq!(status_of(&Outcome::Waiting, &[]), None);
        assert_eq!(
            status_of(&Outcome::Waiting, &exhausted).as_deref(),
            Some(exhausted[0].as_str())
        );
        assert_eq!(status_of(&Outcome::Realized, &[]).as_deref(), Some("ok"));
        assert_eq!(
            status_of(&Outcome::Realized, &exhausted).as_deref(),
            Some(exhausted[0].as_str()),
            "realized, but an overlay without a subnet for us is not OK"
        );
        assert_eq!(
            status_of(&Outcome::Failed("boom".into()), &exhausted).as_deref(),
            Some("boom")
        );
    }

    #[test]
    fn reads_the_masquerade_nft_lists() {
        let one = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "skein-overlay", "handle": 2}}, {"chain": {"family": "ip", "table": "skein-overlay", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "skein-overlay", "chain": "postrouting", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "9.0.0.0", "len": 8}}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "9.0.0.0", "len": 8}}}}, {"masquerade": null}]}}]}"#;
        assert_eq!(
            parse_masquerade(one).unwrap(),
            Some(BTreeSet::from([(Ipv4Addr::new(9, 0, 0, 0), 8)]))
        );
        let two = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "skein-overlay", "handle": 3}}, {"chain": {"family": "ip", "table": "skein-overlay", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "skein-overlay", "chain": "postrouting", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": [{"prefix": {"addr": "9.0.0.0", "len": 8}}, {"prefix": {"addr": "10.5.0.0", "len": 16}}]}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": [{"prefix": {"addr": "9.0.0.0", "len": 8}}, {"prefix": {"addr": "10.5.0.0", "len": 16}}]}}}, {"masquerade": null}]}}]}"#;
        assert_eq!(
            parse_masquerade(two).unwrap(),
            Some(BTreeSet::from([
                (Ipv4Addr::new(9, 0, 0, 0), 8),
                (Ipv4Addr::new(10, 5, 0, 0), 16)
            ]))
        );
        // Not our shape (a rule added by hand): written again.
        let extra = two.replace(
            r#"{"masquerade": null}]}}]}"#,
            r#"{"masquerade": null}]}}, {"rule": {"family": "ip", "table": "skein-overlay", "chain": "postrouting", "handle": 5, "expr": [{"accept": null}]}}]}"#,
        );
        assert_eq!(parse_masquerade(&extra).unwrap(), None);
        let other_daddr = one.replacen(
            r#""addr": "9.0.0.0", "len": 8}}}}, {"masquerade""#,
            r#""addr": "9.0.0.0", "len": 9}}}}, {"masquerade""#,
            1,
        );
        assert_ne!(other_daddr, one);
        assert_eq!(parse_masquerade(&other_daddr).unwrap(), None);
        assert!(parse_masquerade("not json").is_err());
    }

    /// The host implementation reads back exactly what it wrote, so a
    /// resync on a real kernel finds no drift. Root only; runs in a network
    /// namespace of its own: `cargo test -p skein-agent --lib -- --ignored
    /// host_kernel`.
    #[test]
    #[ignore = "needs root (a network namespace of its own)"]
    fn host_kernel_reads_back_what_it_wrote() {
        std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let _guard = rt.enter();
            let host = HostVxlan::new().unwrap();
            let lo = host
                .runtime
                .block_on(host.nl.link("lo"))
                .unwrap()
                .unwrap()
                .header
                .index;
            host.runtime
                .block_on(
                    host.nl
                        .handle
                        .link()
                        .set(LinkUnspec::new_with_index(lo).up().build())
                        .execute(),
                )
                .unwrap();
            host.runtime
                .block_on(
                    host.nl
                        .handle
                        .address()
                        .add(lo, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 32)
                        .execute(),
                )
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let counters = Arc::new(OverlayCounters::default());
            let clock = Arc::new(Mutex::new(Instant::now()));
            let now = clock.clone();
            let dataplane = VxlanDataplane::new(
                host,
                "n1",
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                OverlayConfig::default(),
                dir.path(),
                counters.clone(),
            )
            .with_clock(move || *now.lock().unwrap());
            let mut d = Driver::new(dataplane, counters.realizer.clone());
            let v = view(&[1, 2, 3]);
            d.step(&v, Wake::View).unwrap();
            *clock.lock().unwrap() += SETTLE;
            assert!(d.step(&v, Wake::View).unwrap() > 0);
            let OverlayState::Realized(want) = d.dataplane_mut().desired(&v) else {
                panic!("not realized");
            };
            let read = d.dataplane_mut().observe().unwrap();
            assert_eq!(read, Some(OverlayState::Realized(want.clone())));
            assert_eq!(d.step(&v, Wake::Resync).unwrap(), 0);
            assert_eq!(counters.realizer.drift_repaired.load(Ordering::Relaxed), 0);
            // Drift on the real kernel: a route deleted, the device down.
            let (dst, via) = want
                .entries
                .routes
                .iter()
                .next()
                .map(|(d, v)| (*d, *v))
                .unwrap();
            let index = {
                let k = d.dataplane_mut().kernel_mut();
                k.runtime.block_on(k.nl.vtep_index()).unwrap().unwrap()
            };
            {
                let k = d.dataplane_mut().kernel_mut();
                k.runtime
                    .block_on(k.nl.apply(index, &[Change::DelRoute(dst, via)]))
                    .map_err(|(_, e)| e)
                    .unwrap();
                k.runtime
                    .block_on(
                        k.nl.handle
                            .link()
                            .set(LinkUnspec::new_with_index(index).down().build())
                            .execute(),
                    )
                    .unwrap();
            }
            assert!(d.step(&v, Wake::Resync).unwrap() > 0);
            assert_eq!(counters.realizer.drift_repaired.load(Ordering::Relaxed), 1);
            assert_eq!(
                d.dataplane_mut().observe().unwrap(),
                Some(OverlayState::Realized(want))
            );
            assert_eq!(d.step(&v, Wake::Resync).unwrap(), 0);
            assert_eq!(counters.realizer.drift_repaired.load(Ordering::Relaxed), 1);
        })
        .join()
        .unwrap();
    }
}
