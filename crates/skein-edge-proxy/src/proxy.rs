//! HTTP mode: one request from a client to a server.
//!
//! Marathon-LB's HTTP behaviour, request by request: virtual host and path
//! routing (first route wins), redirect to HTTPS, basic auth, the path
//! prefix strip, `X-Forwarded-*`, sticky cookies, balance, WebSocket
//! upgrades, and HAProxy's answers when nothing can serve (503), a server
//! fails (502) or is too slow (504). A request goes to another server only
//! when it never left this process (a failed connect, or a kept connection
//! found closed before the request was written), so retries never repeat a
//! request a server has seen.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::client::{connect_http, UpBody};
use crate::state::{is_http, pick, BackendEntry, CounterSet, Counters, Session};
use crate::tunnel::pipe;
use crate::Shared;

/// Marathon-LB's sticky cookie.
pub(crate) const STICKY_COOKIE: &str = "mesosphere_server_id";

pub(crate) type RespBody = BoxBody<Bytes, hyper::Error>;

// Header names as constants: a name given as `&str` is parsed again on
// every use, and these are used on every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrontKind {
    Http,
    Https,
    /// A backend's bind port (service port or `HAPROXY_{n}_PORT`).
    Port(u16),
}

pub(crate) struct Front {
    pub kind: FrontKind,
    pub peer: SocketAddr,
    pub sni: Option<String>,
    pub counters: Arc<Counters>,
    /// `X-Forwarded-For` and `X-Forwarded-Port` as sent on every request
    /// of the connection: made once, not per request.
    peer_ip: Option<HeaderValue>,
    local_port: Option<HeaderValue>,
}

impl Front {
    pub(crate) fn new(
        kind: FrontKind,
        local: SocketAddr,
        peer: SocketAddr,
        sni: Option<String>,
        counters: Arc<Counters>,
    ) -> Front {
        Front {
            kind,
            peer,
            sni,
            counters,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            local_port: HeaderValue::from_str(&local.port().to_string()).ok(),
        }
    }
}

