//! The bounded loopback client: a fixed number of workers, each sending at
//! its share of a target rate (closed loop: a worker waits for its answer,
//! and a tick it misses is counted, not made up), some over keep-alive
//! connections and some over a new connection per request; and the
//! long-lived connections, which read a never-ending response for the whole
//! run.
//!
//! Every failure is counted by kind; nothing the network returns can stop
//! the client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;

/// Where requests go: an edge's port and the Host header to send.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) label: String,
    pub(crate) addr: SocketAddr,
    pub(crate) host: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Load {
    pub(crate) targets: Vec<Target>,
    pub(crate) concurrency: usize,
    /// Requests per second over all workers.
    pub(crate) rate: f64,
    /// Workers `0..keepalive_workers` keep their connection; the others
    /// open one per request (`Connection: close`).
    pub(crate) keepalive_workers: usize,
    pub(crate) timeout: Duration,
    pub(crate) duration: Duration,
}

/// What the client saw.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Counts {
    pub(crate) sent: u64,
    pub(crate) ok: u64,
    /// Non-2xx answers by status.
    pub(crate) status: BTreeMap<u16, u64>,
    pub(crate) connect_errors: u64,
    /// The connection failed (reset, closed) on a new connection...
    pub(crate) reset_new: u64,
    /// ... and on a reused keep-alive connection.
    pub(crate) reset_reused: u64,
    pub(crate) timeouts: u64,
    /// A 2xx whose body did not come from a server of the app.
    pub(crate) wrong_body: u64,
    /// Sends the rate asked for that a worker was still busy for.
    pub(crate) missed_ticks: u64,
    pub(crate) sent_keepalive: u64,
    pub(crate) sent_new_conn: u64,
    /// Requests and failures per target.
    pub(crate) per_target: BTreeMap<String, (u64, u64)>,
    #[serde(skip)]
    pub(crate) latencies_us: Vec<u32>,
}

impl Counts {
    pub(crate) fn failed(&self) -> u64 {
        self.status.values().sum::<u64>()
            + self.connect_errors
            + self.reset_new
            + self.reset_reused
            + self.timeouts
            + self.wrong_body
    }

