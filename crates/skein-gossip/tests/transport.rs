//! The QUIC gossip transport over real sockets on 127.0.0.1, and a few
//! [`Gossip`] drivers finding each other through it.
//!
//! Every wait is bounded by a deadline; "nothing arrives" is only asserted
//! after the event that should have prevented delivery has been observed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use skein_gossip::transport::MAX_MESSAGE_SIZE;
use skein_gossip::{Gossip, GossipConfig, GossipStats, QuicSocket, QuicTransport};
use skein_proto::wire::{self, Body, Probe};
use skein_state::NodeStatus;
use skein_tls::NodeTls;
use tempfile::TempDir;
use tokio::time::timeout;

/// Generous: CI machines are slow, and passing tests never wait this long.
const DEADLINE: Duration = Duration::from_secs(15);
/// How long "never receives" is checked once the rejection has happened.
const QUIET: Duration = Duration::from_millis(500);
/// The transport does not decode, but the payloads are real messages all the
/// same, of this cluster tag.
const CLUSTER: u64 = 0xc1;

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

    /// A node certificate from this CA that names another cluster.
    fn node_of_cluster(&self, node_id: &str, cluster_id: &str) -> Arc<NodeTls> {
        let dir = self.tmp.path().join(node_id);
        let options = skein_tls::IssueOptions {
            cluster_id: Some(cluster_id.to_owned()),
            ..Default::default()
        };
        skein_tls::issue_node_with(&self.dir(), node_id, &dir, &options).unwrap();
        Arc::new(NodeTls::load(&dir).unwrap())
    }

    /// Revokes `node_id` and copies the CRL into `into`'s TLS dir.
    fn revoke(&self, node_id: &str, into: &NodeTls) {
        skein_tls::revoke(&self.dir(), skein_tls::RevokeTarget::Node(node_id)).unwrap();
        std::fs::copy(
            self.dir().join(skein_tls::CRL_FILE),
            into.dir().join(skein_tls::CRL_FILE),
        )
        .unwrap();
    }

    fn ca_cert(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.dir().join("ca.pem")).unwrap()
    }
}

struct Node {
    socket: QuicSocket,
    stats: Arc<GossipStats>,
    addr: SocketAddr,
    transport: QuicTransport,
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
                assert_eq!(socket.local_addr(), Some(addr));
                return Node {
                    socket,
                    stats,
                    addr,
                    transport,
                };
            }
            Err(err) => last_err = Some(err),
        }
    }
    panic!("could not open transport: {last_err:?}");
}

/// A small, valid message: a heartbeat carrying `digest`.
fn heartbeat(digest: u64) -> Vec<u8> {
    wire::encode(
        CLUSTER,
        &Body::Heartbeat(Probe {
            gen: 1,
            inc: 0,
            digest,
            you_down: None,
            announce: None,
        }),
    )
}

