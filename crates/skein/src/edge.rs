//! `skein edge`: runs the edge load balancer (skein-edge-proxy), and
//! `skein edge status` prints a running edge's state from its stats port.
//!
//! The flags mirror Marathon-LB's defaults (ports 80/443/9090, service
//! ports 10000-10100, its timeouts) so an edge replaces it in place.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use skein_edge_proxy::handover::{self, Inherited};
use skein_edge_proxy::{Config, Edge, PidLock, RouteSource, StatusDoc, Timeouts};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct EdgeArgs {
    #[command(subcommand)]
    pub command: Option<EdgeCommand>,
    #[command(flatten)]
    pub run: EdgeRunArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum EdgeCommand {
    /// A running edge's frontends, backends, servers and problems.
    Status {
        /// The edge's stats port.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        stats_url: String,
        /// Print the JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
}

fn port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 10000-10100"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: expected 1 <= FIRST <= LAST"));
    }
    Ok(a..=b)
}

#[derive(Debug, Args)]
pub(crate) struct EdgeRunArgs {
    /// The local agent's API, long-polled for routes (`GET /v1/edge`).
    #[arg(long, env = "SKEIN_API", default_value = "http://127.0.0.1:62080")]
    agent_api: String,
    /// Serve the routes in this JSON file instead of the agent's (`Routes`
    /// or `{"version", "routes"}`; re-read when it changes).
    #[arg(long)]
    routes_file: Option<PathBuf>,
    /// Edge group served (repeat for several); `HAPROXY_GROUP` values.
    #[arg(long = "group", default_value = "external")]
    groups: Vec<String>,
    /// Address the HTTP, HTTPS, stats and bind ports listen on (a backend's
    /// `HAPROXY_<n>_BIND_ADDR` overrides it for its port).
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    #[arg(long, default_value_t = 443)]
    https_port: u16,
    /// Marathon-LB's endpoints (`/haproxy?stats`, `/_haproxy_*`,
    /// `/metrics`, `/_skein/status`).
    #[arg(long, default_value_t = 9090)]
    stats_port: u16,
    /// Service ports bound for backends without `HAPROXY_<n>_PORT`.
    #[arg(long, default_value = "10000-10100", value_parser = port_range)]
    service_ports: RangeInclusive<u16>,
    /// File with the agent API's bearer token (default: SKEIN_API_TOKEN,
    /// else the local agent's `<data-dir>/api-token` if readable).
    #[arg(long, env = "SKEIN_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// The local agent's data dir (for its token).
    #[arg(long, env = "SKEIN_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// A PEM certificate (and key) for HTTPS clients whose SNI names no
    /// backend's certificate; without it they get a handshake failure.
    #[arg(long)]
    default_cert: Option<PathBuf>,
    /// Holds the pid/lock file (one edge per state dir) and the handover
    /// socket.
    #[arg(long, default_value = "/run/skein-edge")]
    state_dir: PathBuf,
    /// If an edge runs with this state dir, take its listening sockets
    /// over (an upgrade: no port is ever closed); it stops accepting,
    /// finishes its open connections (up to the drain time) and exits.
    #[arg(long)]
    take_over: bool,
    /// Seconds to connect to a server.
    #[arg(long, default_value_t = 3.0)]
    timeout_connect_s: f64,
    /// Seconds to wait for a client's request head.
    #[arg(long, default_value_t = 30.0)]
    timeout_client_s: f64,
    /// Seconds to wait for a server's response head.
    #[arg(long, default_value_t = 30.0)]
    timeout_server_s: f64,
    /// Seconds an idle TCP-mode or WebSocket connection stays open.
    #[arg(long, default_value_t = 3600.0)]
    timeout_tunnel_s: f64,
    /// Seconds TCP and WebSocket connections to a removed server may stay
    /// open (HTTP requests in flight always finish).
    #[arg(long, default_value_t = 30.0)]
    drain_timeout_s: f64,
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v).with_context(|| format!("--{name}: {v} is not a duration"))
}

