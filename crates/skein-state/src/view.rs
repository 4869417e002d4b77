//! Typed views of the replica: how keys are named, and what the API shows.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::replica::{NodeId, NodeKeyspace, Replica};
use crate::task::TaskSpec;

/// Key of a node's metadata in its own keyspace.
pub const META_KEY: &str = "meta";
/// Prefix of task keys: `task:<task-id>` → JSON [`TaskSpec`].
pub const TASK_PREFIX: &str = "task:";
/// Health verdicts of a node's own tasks: `health:<task-id>` → `healthy` |
/// `unhealthy`. Absent means not checked, which counts as healthy.
pub const HEALTH_PREFIX: &str = "health:";
pub const UNHEALTHY: &str = "unhealthy";

pub fn health_key(task_id: &str) -> String {
    format!("{HEALTH_PREFIX}{task_id}")
}

pub fn task_key(task_id: &str) -> String {
    format!("{TASK_PREFIX}{task_id}")
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub hostname: String,
    pub private_ip: IpAddr,
    pub agent_version: String,
    /// Unix milliseconds of the agent's start.
    pub started_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Alive,
    /// Live for the failure detector, but its heartbeat has not advanced
    /// lately: likely going down.
    Suspect,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Alive => "alive",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Down => "down",
        }
    }
}

/// A row of `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: NodeId,
    pub private_ip: Option<IpAddr>,
    pub hostname: Option<String>,
    pub status: NodeStatus,
    /// Unix milliseconds when this node last saw the status change or the
    /// node's heartbeat advance.
    pub updated: u64,
    pub generation: u64,
    pub version: u64,
}

/// A row of `GET /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub node_id: NodeId,
    pub node_status: NodeStatus,
    /// The owning agent's latest health-check verdict (true if unchecked).
    pub healthy: bool,
    /// Shared between views: an unchanged task is decoded once
    /// ([`TaskCache`]), not once per refresh.
    #[serde(flatten)]
    pub spec: Arc<TaskSpec>,
}

/// A value published by a node that does not decode. Reported rather than
/// dropped silently: it means a newer or broken peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadEntry {
    pub node_id: NodeId,
    pub key: String,
    pub error: String,
}

/// Liveness as seen by this node, with when it last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub status: NodeStatus,
    pub updated: u64,
}

/// Nodes of the replica, each with its liveness; a node the failure detector
/// does not know (e.g. loaded from disk after a restart) counts as down.
pub fn nodes(replica: &Replica, liveness: &BTreeMap<NodeId, Liveness>) -> Vec<NodeView> {
    replica
        .nodes()
        .iter()
        .map(|(node_id, keyspace)| {
            let meta: Option<NodeMeta> = keyspace
                .get(META_KEY)
                .and_then(|v| serde_json::from_str(v).ok());
            let live = liveness.get(node_id).copied().unwrap_or(Liveness {
                status: NodeStatus::Down,
                updated: 0,
            });
            NodeView {
                node_id: node_id.clone(),
                private_ip: meta.as_ref().map(|m| m.private_ip),
                hostname: meta.map(|m| m.hostname),
                status: live.status,
                updated: live.updated,
                generation: keyspace.generation,
                version: keyspace.max_version(),
            }
        })
        .collect()
}

/// At most this many tasks of one node are used; the rest are reported as
/// bad entries. (The gossip core already caps a node's keyspace at 50,000
/// keys and 2 MiB; this keeps one node from filling DNS and the dataplane.)
pub const MAX_TASKS_PER_NODE: usize = 10_000;

/// Every task of the cluster with its owner and the owner's status, plus the
/// entries that failed to decode or to validate. Another node's task is
/// validated exactly as a local write is: validation is what makes a task
/// safe to turn into DNS names and rules, and a peer (a newer version, a
/// bug, or a node whose certificate holder lies) may publish anything.
pub fn tasks(
    replica: &Replica,
    liveness: &BTreeMap<NodeId, Liveness>,
) -> (Vec<TaskView>, Vec<BadEntry>) {
    TaskCache::default().tasks(replica, liveness)
}

/// One node's tasks as decoded from one version of its keyspace.
#[derive(Debug)]
struct NodeTasks {
    /// The keyspace they were decoded from; a replica shares an unchanged
    /// node's keyspace between snapshots, so the same pointer means the
    /// same tasks.
    keyspace: Arc<NodeKeyspace>,
    /// (task id, spec, healthy) in key order.
    tasks: Vec<(Box<str>, Arc<TaskSpec>, bool)>,
    bad: Vec<BadEntry>,
}

