//! The DNS server's IO edge: UDP and TCP listeners around [`respond`], and a
//! forwarder that races the upstreams for names outside the cluster zones
//! (as Spartan did: the first answer wins).
//!
//! Everything a client can make the server hold is bounded: forwarded
//! queries in flight ([`DnsOptions::max_forwards`], then SERVFAIL at once),
//! the sockets they use (a few per upstream, [`crate::upstream`]), TCP
//! connections (how many, how long, how many queries each), and a failing
//! `accept` (out of descriptors) is retried with a backoff, not in a spin.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::answer::{respond, Outcome, Transport};
use crate::records::Records;
use crate::upstream::{randomize_case, Pool, Reply, Rng};
use crate::wire;

/// How long a forwarded query may take before the client gets SERVFAIL.
pub const FORWARD_DEADLINE: Duration = Duration::from_secs(2);
/// Upstreams raced per query.
const RACE: usize = 2;
/// Receive buffer asked for each UDP socket.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Tasks reading each UDP socket. The kernel spreads clients over the
/// SO_REUSEPORT sockets by hashing their address and port, so a few busy
/// clients can land on one socket while another idles; with a single
/// reader that socket is served by one core at a time. A second reader
/// lets the other core help (measured with dns-bench: 4 dnsperf sockets,
/// 2 cores).
const TASKS_PER_SOCKET: usize = 2;
/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// First and longest pause after a failed TCP accept (doubling between).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

#[derive(Default, Debug)]
pub struct DnsStats {
    pub local_answers: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Forwards answered SERVFAIL at once: [`DnsOptions::max_forwards`]
    /// were already waiting on upstreams.
    pub forward_saturated: AtomicU64,
    /// Upstream replies dropped: an id not in flight (forged, or late), or
    /// not an answer to the question asked (name, letter case, type,
    /// class). Never passed on, never cached.
    pub rejected_replies: AtomicU64,
    /// TCP connections closed at once: [`DnsOptions::max_tcp_connections`]
    /// were open.
    pub tcp_refused: AtomicU64,
    /// Failed TCP accepts (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
}

/// The server's limits. `Default` is what the agent runs with.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// Forwarded queries waiting on upstreams at once (UDP and TCP);
    /// beyond this a query is answered SERVFAIL at once.
    pub max_forwards: usize,
    /// Randomise the letter case of forwarded names (DNS 0x20) and accept
    /// only replies that echo it exactly.
    pub randomize_case: bool,
    /// Open DNS-over-TCP connections per listening address; more are
    /// closed as soon as accepted.
    pub max_tcp_connections: usize,
    /// A TCP connection that sends nothing for this long is closed.
    pub tcp_idle: Duration,
    /// A TCP connection is closed this long after it was accepted, busy
    /// or not.
    pub tcp_lifetime: Duration,
    /// Queries answered per TCP connection before it is closed.
    pub tcp_max_queries: usize,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            max_forwards: 512,
            randomize_case: true,
            max_tcp_connections: 256,
            tcp_idle: TCP_IDLE,
            tcp_lifetime: Duration::from_secs(30),
            tcp_max_queries: 1000,
        }
    }
}

/// One upstream resolver and what we have seen of it.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub answers: AtomicU64,
    pub failures: AtomicU64,
    /// Sum of answer latencies, for the mean in /metrics.
    pub latency_us: AtomicU64,
    /// A failing upstream is tried after the others until this time (ms
    /// since the server started): demoted, not dropped, so it recovers.
    demoted_until_ms: AtomicU64,
    /// The sockets queries to it go out on.
    pool: Pool,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream {
            addr,
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            demoted_until_ms: AtomicU64::new(0),
            pool: Pool::new(addr),
        })
    }
}

/// How long a failed upstream goes to the back of the line.
const DEMOTION: Duration = Duration::from_secs(10);

