//! VIPs as DC/OS users declare them: `VIP_n` labels on a task's port
//! mappings, `"/name:port"` (named) or `"a.b.c.d:port"` (IP VIP).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use skein_state::{NodeId, NodeStatus, Protocol, TaskView};

/// Zone named VIPs are published under, as in DC/OS.
pub const L4LB_ZONE: &str = "l4lb.thisdcos.directory";
/// A DNS label is at most 63 octets; a named VIP becomes one.
pub const MAX_NAME_LEN: usize = 63;

/// What a VIP label points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum VipTarget {
    /// `/httpi:3141` on a task of framework `marathon` →
    /// `httpi.marathon.l4lb.thisdcos.directory`. Named VIPs are scoped by
    /// framework, as dcos-net scoped them.
    Named { name: String, framework: String },
    /// `10.1.1.1:80`: the address is taken as given.
    Ip { ip: IpAddr },
}

/// One load-balanced service: target, port and protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VipKey {
    pub protocol: Protocol,
    pub target: VipTarget,
    pub port: u16,
}

impl VipKey {
    /// The name users `dig` and `curl`: `httpi.marathon.l4lb.thisdcos.directory`
    /// for a named VIP, the address for an IP VIP.
    pub fn host(&self) -> String {
        match &self.target {
            VipTarget::Named { name, framework } => format!("{name}.{framework}.{L4LB_ZONE}"),
            VipTarget::Ip { ip } => ip.to_string(),
        }
    }
}

impl fmt::Display for VipKey {
    /// dcos-net's `vip` field: `host:port` (IPv6 in brackets).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            VipTarget::Ip { ip: IpAddr::V6(ip) } => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host(), self.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("VIP label {0:?} is not `/name:port` or `address:port`")]
    Malformed(String),
    #[error("VIP label {label:?}: port {port:?} is not a number from 1 to 65535")]
    BadPort { label: String, port: String },
    #[error("VIP label {label:?}: the name cleans to {cleaned:?}, which is not 1 to {MAX_NAME_LEN} characters of [a-z0-9-]")]
    BadName { label: String, cleaned: String },
}

/// Cleans a VIP name the way DC/OS did: lowercase, `_` becomes `-`, and any
/// other character that is not `[a-z0-9-]` is dropped (so `/group/app`
/// becomes `groupapp`). Leading and trailing `-` are trimmed so the result
/// is a valid DNS label.
pub fn clean_name(raw: &str) -> String {
    raw.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c == '_' { '-' } else { c })
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

/// Parses one label value into its target and port.
pub fn parse_label(value: &str, framework: &str) -> Result<(VipTarget, u16), VipError> {
    let value = value.trim();
    let (host, port) = match value.rsplit_once(':') {
        // `[v6]:port`
        Some((h, p)) if h.starts_with('[') && h.ends_with(']') => (&h[1..h.len() - 1], p),
        // A bare IPv6 address has colons but no port.
        Some((h, _)) if h.contains(':') => return Err(VipError::Malformed(value.to_string())),
        Some((h, p)) => (h, p),
        None => return Err(VipError::Malformed(value.to_string())),
    };
    let port_num = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(VipError::BadPort {
                label: value.to_string(),
                port: port.to_string(),
            })
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((VipTarget::Ip { ip }, port_num));
    }
    if host.is_empty() {
        return Err(VipError::Malformed(value.to_string()));
    }
    let name = clean_name(host);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(VipError::BadName {
            label: value.to_string(),
            cleaned: name,
        });
    }
    Ok((
        VipTarget::Named {
            name,
            framework: framework.to_string(),
        },
        port_num,
    ))
}

/// One backend of a VIP: a task's address and port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    pub task_id: String,
    pub node_id: NodeId,
    pub node_status: NodeStatus,
    /// The owning agent's health verdict: unhealthy backends get no new
    /// connections (weight 0); established ones are left alone.
    pub healthy: bool,
    pub weight: u32,
}

/// A label that could not be used, reported with the task that carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VipProblem {
    pub task_id: String,
    pub node_id: NodeId,
    pub label: String,
    pub error: String,
}

/// Every VIP declared by the cluster's tasks with all its backends, and the
/// labels that did not parse. A bad label never affects other VIPs.
pub fn vips_of(tasks: &[TaskView]) -> (BTreeMap<VipKey, Vec<Backend>>, Vec<VipProblem>) {
    let mut vips: BTreeMap<VipKey, Vec<Backend>> = BTreeMap::new();
    let mut problems = Vec::new();
    for task in tasks {
        for port in &task.spec.ports {
            for (label, value) in &port.labels {
                if !is_vip_label(label) {
                    continue;
                }
                match parse_label(value, &task.spec.framework) {
                    Ok((target, vip_port)) => {
                        let key = VipKey {
                            protocol: port.protocol,
                            target,
                            port: vip_port,
                        };
                        vips.entry(key).or_default().push(Backend {
                            ip: task.spec.ip,
                            port: port.port,
                            task_id: task.id.clone(),
                            node_id: task.node_id.clone(),
                            node_status: task.node_status,
                            healthy: task.healthy,
                            weight: 1,
                        });
                    }
                    Err(e) => problems.push(VipProblem {
                        task_id: task.id.clone(),
                        node_id: task.node_id.clone(),
                        label: label.to_string(),
                        error: e.to_string(),
                    }),
                }
            }
        }
    }
    for backends in vips.values_mut() {
        backends.sort();
        backends.dedup();
    }
    (vips, problems)
}