/// Another small, valid message, of another kind and size.
fn sync_start() -> Vec<u8> {
    wire::encode(
        CLUSTER,
        &Body::SyncStart {
            buckets: (0..64).collect(),
        },
    )
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

/// The next delivery: sender address, sender node id, bytes.
async fn recv(node: &mut Node) -> (SocketAddr, String, Vec<u8>) {
    let (from, peer, bytes) = timeout(DEADLINE, node.socket.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("transport broken");
    (from, peer.to_string(), bytes)
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

    let sent = heartbeat(7);
    let sent_len = sent.len() as u64;
    a.socket.send(b.addr, sent.clone());
    let (from, peer, bytes) = recv(&mut b).await;
    // The single endpoint dials from the listen address, so the receiver
    // sees the sender's gossip address and can reply to it; the node id is
    // the CN of the certificate the sender presented.
    assert_eq!(from, a.addr);
    assert_eq!(peer, "a");
    assert_eq!(bytes, sent);
    assert_eq!(
        wire::decode(&bytes, CLUSTER, MAX_MESSAGE_SIZE),
        wire::decode(&heartbeat(7), CLUSTER, MAX_MESSAGE_SIZE)
    );

    let reply = sync_start();
    let reply_len = reply.len() as u64;
    assert_ne!(sent_len, reply_len);
    b.socket.send(a.addr, reply.clone());
    let (from, peer, bytes) = recv(&mut a).await;
    assert_eq!(from, b.addr);
    assert_eq!(peer, "b");
    assert_eq!(bytes, reply);

    wait_for("outgoing stats", || {
        get(&a.stats.messages_out) == 1 && get(&b.stats.messages_out) == 1
    })
    .await;
    assert_eq!(get(&a.stats.bytes_out), sent_len);
    assert_eq!(get(&b.stats.bytes_out), reply_len);
    assert_eq!(get(&b.stats.messages_in), 1);
    assert_eq!(get(&b.stats.bytes_in), sent_len);
    assert_eq!(get(&a.stats.messages_in), 1);
    assert_eq!(get(&a.stats.bytes_in), reply_len);
    for stats in [&a.stats, &b.stats] {
        assert_eq!(get(&stats.send_dropped), 0);
        assert_eq!(get(&stats.decode_errors), 0);
        assert_eq!(get(&stats.rejected_peers), 0);
    }

    // A burst in both directions arrives complete (in any order: every
    // message has its own stream).
    for i in 0..50 {
        a.socket.send(b.addr, heartbeat(i));
        b.socket.send(a.addr, heartbeat(1000 + i));
    }
    let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let (from, peer, bytes) = recv(&mut a).await;
        assert_eq!((from, peer.as_str()), (b.addr, "b"));
        at_a.push(bytes);
        let (from, peer, bytes) = recv(&mut b).await;
        assert_eq!((from, peer.as_str()), (a.addr, "a"));
        at_b.push(bytes);
    }
    at_a.sort();
    at_b.sort();
    let mut want_a: Vec<_> = (0..50).map(|i| heartbeat(1000 + i)).collect();
    let mut want_b: Vec<_> = (0..50).map(heartbeat).collect();
    want_a.sort();
    want_b.sort();
    assert_eq!(at_a, want_a);
    assert_eq!(at_b, want_b);
}

#[tokio::test]
async fn large_message_arrives_whole() {
    let ca = Ca::new("c1");
    let mut a = open(ca.node("a")).await;
    let mut b = open(ca.node("b")).await;

    // Exactly the cap: far beyond a datagram, still one message.
    let mut noise = Noise(0x1a46_e000_0000_0001);
    let big = noise.bytes(MAX_MESSAGE_SIZE);
    a.socket.send(b.addr, big.clone());
    let (from, peer, bytes) = recv(&mut b).await;
    assert_eq!((from, peer.as_str()), (a.addr, "a"));
    assert!(bytes == big, "large message corrupted");
    assert_eq!(get(&b.stats.decode_errors), 0);

    // One byte more is refused by the sender itself, and counted.
    a.socket.send(b.addr, vec![0; MAX_MESSAGE_SIZE + 1]);
    assert_eq!(get(&a.stats.send_dropped), 1);
    a.socket.send(b.addr, heartbeat(1));
    let (_, _, bytes) = recv(&mut b).await;
    assert_eq!(bytes, heartbeat(1));
    assert_eq!(get(&b.stats.messages_in), 2);
}

#[tokio::test]
async fn foreign_ca_cannot_deliver() {
    let good_ca = Ca::new("c1");
    let foreign_ca = Ca::new("c1");
    let mut good = open(good_ca.node("good")).await;
    let mut foreign = open(foreign_ca.node("intruder")).await;

    foreign.socket.send(good.addr, heartbeat(1));
    wait_for("good node to see the rejected handshake", || {
        get(&good.stats.rejected_peers) >= 1
    })
    .await;
    assert_quiet(&mut good).await;
    assert_eq!(get(&foreign.stats.messages_out), 0);

    // The other direction: the good node refuses to talk to the intruder.
    let before = get(&good.stats.rejected_peers);
    good.socket.send(foreign.addr, heartbeat(2));
    wait_for("good node to reject the foreign server", || {
        get(&good.stats.rejected_peers) > before
    })
    .await;
    assert_quiet(&mut foreign).await;
    assert_eq!(get(&good.stats.messages_out), 0);
    assert_eq!(get(&good.stats.messages_in), 0);
}

fn refused(node: &Node, reason: skein_tls::Refusal) -> u64 {
    node.transport.tls().stats().refused(reason)
}

#[tokio::test]
async fn peer_of_another_cluster_cannot_deliver() {
    // Same CA, but the certificate names another cluster: refused at the
    // handshake, in both directions, before any message.
    let ca = Ca::new("c1");
    let mut good = open(ca.node("good")).await;
    let mut other = open(ca.node_of_cluster("other", "c2")).await;
    use skein_tls::Refusal::WrongCluster;

    other.socket.send(good.addr, heartbeat(1));
    // The dialler checks the server first: `other` refuses `good`.
    wait_for("other to refuse good's certificate", || {
        refused(&other, WrongCluster) >= 1
    })
    .await;
    good.socket.send(other.addr, heartbeat(2));
    wait_for("good to refuse other's certificate", || {
        refused(&good, WrongCluster) >= 1 && get(&good.stats.rejected_peers) >= 1
    })
    .await;
    assert_quiet(&mut good).await;
    assert_quiet(&mut other).await;
    assert_eq!(get(&good.stats.messages_out), 0);
    assert_eq!(get(&other.stats.messages_out), 0);
}

#[tokio::test]
async fn peer_of_another_cluster_is_refused_by_the_server() {
    // A client that does not check the server at all (a rogue): the
    // server's own check refuses it.
    let ca = Ca::new("c1");
    let mut good = open(ca.node("good")).await;
    let other = ca.node_of_cluster("other", "c2");
    let endpoint = raw_client(rogue_client_config(&other));
    let conn = try_send_raw(&endpoint, good.addr).await;
    wait_for("good to refuse the client", || {
        refused(&good, skein_tls::Refusal::WrongCluster) >= 1
    })
    .await;
    if let Some(conn) = conn {
        timeout(DEADLINE, conn.closed())
            .await
            .expect("refused connection stays open");
    }
    assert_quiet(&mut good).await;
}

#[tokio::test]
async fn revoked_peer_cannot_deliver() {
    let ca = Ca::new("c1");
    let revoked = ca.node("revoked");
    let tls = ca.node("good");
    ca.revoke("revoked", &tls);
    let tls = Arc::new(NodeTls::load(tls.dir()).unwrap());
    assert_eq!(tls.crl_count(), 1);
    let mut good = open(tls).await;
    let mut revoked = open(revoked).await;
    use skein_tls::Refusal::Revoked;

    revoked.socket.send(good.addr, heartbeat(1));
    wait_for("good to refuse the revoked client", || {
        refused(&good, Revoked) >= 1
    })
    .await;
    good.socket.send(revoked.addr, heartbeat(2));
    wait_for("good to refuse the revoked server", || {
        refused(&good, Revoked) >= 2
    })
    .await;
    assert_quiet(&mut good).await;
    assert_quiet(&mut revoked).await;
    assert_eq!(get(&good.stats.messages_out), 0);
    assert_eq!(get(&good.stats.messages_in), 0);
}

#[tokio::test]
async fn reloaded_crl_closes_and_refuses_the_revoked_peer() {
    let ca = Ca::new("c1");
    let mut good = open(ca.node("good")).await;
    let mut peer = open(ca.node("peer")).await;
    let mut bystander = open(ca.node("bystander")).await;

    // Both talk to good over connections they dialled.
    peer.socket.send(good.addr, heartbeat(1));
    assert_eq!(recv(&mut good).await.1, "peer");
    bystander.socket.send(good.addr, heartbeat(2));
    assert_eq!(recv(&mut good).await.1, "bystander");

    // The operator revokes `peer` and copies the CRL to good, which
    // reloads (what the agent does on a change or SIGHUP).
    let tls = good.transport.tls();
    ca.revoke("peer", &tls);
    let mut watch = skein_tls::TlsWatch::new();
    let reloaded = Arc::new(watch.poll(&tls, true).expect("a change").unwrap());
    assert_eq!(reloaded.crl_count(), 1);
    assert_eq!(tls.stats().reloads_ok.load(Ordering::Relaxed), 1);
    let closed = good.transport.apply_tls(reloaded).unwrap();
    assert_eq!(closed, 1, "the revoked peer's open connection is closed");

    // The revoked peer's next attempts need a new connection: refused.
    let start = Instant::now();
    while refused(&good, skein_tls::Refusal::Revoked) == 0 {
        assert!(start.elapsed() < DEADLINE, "revoked peer never redialled");
        peer.socket.send(good.addr, heartbeat(3));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // good refuses to dial it too.
    good.socket.send(peer.addr, heartbeat(4));
    wait_for("good to refuse dialling the revoked peer", || {
        refused(&good, skein_tls::Refusal::Revoked) >= 2
    })
    .await;
    assert_quiet(&mut peer).await;

    // The bystander's connection survived the reload and still delivers.
    bystander.socket.send(good.addr, heartbeat(5));
    let (_, from, bytes) = recv(&mut good).await;
    assert_eq!((from.as_str(), bytes), ("bystander", heartbeat(5)));
    assert_quiet(&mut good).await;
}

/// A client config presenting `tls`'s certificate that trusts any server.
fn rogue_client_config(tls: &NodeTls) -> rustls::ClientConfig {
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(tls.dir().join(skein_tls::NODE_CERT_FILE))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(tls.dir().join(skein_tls::NODE_KEY_FILE))
            .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![skein_tls::ALPN.to_vec()];
    config
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
        let _ = stream.write_all(&heartbeat(1)).await;
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

    sender.socket.send(good.addr, heartbeat(3));
    let (from, peer, bytes) = recv(&mut good).await;
    assert_eq!((from, peer.as_str()), (sender.addr, "sender"));
    assert_eq!(bytes, heartbeat(3));
    // And the reply path on the same endpoint still works.
    good.socket.send(sender.addr, sync_start());
    let (from, peer, bytes) = recv(&mut sender).await;
    assert_eq!((from, peer.as_str()), (good.addr, "good"));
    assert_eq!(bytes, sync_start());
    assert_eq!(get(&good.stats.messages_in), 1);
}

#[tokio::test]
async fn oversized_streams_are_counted_and_skipped() {
    let ca = Ca::new("c1");
    let mut good = open(ca.node("good")).await;
    // An authenticated peer sending odd streams (a bug, or another version).
    // The transport does not decode: whatever fits is delivered as is, and
    // only a stream over the cap is dropped (and counted) there.
    let endpoint = raw_client(ca.node("buggy").client_config().unwrap());
    let conn = endpoint
        .connect(good.addr, skein_tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let junk = b"junk".to_vec();
    for payload in [junk.clone(), Vec::new(), vec![0u8; MAX_MESSAGE_SIZE + 1]] {
        let mut stream = conn.open_uni().await.unwrap();
        // The oversized one may be stopped by the receiver mid-write.
        let _ = stream.write_all(&payload).await;
        let _ = stream.finish();
    }
    wait_for("the oversized stream to be counted", || {
        get(&good.stats.decode_errors) == 1
    })
    .await;

    let mut stream = conn.open_uni().await.unwrap();
    stream.write_all(&heartbeat(9)).await.unwrap();
    stream.finish().unwrap();
    // Streams are read concurrently, so the three deliveries may come in
    // any order; the oversized one never does.
    let mut got = Vec::new();
    for _ in 0..3 {
        let (_, peer, bytes) = recv(&mut good).await;
        assert_eq!(peer, "buggy");
        got.push(bytes);
    }
    got.sort();
    assert_eq!(got, vec![Vec::new(), heartbeat(9), junk]);
    assert_quiet(&mut good).await;
    assert_eq!(get(&good.stats.decode_errors), 1);
    assert_eq!(get(&good.stats.messages_in), 3);
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
    for i in 0..500 {
        a.socket.send(dead, heartbeat(i));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(get(&a.stats.send_dropped) > 0);

    a.socket.send(b.addr, heartbeat(4));
    let (from, peer, bytes) = recv(&mut b).await;
    assert_eq!((from, peer.as_str(), bytes), (a.addr, "a", heartbeat(4)));
    b.socket.send(a.addr, sync_start());
    let (from, peer, _) = recv(&mut a).await;
    assert_eq!((from, peer.as_str()), (b.addr, "b"));
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
async fn peer_restart_on_same_address() {
    let ca = Ca::new("c1");
    let mut a = open(ca.node("a")).await;
    let b_tls = ca.node("b");
    let mut b = open(b_tls.clone()).await;
    a.socket.send(b.addr, heartbeat(1));
    let (from, peer, _) = recv(&mut b).await;
    assert_eq!((from, peer.as_str()), (a.addr, "a"));

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
        a.socket.send(b_addr, heartbeat(2));
        if let Ok(received) = timeout(Duration::from_millis(200), b_socket.recv()).await {
            let (from, peer, bytes) = received.unwrap();
            assert_eq!((from, &*peer, bytes), (a.addr, "a", heartbeat(2)));
            break;
        }
        assert!(start.elapsed() < DEADLINE, "restarted peer never reached");
    }
}

/// Starts one gossip node on a free loopback port, seeded with `seeds`.
async fn start_gossip(ca: &Ca, name: &str, seeds: &[SocketAddr]) -> (Gossip, SocketAddr) {
    init_tracing();
    let tls = ca.node(name);
    let transport = QuicTransport::new(tls.clone(), Arc::new(GossipStats::default()));
    let mut last_err = None;
    for _ in 0..5 {
        let addr = free_addr();
        let config = GossipConfig {
            node_id: name.to_owned(),
            generation: 1,
            listen: addr,
            advertise: addr,
            seeds: seeds.iter().map(SocketAddr::to_string).collect(),
            cluster_id: "c1".to_owned(),
            gossip_interval: Duration::from_millis(100),
            suspect_after: Duration::from_secs(2),
            dead_node_grace: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(3600),
        };
        let signer = tls.gossip_signer().unwrap();
        let initial = vec![("meta".to_owned(), format!("{name} at {addr}"))];
        match Gossip::start(config, &transport, signer, initial, &[]).await {
            Ok(gossip) => return (gossip, addr),
            Err(err) => last_err = Some(err),
        }
    }
    panic!("could not start gossip for {name}: {last_err:?}");
}

/// Polls every node's snapshot until `cond` holds for all of them.
async fn wait_all<F>(what: &str, nodes: &[Gossip], cond: F)
where
    F: Fn(&skein_gossip::ClusterSnapshot) -> bool,
{
    let start = Instant::now();
    loop {
        let mut lagging = Vec::new();
        for g in nodes {
            g.ensure_running().unwrap();
            if !cond(&g.snapshot().await) {
                lagging.push(g.node_id().to_owned());
            }
        }
        if lagging.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; still waiting on {lagging:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn gossip_nodes_find_each_other() {
    let ca = Ca::new("c1");
    let names = ["n1", "n2", "n3", "n4"];
    let mut nodes = Vec::new();
    let mut seeds = Vec::new();
    for name in names {
        // Each newcomer knows only the nodes started before it; n1 none.
        let (gossip, addr) = start_gossip(&ca, name, &seeds).await;
        assert_eq!(gossip.node_id(), name);
        nodes.push(gossip);
        seeds.push(addr);
    }

    let all_alive = |snap: &skein_gossip::ClusterSnapshot| {
        let statuses: BTreeMap<&str, NodeStatus> = snap
            .liveness
            .iter()
            .map(|(id, l)| (id.as_str(), l.status))
            .collect();
        statuses == names.iter().map(|n| (*n, NodeStatus::Alive)).collect()
    };
    wait_all("every node to hold all four alive", &nodes, all_alive).await;
    // Every node's initial keyspace travelled with its announcement.
    wait_all("every node's metadata everywhere", &nodes, |snap| {
        names.iter().zip(&seeds).all(|(n, addr)| {
            snap.replica.node(n).and_then(|ks| ks.get("meta"))
                == Some(format!("{n} at {addr}").as_str())
        })
    })
    .await;
    for g in &nodes {
        let live = g.live_node_ids().await;
        assert_eq!(live, names.map(str::to_owned).to_vec());
    }

    // A write on one node reaches every replica.
    nodes[2].set("greeting", "hello").await;
    wait_all("the write to reach every replica", &nodes, |snap| {
        snap.replica.node("n3").and_then(|ks| ks.get("greeting")) == Some("hello")
    })
    .await;
    // And so does its deletion.
    nodes[2].delete("greeting").await;
    wait_all("the delete to reach every replica", &nodes, |snap| {
        snap.replica
            .node("n3")
            .is_some_and(|ks| ks.get("greeting").is_none() && ks.get("meta").is_some())
    })
    .await;

    for g in &nodes {
        let stats = g.stats();
        assert_eq!(get(&stats.rejected_peers), 0, "{}", g.node_id());
        assert_eq!(get(&stats.decode_errors), 0, "{}", g.node_id());
        assert_eq!(get(&stats.bad_signature), 0, "{}", g.node_id());
        assert_eq!(get(&stats.bad_identity), 0, "{}", g.node_id());
        assert_eq!(get(&stats.wrong_cluster), 0, "{}", g.node_id());
        assert_eq!(get(&stats.version_mismatch), 0, "{}", g.node_id());
        assert!(get(&stats.messages_in) > 0, "{}", g.node_id());
    }
    // All alive still: nobody was suspected on the way.
    wait_all("all still alive", &nodes, all_alive).await;
}

#[tokio::test]
async fn gossip_of_another_cluster_is_refused() {
    // Same CA, other `--cluster-id`: the handshakes succeed, the messages are
    // refused by tag, and the two never merge.
    let ca = Ca::new("c1");
    let (a, a_addr) = start_gossip(&ca, "a", &[]).await;
    let tls = ca.node("b");
    let transport = QuicTransport::new(tls.clone(), Arc::new(GossipStats::default()));
    let mut b = None;
    for _ in 0..5 {
        let addr = free_addr();
        let config = GossipConfig {
            node_id: "b".to_owned(),
            generation: 1,
            listen: addr,
            advertise: addr,
            seeds: vec![a_addr.to_string()],
            cluster_id: "other".to_owned(),
            gossip_interval: Duration::from_millis(100),
            suspect_after: Duration::from_secs(2),
            dead_node_grace: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(3600),
        };
        let signer = tls.gossip_signer().unwrap();
        if let Ok(g) = Gossip::start(config, &transport, signer, Vec::new(), &[]).await {
            b = Some(g);
            break;
        }
    }
    let b = b.expect("could not start gossip for b");
    wait_for("a to refuse b's join", || {
        get(&a.stats().wrong_cluster) >= 1
    })
    .await;
    for g in [&a, &b] {
        let snap = g.snapshot().await;
        let ids: Vec<&str> = snap.liveness.keys().map(String::as_str).collect();
        assert_eq!(ids, [g.node_id()]);
    }
}
