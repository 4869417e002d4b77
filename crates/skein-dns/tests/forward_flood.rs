//! A flood of random names at an upstream that never answers (a UDP socket
//! the test binds and never reads): forwarding is bounded, so the server's
//! open file descriptors stay bounded, the excess is answered SERVFAIL at
//! once (counted), and the cluster's own names are answered within a
//! second throughout. Its own test binary: it counts the process's file
//! descriptors.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{load, open_fds, query, udp_ask};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use skein_dns::server::DnsOptions;
use tokio::net::UdpSocket;

/// Queries per second of the flood, and for how long.
const RATE: u64 = 5_000;
const FLOOD: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_flood_at_a_black_hole_keeps_descriptors_bounded_and_local_names_answered() {
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").expect("black hole");
    let server = common::start(
        &[hole.local_addr().expect("hole address")],
        DnsOptions::default(),
    )
    .await;
    let addr = server.addr;
    let probe = UdpSocket::bind("127.0.0.1:0").await.expect("probe socket");
    let flood = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("flood socket"));
    let ready = query(1, "ready.spartan.", RecordType::A);
    let first = udp_ask(&probe, addr, &ready, Duration::from_secs(1))
        .await
        .expect("ready.spartan answered before the flood");
    assert_eq!(common::first_a(&first), Some([127, 0, 0, 1].into()));
    let baseline = open_fds();

    // The flood's replies, counted by code.
    let servfails = Arc::new(AtomicU64::new(0));
    let drain = {
        let (flood, servfails) = (flood.clone(), servfails.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = flood.recv(&mut buf).await {
                if n >= 4 && buf[3] & 0x0F == ResponseCode::ServFail.low() {
                    servfails.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    flood.connect(addr).await.expect("connect flood socket");
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (flood, done) = (flood.clone(), done.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while start.elapsed() < FLOOD {
                tick.tick().await;
                let due = RATE * start.elapsed().as_millis() as u64 / 1000;
                while sent < due {
                    let name = format!("r{sent}x{}.flood.example.", start.elapsed().as_nanos());
                    let q = query(sent as u16, &name, RecordType::A);
                    let _ = flood.send(&q).await;
                    sent += 1;
                }
            }
            done.store(true, Ordering::Relaxed);
            sent
        })
    };

    // Throughout the flood and until its forwards have timed out: the
    // local name within a second, and the descriptors counted.
    let (mut worst, mut most_fds, mut probes) = (Duration::ZERO, baseline, 0u32);
    let until =
        Instant::now() + FLOOD + skein_dns::server::FORWARD_DEADLINE + Duration::from_millis(500);
    let mut id = 2u16;
    while Instant::now() < until {
        id = id.wrapping_add(1);
        let asked = Instant::now();
        let reply = udp_ask(
            &probe,
            addr,
            &query(id, "ready.spartan.", RecordType::A),
            Duration::from_secs(1),
        )
        .await;
        let took = asked.elapsed();
        let reply = reply.unwrap_or_else(|| {
            panic!("ready.spartan unanswered within 1 s during the flood (probe {probes})")
        });
        assert_eq!(common::first_a(&reply), Some([127, 0, 0, 1].into()));
        worst = worst.max(took);
        most_fds = most_fds.max(open_fds());
        probes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = sender.await.expect("flood sender");
    assert!(done.load(Ordering::Relaxed));
    let stats = &server.dns.stats;
    println!(
        "flood: {sent} random names in {FLOOD:?}; open fds {baseline} before, at most {most_fds} during; \
         ready.spartan {probes} probes, slowest {worst:?}; SERVFAIL replies {} (saturated {}, servfail {}, forwarded {})",
        servfails.load(Ordering::Relaxed),
        load(&stats.forward_saturated),
        load(&stats.servfail),
        load(&stats.forwarded),
    );
    assert!(
        sent >= RATE * FLOOD.as_secs() * 9 / 10,
        "the flood was sent ({sent})"
    );
    assert!(
        most_fds <= baseline + 64,
        "open file descriptors grew from {baseline} to {most_fds} under the flood"
    );
    assert!(
        load(&stats.forward_saturated) > 0,
        "the excess is refused with SERVFAIL and counted"
    );
    assert!(servfails.load(Ordering::Relaxed) > 0);
    drain.abort();
    drop(hole);
}
