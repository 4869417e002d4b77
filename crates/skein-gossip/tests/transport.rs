//! The QUIC gossip transport over real sockets on 127.0.0.1.
//!
//! Every wait is bounded by a deadline; "nothing arrives" is only asserted
//! after the event that should have prevented delivery has been observed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use skein_gossip::{GossipStats, QuicTransport};
use skein_tls::NodeTls;
use tempfile::TempDir;
use tokio::time::timeout;

/// Generous: CI machines are slow, and passing tests never wait this long.
const DEADLINE: Duration = Duration::from_secs(15);
/// How long "never receives" is checked once the rejection has happened.
const QUIET: Duration = Duration::from_millis(500);

struct Ca {
    tmp: TempDir,
}

impl Ca {
    fn new(cluster_id: &str) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        skein_tls::init_ca(&tmp.path().join("ca"), cluster_id).unwrap();
        Ca { tmp }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("ca")
    }

    fn node(&self, node_id: &str) -> Arc<NodeTls> {
        let dir = self.tmp.path().join(node_id);
        skein_tls::issue_node(&self.dir(), node_id, &dir).unwrap();
        Arc::new(NodeTls::load(&dir).unwrap())
    }

    fn ca_cert(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.dir().join("ca.pem")).unwrap()
    }
}

struct Node {
    socket: Box<dyn Socket>,
    stats: Arc<GossipStats>,
    addr: SocketAddr,
}

/// A port that was free a moment ago; `open` retries if someone took it.
fn free_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// `RUST_LOG=skein_gossip=debug` shows the transport's view of each test.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

async fn open(tls: Arc<NodeTls>) -> Node {
    init_tracing();
    let stats = Arc::new(GossipStats::default());
    let transport = QuicTransport::new(tls, stats.clone());
    let mut last_err = None;
    for _ in 0..5 {
        let addr = free_addr();
        match transport.open(addr).await {
            Ok(socket) => {
                return Node {
                    socket,
                    stats,
                    addr,
                }
            }
            Err(err) => last_err = Some(err),
        }
    }
    panic!("could not open transport: {last_err:?}");
}

