//! The agent's HTTP/JSON API: dcos-net-shaped reads, task registration, and
//! Prometheus metrics. No endpoint evaluates anything a client sends.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use skein_agent::docs;
use skein_agent::{Agent, AgentError};
use skein_state::TaskSpec;

/// Largest request body accepted; a task is far smaller.
const MAX_BODY: usize = 64 * 1024;

/// Who may change state. Reads are open to whoever can reach the listener
/// (loopback by default); writes need the bearer token when one is set.
#[derive(Clone, Default)]
pub struct ApiAuth {
    pub token: Option<String>,
}

#[derive(Clone)]
struct Ctx {
    agent: Arc<Agent>,
    auth: ApiAuth,
}

pub fn router(agent: Arc<Agent>, auth: ApiAuth) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/nodes", get(nodes))
        .route("/v1/tasks", get(tasks))
        .route(
            "/v1/tasks/{id}",
            get(task).put(put_task).delete(delete_task),
        )
        .route("/v1/state", get(state))
        .route("/v1/vips", get(vips))
        .route("/overlay-master/state", get(overlay_master))
        .route("/overlay-agent/overlay", get(overlay_agent))
        .route(
            "/overlay-master/agents/delete",
            axum::routing::post(delete_agents),
        )
        .route("/v1/records", get(records))
        .route("/v1/enumerate", get(enumerate))
        .route("/v1/config", get(config))
        .route("/v1/hosts/{host}", get(hosts))
        .route("/v1/services/{service}", get(services))
        .route("/v1/vips/problems", get(vip_problems))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Ctx { agent, auth })
}

/// Serves the router until the future `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = docs::ErrorBody {
        error: message.into(),
    };
    (status, Json(body)).into_response()
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let status = match &e {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// A failed request: rendered as `{"error": "..."}` with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &ctx.auth.token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if constant_time_eq(t.trim().as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError(StatusCode::UNAUTHORIZED, "invalid token".into())),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this API changes state only with `Authorization: Bearer <token>`".into(),
        )),
    }
}

async fn version(State(ctx): State<Ctx>) -> Response {
    let c = ctx.agent.config();
    Json(docs::Version {
        cluster_id: c.cluster_id.clone(),
        node_id: c.node_id.clone(),
        version: skein_agent::VERSION.to_string(),
    })
    .into_response()
}

async fn nodes(State(ctx): State<Ctx>) -> Response {
    let nodes: docs::Nodes = ctx.agent.view().nodes.clone();
    Json(nodes).into_response()
}

async fn tasks(State(ctx): State<Ctx>) -> Response {
    let view = ctx.agent.view();
    Json(docs::Tasks {
        tasks: view.tasks.clone(),
        invalid: view.invalid.clone(),
    })
    .into_response()
}

async fn task(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    match ctx.agent.view().tasks.iter().find(|t| t.id == id) {
        Some(t) => Json(t).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no task {id}")),
    }
}

async fn put_task(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&ctx, &headers)?;
    // Parse by hand: serde's message (field, line, column) is the clearest
    // thing to tell a client, and axum's Json rejection would hide it.
    let spec: TaskSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid task body: {e}")))?;
    let created = ctx.agent.put_task(&id, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let reply = docs::PutTaskReply {
        node_id: ctx.agent.config().node_id.clone(),
        id,
    };
    Ok((status, Json(reply)).into_response())
}

async fn delete_task(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&ctx, &headers)?;
    ctx.agent.delete_task(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// dcos-net's `/v1/records`: every record as `{name, type, rdata}`.
async fn records(State(ctx): State<Ctx>) -> Response {
    let records = ctx.agent.records();
    let rows: docs::Records = records
        .names
        .iter()
        .flat_map(|(name, set)| {
            set.iter().map(move |r| {
                let (kind, rdata) = match r {
                    skein_dns::RData::A { ip } => ("A", ip.to_string()),
                    skein_dns::RData::Aaaa { ip } => ("AAAA", ip.to_string()),
                    skein_dns::RData::Srv {
                        priority,
                        weight,
                        port,
                        target,
                    } => ("SRV", format!("{priority} {weight} {port} {target}")),
                };
                docs::RecordRow {
                    name: name.to_string(),
                    rdata,
                    kind: kind.to_string(),
                }
            })
        })
        .collect();
    Json(rows).into_response()
}

/// Mesos-DNS's `/v1/enumerate`: per framework, per app, its records.
async fn enumerate(State(ctx): State<Ctx>) -> Response {
    let records = ctx.agent.records();
    let mut frameworks: BTreeMap<String, BTreeMap<String, Vec<docs::EnumerateRecord>>> =
        BTreeMap::new();
    for (name, set) in &records.names {
        // <app>.<framework>.mesos. and _<app>._proto.<framework>.mesos.
        let Some(rest) = name.strip_suffix(".mesos.") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let (app, framework) = match parts.as_slice() {
            [app, framework] => (app.to_string(), framework.to_string()),
            [app, framework, "slave"] => (app.to_string(), framework.to_string()),
            [srv_app, _proto, framework] => (
                srv_app.trim_start_matches('_').to_string(),
                framework.to_string(),
            ),
            _ => continue,
        };
        for r in set {
            let (rtype, host) = match r {
                skein_dns::RData::A { ip } => ("A", ip.to_string()),
                skein_dns::RData::Aaaa { ip } => ("AAAA", ip.to_string()),
                skein_dns::RData::Srv { port, target, .. } => ("SRV", format!("{target}:{port}")),
            };
            frameworks
                .entry(framework.clone())
                .or_default()
                .entry(app.clone())
                .or_default()
                .push(docs::EnumerateRecord {
                    host,
                    name: name.to_string(),
                    rtype: rtype.to_string(),
                });
        }
    }
    let frameworks = frameworks
        .into_iter()
        .map(|(name, apps)| docs::EnumerateFramework {
            name,
            tasks: apps
                .into_iter()
                .map(|(name, records)| docs::EnumerateTask { name, records })
                .collect(),
        })
        .collect();
    Json(docs::Enumerate { frameworks }).into_response()
}

/// Mesos-DNS's `/v1/config`, from this agent's settings (no secrets).
async fn config(State(ctx): State<Ctx>) -> Response {
    let c = ctx.agent.config();
    let strings = |addrs: &[std::net::SocketAddr]| addrs.iter().map(|a| a.to_string()).collect();
    Json(docs::DnsConfig {
        dns_on: !c.dns_listen.is_empty(),
        domain: "mesos".to_string(),
        external_on: !c.dns_upstreams.is_empty(),
        http_on: true,
        listeners: strings(&c.dns_listen),
        refresh_seconds: 0,
        resolvers: strings(&c.dns_upstreams),
        soa_mname: "ns.mesos.".to_string(),
        soa_rname: "hostmaster.mesos.".to_string(),
        ttl: skein_dns::TTL,
        timeout: skein_dns::server::FORWARD_DEADLINE.as_secs(),
        zones: skein_dns::answer::ZONES.map(str::to_string).to_vec(),
    })
    .into_response()
}

fn fqdn(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    }
}

