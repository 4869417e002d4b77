//! `edge-bench`: `skein edge` against HAProxy driven by reloads, as
//! Marathon-LB drove it.
//!
//! * `edge-bench churn`: a bounded client sends through the edge while the
//!   backend set changes 50 times a second; counts failed requests and
//!   reset long-lived connections, and HAProxy's processes.
//! * `edge-bench speed`: `wrk` through each edge and straight to a backend
//!   (added latency), keep-alive and a new connection per request, an HTTP
//!   virtual host and a TCP service port.
//!
//! Every figure compared is measured in the same run. The edges are
//! pluggable ([`edge::Edge`]); `skein edge` runs when `--skein-bin` (or
//! `SKEIN_BIN`) names a binary with the `edge` subcommand.

mod backends;
mod churn;
mod client;
mod cluster;
mod edge;
mod haproxy;
mod speed;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::cluster::{Cluster, Task, TCP_APP, WEB_APP, WEB_VHOST};
use crate::edge::{Edge, Ports, SkeinEdge};
use crate::haproxy::Haproxy;

/// With `--json` the plain lines go to stderr and stdout carries one JSON
/// document.
static JSON: AtomicBool = AtomicBool::new(false);

macro_rules! say {
    ($($t:tt)*) => {
        if JSON.load(Ordering::Relaxed) {
            eprintln!($($t)*)
        } else {
            println!($($t)*)
        }
    };
}

#[derive(Parser)]
#[command(
    name = "edge-bench",
    about = "skein edge vs HAProxy (reloads): churn and speed"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load through the edge while the backend set changes.
    Churn(ChurnArgs),
    /// wrk through each edge and directly to a backend.
    Speed(SpeedArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Edges to run, in order: `haproxy`, `skein`. Default: haproxy, and
    /// skein when a skein binary is given.
    #[arg(long, value_delimiter = ',')]
    edges: Vec<String>,
    /// A `skein` binary with the `edge` subcommand.
    #[arg(long, env = "SKEIN_BIN")]
    skein_bin: Option<PathBuf>,
    #[arg(long, default_value = "haproxy")]
    haproxy_bin: PathBuf,
    /// Threads of each edge: HAProxy's `nbthread`, skein edge's tokio
    /// workers (`TOKIO_WORKER_THREADS`).
    #[arg(long, default_value_t = 1)]
    edge_threads: usize,
    /// tokio workers of the backend servers (their own runtime).
    #[arg(long, default_value_t = 1)]
    backend_threads: usize,
    /// tokio workers of the client and the churn driver.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// HAProxy's `hard-stop-after` (seconds); unset by default, as in
    /// HAProxy: an old worker lives until its last connection closes.
    #[arg(long)]
    hard_stop_after: Option<u64>,
    /// HAProxy's `option http-server-close` (a new server connection per
    /// request, Marathon-LB's default) or HAProxy's own default,
    /// server connections kept alive: `server-close` or `keep-alive`.
    /// Default: `server-close` for churn (as Marathon-LB ran it),
    /// `keep-alive` for speed (the faster peer).
    #[arg(long)]
    haproxy_http: Option<String>,
    /// HAProxy's HTTP port; skein edge gets the next one.
    #[arg(long, default_value_t = 28080)]
    http_port: u16,
    /// HAProxy's stats port; skein edge gets the next one.
    #[arg(long, default_value_t = 29090)]
    stats_port: u16,
    /// HAProxy's service ports start here, skein edge's 50 above (away
    /// from Marathon-LB's 10000-10100, which other tests on this machine
    /// use).
    #[arg(long, default_value_t = 27000)]
    service_port_base: u16,
    /// One JSON document on stdout (the plain lines go to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChurnArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Requests per second the client aims at.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Client workers (each waits for its answer).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Of the workers, how many keep their connection open (the others
    /// open one per request).
    #[arg(long, default_value_t = 16)]
    keepalive_workers: usize,
    /// Changes to the backend set per second.
    #[arg(long, default_value_t = 50.0)]
    changes_per_sec: f64,
    /// Connections open for the whole run (streams from servers that are
    /// never removed; half on the HTTP port, half on a TCP service port).
    #[arg(long, default_value_t = 20)]
    long_lived: usize,
    #[arg(long, default_value_t = 4)]
    servers: usize,
    #[arg(long, default_value_t = 8)]
    max_servers: usize,
    /// How long a removed server keeps running before it stops.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct SpeedArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// wrk connection counts.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 64])]
    conns: Vec<usize>,
    /// Rounds per figure (the median is printed).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value = "wrk")]
    wrk_bin: PathBuf,
    /// wrk's threads.
    #[arg(long, default_value_t = 1)]
    wrk_threads: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Haproxy,
    Skein,
}

