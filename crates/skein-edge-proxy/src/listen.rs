//! Listening sockets: the HTTP and HTTPS ports, and one per bind port.
//!
//! Bind ports come and go with the routes, so they are reconciled one by
//! one: a port that stays keeps its socket and accept loop (and every
//! connection accepted on it), a new one is bound, a gone one stops
//! accepting (its open connections are left to the drain of their
//! servers). An accept loop looks its backend up in the current table for
//! every connection, so a route change never needs a new socket.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::proxy::{handle, Front, FrontKind};
use crate::state::{is_http, CounterSet, Counters, Session};
use crate::tunnel::serve_tcp;
use crate::Shared;

/// A bound bind port.
pub(crate) struct PortListener {
    pub addr: SocketAddr,
    /// A copy of the socket, to hand over.
    pub fd: std::os::fd::OwnedFd,
    pub counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for PortListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
pub(crate) struct Listeners {
    pub ports: BTreeMap<(IpAddr, u16), PortListener>,
    /// Ports that could not be bound, and why (retried on every apply).
    pub failed: BTreeMap<(IpAddr, u16), String>,
}

/// Binds a TCP listener now (so a failure is known at once).
pub(crate) fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    Ok(std)
}

/// Serves HTTP/1 (keep-alive, upgrades) on one accepted connection.
pub(crate) async fn serve_http<I>(shared: Arc<Shared>, front: Front, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let front = Arc::new(front);
    let _session = Session::open(CounterSet::of(&[&front.counters]));
    let client_timeout = shared.cfg.timeouts.client;
    let svc = {
        let front = front.clone();
        service_fn(move |req| handle(shared.clone(), front.clone(), req))
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout)
        // One buffer, one `write`: bodies here are small, and a copy
        // costs less than the kernel's vectored path.
        .writev(false)
        .keep_alive(true);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await
    {
        tracing::debug!(peer = %front.peer, error = %e, "client connection ended");
    }
}

/// The accept loop of the HTTP port.
pub(crate) async fn accept_http(
    shared: Arc<Shared>,
    listener: TcpListener,
    counters: Arc<Counters>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the HTTP port");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let front = Front::new(FrontKind::Http, local, peer, None, counters.clone());
        tokio::spawn(serve_http(shared.clone(), front, stream));
    }
}

/// The accept loop of the HTTPS port: TLS (certificate by SNI), then HTTP.
pub(crate) async fn accept_https(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    counters: Arc<Counters>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the HTTPS port");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let timeout = shared.cfg.timeouts.client;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            let front = Front::new(FrontKind::Https, local, peer, sni, counters);
            serve_http(shared, front, tls).await;
        });
    }
}

/// The accept loop of one bind port: each connection goes to the backend
/// the current table binds the port for, in its mode.
async fn accept_port(
    shared: Arc<Shared>,
    listener: TcpListener,
    port: u16,
    counters: Arc<Counters>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(backend) = shared.table.load().by_port.get(&port).cloned() else {
            continue;
        };
        let local = stream.local_addr().unwrap_or(peer);
        if is_http(&backend) {
            let _ = stream.set_nodelay(true);
            let front = Front::new(FrontKind::Port(port), local, peer, None, counters.clone());
            tokio::spawn(serve_http(shared.clone(), front, stream));
        } else {
            let shared = shared.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                let _session = Session::open(CounterSet::of(&[&counters]));
                serve_tcp(shared, backend, stream, peer, counters).await;
            });
        }
    }
}

impl Listeners {
    /// Makes the bound ports those `wanted` names: binds new ones, stops
    /// gone ones, leaves the rest alone. Returns what could not be bound.
    pub(crate) fn reconcile(
        &mut self,
        shared: &Arc<Shared>,
        wanted: &BTreeMap<(IpAddr, u16), String>,
    ) -> Vec<String> {
        self.ports.retain(|key, l| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::info!(addr = %l.addr, "bind port no longer routed: stopped listening");
            }
            keep
        });
        self.failed.retain(|key, _| wanted.contains_key(key));
        for (key, backend) in wanted {
            if self.ports.contains_key(key) {
                continue;
            }
            let addr = SocketAddr::new(key.0, key.1);
            let taken = shared
                .inherited
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_port(key.0, key.1);
            let opened = match taken {
                Some(l) => Ok(l),
                None => bind_std(addr),
            }
            .and_then(|std| {
                let fd = std::os::fd::OwnedFd::from(std.try_clone()?);
                Ok((TcpListener::from_std(std)?, fd))
            });
            match opened {
                Ok((listener, fd)) => {
                    let addr = listener.local_addr().unwrap_or(addr);
                    tracing::info!(%addr, %backend, "listening on a bind port");
                    self.failed.remove(key);
                    let counters = Arc::new(Counters::default());
                    let task = tokio::spawn(accept_port(
                        shared.clone(),
                        listener,
                        key.1,
                        counters.clone(),
                    ));
                    self.ports.insert(
                        *key,
                        PortListener {
                            addr,
                            fd,
                            counters,
                            task,
                        },
                    );
                }
                Err(e) => {
                    let msg = format!("{backend}: cannot listen on {addr}: {e}");
                    if self.failed.insert(*key, msg.clone()).is_none() {
                        tracing::warn!("{msg}");
                    }
                }
            }
        }
        self.failed.values().cloned().collect()
    }
}
