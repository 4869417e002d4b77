//! The [`View`]: everything this node derives from its replica, computed
//! once per refresh from one snapshot and shared, immutable, by every
//! reader: the API, the CLI's JSON, DNS, metrics and the kernel realizers.
//!
//! Before the view, each reader derived what it needed from its own
//! snapshot (the task list four times per refresh, VIPs three times), so
//! DNS, the API and the dataplane could show different moments.
//! rust-analyzer's `Analysis` is the model: one value, many readers, the
//! next refresh builds a new one instead of mutating this.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use skein_gossip::ClusterSnapshot;
use skein_l4lb::{VipProblem, VipTarget};
use skein_state::{BadEntry, Liveness, NodeId, NodeStatus, NodeView, Replica, TaskView};

use crate::overlay::OverlayConfig;
use crate::vips;

/// A row of `GET /v1/vips`: dcos-net's shape (`vip`, `protocol`,
/// `backend[{ip, port}]`) plus what an operator needs to see why traffic
/// goes where it goes.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct VipView {
    pub vip: String,
    pub protocol: skein_state::Protocol,
    pub port: u16,
    /// The VIP's address: as given for an IP VIP; for a named VIP, the
    /// cluster-wide allocation (`null` while it has none).
    pub address: Option<IpAddr>,
    pub backend: Vec<VipBackendView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct VipBackendView {
    pub ip: IpAddr,
    pub port: u16,
    pub task_id: String,
    pub node_id: String,
    pub node_status: NodeStatus,
    pub healthy: bool,
    /// Whether this node sends new connections to it.
    pub in_use: bool,
}

/// One refresh's worth of derived state. Cheap to share (`Arc<View>`), never
/// mutated; the parts few readers need are computed on first use, once.
#[derive(Debug)]
pub struct View {
    /// Counts refreshes; realizers use it to tell views apart.
    pub seq: u64,
    /// The refresh requests (see `Agent::fresh_view`) made before this
    /// view's snapshot was taken.
    pub covers_request: u64,
    pub node_id: String,
    /// The replica this view was derived from (keyspaces shared, not copied).
    pub replica: Replica,
    pub liveness: BTreeMap<NodeId, Liveness>,
    pub nodes: Vec<NodeView>,
    pub tasks: Vec<TaskView>,
    /// Published values that did not decode (a newer or broken peer).
    pub invalid: Vec<BadEntry>,
    pub vips: Vec<VipView>,
    pub vip_problems: Vec<VipProblem>,
    /// Named VIP (`name.framework`) → its address.
    pub vip_addresses: BTreeMap<String, Ipv4Addr>,
    pub records: Arc<skein_dns::Records>,
    overlay_config: OverlayConfig,
    overlay_state: OnceLock<Result<crate::docs::OverlayMasterState, String>>,
    /// The agreed edge service ports usable now (see `edge.rs`).
    pub edge_ports: BTreeMap<skein_edge::routes::PortKey, skein_edge::routes::ServicePort>,
    /// What every edge serves, computed on first use.
    edge_routes: OnceLock<Arc<skein_edge::Routes>>,
    /// The edge routes' cache, shared by the agent's views: computing a
    /// view's routes redoes only what changed since the last one computed.
    pub edge_cache: Arc<std::sync::Mutex<skein_edge::RouteCache>>,
}

impl View {
    /// Derives everything from `snap`. `vip_addresses` are the named VIPs'
    /// addresses as the allocator handed them out for this refresh.
    pub fn build(
        seq: u64,
        node_id: &str,
        snap: ClusterSnapshot,
        vip_addresses: BTreeMap<String, Ipv4Addr>,
        overlay_config: &OverlayConfig,
    ) -> View {
        let tasks = skein_state::tasks(&snap.replica, &snap.liveness);
        View::build_with_tasks(seq, node_id, snap, tasks, vip_addresses, overlay_config)
    }

