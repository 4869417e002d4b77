//! The agent's HTTP/JSON API: dcos-net-shaped reads, task registration, and
//! Prometheus metrics. No endpoint evaluates anything a client sends.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use skein_agent::docs;
use skein_agent::{Agent, AgentError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{ServiceBuilder, ServiceExt};

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
    edge_sent: Arc<std::sync::Mutex<EdgeSent>>,
}

/// The route sets last answered to edges (by the groups asked and their
/// version), so that an edge saying which version it has is answered
/// with the difference ([`skein_edge::EdgeDelta`]).
#[derive(Default)]
struct EdgeSent(std::collections::VecDeque<(Option<Vec<String>>, u64, Arc<skein_edge::Routes>)>);

impl EdgeSent {
    /// A few, over all the group sets edges ask for (not per set: with
    /// many edges of different groups on one node, deltas fall back to
    /// whole documents more often): an edge a change or two behind still
    /// gets a delta, and each is only pointers to the view's backends.
    const KEEP: usize = 8;

    fn get(&self, groups: &Option<Vec<String>>, version: u64) -> Option<Arc<skein_edge::Routes>> {
        self.0
            .iter()
            .find(|(g, v, _)| g == groups && *v == version)
            .map(|(_, _, r)| r.clone())
    }

    fn remember(
        &mut self,
        groups: &Option<Vec<String>>,
        version: u64,
        routes: &Arc<skein_edge::Routes>,
    ) {
        if self.get(groups, version).is_none() {
            if self.0.len() >= Self::KEEP {
                self.0.pop_front();
            }
            self.0.push_back((groups.clone(), version, routes.clone()));
        }
    }
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
        .route("/v1/vips/stats", get(vip_stats))
        .route("/v1/edge", get(edge))
        .route("/v1/edge/problems", get(edge_problems))
        .route("/metrics", get(metrics))
        .route("/v1/health", get(system_health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Ctx {
            agent,
            auth,
            edge_sent: Default::default(),
        })
}

/// The address a request came from: every request [`serve_with`] serves
/// carries it (the entry point asks a token of everyone off loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// What one client may hold of the API's HTTP server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request's header must arrive whole within this, the first one
    /// from when the connection is served and each later one from when the
    /// previous answer was sent (so it also bounds keep-alive idleness).
    pub header_read_timeout: Duration,
    /// Connections served at once. One accepted beyond waits, counted,
    /// until another closes, and nothing else is accepted meanwhile (the
    /// rest wait in the kernel's backlog).
    pub max_connections: usize,
    /// Requests handled at once; beyond, a request is answered 503 at once
    /// (shed, counted).
    pub max_requests: usize,
    /// A connection is asked to close after this long (it finishes the
    /// request in flight), whatever its client does.
    pub connection_lifetime: Duration,
    /// How long a connection asked to close (lifetime reached, server
    /// shutting down) may take to finish; it is cut after.
    pub close_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_requests: 64,
            connection_lifetime: Duration::from_secs(60),
            close_grace: Duration::from_secs(10),
        }
    }
}

/// What the server's [`Limits`] did, rendered by `/metrics` when the
/// router runs under [`serve_with`].
#[derive(Debug, Default)]
pub struct ServeCounters {
    pub connections_accepted: AtomicU64,
    /// Connections being served now (a gauge).
    pub connections_open: AtomicU64,
    /// Connections accepted while `max_connections` were served: each
    /// waited for a free slot.
    pub connections_over_cap: AtomicU64,
    /// Connections closed because a request header did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Connections closed because they reached their lifetime.
    pub lifetime_closed: AtomicU64,
    /// Requests answered 503 because `max_requests` were in flight.
    pub requests_shed: AtomicU64,
}

