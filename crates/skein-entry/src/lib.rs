//! The cluster's entry point on an agent started with `--entry-listen`: the
//! counterpart of DC/OS's Admin Router, one authenticated door to what the
//! agent knows (the Mesos-DNS and dcos-net APIs, the overlay state, the
//! metrics) and to the cluster's services (`/service/<name>/`). There are no
//! masters: every node is an entry point answering from its own replica.
//!
//! Authentication ([`auth`]): off loopback every request but the version
//! file and the login form needs the agent's API token (`Authorization:
//! Bearer <token>`, DC/OS's `Authorization: token=<token>`) or the session
//! cookie the login form sets; wrong credentials get 401 with no cluster
//! data, and an address that keeps presenting them is refused for a while
//! (429). From loopback, reads need nothing, as the API's.
//!
//! Where to start reading: [`router`], then [`gate`], then [`service`].

pub mod auth;
pub mod service;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use skein_agent::Agent;
use skein_api::PeerAddr;
use tower::ServiceExt;

/// How an entry point is set up.
#[derive(Debug, Clone)]
pub struct EntryConfig {
    /// The credential it accepts (the agent's API token).
    pub token: String,
    /// Whether it is served over TLS (the session cookie is then `Secure`).
    pub tls: bool,
    /// The stats port of this node's edge (`skein edge --stats-port`),
    /// whose status the UI's Edge page shows.
    pub edge_stats: std::net::SocketAddr,
}

/// The entry point's shared state.
pub struct Entry {
    agent: Arc<Agent>,
    /// The agent's API, answering the routes mapped onto it.
    api: Router,
    token: String,
    gate: Mutex<auth::Gate>,
    sessions: Mutex<auth::Sessions>,
    /// Whether it is served over TLS (the session cookie is then `Secure`).
    tls: bool,
    edge_stats: std::net::SocketAddr,
    next_backend: AtomicUsize,
    proxy: service::ProxyContext,
}

/// Upgraded connections (WebSockets) through `/service/` at once.
const MAX_TUNNELS: usize = 1024;

/// The entry point's routes. `api` is the agent's API router (the mapped
/// routes are answered by it).
pub fn router(agent: Arc<Agent>, api: Router, config: EntryConfig) -> Router {
    let entry = Arc::new(Entry {
        agent,
        api,
        token: config.token.clone(),
        gate: Mutex::default(),
        sessions: Mutex::default(),
        tls: config.tls,
        edge_stats: config.edge_stats,
        next_backend: AtomicUsize::new(0),
        proxy: service::ProxyContext {
            token: config.token.clone(),
            tunnels: Arc::new(tokio::sync::Semaphore::new(MAX_TUNNELS)),
        },
    });
    Router::new()
        .route("/dcos-metadata/dcos-version.json", get(version))
        .route("/login", get(login_form).post(login))
        .route("/service/{name}", any(service))
        .route("/service/{name}/", any(service))
        .route("/service/{name}/{*rest}", any(service))
        .route("/", get(|| asset(UI_INDEX, "text/html; charset=utf-8")))
        .route(
            "/ui/app.js",
            get(|| asset(UI_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/ui/app.css",
            get(|| asset(UI_CSS, "text/css; charset=utf-8")),
        )
        .route("/skein/v1/edge", get(edge_status))
        .fallback(mapped)
        .layer(axum::middleware::from_fn_with_state(entry.clone(), gate))
        .with_state(entry)
}

/// The TLS configuration of an entry point from PEM files: the
/// certificate chain in `cert`, its key in `key` (PKCS#8, PKCS#1 or SEC1).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The API path a read on the entry point maps to, if any: the Mesos-DNS
/// API under `/mesos_dns/v1/`, dcos-net's under `/net/v1/`, the overlay
/// state under both of DC/OS's paths, the cluster's health, the metrics.
pub fn mapped_path(path: &str) -> Option<String> {
    if let Some(rest) = path.strip_prefix("/mesos_dns/v1/") {
        let known = ["version", "config", "enumerate", "records"].contains(&rest)
            || rest.starts_with("hosts/")
            || rest.starts_with("services/");
        return known.then(|| format!("/v1/{rest}"));
    }
    if let Some(rest) = path.strip_prefix("/net/v1/") {
        let known = [
            "version",
            "config",
            "enumerate",
            "records",
            "vips",
            "vips/problems",
            "vips/stats",
            "nodes",
        ]
        .contains(&rest)
            || rest.starts_with("hosts/")
            || rest.starts_with("services/");
        return known.then(|| format!("/v1/{rest}"));
    }
    match path {
        // What the UI reads besides dcos-net's and Mesos-DNS's.
        "/skein/v1/tasks" => Some("/v1/tasks".into()),
        "/overlay-master/state" | "/mesos/overlay-master/state" => {
            Some("/overlay-master/state".into())
        }
        "/metrics" => Some("/metrics".into()),
        "/system/health/v1" => Some("/v1/health".into()),
        _ => None,
    }
}

fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Lets a request through only with what its route needs ([`auth::need`]).
///
/// A request passes with the token (`Authorization: Bearer`/`token=`) or
/// any valid session cookie. Only a wrong *token* counts against the
/// address ([`auth::Gate`]): a stale session (the agent restarted, another
/// node's) is sent to the login form, and an app's own `Authorization`
/// header does not lock out a user whose session cookie is valid.
pub async fn gate(State(e): State<Arc<Entry>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let ip = auth::client_key(peer.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])));
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let local = auth::local(peer, host);
    if auth::need(req.uri().path(), read, local) == auth::Need::Nothing {
        return next.run(req).await;
    }
    let now = Instant::now();
    if let Err(wait) = lock(&e.gate).check(ip, now) {
        return refused(wait);
    }
    let tokens: Vec<&str> = req
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(auth::from_authorization)
        .filter_map(|c| match c {
            auth::Credential::Token(t) => Some(t),
            auth::Credential::Session(_) => None,
        })
        .collect();
    // An empty token (never configured) matches nothing.
    let token_ok = !e.token.is_empty()
        && tokens
            .iter()
            .any(|t| auth::same(t.as_bytes(), e.token.as_bytes()));
    let sessions: Vec<&str> = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(auth::sessions_in)
        .collect();
    let session_ok = {
        let known = lock(&e.sessions);
        sessions.iter().any(|s| known.valid(s, now))
    };
    if token_ok || session_ok {
        if token_ok {
            lock(&e.gate).succeeded(ip);
        }
        return next.run(req).await;
    }
    if !tokens.is_empty() {
        lock(&e.gate).failed(ip, now);
        tracing::info!(client = %ip, path = req.uri().path(), "entry point: wrong token");
        return json_error(StatusCode::UNAUTHORIZED, "invalid credential");
    }
    if *req.method() == Method::GET && wants_html(&req) {
        // A browser: to the login form (a stale session cookie cleared).
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::SEE_OTHER;
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/login"));
        if !sessions.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&format!("{}=; Path=/; Max-Age=0", auth::COOKIE)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
        }
        return r;
    }
    let why = if sessions.is_empty() {
        "sign in: Authorization: Bearer <token> (or token=<token>), or the form at /login"
    } else {
        "the session has ended (or is another node's): sign in again at /login"
    };
    json_error(StatusCode::UNAUTHORIZED, why)
}

