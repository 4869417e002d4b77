//! The cluster the edges serve, as tasks with Marathon-LB labels, and the
//! changes the churn driver makes to it.
//!
//! The routes both edges get are computed by skein's own model
//! ([`skein_edge::compute`]) from these tasks, so HAProxy's configuration
//! and `skein edge`'s routes file say the same thing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use skein_edge::routes::ServicePort;
use skein_edge::Routes;
use skein_state::task::{PortMapping, Protocol};
use skein_state::{Labels, NodeStatus, TaskSpec, TaskView};

/// The churned app: HTTP, on a virtual host and its own service port.
pub(crate) const WEB_APP: &str = "/web";
pub(crate) const WEB_VHOST: &str = "web.example.com";
/// Long-lived HTTP streams on a virtual host; its servers never change.
pub(crate) const STREAM_APP: &str = "/stream";
pub(crate) const STREAM_VHOST: &str = "stream.example.com";
/// The same stable servers on a TCP-mode service port.
pub(crate) const TCP_APP: &str = "/stream-tcp";

/// The edge group every app is exposed to (`HAPROXY_GROUP`).
pub(crate) const GROUP: &str = "external";

/// Service ports relative to an edge's base: `/web` on `base`,
/// `/stream` on `base + 1`, `/stream-tcp` on `base + 2`.
pub(crate) fn service_port(base: u16, app: &str) -> u16 {
    match app {
        WEB_APP => base,
        STREAM_APP => base + 1,
        _ => base + 2,
    }
}

/// One task: an app's instance on one of our backend servers.
#[derive(Debug, Clone)]
pub(crate) struct Task {
    pub(crate) id: String,
    pub(crate) app: &'static str,
    pub(crate) port: u16,
    pub(crate) healthy: bool,
}

/// A change the churn driver made, as an agent would see it: what a
/// driver talking to a real agent turns into `PUT` / `DELETE /v1/tasks`.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    Added(Task),
    Removed(Task),
    /// The task's health verdict changed (`healthy` is the new one).
    Health(Task),
}

impl Change {
    /// `added web-3`, for reports.
    pub(crate) fn describe(&self) -> String {
        match self {
            Change::Added(t) => format!("added {}", t.id),
            Change::Removed(t) => format!("removed {}", t.id),
            Change::Health(t) if t.healthy => format!("{} healthy again", t.id),
            Change::Health(t) => format!("{} unhealthy", t.id),
        }
    }
}

/// The tasks, by id.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cluster {
    tasks: BTreeMap<String, Task>,
}

fn labels(app: &str) -> Labels {
    let mut l = Labels::new();
    l.insert("HAPROXY_GROUP", GROUP);
    match app {
        WEB_APP => l.insert("HAPROXY_0_VHOST", WEB_VHOST),
        STREAM_APP => l.insert("HAPROXY_0_VHOST", STREAM_VHOST),
        _ => l.insert("HAPROXY_0_MODE", "tcp"),
    }
    l
}

impl Cluster {
    pub(crate) fn add(&mut self, task: Task) {
        self.tasks.insert(task.id.clone(), task);
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<Task> {
        self.tasks.remove(id)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut Task> {
        self.tasks.get_mut(id)
    }

    /// The routes an edge with service ports from `base` serves.
    pub(crate) fn routes(&self, base: u16) -> Routes {
        let views: Vec<TaskView> = self
            .tasks
            .values()
            .map(|t| TaskView {
                id: t.id.clone(),
                node_id: "node1".to_string(),
                node_status: NodeStatus::Alive,
                healthy: t.healthy,
                spec: Arc::new(TaskSpec {
                    app: t.app.to_string(),
                    framework: "marathon".to_string(),
                    ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    ports: vec![PortMapping {
                        name: None,
                        port: t.port,
                        protocol: Protocol::Tcp,
                        labels: Labels::new(),
                    }],
                    health_check: None,
                    labels: labels(t.app),
                }),
            })
            .collect();
        let mut ports = BTreeMap::new();
        for (i, app) in [WEB_APP, STREAM_APP, TCP_APP].into_iter().enumerate() {
            ports.insert(
                (app.to_string(), 0),
                ServicePort {
                    port: service_port(base, app),
                    since: i as u64,
                    settled: true,
                },
            );
        }
        skein_edge::compute(&skein_edge::Input {
            tasks: &views,
            service_ports: &ports,
        })
        .for_groups(&[GROUP.to_string()])
    }
}

/// Where a request for `host` on the HTTP port goes, or a service port's
/// backend: used to check rendered configurations in tests.
#[cfg(test)]
pub(crate) fn backend_for_port(routes: &Routes, port: u16) -> Option<&skein_edge::Backend> {
    routes
        .backends
        .iter()
        .find(|b| b.bind_port == Some(port))
        .map(|b| &**b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_edge::{Mode, ServerState};

    fn task(id: &str, app: &'static str, port: u16, healthy: bool) -> Task {
        Task {
            id: id.to_string(),
            app,
            port,
            healthy,
        }
    }

    #[test]
    fn routes_have_the_vhosts_service_ports_and_states() {
        let mut c = Cluster::default();
        c.add(task("web-1", WEB_APP, 20001, true));
        c.add(task("web-2", WEB_APP, 20002, false));
        c.add(task("stream-1", STREAM_APP, 20100, true));
        c.add(task("tcp-1", TCP_APP, 20100, true));
        let r = c.routes(10000);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.backends.len(), 3);
        let web = backend_for_port(&r, 10000).expect("web on 10000");
        assert_eq!(&*web.name, "web_10000");
        assert_eq!(web.labels.mode, Mode::Http);
        let states: Vec<ServerState> = web.servers.iter().map(|s| s.state).collect();
        assert_eq!(states, [ServerState::Up, ServerState::Unhealthy]);
        assert_eq!(
            backend_for_port(&r, 10002).expect("tcp").labels.mode,
            Mode::Tcp
        );
        let hosts: Vec<_> = r.http_routes.iter().map(|h| h.host.clone()).collect();
        assert!(hosts.contains(&Some(WEB_VHOST.into())));
        assert!(hosts.contains(&Some(STREAM_VHOST.into())));
    }
}
