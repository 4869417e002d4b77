//! The routes every edge serves, computed from the cluster's tasks.
//!
//! An *app port* (port `n` of an app's tasks) whose labels expose it
//! becomes one [`Backend`] named as Marathon-LB named it
//! (`<app>_<port>`), with one [`Server`] per task. Each backend is reached
//! on its bind port (`HAPROXY_{n}_PORT`, else its service port) and, in
//! HTTP mode, by [`HttpRoute`]s: a virtual host and/or a path prefix on the
//! edge's HTTP and HTTPS ports.
//!
//! Conflicts are resolved by age, never silently: backends are ordered by
//! their service-port claim (settled claims first, then the oldest, as
//! named-VIP addresses are; the agent agrees on them), and where two want
//! the same bind port or the same virtual host and path, the older keeps
//! it and the newer loses that one route, with a [`Problem`] saying so.
//!
//! An agent computes the routes for every view it derives, so
//! [`compute_cached`] keeps what it built in a [`RouteCache`] and redoes
//! only what a change touched: see there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use skein_state::{NodeStatus, TaskSpec, TaskView};

use crate::labels::{self, LabelProblem, Mode, PortLabels, PortOutcome};

/// An app port's agreed service port and the rank of its claim (its age).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub port: u16,
    pub since: u64,
    pub settled: bool,
}

/// An app port: `(app id, port index)`.
pub type PortKey = (String, usize);

/// What the routes are computed from.
pub struct Input<'a> {
    pub tasks: &'a [TaskView],
    /// The agreed service port of each exposed app port that has one.
    pub service_ports: &'a BTreeMap<PortKey, ServicePort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Healthy, on a node seen alive: gets requests.
    Up,
    /// The task's health check fails.
    Unhealthy,
    /// The node is not seen alive (suspected or down).
    NodeDown,
}

/// One task behind a backend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Server {
    pub addr: SocketAddr,
    /// The node the task runs on (shared between its servers).
    pub node: Arc<str>,
    pub state: ServerState,
}

impl Server {
    /// Marathon-LB's server name, `<node>_<ip>_<port>`.
    pub fn name(&self) -> String {
        format!("{}_{}_{}", self.node, self.addr.ip(), self.addr.port())
    }
}

/// One exposed app port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// `<app>_<port>` (the bind port, else the service port), as
    /// Marathon-LB named backends: `/accedge` on 10042 → `accedge_10042`.
    /// (Shared strings, as the routes': built once per app, not per view.)
    pub name: Arc<str>,
    pub app: Arc<str>,
    pub port_index: usize,
    /// The agreed service port, if the app port has one yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
    /// The port an edge binds for it: `HAPROXY_{n}_PORT` or the service
    /// port; none while neither is known, or when an older backend holds
    /// the port (then reachable only by its HTTP routes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_port: Option<u16>,
    /// What the app's labels say about this port (shared with the label
    /// cache: unchanged apps are not parsed again).
    pub labels: Arc<PortLabels>,
    /// In (node, task id) order.
    pub servers: Vec<Server>,
}

/// A virtual host and/or path prefix on the edge's HTTP and HTTPS ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Lowercase; `*.domain` matches every name under it; none matches any
    /// host (a path-only route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<Arc<str>>,
    /// Shared strings: an agent builds 10,000s of routes per view, and
    /// most are the previous view's.
    pub backend: Arc<str>,
}

/// Something an operator should know: a label that disables or is ignored,
/// a conflict lost, a port not served.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Problem {
    pub app: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_index: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub message: String,
    /// Whether the app port (or the route named) is left unserved.
    pub disables: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.app)?;
        if let Some(i) = self.port_index {
            write!(f, " port {i}")?;
        }
        if let Some(l) = &self.label {
            write!(f, " ({l})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything an edge serves, the same on every node with the same view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Routes {
    /// Oldest first (the order conflicts are decided in): the same order
    /// on every node, without sorting 10,000 names per view. Shared: an
    /// unchanged backend is the previous view's, and an edge's answer
    /// (`for_groups`) copies pointers, not servers.
    pub backends: Vec<Arc<Backend>>,
    /// In match order: the first route whose host and path match a request
    /// takes it (higher `HAPROXY_{n}_BACKEND_WEIGHT` first, then exact
    /// hosts before wildcards before none, then longer paths).
    pub http_routes: Vec<HttpRoute>,
    /// Sorted.
    pub problems: Vec<Problem>,
}

/// `GET /v1/edge`: the routes for the groups asked, and a version that
/// changes whenever they do (a client long-polls with `wait_version`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeDoc {
    pub version: u64,
    pub routes: Routes,
}

impl EdgeDoc {
    pub fn new(routes: Routes) -> EdgeDoc {
        EdgeDoc {
            version: routes.version(),
            routes,
        }
    }
}

impl Routes {
    /// A digest of the routes' content: equal
    /// routes, equal versions, on every node.
    pub fn version(&self) -> u64 {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        self.hash(&mut h);
        h.finish()
    }

    /// The routes an edge serving `groups` uses: backends in any of them
    /// and the HTTP routes to those (problems are kept whole).
    pub fn for_groups(&self, groups: &[String]) -> Routes {
        let keep = |b: &Backend| b.labels.groups.iter().any(|g| groups.contains(g));
        let backends: Vec<Arc<Backend>> =
            self.backends.iter().filter(|b| keep(b)).cloned().collect();
        // Every backend kept (an edge of every group): every route too.
        let http_routes = if backends.len() == self.backends.len() {
            self.http_routes.clone()
        } else {
            let mut names: FastSet<&str> =
                FastSet::with_capacity_and_hasher(backends.len(), Default::default());
            names.extend(backends.iter().map(|b| &*b.name));
            self.http_routes
                .iter()
                .filter(|r| names.contains(&*r.backend))
                .cloned()
                .collect()
        };
        Routes {
            backends,
            http_routes,
            problems: self.problems.clone(),
        }
    }
}

