//! A deterministic discrete-event simulation of skein's gossip core.
//!
//! Every node is a real [`skein_proto::Node`]; the network is a priority
//! queue of deliveries with a latency model, i.i.d. loss and partitions;
//! time is virtual and every random choice comes from the seed. Bytes are
//! the encoded size of each message (postcard, as on the wire) plus a
//! fixed per-message overhead for QUIC, UDP and IP ([`OVERHEAD`]).

pub mod keys;
pub mod scenario;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use skein_proto::name::mix;
use skein_proto::wire;
use skein_proto::{Body, Config, Event, Micros, Name, Node};

pub use keys::SimKeys;

/// Bytes every message costs on the wire beyond its encoded payload,
/// measured on real agents by `netns-bench` (interface counters over
/// /metrics' message counts, 5 agents idle: 224 bytes per message of which
/// 31 payload): IPv4 20 + UDP 8 (+ Ethernet 14 on the measured link) + QUIC
/// short header ≈ 11 + AEAD tag 16 + STREAM frame ≈ 6, and the receiver's
/// ACK packet (≈ 75 bytes of its own: heartbeats are too far apart for ACKs
/// to ride on data), plus keep-alive and stream-credit frames.
pub const OVERHEAD: usize = 190;

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub loss: f64,
    pub latency: Micros,
    pub jitter: Micros,
    /// Encode and decode every message through the wire format (slower;
    /// proves the bytes, not only their count).
    pub wire: bool,
}

pub struct Slot {
    pub node: Node<SimKeys>,
    pub alive: bool,
    pub started: bool,
    scheduled: Micros,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub msgs_out: u64,
    pub msgs_in: u64,
}

enum Kind {
    Deliver {
        to: u32,
        from: Name,
        body: Body,
        bytes: usize,
    },
    Tick(u32),
    Start(u32),
}

struct Ev {
    t: Micros,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.t, self.seq).cmp(&(o.t, o.seq))
    }
}

pub const CA_SECRET: u64 = 0x0c0f_fee0_dead_beef;

pub fn addr_of(i: u32) -> SocketAddr {
    let n = i + 1;
    let ip = Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8);
    SocketAddr::new(IpAddr::V4(ip), 62501)
}

fn slot_of(addr: SocketAddr) -> Option<u32> {
    match addr.ip() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let n = (u32::from(o[1]) << 16) | (u32::from(o[2]) << 8) | u32::from(o[3]);
            n.checked_sub(1)
        }
        IpAddr::V6(_) => None,
    }
}

pub fn name_of(i: u32) -> Name {
    Name::intern(&format!("node-{i}")).expect("simulated names are valid")
}

pub struct Sim {
    pub now: Micros,
    pub slots: Vec<Slot>,
    queue: BinaryHeap<Reverse<Ev>>,
    seq: u64,
    rng: u64,
    pub net: NetConfig,
    pub cluster: u64,
    /// Side of each node while a partition holds.
    partition: Option<Vec<bool>>,
    index: std::collections::HashMap<Name, u32>,
    pub messages: u64,
    /// Value of the `meta` key each node writes as it starts.
    pub meta: Option<String>,
}

impl Sim {
    /// `n` nodes, none started. Node `i` has name `node-i`.
    pub fn new(n: u32, seed: u64, net: NetConfig, cfg: &Config) -> Sim {
        let mut slots = Vec::with_capacity(n as usize);
        let mut index = std::collections::HashMap::with_capacity(n as usize);
        let identities: Vec<Arc<skein_proto::Identity>> = (0..n)
            .map(|i| Arc::new(keys::identity_of(&format!("node-{i}"), CA_SECRET)))
            .collect();
        for i in 0..n {
            let name = name_of(i);
            index.insert(name, i);
            let keys = SimKeys {
                key: keys::key_of(&format!("node-{i}"), CA_SECRET),
                ca_secret: CA_SECRET,
            };
            let node = Node::new(
                cfg.clone(),
                keys,
                name,
                addr_of(i),
                identities[i as usize].clone(),
                1,
                mix(seed ^ u64::from(i).wrapping_mul(0x9e37_79b9)),
                0,
            );
            slots.push(Slot {
                node,
                alive: false,
                started: false,
                scheduled: Micros::MAX,
                bytes_out: 0,
                bytes_in: 0,
                msgs_out: 0,
                msgs_in: 0,
            });
        }
        Sim {
            now: 0,
            slots,
            queue: BinaryHeap::new(),
            seq: 0,
            rng: mix(seed),
            net,
            cluster: cfg.cluster,
            partition: None,
            index,
            messages: 0,
            meta: None,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.rng)
    }

    pub fn uniform(&mut self) -> f64 {
        (self.random() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.random() % n.max(1) as u64) as usize
    }

    fn push(&mut self, t: Micros, kind: Kind) {
        self.seq += 1;
        self.queue.push(Reverse(Ev {
            t,
            seq: self.seq,
            kind,
        }));
    }

    pub fn slot_of_name(&self, n: Name) -> Option<u32> {
        self.index.get(&n).copied()
    }

