//! The DNS server's IO edge: UDP and TCP listeners around [`respond`], and a
//! forwarder that races the upstreams for names outside the cluster zones
//! (as Spartan did: the first answer wins).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use crate::answer::{respond, Outcome, Transport};
use crate::records::Records;

/// How long a forwarded query may take before the client gets SERVFAIL.
pub const FORWARD_DEADLINE: Duration = Duration::from_secs(2);
/// Upstreams raced per query.
const RACE: usize = 2;
/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);

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
}

impl Upstream {
    fn new(addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream {
            addr,
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            demoted_until_ms: AtomicU64::new(0),
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
    rotation: AtomicU64,
    cache: std::sync::Mutex<crate::cache::Cache>,
    /// Encoded cluster answers by (records version, request bytes after the
    /// id, rotation slot): the same question asked again is a lookup and an
    /// id patch instead of building and encoding a message.
    encoded: std::sync::Mutex<EncodedAnswers>,
}

/// Rotation variants kept per question (answers still spread over the
/// first ROTATIONS positions).
const ROTATIONS: usize = 12;
const ENCODED_MAX: usize = 20_000;

#[derive(Default)]
struct EncodedAnswers {
    /// The record set the entries were built from; holding it (not just its
    /// address) means a later set can never be mistaken for it.
    records: Option<Arc<Records>>,
    map: std::collections::HashMap<(usize, Vec<u8>), Vec<u8>>,
}

/// Forwarded answers kept at most (each a few hundred bytes).
pub const CACHE_ENTRIES: usize = 10_000;

impl DnsServer {
    pub fn new(records: watch::Receiver<Arc<Records>>, forwarders: Forwarders) -> Arc<Self> {
        Arc::new(DnsServer {
            records,
            forwarders,
            started: std::time::Instant::now(),
            stats: Arc::default(),
            rotation: AtomicU64::new(0),
            cache: std::sync::Mutex::new(crate::cache::Cache::new(CACHE_ENTRIES)),
            encoded: std::sync::Mutex::new(EncodedAnswers::default()),
        })
    }

    /// Binds every address (UDP and TCP) and serves until the runtime ends.
    pub async fn listen(self: &Arc<Self>, addrs: &[SocketAddr]) -> std::io::Result<()> {
        // One UDP socket per core on the same address (SO_REUSEPORT): the
        // kernel spreads queries over them and each has its own loop.
        let sockets = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        for addr in addrs {
            for _ in 0..sockets {
                let udp = reuseport_udp(*addr)?;
                tokio::spawn(self.clone().serve_udp(Arc::new(udp)));
            }
            let tcp = TcpListener::bind(addr).await?;
            tokio::spawn(self.clone().serve_tcp(tcp));
            tracing::info!(
                %addr,
                upstreams = ?self.forwarders.default.iter().map(|u| u.addr).collect::<Vec<_>>(),
                zones = self.forwarders.zones.len(),
                "DNS listening (UDP and TCP)"
            );
        }
        Ok(())
    }

    /// Answers one message; `None` means send nothing.
    async fn handle(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.local(request, transport) {
            Ok(reply) => reply,
            Err(query) => Some(self.forwarded(&query, request, transport).await),
        }
    }

    /// Answers from the cluster records without waiting on anything;
    /// `Err` hands back a question to forward.
    fn local(&self, request: &[u8], transport: Transport) -> Result<Option<Vec<u8>>, Box<Message>> {
        let records = self.records.borrow().clone();
        let rotate = self.rotation.fetch_add(1, Ordering::Relaxed) as usize % ROTATIONS;
        // Transport changes the answer (truncation), so it is part of the key.
        let key = (rotate, {
            let mut k = request.get(2..).unwrap_or_default().to_vec();
            k.push(transport as u8);
            k
        });
        if request.len() >= 12 {
            if let Ok(enc) = self.encoded.lock() {
                if enc
                    .records
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(r, &records))
                {
                    if let Some(cached) = enc.map.get(&key) {
                        let mut bytes = cached.clone();
                        bytes[..2].copy_from_slice(&request[..2]);
                        let nx = bytes[3] & 0x0F == 3;
                        let counter = if nx {
                            &self.stats.nxdomain
                        } else {
                            &self.stats.local_answers
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        return Ok(Some(bytes));
                    }
                }
            }
        }
        match respond(&records, request, transport, rotate) {
            Outcome::Reply(bytes) => {
                if bytes.len() >= 12 && request.len() >= 12 {
                    if let Ok(mut enc) = self.encoded.lock() {
                        let same = enc
                            .records
                            .as_ref()
                            .is_some_and(|r| Arc::ptr_eq(r, &records));
                        if !same || enc.map.len() >= ENCODED_MAX {
                            enc.map.clear();
                            enc.records = Some(records.clone());
                        }
                        enc.map.insert(key, bytes.clone());
                    }
                }
                // RCODE is the low nibble of the 4th byte: no need to decode.
                let nx = bytes.get(3).is_some_and(|b| b & 0x0F == 3);
                let counter = if nx {
                    &self.stats.nxdomain
                } else {
                    &self.stats.local_answers
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(Some(bytes))
            }
            Outcome::Drop => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Outcome::Forward(query) => Err(query),
        }
    }

    /// A cached answer to a forwarded question, ready to send.
    fn cached(&self, query: &Message, transport: Transport) -> Option<Vec<u8>> {
        let answer = self
            .cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(query, std::time::Instant::now()))?;
        let bytes = fit(&answer, query, transport)?;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(bytes)
    }

    /// The answer for a name outside our zones: from the cache, else from
    /// the fastest upstream (then cached), else SERVFAIL.
    async fn forwarded(&self, query: &Message, request: &[u8], transport: Transport) -> Vec<u8> {
        if let Some(bytes) = self.cached(query, transport) {
            return bytes;
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let qname = query
            .queries
            .first()
            .map(|q| q.name().to_ascii().to_ascii_lowercase())
            .unwrap_or_default();
        if let Some(bytes) = self.forward(request, &qname).await {
            if let Ok(answer) = Message::from_vec(&bytes) {
                if let Ok(mut c) = self.cache.lock() {
                    c.put(query, &answer, std::time::Instant::now());
                }
            }
            return bytes;
        }
        self.stats.servfail.fetch_add(1, Ordering::Relaxed);
        let mut fail = Message::error_msg(
            query.metadata.id,
            query.metadata.op_code,
            ResponseCode::ServFail,
        );
        fail.add_queries(query.queries.iter().cloned());
        fail.to_vec().unwrap_or_default()
    }

    /// Sends the query to up to [`RACE`] upstreams at once (healthy ones
    /// first) and returns the first answer carrying the query's id, within
    /// the deadline. Upstreams that fail or stay silent are demoted.
    async fn forward(&self, request: &[u8], qname: &str) -> Option<Vec<u8>> {
        if request.len() < 2 {
            return None;
        }
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
        let id = [request[0], request[1]];
        let mut race = tokio::task::JoinSet::new();
        for (i, upstream) in raced.iter().enumerate() {
            let (request, addr) = (request.to_vec(), upstream.addr);
            race.spawn(async move {
                let start = std::time::Instant::now();
                (i, ask_upstream(addr, &request, id).await, start.elapsed())
            });
        }
        let demote = |u: &Upstream| {
            u.failures.fetch_add(1, Ordering::Relaxed);
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            let until = self.started.elapsed() + DEMOTION;
            u.demoted_until_ms
                .store(until.as_millis() as u64, Ordering::Relaxed);
        };
        let mut reported = vec![false; raced.len()];
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
                next = race.join_next() => match next {
                    Some(Ok((i, Ok(answer), took))) => {
                        let u = &raced[i];
                        u.answers.fetch_add(1, Ordering::Relaxed);
                        u.latency_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                        u.demoted_until_ms.store(0, Ordering::Relaxed);
                        return Some(answer);
                    }
                    Some(Ok((i, Err(e), _))) => {
                        reported[i] = true;
                        tracing::debug!(upstream = %raced[i].addr, error = %e, "upstream failed");
                        demote(&raced[i]);
                    }
                    Some(Err(_)) => {}
                    None => return None,
                },
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive error");
                    continue;
                }
            };
            // Cluster answers inline (no task per query); only forwarded
            // questions get a task, so a slow upstream holds up nothing.
            match self.local(&buf[..n], Transport::Udp) {
                Ok(Some(reply)) => {
                    let _ = socket.send_to(&reply, from).await;
                }
                Ok(None) => {}
                Err(query) => {
                    if let Some(reply) = self.cached(&query, Transport::Udp) {
                        let _ = socket.send_to(&reply, from).await;
                        continue;
                    }
                    let request = buf[..n].to_vec();
                    let (server, socket) = (self.clone(), socket.clone());
                    tokio::spawn(async move {
                        let reply = server.forwarded(&query, &request, Transport::Udp).await;
                        let _ = socket.send_to(&reply, from).await;
                    });
                }
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(self.clone().serve_tcp_client(stream));
        }
    }

    async fn serve_tcp_client(self: Arc<Self>, mut stream: TcpStream) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return, // idle, closed or broken
            }
            let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut request)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(reply) = self.handle(&request, Transport::Tcp).await else {
                continue;
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
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

async fn ask_upstream(
    upstream: SocketAddr,
    request: &[u8],
    id: [u8; 2],
) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("constant")
    } else {
        "[::]:0".parse().expect("constant")
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(request).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Ignore anything that is not the answer to this query.
        if n >= 12 && buf[..2] == id {
            return Ok(buf[..n].to_vec());
        }
    }
}

/// Serializes a cached answer for this client: truncated over UDP when it
/// does not fit the client's buffer.
fn fit(answer: &Message, query: &Message, transport: Transport) -> Option<Vec<u8>> {
    let bytes = answer.to_vec().ok()?;
    let limit = query
        .edns
        .as_ref()
        .map_or(crate::answer::PLAIN_UDP_SIZE, |e| {
            usize::from(e.max_payload().max(512))
        });
    if transport == Transport::Udp && bytes.len() > limit {
        return answer.truncate().to_vec().ok();
    }
    Some(bytes)
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
