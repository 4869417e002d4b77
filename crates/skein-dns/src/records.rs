//! The cluster's DNS records, computed from the replica on every node (no
//! central Mesos-DNS to lose). Names follow Mesos-DNS and dcos-dns:
//!
//! - `<app>.<framework>.mesos` A/AAAA → task addresses; an app id
//!   `/group/app` becomes `app-group`;
//! - `_<app>._tcp|_udp.<framework>.mesos` SRV, one per task port, whose
//!   target is the task's own name `<app>-<tag>-<node>.<framework>.mesos`;
//! - `<app>.<framework>.slave.mesos` → the addresses of the agents running it;
//! - `<vip>.<framework>.l4lb.thisdcos.directory` → the VIP's address;
//! - `<app>.<framework>.agentip|containerip|autoip.dcos.thisdcos.directory`;
//! - `ready.spartan` → 127.0.0.1 (a readiness probe).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;
use skein_state::{NodeView, Protocol, TaskView};

/// Cluster records are short-lived by design: tasks move.
pub const TTL: u32 = 5;
pub const MESOS_ZONE: &str = "mesos.";
pub const DCOS_ZONE: &str = "thisdcos.directory.";
pub const SPARTAN_ZONE: &str = "spartan.";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "type", rename_all = "UPPERCASE")]
pub enum RData {
    A {
        ip: Ipv4Addr,
    },
    Aaaa {
        ip: std::net::Ipv6Addr,
    },
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
}

impl RData {
    fn address(ip: IpAddr) -> RData {
        match ip {
            IpAddr::V4(ip) => RData::A { ip },
            IpAddr::V6(ip) => RData::Aaaa { ip },
        }
    }
}

/// All records: fully qualified lowercase name (with the final dot) → data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Records {
    /// Each name's data, sorted and without duplicates. A sorted `Vec`
    /// rather than a set: most names hold one record, and a one-element
    /// B-tree set still allocates a whole node (≈ 0.5 KB a name, tens of MB
    /// at 10,000 tasks).
    pub names: BTreeMap<String, Vec<RData>>,
}

impl Records {
    pub fn add(&mut self, name: String, data: RData) {
        let set = self.names.entry(name).or_default();
        if let Err(i) = set.binary_search(&data) {
            set.insert(i, data);
        }
    }

    pub fn get(&self, name: &str) -> Option<&Vec<RData>> {
        self.names.get(&name.to_ascii_lowercase())
    }

    /// Number of records (not names).
    pub fn len(&self) -> usize {
        self.names.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// One DNS label the way Mesos-DNS makes them: lowercase, every character
/// outside `[a-z0-9-]` becomes `-`, no leading or trailing `-`, at most 63
/// characters.
pub fn label(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let cut: String = trimmed.chars().take(63).collect();
    cut.trim_end_matches('-').to_string()
}

/// The name of a Marathon app in DNS: the path segments of its id in
/// reverse order joined by `-` (Marathon's task name for `/group/app` is
/// `app.group`, which Mesos-DNS writes `app-group`).
pub fn app_label(app_id: &str) -> String {
    let reversed: Vec<&str> = app_id.split('/').filter(|s| !s.is_empty()).rev().collect();
    label(&reversed.join("-"))
}

/// A short stable tag of a task id, standing in for Mesos-DNS's random
/// letters in per-task names.
fn task_tag(task_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..5)
        .map(|i| (b'a' + ((h >> (i * 5)) % 26) as u8) as char)
        .collect()
}

/// A named VIP and its settled address, for the l4lb zone.
pub struct VipName<'a> {
    pub name: &'a str,
    pub framework: &'a str,
    pub address: IpAddr,
}

