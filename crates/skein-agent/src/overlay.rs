//! This node's part in overlay leases: claim an agent subnet per overlay
//! and a VTEP address (persisted, so a restart keeps them), and describe
//! every agent's leases in DC/OS's `/overlay-master/state` shape.
//! `vxlan.rs` realizes them (VXLAN device, routes, neighbours, FDB,
//! bridges); its outcome is each agent's `state.status`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use skein_overlay::lease::{propose, resolve};
use skein_overlay::{Claim, Pool};
use skein_state::Replica;

use crate::docs::{
    AgentOverlay, Bridge, OverlayAgent, OverlayBackend, OverlayInfo, OverlayMasterState,
    OverlayNetwork, OverlayState, OverlayStatus, Vxlan,
};

/// Prefix of lease claim keys: `lease:<pool>` where pool is `vtep` or
/// `overlay/<name>`.
pub const LEASE_PREFIX: &str = "lease:";
pub const VTEP_POOL: &str = "vtep";
/// Each node publishes a fingerprint of its overlay configuration here;
/// claims of a node whose configuration differs are ignored (its slot
/// numbers would mean other addresses) and the node is reported.
pub const CONFIG_KEY: &str = "overlay:config";
/// Each node publishes how realizing its overlay went: `ok` or an error.
pub const STATUS_KEY: &str = "overlay:status";

/// The overlay configuration, identical on every node (DC/OS's shape and
/// defaults); read from `--overlay-config <file.json>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayConfig {
    #[serde(with = "cidr")]
    pub vtep_subnet: (Ipv4Addr, u8),
    pub vtep_mac_oui: String,
    #[serde(default = "default_vtep_mtu")]
    pub vtep_mtu: u32,
    /// MTU of container interfaces (written into the CNI configuration).
    #[serde(default = "default_container_mtu")]
    pub container_mtu: u32,
    pub overlays: Vec<OverlayNet>,
}

fn default_vtep_mtu() -> u32 {
    1450
}

fn default_container_mtu() -> u32 {
    1420
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayNet {
    pub name: String,
    #[serde(with = "cidr")]
    pub subnet: (Ipv4Addr, u8),
    pub prefix: u8,
}

mod cidr {
    use std::net::Ipv4Addr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &(Ipv4Addr, u8), s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/{}", v.0, v.1))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(Ipv4Addr, u8), D::Error> {
        let text = String::deserialize(d)?;
        super::parse_cidr(&text).map_err(serde::de::Error::custom)
    }
}

pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not an IPv4 CIDR like 9.0.0.0/8"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{text:?}: {ip:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{text:?}: prefix length must be 0..=32"))?;
    Ok((ip, len))
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            vtep_subnet: (Ipv4Addr::new(44, 128, 0, 0), 20),
            vtep_mac_oui: "70:B3:D5:00:00:00".to_string(),
            vtep_mtu: default_vtep_mtu(),
            container_mtu: default_container_mtu(),
            overlays: vec![OverlayNet {
                name: "dcos".to_string(),
                subnet: (Ipv4Addr::new(9, 0, 0, 0), 8),
                prefix: 24,
            }],
        }
    }
}