impl ServeCounters {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "skein_api_connections_total",
                "counter",
                "HTTP API connections accepted.",
                load(&self.connections_accepted),
            ),
            (
                "skein_api_connections_open",
                "gauge",
                "HTTP API connections being served.",
                load(&self.connections_open),
            ),
            (
                "skein_api_connections_over_cap_total",
                "counter",
                "HTTP API connections accepted at the connection cap; each waited for a free slot.",
                load(&self.connections_over_cap),
            ),
            (
                "skein_api_header_timeouts_total",
                "counter",
                "HTTP API connections closed because a request header did not arrive in time.",
                load(&self.header_timeouts),
            ),
            (
                "skein_api_connection_lifetime_closed_total",
                "counter",
                "HTTP API connections closed at the end of their lifetime.",
                load(&self.lifetime_closed),
            ),
            (
                "skein_api_requests_shed_total",
                "counter",
                "HTTP API requests answered 503 because too many were in flight.",
                load(&self.requests_shed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

/// Serves the router with the default [`Limits`] until the future
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(
        listener,
        app,
        Limits::default(),
        Arc::new(ServeCounters::default()),
        shutdown,
    )
    .await
}

/// Serves the router (HTTP/1.1) under `limits`, counting in `counters`,
/// until the future `shutdown` completes; then stops accepting, asks every
/// connection to close and waits for them (at most `close_grace` each).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    counters: Arc<ServeCounters>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls_with(listener, app, limits, counters, None, shutdown).await
}

