//! The churn scenario: load through an edge while the backend set of
//! `/web` changes many times a second.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backends::{Backends, Server};
use crate::client::{self, Counts, Load, LongLived, Target};
use crate::cluster::{self, Change, Cluster, Task, STREAM_APP, TCP_APP, WEB_APP};
use crate::edge::{Edge, Ports};

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) seconds: u64,
    /// Requests per second the client aims at.
    pub(crate) rate: f64,
    pub(crate) concurrency: usize,
    /// Of the workers, how many keep their connection.
    pub(crate) keepalive_workers: usize,
    pub(crate) changes_per_sec: f64,
    pub(crate) long_lived: usize,
    pub(crate) initial_servers: usize,
    pub(crate) max_servers: usize,
    /// How long a removed server keeps running.
    pub(crate) drain: Duration,
    pub(crate) timeout: Duration,
    pub(crate) seed: u64,
    pub(crate) backend_threads: usize,
}

/// A small xorshift generator: the same seed, the same changes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

struct WebServer {
    task: Task,
    server: Server,
}

/// Everything the driver owns: the tasks, the running servers.
pub(crate) struct World {
    backends: Backends,
    pub(crate) cluster: Cluster,
    web: Vec<WebServer>,
    draining: Vec<(Instant, Server)>,
    stable: Vec<Server>,
    next: usize,
    rng: Rng,
    pub(crate) changes: BTreeMap<&'static str, u64>,
    pub(crate) servers_started: u64,
    pub(crate) servers_stopped: u64,
}

impl World {
    /// `initial` servers of `/web` and two stable ones behind `/stream`
    /// and `/stream-tcp`.
    pub(crate) fn new(o: &Options) -> anyhow::Result<World> {
        let backends = Backends::new(o.backend_threads, 0)?;
        let mut w = World {
            backends,
            cluster: Cluster::default(),
            web: Vec::new(),
            draining: Vec::new(),
            stable: Vec::new(),
            next: 0,
            rng: Rng(o.seed.max(1)),
            changes: BTreeMap::new(),
            servers_started: 0,
            servers_stopped: 0,
        };
        for i in 0..2 {
            let s = w.backends.spawn(&format!("stream-{i}"))?;
            for app in [STREAM_APP, TCP_APP] {
                w.cluster.add(Task {
                    id: format!("{}-{i}", app.trim_start_matches('/')),
                    app,
                    port: s.addr.port(),
                    healthy: true,
                });
            }
            w.stable.push(s);
        }
        for _ in 0..o.initial_servers.max(1) {
            let c = w.add_web()?;
            if let Change::Added(t) = c {
                w.cluster.add(t);
            }
        }
        Ok(w)
    }

    /// Starts a new `/web` server; returns its task (not yet added).
    fn add_web(&mut self) -> anyhow::Result<Change> {
        let n = self.next;
        self.next += 1;
        let server = self.backends.spawn(&format!("web-{n}"))?;
        self.servers_started += 1;
        let task = Task {
            id: format!("web-{n}"),
            app: WEB_APP,
            port: server.addr.port(),
            healthy: true,
        };
        self.web.push(WebServer {
            task: task.clone(),
            server,
        });
        Ok(Change::Added(task))
    }

    fn ups(&self) -> usize {
        self.web.iter().filter(|w| w.task.healthy).count()
    }

