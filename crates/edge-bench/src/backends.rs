//! The backend servers: small HTTP/1.1 servers on loopback, each answering
//! with its own name, on their own runtime (so their threads are counted
//! apart from the client's).
//!
//! `GET /stream` answers with a body that never ends: one short chunk every
//! 100 ms, for the long-lived connections. A stopped server closes its
//! listener and drops every open connection, as a killed task would.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;

/// The runtime the servers run on.
pub(crate) struct Backends {
    rt: Option<Runtime>,
    body_bytes: usize,
}

/// One running server.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Server {
    /// Requests answered so far (streams included).
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection.
    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Backends {
    /// `threads` tokio workers; each answer carries `body_bytes` of
    /// padding after the server's name.
    pub(crate) fn new(threads: usize, body_bytes: usize) -> anyhow::Result<Backends> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("backend")
            .enable_all()
            .build()?;
        Ok(Backends {
            rt: Some(rt),
            body_bytes,
        })
    }

    fn handle(&self) -> anyhow::Result<&Handle> {
        Ok(self
            .rt
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("backends shut down"))?
            .handle())
    }

    /// Starts a server named `name` on a free loopback port.
    pub(crate) fn spawn(&self, name: &str) -> anyhow::Result<Server> {
        let std = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        std.set_nonblocking(true)?;
        let addr = std.local_addr()?;
        let handle = self.handle()?;
        let listener = {
            let _guard = handle.enter();
            TcpListener::from_std(std)?
        };
        let (stop, stopped) = watch::channel(false);
        let served = Arc::new(AtomicU64::new(0));
        let mut body = format!("{name}\n");
        body.extend(std::iter::repeat_n('x', self.body_bytes));
        let body = Bytes::from(body);
        handle.spawn(serve(
            listener,
            name.to_string(),
            body,
            served.clone(),
            stopped,
        ));
        Ok(Server { addr, served, stop })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    body: Bytes,
    served: Arc<AtomicU64>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // Out of descriptors and the like: keep serving.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let (name, body, served, mut stopped) =
            (name.clone(), body.clone(), served.clone(), stopped.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                served.fetch_add(1, Ordering::Relaxed);
                let resp = if req.uri().path() == "/stream" {
                    stream_body(&name)
                } else {
                    Full::new(body.clone())
                        .map_err(|never| match never {})
                        .boxed()
                };
                async move { Ok::<_, Infallible>(Response::new(resp)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection closes it, mid-response or not.
                _ = stopped.changed() => {}
            }
        });
    }
}

/// A body that never ends: `<name> <n>\n` every 100 ms.
fn stream_body(name: &str) -> BoxBody<Bytes, Infallible> {
    let name = name.to_string();
    let ticks = tokio_stream_interval(Duration::from_millis(100));
    let frames = ticks
        .enumerate()
        .map(move |(n, ())| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{name} {n}\n")))));
    BodyExt::boxed(StreamBody::new(frames))
}

fn tokio_stream_interval(period: Duration) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold(tokio::time::interval(period), |mut iv| async move {
        iv.tick().await;
        Some(((), iv))
    })
}
