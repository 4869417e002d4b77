//! Realizes VIPs in this node's kernel: the desired nftables table is
//! computed from the replica (pure, `skein_l4lb::nft`), compared with what
//! was last applied, and replaced atomically when it differs. Every resync
//! period the kernel's actual table is compared with what we applied, so a
//! table deleted or edited behind our back is repaired.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::Agent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    Nftables,
    Ipvs,
    /// Compute and expose VIPs, change nothing in the kernel.
    None,
}

impl Dataplane {
    /// `auto` picks IPVS where the kernel has it (as DC/OS did), else
    /// nftables.
    pub fn parse(s: &str) -> anyhow::Result<Dataplane> {
        match s {
            "auto" if std::path::Path::new("/proc/net/ip_vs").exists() => Ok(Dataplane::Ipvs),
            "auto" | "nftables" => Ok(Dataplane::Nftables),
            "ipvs" => Ok(Dataplane::Ipvs),
            "none" => Ok(Dataplane::None),
            other => bail!("--l4lb-dataplane must be auto, nftables, ipvs or none, not {other:?}"),
        }
    }
}

#[derive(Default)]
pub struct L4lbCounters {
    pub applies: AtomicU64,
    pub apply_errors: AtomicU64,
    pub drift_repaired: AtomicU64,
    pub last_reconcile_us: AtomicU64,
    pub services: AtomicU64,
    pub backends: AtomicU64,
}

pub(crate) fn nft(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `nft` (is nftables installed?)")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn list_table() -> Option<String> {
    nft(&["list", "table", "ip", skein_l4lb::nft::TABLE], None).ok()
}

/// What the realizer believes the kernel holds.
struct Programmed {
    table: skein_l4lb::nft::Table,
    /// The kernel's listing of our table, the drift reference; `None` after
    /// an incremental change until the next resync takes a fresh one (so a
    /// change costs O(changed), and listing the table only happens per
    /// resync period).
    listing: Option<String>,
}

async fn apply(text: String) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || nft(&["-f", "-"], Some(&text)).map(|_| ()))
        .await
        .context("nft task failed")?
}

async fn listing() -> Option<String> {
    tokio::task::spawn_blocking(list_table).await.ok().flatten()
}

/// Runs until the agent is dropped. `changes` ticks whenever the replica
/// snapshot was refreshed. The whole table is written at start-up and when
/// drift is found; otherwise each change is one transaction of what changed.
pub async fn run(agent: Weak<Agent>, changes: tokio::sync::watch::Receiver<u64>, resync: Duration) {
    // After a restart the kernel still holds the previous agent's rules,
    // which keep serving. Do not replace them before VIP addresses have had
    // time to settle again, or the first rewrite would drop every VIP.
    let warm_up = crate::vips::SETTLE + Duration::from_secs(1);
    if let Some(agent) = agent.upgrade() {
        let wait = warm_up.saturating_sub(agent.uptime());
        drop(agent);
        tokio::time::sleep(wait).await;
    }
    let mut programmed: Option<Programmed> = None;
    let mut wakeups = crate::wakeups::Wakeups::new(changes, resync);
    loop {
        let Some(resyncing) = wakeups.next().await else {
            return;
        };
        let Some(agent) = agent.upgrade() else { return };
        let started = Instant::now();
        let (vips, _) = agent.vips();
        let services = skein_l4lb::nft::services(vips.iter().map(|v| {
            let backends = v
                .backend
                .iter()
                .filter(|b| b.in_use)
                .map(|b| (b.ip, b.port))
                .collect();
            (v.address, v.protocol, v.port, backends)
        }));
        let counters = &agent.l4lb_counters;
        counters
            .services
            .store(services.len() as u64, Ordering::Relaxed);
        counters.backends.store(
            services.iter().map(|s| s.backends.len() as u64).sum(),
            Ordering::Relaxed,
        );
        if resyncing {
            if let Some(p) = programmed.as_mut() {
                let now = listing().await;
                match &p.listing {
                    // First look since an incremental change: the reference.
                    None if now.is_some() => p.listing = now,
                    // Our table is gone, or not what we left.
                    _ if now.is_none() || now != p.listing => {
                        tracing::warn!(
                            "nftables table {} changed behind our back; repairing",
                            skein_l4lb::nft::TABLE
                        );
                        counters.drift_repaired.fetch_add(1, Ordering::Relaxed);
                        programmed = None;
                    }
                    _ => {}
                }
            }
        }
        // An incremental update moves `table` before the kernel confirms;
        // on failure it is dropped and the next round rewrites everything.
        let (table, text, full) = match programmed.take() {
            None => {
                let table = skein_l4lb::nft::Table::new(&services);
                let text = table.ruleset();
                (table, text, true)
            }
            Some(mut p) => match p.table.update(&services) {
                Some(tx) => (p.table, tx, false),
                None => {
                    programmed = Some(p);
                    continue;
                }
            },
        };
        match apply(text).await {
            Ok(()) => {
                counters.applies.fetch_add(1, Ordering::Relaxed);
                let listing = if full { listing().await } else { None };
                tracing::info!(
                    services = services.len(),
                    full,
                    took_ms = started.elapsed().as_millis() as u64,
                    "nftables VIP rules applied"
                );
                programmed = Some(Programmed { table, listing });
            }
            Err(e) => {
                counters.apply_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), "cannot apply nftables VIP rules; rewriting the table next");
                programmed = None;
            }
        }
        counters
            .last_reconcile_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}
