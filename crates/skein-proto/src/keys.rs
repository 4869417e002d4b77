//! Signing and checking what nodes originate.
//!
//! The core never sees a key: the agent implements [`Keys`] with the node's
//! ECDSA key and the cluster CA, the simulator with a keyed hash of the same
//! signature length. What is signed is a fixed byte layout of the fact
//! (below), prefixed with the cluster tag and a domain byte so a signature
//! for one kind of fact can never be replayed as another.

use std::net::SocketAddr;

use crate::name::Name;
use crate::wire::{Announce, Identity, Leave, Sig, SignedEntry, Suspicion};

pub trait Keys {
    /// Signs `msg` with this node's own key.
    fn sign(&self, msg: &[u8]) -> Sig;
    /// Whether `identity` proves a key of node `node` in this cluster.
    fn check_identity(&self, node: &str, identity: &Identity) -> bool;
    /// Whether `sig` over `msg` was made with the key `identity` proves
    /// (an identity already accepted by `check_identity`).
    fn verify(&self, identity: &Identity, msg: &[u8], sig: &Sig) -> bool;
}

const ALIVE: u8 = 1;
const SUSPECT: u8 = 2;
const ENTRY: u8 = 3;
const LEAVE: u8 = 4;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_name(out: &mut Vec<u8>, n: Name) {
    put_str(out, n.as_str());
}

fn head(out: &mut Vec<u8>, cluster: u64, domain: u8) {
    out.clear();
    out.extend_from_slice(b"skein1");
    out.push(domain);
    out.extend_from_slice(&cluster.to_le_bytes());
}

#[allow(clippy::too_many_arguments)]
pub fn alive_bytes(
    out: &mut Vec<u8>,
    cluster: u64,
    node: Name,
    gen: u64,
    life: u64,
    inc: u64,
    addr: SocketAddr,
    floor: u64,
) {
    head(out, cluster, ALIVE);
    put_name(out, node);
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(&life.to_le_bytes());
    out.extend_from_slice(&inc.to_le_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_le_bytes());
    out.extend_from_slice(&floor.to_le_bytes());
}

pub fn announce_bytes(out: &mut Vec<u8>, cluster: u64, a: &Announce) {
    alive_bytes(out, cluster, a.node, a.gen, a.life, a.inc, a.addr, a.floor);
}

pub fn suspicion_bytes(
    out: &mut Vec<u8>,
    cluster: u64,
    observer: Name,
    node: Name,
    gen: u64,
    inc: u64,
) {
    head(out, cluster, SUSPECT);
    put_name(out, observer);
    put_name(out, node);
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(&inc.to_le_bytes());
}

pub fn suspicion_of(out: &mut Vec<u8>, cluster: u64, s: &Suspicion) {
    suspicion_bytes(out, cluster, s.observer, s.node, s.gen, s.inc);
}

pub fn entry_bytes(
    out: &mut Vec<u8>,
    cluster: u64,
    origin: Name,
    gen: u64,
    version: u64,
    key: &str,
    value: Option<&str>,
) {
    head(out, cluster, ENTRY);
    put_name(out, origin);
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    put_str(out, key);
    match value {
        Some(v) => {
            out.push(1);
            put_str(out, v);
        }
        None => out.push(0),
    }
}

pub fn entry_of(out: &mut Vec<u8>, cluster: u64, e: &SignedEntry) {
    entry_bytes(
        out,
        cluster,
        e.origin,
        e.gen,
        e.version,
        &e.key,
        e.value.as_deref(),
    );
}

pub fn leave_bytes(out: &mut Vec<u8>, cluster: u64, node: Name, gen: u64) {
    head(out, cluster, LEAVE);
    put_name(out, node);
    out.extend_from_slice(&gen.to_le_bytes());
}

pub fn leave_of(out: &mut Vec<u8>, cluster: u64, l: &Leave) {
    leave_bytes(out, cluster, l.node, l.gen);
}
