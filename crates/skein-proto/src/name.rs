//! Node names, interned once per process.
//!
//! Every node of a 10,000-node cluster holds a record of every other node, and
//! the simulator holds 10,000 such nodes in one process: a name is therefore a
//! 4-byte handle into one process-wide table, and each node indexes its
//! per-origin records by it. The table is bounded, so names arriving from the
//! network cannot grow it without limit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::{OnceLock, RwLock};

/// Names the table accepts at most, over the life of the process.
pub const MAX_NAMES: usize = 1 << 18;
/// Longest node id accepted (a DNS name's length).
pub const MAX_NAME_LEN: usize = 253;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(u32);

#[derive(Default)]
struct Table {
    ids: HashMap<&'static str, u32>,
    /// Never shrinks: a name's text lives as long as the process (bounded
    /// by `MAX_NAMES`), so readers can hold `&'static str`.
    names: Vec<(&'static str, u64)>,
}

fn table() -> &'static RwLock<Table> {
    static TABLE: OnceLock<RwLock<Table>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

thread_local! {
    /// This thread's copy of the table's prefix: lookups on the hot path
    /// (every message names nodes) take no lock.
    static LOCAL: RefCell<Vec<(&'static str, u64)>> = const { RefCell::new(Vec::new()) };
}

fn entry(id: u32) -> (&'static str, u64) {
    LOCAL.with(|local| {
        let mut local = local.borrow_mut();
        if let Some(&e) = local.get(id as usize) {
            return e;
        }
        if let Ok(t) = table().read() {
            let have = local.len();
            local.extend_from_slice(&t.names[have..]);
        }
        local.get(id as usize).copied().unwrap_or(("?", 0))
    })
}

/// FNV-1a then a SplitMix finaliser: a stable, well-spread 64-bit hash that
/// every node computes identically (the ring position of a node).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Name {
    /// The handle for `s`, or `None` if `s` is not a valid node id or the
    /// table is full.
    pub fn intern(s: &str) -> Option<Name> {
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return None;
        }
        if let Some(&id) = table().read().ok()?.ids.get(s) {
            return Some(Name(id));
        }
        let mut t = table().write().ok()?;
        if let Some(&id) = t.ids.get(s) {
            return Some(Name(id));
        }
        if t.names.len() >= MAX_NAMES {
            return None;
        }
        let id = t.names.len() as u32;
        let text: &'static str = Box::leak(s.to_string().into_boxed_str());
        t.names.push((text, hash64(s.as_bytes())));
        t.ids.insert(text, id);
        Some(Name(id))
    }

    /// The handle for `s` if it is interned already; never adds to the
    /// table (for names read from replicated values, which must not grow it).
    pub fn lookup(s: &str) -> Option<Name> {
        table().read().ok()?.ids.get(s).map(|&id| Name(id))
    }

    pub fn as_str(self) -> &'static str {
        entry(self.0).0
    }

    /// Position on the ring.
    pub fn hash(self) -> u64 {
        entry(self.0).1
    }

    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a node id")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name, E> {
                Name::intern(v).ok_or_else(|| E::custom("invalid node id or too many node ids"))
            }
        }
        d.deserialize_str(V)
    }
}
