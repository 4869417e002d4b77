//! Test harness: real HTTP/TCP servers on loopback that answer with their
//! own name, an HTTP(S) client, route builders, and waiting on conditions
//! with deadlines.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use skein_edge::labels::BasicAuth;
use skein_edge::{Backend, Balance, HttpRoute, Mode, PortLabels, Routes, Server, ServerState};
use skein_edge_proxy::{Config, Edge, RouteSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// An HTTP server answering with its name (body and `x-server`), echoing
/// what it saw in `x-seen-*` headers; `?sleep_ms=N` delays the answer; an
/// Upgrade request is accepted (101) and the connection echoes bytes
/// prefixed with the name.
pub struct TestServer {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(
    name: String,
    hits: Arc<AtomicU64>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let query = req.uri().query().unwrap_or("").to_string();
    if let Some(ms) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sleep_ms="))
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        let n = name.clone();
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            loop {
                let Ok(k) = io.read(&mut buf).await else {
                    return;
                };
                if k == 0 {
                    return;
                }
                let mut out = format!("{n}:").into_bytes();
                out.extend_from_slice(&buf[..k]);
                if io.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let h = req.headers();
    let seen = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let resp = Response::builder()
        .header("x-server", name.as_str())
        .header(
            "x-seen-path",
            req.uri().path_and_query().map_or("", |p| p.as_str()),
        )
        .header("x-seen-xff", seen("x-forwarded-for"))
        .header("x-seen-proto", seen("x-forwarded-proto"))
        .header("x-seen-port", seen("x-forwarded-port"))
        .header("x-seen-fwd-host", seen("x-forwarded-host"))
        .header("x-seen-host", seen("host"))
        .body(Full::new(Bytes::from(name)))
        .unwrap();
    Ok(resp)
}

pub async fn http_server(name: &str) -> TestServer {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let (n, h) = (name.to_string(), hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (n, h) = (n.clone(), h.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| answer(n.clone(), h.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    TestServer {
        name: name.to_string(),
        addr,
        hits,
        task,
    }
}

/// A TCP server that sends `<name>\n` on connect, then echoes each read
/// prefixed with its name.
pub async fn tcp_server(name: &str) -> TestServer {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let (n, h) = (name.to_string(), hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            h.fetch_add(1, Ordering::SeqCst);
            let n = n.clone();
            tokio::spawn(async move {
                if stream.write_all(format!("{n}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                loop {
                    let Ok(k) = stream.read(&mut buf).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    let mut out = format!("{n}:").into_bytes();
                    out.extend_from_slice(&buf[..k]);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    TestServer {
        name: name.to_string(),
        addr,
        hits,
        task,
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn labels(mode: Mode) -> PortLabels {
    PortLabels {
        groups: vec!["external".into()],
        bind_port: None,
        bind_addr: None,
        mode,
        vhosts: vec![],
        path: None,
        proxypass_path: None,
        balance: Balance::Roundrobin,
        sticky: false,
        redirect_to_https: false,
        ssl_certs: vec![],
        backend_weight: 0,
        auth: None,
    }
}

pub fn server(s: &TestServer, state: ServerState) -> Server {
    Server {
        addr: s.addr,
        node: "node1".into(),
        state,
    }
}

pub fn dead_server(addr: SocketAddr) -> Server {
    Server {
        addr,
        node: "node9".into(),
        state: ServerState::Up,
    }
}

pub fn backend(
    name: &str,
    labels: PortLabels,
    bind_port: Option<u16>,
    servers: Vec<Server>,
) -> Backend {
    Backend {
        name: name.into(),
        app: format!("/{name}").into(),
        port_index: 0,
        service_port: bind_port,
        bind_port,
        labels: labels.into(),
        servers,
    }
}

pub fn route(host: Option<&str>, path: Option<&str>, backend: &str) -> HttpRoute {
    HttpRoute {
        host: host.map(Into::into),
        path: path.map(Into::into),
        backend: backend.into(),
    }
}

pub fn routes(backends: Vec<Backend>, http_routes: Vec<HttpRoute>) -> Routes {
    Routes {
        backends: backends.into_iter().map(Arc::new).collect(),
        http_routes,
        problems: vec![],
    }
}

pub fn auth(realm: &str, user: &str, password: &str) -> BasicAuth {
    let params = sha_crypt::Sha512Params::new(5000).unwrap();
    BasicAuth {
        realm: realm.into(),
        user: user.into(),
        password_hash: sha_crypt::sha512_simple(password, &params).unwrap(),
    }
}

pub fn config(source: RouteSource) -> Config {
    let mut cfg = Config::new(source);
    cfg.bind = LOOPBACK;
    cfg.http_port = 0;
    cfg.https_port = 0;
    cfg.stats_port = 0;
    cfg.service_ports = 1..=65535;
    cfg
}

/// An edge whose routes the test applies directly (its file source points
/// at a file that never exists).
pub async fn edge() -> Edge {
    edge_with(|_| {}).await
}

pub async fn edge_with(f: impl FnOnce(&mut Config)) -> Edge {
    let mut cfg = config(RouteSource::File(
        "/nonexistent/skein-edge-test-routes.json".into(),
    ));
    f(&mut cfg);
    Edge::start(cfg).await.unwrap()
}

/// Waits until `cond` holds, polling every 10 ms, failing after `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// One request on a new connection.
pub async fn send<S>(io: S, req: Request<Empty<Bytes>>) -> anyhow::Result<Reply>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub fn get(host: &str, path: &str) -> http::request::Builder {
    Request::get(path).header("host", host)
}

pub async fn request(addr: SocketAddr, req: http::request::Builder) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    send(stream, req.body(Empty::new())?).await
}

/// `GET path` on `addr` with `Host: host`.
pub async fn fetch(addr: SocketAddr, host: &str, path: &str) -> Reply {
    request(addr, get(host, path)).await.unwrap()
}

/// `GET` on the stats port.
pub async fn stats(edge: &Edge, path: &str) -> Reply {
    fetch(edge.addrs().stats, "localhost", path).await
}

/// A self-signed certificate for `names` written as one PEM file (chain
/// and key); returns the path and the certificate's DER.
pub fn cert_file(dir: &std::path::Path, file: &str, names: &[&str]) -> (String, Vec<u8>) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!("{}{}", ck.cert.pem(), ck.signing_key.serialize_pem()),
    )
    .unwrap();
    (path.display().to_string(), ck.cert.der().to_vec())
}

/// A TLS client connection to `addr` naming `sni`, trusting `ca_der`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    ca_der: &[u8],
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())?;
    Ok(connector.connect(name, tcp).await?)
}
