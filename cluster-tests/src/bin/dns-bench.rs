//! DNS throughput and latency: skein's DNS server against Unbound on the
//! same machine, in the same run, with dnsperf as the client.
//!
//! One skein agent runs in a namespace with its apps registered; Unbound
//! runs in the same namespace serving the same names as `local-data`. Both
//! forward everything else to the same upstream (in another namespace) and
//! cache it. dnsperf then measures each, in alternating runs (several rounds,
//! each printed, then the medians), for these shapes:
//!   (a) `names100`: 100 cluster names in turn (authoritative answers);
//!   (b) `hot`: one cluster name asked again and again;
//!   (c) `many`: 10,000 registered apps, every name asked in turn;
//!   (d) `forwarded`: 100 forwarded names, cache hits after a warm-up pass.
//! and each of them twice: with the measured agent alone, and with two more
//! agents (own namespaces, same cores) gossiping with it as a 3-node cluster
//! (`--cluster on|off|both`).
//!
//!   cargo build --release -p skein -p cluster-tests
//!   SKEIN_BIN=target/release/skein target/release/dns-bench [SECONDS]
//!       [--rounds 3] [--shapes names100,hot,many,forwarded] [--cluster both]
//!
//! Both servers get 4 MB UDP receive buffers (skein sets it on its
//! sockets, Unbound through `so-rcvbuf`). Besides dnsperf's figures, each
//! line shows the server's CPU time per answered query (from /proc, less
//! sensitive than q/s to other work on the machine) and the datagrams the
//! kernel dropped for a full receive buffer, at the server's sockets and at
//! dnsperf's (lost queries are one or the other, or late answers). The load
//! average is printed with every round: the figures are only as quiet as
//! the machine.
//!
//! Needs root, `dnsperf` and `unbound` (Debian packages).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use cluster_tests::{sh, spawn_in, wait_for, Background, Cluster};

/// Apps registered for every shape but (c).
const FEW_APPS: usize = 100;
/// Apps registered for shape (c).
const MANY_APPS: usize = 10_000;

struct Perf {
    qps: f64,
    /// CPU time the server spent per answered query (user + system): less
    /// sensitive than q/s to other work on the machine.
    cpu_us: f64,
    avg_ms: f64,
    max_ms: f64,
    sent: u64,
    lost: u64,
    /// Datagrams the kernel dropped for a full receive buffer during the
    /// run: at the server's sockets, and at any other (dnsperf's).
    server_drops: u64,
    client_drops: u64,
}

/// UDP receive-buffer drops in `netns`: the namespace's total, and those of
/// the sockets bound to `server` port 53.
fn udp_drops(netns: &str, server: &str) -> (u64, u64) {
    let read = |file: &str| {
        Command::new("ip")
            .args(["netns", "exec", netns, "cat", file])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    // "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors ..."
    // (a header line, then a line of values).
    let snmp = read("/proc/net/snmp");
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let total = udp
        .first()
        .zip(udp.get(1))
        .and_then(|(names, values)| {
            let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
            values.split_whitespace().nth(i)?.parse().ok()
        })
        .unwrap_or(0);
    // /proc/net/udp: local address as little-endian hex, drops last.
    let ip: std::net::Ipv4Addr = server.parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST);
    let local = format!("{:08X}:0035", u32::from_le_bytes(ip.octets()));
    let ours = read("/proc/net/udp")
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    (total, ours)
}

/// A process's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command name: state is field 3,
    // utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// Clock ticks per second, for [`cpu_ticks`].
fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// dnsperf with `clients` sockets (`-c`) and 50 queries per client
/// outstanding at most (`-q`, a total: 200 with the default 4 clients).
fn dnsperf(
    netns: &str,
    server: &str,
    pid: u32,
    data: &str,
    secs: u64,
    clients: u32,
) -> anyhow::Result<Perf> {
    let cpu_before = cpu_ticks(pid);
    let drops_before = udp_drops(netns, server);
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dnsperf", "-s", server, "-d", data])
        .args(["-l", &secs.to_string(), "-c", &clients.to_string()])
        .args(["-q", &(50 * clients.max(1)).to_string(), "-t", "2"])
        .output()
        .context("cannot run dnsperf (apt-get install dnsperf)")?;
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / ticks_per_second();
    let drops = udp_drops(netns, server);
    let server_drops = drops.1.saturating_sub(drops_before.1);
    let all_drops = drops.0.saturating_sub(drops_before.0);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |label: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let num = |label: &str| -> anyhow::Result<f64> {
        field(label)
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .with_context(|| format!("dnsperf printed no {label:?}:\n{text}"))
    };
    let latency = text
        .lines()
        .find(|l| l.trim_start().starts_with("Average Latency"))
        .with_context(|| format!("no latency line:\n{text}"))?;
    // "Average Latency (s):  0.000123 (min 0.000010, max 0.004000)"
    let nums: Vec<f64> = latency
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|t| t.parse().ok())
        .collect();
    let completed = num("Queries completed")?;
    Ok(Perf {
        qps: num("Queries per second")?,
        cpu_us: cpu * 1e6 / completed.max(1.0),
        avg_ms: nums.first().copied().unwrap_or(f64::NAN) * 1000.0,
        max_ms: nums.get(2).copied().unwrap_or(f64::NAN) * 1000.0,
        sent: num("Queries sent")? as u64,
        lost: num("Queries lost")? as u64,
        server_drops,
        client_drops: all_drops.saturating_sub(server_drops),
    })
}