/// Where to forward: per-zone upstreams (longest suffix wins) and the rest.
#[derive(Debug, Default)]
pub struct Forwarders {
    pub default: Vec<Arc<Upstream>>,
    pub zones: Vec<(String, Vec<Arc<Upstream>>)>,
}

impl Forwarders {
    pub fn new(default: &[SocketAddr], zones: &[(String, Vec<SocketAddr>)]) -> Forwarders {
        let mut zones: Vec<(String, Vec<Arc<Upstream>>)> = zones
            .iter()
            .map(|(z, addrs)| {
                let mut z = z.trim_end_matches('.').to_ascii_lowercase();
                z.push('.');
                (z, addrs.iter().map(|a| Upstream::new(*a)).collect())
            })
            .collect();
        // Longest zone first, so the most specific one matches.
        zones.sort_by_key(|(z, _)| std::cmp::Reverse(z.len()));
        Forwarders {
            default: default.iter().map(|a| Upstream::new(*a)).collect(),
            zones,
        }
    }

    /// The upstreams for `qname` (lowercase fqdn), healthy ones first.
    fn pick(&self, qname: &str, now_ms: u64) -> Vec<Arc<Upstream>> {
        let list = self
            .zones
            .iter()
            .find(|(z, _)| qname == z || qname.ends_with(&format!(".{z}")))
            .map_or(&self.default, |(_, l)| l);
        let mut ordered: Vec<Arc<Upstream>> = list.clone();
        // Stable: configuration order among equals.
        ordered.sort_by_key(|u| u.demoted_until_ms.load(Ordering::Relaxed) > now_ms);
        ordered
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.default
            .iter()
            .chain(self.zones.iter().flat_map(|(_, l)| l.iter()))
    }
}

pub struct DnsServer {
    records: watch::Receiver<Arc<Records>>,
    pub forwarders: Forwarders,
    started: std::time::Instant,
    pub stats: Arc<DnsStats>,
    /// Forwarded answers in wire format, shared by every socket.
    cache: std::sync::Mutex<crate::cache::Cache>,
    /// UDP sockets per address (one per core).
    sockets: usize,
    options: DnsOptions,
    /// One permit per forwarded query in flight.
    forwards: Arc<Semaphore>,
    /// Upstream query ids and letter case.
    rng: Rng,
}

/// Rotation variants kept per question (answers still spread over the
/// first ROTATIONS positions).
const ROTATIONS: usize = 12;
/// Questions whose encoded cluster answers are kept, over all UDP socket
/// readers (each keeps its share; a single-record answer is one entry of
/// ≈ 200 bytes). 48,000 lets each of the 4 readers of a 2-core machine
/// keep 12,000: 10,000 names asked in turn stay encoded (dns-bench `many`:
/// 0.81× Unbound's q/s with 20,000, 1.20× with this, for 3.5 MB more
/// resident memory; ≈ 9 MB at most).
const ENCODED_MAX: usize = 48_000;
/// Encoded cluster answers a TCP connection keeps for itself.
const ENCODED_TCP: usize = 64;

/// One question's encoded answers, by rotation ([`variants`] of them; a
/// slot not yet asked is `None`).
type Variants = Box<[Option<Box<[u8]>>]>;

/// What one UDP socket loop (or one TCP connection) keeps to itself, so
/// that answering takes no shared lock and allocates nothing once warm:
/// its view of the records, its rotation counter, the cluster answers it
/// has encoded, and buffers.
struct Worker {
    records: watch::Receiver<Arc<Records>>,
    /// The record set last answered from. Weak: a worker that gets no
    /// queries must not keep a replaced set alive (megabytes at 10,000
    /// tasks, replica-mem-bench).
    current: Weak<Records>,
    /// The digest of the set `encoded` was built from.
    digest: u64,
    rotation: usize,
    /// Encoded cluster answers by (transport, request bytes after the id):
    /// the same question asked again is a lookup and an id patch instead of
    /// building and encoding a message. Each question keeps one answer per
    /// rotation its answer can take ([`variants`]; one for a single
    /// record), not one per rotation slot, so a name costs one entry. Emptied
    /// whenever the records change (not merely get republished).
    encoded: HashMap<Box<[u8]>, Variants>,
    capacity: usize,
    /// Scratch for lookup keys.
    key: Vec<u8>,
    /// The reply being sent.
    out: Vec<u8>,
}

