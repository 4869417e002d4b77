//! Membership, failure detection and replication of every node's keyspace.
//!
//! The protocol is [`skein_proto`] (sans IO); this crate drives it: one
//! task owns the [`skein_proto::Node`], feeds it the messages [`transport`]
//! receives over mutually authenticated QUIC and the passing of time, sends
//! what it wants sent, and folds what it reports into the pure
//! [`skein_state::Replica`] plus per-node liveness, which is all the rest of
//! the agent reads. Everything a node publishes is signed with its node key
//! ([`keys`]); peers verify it before merging, whoever relayed it.

pub mod keys;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skein_proto::wire::{self, DecodeError, OriginData};
use skein_proto::{Config, Event, Micros, Name, Node, Refusal, Status};
use skein_state::{Entry, Liveness, NodeId, NodeKeyspace, NodeStatus, Replica};
use tokio::sync::{watch, Notify};

pub use keys::CertKeys;
pub use transport::{GossipStats, QuicSocket, QuicTransport};

/// `forget:<node>` = generation: an operator removed the node (honoured
/// while it is down; a node heard alive again comes back).
pub const FORGET_PREFIX: &str = "forget:";

/// Why gossip could not start or a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("invalid node id {0:?}")]
    InvalidNodeId(String),
    #[error("no randomness for the gossip protocol")]
    NoRandomness,
    /// The core refused a write of this node's own keyspace (a cap).
    #[error("cannot publish {key}: {reason}")]
    Refused { key: String, reason: String },
    /// The protocol task ended: the view would be frozen.
    #[error("the gossip protocol task has stopped")]
    Stopped,
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
}

#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_id: NodeId,
    /// Increases on every restart of the agent; peers use it to tell a
    /// restarted node from stale gossip about its previous life.
    pub generation: u64,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub cluster_id: String,
    /// How often each node heartbeats its ring neighbours.
    pub gossip_interval: Duration,
    /// A neighbour silent this long is suspected (two observers make it
    /// down everywhere).
    pub suspect_after: Duration,
    /// How long a down node's keyspace (its tasks) is kept before it is
    /// removed here; a node heard alive again comes back.
    pub dead_node_grace: Duration,
    /// How long deletion tombstones are kept so that peers which missed the
    /// delete still learn of it.
    pub tombstone_grace: Duration,
}

impl GossipConfig {
    fn core(&self) -> Config {
        let mut c = Config::new(&self.cluster_id);
        let us = |d: Duration| d.as_micros() as Micros;
        c.heartbeat_interval = us(self.gossip_interval).max(10_000);
        c.suspect_after = us(self.suspect_after).max(2 * c.heartbeat_interval);
        c.dead_node_grace = us(self.dead_node_grace);
        c.tombstone_grace = us(self.tombstone_grace);
        c
    }
}

/// A consistent read of the cluster as this node sees it.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    pub replica: Replica,
    pub liveness: BTreeMap<NodeId, Liveness>,
}

/// What the protocol task and the readers share.
struct Shared {
    node: Node<CertKeys>,
    /// Microsecond clock origin of the core, and the same instant in unix ms.
    epoch: Instant,
    epoch_unix_ms: u64,
    replica: Replica,
    /// Origins whose keyspace changed since the last snapshot.
    dirty: BTreeSet<Name>,
    gone: BTreeSet<Name>,
    /// Refusals already logged (once per kind and sender).
    logged: BTreeSet<(u8, Name)>,
}

impl Shared {
    fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as Micros
    }
}