/// `VIP_0`, `VIP_1`, ...: the label keys Marathon writes for VIPs.
fn is_vip_label(key: &str) -> bool {
    key.strip_prefix("VIP_")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn named(name: &str) -> VipTarget {
        VipTarget::Named {
            name: name.into(),
            framework: "marathon".into(),
        }
    }

    #[test]
    fn labels_parse_as_dcos_users_write_them() {
        assert_eq!(
            parse_label("/httpi:3141", "marathon"),
            Ok((named("httpi"), 3141))
        );
        assert_eq!(
            parse_label("httpi:3141", "marathon"),
            Ok((named("httpi"), 3141))
        );
        assert_eq!(
            parse_label("/My_Group/App.1:80", "marathon"),
            Ok((named("my-groupapp1"), 80))
        );
        assert_eq!(
            parse_label("10.1.1.1:80", "marathon"),
            Ok((
                VipTarget::Ip {
                    ip: "10.1.1.1".parse().expect("ip")
                },
                80
            ))
        );
        assert_eq!(
            parse_label("[fd01:c::5]:443", "marathon"),
            Ok((
                VipTarget::Ip {
                    ip: "fd01:c::5".parse().expect("ip")
                },
                443
            ))
        );
    }

    #[test]
    fn bad_labels_say_why() {
        for (label, needle) in [
            ("/httpi", "is not `/name:port`"),
            ("/httpi:0", "port \"0\""),
            ("/httpi:70000", "port \"70000\""),
            ("/httpi:http", "port \"http\""),
            (":80", "is not `/name:port`"),
            ("/___:80", "cleans to \"\""),
            ("fd01::1", "is not `/name:port`"),
        ] {
            let err = parse_label(label, "marathon").expect_err(label).to_string();
            assert!(err.contains(needle), "{label}: {err}");
        }
        let long = format!("/{}:80", "a".repeat(64));
        assert!(matches!(
            parse_label(&long, "marathon"),
            Err(VipError::BadName { .. })
        ));
    }

    #[test]
    fn vip_display_matches_dcos_net() {
        let key = VipKey {
            protocol: Protocol::Tcp,
            target: named("httpi"),
            port: 3141,
        };
        assert_eq!(
            key.to_string(),
            "httpi.marathon.l4lb.thisdcos.directory:3141"
        );
    }

    proptest! {
        /// Whatever the raw name, a cleaned name is a valid DNS label or empty,
        /// and cleaning is idempotent.
        #[test]
        fn cleaned_names_are_dns_labels(raw in ".{0,100}") {
            let c = clean_name(&raw);
            prop_assert!(c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!c.starts_with('-') && !c.ends_with('-'));
            prop_assert_eq!(clean_name(&c), c);
        }

        #[test]
        fn any_label_parses_or_errors(value in ".{0,120}") {
            let _ = parse_label(&value, "marathon");
        }
    }
}

/// Which backends get new connections on this node: healthy ones on nodes
/// it sees alive. If no healthy backend of a VIP is on an alive node, all the
/// healthy ones are kept (as dcos-net did): a guess at a partition beats
/// black-holing the VIP. Unhealthy backends are never used.
pub fn in_use(backends: &[Backend]) -> Vec<bool> {
    let any_alive = backends
        .iter()
        .any(|b| b.healthy && b.node_status != NodeStatus::Down);
    backends
        .iter()
        .map(|b| b.healthy && (!any_alive || b.node_status != NodeStatus::Down))
        .collect()
}

#[cfg(test)]
mod selection_tests {
    use super::*;

    fn backend(node: &str, status: NodeStatus) -> Backend {
        Backend {
            ip: "10.0.0.1".parse().expect("ip"),
            port: 80,
            task_id: format!("t-{node}"),
            node_id: node.into(),
            node_status: status,
            healthy: true,
            weight: 1,
        }
    }

    #[test]
    fn unhealthy_backends_are_never_used() {
        let mut sick = backend("a", NodeStatus::Alive);
        sick.healthy = false;
        let b = [sick.clone(), backend("b", NodeStatus::Down)];
        // The only healthy one is on a down node: kept, the sick one is not.
        assert_eq!(in_use(&b), [false, true]);
        assert_eq!(in_use(&[sick]), [false]);
    }

    #[test]
    fn down_nodes_are_skipped_unless_all_are_down() {
        let b = [
            backend("a", NodeStatus::Alive),
            backend("b", NodeStatus::Down),
            backend("c", NodeStatus::Suspect),
        ];
        assert_eq!(in_use(&b), [true, false, true]);
        let all_down = [
            backend("a", NodeStatus::Down),
            backend("b", NodeStatus::Down),
        ];
        assert_eq!(in_use(&all_down), [true, true]);
    }
}
