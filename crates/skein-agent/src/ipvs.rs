//! The IPVS dataplane, as dcos-net's Minuteman did it: every VIP address on
//! a `minuteman` dummy link, an IPVS service per VIP (wlc, masquerading) with
//! the backends as destinations; unhealthy backends stay with weight 0 (no
//! new connections, established ones kept). Reconciled against the kernel's
//! table over generic netlink (`skein-ipvs`). Only services on addresses of
//! the `minuteman` link (or wanted now) are ours: other IPVS services on the
//! host are left alone.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use skein_ipvs::{Destination, Ipvs, Protocol, Service, Table};

use crate::Agent;

pub const LINK: &str = "minuteman";

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 addresses on the `minuteman` link, creating the link if needed.
fn link_addresses() -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    if ip(&["link", "show", LINK]).is_err() {
        ip(&["link", "add", LINK, "type", "dummy"])?;
        tracing::info!(link = LINK, "created the VIP link");
    }
    ip(&["link", "set", LINK, "up"])?;
    let text = ip(&["-o", "-4", "addr", "show", "dev", LINK])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect())
}

/// Puts exactly `wanted` on the link; returns what was there before.
fn sync_link(wanted: &BTreeSet<Ipv4Addr>) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let have = link_addresses()?;
    for a in wanted.difference(&have) {
        ip(&["addr", "add", &format!("{a}/32"), "dev", LINK])?;
    }
    for a in have.difference(wanted) {
        ip(&["addr", "del", &format!("{a}/32"), "dev", LINK])?;
    }
    Ok(have)
}

/// The desired IPVS table from the agent's VIPs.
fn desired(agent: &Agent) -> Table {
    let (vips, _) = agent.vips();
    let mut table: Table = Vec::new();
    for v in &vips {
        let Some(IpAddr::V4(addr)) = v.address else {
            continue;
        };
        let protocol = match v.protocol {
            skein_state::Protocol::Tcp => Protocol::Tcp,
            skein_state::Protocol::Udp => Protocol::Udp,
        };
        let mut dests: Vec<Destination> = v
            .backend
            .iter()
            // Down nodes' backends go; unhealthy ones drain at weight 0.
            .filter(|b| b.in_use || (b.node_status != skein_state::NodeStatus::Down && !b.healthy))
            .map(|b| Destination {
                addr: b.ip,
                port: b.port,
                weight: u32::from(b.in_use),
            })
            .collect();
        dests.sort_by_key(|d| (d.addr, d.port));
        dests.dedup_by_key(|d| (d.addr, d.port));
        table.push((Service::new(IpAddr::V4(addr), v.port, protocol), dests));
    }
    table
}

fn reconcile(ipvs: &mut Ipvs, agent: &Agent) -> anyhow::Result<usize> {
    let want = desired(agent);
    let wanted_addrs: BTreeSet<Ipv4Addr> = want
        .iter()
        .filter_map(|(s, _)| match s.addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let previously = sync_link(&wanted_addrs)?;
    let owned: BTreeSet<IpAddr> = previously
        .union(&wanted_addrs)
        .map(|a| IpAddr::V4(*a))
        .collect();
    let actual: Table = ipvs
        .table()?
        .into_iter()
        .filter(|(s, _)| owned.contains(&s.addr))
        .collect();
    let ops = skein_ipvs::diff(&want, &actual);
    for op in &ops {
        ipvs.apply(op)?;
    }
    agent
        .l4lb_counters
        .services
        .store(want.len() as u64, Ordering::Relaxed);
    agent.l4lb_counters.backends.store(
        want.iter().map(|(_, d)| d.len() as u64).sum(),
        Ordering::Relaxed,
    );
    Ok(ops.len())
}

/// Runs until the agent is dropped: on every refresh and every resync
/// period, brings the kernel's IPVS table and the VIP link to the desired
/// state (each run reads the kernel, so drift is repaired on the next one).
pub async fn run(agent: Weak<Agent>, changes: tokio::sync::watch::Receiver<u64>, resync: Duration) {
    // As with nftables: let addresses settle after a restart before
    // touching what the previous agent programmed.
    let warm_up = crate::vips::SETTLE + Duration::from_secs(1);
    if let Some(agent) = agent.upgrade() {
        let wait = warm_up.saturating_sub(agent.uptime());
        drop(agent);
        tokio::time::sleep(wait).await;
    }
    let mut wakeups = crate::wakeups::Wakeups::new(changes, resync);
    let mut ipvs: Option<Ipvs> = None;
    loop {
        let Some(resyncing) = wakeups.next().await else {
            return;
        };
        let Some(agent) = agent.upgrade() else { return };
        if ipvs.is_none() {
            match Ipvs::open() {
                Ok(handle) => ipvs = Some(handle),
                Err(e) => {
                    agent
                        .l4lb_counters
                        .apply_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if resyncing {
                        tracing::error!(error = %e, "IPVS unavailable; VIPs are not programmed");
                    }
                    continue;
                }
            }
        }
        let Some(handle) = ipvs.as_mut() else {
            continue;
        };
        let started = Instant::now();
        // Netlink and `ip` calls block: keep them off the async workers.
        let result = tokio::task::block_in_place(|| reconcile(handle, &agent));
        match result {
            Ok(0) => {}
            Ok(n) => {
                let counters = &agent.l4lb_counters;
                counters.applies.fetch_add(1, Ordering::Relaxed);
                if resyncing {
                    counters.drift_repaired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(changes = n, "IPVS table repaired");
                }
                counters
                    .last_reconcile_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                tracing::info!(
                    changes = n,
                    took_ms = started.elapsed().as_millis() as u64,
                    "IPVS VIP rules applied"
                );
            }
            Err(e) => {
                agent
                    .l4lb_counters
                    .apply_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), "cannot program IPVS; retrying");
                ipvs = None; // reopen: the socket may be what broke
            }
        }
    }
}
