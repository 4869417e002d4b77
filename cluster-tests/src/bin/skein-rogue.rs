//! A misbehaving peer for the cluster tests, run inside a test namespace:
//! - `garbage-udp ADDR COUNT`: random datagrams and truncated QUIC-looking
//!   packets at a gossip port;
//! - `quic-no-cert ADDR CA_PEM`: a QUIC client that trusts the cluster CA
//!   but presents no certificate, and tries to send a message.
//!
//! - `impersonate --tls-dir DIR --cluster-id ID --seed IP:PORT --as NODE
//!   --key KEY --value VALUE`: joins the cluster with the (valid) node
//!   certificate in DIR and then, until killed, pushes, relays and syncs
//!   forgeries about NODE: the entry KEY=VALUE claimed from NODE, NODE at a
//!   higher generation (with and without this certificate presented as
//!   NODE's), NODE's departure, and suspicions of NODE claimed from others;
//!   plus, signed honestly with its own key, its own suspicion of NODE;
//! - `oversize|wrong-version|flood --tls-dir DIR --to IP:PORT`: one message
//!   over the size cap; one message of another wire version; more
//!   connections than a host may hold, each with streams that never finish.
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

/// `--flag value` pairs after the subcommand.
fn flags(args: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| anyhow::anyhow!("expected a --flag, got {flag}"))?;
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("--{name} needs a value"))?;
        out.insert(name.to_string(), value.clone());
    }
    Ok(out)
}

fn need<'a>(
    f: &'a std::collections::HashMap<String, String>,
    name: &str,
) -> anyhow::Result<&'a str> {
    f.get(name)
        .map(String::as_str)
        .ok_or_else(|| anyhow::anyhow!("--{name} is required"))
}

/// The address this host uses to reach `peer`.
fn local_ip_towards(peer: SocketAddr) -> anyhow::Result<std::net::IpAddr> {
    let probe = UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(peer)?;
    Ok(probe.local_addr()?.ip())
}

