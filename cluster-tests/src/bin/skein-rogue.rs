//! A misbehaving peer for the cluster tests, run inside a test namespace:
//! - `garbage-udp ADDR COUNT`: random datagrams and truncated QUIC-looking
//!   packets at a gossip port;
//! - `quic-no-cert ADDR CA_PEM`: a QUIC client that trusts the cluster CA
//!   but presents no certificate, and tries to send a message.
//!
//! Exits 0 when it did what it was asked; for `quic-no-cert`, it prints
//! `refused: <reason>` or `accepted` and exits 0 either way, so the test
//! decides what is right.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn garbage(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let mut buf = [0u8; 1400];
    for i in 0..count {
        let len = (xorshift(&mut seed) % buf.len() as u64) as usize + 1;
        for b in buf[..len].iter_mut() {
            *b = xorshift(&mut seed) as u8;
        }
        // Every third packet looks like a QUIC long header (Initial, v1)
        // so that it gets past the first checks and fails deeper.
        if i % 3 == 0 && len > 6 {
            buf[0] = 0xC0 | (buf[0] & 0x0F);
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
        }
        // A full socket buffer is not the point of the test: skip errors.
        let _ = socket.send_to(&buf[..len], addr);
    }
    println!("sent {count} garbage datagrams to {addr}");
    Ok(())
}

async fn no_cert(addr: SocketAddr, ca_pem: &str) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem)?;
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![skein_tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let attempt = async {
        let conn = endpoint.connect(addr, skein_tls::SERVER_NAME)?.await?;
        let mut s = conn.open_uni().await?;
        s.write_all(b"not a certificate holder").await?;
        s.finish()?;
        // TLS 1.3 lets the client finish before the server checks its
        // (missing) certificate: the refusal shows as the connection closing.
        let reason = conn.closed().await;
        anyhow::Ok(format!("{reason}"))
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), attempt).await {
        Ok(Ok(reason)) => println!("refused: {reason}"),
        Ok(Err(e)) => println!("refused: {e}"),
        Err(_) => println!("accepted"),
    }
    Ok(())
}

/// Sends one datagram and prints the first reply (exit 1 after 2 s without).
fn udp_ask(addr: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    socket.send_to(b"who?", addr)?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf)?;
    println!("{}", String::from_utf8_lossy(&buf[..n]).trim());
    Ok(())
}

/// Holds one TCP connection to an echoing backend for SECS seconds, one
/// request every 100 ms; fails at the first request without an answer.
/// Prints how many round trips succeeded and which backend answered.
fn tcp_hold(addr: SocketAddr, secs: u64) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"ECHO\n")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let (mut trips, mut backend) = (0u64, String::new());
    while std::time::Instant::now() < deadline {
        writer.write_all(b"x\n")?;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            anyhow::bail!("connection closed after {trips} round trips");
        }
        backend = line.trim().to_string();
        trips += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("{trips} round trips, all answered by {backend}");
    Ok(())
}

/// Opens `n` TCP connections and keeps them silent for `secs` seconds (a
/// slowloris against the DNS server's TCP listener).
fn tcp_idle(addr: SocketAddr, n: usize, secs: u64) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(s) =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))
        {
            held.push(s);
        }
    }
    println!("holding {} idle connections", held.len());
    std::thread::sleep(std::time::Duration::from_secs(secs));
    Ok(())
}

/// Malformed DNS messages: each is sent and whatever comes back within
/// 500 ms is summarised (`-` for nothing, else the response code).
fn dns_weird(addr: SocketAddr) -> anyhow::Result<()> {
    let header = |id: u16, qd: u16| {
        let mut h = id.to_be_bytes().to_vec();
        h.extend_from_slice(&[0x01, 0x00]); // RD
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        h
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("half-header", vec![0x12, 0x34, 0x01]),
        ("header-only-claims-100-questions", header(1, 100)),
    ];
    // A name longer than 255 bytes: 5 labels of 63.
    let mut long = header(2, 1);
    for _ in 0..5 {
        long.push(63);
        long.extend(std::iter::repeat_n(b'a', 63));
    }
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push(("name-over-255-bytes", long));
    // A label claiming 64 bytes (over the 63 limit).
    let mut big_label = header(3, 1);
    big_label.push(64);
    big_label.extend(std::iter::repeat_n(b'b', 64));
    big_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push(("label-of-64", big_label));
    // A compression pointer to itself.
    let mut looped = header(4, 1);
    looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    cases.push(("compression-loop", looped));
    // Many real questions in one message.
    let mut many = header(5, 50);
    for _ in 0..50 {
        many.extend_from_slice(&[5, b'r', b'e', b'a', b'd', b'y', 7]);
        many.extend_from_slice(b"spartan");
        many.extend_from_slice(&[0, 0, 1, 0, 1]);
    }
    cases.push(("fifty-questions", many));
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
    for (name, bytes) in cases {
        socket.send_to(&bytes, addr)?;
        let mut buf = [0u8; 4096];
        let said = match socket.recv_from(&mut buf) {
            Ok((n, _)) if n >= 4 => format!("rcode={}", buf[3] & 0x0F),
            Ok(_) => "short".to_string(),
            Err(_) => "-".to_string(),
        };
        println!("{name}: {said}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("garbage-udp") if args.len() == 4 => garbage(args[2].parse()?, args[3].parse()?),
        Some("quic-no-cert") if args.len() == 4 => {
            tokio::runtime::Runtime::new()?.block_on(no_cert(args[2].parse()?, &args[3]))
        }
        Some("udp-ask") if args.len() == 3 => udp_ask(args[2].parse()?),
        Some("tcp-hold") if args.len() == 4 => tcp_hold(args[2].parse()?, args[3].parse()?),
        Some("tcp-idle") if args.len() == 5 => {
            tcp_idle(args[2].parse()?, args[3].parse()?, args[4].parse()?)
        }
        Some("dns-weird") if args.len() == 3 => dns_weird(args[2].parse()?),
        _ => anyhow::bail!(
            "usage: skein-rogue garbage-udp ADDR COUNT | quic-no-cert ADDR CA_PEM | udp-ask ADDR | tcp-hold ADDR SECS | tcp-idle ADDR N SECS | dns-weird ADDR"
        ),
    }
}
