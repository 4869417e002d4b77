//! DNS over TCP has limits: a cap on open connections (more are closed at
//! once, and a fresh client is served again when they go), a lifetime per
//! connection however busy, and a cap on queries per connection.

mod common;

use std::time::{Duration, Instant};

use common::{first_a, load, query, tcp_ask};
use hickory_proto::rr::RecordType;
use skein_dns::server::DnsOptions;
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(2);

fn ready(id: u16) -> Vec<u8> {
    query(id, "ready.spartan.", RecordType::A)
}

/// Asks `ready.spartan` on `stream`: `Some(true)` answered, `Some(false)`
/// closed by the server (EOF or reset), `None` nothing within [`WAIT`].
async fn served(stream: &mut TcpStream, id: u16) -> Option<bool> {
    match timeout(WAIT, tcp_ask(stream, &ready(id))).await {
        Ok(Ok(Some(reply))) => {
            assert_eq!(first_a(&reply), Some([127, 0, 0, 1].into()));
            Some(true)
        }
        Ok(Ok(None)) | Ok(Err(_)) => Some(false),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_a_fresh_client_is_served_after() {
    let options = DnsOptions {
        max_tcp_connections: 4,
        ..DnsOptions::default()
    };
    let server = common::start(&[], options).await;
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        assert_eq!(served(&mut s, i).await, Some(true), "connection {i} served");
        held.push(s);
    }
    let mut extra = TcpStream::connect(server.addr).await.expect("connect");
    assert_eq!(
        served(&mut extra, 9).await,
        Some(false),
        "a fifth connection is closed, not served"
    );
    assert!(load(&server.dns.stats.tcp_refused) >= 1);
    // The held connections still work.
    assert_eq!(served(&mut held[0], 10).await, Some(true));
    drop(held);
    // Once they are gone, a fresh client is served.
    let start = Instant::now();
    loop {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        if served(&mut s, 11).await == Some(true) {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no fresh connection served after the others closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "refused {} connection(s); a fresh one served {:?} after the others closed",
        load(&server.dns.stats.tcp_refused),
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_is_closed_at_its_lifetime() {
    let lifetime = Duration::from_millis(1500);
    let options = DnsOptions {
        tcp_lifetime: lifetime,
        tcp_idle: Duration::from_secs(10),
        ..DnsOptions::default()
    };
    let server = common::start(&[], options).await;
    let start = Instant::now();
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let mut answered = 0u16;
    // A query every 250 ms: never idle.
    let closed_after = loop {
        match served(&mut s, answered).await {
            Some(true) => answered += 1,
            Some(false) => break start.elapsed(),
            None => panic!("no answer and not closed"),
        }
        assert!(
            start.elapsed() < lifetime + WAIT,
            "still open after {:?} ({answered} queries answered)",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("closed after {closed_after:?}, {answered} queries answered");
    assert!(
        closed_after >= lifetime - Duration::from_millis(100),
        "closed early: {closed_after:?}"
    );
    assert!(answered >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_per_connection_are_capped() {
    let options = DnsOptions {
        tcp_max_queries: 3,
        ..DnsOptions::default()
    };
    let server = common::start(&[], options).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    for id in 0..3 {
        assert_eq!(served(&mut s, id).await, Some(true), "query {id}");
    }
    assert_eq!(
        served(&mut s, 3).await,
        Some(false),
        "closed after 3 queries"
    );
    let mut fresh = TcpStream::connect(server.addr).await.expect("connect");
    assert_eq!(served(&mut fresh, 4).await, Some(true));
}
