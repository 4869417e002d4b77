//! `skein agent` configuration: flags override `SKEIN_*` environment
//! variables (clap handles both), which override the `--config` TOML file,
//! which overrides the defaults.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use skein_agent::AgentConfig;

pub(crate) const DEFAULT_GOSSIP_PORT: u16 = 62501;
pub(crate) const DEFAULT_API_LISTEN: &str = "127.0.0.1:62080";

#[derive(Debug, Args, Default)]
pub(crate) struct AgentArgs {
    /// TOML file with any of the settings below (flag names with `_`).
    #[arg(long, env = "SKEIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unique name of this node [default: hostname].
    #[arg(long, env = "SKEIN_NODE_ID")]
    pub node_id: Option<String>,
    /// Underlay address peers use to reach this node [default: the address
    /// that routes to the first seed; without seeds, the default route's].
    #[arg(long, env = "SKEIN_ADVERTISE")]
    pub advertise: Option<IpAddr>,
    /// QUIC/UDP gossip listener [default: 0.0.0.0:62501].
    #[arg(long, env = "SKEIN_GOSSIP_LISTEN")]
    pub gossip_listen: Option<SocketAddr>,
    /// Comma-separated `host:port` of nodes to join through (names or IPs).
    #[arg(long, env = "SKEIN_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// HTTP API listener [default: 127.0.0.1:62080]. On a non-loopback
    /// address, `--api-token-file` is required.
    #[arg(long, env = "SKEIN_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// The cluster entry point (DC/OS's Admin Router): `/service/<name>/`,
    /// `/net/v1/`, `/mesos_dns/v1/`, `/overlay-master/state`, `/metrics`,
    /// a login form. Off by default; off loopback every request but the
    /// version file and the login form needs the API token.
    #[arg(long, env = "SKEIN_ENTRY_LISTEN")]
    pub entry_listen: Option<SocketAddr>,
    /// The stats port of this node's edge, whose status the entry point's
    /// UI shows [default: 127.0.0.1:9090].
    #[arg(long, env = "SKEIN_ENTRY_EDGE_STATS")]
    pub entry_edge_stats: Option<SocketAddr>,
    /// PEM certificate chain: the entry point serves HTTPS (with
    /// `--entry-tls-key`).
    #[arg(long, env = "SKEIN_ENTRY_TLS_CERT", requires = "entry_tls_key")]
    pub entry_tls_cert: Option<PathBuf>,
    /// PEM key of `--entry-tls-cert`.
    #[arg(long, env = "SKEIN_ENTRY_TLS_KEY", requires = "entry_tls_cert")]
    pub entry_tls_key: Option<PathBuf>,
    /// Docker's socket: this node's running containers with Marathon-style
    /// labels (`VIP_0=/web:80`, `HAPROXY_*`, `DCOS_SERVICE_*`, `skein.app`,
    /// `skein.port`) become this node's tasks. Off by default.
    #[arg(long, env = "SKEIN_DOCKER_SOCKET")]
    pub docker_socket: Option<PathBuf>,
    /// With `--docker-socket`: containers without such labels too.
    #[arg(long, env = "SKEIN_DOCKER_ALL")]
    pub docker_all: bool,
    /// With `--docker-socket`: the Docker network made on this node's
    /// Docker bridge of the overlay `dcos` (as Navstar did); empty: none
    /// [default: dcos].
    #[arg(long, env = "SKEIN_DOCKER_NETWORK")]
    pub docker_network: Option<String>,
    /// Seconds between full resyncs with Docker (events come in between)
    /// [default: 30].
    #[arg(long, env = "SKEIN_DOCKER_RESYNC_S")]
    pub docker_resync_s: Option<u64>,
    /// Where the agent keeps its state [default: /var/lib/skein].
    #[arg(long, env = "SKEIN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory with ca.pem, node.pem, node-key.pem [default: <data-dir>/tls].
    #[arg(long, env = "SKEIN_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Name of the cluster; peers of another cluster are refused [default: skein].
    #[arg(long, env = "SKEIN_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// File holding the bearer token that state-changing API calls need.
    #[arg(long, env = "SKEIN_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Milliseconds between heartbeats to each ring neighbour [default: 200].
    #[arg(long, env = "SKEIN_GOSSIP_INTERVAL_MS")]
    pub gossip_interval_ms: Option<u64>,
    /// Milliseconds a ring neighbour may stay silent before it is suspected;
    /// two observers' suspicions make it down everywhere [default: 1000].
    #[arg(long, env = "SKEIN_SUSPECT_AFTER_MS")]
    pub suspect_after_ms: Option<u64>,
    /// Seconds a down node's state is kept before it is forgotten [default: 86400].
    #[arg(long, env = "SKEIN_DEAD_NODE_GRACE_S")]
    pub dead_node_grace_s: Option<u64>,
    /// DNS listen addresses, comma-separated; '' for none [default: 127.0.0.1:53].
    #[arg(long, env = "SKEIN_DNS_LISTEN")]
    pub dns_listen: Option<String>,
    /// Upstream resolvers `ip[:port]`, comma-separated [default: resolv.conf's].
    #[arg(long, env = "SKEIN_DNS_UPSTREAM")]
    pub dns_upstream: Option<String>,
    /// Per-zone forwarders: `zone=ip[:port]+ip[:port],...`, e.g.
    /// `corp.example=10.0.0.53`.
    #[arg(long, env = "SKEIN_DNS_FORWARD_ZONES")]
    pub dns_forward_zones: Option<String>,
    /// VIP dataplane: auto, nftables, ipvs or none [default: auto].
    #[arg(long, env = "SKEIN_L4LB_DATAPLANE")]
    pub l4lb_dataplane: Option<String>,
    /// Count and time VIP connections from conntrack: on or off
    /// [default: on]. On the IPVS dataplane, on keeps connection tracking
    /// on for every connection of the host (net.ipv4.vs.conntrack and a
    /// `table inet skein_conntrack`).
    #[arg(long, env = "SKEIN_VIP_COUNTS")]
    pub vip_counts: Option<String>,
    /// Seconds between checks of the kernel's VIP rules for drift [default: 30].
    #[arg(long, env = "SKEIN_L4LB_RESYNC_S")]
    pub l4lb_resync_s: Option<u64>,
    /// Overlay configuration, JSON in DC/OS's shape (`vtep_subnet`,
    /// `vtep_mac_oui`, `vtep_mtu`, `container_mtu`, `overlays[{name, subnet,
    /// prefix}]`) [default: DC/OS's: dcos 9.0.0.0/8 /24, VTEPs 44.128.0.0/20].
    #[arg(long, env = "SKEIN_OVERLAY_CONFIG")]
    pub overlay_config: Option<PathBuf>,
    /// Overlay dataplane: vxlan or none [default: vxlan].
    #[arg(long, env = "SKEIN_OVERLAY_DATAPLANE")]
    pub overlay_dataplane: Option<String>,
    /// Seconds between checks of the kernel's overlay entries for drift [default: 10].
    #[arg(long, env = "SKEIN_OVERLAY_RESYNC_S")]
    pub overlay_resync_s: Option<u64>,
    /// The range edge service ports are agreed from, `FIRST-LAST`; the same
    /// on every agent [default: 10000-10100].
    #[arg(long, env = "SKEIN_EDGE_SERVICE_PORTS")]
    pub edge_service_ports: Option<String>,
    /// Check the configuration (the settings as flags, environment and
    /// file give them; the TLS material and its node id) and exit: 0 with
    /// a summary when the agent would start, 1 with the reason when not.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    advertise: Option<IpAddr>,
    gossip_listen: Option<SocketAddr>,
    seeds: Option<Vec<String>>,
    api_listen: Option<SocketAddr>,
    entry_listen: Option<SocketAddr>,
    entry_edge_stats: Option<SocketAddr>,
    entry_tls_cert: Option<PathBuf>,
    entry_tls_key: Option<PathBuf>,
    docker_socket: Option<PathBuf>,
    docker_all: Option<bool>,
    docker_network: Option<String>,
    docker_resync_s: Option<u64>,
    data_dir: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    cluster_id: Option<String>,
    api_token_file: Option<PathBuf>,
    gossip_interval_ms: Option<u64>,
    suspect_after_ms: Option<u64>,
    dead_node_grace_s: Option<u64>,
    l4lb_dataplane: Option<String>,
    vip_counts: Option<String>,
    l4lb_resync_s: Option<u64>,
    overlay_config: Option<PathBuf>,
    overlay_dataplane: Option<String>,
    overlay_resync_s: Option<u64>,
    edge_service_ports: Option<String>,
    dns_listen: Option<String>,
    dns_upstream: Option<String>,
    dns_forward_zones: Option<String>,
}

