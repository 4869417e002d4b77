//! HTTP mode end to end: a real edge on loopback in front of real servers.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use skein_edge::{Balance, Mode, ServerState};

#[tokio::test]
async fn vhost_routes_on_the_http_port_and_unknown_hosts_get_503() {
    let a = http_server("a").await;
    let b = http_server("b").await;
    let edge = edge().await;
    let mut la = labels(Mode::Http);
    la.vhosts = vec!["a.example.com".into()];
    let mut lb = labels(Mode::Http);
    lb.vhosts = vec!["*.b.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![
                backend("a_10001", la, None, vec![server(&a, ServerState::Up)]),
                backend("b_10002", lb, None, vec![server(&b, ServerState::Up)]),
            ],
            vec![
                route(Some("a.example.com"), None, "a_10001"),
                route(Some("*.b.example.com"), None, "b_10002"),
            ],
        ),
    )
    .await;
    let http = edge.addrs().http;
    let r = fetch(http, "A.Example.com:80", "/x").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"));
    let r = fetch(http, "www.b.example.com", "/").await;
    assert_eq!(r.body, "b");
    let r = fetch(http, "b.example.com", "/").await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "a wildcard does not match its own domain"
    );
    let r = fetch(http, "nobody.example.com", "/").await;
    assert_eq!(r.status.as_u16(), 503);
    assert!(r.body.contains("503 Service Unavailable"));
}

#[tokio::test]
async fn service_port_of_an_http_backend_routes_straight_to_it() {
    let a = http_server("a").await;
    let port = free_port();
    let edge = edge().await;
    edge.apply(
        1,
        routes(
            vec![backend(
                "svc_port",
                labels(Mode::Http),
                Some(port),
                vec![server(&a, ServerState::Up)],
            )],
            vec![],
        ),
    )
    .await;
    let r = fetch(
        std::net::SocketAddr::new(LOOPBACK, port),
        "whatever",
        "/p?q=1",
    )
    .await;
    assert_eq!(r.body, "a");
    assert_eq!(r.header("x-seen-path"), "/p?q=1");
}

#[tokio::test]
async fn path_prefix_and_proxypass_strip() {
    let api = http_server("api").await;
    let web = http_server("web").await;
    let edge = edge().await;
    let mut lapi = labels(Mode::Http);
    lapi.vhosts = vec!["app.example.com".into()];
    lapi.path = Some("/api".into());
    lapi.proxypass_path = Some("/api".into());
    let mut lweb = labels(Mode::Http);
    lweb.vhosts = vec!["app.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![
                backend("api_1", lapi, None, vec![server(&api, ServerState::Up)]),
                backend("web_2", lweb, None, vec![server(&web, ServerState::Up)]),
            ],
            vec![
                route(Some("app.example.com"), Some("/api"), "api_1"),
                route(Some("app.example.com"), None, "web_2"),
            ],
        ),
    )
    .await;
    let http = edge.addrs().http;
    let r = fetch(http, "app.example.com", "/api/users?id=3").await;
    assert_eq!(r.body, "api");
    assert_eq!(r.header("x-seen-path"), "/users?id=3");
    let r = fetch(http, "app.example.com", "/api").await;
    assert_eq!(r.header("x-seen-path"), "/");
    let r = fetch(http, "app.example.com", "/index.html").await;
    assert_eq!(r.body, "web");
    assert_eq!(r.header("x-seen-path"), "/index.html");
}

#[tokio::test]
async fn forwarded_headers_are_appended() {
    let a = http_server("a").await;
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["a.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![backend("a_1", l, None, vec![server(&a, ServerState::Up)])],
            vec![route(Some("a.example.com"), None, "a_1")],
        ),
    )
    .await;
    let http = edge.addrs().http;
    let r = request(
        http,
        get("a.example.com", "/").header("x-forwarded-for", "10.1.2.3"),
    )
    .await
    .unwrap();
    assert_eq!(r.header("x-seen-xff"), "10.1.2.3, 127.0.0.1");
    assert_eq!(r.header("x-seen-proto"), "http");
    assert_eq!(r.header("x-seen-port"), http.port().to_string());
    assert_eq!(r.header("x-seen-host"), "a.example.com");
    assert_eq!(r.header("x-seen-fwd-host"), "a.example.com");
    let r = fetch(http, "a.example.com", "/").await;
    assert_eq!(r.header("x-seen-xff"), "127.0.0.1");
}