impl OverlayConfig {
    /// Reads and checks a JSON configuration file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<OverlayConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read overlay configuration {}", path.display()))?;
        let config: OverlayConfig = serde_json::from_str(&text)
            .with_context(|| format!("overlay configuration {}", path.display()))?;
        config
            .pools()
            .with_context(|| format!("overlay configuration {}", path.display()))?;
        Ok(config)
    }

    /// The OUI's three bytes.
    pub fn oui(&self) -> anyhow::Result<[u8; 3]> {
        let bytes: Vec<u8> = self
            .vtep_mac_oui
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("vtep_mac_oui {:?} is not a MAC", self.vtep_mac_oui))?;
        match bytes.as_slice() {
            [a, b, c, 0, 0, 0] | [a, b, c] => Ok([*a, *b, *c]),
            _ => anyhow::bail!(
                "vtep_mac_oui {:?} must be three bytes followed by :00:00:00",
                self.vtep_mac_oui
            ),
        }
    }

    /// A VTEP's MAC: the OUI and the low 24 bits of its IP.
    pub fn vtep_mac(&self, vtep_ip: Ipv4Addr) -> [u8; 6] {
        let oui = self.oui().unwrap_or([0x70, 0xB3, 0xD5]);
        let o = vtep_ip.octets();
        [oui[0], oui[1], oui[2], o[1], o[2], o[3]]
    }

    /// Short fingerprint of everything that must be equal cluster-wide.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_string(self).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canonical.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Every pool by name, or a clear error for a configuration that
    /// cannot work (overlapping or malformed subnets).
    pub fn pools(&self) -> anyhow::Result<Vec<(String, Pool)>> {
        self.oui()?;
        for o in &self.overlays {
            if o.name.is_empty()
                || o.name.len() > 13
                || !o
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                anyhow::bail!(
                    "overlay name {:?} must be 1-13 letters, digits or '-' (bridges are m-<name>)",
                    o.name
                );
            }
            if o.prefix >= 31 || o.prefix < o.subnet.1 {
                anyhow::bail!(
                    "overlay {}: prefix /{} does not fit in {}/{} (it must be longer than the \
                     subnet's and at most /30, as each agent subnet is split in two bridges)",
                    o.name,
                    o.prefix,
                    o.subnet.0,
                    o.subnet.1
                );
            }
        }
        let mut pools = vec![(
            VTEP_POOL.to_string(),
            Pool::addresses(self.vtep_subnet.0, self.vtep_subnet.1)?,
        )];
        for o in &self.overlays {
            pools.push((
                format!("overlay/{}", o.name),
                Pool::subnets(o.subnet.0, o.subnet.1, o.prefix)?,
            ));
        }
        let ranges: Vec<(String, u64, u64)> = std::iter::once((
            "vtep_subnet".to_string(),
            self.vtep_subnet.0,
            self.vtep_subnet.1,
        ))
        .chain(
            self.overlays
                .iter()
                .map(|o| (o.name.clone(), o.subnet.0, o.subnet.1)),
        )
        .map(|(n, base, len)| {
            let start = u64::from(u32::from(base));
            (n, start, start + (1u64 << (32 - len)))
        })
        .collect();
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                if a.1 < b.2 && b.1 < a.2 {
                    anyhow::bail!("overlay subnets of {} and {} overlap", a.0, b.0);
                }
            }
        }
        Ok(pools)
    }
}

/// Whether `node` publishes the same overlay configuration as ours. A node
/// that publishes none (yet) is taken to agree.
fn same_config(replica: &Replica, node: &str, fingerprint: &str) -> bool {
    replica
        .nodes()
        .get(node)
        .and_then(|ks| ks.get(CONFIG_KEY))
        .is_none_or(|fp| fp == fingerprint)
}

/// Claims of one pool across the replica: node → claim, from the nodes that
/// share our configuration.
pub fn claims(replica: &Replica, pool: &str, fingerprint: &str) -> BTreeMap<String, Claim> {
    let key = format!("{LEASE_PREFIX}{pool}");
    replica
        .nodes()
        .iter()
        .filter(|(node, _)| same_config(replica, node, fingerprint))
        .filter_map(|(node, ks)| {
            let claim = serde_json::from_str(ks.get(&key)?).ok()?;
            Some((node.clone(), claim))
        })
        .collect()
}

/// What this node should claim in every pool, given the replica, and a
/// clear message for each pool that has nothing left for it (the other
/// pools are still claimed).
pub fn desired(
    config: &OverlayConfig,
    replica: &Replica,
    me: &str,
    now_ms: u64,
) -> anyhow::Result<(BTreeMap<String, Claim>, Vec<String>)> {
    let fingerprint = config.fingerprint();
    let mut out = BTreeMap::new();
    let mut exhausted = Vec::new();
    for (name, pool) in config.pools()? {
        match propose(&pool, me, &claims(replica, &name, &fingerprint), now_ms) {
            Ok(claim) => {
                out.insert(name, claim);
            }
            Err(e) => exhausted.push(format!("cannot lease from {name}: {e}")),
        }
    }
    Ok((out, exhausted))
}

/// When this node marks its lease claims settled ([`skein_overlay::lease`]
/// explains why a settled claim beats any claim seen later, whatever the
/// clocks): once a claim has been published and has won, unchanged, for
/// `period`, in a view that includes the rest of the cluster (`synced`: a
/// peer is alive, or the node has no seeds to wait for).
#[derive(Debug, Default)]
pub struct LeaseSettling {
    /// Pool → when this node's current (unsettled) claim was first seen
    /// winning.
    winning_since: BTreeMap<String, Instant>,
}