fn line(what: &str, p: &Perf) -> String {
    format!(
        "  {what:<28} {:>9.0} q/s  avg {:>6.3} ms  max {:>7.2} ms  lost {} of {}  cpu {:.2} µs/query  \
         drops server {} client {}",
        p.qps, p.avg_ms, p.max_ms, p.lost, p.sent, p.cpu_us, p.server_drops, p.client_drops
    )
}

/// One traffic shape: what dnsperf asks, and which setup it needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// (a) 100 cluster names, in turn.
    Names100,
    /// (b) One cluster name, asked again and again.
    Hot,
    /// (c) 10,000 registered apps, every one asked in turn.
    Many,
    /// (d) 100 forwarded names, all cache hits after a warm-up pass.
    Forwarded,
}

impl Shape {
    const ALL: [Shape; 4] = [Shape::Names100, Shape::Hot, Shape::Many, Shape::Forwarded];

    fn flag(self) -> &'static str {
        match self {
            Shape::Names100 => "names100",
            Shape::Hot => "hot",
            Shape::Many => "many",
            Shape::Forwarded => "forwarded",
        }
    }

    fn title(self) -> String {
        match self {
            Shape::Names100 => format!("(a) cluster records, {FEW_APPS} names in turn"),
            Shape::Hot => "(b) one hot cluster name (app-0.marathon.mesos A, repeated)".to_string(),
            Shape::Many => {
                format!("(c) many names: {MANY_APPS} registered apps, each asked in turn")
            }
            Shape::Forwarded => {
                format!("(d) forwarded names, cache hits ({FEW_APPS} names, warmed)")
            }
        }
    }

    /// Apps registered for this shape.
    fn apps(self) -> usize {
        if self == Shape::Many {
            MANY_APPS
        } else {
            FEW_APPS
        }
    }

    fn queries(self) -> String {
        match self {
            Shape::Names100 | Shape::Many => (0..self.apps())
                .map(|i| format!("app-{i}.marathon.mesos A\n"))
                .collect(),
            Shape::Hot => "app-0.marathon.mesos A\n".to_string(),
            Shape::Forwarded => (0..FEW_APPS)
                .map(|i| format!("host-{i}.example.com A\n"))
                .collect(),
        }
    }
}

/// App `i`'s task address (unique up to 62,500 apps).
fn app_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 62_500, i / 250 % 250, i % 250 + 1)
}

struct Options {
    secs: u64,
    rounds: usize,
    shapes: Vec<Shape>,
    /// Runs without and/or with the two other agents.
    clusters: Vec<bool>,
    /// dnsperf's client sockets.
    clients: u32,
}

