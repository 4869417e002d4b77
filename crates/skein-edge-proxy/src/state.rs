//! What the proxy keeps between route changes, and the table it swaps.
//!
//! A route change must never disturb traffic to servers that stay, so the
//! runtime state of a server (counters, in-flight requests, its idle
//! connections, its drain signal) lives in a [`Registry`] keyed by backend
//! and address and outlives any one route set. Each route set is compiled
//! into an immutable [`Table`] that only points at that state; applying
//! routes is building a table and swapping one `Arc`, and connections hold
//! the `Arc<ServerRt>` they were given, so they never look at a table again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use skein_edge::{Backend, Balance, Mode, Routes, Server, ServerState};
use tokio::sync::{watch, Notify};

use crate::client::Pool;

/// Consecutive connect failures that take a server out of rotation.
pub(crate) const EJECT_AFTER: u32 = 3;
/// How long an ejected server gets no requests.
pub(crate) const EJECT_FOR: Duration = Duration::from_secs(10);

/// HAProxy-style counters of a frontend, backend or server.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    /// Current sessions (connections, or requests in flight for HTTP
    /// backends and servers).
    pub scur: AtomicI64,
    pub smax: AtomicI64,
    pub stot: AtomicU64,
    pub bin: AtomicU64,
    pub bout: AtomicU64,
    pub econ: AtomicU64,
    pub eresp: AtomicU64,
    /// Retries (another server tried after a connect failure).
    pub wretr: AtomicU64,
    /// 1xx..5xx, other.
    pub hrsp: [AtomicU64; 6],
    pub req_tot: AtomicU64,
    pub ejections: AtomicU64,
}

