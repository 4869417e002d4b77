//! Propagation and failure detection on a real cluster: N agents in N
//! network namespaces on one bridge, real QUIC gossip, measured through each
//! node's HTTP API from inside the switch namespace.
//!
//!   cargo build --release -p skein -p cluster-tests
//!   SKEIN_BIN=target/release/skein target/release/netns-bench --nodes 5 --writes 100
//!   SKEIN_BIN=target/release/skein target/release/netns-bench --nodes 25 --writes 50
//!
//! Prints write→visible-on-every-node p50/p99, kill→down-everywhere times,
//! idle traffic per node (counted on each node's interface, and from its
//! /metrics) and agent RSS, next to what `skein-sim` computes for the same
//! number of nodes in the same run, and the figures DC/OS's stack and Serf
//! are known for.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_tests::{enter_netns, wait_for, Cluster};

struct Args {
    nodes: usize,
    writes: usize,
    kills: usize,
    interval_ms: u64,
    /// Percent of gossip packets each node drops on input (nftables).
    loss_pct: usize,
    /// Seconds of idle soak under loss, counting false `down`/`suspect`.
    soak_s: usize,
    /// Seconds of idle traffic measured per node.
    idle_s: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 5,
        writes: 100,
        kills: 3,
        interval_ms: 200,
        loss_pct: 0,
        soak_s: 0,
        idle_s: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--nodes" => args.nodes = value()?,
            "--writes" => args.writes = value()?,
            "--kills" => args.kills = value()?,
            "--interval-ms" => args.interval_ms = value()? as u64,
            "--loss" => args.loss_pct = value()?,
            "--soak-s" => args.soak_s = value()?,
            "--idle-s" => args.idle_s = value()?,
            other => {
                bail!("unknown flag {other}; use --nodes N --writes N --kills N --interval-ms MS --loss PCT --soak-s S --idle-s S")
            }
        }
    }
    if args.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    Ok(args)
}

use cluster_tests::{ms, percentile};

struct Api {
    http: ureq::Agent,
    token: String,
}

