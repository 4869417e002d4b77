//! `/service/<name>/...`: a proxy to a named app's healthy backends, as
//! Admin Router's (the app's `DCOS_SERVICE_NAME`, `DCOS_SERVICE_PORT_INDEX`
//! and `DCOS_SERVICE_SCHEME` labels, else the app id and its first port),
//! prefix stripped, WebSockets passed through, a backend that refuses the
//! connection skipped for the next (as the VIPs fail over).

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use skein_state::{NodeStatus, TaskView};

use crate::auth;

/// How long one backend may take to accept the connection before the next
/// is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a backend may take to start its answer (Marathon-LB's
/// `timeout server` was 50 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a service's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub app: String,
    /// Its healthy backends on live nodes, in (node, task) order.
    pub backends: Vec<SocketAddr>,
}

/// Why a service cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    NoSuchService,
    /// `DCOS_SERVICE_SCHEME` other than `http`.
    Scheme(String),
    /// Tasks, none healthy on a live node with the port.
    NoBackend {
        app: String,
        tasks: usize,
    },
}

/// The tasks serving `name`: those whose app says `DCOS_SERVICE_NAME=name`,
/// else those of app `/name`. Pure: tested without a cluster.
pub fn target(tasks: &[TaskView], name: &str) -> Result<Target, Unreachable> {
    let named: Vec<&TaskView> = tasks
        .iter()
        .filter(|t| t.spec.labels.get("DCOS_SERVICE_NAME") == Some(name))
        .collect();
    let chosen = if named.is_empty() {
        tasks
            .iter()
            .filter(|t| t.spec.app.trim_start_matches('/') == name)
            .collect()
    } else {
        named
    };
    let Some(first) = chosen.first() else {
        return Err(Unreachable::NoSuchService);
    };
    let labels = &first.spec.labels;
    let scheme = labels.get("DCOS_SERVICE_SCHEME").unwrap_or("http");
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(Unreachable::Scheme(scheme.to_string()));
    }
    let index: usize = labels
        .get("DCOS_SERVICE_PORT_INDEX")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut up: Vec<(&str, &str, SocketAddr)> = chosen
        .iter()
        .filter(|t| t.node_status == NodeStatus::Alive && t.healthy)
        .filter_map(|t| {
            let port = t.spec.ports.get(index)?.port;
            Some((
                t.node_id.as_str(),
                t.id.as_str(),
                SocketAddr::new(t.spec.ip, port),
            ))
        })
        .collect();
    up.sort();
    if up.is_empty() {
        return Err(Unreachable::NoBackend {
            app: first.spec.app.clone(),
            tasks: chosen.len(),
        });
    }
    Ok(Target {
        app: first.spec.app.clone(),
        backends: up.into_iter().map(|(_, _, a)| a).collect(),
    })
}

/// `/service/<name>/<rest>?q` → `/<rest>?q`.
pub fn strip(uri: &Uri, name: &str) -> String {
    let path = uri.path();
    let prefix_len = "/service/".len() + name.len();
    let rest = path.get(prefix_len..).unwrap_or("");
    let rest = if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    };
    match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    }
}

/// Headers that belong to one hop (RFC 9110 7.6.1), dropped before the
/// request goes on; `Connection`/`Upgrade` are set again for an upgrade.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The request's headers as they go on: hop-by-hop ones dropped, and the
/// cluster's credential (`token`, or the session cookie) never handed to
/// an app; an app's own `Authorization` goes on.
pub fn forwarded_headers(headers: &HeaderMap, upgrade: bool, token: &str) -> HeaderMap {
    let mut out = headers.clone();
    for h in &HOP_BY_HOP {
        out.remove(h);
    }
    if !upgrade {
        out.remove(header::UPGRADE);
    } else {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let theirs: Vec<HeaderValue> = out
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| {
            let ours = v.to_str().ok().and_then(auth::from_authorization).is_some_and(
                |c| matches!(c, auth::Credential::Token(t) if auth::same(t.as_bytes(), token.as_bytes())),
            );
            !ours
        })
        .cloned()
        .collect();
    out.remove(header::AUTHORIZATION);
    for v in theirs {
        out.append(header::AUTHORIZATION, v);
    }
    let cookies: Vec<String> = out
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{}=", auth::COOKIE)))
        .map(str::to_string)
        .collect();
    out.remove(header::COOKIE);
    if !cookies.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
            out.insert(header::COOKIE, v);
        }
    }
    out
}

