//! What the fuzz targets share: the fixed DNS records, the gossip test keys
//! (a keyed hash, as in `crates/skein-proto/tests/support`), and the framing
//! of a gossip session. `examples/seeds.rs` writes the committed corpus
//! with the same helpers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use skein_dns::{RData, Records};
use skein_proto::name::{hash64, mix};
use skein_proto::wire::{Announce, Leave, OriginData, Rumor, Suspicion};
use skein_proto::{keys, Body, Config, Identity, Keys, Micros, Name, Node, Sig, SignedEntry};

// ----- DNS ---------------------------------------------------------------

/// A small fixed record set over the three zones: several A records on one
/// name (rotation), SRV, AAAA.
pub fn records() -> Records {
    let mut r = Records::builder();
    for i in 1..=3 {
        r.add(
            "web.marathon.mesos.",
            RData::A {
                ip: Ipv4Addr::new(10, 0, 0, i),
            },
        );
        r.add(
            "_web._tcp.marathon.mesos.",
            RData::Srv {
                priority: 0,
                weight: 1,
                port: 31000 + u16::from(i),
                target: &format!("web-{i}.marathon.slave.mesos."),
            },
        );
    }
    r.add(
        "web.marathon.l4lb.thisdcos.directory.",
        RData::A {
            ip: Ipv4Addr::new(11, 0, 0, 1),
        },
    );
    r.add(
        "web.marathon.autoip.thisdcos.directory.",
        RData::Aaaa {
            ip: Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 1),
        },
    );
    r.add(
        "ready.spartan.",
        RData::A {
            ip: Ipv4Addr::new(127, 0, 0, 1),
        },
    );
    r.build()
}

// ----- gossip ------------------------------------------------------------

pub const CLUSTER_ID: &str = "fuzz";
const CA: u64 = 0xca;
/// The fuzzed node, and the peers a session's messages come from.
pub const ME: &str = "fuzz-0";
pub const PEERS: [&str; 4] = ["fuzz-1", "fuzz-2", "fuzz-3", "fuzz-4"];

pub fn key_of(name: &str) -> u64 {
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

/// Signatures are a keyed hash whose key follows from the node's name: the
/// fuzz target can sign for anyone, so fuzzed facts pass the checks and reach
/// the protocol's logic (see [`resign`]).
#[derive(Clone)]
pub struct TestKeys(pub u64);

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

pub fn identity(name: &str) -> Arc<Identity> {
    Arc::new(Identity(key_of(name).to_le_bytes().to_vec()))
}

pub fn config() -> Config {
    Config::new(CLUSTER_ID)
}

pub fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, i as u8 + 1)), 62501)
}

/// Node `names[i]`, generation 1, as the seed generator and the target
/// create it (same seed, so the same life id).
pub fn node(name: &str, i: usize, now: Micros) -> Node<TestKeys> {
    Node::new(
        config(),
        TestKeys(key_of(name)),
        Name::intern(name).expect("name"),
        addr(i),
        identity(name),
        1,
        i as u64 + 1,
        now,
    )
}

fn sign(name: Name, bytes: &[u8]) -> Sig {
    TestKeys(key_of(name.as_str())).sign(bytes)
}

fn resign_announce(a: &mut Arc<Announce>, cluster: u64, buf: &mut Vec<u8>) {
    let a = Arc::make_mut(a);
    if a.identity.is_some() {
        a.identity = Some(identity(a.node.as_str()));
    }
    keys::announce_bytes(buf, cluster, a);
    a.sig = sign(a.node, buf);
}

fn resign_suspicion(s: &mut Arc<Suspicion>, cluster: u64, buf: &mut Vec<u8>) {
    let s = Arc::make_mut(s);
    keys::suspicion_of(buf, cluster, s);
    s.sig = sign(s.observer, buf);
}

fn resign_entry(e: &mut Arc<SignedEntry>, cluster: u64, buf: &mut Vec<u8>) {
    let e = Arc::make_mut(e);
    keys::entry_of(buf, cluster, e);
    e.sig = sign(e.origin, buf);
}

fn resign_leave(l: &mut Arc<Leave>, cluster: u64, buf: &mut Vec<u8>) {
    let l = Arc::make_mut(l);
    keys::leave_of(buf, cluster, l);
    l.sig = sign(l.node, buf);
}

fn resign_origin(d: &mut OriginData, cluster: u64, buf: &mut Vec<u8>) {
    resign_announce(&mut d.announce, cluster, buf);
    if d.identity.is_some() {
        d.identity = Some(identity(d.announce.node.as_str()));
    }
    for s in &mut d.suspicions {
        resign_suspicion(s, cluster, buf);
    }
    if let Some(l) = &mut d.leave {
        resign_leave(l, cluster, buf);
    }
    for e in &mut d.entries {
        resign_entry(e, cluster, buf);
    }
}

/// Gives every signed fact in `body` a valid signature (and every identity
/// the right key) for the node it names, so a fuzzed message is refused only
/// for what it says, not for a signature libFuzzer cannot forge.
pub fn resign(body: &mut Body, cluster: u64) {
    let mut buf = Vec::new();
    match body {
        Body::Heartbeat(p) | Body::Ping(p) | Body::Ack(p) => {
            if let Some(a) = &mut p.announce {
                resign_announce(a, cluster, &mut buf);
            }
        }
        Body::Join(d) => resign_origin(d, cluster, &mut buf),
        Body::Rumors(rumors) => {
            for r in rumors {
                match r {
                    Rumor::Alive(a) => resign_announce(a, cluster, &mut buf),
                    Rumor::Suspect(s) => resign_suspicion(s, cluster, &mut buf),
                    Rumor::Entry(e) => resign_entry(e, cluster, &mut buf),
                    Rumor::Leave(l) => resign_leave(l, cluster, &mut buf),
                }
            }
        }
        Body::SyncData { origins, .. } => {
            for d in origins {
                resign_origin(d, cluster, &mut buf);
            }
        }
        Body::SyncStart { .. } | Body::SyncSummaries { .. } | Body::SyncWant(_) => {}
    }
}

/// One step of a gossip session, as the `gossip_node` target reads it:
///
/// `[flags u8][time step u8, in ms][length u16 LE][message: length bytes]`
///
/// flags bit 0-1: sender (`PEERS`), bit 2: re-sign the message's facts,
/// bit 3: tick before handling, bit 4: tick only (no message).
#[derive(Debug)]
pub struct Step<'a> {
    pub flags: u8,
    pub dt_ms: u8,
    pub message: &'a [u8],
}

pub const RESIGN: u8 = 0x04;
pub const TICK: u8 = 0x08;
pub const TICK_ONLY: u8 = 0x10;

pub fn steps(mut data: &[u8]) -> impl Iterator<Item = Step<'_>> {
    std::iter::from_fn(move || {
        let (&[flags, dt_ms, l0, l1], rest) = data.split_first_chunk::<4>()?;
        let len = usize::from(u16::from_le_bytes([l0, l1])).min(rest.len());
        let (message, rest) = rest.split_at(len);
        data = rest;
        Some(Step {
            flags,
            dt_ms,
            message,
        })
    })
}

pub fn write_step(out: &mut Vec<u8>, flags: u8, dt_ms: u8, message: &[u8]) {
    out.push(flags);
    out.push(dt_ms);
    out.extend_from_slice(&(message.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(message);
}

/// Splits `data` into two parts at a u16 LE length prefix (the DNS
/// wire/cache target's query and response).
pub fn split2(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&[l0, l1], rest) = data.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_le_bytes([l0, l1])).min(rest.len());
    Some(rest.split_at(len))
}