    fn merge(&mut self, o: Counts) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (s, n) in o.status {
            *self.status.entry(s).or_default() += n;
        }
        self.connect_errors += o.connect_errors;
        self.reset_new += o.reset_new;
        self.reset_reused += o.reset_reused;
        self.timeouts += o.timeouts;
        self.wrong_body += o.wrong_body;
        self.missed_ticks += o.missed_ticks;
        self.sent_keepalive += o.sent_keepalive;
        self.sent_new_conn += o.sent_new_conn;
        for (t, (s, f)) in o.per_target {
            let e = self.per_target.entry(t).or_default();
            e.0 += s;
            e.1 += f;
        }
        self.latencies_us.extend(o.latencies_us);
    }

    /// The failures by kind, for a report line.
    pub(crate) fn breakdown(&self) -> String {
        let mut parts = Vec::new();
        for (s, n) in &self.status {
            parts.push(format!("{n} × HTTP {s}"));
        }
        for (n, what) in [
            (self.connect_errors, "connect errors"),
            (self.reset_new, "closed/reset (new connection)"),
            (
                self.reset_reused,
                "closed/reset (reused keep-alive connection)",
            ),
            (self.timeouts, "timeouts"),
            (self.wrong_body, "wrong body"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// The latency at quantile `q` (0..1) in milliseconds, of answered
    /// requests (failures included).
    pub(crate) fn latency_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

enum Failure {
    Connect,
    Reset,
    Status(u16),
    WrongBody,
}

/// Runs the load; returns what was seen. `body_prefix` is what every
/// correct answer starts with (the app's server names).
pub(crate) async fn run(load: Load, body_prefix: &'static str) -> Counts {
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let end = start + load.duration;
    let concurrency = load.concurrency.max(1);
    let period = Duration::from_secs_f64(concurrency as f64 / load.rate.max(1.0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let load = load.clone();
        // Spread the workers' ticks over one period.
        let first = start + period.mul_f64(w as f64 / concurrency as f64);
        workers.push(tokio::spawn(async move {
            worker(w, first, period, end, &load, body_prefix).await
        }));
    }
    let mut total = Counts::default();
    for w in workers {
        if let Ok(c) = w.await {
            total.merge(c);
        }
    }
    total
}

async fn worker(
    w: usize,
    first: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
    load: &Load,
    body_prefix: &str,
) -> Counts {
    let keepalive = w < load.keepalive_workers;
    let mut c = Counts::default();
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
    // One target per worker: a kept connection belongs to one port.
    let target = &load.targets[w % load.targets.len()];
    loop {
        let before = tokio::time::Instant::now();
        let tick = ticker.tick().await;
        if tick >= end {
            break;
        }
        // A tick that fires late by more than a period stands for the ones
        // skipped.
        let late = before.saturating_duration_since(tick);
        if late > period {
            c.missed_ticks += (late.as_nanos() / period.as_nanos().max(1)) as u64;
        }
        let reused = keepalive && conn.as_ref().is_some_and(|s| !s.is_closed());
        if !reused {
            conn = None;
        }
        c.sent += 1;
        if keepalive {
            c.sent_keepalive += 1;
        } else {
            c.sent_new_conn += 1;
        }
        let t0 = Instant::now();
        let result = tokio::time::timeout(
            load.timeout,
            request(target, &mut conn, keepalive, body_prefix),
        )
        .await;
        c.latencies_us
            .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
        let failed = match result {
            Ok(Ok(())) => {
                c.ok += 1;
                false
            }
            Ok(Err(f)) => {
                match f {
                    Failure::Connect => c.connect_errors += 1,
                    Failure::Reset if reused => c.reset_reused += 1,
                    Failure::Reset => c.reset_new += 1,
                    Failure::Status(s) => *c.status.entry(s).or_default() += 1,
                    Failure::WrongBody => c.wrong_body += 1,
                }
                true
            }
            Err(_) => {
                c.timeouts += 1;
                true
            }
        };
        let e = c.per_target.entry(target.label.clone()).or_default();
        e.0 += 1;
        if failed {
            e.1 += 1;
            conn = None;
        }
        if !keepalive {
            conn = None;
        }
    }
    c
}

async fn request(
    target: &Target,
    conn: &mut Option<SendRequest<Empty<Bytes>>>,
    keepalive: bool,
    body_prefix: &str,
) -> Result<(), Failure> {
    if conn.is_none() {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(|_| Failure::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *conn = Some(sender);
    }
    let sender = conn.as_mut().ok_or(Failure::Connect)?;
    sender.ready().await.map_err(|_| Failure::Reset)?;
    let mut req = Request::get("/").header("host", &target.host);
    if !keepalive {
        req = req.header("connection", "close");
    }
    let req = req.body(Empty::new()).map_err(|_| Failure::Connect)?;
    let resp = sender.send_request(req).await.map_err(|_| Failure::Reset)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| Failure::Reset)?
        .to_bytes();
    if !status.is_success() {
        return Err(Failure::Status(status.as_u16()));
    }
    if !body.starts_with(body_prefix.as_bytes()) {
        return Err(Failure::WrongBody);
    }
    Ok(())
}

/// How one long-lived connection ended.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LongLived {
    pub(crate) label: String,
    /// Open and reading until the end of the run.
    pub(crate) survived: bool,
    /// Seconds after its start that it failed, and why.
    pub(crate) failed_after_s: Option<f64>,
    pub(crate) reason: Option<String>,
    pub(crate) bytes: u64,
}

/// Opens a connection to `addr`, asks for `/stream` with `host` and reads
/// until `end`; a close, an error or 5 s without data before then is a
/// failure.
pub(crate) async fn long_lived(
    label: String,
    addr: SocketAddr,
    host: String,
    end: tokio::time::Instant,
) -> LongLived {
    let start = Instant::now();
    let mut out = LongLived {
        label,
        survived: false,
        failed_after_s: None,
        reason: None,
        bytes: 0,
    };
    let fail = |mut out: LongLived, why: String| {
        out.failed_after_s = Some(start.elapsed().as_secs_f64());
        out.reason = Some(why);
        out
    };
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return fail(out, format!("connect: {e}")),
    };
    let req = format!("GET /stream HTTP/1.1\r\nHost: {host}\r\n\r\n");
    if let Err(e) = stream.write_all(req.as_bytes()).await {
        return fail(out, format!("write: {e}"));
    }
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)) => r,
            _ = tokio::time::sleep_until(end) => {
                out.survived = true;
                return out;
            }
        };
        match read {
            Err(_) => return fail(out, "no data for 5 s".to_string()),
            Ok(Err(e)) => return fail(out, format!("read: {e}")),
            Ok(Ok(0)) => return fail(out, "closed".to_string()),
            Ok(Ok(n)) => {
                out.bytes += n as u64;
                if head.len() < 12 {
                    head.extend_from_slice(&buf[..n]);
                    if head.len() >= 12 && !head.starts_with(b"HTTP/1.1 200") {
                        let status = String::from_utf8_lossy(&head[..12]).to_string();
                        return fail(out, format!("answered {status}"));
                    }
                }
            }
        }
    }
}
