//! This node's part in the edge: service ports for the exposed app ports it
//! hosts, agreed cluster-wide, and the routes every edge serves.
//!
//! An app port an edge exposes (its labels name a group, see
//! `skein_edge::labels`) gets a service port from `--edge-service-ports`
//! (10000–10100), as Marathon gave every app port one. The port is agreed
//! exactly as named-VIP addresses are: every node hosting a task of the app
//! claims `edgeport:<app>#<n>` = `{port, since, settled}`, the oldest
//! (settled first) claim wins, and an assigned port never moves while the
//! app lives (`skein_l4lb::alloc` in a port pool, through the same
//! [`vips::Allocator`]). The claim's age also orders conflicting routes:
//! the older app port keeps a contested virtual host, path or bind port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use skein_edge::labels::{self, PortOutcome};
use skein_edge::routes::{PortKey, ServicePort};
use skein_l4lb::alloc::{Claim, ClaimValue, Pool};
use skein_state::{Replica, TaskView};

use crate::vips;

/// Prefix of service-port claims in a node's keyspace.
pub(crate) const CLAIM_PREFIX: &str = "edgeport:";

/// The range service ports come from when `--edge-service-ports` is not
/// given (Marathon-LB's default).
pub const DEFAULT_SERVICE_PORTS: (u16, u16) = (10000, 10100);

/// A claim as published: the port itself, not the slot it is in the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PortClaim {
    port: u16,
    since: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    settled: bool,
}

/// `<app>#<n>`: one claim per app port.
fn claim_name(app: &str, index: usize) -> String {
    format!("{app}#{index}")
}

fn parse_claim_name(name: &str) -> Option<PortKey> {
    let (app, index) = name.rsplit_once('#')?;
    Some((app.to_string(), index.parse().ok()?))
}

/// The app ports an edge exposes, and which of them run on `me`.
fn exposed(tasks: &[TaskView], me: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut live = BTreeSet::new();
    let mut hosted = BTreeSet::new();
    for t in tasks {
        if t.spec.labels.is_empty() {
            continue;
        }
        for index in 0..t.spec.ports.len() {
            if let PortOutcome::Exposed { .. } = labels::parse_port(&t.spec.labels, index) {
                let name = claim_name(&t.spec.app, index);
                if t.node_id == me {
                    hosted.insert(name.clone());
                }
                live.insert(name);
            }
        }
    }
    (live, hosted)
}

/// Every service-port claim in the replica, as pool claims.
fn claims_in(replica: &Replica) -> Vec<Claim> {
    let mut out = Vec::new();
    for (node, keyspace) in replica.nodes() {
        for (key, value) in keyspace.live() {
            let Some(name) = key.strip_prefix(CLAIM_PREFIX) else {
                continue;
            };
            match serde_json::from_str::<PortClaim>(value) {
                Ok(c) => out.push(Claim {
                    vip: name.to_string(),
                    node: node.clone(),
                    value: ClaimValue {
                        ip: Pool::port_slot(c.port),
                        since: c.since,
                        settled: c.settled,
                    },
                }),
                Err(e) => {
                    tracing::debug!(%node, key, error = %e, "ignoring undecodable service-port claim")
                }
            }
        }
    }
    out
}

/// What [`EdgePorts::reconcile`] decided.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Claims to publish: key → JSON.
    pub publish: Vec<(String, String)>,
    /// Keys to delete.
    pub withdraw: Vec<String>,
    /// The service ports usable now, with their claims' age.
    pub ports: BTreeMap<PortKey, ServicePort>,
    pub waits_on_time: bool,
}

/// This node's side of service-port allocation.
pub(crate) struct EdgePorts {
    pool: Pool,
    allocator: vips::Allocator,
}

impl EdgePorts {
    pub(crate) fn new(range: (u16, u16)) -> EdgePorts {
        EdgePorts {
            pool: Pool::ports(range.0, range.1),
            allocator: vips::Allocator::default(),
        }
    }

