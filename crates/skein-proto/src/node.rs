//! One node of the protocol, as a state machine: inputs are messages from
//! authenticated peers, the passing of time and local writes; outputs are
//! [`Transmit`]s and [`Event`]s. It never reads a clock or a socket, and its
//! randomness comes from the seed it is given, so a run is reproducible.
//!
//! - **Membership.** Every node knows every member (a 72-byte record each)
//!   and places it on a ring by the hash of its name. Each node heartbeats
//!   its `ring_neighbors` predecessors and successors, and watches them: a
//!   neighbour silent for `suspect_after` gets a signed [`Suspicion`],
//!   flooded. A node is down once two distinct observers suspect it at its
//!   current incarnation (or one suspicion stands for `suspicion_timeout`).
//!   A suspected node that hears of it refutes with a higher incarnation.
//!   Down nodes are probed now and then, so a healed partition is noticed.
//! - **Dissemination.** Whatever is new to a node (an announcement, a
//!   suspicion, an entry) is flooded once to its ring neighbours and a few
//!   ring "fingers" (pseudo-random long links): a bounded-degree graph of
//!   small diameter in which every node has several independent in-links.
//! - **Anti-entropy.** Each node keeps a digest of every origin's
//!   (generation, incarnation, watermark, status), summed into 64 buckets;
//!   the root rides on each heartbeat. A neighbour whose digest stays
//!   different starts a sync: bucket sums, then the differing origins'
//!   summaries, then the missing deltas, both ways.
//!
//! Per-node traffic at rest is the heartbeats: `2 × ring_neighbors`
//! messages per interval in each direction, whatever the cluster size.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

use crate::keys::{self, Keys};
use crate::name::{mix, Name};
use crate::wire::{
    Announce, Body, Identity, Leave, OriginData, Probe, Rumor, SignedEntry, Summary, Suspicion,
    Want,
};

/// Microseconds since an arbitrary origin chosen by the driver.
pub type Micros = u64;

const SEC: Micros = 1_000_000;
const MS: Micros = 1_000;
pub const BUCKETS: usize = 64;

#[derive(Debug, Clone)]
pub struct Config {
    /// Tag of the cluster id: messages and signatures of another cluster
    /// never match.
    pub cluster: u64,
    pub heartbeat_interval: Micros,
    /// A watched neighbour silent this long is suspected.
    pub suspect_after: Micros,
    /// A suspicion nobody confirmed or refuted makes the node down after this.
    pub suspicion_timeout: Micros,
    /// A node that just became our neighbour is not suspected before this.
    pub observer_grace: Micros,
    /// Ring neighbours watched (and heartbeaten) on each side.
    pub ring_neighbors: usize,
    /// Ring neighbours flooded on each side (at least `ring_neighbors`):
    /// every node then has this many in-links twice over, so a rumor misses
    /// it only if all of them lose it.
    pub flood_neighbors: usize,
    /// Long links per node, for a small flooding diameter.
    pub fingers: usize,
    /// A neighbour's digest must differ from ours, and both must have held
    /// still, this long before a sync starts (while rumors are still
    /// flooding, digests differ for a moment and a sync would only race them).
    pub sync_delay: Micros,
    /// At most one sync started per this interval.
    pub sync_interval: Micros,
    pub sync_timeout: Micros,
    /// Rumors for one peer are held this long to travel together.
    pub flood_delay: Micros,
    /// How often one down member is probed.
    pub probe_interval: Micros,
    /// How long a down node's keyspace is kept before it is removed here.
    pub dead_node_grace: Micros,
    /// How long a removed or departed node is remembered (and probed).
    pub removed_memory: Micros,
    /// How long this node keeps its deletion tombstones.
    pub tombstone_grace: Micros,
    pub join_retry: Micros,
    pub max_nodes: usize,
    pub max_keys_per_origin: usize,
    pub max_bytes_per_origin: usize,
    pub max_rumors_per_message: usize,
    /// Approximate cap of one sync or join message.
    pub max_sync_bytes: usize,
}

impl Config {
    pub fn new(cluster_id: &str) -> Config {
        Config {
            cluster: crate::name::hash64(cluster_id.as_bytes()),
            heartbeat_interval: 200 * MS,
            suspect_after: SEC,
            suspicion_timeout: 4 * SEC,
            observer_grace: 2 * SEC,
            ring_neighbors: 2,
            flood_neighbors: 3,
            fingers: 4,
            sync_delay: 400 * MS,
            sync_interval: SEC,
            sync_timeout: SEC,
            flood_delay: 5 * MS,
            probe_interval: 250 * MS,
            dead_node_grace: 3600 * SEC,
            removed_memory: 24 * 3600 * SEC,
            tombstone_grace: 3600 * SEC,
            join_retry: SEC,
            max_nodes: 20_000,
            max_keys_per_origin: 50_000,
            max_bytes_per_origin: 2 << 20,
            max_rumors_per_message: 4096,
            max_sync_bytes: 2 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Alive,
    Suspect,
    Down,
    /// Down for longer than the grace: keyspace dropped, still probed.
    Removed,
    /// Left for good (signed by the node); only a new generation returns.
    Left,
}

impl Status {
    pub fn is_up(self) -> bool {
        matches!(self, Status::Alive | Status::Suspect)
    }
    /// What the digest and summaries say: up, down (or removed), left.
    fn code(self) -> u8 {
        match self {
            Status::Alive | Status::Suspect => 0,
            Status::Down | Status::Removed => 1,
            Status::Left => 3,
        }
    }
}

/// Why something from the network was not taken. Counted in [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A signature that does not verify against the origin's identity: a
    /// forgery or corruption.
    BadSignature,
    /// An identity that does not prove the node it claims.
    BadIdentity,
    /// About a node whose identity is not known here (yet).
    UnknownOrigin,
    /// A message that only its subject may send, sent by another.
    NotSender,
    TooManyNodes,
    KeyCap,
    ByteCap,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub bad_signature: u64,
    pub bad_identity: u64,
    pub unknown_origin: u64,
    pub not_sender: u64,
    pub too_many_nodes: u64,
    pub key_cap: u64,
    pub byte_cap: u64,
    pub rumors_in: u64,
    pub rumors_new: u64,
    pub syncs_started: u64,
    pub syncs_served: u64,
    pub refutations: u64,
}

impl Stats {
    fn count(&mut self, r: Refusal) {
        let c = match r {
            Refusal::BadSignature => &mut self.bad_signature,
            Refusal::BadIdentity => &mut self.bad_identity,
            Refusal::UnknownOrigin => &mut self.unknown_origin,
            Refusal::NotSender => &mut self.not_sender,
            Refusal::TooManyNodes => &mut self.too_many_nodes,
            Refusal::KeyCap => &mut self.key_cap,
            Refusal::ByteCap => &mut self.byte_cap,
        };
        *c += 1;
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// A node is alive here: new, restarted, or back after being held down.
    Up(Name),
    Down(Name),
    /// Down for longer than the grace: its keyspace is gone here.
    Removed(Name),
    Left(Name),
    /// A key of another node was set or deleted here.
    Entry(Arc<SignedEntry>),
    /// A node's keyspace was replaced wholesale (new generation, reset).
    Reset(Name),
    /// This node's own generation changed (it met a newer copy of itself):
    /// the driver persists it.
    Generation(u64),
    Refused(Refusal, Name),
}

#[derive(Debug, Clone)]
pub struct Transmit {
    pub to: Option<Name>,
    pub addr: SocketAddr,
    pub body: Body,
}

/// A member as this node sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: Name,
    pub status: Status,
    pub gen: u64,
    pub inc: u64,
    pub addr: SocketAddr,
    /// When the status last changed, on the driver's clock.
    pub since: Micros,
}

struct Origin {
    announce: Arc<Announce>,
    identity: Arc<Identity>,
    status: Status,
    since: Micros,
    /// Every version up to this one is held (or was superseded).
    wm: u64,
    /// Sorted by key.
    entries: Vec<Arc<SignedEntry>>,
    extra: Option<Box<Extra>>,
}

#[derive(Default)]
struct Extra {
    suspicions: Vec<Arc<Suspicion>>,
    /// Versions held above `wm` (a gap below them is still missing).
    above: Vec<u64>,
    leave: Option<Arc<Leave>>,
}

impl Origin {
    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }
    fn suspicions(&self) -> &[Arc<Suspicion>] {
        self.extra.as_ref().map_or(&[], |e| &e.suspicions)
    }
    fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.key.len() + e.value.as_deref().map_or(0, str::len))
            .sum()
    }
}

