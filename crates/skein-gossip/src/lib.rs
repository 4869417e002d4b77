//! Membership, failure detection and replication of every node's keyspace.
//!
//! chitchat (scuttlebutt + phi-accrual) does the protocol; [`transport`]
//! carries it over mutually authenticated QUIC. This module turns chitchat's
//! view into the pure [`skein_state::Replica`] plus per-node liveness, which
//! is all the rest of the agent reads.

pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use chitchat::transport::Transport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use skein_state::{Entry, Liveness, NodeId, NodeKeyspace, NodeStatus, Replica};
use tokio::sync::mpsc;

/// `forget:<node>` = generation: the node is gone for good (see snapshot).
pub const FORGET_PREFIX: &str = "forget:";

/// Peers a node gossips with at once when it learns something new.
const EAGER_FANOUT: usize = 3;

pub use transport::{GossipStats, QuicTransport};

#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_id: NodeId,
    /// Increases on every restart of the agent; peers use it to tell a
    /// rebooted node from stale gossip about its previous life.
    pub generation: u64,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub cluster_id: String,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    /// A node whose heartbeat has not advanced for this long is `suspect`
    /// before the failure detector declares it `down`.
    pub suspect_after: Duration,
    /// How long a down node's keyspace (its tasks) is kept before it is
    /// forgotten cluster-wide.
    pub dead_node_grace: Duration,
    /// How long deletion tombstones are kept so that peers which missed the
    /// delete still learn of it.
    pub tombstone_grace: Duration,
}

impl GossipConfig {
    pub fn failure_detector(&self) -> FailureDetectorConfig {
        FailureDetectorConfig {
            phi_threshold: self.phi_threshold,
            // chitchat preallocates the window for every peer; 100 samples
            // give a stable mean at a tenth of the memory of its default.
            sampling_window_size: 100,
            // Heartbeats arrive every gossip round or so; intervals longer
            // than this are outliers (a pause) and would skew phi.
            max_interval: (self.gossip_interval * 20).max(Duration::from_secs(2)),
            initial_interval: self.gossip_interval * 2,
            dead_node_grace_period: self.dead_node_grace,
        }
    }
}

/// A running gossip participant.
pub struct Gossip {
    handle: Arc<ChitchatHandle>,
    /// Keeps the eager-push listener registered for the life of `Gossip`.
    _push_listener: chitchat::ListenerHandle,
    push: mpsc::Sender<()>,
    /// Counts key changes applied (local or from peers), for readers that
    /// want to refresh the moment something new arrives.
    key_changes: Arc<tokio::sync::watch::Sender<u64>>,
    config: GossipConfig,
    tracker: tokio::sync::Mutex<Tracker>,
}

/// What this node has seen of each peer, to derive `suspect` and timestamps.
#[derive(Default)]
struct Tracker {
    replica: Replica,
    /// node → (generation, heartbeat, when it last advanced)
    heartbeats: HashMap<NodeId, (u64, u64, Instant)>,
    /// node → (status, unix ms when it changed)
    statuses: HashMap<NodeId, (NodeStatus, u64)>,
    /// node → since when it has not been live
    down_since: HashMap<NodeId, Instant>,
    /// (node, generation) → max version already merged, to skip unchanged nodes.
    merged_versions: HashMap<(NodeId, u64), u64>,
    /// node → when this agent first heard of it, and whether it has been
    /// live since: a node just heard of is `suspect`, not `down`, until the
    /// failure detector has had time to judge it.
    first_seen: HashMap<NodeId, (Instant, bool)>,
}