    /// Starts every node at once from the same persisted replica (each
    /// node's own announcement and keys), as a whole-cluster restart does:
    /// nobody joins, nothing is flooded, and liveness is then established
    /// by the heartbeats alone.
    pub fn start_restored(&mut self) {
        let now = self.now;
        if let Some(meta) = self.meta.clone() {
            for s in &mut self.slots {
                let _ = s.node.write(now, "meta", Some(&meta));
                while s.node.poll_transmit().is_some() {}
            }
        }
        let data: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| s.node.own_data())
            .collect();
        for i in 0..self.slots.len() {
            let node = &mut self.slots[i].node;
            for (j, d) in data.iter().enumerate() {
                if j != i {
                    node.restore(now, d.clone());
                }
            }
            while node.poll_event().is_some() {}
            node.join(now, Vec::new());
            let slot = &mut self.slots[i];
            slot.alive = true;
            slot.started = true;
            self.after(i as u32, &mut |_, _, _| {});
        }
    }

    /// Starts node `i` at `t`, joining through `seeds`.
    pub fn start_at(&mut self, i: u32, t: Micros) {
        self.push(t, Kind::Start(i));
    }

    pub fn kill(&mut self, i: u32) {
        self.slots[i as usize].alive = false;
    }

    /// Nodes on the `true` side cannot reach the others, nor they them.
    pub fn set_partition(&mut self, sides: Option<Vec<bool>>) {
        self.partition = sides;
    }

    pub fn reset_counters(&mut self) {
        for s in &mut self.slots {
            s.bytes_in = 0;
            s.bytes_out = 0;
            s.msgs_in = 0;
            s.msgs_out = 0;
        }
    }

    pub fn live(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.alive)
            .map(|(i, _)| i as u32)
    }

    /// Writes `key` on node `i` (a local, acknowledged write).
    pub fn write(&mut self, i: u32, key: &str, value: Option<&str>) {
        let now = self.now;
        let _ = self.slots[i as usize].node.write(now, key, value);
        self.after(i, &mut |_, _, _| {});
    }

    /// Runs until virtual time `until`, calling `on_event(now, node, event)`
    /// for every event a node reports.
    pub fn run_until(&mut self, until: Micros, on_event: &mut dyn FnMut(Micros, u32, Event)) {
        while let Some(Reverse(ev)) = self.queue.peek() {
            if ev.t > until {
                break;
            }
            let Some(Reverse(ev)) = self.queue.pop() else {
                break;
            };
            self.now = ev.t;
            match ev.kind {
                Kind::Start(i) => {
                    let seeds: Vec<SocketAddr> = (0..3u32.min(self.slots.len() as u32))
                        .filter(|&s| s != i)
                        .map(addr_of)
                        .collect();
                    let slot = &mut self.slots[i as usize];
                    slot.alive = true;
                    slot.started = true;
                    // Node 0 founds the cluster; everyone else joins through
                    // the first three nodes.
                    let seeds = if i == 0 { Vec::new() } else { seeds };
                    if let Some(meta) = &self.meta {
                        let _ = slot.node.write(self.now, "meta", Some(meta));
                    }
                    slot.node.join(self.now, seeds);
                    self.after(i, on_event);
                }
                Kind::Tick(i) => {
                    let slot = &mut self.slots[i as usize];
                    if !slot.alive || slot.scheduled != ev.t {
                        continue;
                    }
                    slot.scheduled = Micros::MAX;
                    slot.node.tick(self.now);
                    self.after(i, on_event);
                }
                Kind::Deliver {
                    to,
                    from,
                    body,
                    bytes,
                } => {
                    let slot = &mut self.slots[to as usize];
                    if !slot.alive {
                        continue;
                    }
                    slot.bytes_in += bytes as u64;
                    slot.msgs_in += 1;
                    let body = if self.net.wire {
                        let encoded = wire::encode(self.cluster, &body);
                        match wire::decode(&encoded, self.cluster, usize::MAX) {
                            Ok(b) => b,
                            Err(e) => panic!("wire round trip failed: {e}"),
                        }
                    } else {
                        body
                    };
                    slot.node.handle(self.now, from, body);
                    self.after(to, on_event);
                }
            }
        }
        self.now = until;
    }

    /// Collects what node `i` wants sent and reports, and its next tick.
    fn after(&mut self, i: u32, on_event: &mut dyn FnMut(Micros, u32, Event)) {
        let from = self.slots[i as usize].node.name();
        while let Some(t) = self.slots[i as usize].node.poll_transmit() {
            let bytes = wire::encoded_len(self.cluster, &t.body) + OVERHEAD;
            self.messages += 1;
            {
                let s = &mut self.slots[i as usize];
                s.bytes_out += bytes as u64;
                s.msgs_out += 1;
            }
            let Some(to) = slot_of(t.addr).filter(|&j| (j as usize) < self.slots.len()) else {
                continue;
            };
            if let Some(sides) = &self.partition {
                if sides[i as usize] != sides[to as usize] {
                    continue;
                }
            }
            if self.net.loss > 0.0 && self.uniform() < self.net.loss {
                continue;
            }
            let jitter = if self.net.jitter > 0 {
                let span = 2 * self.net.jitter + 1;
                (self.random() % span) as i64 - self.net.jitter as i64
            } else {
                0
            };
            let delay = (self.net.latency as i64 + jitter).max(1) as Micros;
            self.push(
                self.now + delay,
                Kind::Deliver {
                    to,
                    from,
                    body: t.body,
                    bytes,
                },
            );
        }
        let now = self.now;
        while let Some(e) = self.slots[i as usize].node.poll_event() {
            on_event(now, i, e);
        }
        let slot = &mut self.slots[i as usize];
        let next = slot.node.next_deadline().max(now + 1);
        if next < slot.scheduled {
            slot.scheduled = next;
            self.push(next, Kind::Tick(i));
        }
    }
}