impl Counters {
    pub(crate) fn open(&self) {
        let now = self.scur.fetch_add(1, Ordering::Relaxed) + 1;
        self.smax.fetch_max(now, Ordering::Relaxed);
        self.stot.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn close(&self) {
        self.scur.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn status(&self, code: u16) {
        let i = match code {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        self.hrsp[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    pub(crate) fn scur(&self) -> i64 {
        self.scur.load(Ordering::Relaxed).max(0)
    }
}

/// The counters (front, backend, server: at most three) a connection or a
/// request counts on: a fixed array, so that a request allocates nothing
/// for its bookkeeping.
#[derive(Clone, Default)]
pub(crate) struct CounterSet([Option<Arc<Counters>>; 3]);

impl CounterSet {
    /// The first three of `counters`.
    pub(crate) fn of(counters: &[&Arc<Counters>]) -> CounterSet {
        let mut set = CounterSet::default();
        for (slot, c) in set.0.iter_mut().zip(counters) {
            *slot = Some(Arc::clone(c));
        }
        set
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Counters>> {
        self.0.iter().flatten()
    }
}

/// Holds one session open on a set of counters; closes it when dropped.
pub(crate) struct Session(CounterSet);

impl Session {
    pub(crate) fn open(counters: CounterSet) -> Session {
        for c in counters.iter() {
            c.open();
        }
        Session(counters)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for c in self.0.iter() {
            c.close();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A server's life across route sets.
pub(crate) struct ServerRt {
    pub backend: String,
    pub name: String,
    pub addr: SocketAddr,
    /// The sticky cookie's value: a hash of backend and server name, the
    /// same on every edge.
    pub cookie: String,
    pub c: Arc<Counters>,
    pub failures: AtomicU32,
    /// Milliseconds since `base` until which it gets no requests (0: none).
    ejected_until: AtomicU64,
    base: Instant,
    /// Left the routes: gets nothing new, closes tunnels when the drain
    /// timer fires.
    pub removed: AtomicBool,
    drain_gen: AtomicU64,
    /// True once a removed server's drain time is over: its tunnels close.
    pub close: watch::Sender<bool>,
    /// The state the routes last gave it (ServerState as u8), and when it
    /// changed (Unix seconds), for the stats page.
    state: AtomicU8,
    /// The registry generation that last saw it in the routes.
    seen: AtomicU64,
    pub lastchg: AtomicU64,
    pub pool: Pool,
}

fn state_code(s: ServerState) -> u8 {
    match s {
        ServerState::Up => 0,
        ServerState::Unhealthy => 1,
        ServerState::NodeDown => 2,
    }
}

impl ServerRt {
    fn new(backend: &str, s: &Server, base: Instant) -> ServerRt {
        ServerRt {
            backend: backend.to_string(),
            name: s.name(),
            addr: s.addr,
            cookie: cookie_value(backend, &s.name()),
            c: Arc::default(),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            base,
            removed: AtomicBool::new(false),
            drain_gen: AtomicU64::new(0),
            close: watch::channel(false).0,
            state: AtomicU8::new(state_code(s.state)),
            seen: AtomicU64::new(0),
            lastchg: AtomicU64::new(unix_now()),
            pool: Pool::default(),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    pub(crate) fn ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.millis(now) < until
    }

    /// A connect failure: the third in a row ejects it for [`EJECT_FOR`].
    /// Returns whether this one ejected it.
    pub(crate) fn connect_failed(&self, now: Instant) -> bool {
        self.c.econ.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until
                .store(self.millis(now + EJECT_FOR), Ordering::Relaxed);
            self.c.ejections.fetch_add(1, Ordering::Relaxed);
            self.lastchg.store(unix_now(), Ordering::Relaxed);
            return true;
        }
        false
    }

    pub(crate) fn connected(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    pub(crate) fn route_state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            0 => ServerState::Up,
            1 => ServerState::Unhealthy,
            _ => ServerState::NodeDown,
        }
    }

    /// HAProxy's status word for it.
    pub(crate) fn status_word(&self, now: Instant) -> &'static str {
        if self.removed.load(Ordering::Relaxed) {
            return "DRAIN";
        }
        match self.route_state() {
            ServerState::Up if self.ejected(now) => "DOWN",
            ServerState::Up => "UP",
            ServerState::Unhealthy => "DOWN",
            ServerState::NodeDown => "MAINT",
        }
    }

    pub(crate) fn check_status(&self, now: Instant) -> &'static str {
        if self.removed.load(Ordering::Relaxed) {
            return "";
        }
        match self.route_state() {
            ServerState::Up if self.ejected(now) => "L4CON",
            ServerState::Up => "L7OK",
            ServerState::Unhealthy => "L7STS",
            ServerState::NodeDown => "",
        }
    }
}

/// FNV-1a, for stable hashes across processes and edges.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cookie_value(backend: &str, server: &str) -> String {
    format!("{:016x}", fnv(format!("{backend}/{server}").as_bytes()))
}

/// A backend's life across route sets.
#[derive(Default)]
pub(crate) struct BackendRt {
    pub c: Arc<Counters>,
    pub rr: AtomicU64,
    /// The registry generation that last saw it in the routes.
    seen: AtomicU64,
}

/// Runtime state by name, shared by every table: backend name → its
/// state and its servers' by address.
#[derive(Default)]
pub(crate) struct Registry {
    pub backends: Mutex<HashMap<String, BackendSlot>>,
    /// Bumped by every compile; a server not marked with the current one
    /// has left the routes.
    generation: AtomicU64,
}

#[derive(Default)]
pub(crate) struct BackendSlot {
    pub rt: Arc<BackendRt>,
    pub servers: HashMap<SocketAddr, Arc<ServerRt>>,
}

/// One server of a backend as a table sees it.
pub(crate) struct ServerEntry {
    pub spec: Server,
    pub rt: Arc<ServerRt>,
}

pub(crate) struct BackendEntry {
    /// As the route set has it (servers included), shared with it: a
    /// backend the next route set shares is unchanged without comparing.
    pub spec: Arc<Backend>,
    pub rt: Arc<BackendRt>,
    pub servers: Vec<ServerEntry>,
}

/// An HTTP route, ready to match.
pub(crate) struct RouteEntry {
    /// Shared with the route set it came from.
    pub host: Option<Arc<str>>,
    pub path: Option<Arc<str>>,
    pub backend: Arc<BackendEntry>,
}

/// One route set, compiled. Immutable; swapped whole.
#[derive(Default)]
pub(crate) struct Table {
    pub version: u64,
    /// The route set's own problems.
    pub problems: Vec<skein_edge::Problem>,
    /// By name (shared with the backend's spec: no copy per route set).
    pub backends: BTreeMap<Arc<str>, Arc<BackendEntry>>,
    pub http_routes: Vec<RouteEntry>,
    /// Where to look in `http_routes` for a host: with 10,000 virtual
    /// hosts a request must not scan them all.
    pub route_index: Arc<RouteIndex>,
    /// Bind port → backend (only ports this edge binds).
    pub by_port: HashMap<u16, Arc<BackendEntry>>,
    /// Things this edge does not serve, beyond the routes' own problems.
    pub local_problems: Vec<String>,
    /// Of those, the backends' bind ports this edge does not bind (each
    /// starting with the backend's name).
    pub bind_problems: Vec<String>,
}

/// Whether `host` (lowercase, no port) matches a route's host.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            host.len() > domain.len() + 1
                && host.ends_with(domain)
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}

/// The positions in `http_routes` of each exact host's routes, and of the
/// rest (wildcards and host-less routes), each list in match order.
#[derive(Default)]
pub(crate) struct RouteIndex {
    exact: HashMap<Arc<str>, Vec<usize>>,
    rest: Vec<usize>,
}

impl RouteIndex {
    fn of(routes: &[RouteEntry]) -> RouteIndex {
        let mut index = RouteIndex::default();
        for (i, r) in routes.iter().enumerate() {
            match &r.host {
                Some(h) if !h.starts_with("*.") => {
                    index.exact.entry(h.clone()).or_default().push(i)
                }
                _ => index.rest.push(i),
            }
        }
        index
    }
}

fn route_matches(r: &RouteEntry, host: Option<&str>, path: &str) -> bool {
    let host_ok = match (&r.host, host) {
        (None, _) => true,
        (Some(p), Some(h)) => host_matches(p, h),
        (Some(_), None) => false,
    };
    host_ok && r.path.as_deref().is_none_or(|p| path.starts_with(p))
}

impl Table {
    /// The backend for a request on the HTTP or HTTPS port: the first
    /// route, in match order, whose host and path match. Only the host's
    /// own routes and the wildcard and host-less ones are looked at,
    /// merged in match order.
    pub(crate) fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<BackendEntry>> {
        let exact: &[usize] = host
            .and_then(|h| self.route_index.exact.get(h))
            .map_or(&[], Vec::as_slice);
        let rest = &self.route_index.rest;
        let (mut e, mut r) = (0, 0);
        loop {
            let i = match (exact.get(e), rest.get(r)) {
                (Some(&a), Some(&b)) if a < b => {
                    e += 1;
                    a
                }
                (_, Some(&b)) => {
                    r += 1;
                    b
                }
                (Some(&a), None) => {
                    e += 1;
                    a
                }
                (None, None) => return None,
            };
            let route = &self.http_routes[i];
            if route_matches(route, host, path) {
                return Some(&route.backend);
            }
        }
    }

    /// [`Table::route`] by scanning every route (what the index must agree
    /// with).
    #[cfg(test)]
    fn route_by_scan(&self, host: Option<&str>, path: &str) -> Option<&Arc<BackendEntry>> {
        self.http_routes
            .iter()
            .find(|r| route_matches(r, host, path))
            .map(|r| &r.backend)
    }
}

/// What the table needs from the edge's configuration.
pub(crate) struct Limits<'a> {
    pub service_ports: &'a std::ops::RangeInclusive<u16>,
    /// Ports the edge itself holds (HTTP, HTTPS, stats).
    pub reserved: &'a [u16],
}

/// Whether this edge binds a backend's port, and if not, why.
pub(crate) fn bind_decision(b: &Backend, limits: &Limits<'_>) -> Result<Option<u16>, String> {
    let Some(port) = b.bind_port else {
        return Ok(None);
    };
    if limits.reserved.contains(&port) {
        return Err(format!(
            "{}: bind port {port} is one of the edge's own ports; not bound",
            b.name
        ));
    }
    let explicit = b.service_port != Some(port);
    if !explicit && !limits.service_ports.contains(&port) {
        return Err(format!(
            "{}: service port {port} is outside --service-ports {}-{}; not bound",
            b.name,
            limits.service_ports.start(),
            limits.service_ports.end()
        ));
    }
    Ok(Some(port))
}

/// Builds the table for `routes` (already filtered by group), creating
/// runtime state for new servers and backends and marking servers that
/// left. A backend identical to its entry in `prev` keeps that entry, and
/// only the registry slots of backends that changed or left are looked at
/// (an unchanged backend's servers are all still there), so a change costs
/// little more than comparing what came with what was. Returns the table,
/// the servers that left (to drain), and the route set's backends that
/// were already in `prev` (to be freed once the table is live: freeing
/// 10,000 is not part of a change's latency).
pub(crate) fn compile(
    registry: &Registry,
    prev: &Table,
    version: u64,
    routes: Routes,
    limits: &Limits<'_>,
    base: Instant,
) -> (Table, Vec<Arc<ServerRt>>, Vec<Arc<Backend>>) {
    let gen = registry.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let mut slots = registry.backends.lock().unwrap_or_else(|e| e.into_inner());
    let mut local_problems = Vec::new();
    let mut backends = BTreeMap::new();
    let mut by_port = HashMap::new();
    let now = unix_now();
    let Routes {
        backends: specs,
        http_routes: route_specs,
        problems,
    } = routes;
    // Backends whose slots must be looked at for servers that left.
    let mut touched: Vec<Arc<str>> = Vec::new();
    let mut known = Vec::with_capacity(specs.len());
    for b in specs {
        if let Some(old) = prev.backends.get(&*b.name) {
            // The same backend as the last route set's (a route set patched
            // by a delta shares it), or an equal one (one read whole).
            if Arc::ptr_eq(&old.spec, &b) || *old.spec == *b {
                old.rt.seen.store(gen, Ordering::Relaxed);
                let entry = old.clone();
                match bind_decision(&b, limits) {
                    Ok(Some(port)) => {
                        by_port.insert(port, entry.clone());
                    }
                    Ok(None) => {}
                    Err(e) => local_problems.push(e),
                }
                backends.insert(b.name.clone(), entry);
                known.push(b);
                continue;
            }
        }
        touched.push(b.name.clone());
        let decision = bind_decision(&b, limits);
        let entry = new_entry(&mut slots, b, gen, now, base);
        match decision {
            Ok(Some(port)) => {
                by_port.insert(port, entry.clone());
            }
            Ok(None) => {}
            Err(e) => local_problems.push(e),
        }
        backends.insert(entry.spec.name.clone(), entry);
    }
    // Backends that left the routes: every server of theirs left too.
    touched.extend(
        prev.backends
            .iter()
            .filter(|(_, e)| e.rt.seen.load(Ordering::Relaxed) != gen)
            .map(|(name, _)| name.clone()),
    );
    let http_routes: Vec<RouteEntry> = route_specs
        .into_iter()
        .filter_map(|r| {
            let backend = backends.get(&*r.backend)?.clone();
            Some(RouteEntry {
                host: r.host,
                path: r.path,
                backend,
            })
        })
        .collect();
    // Positions by host: the last table's when the hosts are the same, in
    // the same order (a change of servers leaves them so), else built anew.
    let same_hosts = http_routes.len() == prev.http_routes.len()
        && http_routes
            .iter()
            .zip(&prev.http_routes)
            .all(|(a, b)| a.host == b.host);
    let route_index = if same_hosts {
        prev.route_index.clone()
    } else {
        Arc::new(RouteIndex::of(&http_routes))
    };
    let left = servers_left(&mut slots, &touched, &backends, gen, now);
    drop(slots);
    (
        Table {
            version,
            problems,
            backends,
            http_routes,
            route_index,
            by_port,
            bind_problems: local_problems.clone(),
            local_problems,
        },
        left,
        known,
    )
}

/// A backend's entry for a new table: its runtime state from the registry
/// (created for new servers, a drain cancelled for servers back), its
/// servers marked as seen in generation `gen`.
fn new_entry(
    slots: &mut HashMap<String, BackendSlot>,
    b: Arc<Backend>,
    gen: u64,
    now: u64,
    base: Instant,
) -> Arc<BackendEntry> {
    let slot = match slots.get_mut(&*b.name) {
        Some(slot) => slot,
        None => slots.entry(b.name.to_string()).or_default(),
    };
    slot.rt.seen.store(gen, Ordering::Relaxed);
    let entries = b
        .servers
        .iter()
        .map(|s| {
            let rt = slot
                .servers
                .entry(s.addr)
                .or_insert_with(|| Arc::new(ServerRt::new(&b.name, s, base)))
                .clone();
            rt.seen.store(gen, Ordering::Relaxed);
            if rt.removed.swap(false, Ordering::Relaxed) {
                // Back before its drain ended: cancel the drain.
                rt.drain_gen.fetch_add(1, Ordering::Relaxed);
                rt.close.send_replace(false);
                rt.lastchg.store(now, Ordering::Relaxed);
            }
            let code = state_code(s.state);
            if rt.state.swap(code, Ordering::Relaxed) != code {
                rt.lastchg.store(now, Ordering::Relaxed);
            }
            ServerEntry {
                spec: s.clone(),
                rt,
            }
        })
        .collect();
    Arc::new(BackendEntry {
        rt: slot.rt.clone(),
        servers: entries,
        spec: b,
    })
}

/// Marks the servers of the `touched` backends' slots that generation
/// `gen` did not see as left (no new requests, drained), and forgets the
/// slots of backends gone whose servers are all gone. Returns those left.
fn servers_left(
    slots: &mut HashMap<String, BackendSlot>,
    touched: &[Arc<str>],
    backends: &BTreeMap<Arc<str>, Arc<BackendEntry>>,
    gen: u64,
    now: u64,
) -> Vec<Arc<ServerRt>> {
    let mut left = Vec::new();
    for name in touched {
        let Some(slot) = slots.get_mut(&**name) else {
            continue;
        };
        slot.servers.retain(|_, rt| {
            if rt.seen.load(Ordering::Relaxed) == gen {
                return true;
            }
            if !rt.removed.swap(true, Ordering::Relaxed) {
                rt.lastchg.store(now, Ordering::Relaxed);
                rt.pool.clear();
                left.push(rt.clone());
            }
            // Servers that left and hold nothing open are forgotten.
            rt.c.scur() > 0
        });
        if slot.servers.is_empty() && !backends.contains_key(&**name) {
            slots.remove(&**name);
        }
    }
    left
}

/// What a delta from the agent changed (the routes passed to
/// [`compile_delta`] are the table's with it applied).
pub(crate) struct Changes {
    /// The version the delta applies to: the previous table's, or the
    /// delta is not used.
    pub base: u64,
    /// Backends new or changed, and names gone.
    pub upsert: Vec<Arc<Backend>>,
    pub remove: Vec<Arc<str>>,
    /// Whether the HTTP routes changed (else they are the last table's).
    pub routes_changed: bool,
}

impl Changes {
    pub(crate) fn of(delta: &skein_edge::EdgeDelta) -> Changes {
        Changes {
            base: delta.base,
            upsert: delta.upsert.clone(),
            remove: delta.remove.clone(),
            routes_changed: delta.http_routes.is_some(),
        }
    }
}

/// [`compile`] for a change the agent sent as a delta: the last table's
/// maps copied (pointers) and patched for the backends that changed, the
/// HTTP routes and their index kept unless they changed. What it costs
/// grows with the change, not with the route set, but for copying two
/// maps of pointers. Returns `None` (compile whole) when `prev` is not the
/// delta's base, or the delta does not fit it.
pub(crate) fn compile_delta(
    registry: &Registry,
    prev: &Table,
    version: u64,
    routes: &Routes,
    changes: &Changes,
    limits: &Limits<'_>,
    base: Instant,
) -> Option<(Table, Vec<Arc<ServerRt>>, bool)> {
    if prev.version != changes.base {
        return None;
    }
    let gen = registry.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let mut slots = registry.backends.lock().unwrap_or_else(|e| e.into_inner());
    let now = unix_now();
    let mut backends = prev.backends.clone();
    let mut by_port = prev.by_port.clone();
    let mut touched: Vec<Arc<str>> = Vec::new();
    // Old entry → its replacement (`None`: gone), for the routes.
    let mut replaced: HashMap<*const BackendEntry, Option<Arc<BackendEntry>>> = HashMap::new();
    // Whether a bound port (or its address) changes: the listeners then
    // need reconciling.
    let mut ports_changed = false;
    let bound = |b: &Backend| match bind_decision(b, limits) {
        Ok(Some(port)) => Some((port, b.labels.bind_addr)),
        _ => None,
    };
    let unbind = |by_port: &mut HashMap<u16, Arc<BackendEntry>>, old: &Arc<BackendEntry>| {
        if let Ok(Some(port)) = bind_decision(&old.spec, limits) {
            if by_port.get(&port).is_some_and(|e| Arc::ptr_eq(e, old)) {
                by_port.remove(&port);
            }
        }
    };
    for name in &changes.remove {
        if let Some(old) = backends.remove(&**name) {
            ports_changed |= bound(&old.spec).is_some();
            unbind(&mut by_port, &old);
            replaced.insert(Arc::as_ptr(&old), None);
            touched.push(name.clone());
        }
    }
    for b in &changes.upsert {
        let old = backends.get(&*b.name).cloned();
        if let Some(old) = &old {
            if Arc::ptr_eq(&old.spec, b) || *old.spec == **b {
                continue;
            }
            ports_changed |= bound(&old.spec) != bound(b);
            unbind(&mut by_port, old);
        } else {
            ports_changed |= bound(b).is_some();
        }
        touched.push(b.name.clone());
        let entry = new_entry(&mut slots, b.clone(), gen, now, base);
        if let Ok(Some(port)) = bind_decision(b, limits) {
            by_port.insert(port, entry.clone());
        }
        if let Some(old) = old {
            replaced.insert(Arc::as_ptr(&old), Some(entry.clone()));
        }
        backends.insert(b.name.clone(), entry);
    }
    let (http_routes, route_index) = if changes.routes_changed {
        let http_routes: Vec<RouteEntry> = routes
            .http_routes
            .iter()
            .filter_map(|r| {
                Some(RouteEntry {
                    host: r.host.clone(),
                    path: r.path.clone(),
                    backend: backends.get(&*r.backend)?.clone(),
                })
            })
            .collect();
        let index = Arc::new(RouteIndex::of(&http_routes));
        (http_routes, index)
    } else {
        let mut dropped = false;
        let http_routes: Vec<RouteEntry> = prev
            .http_routes
            .iter()
            .filter_map(|r| {
                let backend = match replaced.get(&Arc::as_ptr(&r.backend)) {
                    None => r.backend.clone(),
                    Some(Some(new)) => new.clone(),
                    Some(None) => {
                        dropped = true;
                        return None;
                    }
                };
                Some(RouteEntry {
                    host: r.host.clone(),
                    path: r.path.clone(),
                    backend,
                })
            })
            .collect();
        let index = if dropped {
            Arc::new(RouteIndex::of(&http_routes))
        } else {
            prev.route_index.clone()
        };
        (http_routes, index)
    };
    // Bind problems: the unchanged backends' as they were, the changed
    // ones' anew.
    let mut local_problems: Vec<String> = prev
        .bind_problems
        .iter()
        .filter(|p| {
            !touched.iter().any(|n| {
                p.strip_prefix(&**n)
                    .is_some_and(|rest| rest.starts_with(": "))
            })
        })
        .cloned()
        .collect();
    for b in &changes.upsert {
        if let Err(e) = bind_decision(b, limits) {
            if !local_problems.contains(&e) {
                local_problems.push(e);
            }
        }
    }
    let left = servers_left(&mut slots, &touched, &backends, gen, now);
    drop(slots);
    Some((
        Table {
            version,
            problems: routes.problems.clone(),
            backends,
            http_routes,
            route_index,
            by_port,
            bind_problems: local_problems.clone(),
            local_problems,
        },
        left,
        ports_changed,
    ))
}

impl Registry {
    /// Forgets removed servers that hold nothing open.
    pub(crate) fn gc(&self) {
        let mut slots = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        for slot in slots.values_mut() {
            slot.servers
                .retain(|_, rt| !rt.removed.load(Ordering::Relaxed) || rt.c.scur() > 0);
        }
        // A backend that left keeps its slot while its servers drain; once
        // they are gone and no table holds its state, the slot goes too.
        slots.retain(|_, slot| !slot.servers.is_empty() || Arc::strong_count(&slot.rt) > 1);
    }

    /// Requests in flight, tunnels and TCP connections, over all servers.
    pub(crate) fn busy(&self) -> i64 {
        let slots = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .flat_map(|s| s.servers.values())
            .map(|rt| rt.c.scur())
            .sum()
    }

    /// Removed servers still holding connections (the DRAIN rows).
    pub(crate) fn draining(&self) -> Vec<Arc<ServerRt>> {
        let slots = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<ServerRt>> = slots
            .values()
            .flat_map(|s| s.servers.values())
            .filter(|rt| rt.removed.load(Ordering::Relaxed))
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.backend, &a.name).cmp(&(&b.backend, &b.name)));
        out
    }
}

/// Starts the drain timer of a server that left the routes: when it fires
/// (and the server has not come back), its tunnels are closed.
/// Removed servers' drain deadlines, in the order they were given (one
/// drain timeout for the edge: that is deadline order), served by one
/// timer. A task per server that left held a task and the server's memory
/// for the whole drain time: under churn (hundreds of servers leaving a
/// second) megabytes for servers with nothing open. Only servers with
/// something open when they leave, or that get a tunnel after, are queued.
#[derive(Default)]
pub(crate) struct Drains {
    queue: Mutex<VecDeque<(Instant, Weak<ServerRt>, u64)>>,
    pushed: Notify,
}

impl Drains {
    /// Closes `rt`'s remaining connections `after` from now, unless it is
    /// back in the routes by then.
    pub(crate) fn start(&self, rt: &Arc<ServerRt>, after: Duration) {
        let gen = rt.drain_gen.load(Ordering::Relaxed);
        let at = Instant::now() + after;
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((at, Arc::downgrade(rt), gen));
        self.pushed.notify_one();
    }