#[tokio::test]
async fn redirect_to_https_on_the_http_port_only() {
    let a = http_server("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = cert_file(dir.path(), "a.pem", &["secure.example.com"]);
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["secure.example.com".into()];
    l.redirect_to_https = true;
    l.ssl_certs = vec![pem];
    edge.apply(
        1,
        routes(
            vec![backend("s_1", l, None, vec![server(&a, ServerState::Up)])],
            vec![route(Some("secure.example.com"), None, "s_1")],
        ),
    )
    .await;
    let addrs = edge.addrs();
    let r = fetch(addrs.http, "secure.example.com", "/login?next=/").await;
    assert_eq!(r.status.as_u16(), 301);
    assert_eq!(
        r.header("location"),
        format!(
            "https://secure.example.com:{}/login?next=/",
            addrs.https.port()
        )
    );
    assert_eq!(a.hits(), 0);
    // On HTTPS the same route serves.
    let tls = tls_connect(addrs.https, "secure.example.com", &der)
        .await
        .unwrap();
    let r = send(
        tls,
        get("secure.example.com", "/")
            .body(Default::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.body, "a");
    assert_eq!(r.header("x-seen-proto"), "https");
}

#[tokio::test]
async fn https_picks_the_certificate_by_sni_and_refuses_unknown_names() {
    let a = http_server("a").await;
    let b = http_server("b").await;
    let dir = tempfile::tempdir().unwrap();
    let (pem_a, der_a) = cert_file(dir.path(), "a.pem", &["a.example.com"]);
    let (pem_b, der_b) = cert_file(dir.path(), "b.pem", &["b.example.com"]);
    let edge = edge().await;
    let mut la = labels(Mode::Http);
    la.vhosts = vec!["a.example.com".into()];
    la.ssl_certs = vec![pem_a];
    let mut lb = labels(Mode::Http);
    lb.vhosts = vec!["b.example.com".into()];
    lb.ssl_certs = vec![pem_b];
    edge.apply(
        1,
        routes(
            vec![
                backend("a_1", la, None, vec![server(&a, ServerState::Up)]),
                backend("b_2", lb, None, vec![server(&b, ServerState::Up)]),
            ],
            vec![
                route(Some("a.example.com"), None, "a_1"),
                route(Some("b.example.com"), None, "b_2"),
            ],
        ),
    )
    .await;
    let https = edge.addrs().https;
    for (host, der, want) in [
        ("a.example.com", &der_a, "a"),
        ("b.example.com", &der_b, "b"),
    ] {
        // The client trusts only the one certificate: the handshake
        // succeeds only if the edge chose it by SNI.
        let tls = tls_connect(https, host, der).await.unwrap();
        let r = send(tls, get(host, "/").body(Default::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.body, want);
    }
    let err = tls_connect(https, "c.example.com", &der_a).await;
    assert!(
        err.is_err(),
        "no certificate for c.example.com: handshake refused"
    );
}

#[tokio::test]
async fn a_default_certificate_serves_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = cert_file(dir.path(), "default.pem", &["default.example.com"]);
    let edge = edge_with(|c| c.default_cert = Some(pem.into())).await;
    edge.apply(1, routes(vec![], vec![])).await;
    let tls = tls_connect(edge.addrs().https, "default.example.com", &der)
        .await
        .unwrap();
    let r = send(
        tls,
        get("default.example.com", "/")
            .body(Default::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status.as_u16(), 503);
}

#[tokio::test]
async fn basic_auth_with_a_sha512_crypt_hash() {
    let a = http_server("a").await;
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["a.example.com".into()];
    l.auth = Some(Box::new(auth("Private", "alice", "s3cret")));
    edge.apply(
        1,
        routes(
            vec![backend("a_1", l, None, vec![server(&a, ServerState::Up)])],
            vec![route(Some("a.example.com"), None, "a_1")],
        ),
    )
    .await;
    let http = edge.addrs().http;
    let r = fetch(http, "a.example.com", "/").await;
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(r.header("www-authenticate"), "Basic realm=\"Private\"");
    let basic = |u: &str, p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    for (user, pass, want) in [
        ("alice", "wrong", 401),
        ("bob", "s3cret", 401),
        ("alice", "s3cret", 200),
        ("alice", "s3cret", 200), // from the cache
    ] {
        let r = request(
            http,
            get("a.example.com", "/").header("authorization", basic(user, pass)),
        )
        .await
        .unwrap();
        assert_eq!(r.status.as_u16(), want, "{user}:{pass}");
    }
    assert_eq!(a.hits(), 2);
}

async fn spread(
    balance: Balance,
    sticky: bool,
) -> (Vec<common::TestServer>, skein_edge_proxy::Edge) {
    let servers = vec![
        http_server("s1").await,
        http_server("s2").await,
        http_server("s3").await,
    ];
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["lb.example.com".into()];
    l.balance = balance;
    l.sticky = sticky;
    edge.apply(
        1,
        routes(
            vec![backend(
                "lb_1",
                l,
                None,
                servers.iter().map(|s| server(s, ServerState::Up)).collect(),
            )],
            vec![route(Some("lb.example.com"), None, "lb_1")],
        ),
    )
    .await;
    (servers, edge)
}

#[tokio::test]
async fn roundrobin_takes_turns() {
    let (servers, edge) = spread(Balance::Roundrobin, false).await;
    for _ in 0..9 {
        fetch(edge.addrs().http, "lb.example.com", "/").await;
    }
    for s in &servers {
        assert_eq!(s.hits(), 3, "{}", s.name);
    }
}

#[tokio::test]
async fn source_sends_one_client_to_one_server() {
    let (servers, edge) = spread(Balance::Source, false).await;
    for _ in 0..6 {
        fetch(edge.addrs().http, "lb.example.com", "/").await;
    }
    let hits: Vec<u64> = servers.iter().map(|s| s.hits()).collect();
    assert_eq!(hits.iter().sum::<u64>(), 6);
    assert!(hits.contains(&6), "one server took all: {hits:?}");
}

#[tokio::test]
async fn leastconn_avoids_the_busy_server() {
    let (servers, edge) = spread(Balance::Leastconn, false).await;
    let http = edge.addrs().http;
    // Two slow requests occupy two servers...
    let slow1 = tokio::spawn(async move { fetch(http, "lb.example.com", "/?sleep_ms=1500").await });
    wait_until(
        Duration::from_secs(5),
        "first slow request in flight",
        || async { servers.iter().map(|s| s.hits()).sum::<u64>() == 1 },
    )
    .await;
    let slow2 = tokio::spawn(async move { fetch(http, "lb.example.com", "/?sleep_ms=1500").await });
    wait_until(
        Duration::from_secs(5),
        "second slow request in flight",
        || async { servers.iter().map(|s| s.hits()).sum::<u64>() == 2 },
    )
    .await;
    let busy: Vec<String> = servers
        .iter()
        .filter(|s| s.hits() == 1)
        .map(|s| s.name.clone())
        .collect();
    // ...so every quick one goes to the third.
    for _ in 0..4 {
        let r = fetch(http, "lb.example.com", "/").await;
        assert!(!busy.contains(&r.body), "{} is busy", r.body);
    }
    slow1.await.unwrap();
    slow2.await.unwrap();
}

#[tokio::test]
async fn sticky_cookie_is_inserted_and_honoured() {
    let (servers, edge) = spread(Balance::Roundrobin, true).await;
    let http = edge.addrs().http;
    let first = fetch(http, "lb.example.com", "/").await;
    let cookie = first.header("set-cookie").to_string();
    assert!(cookie.starts_with("mesosphere_server_id="), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    for _ in 0..6 {
        let r = request(
            http,
            get("lb.example.com", "/").header("cookie", pair.as_str()),
        )
        .await
        .unwrap();
        assert_eq!(r.body, first.body);
        assert_eq!(r.header("set-cookie"), "", "no new cookie while it holds");
    }
    assert_eq!(servers.iter().map(|s| s.hits()).max(), Some(7));
    // A cookie naming nothing gets a server and a cookie.
    let r = request(
        http,
        get("lb.example.com", "/").header("cookie", "mesosphere_server_id=nope"),
    )
    .await
    .unwrap();
    assert!(r.header("set-cookie").starts_with("mesosphere_server_id="));
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = http_server("ws").await;
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["ws.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![backend("ws_1", l, None, vec![server(&a, ServerState::Up)])],
            vec![route(Some("ws.example.com"), None, "ws_1")],
        ),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(edge.addrs().http)
        .await
        .unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the 101");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in ["hello", "again"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], format!("ws:{msg}").as_bytes());
    }
}

#[tokio::test]
async fn unhealthy_and_removed_servers_get_no_new_requests_and_in_flight_ones_finish() {
    let s1 = http_server("s1").await;
    let s2 = http_server("s2").await;
    let s3 = http_server("s3").await;
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["app.example.com".into()];
    let all = |states: [Option<ServerState>; 3]| {
        let mut out = Vec::new();
        for (s, st) in [&s1, &s2, &s3].into_iter().zip(states) {
            if let Some(st) = st {
                out.push(server(s, st));
            }
        }
        routes(
            vec![backend("app_1", l.clone(), None, out)],
            vec![route(Some("app.example.com"), None, "app_1")],
        )
    };
    use ServerState::*;
    edge.apply(1, all([Some(Up), Some(Up), Some(Up)])).await;
    let http = edge.addrs().http;
    // A slow request in flight on s3 (round robin: the third request).
    fetch(http, "app.example.com", "/").await;
    fetch(http, "app.example.com", "/").await;
    let slow = tokio::spawn(async move { fetch(http, "app.example.com", "/?sleep_ms=800").await });
    wait_until(
        Duration::from_secs(5),
        "the slow request reached s3",
        || async { s3.hits() == 1 },
    )
    .await;
    // s2 unhealthy, s3 removed while its request is in flight.
    edge.apply(2, all([Some(Up), Some(Unhealthy), None])).await;
    let (h2, h3) = (s2.hits(), s3.hits());
    for _ in 0..10 {
        let r = fetch(http, "app.example.com", "/").await;
        assert_eq!(r.body, "s1");
    }
    assert_eq!((s2.hits(), s3.hits()), (h2, h3));
    let r = slow.await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (200, "s3"),
        "the in-flight request completed"
    );
    // The stats show s3 draining while it had the request, then gone.
    let csv = stats(&edge, "/haproxy?stats;csv").await.body;
    assert!(
        csv.lines()
            .any(|l| l.starts_with("app_1,node1_127.0.0.1_") && l.contains(",DOWN,")),
        "{csv}"
    );
}

#[tokio::test]
async fn connect_failures_retry_another_server_and_eject_it() {
    let good = http_server("good").await;
    let dead = std::net::SocketAddr::new(LOOPBACK, free_port());
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["app.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![backend(
                "app_1",
                l,
                None,
                vec![dead_server(dead), server(&good, ServerState::Up)],
            )],
            vec![route(Some("app.example.com"), None, "app_1")],
        ),
    )
    .await;
    let http = edge.addrs().http;
    for _ in 0..20 {
        let r = fetch(http, "app.example.com", "/").await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "good"));
    }
    let metrics = stats(&edge, "/metrics").await.body;
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("{}", dead.port())))
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        line("skein_edge_server_connect_errors_total"),
        "3",
        "{metrics}"
    );
    assert_eq!(line("skein_edge_server_ejections_total"), "1", "{metrics}");
    let csv = stats(&edge, "/haproxy?stats;csv").await.body;
    let row = csv
        .lines()
        .find(|l| l.contains(&format!("_{}", dead.port())))
        .unwrap();
    assert!(row.contains(",DOWN,"), "{row}");
}