/// FNV-1a: stable across runs and processes, unlike std's hasher (the
/// version digest and the backend-name check below depend on its values).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(bytes);
    h.finish()
}

/// The maps' hasher: a word at a time (FNV's byte at a time showed in
/// profiles of 50,000 tasks), its values never leave the process.
#[derive(Default, Clone, Copy)]
struct Quick(u64);

impl Quick {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for Quick {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(n.into());
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.add(n.into());
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // Folded: the table takes its low bits, which a multiplication
        // alone leaves depending on the input's low bits only.
        let m = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (m as u64) ^ ((m >> 64) as u64)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Quick>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<Quick>>;

fn quick_hash<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut h = Quick::default();
    v.hash(&mut h);
    h.finish()
}

/// Appends `n` in decimal.
fn push_number(s: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        s.push(char::from(*d));
    }
}

/// An app whose tasks carry different labels: the first task's are used.
pub(crate) fn labels_differ(app: &str, first: &TaskView, odd: &TaskView) -> Problem {
    Problem {
        app: app.to_string(),
        port_index: None,
        label: None,
        message: format!(
            "tasks {} and {} carry different labels; {}'s are used",
            first.id, odd.id, first.id
        ),
        disables: false,
    }
}

fn problem(app: &str, index: Option<usize>, p: &LabelProblem) -> Problem {
    Problem {
        app: app.to_string(),
        port_index: index,
        label: Some(p.label.clone()),
        message: p.message.clone(),
        disables: p.disables,
    }
}

/// A virtual host and/or path an HTTP app port wants, read once with its
/// labels: the conflict pass compares these for every app port of a view.
struct RouteKey {
    host: Option<Arc<str>>,
    path: Option<Arc<str>>,
    /// Of `(host, path)`, for the conflict pass's map.
    hash: u64,
    /// Exact hosts before wildcards before none.
    specificity: u8,
}

/// One app's labels as read: what [`labels`] says about each of its ports.
struct ParsedApp {
    /// The task spec they were read from (compared with the next first
    /// task's: equal labels are not read again).
    spec: Arc<TaskSpec>,
    app_name: String,
    app_problems: Vec<LabelProblem>,
    ports: Vec<Parsed>,
}

enum Parsed {
    NotExposed,
    Disabled(Vec<LabelProblem>),
    Exposed {
        labels: Arc<PortLabels>,
        problems: Vec<LabelProblem>,
        routes: Vec<RouteKey>,
    },
}

impl ParsedApp {
    fn read(spec: &Arc<TaskSpec>) -> ParsedApp {
        let ports = (0..spec.ports.len())
            .map(|index| match labels::parse_port(&spec.labels, index) {
                PortOutcome::NotExposed => Parsed::NotExposed,
                PortOutcome::Disabled { problems } => Parsed::Disabled(problems),
                PortOutcome::Exposed { labels, problems } => Parsed::Exposed {
                    routes: route_keys(&labels),
                    labels: Arc::new(labels),
                    problems,
                },
            })
            .collect();
        ParsedApp {
            spec: spec.clone(),
            app_name: labels::backend_app_name(&spec.app),
            app_problems: labels::app_problems(&spec.labels, spec.ports.len()),
            ports,
        }
    }

    /// Whether `spec` reads as the spec these labels were read from (an
    /// agent decodes a node's tasks anew when any of them changes).
    fn reads_as(&self, spec: &Arc<TaskSpec>) -> bool {
        Arc::ptr_eq(&self.spec, spec)
            || (self.spec.labels == spec.labels
                && self.spec.ports.len() == spec.ports.len()
                && self.spec.app == spec.app)
    }
}

/// The host and path keys an HTTP app port wants: one per virtual host,
/// or one for the path alone.
fn route_keys(labels: &PortLabels) -> Vec<RouteKey> {
    if labels.mode != Mode::Http {
        return Vec::new();
    }
    let path: Option<Arc<str>> = labels.path.clone();
    let key = |host: Option<Arc<str>>| RouteKey {
        // Tests keep two bits: different hosts and paths then share hashes
        // all the time, and the conflict pass must still tell them apart.
        hash: quick_hash(&(host.as_deref(), path.as_deref()))
            & if cfg!(test) { 3 } else { u64::MAX },
        specificity: match host.as_deref() {
            Some(h) if h.starts_with("*.") => 1,
            Some(_) => 0,
            None => 2,
        },
        host,
        path: path.clone(),
    };
    if labels.vhosts.is_empty() {
        if path.is_some() {
            vec![key(None)]
        } else {
            Vec::new()
        }
    } else {
        labels.vhosts.iter().map(|h| key(Some(h.clone()))).collect()
    }
}

/// One task as the last computation saw it, in input order (16 bytes:
/// a first view writes 50,000).
struct Seen {
    /// Held so that its address cannot be reused by another spec while
    /// cached (the same address as a held spec is that spec); `None` once
    /// moved on to the next computation's list.
    spec: Option<Arc<TaskSpec>>,
    slot: u32,
    node_status: NodeStatus,
    healthy: bool,
}

impl Seen {
    /// The spec's address; 0 (no spec's) once moved on.
    fn ptr(&self) -> usize {
        self.spec.as_ref().map_or(0, |s| Arc::as_ptr(s) as usize)
    }
}

/// An exposed app port as last built.
struct PortState {
    index: usize,
    labels: Arc<PortLabels>,
    /// Its servers while it has no backend (then the backend holds them:
    /// not copied, one allocation fewer per app port).
    servers: Vec<Server>,
    service: Option<ServicePort>,
    /// `<app>_<port>` (or `_p<index>`) for the port it was built for, and
    /// its FNV hash: formatted again only when that port changes.
    base_name: Option<(Option<u16>, Arc<str>, u64)>,
    /// The name and bind port the last conflict pass gave it.
    decided: Option<(Arc<str>, Option<u16>)>,
    /// The backend built from all the above; `None` once any changed.
    backend: Option<Arc<Backend>>,
}

