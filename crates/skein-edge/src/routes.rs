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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use skein_state::{NodeStatus, TaskView};

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
    /// Marathon-LB's server name, `<node>_<ip>_<port>`.
    pub name: String,
    pub addr: SocketAddr,
    pub node: String,
    pub task: String,
    pub state: ServerState,
}

/// One exposed app port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(flatten)]
    pub labels: PortLabels,
    /// Sorted by name.
    pub servers: Vec<Server>,
}

/// A virtual host and/or path prefix on the edge's HTTP and HTTPS ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// Sorted by name.
    pub backends: Vec<Backend>,
    /// In match order: the first route whose host and path match a request
    /// takes it (higher `HAPROXY_{n}_BACKEND_WEIGHT` first, then exact
    /// hosts before wildcards before none, then longer paths).
    pub http_routes: Vec<HttpRoute>,
    /// Sorted.
    pub problems: Vec<Problem>,
}

impl Routes {
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

/// An exposed app port on its way to a backend.
struct Candidate<'a> {
    app: &'a str,
    index: usize,
    labels: PortLabels,
    service: Option<ServicePort>,
    tasks: &'a [&'a TaskView],
}

impl Candidate<'_> {
    /// Older first: settled claims, then the oldest; app ports without a
    /// claim yet after every one with, by name.
    fn age(&self) -> (bool, bool, u64, &str, usize) {
        match self.service {
            Some(s) => (false, !s.settled, s.since, self.app, self.index),
            None => (true, true, 0, self.app, self.index),
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

/// Computes the routes. Pure and deterministic: the same tasks and service
/// ports give the same routes on every node.
pub fn compute(input: &Input<'_>) -> Routes {
    let mut problems = Vec::new();

    // Tasks by app, each app's in (node, id) order: the first task's labels
    // are the app's (tasks of one app normally carry the same).
    let mut by_app: BTreeMap<&str, Vec<&TaskView>> = BTreeMap::new();
    for t in input.tasks {
        by_app.entry(t.spec.app.as_str()).or_default().push(t);
    }
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    let by_app: Vec<(&str, Vec<&TaskView>)> = by_app
        .into_iter()
        .map(|(app, mut tasks)| {
            tasks.sort_by(|a, b| (&a.node_id, &a.id).cmp(&(&b.node_id, &b.id)));
            (app, tasks)
        })
        .collect();
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
        let port_count = first.spec.ports.len();
        for p in labels::app_problems(&first.spec.labels, port_count) {
            problems.push(problem(app, None, p));
        }
        for index in 0..port_count {
            match labels::parse_port(&first.spec.labels, index) {
                PortOutcome::NotExposed => {}
                PortOutcome::Disabled { problems: ps } => {
                    problems.extend(ps.into_iter().map(|p| problem(app, Some(index), p)));
                }
                PortOutcome::Exposed {
                    labels,
                    problems: ps,
                } => {
                    problems.extend(ps.into_iter().map(|p| problem(app, Some(index), p)));
                    let service = input.service_ports.get(&(app.to_string(), index)).copied();
                    candidates.push(Candidate {
                        app,
                        index,
                        labels,
                        service,
                        tasks,
                    });
                }
            }
        }
    }
    candidates.sort_by(|a, b| a.age().cmp(&b.age()));

    let mut backends: Vec<Backend> = Vec::with_capacity(candidates.len());
    let mut http_routes: Vec<(i32, u8, usize, usize, HttpRoute)> = Vec::new();
    // Bind port → the backend holding it; (host, path) → likewise.
    let mut bound: HashMap<u16, String> = HashMap::new();
    let mut routed: HashMap<(Option<String>, Option<String>), String> = HashMap::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for (order, c) in candidates.into_iter().enumerate() {
        let wanted_port = c.labels.bind_port.or(c.service.map(|s| s.port));
        let app_name = labels::backend_app_name(c.app);
        let mut name = match wanted_port {
            Some(p) => format!("{app_name}_{p}"),
            None => format!("{app_name}_p{}", c.index),
        };
        if !names.insert(name.clone()) {
            name = format!("{name}_{}", c.index);
            names.insert(name.clone());
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
                Some(holder) => {
                    lose(
                        "PORT",
                        format!("port {p} is already bound for the older {holder}"),
                    );
                    None
                }
                None => {
                    bound.insert(p, name.clone());
                    Some(p)
                }
            },
            None => None,
        };
        if c.labels.mode == Mode::Http {
            let hosts: Vec<Option<String>> = if c.labels.vhosts.is_empty() {
                if c.labels.path.is_some() {
                    vec![None]
                } else {
                    vec![]
                }
            } else {
                c.labels.vhosts.iter().cloned().map(Some).collect()
            };
            for host in hosts {
                let key = (host.clone(), c.labels.path.clone());
                if let Some(holder) = routed.get(&key) {
                    let what = match (&key.0, &key.1) {
                        (Some(h), Some(p)) => format!("{h}{p}"),
                        (Some(h), None) => h.clone(),
                        (None, Some(p)) => format!("path {p}"),
                        (None, None) => String::new(),
                    };
                    lose(
                        if key.0.is_some() { "VHOST" } else { "PATH" },
                        format!("{what} is already routed to the older {holder}"),
                    );
                    continue;
                }
                routed.insert(key, name.clone());
                let specificity = match &host {
                    Some(h) if h.starts_with("*.") => 1,
                    Some(_) => 0,
                    None => 2,
                };
                let path_len = c.labels.path.as_ref().map_or(0, |p| p.len());
                http_routes.push((
                    -c.labels.backend_weight,
                    specificity,
                    usize::MAX - path_len,
                    order,
                    HttpRoute {
                        host,
                        path: c.labels.path.clone(),
                        backend: name.clone(),
                    },
                ));
            }
        }
        let mut servers: Vec<Server> = c
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
                Some(Server {
                    name: format!("{}_{}_{}", t.node_id, ip_text(t.spec.ip), port),
                    addr: SocketAddr::new(t.spec.ip, port),
                    node: t.node_id.clone(),
                    task: t.id.clone(),
                    state,
                })
            })
            .collect();
        servers.sort();
        backends.push(Backend {
            name,
            app: c.app.to_string(),
            port_index: c.index,
            service_port: c.service.map(|s| s.port),
            bind_port,
            labels: c.labels,
            servers,
        });
    }
    backends.sort_by(|a, b| a.name.cmp(&b.name));
    http_routes.sort_by_key(|r| (r.0, r.1, r.2, r.3));
    problems.sort();
    problems.dedup();
    Routes {
        backends,
        http_routes: http_routes.into_iter().map(|r| r.4).collect(),
        problems,
    }
}

fn ip_text(ip: IpAddr) -> String {
    ip.to_string()
}

#[cfg(test)]
mod tests;
