//! The overlay on the real kernel, in namespaces made here:
//!
//! 1. time to program a node that has 1,000 remote peers from empty (3,000
//!    entries: neighbour, FDB, route each), through the agent's own netlink
//!    code, and one peer's change among 1,000; compared in the same run with
//!    iproute2 (`ip -batch` + `bridge -batch`) programming the same entries;
//! 2. TCP throughput container → container across two nodes over the
//!    overlay (real agents, containers attached with `skein-cni`) vs node →
//!    node on the underlay, with iperf3 (Debian's), same run. Target ≥ 0.8.
//!
//!   apt-get install iperf3
//!   cargo build --release -p skein -p skein-cni -p cluster-tests
//!   target/release/overlay-bench [--peers 1000] [--seconds 5]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_tests::{enter_netns, pipe_in, sh, spawn_in, wait_for, Cluster, ScratchNetns};
use skein_agent::vxlan::{LocalOverlay, Netlink};
use skein_overlay::realize::{plan, Entries, RemoteAgent};
use skein_overlay::vtep_mac;

fn peers(n: usize) -> Vec<RemoteAgent> {
    (0..n)
        .map(|i| {
            let i = i as u32 + 2;
            let vtep_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(44, 128, 0, 0)) + i);
            RemoteAgent {
                underlay: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i),
                vtep_ip,
                vtep_mac: vtep_mac(vtep_ip),
                subnets: vec![(
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(9, 0, 0, 0)) + (i << 8)),
                    24,
                )],
            }
        })
        .collect()
}

