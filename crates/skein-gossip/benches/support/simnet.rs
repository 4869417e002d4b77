//! An in-memory network for chitchat, lossy and delayed, with per-node
//! counters.
//!
//! Unlike chitchat's own `ChannelTransport` it delays every message (base
//! latency ± uniform jitter, so messages can overtake each other as on a
//! real network), drops a configurable fraction of them, and can "kill" a
//! node so that none of its traffic gets through any more. Messages really
//! are serialized on send and deserialized on receipt: the byte counts are
//! those of the wire format, and the CPU cost of encoding is paid as it would
//! be in production.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Simulated nodes listen on 127.0.0.1:(BASE_PORT + index); the address is
/// only a name here, nothing is bound.
const BASE_PORT: u16 = 20_000;

/// xorshift64*: tiny, fast, deterministic and plenty for choosing which
/// messages to drop. Not for anything security-related.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds (seed, seed + 1, ...)
        // give unrelated streams and a zero seed is still usable.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift(z | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    pub latency: Duration,
    /// Each message's delay is `latency ± jitter`, uniformly.
    pub jitter: Duration,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Bytes a node may have queued towards it (sent, not yet received)
    /// before further messages to it are dropped, like a full UDP receive
    /// buffer. Without a bound, an overloaded run queues gigabytes.
    pub recv_buffer: u64,
    pub seed: u64,
}

/// Traffic counters of one node. Bytes are chitchat's serialized message
/// sizes (what a UDP datagram would carry, without IP/UDP headers).
#[derive(Debug, Default)]
pub struct NodeCounters {
    pub bytes_out: AtomicU64,
    pub msgs_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub msgs_in: AtomicU64,
    /// Messages this node sent that the network lost.
    pub lost: AtomicU64,
    /// Messages to this node dropped because its receive buffer was full:
    /// the node (i.e. the CPU) is not keeping up.
    pub overflowed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CounterSnapshot {
    pub bytes_out: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub msgs_in: u64,
    pub lost: u64,
    pub overflowed: u64,
}

impl NodeCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            msgs_out: self.msgs_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            msgs_in: self.msgs_in.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }
}

struct Packet {
    deliver_at: Instant,
    /// Tie-breaker so that equal deadlines keep send order.
    seq: u64,
    from: SocketAddr,
    from_index: usize,
    bytes: Vec<u8>,
}

impl PartialEq for Packet {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Packet {}
impl PartialOrd for Packet {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Packet {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.deliver_at, self.seq).cmp(&(other.deliver_at, other.seq))
    }
}

#[derive(Default)]
struct Slot {
    /// Present while the node's socket is open.
    inbox: Mutex<Option<mpsc::UnboundedSender<Packet>>>,
    killed: AtomicBool,
    /// Bytes sent to this node and not yet received by it.
    queued: AtomicU64,
    counters: NodeCounters,
}

struct Inner {
    config: NetConfig,
    slots: Vec<Slot>,
    seq: AtomicU64,
}

/// The network shared by all simulated nodes; clones are handles to it.
#[derive(Clone)]
pub struct SimNet {
    inner: Arc<Inner>,
}

impl SimNet {
    pub fn new(config: NetConfig, nodes: usize) -> Self {
        assert!(
            nodes <= usize::from(u16::MAX - BASE_PORT),
            "too many nodes for the simulated address space"
        );
        SimNet {
            inner: Arc::new(Inner {
                config,
                slots: (0..nodes).map(|_| Slot::default()).collect(),
                seq: AtomicU64::new(0),
            }),
        }
    }

    pub fn addr(index: usize) -> SocketAddr {
        let port = BASE_PORT + u16::try_from(index).expect("node index fits the port range");
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    fn index(&self, addr: SocketAddr) -> Option<usize> {
        let index = usize::from(addr.port().checked_sub(BASE_PORT)?);
        (addr.ip() == Ipv4Addr::LOCALHOST && index < self.inner.slots.len()).then_some(index)
    }

    pub fn counters(&self, index: usize) -> &NodeCounters {
        &self.inner.slots[index].counters
    }

    pub fn is_killed(&self, index: usize) -> bool {
        self.inner.slots[index].killed.load(Ordering::Relaxed)
    }

    /// Cuts a node off: from now on nothing it sends or is sent arrives,
    /// including messages already in flight — as if it lost power.
    pub fn kill(&self, index: usize) {
        let slot = &self.inner.slots[index];
        slot.killed.store(true, Ordering::SeqCst);
        *slot.inbox.lock().expect("inbox lock poisoned") = None;
    }
}

#[async_trait]
impl Transport for SimNet {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let Some(index) = self.index(listen_addr) else {
            bail!("{listen_addr} is not an address of the simulated network");
        };
        let slot = &self.inner.slots[index];
        if slot.killed.load(Ordering::SeqCst) {
            bail!("node {index} was killed");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut inbox = slot.inbox.lock().expect("inbox lock poisoned");
            if inbox.is_some() {
                bail!("address in use: {listen_addr}");
            }
            *inbox = Some(tx);
        }
        Ok(Box::new(SimSocket {
            net: self.clone(),
            index,
            addr: listen_addr,
            rng: XorShift::new(self.inner.config.seed ^ (index as u64).wrapping_mul(0x1000_0001)),
            rx,
            pending: BinaryHeap::new(),
        }))
    }
}