fn syn(cluster_id: &str) -> ChitchatMessage {
    // chitchat 0.11 does not export `Digest`, but it is `Deserializable`:
    // an empty digest is a zero node count (u16).
    let digest = Deserializable::deserialize(&mut &[0u8, 0][..]).unwrap();
    ChitchatMessage::Syn {
        cluster_id: cluster_id.to_owned(),
        digest,
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Polls `cond` until it holds or the deadline passes.
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn recv(node: &mut Node) -> (SocketAddr, ChitchatMessage) {
    timeout(DEADLINE, node.socket.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("transport broken")
}

async fn assert_quiet(node: &mut Node) {
    if let Ok(received) = timeout(QUIET, node.socket.recv()).await {
        panic!("unexpected delivery: {received:?}");
    }
}

#[tokio::test]
async fn same_ca_exchange_both_ways() {
    let ca = Ca::new("c1");
    let mut a = open(ca.node("a")).await;
    let mut b = open(ca.node("b")).await;

    let sent = syn("c1");
    let syn_len = sent.serialized_len() as u64;
    a.socket.send(b.addr, sent).await.unwrap();
    let (from, msg) = recv(&mut b).await;
    // The single endpoint dials from the listen address, so the receiver
    // sees the sender's gossip address and chitchat can reply to it.
    assert_eq!(from, a.addr);
    assert_eq!(msg, syn("c1"));

    b.socket
        .send(a.addr, ChitchatMessage::BadCluster)
        .await
        .unwrap();
    let (from, msg) = recv(&mut a).await;
    assert_eq!(from, b.addr);
    assert_eq!(msg, ChitchatMessage::BadCluster);

    let bad_cluster_len = ChitchatMessage::BadCluster.serialized_len() as u64;
    wait_for("outgoing stats", || {
        get(&a.stats.messages_out) == 1 && get(&b.stats.messages_out) == 1
    })
    .await;
    assert_eq!(get(&a.stats.bytes_out), syn_len);
    assert_eq!(get(&b.stats.bytes_out), bad_cluster_len);
    assert_eq!(get(&b.stats.messages_in), 1);
    assert_eq!(get(&b.stats.bytes_in), syn_len);
    assert_eq!(get(&a.stats.messages_in), 1);
    assert_eq!(get(&a.stats.bytes_in), bad_cluster_len);
    for stats in [&a.stats, &b.stats] {
        assert_eq!(get(&stats.send_dropped), 0);
        assert_eq!(get(&stats.decode_errors), 0);
        assert_eq!(get(&stats.rejected_peers), 0);
    }

    // A burst in both directions arrives complete.
    for _ in 0..50 {
        a.socket.send(b.addr, syn("c1")).await.unwrap();
        b.socket.send(a.addr, syn("c1")).await.unwrap();
    }
    for _ in 0..50 {
        assert_eq!(recv(&mut a).await.0, b.addr);
        assert_eq!(recv(&mut b).await.0, a.addr);
    }
}

#[tokio::test]
async fn foreign_ca_cannot_deliver() {
    let good_ca = Ca::new("c1");
    let foreign_ca = Ca::new("c1");
    let mut good = open(good_ca.node("good")).await;
    let mut foreign = open(foreign_ca.node("intruder")).await;

    foreign
        .socket
        .send(good.addr, ChitchatMessage::BadCluster)
        .await
        .unwrap();
    wait_for("good node to see the rejected handshake", || {
        get(&good.stats.rejected_peers) >= 1
    })
    .await;
    assert_quiet(&mut good).await;
    assert_eq!(get(&foreign.stats.messages_out), 0);

    // The other direction: the good node refuses to talk to the intruder.
    let before = get(&good.stats.rejected_peers);
    good.socket
        .send(foreign.addr, ChitchatMessage::BadCluster)
        .await
        .unwrap();
    wait_for("good node to reject the foreign server", || {
        get(&good.stats.rejected_peers) > before
    })
    .await;
    assert_quiet(&mut foreign).await;
    assert_eq!(get(&good.stats.messages_out), 0);
    assert_eq!(get(&good.stats.messages_in), 0);
}

/// A raw quinn client endpoint with the given TLS config.
fn raw_client(tls: rustls::ClientConfig) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Connects and tries to send one valid message; the server may refuse at
/// any point, so every step is allowed to fail.
async fn try_send_raw(endpoint: &quinn::Endpoint, to: SocketAddr) -> Option<quinn::Connection> {
    let conn = endpoint
        .connect(to, skein_tls::SERVER_NAME)
        .unwrap()
        .await
        .ok()?;
    if let Ok(mut stream) = conn.open_uni().await {
        let _ = stream.write_all(&syn("c1").serialize_to_vec()).await;
        let _ = stream.finish();
    }
    Some(conn)
}

async fn assert_rejected(ca: &Ca, tls: rustls::ClientConfig) {
    let mut good = open(ca.node("good")).await;
    let endpoint = raw_client(tls);
    let conn = try_send_raw(&endpoint, good.addr).await;
    wait_for("rejection", || get(&good.stats.rejected_peers) >= 1).await;
    if let Some(conn) = conn {
        // The server closed it; the client must notice.
        timeout(DEADLINE, conn.closed())
            .await
            .expect("rejected connection stays open");
    }
    assert_quiet(&mut good).await;
    assert_eq!(get(&good.stats.messages_in), 0);
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let ca = Ca::new("c1");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_cert()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![skein_tls::ALPN.to_vec()];
    assert_rejected(&ca, tls).await;
}

#[tokio::test]
async fn client_with_wrong_alpn_is_rejected() {
    let ca = Ca::new("c1");
    let mut tls = ca.node("other").client_config().unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    assert_rejected(&ca, tls).await;
}

/// xorshift64: reproducible noise without a `rand` dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test]
async fn garbage_datagrams_do_not_break_the_endpoint() {
    let ca = Ca::new("c1");
    let mut good = open(ca.node("good")).await;
    let mut sender = open(ca.node("sender")).await;

    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut noise = Noise(0x5eed_1234_abcd_ef01);
    for _ in 0..1000 {
        let len = 1 + (noise.next() % 1400) as usize;
        junk.send_to(&noise.bytes(len), good.addr).await.unwrap();
    }
    for i in 0..200 {
        // Long-header packets: QUIC v1 Initial type bits, then random or
        // truncated header fields and payload.
        let mut packet = vec![0xc0];
        if i % 2 == 0 {
            packet.extend_from_slice(&1u32.to_be_bytes());
        }
        let len = (noise.next() % 1300) as usize;
        packet.extend(noise.bytes(len));
        junk.send_to(&packet, good.addr).await.unwrap();
    }
    // Padded to the minimum Initial size, which quinn would otherwise
    // discard before looking further.
    for _ in 0..50 {
        let mut packet = vec![0xc3, 0, 0, 0, 1, 8];
        packet.extend(noise.bytes(8));
        packet.push(8);
        packet.extend(noise.bytes(1200 - packet.len()));
        junk.send_to(&packet, good.addr).await.unwrap();
    }

    sender.socket.send(good.addr, syn("c1")).await.unwrap();
    let (from, msg) = recv(&mut good).await;
    assert_eq!(from, sender.addr);
    assert_eq!(msg, syn("c1"));
    // And the reply path on the same endpoint still works.
    good.socket
        .send(sender.addr, ChitchatMessage::BadCluster)
        .await
        .unwrap();
    assert_eq!(recv(&mut sender).await.0, good.addr);
}

#[tokio::test]
async fn undecodable_streams_are_counted_and_skipped() {
    let ca = Ca::new("c1");
    let mut good = open(ca.node("good")).await;
    // An authenticated peer sending bad streams (a bug, or an old version).
    let endpoint = raw_client(ca.node("buggy").client_config().unwrap());
    let conn = endpoint
        .connect(good.addr, skein_tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    for payload in [
        b"junk".to_vec(),
        Vec::new(),
        vec![0u8; skein_gossip::transport::MAX_MESSAGE_SIZE + 1],
    ] {
        let mut stream = conn.open_uni().await.unwrap();
        // The oversized one may be stopped by the receiver mid-write.
        let _ = stream.write_all(&payload).await;
        let _ = stream.finish();
    }
    wait_for("decode errors", || get(&good.stats.decode_errors) == 3).await;

    let mut stream = conn.open_uni().await.unwrap();
    stream
        .write_all(&ChitchatMessage::BadCluster.serialize_to_vec())
        .await
        .unwrap();
    stream.finish().unwrap();
    let (_, msg) = recv(&mut good).await;
    assert_eq!(msg, ChitchatMessage::BadCluster);
    assert_eq!(get(&good.stats.rejected_peers), 0);
}

#[tokio::test]
async fn send_to_dead_peer_does_not_block() {
    let ca = Ca::new("c1");
    let mut a = open(ca.node("a")).await;
    let mut b = open(ca.node("b")).await;
    let dead = free_addr();

    // Far more than the peer queue holds: the excess is dropped, nothing
    // waits for the handshake that will never complete.
    let start = Instant::now();
    for _ in 0..500 {
        timeout(Duration::from_millis(100), a.socket.send(dead, syn("c1")))
            .await
            .expect("send blocked")
            .unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(get(&a.stats.send_dropped) > 0);

    a.socket.send(b.addr, syn("c1")).await.unwrap();
    let (from, msg) = recv(&mut b).await;
    assert_eq!((from, msg), (a.addr, syn("c1")));
    b.socket
        .send(a.addr, ChitchatMessage::BadCluster)
        .await
        .unwrap();
    assert_eq!(recv(&mut a).await.0, b.addr);
    assert_eq!(get(&a.stats.rejected_peers), 0);
}

#[tokio::test]
async fn port_is_released_on_drop() {
    let ca = Ca::new("c1");
    let tls = ca.node("a");
    let node = open(tls.clone()).await;
    let addr = node.addr;
    drop(node);
    // Re-binding the same port proves the endpoint is gone; the socket is
    // released asynchronously, so allow a moment.
    let transport = QuicTransport::new(tls, Arc::new(GossipStats::default()));
    let start = Instant::now();
    loop {
        match transport.open(addr).await {
            Ok(_) => break,
            Err(err) => {
                assert!(start.elapsed() < DEADLINE, "port not released: {err:#}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn chitchat_nodes_find_each_other() {
    let ca = Ca::new("c1");
    let mut handles = Vec::new();
    let mut seeds = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let tls = ca.node(name);
        let stats = Arc::new(GossipStats::default());
        let mut handle = None;
        for _ in 0..5 {
            let addr = free_addr();
            let config = chitchat::ChitchatConfig {
                chitchat_id: chitchat::ChitchatId::new(name, 1, addr),
                cluster_id: "c1".to_owned(),
                gossip_interval: Duration::from_millis(100),
                listen_addr: addr,
                seed_nodes: seeds.clone(),
                failure_detector_config: Default::default(),
                marked_for_deletion_grace_period: Duration::from_secs(3600),
                catchup_callback: None,
                extra_liveness_predicate: None,
            };
            let transport = QuicTransport::new(tls.clone(), stats.clone());
            if let Ok(h) = chitchat::spawn_chitchat(config, Vec::new(), &transport).await {
                seeds.push(addr.to_string());
                handle = Some(h);
                break;
            }
        }
        handles.push(handle.expect("could not start chitchat"));
    }
    for handle in &handles {
        let chitchat = handle.chitchat();
        let start = Instant::now();
        loop {
            let live = chitchat.lock().await.live_nodes().count();
            if live == 3 {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "only {live} live nodes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn peer_restart_on_same_address() {
    let ca = Ca::new("c1");
    let mut a = open(ca.node("a")).await;
    let b_tls = ca.node("b");
    let mut b = open(b_tls.clone()).await;
    a.socket.send(b.addr, syn("c1")).await.unwrap();
    assert_eq!(recv(&mut b).await.0, a.addr);

    // b restarts on the same port; a's cached connection belongs to the old
    // process. Gossip may lose a few messages but must reach the new one.
    let b_addr = b.addr;
    drop(b);
    let transport = QuicTransport::new(b_tls, Arc::new(GossipStats::default()));
    let start = Instant::now();
    let mut b_socket = loop {
        match transport.open(b_addr).await {
            Ok(socket) => break socket,
            Err(err) => {
                assert!(start.elapsed() < DEADLINE, "port not released: {err:#}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    loop {
        a.socket.send(b_addr, syn("c1")).await.unwrap();
        if let Ok(received) = timeout(Duration::from_millis(200), b_socket.recv()).await {
            assert_eq!(received.unwrap().0, a.addr);
            break;
        }
        assert!(start.elapsed() < DEADLINE, "restarted peer never reached");
    }
}