async fn impersonate(f: &std::collections::HashMap<String, String>) -> anyhow::Result<()> {
    use skein_proto::keys as signed;
    use skein_proto::wire::{Announce, Leave, OriginData, Rumor, Suspicion};
    use skein_proto::{Body, Config, Identity, Keys, Name, Node, Sig, SignedEntry};

    let tls = Arc::new(skein_tls::NodeTls::load(std::path::Path::new(need(
        f, "tls-dir",
    )?))?);
    let cfg = Config::new(need(f, "cluster-id")?);
    let cluster = cfg.cluster;
    let seed: SocketAddr = need(f, "seed")?.parse()?;
    let target = Name::intern(need(f, "as")?).ok_or_else(|| anyhow::anyhow!("bad --as"))?;
    let (key, value) = (need(f, "key")?.to_string(), need(f, "value")?.to_string());
    let me = Name::intern(tls.node_id()).ok_or_else(|| anyhow::anyhow!("bad node id"))?;
    let advertise = SocketAddr::new(local_ip_towards(seed)?, seed.port());
    // All the rogue can sign with is its own key.
    let forger = skein_gossip::CertKeys(tls.gossip_signer()?);
    let own = Arc::new(Identity(tls.gossip_signer()?.identity().to_vec()));
    let stats = Arc::new(skein_gossip::GossipStats::default());
    let transport = skein_gossip::QuicTransport::new(tls.clone(), stats);
    let mut socket = transport
        .open(SocketAddr::new([0, 0, 0, 0].into(), seed.port()))
        .await?;
    let epoch = std::time::Instant::now();
    let now = || epoch.elapsed().as_micros() as u64;
    let mut node = Node::new(
        cfg,
        skein_gossip::CertKeys(tls.gossip_signer()?),
        me,
        advertise,
        own.clone(),
        1,
        std::process::id() as u64,
        0,
    );
    node.join(0, vec![seed]);
    let sign = |bytes: &[u8]| -> Sig { forger.sign(bytes) };
    let mut forge = tokio::time::interval(std::time::Duration::from_millis(200));
    let (mut rounds, mut sent) = (0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        let deadline = epoch + std::time::Duration::from_micros(node.next_deadline());
        let mut forge_now = false;
        tokio::select! {
            got = socket.recv() => {
                let (_, peer, bytes) = got?;
                if let (Ok(body), Some(from)) = (skein_proto::wire::decode(&bytes, cluster, 8 << 20), Name::intern(&peer)) {
                    node.handle(now(), from, body);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => node.tick(now()),
            _ = forge.tick() => forge_now = true,
        }
        while let Some(t) = node.poll_transmit() {
            socket.send(t.addr, skein_proto::wire::encode(cluster, &t.body));
        }
        while node.poll_event().is_some() {}
        let Some(m) = node.member(target).filter(|_| forge_now) else {
            continue;
        };
        rounds += 1;
        let version = 1_000_000 + rounds;
        signed::entry_bytes(
            &mut buf,
            cluster,
            target,
            m.gen,
            version,
            &key,
            Some(&value),
        );
        let entry = Arc::new(SignedEntry {
            origin: target,
            gen: m.gen,
            version,
            key: key.clone(),
            value: Some(value.as_str().into()),
            sig: sign(&buf),
        });
        let announce = |gen: u64, identity: Option<Arc<Identity>>, buf: &mut Vec<u8>| {
            signed::alive_bytes(buf, cluster, target, gen, 7, 0, m.addr, 0);
            Arc::new(Announce {
                node: target,
                gen,
                life: 7,
                inc: 0,
                addr: m.addr,
                floor: 0,
                identity,
                sig: sign(buf),
            })
        };
        let higher = announce(m.gen + 1, None, &mut buf);
        let stolen = announce(m.gen + 2, Some(own.clone()), &mut buf);
        signed::leave_bytes(&mut buf, cluster, target, m.gen);
        let leave = Arc::new(Leave {
            node: target,
            gen: m.gen,
            sig: sign(&buf),
        });
        // A suspicion claimed from another member, and one of its own.
        let others: Vec<Name> = node
            .members()
            .map(|x| x.name)
            .filter(|n| *n != target && *n != me)
            .collect();
        let mut rumors = vec![
            Rumor::Entry(entry.clone()),
            Rumor::Alive(higher.clone()),
            Rumor::Alive(stolen.clone()),
            Rumor::Leave(leave),
        ];
        for observer in others.iter().take(2).copied().chain([me]) {
            signed::suspicion_bytes(&mut buf, cluster, observer, target, m.gen, m.inc);
            rumors.push(Rumor::Suspect(Arc::new(Suspicion {
                observer,
                node: target,
                gen: m.gen,
                inc: m.inc,
                sig: sign(&buf),
            })));
        }
        let sync = Body::SyncData {
            spread: true,
            origins: vec![OriginData {
                announce: stolen,
                identity: Some(own.clone()),
                suspicions: Vec::new(),
                leave: None,
                reset: true,
                entries: vec![entry],
                wm: version,
            }],
        };
        for member in node.members().filter(|x| x.name != me && x.status.is_up()) {
            socket.send(
                member.addr,
                skein_proto::wire::encode(cluster, &Body::Rumors(rumors.clone())),
            );
            socket.send(member.addr, skein_proto::wire::encode(cluster, &sync));
            sent += 2;
        }
        if rounds == 1 || rounds % 25 == 0 {
            println!("impersonating {target}: {rounds} rounds, {sent} forged messages sent");
        }
    }
}

/// A QUIC connection to `to` with the node certificate in `tls_dir`.
async fn dial(
    tls_dir: &str,
    to: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let tls = skein_tls::NodeTls::load(std::path::Path::new(tls_dir))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config()?)?;
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(to, skein_tls::SERVER_NAME)?.await?;
    Ok((endpoint, conn))
}

async fn send_stream(conn: &quinn::Connection, bytes: &[u8]) -> anyhow::Result<()> {
    let mut s = conn.open_uni().await?;
    s.write_all(bytes).await?;
    s.finish()?;
    Ok(())
}

async fn hostile(mode: &str, f: &std::collections::HashMap<String, String>) -> anyhow::Result<()> {
    let tls_dir = need(f, "tls-dir")?;
    let to: SocketAddr = need(f, "to")?.parse()?;
    match mode {
        "oversize" => {
            let (_e, conn) = dial(tls_dir, to).await?;
            let mut bytes = vec![0u8; skein_gossip::transport::MAX_MESSAGE_SIZE + 1];
            bytes[0] = skein_proto::wire::WIRE_VERSION;
            let result = send_stream(&conn, &bytes).await;
            println!("sent {} bytes: {result:?}", bytes.len());
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        "wrong-version" => {
            let (_e, conn) = dial(tls_dir, to).await?;
            let body = skein_proto::Body::Rumors(Vec::new());
            let mut bytes = skein_proto::wire::encode(0, &body);
            bytes[0] = skein_proto::wire::WIRE_VERSION + 1;
            for _ in 0..3 {
                send_stream(&conn, &bytes).await?;
            }
            println!("sent 3 messages of wire version {}", bytes[0]);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        "flood" => {
            let want = skein_gossip::transport::MAX_CONNECTIONS_PER_HOST * 3;
            let mut held = Vec::new();
            for _ in 0..want {
                if let Ok(Ok(pair)) =
                    tokio::time::timeout(std::time::Duration::from_secs(3), dial(tls_dir, to)).await
                {
                    held.push(pair);
                }
            }
            // Streams that start and never finish, as many as allowed.
            let mut streams = Vec::new();
            for (_, conn) in &held {
                for _ in 0..8 {
                    let Ok(Ok(mut s)) = tokio::time::timeout(
                        std::time::Duration::from_millis(500),
                        conn.open_uni(),
                    )
                    .await
                    else {
                        break;
                    };
                    let _ = s.write_all(&[skein_proto::wire::WIRE_VERSION, 0, 0]).await;
                    streams.push(s);
                }
            }
            println!(
                "{} connections and {} unfinished streams open",
                held.len(),
                streams.len()
            );
            tokio::time::sleep(std::time::Duration::from_secs(
                need(f, "hold-s")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(5),
            ))
            .await;
        }
        _ => anyhow::bail!("unknown mode {mode}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("impersonate") => {
            let f = flags(&args[2..])?;
            tokio::runtime::Runtime::new()?.block_on(impersonate(&f))
        }
        Some(mode @ ("oversize" | "wrong-version" | "flood")) => {
            let f = flags(&args[2..])?;
            let _ = rustls::crypto::ring::default_provider().install_default();
            tokio::runtime::Runtime::new()?.block_on(hostile(mode, &f))
        }
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
            "usage: skein-rogue garbage-udp ADDR COUNT | quic-no-cert ADDR CA_PEM | udp-ask ADDR | tcp-hold ADDR SECS | tcp-idle ADDR N SECS | dns-weird ADDR | impersonate --tls-dir DIR --cluster-id ID --seed IP:PORT --as NODE --key KEY --value VALUE | oversize|wrong-version|flood --tls-dir DIR --to IP:PORT"
        ),
    }
}
