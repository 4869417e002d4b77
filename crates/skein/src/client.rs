//! The CLI side: talks to the local agent's HTTP API and prints tables (or
//! the raw JSON with `--json`).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde::de::DeserializeOwned;
use serde_json::Value;
use skein_agent::docs;
use skein_state::{PortMapping, Protocol, TaskSpec};

#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// Base URL of the agent's API.
    #[arg(
        long,
        global = true,
        env = "SKEIN_API",
        default_value = "http://127.0.0.1:62080"
    )]
    pub api: String,
    /// File with the bearer token for state-changing calls.
    #[arg(long, global = true, env = "SKEIN_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The local agent's data dir: without --token-file or SKEIN_API_TOKEN,
    /// the CLI uses the agent's own token from `<data-dir>/api-token`.
    #[arg(long, global = true, env = "SKEIN_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

pub(crate) struct Client {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
    pub json: bool,
}

impl Client {
    pub(crate) fn new(args: &ApiArgs) -> anyhow::Result<Client> {
        let token = match (&args.token_file, std::env::var("SKEIN_API_TOKEN").ok()) {
            (Some(path), _) => Some(crate::config::read_token(path)?),
            (None, Some(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            // The local agent's own token, if this user may read it (root).
            _ => {
                crate::config::read_token(&args.data_dir.join(crate::config::LOCAL_TOKEN_FILE)).ok()
            }
        };
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .new_agent();
        Ok(Client {
            base: args.api.trim_end_matches('/').to_string(),
            token,
            http,
            json: args.json,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The body of a successful reply; a failed one becomes an error
    /// with the agent's message.
    fn check(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
        what: &str,
    ) -> anyhow::Result<String> {
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            let msg = match serde_json::from_str::<docs::ErrorBody>(&text) {
                Ok(body) => body.error,
                Err(_) => as_json(&text).to_string(),
            };
            if status == 401 && self.token.is_none() {
                bail!(
                    "{what} failed: {status}: {msg} (the local agent's token is in \
                     <data-dir>/{}, readable by root; or pass --token-file)",
                    crate::config::LOCAL_TOKEN_FILE
                );
            }
            bail!("{what} failed: {status}: {msg}");
        }
        Ok(text)
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach the skein agent at {} ({e}); is `skein agent` running? (set --api or SKEIN_API)",
            self.base
        )
    }

    /// The body of `GET path`, as sent.
    pub(crate) fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .get(&self.url(path))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.check(resp, &format!("GET {path}"))
    }

    /// `GET path`, decoded into its document.
    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        decode(&self.get_text(path)?, path)
    }

    pub(crate) fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<String> {
        let mut req = self.http.put(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.send_json(body).map_err(|e| self.unreachable(e))?;
        self.check(resp, &format!("PUT {path}"))
    }

    pub(crate) fn delete(&self, path: &str) -> anyhow::Result<String> {
        let mut req = self.http.delete(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| self.unreachable(e))?;
        self.check(resp, &format!("DELETE {path}"))
    }

    /// Prints `GET path`: with `--json` the agent's document as it sent it
    /// (pretty; fields this CLI does not know are kept), else `human`'s
    /// rendering of the typed document.
    pub(crate) fn show<T: DeserializeOwned>(
        &self,
        path: &str,
        human: impl Fn(&T) -> String,
    ) -> anyhow::Result<()> {
        let text = self.get_text(path)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&as_json(&text))?);
        } else {
            println!("{}", human(&decode(&text, path)?));
        }
        Ok(())
    }

    /// `skein vips`: the VIPs and the labels that could not be used.
    pub(crate) fn show_vips(&self) -> anyhow::Result<()> {
        let vips = self.get_text("/v1/vips")?;
        let problems = self.get_text("/v1/vips/problems")?;
        if self.json {
            let both = serde_json::json!({"vips": as_json(&vips), "problems": as_json(&problems)});
            println!("{}", serde_json::to_string_pretty(&both)?);
        } else {
            println!(
                "{}",
                print_vips(
                    &decode(&vips, "/v1/vips")?,
                    &decode(&problems, "/v1/vips/problems")?
                )
            );
        }
        Ok(())
    }

    /// `skein task add`: registers the task, prints the agent's reply.
    pub(crate) fn add_task(&self, args: &TaskAddArgs) -> anyhow::Result<()> {
        let path = format!("/v1/tasks/{}", args.id);
        let text = self.put_json(&path, &args.body()?)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&as_json(&text))?);
        } else {
            let reply: docs::PutTaskReply = decode(&text, &path)?;
            println!("task {} registered on this node", reply.id);
        }
        Ok(())
    }

    /// `skein task rm`.
    pub(crate) fn remove_task(&self, id: &str) -> anyhow::Result<()> {
        self.delete(&format!("/v1/tasks/{id}"))?;
        if !self.json {
            println!("task {id} removed");
        }
        Ok(())
    }

    /// `skein version`: this binary's version and the agent's.
    pub(crate) fn show_version(&self) -> anyhow::Result<()> {
        println!("skein {}", skein_agent::VERSION);
        let v: docs::Version = self.get("/v1/version")?;
        println!(
            "agent {} on node {} (cluster {})",
            v.version, v.node_id, v.cluster_id
        );
        Ok(())
    }
}