impl Worker {
    fn new(records: &watch::Receiver<Arc<Records>>, capacity: usize) -> Worker {
        let mut records = records.clone();
        let current = records.borrow_and_update().clone();
        Worker {
            records,
            current: Arc::downgrade(&current),
            digest: current.digest(),
            rotation: 0,
            encoded: HashMap::new(),
            capacity: capacity.max(1),
            key: Vec::with_capacity(512),
            out: Vec::with_capacity(4096),
        }
    }

    /// Takes the records the watch holds now. The agent republishes them
    /// on every refresh, changed or not: stored answers are dropped only
    /// when they would differ.
    fn refresh(&mut self) -> Arc<Records> {
        let next = self.records.borrow_and_update().clone();
        if next.digest() != self.digest {
            self.encoded.clear();
            self.digest = next.digest();
        }
        self.current = Arc::downgrade(&next);
        next
    }
}

/// How many different answers rotation makes of `reply` (encoded with
/// some rotation): one per answer record up to [`ROTATIONS`] (answers are
/// rotated by `rotate % records`, so slot `rotate % variants` always holds
/// the same answer), one without answers. A truncated reply says nothing of
/// the records: every slot then stands for itself.
fn variants(reply: &[u8]) -> usize {
    let truncated = reply.get(2).is_some_and(|b| b & 0x02 != 0);
    let answers = reply
        .get(6..8)
        .map_or(0, |n| usize::from(u16::from_be_bytes([n[0], n[1]])));
    if truncated {
        ROTATIONS
    } else {
        answers.clamp(1, ROTATIONS)
    }
}

/// Makes room for one more encoded question: drops one (whichever the map
/// yields first). Emptying the whole map instead would, with more names
/// asked in turn than it holds, drop every answer before it is asked again.
fn evict_one(encoded: &mut HashMap<Box<[u8]>, Variants>) {
    if let Some(key) = encoded.keys().next().cloned() {
        encoded.remove(&key);
    }
}

/// What [`DnsServer::local`] made of a message.
enum Local {
    /// The reply is in the worker's `out`.
    Reply,
    Drop,
    /// A question for a name outside our zones.
    Forward(Box<Message>),
}

/// Forwarded answers kept at most (each a few hundred bytes).
pub const CACHE_ENTRIES: usize = 10_000;

impl DnsServer {
    pub fn new(records: watch::Receiver<Arc<Records>>, forwarders: Forwarders) -> Arc<Self> {
        Self::with_options(records, forwarders, DnsOptions::default())
    }

