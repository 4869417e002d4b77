//! What travels between nodes: one [`Envelope`] per message, encoded with
//! postcard behind a version byte and the cluster's tag.
//!
//! Everything a node *originates* and others relay ([`Announce`],
//! [`Suspicion`], [`SignedEntry`], [`Leave`]) carries its originator's
//! signature; everything else is a direct, point-to-point message whose
//! sender the transport has authenticated.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::name::Name;

/// The first byte of every message. A peer speaking another version is
/// refused before anything else is read.
pub const WIRE_VERSION: u8 = 1;

/// Bytes a node's signature takes (ECDSA P-256, fixed encoding).
pub const SIG_LEN: usize = 64;

#[derive(Clone, PartialEq, Eq)]
pub struct Sig(pub [u8; SIG_LEN]);

impl std::fmt::Debug for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{SIG_LEN} signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sig, E> {
                let arr: [u8; SIG_LEN] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Sig(arr))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// What proves a node's key: its certificate, issued by the cluster CA for
/// its node id and cluster. Opaque here; [`crate::Keys`] checks it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity(#[serde(with = "bytes")] pub Vec<u8>);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({} bytes)", self.0.len())
    }
}

mod bytes {
    pub(super) fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

/// "Node `node`, generation `gen`, incarnation `inc`, is alive at `addr`",
/// signed by the node. A higher generation is a restart (the keyspace starts
/// over); a higher incarnation within one refutes suspicion. `floor`: every
/// tombstone at or below this version has been garbage-collected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub node: Name,
    pub gen: u64,
    /// Random per start of the agent: two lives that share a generation
    /// (a data dir wiped, a clock set back) still differ, and the node that
    /// meets its other life moves above it.
    pub life: u64,
    pub inc: u64,
    pub addr: SocketAddr,
    pub floor: u64,
    /// Sent with a generation's first announcement; refutations leave it out.
    pub identity: Option<Arc<Identity>>,
    pub sig: Sig,
}

/// "`observer` has not heard from `node` (at `gen`/`inc`)", signed by the
/// observer. Enough distinct observers make the node down everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspicion {
    pub observer: Name,
    pub node: Name,
    pub gen: u64,
    pub inc: u64,
    pub sig: Sig,
}

/// One key of one node's keyspace (`value: None` deletes it), signed by
/// that node. Versions count the node's writes within a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    pub origin: Name,
    pub gen: u64,
    pub version: u64,
    pub key: String,
    /// Shared with the agent's replica view, not copied into it.
    pub value: Option<Arc<str>>,
    pub sig: Sig,
}

/// "Node `node` has left for good (generation `gen`)", signed by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    pub node: Name,
    pub gen: u64,
    pub sig: Sig,
}

/// A relayed fact: flooded to the neighbours of every node it is new to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rumor {
    Alive(Arc<Announce>),
    Suspect(Arc<Suspicion>),
    Entry(Arc<SignedEntry>),
    Leave(Arc<Leave>),
}

/// A direct liveness message. `you_down`: the sender holds the receiver
/// down at this (generation, incarnation), so the receiver should refute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub gen: u64,
    pub inc: u64,
    pub digest: u64,
    pub you_down: Option<(u64, u64)>,
    /// The sender's current announcement, on pings and acks: a node held
    /// down on the other side of a healed partition is back at once.
    pub announce: Option<Arc<Announce>>,
}

/// One node's state as a sync partner holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub node: Name,
    pub gen: u64,
    pub inc: u64,
    /// Every version up to this one is held (alive origins only).
    pub wm: u64,
    pub status: u8,
}

/// "Send me `node`'s state beyond what I hold."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub node: Name,
    pub gen: u64,
    pub wm: u64,
    pub identity: bool,
}

/// Everything needed to bring a peer's copy of one origin up to ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginData {
    pub announce: Arc<Announce>,
    pub identity: Option<Arc<Identity>>,
    pub suspicions: Vec<Arc<Suspicion>>,
    pub leave: Option<Arc<Leave>>,
    /// `true`: these are all the origin's live keys; drop any other key at
    /// or below `wm`.
    pub reset: bool,
    pub entries: Vec<Arc<SignedEntry>>,
    pub wm: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// To ring neighbours, every heartbeat interval.
    Heartbeat(Probe),
    /// To a node held down (is it back?), or a reply to a heartbeat from a
    /// node that is not our neighbour.
    Ping(Probe),
    Ack(Probe),
    /// A new (or restarted) node to a seed, with its whole keyspace so the
    /// cluster sees its new life and its keys at once; answered with the
    /// whole state.
    Join(OriginData),
    Rumors(Vec<Rumor>),
    /// Anti-entropy, started when a neighbour's digest differs from ours.
    SyncStart {
        buckets: Vec<u64>,
    },
    SyncSummaries {
        mask: u64,
        summaries: Vec<Summary>,
    },
    SyncWant(Vec<Want>),
    /// `spread`: what is new to the receiver is flooded on (a repair after a
    /// partition), unlike a join's bulk copy.
    SyncData {
        spread: bool,
        origins: Vec<OriginData>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u8,
    pub cluster: u64,
    pub body: Body,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {0} bytes is over the {1}-byte cap")]
    TooLarge(usize, usize),
    #[error("peer speaks wire version {0}, this node {WIRE_VERSION}")]
    Version(u8),
    #[error("peer belongs to another cluster")]
    Cluster,
    #[error("malformed message: {0}")]
    Malformed(String),
}

pub fn encode(cluster: u64, body: &Body) -> Vec<u8> {
    let envelope = EnvelopeRef {
        version: WIRE_VERSION,
        cluster,
        body,
    };
    // Serializing plain data into a Vec cannot fail.
    postcard::to_allocvec(&envelope).unwrap_or_default()
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    version: u8,
    cluster: u64,
    body: &'a Body,
}

/// Decodes one message, refusing another version, another cluster, or more
/// than `max_len` bytes (there is no compression: the bytes read are the
/// bytes decoded).
pub fn decode(bytes: &[u8], cluster: u64, max_len: usize) -> Result<Body, DecodeError> {
    let first = *bytes.first().ok_or(DecodeError::Empty)?;
    if bytes.len() > max_len {
        return Err(DecodeError::TooLarge(bytes.len(), max_len));
    }
    if first != WIRE_VERSION {
        return Err(DecodeError::Version(first));
    }
    let (envelope, rest): (Envelope, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    if envelope.cluster != cluster {
        return Err(DecodeError::Cluster);
    }
    Ok(envelope.body)
}

/// The encoded size of a message, without building it.
pub fn encoded_len(cluster: u64, body: &Body) -> usize {
    let envelope = EnvelopeRef {
        version: WIRE_VERSION,
        cluster,
        body,
    };
    postcard::serialize_with_flavor(&envelope, Counter(0)).unwrap_or(0)
}

struct Counter(usize);

impl postcard::ser_flavors::Flavor for Counter {
    type Output = usize;
    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 += data.len();
        Ok(())
    }
    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}
