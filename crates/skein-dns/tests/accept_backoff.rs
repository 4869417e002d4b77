//! Out of file descriptors, `accept` fails at once for as long as a
//! connection waits in the backlog: the TCP listener must back off rather
//! than spin, and serve the connection once descriptors are free again.
//! Its own test binary: it lowers the process's descriptor limit.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{load, query};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use skein_dns::server::DnsOptions;

/// The highest descriptor number open in this process.
fn highest_fd() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .max()
        .unwrap_or(0)
}

/// Sets this process's soft RLIMIT_NOFILE (with util-linux `prlimit`).
fn set_soft_nofile(limit: i32) {
    let pid = std::process::id().to_string();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={limit}:")])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_when_out_of_descriptors_and_recovers() {
    let server = common::start(&[], DnsOptions::default()).await;
    let stats = &server.dns.stats;
    // The client's socket exists before the limit is lowered.
    let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("client socket");
    // Every descriptor number below the limit in use: fill the gaps, and
    // keep a few spare ones to free later.
    let top = highest_fd();
    let mut filler = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null").expect("open /dev/null");
        let fd = f.as_raw_fd();
        filler.push(f);
        if fd > top {
            break;
        }
    }
    let mut spare = Vec::new();
    for _ in 0..4 {
        spare.push(std::fs::File::open("/dev/null").expect("open /dev/null"));
    }
    let limit = highest_fd() + 1;
    set_soft_nofile(limit);

    // The connection completes in the kernel; accepting it fails (EMFILE).
    client
        .connect(&server.addr.into())
        .expect("connect (the kernel completes it)");
    let start = Instant::now();
    while load(&stats.accept_errors) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "accept never failed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = load(&stats.accept_errors);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_a_second = load(&stats.accept_errors) - before;
    println!("failed accepts in one second out of descriptors: {in_a_second}");
    assert!(
        in_a_second <= 50,
        "the accept loop spins: {in_a_second} failed accepts in a second"
    );

    // Descriptors free again: the waiting connection is served.
    drop(spare);
    let mut stream: std::net::TcpStream = client.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let q = query(7, "ready.spartan.", RecordType::A);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let asked = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        stream.write_all(&framed)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply)?;
        Ok::<_, std::io::Error>(reply)
    })
    .await
    .expect("client thread")
    .expect("answered once descriptors are free");
    let reply = Message::from_vec(&answer).expect("a DNS reply");
    assert_eq!(common::first_a(&reply), Some([127, 0, 0, 1].into()));
    println!("served {:?} after descriptors were freed", asked.elapsed());
    drop(filler);
}