/// Whether a request comes from a browser loading a page.
fn wants_html(req: &Request) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn refused(wait: std::time::Duration) -> Response {
    let mut r = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many wrong credentials from this address: try again later",
    );
    let secs = wait.as_secs().max(1).to_string();
    if let Ok(v) = HeaderValue::from_str(&secs) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// DC/OS's version file (open to all: clients read it before signing in).
async fn version() -> Response {
    axum::Json(serde_json::json!({
        "version": skein_agent::VERSION,
        "dcos-variant": "skein",
    }))
    .into_response()
}

const LOGIN_FORM: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>skein: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}
label,input,button{display:block;width:100%;margin:.4rem 0;font-size:1rem}
input{padding:.4rem}p.error{color:#a00}</style></head>
<body><h1>skein</h1>
{{error}}<form method="post" action="/login">
<label for="token">API token (the agent's <code>api-token</code> file)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button></form></body></html>
"#;

fn login_page(status: StatusCode, error: &str) -> Response {
    let error = if error.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\" role=\"alert\">{error}</p>\n")
    };
    let page = LOGIN_FORM.replace("{{error}}", &error);
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        page,
    )
        .into_response()
}

async fn login_form() -> Response {
    login_page(StatusCode::OK, "")
}

/// The login form's POST: the token for a session cookie. Wrong tokens
/// count against the address as any wrong credential does.
async fn login(State(e): State<Arc<Entry>>, req: Request) -> Response {
    let ip = auth::client_key(
        req.extensions()
            .get::<PeerAddr>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.0.ip()),
    );
    let now = Instant::now();
    if let Err(wait) = lock(&e.gate).check(ip, now) {
        return refused(wait);
    }
    let body: Bytes = match axum::body::to_bytes(req.into_body(), 16 * 1024).await {
        Ok(b) => b,
        Err(_) => return login_page(StatusCode::BAD_REQUEST, "the form is too large"),
    };
    let text = String::from_utf8_lossy(&body);
    let token = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .and_then(|(_, v)| auth::form_value(v));
    let Some(token) = token else {
        return login_page(StatusCode::BAD_REQUEST, "no token in the form");
    };
    if e.token.is_empty() || !auth::same(token.trim().as_bytes(), e.token.as_bytes()) {
        lock(&e.gate).failed(ip, now);
        tracing::info!(client = %ip, "entry point: wrong token at the login form");
        return login_page(StatusCode::UNAUTHORIZED, "wrong token");
    }
    lock(&e.gate).succeeded(ip);
    let id = match session_id() {
        Some(id) => id,
        None => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no randomness for a session",
            )
        }
    };
    lock(&e.sessions).start(id.clone(), now);
    let secure = if e.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        auth::COOKIE,
        auth::Sessions::LIFETIME.as_secs()
    );
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// 32 random bytes, hex.
fn session_id() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

