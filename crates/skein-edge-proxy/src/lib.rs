//! `skein edge`: the edge load balancer, serving the routes `skein-edge`
//! computes from Marathon-LB's labels, with Marathon-LB's ports and
//! endpoints.
//!
//! Marathon-LB rendered an HAProxy configuration and reloaded HAProxy on
//! every change; reloads dropped requests and piled up processes. Here one
//! process applies a new route set by compiling it into a [`state`] table
//! and swapping an `Arc`: established connections never see the change,
//! bind ports are added and removed one by one, and a server that leaves
//! gets no new requests while its open ones finish (its tunnels close after
//! the drain time). Route sets come from the local agent's long-poll
//! endpoint or from a file.

mod auth;
mod client;
pub mod handover;
mod listen;
mod lock;
mod proxy;
mod source;
mod state;
mod stats;
mod tls;
mod tunnel;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use skein_edge::Routes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use lock::{acquire as lock_state_dir, PidLock};
pub use stats::{print_status, BackendStatus, FrontendStatus, ServerStatus, StatusDoc};

use crate::handover::{Inherited, ListenerKind};
use crate::listen::Listeners;
use crate::state::{Counters, Limits, Registry, Table};

/// Marathon-LB's default timeouts.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// Connecting to a server (`timeout connect`, 3 s).
    pub connect: Duration,
    /// Waiting for a client's request head (`timeout client`, 30 s).
    pub client: Duration,
    /// Waiting for a server's response head (`timeout server`, 30 s).
    pub server: Duration,
    /// An idle TCP or upgraded connection (`timeout tunnel`, 3600 s).
    pub tunnel: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            client: Duration::from_secs(30),
            server: Duration::from_secs(30),
            tunnel: Duration::from_secs(3600),
        }
    }
}

/// Where route sets come from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// The local agent's `GET /v1/edge` long poll.
    Agent { url: String, token: Option<String> },
    /// A JSON file (`Routes`, or `{"version", "routes"}`), re-read when it
    /// changes.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: RouteSource,
    /// Edge groups served (backends in none of them are ignored).
    pub groups: Vec<String>,
    pub bind: IpAddr,
    pub http_port: u16,
    pub https_port: u16,
    pub stats_port: u16,
    /// Service ports bound without an explicit `HAPROXY_{n}_PORT`.
    pub service_ports: RangeInclusive<u16>,
    pub timeouts: Timeouts,
    /// How long connections to a removed server may stay open.
    pub drain_timeout: Duration,
    /// Served to HTTPS clients whose SNI names no backend's certificate.
    pub default_cert: Option<PathBuf>,
}

impl Config {
    pub fn new(source: RouteSource) -> Config {
        Config {
            source,
            groups: vec!["external".to_string()],
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            http_port: 80,
            https_port: 443,
            stats_port: 9090,
            service_ports: 10000..=10100,
            timeouts: Timeouts::default(),
            drain_timeout: Duration::from_secs(30),
            default_cert: None,
        }
    }
}

/// The document `GET /v1/edge` answers (and a route file may hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeDoc {
    pub version: u64,
    pub routes: Routes,
}

/// Route-apply timings, for `/metrics`.
#[derive(Default)]
pub(crate) struct ApplyStats {
    pub count: AtomicU64,
    pub rejected: AtomicU64,
    pub last_micros: AtomicU64,
    pub sum_micros: AtomicU64,
    /// Cumulative counts per bucket of [`APPLY_BUCKETS_MICROS`].
    pub buckets: [AtomicU64; APPLY_BUCKETS_MICROS.len()],
}

pub(crate) const APPLY_BUCKETS_MICROS: [u64; 8] = [50, 100, 250, 500, 1000, 2500, 10_000, 100_000];