impl PortState {
    /// Its servers, wherever they are.
    fn servers(&self) -> &[Server] {
        match &self.backend {
            Some(b) => &b.servers,
            None => &self.servers,
        }
    }

    /// Drops its backend (something of it changed), keeping the servers.
    fn reset_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            self.servers = b.servers.clone();
        }
    }
}

/// An app (all tasks with one app id) as last built.
#[derive(Default)]
struct AppSlot {
    app: Arc<str>,
    live: bool,
    /// Its tasks' spec addresses (held in [`RouteCache::seen`]): tells a
    /// task that moved in the input from a new one.
    ptrs: Vec<usize>,
    parsed: Option<Arc<ParsedApp>>,
    /// What its labels say (conflicts are the conflict pass's).
    problems: Vec<Problem>,
    /// Its exposed ports, by index.
    ports: Vec<PortState>,
}

/// What [`compute_cached`] keeps between computations, so that a change
/// costs about what it touched (issue 13: an agent computes the routes of
/// 10,000 apps and 50,000 tasks again for every view).
///
/// An agent's views share unchanged tasks' decoded specs (`Arc<TaskSpec>`),
/// so a task whose spec is the same pointer, node status and health as
/// last time is unchanged. One pass over the input in order, matched
/// against the last input by position (a few pointer comparisons, no
/// lookups, no reading of specs), finds the apps a change touched; only
/// those are grouped, sorted, and have their labels (when they differ)
/// and servers read again. The conflict pass over every app port (bind
/// ports, virtual hosts, names) runs only when something it depends on
/// changed (an app port added or removed, its labels, its service port);
/// otherwise its decisions, routes and problems are the last ones.
/// Backends are shared with the last result where nothing of theirs
/// changed. The result is always what [`compute`] gives.
#[derive(Default)]
pub struct RouteCache {
    seen: Vec<Seen>,
    /// Counts computations.
    round: u64,
    slots: Vec<AppSlot>,
    /// Per slot: bumped when it is given to an app or freed (so that a
    /// remembered slot is known stale), and the round it was last rebuilt.
    gens: Vec<u32>,
    rebuilt: Vec<u64>,
    /// Whether this round gave a slot to a new app.
    apps_added: bool,
    /// The service-port map as last seen.
    service: ServiceSeq,
    /// Slots to rebuild (a flag per slot, and the list).
    dirty_flags: Vec<bool>,
    dirty: Vec<u32>,
    free: Vec<u32>,
    by_name: FastMap<Arc<str>, u32>,
    /// The rebuilt apps' tasks' positions in the input, app after app, and
    /// where each app's start (reused: no allocation per app).
    flat: Vec<u32>,
    starts: Vec<u32>,
    /// Node names, one allocation each however many servers they run.
    nodes: FastSet<Arc<str>>,
    nodes_after_purge: usize,
    /// Whether `order`, `http_routes` and `conflicts` are current.
    decided: bool,
    /// Exposed app ports `(slot, port)`, oldest first.
    order: Vec<(u32, u32)>,
    http_routes: Vec<HttpRoute>,
    conflicts: Vec<Problem>,
    /// Every problem, sorted; `None` when something changed.
    problems: Option<Vec<Problem>>,
}

/// The service-port map as last seen, in its `(app, index)` order: the next
/// view's map is merged with it, so an unchanged entry costs a comparison
/// of its key with memory read in order, and no lookup.
#[derive(Default)]
struct ServiceSeq {
    /// The entries' app ids, one after another.
    names: String,
    entries: Vec<ServiceEntry>,
}

struct ServiceEntry {
    /// Where its app id ends in `names` (it starts where the previous
    /// entry's ends).
    name_end: usize,
    index: usize,
    port: ServicePort,
    /// The app's slot and its generation then; `None`: no such app then.
    slot: Option<(u32, u32)>,
}

/// What the service-port map asks of the app ports: the map as seen now,
/// and the service ports to set (`None`: gone from the map).
struct ServiceChanges {
    seq: ServiceSeq,
    set: Vec<(SlotRef, usize, Option<ServicePort>)>,
}

/// An app's slot and its generation then; `None`: no such app then.
type SlotRef = Option<(u32, u32)>;

/// The apps as [`resolve_service`] reads them: by name, their slots'
/// generations, and which were rebuilt this round.
struct AppIndex<'a> {
    by_name: &'a FastMap<Arc<str>, u32>,
    gens: &'a [u32],
    rebuilt: &'a [u64],
    round: u64,
    apps_added: bool,
}