// The UI, embedded: it works with no internet.
const UI_INDEX: &str = include_str!("../ui/index.html");
const UI_JS: &str = include_str!("../ui/app.js");
const UI_CSS: &str = include_str!("../ui/app.css");

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// The local edge's status (`/_skein/status` on its stats port), for the
/// UI's Edge page; 503 when no edge answers there.
async fn edge_status(State(e): State<Arc<Entry>>) -> Response {
    let addr = e.edge_stats;
    let fetched = tokio::time::timeout(std::time::Duration::from_secs(2), async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = axum::http::Request::get("/_skein/status")
            .header(header::HOST, addr.to_string())
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("it answered {}", resp.status()));
        }
        axum::body::to_bytes(Body::new(resp.into_body()), 8 << 20)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    match fetched {
        Ok(Ok(body)) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Ok(Err(why)) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no edge on this node answers on {addr}: {why}"),
        ),
        Err(_) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the edge on {addr} did not answer within 2 s"),
        ),
    }
}

/// A read mapped onto the agent's API ([`mapped_path`]).
async fn mapped(State(e): State<Arc<Entry>>, mut req: Request) -> Response {
    let Some(target) = mapped_path(req.uri().path()) else {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!("no route {} on the entry point", req.uri().path()),
        );
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the entry point's API routes are read-only (change state through the agent's API)",
        );
    }
    let uri = match req.uri().query() {
        Some(q) => format!("{target}?{q}"),
        None => target,
    };
    match uri.parse::<Uri>() {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
    // The API's `/metrics` would add the entry server's counters under the
    // API's names.
    req.extensions_mut()
        .remove::<Arc<skein_api::ServeCounters>>();
    match e.api.clone().oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// `/service/<name>/...`.
async fn service(State(e): State<Arc<Entry>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let name = path
        .strip_prefix("/service/")
        .and_then(|p| p.split('/').next())
        .unwrap_or("")
        .to_string();
    if path == format!("/service/{name}") {
        // As Admin Router: the service's pages are under the slash.
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(&format!("/service/{name}/{query}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    }
    let view = e.agent.view();
    let target = match service::target(&view.tasks, &name) {
        Ok(t) => t,
        Err(service::Unreachable::NoSuchService) => {
            return json_error(StatusCode::NOT_FOUND, &format!("no service {name}"))
        }
        Err(service::Unreachable::Scheme(s)) => {
            return json_error(
                StatusCode::BAD_GATEWAY,
                &format!("service {name} wants scheme {s}; the entry point proxies http"),
            )
        }
        Err(service::Unreachable::NoBackend { app, tasks }) => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{app} has {tasks} task(s), none healthy on a live node"),
            )
        }
    };
    drop(view);
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    let start = e.next_backend.fetch_add(1, Ordering::Relaxed);
    service::proxy(&e.proxy, target, &name, start, peer, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dcos_paths_map_onto_the_api() {
        assert_eq!(
            mapped_path("/mesos_dns/v1/enumerate").as_deref(),
            Some("/v1/enumerate")
        );
        assert_eq!(
            mapped_path("/mesos_dns/v1/hosts/web.marathon.mesos").as_deref(),
            Some("/v1/hosts/web.marathon.mesos")
        );
        assert_eq!(mapped_path("/net/v1/vips").as_deref(), Some("/v1/vips"));
        assert_eq!(mapped_path("/net/v1/nodes").as_deref(), Some("/v1/nodes"));
        assert_eq!(
            mapped_path("/mesos/overlay-master/state").as_deref(),
            Some("/overlay-master/state")
        );
        assert_eq!(
            mapped_path("/overlay-master/state").as_deref(),
            Some("/overlay-master/state")
        );
        assert_eq!(mapped_path("/metrics").as_deref(), Some("/metrics"));
        assert_eq!(
            mapped_path("/system/health/v1").as_deref(),
            Some("/v1/health")
        );
        // The API's writes and its other reads are not on the entry point.
        assert_eq!(mapped_path("/net/v1/tasks"), None);
        assert_eq!(mapped_path("/mesos_dns/v1/vips"), None);
        assert_eq!(mapped_path("/v1/tasks"), None);
        assert_eq!(mapped_path("/skein/v1/tasks").as_deref(), Some("/v1/tasks"));
        assert_eq!(mapped_path("/overlay-master/agents/delete"), None);
    }
}
