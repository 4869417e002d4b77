//! Shared by the server tests: a server on 127.0.0.1 with the cluster's
//! built-in names, and clients that speak DNS over real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use skein_dns::server::{DnsOptions, DnsServer, Forwarders};
use skein_dns::Records;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

pub(crate) struct Server {
    pub dns: Arc<DnsServer>,
    pub addr: SocketAddr,
    /// Kept so the records stay published.
    pub records: watch::Sender<Arc<Records>>,
}

/// A server on a free port of 127.0.0.1 that forwards to `upstreams` and
/// knows the names every cluster has (`ready.spartan`).
pub(crate) async fn start(upstreams: &[SocketAddr], options: DnsOptions) -> Server {
    let (records, rx) = watch::channel(Arc::new(skein_dns::build(&[], &[], &[])));
    let dns = DnsServer::with_options(rx, Forwarders::new(upstreams, &[]), options);
    let addr = dns
        .listen_on("127.0.0.1:0".parse().expect("address"))
        .await
        .expect("listen on 127.0.0.1");
    Server { dns, addr, records }
}

pub(crate) fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    q.to_vec().expect("encode")
}

/// Sends `request` over UDP and waits up to `wait` for the reply with its
/// id (other datagrams are skipped).
pub(crate) async fn udp_ask(
    socket: &UdpSocket,
    server: SocketAddr,
    request: &[u8],
    wait: Duration,
) -> Option<Message> {
    socket.send_to(request, server).await.ok()?;
    let id = [request[0], request[1]];
    let mut buf = vec![0u8; 65_535];
    tokio::time::timeout(wait, async {
        loop {
            let (n, _) = socket.recv_from(&mut buf).await.ok()?;
            if n >= 12 && buf[..2] == id {
                return Message::from_vec(&buf[..n]).ok();
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// One query over a TCP connection: `Ok(None)` when the server closed it.
pub(crate) async fn tcp_ask(
    stream: &mut TcpStream,
    request: &[u8],
) -> std::io::Result<Option<Message>> {
    let mut framed = u16::try_from(request.len())
        .expect("small query")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(request);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).await?;
    Message::from_vec(&reply)
        .map(Some)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// The first answer's address, if it is an A record.
pub(crate) fn first_a(reply: &Message) -> Option<std::net::Ipv4Addr> {
    reply.answers.iter().find_map(|r| match &r.data {
        hickory_proto::rr::RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// This process's open file descriptors.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

pub(crate) fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}