/// [`serve_with`], over TLS when `tls` is given (the handshake must end
/// within the header read timeout).
pub async fn serve_tls_with(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    counters: Arc<ServeCounters>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let service = ServiceBuilder::new()
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(limits.max_requests.max(1)))
        .service(app.layer(Extension(counters.clone())));
    let shed = counters.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let service = service.clone();
        let counters = shed.clone();
        async move {
            Ok::<_, Infallible>(match service.oneshot(req).await {
                Ok(response) => response,
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                    counters.requests_shed.fetch_add(1, Ordering::Relaxed);
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many requests in flight, try again",
                    )
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            })
        }
    });
    let max_connections = limits.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                counters
                    .connections_over_cap
                    .fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (service, limits, counters, stop) = (
            service.clone(),
            limits.clone(),
            counters.clone(),
            stop_rx.clone(),
        );
        match tls.clone() {
            None => {
                tokio::spawn(connection(
                    stream, peer, service, limits, counters, stop, slot,
                ));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            connection(stream, peer, service, limits, counters, stop, slot).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            counters.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection hands its slot back when it ends.
    let _ = slots.acquire_many(max_connections as u32).await;
    Ok(())
}

/// One connection, from its slot to its end: served with a timer (so that
/// the header read timeout applies) until it closes, times out, reaches
/// its lifetime or the server stops.
async fn connection<S, I>(
    stream: I,
    peer: std::net::SocketAddr,
    service: S,
    limits: Limits,
    counters: Arc<ServeCounters>,
    stop: tokio::sync::watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    S: hyper::service::Service<hyper::Request<Incoming>, Response = Response, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    counters.connections_open.fetch_add(1, Ordering::Relaxed);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        hyper::service::Service::call(&service, req)
    });
    // Upgrades (WebSockets) pass through the entry point's service proxy.
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = tokio::time::sleep(limits.connection_lifetime) => {
            counters.lifetime_closed.fetch_add(1, Ordering::Relaxed);
            None
        }
        () = stopped(stop) => None,
    };
    match ended {
        Some(Err(e)) if e.is_timeout() => {
            counters.header_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        Some(_) => {}
        None => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.close_grace, conn.as_mut()).await;
        }
    }
    counters.connections_open.fetch_sub(1, Ordering::Relaxed);
}

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A failed accept: the peer's trouble is skipped; ours (out of file
/// descriptors, say) is waited out a little instead of spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "API accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
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
    Json(docs::TasksRef {
        tasks: &view.tasks,
        invalid: &view.invalid,
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
    let spec = skein_state::parse_task_body(&body)
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
    let mut rows: docs::Records = records
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
    // By name, as Mesos-DNS lists them (the set is grouped by zone).
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Json(rows).into_response()
}

/// Mesos-DNS's `/v1/enumerate`: per framework, per app, its records.
async fn enumerate(State(ctx): State<Ctx>) -> Response {
    let records = ctx.agent.records();
    let mut frameworks: BTreeMap<String, BTreeMap<String, Vec<docs::EnumerateRecord>>> =
        BTreeMap::new();
    for (name, set) in records.iter() {
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
        .flat_map(|s| s.iter())
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
    for r in records.get(&name).into_iter().flat_map(|s| s.iter()) {
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
    // Serialized from the view, not copied: 10,000 VIPs are megabytes.
    Json(&ctx.agent.view().vips).into_response()
}

async fn vip_problems(State(ctx): State<Ctx>) -> Response {
    Json(docs::VipProblems(ctx.agent.view().vip_problems.clone())).into_response()
}

#[derive(Debug, Deserialize)]
struct EdgeQuery {
    /// Comma-separated edge groups; all groups when absent.
    groups: Option<String>,
    /// Answer once the routes' version differs from this one (long-poll).
    wait_version: Option<u64>,
    /// How long a long-poll waits at most (default 25 s, at most 50 s).
    timeout_s: Option<u64>,
    /// The version the edge has: answered with what changed since (an
    /// [`skein_edge::EdgeDelta`]) when this agent answered it recently,
    /// else with the whole route set.
    base: Option<u64>,
}

/// [`skein_edge::EdgeDoc`], serialized from the routes in place.
#[derive(serde::Serialize)]
struct WholeDoc<'a> {
    version: u64,
    routes: &'a skein_edge::Routes,
}

/// `GET /v1/edge[?groups=a,b][&wait_version=V[&timeout_s=S]][&base=B]`:
/// what an edge of those groups serves. With `wait_version`, answers when
/// the routes differ from that version, or when the wait ends, whichever
/// is first: an edge learns of a change as soon as this node's view has
/// it. With `base`, the answer is the change since that version when this
/// agent still has it (`{"version", "base", "upsert", ...}`), else the
/// whole document (`{"version", "routes"}`).
async fn edge(State(ctx): State<Ctx>, Query(q): Query<EdgeQuery>) -> Response {
    // An edge long-polls; a one-off read (curl, the CLI) is not an edge.
    if q.wait_version.is_some() {
        ctx.agent.note_edge_poll();
    }
    let groups: Option<Vec<String>> = q.groups.as_deref().map(|g| {
        g.split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect()
    });
    let doc_of = |view: &skein_agent::view::View| {
        let routes = view.edge_routes();
        skein_edge::EdgeDoc::new(match &groups {
            Some(g) => routes.for_groups(g),
            None => (**routes).clone(),
        })
    };
    let answer = |doc: skein_edge::EdgeDoc| -> Response {
        let routes = Arc::new(doc.routes);
        let old = {
            let mut sent = ctx.edge_sent.lock().unwrap_or_else(|e| e.into_inner());
            sent.remember(&groups, doc.version, &routes);
            q.base.and_then(|b| sent.get(&groups, b).map(|r| (b, r)))
        };
        match old {
            Some((base, old)) => Json(skein_edge::EdgeDelta::between(
                &old,
                base,
                &routes,
                doc.version,
            ))
            .into_response(),
            None => Json(WholeDoc {
                version: doc.version,
                routes: &routes,
            })
            .into_response(),
        }
    };
    let wait = Duration::from_secs(q.timeout_s.unwrap_or(25).min(50));
    let deadline = tokio::time::Instant::now() + wait;
    let mut views = ctx.agent.subscribe_view();
    loop {
        let view = views.borrow_and_update().clone();
        let doc = doc_of(&view);
        if q.wait_version != Some(doc.version) {
            return answer(doc);
        }
        match tokio::time::timeout_at(deadline, views.changed()).await {
            Ok(Ok(())) => continue,
            _ => return answer(doc),
        }
    }
}

/// Connections through each VIP and to each backend, counted by this
/// node's kernel (the clients on this node).
async fn vip_stats(State(ctx): State<Ctx>) -> Response {
    match ctx.agent.vip_stats() {
        Some(stats) => Json(stats).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "VIP connections are not counted on this node (its VIP dataplane is not nftables, \
             or conntrack's events cannot be read)",
        ),
    }
}

/// Every node and its components, from this node's replica.
async fn system_health(State(ctx): State<Ctx>) -> Response {
    Json(ctx.agent.system_health()).into_response()
}

async fn edge_problems(State(ctx): State<Ctx>) -> Response {
    Json(serde_json::json!({ "problems": ctx.agent.view().edge_routes().problems })).into_response()
}

async fn state(State(ctx): State<Ctx>) -> Response {
    Json(ctx.agent.state_json()).into_response()
}

async fn metrics(
    State(ctx): State<Ctx>,
    served: Option<Extension<Arc<ServeCounters>>>,
) -> Response {
    let mut body = skein_agent::metrics::render(&ctx.agent);
    if let Some(Extension(counters)) = served {
        counters.render(&mut body);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
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
