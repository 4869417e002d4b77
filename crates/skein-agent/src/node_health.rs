//! Each node's view of its own components (gossip, DNS, L4LB, overlay,
//! edge), published under [`KEY`] in its keyspace whenever it changes, so
//! that any node answers for the whole cluster from its own replica
//! (`/system/health/v1` on the entry point; DC/OS's health service polled
//! every node instead). A node that is down keeps its last report, shown
//! as such.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skein_state::NodeStatus;

use crate::Agent;

/// This node's report (a JSON list of [`Component`]s). Not under
/// `health:`, which holds task verdicts.
pub const KEY: &str = "node:health";

/// How often a node looks at its components.
const EVERY: Duration = Duration::from_secs(2);

/// An edge that has not asked for its routes for this long is reported
/// (an edge long-polls every 25 s)...
const EDGE_SILENT: Duration = Duration::from_secs(60);
/// ... and after this long no longer counted as running here.
const EDGE_GONE: Duration = Duration::from_secs(3600);

/// One component as its node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub id: String,
    pub healthy: bool,
    pub reason: String,
}

/// What a node publishes under [`KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The agent's version.
    pub version: String,
    /// When the agent started (Unix milliseconds, its own clock).
    pub started_ms: u64,
    pub components: Vec<Component>,
}

/// What a node knows of its components; `None`: not running here.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub alive: usize,
    pub nodes: usize,
    pub dns_listeners: Option<usize>,
    /// Dataplane name, whether its rules are programmed, errors so far.
    pub l4lb: Option<(&'static str, bool, u64)>,
    /// What the overlay realizer last said ("ok", or why not; empty
    /// before its first attempt).
    pub overlay: Option<String>,
    /// Since an edge last asked this agent for its routes.
    pub edge_polled: Option<Duration>,
    /// The Docker provider: `Ok` while it follows Docker, else why not.
    pub docker: Option<Result<(), String>>,
}

/// The components as `i` says. Pure.
pub fn components(i: &Inputs) -> Vec<Component> {
    let c = |id: &str, healthy: bool, reason: String| Component {
        id: id.to_string(),
        healthy,
        reason,
    };
    let mut out = Vec::new();
    out.push(if i.nodes <= 1 {
        c("gossip", true, "the only node of its cluster".into())
    } else {
        c(
            "gossip",
            i.alive >= 2,
            format!("sees {} of {} nodes alive", i.alive, i.nodes),
        )
    });
    if let Some(n) = i.dns_listeners {
        out.push(c("dns", true, format!("answering on {n} address(es)")));
    }
    if let Some((name, ready, errors)) = i.l4lb {
        out.push(if ready {
            c(
                "l4lb",
                true,
                format!("{name}: VIP rules programmed ({errors} failed attempts since start, each retried)"),
            )
        } else {
            c("l4lb", false, format!("{name}: VIP rules not programmed yet ({errors} failed attempts)"))
        });
    }
    if let Some(status) = &i.overlay {
        out.push(match status.as_str() {
            "ok" => c(
                "overlay",
                true,
                "VXLAN routes, FDB and ARP entries realized".into(),
            ),
            "" => c("overlay", false, "not realized yet".into()),
            why => c("overlay", false, why.to_string()),
        });
    }
    if let Some(docker) = &i.docker {
        out.push(match docker {
            Ok(()) => c("docker", true, "following Docker's containers".into()),
            Err(why) => c(
                "docker",
                false,
                format!("Docker unreachable (tasks kept): {why}"),
            ),
        });
    }
    if let Some(ago) = i.edge_polled.filter(|ago| *ago <= EDGE_GONE) {
        out.push(if ago <= EDGE_SILENT {
            c(
                "edge",
                true,
                "an edge reads its routes from this agent".into(),
            )
        } else {
            c(
                "edge",
                false,
                // No running count in the text: the report is gossiped
                // only when it changes.
                "no edge has asked for its routes for over a minute".into(),
            )
        });
    }
    out
}

