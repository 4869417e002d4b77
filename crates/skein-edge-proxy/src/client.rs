//! Connections to servers: a small pool of idle HTTP/1 connections per
//! server, and a one-shot GET for the agent's API.
//!
//! The pool is our own (not hyper-util's) because the proxy must know,
//! for every failure, whether the request left this process: a connect
//! failure or a pooled connection found closed before the request was
//! written gives the request back (hyper's `try_send_request`), so it can
//! go to another server; anything later is the client's 502/504.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The body type sent to servers: a client's body, or none.
pub(crate) type UpBody = BoxBody<Bytes, hyper::Error>;

/// Idle connections kept per server: enough for every client connection
/// of a busy edge to find one (a request that finds none opens a new
/// connection, and one put back over the limit is closed: both cost more
/// than keeping it, as HAProxy keeps its idle server connections).
const IDLE_PER_SERVER: usize = 256;

#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<SendRequest<UpBody>>>,
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timeout"),
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Handshake(e) => write!(f, "handshake: {e}"),
        }
    }
}

pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// A new HTTP/1 connection (upgrades allowed), driven by its own task.
pub(crate) async fn connect_http(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<SendRequest<UpBody>, ConnectError> {
    let stream = connect_tcp(addr, timeout).await?;
    let (mut sender, conn) = http1::Builder::new()
        // One buffer, one `write` (see the server side).
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(server = %addr, error = %e, "server connection ended");
        }
    });
    sender.ready().await.map_err(ConnectError::Handshake)?;
    Ok(sender)
}

impl Pool {
    /// An idle connection ready for a request, if one is kept.
    pub(crate) fn take(&self) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Newest first (the one most likely still open and warm); closed
        // ones met on the way are dropped, the rest not walked.
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].is_closed() {
                idle.swap_remove(i);
            } else if idle[i].is_ready() {
                return Some(idle.swap_remove(i));
            }
        }
        None
    }

    /// Keeps a connection whose response is under way: it is taken again
    /// once that response has been read to its end.
    pub(crate) fn put(&self, sender: SendRequest<UpBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_PER_SERVER && !sender.is_closed() {
            idle.push(sender);
        }
    }

    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

pub(crate) fn empty() -> UpBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// `GET` on a plain-HTTP base URL (`http://host:port`): status and body
/// (at most `limit` bytes).
pub(crate) async fn get(
    base: &str,
    path_and_query: &str,
    token: Option<&str>,
    timeout: Duration,
    limit: usize,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("{base}: only http:// agent URLs are supported"))?
        .trim_end_matches('/');
    let work = async {
        let stream = TcpStream::connect(authority).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake::<_, UpBody>(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = http::Request::get(path_and_query)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json");
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender.send_request(req.body(empty())?).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the reply: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow::anyhow!("no reply within {timeout:?}"))?
}