impl Api {
    fn status(&self, url: &str) -> u16 {
        match self.http.get(url).call() {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    fn json(&self, url: &str) -> anyhow::Result<serde_json::Value> {
        let mut r = self.http.get(url).call()?;
        Ok(r.body_mut().read_json()?)
    }

    fn put(&self, url: &str, body: &str) -> anyhow::Result<u16> {
        let r = self
            .http
            .put(url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body)?;
        Ok(r.status().as_u16())
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let n = args.nodes;
    let mut c = Cluster::new(n)?;
    let token = "bench-token-0123456789abcdef".to_string();
    let token_file = c.dir.path().join("token");
    std::fs::write(&token_file, &token)?;
    let token_path = token_file.to_str().context("utf8")?.to_string();
    let interval = args.interval_ms.to_string();
    let urls: Vec<String> = (1..=n)
        .map(|i| format!("http://{}.{i}:62080", c.subnet))
        .collect();
    let start_node = |c: &mut Cluster, i: usize, seeds: &[usize]| {
        let listen = format!("{}.{i}:62080", c.subnet);
        let flags = [
            "--api-listen",
            &listen,
            "--api-token-file",
            &token_path,
            "--gossip-interval-ms",
            &interval,
        ];
        c.start(i, seeds, &flags)
    };
    for i in 1..=n {
        let seeds: Vec<usize> = if i == 1 { vec![] } else { vec![i - 1] };
        start_node(&mut c, i, &seeds)?;
    }
    c.switch_address()?;
    enter_netns(&c.switch_ns)?;
    let api = Api {
        http: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent(),
        token,
    };
    let alive_everywhere = |api: &Api| -> anyhow::Result<Option<()>> {
        for url in &urls {
            let nodes = api.json(&format!("{url}/v1/nodes"))?;
            let alive = nodes
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| x["status"] == "alive").count());
            if alive != n {
                return Ok(None);
            }
        }
        Ok(Some(()))
    };
    let t0 = Instant::now();
    wait_for("all alive", Duration::from_secs(60), || {
        alive_everywhere(&api)
    })?;
    println!(
        "cluster: {n} agents in {n} network namespaces, gossip every {} ms; all alive on all after {}",
        args.interval_ms,
        ms(t0.elapsed())
    );
    let idle = measure_idle(&c, &api, &urls, args.idle_s)?;

    if args.loss_pct > 0 {
        // No netem on these kernels: drop gossip packets with nftables.
        let rules = c.dir.path().join("loss.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet benchloss {{\n chain input {{\n  type filter hook input priority 0;\n  \
                 udp dport {} numgen random mod 100 < {} drop\n }}\n}}\n",
                cluster_tests::GOSSIP_PORT,
                args.loss_pct
            ),
        )?;
        let rules = rules.to_str().context("utf8")?;
        for node in &c.nodes {
            cluster_tests::sh(&["ip", "netns", "exec", &node.netns, "nft", "-f", rules])?;
        }
        println!(
            "loss: every node drops {}% of incoming gossip packets",
            args.loss_pct
        );
    }
    if args.soak_s > 0 {
        // Idle soak: every node's view polled 4 times a second; any status
        // but `alive` for a live node is a false alarm.
        let start = Instant::now();
        let (mut polls, mut false_alarms) = (0u64, 0u64);
        let mut worst = String::new();
        while start.elapsed() < Duration::from_secs(args.soak_s as u64) {
            for (i, url) in urls.iter().enumerate() {
                let nodes = api.json(&format!("{url}/v1/nodes"))?;
                polls += 1;
                for x in nodes.as_array().into_iter().flatten() {
                    if x["status"] != "alive" {
                        false_alarms += 1;
                        worst = format!("node{} saw {} as {}", i + 1, x["node_id"], x["status"]);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        println!(
            "\nsoak: {} s idle at {}% loss, {polls} polls of /v1/nodes: {false_alarms} false non-alive observations{}",
            args.soak_s,
            args.loss_pct,
            if worst.is_empty() { String::new() } else { format!(" (last: {worst})") }
        );
    }

    // Propagation: a write acknowledged on one node → readable on all others.
    let mut all = Vec::new();
    let mut first = Vec::new();
    for w in 0..args.writes {
        let origin = w % n;
        let id = format!("bench-{w}");
        let body = format!(
            r#"{{"app":"/bench","ip":"{}.{}","ports":[{{"port":80}}]}}"#,
            c.subnet,
            origin + 1
        );
        // Spread writes over the gossip round so every phase is sampled.
        std::thread::sleep(Duration::from_millis(
            (w as u64 * 37) % args.interval_ms.max(1),
        ));
        let start = Instant::now();
        let code = api.put(&format!("{}/v1/tasks/{id}", urls[origin]), &body)?;
        if code != 201 {
            bail!("PUT {id} on node{} answered {code}", origin + 1);
        }
        let seen: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .filter(|&i| i != origin)
                .map(|i| {
                    let (api, url, id) = (&api, &urls[i], &id);
                    s.spawn(move || {
                        let deadline = start + Duration::from_secs(30);
                        while Instant::now() < deadline {
                            if api.status(&format!("{url}/v1/tasks/{id}")) == 200 {
                                return start.elapsed();
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Duration::MAX
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Duration::MAX))
                .collect()
        });
        if seen.contains(&Duration::MAX) {
            bail!("write {id} did not reach every node within 30 s");
        }
        all.push(*seen.iter().max().expect("at least 2 other nodes"));
        first.push(*seen.iter().min().expect("at least 2 other nodes"));
    }
    all.sort();
    first.sort();
    println!("\npropagation over {} writes (PUT acknowledged on one node → GET answers 200 on the others):", args.writes);
    println!(
        "  first other node   p50 {:>9}  p99 {:>9}",
        ms(percentile(&first, 50.0)),
        ms(percentile(&first, 99.0))
    );
    println!(
        "  all {} other nodes  p50 {:>9}  p99 {:>9}  max {:>9}",
        n - 1,
        ms(percentile(&all, 50.0)),
        ms(percentile(&all, 99.0)),
        ms(*all.last().expect("writes > 0"))
    );
    let p99 = percentile(&all, 99.0);
    println!(
        "  vs target p99 ≤ 100 ms: {:.2}x of target; vs Lashup's 90% of nodes within 1.5 s: {:.3}x; vs Mesos-DNS's 30 s refresh: {:.4}x",
        p99.as_secs_f64() / 0.1,
        p99.as_secs_f64() / 1.5,
        p99.as_secs_f64() / 30.0
    );

    // Detection: SIGKILL an agent; time until every other node says down.
    let mut detections = Vec::new();
    for k in 0..args.kills {
        let victim = n - (k % (n - 1)); // never node 1
        c.kill(victim)?;
        let start = Instant::now();
        let victim_id = format!("node{victim}");
        wait_for("victim down everywhere", Duration::from_secs(60), || {
            for (i, url) in urls.iter().enumerate() {
                if i + 1 == victim {
                    continue;
                }
                let nodes = api.json(&format!("{url}/v1/nodes"))?;
                let down = nodes.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x["node_id"] == victim_id.as_str() && x["status"] == "down")
                });
                if !down {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })?;
        detections.push(start.elapsed());
        start_node(&mut c, victim, &[1])?;
        wait_for("all alive again", Duration::from_secs(60), || {
            alive_everywhere(&api)
        })?;
    }
    detections.sort();
    let sim = simulate(&args);
    println!("\nside by side ({n} nodes):");
    println!("  {:<44} {:>14} {:>14}", "", "real agents", "skein-sim");
    if let Some(idle) = &idle {
        println!(
            "  {:<44} {:>14.0} {:>14.0}",
            "idle B/s per node, on the wire (in + out)", idle.wire_mean, sim.idle_mean
        );
        println!(
            "  {:<44} {:>14.0} {:>14}",
            "idle B/s per node, max",
            idle.wire_max,
            format!("{:.0}", sim.idle_max)
        );
        println!(
            "  {:<44} {:>14.0} {:>14}",
            "idle B/s per node, gossip payload (/metrics)", idle.payload_mean, "-"
        );
        println!(
            "  {:<44} {:>14.1} {:>14.1}",
            "idle messages/s per node (in + out)", idle.messages_mean, sim.idle_msgs_per_node_per_s
        );
        println!(
            "  {:<44} {:>14.1} {:>14.1}",
            "agent RSS MB (mean / state estimate)",
            idle.rss_mean_kb / 1024.0,
            sim.mem_bytes_per_node / 1e6
        );
    }
    println!(
        "  {:<44} {:>14} {:>14}",
        "write → all p99",
        ms(percentile(&all, 99.0)),
        format!("{:.1} ms", sim.write_all.p99)
    );
    if !detections.is_empty() {
        println!(
            "  {:<44} {:>14} {:>14}",
            "kill → down everywhere, max",
            ms(*detections.last().expect("kills > 0")),
            format!("{:.1} ms", sim.detect.max)
        );
    }
    if !detections.is_empty() {
        println!(
            "\nfailure detection over {} SIGKILLs (kill → `down` on every other node):",
            detections.len()
        );
        println!(
            "  min {:>9}  p50 {:>9}  max {:>9}",
            ms(detections[0]),
            ms(percentile(&detections, 50.0)),
            ms(*detections.last().expect("kills > 0"))
        );
        let max = detections.last().expect("kills > 0").as_secs_f64();
        println!(
            "  vs target ≤ 5 s: {:.2}x; vs memberlist's 8-16 s suspicion alone: {:.2}x of 8 s; vs chitchat's < 10 s: {:.2}x",
            max / 5.0,
            max / 8.0,
            max / 10.0
        );
    }
    Ok(())
}

struct Idle {
    wire_mean: f64,
    wire_max: f64,
    payload_mean: f64,
    messages_mean: f64,
    rss_mean_kb: f64,
}

/// Bytes through a node's interface (rx + tx), from inside its namespace.
fn wire_bytes(netns: &str) -> anyhow::Result<u64> {
    let out = cluster_tests::sh(&["ip", "-n", netns, "-j", "-s", "link", "show", "eth0"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let stats = &v[0]["stats64"];
    Ok(stats["rx"]["bytes"].as_u64().unwrap_or(0) + stats["tx"]["bytes"].as_u64().unwrap_or(0))
}

/// Sum of a Prometheus counter's samples in a /metrics page.
fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn rss_kb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Idle traffic per node over `secs`, with nothing else on the wire (the
/// bench does not poll meanwhile), and each agent's RSS.
fn measure_idle(
    c: &Cluster,
    api: &Api,
    urls: &[String],
    secs: usize,
) -> anyhow::Result<Option<Idle>> {
    if secs == 0 {
        return Ok(None);
    }
    // Let joins and the first syncs settle.
    std::thread::sleep(Duration::from_secs(2));
    // Interface counters are read inside the window, /metrics outside it:
    // a /metrics page is kilobytes, and must not count as gossip.
    let wire =
        || -> anyhow::Result<Vec<u64>> { c.nodes.iter().map(|n| wire_bytes(&n.netns)).collect() };
    let gossip = || -> anyhow::Result<Vec<(u64, u64)>> {
        let mut v = Vec::new();
        for url in urls {
            let page = api
                .http
                .get(&format!("{url}/metrics"))
                .call()?
                .body_mut()
                .read_to_string()?;
            v.push((
                counter(&page, "skein_gossip_bytes_total"),
                counter(&page, "skein_gossip_messages_total"),
            ));
        }
        Ok(v)
    };
    let g0 = gossip()?;
    let w0 = wire()?;
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs as u64));
    let w1 = wire()?;
    let dt = start.elapsed().as_secs_f64();
    let g1 = gossip()?;
    let gdt = start.elapsed().as_secs_f64();
    let wire: Vec<f64> = w0
        .iter()
        .zip(&w1)
        .map(|(b, a)| (a - b) as f64 / dt)
        .collect();
    let payload: Vec<f64> = g0
        .iter()
        .zip(&g1)
        .map(|(b, a)| (a.0 - b.0) as f64 / gdt)
        .collect();
    let messages: Vec<f64> = g0
        .iter()
        .zip(&g1)
        .map(|(b, a)| (a.1 - b.1) as f64 / gdt)
        .collect();
    let rss: Vec<f64> = c
        .nodes
        .iter()
        .filter_map(|n| rss_kb(n.process.as_ref()?.id()))
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let idle = Idle {
        wire_mean: mean(&wire),
        wire_max: wire.iter().copied().fold(0.0, f64::max),
        payload_mean: mean(&payload),
        messages_mean: mean(&messages),
        rss_mean_kb: mean(&rss),
    };
    println!(
        "idle {secs} s: {:.0} B/s per node on the wire (max {:.0}), {:.0} B/s gossip payload, {:.1} messages/s; agent RSS {:.1} MB mean",
        idle.wire_mean,
        idle.wire_max,
        idle.payload_mean,
        idle.messages_mean,
        idle.rss_mean_kb / 1024.0
    );
    Ok(Some(idle))
}

/// The simulator's figures for the same cluster: same N, same heartbeat,
/// the namespace network's latency (tens of microseconds), same loss.
fn simulate(args: &Args) -> skein_sim::scenario::Report {
    let s = skein_sim::scenario::Scenario {
        loss: args.loss_pct as f64 / 100.0,
        latency_ms: 0.1,
        jitter_ms: 0.05,
        duration_s: args.idle_s.max(1) as f64,
        writes: args.writes as u32,
        kills: args.kills.min(1) as u32,
        heartbeat_ms: args.interval_ms as f64,
        ..skein_sim::scenario::Scenario::new(args.nodes as u32, 1)
    };
    skein_sim::scenario::run(&s, &mut |_| {})
}