/// A consistent read of the cluster as this node sees it.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    pub replica: Replica,
    pub liveness: BTreeMap<NodeId, Liveness>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Gossip {
    /// Starts gossiping. `initial` is this node's own keyspace (metadata and
    /// tasks restored from the data dir), published from the first round on;
    /// `persisted` is the replica saved before a restart, so that a whole
    /// cluster restart forgets nothing while peers come back.
    pub async fn start(
        config: GossipConfig,
        transport: &dyn Transport,
        initial: Vec<(String, String)>,
        persisted: Replica,
    ) -> anyhow::Result<Gossip> {
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                config.node_id.as_str(),
                config.generation,
                config.advertise,
            ),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: config.failure_detector(),
            marked_for_deletion_grace_period: config.tombstone_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let handle = Arc::new(spawn_chitchat(chitchat_config, initial, transport).await?);
        // Eager push: whenever a key changes here (a local write, or one
        // just learned from a peer), start a gossip exchange with a few live
        // peers right away instead of waiting for the next round. A change
        // then spreads at network speed, hop by hop, rather than one gossip
        // interval per hop; the bounded channel coalesces bursts.
        let (push, push_rx) = mpsc::channel(1);
        let key_changes = Arc::new(tokio::sync::watch::channel(0u64).0);
        let push_listener = {
            let push = push.clone();
            let key_changes = key_changes.clone();
            let chitchat = handle.chitchat();
            let guard = chitchat.lock().await;
            guard.subscribe_event("", move |_| {
                key_changes.send_modify(|n| *n = n.wrapping_add(1));
                let _ = push.try_send(());
            })
        };
        let min_gap = (config.gossip_interval / 4).max(Duration::from_millis(5));
        tokio::spawn(eager_push_loop(Arc::downgrade(&handle), push_rx, min_gap));
        let mut tracker = Tracker {
            replica: persisted,
            ..Tracker::default()
        };
        // Our own previous life is replaced by this generation.
        if config.generation > 0 {
            tracker
                .replica
                .remove_node(&config.node_id, config.generation - 1);
        }
        Ok(Gossip {
            handle,
            _push_listener: push_listener,
            push,
            key_changes,
            config,
            tracker: tokio::sync::Mutex::new(tracker),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    /// Publishes (or overwrites) a key of this node's keyspace.
    pub async fn set(&self, key: &str, value: &str) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        guard.self_node_state().set(key, value);
    }

    /// Deletes a key of this node's keyspace (a tombstone is gossiped).
    pub async fn delete(&self, key: &str) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        guard.self_node_state().delete(key);
        // Listeners do not hear of deletes; push this one ourselves.
        self.key_changes.send_modify(|n| *n = n.wrapping_add(1));
        let _ = self.push.try_send(());
    }

    /// Folds chitchat's current view into the replica and returns a copy with
    /// each node's liveness. Cheap for nodes that did not change.
    pub async fn snapshot(&self) -> ClusterSnapshot {
        let now = Instant::now();
        let now_ms = unix_ms();
        let chitchat = self.handle.chitchat();
        let mut tracker = self.tracker.lock().await;
        let tracker = &mut *tracker;
        // Per node id, the newest generation chitchat knows and whether it is live.
        let mut newest: BTreeMap<NodeId, (u64, bool, u64)> = BTreeMap::new();
        {
            let guard = chitchat.lock().await;
            let live: std::collections::HashSet<&ChitchatId> = guard.live_nodes().collect();
            for (id, state) in guard.node_states() {
                let node_id = id.node_id.to_string();
                let is_live = live.contains(id);
                let heartbeat = u64::from(state.heartbeat());
                let entry = newest.entry(node_id.clone()).or_insert((0, false, 0));
                if id.generation_id >= entry.0 {
                    *entry = (id.generation_id, is_live, heartbeat);
                }
                let key = (node_id.clone(), id.generation_id);
                let max_version = state.max_version();
                if tracker.merged_versions.get(&key) == Some(&max_version) {
                    continue;
                }
                let mut keyspace = NodeKeyspace {
                    generation: id.generation_id,
                    entries: BTreeMap::new(),
                };
                for (k, v) in state.key_values_including_deleted() {
                    keyspace.entries.insert(
                        k.to_string(),
                        Entry {
                            version: v.version,
                            value: (!v.is_deleted()).then(|| v.value.clone()),
                        },
                    );
                }
                tracker.replica.merge_node(&node_id, &keyspace);
                // chitchat garbage-collects tombstones: a key we hold that it
                // no longer has, at or below its GC floor, was deleted.
                let floor = state.last_gc_version();
                if floor > 0 {
                    tracker
                        .replica
                        .prune_absent(&node_id, id.generation_id, floor, &keyspace);
                }
                tracker.merged_versions.insert(key, max_version);
            }
        }

        // Nodes an operator removed for good (`forget:<node>` = generation,
        // published by whichever agent took the request): every node drops
        // them, and stale gossip about them cannot bring them back.
        let forgotten: Vec<(NodeId, u64)> = tracker
            .replica
            .nodes()
            .values()
            .flat_map(|ks| ks.live())
            .filter_map(|(k, v)| {
                Some((k.strip_prefix(FORGET_PREFIX)?.to_string(), v.parse().ok()?))
            })
            .collect();
        for (node, generation) in forgotten {
            if tracker
                .replica
                .node(&node)
                .is_some_and(|k| k.generation <= generation)
            {
                tracing::info!(node = %node, "forgetting a node removed by an operator");
                tracker.replica.remove_node(&node, generation);
            }
        }

        let mut liveness = BTreeMap::new();
        let mut forget = Vec::new();
        for (node_id, keyspace) in tracker.replica.nodes() {
            let status = match newest.get(node_id) {
                Some(&(generation, true, heartbeat)) if generation >= keyspace.generation => {
                    tracker.down_since.remove(node_id);
                    tracker.first_seen.insert(node_id.clone(), (now, true));
                    let hb = tracker
                        .heartbeats
                        .entry(node_id.clone())
                        .or_insert((generation, heartbeat, now));
                    if hb.0 != generation || hb.1 != heartbeat {
                        *hb = (generation, heartbeat, now);
                    }
                    let stale = now.duration_since(hb.2) > self.config.suspect_after;
                    let is_self = *node_id == self.config.node_id;
                    if stale && !is_self {
                        NodeStatus::Suspect
                    } else {
                        NodeStatus::Alive
                    }
                }
                _ => {
                    let since = *tracker.down_since.entry(node_id.clone()).or_insert(now);
                    if now.duration_since(since) > self.config.dead_node_grace {
                        forget.push((node_id.clone(), keyspace.generation));
                    }
                    let (first, ever_live) = *tracker
                        .first_seen
                        .entry(node_id.clone())
                        .or_insert((now, false));
                    let judging =
                        !ever_live && now.duration_since(first) < self.config.suspect_after;
                    if judging {
                        NodeStatus::Suspect
                    } else {
                        NodeStatus::Down
                    }
                }
            };
            let changed = tracker
                .statuses
                .get(node_id)
                .is_none_or(|&(s, _)| s != status);
            if changed {
                tracker.statuses.insert(node_id.clone(), (status, now_ms));
            }
            let updated = tracker.statuses.get(node_id).map_or(now_ms, |&(_, t)| t);
            liveness.insert(node_id.clone(), Liveness { status, updated });
        }
        for (node_id, generation) in forget {
            tracing::info!(node = %node_id, "forgetting node down for longer than the grace period");
            tracker.replica.remove_node(&node_id, generation);
            tracker.down_since.remove(&node_id);
            liveness.remove(&node_id);
        }
        ClusterSnapshot {
            replica: tracker.replica.clone(),
            liveness,
        }
    }

    /// Ticks whenever a key is set here or applied from a peer (and on local
    /// deletes): lets readers refresh the moment gossip brought something.
    pub fn key_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.key_changes.subscribe()
    }

    /// Changes whenever the set of live nodes changes (chitchat updates it
    /// once per gossip round).
    pub async fn membership_changes(
        &self,
    ) -> tokio::sync::watch::Receiver<impl Send + Sync + 'static> {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        guard.live_nodes_watcher()
    }

    /// Node ids the failure detector holds live right now (self included).
    pub async fn live_node_ids(&self) -> Vec<NodeId> {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let mut ids: Vec<NodeId> = guard
            .live_nodes()
            .map(|id| id.node_id.to_string())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Calls `callback(node_id, key, value)` whenever a key starting with
    /// `prefix` is set on any node, as gossip applies it. Used to measure
    /// propagation without polling; the callback must be quick.
    pub async fn on_key_change(
        &self,
        prefix: &str,
        callback: impl Fn(&str, &str, &str) + Send + Sync + 'static,
    ) -> chitchat::ListenerHandle {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        guard.subscribe_event(prefix, move |event| {
            callback(&event.node.node_id, event.key, event.value)
        })
    }

    /// Stops gossiping (peers will see this node go down).
    pub fn shutdown(&self) -> anyhow::Result<()> {
        self.handle.initiate_shutdown()
    }
}

/// Tiny xorshift: picking gossip targets needs spread, not cryptography.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn eager_push_loop(
    handle: Weak<ChitchatHandle>,
    mut changes: mpsc::Receiver<()>,
    min_gap: Duration,
) {
    let mut seed = unix_ms() | 1;
    while changes.recv().await.is_some() {
        let Some(handle) = handle.upgrade() else {
            return;
        };
        let mut peers: Vec<SocketAddr> = {
            let chitchat = handle.chitchat();
            let guard = chitchat.lock().await;
            let me = guard.self_chitchat_id().clone();
            guard
                .live_nodes()
                .filter(|id| **id != me)
                .map(|id| id.gossip_advertise_addr)
                .collect()
        };
        for _ in 0..EAGER_FANOUT.min(peers.len()) {
            let pick = (next_random(&mut seed) % peers.len() as u64) as usize;
            let _ = handle.gossip(peers.swap_remove(pick));
        }
        drop(handle);
        // Changes arriving meanwhile collapse into one more push.
        tokio::time::sleep(min_gap).await;
    }
}
