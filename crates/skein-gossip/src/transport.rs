//! Gossip messages over mutually authenticated QUIC.
//!
//! One [`quinn::Endpoint`], bound to the gossip listen address, both accepts
//! and dials. Because dialled connections leave from the listen address, the
//! remote address a receiver sees *is* the sender's gossip address.
//!
//! Every message travels on its own unidirectional stream of a cached
//! per-peer connection (QUIC datagrams are capped near 1.2 KB, syncs are
//! not), and arrives tagged with the node id of the certificate the peer
//! presented: the protocol core trusts that, and nothing a message says
//! about its sender. `send` never waits on the network: it only enqueues
//! the message for a per-peer task that owns dialling and writing. A dead
//! peer thus costs a full queue and dropped messages — which gossip
//! tolerates — instead of a stalled protocol loop.
//!
//! New TLS material (a renewed certificate, a CRL) is switched to with
//! [`QuicTransport::apply_tls`]: new connections, either way, use it, and
//! open connections whose peer it refuses (a revoked certificate) are
//! closed; the others keep the keys they agreed on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, ConnectionError, Endpoint, IdleTimeout, RecvStream, TransportConfig, VarInt,
};
use rustls::pki_types::CertificateDer;
use skein_tls::NodeTls;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

/// Largest message accepted, in either direction (the core cuts its syncs
/// below this). There is no compression: bytes read are bytes decoded.
pub const MAX_MESSAGE_SIZE: usize = 4 << 20;
/// Streams a peer may have open on one connection at once: bounds what one
/// connection can make us buffer (this × `MAX_MESSAGE_SIZE`).
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Connections (handshaking or open) the endpoint takes at once; more are
/// refused and counted.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections one address (host) may hold at once: a node needs one or
/// two (each side may dial); more is a flood, refused and counted.
pub const MAX_CONNECTIONS_PER_HOST: usize = 8;

/// Messages waiting for one peer. Several gossip rounds' worth; beyond that
/// the peer is slow or dead and older state is about to be superseded anyway.
const PEER_QUEUE_CAPACITY: usize = 64;
/// Messages waiting for the protocol loop's `recv`. When full, stream readers
/// wait, which pushes back on senders through QUIC flow control.
const RECV_QUEUE_CAPACITY: usize = 1024;
/// Keeps idle connections (and NAT/conntrack state) alive between rounds.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// A connection silent for this long (keep-alives included) is dead.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a handshake, well below the idle timeout: a peer that does not
/// answer within this is treated as down until the redial backoff expires.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on writing or reading one message. Gossip older than this is stale,
/// and a connection that cannot move one small message in this time is sick.
const STREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection replaced by a newer one to the same address is closed if it
/// is older than this (see `Node::register`).
const REPLACE_AFTER: Duration = Duration::from_secs(1);
const MIN_REDIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Short enough that a restarted node is gossiped with again within a few
/// rounds (it will usually dial us first anyway).
const MAX_REDIAL_BACKOFF: Duration = Duration::from_secs(5);
/// A peer task with nothing to send for this long exits; the next `send` to
/// that peer starts a new one. Keeps departed peers from pinning tasks.
const PEER_TASK_IDLE: Duration = Duration::from_secs(60);

/// Application close codes (peers only log them).
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_REJECTED: u32 = 1;
const CLOSE_UNHEALTHY: u32 = 2;
const CLOSE_REPLACED: u32 = 3;

