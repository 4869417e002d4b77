//! The node agent: one per host. It restores this node's state from the data
//! dir, gossips with the cluster, keeps a fresh snapshot of the replica for
//! readers, and persists what must survive a restart.

pub mod health;
pub mod ipvs;
pub mod l4lb;
pub mod metrics;
pub mod overlay;
pub mod store;
pub mod vips;
pub mod vxlan;
pub mod wakeups;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use skein_gossip::{ClusterSnapshot, Gossip, GossipConfig, GossipStats, QuicTransport};
use skein_state::{
    task_key, validate_task_id, BadEntry, NodeMeta, NodeStatus, NodeView, TaskSpec, TaskView,
    META_KEY,
};
use tokio::sync::{watch, Mutex};

use crate::store::Store;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything `skein agent` needs, after flags, environment and config file
/// have been merged by the binary.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub hostname: String,
    pub advertise: IpAddr,
    pub gossip_listen: SocketAddr,
    pub seeds: Vec<String>,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub cluster_id: String,
    pub gossip_interval: Duration,
    pub suspect_after: Duration,
    pub dead_node_grace: Duration,
    /// Where the DNS server listens (UDP and TCP); empty: no DNS server.
    pub dns_listen: Vec<SocketAddr>,
    /// Where names outside the cluster zones are forwarded.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Per-zone forwarders: names under a zone go to its upstreams.
    pub dns_zone_upstreams: Vec<(String, Vec<SocketAddr>)>,
    pub l4lb_dataplane: l4lb::Dataplane,
    /// How often the kernel's VIP rules are checked for drift.
    pub l4lb_resync: Duration,
    /// The overlay networks, identical on every node.
    pub overlay: overlay::OverlayConfig,
    pub overlay_dataplane: vxlan::OverlayDataplane,
    /// How often the kernel's overlay entries are checked for drift.
    pub overlay_resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("storage failed: {0:#}")]
    Storage(anyhow::Error),
}

/// A row of `GET /v1/vips`: dcos-net's shape (`vip`, `protocol`,
/// `backend[{ip, port}]`) plus what an operator needs to see why traffic
/// goes where it goes.
#[derive(Debug, Serialize)]
pub struct VipView {
    pub vip: String,
    pub protocol: skein_state::Protocol,
    pub port: u16,
    /// The VIP's address: as given for an IP VIP; for a named VIP, the
    /// cluster-wide allocation once settled (`null` while pending).
    pub address: Option<IpAddr>,
    pub backend: Vec<VipBackendView>,
}

#[derive(Debug, Serialize)]
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

/// `GET /v1/tasks`.
#[derive(Debug, Serialize)]
pub struct TasksView {
    pub tasks: Vec<TaskView>,
    /// Published values that did not decode (a newer or broken peer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<BadEntry>,
}

pub struct Agent {
    config: AgentConfig,
    gossip: Gossip,
    store: Store,
    stats: Arc<GossipStats>,
    /// Serializes own-task writes so the file and the gossip keyspace are
    /// updated in the same order.
    own_tasks: Mutex<BTreeMap<String, TaskSpec>>,
    snapshot: watch::Sender<Arc<ClusterSnapshot>>,
    /// Named VIP → its address and whether it has settled.
    vip_addresses: std::sync::RwLock<BTreeMap<String, (std::net::Ipv4Addr, bool)>>,
    settling: std::sync::Mutex<vips::Allocator>,
    /// VIP problems already logged, so each is logged once when it appears.
    logged_problems: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The cluster's DNS records, republished after every refresh.
    records: watch::Sender<Arc<skein_dns::Records>>,
    pub dns: Option<Arc<skein_dns::server::DnsServer>>,
    pub overlay: overlay::OverlayConfig,
    /// This node's lease claims as published (pool → claim).
    own_leases: Mutex<BTreeMap<String, skein_overlay::Claim>>,
    /// Ticks after every refresh, for the realizers.
    refreshed: watch::Sender<u64>,
    pub l4lb_counters: l4lb::L4lbCounters,
    pub overlay_counters: vxlan::OverlayCounters,
    /// What this node last published under `overlay:status`.
    overlay_status: Mutex<String>,
    /// Pools with no lease left for this node (shown in its status).
    lease_errors: Mutex<Vec<String>>,
    started: Instant,
    pub counters: Counters,
}