    /// Makes one change to `/web` (never leaving it without an Up
    /// server) and stops removed servers whose time is up.
    pub(crate) fn step(&mut self, max_servers: usize, drain: Duration) -> anyhow::Result<Change> {
        let now = Instant::now();
        let before = self.draining.len();
        self.draining.retain(|(until, _)| *until > now);
        self.servers_stopped += (before - self.draining.len()) as u64;

        let ups = self.ups();
        let removable: Vec<usize> = (0..self.web.len())
            .filter(|&i| !self.web[i].task.healthy || ups >= 2)
            .collect();
        let unhealthy: Vec<usize> = (0..self.web.len())
            .filter(|&i| !self.web[i].task.healthy)
            .collect();
        let mut ops: Vec<&'static str> = Vec::new();
        if self.web.len() < max_servers {
            ops.push("added");
        }
        if self.web.len() > 1 && !removable.is_empty() {
            ops.push("removed");
        }
        if ups >= 2 {
            ops.push("marked unhealthy");
        }
        if !unhealthy.is_empty() {
            ops.push("marked healthy again");
        }
        let op = ops[self.rng.below(ops.len())];
        *self.changes.entry(op).or_default() += 1;
        let change = match op {
            "added" => {
                let c = self.add_web()?;
                if let Change::Added(t) = &c {
                    self.cluster.add(t.clone());
                }
                c
            }
            "removed" => {
                let i = removable[self.rng.below(removable.len())];
                let w = self.web.remove(i);
                self.cluster.remove(&w.task.id);
                // Keeps running (draining) for a while, then stops.
                self.draining.push((now + drain, w.server));
                Change::Removed(w.task)
            }
            _ => {
                let candidates: Vec<usize> = if op == "marked unhealthy" {
                    (0..self.web.len())
                        .filter(|&i| self.web[i].task.healthy)
                        .collect()
                } else {
                    unhealthy
                };
                let i = candidates[self.rng.below(candidates.len())];
                let w = &mut self.web[i];
                w.task.healthy = !w.task.healthy;
                if let Some(t) = self.cluster.get_mut(&w.task.id) {
                    t.healthy = w.task.healthy;
                }
                Change::Health(w.task.clone())
            }
        };
        Ok(change)
    }

    pub(crate) fn web_servers(&self) -> usize {
        self.web.len()
    }

    pub(crate) fn stop_all(&mut self) {
        for s in self.stable.drain(..) {
            s.stop();
        }
        for w in self.web.drain(..) {
            w.server.stop();
        }
        for (_, s) in self.draining.drain(..) {
            s.stop();
        }
    }

    pub(crate) fn stable_served(&self) -> u64 {
        self.stable.iter().map(|s| s.served()).sum()
    }
}

/// One edge's churn run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    pub(crate) edge: String,
    pub(crate) seconds: f64,
    pub(crate) counts: Counts,
    pub(crate) req_per_s: f64,
    pub(crate) latency_p50_ms: f64,
    pub(crate) latency_p99_ms: f64,
    pub(crate) latency_max_ms: f64,
    /// Requests that took a second or more (a worker busy that long
    /// skips its ticks: see `missed_ticks`).
    pub(crate) slower_than_1s: usize,
    pub(crate) long_lived: Vec<LongLived>,
    pub(crate) long_lived_reset: usize,
    pub(crate) changes: BTreeMap<&'static str, u64>,
    pub(crate) changes_applied: u64,
    pub(crate) apply_errors: u64,
    pub(crate) first_apply_error: Option<String>,
    pub(crate) apply_p99_ms: f64,
    pub(crate) processes_max: usize,
    /// One second after the last change, long-lived connections still open.
    pub(crate) processes_at_end: usize,
    /// Two seconds after every client connection closed.
    pub(crate) processes_after_close: usize,
    pub(crate) threads: String,
    pub(crate) notes: Option<String>,
    pub(crate) servers_started: u64,
    pub(crate) servers_stopped: u64,
}