/// Merges the service-port map with the one last seen (`old`): only new
/// or changed entries, and those of apps rebuilt this round, are to be
/// set. Reads the apps and nothing else, so that it runs while they are
/// rebuilt (a first view's 10,000 lookups).
fn resolve_service(
    old: &ServiceSeq,
    service_ports: &BTreeMap<PortKey, ServicePort>,
    apps: &AppIndex<'_>,
) -> ServiceChanges {
    let mut new = ServiceSeq {
        names: String::with_capacity(old.names.len()),
        entries: Vec::with_capacity(service_ports.len()),
    };
    let mut set = Vec::new();
    // The next old entry, and where its app id starts.
    let (mut k, mut start) = (0, 0);
    // The last app resolved by name (the map is in app order).
    let mut last: Option<(&str, Option<(u32, u32)>)> = None;
    let valid = |slot: Option<(u32, u32)>| slot.is_some_and(|(s, g)| apps.gens[s as usize] == g);
    for ((app, n), sp) in service_ports {
        let key = (app.as_str(), *n);
        let mut matched = None;
        while let Some(e) = old.entries.get(k) {
            let old_key = (&old.names[start..e.name_end], e.index);
            match old_key.cmp(&key) {
                std::cmp::Ordering::Less => {
                    // Gone from the map.
                    set.push((e.slot, e.index, None));
                }
                std::cmp::Ordering::Equal => matched = Some(e),
                std::cmp::Ordering::Greater => break,
            }
            k += 1;
            start = e.name_end;
            if matched.is_some() {
                break;
            }
        }
        let slot = match matched {
            Some(e) if valid(e.slot) => e.slot,
            Some(e) if e.slot.is_none() && !apps.apps_added => None,
            _ => match last {
                Some((a, slot)) if a == app.as_str() => slot,
                _ => {
                    let slot = apps
                        .by_name
                        .get(app.as_str())
                        .map(|&s| (s, apps.gens[s as usize]));
                    last = Some((app.as_str(), slot));
                    slot
                }
            },
        };
        // Set where the entry is new or changed, or the app's ports were
        // built anew this round.
        let apply = match matched {
            Some(e) => {
                e.port != *sp
                    || e.slot != slot
                    || slot.is_some_and(|(s, _)| apps.rebuilt[s as usize] == apps.round)
            }
            None => true,
        };
        if apply {
            set.push((slot, *n, Some(*sp)));
        }
        new.names.push_str(app);
        new.entries.push(ServiceEntry {
            name_end: new.names.len(),
            index: *n,
            port: *sp,
            slot,
        });
    }
    for e in &old.entries[k..] {
        set.push((e.slot, e.index, None));
    }
    ServiceChanges { seq: new, set }
}

/// The label cache of earlier versions: the route cache keeps the labels.
pub type LabelCache = RouteCache;

impl fmt::Debug for RouteCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RouteCache({} tasks, {} apps)",
            self.seen.len(),
            self.by_name.len()
        )
    }
}

/// Apps per thread below which a view's apps are built on one thread (a
/// thread costs tens of microseconds; an app about one). Tests' clusters
/// are small: two apps per thread there, so that the property tests check
/// the parallel build against the reference too.
const PARALLEL_APPS: usize = if cfg!(test) { 2 } else { 1024 };
/// At most this many threads build one view's apps.
const MAX_THREADS: usize = 4;

