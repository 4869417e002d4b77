//! The kernel side: one veth pair per container interface, host end on the
//! agent's bridge, container end in the container's network namespace.
//! Everything goes over rtnetlink; nothing shells out to `ip`.
//!
//! A netlink socket talks to the namespace it was created in, so work in
//! the container's namespace runs on a thread of its own that first
//! `setns(2)`s into it and only then opens its socket and a current-thread
//! runtime. `setns` moves just that thread; the process (and the host-side
//! socket) stay where they are, and the thread ends with the request.
//!
//! Host-side names are derived from the container id and ifname, so DEL and
//! CHECK find the veth again without any state of their own.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::{code, CniError};

/// Upper bound for one plugin's netlink conversation, so a wedged kernel
/// request ends in an error result rather than a hung runtime.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(20);

/// Host end: `sk` + 12 hex digits of a hash of the attachment (14 bytes,
/// under IFNAMSIZ). FNV-1a rather than std's hasher: the name must stay the
/// same across plugin builds, or a DEL after an upgrade would miss it.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!("sk{:012x}", attachment_hash(container_id, ifname))
}

/// The container end's name while it still sits in the host namespace.
pub fn temp_peer_name(container_id: &str, ifname: &str) -> String {
    format!("sp{:012x}", attachment_hash(container_id, ifname))
}

fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & 0xffff_ffff_ffff
}

/// One container interface as ADD creates it.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub bridge: &'a str,
    pub host_if: String,
    pub peer_tmp: String,
    pub ifname: &'a str,
    pub netns: &'a Path,
    pub mtu: u32,
    /// The container's address with the subnet's prefix.
    pub addr: Ipv4Net,
    pub gateway: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Macs {
    pub host: String,
    pub container: String,
}

/// Opens CNI_NETNS; the runtime owns the namespace, we only need it while
/// the plugin runs.
pub fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} cannot be opened: {e}", path.display()),
        )
    })
}

/// ADD: the veth pair configured on both ends. If an earlier ADD for the
/// same attachment already left it complete, that one is reported as is.
/// On failure nothing of ours is left behind.
pub fn setup(a: &Attachment) -> Result<Macs, CniError> {
    let netns = open_netns(a.netns)?;
    let attempt = || {
        let bridge = on_this_thread(|h| async move { bridge_index(&h, a.bridge).await })?;
        match existing(a, &netns, bridge)? {
            Some(macs) => Ok(macs),
            None => create(a, &netns, bridge),
        }
    };
    // Also when a repeated ADD fails: the caller frees the address, so no
    // veth of this attachment may keep using it. Deleting either end
    // deletes the pair, wherever the peer is by now.
    attempt().inspect_err(|_| {
        let _ = remove_link(&a.host_if);
        let _ = remove_link(&a.peer_tmp);
    })
}

/// DEL: removes the host end (and with it the container end). `Ok(false)`
/// when there was no such link.
pub fn remove_link(name: &str) -> Result<bool, CniError> {
    on_this_thread(|h| async move {
        let Some(link) = link_by_name(&h, name).await? else {
            return Ok(false);
        };
        match h.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            // Gone in between (its peer's namespace was destroyed).
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_error(format!("deleting link {name}"), e)),
        }
    })
}

