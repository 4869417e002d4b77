//! skein's gossip protocol, sans IO.
//!
//! [`Node`] is one member as a state machine (see [`node`] for the design):
//! the agent drives it with a QUIC transport and the real clock, the
//! simulator (`skein-sim`) with a virtual network and virtual time — the
//! same code. [`wire`] is what travels; [`Keys`] is how what a node
//! originates is signed and checked, so a relayed fact is believed only if
//! its originator signed it.

pub mod keys;
pub mod name;
pub mod node;
pub mod wire;

pub use keys::Keys;
pub use name::Name;
pub use node::{Config, Event, Member, Micros, Node, Refusal, Stats, Status, Transmit};
pub use wire::{Body, Identity, OriginData, Sig, SignedEntry};