/// A body as JSON; one that is not JSON as a string, an empty one as null.
fn as_json(text: &str) -> Value {
    if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
    }
}

fn decode<T: DeserializeOwned>(text: &str, path: &str) -> anyhow::Result<T> {
    serde_json::from_str(text).with_context(|| {
        format!(
            "the agent's {path} is not the document this CLI reads (an agent of another version?)"
        )
    })
}

/// Prints rows as an aligned table.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row));
    }
    out
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn ago(updated_ms: u64) -> String {
    if updated_ms == 0 {
        return "-".to_string();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(updated_ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

pub(crate) fn print_nodes(nodes: &docs::Nodes) -> String {
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.clone(),
                or_dash(n.private_ip),
                or_dash(n.hostname.as_deref()),
                n.status.as_str().to_string(),
                ago(n.updated),
            ]
        })
        .collect();
    table(&["NODE", "PRIVATE IP", "HOSTNAME", "STATUS", "SINCE"], rows)
}

/// `8080/tcp VIP_0=/web:80`.
fn port_cell(p: &PortMapping) -> String {
    let mut out = format!("{}/{}", p.port, p.protocol);
    for (k, v) in &p.labels {
        out.push_str(&format!(" {k}={v}"));
    }
    out
}

pub(crate) fn print_tasks(tasks: &docs::Tasks) -> String {
    let rows = tasks
        .tasks
        .iter()
        .map(|t| {
            let ports: Vec<String> = t.spec.ports.iter().map(port_cell).collect();
            vec![
                t.id.clone(),
                t.spec.app.clone(),
                t.spec.framework.clone(),
                t.spec.ip.to_string(),
                ports.join(", "),
                format!("{} ({})", t.node_id, t.node_status.as_str()),
            ]
        })
        .collect();
    table(&["TASK", "APP", "FRAMEWORK", "IP", "PORTS", "NODE"], rows)
}