#[tokio::test]
async fn a_backend_with_no_up_server_answers_503() {
    let a = http_server("a").await;
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["a.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![backend(
                "a_1",
                l,
                None,
                vec![server(&a, ServerState::NodeDown)],
            )],
            vec![route(Some("a.example.com"), None, "a_1")],
        ),
    )
    .await;
    let r = fetch(edge.addrs().http, "a.example.com", "/").await;
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn a_slow_server_gets_504_after_the_server_timeout() {
    let a = http_server("a").await;
    let edge = edge_with(|c| c.timeouts.server = Duration::from_millis(200)).await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["a.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![backend("a_1", l, None, vec![server(&a, ServerState::Up)])],
            vec![route(Some("a.example.com"), None, "a_1")],
        ),
    )
    .await;
    let r = fetch(edge.addrs().http, "a.example.com", "/?sleep_ms=2000").await;
    assert_eq!(r.status.as_u16(), 504);
    assert_eq!(a.hits(), 1, "a request the server saw is never retried");
}

#[tokio::test]
async fn websockets_and_keep_alive_connections_survive_route_changes_that_keep_their_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = http_server("a").await;
    let b = http_server("b").await;
    let edge = edge().await;
    let apply = |v: u64, with_b: bool| {
        let mut l = labels(Mode::Http);
        l.vhosts = vec!["ws.example.com".into()];
        let mut servers = vec![server(&a, ServerState::Up)];
        let mut backends = vec![];
        if with_b {
            let mut lb = labels(Mode::Http);
            lb.vhosts = vec![format!("b{v}.example.com").into()];
            backends.push(backend("b_2", lb, None, vec![server(&b, ServerState::Up)]));
            servers.push(server(&b, ServerState::Unhealthy));
        }
        backends.push(backend("ws_1", l, None, servers));
        let mut rs = vec![route(Some("ws.example.com"), None, "ws_1")];
        if with_b {
            rs.push(route(Some(&format!("b{v}.example.com")), None, "b_2"));
        }
        edge.apply(v, routes(backends, rs))
    };
    apply(1, false).await;
    let http = edge.addrs().http;
    // A WebSocket...
    let mut ws = tokio::net::TcpStream::connect(http).await.unwrap();
    ws.write_all(b"GET / HTTP/1.1\r\nHost: ws.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = ws.read(&mut buf).await.unwrap();
        assert!(n > 0);
        head.extend_from_slice(&buf[..n]);
    }
    // ...and a keep-alive HTTP connection.
    let (mut keep, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(
        tokio::net::TcpStream::connect(http).await.unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    for v in 2..30u64 {
        apply(v, v.is_multiple_of(2)).await;
        ws.write_all(format!("m{v}").as_bytes()).await.unwrap();
        let n = ws.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], format!("a:m{v}").as_bytes());
        keep.ready().await.unwrap();
        let resp = keep
            .send_request(
                get("ws.example.com", "/")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"a");
    }
}
