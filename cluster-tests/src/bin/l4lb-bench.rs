//! The nftables VIP dataplane on the real kernel, in namespaces made here:
//!
//! 1. time to program 1,000 and 10,000 VIPs × 10 backends from empty (one
//!    atomic `nft -f` of the whole table, as at agent start-up);
//! 2. time to apply a change with 1,000 and with 10,000 VIPs present, each
//!    through `nft -f` (the text transaction) and through our netlink client
//!    (`skein_nftables`, the same change as element operations, one atomic
//!    batch), in the same namespace: one backend replaced, a new VIP with 10
//!    backends, 100 VIPs changed at once (median and p90 of 50 runs each);
//! 3. connections per second and throughput client → server directly and
//!    through a VIP (DNAT in the client's namespace), in the same run.
//!
//!   cargo build --release -p cluster-tests && target/release/l4lb-bench
//!
//! Reference figures (DESIGN.md): iptables took 1.3 s / 9.5 s to add one
//! rule at 1k / 10k services; IPVS ≈ 1 ms per change.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cluster_tests::{enter_netns, sh, ScratchNetns};
use skein_l4lb::nft::{ruleset, Service, Table, TABLE};
use skein_nftables::{ElementOp, Nftables};
use skein_state::Protocol;

/// Times one `nft -f` of `text` in `ns`.
fn timed_nft(ns: &ScratchNetns, text: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    ns.nft(text)?;
    Ok(start.elapsed())
}

/// Times one netlink batch of `ops` on our table.
fn timed_netlink(nl: &mut Nftables, ops: &[ElementOp]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    nl.apply(TABLE, ops)?;
    Ok(start.elapsed())
}