pub(crate) fn print_state(state: &docs::State) -> String {
    let rows = state
        .nodes
        .iter()
        .map(|(id, n)| {
            let live = n.keys.values().filter(|k| !k.deleted).count();
            vec![
                id.clone(),
                n.status.as_str().to_string(),
                n.generation.to_string(),
                n.max_version.to_string(),
                live.to_string(),
                (n.keys.len() - live).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "STATUS",
            "GENERATION",
            "VERSION",
            "KEYS",
            "TOMBSTONES",
        ],
        rows,
    )
}

/// `/overlay-master/state` as a table: one row per agent and overlay.
pub(crate) fn print_overlay(state: &docs::OverlayMasterState) -> String {
    let mut rows = Vec::new();
    for a in &state.agents {
        if a.overlays.is_empty() {
            rows.push(vec![
                a.node_id.clone(),
                a.ip.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                a.state.status.as_str().to_string(),
            ]);
        }
        for o in &a.overlays {
            let vx = &o.backend.vxlan;
            let mut status = o.state.status.as_str().to_string();
            if let Some(err) = &o.state.error {
                status = format!("{status}: {err}");
            }
            rows.push(vec![
                a.node_id.clone(),
                a.ip.to_string(),
                o.info.name.clone(),
                o.subnet.clone(),
                vx.vtep_ip.clone(),
                vx.vtep_mac.clone(),
                status,
            ]);
        }
    }
    let mut out = format!(
        "VTEP subnet {}  OUI {}  VNI 1024  UDP 64000\n",
        state.network.vtep_subnet, state.network.vtep_mac_oui
    );
    out.push_str(&table(
        &[
            "NODE", "IP", "OVERLAY", "SUBNET", "VTEP IP", "VTEP MAC", "STATUS",
        ],
        rows,
    ));
    out
}

/// `ipvsadm -Ln`-style listing of VIPs and their backends, then any
/// labels that could not be used.
pub(crate) fn print_vips(vips: &docs::Vips, problems: &docs::VipProblems) -> String {
    let mut out = String::from(
        "Prot VIP Address\n  -> Backend                Node        Status   InUse  Task",
    );
    for v in vips {
        let address = match v.address {
            Some(a) => a.to_string(),
            None => "(address pending)".to_string(),
        };
        out.push_str(&format!(
            "\n{:<4} {} {address}",
            v.protocol.to_string().to_uppercase(),
            v.vip
        ));
        for b in &v.backend {
            let addr = match b.ip {
                IpAddr::V6(ip) => format!("[{ip}]:{}", b.port),
                IpAddr::V4(ip) => format!("{ip}:{}", b.port),
            };
            let in_use = if b.in_use { "yes" } else { "no" };
            out.push_str(&format!(
                "\n  -> {addr:<22} {:<11} {:<8} {in_use:<6} {}",
                b.node_id,
                b.node_status.as_str(),
                b.task_id
            ));
        }
    }
    for p in &problems.0 {
        out.push_str(&format!(
            "\n! task {} on {}: {}: {}",
            p.task_id, p.node_id, p.label, p.error
        ));
    }
    out
}

/// `--port [name:]port[/tcp|udp][,LABEL=VALUE...]`, e.g.
/// `http:9896/tcp,VIP_0=/httpi:3141`.
pub(crate) fn parse_port(spec: &str) -> anyhow::Result<PortMapping> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, rest) = match head.split_once(':') {
        Some((n, r)) => (Some(n.to_string()), r),
        None => (None, head),
    };
    let (port, protocol) = match rest.split_once('/') {
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some((_, other)) => bail!("--port {spec}: protocol must be tcp or udp, not {other:?}"),
        None => (rest, Protocol::Tcp),
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("--port {spec}: {port:?} is not a port number"))?;
    let mut labels = skein_state::Labels::new();
    for label in parts {
        let (k, v) = label
            .split_once('=')
            .with_context(|| format!("--port {spec}: label {label:?} is not KEY=VALUE"))?;
        labels.insert(k, v);
    }
    Ok(PortMapping {
        name,
        port,
        protocol,
        labels,
    })
}

#[derive(Debug, Args)]
pub(crate) struct TaskAddArgs {
    /// Task id, unique in the cluster (e.g. httpi.1).
    pub id: String,
    /// Marathon app id, e.g. /httpi.
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long, default_value = "marathon")]
    pub framework: String,
    /// Address the task's ports listen on.
    #[arg(long)]
    pub ip: Option<std::net::IpAddr>,
    /// `[name:]port[/tcp|udp][,LABEL=VALUE...]`, repeatable; e.g.
    /// `http:9896/tcp,VIP_0=/httpi:3141`.
    #[arg(long = "port")]
    pub ports: Vec<String>,
    /// An app label `KEY=VALUE`, repeatable; e.g. `HAPROXY_GROUP=external`,
    /// `HAPROXY_0_VHOST=web.example.com` (`HAPROXY_{n}_*` refer to the
    /// n-th `--port`).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The whole task as JSON instead (`@file` reads a file).
    #[arg(long, conflicts_with_all = ["app", "ip", "ports", "labels"])]
    pub body: Option<String>,
}