/// Builds every cluster record from the tasks, the nodes (for agent
/// addresses) and the settled named-VIP addresses.
pub fn build<'t>(
    tasks: impl IntoIterator<Item = &'t TaskView>,
    nodes: &[NodeView],
    vips: &[VipName<'_>],
) -> Records {
    let mut r = Records::default();
    let agent_ip: BTreeMap<&str, IpAddr> = nodes
        .iter()
        .filter_map(|n| n.private_ip.map(|ip| (n.node_id.as_str(), ip)))
        .collect();
    r.add(
        format!("ready.{SPARTAN_ZONE}"),
        RData::A {
            ip: Ipv4Addr::LOCALHOST,
        },
    );
    for task in tasks {
        let app = app_label(&task.spec.app);
        let framework = label(&task.spec.framework);
        if app.is_empty() || framework.is_empty() {
            continue;
        }
        let task_ip = RData::address(task.spec.ip);
        let agent = agent_ip.get(task.node_id.as_str()).copied();
        let node = label(&task.node_id);
        let own = format!(
            "{app}-{}-{node}.{framework}.{MESOS_ZONE}",
            task_tag(&task.id)
        );
        r.add(format!("{app}.{framework}.{MESOS_ZONE}"), task_ip.clone());
        r.add(own.clone(), task_ip.clone());
        r.add(
            format!("{app}.{framework}.containerip.dcos.{DCOS_ZONE}"),
            task_ip.clone(),
        );
        r.add(
            format!("{app}.{framework}.autoip.dcos.{DCOS_ZONE}"),
            task_ip.clone(),
        );
        if let Some(agent) = agent {
            r.add(
                format!("{app}.{framework}.slave.{MESOS_ZONE}"),
                RData::address(agent),
            );
            r.add(
                format!("{app}.{framework}.agentip.dcos.{DCOS_ZONE}"),
                RData::address(agent),
            );
        }
        for port in &task.spec.ports {
            let proto = match port.protocol {
                Protocol::Tcp => "_tcp",
                Protocol::Udp => "_udp",
            };
            r.add(
                format!("_{app}.{proto}.{framework}.{MESOS_ZONE}"),
                RData::Srv {
                    priority: 0,
                    weight: 1,
                    port: port.port,
                    target: own.clone(),
                },
            );
        }
    }
    for vip in vips {
        r.add(
            format!(
                "{}.{}.l4lb.{DCOS_ZONE}",
                label(vip.name),
                label(vip.framework)
            ),
            RData::address(vip.address),
        );
    }
    // Most names hold one record; a Vec grown by push keeps room for four
    // (≈ 100 B wasted a name: 25 MB at 10,000 tasks, measured with massif).
    for data in r.names.values_mut() {
        data.shrink_to_fit();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use skein_state::NodeStatus;

    fn task(id: &str, app: &str, ip: &str, node: &str, ports: &[(u16, &str)]) -> TaskView {
        let ports: Vec<String> = ports
            .iter()
            .map(|(p, proto)| format!(r#"{{"port":{p},"protocol":"{proto}"}}"#))
            .collect();
        let spec = serde_json::from_str(&format!(
            r#"{{"app":"{app}","ip":"{ip}","ports":[{}]}}"#,
            ports.join(",")
        ))
        .expect("spec");
        TaskView {
            id: id.into(),
            node_id: node.into(),
            node_status: NodeStatus::Alive,
            healthy: true,
            spec,
        }
    }

    fn node(id: &str, ip: &str) -> NodeView {
        NodeView {
            node_id: id.into(),
            private_ip: Some(ip.parse().expect("ip")),
            hostname: None,
            status: NodeStatus::Alive,
            updated: 0,
            generation: 1,
            version: 1,
        }
    }

    fn a(ip: &str) -> RData {
        RData::A {
            ip: ip.parse().expect("ip"),
        }
    }

    #[test]
    fn mesos_dns_names_for_apps() {
        assert_eq!(app_label("/httpi"), "httpi");
        assert_eq!(app_label("/group/app"), "app-group");
        assert_eq!(app_label("/prod/web/frontend"), "frontend-web-prod");
        assert_eq!(app_label("/My_Group/App.V2"), "app-v2-my-group");
        assert_eq!(app_label("//a//b/"), "b-a");
        assert_eq!(app_label("/---/"), "");
        assert_eq!(app_label(&format!("/{}", "x".repeat(100))).len(), 63);
    }

    #[test]
    fn records_for_a_task_on_a_node() {
        let tasks = [
            task(
                "httpi.1",
                "/httpi",
                "10.0.0.2",
                "node2",
                &[(9896, "tcp"), (53, "udp")],
            ),
            task("httpi.2", "/httpi", "10.0.0.3", "node3", &[(9896, "tcp")]),
        ];
        let nodes = [node("node2", "192.168.0.2"), node("node3", "192.168.0.3")];
        let vips = [VipName {
            name: "httpi",
            framework: "marathon",
            address: "11.1.2.3".parse().expect("ip"),
        }];
        let r = build(&tasks, &nodes, &vips);
        let app = r.get("httpi.marathon.mesos.").expect("A");
        assert_eq!(app, &vec![a("10.0.0.2"), a("10.0.0.3")]);
        let srv = r.get("_httpi._tcp.marathon.mesos.").expect("SRV");
        assert_eq!(srv.len(), 2);
        for rec in srv {
            let RData::Srv { port, target, .. } = rec else {
                panic!("{rec:?}")
            };
            assert_eq!(*port, 9896);
            // The SRV target resolves to that task.
            assert!(
                target.starts_with("httpi-") && target.ends_with(".marathon.mesos."),
                "{target}"
            );
            assert_eq!(r.get(target).map(Vec::len), Some(1));
        }
        assert_eq!(r.get("_httpi._udp.marathon.mesos.").map(Vec::len), Some(1));
        assert_eq!(
            r.get("httpi.marathon.l4lb.thisdcos.directory."),
            Some(&[a("11.1.2.3")].into())
        );
        assert_eq!(
            r.get("httpi.marathon.agentip.dcos.thisdcos.directory."),
            Some(&[a("192.168.0.2"), a("192.168.0.3")].into())
        );
        assert_eq!(
            r.get("httpi.marathon.containerip.dcos.thisdcos.directory."),
            Some(&[a("10.0.0.2"), a("10.0.0.3")].into())
        );
        assert_eq!(r.get("httpi.marathon.slave.mesos.").map(Vec::len), Some(2));
        assert_eq!(r.get("READY.spartan."), Some(&[a("127.0.0.1")].into()));
        assert_eq!(r.get("nothing.marathon.mesos."), None);
    }

    proptest! {
        /// Whatever the app id, a generated name is a valid DNS label.
        #[test]
        fn labels_are_valid(raw in ".{0,200}") {
            let l = app_label(&raw);
            prop_assert!(l.len() <= 63);
            prop_assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!l.starts_with('-') && !l.ends_with('-'));
        }
    }
}