    /// [`View::build`] with the tasks (and invalid entries) already derived
    /// from `snap`.
    pub(crate) fn build_with_tasks(
        seq: u64,
        node_id: &str,
        snap: ClusterSnapshot,
        (tasks, invalid): (Vec<TaskView>, Vec<BadEntry>),
        vip_addresses: BTreeMap<String, Ipv4Addr>,
        overlay_config: &OverlayConfig,
    ) -> View {
        let ClusterSnapshot { replica, liveness } = snap;
        let nodes = skein_state::nodes(&replica, &liveness);
        let (vips, vip_problems) = vip_views(&tasks, &vip_addresses);
        let records = Arc::new(records(&tasks, &nodes, &vips));
        View {
            seq,
            covers_request: 0,
            node_id: node_id.to_string(),
            replica,
            liveness,
            nodes,
            tasks,
            invalid,
            vips,
            vip_problems,
            vip_addresses,
            records,
            overlay_config: overlay_config.clone(),
            overlay_state: OnceLock::new(),
            edge_ports: BTreeMap::new(),
            edge_routes: OnceLock::new(),
            edge_cache: Default::default(),
        }
    }

    /// The routes every edge serves (`GET /v1/edge`), computed once per
    /// view, when first asked for.
    pub fn edge_routes(&self) -> &Arc<skein_edge::Routes> {
        self.edge_routes.get_or_init(|| {
            let input = skein_edge::Input {
                tasks: &self.tasks,
                service_ports: &self.edge_ports,
            };
            Arc::new(match self.edge_cache.lock() {
                Ok(mut cache) => skein_edge::compute_cached(&input, &mut cache),
                Err(_) => skein_edge::compute(&input),
            })
        })
    }

    /// An empty view, before the first refresh.
    pub fn empty(node_id: &str, overlay_config: &OverlayConfig) -> View {
        View::build(
            0,
            node_id,
            ClusterSnapshot {
                replica: Replica::new(),
                liveness: BTreeMap::new(),
            },
            BTreeMap::new(),
            overlay_config,
        )
    }

    pub fn status_of(&self, node: &str) -> NodeStatus {
        self.liveness
            .get(node)
            .map_or(NodeStatus::Down, |l| l.status)
    }

    /// Node id → its advertised address, for nodes that published one.
    pub fn node_ips(&self) -> BTreeMap<String, IpAddr> {
        self.nodes
            .iter()
            .filter_map(|n| n.private_ip.map(|ip| (n.node_id.clone(), ip)))
            .collect()
    }