/// A request through each route must work before the run starts.
async fn warm_up(targets: &[Target]) -> anyhow::Result<()> {
    let load = Load {
        targets: targets.to_vec(),
        concurrency: 1,
        rate: 100.0,
        keepalive_workers: 0,
        timeout: Duration::from_secs(2),
        duration: Duration::from_millis(200),
    };
    let mut last = Counts::default();
    for _ in 0..25 {
        last = client::run(load.clone(), "web-").await;
        if last.sent > 0 && last.failed() == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!(
        "the edge does not answer before the churn starts: {} of {} failed ({})",
        last.failed(),
        last.sent,
        last.breakdown()
    )
}

pub(crate) fn targets(ports: Ports) -> Vec<Target> {
    vec![
        Target {
            label: format!("vhost {} on :{}", cluster::WEB_VHOST, ports.http),
            addr: Ports::addr(ports.http),
            host: cluster::WEB_VHOST.to_string(),
        },
        Target {
            label: format!(
                "service port :{}",
                cluster::service_port(ports.service_base, WEB_APP)
            ),
            addr: Ports::addr(cluster::service_port(ports.service_base, WEB_APP)),
            host: "any.example.com".to_string(),
        },
    ]
}

/// Runs the scenario against `edge` (already serving `world.cluster`).
pub(crate) async fn run(
    o: &Options,
    world: &mut World,
    edge: &mut dyn Edge,
) -> anyhow::Result<Outcome> {
    let ports = edge.ports();
    let targets = targets(ports);
    warm_up(&targets).await?;

    // The long-lived connections: half over the HTTP port's vhost, half
    // over the TCP service port, all on servers that are never removed.
    // They outlive the load by 2 s: the edge's processes are counted 1 s
    // after the last change, with them still open.
    let end = tokio::time::Instant::now() + Duration::from_secs(o.seconds) + Duration::from_secs(2);
    let mut long = Vec::new();
    for i in 0..o.long_lived {
        let (label, addr, host) = if i % 2 == 0 {
            (
                format!("http vhost {} #{i}", cluster::STREAM_VHOST),
                Ports::addr(ports.http),
                cluster::STREAM_VHOST.to_string(),
            )
        } else {
            let port = cluster::service_port(ports.service_base, TCP_APP);
            (
                format!("tcp service port :{port} #{i}"),
                Ports::addr(port),
                "any".to_string(),
            )
        };
        long.push(tokio::spawn(client::long_lived(label, addr, host, end)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let load = Load {
        targets,
        concurrency: o.concurrency,
        rate: o.rate,
        keepalive_workers: o.keepalive_workers,
        timeout: o.timeout,
        duration: Duration::from_secs(o.seconds),
    };
    let started = Instant::now();
    let changes_before = world.changes.clone();
    let mut apply_us: Vec<u64> = Vec::new();
    let mut apply_errors = 0u64;
    let mut first_apply_error = None;
    let mut processes_max = edge.processes();
    let drive = async {
        let period = Duration::from_secs_f64(1.0 / o.changes_per_sec.max(0.001));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = tokio::time::Instant::now() + Duration::from_secs(o.seconds);
        let mut n = 0u64;
        loop {
            ticker.tick().await;
            if tokio::time::Instant::now() >= stop {
                break;
            }
            match world.step(o.max_servers, o.drain) {
                Ok(change) => {
                    let t0 = Instant::now();
                    if let Err(e) = edge.apply(&world.cluster, &change) {
                        apply_errors += 1;
                        first_apply_error
                            .get_or_insert_with(|| format!("{}: {e:#}", change.describe()));
                    }
                    apply_us.push(t0.elapsed().as_micros() as u64);
                }
                Err(e) => {
                    apply_errors += 1;
                    first_apply_error.get_or_insert_with(|| format!("starting a server: {e:#}"));
                }
            }
            n += 1;
            if n % 10 == 0 {
                processes_max = processes_max.max(edge.processes());
            }
        }
    };
    let (mut counts, ()) = tokio::join!(client::run(load, "web-"), drive);
    let elapsed = started.elapsed().as_secs_f64();
    // A snapshot during a reload can miss the worker being forked: let the
    // last reload finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let processes_at_end = edge.processes();
    processes_max = processes_max.max(processes_at_end);
    let mut long_lived = Vec::new();
    for h in long {
        match h.await {
            Ok(l) => long_lived.push(l),
            Err(e) => anyhow::bail!("a long-lived connection's task failed: {e}"),
        }
    }
    // Every client connection is closed now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let processes_after_close = edge.processes();
    apply_us.sort_unstable();
    let apply_p99_ms = apply_us
        .get((apply_us.len().saturating_sub(1) as f64 * 0.99) as usize)
        .map_or(0.0, |&us| us as f64 / 1000.0);
    let mut changes = world.changes.clone();
    for (k, v) in changes.iter_mut() {
        *v -= changes_before.get(k).copied().unwrap_or(0);
    }
    let long_lived_reset = long_lived.iter().filter(|l| !l.survived).count();
    Ok(Outcome {
        edge: format!("{} ({})", edge.name(), edge.updated_by()),
        seconds: elapsed,
        req_per_s: counts.sent as f64 / elapsed,
        latency_p50_ms: counts.latency_ms(0.5),
        latency_p99_ms: counts.latency_ms(0.99),
        latency_max_ms: counts.latency_ms(1.0),
        slower_than_1s: counts
            .latencies_us
            .iter()
            .filter(|&&us| us >= 1_000_000)
            .count(),
        counts,
        long_lived,
        long_lived_reset,
        changes,
        changes_applied: edge.applies(),
        apply_errors,
        first_apply_error,
        apply_p99_ms,
        processes_max,
        processes_at_end,
        processes_after_close,
        threads: edge.threads(),
        notes: edge.notes(),
        servers_started: world.servers_started,
        servers_stopped: world.servers_stopped,
    })
}