/// Everything the tasks of one edge share.
pub(crate) struct Shared {
    pub cfg: Config,
    pub table: ArcSwap<Table>,
    pub registry: Registry,
    pub drains: state::Drains,
    pub certs: Arc<tls::CertStore>,
    pub listeners: Mutex<Listeners>,
    pub auth: auth::AuthCache,
    pub apply: ApplyStats,
    /// Wakes the route source to fetch now (`/_mlb_signal/hup`).
    pub refetch: Notify,
    pub base: Instant,
    pub addrs: Mutex<Addrs>,
    pub http_fe: Arc<Counters>,
    pub https_fe: Arc<Counters>,
    pub stats_fe: Arc<Counters>,
    /// What the route source last said about itself (for the status).
    pub source_state: Mutex<String>,
    /// A route set rejected (the last one's reason), kept until one applies.
    pub rejected: Mutex<Option<String>>,
    /// Serialises appliers (the source and signals).
    apply_lock: tokio::sync::Mutex<()>,
    /// Sockets taken over from a previous edge, until the first apply.
    pub inherited: Mutex<Inherited>,
    /// Problems already logged (each is logged once, when it appears).
    logged_problems: Mutex<BTreeSet<String>>,
    /// Copies of the HTTP, HTTPS and stats sockets, to hand over.
    own_fds: Vec<(ListenerKind, SocketAddr, OwnedFd)>,
    /// What stops when the listeners are handed over.
    stoppable: Mutex<Vec<tokio::task::AbortHandle>>,
    handed_over: watch::Sender<bool>,
}

/// The addresses the edge listens on (ports resolved when 0 was asked).
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub stats: SocketAddr,
}

impl Shared {
    /// Copies of every listening socket (kind, address), to hand over.
    fn listening_copies(&self) -> Vec<(ListenerKind, SocketAddr, OwnedFd)> {
        let mut out: Vec<(ListenerKind, SocketAddr, OwnedFd)> = self
            .own_fds
            .iter()
            .filter_map(|(k, a, fd)| Some((k.clone(), *a, fd.try_clone().ok()?)))
            .collect();
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        for l in listeners.ports.values() {
            if let Ok(fd) = l.fd.try_clone() {
                out.push((ListenerKind::Port, l.addr, fd));
            }
        }
        out
    }

    pub(crate) fn https_port(&self) -> u16 {
        self.addrs
            .lock()
            .map(|a| a.https.port())
            .unwrap_or(self.cfg.https_port)
    }

    /// Logs each problem of the routes (a label that disables, a conflict
    /// lost, a port this edge refuses) once, when it first appears.
    fn log_new_problems(&self, table: &Table) {
        let now: BTreeSet<String> = table
            .problems
            .iter()
            .map(|p| p.to_string())
            .chain(table.local_problems.iter().cloned())
            .collect();
        let mut logged = self
            .logged_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for p in now.difference(&logged) {
            tracing::warn!(problem = %p, "edge route problem");
        }
        *logged = now;
    }

    /// Applies a route set: compile, swap, reconcile bind ports and
    /// certificates, start drains. Returns how long it took.
    pub(crate) async fn apply(self: &Arc<Self>, version: u64, routes: Routes) -> Duration {
        self.apply_changes(version, routes, None).await
    }