    /// Fires each drain at its deadline, forever.
    pub(crate) async fn run(&self) {
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .front()
                .map(|e| e.0);
            match next {
                None => self.pushed.notified().await,
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    // An earlier drain is never queued after a later one;
                    // woken only to look again.
                    () = self.pushed.notified() => continue,
                },
            }
            let now = Instant::now();
            let due: Vec<(Weak<ServerRt>, u64)> = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let mut due = Vec::new();
                while q.front().is_some_and(|e| e.0 <= now) {
                    if let Some((_, rt, gen)) = q.pop_front() {
                        due.push((rt, gen));
                    }
                }
                due
            };
            for (rt, gen) in due {
                // Gone: it left with nothing open and was forgotten.
                let Some(rt) = rt.upgrade() else { continue };
                if rt.removed.load(Ordering::Relaxed) && rt.drain_gen.load(Ordering::Relaxed) == gen
                {
                    tracing::info!(backend = %rt.backend, server = %rt.name, "drain time over: closing its remaining connections");
                    rt.close.send_replace(true);
                }
            }
        }
    }
}

/// Picks a server for a new request or connection: Up, not ejected, not
/// already tried; the sticky one if it qualifies; else by the backend's
/// balance. If every Up server is ejected, ejection is ignored (better a
/// try than a certain 503).
pub(crate) fn pick<'a>(
    b: &'a BackendEntry,
    client: IpAddr,
    sticky: Option<&str>,
    tried: &[SocketAddr],
    now: Instant,
) -> Option<&'a ServerEntry> {
    // No list of candidates is built: this runs for every request, and
    // the servers are walked (a few, in practice) instead.
    let up = |s: &ServerEntry| s.spec.state == ServerState::Up && !tried.contains(&s.spec.addr);
    let rested = |s: &ServerEntry| up(s) && !s.rt.ejected(now);
    let mut n = b.servers.iter().filter(|s| rested(s)).count();
    // Every server ejected: better one of them than none.
    let any_up = n == 0;
    if any_up {
        n = b.servers.iter().filter(|s| up(s)).count();
    }
    if n == 0 {
        return None;
    }
    let candidates = || {
        b.servers
            .iter()
            .filter(move |s| if any_up { up(s) } else { rested(s) })
    };
    if let Some(cookie) = sticky {
        if let Some(s) = candidates().find(|s| s.rt.cookie == cookie) {
            return Some(s);
        }
    }
    let n = n as u64;
    let i = match b.spec.labels.balance {
        Balance::Roundrobin => b.rt.rr.fetch_add(1, Ordering::Relaxed) % n,
        Balance::Leastconn => {
            // The least loaded; among equals, the first from a rotating
            // start, so that idle servers share the work.
            let start = b.rt.rr.fetch_add(1, Ordering::Relaxed) % n;
            candidates()
                .enumerate()
                .min_by_key(|(j, s)| (s.rt.c.scur(), (*j as u64 + n - start) % n))
                .map_or(0, |(j, _)| j as u64)
        }
        Balance::Source => {
            let h = match client {
                IpAddr::V4(a) => fnv(&a.octets()),
                IpAddr::V6(a) => fnv(&a.octets()),
            };
            h % n
        }
    };
    candidates().nth(i as usize)
}