/// Drops an app's attempts to set the entry point's session cookie (the
/// app answers on the entry point's origin: it could otherwise replace a
/// user's session with one of its choosing).
pub fn drop_our_cookie(headers: &mut HeaderMap) {
    let keep: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            // By bytes: a value that is not text must not slip through.
            let name = v
                .as_bytes()
                .split(|b| *b == b'=')
                .next()
                .unwrap_or_default();
            name.trim_ascii() != auth::COOKIE.as_bytes()
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in keep {
        headers.append(header::SET_COOKIE, v);
    }
}

fn text(status: StatusCode, message: String) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Proxies `req` to one of `target`'s backends, starting at `start` (round
/// robin) and going on to the next while a connection is refused.
/// What the proxy needs of the entry point: the cluster's token (kept
/// from apps) and the room for tunnels (upgraded connections outlive
/// their request: bounded).
#[derive(Clone)]
pub struct ProxyContext {
    pub token: String,
    pub tunnels: std::sync::Arc<tokio::sync::Semaphore>,
}

pub async fn proxy(
    cx: &ProxyContext,
    target: Target,
    name: &str,
    start: usize,
    peer: Option<SocketAddr>,
    mut req: Request<Body>,
) -> Response<Body> {
    let n = target.backends.len();
    let mut stream = None;
    for i in 0..n {
        let addr = target.backends[(start + i) % n];
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                stream = Some((s, addr));
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(service = name, backend = %addr, error = %e, "connect failed; trying the next backend");
            }
            Err(_) => {
                tracing::debug!(service = name, backend = %addr, "connect timed out; trying the next backend");
            }
        }
    }
    let Some((stream, addr)) = stream else {
        return text(
            StatusCode::BAD_GATEWAY,
            format!(
                "no backend of {} accepted a connection (tried {n})",
                target.app
            ),
        );
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("{addr}: {e}")),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, error = %e, "service connection ended");
        }
    });
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let permit = if upgrade {
        match cx.tunnels.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many upgraded connections through the entry point".into(),
                )
            }
        }
    } else {
        None
    };
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let path = strip(req.uri(), name);
    let mut headers = forwarded_headers(req.headers(), upgrade, &cx.token);
    if let Some(peer) = peer {
        // Appended to what the client said, as a proxy chain does.
        let ip = peer.ip().to_string();
        let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(before) => format!("{before}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-forwarded-for", v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/service/{name}")) {
        headers.insert("x-forwarded-prefix", v);
    }
    let (parts, body) = req.into_parts();
    let mut upstream = Request::new(body);
    *upstream.method_mut() = parts.method;
    *upstream.headers_mut() = headers;
    *upstream.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{path:?}: {e}")),
    };
    let mut resp = match tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(upstream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("{} ({addr}) did not answer: {e}", target.app),
            )
        }
        Err(_) => {
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{} ({addr}) did not answer within {} s",
                    target.app,
                    ANSWER_TIMEOUT.as_secs()
                ),
            )
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_up) = client_upgrade {
            let server_up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                // Held while the tunnel lives.
                let _permit = permit;
                match tokio::try_join!(client_up, server_up) {
                    Ok((c, s)) => {
                        let mut c = TokioIo::new(c);
                        let mut s = TokioIo::new(s);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                    Err(e) => tracing::debug!(backend = %addr, error = %e, "upgrade failed"),
                }
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    drop_our_cookie(&mut parts.headers);
    for h in &HOP_BY_HOP {
        if parts.status != StatusCode::SWITCHING_PROTOCOLS || *h != header::CONNECTION {
            parts.headers.remove(h);
        }
    }
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_state::{Labels, TaskSpec};
    use std::sync::Arc;

    fn task(
        id: &str,
        node: &str,
        app: &str,
        ip: [u8; 4],
        ports: &[u16],
        labels: &[(&str, &str)],
        healthy: bool,
    ) -> TaskView {
        let mut l = Labels::new();
        for (k, v) in labels {
            l.insert(*k, *v);
        }
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "app": app,
            "ip": std::net::IpAddr::from(ip).to_string(),
            "ports": ports.iter().map(|p| serde_json::json!({"port": p})).collect::<Vec<_>>(),
        }))
        .expect("spec");
        let spec = TaskSpec { labels: l, ..spec };
        TaskView {
            id: id.into(),
            node_id: node.into(),
            node_status: NodeStatus::Alive,
            healthy,
            spec: Arc::new(spec),
        }
    }

    #[test]
    fn a_service_is_found_by_its_label_else_by_app_id() {
        let tasks = vec![
            task(
                "a.1",
                "n1",
                "/dash",
                [10, 0, 0, 1],
                &[80, 81],
                &[
                    ("DCOS_SERVICE_NAME", "dashboard"),
                    ("DCOS_SERVICE_PORT_INDEX", "1"),
                ],
                true,
            ),
            task(
                "a.2",
                "n2",
                "/dash",
                [10, 0, 0, 2],
                &[80, 81],
                &[
                    ("DCOS_SERVICE_NAME", "dashboard"),
                    ("DCOS_SERVICE_PORT_INDEX", "1"),
                ],
                false,
            ),
            task("b.1", "n1", "/web", [10, 0, 0, 1], &[8080], &[], true),
            task(
                "c.1",
                "n1",
                "/secure",
                [10, 0, 0, 1],
                &[443],
                &[("DCOS_SERVICE_SCHEME", "https")],
                true,
            ),
        ];
        let t = target(&tasks, "dashboard").expect("dashboard");
        assert_eq!(t.backends, vec!["10.0.0.1:81".parse().expect("addr")]);
        let t = target(&tasks, "web").expect("web");
        assert_eq!(t.backends, vec!["10.0.0.1:8080".parse().expect("addr")]);
        assert_eq!(target(&tasks, "nothing"), Err(Unreachable::NoSuchService));
        assert_eq!(
            target(&tasks, "secure"),
            Err(Unreachable::Scheme("https".into()))
        );
        let down = vec![task("d.1", "n1", "/down", [10, 0, 0, 1], &[80], &[], false)];
        assert_eq!(
            target(&down, "down"),
            Err(Unreachable::NoBackend {
                app: "/down".into(),
                tasks: 1
            })
        );
    }

    #[test]
    fn an_app_cannot_set_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("app=1; Path=/"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("dcos-acs-auth-cookie=forged; Path=/"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("other=2"));
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_bytes(b"dcos-acs-auth-cookie=x; a=\xff").expect("bytes"),
        );
        drop_our_cookie(&mut h);
        let left: Vec<&str> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(left, vec!["app=1; Path=/", "other=2"]);
    }

    #[test]
    fn the_prefix_is_stripped() {
        let u: Uri = "/service/web/a/b?x=1".parse().expect("uri");
        assert_eq!(strip(&u, "web"), "/a/b?x=1");
        let u: Uri = "/service/web".parse().expect("uri");
        assert_eq!(strip(&u, "web"), "/");
        let u: Uri = "/service/web/".parse().expect("uri");
        assert_eq!(strip(&u, "web"), "/");
    }

    #[test]
    fn the_clusters_credentials_are_not_handed_to_apps() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("token=secret"),
        );
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; dcos-acs-auth-cookie=s; b=2"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let out = forwarded_headers(&h, false, "secret");
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert_eq!(
            out.get(header::COOKIE).and_then(|v| v.to_str().ok()),
            Some("a=1; b=2")
        );
        assert!(out.get(header::CONNECTION).is_none());
        // An app's own scheme is its business.
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert!(forwarded_headers(&h, false, "secret")
            .get(header::AUTHORIZATION)
            .is_some());
        // So is a bearer token that is not the cluster's (an app's JWT).
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app-jwt"),
        );
        assert!(forwarded_headers(&h, false, "secret")
            .get(header::AUTHORIZATION)
            .is_some());
    }
}