/// `FIRST-LAST`, both ports, `FIRST <= LAST`.
pub(crate) fn parse_port_range(text: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = text
        .trim()
        .split_once('-')
        .with_context(|| format!("{text:?} is not FIRST-LAST"))?;
    let first: u16 = a
        .trim()
        .parse()
        .with_context(|| format!("{a:?} is not a port"))?;
    let last: u16 = b
        .trim()
        .parse()
        .with_context(|| format!("{b:?} is not a port"))?;
    if first == 0 || first > last {
        bail!("{text:?}: need 1 <= FIRST <= LAST <= 65535");
    }
    Ok((first, last))
}

/// What the binary needs besides [`AgentConfig`].
pub(crate) struct Resolved {
    pub agent: AgentConfig,
    pub api_listen: SocketAddr,
    pub api_token: Option<String>,
    pub entry_listen: Option<SocketAddr>,
    pub entry_edge_stats: SocketAddr,
    /// Certificate and key files, when the entry point serves HTTPS.
    pub entry_tls: Option<(PathBuf, PathBuf)>,
    /// The Docker provider, when given a socket.
    pub docker: Option<skein_docker::Options>,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

pub(crate) fn read_token(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read API token file {}", path.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        bail!(
            "API token in {} is shorter than 16 characters; use a random token",
            path.display()
        );
    }
    Ok(token)
}