fn contribution(name: Name, o: &Origin) -> u64 {
    let a = &o.announce;
    let tail = match o.status.code() {
        0 => mix(o.wm),
        c => mix(u64::from(c) << 56 | 1),
    };
    mix(name.hash() ^ mix(a.gen ^ mix(a.inc ^ tail)))
}

fn bucket(name: Name) -> usize {
    (name.hash() >> 58) as usize
}

struct Watch {
    name: Name,
    since: Micros,
    heard: Micros,
    suspected: bool,
    /// The digest it last reported, and since when it reports that one.
    digest: u64,
    digest_since: Micros,
    /// Since when its digest and ours have differed, as seen at our ticks.
    /// A flood makes them differ for a moment (until its next heartbeat);
    /// only a difference that outlasts that is worth a sync.
    mismatch_since: Option<Micros>,
}

/// SplitMix64: the node's own seeded randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

pub struct Node<K: Keys> {
    cfg: Config,
    keys: K,
    me: Name,
    addr: SocketAddr,
    identity: Arc<Identity>,
    gen: u64,
    life: u64,
    inc: u64,
    floor: u64,
    origins: Vec<Option<Origin>>,
    known: usize,
    ring: BTreeSet<(u64, Name)>,
    ring_dirty: bool,
    neighbors: Vec<Name>,
    fingers: Vec<Name>,
    watch: Vec<Watch>,
    suspects: Vec<Name>,
    down: Vec<Name>,
    down_replies: Vec<(Name, Micros)>,
    buckets: [u64; BUCKETS],
    digest: u64,
    /// The digest as of the last tick, and since when it has not changed.
    seen_digest: u64,
    digest_since: Micros,
    sync: Option<(Name, Micros)>,
    last_sync: Micros,
    /// Syncs to start whatever the digests say: after joining (with a
    /// neighbour, for what was flooded while nobody knew us yet), and after
    /// a heal (with the peer across it, for what each side wrote meanwhile).
    catch_up: Vec<(Micros, Option<Name>)>,
    /// Rumors waiting to be sent, per peer, and when they go.
    pending: Vec<(Name, Vec<Rumor>)>,
    flush_at: Option<Micros>,
    now: Micros,
    next_heartbeat: Micros,
    next_probe: Micros,
    next_removal_check: Micros,
    own_tombstones: VecDeque<(Micros, u64)>,
    seeds: Vec<SocketAddr>,
    joined: bool,
    next_join: Micros,
    rng: Rng,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    scratch: Vec<u8>,
}