/// Transport counters, shared with whoever exports metrics.
#[derive(Debug, Default)]
pub struct GossipStats {
    /// Payload bytes of messages received (before decoding).
    pub bytes_in: AtomicU64,
    /// Payload bytes of messages written to a stream.
    pub bytes_out: AtomicU64,
    /// Messages received and handed to the protocol loop.
    pub messages_in: AtomicU64,
    /// Messages written to a stream.
    pub messages_out: AtomicU64,
    /// Messages dropped on the sending side: peer queue full, peer
    /// unreachable (or in redial backoff), write failure, oversized.
    pub send_dropped: AtomicU64,
    /// Received messages that were too long or undecodable (other
    /// versions and clusters are counted apart).
    pub decode_errors: AtomicU64,
    /// Handshakes that failed on authentication, whichever side's TLS
    /// refused (unknown CA, no client certificate, wrong ALPN), plus
    /// connections refused after the handshake for the same reasons. Dead or
    /// unreachable peers are not counted here.
    pub rejected_peers: AtomicU64,
    /// Incoming connections refused because the endpoint, or the peer's
    /// host, was at its cap.
    pub refused_connections: AtomicU64,
    /// Streams a peer opened and did not finish in time (discarded).
    pub stalled_streams: AtomicU64,
    /// Messages of another wire version (a peer running another release).
    pub version_mismatch: AtomicU64,
    /// Messages of another cluster (same CA, other `--cluster-id`).
    pub wrong_cluster: AtomicU64,
    /// Facts refused by the protocol core, by reason (forged signatures,
    /// unverifiable identities, caps).
    pub bad_signature: AtomicU64,
    pub bad_identity: AtomicU64,
    pub unknown_origin: AtomicU64,
    pub not_sender: AtomicU64,
    pub over_cap: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Gossip over QUIC with mutual TLS from the cluster CA.
pub struct QuicTransport {
    tls: Mutex<Arc<NodeTls>>,
    stats: Arc<GossipStats>,
    /// The endpoint once open, for [`QuicTransport::apply_tls`].
    node: Mutex<Weak<Node>>,
}

/// Why the gossip endpoint could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS: {0}")]
    Tls(#[from] skein_tls::TlsError),
    #[error("TLS configuration unusable for QUIC: {0}")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("failed to bind {addr}/UDP for gossip: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no async runtime for QUIC")]
    NoRuntime,
    #[error("invalid QUIC transport setting: {0}")]
    Config(String),
    #[error("gossip QUIC endpoint closed")]
    Closed,
}

impl QuicTransport {
    pub fn new(tls: Arc<NodeTls>, stats: Arc<GossipStats>) -> Self {
        QuicTransport {
            tls: Mutex::new(tls),
            stats,
            node: Mutex::new(Weak::new()),
        }
    }

    /// The TLS material in use.
    pub fn tls(&self) -> Arc<NodeTls> {
        lock(&self.tls).clone()
    }

    /// Switches to new TLS material: the open endpoint (if any) accepts and
    /// dials with it from now on, and every open connection whose peer it
    /// refuses is closed. Returns how many were closed.
    pub fn apply_tls(&self, tls: Arc<NodeTls>) -> Result<usize, TransportError> {
        let configs = Configs::new(&tls)?;
        *lock(&self.tls) = tls.clone();
        let Some(node) = lock(&self.node).upgrade() else {
            return Ok(0);
        };
        node.endpoint.set_server_config(Some(configs.server));
        *lock(&node.client_config) = configs.client;
        *lock(&node.tls) = tls.clone();
        let open: Vec<Connection> = lock(&node.live).values().cloned().collect();
        let mut closed = 0;
        for conn in open {
            let Some(certs) = peer_certs(&conn) else {
                continue;
            };
            if let Err(err) = tls.check_peer(&certs) {
                let remote = canonical(conn.remote_address());
                warn!(%remote, reason = %format!("{err:#}"), "closing gossip connection: the new TLS material refuses the peer");
                conn.close(VarInt::from_u32(CLOSE_REJECTED), b"certificate refused");
                bump(&self.stats.rejected_peers, 1);
                closed += 1;
            }
        }
        Ok(closed)
    }
}

/// The quinn configs made from one set of TLS material.
struct Configs {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
}

impl Configs {
    fn new(tls: &NodeTls) -> Result<Configs, TransportError> {
        let transport = Arc::new(transport_config()?);
        let server_crypto = QuicServerConfig::try_from(tls.server_config()?)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        // The remote address is where replies go; it must not change under
        // an established connection.
        server.migration(false);
        let client_crypto = QuicClientConfig::try_from(tls.client_config()?)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        Ok(Configs { server, client })
    }
}

/// The certificates a connection's peer presented at its handshake.
fn peer_certs(conn: &Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
}

impl QuicTransport {
    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }
}

