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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
    pub name: String,
    pub app: String,
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
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub backend: String,
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
    /// on every node, without sorting 10,000 names per view.
    pub backends: Vec<Backend>,
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
        let backends: Vec<Backend> = self.backends.iter().filter(|b| keep(b)).cloned().collect();
        let names: BTreeSet<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let http_routes = self
            .http_routes
            .iter()
            .filter(|r| names.contains(r.backend.as_str()))
            .cloned()
            .collect();
        Routes {
            backends,
            http_routes,
            problems: self.problems.clone(),
        }
    }
}

/// FNV-1a: stable across runs and processes, unlike std's hasher, and
/// faster on short keys (the maps below hash app names and ports).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<Fnv>>;

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

/// An exposed app port on its way to a backend.
struct Candidate<'a> {
    app: &'a str,
    index: usize,
    labels: Arc<PortLabels>,
    parsed: Arc<ParsedApp>,
    service: Option<ServicePort>,
    tasks: &'a [&'a TaskView],
}

impl Candidate<'_> {
    /// Older first: settled claims, then the oldest; app ports without a
    /// claim yet after every one with, by name.
    /// Ties broken by `(app, index)`.
    fn rank(&self) -> (bool, bool, u64) {
        match self.service {
            Some(s) => (false, !s.settled, s.since),
            None => (true, true, 0),
        }
    }
}

fn problem(app: &str, index: Option<usize>, p: LabelProblem) -> Problem {
    Problem {
        app: app.to_string(),
        port_index: index,
        label: Some(p.label),
        message: p.message,
        disables: p.disables,
    }
}

/// One app's labels as read: what [`labels`] says about each of its ports.
struct ParsedApp {
    /// The task spec they were read from, held so that its address (the
    /// cache's key) cannot be reused by another spec while cached.
    spec: Arc<TaskSpec>,
    app_name: String,
    app_problems: Vec<LabelProblem>,
    ports: Vec<Parsed>,
}

enum Parsed {
    NotExposed,
    Disabled(Vec<LabelProblem>),
    Exposed(Arc<PortLabels>, Vec<LabelProblem>),
}

impl ParsedApp {
    fn read(spec: &Arc<TaskSpec>) -> ParsedApp {
        let ports = (0..spec.ports.len())
            .map(|index| match labels::parse_port(&spec.labels, index) {
                PortOutcome::NotExposed => Parsed::NotExposed,
                PortOutcome::Disabled { problems } => Parsed::Disabled(problems),
                PortOutcome::Exposed { labels, problems } => {
                    Parsed::Exposed(Arc::new(labels), problems)
                }
            })
            .collect();
        ParsedApp {
            spec: spec.clone(),
            app_name: labels::backend_app_name(&spec.app),
            app_problems: labels::app_problems(&spec.labels, spec.ports.len()),
            ports,
        }
    }
}

/// Apps' labels as last read, reused while an app's first task is the same
/// decoded spec (an agent shares unchanged specs between views), so a
/// change re-reads only the apps it touched. Holds only what the last
/// computation used.
#[derive(Default)]
pub struct LabelCache {
    apps: FastMap<usize, Arc<ParsedApp>>,
}

impl fmt::Debug for LabelCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LabelCache({} apps)", self.apps.len())
    }
}

impl LabelCache {
    fn parsed(&self, spec: &Arc<TaskSpec>) -> Arc<ParsedApp> {
        match self.apps.get(&(Arc::as_ptr(spec) as usize)) {
            Some(p) if Arc::ptr_eq(&p.spec, spec) => p.clone(),
            _ => Arc::new(ParsedApp::read(spec)),
        }
    }
}

/// Computes the routes. Pure and deterministic: the same tasks and service
/// ports give the same routes on every node.
pub fn compute(input: &Input<'_>) -> Routes {
    compute_cached(input, &mut LabelCache::default())
}