impl<K: Keys> Node<K> {
    /// A node that has not joined anyone yet. `gen` must be higher than any
    /// generation this node used before (the driver persists it); if the
    /// cluster still knows a higher one, the node moves above it and says
    /// so with [`Event::Generation`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        keys: K,
        me: Name,
        addr: SocketAddr,
        identity: Arc<Identity>,
        gen: u64,
        seed: u64,
        now: Micros,
    ) -> Node<K> {
        let mut rng = Rng(seed ^ 0x5eed);
        let life = rng.next();
        let phase = rng.below(cfg.heartbeat_interval.max(1) as usize) as Micros;
        let mut node = Node {
            next_heartbeat: now + phase,
            next_probe: now + cfg.probe_interval + phase,
            next_removal_check: now + SEC,
            cfg,
            keys,
            me,
            addr,
            identity,
            gen,
            life,
            inc: 0,
            floor: 0,
            origins: Vec::new(),
            known: 0,
            ring: BTreeSet::new(),
            ring_dirty: true,
            neighbors: Vec::new(),
            fingers: Vec::new(),
            watch: Vec::new(),
            suspects: Vec::new(),
            down: Vec::new(),
            down_replies: Vec::new(),
            buckets: [0; BUCKETS],
            digest: 0,
            seen_digest: 0,
            digest_since: now,
            sync: None,
            last_sync: 0,
            catch_up: Vec::new(),
            pending: Vec::new(),
            flush_at: None,
            now,
            own_tombstones: VecDeque::new(),
            seeds: Vec::new(),
            joined: false,
            next_join: now,
            rng,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            scratch: Vec::new(),
        };
        let announce = node.sign_announce(true);
        node.insert_origin(
            me,
            Origin {
                announce,
                identity: node.identity.clone(),
                status: Status::Alive,
                since: now,
                wm: 0,
                entries: Vec::new(),
                extra: None,
            },
        );
        node.ring.insert((me.hash(), me));
        node
    }

    // ----- reading ----------------------------------------------------

    pub fn name(&self) -> Name {
        self.me
    }
    pub fn generation(&self) -> u64 {
        self.gen
    }
    pub fn incarnation(&self) -> u64 {
        self.inc
    }
    pub fn digest(&self) -> u64 {
        self.digest
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn joined(&self) -> bool {
        self.joined
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn rec(&self, n: Name) -> Option<&Origin> {
        self.origins.get(n.index()).and_then(Option::as_ref)
    }

    pub fn status(&self, n: Name) -> Option<Status> {
        self.rec(n).map(|o| o.status)
    }

    pub fn member(&self, n: Name) -> Option<Member> {
        self.rec(n).map(|o| Member {
            name: n,
            status: o.status,
            gen: o.announce.gen,
            inc: o.announce.inc,
            addr: o.announce.addr,
            since: o.since,
        })
    }

    pub fn members(&self) -> impl Iterator<Item = Member> + '_ {
        self.origins.iter().flatten().map(|o| Member {
            name: o.announce.node,
            status: o.status,
            gen: o.announce.gen,
            inc: o.announce.inc,
            addr: o.announce.addr,
            since: o.since,
        })
    }

    /// Members this node holds up (itself included).
    pub fn up_count(&self) -> usize {
        self.ring.len()
    }

    pub fn known_count(&self) -> usize {
        self.known
    }

    /// The keyspace of `n` as held here, sorted by key (tombstones included).
    pub fn entries(&self, n: Name) -> &[Arc<SignedEntry>] {
        self.rec(n).map_or(&[], |o| &o.entries)
    }

    pub fn get(&self, n: Name, key: &str) -> Option<&Arc<SignedEntry>> {
        let o = self.rec(n)?;
        o.entries
            .binary_search_by(|e| e.key.as_str().cmp(key))
            .ok()
            .map(|i| &o.entries[i])
    }

    pub fn neighbors(&self) -> &[Name] {
        &self.neighbors
    }

    /// Bytes this node's state takes, counting shared values in full (what
    /// a real agent holds), for the memory figure.
    pub fn mem_estimate(&self) -> usize {
        let mut total = std::mem::size_of::<Self>()
            + self.origins.capacity() * std::mem::size_of::<Option<Origin>>()
            + self.ring.len() * (std::mem::size_of::<(u64, Name)>() * 3 / 2);
        for o in self.origins.iter().flatten() {
            total += std::mem::size_of::<Announce>() + 16;
            total += o.identity.0.len() + 16;
            total += o.entries.capacity() * 8;
            for e in &o.entries {
                total += std::mem::size_of::<SignedEntry>() + 16 + e.key.len();
                total += e.value.as_deref().map_or(0, str::len);
            }
            if let Some(x) = &o.extra {
                total += std::mem::size_of::<Extra>()
                    + x.suspicions.len() * (std::mem::size_of::<Suspicion>() + 16)
                    + x.above.capacity() * 8;
            }
        }
        total
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Node::tick`] next has something to do.
    pub fn next_deadline(&self) -> Micros {
        let mut t = self.next_heartbeat.min(self.next_probe);
        if let Some(f) = self.flush_at {
            t = t.min(f);
        }
        if !self.joined && !self.seeds.is_empty() {
            t = t.min(self.next_join);
        }
        t
    }

    // ----- local actions ------------------------------------------------

    /// Starts joining through `seeds` (retried until one answers). A node
    /// with no seeds is a cluster of one until someone joins it.
    pub fn join(&mut self, now: Micros, seeds: Vec<SocketAddr>) {
        self.seeds = seeds.into_iter().filter(|a| *a != self.addr).collect();
        self.joined = self.seeds.is_empty();
        self.next_join = now;
        self.send_join(now);
    }

    /// Sets (`Some`) or deletes (`None`) a key of this node's keyspace.
    pub fn write(&mut self, now: Micros, key: &str, value: Option<&str>) -> Result<(), Refusal> {
        self.now = now;
        let o = self.rec(self.me).ok_or(Refusal::UnknownOrigin)?;
        let exists = o
            .entries
            .binary_search_by(|e| e.key.as_str().cmp(key))
            .is_ok();
        if !exists && o.entries.len() >= self.cfg.max_keys_per_origin {
            return Err(Refusal::KeyCap);
        }
        if o.bytes() + key.len() + value.map_or(0, str::len) > self.cfg.max_bytes_per_origin {
            return Err(Refusal::ByteCap);
        }
        let version = o.wm + 1;
        let entry = self.sign_entry(version, key, value);
        if value.is_none() {
            self.own_tombstones.push_back((now, version));
        }
        let me = self.me;
        self.with_origin(me, |o| {
            put_entry(&mut o.entries, entry.clone());
            o.wm = version;
        });
        self.flood(vec![Rumor::Entry(entry)], None);
        Ok(())
    }

    /// Leaves for good: peers drop this node and everything it published
    /// until it comes back with a higher generation.
    pub fn leave(&mut self) {
        let (me, gen) = (self.me, self.gen);
        let sig = self.sign_with(|b, c| keys::leave_bytes(b, c, me, gen));
        let leave = Arc::new(Leave {
            node: self.me,
            gen: self.gen,
            sig,
        });
        self.flood(vec![Rumor::Leave(leave)], None);
    }

    /// An operator removed `n`: forget it now if it is down here (a live
    /// node is never evicted; a removed node that comes back is taken back).
    pub fn forget(&mut self, now: Micros, n: Name) -> bool {
        if self.status(n) == Some(Status::Down) {
            self.remove(now, n);
            true
        } else {
            false
        }
    }

    /// Everything this node holds about itself, as a sync would send it:
    /// what a peer restores from a persisted replica.
    pub fn own_data(&self) -> Option<OriginData> {
        self.origin_data(self.me)
    }

    /// Everything this node holds about `n` (signed, so it can be written
    /// to disk and restored with [`Node::restore`]).
    pub fn origin_data(&self, n: Name) -> Option<OriginData> {
        let o = self.rec(n)?;
        Some(OriginData {
            announce: o.announce.clone(),
            identity: Some(o.identity.clone()),
            suspicions: o.suspicions().to_vec(),
            leave: o.extra.as_ref().and_then(|x| x.leave.clone()),
            reset: false,
            entries: o.entries.clone(),
            wm: o.wm,
        })
    }

    /// Takes back what a persisted replica held about one node (every
    /// signature is checked again; nothing is flooded). Peers restored this
    /// way are watched like any other: if they are gone, they are found
    /// down within the usual time.
    pub fn restore(&mut self, now: Micros, d: OriginData) {
        self.now = now;
        let me = self.me;
        self.apply_data(now, me, d, None);
    }

    // ----- time ----------------------------------------------------------

    pub fn tick(&mut self, now: Micros) {
        self.now = now;
        if self.flush_at.is_some_and(|t| now >= t) {
            self.flush();
        }
        if self.digest != self.seen_digest {
            self.seen_digest = self.digest;
            self.digest_since = now;
        }
        if !self.joined && now >= self.next_join {
            self.send_join(now);
        }
        self.refresh_neighbors(now);
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.cfg.heartbeat_interval;
            self.heartbeat(now);
        }
        if now >= self.next_probe {
            self.next_probe = now + self.cfg.probe_interval;
            self.probe_down();
        }
        self.check_suspects(now);
        if now >= self.next_removal_check {
            self.next_removal_check = now + SEC / 4;
            self.check_removals(now);
            self.gc_own_tombstones(now);
        }
        self.maybe_sync(now);
    }

    fn send_join(&mut self, now: Micros) {
        self.next_join = now + self.cfg.join_retry;
        let Some(data) = self.own_data() else { return };
        let body = Body::Join(data);
        // Ask up to three seeds at a time; every answer is a full copy.
        let n = self.seeds.len();
        let start = self.rng.below(n);
        for i in 0..n.min(3) {
            let addr = self.seeds[(start + i) % n];
            self.out.push_back(Transmit {
                to: None,
                addr,
                body: body.clone(),
            });
        }
    }

    fn heartbeat(&mut self, _now: Micros) {
        let probe = Probe {
            gen: self.gen,
            inc: self.inc,
            digest: self.digest,
            you_down: None,
            announce: None,
        };
        for i in 0..self.neighbors.len() {
            let n = self.neighbors[i];
            self.send(n, Body::Heartbeat(probe.clone()));
        }
    }

    fn probe_down(&mut self) {
        // The list is pruned lazily: drop whoever is up again (probing it
        // "you are down" would make it refute for nothing, over and over).
        self.down.retain(|&n| {
            self.origins
                .get(n.index())
                .and_then(Option::as_ref)
                .is_some_and(|o| !o.status.is_up())
        });
        if self.down.is_empty() {
            return;
        }
        let n = self.down[self.rng.below(self.down.len())];
        let Some(o) = self.rec(n) else { return };
        let you_down = Some((o.announce.gen, o.announce.inc));
        let body = Body::Ping(Probe {
            gen: self.gen,
            inc: self.inc,
            digest: self.digest,
            you_down,
            announce: self.own_announce(),
        });
        self.send(n, body);
    }

    fn check_suspects(&mut self, now: Micros) {
        // Silent neighbours. If most of them fell silent at once in a
        // cluster large enough that neighbours are unrelated hosts, the
        // likelier story is that this node is the one cut off (Lifeguard's
        // "local health"): it suspects nobody until that passes, rather than
        // accuse the cluster (every accused node would have to refute, to
        // everyone, after the heal).
        let quiet = self
            .watch
            .iter()
            .filter(|w| now.saturating_sub(w.heard) > self.cfg.suspect_after)
            .count();
        if self.ring.len() > 16 && 2 * quiet > self.watch.len() {
            return self.check_suspect_timeouts(now);
        }
        let mut silent = Vec::new();
        for w in &mut self.watch {
            if !w.suspected
                && now.saturating_sub(w.heard) > self.cfg.suspect_after
                && now.saturating_sub(w.since) > self.cfg.observer_grace
            {
                w.suspected = true;
                silent.push(w.name);
            }
        }
        for n in silent {
            let Some(o) = self.rec(n) else { continue };
            if !o.status.is_up() {
                continue;
            }
            let (gen, inc) = (o.announce.gen, o.announce.inc);
            let me = self.me;
            let sig = self.sign_with(|b, c| keys::suspicion_bytes(b, c, me, n, gen, inc));
            let s = Arc::new(Suspicion {
                observer: self.me,
                node: n,
                gen,
                inc,
                sig,
            });
            if self.apply_suspect(now, &s) {
                self.flood(vec![Rumor::Suspect(s)], None);
            }
        }
        self.check_suspect_timeouts(now);
    }

    fn check_suspect_timeouts(&mut self, now: Micros) {
        // Suspicions nobody confirmed or refuted in time. Only where a
        // second observer cannot exist (three members or fewer): elsewhere
        // one observer alone is no proof — it may be the one cut off, and a
        // node that marked its unreachable neighbours down would move on to
        // suspect the next ones round the ring.
        let mut i = 0;
        while i < self.suspects.len() {
            let n = self.suspects[i];
            match self.rec(n) {
                Some(o) if o.status == Status::Suspect => {
                    if self.ring.len() <= 3
                        && now.saturating_sub(o.since) > self.cfg.suspicion_timeout
                    {
                        self.suspects.swap_remove(i);
                        self.mark_down(now, n);
                    } else {
                        i += 1;
                    }
                }
                _ => {
                    self.suspects.swap_remove(i);
                }
            }
        }
    }

    fn check_removals(&mut self, now: Micros) {
        let mut i = 0;
        while i < self.down.len() {
            let n = self.down[i];
            let Some(o) = self.rec(n) else {
                self.down.swap_remove(i);
                continue;
            };
            let age = now.saturating_sub(o.since);
            match o.status {
                Status::Down if age > self.cfg.dead_node_grace => {
                    self.remove(now, n);
                    i += 1;
                }
                Status::Removed | Status::Left if age > self.cfg.removed_memory => {
                    self.down.swap_remove(i);
                    self.drop_origin(n);
                }
                Status::Down | Status::Removed | Status::Left => i += 1,
                _ => {
                    self.down.swap_remove(i);
                }
            }
        }
    }

    fn gc_own_tombstones(&mut self, now: Micros) {
        let mut floor = self.floor;
        while let Some(&(t, v)) = self.own_tombstones.front() {
            if now.saturating_sub(t) <= self.cfg.tombstone_grace {
                break;
            }
            self.own_tombstones.pop_front();
            floor = floor.max(v);
        }
        if floor > self.floor {
            self.floor = floor;
            let me = self.me;
            self.with_origin(me, |o| {
                o.entries.retain(|e| e.value.is_some() || e.version > floor)
            });
            // A new incarnation carries the floor to everyone.
            self.bump_incarnation();
        }
    }

    fn maybe_sync(&mut self, now: Micros) {
        let digest = self.digest;
        for w in &mut self.watch {
            if w.digest_since > 0 && w.digest != digest {
                w.mismatch_since.get_or_insert(now);
            } else {
                w.mismatch_since = None;
            }
        }
        // Catch-ups first, whatever else is in flight: they are few (a join,
        // a heal) and aimed at the peer that has what we lack.
        if let Some(i) = self.catch_up.iter().position(|&(t, _)| now >= t) {
            let (_, peer) = self.catch_up.swap_remove(i);
            let peer = peer.or_else(|| {
                (!self.neighbors.is_empty())
                    .then(|| self.neighbors[self.rng.below(self.neighbors.len())])
            });
            if let Some(peer) = peer {
                self.start_sync(now, peer);
                return;
            }
        }
        if let Some((_, started)) = self.sync {
            if now.saturating_sub(started) < self.cfg.sync_timeout {
                return;
            }
            self.sync = None;
        }
        // A neighbour whose digest has held still while differing from
        // ours lacks something we have, or has something we lack.
        let still = |t: Micros| now.saturating_sub(t) >= self.cfg.sync_delay;
        if now.saturating_sub(self.last_sync) < self.cfg.sync_interval {
            return;
        }
        let candidate = self.watch.iter().find(|w| {
            w.mismatch_since.is_some_and(still) && still(w.digest_since) && w.digest_since > 0
        });
        let Some(peer) = candidate.map(|w| w.name) else {
            return;
        };
        self.start_sync(now, peer);
    }

    fn start_sync(&mut self, now: Micros, peer: Name) {
        self.sync = Some((peer, now));
        self.last_sync = now;
        self.stats.syncs_started += 1;
        let buckets = self.buckets.to_vec();
        self.send(peer, Body::SyncStart { buckets });
    }

    // ----- the ring ---------------------------------------------------------

    fn refresh_neighbors(&mut self, now: Micros) {
        if !self.ring_dirty {
            return;
        }
        self.ring_dirty = false;
        let me = (self.me.hash(), self.me);
        let k = self.cfg.ring_neighbors;
        let kf = self.cfg.flood_neighbors.max(k);
        let after: Vec<Name> = self
            .ring
            .range((Excluded(me), Unbounded))
            .chain(self.ring.range(..me))
            .take(kf)
            .map(|&(_, n)| n)
            .collect();
        let before: Vec<Name> = self
            .ring
            .range(..me)
            .rev()
            .chain(self.ring.range((Excluded(me), Unbounded)).rev())
            .take(kf)
            .map(|&(_, n)| n)
            .collect();
        let mut next = Vec::with_capacity(2 * k);
        let mut fingers = Vec::with_capacity(self.cfg.fingers + 2 * (kf - k));
        // The nearest `k` on each side are watched; the next ones out to
        // `kf` are only flooded.
        for i in 0..kf {
            for side in [&after, &before] {
                let Some(&n) = side.get(i) else { continue };
                let list = if i < k { &mut next } else { &mut fingers };
                if !list.contains(&n) {
                    list.push(n);
                }
            }
        }
        fingers.retain(|n| !next.contains(n));
        for i in 0..self.cfg.fingers as u64 {
            let point = mix(me.0 ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let found = self
                .ring
                .range((point, self.me)..)
                .chain(self.ring.iter())
                .map(|&(_, n)| n)
                .find(|n| *n != self.me);
            if let Some(n) = found {
                if !next.contains(&n) && !fingers.contains(&n) {
                    fingers.push(n);
                }
            }
        }
        self.watch.retain(|w| next.contains(&w.name));
        for &n in &next {
            if !self.watch.iter().any(|w| w.name == n) {
                self.watch.push(Watch {
                    name: n,
                    since: now,
                    heard: now,
                    suspected: false,
                    digest: 0,
                    digest_since: 0,
                    mismatch_since: None,
                });
            }
        }
        self.neighbors = next;
        self.fingers = fingers;
    }

    fn ring_insert(&mut self, n: Name) {
        if self.ring.insert((n.hash(), n)) {
            self.ring_dirty = true;
        }
    }

    fn ring_remove(&mut self, n: Name) {
        if self.ring.remove(&(n.hash(), n)) {
            self.ring_dirty = true;
        }
    }

    // ----- records and the digest -------------------------------------------

    fn insert_origin(&mut self, n: Name, o: Origin) {
        let c = contribution(n, &o);
        let i = n.index();
        if self.origins.len() <= i {
            self.origins.resize_with(i + 1, || None);
        }
        if let Some(old) = self.origins[i].replace(o) {
            self.sub_digest(n, contribution(n, &old));
        } else {
            self.known += 1;
        }
        self.add_digest(n, c);
    }

    fn drop_origin(&mut self, n: Name) {
        if let Some(old) = self.origins.get_mut(n.index()).and_then(Option::take) {
            self.known -= 1;
            self.sub_digest(n, contribution(n, &old));
        }
    }

    fn with_origin<R>(&mut self, n: Name, f: impl FnOnce(&mut Origin) -> R) -> Option<R> {
        let o = self.origins.get_mut(n.index())?.as_mut()?;
        let before = contribution(n, o);
        let r = f(o);
        let after = contribution(n, o);
        if before != after {
            self.sub_digest(n, before);
            self.add_digest(n, after);
        }
        Some(r)
    }

    fn add_digest(&mut self, n: Name, c: u64) {
        let b = bucket(n);
        self.buckets[b] = self.buckets[b].wrapping_add(c);
        self.digest = self.digest.wrapping_add(c);
    }

    fn sub_digest(&mut self, n: Name, c: u64) {
        let b = bucket(n);
        self.buckets[b] = self.buckets[b].wrapping_sub(c);
        self.digest = self.digest.wrapping_sub(c);
    }

    fn summary(&self, o: &Origin) -> Summary {
        Summary {
            node: o.announce.node,
            gen: o.announce.gen,
            inc: o.announce.inc,
            wm: if o.status.is_up() { o.wm } else { 0 },
            status: o.status.code(),
        }
    }

    // ----- signing ------------------------------------------------------------

    /// Signs the bytes `layout` writes (with the cluster tag) with our key.
    fn sign_with(&mut self, layout: impl FnOnce(&mut Vec<u8>, u64)) -> crate::wire::Sig {
        let mut buf = std::mem::take(&mut self.scratch);
        layout(&mut buf, self.cfg.cluster);
        let sig = self.keys.sign(&buf);
        self.scratch = buf;
        sig
    }

    /// Whether `sig` over the bytes `layout` writes was made with the key
    /// `identity` proves.
    fn verify_with(
        &mut self,
        identity: &Identity,
        sig: &crate::wire::Sig,
        layout: impl FnOnce(&mut Vec<u8>, u64),
    ) -> bool {
        let mut buf = std::mem::take(&mut self.scratch);
        layout(&mut buf, self.cfg.cluster);
        let ok = self.keys.verify(identity, &buf, sig);
        self.scratch = buf;
        ok
    }

    fn sign_announce(&mut self, with_identity: bool) -> Arc<Announce> {
        let (me, gen, life, inc, addr, floor) = (
            self.me, self.gen, self.life, self.inc, self.addr, self.floor,
        );
        let sig = self.sign_with(|b, c| keys::alive_bytes(b, c, me, gen, life, inc, addr, floor));
        Arc::new(Announce {
            node: self.me,
            gen: self.gen,
            life: self.life,
            inc: self.inc,
            addr: self.addr,
            floor: self.floor,
            identity: with_identity.then(|| self.identity.clone()),
            sig,
        })
    }

    fn sign_entry(&mut self, version: u64, key: &str, value: Option<&str>) -> Arc<SignedEntry> {
        let (me, gen) = (self.me, self.gen);
        let sig = self.sign_with(|b, c| keys::entry_bytes(b, c, me, gen, version, key, value));
        Arc::new(SignedEntry {
            origin: self.me,
            gen: self.gen,
            version,
            key: key.to_string(),
            value: value.map(Arc::from),
            sig,
        })
    }

    fn bump_incarnation(&mut self) {
        self.inc += 1;
        self.stats.refutations += 1;
        let announce = self.sign_announce(false);
        let me = self.me;
        self.with_origin(me, |o| o.announce = announce.clone());
        self.flood(vec![Rumor::Alive(announce)], None);
    }

    /// Someone holds a newer life of this node than this one (a restart
    /// with a lost generation file): move above it and republish.
    fn bump_generation(&mut self, now: Micros, above: u64) {
        self.gen = above + 1;
        self.inc = 0;
        self.floor = 0;
        self.own_tombstones.clear();
        let live: Vec<(String, Arc<str>)> = self
            .entries(self.me)
            .iter()
            .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
            .collect();
        let announce = self.sign_announce(true);
        let mut entries = Vec::with_capacity(live.len());
        for (i, (k, v)) in live.iter().enumerate() {
            entries.push(self.sign_entry(i as u64 + 1, k, Some(v)));
        }
        let wm = entries.len() as u64;
        let me = self.me;
        self.with_origin(me, |o| {
            o.announce = announce.clone();
            o.entries = entries.clone();
            o.wm = wm;
            o.since = now;
        });
        self.events.push_back(Event::Generation(self.gen));
        let mut rumors = vec![Rumor::Alive(announce)];
        rumors.extend(entries.into_iter().map(Rumor::Entry));
        self.flood(rumors, None);
    }

    // ----- input ----------------------------------------------------------------

    /// A message from `from`, whose identity the transport authenticated.
    pub fn handle(&mut self, now: Micros, from: Name, body: Body) {
        if from == self.me {
            return;
        }
        self.now = now;
        self.refresh_neighbors(now);
        if let Some(w) = self.watch.iter_mut().find(|w| w.name == from) {
            w.heard = now;
        }
        match body {
            Body::Heartbeat(p) => {
                if let Some(w) = self.watch.iter_mut().find(|w| w.name == from) {
                    if w.digest != p.digest || w.digest_since == 0 {
                        w.digest = p.digest;
                        w.digest_since = now;
                        w.mismatch_since = None;
                    }
                    if self.status(from) == Some(Status::Suspect) {
                        // It is talking to us: tell it what to refute.
                        self.reply_down(now, from);
                    }
                } else {
                    // Not our neighbour (our views differ, or we hold it
                    // down): answer, so it hears from us and can refute.
                    self.reply_down(now, from);
                }
            }
            Body::Ping(p) => {
                self.on_probe(now, from, &p);
                let you_down = self.down_view(from);
                let ack = Body::Ack(Probe {
                    gen: self.gen,
                    inc: self.inc,
                    digest: self.digest,
                    you_down,
                    announce: self.own_announce(),
                });
                self.send(from, ack);
            }
            Body::Ack(p) => self.on_probe(now, from, &p),
            Body::Join(data) => self.on_join(now, from, data),
            Body::Rumors(rumors) => {
                let mut fresh = Vec::new();
                for r in rumors.into_iter().take(self.cfg.max_rumors_per_message) {
                    self.stats.rumors_in += 1;
                    if self.apply_rumor(now, from, &r) {
                        self.stats.rumors_new += 1;
                        fresh.push(r);
                    }
                }
                if !fresh.is_empty() {
                    self.flood(fresh, Some(from));
                }
            }
            Body::SyncStart { buckets } => self.on_sync_start(from, &buckets),
            Body::SyncSummaries { mask, summaries } => {
                self.on_summaries(now, from, mask, summaries)
            }
            Body::SyncWant(wants) => self.on_want(from, wants),
            Body::SyncData { spread, origins } => {
                if self.sync.is_some_and(|(p, _)| p == from) {
                    self.sync = None;
                }
                if !self.joined {
                    self.joined = true;
                    self.catch_up = vec![
                        (now + self.cfg.sync_delay, None),
                        (now + 4 * self.cfg.sync_delay, None),
                    ];
                }
                let mut fresh = Vec::new();
                for d in origins {
                    self.apply_data(now, from, d, spread.then_some(&mut fresh));
                }
                if !fresh.is_empty() {
                    self.flood(fresh, Some(from));
                }
            }
        }
    }

    /// (generation, incarnation) at which we hold `n` down, if we do.
    /// (generation, incarnation) at which we hold `n` suspect or down, if
    /// we do: what `n` must refute.
    fn down_view(&self, n: Name) -> Option<(u64, u64)> {
        let o = self.rec(n)?;
        (o.status != Status::Alive).then_some((o.announce.gen, o.announce.inc))
    }

    fn reply_down(&mut self, now: Micros, to: Name) {
        // A few replies per suspicion window per peer: enough for it to
        // hear from us, never a storm.
        if let Some(i) = self.down_replies.iter().position(|(n, _)| *n == to) {
            if now.saturating_sub(self.down_replies[i].1) < self.cfg.suspect_after / 3 {
                return;
            }
            self.down_replies.swap_remove(i);
        }
        if self.down_replies.len() > 256 {
            self.down_replies.clear();
        }
        self.down_replies.push((to, now));
        let ack = Body::Ack(Probe {
            gen: self.gen,
            inc: self.inc,
            digest: self.digest,
            you_down: self.down_view(to),
            announce: self.own_announce(),
        });
        self.send(to, ack);
    }

    fn own_announce(&self) -> Option<Arc<Announce>> {
        self.rec(self.me).map(|o| o.announce.clone())
    }

    /// A ping or ack: refute if the sender holds us down, and take its
    /// announcement (a node we held down is back).
    fn on_probe(&mut self, now: Micros, from: Name, p: &Probe) {
        if let Some((gen, inc)) = p.you_down {
            if gen == self.gen && inc >= self.inc {
                self.inc = inc;
                self.bump_incarnation();
                // We were cut off from `from`: trade what each side missed.
                self.catch_up.push((now, Some(from)));
            }
        }
        if let Some(a) = &p.announce {
            if a.node != from {
                self.refuse(Refusal::NotSender, from);
                return;
            }
            let was_down = self.status(from).is_some_and(|s| !s.is_up());
            match self.apply_alive(now, a, None) {
                Ok(true) => {
                    if was_down && self.catch_up.len() < 8 {
                        self.catch_up.push((now, Some(from)));
                    }
                    self.flood(vec![Rumor::Alive(a.clone())], Some(from))
                }
                Ok(false) => {}
                Err(r) => self.refuse(r, from),
            }
        }
    }

    fn on_join(&mut self, now: Micros, from: Name, data: OriginData) {
        if data.announce.node != from || data.identity.is_none() {
            self.refuse(Refusal::NotSender, from);
            return;
        }
        let mut fresh = Vec::new();
        self.apply_data(now, from, data, Some(&mut fresh));
        let Some(addr) = self.rec(from).map(|o| o.announce.addr) else {
            return;
        };
        // Everything we hold, in messages of bounded size; the joiner's own
        // record too, so a restart that reused a generation meets its
        // previous life and moves above it.
        let wants: Vec<Want> = self
            .origins
            .iter()
            .flatten()
            .map(|o| Want {
                node: o.announce.node,
                gen: 0,
                wm: 0,
                identity: true,
            })
            .collect();
        self.send_data(Some(from), addr, &wants, false);
        if !fresh.is_empty() {
            self.flood(fresh, Some(from));
        }
    }

    fn on_sync_start(&mut self, from: Name, theirs: &[u64]) {
        self.stats.syncs_served += 1;
        let mut mask = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            if theirs.get(i) != Some(b) {
                mask |= 1 << i;
            }
        }
        let summaries: Vec<Summary> = self
            .origins
            .iter()
            .flatten()
            .filter(|o| mask & (1 << bucket(o.announce.node)) != 0)
            .map(|o| self.summary(o))
            .collect();
        self.send(from, Body::SyncSummaries { mask, summaries });
    }

    fn on_summaries(&mut self, now: Micros, from: Name, mask: u64, theirs: Vec<Summary>) {
        let mut wants = Vec::new();
        let mut pushes = Vec::new();
        let mut seen: Vec<Name> = Vec::with_capacity(theirs.len());
        for s in theirs {
            if mask & (1 << bucket(s.node)) == 0 {
                continue;
            }
            seen.push(s.node);
            if s.node == self.me {
                // They hold us down at our current life: refute.
                if s.gen == self.gen && s.inc >= self.inc && s.status != 0 {
                    self.inc = s.inc;
                    self.bump_incarnation();
                }
            }
            match self.rec(s.node) {
                None => wants.push(Want {
                    node: s.node,
                    gen: 0,
                    wm: 0,
                    identity: true,
                }),
                Some(o) => {
                    let mine = self.summary(o);
                    if newer(&s, &mine) {
                        wants.push(Want {
                            node: s.node,
                            gen: mine.gen,
                            wm: mine.wm,
                            identity: false,
                        });
                    } else if newer(&mine, &s) {
                        pushes.push(Want {
                            node: s.node,
                            gen: s.gen,
                            wm: s.wm,
                            identity: false,
                        });
                    }
                }
            }
        }
        seen.sort_unstable();
        for o in self.origins.iter().flatten() {
            let n = o.announce.node;
            if mask & (1 << bucket(n)) != 0 && seen.binary_search(&n).is_err() {
                pushes.push(Want {
                    node: n,
                    gen: 0,
                    wm: 0,
                    identity: true,
                });
            }
        }
        let Some(addr) = self.rec(from).map(|o| o.announce.addr) else {
            self.sync = None;
            return;
        };
        if !pushes.is_empty() {
            self.send_data(Some(from), addr, &pushes, true);
        }
        if wants.is_empty() {
            if self.sync.is_some_and(|(p, _)| p == from) {
                self.sync = None;
            }
        } else {
            self.sync = Some((from, now));
            self.send(from, Body::SyncWant(wants));
        }
    }

    fn on_want(&mut self, from: Name, wants: Vec<Want>) {
        let Some(addr) = self.rec(from).map(|o| o.announce.addr) else {
            return;
        };
        let wants: Vec<Want> = wants.into_iter().take(self.cfg.max_nodes).collect();
        self.send_data(Some(from), addr, &wants, true);
    }

    /// Sends what each `want` lacks of the origins we hold, chunked.
    fn send_data(&mut self, to: Option<Name>, addr: SocketAddr, wants: &[Want], spread: bool) {
        let mut batch = Vec::new();
        let mut size = 0usize;
        for w in wants {
            let Some(o) = self.rec(w.node) else { continue };
            let same = w.gen == o.announce.gen;
            let full = !same || w.wm < o.announce.floor;
            let entries: Vec<Arc<SignedEntry>> = if o.status.is_up() || o.status == Status::Down {
                o.entries
                    .iter()
                    .filter(|e| full || e.version > w.wm)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            let extra = o.extra.as_ref();
            let d = OriginData {
                announce: o.announce.clone(),
                identity: (w.identity || !same).then(|| o.identity.clone()),
                suspicions: extra.map(|x| x.suspicions.clone()).unwrap_or_default(),
                leave: extra.and_then(|x| x.leave.clone()),
                reset: full,
                wm: o.wm,
                entries,
            };
            size += 200
                + d.identity.as_ref().map_or(0, |i| i.0.len())
                + d.entries
                    .iter()
                    .map(|e| 100 + e.key.len() + e.value.as_deref().map_or(0, str::len))
                    .sum::<usize>();
            batch.push(d);
            if size >= self.cfg.max_sync_bytes {
                let origins = std::mem::take(&mut batch);
                self.out.push_back(Transmit {
                    to,
                    addr,
                    body: Body::SyncData { spread, origins },
                });
                size = 0;
            }
        }
        if !batch.is_empty() {
            self.out.push_back(Transmit {
                to,
                addr,
                body: Body::SyncData {
                    spread,
                    origins: batch,
                },
            });
        }
    }

    // ----- applying what others originated ------------------------------------

    fn refuse(&mut self, r: Refusal, from: Name) {
        self.stats.count(r);
        self.events.push_back(Event::Refused(r, from));
    }

    /// Whether the rumor was new here (and so is to be flooded on).
    fn apply_rumor(&mut self, now: Micros, from: Name, r: &Rumor) -> bool {
        let result = match r {
            Rumor::Alive(a) => self.apply_alive(now, a, None),
            Rumor::Suspect(s) => Ok(self.apply_suspect(now, s)),
            Rumor::Entry(e) => self.apply_entry(now, e),
            Rumor::Leave(l) => self.apply_leave(now, l),
        };
        match result {
            Ok(new) => new,
            Err(refusal) => {
                self.refuse(refusal, from);
                false
            }
        }
    }

    fn verify_announce(&mut self, a: &Announce, identity: &Identity) -> bool {
        self.verify_with(identity, &a.sig, |b, c| keys::announce_bytes(b, c, a))
    }

    fn apply_alive(
        &mut self,
        now: Micros,
        a: &Arc<Announce>,
        identity: Option<&Arc<Identity>>,
    ) -> Result<bool, Refusal> {
        let n = a.node;
        // Most copies of a rumor are duplicates: drop them before any
        // signature work.
        if let Some(o) = self.rec(n) {
            let (g, i) = (o.announce.gen, o.announce.inc);
            if n != self.me
                && (a.gen < g || (a.gen == g && (a.inc <= i || o.status == Status::Left)))
            {
                return Ok(false);
            }
        }
        // The identity that must have signed this: a new one presented
        // with the announcement (checked against the node id), else the
        // one we hold.
        let presented = identity.or(a.identity.as_ref());
        let held = self.rec(n).map(|o| o.identity.clone());
        let id = match (presented, &held) {
            (Some(p), Some(h)) if **p == **h => h.clone(),
            (Some(p), _) => {
                if !self.keys.check_identity(n.as_str(), p) {
                    return Err(Refusal::BadIdentity);
                }
                p.clone()
            }
            (None, Some(h)) => h.clone(),
            (None, None) => return Err(Refusal::UnknownOrigin),
        };
        if !self.verify_announce(a, &id) {
            return Err(Refusal::BadSignature);
        }
        if n == self.me {
            // A life of ours we do not know (a restart that lost its
            // generation file, or the same generation reused): move above it.
            if a.gen > self.gen || (a.gen == self.gen && a.life != self.life) {
                self.bump_generation(now, a.gen);
            }
            return Ok(false);
        }
        match self.rec(n) {
            None => {
                if self.known >= self.cfg.max_nodes {
                    return Err(Refusal::TooManyNodes);
                }
                self.insert_origin(
                    n,
                    Origin {
                        announce: a.clone(),
                        identity: id,
                        status: Status::Alive,
                        since: now,
                        wm: 0,
                        entries: Vec::new(),
                        extra: None,
                    },
                );
                self.ring_insert(n);
                self.events.push_back(Event::Up(n));
                Ok(true)
            }
            Some(o) => {
                let (g, i) = (o.announce.gen, o.announce.inc);
                if a.gen < g
                    || (a.gen == g && a.inc <= i)
                    || (a.gen == g && o.status == Status::Left)
                {
                    return Ok(false);
                }
                let was_up = o.status.is_up();
                let new_gen = a.gen > g;
                let floor = a.floor;
                self.with_origin(n, |o| {
                    o.announce = a.clone();
                    o.identity = id;
                    if new_gen {
                        o.entries.clear();
                        o.wm = 0;
                        o.extra = None;
                    } else if let Some(x) = o.extra.as_mut() {
                        x.suspicions = Vec::new();
                        // Most nodes hold nothing extra about most others:
                        // give the memory back (it adds up at 10,000 nodes).
                        if x.above.is_empty() && x.leave.is_none() {
                            o.extra = None;
                        }
                    }
                    if floor > 0 {
                        o.entries.retain(|e| e.value.is_some() || e.version > floor);
                    }
                    if !o.status.is_up() || o.status == Status::Suspect {
                        o.status = Status::Alive;
                        o.since = now;
                    }
                });
                if new_gen {
                    self.events.push_back(Event::Reset(n));
                }
                if let Some(w) = self.watch.iter_mut().find(|w| w.name == n) {
                    w.suspected = false;
                    w.heard = now;
                }
                if !was_up {
                    self.ring_insert(n);
                    self.events.push_back(Event::Up(n));
                }
                Ok(true)
            }
        }
    }

    fn apply_suspect(&mut self, now: Micros, s: &Arc<Suspicion>) -> bool {
        let n = s.node;
        if n == self.me {
            if s.gen == self.gen && s.inc >= self.inc {
                self.inc = s.inc;
                self.bump_incarnation();
            }
            return false;
        }
        let Some(o) = self.rec(n) else { return false };
        if (s.gen, s.inc) != (o.announce.gen, o.announce.inc)
            || matches!(o.status, Status::Left | Status::Removed)
            || o.suspicions().iter().any(|x| x.observer == s.observer)
            || o.suspicions().len() >= 8
            // Down on enough evidence already: more suspicions change nothing
            // here, so they are not flooded on (a sync still carries the
            // evidence to whoever lacks it).
            || (o.status == Status::Down && o.suspicions().len() >= 2)
        {
            return false;
        }
        let status = o.status;
        let count = o.suspicions().len() + 1;
        let Some(observer_id) = self.rec(s.observer).map(|o| o.identity.clone()) else {
            self.refuse(Refusal::UnknownOrigin, s.observer);
            return false;
        };
        if !self.verify_with(&observer_id, &s.sig, |b, c| keys::suspicion_of(b, c, s)) {
            self.refuse(Refusal::BadSignature, s.observer);
            return false;
        }
        self.with_origin(n, |o| {
            o.extra().suspicions.push(s.clone());
            if o.status == Status::Alive {
                o.status = Status::Suspect;
                o.since = now;
            }
        });
        if status == Status::Alive {
            self.suspects.push(n);
        }
        let required = self.ring.len().saturating_sub(2).clamp(1, 2);
        if status.is_up() && count >= required {
            self.mark_down(now, n);
        }
        true
    }

    fn mark_down(&mut self, now: Micros, n: Name) {
        let changed = self.with_origin(n, |o| {
            if o.status.is_up() {
                o.status = Status::Down;
                o.since = now;
                true
            } else {
                false
            }
        });
        if changed == Some(true) {
            self.ring_remove(n);
            self.down.push(n);
            self.events.push_back(Event::Down(n));
        }
    }

    fn remove(&mut self, now: Micros, n: Name) {
        self.with_origin(n, |o| {
            o.status = Status::Removed;
            o.since = now;
            o.entries = Vec::new();
            o.wm = 0;
            if let Some(x) = o.extra.as_mut() {
                x.above = Vec::new();
            }
        });
        self.ring_remove(n);
        self.events.push_back(Event::Removed(n));
    }

    fn apply_leave(&mut self, now: Micros, l: &Arc<Leave>) -> Result<bool, Refusal> {
        let n = l.node;
        let Some(o) = self.rec(n) else {
            return Err(Refusal::UnknownOrigin);
        };
        if l.gen < o.announce.gen || o.status == Status::Left {
            return Ok(false);
        }
        let id = o.identity.clone();
        if !self.verify_with(&id, &l.sig, |b, c| keys::leave_of(b, c, l)) {
            return Err(Refusal::BadSignature);
        }
        if n == self.me {
            return Ok(false);
        }
        self.with_origin(n, |o| {
            o.status = Status::Left;
            o.since = now;
            o.entries = Vec::new();
            o.wm = 0;
            o.extra().leave = Some(l.clone());
        });
        self.ring_remove(n);
        if !self.down.contains(&n) {
            self.down.push(n);
        }
        self.events.push_back(Event::Left(n));
        Ok(true)
    }

    fn apply_entry(&mut self, _now: Micros, e: &Arc<SignedEntry>) -> Result<bool, Refusal> {
        let n = e.origin;
        if n == self.me {
            return Ok(false);
        }
        let Some(o) = self.rec(n) else {
            return Err(Refusal::UnknownOrigin);
        };
        if e.gen != o.announce.gen || !(o.status.is_up() || o.status == Status::Down) {
            // Another life of the node: its announcement (and a sync)
            // brings the keyspace.
            return Ok(false);
        }
        if e.version <= o.wm
            && o.entries
                .binary_search_by(|x| x.key.as_str().cmp(&e.key))
                .is_err()
        {
            // Below the watermark and absent: superseded or deleted and
            // collected; a stale copy must not come back.
            return Ok(false);
        }
        let pos = o.entries.binary_search_by(|x| x.key.as_str().cmp(&e.key));
        let superseded = pos.is_ok_and(|i| o.entries[i].version >= e.version);
        if superseded
            && (e.version <= o.wm
                || o.extra
                    .as_ref()
                    .is_some_and(|x| x.above.binary_search(&e.version).is_ok()))
        {
            return Ok(false);
        }
        if pos.is_err() && o.entries.len() >= self.cfg.max_keys_per_origin {
            return Err(Refusal::KeyCap);
        }
        let add = e.key.len() + e.value.as_deref().map_or(0, str::len);
        if o.bytes() + add > self.cfg.max_bytes_per_origin {
            return Err(Refusal::ByteCap);
        }
        let id = o.identity.clone();
        if !self.verify_with(&id, &e.sig, |b, c| keys::entry_of(b, c, e)) {
            return Err(Refusal::BadSignature);
        }
        if superseded {
            // Already overwritten here, but proof that this version was
            // written: the watermark may move over it.
            self.with_origin(n, |o| advance(o, e.version));
            return Ok(false);
        }
        self.with_origin(n, |o| {
            put_entry(&mut o.entries, e.clone());
            advance(o, e.version);
        });
        self.events.push_back(Event::Entry(e.clone()));
        Ok(true)
    }

    /// Applies one origin's state from a sync or join. New facts go to
    /// `fresh` (when given) to be flooded on.
    fn apply_data(
        &mut self,
        now: Micros,
        from: Name,
        d: OriginData,
        mut fresh: Option<&mut Vec<Rumor>>,
    ) {
        match self.apply_alive(now, &d.announce, d.identity.as_ref()) {
            Ok(true) => {
                if let Some(f) = fresh.as_deref_mut() {
                    f.push(Rumor::Alive(d.announce.clone()));
                }
            }
            Ok(false) => {}
            Err(r) => {
                self.refuse(r, from);
                return;
            }
        }
        let n = d.announce.node;
        for s in &d.suspicions {
            if self.apply_suspect(now, s) {
                if let Some(f) = fresh.as_deref_mut() {
                    f.push(Rumor::Suspect(s.clone()));
                }
            }
        }
        if let Some(l) = &d.leave {
            match self.apply_leave(now, l) {
                Ok(true) => {
                    if let Some(f) = fresh.as_deref_mut() {
                        f.push(Rumor::Leave(l.clone()));
                    }
                }
                Ok(false) => {}
                Err(r) => self.refuse(r, from),
            }
        }
        if n == self.me {
            return;
        }
        let mut all_ok = true;
        if d.reset {
            // A full copy: the versions at or below its watermark that we
            // hold and it lacks were deleted (and collected) at the origin.
            let same_gen = self
                .rec(n)
                .is_some_and(|o| o.announce.gen == d.announce.gen);
            if same_gen {
                let keep: std::collections::HashSet<&str> =
                    d.entries.iter().map(|e| e.key.as_str()).collect();
                let wm = d.wm;
                let dropped = self
                    .with_origin(n, |o| {
                        let before = o.entries.len();
                        o.entries
                            .retain(|e| e.version > wm || keep.contains(e.key.as_str()));
                        before != o.entries.len()
                    })
                    .unwrap_or(false);
                if dropped {
                    self.events.push_back(Event::Reset(n));
                }
            }
        }
        for e in &d.entries {
            match self.apply_entry(now, e) {
                Ok(true) => {
                    if let Some(f) = fresh.as_deref_mut() {
                        f.push(Rumor::Entry(e.clone()));
                    }
                }
                Ok(false) => {}
                Err(r) => {
                    all_ok = false;
                    self.refuse(r, from);
                }
            }
        }
        if all_ok {
            let wm = d.wm;
            let gen = d.announce.gen;
            self.with_origin(n, |o| {
                if o.announce.gen == gen && o.status.is_up() && wm > o.wm {
                    o.wm = wm;
                    if let Some(x) = o.extra.as_mut() {
                        x.above.retain(|&v| v > wm);
                    }
                    advance(o, wm);
                }
            });
        }
    }

    // ----- output ----------------------------------------------------------------

    fn send(&mut self, to: Name, body: Body) {
        let Some(addr) = self.rec(to).map(|o| o.announce.addr) else {
            return;
        };
        self.out.push_back(Transmit {
            to: Some(to),
            addr,
            body,
        });
    }

    /// Queues `rumors` for every neighbour and finger but `except`; they
    /// leave together after `flood_delay` (or at once when a batch is full).
    fn flood(&mut self, rumors: Vec<Rumor>, except: Option<Name>) {
        let targets: Vec<Name> = self
            .neighbors
            .iter()
            .chain(&self.fingers)
            .copied()
            .filter(|n| Some(*n) != except)
            .collect();
        for t in targets {
            let i = match self.pending.iter().position(|(n, _)| *n == t) {
                Some(i) => i,
                None => {
                    self.pending.push((t, Vec::new()));
                    self.pending.len() - 1
                }
            };
            self.pending[i].1.extend(rumors.iter().cloned());
            if self.pending[i].1.len() >= self.cfg.max_rumors_per_message {
                let (t, batch) = self.pending.swap_remove(i);
                self.send(t, Body::Rumors(batch));
            }
        }
        if self.cfg.flood_delay == 0 {
            self.flush();
        } else if self.flush_at.is_none() && !self.pending.is_empty() {
            self.flush_at = Some(self.now + self.cfg.flood_delay);
        }
    }

    fn flush(&mut self) {
        self.flush_at = None;
        for (t, batch) in std::mem::take(&mut self.pending) {
            if !batch.is_empty() {
                self.send(t, Body::Rumors(batch));
            }
        }
    }
}

/// `a` is ahead of `b` (same node): a later life, a later incarnation, more
/// evidence against it, or more of its keys.
fn newer(a: &Summary, b: &Summary) -> bool {
    (a.gen, a.inc, a.status) > (b.gen, b.inc, b.status)
        || ((a.gen, a.inc, a.status) == (b.gen, b.inc, b.status) && a.status == 0 && a.wm > b.wm)
}

fn put_entry(entries: &mut Vec<Arc<SignedEntry>>, e: Arc<SignedEntry>) {
    match entries.binary_search_by(|x| x.key.as_str().cmp(&e.key)) {
        Ok(i) => entries[i] = e,
        Err(i) => entries.insert(i, e),
    }
}

/// Records version `v` as held and moves the watermark over any run of
/// versions now complete.
fn advance(o: &mut Origin, v: u64) {
    if v == o.wm + 1 {
        o.wm = v;
    } else if v > o.wm + 1 {
        let x = o.extra();
        if let Err(i) = x.above.binary_search(&v) {
            if x.above.len() < 4096 {
                x.above.insert(i, v);
            }
        }
    }
    if let Some(x) = o.extra.as_mut() {
        let mut wm = o.wm;
        x.above.retain(|&a| {
            if a == wm + 1 {
                wm = a;
                false
            } else {
                a > wm
            }
        });
        o.wm = wm;
        if x.above.is_empty() && x.suspicions.is_empty() && x.leave.is_none() {
            o.extra = None;
        }
    }
}