impl QuicTransport {
    /// Binds the gossip endpoint.
    pub async fn open(&self, listen_addr: SocketAddr) -> Result<QuicSocket, TransportError> {
        let tls = self.tls();
        let Configs {
            server: server_config,
            client: client_config,
        } = Configs::new(&tls)?;

        // A reset key that survives restarts (see `stateless_reset_secret`).
        // It stays that of the key at open: a reloaded key does not change it.
        let reset_key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &tls.stateless_reset_secret());
        let socket =
            std::net::UdpSocket::bind(listen_addr).map_err(|source| TransportError::Bind {
                addr: listen_addr,
                source,
            })?;
        let runtime = quinn::default_runtime().ok_or(TransportError::NoRuntime)?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // Packets never exceed the path MTU (discovery stops at 1452 by
        // default), and quinn sizes its receive buffer by this: the default
        // of 65,527 cost 3 MB of the agent's memory (replica-mem-bench).
        endpoint_config
            .max_udp_payload_size(MAX_UDP_PAYLOAD)
            .map_err(|e| TransportError::Config(format!("max UDP payload: {e}")))?;
        let endpoint = Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
            .map_err(|source| TransportError::Bind {
                addr: listen_addr,
                source,
            })?;

        let node = Arc::new(Node {
            endpoint,
            client_config: Mutex::new(client_config),
            tls: Mutex::new(tls.clone()),
            stats: self.stats.clone(),
            conns: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            per_host: Mutex::new(HashMap::new()),
        });
        *lock(&self.node) = Arc::downgrade(&node);
        let (inbox_tx, inbox) = mpsc::channel(RECV_QUEUE_CAPACITY);
        let deliver = inbox_tx.downgrade();
        let mut tasks = JoinSet::new();
        // The accept loop owns the only long-lived strong sender: once the
        // endpoint closes, it and all connection readers end, and `recv`
        // reports the transport as broken.
        tasks.spawn(node.clone().accept_loop(inbox_tx));
        debug!(%listen_addr, node_id = tls.node_id(), "gossip QUIC endpoint open");
        Ok(QuicSocket {
            node,
            peers: HashMap::new(),
            inbox,
            deliver,
            tasks,
        })
    }
}

/// The largest UDP payload accepted: an Ethernet MTU's worth.
const MAX_UDP_PAYLOAD: u16 = 1500;

fn transport_config() -> Result<TransportConfig, TransportError> {
    let mut config = TransportConfig::default();
    config.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    config.max_idle_timeout(Some(
        IdleTimeout::try_from(MAX_IDLE_TIMEOUT)
            .map_err(|e| TransportError::Config(format!("idle timeout: {e}")))?,
    ));
    // Only uni streams are used; refuse what we never read.
    config.datagram_receive_buffer_size(None);
    config.max_concurrent_bidi_streams(VarInt::from_u32(0));
    config.max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    Ok(config)
}

/// A message as it arrived: from which address, the node id of the
/// certificate its sender presented, and its bytes.
pub type Delivery = (SocketAddr, Arc<str>, Vec<u8>);

/// State shared by the socket and its background tasks.
struct Node {
    endpoint: Endpoint,
    /// What new outgoing connections use; replaced by `apply_tls`.
    client_config: Mutex<quinn::ClientConfig>,
    /// The material in use, which `register` checks every new peer against.
    tls: Mutex<Arc<NodeTls>>,
    stats: Arc<GossipStats>,
    /// Live connections by (canonical) peer address, incoming or dialled:
    /// whichever exists is reused for sending, so two nodes usually share
    /// one connection.
    conns: Mutex<HashMap<SocketAddr, (Connection, Instant)>>,
    /// Every authenticated connection still being read, by stable id (a
    /// peer may have two): what `apply_tls` re-checks.
    live: Mutex<HashMap<usize, Connection>>,
    /// Live incoming connections per peer host.
    per_host: Mutex<HashMap<std::net::IpAddr, usize>>,
}