/// Decodes tasks only for nodes whose keyspace changed since the last call:
/// a refresh after one write at 10,000 tasks decodes one node's tasks, and
/// the views before and after share every other task's spec.
#[derive(Debug, Default)]
pub struct TaskCache {
    nodes: BTreeMap<NodeId, NodeTasks>,
}

impl TaskCache {
    /// [`tasks`], reusing what was decoded from unchanged keyspaces.
    pub fn tasks(
        &mut self,
        replica: &Replica,
        liveness: &BTreeMap<NodeId, Liveness>,
    ) -> (Vec<TaskView>, Vec<BadEntry>) {
        self.nodes
            .retain(|node, _| replica.nodes().contains_key(node));
        let mut tasks = Vec::new();
        let mut bad = Vec::new();
        for (node_id, keyspace) in replica.nodes() {
            let fresh = self
                .nodes
                .get(node_id)
                .is_some_and(|c| Arc::ptr_eq(&c.keyspace, keyspace));
            if !fresh {
                self.nodes
                    .insert(node_id.clone(), decode_node(node_id, keyspace));
            }
            let Some(decoded) = self.nodes.get(node_id) else {
                continue;
            };
            let node_status = liveness.get(node_id).map_or(NodeStatus::Down, |l| l.status);
            tasks.extend(decoded.tasks.iter().map(|(id, spec, healthy)| TaskView {
                id: id.to_string(),
                node_id: node_id.clone(),
                node_status,
                healthy: *healthy,
                spec: spec.clone(),
            }));
            bad.extend(decoded.bad.iter().cloned());
        }
        tasks.shrink_to_fit();
        (tasks, bad)
    }
}