    /// DC/OS's `/overlay-master/state`, computed once per view.
    pub fn overlay_state(&self) -> Result<&crate::docs::OverlayMasterState, &str> {
        self.overlay_state
            .get_or_init(|| {
                crate::overlay::master_state(&self.overlay_config, &self.replica, &self.node_ips())
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(String::as_str)
    }
}

/// VIPs declared by the tasks, with their backends and addresses, and the
/// labels or VIPs that could not be used.
fn vip_views(
    tasks: &[TaskView],
    addresses: &BTreeMap<String, Ipv4Addr>,
) -> (Vec<VipView>, Vec<VipProblem>) {
    let (vips, mut problems) = skein_l4lb::vips_of(tasks);
    let named_ips: BTreeMap<IpAddr, &String> = addresses
        .iter()
        .map(|(vip, ip)| (IpAddr::V4(*ip), vip))
        .collect();
    let mut views = Vec::new();
    for (key, backends) in vips {
        let address = match (&key.target, vips::vip_id(&key)) {
            (_, Some(id)) => addresses.get(&id).map(|&ip| IpAddr::V4(ip)),
            (VipTarget::Ip { ip }, None) => Some(*ip),
            (VipTarget::Named { .. }, None) => None,
        };
        // An IP VIP on a named VIP's address is refused: the named VIP
        // had it first (allocation never hands out an IP VIP's address).
        if let (VipTarget::Ip { ip }, Some(named)) =
            (&key.target, address.and_then(|a| named_ips.get(&a)))
        {
            for b in &backends {
                problems.push(VipProblem {
                    task_id: b.task_id.clone(),
                    node_id: b.node_id.clone(),
                    label: key.to_string(),
                    error: format!(
                        "IP VIP {ip} collides with the address of named VIP {named}; rejected"
                    ),
                });
            }
            continue;
        }
        let used = skein_l4lb::in_use(&backends);
        views.push(VipView {
            vip: key.to_string(),
            protocol: key.protocol,
            port: key.port,
            address,
            backend: backends
                .into_iter()
                .zip(used)
                .map(|(b, in_use)| VipBackendView {
                    ip: b.ip,
                    port: b.port,
                    task_id: b.task_id,
                    node_id: b.node_id,
                    node_status: b.node_status,
                    healthy: b.healthy,
                    in_use,
                })
                .collect::<Vec<_>>()
                // Collected in place, the list kept the room for four
                // backends the allocation grew; most VIPs have one or two.
                .into_boxed_slice()
                .into_vec(),
        });
    }
    (views, problems)
}

/// The cluster's DNS records (Mesos-DNS and dcos-dns names; named VIPs once
/// they have an address). A down node's tasks are not answered for
/// (Mesos-DNS listed only running tasks); they come back with the node.
fn records(tasks: &[TaskView], nodes: &[NodeView], vips: &[VipView]) -> skein_dns::Records {
    let names: Vec<(&str, &str, IpAddr)> = vips
        .iter()
        .filter_map(|v| {
            let address = v.address?;
            let host = v.vip.rsplit_once(':')?.0;
            let rest = host.strip_suffix(".l4lb.thisdcos.directory")?;
            let (name, framework) = rest.split_once('.')?;
            Some((name, framework, address))
        })
        .collect();
    let vip_names: Vec<skein_dns::VipName<'_>> = names
        .iter()
        .map(|&(name, framework, address)| skein_dns::VipName {
            name,
            framework,
            address,
        })
        .collect();
    skein_dns::build(
        tasks.iter().filter(|t| t.node_status != NodeStatus::Down),
        nodes,
        &vip_names,
    )
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Views built from a replica in memory, for the realizers' tests.

    use super::*;
    use skein_state::{health_key, task_key, Liveness, Update, UNHEALTHY};

    /// Writes `key = value` as `node`'s next version (generation 1).
    pub(crate) fn put(replica: &mut Replica, node: &str, key: &str, value: &str) {
        let version = replica.node(node).map_or(0, |k| k.max_version()) + 1;
        replica.apply(&Update {
            node: node.into(),
            generation: 1,
            key: key.into(),
            version,
            value: Some(value.into()),
        });
    }

    /// Every one of `nodes` alive.
    pub(crate) fn alive(nodes: &[&str]) -> BTreeMap<String, Liveness> {
        nodes
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Liveness {
                        status: NodeStatus::Alive,
                        updated: 1,
                    },
                )
            })
            .collect()
    }

    /// A view of one alive node `n1` running `tasks`: (task id, task ip,
    /// `VIP_0` label, healthy). Each task serves port 8080. Named VIPs get
    /// the first probe of their name as address.
    pub(crate) fn view_with_tasks(tasks: Vec<(String, &str, &str, bool)>) -> View {
        let mut replica = Replica::new();
        let mut version = 0;
        let mut put = |key: String, value: String| {
            version += 1;
            replica.apply(&Update {
                node: "n1".into(),
                generation: 1,
                key,
                version,
                value: Some(value),
            });
        };
        put(
            skein_state::META_KEY.into(),
            r#"{"hostname":"n1","private_ip":"10.0.0.1","agent_version":"t","started_ms":1}"#
                .into(),
        );
        for (id, ip, label, healthy) in &tasks {
            put(
                task_key(id),
                format!(
                    r#"{{"app":"/app","ip":"{ip}","ports":[{{"port":8080,"labels":{{"VIP_0":"{label}"}}}}]}}"#
                ),
            );
            if !healthy {
                put(health_key(id), UNHEALTHY.into());
            }
        }
        let mut liveness = BTreeMap::new();
        liveness.insert(
            "n1".to_string(),
            Liveness {
                status: NodeStatus::Alive,
                updated: 1,
            },
        );
        let (task_views, _) = skein_state::tasks(&replica, &liveness);
        let (vips, _) = skein_l4lb::vips_of(&task_views);
        let addresses = vips
            .keys()
            .filter_map(vips::vip_id)
            .map(|id| {
                let ip = skein_l4lb::alloc::probe(&id, 0);
                (id, ip)
            })
            .collect();
        View::build(
            1,
            "n1",
            ClusterSnapshot { replica, liveness },
            addresses,
            &OverlayConfig::default(),
        )
    }
}