impl Node {
    async fn accept_loop(self: Arc<Self>, deliver: mpsc::Sender<Delivery>) {
        // `accept` only yields `None` once the endpoint is closed; quinn
        // itself drops garbage datagrams and malformed packets.
        while let Some(incoming) = self.endpoint.accept().await {
            let remote = canonical(incoming.remote_address());
            let host = remote.ip();
            let from_host = *lock(&self.per_host).get(&host).unwrap_or(&0);
            if self.endpoint.open_connections() >= MAX_CONNECTIONS
                || from_host >= MAX_CONNECTIONS_PER_HOST
            {
                bump(&self.stats.refused_connections, 1);
                debug!(%remote, "gossip connection refused: at the connection cap");
                incoming.refuse();
                continue;
            }
            *lock(&self.per_host).entry(host).or_insert(0) += 1;
            let node = self.clone();
            let deliver = deliver.clone();
            // Handshakes run concurrently so a slow one can't hold up others.
            tokio::spawn(async move {
                let _slot = HostSlot(node.clone(), host);
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(err) => return node.handshake_failed(remote, "incoming", &err),
                };
                let Some(peer_id) = node.authenticate(&conn, remote, "incoming") else {
                    return;
                };
                debug!(%remote, %peer_id, "accepted gossip connection");
                if !node.register(remote, &conn) {
                    return;
                }
                node.read_connection(conn, remote, peer_id.into(), deliver)
                    .await;
            });
        }
        debug!("gossip endpoint closed; accept loop done");
    }

    /// Dials `peer` and starts reading from the new connection (the peer may
    /// send over it). `None` if the peer is unreachable or refused us.
    async fn dial(
        self: &Arc<Self>,
        peer: SocketAddr,
        deliver: &mpsc::WeakSender<Delivery>,
    ) -> Option<Connection> {
        let config = lock(&self.client_config).clone();
        let connecting = match self
            .endpoint
            .connect_with(config, peer, skein_tls::SERVER_NAME)
        {
            Ok(connecting) => connecting,
            Err(err) => {
                warn!(%peer, error = %err, "cannot dial gossip peer");
                return None;
            }
        };
        let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => {
                self.handshake_failed(peer, "outgoing", &err);
                return None;
            }
            Err(_) => {
                debug!(%peer, "gossip dial timed out");
                return None;
            }
        };
        let peer_id = self.authenticate(&conn, peer, "outgoing")?;
        // No strong sender left means the socket is gone; don't start a
        // reader that nobody would hear.
        let deliver = deliver.upgrade()?;
        debug!(%peer, %peer_id, "dialled gossip peer");
        if !self.register(peer, &conn) {
            return None;
        }
        tokio::spawn(
            self.clone()
                .read_connection(conn.clone(), peer, peer_id.into(), deliver),
        );
        Some(conn)
    }

    /// rustls has verified the chain; this checks what it leaves to us (ALPN
    /// negotiated, a certificate present) and extracts the peer's node id.
    /// On failure the connection is closed and counted as rejected.
    fn authenticate(&self, conn: &Connection, remote: SocketAddr, dir: &str) -> Option<String> {
        let alpn_ok = conn
            .handshake_data()
            .and_then(|data| data.downcast::<HandshakeData>().ok())
            .is_some_and(|data| data.protocol.as_deref() == Some(skein_tls::ALPN));
        let peer_id = peer_certs(conn)
            .and_then(|certs| certs.first().and_then(|c| skein_tls::peer_node_id(c)));
        let reason = match (alpn_ok, peer_id) {
            (true, Some(peer_id)) => return Some(peer_id),
            (false, _) => "wrong or missing ALPN",
            (true, None) => "no peer certificate or no node id in it",
        };
        warn!(%remote, direction = dir, reason, "rejected gossip peer");
        bump(&self.stats.rejected_peers, 1);
        conn.close(VarInt::from_u32(CLOSE_REJECTED), reason.as_bytes());
        None
    }

    fn handshake_failed(&self, remote: SocketAddr, dir: &str, err: &ConnectionError) {
        if is_rejection(err) {
            warn!(%remote, direction = dir, reason = %err, "rejected gossip peer (TLS handshake failed)");
            bump(&self.stats.rejected_peers, 1);
        } else {
            // Timeouts and resets are what dead peers look like; the protocol's
            // failure detector reports those, no need to shout here.
            debug!(%remote, direction = dir, error = %err, "gossip handshake failed");
        }
    }

    /// Makes `conn` the one used for `peer`. An older connection it
    /// replaces is closed: a peer that dials us anew has usually restarted,
    /// and writes into its previous life would only wait out their timeout
    /// (holding up everything queued behind them). Two nodes dialling each
    /// other at the same moment keep both, so neither loses its fresh one.
    ///
    /// Returns false, having closed it, if the TLS material in use now
    /// refuses the peer: its handshake may have started before
    /// `apply_tls` switched material, and finished after that re-checked
    /// the open connections. (Inserted into `live` first, then checked:
    /// either this check sees the new material or `apply_tls` sees this
    /// connection.)
    fn register(&self, peer: SocketAddr, conn: &Connection) -> bool {
        let now = Instant::now();
        lock(&self.live).insert(conn.stable_id(), conn.clone());
        let tls = lock(&self.tls).clone();
        if let Some(Err(err)) = peer_certs(conn).map(|certs| tls.check_peer(&certs)) {
            warn!(%peer, reason = %format!("{err:#}"), "rejected gossip peer (refused by reloaded TLS material)");
            bump(&self.stats.rejected_peers, 1);
            conn.close(VarInt::from_u32(CLOSE_REJECTED), b"certificate refused");
            lock(&self.live).remove(&conn.stable_id());
            return false;
        }
        let old = lock(&self.conns).insert(peer, (conn.clone(), now));
        if let Some((old, since)) = old {
            if old.stable_id() != conn.stable_id() && now.duration_since(since) > REPLACE_AFTER {
                old.close(
                    VarInt::from_u32(CLOSE_REPLACED),
                    b"replaced by a newer connection",
                );
            }
        }
        true
    }

    /// Forgets `peer`'s cached connection if it is still the given one (a
    /// newer connection may have replaced it meanwhile).
    fn forget(&self, peer: SocketAddr, stable_id: usize) {
        let mut conns = lock(&self.conns);
        if conns
            .get(&peer)
            .is_some_and(|(c, _)| c.stable_id() == stable_id)
        {
            conns.remove(&peer);
        }
    }

    fn cached(&self, peer: SocketAddr) -> Option<Connection> {
        let mut conns = lock(&self.conns);
        match conns.get(&peer) {
            Some((conn, _)) if conn.close_reason().is_none() => Some(conn.clone()),
            Some(_) => {
                conns.remove(&peer);
                None
            }
            None => None,
        }
    }

    /// Reads every uni stream of `conn` as one message until it closes.
    async fn read_connection(
        self: Arc<Self>,
        conn: Connection,
        peer: SocketAddr,
        peer_id: Arc<str>,
        deliver: mpsc::Sender<Delivery>,
    ) {
        loop {
            match conn.accept_uni().await {
                // One task per stream: a message whose packets were lost
                // must not delay the ones behind it. The peer's stream limit
                // bounds how many run at once.
                Ok(stream) => {
                    tokio::spawn(read_message(
                        self.stats.clone(),
                        stream,
                        peer,
                        peer_id.clone(),
                        deliver.clone(),
                    ));
                }
                Err(err) => {
                    debug!(%peer, reason = %err, "gossip connection closed");
                    break;
                }
            }
        }
        lock(&self.live).remove(&conn.stable_id());
        self.forget(peer, conn.stable_id());
    }

    /// Per-peer sender: drains `queue`, dialling the peer when there is no
    /// live connection to it.
    async fn run_peer(
        self: Arc<Self>,
        peer: SocketAddr,
        mut queue: mpsc::Receiver<Bytes>,
        deliver: mpsc::WeakSender<Delivery>,
    ) {
        let mut backoff = MIN_REDIAL_BACKOFF;
        let mut next_dial = Instant::now();
        loop {
            let payload = match tokio::time::timeout(PEER_TASK_IDLE, queue.recv()).await {
                Ok(Some(payload)) => payload,
                // Socket dropped, or nothing to say to this peer for a while.
                Ok(None) | Err(_) => return,
            };
            // Looked up per message rather than kept here: the map holds the
            // newest live connection either side opened, so when a restarted
            // peer dials us, we switch to that at once instead of writing
            // into the old, dead connection until it times out.
            let current = match self.cached(peer) {
                Some(current) => current,
                None if Instant::now() < next_dial => {
                    trace!(%peer, "gossip peer in redial backoff; dropping message");
                    bump(&self.stats.send_dropped, 1);
                    continue;
                }
                None => match self.dial(peer, &deliver).await {
                    Some(current) => current,
                    None => {
                        next_dial = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_REDIAL_BACKOFF);
                        bump(&self.stats.send_dropped, 1);
                        continue;
                    }
                },
            };
            match tokio::time::timeout(STREAM_TIMEOUT, write_message(&current, &payload)).await {
                Ok(Ok(())) => {
                    bump(&self.stats.messages_out, 1);
                    bump(&self.stats.bytes_out, payload.len() as u64);
                    backoff = MIN_REDIAL_BACKOFF;
                }
                result => {
                    let error = match result {
                        Ok(Err(err)) => err,
                        _ => "timed out".to_owned(),
                    };
                    debug!(%peer, %error, "gossip send failed; dropping connection");
                    bump(&self.stats.send_dropped, 1);
                    // Close rather than just forget: a connection that can't
                    // carry one small message is no use to the peer either.
                    current.close(VarInt::from_u32(CLOSE_UNHEALTHY), b"send failed");
                    self.forget(peer, current.stable_id());
                    next_dial = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_REDIAL_BACKOFF);
                }
            }
        }
    }
}