fn local() -> LocalOverlay {
    let vtep_ip = Ipv4Addr::new(44, 128, 0, 1);
    LocalOverlay {
        underlay: Ipv4Addr::new(10, 200, 0, 1),
        vtep_ip,
        vtep_prefix: 20,
        vtep_mac: vtep_mac(vtep_ip),
        vtep_mtu: 1450,
        bridges: vec![],
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn batch(ns: &str, tool: &str, text: &str) -> anyhow::Result<()> {
    pipe_in(ns, &[tool, "-batch", "-"], text)
}

fn iproute_program(ns: &str, entries: &Entries) -> anyhow::Result<Duration> {
    let mut ip = String::new();
    let mut bridge = String::new();
    for (addr, m) in &entries.neighbours {
        ip += &format!(
            "neigh replace {addr} lladdr {} dev vtep1024 nud permanent\n",
            mac(*m)
        );
    }
    for (m, dst) in &entries.fdb {
        bridge += &format!(
            "fdb replace {} dev vtep1024 dst {dst} self permanent\n",
            mac(*m)
        );
    }
    for ((net, len), via) in &entries.routes {
        ip += &format!("route replace {net}/{len} via {via} dev vtep1024 onlink proto 83\n");
    }
    let start = Instant::now();
    batch(ns, "bridge", &bridge)?;
    batch(ns, "ip", &ip)?;
    Ok(start.elapsed())
}

fn programming(n: usize) -> anyhow::Result<()> {
    println!("== programming {n} remote peers ({} entries) into vtep1024 (real kernel, fresh namespaces)", 3 * n);
    let ours_ns = ScratchNetns::new("ob")?;
    let theirs_ns = ScratchNetns::new("oi")?;
    let all = peers(n);
    let desired = Entries::desired(&all);
    let mut moved_peers = all.clone();
    moved_peers[n / 2].underlay = Ipv4Addr::new(10, 201, 0, 1);
    let moved = Entries::desired(&moved_peers);

    // Ours: the agent's netlink code, on a thread inside the namespace.
    let ns = ours_ns.0.clone();
    let (desired_for_us, desired) = (desired.clone(), desired);
    let (full, one, back) =
        std::thread::spawn(move || -> anyhow::Result<(Duration, Duration, Duration)> {
            enter_netns(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let nl = Netlink::new()?;
                let index = nl.ensure_vtep(&local()).await?;
                let start = Instant::now();
                let current = nl.entries(index).await?;
                let changes = plan(&current, &desired_for_us);
                nl.apply(index, &changes).await.map_err(|(_, e)| e)?;
                let full = start.elapsed();
                let check = nl.entries(index).await?;
                if check != desired_for_us {
                    bail!(
                    "the kernel does not hold what was programmed: neighbours {}/{}, fdb {}/{}, routes {}/{}",
                    check.neighbours.len(),
                    desired_for_us.neighbours.len(),
                    check.fdb.len(),
                    desired_for_us.fdb.len(),
                    check.routes.len(),
                    desired_for_us.routes.len()
                );
                }
                let start = Instant::now();
                let changes = plan(&desired_for_us, &moved);
                nl.apply(index, &changes).await.map_err(|(_, e)| e)?;
                let one = start.elapsed();
                let start = Instant::now();
                let changes = plan(&moved, &desired_for_us);
                nl.apply(index, &changes).await.map_err(|(_, e)| e)?;
                Ok((full, one, start.elapsed()))
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;

    // iproute2: one `bridge -batch` and one `ip -batch` process.
    sh(&[
        "ip",
        "-n",
        &theirs_ns.0,
        "link",
        "add",
        "vtep1024",
        "type",
        "vxlan",
        "id",
        "1024",
        "local",
        "10.200.0.1",
        "dstport",
        "64000",
        "nolearning",
    ])?;
    sh(&["ip", "-n", &theirs_ns.0, "link", "set", "vtep1024", "up"])?;
    sh(&[
        "ip",
        "-n",
        &theirs_ns.0,
        "addr",
        "add",
        "44.128.0.1/20",
        "dev",
        "vtep1024",
    ])?;
    let theirs = iproute_program(&theirs_ns.0, &desired)?;
    let mut one_entries = Entries::default();
    let p = &moved_peers[n / 2];
    one_entries.fdb.insert(p.vtep_mac, p.underlay);
    let theirs_one = iproute_program(&theirs_ns.0, &one_entries)?;

    println!(
        "  from empty: skein {:.1} ms vs iproute2 batch {:.1} ms → ratio {:.2} (lower is better for skein)",
        full.as_secs_f64() * 1e3,
        theirs.as_secs_f64() * 1e3,
        full.as_secs_f64() / theirs.as_secs_f64()
    );
    println!(
        "  one peer's change among {n}: skein {:.2} ms (and back {:.2} ms) vs iproute2 {:.2} ms (a process per change) → ratio {:.2}",
        one.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3,
        theirs_one.as_secs_f64() * 1e3,
        one.as_secs_f64() / theirs_one.as_secs_f64()
    );
    Ok(())
}

/// iperf3 client in `from` against a server at `ip` (in `server_ns`):
/// bits per second received.
fn iperf(server_ns: &str, from: &str, ip: &str, seconds: u32) -> anyhow::Result<f64> {
    let _server = spawn_in(server_ns, "iperf3", &["-s", "-B", ip, "-1"])?;
    let t = seconds.to_string();
    // Until the server listens, iperf3 -J reports the refusal in its JSON.
    let v = wait_for("iperf3 client run", Duration::from_secs(30), || {
        let out = sh(&[
            "ip", "netns", "exec", from, "iperf3", "-c", ip, "-t", &t, "-J",
        ]);
        let v: Option<serde_json::Value> = out
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok());
        Ok(v.filter(|v| v["error"].is_null()))
    })?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 gave no result")
}

fn throughput(seconds: u32) -> anyhow::Result<()> {
    println!("\n== TCP throughput, container → container across nodes over VXLAN vs node → node (iperf3, same run)");
    let mut c = Cluster::new(2)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    wait_for("both overlays realized", Duration::from_secs(30), || {
        let state = c.get(1, "/overlay-master/state")?;
        let ok = state["agents"].as_array().is_some_and(|a| {
            a.len() == 2
                && a.iter()
                    .all(|x| x["overlays"][0]["state"]["status"] == "STATUS_OK")
        });
        Ok(ok.then_some(()))
    })?;
    let c1 = ScratchNetns::new("bc1")?;
    let c2 = ScratchNetns::new("bc2")?;
    let ip1 = c.attach(1, "bench-1", &c1)?;
    let ip2 = c.attach(2, "bench-2", &c2)?;
    // A second container on node 1: the same veth + bridge hops without
    // VXLAN, to tell the tunnel's cost from the container plumbing's.
    // Node 1 → node 2's VTEP address: the kernel's VXLAN alone, no
    // container plumbing: the ceiling for the overlay on this machine.
    let state = c.get(1, "/overlay-master/state")?;
    let vtep2 = state["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["node_id"] == "node2"))
        .and_then(|x| x["overlays"][0]["backend"]["vxlan"]["vtep_ip"].as_str())
        .and_then(|ip| ip.split('/').next())
        .context("node2's VTEP IP")?
        .to_string();
    let c1b = ScratchNetns::new("bc3")?;
    let ip1b = c.attach(1, "bench-3", &c1b)?;
    let _ = ip1;
    let mut runs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..3 {
        runs.entry("underlay").or_default().push(iperf(
            &c.node(2).netns,
            &c.node(1).netns,
            &c.node(2).ip,
            seconds,
        )?);
        runs.entry("overlay")
            .or_default()
            .push(iperf(&c2.0, &c1.0, &ip2, seconds)?);
        runs.entry("bridge")
            .or_default()
            .push(iperf(&c1b.0, &c1.0, &ip1b, seconds)?);
        runs.entry("vtep").or_default().push(iperf(
            &c.node(2).netns,
            &c.node(1).netns,
            &vtep2,
            seconds,
        )?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let under = median(runs.get_mut("underlay").context("runs")?);
    let over = median(runs.get_mut("overlay").context("runs")?);
    println!(
        "  underlay node1 → node2: {:.2} Gbit/s; overlay container@node1 → container@node2: {:.2} Gbit/s (median of 3 × {seconds} s)",
        under / 1e9,
        over / 1e9
    );
    let bridge = median(runs.get_mut("bridge").context("runs")?);
    let vtep = median(runs.get_mut("vtep").context("runs")?);
    println!(
        "  ratio overlay/underlay {:.2} (target ≥ 0.8)",
        over / under
    );
    println!(
        "  for scale: container → container on the same node (veth + bridge, no VXLAN): {:.2} Gbit/s, {:.2} of the underlay",
        bridge / 1e9,
        bridge / under
    );
    println!(
        "  for scale: node1 → node2's VTEP address (the kernel's VXLAN alone): {:.2} Gbit/s, {:.2} of the underlay; the overlay reaches {:.2} of that",
        vtep / 1e9,
        vtep / under,
        over / vtep
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: u32| -> u32 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    programming(value("--peers", 1000) as usize)?;
    throughput(value("--seconds", 5))?;
    Ok(())
}
