//! DNS throughput and latency: skein's DNS server against Unbound on the
//! same machine, in the same run, with dnsperf as the client.
//!
//! One skein agent runs in a namespace with 100 registered apps; Unbound
//! runs in the same namespace serving the same 100 names as `local-data`.
//! Both forward everything else to the same upstream (in another namespace)
//! and cache it. dnsperf then measures each for:
//!   (a) cluster records (authoritative answers), and
//!   (b) cache hits of forwarded names (after one warm-up pass).
//!
//!   cargo build --release -p skein -p cluster-tests
//!   SKEIN_BIN=target/release/skein target/release/dns-bench [SECONDS]
//!
//! Both servers get 4 MB UDP receive buffers (skein sets it on its
//! sockets, Unbound through `so-rcvbuf`). Besides dnsperf's figures, each
//! line shows the server's CPU time per answered query (from /proc, less
//! sensitive than q/s to other work on the machine) and the datagrams the
//! kernel dropped for a full receive buffer, at the server's sockets and at
//! dnsperf's (lost queries are one or the other, or late answers).
//!
//! Needs root, `dnsperf` and `unbound` (Debian packages).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use cluster_tests::{sh, spawn_in, wait_for, Cluster};

const APPS: usize = 100;

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

fn dnsperf(netns: &str, server: &str, pid: u32, data: &str, secs: u64) -> anyhow::Result<Perf> {
    let cpu_before = cpu_ticks(pid);
    let drops_before = udp_drops(netns, server);
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dnsperf", "-s", server, "-d", data])
        .args(["-l", &secs.to_string(), "-c", "4", "-q", "200", "-t", "2"])
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

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args().nth(1).map_or(Ok(10), |s| s.parse())?;
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
    let fakedns = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("skein-fakedns");
    let mut c = Cluster::new(2)?;
    let dir = c.dir.path().to_path_buf();
    // The upstream: node 2's namespace, answering every name.
    let _upstream = spawn_in(
        &c.node(2).netns,
        fakedns.to_str().context("utf8")?,
        &["10.77.0.2:53", "*", "203.0.113.7"],
    )?;
    c.start(
        1,
        &[],
        &["--dns-upstream", "10.77.0.2", "--l4lb-dataplane", "none"],
    )?;
    let netns = c.node(1).netns.clone();
    for i in 0..APPS {
        let body = format!(
            r#"{{"app":"/app-{i}","ip":"10.0.{}.{}","ports":[{{"port":80}}]}}"#,
            i / 200,
            i % 200 + 1
        );
        let (code, text) = c.put_task(1, &format!("app-{i}.1"), &body)?;
        if code != 201 {
            bail!("registering app-{i}: {code} {text}");
        }
    }

    // Unbound with the same names and the same upstream, on 127.0.0.2.
    let mut conf = String::from(
        "server:\n  interface: 127.0.0.2\n  port: 53\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  \
         directory: \"\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: 2\n  \
         so-reuseport: yes\n  so-rcvbuf: 4m\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  \
         do-not-query-localhost: no\n  local-zone: \"mesos.\" static\n",
    );
    for i in 0..APPS {
        conf.push_str(&format!(
            "  local-data: \"app-{i}.marathon.mesos. 5 IN A 10.0.{}.{}\"\n",
            i / 200,
            i % 200 + 1
        ));
    }
    conf.push_str("remote-control:\n  control-enable: no\nforward-zone:\n  name: \".\"\n  forward-addr: 10.77.0.2\n");
    let conf_path = dir.join("unbound.conf");
    std::fs::write(&conf_path, conf)?;
    let _unbound = spawn_in(
        &netns,
        "unbound",
        &["-d", "-c", conf_path.to_str().context("utf8")?],
    )?;

    // Query files: cluster names, and forwarded names (cached after warm-up).
    let cluster: String = (0..APPS)
        .map(|i| format!("app-{i}.marathon.mesos A\n"))
        .collect();
    let forwarded: String = (0..APPS)
        .map(|i| format!("host-{i}.example.com A\n"))
        .collect();
    let (cluster_file, forwarded_file) = (dir.join("cluster.txt"), dir.join("forwarded.txt"));
    std::fs::write(&cluster_file, cluster)?;
    std::fs::write(&forwarded_file, forwarded)?;
    let (cf, ff) = (
        cluster_file.to_str().context("utf8")?,
        forwarded_file.to_str().context("utf8")?,
    );

    for server in ["127.0.0.1", "127.0.0.2"] {
        wait_for(
            "the server answering app-99",
            Duration::from_secs(20),
            || {
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &netns,
                    "dig",
                    &format!("@{server}"),
                    "app-99.marathon.mesos",
                    "+short",
                ])?;
                Ok((!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(()))
            },
        )?;
        // Warm the caches: one pass over the forwarded names.
        dnsperf(&netns, server, 0, ff, 1)?;
    }
    println!("dnsperf -c 4 -q 200 for {secs} s each; skein (2 tokio workers) vs Unbound {} (num-threads 2), same namespace, same 2 cores\n",
        String::from_utf8_lossy(&sh(&["unbound", "-V"])?.stdout).lines().next().unwrap_or("").trim_start_matches("Version "));
    // `ip netns exec` execs the program: the child's pid is the server's.
    let skein_pid = c.node(1).process.as_ref().context("agent")?.id();
    let unbound_pid = _unbound.0.id();
    let skein_cluster = dnsperf(&netns, "127.0.0.1", skein_pid, cf, secs)?;
    let unbound_cluster = dnsperf(&netns, "127.0.0.2", unbound_pid, cf, secs)?;
    let skein_cached = dnsperf(&netns, "127.0.0.1", skein_pid, ff, secs)?;
    let unbound_cached = dnsperf(&netns, "127.0.0.2", unbound_pid, ff, secs)?;
    println!("(a) cluster records ({APPS} names):");
    println!("{}", line("skein", &skein_cluster));
    println!("{}", line("unbound (local-data)", &unbound_cluster));
    println!(
        "  ratio skein/unbound: {:.2} (target ≥ 1.0)",
        skein_cluster.qps / unbound_cluster.qps
    );
    println!("(b) cache hits of forwarded names ({APPS} names):");
    println!("{}", line("skein", &skein_cached));
    println!("{}", line("unbound", &unbound_cached));
    println!(
        "  ratio skein/unbound: {:.2} (target ≥ 1.0)",
        skein_cached.qps / unbound_cached.qps
    );
    Ok(())
}