impl LeaseSettling {
    /// Marks settled, in `desired`, the claims that are due. Returns
    /// whether some claim still waits (time alone will settle it).
    pub fn step(
        &mut self,
        desired: &mut BTreeMap<String, Claim>,
        published: &BTreeMap<String, Claim>,
        synced: bool,
        now: Instant,
        period: Duration,
    ) -> bool {
        self.winning_since
            .retain(|pool, _| desired.get(pool).is_some_and(|c| !c.settled));
        let mut waiting = false;
        for (pool, claim) in desired.iter_mut() {
            if claim.settled {
                continue;
            }
            // `propose` hands back the published claim exactly when it
            // wins; a new claim must first be published.
            if published.get(pool) != Some(claim) {
                self.winning_since.remove(pool);
                waiting = true;
                continue;
            }
            if !synced {
                // The hold counts from the first synced view: a claim that
                // only "won" in a view without the cluster proves nothing.
                // Syncing changes keys and members, which rebuild the view:
                // no need to wait on time meanwhile.
                self.winning_since.remove(pool);
                continue;
            }
            let since = *self.winning_since.entry(pool.clone()).or_insert(now);
            if now.duration_since(since) >= period {
                claim.settled = true;
                self.winning_since.remove(pool);
            } else {
                waiting = true;
            }
        }
        waiting
    }
}

/// One node's winning leases.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeLeases {
    pub vtep_ip: Ipv4Addr,
    /// (overlay name, agent subnet, prefix) for each overlay it won one of.
    pub subnets: Vec<(String, Ipv4Addr, u8)>,
}