fn services(n: usize, backends: usize) -> Vec<Service> {
    (0..n)
        .map(|i| Service {
            address: Ipv4Addr::from(u32::from(Ipv4Addr::new(11, 0, 0, 1)) + i as u32),
            protocol: Protocol::Tcp,
            port: 80,
            backends: (0..backends)
                .map(|b| {
                    (
                        Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1),
                        8000 + b as u16,
                    )
                })
                .collect(),
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Median and 90th percentile of `runs` timings of `f`.
fn stats(
    runs: usize,
    mut f: impl FnMut(usize) -> anyhow::Result<Duration>,
) -> anyhow::Result<(Duration, Duration)> {
    let mut v: Vec<Duration> = (0..runs).map(&mut f).collect::<anyhow::Result<_>>()?;
    v.sort();
    Ok((v[v.len() / 2], v[v.len() * 9 / 10]))
}

const RUNS: usize = 50;

/// One shape of change, `from` → `to` and back, measured both ways in the
/// same namespace: `nft -f` of the text transaction, then the same change
/// as one netlink batch. Runs alternate there and back (an even number, so
/// the table ends where it began).
fn shape(
    ns: &ScratchNetns,
    nl: &mut Nftables,
    what: &str,
    from: &[Service],
    to: &[Service],
) -> anyhow::Result<()> {
    let mut a = Table::new(from);
    let there = a.plan(to).context("a change")?;
    let back = a.plan(from).context("a change")?;
    anyhow::ensure!(there.elements_only() && back.elements_only());
    let (nft_med, nft_p90) = stats(RUNS, |i| {
        timed_nft(ns, if i % 2 == 0 { &there.text } else { &back.text })
    })?;
    let (nl_med, nl_p90) = stats(RUNS, |i| {
        timed_netlink(
            nl,
            if i % 2 == 0 {
                &there.elements
            } else {
                &back.elements
            },
        )
    })?;
    // What the agent computes before applying: the plan, pure.
    let mut t = Table::new(from);
    let (plan_med, _) = stats(10, |i| {
        let start = Instant::now();
        let change = t.plan(if i % 2 == 0 { to } else { from });
        let took = start.elapsed();
        anyhow::ensure!(change.is_some());
        Ok(took)
    })?;
    println!(
        "    {what:<26} {:>4} ops | nft -f median {:>10} p90 {:>10} | netlink median {:>8} p90 {:>8} | nft/netlink {:>6.0}x | Table::plan {}",
        there.elements.len(),
        ms(nft_med),
        ms(nft_p90),
        ms(nl_med),
        ms(nl_p90),
        nft_med.as_secs_f64() / nl_med.as_secs_f64(),
        ms(plan_med),
    );
    Ok(())
}

fn programming() -> anyhow::Result<()> {
    println!("== rule programming (nftables, real kernel, one namespace per size)");
    println!("   each change: median and p90 of {RUNS} runs per path, alternating there and back");
    for n in [1_000usize, 10_000] {
        let ns = ScratchNetns::new(&format!("p{n}"))?;
        let table = services(n, 10);
        let text = ruleset(&table);
        let full = timed_nft(&ns, &text)?;
        println!(
            "  {n:>6} VIPs x 10 backends: whole table from empty, one `nft -f` {:>10} ({} lines)",
            ms(full),
            text.lines().count(),
        );
        // The same from empty in two steps: the table without elements by
        // `nft -f`, then every element in one netlink batch.
        let fresh = ScratchNetns::new(&format!("e{n}"))?;
        let whole = Table::new(&table);
        let start = Instant::now();
        fresh.nft(&whole.skeleton())?;
        let skeleton = start.elapsed();
        let mut nl_fresh = Nftables::open_in_netns(Path::new(&format!("/run/netns/{}", fresh.0)))?;
        let all = whole.elements();
        let start = Instant::now();
        nl_fresh.apply(TABLE, &all)?;
        let fill = start.elapsed();
        println!(
            "         from empty in two steps: `nft -f` of the empty table {} + {} elements by netlink {} = {}",
            ms(skeleton),
            all.len(),
            ms(fill),
            ms(skeleton + fill)
        );
        // Rewriting every element of the existing table at once, atomically
        // (drift repair without `nft -f`): flush every set, add everything.
        let refill = whole.refill();
        let (refill_med, refill_p90) = stats(5, |_| timed_netlink(&mut nl_fresh, &refill))?;
        println!(
            "         every element rewritten in place by one netlink batch (flush + {} elements): median {} p90 {} of 5",
            all.len(),
            ms(refill_med),
            ms(refill_p90)
        );
        drop(nl_fresh);
        drop(fresh);

        let mut nl = Nftables::open_in_netns(Path::new(&format!("/run/netns/{}", ns.0)))?;
        // One backend of one VIP replaced.
        let mut changed = table.clone();
        changed[n / 2].backends[3].1 = 9999;
        shape(&ns, &mut nl, "one backend change", &table, &changed)?;
        // A new VIP with 10 backends.
        let mut added = table.clone();
        let mut extra = services(n + 1, 10).pop().context("a VIP")?;
        extra.address = Ipv4Addr::new(12, 0, 0, 1);
        added.push(extra);
        shape(&ns, &mut nl, "new VIP with 10 backends", &table, &added)?;
        // 100 VIPs with one backend replaced each.
        let mut hundred = table.clone();
        for s in hundred.iter_mut().step_by(n / 100) {
            s.backends[3].1 = 9999;
        }
        shape(&ns, &mut nl, "100 VIPs changed at once", &table, &hundred)?;
        let iptables = if n == 1_000 { 1.3 } else { 9.5 };
        println!("         (iptables adding one rule at {n} services: {iptables} s; IPVS ~1 ms per change)");
    }
    println!("  (an `nft -f` change is mostly starting the process and its cache reads; the netlink batch is the kernel's work and one round trip)");
    Ok(())
}

/// Client namespace with the VIP rules, server namespace with a sink,
/// joined by a veth pair.
fn datapath() -> anyhow::Result<()> {
    println!(
        "\n== data path: client → server directly vs through a VIP (same run, same namespaces)"
    );
    let client = ScratchNetns::new("c")?;
    let server = ScratchNetns::new("s")?;
    let (a, b) = (format!("{}a", client.0), format!("{}b", client.0));
    sh(&[
        "ip", "link", "add", &a, "netns", &client.0, "type", "veth", "peer", "name", &b, "netns",
        &server.0,
    ])?;
    sh(&[
        "ip",
        "-n",
        &client.0,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        &a,
    ])?;
    sh(&[
        "ip",
        "-n",
        &server.0,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        &b,
    ])?;
    sh(&["ip", "-n", &client.0, "link", "set", &a, "up"])?;
    sh(&["ip", "-n", &server.0, "link", "set", &b, "up"])?;
    sh(&["ip", "-n", &client.0, "route", "add", "default", "dev", &a])?;
    let vip = Service {
        address: Ipv4Addr::new(11, 9, 9, 9),
        protocol: Protocol::Tcp,
        port: 3141,
        backends: vec![(Ipv4Addr::new(10, 99, 0, 2), 9000)],
    };
    client.nft(&ruleset(&[vip]))?;

    // The sink: reads everything, answers one byte per connection.
    let server_ns = server.0.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || -> anyhow::Result<()> {
        enter_netns(&server_ns)?;
        let listener = TcpListener::bind("10.99.0.2:9000")?;
        let _ = ready_tx.send(());
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) if n > 0 && buf[n - 1] == b'\n' => {
                            let _ = s.write_all(b"k");
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("sink did not start")?;

    let client_ns = client.0.clone();
    let result = std::thread::spawn(move || -> anyhow::Result<()> {
        enter_netns(&client_ns)?;
        let direct: SocketAddr = "10.99.0.2:9000".parse()?;
        let via: SocketAddr = "11.9.9.9:3141".parse()?;
        let conns = |to: SocketAddr, n: usize| -> anyhow::Result<f64> {
            let start = Instant::now();
            for _ in 0..n {
                let mut s = TcpStream::connect(to)?;
                s.write_all(b"x\n")?;
                let mut k = [0u8; 1];
                s.read_exact(&mut k)?;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        };
        let throughput = |to: SocketAddr, bytes: usize| -> anyhow::Result<f64> {
            let mut s = TcpStream::connect(to)?;
            let chunk = vec![7u8; 256 * 1024];
            let start = Instant::now();
            let mut sent = 0;
            while sent < bytes {
                s.write_all(&chunk)?;
                sent += chunk.len();
            }
            s.write_all(b"\n")?;
            let mut k = [0u8; 1];
            s.read_exact(&mut k)?;
            Ok(sent as f64 / start.elapsed().as_secs_f64() / 1e6)
        };
        // Warm up both paths, then alternate so drift hits both alike.
        conns(direct, 200)?;
        conns(via, 200)?;
        let (mut cd, mut cv, mut td, mut tv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            cd.push(conns(direct, 2000)?);
            cv.push(conns(via, 2000)?);
            td.push(throughput(direct, 1 << 30)?);
            tv.push(throughput(via, 1 << 30)?);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (cd, cv, td, tv) = (med(&mut cd), med(&mut cv), med(&mut td), med(&mut tv));
        println!("  connections/s (connect, 2 bytes, 1-byte answer, close; median of 5 × 2000):");
        println!(
            "    direct {cd:>9.0}/s   via VIP {cv:>9.0}/s   ratio VIP/direct {:.3} (target ≥ 0.9)",
            cv / cd
        );
        println!("  throughput, one connection, 1 GiB (median of 5):");
        println!("    direct {td:>7.0} MB/s  via VIP {tv:>7.0} MB/s  ratio VIP/direct {:.3} (target ≥ 0.9)", tv / td);
        Ok(())
    });
    result
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    cluster_tests::require_root();
    programming()?;
    datapath()?;
    Ok(())
}