/// CHECK: the container interface carries the address and default route,
/// and the host end hangs off the bridge.
pub fn check(a: &Attachment) -> Result<(), CniError> {
    let netns = open_netns(a.netns)?;
    let (ifname, addr, gateway, ns) = (a.ifname, a.addr, a.gateway, a.netns);
    in_netns(&netns, move |h| async move {
        let Some(link) = link_by_name(&h, ifname).await? else {
            return Err(check_failed(format!(
                "there is no interface {ifname} in {}",
                ns.display()
            )));
        };
        let have = addresses(&h, link.header.index).await?;
        if !have.contains(&addr) {
            let list: Vec<String> = have.iter().map(|a| a.to_string()).collect();
            return Err(check_failed(format!(
                "{ifname} in {} does not carry {addr} (it has [{}])",
                ns.display(),
                list.join(", ")
            )));
        }
        if !has_default_route(&h, gateway).await? {
            return Err(check_failed(format!(
                "{} has no default route via {gateway}",
                ns.display()
            )));
        }
        Ok(())
    })?;
    let (host_if, bridge_name) = (a.host_if.as_str(), a.bridge);
    on_this_thread(|h| async move {
        let bridge = bridge_index(&h, bridge_name).await?;
        match link_by_name(&h, host_if).await? {
            None => Err(check_failed(format!("host veth {host_if} does not exist"))),
            Some(l) if controller(&l) != Some(bridge) => Err(check_failed(format!(
                "host veth {host_if} is not attached to bridge {bridge_name}"
            ))),
            Some(_) => Ok(()),
        }
    })
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

/// A complete attachment from an earlier ADD, or `None` after clearing
/// away whatever half of one a failed or interrupted ADD left.
fn existing(a: &Attachment<'_>, netns: &File, bridge: u32) -> Result<Option<Macs>, CniError> {
    let host_if = a.host_if.as_str();
    let host = on_this_thread(|h| async move { link_by_name(&h, host_if).await })?;
    let Some(host) = host else {
        return Ok(None);
    };
    let (ifname, addr) = (a.ifname, a.addr);
    let container = in_netns(netns, move |h| async move {
        let Some(link) = link_by_name(&h, ifname).await? else {
            return Ok(None);
        };
        let ok = addresses(&h, link.header.index).await?.contains(&addr);
        Ok(ok.then(|| mac(&link)))
    })?;
    match container {
        Some(container) if controller(&host) == Some(bridge) && is_up(&host) => Ok(Some(Macs {
            host: mac(&host),
            container,
        })),
        _ => {
            remove_link(host_if)?;
            Ok(None)
        }
    }
}

fn create(a: &Attachment<'_>, netns: &File, bridge: u32) -> Result<Macs, CniError> {
    let (host_if, peer_tmp, mtu) = (a.host_if.as_str(), a.peer_tmp.as_str(), a.mtu);
    let netns_fd = netns.as_raw_fd();
    on_this_thread(|h| async move {
        // A leftover of a crashed ADD of this very attachment.
        if let Some(old) = link_by_name(&h, peer_tmp).await? {
            let _ = h.link().del(old.header.index).execute().await;
        }
        // Both ends with the MTU, the host end straight onto the bridge
        // (IFLA_MASTER in the same RTM_NEWLINK).
        let peer = LinkUnspec::new_with_name(peer_tmp).mtu(mtu).build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_if)
            .mtu(mtu)
            .controller(bridge)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link()
            .add(veth)
            .execute()
            .await
            .map_err(|e| nl_error(format!("creating veth {host_if} (peer {peer_tmp})"), e))?;

        // Move the peer: RTM_NEWLINK on its index with IFLA_NET_NS_FD.
        let peer = require_link(&h, peer_tmp).await?;
        h.link()
            .change(
                LinkUnspec::new_with_index(peer.header.index)
                    .setns_by_fd(netns_fd)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl_error(format!("moving {peer_tmp} into the container netns"), e))
    })?;

    let (ifname, addr, gateway) = (a.ifname, a.addr, a.gateway);
    in_netns(netns, move |h| async move {
        if link_by_name(&h, ifname).await?.is_some() {
            return Err(CniError::new(
                code::NETLINK,
                format!("the container netns already has an interface named {ifname}"),
            ));
        }
        let peer = require_link(&h, peer_tmp).await?;
        let index = peer.header.index;
        // Renaming needs the link down, which a fresh veth end is.
        h.link()
            .change(LinkUnspec::new_with_index(index).name(ifname).build())
            .execute()
            .await
            .map_err(|e| nl_error(format!("renaming {peer_tmp} to {ifname}"), e))?;
        set_up(&h, &peer, ifname).await?;
        h.address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
            .map_err(|e| nl_error(format!("adding {addr} to {ifname}"), e))?;
        let lo = require_link(&h, "lo").await?;
        set_up(&h, &lo, "lo").await?;
        // After the address and link are up, so the kernel already has the
        // connected route the gateway is reached through (no carrier yet
        // is fine: the route is only marked linkdown until the host end
        // comes up).
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(index)
            .build();
        h.route()
            .add(route)
            .execute()
            .await
            .map_err(|e| nl_error(format!("adding default route via {gateway}"), e))
    })?;

    // The host end comes up last: that raises the carrier on both ends, and
    // the kernel's link watcher then (asynchronously) activates their queues
    // and lets the bridge port forward. Waiting for that here means the
    // container can talk the moment ADD returns.
    let host_mac = on_this_thread(|h| async move {
        let host = require_link(&h, host_if).await?;
        set_up(&h, &host, host_if).await?;
        Ok(mac(&settle(&h, host_if, true).await?))
    })?;

    let container_mac = in_netns(netns, move |h| async move {
        let link = settle(&h, ifname, false).await?;
        // Best effort, as the reference bridge plugin does: addresses are
        // reused lowest first, and neighbours that still map this one to
        // the previous owner's MAC would not reach the new container until
        // their entry expired.
        let _ = announce(link.header.index, &link, addr.addr());
        Ok(mac(&link))
    })?;

    Ok(Macs {
        host: host_mac,
        container: container_mac,
    })
}

/// How long ADD waits for a new veth end to become usable (carrier seen,
/// queue active, bridge port forwarding). Normally a few milliseconds; a
/// bridge with STP on would take its forward delay, and ADD does not wait
/// for that.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The link once it is usable, or as it is when [`SETTLE_TIMEOUT`] is up.
async fn settle(h: &Handle, name: &str, bridge_port: bool) -> Result<LinkMessage, CniError> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let link = require_link(h, name).await?;
        let ready = link.attributes.contains(&LinkAttribute::OperState(State::Up))
            // "noop" is the queue of a device the link watcher has not
            // activated yet: it drops everything.
            && link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Qdisc(q) if q != "noop"))
            && (!bridge_port || port_state(&link) == Some(BridgePortState::Forwarding));
        if ready || tokio::time::Instant::now() >= deadline {
            return Ok(link);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn port_state(link: &LinkMessage) -> Option<BridgePortState> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                attrs.iter().find_map(|p| match p {
                    InfoBridgePort::State(s) => Some(*s),
                    _ => None,
                })
            }
            _ => None,
        }),
        _ => None,
    })
}

