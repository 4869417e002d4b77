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

pub struct DnsServer {
    records: watch::Receiver<Arc<Records>>,
    upstreams: Vec<SocketAddr>,
    pub stats: Arc<DnsStats>,
    rotation: AtomicU64,
    cache: std::sync::Mutex<crate::cache::Cache>,
}

/// Forwarded answers kept at most (each a few hundred bytes).
pub const CACHE_ENTRIES: usize = 10_000;

impl DnsServer {
    pub fn new(records: watch::Receiver<Arc<Records>>, upstreams: Vec<SocketAddr>) -> Arc<Self> {
        Arc::new(DnsServer {
            records,
            upstreams,
            stats: Arc::default(),
            rotation: AtomicU64::new(0),
            cache: std::sync::Mutex::new(crate::cache::Cache::new(CACHE_ENTRIES)),
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
            tracing::info!(%addr, upstreams = ?self.upstreams, "DNS listening (UDP and TCP)");
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
        let rotate = self.rotation.fetch_add(1, Ordering::Relaxed) as usize;
        match respond(&records, request, transport, rotate) {
            Outcome::Reply(bytes) => {
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
        if let Some(bytes) = self.forward(request).await {
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

    /// Sends the query to up to [`RACE`] upstreams at once and returns the
    /// first answer carrying the query's id, within the deadline.
    async fn forward(&self, request: &[u8]) -> Option<Vec<u8>> {
        if request.len() < 2 || self.upstreams.is_empty() {
            return None;
        }
        let id = [request[0], request[1]];
        let mut race = tokio::task::JoinSet::new();
        for upstream in self.upstreams.iter().take(RACE).copied() {
            let request = request.to_vec();
            race.spawn(async move { ask_upstream(upstream, &request, id).await });
        }
        let deadline = tokio::time::sleep(FORWARD_DEADLINE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return None,
                next = race.join_next() => match next {
                    Some(Ok(Ok(answer))) => return Some(answer),
                    Some(Ok(Err(e))) => {
                        self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "upstream failed");
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
