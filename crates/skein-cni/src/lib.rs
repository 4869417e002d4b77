//! `skein-cni`: the CNI 1.0 plugin that puts containers on the agent's
//! overlay bridges (Navstar's job in DC/OS, where the Mesos CNI isolator
//! called the `bridge` plugin with host-local IPAM).
//!
//! # Where it sits
//!
//! The agent leases an agent subnet of each overlay (9.0.1.0/24 of `dcos`'s
//! 9.0.0.0/8, say) and splits it over two bridges: `m-dcos` (Mesos
//! containerizer) gets the first half with gateway 9.0.1.1/25, `d-dcos`
//! (Docker) the second with 9.0.1.129/25. For each bridge it writes one
//! network configuration; the container runtime then runs this plugin as the
//! CNI spec says: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME` (and `CNI_ARGS`, `CNI_PATH`, unused) in the environment, the
//! configuration on stdin, the result on stdout.
//!
//! # Network configuration
//!
//! ```json
//! {"cniVersion":"1.0.0","name":"dcos","type":"skein-cni","bridge":"m-dcos",
//!  "subnet":"9.0.1.0/25","gateway":"9.0.1.1","mtu":1420,
//!  "dataDir":"/var/lib/skein/cni"}
//! ```
//!
//! | key | |
//! |---|---|
//! | `cniVersion` | `0.3.1`, `0.4.0` or `1.0.0`; results are shaped for it |
//! | `name` | the overlay; a directory under `dataDir` |
//! | `bridge` | an existing Linux bridge the agent created |
//! | `subnet` | the bridge's half of the agent subnet; containers get addresses from it, with its prefix |
//! | `gateway` | the bridge's own address: never handed out, the containers' default route |
//! | `mtu` | optional, 1420 (VXLAN's 50 bytes under 1470); set on both veth ends |
//! | `dataDir` | optional, `/var/lib/skein/cni` |
//!
//! Other keys (`prevResult`, `runtimeConfig`, `args`, ...) are ignored.
//!
//! # Files in `dataDir`
//!
//! ```text
//! <dataDir>/<name>/<bridge>.lock   flock(2) held around every allocation change
//! <dataDir>/<name>/<bridge>/<ip>   one per allocated address: "<container id>\r\n<ifname>"
//! ```
//!
//! The same layout as the reference host-local IPAM plugin: it outlives
//! restarts of the agent and the plugin, and DEL of a container frees its
//! file only. Deleting a file by hand frees that address.
//!
//! # What each command does
//!
//! * ADD: lowest free address of `subnet` (not network, broadcast or
//!   gateway), or the one this container id + ifname already holds; a veth
//!   pair `sk<hash>` (host, on the bridge) / `CNI_IFNAME` (container) with
//!   the address, `lo` up and a default route via the gateway. A failure
//!   after allocation undoes both.
//! * DEL: removes the veth and frees the address; succeeds (with a note on
//!   stderr) when nothing was allocated.
//! * CHECK: the allocation exists and the interface carries it.
//! * VERSION: the versions above.
//!
//! Modules: [`config`] (decoding, pure), [`ipam`] (allocation: the choice is
//! pure, the store is files), [`netlink`] (the kernel), [`error`] (codes).

pub mod cli;
pub mod config;
pub mod error;
pub mod ipam;
pub mod netlink;

use ipnet::Ipv4Net;
use serde::Serialize;

pub use config::{parse_request, CniVersion, Command, Invocation, NetConf, Request};
pub use error::{code, CniError};
pub use ipam::{Owner, Pool, Store};

/// What the binary prints: `stdout` on stdout (nothing for DEL and CHECK),
/// `note` as one line on stderr.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Option<String>,
    pub note: Option<String>,
}

/// Answers one decoded request.
pub fn run(request: &Request) -> Result<Outcome, CniError> {
    match request {
        Request::Version => Ok(Outcome {
            stdout: Some(version_json()),
            note: None,
        }),
        Request::Run(inv) => match inv.command {
            Command::Add => add(inv),
            Command::Del => del(inv),
            Command::Check => check(inv),
            Command::Version => Ok(Outcome {
                stdout: Some(version_json()),
                note: None,
            }),
        },
    }
}

pub fn version_json() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "supportedVersions": config::SUPPORTED_VERSIONS,
    })
    .to_string()
}

fn store(inv: &Invocation) -> Store {
    Store::new(&inv.conf.data_dir, &inv.conf.name, &inv.conf.bridge)
}

fn owner(inv: &Invocation) -> Owner {
    Owner::new(&inv.container_id, &inv.ifname)
}

