//! Byte tunnels: TCP-mode connections and upgraded (WebSocket) HTTP
//! connections.
//!
//! A tunnel ends when either side closes, when it has been idle for the
//! tunnel timeout (Marathon-LB's `timeout tunnel`, 3600 s), or when its
//! server left the routes and the drain time is over. Nothing else (in
//! particular no route change that keeps its server) ever touches it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::client::connect_tcp;
use crate::state::{pick, BackendEntry, CounterSet, Counters, ServerRt, Session};
use crate::Shared;

/// Which way bytes read from a stream flow, for the counters.
#[derive(Clone, Copy)]
enum Flow {
    /// Read from the client: bytes in.
    In,
    /// Read from the server: bytes out.
    Out,
}

/// A stream that counts what is read from it and notes when.
struct Tracked<S> {
    inner: S,
    flow: Flow,
    counters: Arc<Vec<Arc<Counters>>>,
    last: Arc<AtomicU64>,
    base: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.last
                .store(this.base.elapsed().as_millis() as u64, Ordering::Relaxed);
            for c in this.counters.iter() {
                match this.flow {
                    Flow::In => c.bin.fetch_add(n, Ordering::Relaxed),
                    Flow::Out => c.bout.fetch_add(n, Ordering::Relaxed),
                };
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a tunnel ended.
#[derive(Debug)]
pub(crate) enum End {
    Closed,
    Idle,
    Drained,
    Error(#[allow(dead_code)] io::Error),
}

/// Copies both ways until one side closes, the tunnel idles for `idle`, or
/// `close` turns true (the server's drain is over).
pub(crate) async fn pipe<C, S>(
    client: C,
    server: S,
    idle: Duration,
    mut close: watch::Receiver<bool>,
    counters: Vec<Arc<Counters>>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(counters);
    let mut a = Tracked {
        inner: client,
        flow: Flow::In,
        counters: counters.clone(),
        last: last.clone(),
        base,
    };
    let mut b = Tracked {
        inner: server,
        flow: Flow::Out,
        counters,
        last: last.clone(),
        base,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let drained = async move {
        if close.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(drained);
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = tokio::time::Instant::from_std(base + since + idle);
        tokio::select! {
            r = &mut copy => {
                return match r {
                    Ok(_) => End::Closed,
                    Err(e) => End::Error(e),
                };
            }
            _ = &mut drained => return End::Drained,
            _ = tokio::time::sleep_until(deadline) => {
                let now = base.elapsed();
                if now >= Duration::from_millis(last.load(Ordering::Relaxed)) + idle {
                    return End::Idle;
                }
            }
        }
    }
}

/// A TCP-mode connection on a bind port: pick an Up server (another after
/// a connect failure), then tunnel.
pub(crate) async fn serve_tcp(
    shared: Arc<Shared>,
    backend: Arc<BackendEntry>,
    client: TcpStream,
    peer: SocketAddr,
    frontend: Arc<Counters>,
) {
    let _ = client.set_nodelay(true);
    let ip: IpAddr = peer.ip();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let t = &shared.cfg.timeouts;
    let (server, rt): (TcpStream, Arc<ServerRt>) = loop {
        let Some(s) = pick(&backend, ip, None, &tried, Instant::now()) else {
            tracing::debug!(backend = %backend.spec.name, "no server available for a TCP connection");
            return;
        };
        let rt = s.rt.clone();
        if !tried.is_empty() {
            backend.rt.c.wretr.fetch_add(1, Ordering::Relaxed);
            rt.c.wretr.fetch_add(1, Ordering::Relaxed);
        }
        tried.push(s.spec.addr);
        match connect_tcp(s.spec.addr, t.connect).await {
            Ok(stream) => {
                rt.connected();
                break (stream, rt);
            }
            Err(e) => {
                backend.rt.c.econ.fetch_add(1, Ordering::Relaxed);
                if rt.connect_failed(Instant::now()) {
                    tracing::warn!(backend = %backend.spec.name, server = %rt.name, "3 connect failures in a row: no connections for 10 s");
                }
                tracing::debug!(backend = %backend.spec.name, server = %rt.name, error = %e, "connect failed; trying another server");
            }
        }
    };
    let _session = Session::open(CounterSet::of(&[&backend.rt.c, &rt.c]));
    // Picked just as it left the routes (after its drain was decided):
    // this connection still closes at the drain timeout.
    if rt.removed.load(std::sync::atomic::Ordering::Relaxed) {
        shared.drains.start(&rt, shared.cfg.drain_timeout);
    }
    let end = pipe(
        client,
        server,
        t.tunnel,
        rt.close.subscribe(),
        vec![frontend, backend.rt.c.clone(), rt.c.clone()],
    )
    .await;
    tracing::debug!(backend = %backend.spec.name, server = %rt.name, ?end, "TCP connection ended");
}
