//! The HTTP server's limits, over real sockets on 127.0.0.1 against
//! `skein_api::serve` / `serve_with` (a real agent behind the router, or a
//! router of the test's own where a request must be held in flight): a
//! stalled header is cut, connections beyond the cap wait, requests beyond
//! the limit are shed, a slow client is cut at the connection's lifetime.
//! Every wait is on a condition with a deadline.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use skein_agent::Agent;
use skein_api::{Limits, ServeCounters};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const CLUSTER: &str = "limits-test";
/// How long any one awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

mod support;

fn ca() -> TempDir {
    support::ca(CLUSTER)
}

/// A real single agent on loopback (no DNS, no dataplane).
async fn agent(ca: &Path) -> (Arc<Agent>, TempDir) {
    support::agent(ca, CLUSTER, "n1", Ipv4Addr::LOCALHOST, vec![]).await
}

fn agent_router(agent: &Arc<Agent>) -> Router {
    skein_api::router(
        agent.clone(),
        skein_api::ApiAuth {
            token: Some("secret".into()),
        },
    )
}

/// A server on 127.0.0.1; stopped (and awaited) by `stop`.
struct Server {
    addr: SocketAddr,
    counters: Arc<ServeCounters>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// `limits: None` runs `skein_api::serve`, the binary's entry point.
    async fn start(app: Router, limits: Option<Limits>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counters = Arc::new(ServeCounters::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = match limits {
            Some(limits) => tokio::spawn(skein_api::serve_with(
                listener,
                app,
                limits,
                counters.clone(),
                shutdown,
            )),
            None => tokio::spawn(skein_api::serve(listener, app, shutdown)),
        };
        Server {
            addr,
            counters,
            stop: Some(stop),
            task,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        timeout(DEADLINE, self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server ran");
    }
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::SeqCst)
}

async fn send(stream: &mut TcpStream, request: &str) {
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
}

fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// Reads one response (status, body) off a keep-alive connection.
async fn response(stream: &mut TcpStream) -> (u16, String) {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status");
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .expect("content-length");
                while buf.len() < end + 4 + length {
                    let n = stream.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "closed mid-body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).to_string();
                return (status, body);
            }
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before a response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    timeout(DEADLINE, read).await.expect("a response in time")
}

/// Waits for the server to close the connection; what it sent before.
async fn closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match timeout(DEADLINE, stream.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => {}
        // A reset is a close too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("read: {e}"),
        Err(_) => panic!("the server did not close the connection in time"),
    }
    rest
}

fn short(header_read_timeout: Duration) -> Limits {
    Limits {
        header_read_timeout,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_partial_header_is_cut_after_the_header_timeout() {
    let ca = ca();
    let (agent, _data) = agent(ca.path()).await;
    let server = Server::start(agent_router(&agent), Some(short(Duration::from_secs(1)))).await;

    // Half a request header, then nothing: closed, unanswered.
    let mut stalled = server.connect().await;
    send(&mut stalled, "GET /v1/version HTTP/1.1\r\nHost: test\r\n").await;
    let sent = closed(&mut stalled).await;
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    until("the timeout counted", || {
        load(&server.counters.header_timeouts) == 1
    })
    .await;

    // A whole request is answered; the idle keep-alive connection is then
    // closed by the same timeout.
    let mut client = server.connect().await;
    send(&mut client, &get_request("/v1/version")).await;
    assert_eq!(response(&mut client).await.0, 200);
    closed(&mut client).await;
    until("the idle close counted", || {
        load(&server.counters.header_timeouts) == 2
    })
    .await;
    server.stop().await;
}

/// `serve` itself (what the binary runs) has the timer and its 10 s
/// header timeout: `axum::serve` ran hyper without one, and such a client
/// held its connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_cuts_a_stalled_header_with_its_default_timeout() {
    assert_eq!(
        Limits::default().header_read_timeout,
        Duration::from_secs(10)
    );
    let ca = ca();
    let (agent, _data) = agent(ca.path()).await;
    let server = Server::start(agent_router(&agent), None).await;
    let mut stalled = server.connect().await;
    send(&mut stalled, "GET /v1/version HTTP/1.1\r\nHost: te").await;
    assert!(closed(&mut stalled).await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let ca = ca();
    let (agent, _data) = agent(ca.path()).await;
    let limits = Limits {
        max_connections: 2,
        ..short(Duration::from_secs(60))
    };
    let server = Server::start(agent_router(&agent), Some(limits)).await;

    // Two clients served, their connections kept alive: the cap is reached.
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    for c in [&mut a, &mut b] {
        send(c, &get_request("/v1/version")).await;
        assert_eq!(response(c).await.0, 200);
    }
    assert_eq!(load(&server.counters.connections_open), 2);

    // A third is accepted, counted, and not served while both are open.
    let mut c = server.connect().await;
    send(&mut c, &get_request("/v1/version")).await;
    until("the third connection counted over the cap", || {
        load(&server.counters.connections_over_cap) == 1
    })
    .await;
    let mut byte = [0u8; 1];
    match c.try_read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the third connection was answered at the cap: {other:?}"),
    }
    assert_eq!(load(&server.counters.connections_open), 2);

    // One client leaves: the third is served, and its slot counted.
    drop(a);
    assert_eq!(response(&mut c).await.0, 200);
    send(&mut c, &get_request("/metrics")).await;
    let (status, metrics) = response(&mut c).await;
    assert_eq!(status, 200);
    for line in [
        "skein_api_connections_over_cap_total 1",
        "skein_api_connections_open 2",
        "skein_api_connections_total 3",
        "skein_api_requests_shed_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    drop(b);
    drop(c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_limit_are_shed() {
    // `/hold` stays in flight until the test opens the gate.
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let app = {
        let (gate, entered) = (gate.clone(), entered.clone());
        Router::new()
            .route(
                "/hold",
                get(move || async move {
                    entered.fetch_add(1, Ordering::SeqCst);
                    let _pass = gate.acquire().await.expect("gate");
                    "held"
                }),
            )
            .route("/quick", get(|| async { "quick" }))
    };
    let limits = Limits {
        max_requests: 2,
        ..Limits::default()
    };
    let server = Server::start(app, Some(limits)).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = server.connect().await;
        send(&mut c, &get_request("/hold")).await;
        held.push(c);
    }
    until("two requests in flight", || {
        entered.load(Ordering::SeqCst) == 2
    })
    .await;

    // A third request is refused at once, not queued.
    let mut third = server.connect().await;
    send(&mut third, &get_request("/quick")).await;
    let (status, body) = response(&mut third).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many requests"), "{body}");
    assert_eq!(load(&server.counters.requests_shed), 1);

    // The held ones finish; then there is room again.
    gate.add_permits(2);
    for c in &mut held {
        assert_eq!(response(c).await, (200, "held".to_string()));
    }
    send(&mut third, &get_request("/quick")).await;
    assert_eq!(response(&mut third).await, (200, "quick".to_string()));
    assert_eq!(load(&server.counters.requests_shed), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_at_the_connection_lifetime() {
    let ca = ca();
    let (agent, _data) = agent(ca.path()).await;
    let limits = Limits {
        connection_lifetime: Duration::from_secs(1),
        close_grace: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = Server::start(agent_router(&agent), Some(limits)).await;

    // A whole header (the header timeout is satisfied), then a body that
    // never comes: only the lifetime ends it.
    let mut slow = server.connect().await;
    send(
        &mut slow,
        "PUT /v1/tasks/t1 HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{\"app\":",
    )
    .await;
    closed(&mut slow).await;
    assert_eq!(load(&server.counters.lifetime_closed), 1);
    assert_eq!(load(&server.counters.header_timeouts), 0);
    until("the slot handed back", || {
        load(&server.counters.connections_open) == 0
    })
    .await;
    server.stop().await;
}