/// [`compute`], reading only the labels of apps `cache` has not seen as
/// they are now (the result is the same).
pub fn compute_cached(input: &Input<'_>, cache: &mut LabelCache) -> Routes {
    let mut problems = Vec::new();

    // Tasks by app, each app's in (node, id) order: the first task's labels
    // are the app's (tasks of one app normally carry the same).
    // Hashed, not ordered: what comes out is sorted (by age, by name).
    // Sized up front: growing these maps rehashes every entry.
    let mut by_app: FastMap<&str, Vec<&TaskView>> =
        FastMap::with_capacity_and_hasher(input.tasks.len() / 2 + 1, Default::default());
    for t in input.tasks {
        if !t.spec.labels.is_empty() || by_app.contains_key(t.spec.app.as_str()) {
            by_app
                .entry(t.spec.app.as_str())
                .or_insert_with(|| Vec::with_capacity(8))
                .push(t);
        }
    }
    let service_ports: FastMap<(&str, usize), ServicePort> = input
        .service_ports
        .iter()
        .map(|((app, n), p)| ((app.as_str(), *n), *p))
        .collect();
    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(by_app.len());
    let by_app: Vec<(&str, Vec<&TaskView>)> = by_app
        .into_iter()
        .map(|(app, mut tasks)| {
            // An agent's tasks come in (node, id) order already: check
            // before sorting.
            fn key<'t>(t: &&'t TaskView) -> (&'t str, &'t str) {
                (t.node_id.as_str(), t.id.as_str())
            }
            if !tasks.is_sorted_by(|a, b| key(a) <= key(b)) {
                tasks.sort_by(|a, b| key(a).cmp(&key(b)));
            }
            (app, tasks)
        })
        .collect();
    let mut fresh = FastMap::with_capacity_and_hasher(by_app.len(), Default::default());
    for (app, tasks) in &by_app {
        let first = tasks[0];
        if first.spec.labels.is_empty() {
            continue;
        }
        if let Some(odd) = tasks.iter().find(|t| t.spec.labels != first.spec.labels) {
            problems.push(Problem {
                app: app.to_string(),
                port_index: None,
                label: None,
                message: format!(
                    "tasks {} and {} carry different labels; {}'s are used",
                    first.id, odd.id, first.id
                ),
                disables: false,
            });
        }
        let parsed = cache.parsed(&first.spec);
        fresh.insert(Arc::as_ptr(&first.spec) as usize, parsed.clone());
        for p in &parsed.app_problems {
            problems.push(problem(app, None, p.clone()));
        }
        for (index, outcome) in parsed.ports.iter().enumerate() {
            match outcome {
                Parsed::NotExposed => {}
                Parsed::Disabled(ps) => {
                    problems.extend(ps.iter().map(|p| problem(app, Some(index), p.clone())));
                }
                Parsed::Exposed(labels, ps) => {
                    problems.extend(ps.iter().map(|p| problem(app, Some(index), p.clone())));
                    let service = service_ports.get(&(*app, index)).copied();
                    candidates.push(Candidate {
                        app,
                        index,
                        labels: labels.clone(),
                        parsed: parsed.clone(),
                        service,
                        tasks,
                    });
                }
            }
        }
    }
    // Indices sorted, not candidates: a candidate is large.
    let mut by_age: Vec<usize> = (0..candidates.len()).collect();
    {
        // Keys computed once, not per comparison.
        let keys: Vec<(bool, bool, u64)> = candidates.iter().map(Candidate::rank).collect();
        by_age.sort_by(|&a, &b| {
            keys[a].cmp(&keys[b]).then_with(|| {
                (candidates[a].app, candidates[a].index)
                    .cmp(&(candidates[b].app, candidates[b].index))
            })
        });
    }

    // First pass, oldest first, by reference: names, bind ports and HTTP
    // routes, each contested one kept by the older app port.
    struct Decided {
        name: String,
        bind_port: Option<u16>,
    }
    let mut decided: Vec<Decided> = Vec::with_capacity(candidates.len());
    let n = candidates.len();
    let mut http_routes: Vec<(i32, u8, usize, usize, usize)> = Vec::with_capacity(n);
    let mut route_keys: Vec<(Option<&str>, Option<&str>)> = Vec::with_capacity(n);
    // Bind port → the index of the backend holding it; likewise routes.
    let mut bound: FastMap<u16, usize> = FastMap::with_capacity_and_hasher(n, Default::default());
    let mut routed: FastMap<(Option<&str>, Option<&str>), usize> =
        FastMap::with_capacity_and_hasher(n, Default::default());
    let mut names: FastSet<u64> = FastSet::with_capacity_and_hasher(n, Default::default());
    for (order, &i) in by_age.iter().enumerate() {
        let c = &candidates[i];
        let wanted_port = c.labels.bind_port.or(c.service.map(|s| s.port));
        // `<app>_<port>`, or `<app>_p<index>` while it has no port; built
        // by hand: this runs for every app port of every view.
        let app_name = &c.parsed.app_name;
        let mut name = String::with_capacity(app_name.len() + 8);
        name.push_str(app_name);
        match wanted_port {
            Some(p) => {
                name.push('_');
                push_number(&mut name, p.into());
            }
            None => {
                name.push_str("_p");
                push_number(&mut name, c.index);
            }
        }
        // Two apps whose ids clean to one name (`/a/b`, `/a_b`) on one port:
        // the younger gets its port index appended. Names are remembered by
        // their hash (no copy); a hash shared by two different names only
        // renames the younger, deterministically.
        if !names.insert(fnv(name.as_bytes())) {
            name.push('_');
            push_number(&mut name, c.index);
            names.insert(fnv(name.as_bytes()));
        }
        let mut lose = |label: &str, message: String| {
            problems.push(Problem {
                app: c.app.to_string(),
                port_index: Some(c.index),
                label: Some(format!("HAPROXY_{}_{label}", c.index)),
                message,
                disables: true,
            });
        };
        let bind_port = match wanted_port {
            Some(p) => match bound.get(&p) {
                Some(&holder) => {
                    let holder = &decided[holder].name;
                    lose(
                        "PORT",
                        format!("port {p} is already bound for the older {holder}"),
                    );
                    None
                }
                None => {
                    bound.insert(p, order);
                    Some(p)
                }
            },
            None => None,
        };
        if c.labels.mode == Mode::Http {
            let path = c.labels.path.as_deref();
            let any_host = [None];
            let hosts: Vec<Option<&str>> = if c.labels.vhosts.is_empty() {
                if path.is_some() {
                    any_host.to_vec()
                } else {
                    Vec::new()
                }
            } else {
                c.labels.vhosts.iter().map(|h| Some(h.as_str())).collect()
            };
            for host in hosts {
                let key = (host, path);
                if let Some(&holder) = routed.get(&key) {
                    let holder = if holder == order {
                        &name
                    } else {
                        &decided[holder].name
                    };
                    let what = match key {
                        (Some(h), Some(p)) => format!("{h}{p}"),
                        (Some(h), None) => h.to_string(),
                        (None, Some(p)) => format!("path {p}"),
                        (None, None) => String::new(),
                    };
                    lose(
                        if host.is_some() { "VHOST" } else { "PATH" },
                        format!("{what} is already routed to the older {holder}"),
                    );
                    continue;
                }
                routed.insert(key, order);
                let specificity = match host {
                    Some(h) if h.starts_with("*.") => 1,
                    Some(_) => 0,
                    None => 2,
                };
                let path_len = path.map_or(0, str::len);
                http_routes.push((
                    -c.labels.backend_weight,
                    specificity,
                    usize::MAX - path_len,
                    order,
                    route_keys.len(),
                ));
                route_keys.push(key);
            }
        }
        decided.push(Decided { name, bind_port });
    }
    http_routes.sort_unstable();
    let http_routes: Vec<HttpRoute> = http_routes
        .into_iter()
        .map(|(_, _, _, order, key)| {
            let (host, path) = route_keys[key];
            HttpRoute {
                host: host.map(str::to_string),
                path: path.map(str::to_string),
                backend: decided[order].name.clone(),
            }
        })
        .collect();
    drop(route_keys);
    drop(routed);

    // Second pass: the backends, taking the labels over.
    let mut slots: Vec<Option<Candidate<'_>>> = candidates.into_iter().map(Some).collect();
    // Node names, one allocation each however many servers they run.
    let mut nodes: FastMap<&str, Arc<str>> = FastMap::default();
    let backends: Vec<Backend> = by_age
        .iter()
        .zip(decided)
        .filter_map(|(&i, d)| Some((slots[i].take()?, d)))
        .map(|(c, d)| {
            // The app's tasks are in (node, id) order already.
            let servers: Vec<Server> = c
                .tasks
                .iter()
                .filter_map(|t| {
                    let port = t.spec.ports.get(c.index)?.port;
                    let state = if t.node_status != NodeStatus::Alive {
                        ServerState::NodeDown
                    } else if !t.healthy {
                        ServerState::Unhealthy
                    } else {
                        ServerState::Up
                    };
                    let node = nodes
                        .entry(t.node_id.as_str())
                        .or_insert_with(|| Arc::from(t.node_id.as_str()))
                        .clone();
                    Some(Server {
                        addr: SocketAddr::new(t.spec.ip, port),
                        node,
                        state,
                    })
                })
                .collect();
            Backend {
                name: d.name,
                app: c.app.to_string(),
                port_index: c.index,
                service_port: c.service.map(|s| s.port),
                bind_port: d.bind_port,
                labels: c.labels,
                servers,
            }
        })
        .collect();
    cache.apps = fresh;
    problems.sort();
    problems.dedup();
    Routes {
        backends,
        http_routes,
        problems,
    }
}

#[cfg(test)]
mod tests;