#[derive(Default)]
pub struct Counters {
    pub task_writes: AtomicU64,
    pub task_deletes: AtomicU64,
    pub rejected_writes: AtomicU64,
    pub status_changes: AtomicU64,
    pub persist_errors: AtomicU64,
    pub health_changes: AtomicU64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The snapshot readers see is refreshed as soon as gossip applies a change,
/// and at least this often, so that liveness (`suspect`, `down`) is current.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(250);
const PERSIST_INTERVAL: Duration = Duration::from_secs(2);

impl Agent {
    pub async fn start(config: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        let store = Store::open(&config.data_dir)?;
        let tls = skein_tls::NodeTls::load(&config.tls_dir)
            .with_context(|| format!("loading TLS material from {}", config.tls_dir.display()))?;
        if tls.node_id() != config.node_id {
            anyhow::bail!(
                "node id {:?} does not match the certificate in {} (issued for {:?}); \
                 issue a certificate for this node with `skein cert issue`",
                config.node_id,
                config.tls_dir.display(),
                tls.node_id()
            );
        }
        let generation = store.next_generation(unix_ms())?;
        let own_tasks = store.load_tasks()?;
        let own_leases = store.load_leases()?;
        let overlay = config.overlay.clone();
        overlay.pools()?;
        let persisted = store.load_gossip_state();

        let meta = NodeMeta {
            hostname: config.hostname.clone(),
            private_ip: config.advertise,
            agent_version: VERSION.to_string(),
            started_ms: unix_ms(),
        };
        let mut initial = vec![
            (META_KEY.to_string(), serde_json::to_string(&meta)?),
            (overlay::CONFIG_KEY.to_string(), overlay.fingerprint()),
        ];
        for (id, spec) in &own_tasks {
            initial.push((task_key(id), serde_json::to_string(spec)?));
        }
        // Leases come back with the node, with their original `since`, so
        // they win again over anyone who claimed the same slot later.
        for (pool, claim) in &own_leases {
            initial.push((
                format!("{}{pool}", overlay::LEASE_PREFIX),
                serde_json::to_string(claim)?,
            ));
        }

        let stats = Arc::new(GossipStats::default());
        let signer = tls.gossip_signer()?;
        let transport = QuicTransport::new(Arc::new(tls), stats.clone());
        let gossip_config = GossipConfig {
            node_id: config.node_id.clone(),
            generation,
            listen: config.gossip_listen,
            advertise: SocketAddr::new(config.advertise, config.gossip_listen.port()),
            seeds: config.seeds.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            suspect_after: config.suspect_after,
            dead_node_grace: config.dead_node_grace,
            // Long enough that a peer partitioned for hours still learns of
            // deletes, short enough that churn does not pile up tombstones.
            tombstone_grace: Duration::from_secs(3600),
        };
        let gossip = Gossip::start(gossip_config, &transport, signer, initial, &persisted).await?;
        let first = gossip.snapshot().await;
        let (snapshot, _) = watch::channel(Arc::new(first));
        let (records, records_rx) = watch::channel(Arc::new(skein_dns::Records::default()));
        let dns = if config.dns_listen.is_empty() {
            None
        } else {
            let forwarders = skein_dns::server::Forwarders::new(
                &config.dns_upstreams,
                &config.dns_zone_upstreams,
            );
            let server = skein_dns::server::DnsServer::new(records_rx, forwarders);
            server.listen(&config.dns_listen).await.with_context(|| {
                format!(
                    "cannot serve DNS on {:?} (pass --dns-listen '' to run without DNS)",
                    config.dns_listen
                )
            })?;
            Some(server)
        };
        tracing::info!(
            node = %config.node_id,
            generation,
            tasks = own_tasks.len(),
            gossip = %config.gossip_listen,
            seeds = ?config.seeds,
            "agent started"
        );
        let agent = Arc::new(Agent {
            config,
            gossip,
            store,
            stats,
            own_tasks: Mutex::new(own_tasks),
            snapshot,
            vip_addresses: Default::default(),
            settling: Default::default(),
            logged_problems: Default::default(),
            overlay,
            own_leases: Mutex::new(own_leases),
            records,
            dns,
            refreshed: watch::channel(0).0,
            l4lb_counters: Default::default(),
            overlay_counters: Default::default(),
            overlay_status: Mutex::new(String::new()),
            lease_errors: Mutex::new(Vec::new()),
            started: Instant::now(),
            counters: Counters::default(),
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&agent)));
        tokio::spawn(health::run(Arc::downgrade(&agent)));
        match agent.config.l4lb_dataplane {
            l4lb::Dataplane::Nftables => {
                tokio::spawn(l4lb::run(
                    Arc::downgrade(&agent),
                    agent.refreshed.subscribe(),
                    agent.config.l4lb_resync,
                ));
            }
            l4lb::Dataplane::Ipvs => {
                tokio::spawn(ipvs::run(
                    Arc::downgrade(&agent),
                    agent.refreshed.subscribe(),
                    agent.config.l4lb_resync,
                ));
            }
            l4lb::Dataplane::None => {
                tracing::info!("L4LB dataplane: none (VIPs computed, kernel untouched)")
            }
        }
        tracing::info!(dataplane = ?agent.config.l4lb_dataplane, "L4LB dataplane");
        if agent.config.overlay_dataplane == vxlan::OverlayDataplane::Vxlan {
            tokio::spawn(vxlan::run(
                Arc::downgrade(&agent),
                agent.refreshed.subscribe(),
                agent.config.overlay_resync,
            ));
        }
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn gossip_stats(&self) -> &GossipStats {
        &self.stats
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// This node's own tasks, as stored.
    pub async fn own_tasks_snapshot(&self) -> Vec<(String, TaskSpec)> {
        let own = self.own_tasks.lock().await;
        own.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The latest snapshot (at most [`SNAPSHOT_INTERVAL`] old).
    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.snapshot.borrow().clone()
    }

    /// Waits for the next snapshot refresh; lets a writer read its own write.
    async fn fresh_snapshot(&self) -> Arc<ClusterSnapshot> {
        let snap = Arc::new(self.gossip.snapshot().await);
        self.snapshot.send_replace(snap.clone());
        snap
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        let snap = self.snapshot();
        skein_state::nodes(&snap.replica, &snap.liveness)
    }

    pub fn tasks(&self) -> TasksView {
        let snap = self.snapshot();
        let (tasks, invalid) = skein_state::tasks(&snap.replica, &snap.liveness);
        TasksView { tasks, invalid }
    }

    /// VIPs declared by the cluster's tasks, with their backends and
    /// addresses, and the labels or VIPs that could not be used.
    pub fn vips(&self) -> (Vec<VipView>, Vec<skein_l4lb::VipProblem>) {
        let tasks = self.tasks().tasks;
        let (vips, mut problems) = skein_l4lb::vips_of(&tasks);
        let addresses = self
            .vip_addresses
            .read()
            .map(|a| a.clone())
            .unwrap_or_default();
        let named_ips: BTreeMap<IpAddr, &String> = addresses
            .iter()
            .map(|(vip, (ip, _))| (IpAddr::V4(*ip), vip))
            .collect();
        let mut views = Vec::new();
        for (key, backends) in vips {
            let address = match vips::vip_id(&key) {
                Some(id) => addresses
                    .get(&id)
                    .and_then(|&(ip, settled)| settled.then_some(IpAddr::V4(ip))),
                None => match &key.target {
                    skein_l4lb::VipTarget::Ip { ip } => Some(*ip),
                    skein_l4lb::VipTarget::Named { .. } => None,
                },
            };
            // An IP VIP on a named VIP's address is refused: the named VIP
            // had it first (allocation never hands out an IP VIP's address).
            if let (skein_l4lb::VipTarget::Ip { ip }, Some(named)) =
                (&key.target, address.and_then(|a| named_ips.get(&a)))
            {
                for b in &backends {
                    problems.push(skein_l4lb::VipProblem {
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
                    .collect(),
            });
        }
        (views, problems)
    }

    /// The cluster's DNS records as this node derives them (Mesos-DNS and
    /// dcos-dns names; named VIPs only once their address settled).
    pub fn records(&self) -> skein_dns::Records {
        let snap = self.snapshot();
        let (mut tasks, _) = skein_state::tasks(&snap.replica, &snap.liveness);
        // A down node's tasks are not answered for (Mesos-DNS listed only
        // running tasks); they come back with the node.
        tasks.retain(|t| t.node_status != NodeStatus::Down);
        let nodes = skein_state::nodes(&snap.replica, &snap.liveness);
        let (vips, _) = self.vips();
        let names: Vec<(String, String, IpAddr)> = vips
            .iter()
            .filter_map(|v| {
                let address = v.address?;
                let host = v.vip.rsplit_once(':')?.0;
                let rest = host.strip_suffix(".l4lb.thisdcos.directory")?;
                let (name, framework) = rest.split_once('.')?;
                Some((name.to_string(), framework.to_string(), address))
            })
            .collect();
        let vip_names: Vec<skein_dns::VipName<'_>> = names
            .iter()
            .map(|(name, framework, address)| skein_dns::VipName {
                name,
                framework,
                address: *address,
            })
            .collect();
        skein_dns::build(&tasks, &nodes, &vip_names)
    }

    /// Claims (or keeps) this node's overlay leases; persisted before they
    /// are published so a restart reclaims the same ones.
    async fn reconcile_leases(&self, snap: &ClusterSnapshot) {
        let (desired, exhausted) = match overlay::desired(
            &self.overlay,
            &snap.replica,
            &self.config.node_id,
            unix_ms(),
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot lease an overlay subnet");
                return;
            }
        };
        {
            let mut errors = self.lease_errors.lock().await;
            if *errors != exhausted {
                for e in &exhausted {
                    tracing::error!(error = %e, "overlay lease exhausted");
                }
                *errors = exhausted;
            }
        }
        let mut own = self.own_leases.lock().await;
        if *own == desired {
            return;
        }
        if let Err(e) = self.store.save_leases(&desired) {
            tracing::warn!(error = %format!("{e:#}"), "cannot persist overlay leases");
            return;
        }
        for (pool, claim) in &desired {
            if own.get(pool) != Some(claim) {
                if let Ok(json) = serde_json::to_string(claim) {
                    tracing::info!(pool, slot = claim.slot, "claiming overlay lease");
                    self.gossip
                        .set(&format!("{}{pool}", overlay::LEASE_PREFIX), &json)
                        .await;
                }
            }
        }
        *own = desired;
    }

    /// Removes departed nodes for good, cluster-wide (their tasks, leases
    /// and VIP claims), as `POST /overlay-master/agents/delete` does in
    /// DC/OS. Refuses nodes this node does not see down.
    pub async fn forget_agents(&self, ips: &[IpAddr]) -> Result<Vec<String>, AgentError> {
        let snap = self.snapshot();
        let nodes = skein_state::nodes(&snap.replica, &snap.liveness);
        let mut forgotten = Vec::new();
        for ip in ips {
            let node = nodes
                .iter()
                .find(|n| n.private_ip == Some(*ip))
                .ok_or_else(|| AgentError::NotFound(format!("agent {ip}")))?;
            if node.status != NodeStatus::Down {
                return Err(AgentError::BadRequest(format!(
                    "agent {ip} ({}) is {}: stop it before deleting it",
                    node.node_id,
                    node.status.as_str()
                )));
            }
            self.gossip
                .set(
                    &format!("{}{}", skein_gossip::FORGET_PREFIX, node.node_id),
                    &node.generation.to_string(),
                )
                .await;
            tracing::info!(node = %node.node_id, %ip, "agent deleted by an operator");
            forgotten.push(node.node_id.clone());
        }
        self.fresh_snapshot().await;
        Ok(forgotten)
    }

    /// Pools this node could not lease from, as messages.
    pub async fn lease_errors(&self) -> Vec<String> {
        self.lease_errors.lock().await.clone()
    }

    /// Publishes how realizing the overlay went (`ok` or the error), when
    /// it changed; `/overlay-master/state` shows it for every agent.
    pub async fn set_overlay_status(&self, status: &str) {
        let mut current = self.overlay_status.lock().await;
        if *current != status {
            if status != "ok" {
                tracing::warn!(status, "overlay not realized");
            } else {
                tracing::info!("overlay realized");
            }
            self.gossip.set(overlay::STATUS_KEY, status).await;
            *current = status.to_string();
        }
    }

    /// DC/OS's `/overlay-master/state`, from this node's replica.
    pub fn overlay_state(&self) -> anyhow::Result<serde_json::Value> {
        let snap = self.snapshot();
        let ips: BTreeMap<String, IpAddr> = skein_state::nodes(&snap.replica, &snap.liveness)
            .into_iter()
            .filter_map(|n| n.private_ip.map(|ip| (n.node_id, ip)))
            .collect();
        overlay::master_state(&self.overlay, &snap.replica, &ips)
    }

    /// Logs each VIP problem (bad label, colliding IP VIP) once, when it
    /// first appears, so operators see it in the logs as well as the API.
    fn log_new_vip_problems(&self) {
        let (_, problems) = self.vips();
        let Ok(mut logged) = self.logged_problems.lock() else {
            return;
        };
        let current: std::collections::BTreeSet<String> = problems
            .iter()
            .map(|p| {
                format!(
                    "task {} on {}: {}: {}",
                    p.task_id, p.node_id, p.label, p.error
                )
            })
            .collect();
        for line in current.difference(&logged) {
            tracing::warn!(problem = %line, "VIP label not used");
        }
        *logged = current;
    }

    /// Publishes this node's VIP address claims for the VIPs it hosts and
    /// records the cluster's allocation. Runs after every snapshot refresh.
    async fn reconcile_vip_claims(&self, snap: &ClusterSnapshot) {
        let outcome = match self.settling.lock() {
            Ok(mut allocator) => allocator.reconcile(
                &self.config.node_id,
                &snap.replica,
                &snap.liveness,
                Instant::now(),
                unix_ms(),
            ),
            Err(_) => return,
        };
        for (vip, value) in &outcome.publish {
            match serde_json::to_string(value) {
                Ok(json) => {
                    tracing::info!(vip, ip = %value.ip, "claiming VIP address");
                    self.gossip
                        .set(&format!("{}{vip}", vips::CLAIM_PREFIX), &json)
                        .await;
                }
                Err(e) => tracing::warn!(vip, error = %e, "cannot encode VIP claim"),
            }
        }
        for vip in &outcome.withdraw {
            tracing::info!(vip, "withdrawing VIP address claim");
            self.gossip
                .delete(&format!("{}{vip}", vips::CLAIM_PREFIX))
                .await;
        }
        if let Ok(mut a) = self.vip_addresses.write() {
            *a = outcome.addresses;
        }
    }

    /// Registers or replaces a task running on this node. Returns once the
    /// task is durable in the data dir; gossip spreads it from there.
    pub async fn put_task(&self, id: &str, spec: TaskSpec) -> Result<bool, AgentError> {
        let reject = |e: String| {
            self.counters
                .rejected_writes
                .fetch_add(1, Ordering::Relaxed);
            AgentError::BadRequest(e)
        };
        validate_task_id(id).map_err(|e| reject(e.to_string()))?;
        spec.validate().map_err(|e| reject(e.to_string()))?;
        let value = serde_json::to_string(&spec).map_err(|e| reject(e.to_string()))?;
        let mut own = self.own_tasks.lock().await;
        let mut next = own.clone();
        let created = next.insert(id.to_string(), spec).is_none();
        self.store.save_tasks(&next).map_err(AgentError::Storage)?;
        *own = next;
        self.gossip.set(&task_key(id), &value).await;
        drop(own);
        self.counters.task_writes.fetch_add(1, Ordering::Relaxed);
        self.fresh_snapshot().await;
        tracing::info!(task = id, created, "task registered");
        Ok(created)
    }

    /// Removes a task of this node. Tasks of other nodes are theirs to remove.
    pub async fn delete_task(&self, id: &str) -> Result<(), AgentError> {
        validate_task_id(id).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let mut own = self.own_tasks.lock().await;
        if !own.contains_key(id) {
            let elsewhere = self
                .tasks()
                .tasks
                .into_iter()
                .find(|t| t.id == id)
                .map(|t| t.node_id);
            return Err(match elsewhere {
                Some(node) => AgentError::BadRequest(format!(
                    "task {id} belongs to node {node}; delete it through that node's agent"
                )),
                None => AgentError::NotFound(format!("task {id}")),
            });
        }
        let mut next = own.clone();
        next.remove(id);
        self.store.save_tasks(&next).map_err(AgentError::Storage)?;
        *own = next;
        self.gossip.delete(&task_key(id)).await;
        drop(own);
        self.counters.task_deletes.fetch_add(1, Ordering::Relaxed);
        self.fresh_snapshot().await;
        tracing::info!(task = id, "task removed");
        Ok(())
    }

    /// `GET /v1/state`: every node's published keyspace with versions, plus
    /// this node's view of their liveness.
    pub fn state_json(&self) -> serde_json::Value {
        let snap = self.snapshot();
        let nodes: serde_json::Map<String, serde_json::Value> = snap
            .replica
            .nodes()
            .iter()
            .map(|(id, ks)| {
                let entries: serde_json::Map<String, serde_json::Value> = ks
                    .entries
                    .iter()
                    .map(|(k, e)| {
                        // Values are JSON documents; show them as such.
                        let value = e.value.as_ref().map(|v| {
                            serde_json::from_str(v)
                                .unwrap_or_else(|_| serde_json::Value::String(v.clone()))
                        });
                        (
                            k.clone(),
                            serde_json::json!({"version": e.version, "value": value, "deleted": e.value.is_none()}),
                        )
                    })
                    .collect();
                let status = snap
                    .liveness
                    .get(id)
                    .map_or(NodeStatus::Down, |l| l.status);
                (
                    id.clone(),
                    serde_json::json!({
                        "generation": ks.generation,
                        "max_version": ks.max_version(),
                        "status": status,
                        "keys": entries,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "node_id": self.config.node_id,
            "cluster_id": self.config.cluster_id,
            "nodes": nodes,
            "removed": snap.replica.removed(),
        })
    }
}

/// Keeps the readers' snapshot fresh, logs membership changes and persists
/// the replica when it changed. Ends when the agent is dropped.
async fn refresh_loop(agent: std::sync::Weak<Agent>) {
    let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_persist = Instant::now();
    // The gossip digest of what was last written (not a replica copy).
    let mut persisted: Option<u64> = None;
    let mut generation = match agent.upgrade() {
        Some(agent) => agent.gossip.generation(),
        None => return,
    };
    let (mut keys, mut members) = match agent.upgrade() {
        Some(agent) => (
            agent.gossip.key_changes(),
            agent.gossip.membership_changes().await,
        ),
        None => return,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = keys.changed() => if changed.is_err() { return },
            changed = members.changed() => if changed.is_err() { return },
        }
        let Some(agent) = agent.upgrade() else { return };
        if let Err(e) = agent.gossip.ensure_running() {
            // A frozen view is worse than no agent: stop, and let the
            // supervisor restart us.
            tracing::error!(error = %e, "gossip stopped; exiting");
            std::process::exit(70);
        }
        if agent.gossip.generation() != generation {
            generation = agent.gossip.generation();
            if let Err(e) = agent.store.save_generation(generation) {
                tracing::warn!(error = %format!("{e:#}"), "could not persist the generation");
            }
        }
        let previous = agent.snapshot();
        let next = agent.fresh_snapshot().await;
        agent.reconcile_vip_claims(&next).await;
        agent.log_new_vip_problems();
        agent.reconcile_leases(&next).await;
        agent.records.send_replace(Arc::new(agent.records()));
        agent.refreshed.send_modify(|n| *n = n.wrapping_add(1));
        for (node, live) in &next.liveness {
            let before = previous.liveness.get(node).map(|l| l.status);
            if before != Some(live.status) {
                agent
                    .counters
                    .status_changes
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(node = %node, status = live.status.as_str(), "membership change");
            }
        }
        if last_persist.elapsed() >= PERSIST_INTERVAL && persisted != Some(agent.gossip.digest()) {
            last_persist = Instant::now();
            let digest = agent.gossip.digest();
            match agent.store.save_gossip_state(&agent.gossip.persisted()) {
                Ok(()) => persisted = Some(digest),
                Err(e) => {
                    agent
                        .counters
                        .persist_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %format!("{e:#}"), "could not persist the replica");
                }
            }
        }
    }
}
