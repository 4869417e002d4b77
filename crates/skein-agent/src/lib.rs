//! The node agent: one per host. It restores this node's state from the data
//! dir, gossips with the cluster, keeps a fresh snapshot of the replica for
//! readers, and persists what must survive a restart.

mod command;
pub mod docs;
pub mod edge;
mod health;
mod ipvs;
pub mod l4lb;
pub mod metrics;
pub mod node_health;
pub mod overlay;
mod realize;
mod store;
pub mod tls;
pub mod view;
pub mod vip_stats;
mod vips;
pub mod vxlan;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use skein_gossip::{Gossip, GossipConfig, GossipStats, QuicTransport};
use skein_state::{
    task_key, validate_task_id, BadEntry, NodeMeta, NodeStatus, NodeView, TaskSpec, TaskView,
    META_KEY,
};
use tokio::sync::{watch, Mutex};
pub use view::{View, VipBackendView, VipView};

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
    /// Count (and time) VIP connections from conntrack. On the IPVS
    /// dataplane this turns connection tracking on for the whole host.
    pub vip_counts: bool,
    /// How often the kernel's VIP rules are checked for drift.
    pub l4lb_resync: Duration,
    /// The overlay networks, identical on every node.
    pub overlay: overlay::OverlayConfig,
    pub overlay_dataplane: vxlan::OverlayDataplane,
    /// How often the kernel's overlay entries are checked for drift.
    pub overlay_resync: Duration,
    /// The edge's service ports (`--edge-service-ports`), identical on
    /// every node.
    pub edge_service_ports: (u16, u16),
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

/// `GET /v1/tasks`.
#[derive(Debug, Serialize)]
pub struct TasksView {
    pub tasks: Vec<TaskView>,
    /// Published values that did not decode (a newer or broken peer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<BadEntry>,
}

/// A task provider's state (the Docker provider's): whether it runs, is
/// connected, and its counts.
#[derive(Debug, Default)]
pub struct ProviderStatus {
    /// 1 once a provider runs.
    pub running: AtomicU64,
    /// 1 while it follows its source (events and resyncs succeed).
    pub up: AtomicU64,
    pub events: AtomicU64,
    pub resyncs: AtomicU64,
    /// Times it lost its source (each retried).
    pub failures: AtomicU64,
    /// Why it is not up (empty when up).
    pub problem: std::sync::Mutex<String>,
}