/// How many threads share `units` of work, at least `per` each.
fn threads_for(units: usize, per: usize) -> usize {
    if units < 2 * per {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(units / per)
        .min(MAX_THREADS)
}

/// A server's state as the task's health and node say.
fn state_of(t: &TaskView) -> ServerState {
    if t.node_status != NodeStatus::Alive {
        ServerState::NodeDown
    } else if !t.healthy {
        ServerState::Unhealthy
    } else {
        ServerState::Up
    }
}

/// A task's spec address.
fn ptr_of(t: &TaskView) -> usize {
    Arc::as_ptr(&t.spec) as usize
}

impl RouteCache {
    fn mark(&mut self, slot: u32) {
        let flag = &mut self.dirty_flags[slot as usize];
        if !*flag {
            *flag = true;
            self.dirty.push(slot);
        }
    }

    /// The slot of app `app`, a new one if it has none.
    fn slot_of(&mut self, app: &str) -> u32 {
        if let Some(&s) = self.by_name.get(app) {
            return s;
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(AppSlot::default());
                self.dirty_flags.push(false);
                self.gens.push(0);
                self.rebuilt.push(0);
                self.starts.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        self.gens[s as usize] += 1;
        self.apps_added = true;
        let slot = &mut self.slots[s as usize];
        let name: Arc<str> = app.into();
        slot.app = name.clone();
        slot.live = true;
        self.by_name.insert(name, s);
        s
    }

    /// Matches `tasks` with the last input, marking the apps whose tasks
    /// changed; returns the last input's records (holding its specs until
    /// the rebuilt apps no longer compare against them).
    fn match_tasks(&mut self, tasks: &[TaskView]) -> Vec<Seen> {
        let mut prev = std::mem::take(&mut self.seen);
        let mut next: Vec<Seen> = Vec::with_capacity(tasks.len());
        // The next record of `prev` expected.
        let mut j = 0;
        // Cleared when a task moved backwards: searching `prev` ahead for
        // every later task could then cost the whole list each.
        let mut resync = true;
        // The last app looked up by name: an app's tasks mostly come
        // together (a first view looks up every task), and comparing one
        // name is cheaper than hashing it.
        let mut last: Option<(&str, u32)> = None;
        if self.slots.is_empty() {
            // A first view: sized once instead of grown (and rehashed).
            let apps = tasks.len() / 4 + 16;
            self.by_name.reserve(apps);
            self.slots.reserve(apps);
        }
        for t in tasks {
            let p = ptr_of(t);
            let mut found = j < prev.len() && prev[j].ptr() == p;
            let slot = if found {
                prev[j].slot
            } else {
                // A new spec, or tasks before this one were removed (or
                // moved): the app by name, then whether it had this spec.
                let app = t.spec.app.as_str();
                let s = match last {
                    Some((a, s)) if a == app => s,
                    _ => {
                        let s = self.slot_of(app);
                        last = Some((app, s));
                        s
                    }
                };
                if resync && self.slots[s as usize].ptrs.contains(&p) {
                    match prev[j..].iter().position(|e| e.ptr() == p) {
                        Some(d) => {
                            // The records skipped: their apps lost them.
                            for e in &prev[j..j + d] {
                                let skipped = e.slot;
                                self.mark(skipped);
                            }
                            j += d;
                            found = true;
                        }
                        None => resync = false,
                    }
                }
                s
            };
            let spec = if found {
                let e = &mut prev[j];
                if e.node_status != t.node_status || e.healthy != t.healthy {
                    self.mark(slot);
                }
                j += 1;
                e.spec.take()
            } else {
                self.mark(slot);
                None
            };
            next.push(Seen {
                slot,
                node_status: t.node_status,
                healthy: t.healthy,
                spec: spec.or_else(|| Some(t.spec.clone())),
            });
        }
        for e in &prev[j..] {
            let slot = e.slot;
            self.mark(slot);
        }
        // Records before `j` not taken were skipped: marked above.
        self.seen = next;
        prev
    }

    /// The node name `node`, shared.
    fn node(nodes: &mut FastSet<Arc<str>>, node: &str) -> Arc<str> {
        match nodes.get(node) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = Arc::from(node);
                nodes.insert(n.clone());
                n
            }
        }
    }

    /// Frees app `s`'s slot: no task left, the app is gone. Returns
    /// whether the conflict pass's input changed, and whether its problems.
    fn remove_app(&mut self, s: u32) -> (bool, bool) {
        self.rebuilt[s as usize] = self.round;
        let slot = &mut self.slots[s as usize];
        let had_ports = !slot.ports.is_empty();
        let had_problems = !slot.problems.is_empty();
        self.by_name.remove(&slot.app);
        self.gens[s as usize] += 1;
        *slot = AppSlot::default();
        self.free.push(s);
        (had_ports, had_problems)
    }

    /// Builds an app again from its tasks (`idx`: their positions in
    /// `tasks`, in input order, at least one), with node names shared
    /// through `nodes`. Touches nothing but the app's slot: apps are built
    /// in parallel in a first view. Returns whether the conflict pass's
    /// input changed, and whether its problems.
    fn rebuild(
        slot: &mut AppSlot,
        idx: &mut [u32],
        tasks: &[TaskView],
        nodes: &mut FastSet<Arc<str>>,
    ) -> (bool, bool) {
        slot.ptrs.clear();
        slot.ptrs
            .extend(idx.iter().map(|&i| ptr_of(&tasks[i as usize])));
        // In (node, id) order; an agent's tasks come so already.
        fn key(t: &TaskView) -> (&str, &str) {
            (t.node_id.as_str(), t.id.as_str())
        }
        if !idx.is_sorted_by(|&a, &b| key(&tasks[a as usize]) <= key(&tasks[b as usize])) {
            idx.sort_by(|&a, &b| key(&tasks[a as usize]).cmp(&key(&tasks[b as usize])));
        }
        let first = &tasks[idx[0] as usize];
        let app = first.spec.app.as_str();
        let mut problems = Vec::new();
        let parsed = if first.spec.labels.is_empty() {
            // The first task's labels are the app's: none, not exposed.
            None
        } else {
            if let Some(odd) = idx
                .iter()
                .map(|&i| &tasks[i as usize])
                .find(|t| t.spec.labels != first.spec.labels)
            {
                problems.push(labels_differ(app, first, odd));
            }
            Some(match &slot.parsed {
                Some(p) if p.reads_as(&first.spec) => p.clone(),
                _ => Arc::new(ParsedApp::read(&first.spec)),
            })
        };
        let mut old_ports = std::mem::take(&mut slot.ports);
        // Sized once: a PortState is large, and a Vec grown from empty
        // takes room for four (memory a first view touches for nothing).
        let exposed = parsed.as_ref().map_or(0, |p| {
            p.ports
                .iter()
                .filter(|o| matches!(o, Parsed::Exposed { .. }))
                .count()
        });
        let mut ports = Vec::with_capacity(exposed);
        let mut carried = 0;
        if let Some(parsed) = &parsed {
            problems.extend(parsed.app_problems.iter().map(|p| problem(app, None, p)));
            for (index, outcome) in parsed.ports.iter().enumerate() {
                let (labels, ps) = match outcome {
                    Parsed::NotExposed => continue,
                    Parsed::Disabled(ps) => {
                        problems.extend(ps.iter().map(|p| problem(app, Some(index), p)));
                        continue;
                    }
                    Parsed::Exposed {
                        labels, problems, ..
                    } => (labels, problems),
                };
                problems.extend(ps.iter().map(|p| problem(app, Some(index), p)));
                // At most one per task: sized once (collecting a filter
                // grows from four to eight for five tasks).
                let mut servers: Vec<Server> = Vec::with_capacity(idx.len());
                servers.extend(idx.iter().filter_map(|&i| {
                    let t = &tasks[i as usize];
                    let port = t.spec.ports.get(index)?.port;
                    Some(Server {
                        addr: SocketAddr::new(t.spec.ip, port),
                        node: Self::node(nodes, &t.node_id),
                        state: state_of(t),
                    })
                }));
                let old = old_ports
                    .iter_mut()
                    .find(|o| o.index == index && Arc::ptr_eq(&o.labels, labels));
                ports.push(match old {
                    Some(o) => {
                        // The same labels: what the conflict pass decided
                        // stands; the backend too if its servers do.
                        carried += 1;
                        let same = o.servers() == servers.as_slice();
                        let (servers, backend) = match o.backend.take() {
                            // The backend keeps them.
                            Some(b) if same => (Vec::new(), Some(b)),
                            _ => (servers, None),
                        };
                        PortState {
                            index,
                            labels: labels.clone(),
                            servers,
                            service: o.service,
                            base_name: o.base_name.take(),
                            decided: o.decided.take(),
                            backend,
                        }
                    }
                    None => PortState {
                        index,
                        labels: labels.clone(),
                        servers,
                        service: None,
                        base_name: None,
                        decided: None,
                        backend: None,
                    },
                });
            }
        }
        let conflicts_changed = carried != old_ports.len() || carried != ports.len();
        let problems_changed = problems != slot.problems;
        slot.parsed = parsed;
        slot.ports = ports;
        slot.problems = problems;
        (conflicts_changed, problems_changed)
    }

    /// Sets the service port of app port `index` of `slot` (if the slot is
    /// still that app's and the port exposed); returns whether it changed.
    fn set_service(
        &mut self,
        slot: Option<(u32, u32)>,
        index: usize,
        value: Option<ServicePort>,
    ) -> bool {
        let Some((s, g)) = slot else { return false };
        if self.gens[s as usize] != g {
            return false;
        }
        match self.slots[s as usize]
            .ports
            .iter_mut()
            .find(|p| p.index == index)
        {
            Some(p) if p.service != value => {
                p.service = value;
                p.reset_backend();
                true
            }
            _ => false,
        }
    }

    /// Gives the exposed app ports the service ports `changes` resolved;
    /// returns whether any changed.
    fn apply_service(&mut self, changes: ServiceChanges) -> bool {
        let mut changed = false;
        for (slot, index, value) in changes.set {
            changed |= self.set_service(slot, index, value);
        }
        self.service = changes.seq;
        changed
    }
    /// The conflict pass: every exposed app port oldest first; names, bind
    /// ports and HTTP routes, each contested one kept by the older.
    fn decide(&mut self) {
        // Older first: settled claims, then the oldest; app ports without
        // a claim yet after every one with; ties by `(app, index)`. Keys
        // taken out first: comparing through each app's ports costs a
        // cache miss per comparison.
        fn rank(p: &PortState) -> (bool, bool, u64) {
            match p.service {
                Some(s) => (false, !s.settled, s.since),
                None => (true, true, 0),
            }
        }
        // (rank, slot, port, port index)
        type SortKey = ((bool, bool, u64), u32, u32, usize);
        let mut keys: Vec<SortKey> = Vec::with_capacity(self.order.len());
        for (s, slot) in self.slots.iter().enumerate() {
            for (p, port) in slot.ports.iter().enumerate() {
                keys.push((rank(port), s as u32, p as u32, port.index));
            }
        }
        {
            let slots = &self.slots;
            keys.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0).then_with(|| {
                    if a.1 == b.1 {
                        a.3.cmp(&b.3)
                    } else {
                        (&*slots[a.1 as usize].app, a.3).cmp(&(&*slots[b.1 as usize].app, b.3))
                    }
                })
            });
        }
        let order: Vec<(u32, u32)> = keys.iter().map(|k| (k.1, k.2)).collect();
        drop(keys);
        // Base names, formatted only for a port not seen before.
        let mut name = String::new();
        for &(s, p) in &order {
            let slot = &mut self.slots[s as usize];
            let Some(parsed) = slot.parsed.as_ref() else {
                continue;
            };
            let port = &mut slot.ports[p as usize];
            let wanted = port.labels.bind_port.or(port.service.map(|s| s.port));
            if port.base_name.as_ref().is_some_and(|b| b.0 == wanted) {
                continue;
            }
            // `<app>_<port>`, or `<app>_p<index>` while it has no port.
            name.clear();
            name.push_str(&parsed.app_name);
            match wanted {
                Some(w) => {
                    name.push('_');
                    push_number(&mut name, w.into());
                }
                None => {
                    name.push_str("_p");
                    push_number(&mut name, port.index);
                }
            }
            let hash = fnv(name.as_bytes());
            port.base_name = Some((wanted, name.as_str().into(), hash));
        }

        let n = order.len();
        let mut decided: Vec<(Arc<str>, Option<u16>)> = Vec::with_capacity(n);
        let mut conflicts = Vec::new();
        // (weight, specificity, path length, order, slot, port, key index)
        let mut routes: Vec<(i32, u8, usize, u32, u32, u32, u32)> = Vec::with_capacity(n);
        let mut bound: FastMap<u16, u32> = FastMap::with_capacity_and_hasher(n, Default::default());
        // Who holds each host and path: by the hash computed when their
        // labels were read, the first claimant's `(order, key index)` (16
        // bytes a bucket, where the keys themselves took 48: a first view
        // fills 10,000s); a different host and path with the same hash is
        // kept by name in `collided`.
        let mut routed: FastMap<u64, (u32, u32)> =
            FastMap::with_capacity_and_hasher(n, Default::default());
        let mut collided: FastMap<(Option<&str>, Option<&str>), u32> = FastMap::default();
        let slots = &self.slots;
        let key_at = |at: u32, k: u32| -> Option<(Option<&str>, Option<&str>)> {
            let (s, p) = order[at as usize];
            let slot = &slots[s as usize];
            let index = slot.ports[p as usize].index;
            match slot.parsed.as_ref()?.ports.get(index)? {
                Parsed::Exposed { routes, .. } => routes
                    .get(k as usize)
                    .map(|r| (r.host.as_deref(), r.path.as_deref())),
                _ => None,
            }
        };
        let mut names: FastSet<u64> = FastSet::with_capacity_and_hasher(n, Default::default());
        for (at, &(s, p)) in order.iter().enumerate() {
            let slot = &self.slots[s as usize];
            let port = &slot.ports[p as usize];
            let (Some(parsed), Some((wanted, base, hash))) = (&slot.parsed, &port.base_name) else {
                // Not reached: an app has exposed ports only with labels,
                // and every one got a base name above. Kept aligned.
                decided.push((slot.app.as_ref().into(), None));
                continue;
            };
            let index = port.index;
            let labels = &port.labels;
            // Two apps whose ids clean to one name (`/a/b`, `/a_b`) on one
            // port: the younger gets its port index appended. Names are
            // remembered by their hash (no copy); a hash shared by two
            // different names only renames the younger, deterministically.
            let name: Arc<str> = if names.insert(*hash) {
                base.clone()
            } else {
                let mut name = String::with_capacity(base.len() + 4);
                name.push_str(base);
                name.push('_');
                push_number(&mut name, index);
                names.insert(fnv(name.as_bytes()));
                name.into()
            };
            let mut lose = |label: &str, message: String| {
                conflicts.push(Problem {
                    app: slot.app.to_string(),
                    port_index: Some(index),
                    label: Some(format!("HAPROXY_{index}_{label}")),
                    message,
                    disables: true,
                });
            };
            let bind_port = match *wanted {
                Some(w) => match bound.get(&w) {
                    Some(&holder) => {
                        let holder = &decided[holder as usize].0;
                        lose(
                            "PORT",
                            format!("port {w} is already bound for the older {holder}"),
                        );
                        None
                    }
                    None => {
                        bound.insert(w, at as u32);
                        Some(w)
                    }
                },
                None => None,
            };
            let Some(Parsed::Exposed { routes: keys, .. }) = parsed.ports.get(index) else {
                decided.push((name, bind_port));
                continue;
            };
            for (k, key) in keys.iter().enumerate() {
                let wanted = (key.host.as_deref(), key.path.as_deref());
                let held = match routed.entry(key.hash) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert((at as u32, k as u32));
                        None
                    }
                    std::collections::hash_map::Entry::Occupied(o) => {
                        let (first, first_k) = *o.get();
                        if key_at(first, first_k) == Some(wanted) {
                            Some(first)
                        } else {
                            match collided.entry(wanted) {
                                std::collections::hash_map::Entry::Vacant(v) => {
                                    v.insert(at as u32);
                                    None
                                }
                                std::collections::hash_map::Entry::Occupied(o) => Some(*o.get()),
                            }
                        }
                    }
                };
                if let Some(holder) = held {
                    let holder = if holder as usize == at {
                        &name
                    } else {
                        &decided[holder as usize].0
                    };
                    let what = match wanted {
                        (Some(h), Some(p)) => format!("{h}{p}"),
                        (Some(h), None) => h.to_string(),
                        (None, Some(p)) => format!("path {p}"),
                        (None, None) => String::new(),
                    };
                    lose(
                        if key.host.is_some() { "VHOST" } else { "PATH" },
                        format!("{what} is already routed to the older {holder}"),
                    );
                    continue;
                }
                let path_len = key.path.as_deref().map_or(0, str::len);
                routes.push((
                    -labels.backend_weight,
                    key.specificity,
                    usize::MAX - path_len,
                    at as u32,
                    s,
                    p,
                    k as u32,
                ));
            }
            decided.push((name, bind_port));
        }
        drop((routed, collided));
        routes.sort_unstable();
        let http_routes: Vec<HttpRoute> = routes
            .iter()
            .filter_map(|&(_, _, _, at, s, p, k)| {
                let slot = &self.slots[s as usize];
                let index = slot.ports[p as usize].index;
                let Some(Parsed::Exposed { routes: keys, .. }) =
                    slot.parsed.as_ref()?.ports.get(index)
                else {
                    return None;
                };
                let key = &keys[k as usize];
                Some(HttpRoute {
                    host: key.host.clone(),
                    path: key.path.clone(),
                    backend: decided[at as usize].0.clone(),
                })
            })
            .collect();
        for (&(s, p), d) in order.iter().zip(decided) {
            let port = &mut self.slots[s as usize].ports[p as usize];
            if port.decided.as_ref() != Some(&d) {
                port.reset_backend();
            }
            port.decided = Some(d);
        }
        self.order = order;
        self.http_routes = http_routes;
        self.conflicts = conflicts;
        self.decided = true;
    }

    /// The apps as [`resolve_service`] reads them.
    fn app_index(&self) -> AppIndex<'_> {
        AppIndex {
            by_name: &self.by_name,
            gens: &self.gens,
            rebuilt: &self.rebuilt,
            round: self.round,
            apps_added: self.apps_added,
        }
    }

    /// Builds the apps of `dirty` again (their tasks' positions are in
    /// `flat`, app after app, each ending at its `starts`), or frees those
    /// left without tasks, and resolves the service-port map against them.
    /// Returns whether the conflict pass's input changed, whether its
    /// problems, and the service ports to set.
    fn rebuild_dirty(
        &mut self,
        dirty: &[u32],
        flat: &mut [u32],
        tasks: &[TaskView],
        service_ports: &BTreeMap<PortKey, ServicePort>,
    ) -> (bool, bool, ServiceChanges) {
        let (mut conflicts, mut problems) = (false, false);
        // Each app's tasks, and the apps left without any.
        let mut jobs: Vec<(u32, &mut [u32])> = Vec::with_capacity(dirty.len());
        let mut gone = Vec::new();
        let mut rest = flat;
        let mut begin = 0;
        for &s in dirty {
            let end = self.starts[s as usize] as usize;
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(end - begin);
            rest = tail;
            begin = end;
            self.dirty_flags[s as usize] = false;
            self.rebuilt[s as usize] = self.round;
            if mine.is_empty() {
                gone.push(s);
            } else {
                jobs.push((s, mine));
            }
        }
        for s in gone {
            let (c, p) = self.remove_app(s);
            conflicts |= c;
            problems |= p;
        }
        let threads = threads_for(jobs.len(), PARALLEL_APPS);
        if threads <= 1 {
            for (s, idx) in jobs {
                let (c, p) =
                    Self::rebuild(&mut self.slots[s as usize], idx, tasks, &mut self.nodes);
                conflicts |= c;
                problems |= p;
            }
            let changes = resolve_service(&self.service, service_ports, &self.app_index());
            return (conflicts, problems, changes);
        }
        // A first view (or a view after a long absence): thousands of apps,
        // each built from its own tasks into its own slot, split between
        // threads. Each thread shares node names through its own copy of
        // the set; the copies' new names are merged after (a name added by
        // two threads is two allocations, equal by content).
        let mut slots: Vec<Option<&mut AppSlot>> = self.slots.iter_mut().map(Some).collect();
        let mut work: Vec<(&mut AppSlot, &mut [u32])> = Vec::with_capacity(jobs.len());
        for (s, idx) in jobs {
            if let Some(slot) = slots[s as usize].take() {
                work.push((slot, idx));
            }
        }
        drop(slots);
        // This thread first resolves the service ports (reading the apps'
        // names and generations, which building them does not touch), so
        // it takes fewer apps: an entry costs about a fifth of an app.
        let entries = service_ports.len() / 5;
        let per = (work.len() + entries).div_ceil(threads);
        let own = per.saturating_sub(entries).min(work.len());
        let (mine, theirs) = work.split_at_mut(own);
        let per = theirs.len().div_ceil(threads - 1).max(1);
        let apps = AppIndex {
            by_name: &self.by_name,
            gens: &self.gens,
            rebuilt: &self.rebuilt,
            round: self.round,
            apps_added: self.apps_added,
        };
        let old_service = &self.service;
        let mut changes = None;
        let nodes = &mut self.nodes;
        let mut copies: Vec<FastSet<Arc<str>>> = (1..threads).map(|_| nodes.clone()).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = theirs
                .chunks_mut(per)
                .zip(copies.iter_mut())
                .map(|(chunk, nodes)| {
                    scope.spawn(move || {
                        let (mut c, mut p) = (false, false);
                        for (slot, idx) in chunk {
                            let r = Self::rebuild(slot, idx, tasks, nodes);
                            c |= r.0;
                            p |= r.1;
                        }
                        (c, p)
                    })
                })
                .collect();
            changes = Some(resolve_service(old_service, service_ports, &apps));
            for (slot, idx) in mine {
                let r = Self::rebuild(slot, idx, tasks, nodes);
                conflicts |= r.0;
                problems |= r.1;
            }
            for h in handles {
                // A panic in a thread is a bug here: passed on as is.
                let (c, p) = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                conflicts |= c;
                problems |= p;
            }
        });
        for copy in copies {
            for n in copy {
                if !nodes.contains(&n) {
                    nodes.insert(n);
                }
            }
        }
        let changes = changes
            .unwrap_or_else(|| resolve_service(&self.service, service_ports, &self.app_index()));
        (conflicts, problems, changes)
    }

    /// Forgets node names no server holds any more, now and then.
    fn purge_nodes(&mut self) {
        if self.nodes.len() > 2 * self.nodes_after_purge + 64 {
            self.nodes.retain(|n| Arc::strong_count(n) > 1);
            self.nodes_after_purge = self.nodes.len();
        }
    }
}