/// Sends one message on its own stream; the error is only logged.
async fn write_message(conn: &Connection, payload: &[u8]) -> Result<(), String> {
    let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
    stream.write_all(payload).await.map_err(|e| e.to_string())?;
    // quinn keeps delivering a finished stream after the handle is dropped.
    stream.finish().map_err(|e| e.to_string())?;
    Ok(())
}

async fn read_message(
    stats: Arc<GossipStats>,
    mut stream: RecvStream,
    peer: SocketAddr,
    peer_id: Arc<str>,
    deliver: mpsc::Sender<Delivery>,
) {
    let read = tokio::time::timeout(STREAM_TIMEOUT, stream.read_to_end(MAX_MESSAGE_SIZE));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            debug!(%peer, "gossip message exceeds {MAX_MESSAGE_SIZE} bytes; discarded");
            bump(&stats.decode_errors, 1);
            let _ = stream.stop(VarInt::from_u32(0));
            return;
        }
        Ok(Err(err)) => {
            // Connection lost or stream reset mid-message: a transport event,
            // not the peer sending garbage.
            debug!(%peer, error = %err, "gossip stream aborted");
            return;
        }
        Err(_) => {
            debug!(%peer, "gossip stream stalled; discarded");
            bump(&stats.stalled_streams, 1);
            let _ = stream.stop(VarInt::from_u32(0));
            return;
        }
    };
    bump(&stats.bytes_in, bytes.len() as u64);
    bump(&stats.messages_in, 1);
    // Err only if the socket is gone; nothing left to do then.
    let _ = deliver.send((peer, peer_id, bytes)).await;
}