impl EdgeRunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let source = match &self.routes_file {
            Some(path) => RouteSource::File(path.clone()),
            None => {
                let token = match (&self.api_token_file, std::env::var("SKEIN_API_TOKEN").ok()) {
                    (Some(path), _) => Some(crate::config::read_token(path)?),
                    (None, Some(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
                    _ => crate::config::read_token(
                        &self.data_dir.join(crate::config::LOCAL_TOKEN_FILE),
                    )
                    .ok(),
                };
                if !self.agent_api.starts_with("http://") {
                    anyhow::bail!("--agent-api {}: only http:// is supported", self.agent_api);
                }
                RouteSource::Agent {
                    url: self.agent_api.trim_end_matches('/').to_string(),
                    token,
                }
            }
        };
        let mut cfg = Config::new(source);
        cfg.groups = self.groups.clone();
        cfg.bind = self.bind;
        cfg.http_port = self.http_port;
        cfg.https_port = self.https_port;
        cfg.stats_port = self.stats_port;
        cfg.service_ports = self.service_ports.clone();
        cfg.default_cert = self.default_cert.clone();
        cfg.drain_timeout = secs("drain-timeout-s", self.drain_timeout_s)?;
        cfg.timeouts = Timeouts {
            connect: secs("timeout-connect-s", self.timeout_connect_s)?,
            client: secs("timeout-client-s", self.timeout_client_s)?,
            server: secs("timeout-server-s", self.timeout_server_s)?,
            tunnel: secs("timeout-tunnel-s", self.timeout_tunnel_s)?,
        };
        Ok(cfg)
    }
}

pub(crate) fn run(args: EdgeArgs) -> anyhow::Result<()> {
    match args.command {
        Some(EdgeCommand::Status { stats_url, json }) => status(&stats_url, json),
        None => serve(args.run),
    }
}

fn status(stats_url: &str, json: bool) -> anyhow::Result<()> {
    let url = format!("{}/_skein/status", stats_url.trim_end_matches('/'));
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut resp = http.get(&url).call().map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the edge at {url} ({e}); is `skein edge` running? (set --stats-url)"
        )
    })?;
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if !resp.status().is_success() {
        anyhow::bail!("GET {url}: {}: {text}", resp.status());
    }
    if json {
        println!("{text}");
        return Ok(());
    }
    let doc: StatusDoc = serde_json::from_str(&text)
        .with_context(|| format!("{url} answered no status document"))?;
    print!("{}", skein_edge_proxy::print_status(&doc));
    Ok(())
}

/// The state dir's lock, waiting up to `limit` for a previous edge to
/// release it.
fn wait_for_lock(dir: &std::path::Path, limit: Duration) -> anyhow::Result<PidLock> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match skein_edge_proxy::lock_state_dir(dir) {
            Ok(lock) => return Ok(lock),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e.context("the previous edge handed its sockets over but kept its lock"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(args: EdgeRunArgs) -> anyhow::Result<()> {
    crate::init_logs();
    let cfg = args.config()?;
    let drain = cfg.drain_timeout;
    let (lock, inherited) = match skein_edge_proxy::lock_state_dir(&args.state_dir) {
        Ok(lock) => (lock, Inherited::default()),
        Err(e) if args.take_over => {
            tracing::info!(reason = %format!("{e:#}"), "taking the running edge's sockets over");
            let inherited = handover::receive(&args.state_dir)?;
            tracing::info!(sockets = inherited.len(), "sockets taken over");
            (
                wait_for_lock(&args.state_dir, Duration::from_secs(10))?,
                inherited,
            )
        }
        Err(e) => return Err(e),
    };
    // One worker asked for (`TOKIO_WORKER_THREADS=1`, like HAProxy's
    // `nbthread 1`): a single-threaded runtime, every connection on the one
    // thread with no wakeups across threads; otherwise one worker per core.
    let single = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let runtime = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let edge = Edge::start_inheriting(cfg, inherited).await?;
        edge.serve_handover(&args.state_dir, lock)?;
        tracing::info!(pid = std::process::id(), "skein edge running");
        tokio::select! {
            _ = crate::shutdown_signal() => tracing::info!("shutting down"),
            _ = edge.handed_over() => {
                let idle = edge.wait_idle(drain).await;
                tracing::info!(idle, "handed over; exiting");
            }
        }
        drop(edge);
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(port_range("10000-10100"), Ok(10000..=10100));
        assert!(port_range("10100-10000").is_err());
        assert!(port_range("0-10").is_err());
        assert!(port_range("10000").is_err());
    }
}