    pub fn with_options(
        records: watch::Receiver<Arc<Records>>,
        forwarders: Forwarders,
        options: DnsOptions,
    ) -> Arc<Self> {
        Arc::new(DnsServer {
            forwards: Arc::new(Semaphore::new(
                options.max_forwards.clamp(1, Semaphore::MAX_PERMITS),
            )),
            rng: Rng::default(),
            options,
            records,
            forwarders,
            started: std::time::Instant::now(),
            stats: Arc::default(),
            cache: std::sync::Mutex::new(crate::cache::Cache::new(CACHE_ENTRIES)),
            // One UDP socket per core on the same address (SO_REUSEPORT):
            // the kernel spreads queries over them and each has its own loop.
            sockets: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 8),
        })
    }

    /// Binds every address (UDP and TCP) and serves until the runtime ends.
    pub async fn listen(self: &Arc<Self>, addrs: &[SocketAddr]) -> std::io::Result<()> {
        for addr in addrs {
            self.listen_on(*addr).await?;
        }
        Ok(())
    }

    /// Binds one address (UDP and TCP) and serves it until the runtime
    /// ends; returns the address bound (port 0 picks one free for both).
    pub async fn listen_on(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        // With port 0 the first UDP socket picks the port; the other UDP
        // sockets and TCP take the same one (TCP may find it taken: try
        // another).
        let mut attempts = if addr.port() == 0 { 8 } else { 1 };
        let (udp, tcp, bound) = loop {
            let first = reuseport_udp(addr)?;
            let bound = first.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => break (first, tcp, bound),
                Err(e) if attempts <= 1 => return Err(e),
                Err(_) => attempts -= 1,
            }
        };
        let mut sockets = vec![Arc::new(udp)];
        for _ in 1..self.sockets {
            sockets.push(Arc::new(reuseport_udp(bound)?));
        }
        for udp in sockets {
            for _ in 0..TASKS_PER_SOCKET {
                tokio::spawn(self.clone().serve_udp(udp.clone()));
            }
        }
        tokio::spawn(self.clone().serve_tcp(tcp));
        tracing::info!(
            addr = %bound,
            upstreams = ?self.forwarders.default.iter().map(|u| u.addr).collect::<Vec<_>>(),
            zones = self.forwarders.zones.len(),
            "DNS listening (UDP and TCP)"
        );
        Ok(bound)
    }

    /// Answers without waiting on anything: a cluster name, or a forwarded
    /// name in the cache. A miss is decoded by [`respond`], which hands it
    /// back to forward.
    fn immediate(&self, w: &mut Worker, request: &[u8], transport: Transport) -> Local {
        if let Some(q) = wire::parse_query(request) {
            if !wire::in_our_zones(q.name()) && self.cached(&q, transport, &mut w.out) {
                return Local::Reply;
            }
        }
        self.local(w, request, transport)
    }

    /// Answers from the cluster records.
    fn local(&self, w: &mut Worker, request: &[u8], transport: Transport) -> Local {
        // A stored answer is good while the records have not changed since
        // the worker last looked (a load of the watch's version): the hit
        // below touches nothing shared but a counter, not even the records'
        // reference count (upgrading the weak reference on every query
        // made every reader write that one cache line).
        if w.records.has_changed().unwrap_or(false) {
            w.refresh();
        }
        let rotate = w.rotation % ROTATIONS;
        w.rotation = w.rotation.wrapping_add(1);
        // Transport changes the answer (truncation), so it is part of the key.
        w.key.clear();
        w.key.push(transport as u8);
        w.key
            .extend_from_slice(request.get(2..).unwrap_or_default());
        if request.len() >= 12 {
            if let Some(cached) = w
                .encoded
                .get(&w.key[..])
                .and_then(|v| v[rotate % v.len()].as_deref())
            {
                w.out.clear();
                w.out.extend_from_slice(cached);
                w.out[..2].copy_from_slice(&request[..2]);
                self.count_local(&w.out);
                return Local::Reply;
            }
        }
        // Not stored: build it from the records (still the watch's
        // current set, which keeps them alive, unless replaced just now).
        let held = match w.current.upgrade() {
            Some(records) => records,
            None => w.refresh(),
        };
        match respond(&held, request, transport, rotate) {
            Outcome::Reply(bytes) => {
                if bytes.len() >= 12 && request.len() >= 12 {
                    if !w.encoded.contains_key(&w.key[..]) {
                        if w.encoded.len() >= w.capacity {
                            evict_one(&mut w.encoded);
                        }
                        w.encoded
                            .insert(w.key.as_slice().into(), vec![None; variants(&bytes)].into());
                    }
                    if let Some(v) = w.encoded.get_mut(&w.key[..]) {
                        let slot = rotate % v.len();
                        v[slot] = Some(bytes.as_slice().into());
                    }
                }
                self.count_local(&bytes);
                w.out = bytes;
                Local::Reply
            }
            Outcome::Drop => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Local::Drop
            }
            Outcome::Forward(query) => Local::Forward(query),
        }
    }

    fn count_local(&self, reply: &[u8]) {
        // RCODE is the low nibble of the 4th byte: no need to decode.
        let nx = reply.get(3).is_some_and(|b| b & 0x0F == 3);
        let counter = if nx {
            &self.stats.nxdomain
        } else {
            &self.stats.local_answers
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes a cached answer to a forwarded question into `out`.
    fn cached(&self, question: &wire::Question, transport: Transport, out: &mut Vec<u8>) -> bool {
        let limit = (transport == Transport::Udp).then(|| question.udp_limit());
        let hit = self
            .cache
            .lock()
            .is_ok_and(|mut c| c.get(question, std::time::Instant::now(), limit, out));
        if hit {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// A place among the forwarded queries in flight; `None` (counted)
    /// when they are all taken.
    fn forward_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.forwards.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.stats.forward_saturated.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// SERVFAIL to `query`, counted.
    fn servfail(&self, query: &Message) -> Vec<u8> {
        self.stats.servfail.fetch_add(1, Ordering::Relaxed);
        let mut fail = Message::error_msg(
            query.metadata.id,
            query.metadata.op_code,
            ResponseCode::ServFail,
        );
        fail.add_queries(query.queries.iter().cloned());
        fail.to_vec().unwrap_or_default()
    }

    /// The answer for a name outside our zones: from the cache, else from
    /// the fastest upstream (then cached), else SERVFAIL. The caller holds
    /// a [`DnsServer::forward_permit`].
    async fn forwarded(&self, query: &Message, request: &[u8], transport: Transport) -> Vec<u8> {
        let question = wire::parse_query(request);
        if let Some(q) = &question {
            let mut out = Vec::new();
            if self.cached(q, transport, &mut out) {
                return out;
            }
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let qname = query
            .queries
            .first()
            .map(|q| q.name().to_ascii().to_ascii_lowercase())
            .unwrap_or_default();
        if let Some(bytes) = self.forward(request, &qname).await {
            // Queries the wire reader declines (several records, TSIG...)
            // are not cached.
            if let Some(q) = &question {
                if let Ok(mut c) = self.cache.lock() {
                    c.put(q, &bytes, std::time::Instant::now());
                }
            }
            return bytes;
        }
        self.servfail(query)
    }

    /// Sends the query to up to [`RACE`] upstreams at once (healthy ones
    /// first), each under its own random id and letter case, and returns
    /// the first answer to it, within the deadline, with the client's id
    /// and question put back. Upstreams that fail or stay silent are
    /// demoted.
    async fn forward(&self, request: &[u8], qname: &str) -> Option<Vec<u8>> {
        // The question the answers must echo: one, its name uncompressed.
        let question_end = wire::question_end(request)?;
        let now_ms = self.started.elapsed().as_millis() as u64;
        let raced: Vec<Arc<Upstream>> = self
            .forwarders
            .pick(qname, now_ms)
            .into_iter()
            .take(RACE)
            .collect();
        if raced.is_empty() {
            return None;
        }
        let demote = |u: &Upstream| {
            u.failures.fetch_add(1, Ordering::Relaxed);
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            let until = self.started.elapsed() + DEMOTION;
            u.demoted_until_ms
                .store(until.as_millis() as u64, Ordering::Relaxed);
        };
        let (tx, mut rx) = mpsc::channel(RACE);
        // Dropping these (on return) forgets the queries still waiting.
        let mut in_flight = Vec::with_capacity(raced.len());
        let mut reported = vec![false; raced.len()];
        let start = std::time::Instant::now();
        for (i, upstream) in raced.iter().enumerate() {
            let mut query = request.to_vec();
            if self.options.randomize_case {
                if let Some(name) = query.get_mut(wire::HEADER..question_end - 4) {
                    randomize_case(name, &self.rng);
                }
            }
            let sent = upstream
                .pool
                .send(query, question_end, i, tx.clone(), &self.stats, &self.rng)
                .await;
            match sent {
                Ok(q) => in_flight.push(q),
                Err(e) => {
                    tracing::debug!(upstream = %upstream.addr, error = %e, "cannot ask upstream");
                    reported[i] = true;
                    demote(upstream);
                }
            }
        }
        drop(tx);
        let deadline = tokio::time::sleep(FORWARD_DEADLINE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    for (u, done) in raced.iter().zip(&reported) {
                        if !done {
                            tracing::debug!(upstream = %u.addr, "upstream silent past the deadline");
                            demote(u);
                        }
                    }
                    return None;
                }
                next = rx.recv() => match next {
                    Some((i, Reply::Answer(mut answer))) => {
                        let u = &raced[i];
                        u.answers.fetch_add(1, Ordering::Relaxed);
                        let took = start.elapsed().as_micros() as u64;
                        u.latency_us.fetch_add(took, Ordering::Relaxed);
                        u.demoted_until_ms.store(0, Ordering::Relaxed);
                        // The answer echoes the question as sent (checked
                        // byte for byte): the client gets its own id and
                        // letter case back.
                        answer[..2].copy_from_slice(&request[..2]);
                        if let (Some(theirs), Some(ours)) = (
                            answer.get_mut(wire::HEADER..question_end),
                            request.get(wire::HEADER..question_end),
                        ) {
                            theirs.copy_from_slice(ours);
                        }
                        return Some(answer);
                    }
                    Some((i, Reply::Failed)) => {
                        if !std::mem::replace(&mut reported[i], true) {
                            tracing::debug!(upstream = %raced[i].addr, "upstream refused");
                            demote(&raced[i]);
                        }
                    }
                    None => return None, // every upstream failed
                },
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut w = Worker::new(
            &self.records,
            ENCODED_MAX / (self.sockets * TASKS_PER_SOCKET),
        );
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive error");
                    continue;
                }
            };
            // Cluster answers and cache hits inline (no task per query);
            // only questions for upstreams get a task, so a slow upstream
            // holds up nothing.
            match self.immediate(&mut w, &buf[..n], Transport::Udp) {
                Local::Reply => {
                    let _ = socket.send_to(&w.out, from).await;
                }
                Local::Drop => {}
                Local::Forward(query) => {
                    // A task per forwarded query, as many as there are
                    // permits; beyond, SERVFAIL at once.
                    let Some(permit) = self.forward_permit() else {
                        let _ = socket.send_to(&self.servfail(&query), from).await;
                        continue;
                    };
                    let request = buf[..n].to_vec();
                    let (server, socket) = (self.clone(), socket.clone());
                    tokio::spawn(async move {
                        let reply = server.forwarded(&query, &request, Transport::Udp).await;
                        drop(permit);
                        let _ = socket.send_to(&reply, from).await;
                    });
                }
            }
        }
    }

    /// Accepts TCP clients up to [`DnsOptions::max_tcp_connections`]
    /// (more are closed at once), each served for at most
    /// [`DnsOptions::tcp_lifetime`]. A failing accept (out of file
    /// descriptors: the connection stays in the backlog and every accept
    /// fails at once) is retried after a pause that doubles up to
    /// [`ACCEPT_BACKOFF_MAX`], not in a loop that spins a core.
    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let open = Arc::new(Semaphore::new(
            self.options
                .max_tcp_connections
                .clamp(1, Semaphore::MAX_PERMITS),
        ));
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    // A client gone before it was accepted: nothing to
                    // wait for.
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) {
                        continue;
                    }
                    if backoff == ACCEPT_BACKOFF_MIN {
                        tracing::warn!(error = %e, "DNS over TCP: accept failed, backing off");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            backoff = ACCEPT_BACKOFF_MIN;
            let Ok(permit) = open.clone().try_acquire_owned() else {
                self.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "DNS over TCP: connection limit reached, closing");
                drop(stream);
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                let lifetime = server.options.tcp_lifetime;
                let _ = tokio::time::timeout(lifetime, server.serve_tcp_client(stream)).await;
                drop(permit);
            });
        }
    }

    /// One TCP client: queries in turn, until it goes idle, has asked
    /// [`DnsOptions::tcp_max_queries`], or errs (its lifetime is enforced
    /// by the caller).
    async fn serve_tcp_client(self: Arc<Self>, mut stream: TcpStream) {
        let mut w = Worker::new(&self.records, ENCODED_TCP);
        let idle = self.options.tcp_idle;
        for _ in 0..self.options.tcp_max_queries {
            let mut len = [0u8; 2];
            match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return, // idle, closed or broken
            }
            let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
            match tokio::time::timeout(idle, stream.read_exact(&mut request)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let reply = match self.immediate(&mut w, &request, Transport::Tcp) {
                Local::Reply => std::mem::take(&mut w.out),
                Local::Drop => continue,
                Local::Forward(query) => match self.forward_permit() {
                    Some(_permit) => self.forwarded(&query, &request, Transport::Tcp).await,
                    None => self.servfail(&query),
                },
            };
            let Ok(n) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = n.to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}

fn reuseport_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    // Room for bursts: with the default (~200 KB, a few hundred small
    // datagrams) a burst from a few busy clients hashed to one socket
    // overflows it and queries are lost. Capped by net.core.rmem_max.
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the DNS socket's receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The nameservers of a resolv.conf, minus our own listen addresses (to
/// avoid forwarding to ourselves).
pub fn upstreams_from_resolv_conf(text: &str, ours: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| !ours.contains(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    fn records(ip: [u8; 4]) -> Arc<Records> {
        let mut r = Records::builder();
        r.add("app.marathon.mesos.", crate::RData::A { ip: ip.into() });
        Arc::new(r.build())
    }

    fn ask(server: &DnsServer, w: &mut Worker, id: u16) -> Message {
        ask_for(server, w, id, "app.marathon.mesos.")
    }

    fn ask_for(server: &DnsServer, w: &mut Worker, id: u16, name: &str) -> Message {
        let mut q = Message::query();
        q.metadata.id = id;
        q.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        let request = q.to_vec().expect("encode");
        assert!(matches!(
            server.immediate(w, &request, Transport::Udp),
            Local::Reply
        ));
        Message::from_vec(&w.out).expect("reply")
    }

    #[test]
    fn encoded_answers_follow_the_records_not_their_republishing() {
        let (tx, rx) = watch::channel(records([10, 0, 0, 1]));
        let server = DnsServer::new(rx, Forwarders::default());
        let mut w = Worker::new(&server.records, 100);
        let first = ask(&server, &mut w, 1);
        assert_eq!(first.answers.len(), 1);
        for id in 2..=ROTATIONS as u16 {
            ask(&server, &mut w, id);
        }
        assert_eq!(w.encoded.len(), 1, "one entry per question");
        assert_eq!(
            w.encoded.values().next().map(|v| v.len()),
            Some(1),
            "a single record has one rotation"
        );
        let again = ask(&server, &mut w, 99);
        assert_eq!(again.metadata.id, 99, "a stored answer gets the query's id");
        assert_eq!(again.answers, first.answers);
        // The same records published again: nothing is dropped.
        tx.send_replace(records([10, 0, 0, 1]));
        ask(&server, &mut w, 100);
        assert_eq!(w.encoded.len(), 1);
        // Changed records: the new address, at once.
        tx.send_replace(records([10, 0, 0, 2]));
        let changed = ask(&server, &mut w, 4);
        assert_eq!(
            changed.answers[0].data,
            hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A([10, 0, 0, 2].into()))
        );
        assert_eq!(w.encoded.len(), 1);
    }

    #[test]
    fn encoded_answers_still_rotate() {
        let mut r = Records::builder();
        for i in 1..=3u8 {
            r.add(
                "app.marathon.mesos.",
                crate::RData::A {
                    ip: [10, 0, 0, i].into(),
                },
            );
        }
        let (_tx, rx) = watch::channel(Arc::new(r.build()));
        let server = DnsServer::new(rx, Forwarders::default());
        let mut w = Worker::new(&server.records, 100);
        let mut firsts = Vec::new();
        for id in 0..3 * ROTATIONS as u16 {
            let reply = ask(&server, &mut w, id);
            assert_eq!(reply.answers.len(), 3);
            // Built or stored, the answer for a slot is the one respond
            // gives for that rotation.
            let rotate = usize::from(id) % ROTATIONS;
            let fresh = match respond(
                &w.current.upgrade().expect("records"),
                &{
                    let mut q = Message::query();
                    q.metadata.id = id;
                    q.add_query(Query::query(
                        Name::from_ascii("app.marathon.mesos.").expect("name"),
                        RecordType::A,
                    ));
                    q.to_vec().expect("encode")
                },
                Transport::Udp,
                rotate,
            ) {
                Outcome::Reply(b) => Message::from_vec(&b).expect("reply"),
                other => panic!("{other:?}"),
            };
            assert_eq!(reply.answers, fresh.answers, "query {id}");
            firsts.push(reply.answers[0].data.clone());
        }
        firsts.sort_by_key(|d| format!("{d:?}"));
        firsts.dedup();
        assert_eq!(firsts.len(), 3, "every address comes first in turn");
        assert_eq!(w.encoded.len(), 1);
        assert_eq!(w.encoded.values().next().map(|v| v.len()), Some(3));
    }

    #[test]
    fn a_full_worker_drops_one_answer_not_all() {
        let mut r = Records::builder();
        for i in 0..20u8 {
            r.add(
                &format!("app{i}.marathon.mesos."),
                crate::RData::A {
                    ip: [10, 0, 0, i].into(),
                },
            );
        }
        let (_tx, rx) = watch::channel(Arc::new(r.build()));
        let server = DnsServer::new(rx, Forwarders::default());
        let mut w = Worker::new(&server.records, 10);
        for i in 0..20u8 {
            let reply = ask_for(&server, &mut w, 1, &format!("app{i}.marathon.mesos."));
            assert_eq!(
                reply.answers[0].data,
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A([10, 0, 0, i].into()))
            );
            assert_eq!(w.encoded.len(), usize::from(i + 1).min(10));
        }
    }

    #[test]
    fn zones_pick_their_upstreams_and_failing_ones_go_last() {
        let a: SocketAddr = "10.0.0.1:53".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:53".parse().expect("addr");
        let corp: SocketAddr = "10.9.9.9:53".parse().expect("addr");
        let f = Forwarders::new(&[a, b], &[("Corp.Example".to_string(), vec![corp])]);
        let addrs = |v: Vec<Arc<Upstream>>| v.iter().map(|u| u.addr).collect::<Vec<_>>();
        assert_eq!(addrs(f.pick("db.corp.example.", 0)), [corp]);
        assert_eq!(addrs(f.pick("corp.example.", 0)), [corp]);
        assert_eq!(addrs(f.pick("notcorp.example.", 0)), [a, b]);
        f.default[0]
            .demoted_until_ms
            .store(5_000, Ordering::Relaxed);
        assert_eq!(
            addrs(f.pick("x.", 1_000)),
            [b, a],
            "demoted while the demotion lasts"
        );
        assert_eq!(addrs(f.pick("x.", 6_000)), [a, b], "and forgiven after");
    }

    #[test]
    fn resolv_conf_upstreams_skip_ourselves() {
        let ours: Vec<SocketAddr> = vec!["127.0.0.1:53".parse().expect("addr")];
        let text =
            "# comment\nnameserver 127.0.0.1\nnameserver 10.0.0.2\nsearch x\nnameserver bogus\n";
        assert_eq!(
            upstreams_from_resolv_conf(text, &ours),
            vec!["10.0.0.2:53".parse::<SocketAddr>().expect("addr")]
        );
    }
}