/// `/system/health/v1`: every node, its status and components.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemHealth {
    pub healthy: bool,
    pub nodes: Vec<NodeHealth>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub node_id: String,
    pub ip: Option<IpAddr>,
    pub status: NodeStatus,
    /// As it last reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Seconds since it started, by this node's clock (`None` before its
    /// first report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    pub healthy: bool,
    /// DC/OS's code: 0 healthy, 1 not.
    pub health: u8,
    /// Why not healthy, when it is the node rather than a component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub components: Vec<ComponentHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub id: String,
    pub healthy: bool,
    pub health: u8,
    pub reason: String,
}

/// The cluster's health from `nodes` and each one's published report, at
/// `now_ms` (Unix milliseconds).
pub fn system_health<'a>(
    nodes: impl IntoIterator<Item = (&'a skein_state::NodeView, Option<&'a str>)>,
    now_ms: u64,
) -> SystemHealth {
    let mut out = Vec::new();
    for (n, report) in nodes {
        let (report, mut reason) = match report.map(serde_json::from_str::<Report>) {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(format!("its health report does not read: {e}"))),
            None => (None, Some("no health report from it yet".to_string())),
        };
        let version = report.as_ref().map(|r| r.version.clone());
        let uptime_s = report
            .as_ref()
            .map(|r| now_ms.saturating_sub(r.started_ms) / 1000);
        let components = report.map(|r| r.components).unwrap_or_default();
        if n.status != NodeStatus::Alive {
            reason = Some(format!(
                "node {}; its components as it last reported them",
                n.status.as_str()
            ));
        }
        let healthy = n.status == NodeStatus::Alive
            && reason.is_none()
            && components.iter().all(|c| c.healthy);
        out.push(NodeHealth {
            node_id: n.node_id.clone(),
            ip: n.private_ip,
            status: n.status,
            version,
            uptime_s,
            healthy,
            health: u8::from(!healthy),
            reason,
            components: components
                .into_iter()
                .map(|c| ComponentHealth {
                    health: u8::from(!c.healthy),
                    id: c.id,
                    healthy: c.healthy,
                    reason: c.reason,
                })
                .collect(),
        });
    }
    SystemHealth {
        healthy: out.iter().all(|n| n.healthy),
        nodes: out,
    }
}

/// Looks at this node's components every [`EVERY`] and publishes them
/// when they changed.
pub(crate) async fn run(agent: Weak<Agent>) {
    let mut last = String::new();
    let mut overlay = String::new();
    let mut tick = tokio::time::interval(EVERY);
    let started_ms = match agent.upgrade() {
        Some(a) => a.started_ms(),
        None => return,
    };
    loop {
        tick.tick().await;
        let Some(agent) = agent.upgrade() else { return };
        let report = Report {
            version: crate::VERSION.to_string(),
            // Once: computed again it could move by a millisecond (or a
            // clock step) and be gossiped for nothing.
            started_ms,
            components: components(&agent.health_inputs(&mut overlay)),
        };
        let json = match serde_json::to_string(&report) {
            Ok(j) => j,
            Err(_) => continue,
        };
        if json != last {
            agent.gossip.set(KEY, &json).await;
            last = json;
        }
    }
}

