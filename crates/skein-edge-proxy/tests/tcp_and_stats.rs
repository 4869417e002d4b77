//! TCP mode, route changes under live connections, the route file, and
//! the stats port's endpoints.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use skein_edge::{Mode, ServerState};
use skein_edge_proxy::{EdgeDoc, RouteSource};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The `skein` binary's allocator, so that the apply times printed here
/// are the edge's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

async fn greeting(s: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut line))
        .await
        .expect("greeting in time")
        .unwrap();
    line.trim().to_string()
}

async fn echo(s: &mut BufReader<TcpStream>, msg: &str) -> String {
    s.get_mut().write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn tcp_service_port_balances_and_retries_a_dead_server() {
    let a = tcp_server("a").await;
    let b = tcp_server("b").await;
    let dead = SocketAddr::new(LOOPBACK, free_port());
    let port = free_port();
    let edge = edge().await;
    edge.apply(
        1,
        routes(
            vec![backend(
                "tcp_1",
                labels(Mode::Tcp),
                Some(port),
                vec![
                    server(&a, ServerState::Up),
                    server(&b, ServerState::Up),
                    dead_server(dead),
                ],
            )],
            vec![],
        ),
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let mut s = BufReader::new(TcpStream::connect((LOOPBACK, port)).await.unwrap());
        let name = greeting(&mut s).await;
        assert_eq!(echo(&mut s, "x").await, format!("{name}:x"));
        seen.push(name);
    }
    assert!(
        seen.contains(&"a".to_string()) && seen.contains(&"b".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_long_lived_tcp_connection_survives_route_changes_that_keep_its_server() {
    let a = tcp_server("a").await;
    let b = tcp_server("b").await;
    let c = http_server("c").await;
    let port = free_port();
    let other_port = free_port();
    let edge = edge().await;
    let tcp = |servers| backend("tcp_1", labels(Mode::Tcp), Some(port), servers);
    edge.apply(
        1,
        routes(vec![tcp(vec![server(&a, ServerState::Up)])], vec![]),
    )
    .await;
    let mut long = BufReader::new(TcpStream::connect((LOOPBACK, port)).await.unwrap());
    assert_eq!(greeting(&mut long).await, "a");
    // Many route changes: a server added, another backend and port come
    // and go, the version moves on; the connection's server stays.
    for v in 2..40u64 {
        let mut backends = vec![tcp(if v.is_multiple_of(2) {
            vec![server(&a, ServerState::Up), server(&b, ServerState::Up)]
        } else {
            vec![server(&a, ServerState::Up)]
        })];
        if v.is_multiple_of(3) {
            let mut l = labels(Mode::Http);
            l.vhosts = vec![format!("v{v}.example.com").into()];
            backends.push(backend(
                "web_2",
                l,
                Some(other_port),
                vec![server(&c, ServerState::Up)],
            ));
        }
        edge.apply(v, routes(backends, vec![])).await;
        assert_eq!(echo(&mut long, &format!("m{v}")).await, format!("a:m{v}"));
    }
    let status = edge.status();
    assert_eq!(status.version, 39);
    assert!(status.last_apply_micros > 0);
}

#[tokio::test]
async fn tunnels_to_a_removed_server_close_after_the_drain_time() {
    let a = tcp_server("a").await;
    let b = tcp_server("b").await;
    let port = free_port();
    let edge = edge_with(|c| c.drain_timeout = Duration::from_millis(300)).await;
    let tcp = |servers| {
        routes(
            vec![backend("tcp_1", labels(Mode::Tcp), Some(port), servers)],
            vec![],
        )
    };
    edge.apply(1, tcp(vec![server(&a, ServerState::Up)])).await;
    let mut conn = BufReader::new(TcpStream::connect((LOOPBACK, port)).await.unwrap());
    assert_eq!(greeting(&mut conn).await, "a");
    edge.apply(2, tcp(vec![server(&b, ServerState::Up)])).await;
    // Still open during the drain...
    assert_eq!(echo(&mut conn, "x").await, "a:x");
    let csv = stats(&edge, "/haproxy?stats;csv").await.body;
    assert!(csv.lines().any(|l| l.contains(",DRAIN,")), "{csv}");
    // ...closed after it.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("closed by the drain")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // New connections go to b.
    let mut s = BufReader::new(TcpStream::connect((LOOPBACK, port)).await.unwrap());
    assert_eq!(greeting(&mut s).await, "b");
    wait_until(
        Duration::from_secs(5),
        "the drained server forgotten",
        || async {
            !stats(&edge, "/haproxy?stats;csv")
                .await
                .body
                .contains(",DRAIN,")
        },
    )
    .await;
}

#[tokio::test]
async fn bind_ports_are_added_and_removed_incrementally() {
    let a = tcp_server("a").await;
    let p1 = free_port();
    let p2 = free_port();
    let edge = edge().await;
    let b1 = || {
        backend(
            "one_1",
            labels(Mode::Tcp),
            Some(p1),
            vec![server(&a, ServerState::Up)],
        )
    };
    let b2 = || {
        backend(
            "two_2",
            labels(Mode::Tcp),
            Some(p2),
            vec![server(&a, ServerState::Up)],
        )
    };
    edge.apply(1, routes(vec![b1()], vec![])).await;
    let mut on1 = BufReader::new(TcpStream::connect((LOOPBACK, p1)).await.unwrap());
    assert_eq!(greeting(&mut on1).await, "a");
    assert!(TcpStream::connect((LOOPBACK, p2)).await.is_err());
    edge.apply(2, routes(vec![b1(), b2()], vec![])).await;
    let mut on2 = BufReader::new(TcpStream::connect((LOOPBACK, p2)).await.unwrap());
    assert_eq!(greeting(&mut on2).await, "a");
    edge.apply(3, routes(vec![b2()], vec![])).await;
    assert!(
        TcpStream::connect((LOOPBACK, p1)).await.is_err(),
        "p1 no longer bound"
    );
    // Connections accepted before stay (their server stays).
    assert_eq!(echo(&mut on1, "still").await, "a:still");
    assert_eq!(echo(&mut on2, "here").await, "a:here");
}

#[tokio::test]
async fn service_ports_outside_the_range_are_reported_not_bound() {
    let a = tcp_server("a").await;
    let port = free_port();
    let explicit = free_port();
    let edge = edge_with(|c| c.service_ports = 10000..=10100).await;
    let mut exp = backend(
        "exp_1",
        labels(Mode::Tcp),
        Some(explicit),
        vec![server(&a, ServerState::Up)],
    );
    exp.service_port = Some(10005); // HAPROXY_0_PORT given explicitly
    edge.apply(
        1,
        routes(
            vec![
                backend(
                    "out_1",
                    labels(Mode::Tcp),
                    Some(port),
                    vec![server(&a, ServerState::Up)],
                ),
                exp,
            ],
            vec![],
        ),
    )
    .await;
    assert!(TcpStream::connect((LOOPBACK, port)).await.is_err());
    let mut s = BufReader::new(TcpStream::connect((LOOPBACK, explicit)).await.unwrap());
    assert_eq!(greeting(&mut s).await, "a");
    let status = edge.status();
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains("out_1") && p.contains("outside --service-ports")),
        "{:?}",
        status.problems
    );
}

#[tokio::test]
async fn the_csv_header_is_haproxy_2_6s() {
    let edge = edge().await;
    edge.apply(1, routes(vec![], vec![])).await;
    let csv = stats(&edge, "/haproxy?stats;csv").await.body;
    let header = csv.lines().next().unwrap();
    let haproxy = include_str!("data/haproxy-2.6.12-stats-csv-header.txt");
    assert_eq!(header, haproxy.trim_end_matches('\n'));
    let columns = header.split(',').count();
    for line in csv.lines() {
        assert_eq!(line.split(',').count(), columns, "{line}");
    }
}

#[tokio::test]
async fn stats_rows_and_counters() {
    let a = http_server("a").await;
    let edge = edge().await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["a.example.com".into()];
    edge.apply(
        1,
        routes(
            vec![backend(
                "a_10001",
                l,
                None,
                vec![server(&a, ServerState::Up)],
            )],
            vec![route(Some("a.example.com"), None, "a_10001")],
        ),
    )
    .await;
    for _ in 0..3 {
        fetch(edge.addrs().http, "a.example.com", "/").await;
    }
    fetch(edge.addrs().http, "none.example.com", "/").await;
    let csv = stats(&edge, "/haproxy?stats;csv").await.body;
    let cols: Vec<&str> = csv
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let field = |row: &str, name: &str| -> String {
        let i = cols.iter().position(|c| *c == name).unwrap();
        row.split(',').nth(i).unwrap().to_string()
    };
    let row = |px: &str, sv: &str| -> String {
        csv.lines()
            .find(|l| l.starts_with(&format!("{px},{sv},")))
            .unwrap_or_else(|| panic!("no row {px},{sv} in {csv}"))
            .to_string()
    };
    let fe = row("marathon_http_in", "FRONTEND");
    assert_eq!(field(&fe, "req_tot"), "4");
    assert_eq!(field(&fe, "hrsp_2xx"), "3");
    assert_eq!(field(&fe, "hrsp_5xx"), "1");
    assert_eq!(field(&fe, "status"), "OPEN");
    let be = row("a_10001", "BACKEND");
    assert_eq!(field(&be, "hrsp_2xx"), "3");
    assert_eq!(field(&be, "status"), "UP");
    assert_eq!(field(&be, "algo"), "roundrobin");
    let sv = row("a_10001", &format!("node1_127.0.0.1_{}", a.addr.port()));
    assert_eq!(field(&sv, "status"), "UP");
    assert_eq!(field(&sv, "stot"), "3");
    assert_eq!(field(&sv, "type"), "2");
    assert_eq!(field(&sv, "check_status"), "L7OK");
    assert_eq!(field(&sv, "qlimit"), "", "unfilled columns stay empty");

    let html = stats(&edge, "/haproxy?stats").await;
    assert_eq!(html.status.as_u16(), 200);
    assert!(html.body.contains("<table") && html.body.contains("a_10001"));
    assert_eq!(
        stats(&edge, "/_haproxy_health_check").await.status.as_u16(),
        200
    );
    assert_eq!(
        stats(&edge, "/_haproxy_getvhostmap").await.body,
        "a.example.com a_10001\n"
    );
    assert_eq!(
        stats(&edge, "/_haproxy_getappmap").await.body,
        "/a_10001 a_10001\n"
    );
    assert_eq!(
        stats(&edge, "/_haproxy_getpids").await.body.trim(),
        std::process::id().to_string()
    );
    let config = stats(&edge, "/_haproxy_getconfig").await.body;
    assert!(config.contains("frontend marathon_http_in"), "{config}");
    assert!(config.contains("backend a_10001"), "{config}");
    assert!(
        config.contains(&format!(
            "server node1_127.0.0.1_{0} 127.0.0.1:{0} check",
            a.addr.port()
        )),
        "{config}"
    );
    let metrics = stats(&edge, "/metrics").await.body;
    for m in [
        "skein_edge_route_version 1",
        "skein_edge_route_apply_seconds_count 1",
        "skein_edge_frontend_requests_total{frontend=\"marathon_http_in\"} 4",
        "skein_edge_backend_responses_total{backend=\"a_10001\",code=\"2xx\"} 3",
    ] {
        assert!(metrics.contains(m), "{m} missing from\n{metrics}");
    }
    let status: skein_edge_proxy::StatusDoc =
        serde_json::from_str(&stats(&edge, "/_skein/status").await.body).unwrap();
    assert_eq!(status.backends[0].servers[0].status, "UP");
    let text = skein_edge_proxy::print_status(&status);
    assert!(text.contains("a_10001") && text.contains("UP"), "{text}");
}

#[tokio::test]
async fn the_routes_file_is_followed_and_a_bad_one_is_rejected_keeping_the_old_routes() {
    let a = http_server("a").await;
    let b = http_server("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.json");
    let doc = |version, s: &TestServer| {
        let mut l = labels(Mode::Http);
        l.vhosts = vec!["app.example.com".into()];
        serde_json::to_vec(&EdgeDoc {
            version,
            routes: routes(
                vec![backend("app_1", l, None, vec![server(s, ServerState::Up)])],
                vec![route(Some("app.example.com"), None, "app_1")],
            ),
        })
        .unwrap()
    };
    std::fs::write(&path, doc(5, &a)).unwrap();
    let edge = skein_edge_proxy::Edge::start(config(RouteSource::File(path.clone())))
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "version 5", || async {
        edge.version() == 5
    })
    .await;
    let http = edge.addrs().http;
    assert_eq!(fetch(http, "app.example.com", "/").await.body, "a");
    // A broken file: rejected, the old routes stay.
    std::fs::write(&path, b"{\"version\": 6, \"routes\": {\"backends\": [oops").unwrap();
    wait_until(Duration::from_secs(5), "the rejection", || async {
        edge.rejected() == 1
    })
    .await;
    assert_eq!(edge.version(), 5);
    assert_eq!(fetch(http, "app.example.com", "/").await.body, "a");
    let status = edge.status();
    assert!(status.last_rejection.is_some());
    // A good one applies.
    std::fs::write(&path, doc(7, &b)).unwrap();
    wait_until(Duration::from_secs(5), "version 7", || async {
        edge.version() == 7
    })
    .await;
    assert_eq!(fetch(http, "app.example.com", "/").await.body, "b");
    assert!(edge.status().last_rejection.is_none());
    // A HUP re-reads the file (same content: re-applied).
    let applied = edge.applied();
    assert_eq!(stats(&edge, "/_mlb_signal/hup").await.status.as_u16(), 200);
    wait_until(Duration::from_secs(5), "the re-read", || async {
        edge.applied() > applied
    })
    .await;
}

#[tokio::test]
async fn an_absent_agent_is_retried_and_its_routes_applied_when_it_answers() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    // A fake agent: 404 for the first two polls, then version 3.
    let a = http_server("a").await;
    let mut l = labels(Mode::Http);
    l.vhosts = vec!["app.example.com".into()];
    let doc = serde_json::to_string(&EdgeDoc {
        version: 3,
        routes: routes(
            vec![backend("app_1", l, None, vec![server(&a, ServerState::Up)])],
            vec![route(Some("app.example.com"), None, "app_1")],
        ),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let agent = listener.local_addr().unwrap();
    let polls = Arc::new(AtomicU64::new(0));
    let seen_paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let (polls, seen_paths) = (polls.clone(), seen_paths.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (polls, seen_paths, doc) = (polls.clone(), seen_paths.clone(), doc.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let n = polls.fetch_add(1, Ordering::SeqCst);
                            seen_paths.lock().unwrap().push(req.uri().to_string());
                            let wait = req.uri().query().unwrap_or("").contains("wait_version=3");
                            let doc = doc.clone();
                            async move {
                                if wait {
                                    // Nothing new: hold the poll a little.
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                                let resp = if n < 2 {
                                    http::Response::builder()
                                        .status(404)
                                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                                } else {
                                    http::Response::builder()
                                        .body(http_body_util::Full::new(bytes::Bytes::from(doc)))
                                };
                                Ok::<_, std::convert::Infallible>(resp.unwrap())
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    let mut cfg = config(RouteSource::Agent {
        url: format!("http://{agent}"),
        token: Some("t0ken".into()),
    });
    cfg.groups = vec!["external".into(), "internal".into()];
    let edge = skein_edge_proxy::Edge::start(cfg).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "version 3 from the agent",
        || async { edge.version() == 3 },
    )
    .await;
    assert_eq!(
        fetch(edge.addrs().http, "app.example.com", "/").await.body,
        "a"
    );
    wait_until(Duration::from_secs(5), "a long poll", || async {
        seen_paths
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.contains("wait_version=3"))
    })
    .await;
    let paths = seen_paths.lock().unwrap().clone();
    assert!(
        paths[0].starts_with("/v1/edge?groups=external,internal"),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.contains("&wait_version=3&timeout_s=25")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn the_agents_deltas_are_applied_and_one_that_does_not_fit_fetches_the_whole() {
    use std::sync::Arc;
    // A fake agent: whole documents (version 1, later 3), a delta from 1
    // to 2 (app_1 moves from server a to b), then a delta from a version
    // this edge never had, then nothing new.
    let (a, b, c) = (
        http_server("a").await,
        http_server("b").await,
        http_server("c").await,
    );
    let set = |servers: Vec<skein_edge::Server>, extra: bool| {
        let mut l = labels(Mode::Http);
        l.vhosts = vec!["app.example.com".into()];
        let mut backends = vec![backend("app_1", l, None, servers)];
        let mut http_routes = vec![route(Some("app.example.com"), None, "app_1")];
        if extra {
            let mut l = labels(Mode::Http);
            l.vhosts = vec!["two.example.com".into()];
            backends.push(backend("app_2", l, None, vec![server(&c, ServerState::Up)]));
            http_routes.push(route(Some("two.example.com"), None, "app_2"));
        }
        routes(backends, http_routes)
    };
    let v1 = set(vec![server(&a, ServerState::Up)], false);
    let v2 = set(vec![server(&b, ServerState::Up)], false);
    let v3 = set(vec![server(&b, ServerState::Up)], true);
    let whole = |version: u64, routes: &skein_edge::Routes| {
        serde_json::to_string(&EdgeDoc {
            version,
            routes: routes.clone(),
        })
        .unwrap()
    };
    let answers = Arc::new((
        whole(1, &v1),
        whole(3, &v3),
        serde_json::to_string(&skein_edge::EdgeDelta::between(&v1, 1, &v2, 2)).unwrap(),
        serde_json::to_string(&skein_edge::EdgeDelta::between(&v1, 99, &v3, 4)).unwrap(),
        serde_json::to_string(&skein_edge::EdgeDelta::between(&v3, 3, &v3, 3)).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let agent = listener.local_addr().unwrap();
    let seen_paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let seen_paths = seen_paths.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen_paths, answers) = (seen_paths.clone(), answers.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let q = req.uri().query().unwrap_or("").to_string();
                            let wholes = {
                                let mut paths = seen_paths.lock().unwrap();
                                paths.push(req.uri().to_string());
                                paths.iter().filter(|p| !p.contains("wait_version")).count()
                            };
                            let answers = answers.clone();
                            async move {
                                let body = if !q.contains("wait_version") {
                                    if wholes == 1 {
                                        answers.0.clone()
                                    } else {
                                        answers.1.clone()
                                    }
                                } else if q.contains("base=1") {
                                    answers.2.clone()
                                } else if q.contains("base=2") {
                                    answers.3.clone()
                                } else {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                    answers.4.clone()
                                };
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(body)),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    let edge = skein_edge_proxy::Edge::start(config(RouteSource::Agent {
        url: format!("http://{agent}"),
        token: None,
    }))
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "version 3 after the misfit",
        || async { edge.version() == 3 },
    )
    .await;
    let paths = seen_paths.lock().unwrap().clone();
    assert!(
        paths
            .iter()
            .any(|p| p.contains("wait_version=1") && p.contains("&base=1")),
        "the edge says what it has: {paths:?}"
    );
    assert!(
        paths.iter().any(|p| p.contains("base=2")),
        "version 2 came as a delta and was applied: {paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| !p.contains("wait_version")).count(),
        2,
        "the delta that did not fit fetched the whole document once: {paths:?}"
    );
    assert_eq!(
        fetch(edge.addrs().http, "app.example.com", "/").await.body,
        "b"
    );
    assert_eq!(
        fetch(edge.addrs().http, "two.example.com", "/").await.body,
        "c"
    );
}

#[tokio::test]
async fn applying_changes_to_ten_thousand_backends() {
    let a = tcp_server("a").await;
    for size in [100u16, 1000, 10000] {
        let edge = edge().await;
        let set = |v: u64| {
            let backends = (0..size)
                .map(|i| {
                    let mut l = labels(Mode::Http);
                    l.vhosts = vec![format!("app{i}.example.com").into()];
                    let mut servers: Vec<_> = (0..3u16)
                        .map(|k| dead_server(SocketAddr::new(LOOPBACK, 20000 + i * 3 + k)))
                        .collect();
                    if i == size / 2 && v.is_multiple_of(2) {
                        servers.push(server(&a, ServerState::Up));
                    }
                    backend(&format!("app{i}_1"), l, None, servers)
                })
                .collect::<Vec<_>>();
            let http_routes = (0..size)
                .map(|i| {
                    route(
                        Some(&format!("app{i}.example.com")),
                        None,
                        &format!("app{i}_1"),
                    )
                })
                .collect();
            routes(backends, http_routes)
        };
        // Whole documents: every backend read anew, compared with the
        // table's.
        edge.apply(1, set(1)).await;
        let mut took = Vec::new();
        for v in 2..22 {
            took.push(edge.apply(v, set(v)).await);
        }
        // Deltas: the edge applies each to the routes it has, so unchanged
        // backends are the same `Arc`s (what `EdgeDelta::apply` gives).
        let (even, odd) = (set(22), set(23));
        let changed = even
            .backends
            .iter()
            .position(|b| !odd.backends.iter().any(|o| o == b))
            .expect("one backend differs");
        let mut current = even.clone();
        edge.apply(22, current.clone()).await;
        let mut took_delta = Vec::new();
        for v in 23..43u64 {
            let from = if v % 2 == 0 { &even } else { &odd };
            let mut next = current.clone();
            next.backends[changed] = from.backends[changed].clone();
            let delta = skein_edge::EdgeDelta::between(&current, v - 1, &next, v);
            assert_eq!(delta.upsert.len(), 1, "one backend changed");
            let (routes, took) = edge.apply_delta(&current, delta).await.expect("fits");
            current = routes;
            took_delta.push(took);
        }
        let median = |mut t: Vec<Duration>| {
            t.sort();
            (t[t.len() / 2], t[t.len() - 1])
        };
        let ((whole, whole_max), (delta, delta_max)) = (median(took), median(took_delta));
        eprintln!(
            "apply of one server change at {size} backends, {} servers, {size} routes: whole documents median {whole:?} (max {whole_max:?}), deltas median {delta:?} (max {delta_max:?})",
            size * 3,
        );
        // A figure, not a check (timings are for benchmarks): run it in a
        // release build to measure, `cargo test --release -p
        // skein-edge-proxy --test tcp_and_stats applying -- --nocapture`.
        // What is checked is that every change was applied.
        assert_eq!(edge.status().version, 42);
    }
}
