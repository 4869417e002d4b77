//! Every endpoint of the router against a real agent (gossip over QUIC on
//! loopback, no DNS server, no dataplane), driven with `oneshot`; bodies
//! are decoded into the documents of `skein_agent::docs`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use skein_agent::{docs, Agent};
use tempfile::TempDir;
use tower::ServiceExt;

const CLUSTER: &str = "router-test";

mod support;

/// A cluster CA in a temporary directory.
fn ca() -> TempDir {
    support::ca(CLUSTER)
}

/// A real agent `node_id` advertising `ip`, its data in a temporary
/// directory (returned: it must outlive the agent).
async fn agent(
    ca: &Path,
    node_id: &str,
    ip: Ipv4Addr,
    seeds: Vec<String>,
) -> (Arc<Agent>, TempDir) {
    support::agent(ca, CLUSTER, node_id, ip, seeds).await
}

fn router(agent: &Arc<Agent>, token: Option<&str>) -> Router {
    skein_api::router(
        agent.clone(),
        skein_api::ApiAuth {
            token: token.map(str::to_string),
        },
    )
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn doc<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: {} is not the expected document",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The message of an error reply with this status.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/json");
        self.doc::<docs::ErrorBody>().error
    }

    fn ok<T: DeserializeOwned>(&self) -> T {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.doc()
    }
}

async fn call(app: &Router, method: Method, path: &str, body: &str, token: Option<&str>) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        content_type,
        body,
    }
}

async fn get(app: &Router, path: &str) -> Reply {
    call(app, Method::GET, path, "", None).await
}

