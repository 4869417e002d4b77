//! A tiny in-test network: nodes of the real core, messages delivered in
//! order with an optional filter, time advanced by hand.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use skein_proto::name::{hash64, mix};
use skein_proto::{Body, Config, Event, Identity, Keys, Micros, Name, Node, Sig};

pub(crate) const CA: u64 = 0xca;

pub(crate) fn key_of(name: &str) -> u64 {
    mix(hash64(name.as_bytes()) ^ CA)
}

fn mac(key: u64, msg: &[u8]) -> u64 {
    let mut h = mix(key);
    for c in msg.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = mix(h ^ u64::from_le_bytes(w));
    }
    mix(h ^ msg.len() as u64)
}

#[derive(Clone)]
pub(crate) struct TestKeys(pub u64);

impl Keys for TestKeys {
    fn sign(&self, msg: &[u8]) -> Sig {
        let mut s = [0u8; 64];
        s[..8].copy_from_slice(&mac(self.0, msg).to_le_bytes());
        Sig(s)
    }
    fn check_identity(&self, node: &str, id: &Identity) -> bool {
        id.0.len() == 8 && id.0[..] == key_of(node).to_le_bytes()
    }
    fn verify(&self, id: &Identity, msg: &[u8], sig: &Sig) -> bool {
        let Ok(k) = <[u8; 8]>::try_from(&id.0[..]) else {
            return false;
        };
        sig.0[..8] == mac(u64::from_le_bytes(k), msg).to_le_bytes()
    }
}

pub(crate) fn identity(name: &str) -> Arc<Identity> {
    Arc::new(Identity(key_of(name).to_le_bytes().to_vec()))
}

pub(crate) fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, i as u8 + 1)), 62501)
}

pub(crate) fn name(prefix: &str, i: usize) -> Name {
    Name::intern(&format!("{prefix}-{i}")).unwrap()
}

pub(crate) fn node(prefix: &str, i: usize, gen: u64, cfg: &Config, now: Micros) -> Node<TestKeys> {
    node_seeded(prefix, i, gen, cfg, now, i as u64 + 1)
}

/// A node whose randomness (and so its life id) comes from `seed`.
pub(crate) fn node_seeded(
    prefix: &str,
    i: usize,
    gen: u64,
    cfg: &Config,
    now: Micros,
    seed: u64,
) -> Node<TestKeys> {
    let n = format!("{prefix}-{i}");
    Node::new(
        cfg.clone(),
        TestKeys(key_of(&n)),
        Name::intern(&n).unwrap(),
        addr(i),
        identity(&n),
        gen,
        seed,
        now,
    )
}

pub(crate) struct Net {
    pub nodes: Vec<Node<TestKeys>>,
    pub up: Vec<bool>,
    pub now: Micros,
    pub events: Vec<(usize, Event)>,
    /// Messages between these two groups are dropped.
    pub cut: Option<Vec<bool>>,
    queue: VecDeque<(usize, Name, Body)>,
}

impl Net {
    /// `n` nodes named `prefix-i`; node 0 founds, the others join through it.
    pub(crate) fn new(prefix: &str, n: usize, cfg: &Config) -> Net {
        let nodes = (0..n).map(|i| node(prefix, i, 1, cfg, 0)).collect();
        let mut net = Net {
            nodes,
            up: vec![true; n],
            now: 0,
            events: Vec::new(),
            cut: None,
            queue: VecDeque::new(),
        };
        for i in 0..n {
            let seeds = if i == 0 { vec![] } else { vec![addr(0)] };
            net.nodes[i].join(0, seeds);
            net.drain(i);
        }
        net
    }

    fn index(&self, a: SocketAddr) -> Option<usize> {
        match a.ip() {
            IpAddr::V4(v) => Some(v.octets()[3] as usize - 1),
            IpAddr::V6(_) => None,
        }
    }

    pub(crate) fn drain(&mut self, i: usize) {
        let from = self.nodes[i].name();
        while let Some(t) = self.nodes[i].poll_transmit() {
            if let Some(j) = self.index(t.addr).filter(|&j| j < self.nodes.len()) {
                self.queue.push_back((j, from, t.body));
            }
        }
        while let Some(e) = self.nodes[i].poll_event() {
            self.events.push((i, e));
        }
    }

    /// Delivers queued messages (and what they cause) until none is left.
    pub(crate) fn deliver(&mut self) {
        while let Some((to, from, body)) = self.queue.pop_front() {
            if !self.up[to] {
                continue;
            }
            let Some(src) = self.nodes.iter().position(|n| n.name() == from) else {
                continue;
            };
            if let Some(cut) = &self.cut {
                if cut[src] != cut[to] {
                    continue;
                }
            }
            self.nodes[to].handle(self.now, from, body);
            self.drain(to);
        }
    }

    /// Advances time in steps of `step`, ticking every live node.
    pub(crate) fn run(&mut self, until: Micros, step: Micros) {
        while self.now < until {
            self.now += step;
            for i in 0..self.nodes.len() {
                if self.up[i] {
                    self.nodes[i].tick(self.now);
                    self.drain(i);
                }
            }
            self.deliver();
        }
    }

    pub(crate) fn digests_equal(&self) -> bool {
        let live: Vec<u64> = (0..self.nodes.len())
            .filter(|&i| self.up[i])
            .map(|i| self.nodes[i].digest())
            .collect();
        live.windows(2).all(|w| w[0] == w[1])
    }
}