impl Agent {
    /// `overlay`: the overlay status last read (kept when the status is
    /// being written just then).
    fn health_inputs(&self, overlay: &mut String) -> Inputs {
        let view = self.view();
        let l = &self.l4lb_realizer;
        let l4lb = match self.config.l4lb_dataplane {
            crate::l4lb::Dataplane::Nftables => Some("nftables"),
            crate::l4lb::Dataplane::Ipvs => Some("ipvs"),
            crate::l4lb::Dataplane::None => None,
        }
        .map(|name| {
            (
                name,
                l.ready.load(Ordering::Relaxed) == 1,
                l.errors.load(Ordering::Relaxed),
            )
        });
        if let Ok(s) = self.overlay_status.try_lock() {
            overlay.clone_from(&s);
        }
        let overlay = (self.config.overlay_dataplane == crate::vxlan::OverlayDataplane::Vxlan)
            .then(|| overlay.clone());
        Inputs {
            alive: view
                .nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Alive)
                .count(),
            nodes: view.nodes.len(),
            dns_listeners: self.dns.as_ref().map(|_| self.config.dns_listen.len()),
            l4lb,
            overlay,
            edge_polled: self
                .edge_polled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|at| at.elapsed()),
            docker: (self.docker.running.load(Ordering::Relaxed) == 1).then(|| {
                if self.docker.up.load(Ordering::Relaxed) == 1 {
                    Ok(())
                } else {
                    let why = self
                        .docker
                        .problem
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    Err(if why.is_empty() {
                        "not connected yet".to_string()
                    } else {
                        why
                    })
                }
            }),
        }
    }

    /// An edge asked for its routes (shown as the edge component).
    pub fn note_edge_poll(&self) {
        *self.edge_polled.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now());
    }

    /// `/system/health/v1` from this node's replica.
    pub fn system_health(&self) -> SystemHealth {
        let view = self.view();
        system_health(
            view.nodes.iter().map(|n| {
                let report = view
                    .replica
                    .nodes()
                    .get(&n.node_id)
                    .and_then(|ks| ks.get(KEY));
                (n, report)
            }),
            unix_ms(),
        )
    }

    /// When this agent started, Unix milliseconds.
    fn started_ms(&self) -> u64 {
        unix_ms().saturating_sub(self.started.elapsed().as_millis() as u64)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_say_why() {
        let i = Inputs {
            alive: 1,
            nodes: 3,
            dns_listeners: Some(2),
            l4lb: Some(("nftables", true, 0)),
            overlay: Some("no VTEP lease".into()),
            edge_polled: Some(Duration::from_secs(90)),
            docker: Some(Err("cannot reach Docker at /run/docker.sock".into())),
        };
        let c = components(&i);
        let by = |id: &str| c.iter().find(|c| c.id == id).cloned();
        assert_eq!(by("gossip").map(|c| c.healthy), Some(false));
        assert_eq!(by("dns").map(|c| c.healthy), Some(true));
        assert_eq!(by("l4lb").map(|c| c.healthy), Some(true));
        assert_eq!(
            by("overlay").map(|c| c.reason),
            Some("no VTEP lease".into())
        );
        assert_eq!(by("edge").map(|c| c.healthy), Some(false));
        let docker = by("docker").expect("docker listed");
        assert!(
            !docker.healthy && docker.reason.contains("/run/docker.sock"),
            "{docker:?}"
        );
        // What does not run here is not listed.
        let c = components(&Inputs {
            alive: 1,
            nodes: 1,
            ..Inputs::default()
        });
        assert_eq!(
            c.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            vec!["gossip"]
        );
        assert!(c[0].healthy);
    }

    #[test]
    fn a_node_down_or_silent_is_not_healthy() {
        let node = |id: &str, status| skein_state::NodeView {
            node_id: id.into(),
            private_ip: None,
            hostname: None,
            status,
            updated: 0,
            generation: 1,
            version: 1,
        };
        let ok = serde_json::to_string(&Report {
            version: "0.1.0".into(),
            started_ms: 1_000,
            components: components(&Inputs {
                alive: 2,
                nodes: 3,
                ..Inputs::default()
            }),
        })
        .expect("json");
        let (a, b, c, d) = (
            node("a", NodeStatus::Alive),
            node("b", NodeStatus::Down),
            node("c", NodeStatus::Alive),
            node("d", NodeStatus::Alive),
        );
        let h = system_health(
            [
                (&a, Some(ok.as_str())),
                (&b, Some(ok.as_str())),
                (&c, None),
                (&d, Some("not json")),
            ],
            61_000,
        );
        assert_eq!(h.nodes[0].uptime_s, Some(60));
        assert_eq!(h.nodes[0].version.as_deref(), Some("0.1.0"));
        assert!(!h.healthy);
        let healthy: Vec<bool> = h.nodes.iter().map(|n| n.healthy).collect();
        assert_eq!(healthy, vec![true, false, false, false]);
        assert_eq!(
            h.nodes[1].components.len(),
            1,
            "a down node's last report is kept"
        );
        assert!(h.nodes[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("down")));
        assert_eq!(h.nodes[0].health, 0);
        assert_eq!(h.nodes[1].health, 1);
    }
}