struct SimSocket {
    net: SimNet,
    index: usize,
    addr: SocketAddr,
    /// Per-sender stream: the loss/jitter draws of a node depend only on the
    /// seed and on what that node sends, not on how tasks interleave.
    rng: XorShift,
    rx: mpsc::UnboundedReceiver<Packet>,
    /// Received but not yet due, earliest first.
    pending: BinaryHeap<Reverse<Packet>>,
}

impl SimSocket {
    fn killed(&self) -> bool {
        self.net.is_killed(self.index)
    }

    fn delay(&mut self) -> Duration {
        let config = &self.net.inner.config;
        let jitter = config.jitter.as_secs_f64() * (2.0 * self.rng.next_f64() - 1.0);
        Duration::from_secs_f64((config.latency.as_secs_f64() + jitter).max(0.0))
    }
}

#[async_trait]
impl Socket for SimSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        if self.killed() {
            return Ok(());
        }
        // Draw both numbers for every message so that one node's stream of
        // draws does not depend on whether its earlier messages were lost.
        let lost = self.rng.next_f64() < self.net.inner.config.loss;
        let delay = self.delay();
        let bytes = msg.serialize_to_vec();
        let counters = &self.net.inner.slots[self.index].counters;
        counters
            .bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        counters.msgs_out.fetch_add(1, Ordering::Relaxed);
        if lost {
            counters.lost.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Sending to an unknown or closed address succeeds and goes nowhere,
        // like UDP.
        let Some(to_index) = self.net.index(to) else {
            return Ok(());
        };
        let slot = &self.net.inner.slots[to_index];
        let len = bytes.len() as u64;
        if slot.queued.load(Ordering::Relaxed) + len > self.net.inner.config.recv_buffer {
            slot.counters.overflowed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let inbox = slot.inbox.lock().expect("inbox lock poisoned");
        if let Some(inbox) = inbox.as_ref() {
            slot.queued.fetch_add(len, Ordering::Relaxed);
            let packet = Packet {
                deliver_at: Instant::now() + delay,
                seq: self.net.inner.seq.fetch_add(1, Ordering::Relaxed),
                from: self.addr,
                from_index: self.index,
                bytes,
            };
            // The receiver may have just closed; that is a lost message too.
            let _ = inbox.send(packet);
        }
        Ok(())
    }

    /// Cancel-safe, as chitchat's server loop requires: every packet taken
    /// off the channel is in `pending` before the next await point.
    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            while let Ok(packet) = self.rx.try_recv() {
                self.pending.push(Reverse(packet));
            }
            let now = Instant::now();
            if self.pending.peek().is_some_and(|p| p.0.deliver_at <= now) {
                let Reverse(packet) = self.pending.pop().expect("peeked just above");
                self.net.inner.slots[self.index]
                    .queued
                    .fetch_sub(packet.bytes.len() as u64, Ordering::Relaxed);
                if self.killed() || self.net.is_killed(packet.from_index) {
                    continue;
                }
                let mut cursor: &[u8] = &packet.bytes;
                let msg = match ChitchatMessage::deserialize(&mut cursor) {
                    Ok(msg) => msg,
                    // Cannot happen with chitchat's own encoder; dropping
                    // rather than failing mirrors what a UDP socket does.
                    Err(_) => continue,
                };
                let counters = &self.net.inner.slots[self.index].counters;
                counters
                    .bytes_in
                    .fetch_add(packet.bytes.len() as u64, Ordering::Relaxed);
                counters.msgs_in.fetch_add(1, Ordering::Relaxed);
                return Ok((packet.from, msg));
            }
            let next_due = self.pending.peek().map(|p| p.0.deliver_at);
            tokio::select! {
                packet = self.rx.recv() => match packet {
                    Some(packet) => self.pending.push(Reverse(packet)),
                    // Only `kill` closes the inbox while the socket lives.
                    None => bail!("node {} was killed", self.index),
                },
                _ = async {
                    match next_due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        if let Ok(mut inbox) = self.net.inner.slots[self.index].inbox.lock() {
            *inbox = None;
        }
    }
}