fn kinds(c: &Common) -> anyhow::Result<Vec<Kind>> {
    if c.edges.is_empty() {
        let mut k = vec![Kind::Haproxy];
        if c.skein_bin.is_some() {
            k.push(Kind::Skein);
        }
        return Ok(k);
    }
    c.edges
        .iter()
        .map(|e| match e.as_str() {
            "haproxy" => Ok(Kind::Haproxy),
            "skein" if c.skein_bin.is_some() => Ok(Kind::Skein),
            "skein" => bail!("--edges skein needs --skein-bin (or SKEIN_BIN)"),
            other => bail!("unknown edge {other:?} (haproxy, skein)"),
        })
        .collect()
}

/// Whether HAProxy runs with `option http-server-close`.
fn server_close(c: &Common) -> anyhow::Result<bool> {
    match c.haproxy_http.as_deref() {
        Some("server-close") => Ok(true),
        Some("keep-alive") => Ok(false),
        Some(other) => bail!("--haproxy-http {other:?}: server-close or keep-alive"),
        None => bail!("--haproxy-http has no default here"),
    }
}

fn ports(c: &Common, kind: Kind) -> Ports {
    let off = u16::from(kind == Kind::Skein);
    Ports {
        http: c.http_port + off,
        https: c.http_port + 363 + off,
        stats: c.stats_port + off,
        service_base: c.service_port_base + 50 * off,
    }
}

