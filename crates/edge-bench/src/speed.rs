//! The speed scenario: `wrk` through each edge and directly to a backend,
//! keep-alive and a new connection per request, at a few connection counts.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

/// One wrk run's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Wrk {
    pub(crate) req_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) requests: u64,
    /// Non-2xx/3xx answers plus socket errors (connect, read, write,
    /// timeout).
    pub(crate) errors: u64,
}

/// `101.00us`, `1.20ms`, `2.00s` in milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Reads wrk's `--latency` report.
pub(crate) fn parse(text: &str) -> anyhow::Result<Wrk> {
    let mut req_per_s = None;
    let (mut p50, mut p99) = (None, None);
    let mut requests = None;
    let mut errors = 0u64;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            req_per_s = v.trim().parse::<f64>().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = duration_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = duration_ms(v);
        } else if t.contains(" requests in ") {
            requests = t.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 0`
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    match (req_per_s, p50, p99, requests) {
        (Some(req_per_s), Some(p50_ms), Some(p99_ms), Some(requests)) => Ok(Wrk {
            req_per_s,
            p50_ms,
            p99_ms,
            requests,
            errors,
        }),
        _ => bail!("cannot read wrk's output:\n{text}"),
    }
}

/// Runs `wrk -t threads -c conns -d secs --latency` at `url` with `host`
/// as the Host header, and `Connection: close` unless `keepalive`.
pub(crate) async fn wrk(
    bin: &Path,
    url: &str,
    host: Option<&str>,
    keepalive: bool,
    conns: usize,
    threads: usize,
    secs: u64,
) -> anyhow::Result<Wrk> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("--timeout")
        .arg("5s");
    if let Some(h) = host {
        cmd.arg("-H").arg(format!("Host: {h}"));
    }
    if !keepalive {
        cmd.arg("-H").arg("Connection: close");
    }
    cmd.arg(url).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 30), cmd.output())
        .await
        .context("wrk did not finish")?
        .with_context(|| format!("running {} (apt-get install wrk)", bin.display()))?;
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let text = "Running 2s test @ http://127.0.0.1:18080/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   210.09us  150.01us   4.55ms   95.12%
    Req/Sec    35.10k     1.95k   38.21k    70.00%
  Latency Distribution
     50%  185.00us
     75%  212.00us
     90%  265.00us
     99%    1.02ms
  69850 requests in 2.00s, 5.60MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  34915.41
Transfer/sec:      2.80MB
";
        let w = parse(text).expect("parses");
        assert_eq!(w.requests, 69850);
        assert!((w.req_per_s - 34915.41).abs() < 1e-6);
        assert!((w.p50_ms - 0.185).abs() < 1e-9);
        assert!((w.p99_ms - 1.02).abs() < 1e-9);
        assert_eq!(w.errors, 6);
        assert!(parse("garbage").is_err());
    }
}
