//! What the API's integration tests share: a cluster CA and a real agent on
//! loopback (gossip over QUIC, no DNS server, no dataplane).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use skein_agent::{Agent, AgentConfig};
use tempfile::TempDir;

/// A cluster CA for `cluster` in a temporary directory.
pub(crate) fn ca(cluster: &str) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    skein_tls::init_ca(&dir.path().join("ca"), cluster).expect("CA");
    dir
}

fn free_udp_port(ip: Ipv4Addr) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port()
}

/// A real agent `node_id` of `cluster` advertising `ip`, with a
/// certificate from the CA in `ca`, its data in a temporary directory
/// (returned: it must outlive the agent).
pub(crate) async fn agent(
    ca: &Path,
    cluster: &str,
    node_id: &str,
    ip: Ipv4Addr,
    seeds: Vec<String>,
) -> (Arc<Agent>, TempDir) {
    let data = tempfile::tempdir().expect("tempdir");
    let tls_dir = data.path().join("tls");
    skein_tls::issue_node(&ca.join("ca"), node_id, &tls_dir).expect("node certificate");
    let config = AgentConfig {
        node_id: node_id.to_string(),
        hostname: format!("{node_id}.test"),
        advertise: IpAddr::V4(ip),
        gossip_listen: SocketAddr::from((ip, free_udp_port(ip))),
        seeds,
        data_dir: data.path().to_path_buf(),
        tls_dir,
        cluster_id: cluster.to_string(),
        gossip_interval: Duration::from_millis(50),
        suspect_after: Duration::from_millis(1000),
        dead_node_grace: Duration::from_secs(3600),
        dns_listen: vec![],
        dns_upstreams: vec!["127.0.0.1:9".parse().expect("addr")],
        dns_zone_upstreams: vec![],
        l4lb_dataplane: skein_agent::l4lb::Dataplane::None,
        vip_counts: false,
        l4lb_resync: Duration::from_secs(30),
        overlay: Default::default(),
        overlay_dataplane: skein_agent::vxlan::OverlayDataplane::None,
        overlay_resync: Duration::from_secs(10),
        edge_service_ports: skein_agent::edge::DEFAULT_SERVICE_PORTS,
    };
    let agent = Agent::start(config).await.expect("agent starts");
    (agent, data)
}