/// One incoming connection counted against its host until dropped.
struct HostSlot(Arc<Node>, std::net::IpAddr);

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut per_host = lock(&self.0.per_host);
        if let Some(n) = per_host.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                per_host.remove(&self.1);
            }
        }
    }
}

/// Whether a failed handshake was an authentication refusal (a TLS alert or
/// protocol error from either side) rather than the peer being unreachable.
fn is_rejection(err: &ConnectionError) -> bool {
    match err {
        // Raised locally: our TLS stack (or QUIC layer) refused the peer.
        ConnectionError::TransportError(_) | ConnectionError::VersionMismatch => true,
        // Sent by the peer: crypto error codes are 0x100 + TLS alert.
        ConnectionError::ConnectionClosed(close) => {
            (0x100..0x200).contains(&u64::from(close.error_code))
        }
        _ => false,
    }
}

/// IPv4-mapped IPv6 addresses (seen on a dual-stack socket) are folded to
/// IPv4 so one peer has one address for the protocol and for the caches.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The maps behind these mutexes stay consistent even if a holder panicked
/// (every critical section is a single map operation), so poison is ignored
/// rather than turned into a panic on the gossip path.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The open endpoint: send to an address, receive authenticated messages.
pub struct QuicSocket {
    node: Arc<Node>,
    /// Queue of each peer's sender task.
    peers: HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    inbox: mpsc::Receiver<Delivery>,
    /// Handed to peer tasks for readers of the connections they dial; weak
    /// so that it does not keep `recv` alive after the endpoint closed.
    deliver: mpsc::WeakSender<Delivery>,
    /// Accept loop and peer tasks; dropping the set aborts them.
    tasks: JoinSet<()>,
}