/// A body that counts its bytes and, at its end, closes the session it
/// holds (a request in flight).
struct Counted<B> {
    inner: B,
    counters: CounterSet,
    /// Counts bytes out (a response) rather than in (a request).
    out: bool,
    session: Option<Session>,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    for c in this.counters.iter() {
                        if this.out {
                            c.bout.fetch_add(n, Ordering::Relaxed);
                        } else {
                            c.bin.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    this.session = None;
                }
            }
            Poll::Ready(_) => this.session = None,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(text: impl Into<Bytes>) -> RespBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

fn plain(status: StatusCode, html: &str) -> Response<RespBody> {
    let mut resp = Response::new(full(html.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn error_page(status: StatusCode, message: &str) -> Response<RespBody> {
    let reason = status.canonical_reason().unwrap_or("");
    plain(
        status,
        &format!(
            "<html><body><h1>{} {reason}</h1>\n{message}\n</body></html>\n",
            status.as_u16()
        ),
    )
}

pub(crate) fn no_server() -> Response<RespBody> {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "No server is available to handle this request.",
    )
}

/// The host a request names, lowercase, without port or trailing dot
/// (borrowed from the request when it is already in that form, as it
/// nearly always is).
fn request_host<'r>(req: &'r Request<Incoming>, sni: Option<&'r str>) -> Option<Cow<'r, str>> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .or(sni)?;
    let host: Cow<'r, str> = if raw.starts_with('[') {
        // An IPv6 literal: keep the brackets' content.
        match raw.find(']') {
            Some(end) => Cow::Borrowed(&raw[..=end]),
            None => Cow::Owned(format!("{raw}]")),
        }
    } else {
        Cow::Borrowed(raw.split(':').next().unwrap_or_default())
    };
    let host = match host {
        Cow::Borrowed(h) => Cow::Borrowed(h.trim_end_matches('.')),
        Cow::Owned(h) => Cow::Owned(h.trim_end_matches('.').to_string()),
    };
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        host
    };
    (!host.is_empty()).then_some(host)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// `HAPROXY_{n}_HTTP_BACKEND_PROXYPASS_PATH`: the prefix is cut from the
/// path, which keeps a leading `/`.
pub(crate) fn strip_prefix(path_and_query: &str, prefix: &str) -> String {
    match path_and_query.strip_prefix(prefix) {
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        Some(rest) => format!("/{rest}"),
        None => path_and_query.to_string(),
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    front: Arc<Front>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    front.counters.req_tot.fetch_add(1, Ordering::Relaxed);
    let resp = serve(&shared, &front, req).await;
    front.counters.status(resp.status().as_u16());
    Ok(resp)
}

/// The redirect `HAPROXY_{n}_REDIRECT_TO_HTTPS` asks for.
fn redirect_to_https(
    shared: &Shared,
    req: &Request<Incoming>,
    host: Option<&str>,
) -> Response<RespBody> {
    let Some(host) = host else {
        return error_page(StatusCode::BAD_REQUEST, "No host to redirect to.");
    };
    let port = match shared.https_port() {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{pq}");
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

async fn serve(
    shared: &Arc<Shared>,
    front: &Front,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let backend: Arc<BackendEntry> = {
        let table = shared.table.load();
        let host = request_host(&req, front.sni.as_deref());
        let backend = match front.kind {
            FrontKind::Port(p) => table.by_port.get(&p).filter(|b| is_http(b)).cloned(),
            FrontKind::Http | FrontKind::Https => {
                table.route(host.as_deref(), req.uri().path()).cloned()
            }
        };
        let Some(backend) = backend else {
            return no_server();
        };
        if front.kind == FrontKind::Http && backend.spec.labels.redirect_to_https {
            backend.rt.c.req_tot.fetch_add(1, Ordering::Relaxed);
            let resp = redirect_to_https(shared, &req, host.as_deref());
            backend.rt.c.status(resp.status().as_u16());
            return resp;
        }
        backend
    };
    let labels = &backend.spec.labels;
    let bc = &backend.rt.c;
    bc.req_tot.fetch_add(1, Ordering::Relaxed);

    if let Some(auth) = &labels.auth {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !shared.auth.check(auth, given).await {
            let mut resp = error_page(
                StatusCode::UNAUTHORIZED,
                "You need a valid user and password to access this content.",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.realm)) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            bc.status(401);
            return resp;
        }
    }

    let upgrade = upgrade_of(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let sticky = if labels.sticky {
        cookie(req.headers(), STICKY_COOKIE)
    } else {
        None
    };

    let (parts, body) = req.into_parts();
    // Servers get the path (and query) alone; one already in that form is
    // passed on as it came.
    let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
    let uri: Uri = match &labels.proxypass_path {
        None if origin_form => parts.uri,
        prefix => {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let pq = match prefix {
                Some(prefix) => strip_prefix(pq, prefix),
                None => pq.to_string(),
            };
            match pq.parse() {
                Ok(u) => u,
                Err(_) => return error_page(StatusCode::BAD_REQUEST, "Bad request path."),
            }
        }
    };
    let mut headers = parts.headers;
    let original_host = headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut headers);
    if let Some(u) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.clone());
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", front.peer.ip())).ok(),
        None => front.peer_ip.clone(),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    let proto = if front.kind == FrontKind::Https {
        "https"
    } else {
        "http"
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(v) = &front.local_port {
        headers.insert(X_FORWARDED_PORT, v.clone());
    }
    if let Some(h) = original_host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, h);
        }
    }
    let method = parts.method;
    let bodyless = body.is_end_stream();
    // A bodiless request sends an empty body (no allocation, nothing to
    // count); one with a body counts it as it streams.
    let mut body: Option<UpBody> = Some(if bodyless {
        crate::client::empty()
    } else {
        Counted {
            inner: body,
            counters: CounterSet::of(&[&front.counters, bc]),
            out: false,
            session: None,
        }
        .boxed()
    });
    let retry_sent_ok = bodyless && idempotent(&method) && upgrade.is_none();
    let t = &shared.cfg.timeouts;
    let mut tried: Vec<SocketAddr> = Vec::new();
    // The request as it goes to a server; given back by a connection that
    // did not take it, and rebuilt (bodiless) for a repeat after one that
    // failed once it had.
    let mut head: Option<(Method, Uri, HeaderMap)> = Some((method, uri, headers));
    let mut kept: Option<(Method, Uri, HeaderMap)> = None;
    let max_attempts = backend.servers.len() + 3;
    for attempt in 0..max_attempts {
        let Some(server) = pick(
            &backend,
            front.peer.ip(),
            sticky.as_deref(),
            &tried,
            Instant::now(),
        ) else {
            break;
        };
        let rt = server.rt.clone();
        if attempt > 0 {
            bc.wretr.fetch_add(1, Ordering::Relaxed);
            rt.c.wretr.fetch_add(1, Ordering::Relaxed);
        }
        let pooled = if upgrade.is_none() {
            rt.pool.take()
        } else {
            None
        };
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            None => match connect_http(rt.addr, t.connect).await {
                Ok(s) => s,
                Err(e) => {
                    tried.push(rt.addr);
                    bc.econ.fetch_add(1, Ordering::Relaxed);
                    if rt.connect_failed(Instant::now()) {
                        tracing::warn!(backend = %backend.spec.name, server = %rt.name, "3 connect failures in a row: no requests for 10 s");
                    }
                    tracing::debug!(backend = %backend.spec.name, server = %rt.name, error = %e, "connect failed; trying another server");
                    continue;
                }
            },
        };
        rt.connected();
        let (Some(b), Some((m, u, h))) = (body.take(), head.take()) else {
            break;
        };
        if reused && retry_sent_ok {
            // Kept only where a repeat may follow: a kept connection the
            // server closes as the request is written.
            kept = Some((m.clone(), u.clone(), h.clone()));
        }
        let mut up = Request::new(b);
        *up.method_mut() = m;
        *up.uri_mut() = u;
        *up.headers_mut() = h;
        let session = Session::open(CounterSet::of(&[bc, &rt.c]));
        let sent = tokio::time::timeout(t.server, sender.try_send_request(up)).await;
        let mut resp = match sent {
            Err(_) => {
                bc.eresp.fetch_add(1, Ordering::Relaxed);
                rt.c.eresp.fetch_add(1, Ordering::Relaxed);
                bc.status(504);
                rt.c.status(504);
                return error_page(
                    StatusCode::GATEWAY_TIMEOUT,
                    "The server didn't respond in time.",
                );
            }
            Ok(Err(mut e)) => {
                if let Some(back) = e.take_message() {
                    // Never written: a kept connection that had closed.
                    let (p, b) = back.into_parts();
                    body = Some(b);
                    head = Some((p.method, p.uri, p.headers));
                    if !reused {
                        tried.push(rt.addr);
                    }
                    continue;
                }
                if let (true, Some(k)) = (reused && retry_sent_ok, kept.take()) {
                    // A kept connection the server closed as we wrote:
                    // safe to repeat a bodiless idempotent request.
                    body = Some(crate::client::empty());
                    head = Some(k);
                    continue;
                }
                tracing::debug!(backend = %backend.spec.name, server = %rt.name, error = %e.error(), "server failed the request");
                bc.eresp.fetch_add(1, Ordering::Relaxed);
                rt.c.eresp.fetch_add(1, Ordering::Relaxed);
                bc.status(502);
                rt.c.status(502);
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "The server returned an invalid or incomplete response.",
                );
            }
            Ok(Ok(resp)) => resp,
        };
        let code = resp.status().as_u16();
        bc.status(code);
        rt.c.status(code);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_up) = client_upgrade {
                let server_up = hyper::upgrade::on(&mut resp);
                let counters = vec![front.counters.clone(), bc.clone(), rt.c.clone()];
                let idle = t.tunnel;
                let close = rt.close.subscribe();
                // Picked just as it left the routes (after its drain was
                // decided): the tunnel still closes at the drain timeout.
                if rt.removed.load(std::sync::atomic::Ordering::Relaxed) {
                    shared.drains.start(&rt, shared.cfg.drain_timeout);
                }
                let name = backend.spec.name.clone();
                tokio::spawn(async move {
                    let _session = session;
                    match tokio::try_join!(client_up, server_up) {
                        Ok((c, s)) => {
                            let end =
                                pipe(TokioIo::new(c), TokioIo::new(s), idle, close, counters).await;
                            tracing::debug!(backend = %name, ?end, "upgraded connection ended");
                        }
                        Err(e) => {
                            tracing::debug!(backend = %name, error = %e, "upgrade failed");
                        }
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, full(Bytes::new()));
            }
        } else if upgrade.is_none() {
            rt.pool.put(sender);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if labels.sticky && sticky.as_deref() != Some(rt.cookie.as_str()) {
            if let Ok(v) = HeaderValue::from_str(&format!("{STICKY_COOKIE}={}; path=/", rt.cookie))
            {
                parts.headers.append(header::SET_COOKIE, v);
                parts
                    .headers
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            }
        }
        let body = Counted {
            inner: body,
            counters: CounterSet::of(&[&front.counters, bc, &rt.c]),
            out: true,
            session: Some(session),
        };
        return Response::from_parts(parts, body.boxed());
    }
    bc.status(503);
    no_server()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxypass_keeps_a_leading_slash() {
        assert_eq!(strip_prefix("/api/users?x=1", "/api"), "/users?x=1");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/api/", "/api/"), "/");
        assert_eq!(strip_prefix("/api/x", "/api/"), "/x");
        assert_eq!(strip_prefix("/other", "/api"), "/other");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; mesosphere_server_id=abc ; b=2"),
        );
        assert_eq!(cookie(&h, STICKY_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