fn pool(conf: &NetConf) -> Pool {
    Pool {
        subnet: conf.subnet,
        gateway: conf.gateway,
    }
}

fn attachment<'a>(
    inv: &'a Invocation,
    netns: &'a std::path::Path,
    ip: std::net::Ipv4Addr,
) -> Result<netlink::Attachment<'a>, CniError> {
    let addr = Ipv4Net::new(ip, inv.conf.subnet.prefix_len()).map_err(|_| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("bad prefix of {}", inv.conf.subnet),
        )
    })?;
    Ok(netlink::Attachment {
        bridge: &inv.conf.bridge,
        host_if: netlink::host_veth_name(&inv.container_id, &inv.ifname),
        peer_tmp: netlink::temp_peer_name(&inv.container_id, &inv.ifname),
        ifname: &inv.ifname,
        netns,
        mtu: inv.conf.mtu,
        addr,
        gateway: inv.conf.gateway,
    })
}

fn require_netns(inv: &Invocation) -> Result<&std::path::Path, CniError> {
    inv.netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"))
}

fn add(inv: &Invocation) -> Result<Outcome, CniError> {
    let netns = require_netns(inv)?;
    let store = store(inv);
    let who = owner(inv);
    let choice = store.allocate(&pool(&inv.conf), &who)?;
    let plumbed = attachment(inv, netns, choice.ip())
        .and_then(|att| netlink::setup(&att).map(|macs| (att, macs)));
    let (att, macs) = match plumbed {
        Ok(ok) => ok,
        Err(e) => {
            // The runtime treats a failed ADD as no attachment at all, and
            // may never DEL it: the address must not stay taken.
            if let Err(release) = store.release(&who) {
                return Err(e.with_details(format!(
                    "also failed to release {}: {}",
                    choice.ip(),
                    release.msg
                )));
            }
            return Err(e);
        }
    };
    Ok(Outcome {
        stdout: Some(add_result(inv, netns, &att, &macs)),
        note: None,
    })
}

fn del(inv: &Invocation) -> Result<Outcome, CniError> {
    let store = store(inv);
    let who = owner(inv);
    // The veth goes first: released first, the address could be handed to
    // another container while this one still answers on it.
    let host_if = netlink::host_veth_name(&inv.container_id, &inv.ifname);
    netlink::remove_link(&host_if)?;
    let freed = store.release(&who)?;
    let note = freed.is_empty().then(|| {
        format!(
            "skein-cni: DEL: nothing was allocated for container {} (ifname {}) on {} of network {}; nothing to release",
            inv.container_id, inv.ifname, inv.conf.bridge, inv.conf.name
        )
    });
    Ok(Outcome { stdout: None, note })
}

fn check(inv: &Invocation) -> Result<Outcome, CniError> {
    let netns = require_netns(inv)?;
    let ip = store(inv).lookup(&owner(inv))?.ok_or_else(|| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "unknown container {} (ifname {}): no address is allocated for it on {}",
                inv.container_id, inv.ifname, inv.conf.bridge
            ),
        )
    })?;
    netlink::check(&attachment(inv, netns, ip)?)?;
    Ok(Outcome::default())
}

#[derive(Serialize)]
struct AddResult<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'static str,
    interfaces: Vec<Interface<'a>>,
    ips: Vec<IpConfig>,
    routes: Vec<Route>,
    dns: Dns,
}

#[derive(Serialize)]
struct Interface<'a> {
    name: &'a str,
    mac: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<String>,
}

#[derive(Serialize)]
struct IpConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    address: String,
    gateway: String,
    interface: usize,
}

#[derive(Serialize)]
struct Route {
    dst: &'static str,
    gw: String,
}

#[derive(Serialize)]
struct Dns {}

fn add_result(
    inv: &Invocation,
    netns: &std::path::Path,
    att: &netlink::Attachment,
    macs: &netlink::Macs,
) -> String {
    let v = inv.conf.cni_version;
    let result = AddResult {
        cni_version: v.as_str(),
        interfaces: vec![
            Interface {
                name: &att.host_if,
                mac: &macs.host,
                sandbox: None,
            },
            Interface {
                name: &inv.ifname,
                mac: &macs.container,
                sandbox: Some(netns.display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            version: v.ips_carry_version().then_some("4"),
            address: att.addr.to_string(),
            gateway: att.gateway.to_string(),
            // Index into `interfaces`: the container end.
            interface: 1,
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0",
            gw: att.gateway.to_string(),
        }],
        dns: Dns {},
    };
    serde_json::to_string(&result).unwrap_or_else(|_| String::from("{}"))
}