/// Every node's winning leases (nodes without a VTEP lease are left out:
/// nothing can reach them over the overlay).
pub fn node_leases(
    config: &OverlayConfig,
    replica: &Replica,
) -> anyhow::Result<BTreeMap<String, NodeLeases>> {
    let fingerprint = config.fingerprint();
    let pools = config.pools()?;
    let resolved: Vec<BTreeMap<String, u32>> = pools
        .iter()
        .map(|(name, pool)| resolve(pool, &claims(replica, name, &fingerprint)))
        .collect();
    let vtep_pool = pools[0].1;
    let mut out = BTreeMap::new();
    for (node, slot) in &resolved[0] {
        let subnets = config
            .overlays
            .iter()
            .zip(pools[1..].iter().zip(&resolved[1..]))
            .filter_map(|(o, ((_, pool), leases))| {
                Some((o.name.clone(), pool.address(*leases.get(node)?), o.prefix))
            })
            .collect();
        out.insert(
            node.clone(),
            NodeLeases {
                vtep_ip: vtep_pool.address(*slot),
                subnets,
            },
        );
    }
    Ok(out)
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// DC/OS's `/overlay-master/state` from the replica. `state.status` is each
/// agent's own report: `STATUS_OK` once it has realized its overlay,
/// `STATUS_LEASED` before, `STATUS_ERROR` (with `error`) when realizing
/// failed, `STATUS_CONFIG_MISMATCH` for an agent configured differently.
pub fn master_state(
    config: &OverlayConfig,
    replica: &Replica,
    agent_ips: &BTreeMap<String, IpAddr>,
) -> anyhow::Result<OverlayMasterState> {
    let fingerprint = config.fingerprint();
    let leases = node_leases(config, replica)?;
    let cidr = |(ip, len): (Ipv4Addr, u8)| format!("{ip}/{len}");
    let info = |o: &OverlayNet| OverlayInfo {
        name: o.name.clone(),
        prefix: o.prefix,
        subnet: cidr(o.subnet),
    };
    let state = |status, error: Option<&str>| OverlayState {
        error: error.map(str::to_string),
        status,
    };
    let mut agents = Vec::new();
    for (node, &ip) in agent_ips {
        let agent = |overlays, state| OverlayAgent {
            ip,
            node_id: node.clone(),
            overlays,
            state,
        };
        if !same_config(replica, node, &fingerprint) {
            agents.push(agent(
                vec![],
                state(
                    OverlayStatus::ConfigMismatch,
                    Some(
                        "this agent's overlay configuration differs from the cluster's; \
                         its leases are ignored",
                    ),
                ),
            ));
            continue;
        }
        let reported = replica.nodes().get(node).and_then(|ks| ks.get(STATUS_KEY));
        let Some(lease) = leases.get(node) else {
            // No VTEP lease (yet, or none left): listed, with why.
            let why = match reported {
                Some(err) if err != "ok" => state(OverlayStatus::Error, Some(err)),
                _ => state(OverlayStatus::Pending, None),
            };
            agents.push(agent(vec![], why));
            continue;
        };
        let status = match reported {
            Some("ok") => state(OverlayStatus::Ok, None),
            Some(err) => state(OverlayStatus::Error, Some(err)),
            None => state(OverlayStatus::Leased, None),
        };
        let overlays = config
            .overlays
            .iter()
            .filter_map(|o| {
                let (_, subnet, prefix) = lease.subnets.iter().find(|(n, _, _)| *n == o.name)?;
                let [m, d] = skein_overlay::realize::bridge_halves(*subnet, *prefix);
                Some(AgentOverlay {
                    backend: OverlayBackend {
                        vxlan: Vxlan {
                            vni: crate::vxlan::VNI,
                            vtep_ip: cidr((lease.vtep_ip, config.vtep_subnet.1)),
                            vtep_mac: mac_string(config.vtep_mac(lease.vtep_ip)),
                            vtep_name: crate::vxlan::VTEP_NAME.to_string(),
                        },
                    },
                    docker_bridge: Bridge {
                        ip: cidr((d.2, d.1)),
                        name: format!("d-{}", o.name),
                    },
                    info: info(o),
                    mesos_bridge: Bridge {
                        ip: cidr((m.2, m.1)),
                        name: format!("m-{}", o.name),
                    },
                    state: status.clone(),
                    subnet: cidr((*subnet, *prefix)),
                })
            })
            .collect();
        // Also at the agent's level: an agent that has a VTEP but no subnet
        // of some overlay (all leased) has no overlay entry to carry it.
        agents.push(agent(overlays, status));
    }
    Ok(OverlayMasterState {
        agents,
        network: OverlayNetwork {
            overlays: config.overlays.iter().map(info).collect(),
            vtep_mac_oui: config.vtep_mac_oui.clone(),
            vtep_mtu: config.vtep_mtu,
            vtep_subnet: cidr(config.vtep_subnet),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_files_in_dcos_shape() {
        let c: OverlayConfig = serde_json::from_str(
            r#"{"vtep_subnet":"44.128.0.0/20","vtep_mac_oui":"70:B3:D5:00:00:00",
                "overlays":[{"name":"dcos","subnet":"9.0.0.0/8","prefix":24}]}"#,
        )
        .expect("parses");
        assert_eq!(c, OverlayConfig::default());
        assert_eq!(c.fingerprint(), OverlayConfig::default().fingerprint());
        let mut other = c.clone();
        other.vtep_mtu = 9000;
        assert_ne!(c.fingerprint(), other.fingerprint());
        for (bad, says) in [
            (
                r#"{"vtep_subnet":"44.128.0/20","vtep_mac_oui":"70:B3:D5:00:00:00","overlays":[]}"#,
                "not an IPv4 address",
            ),
            (
                r#"{"vtep_subnet":"44.128.0.0/20","vtep_mac_oui":"x","overlays":[],"mtu":1}"#,
                "unknown field",
            ),
        ] {
            let err = serde_json::from_str::<OverlayConfig>(bad)
                .expect_err(bad)
                .to_string();
            assert!(err.contains(says), "{err}");
        }
        let mut short = c.clone();
        short.overlays[0].prefix = 8;
        assert!(short
            .pools()
            .expect_err("prefix")
            .to_string()
            .contains("does not fit"));
        let mut oui = c.clone();
        oui.vtep_mac_oui = "70:B3".into();
        assert!(oui.pools().is_err());
        assert_eq!(
            c.vtep_mac(Ipv4Addr::new(44, 128, 0, 3)),
            [0x70, 0xB3, 0xD5, 0x80, 0, 3]
        );
    }

    #[test]
    fn master_state_in_dcos_shape() {
        let config = OverlayConfig::default();
        let mut replica = Replica::new();
        let mut version = 0;
        let mut put = |node: &str, key: &str, value: &str| {
            version += 1;
            replica.apply(&skein_state::Update {
                node: node.into(),
                generation: 1,
                key: key.into(),
                version,
                value: Some(value.into()),
            });
        };
        // n1: leased, not realized yet; n2: realized; n3: failed before
        // leasing; n4: configured differently; n5: nothing published.
        for (node, vtep, subnet) in [("n1", 1216, 54464), ("n2", 1, 2)] {
            put(node, CONFIG_KEY, &config.fingerprint());
            put(
                node,
                "lease:vtep",
                &format!(r#"{{"slot":{vtep},"since":1}}"#),
            );
            put(
                node,
                "lease:overlay/dcos",
                &format!(r#"{{"slot":{subnet},"since":1}}"#),
            );
        }
        put("n2", STATUS_KEY, "ok");
        put("n3", STATUS_KEY, "no VTEP");
        put("n4", CONFIG_KEY, "other");
        let ips: BTreeMap<String, IpAddr> = (1..=5)
            .map(|i| (format!("n{i}"), IpAddr::from([127, 0, 0, i])))
            .collect();
        let state = master_state(&config, &replica, &ips).expect("state");
        // Byte for byte what the API served when this was built with json!.
        assert_eq!(
            serde_json::to_string(&state.agents[0]).expect("json"),
            r#"{"ip":"127.0.0.1","node_id":"n1","overlays":[{"backend":{"vxlan":{"vni":1024,"vtep_ip":"44.128.4.192/20","vtep_mac":"70:B3:D5:80:04:C0","vtep_name":"vtep1024"}},"docker_bridge":{"ip":"9.212.192.129/25","name":"d-dcos"},"info":{"name":"dcos","prefix":24,"subnet":"9.0.0.0/8"},"mesos_bridge":{"ip":"9.212.192.1/25","name":"m-dcos"},"state":{"status":"STATUS_LEASED"},"subnet":"9.212.192.0/24"}],"state":{"status":"STATUS_LEASED"}}"#
        );
        assert_eq!(
            serde_json::to_string(&state.network).expect("json"),
            r#"{"overlays":[{"name":"dcos","prefix":24,"subnet":"9.0.0.0/8"}],"vtep_mac_oui":"70:B3:D5:00:00:00","vtep_mtu":1450,"vtep_subnet":"44.128.0.0/20"}"#
        );
        let statuses: Vec<(&str, OverlayStatus, Option<&str>, usize)> = state
            .agents
            .iter()
            .map(|a| {
                (
                    a.node_id.as_str(),
                    a.state.status,
                    a.state.error.as_deref(),
                    a.overlays.len(),
                )
            })
            .collect();
        assert_eq!(
            statuses,
            vec![
                ("n1", OverlayStatus::Leased, None, 1),
                ("n2", OverlayStatus::Ok, None, 1),
                ("n3", OverlayStatus::Error, Some("no VTEP"), 0),
                (
                    "n4",
                    OverlayStatus::ConfigMismatch,
                    Some(
                        "this agent's overlay configuration differs from the cluster's; \
                         its leases are ignored"
                    ),
                    0
                ),
                ("n5", OverlayStatus::Pending, None, 0),
            ]
        );
        assert_eq!(state.agents[1].overlays[0].state.status, OverlayStatus::Ok);
        assert_eq!(state.agents[1].overlays[0].subnet, "9.0.2.0/24");
    }

    #[test]
    fn overlapping_overlays_are_refused() {
        let mut c = OverlayConfig::default();
        assert!(c.pools().is_ok());
        c.overlays.push(OverlayNet {
            name: "other".into(),
            subnet: (Ipv4Addr::new(9, 1, 0, 0), 16),
            prefix: 24,
        });
        let err = c.pools().expect_err("overlap").to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    #[test]
    fn a_claim_settles_after_winning_for_the_period_in_a_synced_view() {
        let period = Duration::from_secs(2);
        let t0 = Instant::now();
        let claim = Claim {
            slot: 5,
            since: 10,
            settled: false,
        };
        let mut s = LeaseSettling::default();
        let pools = |c: Claim| BTreeMap::from([("vtep".to_string(), c)]);
        // Proposed, not yet published: waits.
        let mut desired = pools(claim);
        assert!(s.step(&mut desired, &BTreeMap::new(), true, t0, period));
        assert!(!desired["vtep"].settled);
        // Published and winning: settles once it has for the period.
        let published = pools(claim);
        assert!(s.step(&mut desired, &published, true, t0, period));
        assert!(s.step(&mut desired, &published, true, t0 + period / 2, period));
        assert!(!desired["vtep"].settled);
        // Unsynced (no peer's state yet): does not settle, does not wait on
        // time, and the hold starts over from the first synced view.
        assert!(!s.step(&mut desired, &published, false, t0 + period, period));
        assert!(!desired["vtep"].settled);
        assert!(s.step(&mut desired, &published, true, t0 + period * 2, period));
        assert!(!desired["vtep"].settled, "held unsynced: starts over");
        assert!(!s.step(&mut desired, &published, true, t0 + period * 3, period));
        assert!(desired["vtep"].settled);
        // A claim that moved starts over.
        let moved = Claim { slot: 6, ..claim };
        let mut desired = pools(moved);
        assert!(s.step(&mut desired, &published, true, t0 + period * 4, period));
        let mut desired = pools(moved);
        assert!(s.step(&mut desired, &pools(moved), true, t0 + period * 4, period));
        assert!(!desired["vtep"].settled);
        // Settled already: nothing waits.
        let mut desired = pools(Claim {
            settled: true,
            ..moved
        });
        assert!(!s.step(&mut desired, &pools(moved), true, t0, period));
    }
}