async fn set_up(h: &Handle, link: &LinkMessage, name: &str) -> Result<(), CniError> {
    h.link()
        .change(LinkUnspec::new_with_index(link.header.index).up().build())
        .execute()
        .await
        .map_err(|e| nl_error(format!("bringing {name} up"), e))
}

async fn bridge_index(h: &Handle, name: &str) -> Result<u32, CniError> {
    let link = link_by_name(h, name).await?.ok_or_else(|| {
        CniError::new(
            code::NO_BRIDGE,
            format!("bridge {name} does not exist (has the agent set up the overlay?)"),
        )
    })?;
    if !is_bridge(&link) {
        return Err(CniError::new(
            code::NO_BRIDGE,
            format!("{name} exists but is not a bridge"),
        ));
    }
    Ok(link.header.index)
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_error(format!("looking up link {name}"), e)),
    }
}

async fn require_link(h: &Handle, name: &str) -> Result<LinkMessage, CniError> {
    link_by_name(h, name).await?.ok_or_else(|| {
        CniError::new(
            code::NETLINK,
            format!("link {name} disappeared while being set up"),
        )
    })
}

async fn addresses(h: &Handle, index: u32) -> Result<Vec<Ipv4Net>, CniError> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("listing addresses", e))?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => {
                    Ipv4Net::new(*ip, m.header.prefix_len).ok()
                }
                _ => None,
            })
        })
        .collect())
}

async fn has_default_route(h: &Handle, gateway: Ipv4Addr) -> Result<bool, CniError> {
    let routes: Vec<_> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("listing routes", e))?;
    Ok(routes.iter().any(|r| {
        r.header.destination_prefix_length == 0
            && r.attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet(gateway)))
    }))
}

fn is_bridge(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

fn mac(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => Some(
                bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// A gratuitous ARP (request with sender = target = `ip`) out of link
/// `index`, from the namespace of the calling thread. Linux lets a
/// gratuitous ARP override an existing neighbour entry at once.
fn announce(index: u32, link: &LinkMessage, ip: Ipv4Addr) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};

    let Some(sha) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => Some(b.clone()),
        _ => None,
    }) else {
        return Err(io::Error::other("link has no Ethernet address"));
    };
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    let spa = ip.octets();
    let mut pkt = Vec::with_capacity(28);
    pkt.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    pkt.extend_from_slice(&sha);
    pkt.extend_from_slice(&spa);
    pkt.extend_from_slice(&[0; 6]);
    pkt.extend_from_slice(&spa);

    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = proto;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: pkt and to outlive the call; the lengths are theirs.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn nl_error(what: impl std::fmt::Display, e: rtnetlink::Error) -> CniError {
    // The kernel's errno reads better than the crate's Debug of the reply.
    let why = match errno(&e) {
        Some(n) => io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    };
    CniError::new(code::NETLINK, format!("{what}: {why}"))
}

/// Runs `f` with a netlink handle in the namespace of the calling thread.
fn on_this_thread<T, F, Fut>(f: F) -> Result<T, CniError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, CniError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| CniError::io("starting the netlink runtime", e))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| CniError::io("opening a netlink socket", e))?;
        let conn = tokio::spawn(conn);
        let out = tokio::time::timeout(NETLINK_TIMEOUT, f(handle)).await;
        conn.abort();
        out.map_err(|_| {
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!("netlink did not answer within {NETLINK_TIMEOUT:?}"),
            )
        })?
    })
}

/// Runs `f` with a netlink handle inside the namespace `netns` (see the
/// module comment for why a thread).
fn in_netns<T, F, Fut>(netns: &File, f: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we hold open for the call; it
            // changes only this thread's network namespace.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(CniError::new(
                    code::NETLINK,
                    format!(
                        "entering the container netns failed: {}",
                        io::Error::last_os_error()
                    ),
                ));
            }
            on_this_thread(f)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(CniError::new(
                code::NETLINK,
                "the netns worker thread panicked",
            ))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_differ() {
        let a = host_veth_name("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("sk"));
        assert_ne!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef", "eth1")
        );
        assert_ne!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdeg", "eth0")
        );
        // "ab"+"c" must not collide with "a"+"bc".
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
        assert_ne!(
            a,
            temp_peer_name("0123456789abcdef0123456789abcdef", "eth0")
        );
    }

    #[test]
    fn names_are_stable() {
        // Pinned: a changed hash would orphan the veths of running
        // containers across a plugin upgrade (DEL finds them by name).
        assert_eq!(host_veth_name("dc1", "eth0"), "sk5a7ca6332ee8");
        assert_eq!(host_veth_name("dc2", "eth0"), "skf4a7a39346e3");
        assert_eq!(temp_peer_name("dc1", "eth0"), "sp5a7ca6332ee8");
    }
}