const USAGE: &str = "dns-bench [SECONDS] [--seconds N] [--rounds N] \
    [--shapes names100,hot,many,forwarded] [--cluster off|on|both] [--clients 4]";

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        secs: 10,
        rounds: 3,
        shapes: Shape::ALL.to_vec(),
        clusters: vec![false, true],
        clients: 4,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--seconds" => o.secs = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse::<usize>()?.max(1),
            "--shapes" => {
                o.shapes = value()?
                    .split(',')
                    .map(|s| {
                        Shape::ALL
                            .into_iter()
                            .find(|shape| shape.flag() == s.trim())
                            .with_context(|| format!("unknown shape {s:?}; {USAGE}"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--clients" => o.clients = value()?.parse::<u32>()?.max(1),
            "--cluster" => {
                o.clusters = match value()?.as_str() {
                    "off" => vec![false],
                    "on" => vec![true],
                    "both" => vec![false, true],
                    other => bail!("--cluster {other:?}: off, on or both; {USAGE}"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            n if n.parse::<u64>().is_ok() => o.secs = n.parse()?,
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(o)
}

/// The machine's load, for the record (the figures depend on it).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A process's resident memory (VmRSS), in MB.
fn rss_mb(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1}", kb / 1024.0))
        })
        .unwrap_or_else(|| "?".to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One measured agent (plus, with `cluster`, two more gossiping with it)
/// holding `apps` apps, and Unbound with the same names, ready to answer.
struct Setup {
    c: Cluster,
    netns: String,
    skein_pid: u32,
    unbound: Background,
    _upstream: Background,
}

fn setup(apps: usize, cluster: bool) -> anyhow::Result<Setup> {
    let fakedns = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("skein-fakedns");
    let mut c = Cluster::new(if cluster { 3 } else { 2 })?;
    let dir = c.dir.path().to_path_buf();
    // The upstream: node 2's namespace, answering every name.
    let upstream = spawn_in(
        &c.node(2).netns,
        fakedns.to_str().context("utf8")?,
        &["10.77.0.2:53", "*", "203.0.113.7"],
    )?;
    // The apps are node 1's own tasks, restored from its data dir at start
    // (10,000 PUTs through the API would take minutes).
    let tasks: serde_json::Map<String, serde_json::Value> = (0..apps)
        .map(|i| {
            (
                format!("app-{i}.1"),
                serde_json::json!({"app": format!("/app-{i}"), "ip": app_ip(i), "ports": [{"port": 80}]}),
            )
        })
        .collect();
    std::fs::create_dir_all(&c.node(1).data_dir)?;
    std::fs::write(
        c.node(1).data_dir.join("tasks.json"),
        serde_json::to_vec(&tasks)?,
    )?;
    // The agent's own gossip interval (the tests' helper shortens it).
    let agent = [
        "--dns-upstream",
        "10.77.0.2",
        "--l4lb-dataplane",
        "none",
        "--gossip-interval-ms",
        "200",
    ];
    c.start(1, &[], &agent)?;
    if cluster {
        // Two more agents, each in its own namespace on the same cores,
        // with a few tasks of their own: node 1 heartbeats them, applies
        // their writes and rebuilds its view while it answers.
        for i in 2..=3 {
            c.start(i, &[1], &agent)?;
            for t in 0..10 {
                let body = format!(
                    r#"{{"app":"/other-{i}-{t}","ip":"10.200.{i}.{}","ports":[{{"port":80}}]}}"#,
                    t + 1
                );
                let (code, text) = c.put_task(i, &format!("other-{i}-{t}.1"), &body)?;
                if code != 201 {
                    bail!("registering other-{i}-{t} on node{i}: {code} {text}");
                }
            }
        }
        for i in 2..=3 {
            c.wait_status(1, &format!("node{i}"), "alive")?;
        }
    }
    let netns = c.node(1).netns.clone();

    // Unbound with the same names and the same upstream, on 127.0.0.2.
    let mut conf = String::from(
        "server:\n  interface: 127.0.0.2\n  port: 53\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  \
         directory: \"\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: 2\n  \
         so-reuseport: yes\n  so-rcvbuf: 4m\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  \
         do-not-query-localhost: no\n  local-zone: \"mesos.\" static\n",
    );
    for i in 0..apps {
        conf.push_str(&format!(
            "  local-data: \"app-{i}.marathon.mesos. 5 IN A {}\"\n",
            app_ip(i)
        ));
    }
    if cluster {
        for i in 2..=3 {
            for t in 0..10 {
                conf.push_str(&format!(
                    "  local-data: \"other-{i}-{t}.marathon.mesos. 5 IN A 10.200.{i}.{}\"\n",
                    t + 1
                ));
            }
        }
    }
    conf.push_str("remote-control:\n  control-enable: no\nforward-zone:\n  name: \".\"\n  forward-addr: 10.77.0.2\n");
    let conf_path = dir.join("unbound.conf");
    std::fs::write(&conf_path, conf)?;
    let unbound = spawn_in(
        &netns,
        "unbound",
        &["-d", "-c", conf_path.to_str().context("utf8")?],
    )?;
    let last = format!("app-{}.marathon.mesos", apps - 1);
    let mut checks = vec![last.clone()];
    if cluster {
        checks.push("other-3-9.marathon.mesos".to_string());
    }
    for server in ["127.0.0.1", "127.0.0.2"] {
        for name in &checks {
            wait_for(
                &format!("{server} answering {name}"),
                Duration::from_secs(60),
                || {
                    let out = sh(&[
                        "ip",
                        "netns",
                        "exec",
                        &netns,
                        "dig",
                        &format!("@{server}"),
                        name,
                        "+short",
                    ])?;
                    Ok((!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(()))
                },
            )?;
        }
    }
    // `ip netns exec` execs the program: the child's pid is the server's.
    let skein_pid = c.node(1).process.as_ref().context("agent")?.id();
    Ok(Setup {
        c,
        netns,
        skein_pid,
        unbound,
        _upstream: upstream,
    })
}

/// Runs `shape` against both servers, alternating them round by round
/// (skein first in odd rounds, Unbound first in even ones), prints every
/// round and the medians; returns (skein, unbound) median q/s.
fn measure(s: &Setup, shape: Shape, o: &Options) -> anyhow::Result<(f64, f64)> {
    let file = s.c.dir.path().join(format!("{}.txt", shape.flag()));
    std::fs::write(&file, shape.queries())?;
    let file = file.to_str().context("utf8")?;
    let unbound_pid = s.unbound.0.id();
    if shape == Shape::Forwarded {
        // Warm the caches: one pass over the forwarded names.
        for server in ["127.0.0.1", "127.0.0.2"] {
            dnsperf(&s.netns, server, 0, file, 1, o.clients)?;
        }
    }
    println!("{}  [load {}]", shape.title(), load());
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        let run = |skein: bool| -> anyhow::Result<Perf> {
            if skein {
                dnsperf(&s.netns, "127.0.0.1", s.skein_pid, file, o.secs, o.clients)
            } else {
                dnsperf(&s.netns, "127.0.0.2", unbound_pid, file, o.secs, o.clients)
            }
        };
        let (skein, unbound) = if round % 2 == 1 {
            let skein = run(true)?;
            (skein, run(false)?)
        } else {
            let unbound = run(false)?;
            (run(true)?, unbound)
        };
        println!("{}", line(&format!("round {round} skein"), &skein));
        println!("{}", line(&format!("round {round} unbound"), &unbound));
        println!(
            "  round {round} ratio skein/unbound: {:.2}   [load {}]",
            skein.qps / unbound.qps,
            load()
        );
        ratios.push(skein.qps / unbound.qps);
        ours.push(skein.qps);
        theirs.push(unbound.qps);
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        "  median of {}: skein {ours:.0} q/s, unbound {theirs:.0} q/s, ratio {:.2} (median of the rounds' \
         ratios {:.2}; target ≥ 1.0); resident memory skein {} MB, unbound {} MB\n",
        o.rounds,
        ours / theirs,
        median(ratios),
        rss_mb(s.skein_pid),
        rss_mb(unbound_pid),
    );
    Ok((ours, theirs))
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    for tool in ["dnsperf", "unbound"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!("{tool} is not installed: apt-get install dnsperf unbound");
        }
    }
    println!(
        "dnsperf -c {} -q {}, {} s per run, {} rounds alternating skein and Unbound; skein (2 tokio workers) vs Unbound {} \
         (num-threads 2), same namespace, same {} cores; load at start {}\n",
        o.clients,
        50 * o.clients,
        o.secs,
        o.rounds,
        String::from_utf8_lossy(&sh(&["unbound", "-V"])?.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("Version "),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load()
    );
    let mut summary = Vec::new();
    for &cluster in &o.clusters {
        // One setup per number of apps: the 100-app shapes share one.
        let mut groups: Vec<(usize, Vec<Shape>)> = Vec::new();
        for &shape in &o.shapes {
            match groups.iter_mut().find(|(apps, _)| *apps == shape.apps()) {
                Some((_, shapes)) => shapes.push(shape),
                None => groups.push((shape.apps(), vec![shape])),
            }
        }
        for (apps, shapes) in groups {
            let s = setup(apps, cluster)?;
            println!(
                "=== {apps} apps on the measured agent, {}",
                if cluster {
                    "with 2 more agents gossiping with it (3-node cluster, 200 ms heartbeats, all on these cores)"
                } else {
                    "alone"
                }
            );
            // What the measured agent costs with no queries (its gossip,
            // with the cluster running).
            let before = cpu_ticks(s.skein_pid);
            std::thread::sleep(Duration::from_secs(5));
            println!(
                "skein with no queries: {:.1} % of a core over 5 s\n",
                (cpu_ticks(s.skein_pid) - before) as f64 / ticks_per_second() / 5.0 * 100.0
            );
            for &shape in &shapes {
                let (ours, theirs) = measure(&s, shape, &o)?;
                summary.push((shape, cluster, ours, theirs));
            }
        }
    }
    println!("summary (medians):");
    println!(
        "  {:<10} {:<8} {:>10} {:>10} {:>6}",
        "shape", "cluster", "skein", "unbound", "ratio"
    );
    for (shape, cluster, ours, theirs) in summary {
        println!(
            "  {:<10} {:<8} {:>10.0} {:>10.0} {:>6.2}",
            shape.flag(),
            if cluster { "3 nodes" } else { "alone" },
            ours,
            theirs,
            ours / theirs
        );
    }
    println!("  load now {}", load());
    Ok(())
}