    pub(crate) fn reconcile(
        &mut self,
        me: &str,
        replica: &Replica,
        tasks: &[TaskView],
        now: Instant,
        now_unix_ms: u64,
        synced: bool,
    ) -> Outcome {
        let (live, hosted) = exposed(tasks, me);
        let claims = claims_in(replica);
        if live.is_empty() && claims.is_empty() {
            return Outcome::default();
        }
        let r = self.allocator.reconcile_claims(
            &self.pool,
            me,
            &hosted,
            &live,
            &claims,
            &BTreeSet::<Ipv4Addr>::new(),
            now,
            now_unix_ms,
            synced,
        );
        let mut out = Outcome {
            waits_on_time: r.waits_on_time,
            ..Outcome::default()
        };
        for (name, value) in r.publish {
            let Some(port) = Pool::slot_port(value.ip) else {
                continue;
            };
            let claim = PortClaim {
                port,
                since: value.since,
                settled: value.settled,
            };
            if let Ok(json) = serde_json::to_string(&claim) {
                tracing::info!(app_port = %name, port, settled = claim.settled, "claiming edge service port");
                out.publish.push((format!("{CLAIM_PREFIX}{name}"), json));
            }
        }
        for name in r.withdraw {
            out.withdraw.push(format!("{CLAIM_PREFIX}{name}"));
        }
        for (name, (slot, usable)) in r.addresses {
            if !usable || !live.contains(&name) {
                continue;
            }
            let (Some(key), Some(port)) = (parse_claim_name(&name), Pool::slot_port(slot)) else {
                continue;
            };
            // An app port predicted a port but not claimed yet has no age:
            // it ranks after every claimed one.
            let (since, settled) = r.ranks.get(&name).copied().unwrap_or((u64::MAX, false));
            out.ports.insert(
                key,
                ServicePort {
                    port,
                    since,
                    settled,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::test_support::{alive, put};
    use skein_state::Liveness;

    const T0_MS: u64 = 1_700_000_000_000;

    fn task(replica: &mut Replica, node: &str, app: &str, labels: &str) {
        let spec = format!(
            r#"{{"app":"/{app}","ip":"10.0.0.1","ports":[{{"port":80}},{{"port":81}}],"labels":{labels}}}"#
        );
        put(replica, node, &format!("task:{app}.{node}"), &spec);
    }

    fn step(
        ports: &mut EdgePorts,
        me: &str,
        replica: &mut Replica,
        live: &BTreeMap<String, Liveness>,
        now: Instant,
    ) -> Outcome {
        let (tasks, _) = skein_state::tasks(replica, live);
        let out = ports.reconcile(me, replica, &tasks, now, T0_MS, true);
        for (key, json) in &out.publish {
            put(replica, me, key, json);
        }
        out
    }

    #[test]
    fn exposed_app_ports_get_distinct_stable_service_ports() {
        let live = alive(&["n1", "n2"]);
        let mut replica = Replica::new();
        task(&mut replica, "n1", "web", r#"{"HAPROXY_GROUP":"external"}"#);
        task(
            &mut replica,
            "n2",
            "api",
            r#"{"HAPROXY_GROUP":"external","HAPROXY_1_ENABLED":"false"}"#,
        );
        task(&mut replica, "n2", "db", r#"{}"#);
        let t0 = Instant::now();
        let mut n1 = EdgePorts::new((10000, 10003));
        let mut n2 = EdgePorts::new((10000, 10003));
        let a = step(&mut n1, "n1", &mut replica, &live, t0);
        let b = step(&mut n2, "n2", &mut replica, &live, t0);
        // web has two exposed ports, api one; db none.
        assert_eq!(a.publish.len(), 2, "{a:?}");
        assert_eq!(b.publish.len(), 1, "{b:?}");
        let again = step(&mut n1, "n1", &mut replica, &live, t0);
        let ports: BTreeSet<u16> = again.ports.values().map(|p| p.port).collect();
        assert_eq!(ports.len(), 3, "distinct: {:?}", again.ports);
        assert!(ports.iter().all(|p| (10000..=10003).contains(p)));
        // A fourth app port fits the last slot and moves nobody; a fifth
        // gets none (the range is full) and is not served on a port.
        task(
            &mut replica,
            "n1",
            "more",
            r#"{"HAPROXY_GROUP":"external","HAPROXY_1_ENABLED":"false"}"#,
        );
        task(
            &mut replica,
            "n2",
            "full",
            r#"{"HAPROXY_GROUP":"external","HAPROXY_1_ENABLED":"false"}"#,
        );
        for _ in 0..3 {
            step(&mut n1, "n1", &mut replica, &live, t0);
            step(&mut n2, "n2", &mut replica, &live, t0);
        }
        let after = step(&mut n1, "n1", &mut replica, &live, t0);
        for (key, p) in &again.ports {
            assert_eq!(after.ports[key].port, p.port, "{key:?} moved");
        }
        let all: BTreeSet<u16> = after.ports.values().map(|p| p.port).collect();
        assert_eq!(all.len(), after.ports.len(), "unique: {:?}", after.ports);
        assert_eq!(after.ports.len(), 4, "{:?}", after.ports);
    }
}