/// Computes the routes. Pure and deterministic: the same tasks and service
/// ports give the same routes on every node, whatever their order.
pub fn compute(input: &Input<'_>) -> Routes {
    compute_cached(input, &mut RouteCache::default())
}

/// [`compute`], redoing only what changed since the computation `cache`
/// remembers (the result is the same).
pub fn compute_cached(input: &Input<'_>, cache: &mut RouteCache) -> Routes {
    let tasks = input.tasks;
    cache.round += 1;
    cache.apps_added = false;
    let prev = cache.match_tasks(tasks);
    let mut conflicts_changed = !cache.decided;
    let mut problems_changed = cache.problems.is_none();
    let mut changes = None;
    if !cache.dirty.is_empty() {
        // The changed apps' tasks, in input order, app after app: counted,
        // then placed.
        let dirty = std::mem::take(&mut cache.dirty);
        let mut flat = std::mem::take(&mut cache.flat);
        for &s in &dirty {
            cache.starts[s as usize] = 0;
        }
        for e in &cache.seen {
            if cache.dirty_flags[e.slot as usize] {
                cache.starts[e.slot as usize] += 1;
            }
        }
        let mut at = 0;
        for &s in &dirty {
            let count = cache.starts[s as usize];
            cache.starts[s as usize] = at;
            at += count;
        }
        flat.clear();
        flat.resize(at as usize, 0);
        for (i, e) in cache.seen.iter().enumerate() {
            if cache.dirty_flags[e.slot as usize] {
                let next = &mut cache.starts[e.slot as usize];
                flat[*next as usize] = i as u32;
                *next += 1;
            }
        }
        // Each start has moved to its app's end.
        let (c, p, ch) = cache.rebuild_dirty(&dirty, &mut flat, tasks, input.service_ports);
        conflicts_changed |= c;
        problems_changed |= p;
        changes = Some(ch);
        cache.flat = flat;
        cache.dirty = dirty;
        cache.dirty.clear();
        cache.purge_nodes();
    }
    // The specs the last input held are compared with no more.
    drop(prev);
    let changes = changes.unwrap_or_else(|| {
        resolve_service(&cache.service, input.service_ports, &cache.app_index())
    });
    conflicts_changed |= cache.apply_service(changes);
    if conflicts_changed {
        cache.decide();
        problems_changed = true;
    }
    if problems_changed {
        let mut problems: Vec<Problem> = cache
            .slots
            .iter()
            .flat_map(|s| s.problems.iter())
            .chain(cache.conflicts.iter())
            .cloned()
            .collect();
        problems.sort();
        problems.dedup();
        cache.problems = Some(problems);
    }
    let backends: Vec<Arc<Backend>> = cache
        .order
        .iter()
        .filter_map(|&(s, p)| {
            let slot = &mut cache.slots[s as usize];
            let app = &slot.app;
            let port = &mut slot.ports[p as usize];
            let (name, bind_port) = port.decided.as_ref()?;
            Some(
                port.backend
                    .get_or_insert_with(|| {
                        Arc::new(Backend {
                            name: name.clone(),
                            app: app.clone(),
                            port_index: port.index,
                            service_port: port.service.map(|s| s.port),
                            bind_port: *bind_port,
                            labels: port.labels.clone(),
                            servers: std::mem::take(&mut port.servers),
                        })
                    })
                    .clone(),
            )
        })
        .collect();
    Routes {
        backends,
        http_routes: cache.http_routes.clone(),
        problems: cache.problems.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