impl TaskAddArgs {
    pub(crate) fn body(&self) -> anyhow::Result<Value> {
        if let Some(body) = &self.body {
            let text = match body.strip_prefix('@') {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
                }
                None => body.clone(),
            };
            return serde_json::from_str(&text).context("--body is not valid JSON");
        }
        let (Some(app), Some(ip)) = (&self.app, self.ip) else {
            bail!("give --app and --ip (and --port ...), or the whole task with --body");
        };
        let spec = TaskSpec {
            app: app.clone(),
            framework: self.framework.clone(),
            ip,
            ports: self
                .ports
                .iter()
                .map(|p| parse_port(p))
                .collect::<anyhow::Result<_>>()?,
            health_check: None,
            labels: self
                .labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .with_context(|| format!("--label {l:?} is not KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(serde_json::to_value(spec)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies an agent served and the tables `skein` printed for them
    // before the documents were typed: the tables must not change.

    #[test]
    fn tasks_table() {
        let body = r#"{"tasks":[{"id":"bad.1","node_id":"n1","node_status":"alive","healthy":true,"app":"/bad","framework":"marathon","ip":"10.0.0.7","ports":[{"port":99,"protocol":"tcp","labels":{"VIP_0":"nonsense"}}]},{"id":"db.1","node_id":"n1","node_status":"alive","healthy":true,"app":"/grp/db","framework":"other","ip":"10.0.0.6","ports":[{"port":5432,"protocol":"tcp","labels":{"VIP_1":"1.2.3.4:5432"}},{"port":53,"protocol":"udp"}]},{"id":"web.1","node_id":"n1","node_status":"alive","healthy":true,"app":"/web","framework":"marathon","ip":"10.0.0.5","ports":[{"name":"http","port":8080,"protocol":"tcp","labels":{"VIP_0":"/web:80"}}]}]}"#;
        let tasks: docs::Tasks = serde_json::from_str(body).expect("decodes");
        assert_eq!(
            print_tasks(&tasks),
            r#"TASK   APP      FRAMEWORK  IP        PORTS                                NODE
bad.1  /bad     marathon   10.0.0.7  99/tcp VIP_0=nonsense                n1 (alive)
db.1   /grp/db  other      10.0.0.6  5432/tcp VIP_1=1.2.3.4:5432, 53/udp  n1 (alive)
web.1  /web     marathon   10.0.0.5  8080/tcp VIP_0=/web:80               n1 (alive)"#
        );
    }

    #[test]
    fn state_table() {
        let body = r#"{"cluster_id":"capc","node_id":"n1","nodes":{"n1":{"generation":1795465730770,"keys":{"lease:overlay/dcos":{"deleted":false,"value":{"since":1795465730775,"slot":54464},"version":3},"lease:vtep":{"deleted":false,"value":{"since":1795465730775,"slot":1216},"version":4},"meta":{"deleted":false,"value":{"agent_version":"0.1.0","hostname":"vm","private_ip":"127.0.0.1","started_ms":1795465730773},"version":1},"overlay:config":{"deleted":false,"value":"6fd6520de987a71d","version":2},"task:bad.1":{"deleted":false,"value":{"app":"/bad","framework":"marathon","ip":"10.0.0.7","ports":[{"labels":{"VIP_0":"nonsense"},"port":99,"protocol":"tcp"}]},"version":9},"task:db.1":{"deleted":false,"value":{"app":"/grp/db","framework":"other","ip":"10.0.0.6","ports":[{"labels":{"VIP_1":"1.2.3.4:5432"},"port":5432,"protocol":"tcp"},{"port":53,"protocol":"udp"}]},"version":8},"task:gone.1":{"deleted":true,"value":null,"version":11},"task:web.1":{"deleted":false,"value":{"app":"/web","framework":"marathon","ip":"10.0.0.5","ports":[{"labels":{"VIP_0":"/web:80"},"name":"http","port":8080,"protocol":"tcp"}]},"version":7},"vipip:web.marathon":{"deleted":false,"value":{"ip":"11.38.39.51","since":1795465730871},"version":6}},"max_version":11,"status":"alive"}},"removed":{}}"#;
        let state: docs::State = serde_json::from_str(body).expect("decodes");
        assert_eq!(
            print_state(&state),
            r#"NODE  STATUS  GENERATION     VERSION  KEYS  TOMBSTONES
n1    alive   1795465730770  11       8     1"#
        );
    }

    #[test]
    fn nodes_table() {
        let body = r#"[{"node_id":"n1","private_ip":"127.0.0.1","hostname":"vm","status":"alive","updated":0,"generation":1,"version":11},
            {"node_id":"n2","private_ip":null,"hostname":null,"status":"down","updated":1,"generation":1,"version":1}]"#;
        let nodes: docs::Nodes = serde_json::from_str(body).expect("decodes");
        let text = print_nodes(&nodes);
        assert!(
            text.starts_with(
                "NODE  PRIVATE IP  HOSTNAME  STATUS  SINCE\n\
                 n1    127.0.0.1   vm        alive   -\n\
                 n2    -           -         down    "
            ),
            "{text}"
        );
        assert!(text.ends_with("h ago"), "{text}");
    }

    #[test]
    fn overlay_table() {
        let body = r#"{"agents":[{"ip":"127.0.0.1","node_id":"n1","overlays":[{"backend":{"vxlan":{"vni":1024,"vtep_ip":"44.128.4.192/20","vtep_mac":"70:B3:D5:80:04:C0","vtep_name":"vtep1024"}},"docker_bridge":{"ip":"9.212.192.129/25","name":"d-dcos"},"info":{"name":"dcos","prefix":24,"subnet":"9.0.0.0/8"},"mesos_bridge":{"ip":"9.212.192.1/25","name":"m-dcos"},"state":{"status":"STATUS_LEASED"},"subnet":"9.212.192.0/24"}],"state":{"status":"STATUS_LEASED"}}],"network":{"overlays":[{"name":"dcos","prefix":24,"subnet":"9.0.0.0/8"}],"vtep_mac_oui":"70:B3:D5:00:00:00","vtep_mtu":1450,"vtep_subnet":"44.128.0.0/20"}}"#;
        let mut state: docs::OverlayMasterState = serde_json::from_str(body).expect("decodes");
        assert_eq!(
            print_overlay(&state),
            r#"VTEP subnet 44.128.0.0/20  OUI 70:B3:D5:00:00:00  VNI 1024  UDP 64000
NODE  IP         OVERLAY  SUBNET          VTEP IP          VTEP MAC           STATUS
n1    127.0.0.1  dcos     9.212.192.0/24  44.128.4.192/20  70:B3:D5:80:04:C0  STATUS_LEASED"#
        );
        let mut failed = state.agents[0].clone();
        failed.node_id = "n2".into();
        failed.overlays[0].state = docs::OverlayState {
            error: Some("no bridge".into()),
            status: docs::OverlayStatus::Error,
        };
        let odd = docs::OverlayAgent {
            ip: "10.0.0.9".parse().expect("ip"),
            node_id: "odd".into(),
            overlays: vec![],
            state: docs::OverlayState {
                error: Some("differs".into()),
                status: docs::OverlayStatus::ConfigMismatch,
            },
        };
        state.agents.extend([failed, odd]);
        let text = print_overlay(&state);
        assert!(
            text.contains(
                "n2    127.0.0.1  dcos     9.212.192.0/24  44.128.4.192/20  70:B3:D5:80:04:C0  \
                 STATUS_ERROR: no bridge"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("odd   10.0.0.9   -        -               -                -                  STATUS_CONFIG_MISMATCH"),
            "{text}"
        );
    }

    #[test]
    fn port_flag_parses() {
        let p = parse_port("http:9896/tcp,VIP_0=/httpi:3141").expect("parse");
        assert_eq!(p.name.as_deref(), Some("http"));
        assert_eq!(p.port, 9896);
        assert_eq!(&p.labels["VIP_0"], "/httpi:3141");
        assert_eq!(parse_port("53/udp").expect("parse").protocol, Protocol::Udp);
        assert!(parse_port("http:99999").is_err());
        assert!(parse_port("1/sctp").is_err());
        assert!(parse_port("1,novalue").is_err());
    }

    #[test]
    fn vips_print_like_ipvsadm() {
        let vips = r#"[{"vip":"web.marathon.l4lb.thisdcos.directory:80","protocol":"tcp","port":80,"address":"11.38.39.51","backend":[{"ip":"10.0.0.5","port":8080,"task_id":"web.1","node_id":"n1","node_status":"alive","healthy":true,"in_use":true}]},{"vip":"1.2.3.4:5432","protocol":"tcp","port":5432,"address":"1.2.3.4","backend":[{"ip":"10.0.0.6","port":5432,"task_id":"db.1","node_id":"n1","node_status":"alive","healthy":true,"in_use":true}]}]"#;
        let problems = r#"[{"task_id":"bad.1","node_id":"n1","label":"VIP_0","error":"VIP label \"nonsense\" is not `/name:port` or `address:port`"}]"#;
        let vips: docs::Vips = serde_json::from_str(vips).expect("decodes");
        let problems: docs::VipProblems = serde_json::from_str(problems).expect("decodes");
        assert_eq!(
            print_vips(&vips, &problems),
            r#"Prot VIP Address
  -> Backend                Node        Status   InUse  Task
TCP  web.marathon.l4lb.thisdcos.directory:80 11.38.39.51
  -> 10.0.0.5:8080          n1          alive    yes    web.1
TCP  1.2.3.4:5432 1.2.3.4
  -> 10.0.0.6:5432          n1          alive    yes    db.1
! task bad.1 on n1: VIP_0: VIP label "nonsense" is not `/name:port` or `address:port`"#
        );
        let pending: docs::Vips = serde_json::from_str(
            r#"[{"vip":"x.marathon.l4lb.thisdcos.directory:80","protocol":"udp","port":80,
                "address":null,"backend":[{"ip":"fd00::1","port":80,"task_id":"t","node_id":"n",
                "node_status":"suspect","healthy":false,"in_use":false}]}]"#,
        )
        .expect("decodes");
        let out = print_vips(&pending, &docs::VipProblems::default());
        assert!(
            out.ends_with(
                "UDP  x.marathon.l4lb.thisdcos.directory:80 (address pending)\n  \
                 -> [fd00::1]:80           n           suspect  no     t"
            ),
            "{out}"
        );
    }

    #[test]
    fn table_aligns() {
        let t = table(&["A", "BB"], vec![vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }
}