    /// [`Shared::apply`], for a route set the agent sent as a delta from
    /// the table's version (`changes`): then only what changed is
    /// compiled, and listeners and certificates are looked at only if
    /// what changed touches them.
    pub(crate) async fn apply_changes(
        self: &Arc<Self>,
        version: u64,
        routes: Routes,
        changes: Option<state::Changes>,
    ) -> Duration {
        let _one = self.apply_lock.lock().await;
        let started = Instant::now();
        let groups = &self.cfg.groups;
        let ours = |b: &skein_edge::Backend| b.labels.groups.iter().any(|g| groups.contains(g));
        // A delta's backends are this edge's groups' (the agent filtered
        // them); one that is not makes it a whole compilation.
        let changes = changes.filter(|c| c.upsert.iter().all(|b| ours(b)));
        let addrs = *self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = [addrs.http.port(), addrs.https.port(), addrs.stats.port()];
        let limits = Limits {
            service_ports: &self.cfg.service_ports,
            reserved: &reserved,
        };
        let prev = self.table.load_full();
        let patched = changes.as_ref().and_then(|c| {
            let (table, left, ports) = state::compile_delta(
                &self.registry,
                &prev,
                version,
                &routes,
                c,
                &limits,
                self.base,
            )?;
            // Certificates follow the routes and the backends' labels.
            let certs = c.routes_changed
                || c.upsert.iter().any(|b| !b.labels.ssl_certs.is_empty())
                || c.remove.iter().any(|n| {
                    prev.backends
                        .get(&**n)
                        .is_some_and(|e| !e.spec.labels.ssl_certs.is_empty())
                });
            Some((table, left, ports, certs))
        });
        let (mut table, left, known, ports_changed, certs_changed) = match patched {
            Some((table, left, ports, certs)) => (table, left, routes.backends, ports, certs),
            None => {
                let routes = for_groups(routes, groups);
                let (table, left, known) =
                    state::compile(&self.registry, &prev, version, routes, &limits, self.base);
                (table, left, known, true, true)
            }
        };
        let wanted = ports_changed.then(|| {
            let mut wanted: BTreeMap<(IpAddr, u16), String> = BTreeMap::new();
            for (port, b) in &table.by_port {
                let ip = b.spec.labels.bind_addr.unwrap_or(self.cfg.bind);
                wanted.insert((ip, *port), b.spec.name.to_string());
            }
            wanted
        });
        if certs_changed {
            table.local_problems.extend(self.certs.update(&table));
        } else {
            // The certificates' problems stay what they were.
            table.local_problems.extend(
                prev.local_problems
                    .get(prev.bind_problems.len()..)
                    .unwrap_or_default()
                    .iter()
                    .cloned(),
            );
        }
        self.log_new_problems(&table);
        // The table goes live before new ports accept, so their first
        // connection finds its backend. Ports that cannot be bound are
        // kept by the listeners (and shown in the status).
        self.table.store(Arc::new(table));
        if let Some(wanted) = wanted {
            self.listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reconcile(self, &wanted);
        }
        // Sockets taken over but no longer routed close now.
        self.inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sockets
            .clear();
        for rt in left {
            // One with nothing open is forgotten already (and one that gets
            // a tunnel in the meantime queues its own drain).
            if rt.c.scur() > 0 {
                tracing::info!(backend = %rt.backend, server = %rt.name, "server left the routes: no new requests, draining");
                self.drains.start(&rt, self.cfg.drain_timeout);
            } else {
                tracing::info!(backend = %rt.backend, server = %rt.name, "server left the routes with nothing open");
            }
        }
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Serving the new routes from here; freeing the old table is not
        // part of the change's latency.
        let took = started.elapsed();
        drop((prev, known));
        let micros = took.as_micros() as u64;
        let a = &self.apply;
        a.count.fetch_add(1, Ordering::Relaxed);
        a.last_micros.store(micros, Ordering::Relaxed);
        a.sum_micros.fetch_add(micros, Ordering::Relaxed);
        for (i, le) in APPLY_BUCKETS_MICROS.iter().enumerate() {
            if micros <= *le {
                a.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        tracing::info!(version, micros, "routes applied");
        took
    }

    pub(crate) fn reject(&self, why: String) {
        tracing::warn!(reason = %why, "route set rejected; the previous routes stay");
        self.apply.rejected.fetch_add(1, Ordering::Relaxed);
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

/// `Routes::for_groups`, consuming (no copy of what is kept).
fn for_groups(mut routes: Routes, groups: &[String]) -> Routes {
    let ours = |b: &skein_edge::Backend| b.labels.groups.iter().any(|g| groups.contains(g));
    if routes.backends.iter().all(|b| ours(b)) {
        // Every backend is this edge's (one group, as usual): nothing to
        // filter, no set of names to build.
        return routes;
    }
    routes
        .backends
        .retain(|b| b.labels.groups.iter().any(|g| groups.contains(g)));
    let names: std::collections::HashSet<&str> = routes.backends.iter().map(|b| &*b.name).collect();
    let http_routes = std::mem::take(&mut routes.http_routes)
        .into_iter()
        .filter(|r| names.contains(&*r.backend))
        .collect();
    drop(names);
    routes.http_routes = http_routes;
    routes
}

/// A running edge.
pub struct Edge {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Bind-port accept loops hold the shared state: stop them.
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ports
            .clear();
    }
}

impl Edge {
    /// Binds the HTTP, HTTPS and stats ports (0: any free port) and starts
    /// serving; routes arrive from the source.
    pub async fn start(cfg: Config) -> anyhow::Result<Edge> {
        Edge::start_inheriting(cfg, Inherited::default()).await
    }

    /// Starts with sockets taken over from a running edge
    /// ([`handover::receive`]): those matching a port this edge serves are
    /// used instead of binding it.
    pub async fn start_inheriting(cfg: Config, mut inherited: Inherited) -> anyhow::Result<Edge> {
        let default_cert = match &cfg.default_cert {
            Some(p) => Some(tls::load(&[p]).map_err(|e| anyhow::anyhow!("--default-cert: {e}"))?),
            None => None,
        };
        let certs = Arc::new(tls::CertStore::new(default_cert));
        let mut open = |kind: ListenerKind, port: u16, what: &str| {
            let addr = SocketAddr::new(cfg.bind, port);
            let std = match inherited.take(kind.clone(), addr) {
                Some(l) => {
                    tracing::info!(%addr, what, "listening on a socket taken over");
                    l
                }
                None => listen::bind_std(addr)
                    .with_context(|| format!("cannot listen on {addr} ({what})"))?,
            };
            let local = std.local_addr()?;
            let copy = OwnedFd::from(std.try_clone()?);
            anyhow::Ok((tokio::net::TcpListener::from_std(std)?, (kind, local, copy)))
        };
        let (http, http_fd) = open(ListenerKind::Http, cfg.http_port, "HTTP")?;
        let (https, https_fd) = open(ListenerKind::Https, cfg.https_port, "HTTPS")?;
        let (stats, stats_fd) = open(ListenerKind::Stats, cfg.stats_port, "stats")?;
        let addrs = Addrs {
            http: http.local_addr()?,
            https: https.local_addr()?,
            stats: stats.local_addr()?,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(certs.clone())?);
        let shared = Arc::new(Shared {
            cfg,
            table: ArcSwap::from_pointee(Table::default()),
            registry: Registry::default(),
            drains: state::Drains::default(),
            certs,
            listeners: Mutex::default(),
            auth: auth::AuthCache::default(),
            apply: ApplyStats::default(),
            refetch: Notify::new(),
            base: Instant::now(),
            addrs: Mutex::new(addrs),
            http_fe: Arc::default(),
            https_fe: Arc::default(),
            stats_fe: Arc::default(),
            source_state: Mutex::new("starting".to_string()),
            rejected: Mutex::new(None),
            apply_lock: tokio::sync::Mutex::new(()),
            inherited: Mutex::new(inherited),
            logged_problems: Mutex::default(),
            own_fds: vec![http_fd, https_fd, stats_fd],
            stoppable: Mutex::default(),
            handed_over: watch::channel(false).0,
        });
        tracing::info!(http = %addrs.http, https = %addrs.https, stats = %addrs.stats, "edge listening");
        let stoppable = vec![
            tokio::spawn(listen::accept_http(
                shared.clone(),
                http,
                shared.http_fe.clone(),
            )),
            tokio::spawn(listen::accept_https(
                shared.clone(),
                https,
                acceptor,
                shared.https_fe.clone(),
            )),
            tokio::spawn(stats::serve(shared.clone(), stats)),
            tokio::spawn(source::run(shared.clone())),
        ];
        *shared.stoppable.lock().unwrap_or_else(|e| e.into_inner()) =
            stoppable.iter().map(|t| t.abort_handle()).collect();
        let mut tasks = stoppable;
        tasks.push(tokio::spawn(gc(shared.clone())));
        let drains = shared.clone();
        tasks.push(tokio::spawn(async move { drains.drains.run().await }));
        Ok(Edge { shared, tasks })
    }

    /// Serves [`handover::SOCKET`] in `state_dir`: a new edge asking gets
    /// every listening socket; this edge then stops accepting and fetching
    /// routes, and releases `lock` (see [`Edge::handed_over`]).
    pub fn serve_handover(&self, state_dir: &Path, lock: PidLock) -> anyhow::Result<()> {
        let (listener, path) = handover::listen(state_dir)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let mut lock = Some(lock);
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, path = %path.display(), "handover accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let sockets = shared.listening_copies();
                let sent = tokio::task::spawn_blocking(move || {
                    let std = stream.into_std()?;
                    std.set_nonblocking(false)?;
                    handover::read_request(&std)?;
                    let raw: Vec<_> = sockets
                        .iter()
                        .map(|(k, a, fd)| (k.clone(), *a, fd.as_raw_fd()))
                        .collect();
                    handover::send(&std, &raw)?;
                    anyhow::Ok(raw.len())
                })
                .await;
                match sent {
                    Ok(Ok(n)) => {
                        tracing::info!(sockets = n, "listeners handed over to a new edge: no longer accepting; finishing open connections");
                        for h in shared
                            .stoppable
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .drain(..)
                        {
                            h.abort();
                        }
                        shared
                            .listeners
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .ports
                            .clear();
                        drop(lock.take());
                        shared.handed_over.send_replace(true);
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %format!("{e:#}"), "handover failed; still serving")
                    }
                    Err(e) => tracing::warn!(error = %e, "handover failed; still serving"),
                }
            }
        });
        // The handover task holds the shared state: stopped with the edge.
        self.shared
            .stoppable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task.abort_handle());
        Ok(())
    }

    /// Resolves once the listeners were handed over to a new edge.
    pub async fn handed_over(&self) {
        let mut rx = self.shared.handed_over.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Waits until no request, tunnel or TCP connection is open (idle
    /// keep-alive client connections do not count), or `limit` passed.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.shared.registry.busy() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addrs(&self) -> Addrs {
        *self.shared.addrs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version of the route set in use (0 before the first).
    pub fn version(&self) -> u64 {
        self.shared.table.load().version
    }

    /// How many route sets were applied.
    pub fn applied(&self) -> u64 {
        self.shared.apply.count.load(Ordering::Relaxed)
    }

    /// How many route sets were rejected.
    pub fn rejected(&self) -> u64 {
        self.shared.apply.rejected.load(Ordering::Relaxed)
    }

    /// Applies a route set directly (as the source would).
    pub async fn apply(&self, version: u64, routes: Routes) -> Duration {
        self.shared.apply(version, routes).await
    }

    /// Applies the agent's delta from `last` (the routes this edge has),
    /// as the source does; returns the routes it made and how long
    /// applying them took.
    pub async fn apply_delta(
        &self,
        last: &Routes,
        delta: skein_edge::EdgeDelta,
    ) -> Result<(Routes, Duration), String> {
        let changes = state::Changes::of(&delta);
        let version = delta.version;
        let routes = delta.apply(last)?;
        let took = self
            .shared
            .apply_changes(version, routes.clone(), Some(changes))
            .await;
        Ok((routes, took))
    }

    /// The status document `/_skein/status` serves.
    pub fn status(&self) -> StatusDoc {
        stats::status(&self.shared)
    }
}

/// Forgets drained servers every second (so DRAIN rows disappear once
/// their last connection closed).
async fn gc(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        shared.registry.gc();
    }
}
