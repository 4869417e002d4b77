//! The replica: every node's published keyspace, merged as a state-based CRDT.
//!
//! Each node is the only writer of its own keyspace, so a per-owner map of
//! versioned registers needs no coordination: for one owner, the higher
//! `generation` (a restart) wins outright, and within a generation each key
//! keeps its highest version. Removal of a whole node (it left for good) is a
//! monotone tombstone "everything of node N up to generation G is gone", so a
//! late, stale update cannot resurrect it while a restarted node (higher
//! generation) can still come back.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub type NodeId = String;

/// One key of one node. `value: None` is a deletion tombstone that still has
/// to win over older versions arriving late.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    pub version: u64,
    /// Shared with the gossip core's signed entry it mirrors.
    pub value: Option<Arc<str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKeyspace {
    /// Bumped by the owner on every restart (chitchat's generation id).
    pub generation: u64,
    pub entries: BTreeMap<String, Entry>,
}

impl NodeKeyspace {
    /// Live (non-deleted) key/values.
    pub fn live(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.value.as_deref().map(|v| (k.as_str(), v)))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).and_then(|e| e.value.as_deref())
    }

    pub fn max_version(&self) -> u64 {
        self.entries.values().map(|e| e.version).max().unwrap_or(0)
    }

    fn merge(&mut self, other: &NodeKeyspace) {
        use std::cmp::Ordering;
        match other.generation.cmp(&self.generation) {
            Ordering::Greater => *self = other.clone(),
            Ordering::Less => {}
            Ordering::Equal => {
                for (key, theirs) in &other.entries {
                    match self.entries.get_mut(key) {
                        // Ties on version cannot differ for a single writer;
                        // comparing the whole entry keeps merge deterministic
                        // even if they somehow do.
                        Some(ours) if *ours >= *theirs => {}
                        Some(ours) => *ours = theirs.clone(),
                        None => {
                            self.entries.insert(key.clone(), theirs.clone());
                        }
                    }
                }
            }
        }
    }
}

/// A single observed write, the unit gossip delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub node: NodeId,
    pub generation: u64,
    pub key: String,
    pub version: u64,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Shared so that a snapshot of the replica costs a map of pointers,
    /// and an unchanged node's keyspace is never copied.
    nodes: BTreeMap<NodeId, Arc<NodeKeyspace>>,
    /// node → highest generation that has been removed.
    removed: BTreeMap<NodeId, u64>,
}

impl Replica {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn nodes(&self) -> &BTreeMap<NodeId, Arc<NodeKeyspace>> {
        &self.nodes
    }

    pub fn node(&self, node: &str) -> Option<&NodeKeyspace> {
        self.nodes.get(node).map(|k| &**k)
    }

    pub fn removed(&self) -> &BTreeMap<NodeId, u64> {
        &self.removed
    }

    fn is_removed(&self, node: &str, generation: u64) -> bool {
        self.removed.get(node).is_some_and(|&g| generation <= g)
    }

    /// Applies one write. Returns whether the replica changed.
    pub fn apply(&mut self, update: &Update) -> bool {
        let mut single = NodeKeyspace {
            generation: update.generation,
            entries: BTreeMap::new(),
        };
        single.entries.insert(
            update.key.clone(),
            Entry {
                version: update.version,
                value: update.value.as_deref().map(Arc::from),
            },
        );
        self.merge_node(&update.node, &single)
    }

    /// Merges a (possibly partial) keyspace of one node. Returns whether the
    /// replica changed.
    pub fn merge_node(&mut self, node: &str, keyspace: &NodeKeyspace) -> bool {
        if self.is_removed(node, keyspace.generation) {
            return false;
        }
        match self.nodes.get_mut(node) {
            Some(ours) => {
                let mut merged = (**ours).clone();
                merged.merge(keyspace);
                if merged == **ours {
                    return false;
                }
                *ours = Arc::new(merged);
                true
            }
            None => {
                self.nodes
                    .insert(node.to_string(), Arc::new(keyspace.clone()));
                true
            }
        }
    }

    /// Forgets a node for good (departed, or garbage-collected after its
    /// grace period): its keyspace and so its tasks disappear, and stale
    /// copies of it arriving later are ignored.
    pub fn remove_node(&mut self, node: &str, up_to_generation: u64) {
        let g = self.removed.entry(node.to_string()).or_insert(0);
        *g = (*g).max(up_to_generation);
        if self
            .nodes
            .get(node)
            .is_some_and(|k| k.generation <= up_to_generation)
        {
            self.nodes.remove(node);
        }
    }

    /// Sets `node`'s keyspace to exactly `keyspace` (a view fed by a
    /// protocol that already decided which copy wins).
    pub fn replace_node(&mut self, node: &str, keyspace: NodeKeyspace) {
        self.nodes.insert(node.to_string(), Arc::new(keyspace));
    }