fn decode_node(node_id: &str, keyspace: &Arc<NodeKeyspace>) -> NodeTasks {
    let mut tasks = Vec::new();
    let mut bad = Vec::new();
    for (key, value) in keyspace.live() {
        let Some(id) = key.strip_prefix(TASK_PREFIX) else {
            continue;
        };
        let checked = serde_json::from_str::<TaskSpec>(value)
            .map_err(|e| e.to_string())
            .and_then(|spec| {
                crate::task::validate_task_id(id).map_err(|e| e.to_string())?;
                spec.validate().map_err(|e| e.to_string())?;
                if tasks.len() >= MAX_TASKS_PER_NODE {
                    return Err(format!(
                        "node has more than {MAX_TASKS_PER_NODE} tasks; ignored"
                    ));
                }
                Ok(spec)
            });
        match checked {
            Ok(mut spec) => {
                // serde grows a list to room for four: most tasks have one
                // port, and there are tens of thousands of tasks.
                spec.ports.shrink_to_fit();
                let healthy = keyspace.get(&health_key(id)) != Some(UNHEALTHY);
                tasks.push((id.into(), Arc::new(spec), healthy));
            }
            Err(error) => bad.push(BadEntry {
                node_id: node_id.to_string(),
                key: key.to_string(),
                error,
            }),
        }
    }
    tasks.shrink_to_fit();
    NodeTasks {
        keyspace: keyspace.clone(),
        tasks,
        bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Update;

    #[test]
    fn the_cache_decodes_only_changed_keyspaces() {
        let mut r = Replica::new();
        let put = |r: &mut Replica, node: &str, key: &str, version: u64, value: &str| {
            r.apply(&Update {
                node: node.into(),
                generation: 1,
                key: key.into(),
                version,
                value: Some(value.into()),
            });
        };
        let spec = |ip: &str| format!(r#"{{"app":"/a","ip":"{ip}","ports":[]}}"#);
        put(&mut r, "n1", "task:t1", 1, &spec("10.0.0.1"));
        put(&mut r, "n2", "task:t2", 1, &spec("10.0.0.2"));
        put(&mut r, "n2", "task:t3", 2, "{not json");
        let live = BTreeMap::new();
        let mut cache = TaskCache::default();
        let (first, bad) = cache.tasks(&r, &live);
        assert_eq!((first.len(), bad.len()), (2, 1));
        assert_eq!(
            (first.clone(), bad.clone()),
            tasks(&r, &live),
            "same as decoding afresh"
        );

        // n2 changes: n1's spec is the same allocation, n2's is new.
        put(&mut r, "n2", "task:t2", 3, &spec("10.0.0.9"));
        let (second, bad) = cache.tasks(&r, &live);
        assert_eq!((second.clone(), bad), tasks(&r, &live));
        assert!(Arc::ptr_eq(&first[0].spec, &second[0].spec), "n1 reused");
        assert_eq!(
            second[1].spec.ip.to_string(),
            "10.0.0.9",
            "n2 decoded again"
        );

        // A node gone from the replica leaves the cache and the tasks.
        let mut without = Replica::new();
        without.merge_node("n2", r.node("n2").expect("n2"));
        let (third, _) = cache.tasks(&without, &live);
        assert_eq!(third.len(), 1);
        assert_eq!(cache.nodes.len(), 1);
    }

    #[test]
    fn gossiped_tasks_are_validated_and_capped_per_node() {
        let mut r = Replica::new();
        let mut version = 0;
        let mut put = |r: &mut Replica, key: &str, value: &str| {
            version += 1;
            r.apply(&Update {
                node: "n1".into(),
                generation: 1,
                key: key.into(),
                version,
                value: Some(value.into()),
            });
        };
        // Decodes, but a local write of it would be refused: port 0, a
        // name DNS cannot carry, a bad task id.
        put(
            &mut r,
            "task:p0",
            r#"{"app":"/a","ip":"10.0.0.1","ports":[{"port":0}]}"#,
        );
        put(&mut r, "task:dns", r#"{"app":"/a b","ip":"10.0.0.1"}"#);
        put(&mut r, "task:bad id", r#"{"app":"/a","ip":"10.0.0.1"}"#);
        let ok = r#"{"app":"/a","ip":"10.0.0.1"}"#;
        for i in 0..MAX_TASKS_PER_NODE + 5 {
            put(&mut r, &format!("task:t{i:05}"), ok);
        }
        let (tasks, bad) = tasks(&r, &BTreeMap::new());
        assert_eq!(tasks.len(), MAX_TASKS_PER_NODE);
        assert_eq!(bad.len(), 3 + 5, "{:?}", &bad[..3]);
        assert!(bad.iter().any(|b| b.key == "task:p0"));
        assert!(bad.iter().any(|b| b.error.contains("more than")));
    }

    #[test]
    fn tasks_carry_owner_status_and_vanish_with_a_removed_node() {
        let mut r = Replica::new();
        let spec = r#"{"app":"/a","framework":"marathon","ip":"10.0.0.1","ports":[]}"#;
        for (node, key, value) in [
            ("n1", "task:t1", spec),
            ("n2", "task:t2", spec),
            ("n2", "task:t3", "{not json"),
            (
                "n2",
                "meta",
                r#"{"hostname":"h2","private_ip":"10.0.0.2","agent_version":"x","started_ms":1}"#,
            ),
        ] {
            r.apply(&Update {
                node: node.into(),
                generation: 1,
                key: key.into(),
                version: 1,
                value: Some(value.into()),
            });
        }
        let mut live = BTreeMap::new();
        live.insert(
            "n1".to_string(),
            Liveness {
                status: NodeStatus::Alive,
                updated: 5,
            },
        );
        let (t, bad) = tasks(&r, &live);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].node_status, NodeStatus::Alive);
        assert_eq!(t[1].node_id, "n2");
        assert_eq!(t[1].node_status, NodeStatus::Down);
        assert_eq!(bad.len(), 1);
        let n = nodes(&r, &live);
        assert_eq!(n[1].hostname.as_deref(), Some("h2"));

        // Valid JSON that is not a valid task (what a local write would
        // refuse) is reported, not used.
        r.apply(&Update {
            node: "n1".into(),
            generation: 1,
            key: "task:bad".into(),
            version: 2,
            value: Some(r#"{"app":"/a","framework":"Not Valid!","ip":"10.0.0.1"}"#.into()),
        });
        r.apply(&Update {
            node: "n1".into(),
            generation: 1,
            key: "task:bad id!".into(),
            version: 3,
            value: Some(spec.into()),
        });
        let (t, bad) = tasks(&r, &live);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad
            .iter()
            .any(|b| b.key == "task:bad" && b.error.contains("framework")));
        assert!(bad.iter().any(|b| b.key == "task:bad id!"));

        r.remove_node("n2", 1);
        let (t, bad) = tasks(&r, &live);
        assert_eq!(t.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1"]);
        assert!(
            bad.iter().all(|b| b.node_id == "n1"),
            "n2's bad entry went with it"
        );
    }
}