pub(crate) fn is_http(b: &BackendEntry) -> bool {
    b.spec.labels.mode == Mode::Http
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str) -> Arc<BackendEntry> {
        let labels = skein_edge::PortLabels {
            groups: vec!["external".into()],
            bind_port: None,
            bind_addr: None,
            mode: Mode::Http,
            vhosts: vec![],
            path: None,
            proxypass_path: None,
            balance: Balance::Roundrobin,
            sticky: false,
            redirect_to_https: false,
            ssl_certs: vec![],
            backend_weight: 0,
            auth: None,
        };
        Arc::new(BackendEntry {
            spec: Arc::new(Backend {
                name: name.into(),
                app: format!("/{name}").into(),
                port_index: 0,
                service_port: None,
                bind_port: None,
                labels: Arc::new(labels),
                servers: vec![],
            }),
            rt: Arc::default(),
            servers: vec![],
        })
    }

    const HOSTS: [Option<&str>; 5] = [
        None,
        Some("a.example.com"),
        Some("b.example.com"),
        Some("*.example.com"),
        Some("x.a.example.com"),
    ];
    const PATHS: [Option<&str>; 3] = [None, Some("/api"), Some("/api/v1")];

    proptest! {
        /// The host index finds exactly the route a scan of every route
        /// finds, whatever the routes and the request.
        #[test]
        fn the_index_agrees_with_a_scan(
            routes in prop::collection::vec((0usize..5, 0usize..3), 0..24),
            queries in prop::collection::vec((0usize..5, 0usize..4), 1..16),
        ) {
            let http_routes: Vec<RouteEntry> = routes
                .iter()
                .enumerate()
                .map(|(i, (h, p))| RouteEntry {
                    host: HOSTS[*h].map(Arc::from),
                    path: PATHS[*p].map(Arc::from),
                    backend: entry(&format!("b{i}")),
                })
                .collect();
            let table = Table {
                route_index: Arc::new(RouteIndex::of(&http_routes)),
                http_routes,
                ..Table::default()
            };
            let request_paths = ["/", "/api", "/api/v1/x", "/other"];
            for (h, p) in queries {
                let host = HOSTS[h].filter(|h| !h.starts_with('*'));
                let path = request_paths[p];
                let found = table.route(host, path).map(|b| b.spec.name.clone());
                let scanned = table.route_by_scan(host, path).map(|b| b.spec.name.clone());
                prop_assert_eq!(found, scanned, "{:?} {}", host, path);
            }
        }
    }

    /// A drawn backend: its index (name, host, port), servers, health,
    /// whether it binds a port and has a virtual host.
    type Draw = (u8, u8, bool, bool, bool);

    fn spec_of(d: &Draw) -> Arc<Backend> {
        let (i, servers, up, port, vhost) = *d;
        let labels = skein_edge::PortLabels {
            groups: vec!["external".into()],
            mode: Mode::Http,
            vhosts: if vhost {
                vec![format!("h{i}.example.com").into()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let port = port.then_some(10_000 + u16::from(i));
        Arc::new(Backend {
            name: format!("b{i}").into(),
            app: format!("/b{i}").into(),
            port_index: 0,
            service_port: port,
            bind_port: port,
            labels: Arc::new(labels),
            servers: (0..servers)
                .map(|k| Server {
                    addr: SocketAddr::from(([10, 0, i, k], 80)),
                    node: "n1".into(),
                    state: if up || k > 0 {
                        ServerState::Up
                    } else {
                        ServerState::Unhealthy
                    },
                })
                .collect(),
        })
    }

    /// Route sets as an agent's views give them: equal backends shared.
    fn route_set(draws: &[Draw], shared: &mut HashMap<Draw, Arc<Backend>>) -> Routes {
        let mut seen = std::collections::BTreeSet::new();
        let backends: Vec<Arc<Backend>> = draws
            .iter()
            .filter(|d| seen.insert(d.0))
            .map(|d| shared.entry(*d).or_insert_with(|| spec_of(d)).clone())
            .collect();
        let http_routes = backends
            .iter()
            .filter_map(|b| {
                Some(skein_edge::HttpRoute {
                    host: Some(b.labels.vhosts.first()?.clone()),
                    path: None,
                    backend: Arc::from(&*b.name),
                })
            })
            .collect();
        Routes {
            backends,
            http_routes,
            problems: Vec::new(),
        }
    }

    /// What a table serves, comparable.
    type Served = (
        Vec<(String, Vec<(SocketAddr, ServerState)>)>,
        BTreeMap<u16, String>,
        Vec<(Option<String>, String)>,
        Vec<Option<String>>,
        Vec<String>,
    );

    fn served(t: &Table) -> Served {
        // A backend entry by its name and its servers' addresses (a route
        // left on a replaced entry shows its old servers).
        let name = |b: &Arc<BackendEntry>| {
            let addrs: Vec<String> = b.servers.iter().map(|s| s.rt.addr.to_string()).collect();
            format!("{} {}", b.spec.name, addrs.join(","))
        };
        (
            t.backends
                .values()
                .map(|b| {
                    let servers = b
                        .servers
                        .iter()
                        .map(|s| (s.rt.addr, s.rt.route_state()))
                        .collect();
                    (name(b), servers)
                })
                .collect(),
            t.by_port.iter().map(|(p, b)| (*p, name(b))).collect(),
            t.http_routes
                .iter()
                .map(|r| (r.host.as_deref().map(str::to_string), name(&r.backend)))
                .collect(),
            (0..12)
                .map(|i| t.route(Some(&format!("h{i}.example.com")), "/").map(name))
                .collect(),
            t.bind_problems.clone(),
        )
    }

    proptest! {
        /// A route set sent as a delta compiles to what it compiles to
        /// sent whole: the same backends, servers, ports, routes and route
        /// lookups, and the same servers left to drain.
        #[test]
        fn a_delta_compiles_to_what_the_whole_route_set_does(
            a in prop::collection::vec((0u8..10, 0u8..3, any::<bool>(), any::<bool>(), any::<bool>()), 0..10),
            b in prop::collection::vec((0u8..10, 0u8..3, any::<bool>(), any::<bool>(), any::<bool>()), 0..10),
        ) {
            let mut shared = HashMap::new();
            let (old, new) = (route_set(&a, &mut shared), route_set(&b, &mut shared));
            // Port 10005 is the edge's own: a bind problem for b5.
            let limits = Limits { service_ports: &(10_000..=10_100), reserved: &[10_005] };
            let base = Instant::now();
            let (whole, delta) = (Registry::default(), Registry::default());
            let (t_whole, _, _) = compile(&whole, &Table::default(), 1, old.clone(), &limits, base);
            let (t_delta, _, _) = compile(&delta, &Table::default(), 1, old.clone(), &limits, base);
            let d = skein_edge::EdgeDelta::between(&old, 1, &new, 2);
            let changes = Changes::of(&d);
            let patched = d.apply(&old).map_err(TestCaseError::fail)?;
            let Some((by_delta, left_delta, _)) =
                compile_delta(&delta, &t_delta, 2, &patched, &changes, &limits, base)
            else {
                return Err(TestCaseError::fail("the delta did not fit its base"));
            };
            let (by_whole, left_whole, _) = compile(&whole, &t_whole, 2, new.clone(), &limits, base);
            prop_assert_eq!(served(&by_delta), served(&by_whole));
            let names = |l: &[Arc<ServerRt>]| {
                let mut v: Vec<(String, String)> =
                    l.iter().map(|r| (r.backend.clone(), r.name.clone())).collect();
                v.sort();
                v
            };
            prop_assert_eq!(names(&left_delta), names(&left_whole));
        }
    }
}