    /// Drops `node` from the view without a tombstone: it may come back.
    pub fn drop_node(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// The source of truth for `node` garbage-collected its tombstones up to
    /// version `floor`: any key we still hold at or below that version which
    /// `authoritative` no longer has was deleted there, and is dropped here.
    pub fn prune_absent(
        &mut self,
        node: &str,
        generation: u64,
        floor: u64,
        authoritative: &NodeKeyspace,
    ) {
        if let Some(ours) = self.nodes.get_mut(node) {
            if ours.generation == generation {
                Arc::make_mut(ours).entries.retain(|key, entry| {
                    entry.version > floor || authoritative.entries.contains_key(key)
                });
            }
        }
    }

    /// Full-state join; commutative, associative and idempotent.
    pub fn merge(&mut self, other: &Replica) {
        for (node, &generation) in &other.removed {
            self.remove_node(node, generation);
        }
        for (node, keyspace) in &other.nodes {
            self.merge_node(node, keyspace);
        }
    }

    /// Number of live and tombstoned entries, a proxy for state size.
    pub fn entry_count(&self) -> usize {
        self.nodes.values().map(|k| k.entries.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_update() -> impl Strategy<Value = Update> {
        (0..4u8, 0..3u64, 0..5u8, 1..6u64, prop::option::of(0..3u8)).prop_map(
            |(node, generation, key, version, value)| Update {
                node: format!("n{node}"),
                generation,
                key: format!("task:{key}"),
                version,
                value: value.map(|v| format!("v{v}")),
            },
        )
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(Update),
        Remove(String, u64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => arb_update().prop_map(Op::Write),
            1 => (0..4u8, 0..3u64).prop_map(|(n, g)| Op::Remove(format!("n{n}"), g)),
        ]
    }

    fn replica_of(ops: &[Op]) -> Replica {
        let mut r = Replica::new();
        for op in ops {
            match op {
                Op::Write(u) => {
                    r.apply(u);
                }
                Op::Remove(n, g) => r.remove_node(n, *g),
            }
        }
        r
    }

    proptest! {
        #[test]
        fn any_delivery_order_any_number_of_times_gives_the_same_state(
            ops in prop::collection::vec(arb_op(), 0..40),
            seed in any::<u64>(),
            dups in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let reference = replica_of(&ops);
            // Shuffle deterministically from the seed and duplicate some ops.
            let mut shuffled = ops.clone();
            for i in dups.iter().filter(|_| !ops.is_empty()) {
                shuffled.push(ops[i.index(ops.len())].clone());
            }
            let mut state = seed;
            for i in (1..shuffled.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (state >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(replica_of(&shuffled), reference);
        }

        #[test]
        fn merge_is_commutative_associative_idempotent(
            a in prop::collection::vec(arb_op(), 0..20),
            b in prop::collection::vec(arb_op(), 0..20),
            c in prop::collection::vec(arb_op(), 0..20),
        ) {
            let (ra, rb, rc) = (replica_of(&a), replica_of(&b), replica_of(&c));
            let mut ab = ra.clone(); ab.merge(&rb);
            let mut ba = rb.clone(); ba.merge(&ra);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&rc);
            let mut bc = rb.clone(); bc.merge(&rc);
            let mut a_bc = ra.clone(); a_bc.merge(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut aa = ra.clone(); aa.merge(&ra);
            prop_assert_eq!(&aa, &ra);
            // Merging the states equals applying all ops to one replica.
            let all: Vec<Op> = a.iter().chain(&b).chain(&c).cloned().collect();
            prop_assert_eq!(ab_c, replica_of(&all));
        }

        #[test]
        fn removed_node_stays_removed_until_it_restarts(
            ops in prop::collection::vec(arb_update(), 1..30),
            generation in 0..3u64,
        ) {
            let mut r = Replica::new();
            for u in &ops { r.apply(u); }
            r.remove_node("n0", generation);
            // Replaying every old write cannot bring back what was removed.
            for u in &ops { r.apply(u); }
            match r.node("n0") {
                Some(k) => prop_assert!(k.generation > generation),
                None => prop_assert!(ops.iter().all(|u| u.node != "n0" || u.generation <= generation)),
            }
        }
    }

    #[test]
    fn higher_generation_replaces_the_old_keyspace() {
        let mut r = Replica::new();
        let w = |g, k: &str, v, val: Option<&str>| Update {
            node: "a".into(),
            generation: g,
            key: k.into(),
            version: v,
            value: val.map(String::from),
        };
        r.apply(&w(1, "task:x", 5, Some("old")));
        r.apply(&w(2, "task:y", 1, Some("new")));
        let k = r.node("a").expect("node a");
        assert_eq!(k.get("task:x"), None);
        assert_eq!(k.get("task:y"), Some("new"));
        // A tombstone wins over the value it deletes, in either order.
        r.apply(&w(2, "task:y", 3, None));
        r.apply(&w(2, "task:y", 2, Some("stale")));
        assert_eq!(r.node("a").and_then(|k| k.get("task:y")), None);
    }
}