/// Fails early, naming the port, if one of an edge's ports is taken (for
/// 10 s: another test's listener may be on its way out).
fn ports_free(p: Ports) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ports_bindable(p) {
            Err(e) if std::time::Instant::now() < deadline => {
                say!("waiting for a port: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

fn ports_bindable(p: Ports) -> anyhow::Result<()> {
    for port in [
        p.http,
        p.stats,
        cluster::service_port(p.service_base, WEB_APP),
        cluster::service_port(p.service_base, cluster::STREAM_APP),
        cluster::service_port(p.service_base, TCP_APP),
    ] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} on 127.0.0.1 is taken (see --http-port, --stats-port, --service-port-base)"))?;
    }
    Ok(())
}

fn start(
    c: &Common,
    kind: Kind,
    cluster: &Cluster,
    haproxy_dir: &std::path::Path,
) -> anyhow::Result<Box<dyn Edge>> {
    let p = ports(c, kind);
    ports_free(p)?;
    Ok(match kind {
        Kind::Haproxy => Box::new(Haproxy::start(
            &c.haproxy_bin,
            cluster,
            haproxy::Settings {
                ports: p,
                nbthread: c.edge_threads,
                hard_stop_after: c.hard_stop_after,
                http_server_close: server_close(c)?,
                dir: haproxy_dir.to_path_buf(),
            },
        )?),
        Kind::Skein => {
            let bin = c.skein_bin.as_deref().context("no --skein-bin")?;
            Box::new(SkeinEdge::start(bin, cluster, p, c.edge_threads)?)
        }
    })
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".to_string())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn fairness(c: &Common) -> String {
    format!(
        "threads: each edge {} (HAProxy nbthread {}, skein edge TOKIO_WORKER_THREADS={}), backends {} tokio worker(s), \
         client {} tokio worker(s); no CPU pinning; {} cores shared with other work; HAProxy HTTP {}",
        c.edge_threads,
        c.edge_threads,
        c.edge_threads,
        c.backend_threads,
        c.client_threads,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        match c.haproxy_http.as_deref() {
            Some("server-close") => "option http-server-close (Marathon-LB's)",
            _ => "server connections kept alive (HAProxy's default)",
        }
    )
}

async fn churn_main(a: ChurnArgs) -> anyhow::Result<serde_json::Value> {
    let mut common = a.common.clone();
    common
        .haproxy_http
        .get_or_insert_with(|| "server-close".to_string());
    let c = &common;
    server_close(c)?;
    let kinds = kinds(c)?;
    let o = churn::Options {
        seconds: a.seconds,
        rate: a.rate,
        concurrency: a.concurrency,
        keepalive_workers: a.keepalive_workers.min(a.concurrency),
        changes_per_sec: a.changes_per_sec,
        long_lived: a.long_lived,
        initial_servers: a.servers,
        max_servers: a.max_servers.max(2),
        drain: Duration::from_millis(a.drain_ms),
        timeout: Duration::from_millis(a.timeout_ms),
        seed: a.seed,
        backend_threads: c.backend_threads,
    };
    say!(
        "churn at {}: {} s per edge; client aims at {} req/s with {} workers ({} keep-alive, {} a new connection \
         per request; timeout {} ms) over the vhost {WEB_VHOST} on the HTTP port and /web's service port; {} changes/s \
         to /web (add, remove, mark unhealthy, mark healthy again; {}..={} servers, never without an Up one; a removed \
         server keeps running {} ms); {} long-lived connections (half HTTP streams on a vhost, half on a TCP service \
         port, servers never removed); haproxy hard-stop-after {}; load {}",
        commit(),
        a.seconds,
        a.rate,
        o.concurrency,
        o.keepalive_workers,
        o.concurrency - o.keepalive_workers,
        a.timeout_ms,
        a.changes_per_sec,
        1,
        o.max_servers,
        a.drain_ms,
        a.long_lived,
        c.hard_stop_after
            .map_or("unset".to_string(), |s| format!("{s} s")),
        load()
    );
    say!("{}", fairness(c));
    if !kinds.contains(&Kind::Skein) {
        say!("skein edge: not run (no --skein-bin / SKEIN_BIN)");
    }
    let mut outcomes: Vec<(Kind, churn::Outcome)> = Vec::new();
    for &kind in &kinds {
        let dir = tempfile::tempdir()?;
        let mut world = churn::World::new(&o)?;
        let mut edge = start(c, kind, &world.cluster, dir.path())?;
        let result = churn::run(&o, &mut world, edge.as_mut()).await;
        edge.stop();
        let stable_served = world.stable_served();
        let web_left = world.web_servers();
        world.stop_all();
        let out = result.with_context(|| format!("churn through {:?}", kind))?;
        print_churn(&out, o.long_lived, stable_served, web_left);
        outcomes.push((kind, out));
    }
    let find = |k: Kind| outcomes.iter().find(|(kind, _)| *kind == k).map(|(_, o)| o);
    let (skein, hap) = (find(Kind::Skein), find(Kind::Haproxy));
    let mut summary = String::from("churn: ");
    let part = |o: &churn::Outcome| {
        format!(
            "{} {} failed / {} requests ({} req/s)",
            o.edge,
            thousands(o.counts.failed()),
            thousands(o.counts.sent),
            thousands(o.req_per_s.round() as u64)
        )
    };
    let parts: Vec<String> = [skein, hap].into_iter().flatten().map(part).collect();
    summary.push_str(&parts.join(", "));
    let resets: Vec<String> = [(skein, "skein"), (hap, "haproxy")]
        .into_iter()
        .filter_map(|(o, n)| {
            o.map(|o| format!("{n} {}/{}", o.long_lived_reset, o.long_lived.len()))
        })
        .collect();
    summary.push_str(&format!("; long-lived resets: {}", resets.join(", ")));
    if let Some(h) = hap {
        summary.push_str(&format!(
            "; haproxy processes at end: {} (max {} during the run, {} after the clients closed)",
            h.processes_at_end, h.processes_max, h.processes_after_close
        ));
    }
    say!("{summary}");
    let mut ratio = serde_json::Value::Null;
    if let (Some(s), Some(h)) = (skein, hap) {
        let fs = s.counts.failed() as f64 / s.counts.sent.max(1) as f64;
        let fh = h.counts.failed() as f64 / h.counts.sent.max(1) as f64;
        let failed_ratio = if fh > 0.0 { Some(fs / fh) } else { None };
        let rps = s.req_per_s / h.req_per_s.max(1e-9);
        say!(
            "ratio skein/haproxy (same run): failed fraction {} ({:.4} % vs {:.4} %), req/s {:.2}, p99 latency {:.2}",
            failed_ratio.map_or("n/a (haproxy had none)".to_string(), |r| format!("{r:.3}")),
            fs * 100.0,
            fh * 100.0,
            rps,
            s.latency_p99_ms / h.latency_p99_ms.max(1e-9)
        );
        ratio = json!({"failed_fraction": failed_ratio, "req_per_s": rps,
            "p99_latency": s.latency_p99_ms / h.latency_p99_ms.max(1e-9)});
    } else {
        say!("ratio skein/haproxy: n/a (only one edge ran)");
    }
    Ok(json!({
        "scenario": "churn",
        "commit": commit(),
        "seconds": a.seconds,
        "rate": a.rate,
        "changes_per_sec": a.changes_per_sec,
        "concurrency": o.concurrency,
        "keepalive_workers": o.keepalive_workers,
        "long_lived": a.long_lived,
        "hard_stop_after": c.hard_stop_after,
        "threads": fairness(c),
        "outcomes": outcomes.iter().map(|(_, o)| o).collect::<Vec<_>>(),
        "ratio_skein_over_haproxy": ratio,
    }))
}

fn print_churn(o: &churn::Outcome, long_lived: usize, stable_served: u64, web_left: usize) {
    let c = &o.counts;
    say!(
        "{}: {} requests in {:.1} s ({:.0} req/s), {} OK, {} failed ({:.3} %): {}; latency p50 {:.2} ms, p99 {:.2} ms, \
         max {:.0} ms, {} took ≥ 1 s; {} keep-alive / {} new-connection requests; {} ticks missed (workers busy)",
        o.edge,
        thousands(c.sent),
        o.seconds,
        o.req_per_s,
        thousands(c.ok),
        thousands(c.failed()),
        c.failed() as f64 * 100.0 / c.sent.max(1) as f64,
        c.breakdown(),
        o.latency_p50_ms,
        o.latency_p99_ms,
        o.latency_max_ms,
        o.slower_than_1s,
        thousands(c.sent_keepalive),
        thousands(c.sent_new_conn),
        c.missed_ticks
    );
    for (t, (sent, failed)) in &c.per_target {
        say!("  {t}: {failed} failed / {}", thousands(*sent));
    }
    // Grouped by path and reason: `10 × tcp service port :10002: closed
    // after 3.5–3.6 s`.
    let mut groups: BTreeMap<(String, String), (usize, f64, f64)> = BTreeMap::new();
    for l in o.long_lived.iter().filter(|l| !l.survived) {
        let path = l.label.split(" #").next().unwrap_or("").to_string();
        let reason = l.reason.clone().unwrap_or_default();
        let t = l.failed_after_s.unwrap_or(0.0);
        let g = groups.entry((path, reason)).or_insert((0, f64::MAX, 0.0));
        g.0 += 1;
        g.1 = g.1.min(t);
        g.2 = g.2.max(t);
    }
    let resets: Vec<String> = groups
        .into_iter()
        .map(|((path, reason), (n, lo, hi))| {
            format!("{n} × {path}: {reason} after {lo:.1}–{hi:.1} s")
        })
        .collect();
    say!(
        "  long-lived connections reset: {}/{}{}",
        o.long_lived_reset,
        long_lived,
        if resets.is_empty() {
            String::new()
        } else {
            format!(" ({})", resets.join("; "))
        }
    );
    let changes: Vec<String> = o.changes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    say!(
        "  changes: {} ({:.1}/s: {}); applied {} (apply p99 {:.2} ms), {} apply errors{}; servers started {}, \
         stopped {}, /web servers at end {}; stable servers answered {} streams",
        o.changes.values().sum::<u64>(),
        o.changes.values().sum::<u64>() as f64 / o.seconds.max(1e-9),
        changes.join(", "),
        o.changes_applied,
        o.apply_p99_ms,
        o.apply_errors,
        o.first_apply_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first: {e})")),
        o.servers_started,
        o.servers_stopped,
        web_left,
        stable_served
    );
    say!(
        "  edge processes: max {} during the run (sampled every 10 changes), {} one second after the last change \
         (long-lived connections open), {} two seconds after every client connection closed; {}",
        o.processes_max,
        o.processes_at_end,
        o.processes_after_close,
        o.threads
    );
    if let Some(n) = &o.notes {
        say!("  {n}");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

#[derive(serde::Serialize, Clone)]
struct SpeedRow {
    mode: &'static str,
    conns: usize,
    shape: &'static str,
    target: String,
    req_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    added_p99_ms: Option<f64>,
    errors: u64,
}

async fn speed_main(a: SpeedArgs) -> anyhow::Result<serde_json::Value> {
    let mut common = a.common.clone();
    common
        .haproxy_http
        .get_or_insert_with(|| "keep-alive".to_string());
    let c = &common;
    server_close(c)?;
    let kinds = kinds(c)?;
    let backends = backends::Backends::new(c.backend_threads, 0)?;
    let servers = [backends.spawn("web-0")?, backends.spawn("web-1")?];
    let mut cluster = Cluster::default();
    for (i, s) in servers.iter().enumerate() {
        for app in [WEB_APP, TCP_APP] {
            cluster.add(Task {
                id: format!("{}-{i}", app.trim_start_matches('/')),
                app,
                port: s.addr.port(),
                healthy: true,
            });
        }
    }
    let dir = tempfile::tempdir()?;
    let mut edges: Vec<(Kind, Box<dyn Edge>)> = Vec::new();
    for &k in &kinds {
        edges.push((k, start(c, k, &cluster, dir.path())?));
    }
    // Every route must answer before anything is measured.
    for (_, e) in &edges {
        let p = e.ports();
        let mut t = churn::targets(p);
        t.push(client::Target {
            label: "tcp".to_string(),
            addr: Ports::addr(cluster::service_port(p.service_base, TCP_APP)),
            host: "any".to_string(),
        });
        let counts = client::run(
            client::Load {
                targets: t,
                concurrency: 1,
                rate: 50.0,
                keepalive_workers: 0,
                timeout: Duration::from_secs(2),
                duration: Duration::from_millis(200),
            },
            "web-",
        )
        .await;
        if counts.sent == 0 || counts.failed() > 0 {
            bail!(
                "{} does not answer every route: {}",
                e.name(),
                counts.breakdown()
            );
        }
    }
    say!(
        "speed at {}: wrk -t{} --latency, {} s per run, {} round(s) (median), connections {:?}; /web has 2 servers \
         (round robin), direct = straight to one of them; {}; load {}",
        commit(),
        a.wrk_threads,
        a.seconds,
        a.rounds,
        a.conns,
        fairness(c),
        load()
    );
    for (_, e) in &edges {
        say!("  {}", e.threads());
    }
    let direct_url = format!("http://{}/", servers[0].addr);
    let mut rows: Vec<SpeedRow> = Vec::new();
    let mut ratios: Vec<serde_json::Value> = Vec::new();
    let wrk = |url: String, host: Option<&'static str>, keepalive: bool, conns: usize| {
        let bin = a.wrk_bin.clone();
        let (threads, secs) = (a.wrk_threads, a.seconds);
        async move { speed::wrk(&bin, &url, host, keepalive, conns, threads, secs).await }
    };
    for keepalive in [true, false] {
        let mode = if keepalive {
            "keep-alive"
        } else {
            "new connection per request"
        };
        for &conns in &a.conns {
            say!("{mode}, {conns} connections:");
            let mut runs: BTreeMap<(&'static str, String), Vec<speed::Wrk>> = BTreeMap::new();
            for round in 0..a.rounds {
                let d = wrk(direct_url.clone(), None, keepalive, conns).await?;
                runs.entry(("direct", "direct".to_string()))
                    .or_default()
                    .push(d);
                for shape in ["vhost", "tcp"] {
                    let mut order: Vec<usize> = (0..edges.len()).collect();
                    if round % 2 == 1 {
                        order.reverse();
                    }
                    for i in order {
                        let e = &edges[i].1;
                        let p = e.ports();
                        let (url, host) = if shape == "vhost" {
                            (format!("http://127.0.0.1:{}/", p.http), Some(WEB_VHOST))
                        } else {
                            (
                                format!(
                                    "http://127.0.0.1:{}/",
                                    cluster::service_port(p.service_base, TCP_APP)
                                ),
                                None,
                            )
                        };
                        let w = wrk(url, host, keepalive, conns).await?;
                        runs.entry((shape, e.name())).or_default().push(w);
                    }
                }
            }
            let med = |v: &Vec<speed::Wrk>| {
                (
                    median(v.iter().map(|w| w.req_per_s).collect()),
                    median(v.iter().map(|w| w.p50_ms).collect()),
                    median(v.iter().map(|w| w.p99_ms).collect()),
                    v.iter().map(|w| w.errors).sum::<u64>(),
                )
            };
            let direct = runs
                .get(&("direct", "direct".to_string()))
                .map(med)
                .unwrap_or_default();
            say!(
                "  {:<6} {:<28} {:>9.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms{}",
                "direct",
                "to a backend",
                direct.0,
                direct.1,
                direct.2,
                if direct.3 > 0 {
                    format!("  ({} errors)", direct.3)
                } else {
                    String::new()
                }
            );
            rows.push(SpeedRow {
                mode,
                conns,
                shape: "direct",
                target: "direct".to_string(),
                req_per_s: direct.0,
                p50_ms: direct.1,
                p99_ms: direct.2,
                added_p99_ms: None,
                errors: direct.3,
            });
            for shape in ["vhost", "tcp"] {
                let mut by_kind: BTreeMap<&str, f64> = BTreeMap::new();
                for (k, e) in &edges {
                    let Some(v) = runs.get(&(shape, e.name())) else {
                        continue;
                    };
                    let m = med(v);
                    by_kind.insert(
                        if *k == Kind::Skein {
                            "skein"
                        } else {
                            "haproxy"
                        },
                        m.0,
                    );
                    say!(
                        "  {:<6} {:<28} {:>9.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  added p99 {:+.3} ms ({:.2}x direct req/s){}",
                        shape,
                        e.name(),
                        m.0,
                        m.1,
                        m.2,
                        m.2 - direct.2,
                        m.0 / direct.0.max(1e-9),
                        if m.3 > 0 {
                            format!("  ({} errors)", m.3)
                        } else {
                            String::new()
                        }
                    );
                    rows.push(SpeedRow {
                        mode,
                        conns,
                        shape,
                        target: e.name(),
                        req_per_s: m.0,
                        p50_ms: m.1,
                        p99_ms: m.2,
                        added_p99_ms: Some(m.2 - direct.2),
                        errors: m.3,
                    });
                }
                if let (Some(s), Some(h)) = (by_kind.get("skein"), by_kind.get("haproxy")) {
                    // The rounds' own ratios (each pair measured back to back).
                    let name = |k: Kind| {
                        edges
                            .iter()
                            .find(|(kind, _)| *kind == k)
                            .map(|(_, e)| e.name())
                    };
                    let per_round: Vec<f64> = match (name(Kind::Skein), name(Kind::Haproxy)) {
                        (Some(sn), Some(hn)) => {
                            match (runs.get(&(shape, sn)), runs.get(&(shape, hn))) {
                                (Some(sv), Some(hv)) => sv
                                    .iter()
                                    .zip(hv)
                                    .map(|(a, b)| a.req_per_s / b.req_per_s.max(1e-9))
                                    .collect(),
                                _ => Vec::new(),
                            }
                        }
                        _ => Vec::new(),
                    };
                    let listed: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
                    say!(
                        "  {:<6} ratio skein/haproxy req/s {:.2} (of the medians; rounds [{}], their median {:.2}; target ≥ 0.9)",
                        shape,
                        s / h.max(1e-9),
                        listed.join(", "),
                        median(per_round.clone())
                    );
                    ratios.push(json!({"mode": mode, "conns": conns, "shape": shape,
                        "ratio_of_medians": s / h.max(1e-9), "rounds": per_round}));
                }
            }
        }
    }
    for (_, e) in edges.iter_mut() {
        e.stop();
    }
    say!("load now {}", load());
    Ok(json!({
        "scenario": "speed",
        "commit": commit(),
        "seconds": a.seconds,
        "rounds": a.rounds,
        "wrk_threads": a.wrk_threads,
        "threads": fairness(c),
        "rows": rows,
        "ratios_skein_over_haproxy": ratios,
    }))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = match &cli.cmd {
        Cmd::Churn(a) => a.common.clone(),
        Cmd::Speed(a) => a.common.clone(),
    };
    JSON.store(common.json, Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.client_threads.max(1))
        .enable_all()
        .build()?;
    let doc = rt.block_on(async {
        match cli.cmd {
            Cmd::Churn(a) => churn_main(a).await,
            Cmd::Speed(a) => speed_main(a).await,
        }
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    if common.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}
