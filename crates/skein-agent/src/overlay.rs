//! This node's part in overlay leases: claim an agent subnet per overlay
//! and a VTEP address (persisted, so a restart keeps them), and describe
//! every agent's leases in DC/OS's `/overlay-master/state` shape.
//! Realizing them (VXLAN device, routes, neighbours, FDB, bridges) is the
//! next step; until then `state.status` says so.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{json, Value};
use skein_overlay::lease::{propose, resolve};
use skein_overlay::{vtep_mac, Claim, Pool};
use skein_state::Replica;

/// Prefix of lease claim keys: `lease:<pool>` where pool is `vtep` or
/// `overlay/<name>`.
pub const LEASE_PREFIX: &str = "lease:";
pub const VTEP_POOL: &str = "vtep";

/// The overlay configuration, identical on every node (DC/OS's defaults).
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    pub vtep_subnet: (Ipv4Addr, u8),
    pub vtep_mac_oui: String,
    pub overlays: Vec<OverlayNet>,
}

#[derive(Debug, Clone)]
pub struct OverlayNet {
    pub name: String,
    pub subnet: (Ipv4Addr, u8),
    pub prefix: u8,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            vtep_subnet: (Ipv4Addr::new(44, 128, 0, 0), 20),
            vtep_mac_oui: "70:B3:D5:00:00:00".to_string(),
            overlays: vec![OverlayNet {
                name: "dcos".to_string(),
                subnet: (Ipv4Addr::new(9, 0, 0, 0), 8),
                prefix: 24,
            }],
        }
    }
}

impl OverlayConfig {
    /// Every pool by name, or a clear error for a configuration that
    /// cannot work (overlapping or malformed subnets).
    pub fn pools(&self) -> anyhow::Result<Vec<(String, Pool)>> {
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

/// Claims of one pool across the replica: node → claim.
pub fn claims(replica: &Replica, pool: &str) -> BTreeMap<String, Claim> {
    let key = format!("{LEASE_PREFIX}{pool}");
    replica
        .nodes()
        .iter()
        .filter_map(|(node, ks)| {
            let claim = serde_json::from_str(ks.get(&key)?).ok()?;
            Some((node.clone(), claim))
        })
        .collect()
}

/// What this node should claim in every pool, given the replica.
pub fn desired(
    config: &OverlayConfig,
    replica: &Replica,
    me: &str,
    now_ms: u64,
) -> anyhow::Result<BTreeMap<String, Claim>> {
    let mut out = BTreeMap::new();
    for (name, pool) in config.pools()? {
        let claim = propose(&pool, me, &claims(replica, &name), now_ms)
            .map_err(|e| anyhow::anyhow!("overlay pool {name}: {e}"))?;
        out.insert(name, claim);
    }
    Ok(out)
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// DC/OS's `/overlay-master/state` from the replica.
pub fn master_state(
    config: &OverlayConfig,
    replica: &Replica,
    agent_ips: &BTreeMap<String, IpAddr>,
) -> anyhow::Result<Value> {
    let pools = config.pools()?;
    let leases: BTreeMap<String, BTreeMap<String, u32>> = pools
        .iter()
        .map(|(name, pool)| (name.clone(), resolve(pool, &claims(replica, name))))
        .collect();
    let vtep_pool = pools[0].1;
    let mut agents = Vec::new();
    for (node, ip) in agent_ips {
        let Some(vtep_slot) = leases.get(VTEP_POOL).and_then(|l| l.get(node)) else {
            continue;
        };
        let vtep_ip = vtep_pool.address(*vtep_slot);
        let overlays: Vec<Value> = config
            .overlays
            .iter()
            .zip(&pools[1..])
            .filter_map(|(o, (name, pool))| {
                let slot = leases.get(name)?.get(node)?;
                let subnet = pool.address(*slot);
                let half = pool.size / 2;
                let gw = |offset: u32| Ipv4Addr::from(u32::from(subnet) + offset + 1);
                Some(json!({
                    "info": {"name": o.name, "subnet": format!("{}/{}", o.subnet.0, o.subnet.1), "prefix": o.prefix},
                    "subnet": format!("{subnet}/{}", o.prefix),
                    "mesos_bridge": {"name": format!("m-{}", o.name), "ip": format!("{}/{}", gw(0), o.prefix + 1)},
                    "docker_bridge": {"name": format!("d-{}", o.name), "ip": format!("{}/{}", gw(half), o.prefix + 1)},
                    "backend": {"vxlan": {
                        "vni": 1024,
                        "vtep_name": "vtep1024",
                        "vtep_ip": format!("{vtep_ip}/{}", config.vtep_subnet.1),
                        "vtep_mac": mac_string(vtep_mac(vtep_ip)),
                    }},
                    // Leased, not yet programmed into the kernel: DC/OS
                    // reported STATUS_OK only once the overlay was realized.
                    "state": {"status": "STATUS_LEASED"},
                }))
            })
            .collect();
        agents.push(json!({"ip": ip.to_string(), "node_id": node, "overlays": overlays}));
    }
    Ok(json!({
        "network": {
            "vtep_subnet": format!("{}/{}", config.vtep_subnet.0, config.vtep_subnet.1),
            "vtep_mac_oui": config.vtep_mac_oui,
            "overlays": config.overlays.iter().map(|o| json!({
                "name": o.name,
                "subnet": format!("{}/{}", o.subnet.0, o.subnet.1),
                "prefix": o.prefix,
            })).collect::<Vec<_>>(),
        },
        "agents": agents,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