pub struct Agent {
    config: AgentConfig,
    gossip: Gossip,
    store: Store,
    stats: Arc<GossipStats>,
    /// The gossip transport, whose TLS material `tls::watch` reloads.
    transport: Arc<QuicTransport>,
    /// Serializes own-task writes so the file and the gossip keyspace are
    /// updated in the same order.
    own_tasks: Mutex<BTreeMap<String, TaskSpec>>,
    /// What every reader reads: one [`View`] per refresh.
    view: watch::Sender<Arc<View>>,
    /// Bumped by writers that want to read their write: the refresh that
    /// starts after the bump publishes a view covering it.
    refresh_requests: AtomicU64,
    /// Whether the last view had a VIP address waiting to settle: only then
    /// does time alone change the next view.
    waits_on_time: std::sync::atomic::AtomicBool,
    refresh_kick: Arc<tokio::sync::Notify>,
    vip_allocator: std::sync::Mutex<vips::Allocator>,
    /// This node's service-port claims for the edge.
    edge_ports: std::sync::Mutex<edge::EdgePorts>,
    /// What computing the edge's routes for earlier views built (so a
    /// view costs what changed since).
    edge_cache: Arc<std::sync::Mutex<skein_edge::RouteCache>>,
    /// Whether a service port waits to settle (as `waits_on_time`).
    edge_waits_on_time: std::sync::atomic::AtomicBool,
    /// Tasks decoded per node keyspace, reused while the keyspace is.
    task_cache: std::sync::Mutex<skein_state::TaskCache>,
    /// VIP problems already logged, so each is logged once when it appears.
    logged_problems: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The cluster's DNS records, republished after every refresh.
    records: watch::Sender<Arc<skein_dns::Records>>,
    pub dns: Option<Arc<skein_dns::server::DnsServer>>,
    pub overlay: overlay::OverlayConfig,
    /// This node's lease claims as published (pool → claim).
    own_leases: Mutex<BTreeMap<String, skein_overlay::Claim>>,
    /// When this node's lease claims become settled.
    lease_settling: std::sync::Mutex<overlay::LeaseSettling>,
    /// Whether a lease claim waits to settle: time alone changes it.
    leases_settling: std::sync::atomic::AtomicBool,
    /// The VIP realizer's counters (nftables or IPVS).
    pub l4lb_realizer: Arc<realize::RealizerCounters>,
    /// The overlay realizer's counters and gauges.
    pub overlay_counters: Arc<vxlan::OverlayCounters>,
    /// What this node last published under `overlay:status`.
    overlay_status: Mutex<String>,
    /// Pools with no lease left for this node (shown in its status).
    lease_errors: Mutex<Vec<String>>,
    /// When an edge last asked for its routes (its health component).
    edge_polled: std::sync::Mutex<Option<Instant>>,
    /// Connections through each VIP, counted from conntrack's events.
    pub vip_stats: Arc<vip_stats::Shared>,
    /// The Docker provider's state, when one runs (it writes, `/metrics`
    /// and the node's health read).
    pub docker: ProviderStatus,
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
/// A view waiting on time alone (a VIP address settling) is rebuilt this
/// often even when nothing changed.
const MAX_VIEW_AGE: Duration = Duration::from_secs(1);

/// Hands memory freed by the previous view back to the kernel. A view of a
/// large cluster is tens of MB built and dropped per change; glibc keeps
/// freed chunks in its arenas, so without this the RSS is several times
/// what is live (measured: replica-mem-bench, docs/BENCHMARKS.md).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; it has no
    // preconditions and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets glibc's allocator for a long-lived process whose large values
/// (views, DNS records: megabytes each, rebuilt on every change) come and
/// go: at most two arenas (one per core here; each thread's own arena kept
/// its share of every freed view), and blocks of 64 KiB and more mapped on
/// their own, so that freeing a view's vectors returns them to the kernel at
/// once. The default threshold grows to 32 MiB after the first large free,
/// which put every later view on the heap, fragmented. Measured with
/// replica-mem-bench (docs/BENCHMARKS.md). Call before the runtime starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // the agent's threads allocate concurrently.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// This node's TLS material from `config.tls_dir`, refused (with what to
/// do) when the certificate names another node or cluster: what
/// [`Agent::start`] checks first, and `skein agent --check-config` too.
pub fn load_tls(config: &AgentConfig) -> anyhow::Result<skein_tls::NodeTls> {
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
    // The certificate names the cluster and peers check it at the
    // handshake; a node configured for another would be refused by all.
    if tls.cluster_id() != config.cluster_id {
        anyhow::bail!(
            "cluster id {:?} does not match the certificate in {} (issued for cluster {:?})",
            config.cluster_id,
            config.tls_dir.display(),
            tls.cluster_id()
        );
    }
    Ok(tls)
}

impl Agent {
    pub async fn start(config: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        let edge_service_ports = config.edge_service_ports;
        let store = Store::open(&config.data_dir)?;
        let tls = load_tls(&config)?;
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
        // they win again over anyone who claimed the same slot later, but
        // unsettled: if this node was down past the grace period and its
        // slot was leased and settled by another meanwhile, the slot stays
        // with that node (whose containers use it) and this one moves. It
        // settles again once it has synced.
        let own_leases: BTreeMap<String, skein_overlay::Claim> = own_leases
            .into_iter()
            .map(|(pool, claim)| {
                let claim = skein_overlay::Claim {
                    settled: false,
                    ..claim
                };
                (pool, claim)
            })
            .collect();
        for (pool, claim) in &own_leases {
            initial.push((
                format!("{}{pool}", overlay::LEASE_PREFIX),
                serde_json::to_string(claim)?,
            ));
        }

        let stats = Arc::new(GossipStats::default());
        let signer = tls.gossip_signer()?;
        let transport = Arc::new(QuicTransport::new(Arc::new(tls), stats.clone()));
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
        let (view, _) = watch::channel(Arc::new(View::empty(&config.node_id, &overlay)));
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
            transport,
            own_tasks: Mutex::new(own_tasks),
            view,
            refresh_requests: AtomicU64::new(0),
            waits_on_time: std::sync::atomic::AtomicBool::new(false),
            refresh_kick: Arc::new(tokio::sync::Notify::new()),
            vip_allocator: Default::default(),
            edge_ports: std::sync::Mutex::new(edge::EdgePorts::new(edge_service_ports)),
            edge_waits_on_time: std::sync::atomic::AtomicBool::new(false),
            edge_cache: Default::default(),
            task_cache: Default::default(),
            logged_problems: Default::default(),
            overlay,
            own_leases: Mutex::new(own_leases),
            lease_settling: std::sync::Mutex::new(overlay::LeaseSettling::default()),
            leases_settling: std::sync::atomic::AtomicBool::new(false),
            records,
            dns,
            l4lb_realizer: Default::default(),
            overlay_counters: Default::default(),
            overlay_status: Mutex::new(String::new()),
            lease_errors: Mutex::new(Vec::new()),
            edge_polled: std::sync::Mutex::new(None),
            vip_stats: Arc::default(),
            docker: ProviderStatus::default(),
            started: Instant::now(),
            counters: Counters::default(),
        });
        // Readers never see the empty view: the first refresh happens here.
        let first = agent.build_view(1).await;
        agent.publish_view(first).await;
        tokio::spawn(refresh_loop(Arc::downgrade(&agent)));
        tokio::spawn(tls::watch(Arc::downgrade(&agent.transport)));
        tokio::spawn(health::run(Arc::downgrade(&agent)));
        tokio::spawn(node_health::run(Arc::downgrade(&agent)));
        // The DNAT (nftables) or masquerading (IPVS, with
        // net.ipv4.vs.conntrack) happens in this namespace: its conntrack
        // events say how each VIP connection went.
        let count_vips = |agent: &Arc<Agent>| {
            let (weak, shared) = (Arc::downgrade(agent), agent.vip_stats.clone());
            if let Err(e) = std::thread::Builder::new()
                .name("vip-stats".into())
                .spawn(move || vip_stats::run(weak, shared))
            {
                tracing::warn!(error = %e, "cannot start counting VIP connections");
            }
        };
        match agent.config.l4lb_dataplane {
            l4lb::Dataplane::Nftables => {
                agent.spawn_l4lb(l4lb::NftDataplane::new(l4lb::HostNftables::default()));
                ipvs::untrack_connections();
                if agent.config.vip_counts {
                    count_vips(&agent);
                }
            }
            l4lb::Dataplane::Ipvs => {
                agent.spawn_l4lb(ipvs::IpvsDataplane::new(ipvs::HostIpvs::new(
                    agent.config.vip_counts,
                )));
                if agent.config.vip_counts {
                    count_vips(&agent);
                } else {
                    ipvs::untrack_connections();
                }
            }
            l4lb::Dataplane::None => {
                tracing::info!("L4LB dataplane: none (VIPs computed, kernel untouched)")
            }
        }
        tracing::info!(dataplane = ?agent.config.l4lb_dataplane, "L4LB dataplane");
        if agent.config.overlay_dataplane == vxlan::OverlayDataplane::Vxlan {
            vxlan::start(&agent);
        }
        Ok(agent)
    }

    /// Runs the VIP dataplane on the realizer driver.
    fn spawn_l4lb<D: realize::Dataplane>(&self, dataplane: D) {
        let driver = realize::Driver::new(dataplane, self.l4lb_realizer.clone());
        tokio::spawn(realize::run(
            driver,
            self.view.subscribe(),
            self.l4lb_pacing(),
            self.started,
        ));
    }

    /// After a restart the kernel still holds the previous agent's VIP
    /// rules, which keep serving: they are not touched before VIP addresses
    /// have had time to be agreed again.
    fn l4lb_pacing(&self) -> realize::Pacing {
        realize::Pacing {
            warm_up: vips::SETTLE + Duration::from_secs(1),
            resync: self.config.l4lb_resync,
            retry: Duration::from_millis(250),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn gossip_stats(&self) -> &GossipStats {
        &self.stats
    }

    /// Counters and expiry of the TLS material in use.
    pub fn tls_stats(&self) -> Arc<skein_tls::TlsStats> {
        self.transport.tls().stats().clone()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// This node's own tasks, as stored.
    pub async fn own_tasks_snapshot(&self) -> Vec<(String, TaskSpec)> {
        let own = self.own_tasks.lock().await;
        own.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The latest view (at most [`SNAPSHOT_INTERVAL`] old).
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn subscribe_view(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// Waits for a view that includes everything written before this call
    /// (a writer reads its own write). Gives up after a second: the write
    /// is durable either way, and the next refresh shows it.
    async fn fresh_view(&self) -> Arc<View> {
        let wanted = self.refresh_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.view.subscribe();
        self.refresh_kick.notify_one();
        let covered = tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|v| v.covers_request >= wanted),
        )
        .await;
        match covered {
            Ok(Ok(view)) => view.clone(),
            _ => self.view(),
        }
    }

    /// One refresh: a snapshot of the replica, this node's VIP claims
    /// reconciled against it, and the view derived from both.
    async fn build_view(&self, seq: u64) -> View {
        let covers = self.refresh_requests.load(Ordering::SeqCst);
        let snap = self.gossip.snapshot().await;
        // Tasks are decoded once per refresh, for the allocation and the view.
        let tasks = match self.task_cache.lock() {
            Ok(mut cache) => cache.tasks(&snap.replica, &snap.liveness),
            Err(_) => skein_state::tasks(&snap.replica, &snap.liveness),
        };
        let addresses = self.reconcile_vip_claims(&snap, &tasks.0).await;
        let edge_ports = self.reconcile_edge_ports(&snap, &tasks.0).await;
        let mut view = View::build_with_tasks(
            seq,
            &self.config.node_id,
            snap,
            tasks,
            addresses,
            &self.overlay,
        );
        view.covers_request = covers;
        view.edge_ports = edge_ports;
        view.edge_cache = self.edge_cache.clone();
        view
    }

    /// Makes `view` the one every reader sees, and hands DNS its records
    /// when they changed.
    async fn publish_view(&self, mut view: View) -> Arc<View> {
        let served = self.records.borrow().clone();
        if served.digest() == view.records.digest() && *served == *view.records {
            // Unchanged: the view shares the set DNS already serves rather
            // than keeping a second copy alive.
            view.records = served;
        } else {
            self.records.send_replace(view.records.clone());
        }
        let view = Arc::new(view);
        self.view.send_replace(view.clone());
        view
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        self.view().nodes.clone()
    }

    pub fn tasks(&self) -> TasksView {
        let view = self.view();
        TasksView {
            tasks: view.tasks.clone(),
            invalid: view.invalid.clone(),
        }
    }

    /// VIPs declared by the cluster's tasks, with their backends and
    /// addresses, and the labels or VIPs that could not be used.
    pub fn vips(&self) -> (Vec<VipView>, Vec<skein_l4lb::VipProblem>) {
        let view = self.view();
        (view.vips.clone(), view.vip_problems.clone())
    }

    /// Connections through each VIP and to each backend, as this node's
    /// kernel saw them (`None`: not counted here).
    pub fn vip_stats(&self) -> Option<Vec<vip_stats::VipStats>> {
        if self
            .vip_stats
            .running
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(
            self.vip_stats
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .report(now),
        )
    }

    /// The cluster's DNS records as this node derives them.
    pub fn records(&self) -> Arc<skein_dns::Records> {
        self.view().records.clone()
    }

    /// Whether this node's replica includes the rest of the cluster: it has
    /// received a peer's state since it started (a replica restored from
    /// the data dir does not count) and a peer is alive, or there are no
    /// seeds to wait for. Only then are its lease and VIP claims marked
    /// settled (a settled claim beats every claim its node never saw, so it
    /// must not be one made before the first sync).
    fn synced(&self, liveness: &BTreeMap<String, skein_state::Liveness>) -> bool {
        let me = &self.config.node_id;
        self.config.seeds.is_empty()
            || (self.gossip.joined()
                && liveness
                    .iter()
                    .any(|(n, l)| n != me && l.status == NodeStatus::Alive))
    }

    /// Claims (or keeps) this node's overlay leases; persisted before they
    /// are published so a restart reclaims the same ones.
    async fn reconcile_leases(&self, view: &View) {
        let (mut desired, exhausted) = match overlay::desired(
            &self.overlay,
            &view.replica,
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
        let synced = self.synced(&view.liveness);
        let waiting = match self.lease_settling.lock() {
            Ok(mut s) => s.step(&mut desired, &own, synced, Instant::now(), vips::SETTLE),
            Err(_) => false,
        };
        self.leases_settling.store(waiting, Ordering::Relaxed);
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
                    if claim.settled {
                        tracing::info!(pool, slot = claim.slot, "overlay lease settled");
                    } else {
                        tracing::info!(pool, slot = claim.slot, "claiming overlay lease");
                    }
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
        let view = self.view();
        let mut forgotten = Vec::new();
        for ip in ips {
            let node = view
                .nodes
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
        self.fresh_view().await;
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
    pub fn overlay_state(&self) -> anyhow::Result<docs::OverlayMasterState> {
        let view = self.view();
        view.overlay_state()
            .cloned()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Counts and logs the nodes whose status changed between two views.
    fn log_membership_changes(&self, previous: &View, next: &View) {
        for (node, live) in &next.liveness {
            let before = previous.liveness.get(node).map(|l| l.status);
            if before != Some(live.status) {
                self.counters.status_changes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(node = %node, status = live.status.as_str(), "membership change");
            }
        }
    }

    /// Logs each VIP problem (bad label, colliding IP VIP) once, when it
    /// first appears, so operators see it in the logs as well as the API.
    fn log_new_vip_problems(&self, view: &View) {
        let problems = &view.vip_problems;
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
    async fn reconcile_vip_claims(
        &self,
        snap: &skein_gossip::ClusterSnapshot,
        tasks: &[TaskView],
    ) -> BTreeMap<String, std::net::Ipv4Addr> {
        let outcome = match self.vip_allocator.lock() {
            Ok(mut allocator) => allocator.reconcile_tasks(
                &self.config.node_id,
                &snap.replica,
                tasks,
                Instant::now(),
                unix_ms(),
                self.synced(&snap.liveness),
            ),
            Err(_) => return self.view().vip_addresses.clone(),
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
        self.waits_on_time
            .store(outcome.waits_on_time, Ordering::Relaxed);
        // Only addresses that may be handed out reach users and the kernel.
        outcome
            .addresses
            .into_iter()
            .filter_map(|(vip, (ip, usable))| usable.then_some((vip, ip)))
            .collect()
    }

    /// Publishes this node's claims of edge service ports for the exposed
    /// app ports it hosts; returns the ports usable now.
    async fn reconcile_edge_ports(
        &self,
        snap: &skein_gossip::ClusterSnapshot,
        tasks: &[TaskView],
    ) -> BTreeMap<skein_edge::routes::PortKey, skein_edge::routes::ServicePort> {
        let outcome = match self.edge_ports.lock() {
            Ok(mut ports) => ports.reconcile(
                &self.config.node_id,
                &snap.replica,
                tasks,
                Instant::now(),
                unix_ms(),
                self.synced(&snap.liveness),
            ),
            Err(_) => return self.view().edge_ports.clone(),
        };
        for (key, json) in &outcome.publish {
            self.gossip.set(key, json).await;
        }
        for key in &outcome.withdraw {
            tracing::info!(key, "withdrawing edge service-port claim");
            self.gossip.delete(key).await;
        }
        self.edge_waits_on_time
            .store(outcome.waits_on_time, Ordering::Relaxed);
        outcome.ports
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
        let created = !own.contains_key(id);
        let op = store::TaskOp::Put {
            id: id.to_string(),
            spec,
        };
        self.store
            .record_task(&op, &own)
            .map_err(AgentError::Storage)?;
        if let store::TaskOp::Put { id, spec } = op {
            own.insert(id, spec);
        }
        self.gossip.set(&task_key(id), &value).await;
        drop(own);
        self.counters.task_writes.fetch_add(1, Ordering::Relaxed);
        self.fresh_view().await;
        tracing::info!(task = id, created, "task registered");
        Ok(created)
    }

    /// The address peers reach this node on (a provider's tasks published
    /// on the host use it).
    pub fn advertise(&self) -> std::net::IpAddr {
        self.config.advertise
    }

    /// A task's health as something outside the agent judged it (Docker's
    /// health check): published like the agent's own checks' verdicts, an
    /// unhealthy task's ports getting no new VIP connections; `None`
    /// withdraws it. For tasks without a `health_check` of their own.
    pub async fn set_task_health(&self, id: &str, healthy: Option<bool>) {
        let key = skein_state::health_key(id);
        match healthy {
            Some(true) => self.gossip.set(&key, "healthy").await,
            Some(false) => self.gossip.set(&key, skein_state::UNHEALTHY).await,
            None => self.gossip.delete(&key).await,
        }
        self.fresh_view().await;
    }

    /// Removes a task of this node. Tasks of other nodes are theirs to remove.
    pub async fn delete_task(&self, id: &str) -> Result<(), AgentError> {
        validate_task_id(id).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let mut own = self.own_tasks.lock().await;
        if !own.contains_key(id) {
            let elsewhere = self
                .view()
                .tasks
                .iter()
                .find(|t| t.id == id)
                .map(|t| t.node_id.clone());
            return Err(match elsewhere {
                Some(node) => AgentError::BadRequest(format!(
                    "task {id} belongs to node {node}; delete it through that node's agent"
                )),
                None => AgentError::NotFound(format!("task {id}")),
            });
        }
        self.store
            .record_task(&store::TaskOp::Delete { id: id.to_string() }, &own)
            .map_err(AgentError::Storage)?;
        own.remove(id);
        self.gossip.delete(&task_key(id)).await;
        drop(own);
        self.counters.task_deletes.fetch_add(1, Ordering::Relaxed);
        self.fresh_view().await;
        tracing::info!(task = id, "task removed");
        Ok(())
    }

    /// `GET /v1/state`: every node's published keyspace with versions, plus
    /// this node's view of their liveness.
    pub fn state_json(&self) -> docs::State {
        let view = self.view();
        let nodes = view
            .replica
            .nodes()
            .iter()
            .map(|(id, ks)| {
                let keys = ks
                    .entries
                    .iter()
                    .map(|(k, e)| {
                        // Values are JSON documents; show them as such.
                        let value = e.value.as_ref().map(|v| {
                            serde_json::from_str(v)
                                .unwrap_or_else(|_| serde_json::Value::String(v.to_string()))
                        });
                        let key = docs::StateKey {
                            deleted: e.value.is_none(),
                            value,
                            version: e.version,
                        };
                        (k.clone(), key)
                    })
                    .collect();
                let node = docs::StateNode {
                    generation: ks.generation,
                    keys,
                    max_version: ks.max_version(),
                    status: view.status_of(id),
                };
                (id.clone(), node)
            })
            .collect();
        docs::State {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id.clone(),
            nodes,
            removed: view.replica.removed().clone(),
        }
    }
}

/// Keeps the readers' view fresh, logs membership changes and persists
/// the replica when it changed. Ends when the agent is dropped.
async fn refresh_loop(agent: std::sync::Weak<Agent>) {
    let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_persist = Instant::now();
    // The gossip digest of what was last written (not a replica copy).
    let mut persisted: Option<u64> = None;
    let (mut generation, mut keys, mut members, kick) = match agent.upgrade() {
        Some(agent) => (
            agent.gossip.generation(),
            agent.gossip.key_changes(),
            agent.gossip.membership_changes().await,
            agent.refresh_kick.clone(),
        ),
        None => return,
    };
    let mut last_build: Option<Instant> = None;
    let mut liveness: Option<u64> = None;
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            _ = kick.notified() => false,
            changed = keys.changed() => if changed.is_err() { return } else { false },
            changed = members.changed() => if changed.is_err() { return } else { false },
        };
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
        // A view is rebuilt when something changed, and every MAX_VIEW_AGE
        // while something depends on time alone (a VIP address waiting to
        // settle): an idle cluster of thousands of tasks is not re-derived
        // at all (each rebuild holds two views at once).
        // A status change that is no membership event (a suspicion, its
        // refutation) is shown within MAX_VIEW_AGE, not at once: under load
        // they come and go in bursts, and each rebuild wakes every realizer.
        let live = agent.gossip.liveness_digest();
        let aged = last_build.is_none_or(|t| t.elapsed() >= MAX_VIEW_AGE);
        let due = !ticked
            || (aged
                && (liveness != Some(live)
                    || agent.waits_on_time.load(Ordering::Relaxed)
                    || agent.edge_waits_on_time.load(Ordering::Relaxed)
                    || agent.leases_settling.load(Ordering::Relaxed)));
        if due {
            last_build = Some(Instant::now());
            liveness = Some(live);
            let previous = agent.view();
            let next = agent.build_view(previous.seq.wrapping_add(1)).await;
            let next = agent.publish_view(next).await;
            agent.log_membership_changes(&previous, &next);
            agent.log_new_vip_problems(&next);
            agent.reconcile_leases(&next).await;
            drop((previous, next));
            release_freed_memory();
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