/// A running gossip participant.
pub struct Gossip {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    key_changes: Arc<watch::Sender<u64>>,
    membership: Arc<watch::Sender<u64>>,
    config: GossipConfig,
    stats: Arc<GossipStats>,
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic inside the core is a bug that must not freeze the view:
    // the task that panicked ends, and `ensure_running` reports it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Gossip {
    /// Starts gossiping. `initial` is this node's own keyspace (metadata and
    /// tasks restored from the data dir), published from the first moment;
    /// `persisted` is what [`Gossip::persisted`] returned before a restart
    /// (signed state of every node), so that a whole-cluster restart forgets
    /// nothing while peers come back.
    pub async fn start(
        config: GossipConfig,
        transport: &QuicTransport,
        signer: skein_tls::GossipSigner,
        initial: Vec<(String, String)>,
        persisted: &[u8],
    ) -> Result<Gossip, GossipError> {
        let me = Name::intern(&config.node_id)
            .ok_or_else(|| GossipError::InvalidNodeId(config.node_id.clone()))?;
        let identity = Arc::new(skein_proto::Identity(signer.identity().to_vec()));
        let socket = transport.open(config.listen).await?;
        let stats = transport.stats();
        let epoch = Instant::now();
        let seed = u64::from_le_bytes(
            ring_random()
                .ok_or(GossipError::NoRandomness)?
                .to_le_bytes(),
        );
        let mut node = Node::new(
            config.core(),
            CertKeys(signer),
            me,
            config.advertise,
            identity,
            config.generation,
            seed,
            0,
        );
        for (k, v) in &initial {
            node.write(0, k, Some(v))
                .map_err(|r| GossipError::Refused {
                    key: k.clone(),
                    reason: format!("{r:?}"),
                })?;
        }
        let restored = restore(&mut node, persisted);
        if restored > 0 {
            tracing::info!(nodes = restored, "restored the persisted replica");
        }
        let seeds = resolve(&config.seeds).await;
        node.join(0, seeds);
        let shared = Arc::new(Mutex::new(Shared {
            node,
            epoch,
            epoch_unix_ms: unix_ms(),
            replica: Replica::new(),
            dirty: BTreeSet::new(),
            gone: BTreeSet::new(),
            logged: BTreeSet::new(),
        }));
        {
            let mut s = lock(&shared);
            let all: Vec<Name> = s.node.members().map(|m| m.name).collect();
            s.dirty.extend(all);
            while s.node.poll_event().is_some() {}
        }
        let wake = Arc::new(Notify::new());
        let key_changes = Arc::new(watch::channel(0u64).0);
        let membership = Arc::new(watch::channel(0u64).0);
        let generation = Arc::new(AtomicU64::new(config.generation));
        let task = tokio::spawn(run(
            shared.clone(),
            socket,
            wake.clone(),
            key_changes.clone(),
            membership.clone(),
            stats.clone(),
            generation.clone(),
            config.clone(),
        ));
        Ok(Gossip {
            shared,
            wake,
            key_changes,
            membership,
            config,
            stats,
            generation,
            task,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    pub fn stats(&self) -> &GossipStats {
        &self.stats
    }

    /// This node's generation: the one it started with, or a higher one if
    /// it met a newer life of itself (the agent persists it).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether this node has received a peer's state since it started (or
    /// has no seeds: a cluster of one). A replica restored from the data dir
    /// does not count: it may be long out of date.
    pub fn joined(&self) -> bool {
        lock(&self.shared).node.joined()
    }

    /// Fails if the protocol task has stopped: the view would be frozen.
    pub fn ensure_running(&self) -> Result<(), GossipError> {
        if self.task.is_finished() {
            return Err(GossipError::Stopped);
        }
        Ok(())
    }

    fn write(&self, key: &str, value: Option<&str>) -> Result<(), GossipError> {
        {
            let mut s = lock(&self.shared);
            let now = s.now();
            s.node
                .write(now, key, value)
                .map_err(|r| GossipError::Refused {
                    key: key.to_string(),
                    reason: format!("{r:?}"),
                })?;
            let me = s.node.name();
            s.dirty.insert(me);
        }
        self.key_changes.send_modify(|n| *n = n.wrapping_add(1));
        self.wake.notify_one();
        Ok(())
    }

    /// Publishes (or overwrites) a key of this node's keyspace.
    pub async fn set(&self, key: &str, value: &str) {
        if let Err(e) = self.write(key, Some(value)) {
            tracing::warn!(error = %e, "gossip write refused");
        }
    }

    /// Deletes a key of this node's keyspace (a tombstone is gossiped).
    pub async fn delete(&self, key: &str) {
        if let Err(e) = self.write(key, None) {
            tracing::warn!(error = %e, "gossip delete refused");
        }
    }

    /// The replica and each node's liveness, as of now. Cheap for nodes
    /// that did not change.
    pub async fn snapshot(&self) -> ClusterSnapshot {
        let mut s = lock(&self.shared);
        let s = &mut *s;
        let now = s.now();
        for n in std::mem::take(&mut s.dirty) {
            let Some(m) = s.node.member(n) else {
                s.replica.drop_node(n.as_str());
                continue;
            };
            if matches!(m.status, Status::Removed | Status::Left) {
                s.replica.drop_node(n.as_str());
                continue;
            }
            let entries = s
                .node
                .entries(n)
                .iter()
                .map(|e| {
                    (
                        e.key.clone(),
                        Entry {
                            version: e.version,
                            value: e.value.clone(),
                        },
                    )
                })
                .collect();
            s.replica.replace_node(
                n.as_str(),
                NodeKeyspace {
                    generation: m.gen,
                    entries,
                },
            );
        }
        // Operator removals published by any agent (read after the updates
        // above, so a removal acts in the refresh that brings it): honoured
        // for nodes this node holds down (a live node is never evicted
        // this way).
        let forgotten: Vec<Name> = s
            .replica
            .nodes()
            .values()
            .flat_map(|ks| ks.live())
            .filter_map(|(k, _)| Name::lookup(k.strip_prefix(FORGET_PREFIX)?))
            .collect();
        let mut forgot = false;
        for n in forgotten {
            if s.node.forget(now, n) {
                tracing::info!(node = %n, "forgetting a node removed by an operator");
                s.gone.insert(n);
                forgot = true;
            }
        }
        if forgot {
            // The protocol task reports (and counts) the events.
            self.wake.notify_one();
        }
        for n in std::mem::take(&mut s.gone) {
            s.replica.drop_node(n.as_str());
        }
        let mut liveness = BTreeMap::new();
        for m in s.node.members() {
            let status = match m.status {
                Status::Alive => NodeStatus::Alive,
                Status::Suspect => NodeStatus::Suspect,
                Status::Down => NodeStatus::Down,
                Status::Removed | Status::Left => continue,
            };
            let updated = s.epoch_unix_ms + m.since / 1000;
            liveness.insert(m.name.as_str().to_string(), Liveness { status, updated });
        }
        ClusterSnapshot {
            replica: s.replica.clone(),
            liveness,
        }
    }

    /// A hash of every member's liveness: it changes whenever any node's
    /// status does, suspicions and refutations included (the protocol
    /// reports no event for those), without building a snapshot.
    pub fn liveness_digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let s = lock(&self.shared);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for m in s.node.members() {
            (m.name.as_str(), m.status as u8).hash(&mut h);
        }
        h.finish()
    }

    /// Everything held about every node, signed, for the data dir: what
    /// [`Gossip::start`] takes back after a restart.
    pub fn persisted(&self) -> Vec<u8> {
        let s = lock(&self.shared);
        let data: Vec<OriginData> = s
            .node
            .members()
            .filter(|m| m.status.is_up() || m.status == Status::Down)
            .filter_map(|m| s.node.origin_data(m.name))
            .collect();
        postcard::to_allocvec(&(PERSIST_VERSION, data)).unwrap_or_default()
    }

    /// A hash of everything held about every node: changes whenever the
    /// persisted state would (cheaper than comparing replicas).
    pub fn digest(&self) -> u64 {
        lock(&self.shared).node.digest()
    }

    /// Ticks whenever a key is set here or applied from a peer: lets
    /// readers refresh the moment gossip brought something.
    pub fn key_changes(&self) -> watch::Receiver<u64> {
        self.key_changes.subscribe()
    }

    /// Ticks whenever a node comes up, goes down, or is removed.
    pub async fn membership_changes(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Node ids held up right now (self included).
    pub async fn live_node_ids(&self) -> Vec<NodeId> {
        let s = lock(&self.shared);
        let mut ids: Vec<NodeId> = s
            .node
            .members()
            .filter(|m| m.status.is_up())
            .map(|m| m.name.as_str().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Stops gossiping (peers will see this node go down).
    pub fn shutdown(&self) -> Result<(), GossipError> {
        self.task.abort();
        Ok(())
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Format tag of [`Gossip::persisted`].
const PERSIST_VERSION: u8 = 1;

/// Whether `persisted` (what [`Gossip::persisted`] wrote) is readable by
/// this version: `Err` says why not. Signatures are checked at restore.
pub fn check_persisted(persisted: &[u8]) -> Result<(), String> {
    match postcard::from_bytes::<(u8, Vec<OriginData>)>(persisted) {
        Ok((PERSIST_VERSION, _)) => Ok(()),
        Ok((v, _)) => Err(format!("format {v}, this version reads {PERSIST_VERSION}")),
        Err(e) => Err(e.to_string()),
    }
}

fn restore(node: &mut Node<CertKeys>, persisted: &[u8]) -> usize {
    if persisted.is_empty() {
        return 0;
    }
    match postcard::from_bytes::<(u8, Vec<OriginData>)>(persisted) {
        Ok((PERSIST_VERSION, data)) => {
            let n = data.len();
            for d in data {
                node.restore(0, d);
            }
            n
        }
        Ok((v, _)) => {
            tracing::warn!(
                version = v,
                "persisted replica of another format; starting without it"
            );
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "persisted replica unreadable; starting without it");
            0
        }
    }
}

fn ring_random() -> Option<u64> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

async fn resolve(seeds: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for seed in seeds {
        match tokio::net::lookup_host(seed.as_str()).await {
            Ok(addrs) => out.extend(addrs.take(1)),
            Err(e) => tracing::warn!(%seed, error = %e, "cannot resolve seed"),
        }
    }
    out
}

/// Records what an event means for the replica view and the watchers.
/// Returns (keys changed, membership changed).
fn note_event(s: &mut Shared, e: &Event) -> (bool, bool) {
    match e {
        Event::Entry(entry) => {
            s.dirty.insert(entry.origin);
            (true, false)
        }
        Event::Reset(n) => {
            s.dirty.insert(*n);
            (true, false)
        }
        Event::Up(n) => {
            s.dirty.insert(*n);
            (true, true)
        }
        Event::Down(_) => (false, true),
        Event::Removed(n) | Event::Left(n) => {
            s.gone.insert(*n);
            (true, true)
        }
        Event::Generation(_) => {
            let me = s.node.name();
            s.dirty.insert(me);
            (true, false)
        }
        Event::Refused(..) => (false, false),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    shared: Arc<Mutex<Shared>>,
    mut socket: QuicSocket,
    wake: Arc<Notify>,
    key_changes: Arc<watch::Sender<u64>>,
    membership: Arc<watch::Sender<u64>>,
    stats: Arc<GossipStats>,
    generation: Arc<AtomicU64>,
    config: GossipConfig,
) {
    let cluster = config.core().cluster;
    let mut logged_version = false;
    loop {
        let deadline = {
            let s = lock(&shared);
            s.epoch + Duration::from_micros(s.node.next_deadline())
        };
        // What arrived or is due is handled, and what it caused drained,
        // under one lock: readers never see half of it.
        let input = tokio::select! {
            received = socket.recv() => {
                let Ok((addr, peer, bytes)) = received else {
                    tracing::error!("gossip endpoint closed; the protocol task stops");
                    return;
                };
                match wire::decode(&bytes, cluster, transport::MAX_MESSAGE_SIZE) {
                    Ok(body) => Name::intern(&peer).map(|from| (from, body)),
                    Err(DecodeError::Version(v)) => {
                        stats.version_mismatch.fetch_add(1, Ordering::Relaxed);
                        if !logged_version {
                            logged_version = true;
                            tracing::warn!(%addr, %peer, version = v, ours = wire::WIRE_VERSION,
                                "refused a gossip peer speaking another wire version");
                        }
                        continue;
                    }
                    Err(DecodeError::Cluster) => {
                        stats.wrong_cluster.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%addr, %peer, "refused a message of another cluster");
                        continue;
                    }
                    Err(e) => {
                        stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%addr, %peer, error = %e, "undecodable gossip message");
                        continue;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => None,
            _ = wake.notified() => None,
        };
        let (out, keys, members) = {
            let mut s = lock(&shared);
            let s = &mut *s;
            let now = s.now();
            match input {
                Some((from, body)) => s.node.handle(now, from, body),
                None => s.node.tick(now),
            }
            let mut out = Vec::new();
            while let Some(t) = s.node.poll_transmit() {
                out.push((t.addr, wire::encode(cluster, &t.body)));
            }
            let (mut keys, mut members) = (false, false);
            while let Some(e) = s.node.poll_event() {
                let (k, m) = note_event(s, &e);
                keys |= k;
                members |= m;
                log_event(s, &e, &stats);
            }
            generation.store(s.node.generation(), Ordering::Relaxed);
            (out, keys, members)
        };
        for (addr, bytes) in out {
            socket.send(addr, bytes);
        }
        if keys {
            key_changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        if members {
            membership.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

fn log_event(s: &mut Shared, e: &Event, stats: &GossipStats) {
    match e {
        Event::Up(n) => tracing::debug!(node = %n, "node up"),
        Event::Down(n) => tracing::info!(node = %n, "node down"),
        Event::Removed(n) => tracing::info!(node = %n, "node removed after the dead-node grace"),
        Event::Left(n) => tracing::info!(node = %n, "node left"),
        Event::Generation(g) => {
            tracing::warn!(
                generation = g,
                "met a newer life of this node; moved above it"
            )
        }
        Event::Refused(r, from) => {
            let counter = match r {
                Refusal::BadSignature => &stats.bad_signature,
                Refusal::BadIdentity => &stats.bad_identity,
                Refusal::UnknownOrigin => &stats.unknown_origin,
                Refusal::NotSender => &stats.not_sender,
                Refusal::TooManyNodes | Refusal::KeyCap | Refusal::ByteCap => &stats.over_cap,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if !matches!(r, Refusal::UnknownOrigin) && s.logged.insert((*r as u8, *from)) {
                tracing::warn!(peer = %from, reason = ?r, "refused gossip from a peer");
            }
        }
        Event::Entry(_) | Event::Reset(_) => {}
    }
}