/// Polls `GET path` until `done` holds of its document (10 s at most).
async fn wait_for<T: DeserializeOwned>(app: &Router, path: &str, done: impl Fn(&T) -> bool) -> T {
    for _ in 0..200 {
        let reply = get(app, path).await;
        if reply.status == StatusCode::OK {
            let doc = reply.doc();
            if done(&doc) {
                return doc;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("GET {path}: not there after 10 s");
}

const WEB: &str = r#"{"app":"/web","ip":"10.0.0.5","ports":[{"name":"http","port":8080,"labels":{"VIP_0":"/web:80"}}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_of_one_agent() {
    let ca = ca();
    let (agent, _data) = agent(ca.path(), "n1", Ipv4Addr::LOCALHOST, vec![]).await;
    let app = router(&agent, None);

    let version: docs::Version = get(&app, "/v1/version").await.ok();
    assert_eq!(
        version,
        docs::Version {
            cluster_id: CLUSTER.into(),
            node_id: "n1".into(),
            version: skein_agent::VERSION.into(),
        }
    );
    let nodes: docs::Nodes = get(&app, "/v1/nodes").await.ok();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, "n1");
    assert_eq!(nodes[0].hostname.as_deref(), Some("n1.test"));
    assert_eq!(nodes[0].private_ip, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    assert_eq!(nodes[0].status, docs::NodeStatus::Alive);

    // PUT: created, then replaced; malformed and invalid bodies refused.
    let put = call(&app, Method::PUT, "/v1/tasks/web.1", WEB, None).await;
    assert_eq!(put.status, StatusCode::CREATED);
    assert_eq!(
        put.doc::<docs::PutTaskReply>(),
        docs::PutTaskReply {
            id: "web.1".into(),
            node_id: "n1".into()
        }
    );
    let again = call(&app, Method::PUT, "/v1/tasks/web.1", WEB, None).await;
    assert_eq!(again.ok::<docs::PutTaskReply>().id, "web.1");
    let malformed = call(&app, Method::PUT, "/v1/tasks/web.2", r#"{"app":"#, None).await;
    let message = malformed.error(StatusCode::BAD_REQUEST);
    assert!(message.starts_with("invalid task body: "), "{message}");
    assert!(message.contains("line 1 column 7"), "{message}");
    let unknown = call(
        &app,
        Method::PUT,
        "/v1/tasks/web.2",
        r#"{"app":"/a","ip":"10.0.0.1","cmd":"x"}"#,
        None,
    )
    .await;
    let message = unknown.error(StatusCode::BAD_REQUEST);
    assert!(message.contains("unknown field `cmd`"), "{message}");
    let port0 = r#"{"app":"/a","ip":"10.0.0.1","ports":[{"port":0}]}"#;
    let invalid = call(&app, Method::PUT, "/v1/tasks/web.2", port0, None).await;
    let message = invalid.error(StatusCode::BAD_REQUEST);
    assert!(message.contains("port"), "{message}");
    let bad_id = call(&app, Method::PUT, "/v1/tasks/a%20b", WEB, None).await;
    bad_id.error(StatusCode::BAD_REQUEST);
    let bad_label =
        r#"{"app":"/bad","ip":"10.0.0.7","ports":[{"port":99,"labels":{"VIP_0":"nonsense"}}]}"#;
    let put = call(&app, Method::PUT, "/v1/tasks/bad.1", bad_label, None).await;
    assert_eq!(put.status, StatusCode::CREATED);

    // The tasks, as written.
    let tasks: docs::Tasks = get(&app, "/v1/tasks").await.ok();
    let ids: Vec<&str> = tasks.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["bad.1", "web.1"]);
    assert!(tasks.invalid.is_empty());
    let web: docs::TaskView = get(&app, "/v1/tasks/web.1").await.ok();
    assert_eq!(web.node_id, "n1");
    assert_eq!(web.spec.app, "/web");
    assert_eq!(web.spec.framework, "marathon");
    assert_eq!(&web.spec.ports[0].labels["VIP_0"], "/web:80");
    assert!(web.healthy);
    let missing = get(&app, "/v1/tasks/nosuch").await;
    assert_eq!(missing.error(StatusCode::NOT_FOUND), "no task nosuch");

    // The VIP gets an address once its claim has settled; then DNS has it.
    let vips: docs::Vips = wait_for(&app, "/v1/vips", |v: &docs::Vips| {
        v.iter().any(|v| v.address.is_some())
    })
    .await;
    assert_eq!(vips.len(), 1);
    let vip = &vips[0];
    assert_eq!(vip.vip, "web.marathon.l4lb.thisdcos.directory:80");
    assert_eq!(vip.port, 80);
    assert_eq!(vip.protocol, skein_state::Protocol::Tcp);
    let address = vip.address.expect("address");
    assert!(
        matches!(address, IpAddr::V4(a) if a.octets()[0] == 11),
        "{address}"
    );
    assert_eq!(vip.backend.len(), 1);
    let backend = &vip.backend[0];
    assert_eq!(
        (backend.ip, backend.port, backend.task_id.as_str()),
        ("10.0.0.5".parse().expect("ip"), 8080, "web.1")
    );
    assert!(backend.in_use && backend.healthy);
    let problems: docs::VipProblems = get(&app, "/v1/vips/problems").await.ok();
    assert_eq!(problems.0.len(), 1);
    assert_eq!(
        (problems.0[0].task_id.as_str(), problems.0[0].label.as_str()),
        ("bad.1", "VIP_0")
    );
    assert!(problems.0[0].error.contains("nonsense"), "{:?}", problems.0);

    let records: docs::Records = get(&app, "/v1/records").await.ok();
    let has = |name: &str, kind: &str, rdata: &str| {
        records
            .iter()
            .any(|r| r.name == name && r.kind == kind && r.rdata == rdata)
    };
    assert!(
        has(
            "web.marathon.l4lb.thisdcos.directory.",
            "A",
            &address.to_string()
        ),
        "{records:?}"
    );
    assert!(has("web.marathon.mesos.", "A", "10.0.0.5"), "{records:?}");
    assert!(has("ready.spartan.", "A", "127.0.0.1"), "{records:?}");
    let srv = records
        .iter()
        .find(|r| r.name == "_web._tcp.marathon.mesos.")
        .expect("SRV record");
    assert_eq!(srv.kind, "SRV");
    assert!(srv.rdata.starts_with("0 1 8080 web-"), "{srv:?}");

    let enumerate: docs::Enumerate = get(&app, "/v1/enumerate").await.ok();
    let marathon = enumerate
        .frameworks
        .iter()
        .find(|f| f.name == "marathon")
        .expect("marathon");
    let web_app = marathon
        .tasks
        .iter()
        .find(|t| t.name == "web")
        .expect("app web");
    assert!(web_app
        .records
        .iter()
        .any(|r| r.name == "web.marathon.mesos." && r.host == "10.0.0.5" && r.rtype == "A"));
    assert!(web_app
        .records
        .iter()
        .any(|r| r.rtype == "SRV" && r.host.ends_with(".marathon.mesos.:8080")));

    let config: docs::DnsConfig = get(&app, "/v1/config").await.ok();
    assert_eq!(config.domain, "mesos");
    assert!(!config.dns_on && config.http_on && config.external_on);
    assert!(config.listeners.is_empty());
    assert_eq!(config.resolvers, ["127.0.0.1:9"]);
    assert_eq!(config.ttl, 5);
    assert_eq!(config.zones, ["mesos.", "thisdcos.directory.", "spartan."]);

    let hosts: docs::Hosts = get(&app, "/v1/hosts/Web.Marathon.Mesos").await.ok();
    assert_eq!(
        hosts,
        [docs::HostRow {
            host: "web.marathon.mesos.".into(),
            ip: "10.0.0.5".into()
        }]
    );
    let none: docs::Hosts = get(&app, "/v1/hosts/nothing.mesos").await.ok();
    assert_eq!(
        none,
        [docs::HostRow {
            host: String::new(),
            ip: String::new()
        }]
    );
    let services: docs::Services = get(&app, "/v1/services/_web._tcp.marathon.mesos.")
        .await
        .ok();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].service, "_web._tcp.marathon.mesos.");
    assert_eq!(
        (services[0].ip.as_str(), services[0].port.as_str()),
        ("10.0.0.5", "8080")
    );
    assert!(services[0].host.starts_with("web-"), "{services:?}");
    let none: docs::Services = get(&app, "/v1/services/_none._tcp.marathon.mesos")
        .await
        .ok();
    assert_eq!(none.len(), 1);
    assert!(none[0].service.is_empty() && none[0].port.is_empty());

    // DELETE: gone, then not found; the replica keeps a tombstone.
    let deleted = call(&app, Method::DELETE, "/v1/tasks/web.1", "", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(deleted.body.is_empty());
    let again = call(&app, Method::DELETE, "/v1/tasks/web.1", "", None).await;
    assert_eq!(again.error(StatusCode::NOT_FOUND), "not found: task web.1");
    let state: docs::State = get(&app, "/v1/state").await.ok();
    assert_eq!(
        (state.node_id.as_str(), state.cluster_id.as_str()),
        ("n1", CLUSTER)
    );
    assert!(state.removed.is_empty());
    let n1 = &state.nodes["n1"];
    assert_eq!(n1.status, docs::NodeStatus::Alive);
    let tombstone = &n1.keys["task:web.1"];
    assert!(tombstone.deleted && tombstone.value.is_none());
    let bad = &n1.keys["task:bad.1"];
    assert!(!bad.deleted);
    assert_eq!(bad.value.as_ref().expect("value")["app"], "/bad");
    assert_eq!(
        n1.keys["meta"].value.as_ref().expect("meta")["hostname"],
        "n1.test"
    );
    assert_eq!(
        n1.max_version,
        n1.keys.values().map(|k| k.version).max().unwrap_or(0)
    );
    let tasks: docs::Tasks = get(&app, "/v1/tasks").await.ok();
    assert_eq!(tasks.tasks.len(), 1);

    // Overlay: this agent's leases, alone and in the master state.
    let mine: docs::OverlayAgent =
        wait_for(&app, "/overlay-agent/overlay", |a: &docs::OverlayAgent| {
            !a.overlays.is_empty()
        })
        .await;
    assert_eq!(mine.node_id, "n1");
    assert_eq!(mine.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(mine.state.status, docs::OverlayStatus::Leased);
    let overlay = &mine.overlays[0];
    assert_eq!(overlay.info.name, "dcos");
    assert!(overlay.subnet.starts_with("9.") && overlay.subnet.ends_with("/24"));
    assert_eq!(overlay.backend.vxlan.vni, 1024);
    assert_eq!(overlay.mesos_bridge.name, "m-dcos");
    assert_eq!(overlay.docker_bridge.name, "d-dcos");
    let master: docs::OverlayMasterState = get(&app, "/overlay-master/state").await.ok();
    assert_eq!(master.agents, [mine]);
    assert_eq!(master.network.vtep_subnet, "44.128.0.0/20");
    assert_eq!(master.network.overlays[0].subnet, "9.0.0.0/8");

    // Deleting agents: only known, down ones.
    let delete_agents = |body: &'static str| {
        let app = app.clone();
        async move {
            call(
                &app,
                Method::POST,
                "/overlay-master/agents/delete",
                body,
                None,
            )
            .await
        }
    };
    let message = delete_agents(r#"{"nodes":["10.0.0.1"]}"#)
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(
        message.starts_with("invalid body (want {\"agents\": [\"<ip>\"]})"),
        "{message}"
    );
    let message = delete_agents(r#"{"agents":["10.9.9.9"]}"#)
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(message, "not found: agent 10.9.9.9");
    let message = delete_agents(r#"{"agents":["127.0.0.1"]}"#)
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(message.contains("(n1) is alive"), "{message}");
    let none: docs::DeleteAgentsReply = delete_agents(r#"{"agents":[]}"#).await.ok();
    assert!(none.deleted.is_empty());

    // Metrics, an unknown path, a body too large.
    let metrics = get(&app, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "{}",
        metrics.content_type
    );
    let text = String::from_utf8(metrics.body).expect("utf-8");
    assert!(text.contains("skein_"), "{text}");
    let unknown = get(&app, "/v1/nope").await;
    assert_eq!(unknown.error(StatusCode::NOT_FOUND), "no such endpoint");
    let huge = format!(
        r#"{{"app":"/big","ip":"10.0.0.1","padding":"{}"}}"#,
        "x".repeat(65 * 1024)
    );
    let too_large = call(&app, Method::PUT, "/v1/tasks/big.1", &huge, None).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        get(&app, "/v1/tasks/big.1").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_when_one_is_set() {
    let ca = ca();
    let (agent, _data) = agent(ca.path(), "n1", Ipv4Addr::LOCALHOST, vec![]).await;
    let app = router(&agent, Some("s3cret"));
    let writes = [
        (Method::PUT, "/v1/tasks/web.1", WEB),
        (Method::DELETE, "/v1/tasks/web.1", ""),
        (
            Method::POST,
            "/overlay-master/agents/delete",
            r#"{"agents":[]}"#,
        ),
    ];
    for (method, path, body) in &writes {
        let without = call(&app, method.clone(), path, body, None).await;
        let message = without.error(StatusCode::UNAUTHORIZED);
        assert!(message.contains("Authorization: Bearer"), "{message}");
        let wrong = call(&app, method.clone(), path, body, Some("guess")).await;
        assert_eq!(wrong.error(StatusCode::UNAUTHORIZED), "invalid token");
    }
    // Nothing was written.
    let tasks: docs::Tasks = get(&app, "/v1/tasks").await.ok();
    assert!(tasks.tasks.is_empty());
    // With the token, each goes through; reads never need it.
    let put = call(&app, Method::PUT, "/v1/tasks/web.1", WEB, Some("s3cret")).await;
    assert_eq!(put.status, StatusCode::CREATED);
    let tasks: docs::Tasks = get(&app, "/v1/tasks").await.ok();
    assert_eq!(tasks.tasks.len(), 1);
    let none: docs::DeleteAgentsReply = call(
        &app,
        Method::POST,
        "/overlay-master/agents/delete",
        r#"{"agents":[]}"#,
        Some("s3cret"),
    )
    .await
    .ok();
    assert!(none.deleted.is_empty());
    let deleted = call(&app, Method::DELETE, "/v1/tasks/web.1", "", Some("s3cret")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_task_and_agent_are_not_ours_to_delete() {
    let ca = ca();
    let ip1 = Ipv4Addr::new(127, 0, 0, 1);
    let ip2 = Ipv4Addr::new(127, 0, 0, 2);
    let (a1, _d1) = agent(ca.path(), "n1", ip1, vec![]).await;
    let seed = a1.config().gossip_listen.to_string();
    let (a2, _d2) = agent(ca.path(), "n2", ip2, vec![seed]).await;
    let (app1, app2) = (router(&a1, None), router(&a2, None));

    let put = call(
        &app2,
        Method::PUT,
        "/v1/tasks/db.1",
        r#"{"app":"/db","ip":"10.0.0.6"}"#,
        None,
    )
    .await;
    assert_eq!(put.status, StatusCode::CREATED);
    assert_eq!(put.doc::<docs::PutTaskReply>().node_id, "n2");
    let tasks: docs::Tasks = wait_for(&app1, "/v1/tasks", |t: &docs::Tasks| {
        t.tasks.iter().any(|t| t.id == "db.1")
    })
    .await;
    assert_eq!(tasks.tasks[0].node_id, "n2");
    let nodes: docs::Nodes = wait_for(&app1, "/v1/nodes", |n: &docs::Nodes| {
        n.len() == 2 && n.iter().all(|n| n.status == docs::NodeStatus::Alive)
    })
    .await;
    assert_eq!(nodes[1].private_ip, Some(IpAddr::V4(ip2)));

    let refused = call(&app1, Method::DELETE, "/v1/tasks/db.1", "", None).await;
    let message = refused.error(StatusCode::BAD_REQUEST);
    assert_eq!(
        message,
        "task db.1 belongs to node n2; delete it through that node's agent"
    );
    let live = call(
        &app1,
        Method::POST,
        "/overlay-master/agents/delete",
        r#"{"agents":["127.0.0.2"]}"#,
        None,
    )
    .await;
    let message = live.error(StatusCode::BAD_REQUEST);
    assert_eq!(
        message,
        "agent 127.0.0.2 (n2) is alive: stop it before deleting it"
    );
    // Both agents' overlay leases show in either's master state.
    let master: docs::OverlayMasterState = wait_for(
        &app1,
        "/overlay-master/state",
        |s: &docs::OverlayMasterState| {
            s.agents.len() == 2 && s.agents.iter().all(|a| !a.overlays.is_empty())
        },
    )
    .await;
    assert_ne!(
        master.agents[0].overlays[0].subnet,
        master.agents[1].overlays[0].subnet
    );
    let state: docs::State = get(&app1, "/v1/state").await.ok();
    assert!(state.nodes["n2"].keys.contains_key("task:db.1"));
}

/// Issue 13: `GET /v1/edge` serves the routes every edge uses, the same on
/// every agent, with service ports agreed between the nodes hosting the
/// apps; a long-poll answers as soon as the routes change; conflicts and
/// bad labels are reported at `/v1/edge/problems`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_routes_are_agreed_and_long_polled() {
    use skein_edge::EdgeDoc;
    let ca = ca();
    let ip1 = Ipv4Addr::new(127, 0, 0, 1);
    let ip2 = Ipv4Addr::new(127, 0, 0, 2);
    let (a1, _d1) = agent(ca.path(), "n1", ip1, vec![]).await;
    let seed = a1.config().gossip_listen.to_string();
    let (a2, _d2) = agent(ca.path(), "n2", ip2, vec![seed]).await;
    let (app1, app2) = (router(&a1, None), router(&a2, None));
    let web = |ip: &str| {
        format!(
            r#"{{"app":"/web","ip":"{ip}","ports":[{{"port":8080}}],
                "labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"web.example.com"}}}}"#
        )
    };
    let put = |app: Router, id: &'static str, body: String| async move {
        let reply = call(&app, Method::PUT, &format!("/v1/tasks/{id}"), &body, None).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{id}");
    };
    put(app1.clone(), "web.1", web("10.0.0.5")).await;
    put(app2.clone(), "web.2", web("10.0.0.6")).await;
    put(
        app2.clone(),
        "api.1",
        r#"{"app":"/grp/api","ip":"10.0.0.7","ports":[{"port":9000},{"port":9001}],
            "labels":{"HAPROXY_GROUP":"internal","HAPROXY_0_PORT":"3141","HAPROXY_1_BALANCE":"fastest"}}"#
            .into(),
    )
    .await;

    // Both agents compute the same routes once the claims have met.
    let converged = |d: &EdgeDoc| {
        d.routes.backends.len() == 2
            && d.routes
                .backends
                .iter()
                .find(|b| &*b.app == "/web")
                .is_some_and(|b| b.servers.len() == 2 && b.service_port.is_some())
    };
    let d1: EdgeDoc = wait_for(&app1, "/v1/edge", converged).await;
    let d2: EdgeDoc = wait_for(&app2, "/v1/edge", |d: &EdgeDoc| d.version == d1.version).await;
    assert_eq!(d1, d2);
    let web_backend = d1
        .routes
        .backends
        .iter()
        .find(|b| &*b.app == "/web")
        .expect("web");
    let port = web_backend.service_port.expect("service port");
    assert!((10000..=10100).contains(&port), "{port}");
    assert_eq!(&*web_backend.name, format!("web_{port}"));
    assert_eq!(web_backend.bind_port, Some(port));
    assert_eq!(d1.routes.http_routes.len(), 1);
    assert_eq!(
        d1.routes.http_routes[0].host.as_deref(),
        Some("web.example.com")
    );
    let api = d1
        .routes
        .backends
        .iter()
        .find(|b| &*b.app == "/grp/api")
        .expect("api");
    assert_eq!(&*api.name, "grp_api_3141");
    assert_eq!(api.bind_port, Some(3141));
    assert_ne!(api.service_port, Some(port), "distinct service ports");

    // One group only.
    let external: EdgeDoc = get(&app1, "/v1/edge?groups=external").await.ok();
    let apps: Vec<&str> = external.routes.backends.iter().map(|b| &*b.app).collect();
    assert_eq!(apps, vec!["/web"]);

    // A long-poll on the current version answers once a task changes it.
    let version = external.version;
    let poll = {
        let app = app1.clone();
        tokio::spawn(async move {
            get(
                &app,
                &format!("/v1/edge?groups=external&wait_version={version}&timeout_s=20"),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished(), "answered before anything changed");
    // A newer app claims the same virtual host: it loses it, reported.
    put(
        app2.clone(),
        "copy.1",
        r#"{"app":"/copy","ip":"10.0.0.8","ports":[{"port":80}],
            "labels":{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"WEB.example.com"}}"#
            .into(),
    )
    .await;
    let changed: EdgeDoc = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long-poll answers")
        .expect("joins")
        .ok();
    assert_ne!(changed.version, version);
    let problems: serde_json::Value =
        wait_for(&app1, "/v1/edge/problems", |p: &serde_json::Value| {
            p["problems"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["app"] == "/copy"))
        })
        .await;
    let text = problems.to_string();
    assert!(text.contains("already routed to the older web_"), "{text}");
    assert!(
        text.contains("HAPROXY_1_BALANCE"),
        "the bad label is reported: {text}"
    );
    let after: EdgeDoc = get(&app1, "/v1/edge").await.ok();
    let routes: Vec<&str> = after
        .routes
        .http_routes
        .iter()
        .map(|r| &*r.backend)
        .collect();
    assert_eq!(
        routes,
        vec![&*web_backend.name],
        "the older app keeps the vhost"
    );

    // An edge that has a version this agent answered is sent what changed
    // since: applied to what it has, exactly the whole document.
    let now: EdgeDoc = get(&app1, "/v1/edge?groups=external").await.ok();
    let delta: skein_edge::EdgeDelta =
        get(&app1, &format!("/v1/edge?groups=external&base={version}"))
            .await
            .ok();
    assert_eq!((delta.base, delta.version), (version, now.version));
    assert!(
        delta.upsert.iter().any(|b| &*b.app == "/copy"),
        "the new app is sent: {delta:?}"
    );
    assert!(
        delta.upsert.iter().all(|b| &*b.app != "/web"),
        "the unchanged backend is not sent again: {delta:?}"
    );
    assert_eq!(delta.apply(&external.routes), Ok(now.routes.clone()));
    // A version it never answered (or has forgotten): the whole document.
    let whole: EdgeDoc = get(&app1, "/v1/edge?groups=external&base=12345").await.ok();
    assert_eq!(whole, now);
}
