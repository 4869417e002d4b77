//! A container, as the engine's `GET /containers/{id}/json` describes it,
//! turned into a task of this node (pure). The labels are Marathon's, put
//! on the container: `VIP_<n>` on its `n`th port, `HAPROXY_*` and
//! `DCOS_SERVICE_*` as an app's labels; `skein.app` names the app (else the
//! container's name) and `skein.port` its first port (else its exposed and
//! published ports in order). The address is the container's on the
//! overlay network `dcos` when it is attached there (its own ports), else
//! this host's with the ports Docker published.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use skein_state::{Labels, PortMapping, Protocol, TaskSpec};

/// Task ids of containers start so: the provider owns these tasks.
pub const TASK_PREFIX: &str = "docker-";
/// The Docker network on the overlay by default.
pub const OVERLAY_NETWORK: &str = "dcos";

/// The part of the engine's container description read here.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Container {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: State,
    #[serde(default)]
    pub config: Config,
    #[serde(default)]
    pub network_settings: NetworkSettings,
    #[serde(default)]
    pub host_config: HostConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HostConfig {
    /// `host`: the container shares the host's network (its ports are
    /// the host's).
    #[serde(default)]
    pub network_mode: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct State {
    #[serde(default)]
    pub running: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub restarting: bool,
    #[serde(default)]
    pub health: Option<Health>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Health {
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Config {
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSettings {
    /// `"80/tcp"` → its bindings on the host (null when not published).
    #[serde(default)]
    pub ports: Option<BTreeMap<String, Option<Vec<Binding>>>>,
    #[serde(default)]
    pub networks: Option<BTreeMap<String, Network>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Binding {
    /// Empty, `0.0.0.0` or `::` for every address of the host.
    #[serde(default, rename = "HostIp")]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Network {
    #[serde(default, rename = "IPAddress")]
    pub ip_address: String,
}

/// What a container becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub id: String,
    pub spec: TaskSpec,
    /// From Docker's health check: `None` when the container has none.
    /// `starting` counts as not healthy yet (no new connections).
    pub healthy: Option<bool>,
    /// What could not be kept (a labelled port nothing outside the host
    /// reaches), for the operator.
    pub notes: Vec<String>,
}

/// The task id of container `id`: stable across restarts of the container,
/// of Docker and of the agent.
pub fn task_id(container_id: &str) -> String {
    let short: String = container_id.chars().take(12).collect();
    format!("{TASK_PREFIX}{short}")
}

fn is_marathon_label(key: &str) -> bool {
    key.starts_with("VIP_")
        || key.starts_with("HAPROXY_")
        || key.starts_with("DCOS_SERVICE_")
        || key.starts_with("skein.")
}

fn parse_port(text: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some((port.trim().parse().ok().filter(|p| *p > 0)?, proto))
}

/// The task of `c` on the host at `host`, `Ok(None)` when it is none of
/// ours (not running, or unlabelled and `all` is off), or why it cannot be
/// one (a bad label). A container on the Docker network `overlay` is
/// reached at its address there.
pub fn map(
    c: &Container,
    host: IpAddr,
    all: bool,
    overlay: &str,
) -> Result<Option<Mapped>, String> {
    if !c.state.running || c.state.paused || c.state.restarting {
        return Ok(None);
    }
    let labels = c.config.labels.clone().unwrap_or_default();
    if !all && !labels.keys().any(|k| is_marathon_label(k)) {
        return Ok(None);
    }
    let name = c.name.trim_start_matches('/');
    let app = match labels.get("skein.app") {
        Some(a) if a.starts_with('/') => a.clone(),
        Some(a) => format!("/{a}"),
        None if name.is_empty() => return Err("a container without a name".into()),
        None => format!("/{name}"),
    };

    // The container's ports: exposed and published, in order; the one
    // `skein.port` names first.
    let mut ports: Vec<(u16, Protocol)> = Vec::new();
    let exposed = c.config.exposed_ports.iter().flat_map(|m| m.keys());
    let published = c.network_settings.ports.iter().flat_map(|m| m.keys());
    for text in exposed.chain(published) {
        if let Some(p) = parse_port(text) {
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
    }
    ports.sort();
    if let Some(first) = labels.get("skein.port") {
        let p = parse_port(first)
            .ok_or_else(|| format!("skein.port {first:?} is not a port (`80` or `53/udp`)"))?;
        ports.retain(|q| *q != p);
        ports.insert(0, p);
    }

    let overlay_ip = c
        .network_settings
        .networks
        .as_ref()
        .and_then(|n| n.get(overlay))
        .and_then(|n| n.ip_address.parse::<IpAddr>().ok());
    let host_mode = c.host_config.network_mode == "host";
    // Where the host publishes a container port: (a specific host
    // address, if bound to one; the host port). Loopback bindings reach
    // nobody else.
    let published = |(port, proto): (u16, Protocol)| -> Option<(Option<IpAddr>, u16)> {
        let key = format!("{port}/{proto}");
        c.network_settings
            .ports
            .as_ref()?
            .get(&key)?
            .as_ref()?
            .iter()
            .filter_map(|b| {
                let hp: u16 = b.host_port.parse().ok()?;
                match b.host_ip.as_str() {
                    "" | "0.0.0.0" | "::" => Some((None, hp)),
                    ip => {
                        let ip: IpAddr = ip.parse().ok()?;
                        (!ip.is_loopback()).then_some((Some(ip), hp))
                    }
                }
            })
            // Every address first.
            .min_by_key(|(ip, _)| ip.is_some())
    };
    let mut mappings = Vec::new();
    let mut specific_ip = None;
    let mut notes = Vec::new();
    // Container port index → index among the ports kept.
    let mut index_of: BTreeMap<usize, usize> = BTreeMap::new();
    for (n, &(port, protocol)) in ports.iter().enumerate() {
        // VIP_<n> of Marathon's port n; kept with the port it names.
        let mut port_labels = Labels::default();
        for (k, v) in &labels {
            if let Some(index) = k.strip_prefix("VIP_") {
                if index.parse::<usize>().ok() == Some(n) {
                    port_labels.insert(k.clone(), v.clone());
                }
            }
        }
        let reachable = if overlay_ip.is_some() || host_mode {
            Some(port)
        } else {
            published((port, protocol)).map(|(ip, hp)| {
                if specific_ip.is_none() {
                    specific_ip = ip;
                }
                hp
            })
        };
        match reachable {
            Some(port) => {
                index_of.insert(n, mappings.len());
                mappings.push(PortMapping {
                    name: None,
                    port,
                    protocol,
                    labels: port_labels,
                });
            }
            None if !port_labels.is_empty() => notes.push(format!(
                "port {port}/{protocol} has {} but is neither published (on a non-loopback address) nor on the {overlay} network: left out",
                port_labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
            )),
            None => {}
        }
    }
    // HAPROXY_{n}_* name ports by index, as on a Marathon app: renumbered
    // to the ports kept, dropped with a port left out.
    let mut app_labels = Labels::default();
    for (k, v) in &labels {
        if let Some(rest) = k.strip_prefix("HAPROXY_") {
            if let Some((index, key)) = rest
                .split_once('_')
                .filter(|(i, _)| i.parse::<usize>().is_ok())
            {
                let n: usize = index.parse().unwrap_or(usize::MAX);
                match index_of.get(&n) {
                    Some(m) => app_labels.insert(format!("HAPROXY_{m}_{key}"), v.clone()),
                    None => notes.push(format!("{k} names a port left out: ignored")),
                }
                continue;
            }
            app_labels.insert(k.clone(), v.clone());
        } else if k == "DCOS_SERVICE_PORT_INDEX" {
            match v.parse::<usize>().ok().and_then(|n| index_of.get(&n)) {
                Some(m) => app_labels.insert(k.clone(), m.to_string()),
                None => notes.push(format!("{k}={v} names a port left out: ignored")),
            }
        } else if k.starts_with("DCOS_SERVICE_") {
            app_labels.insert(k.clone(), v.clone());
        }
    }
    let spec = TaskSpec {
        app,
        framework: "marathon".into(),
        ip: overlay_ip.or(specific_ip).unwrap_or(host),
        ports: mappings,
        health_check: None,
        labels: app_labels,
    };
    spec.validate().map_err(|e| e.to_string())?;
    let healthy = c.state.health.as_ref().map(|h| h.status == "healthy");
    Ok(Some(Mapped {
        id: task_id(&c.id),
        spec,
        healthy,
        notes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).expect("container")
    }

    fn host() -> IpAddr {
        "192.0.2.7".parse().expect("ip")
    }

    #[test]
    fn a_published_container_is_the_hosts_address_with_its_vip() {
        let c = container(json!({
            "Id": "0123456789abcdef0123",
            "Name": "/web1",
            "State": {"Running": true},
            "Config": {"Labels": {"VIP_0": "/web:80", "HAPROXY_GROUP": "external",
                "com.docker.compose.project": "x"},
                "ExposedPorts": {"8080/tcp": {}, "9090/tcp": {}}},
            "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}],
                "9090/tcp": null},
                "Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}
        }));
        let m = map(&c, host(), false, OVERLAY_NETWORK)
            .expect("ok")
            .expect("ours");
        assert_eq!(m.id, "docker-0123456789ab");
        assert_eq!(m.spec.app, "/web1");
        assert_eq!(m.spec.ip, host());
        assert_eq!(m.spec.ports.len(), 1, "9090 is not published: unreachable");
        assert_eq!(m.spec.ports[0].port, 32768);
        assert_eq!(m.spec.ports[0].labels.get("VIP_0"), Some("/web:80"));
        assert_eq!(m.spec.labels.get("HAPROXY_GROUP"), Some("external"));
        assert!(m.spec.labels.get("com.docker.compose.project").is_none());
        assert_eq!(m.healthy, None);
    }

    #[test]
    fn on_the_overlay_the_container_is_its_own_address_and_ports() {
        let c = container(json!({
            "Id": "feedfacefeedfacefeed",
            "Name": "/db",
            "State": {"Running": true, "Health": {"Status": "starting"}},
            "Config": {"Labels": {"skein.app": "group/db", "skein.port": "5432",
                "VIP_0": "/db:5432", "VIP_1": "/db-metrics:9187"},
                "ExposedPorts": {"9187/tcp": {}, "5432/tcp": {}, "53/udp": {}}},
            "NetworkSettings": {"Networks": {"dcos": {"IPAddress": "9.0.3.4"}}}
        }));
        let m = map(&c, host(), false, OVERLAY_NETWORK)
            .expect("ok")
            .expect("ours");
        assert_eq!(m.spec.app, "/group/db");
        assert_eq!(m.spec.ip, "9.0.3.4".parse::<IpAddr>().expect("ip"));
        let ports: Vec<(u16, Protocol)> =
            m.spec.ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(
            ports,
            [
                (5432, Protocol::Tcp),
                (53, Protocol::Udp),
                (9187, Protocol::Tcp)
            ]
        );
        assert_eq!(m.spec.ports[0].labels.get("VIP_0"), Some("/db:5432"));
        assert_eq!(
            m.spec.ports[1].labels.get("VIP_1"),
            Some("/db-metrics:9187")
        );
        assert_eq!(m.healthy, Some(false), "starting is not healthy yet");
    }

    #[test]
    fn where_a_port_is_published_decides_the_address() {
        // Loopback only: nobody else reaches it; a specific address: that
        // one; every address: the host's.
        let mapped = |bindings: serde_json::Value, mode: &str| {
            let c = container(json!({"Id": "ab", "Name": "/w", "State": {"Running": true},
                "Config": {"Labels": {"VIP_0": "/w:80", "HAPROXY_0_VHOST": "w.example.com"},
                    "ExposedPorts": {"80/tcp": {}}},
                "HostConfig": {"NetworkMode": mode},
                "NetworkSettings": {"Ports": {"80/tcp": bindings}}}));
            map(&c, host(), false, OVERLAY_NETWORK)
                .expect("ok")
                .expect("ours")
        };
        let loopback = mapped(
            json!([{"HostIp": "127.0.0.1", "HostPort": "8080"}]),
            "bridge",
        );
        assert!(loopback.spec.ports.is_empty());
        assert!(
            loopback.notes[0].contains("VIP_0=/w:80"),
            "{:?}",
            loopback.notes
        );
        assert!(
            loopback.spec.labels.get("HAPROXY_0_VHOST").is_none(),
            "its port is gone"
        );
        let specific = mapped(
            json!([{"HostIp": "10.1.2.3", "HostPort": "8080"}]),
            "bridge",
        );
        assert_eq!(specific.spec.ip, "10.1.2.3".parse::<IpAddr>().expect("ip"));
        assert_eq!(specific.spec.ports[0].port, 8080);
        let both = mapped(
            json!([{"HostIp": "10.1.2.3", "HostPort": "8081"}, {"HostIp": "0.0.0.0", "HostPort": "8080"}]),
            "bridge",
        );
        assert_eq!((both.spec.ip, both.spec.ports[0].port), (host(), 8080));
        let host_net = mapped(json!(null), "host");
        assert_eq!(
            (host_net.spec.ip, host_net.spec.ports[0].port),
            (host(), 80)
        );
        assert!(host_net.notes.is_empty());
    }

    #[test]
    fn haproxy_labels_follow_their_port_when_one_is_left_out() {
        // 80 unpublished, 443 published: 443 becomes port 0.
        let c = container(json!({"Id": "ab", "Name": "/w", "State": {"Running": true},
            "Config": {"Labels": {"HAPROXY_0_VHOST": "plain.example.com", "HAPROXY_1_VHOST": "tls.example.com",
                "HAPROXY_GROUP": "external", "DCOS_SERVICE_PORT_INDEX": "1"},
                "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}},
            "NetworkSettings": {"Ports": {"80/tcp": null, "443/tcp": [{"HostIp": "", "HostPort": "30443"}]}}}));
        let m = map(&c, host(), false, OVERLAY_NETWORK)
            .expect("ok")
            .expect("ours");
        assert_eq!(m.spec.ports.len(), 1);
        assert_eq!(
            m.spec.labels.get("HAPROXY_0_VHOST"),
            Some("tls.example.com")
        );
        assert_eq!(m.spec.labels.get("HAPROXY_1_VHOST"), None);
        assert_eq!(m.spec.labels.get("HAPROXY_GROUP"), Some("external"));
        assert_eq!(m.spec.labels.get("DCOS_SERVICE_PORT_INDEX"), Some("0"));
        assert!(
            m.notes.iter().any(|n| n.contains("HAPROXY_0_VHOST")),
            "{:?}",
            m.notes
        );
    }

    #[test]
    fn unlabelled_stopped_and_paused_containers_are_none_of_ours() {
        let base = json!({"Id": "aa", "Name": "/x", "State": {"Running": true},
            "Config": {"ExposedPorts": {"80/tcp": {}}}});
        assert_eq!(
            map(&container(base.clone()), host(), false, OVERLAY_NETWORK),
            Ok(None)
        );
        assert!(
            map(&container(base), host(), true, OVERLAY_NETWORK)
                .expect("ok")
                .is_some(),
            "--docker-all"
        );
        for state in [
            json!({"Running": false}),
            json!({"Running": true, "Paused": true}),
            json!({"Running": true, "Restarting": true}),
        ] {
            let c = container(json!({"Id": "aa", "Name": "/x", "State": state,
                "Config": {"Labels": {"VIP_0": "/x:80"}}}));
            assert_eq!(map(&c, host(), true, OVERLAY_NETWORK), Ok(None));
        }
    }

    #[test]
    fn bad_labels_are_refused_with_the_reason() {
        let c = container(json!({"Id": "aa", "Name": "/x", "State": {"Running": true},
            "Config": {"Labels": {"skein.port": "http"}}}));
        let e = map(&c, host(), false, OVERLAY_NETWORK).expect_err("refused");
        assert!(e.contains("skein.port"), "{e}");
    }

    proptest! {
        /// Whatever the engine says (any labels, ports, networks), mapping
        /// never panics, and what it returns is a valid task with the
        /// container's stable id.
        #[test]
        fn any_container_maps_to_a_valid_task_or_a_reason(
            labels in proptest::collection::btree_map("[A-Za-z_.]{1,12}", ".{0,40}", 0..6),
            ports in proptest::collection::vec(("[0-9]{1,6}", prop_oneof!["tcp", "udp", "sctp"]), 0..4),
            published in any::<bool>(),
            overlay in proptest::option::of("[0-9.]{0,15}"),
            all in any::<bool>(),
        ) {
            let exposed: serde_json::Map<String, serde_json::Value> = ports
                .iter()
                .map(|(p, proto)| (format!("{p}/{proto}"), json!({})))
                .collect();
            let bindings: serde_json::Map<String, serde_json::Value> = ports
                .iter()
                .map(|(p, proto)| (format!("{p}/{proto}"),
                    if published { json!([{"HostPort": p}]) } else { json!(null) }))
                .collect();
            let mut networks = serde_json::Map::new();
            if let Some(ip) = overlay {
                networks.insert("dcos".into(), json!({"IPAddress": ip}));
            }
            let c = container(json!({"Id": "0123456789abcdef", "Name": "/app",
                "State": {"Running": true},
                "Config": {"Labels": labels, "ExposedPorts": exposed},
                "NetworkSettings": {"Ports": bindings, "Networks": networks}}));
            if let Ok(Some(m)) = map(&c, host(), all, OVERLAY_NETWORK) {
                prop_assert_eq!(m.id, "docker-0123456789ab");
                prop_assert!(m.spec.validate().is_ok());
            }
        }
    }
}