impl QuicSocket {
    fn spawn_peer(&mut self, peer: SocketAddr) -> mpsc::Sender<Bytes> {
        // Reap finished tasks (idle peers) and their dead queues, so that
        // neither grows with every address ever gossiped to.
        let mut reaped = false;
        while let Some(result) = self.tasks.try_join_next() {
            if let Err(err) = result {
                warn!(error = %err, "gossip transport task failed");
            }
            reaped = true;
        }
        if reaped {
            self.peers.retain(|_, queue| !queue.is_closed());
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_CAPACITY);
        self.tasks
            .spawn(self.node.clone().run_peer(peer, rx, self.deliver.clone()));
        self.peers.insert(peer, tx.clone());
        tx
    }
}

impl QuicSocket {
    /// Queues `buf` for `to`. Never waits on the network; see the module docs.
    pub fn send(&mut self, to: SocketAddr, buf: Vec<u8>) {
        let to = canonical(to);
        if buf.len() > MAX_MESSAGE_SIZE {
            warn!(peer = %to, len = buf.len(), "gossip message too large; dropped");
            bump(&self.node.stats.send_dropped, 1);
            return;
        }
        let mut payload = Bytes::from(buf);
        // A second attempt only if the peer's task had just exited (idle).
        for _ in 0..2 {
            let queue = match self.peers.get(&to) {
                Some(queue) => queue.clone(),
                None => self.spawn_peer(to),
            };
            match queue.try_send(payload) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    trace!(peer = %to, "gossip peer queue full; dropping message");
                    break;
                }
                Err(TrySendError::Closed(returned)) => {
                    self.peers.remove(&to);
                    payload = returned;
                }
            }
        }
        bump(&self.node.stats.send_dropped, 1);
    }

    /// The next message from an authenticated peer.
    pub async fn recv(&mut self) -> Result<Delivery, TransportError> {
        self.inbox.recv().await.ok_or(TransportError::Closed)
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.node.endpoint.local_addr().ok()
    }
}

impl Drop for QuicSocket {
    fn drop(&mut self) {
        // Closes every connection at once (peers see a clean close instead
        // of waiting out the idle timeout) and ends the accept loop; the
        // task set aborts the rest when dropped right after.
        self.node
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_folds_mapped_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:62501".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:62501".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:62501".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