fn addresses(records: &skein_dns::Records, name: &str) -> Vec<String> {
    records
        .get(name)
        .into_iter()
        .flatten()
        .filter_map(|r| match r {
            skein_dns::RData::A { ip } => Some(ip.to_string()),
            skein_dns::RData::Aaaa { ip } => Some(ip.to_string()),
            skein_dns::RData::Srv { .. } => None,
        })
        .collect()
}

/// Mesos-DNS's `/v1/hosts/{host}`: `[{"host", "ip"}]` (empty `ip` if none).
async fn hosts(State(ctx): State<Ctx>, Path(host): Path<String>) -> Response {
    let name = fqdn(&host);
    let records = ctx.agent.records();
    let ips = addresses(&records, &name);
    let rows: docs::Hosts = if ips.is_empty() {
        vec![docs::HostRow {
            host: String::new(),
            ip: String::new(),
        }]
    } else {
        ips.into_iter()
            .map(|ip| docs::HostRow {
                host: name.clone(),
                ip,
            })
            .collect()
    };
    Json(rows).into_response()
}

/// Mesos-DNS's `/v1/services/{service}`: `[{"service", "host", "ip", "port"}]`.
async fn services(State(ctx): State<Ctx>, Path(service): Path<String>) -> Response {
    let name = fqdn(&service);
    let records = ctx.agent.records();
    let mut rows: docs::Services = Vec::new();
    for r in records.get(&name).into_iter().flatten() {
        if let skein_dns::RData::Srv { port, target, .. } = r {
            for ip in addresses(&records, target) {
                rows.push(docs::ServiceRow {
                    host: target.to_string(),
                    ip,
                    port: port.to_string(),
                    service: name.clone(),
                });
            }
        }
    }
    if rows.is_empty() {
        rows.push(docs::ServiceRow {
            host: String::new(),
            ip: String::new(),
            port: String::new(),
            service: String::new(),
        });
    }
    Json(rows).into_response()
}

async fn overlay_master(State(ctx): State<Ctx>) -> Response {
    let view = ctx.agent.view();
    match view.overlay_state() {
        Ok(state) => Json(state).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /overlay-master/agents/delete {"agents": ["<ip>", ...]}`.
async fn delete_agents(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&ctx, &headers)?;
    let req: docs::DeleteAgentsRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid body (want {{\"agents\": [\"<ip>\"]}}): {e}"),
        )
    })?;
    let forgotten = ctx.agent.forget_agents(&req.agents).await?;
    Ok(Json(docs::DeleteAgentsReply { deleted: forgotten }).into_response())
}

/// This agent's own entry of the overlay state.
async fn overlay_agent(State(ctx): State<Ctx>) -> Response {
    let view = ctx.agent.view();
    match view.overlay_state() {
        Ok(state) => match state.agents.iter().find(|a| a.node_id == view.node_id) {
            Some(agent) => Json(agent).into_response(),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this agent holds no overlay lease yet",
            ),
        },
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn vips(State(ctx): State<Ctx>) -> Response {
    let vips: docs::Vips = ctx.agent.view().vips.clone();
    Json(vips).into_response()
}

async fn vip_problems(State(ctx): State<Ctx>) -> Response {
    Json(docs::VipProblems(ctx.agent.view().vip_problems.clone())).into_response()
}

async fn state(State(ctx): State<Ctx>) -> Response {
    Json(ctx.agent.state_json()).into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        skein_agent::metrics::render(&ctx.agent),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