/// The file in the data dir holding the agent's own API token.
pub(crate) const LOCAL_TOKEN_FILE: &str = "api-token";
/// Where the agent keeps its data unless told otherwise.
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/skein";

/// The agent's own API token: read from `<data_dir>/api-token`, created
/// there (32 random bytes as hex, mode 0600) at first start.
pub(crate) fn local_token(data_dir: &Path) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let path = data_dir.join(LOCAL_TOKEN_FILE);
    if path.exists() {
        return read_token(&path);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("no randomness for the API token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    tracing::info!(path = %path.display(), "created this agent's API token");
    Ok(token)
}

/// The local address the kernel would use to reach `seed` (no packet is sent).
fn route_source_to(seed: &str) -> Option<IpAddr> {
    let addr = seed.to_socket_addrs().ok()?.next()?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(addr).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// `ip[:port],...`; an empty list is allowed (feature off).
fn parse_addrs(list: &str, default_port: u16, flag: &str) -> anyhow::Result<Vec<SocketAddr>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<IpAddr>()
                        .map(|ip| SocketAddr::new(ip, default_port))
                })
                .map_err(|_| anyhow::anyhow!("{flag}: {s:?} is not ip[:port]"))
        })
        .collect()
}

impl AgentArgs {
    pub(crate) fn resolve(self) -> anyhow::Result<Resolved> {
        let file: FileConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let node_id = self.node_id.or(file.node_id).unwrap_or_else(hostname);
        if node_id.is_empty()
            || node_id.len() > 253
            || node_id.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            bail!("--node-id must be 1 to 253 characters without spaces, got {node_id:?}");
        }
        let gossip_listen = self
            .gossip_listen
            .or(file.gossip_listen)
            .unwrap_or((Ipv4Addr::UNSPECIFIED, DEFAULT_GOSSIP_PORT).into());
        let seeds: Vec<String> = self
            .seeds
            .or(file.seeds)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .map(|s| {
                // A seed given without a port gossips on the default one.
                if s.parse::<SocketAddr>().is_ok()
                    || s.rsplit_once(':')
                        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                {
                    s
                } else {
                    format!("{s}:{DEFAULT_GOSSIP_PORT}")
                }
            })
            .collect();
        let advertise = match self.advertise.or(file.advertise) {
            Some(ip) => ip,
            None if !gossip_listen.ip().is_unspecified() => gossip_listen.ip(),
            // Without seeds (the first node), the address of the default
            // route: what the next nodes most likely reach it on. Only a
            // route lookup (UDP connect to a documentation address): no
            // packet leaves.
            None if seeds.is_empty() => route_source_to("192.0.2.1:9").context(
                "cannot work out the address peers reach this node on (no seeds and no \
                 default route); pass --advertise",
            )?,
            None => seeds.iter().find_map(|s| route_source_to(s)).context(
                "cannot work out the address peers reach this node on; pass --advertise",
            )?,
        };
        if advertise.is_unspecified() {
            bail!("--advertise must be a concrete address, not {advertise}");
        }
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let tls_dir = self
            .tls_dir
            .or(file.tls_dir)
            .unwrap_or_else(|| data_dir.join("tls"));
        let api_listen = self
            .api_listen
            .or(file.api_listen)
            .unwrap_or_else(|| DEFAULT_API_LISTEN.parse().expect("constant address"));
        let token_file = self.api_token_file.or(file.api_token_file);
        if !api_listen.ip().is_loopback() && token_file.is_none() {
            bail!(
                "the API would listen on {api_listen}, beyond loopback, without a token: \
                 pass --api-token-file so that only holders of the token can change state"
            );
        }
        // Without a token file the agent uses its own (`local_token`, made
        // at start-up in the data dir): every write needs a credential.
        let api_token = token_file.map(|path| read_token(&path)).transpose()?;
        let gossip_interval = Duration::from_millis(
            self.gossip_interval_ms
                .or(file.gossip_interval_ms)
                .unwrap_or(200),
        );
        if gossip_interval < Duration::from_millis(10) {
            bail!("--gossip-interval-ms must be at least 10");
        }
        let vip_counts = match self
            .vip_counts
            .or(file.vip_counts)
            .as_deref()
            .unwrap_or("on")
        {
            "on" => true,
            "off" => false,
            other => bail!("--vip-counts must be on or off, not {other:?}"),
        };
        let l4lb_dataplane = skein_agent::l4lb::Dataplane::parse(
            self.l4lb_dataplane
                .or(file.l4lb_dataplane)
                .as_deref()
                .unwrap_or("auto"),
        )?;
        let l4lb_resync = Duration::from_secs(
            self.l4lb_resync_s
                .or(file.l4lb_resync_s)
                .unwrap_or(30)
                .max(1),
        );
        let overlay = match self.overlay_config.or(file.overlay_config) {
            Some(path) => skein_agent::overlay::OverlayConfig::load(&path)?,
            None => skein_agent::overlay::OverlayConfig::default(),
        };
        let overlay_dataplane = skein_agent::vxlan::OverlayDataplane::parse(
            self.overlay_dataplane
                .or(file.overlay_dataplane)
                .as_deref()
                .unwrap_or("vxlan"),
        )?;
        let overlay_resync = Duration::from_secs(
            self.overlay_resync_s
                .or(file.overlay_resync_s)
                .unwrap_or(10)
                .max(1),
        );
        let edge_service_ports = match self.edge_service_ports.or(file.edge_service_ports) {
            Some(text) => parse_port_range(&text).context("--edge-service-ports")?,
            None => skein_agent::edge::DEFAULT_SERVICE_PORTS,
        };
        let dns_listen = parse_addrs(
            self.dns_listen
                .or(file.dns_listen)
                .as_deref()
                .unwrap_or("127.0.0.1:53"),
            53,
            "--dns-listen",
        )?;
        let dns_upstreams = match self.dns_upstream.or(file.dns_upstream) {
            Some(list) => parse_addrs(&list, 53, "--dns-upstream")?,
            None => skein_dns::server::upstreams_from_resolv_conf(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                &dns_listen,
            ),
        };
        let mut dns_zone_upstreams = Vec::new();
        for entry in self
            .dns_forward_zones
            .or(file.dns_forward_zones)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (zone, servers) = entry
                .split_once('=')
                .with_context(|| format!("--dns-forward-zones: {entry:?} is not zone=ip[:port]"))?;
            let servers = parse_addrs(&servers.replace('+', ","), 53, "--dns-forward-zones")?;
            if zone.trim().is_empty() || servers.is_empty() {
                bail!("--dns-forward-zones: {entry:?} needs a zone and at least one server");
            }
            dns_zone_upstreams.push((zone.trim().to_string(), servers));
        }
        Ok(Resolved {
            agent: AgentConfig {
                dns_listen,
                dns_zone_upstreams,
                dns_upstreams,
                l4lb_dataplane,
                vip_counts,
                l4lb_resync,
                overlay,
                overlay_dataplane,
                overlay_resync,
                edge_service_ports,
                hostname: hostname(),
                node_id,
                advertise,
                gossip_listen,
                seeds,
                data_dir,
                tls_dir,
                cluster_id: self
                    .cluster_id
                    .or(file.cluster_id)
                    .unwrap_or_else(|| "skein".to_string()),
                gossip_interval,
                suspect_after: Duration::from_millis(
                    self.suspect_after_ms
                        .or(file.suspect_after_ms)
                        .unwrap_or(1000),
                ),
                dead_node_grace: Duration::from_secs(
                    self.dead_node_grace_s
                        .or(file.dead_node_grace_s)
                        .unwrap_or(86_400),
                ),
            },
            api_listen,
            api_token,
            entry_listen: self.entry_listen.or(file.entry_listen),
            docker: self
                .docker_socket
                .or(file.docker_socket)
                .map(|socket| skein_docker::Options {
                    socket,
                    all: self.docker_all || file.docker_all.unwrap_or(false),
                    network: Some(
                        self.docker_network
                            .clone()
                            .or(file.docker_network.clone())
                            .unwrap_or_else(|| "dcos".to_string()),
                    )
                    .filter(|n| !n.is_empty()),
                    resync: Duration::from_secs(
                        self.docker_resync_s
                            .or(file.docker_resync_s)
                            .unwrap_or(30)
                            .max(1),
                    ),
                }),
            entry_tls: match (
                self.entry_tls_cert.or(file.entry_tls_cert),
                self.entry_tls_key.or(file.entry_tls_key),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => bail!("--entry-tls-cert and --entry-tls-key go together"),
            },
            entry_edge_stats: self
                .entry_edge_stats
                .or(file.entry_edge_stats)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("skein.toml");
        std::fs::write(
            &file,
            "node_id = \"from-file\"\nseeds = [\"10.0.0.1\"]\ngossip_interval_ms = 500\nadvertise = \"10.0.0.9\"\n",
        )
        .expect("write");
        let args = AgentArgs {
            config: Some(file),
            node_id: Some("from-flag".into()),
            ..AgentArgs::default()
        };
        let r = args.resolve().expect("resolve");
        assert_eq!(r.agent.node_id, "from-flag");
        assert_eq!(r.agent.seeds, vec!["10.0.0.1:62501".to_string()]);
        assert_eq!(r.agent.gossip_interval, Duration::from_millis(500));
        assert_eq!(r.api_listen.to_string(), DEFAULT_API_LISTEN);
        assert_eq!(r.agent.tls_dir, PathBuf::from("/var/lib/skein/tls"));
    }

    #[test]
    fn public_api_without_token_is_refused() {
        let args = AgentArgs {
            advertise: Some("10.0.0.9".parse().expect("ip")),
            api_listen: Some("0.0.0.0:62080".parse().expect("addr")),
            ..AgentArgs::default()
        };
        let err = args.resolve().err().expect("must fail").to_string();
        assert!(err.contains("without a token"), "{err}");
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("skein.toml");
        std::fs::write(&file, "nodeid = \"typo\"\n").expect("write");
        let args = AgentArgs {
            config: Some(file),
            ..AgentArgs::default()
        };
        let err = format!("{:#}", args.resolve().err().expect("must fail"));
        assert!(err.contains("unknown field"), "{err}");
    }
}
