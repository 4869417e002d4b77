//! The CLI side: talks to the local agent's HTTP API and prints tables (or
//! the raw JSON with `--json`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;
use skein_state::{PortMapping, Protocol, TaskSpec};

#[derive(Debug, Args)]
pub struct ApiArgs {
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
}

pub struct Client {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
    pub json: bool,
}

impl Client {
    pub fn new(args: &ApiArgs) -> anyhow::Result<Client> {
        let token = match (&args.token_file, std::env::var("SKEIN_API_TOKEN").ok()) {
            (Some(path), _) => Some(crate::config::read_token(path)?),
            (None, Some(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => None,
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

    fn check(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
        what: &str,
    ) -> anyhow::Result<Value> {
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = body
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            bail!("{what} failed: {status}: {msg}");
        }
        Ok(body)
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach the skein agent at {} ({e}); is `skein agent` running? (set --api or SKEIN_API)",
            self.base
        )
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(&self.url(path))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.check(resp, &format!("GET {path}"))
    }

    pub fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut req = self.http.put(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.send_json(body).map_err(|e| self.unreachable(e))?;
        self.check(resp, &format!("PUT {path}"))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        let mut req = self.http.delete(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| self.unreachable(e))?;
        self.check(resp, &format!("DELETE {path}"))
    }
}

/// Prints rows as an aligned table.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
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

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    }
}

fn ago(updated_ms: &Value) -> String {
    let Some(ms) = updated_ms.as_u64().filter(|&m| m > 0) else {
        return "-".to_string();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

pub fn print_nodes(nodes: &Value) -> String {
    let rows = nodes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    vec![
                        s(n, "node_id"),
                        s(n, "private_ip"),
                        s(n, "hostname"),
                        s(n, "status"),
                        ago(n.get("updated").unwrap_or(&Value::Null)),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["NODE", "PRIVATE IP", "HOSTNAME", "STATUS", "SINCE"], rows)
}

pub fn print_tasks(tasks: &Value) -> String {
    let rows = tasks
        .get("tasks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| {
                    let ports = t
                        .get("ports")
                        .and_then(Value::as_array)
                        .map(|ps| {
                            ps.iter()
                                .map(|p| {
                                    let mut out = format!("{}/{}", s(p, "port"), s(p, "protocol"));
                                    if let Some(labels) = p.get("labels").and_then(Value::as_object)
                                    {
                                        for (k, v) in labels {
                                            out.push_str(&format!(
                                                " {k}={}",
                                                v.as_str().unwrap_or("?")
                                            ));
                                        }
                                    }
                                    out
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    vec![
                        s(t, "id"),
                        s(t, "app"),
                        s(t, "framework"),
                        s(t, "ip"),
                        ports,
                        format!("{} ({})", s(t, "node_id"), s(t, "node_status")),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["TASK", "APP", "FRAMEWORK", "IP", "PORTS", "NODE"], rows)
}

pub fn print_state(state: &Value) -> String {
    let rows = state
        .get("nodes")
        .and_then(Value::as_object)
        .map(|nodes| {
            nodes
                .iter()
                .map(|(id, n)| {
                    let keys = n.get("keys").and_then(Value::as_object);
                    let live = keys.map_or(0, |k| {
                        k.values()
                            .filter(|e| e.get("deleted") == Some(&Value::Bool(false)))
                            .count()
                    });
                    let dead = keys.map_or(0, |k| k.len()) - live;
                    vec![
                        id.clone(),
                        s(n, "status"),
                        s(n, "generation"),
                        s(n, "max_version"),
                        live.to_string(),
                        dead.to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
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

/// `ipvsadm -Ln`-style listing of VIPs and their backends, then any
/// labels that could not be used.
/// `/overlay-master/state` as a table: one row per agent and overlay.
pub fn print_overlay(state: &Value) -> String {
    let mut rows = Vec::new();
    for a in state["agents"].as_array().into_iter().flatten() {
        let overlays = a["overlays"].as_array().cloned().unwrap_or_default();
        if overlays.is_empty() {
            rows.push(vec![
                s(a, "node_id"),
                s(a, "ip"),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                s(&a["state"], "status"),
            ]);
        }
        for o in overlays {
            let vx = &o["backend"]["vxlan"];
            let mut status = s(&o["state"], "status");
            if let Some(err) = o["state"]["error"].as_str() {
                status = format!("{status}: {err}");
            }
            rows.push(vec![
                s(a, "node_id"),
                s(a, "ip"),
                s(&o["info"], "name"),
                s(&o, "subnet"),
                s(vx, "vtep_ip"),
                s(vx, "vtep_mac"),
                status,
            ]);
        }
    }
    let network = &state["network"];
    let mut out = format!(
        "VTEP subnet {}  OUI {}  VNI 1024  UDP 64000\n",
        s(network, "vtep_subnet"),
        s(network, "vtep_mac_oui")
    );
    out.push_str(&table(
        &[
            "NODE", "IP", "OVERLAY", "SUBNET", "VTEP IP", "VTEP MAC", "STATUS",
        ],
        rows,
    ));
    out
}

pub fn print_vips(vips: &Value, problems: &Value) -> String {
    let mut out = String::from(
        "Prot VIP Address\n  -> Backend                Node        Status   InUse  Task",
    );
    for v in vips.as_array().into_iter().flatten() {
        let address = match v.get("address").and_then(Value::as_str) {
            Some(a) => a.to_string(),
            None => "(address pending)".to_string(),
        };
        out.push_str(&format!(
            "\n{:<4} {} {address}",
            s(v, "protocol").to_uppercase(),
            s(v, "vip")
        ));
        for b in v
            .get("backend")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let addr = match b.get("ip").and_then(Value::as_str) {
                Some(ip) if ip.contains(':') => format!("[{ip}]:{}", s(b, "port")),
                _ => format!("{}:{}", s(b, "ip"), s(b, "port")),
            };
            let in_use = if b.get("in_use") == Some(&Value::Bool(true)) {
                "yes"
            } else {
                "no"
            };
            out.push_str(&format!(
                "\n  -> {addr:<22} {:<11} {:<8} {in_use:<6} {}",
                s(b, "node_id"),
                s(b, "node_status"),
                s(b, "task_id")
            ));
        }
    }
    for p in problems.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n! task {} on {}: {}: {}",
            s(p, "task_id"),
            s(p, "node_id"),
            s(p, "label"),
            s(p, "error")
        ));
    }
    out
}

/// `--port [name:]port[/tcp|udp][,LABEL=VALUE...]`, e.g.
/// `http:9896/tcp,VIP_0=/httpi:3141`.
pub fn parse_port(spec: &str) -> anyhow::Result<PortMapping> {
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
    let mut labels = BTreeMap::new();
    for label in parts {
        let (k, v) = label
            .split_once('=')
            .with_context(|| format!("--port {spec}: label {label:?} is not KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(PortMapping {
        name,
        port,
        protocol,
        labels,
    })
}

#[derive(Debug, Args)]
pub struct TaskAddArgs {
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
    /// The whole task as JSON instead (`@file` reads a file).
    #[arg(long, conflicts_with_all = ["app", "ip", "ports"])]
    pub body: Option<String>,
}

impl TaskAddArgs {
    pub fn body(&self) -> anyhow::Result<Value> {
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
        };
        Ok(serde_json::to_value(spec)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_table() {
        let state = serde_json::json!({
            "network": {"vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00"},
            "agents": [{"ip": "10.0.0.1", "node_id": "node1", "overlays": [{
                "info": {"name": "dcos"}, "subnet": "9.0.1.0/24",
                "backend": {"vxlan": {"vtep_ip": "44.128.0.1/20", "vtep_mac": "70:B3:D5:80:00:01"}},
                "state": {"status": "STATUS_OK"}}]},
                {"ip": "10.0.0.9", "node_id": "odd", "overlays": [],
                 "state": {"status": "STATUS_CONFIG_MISMATCH"}}]
        });
        let text = print_overlay(&state);
        assert!(
            text.contains(
                "node1  10.0.0.1  dcos     9.0.1.0/24  44.128.0.1/20  70:B3:D5:80:00:01  STATUS_OK"
            ),
            "{text}"
        );
        assert!(text.contains("STATUS_CONFIG_MISMATCH"), "{text}");
    }

    #[test]
    fn port_flag_parses() {
        let p = parse_port("http:9896/tcp,VIP_0=/httpi:3141").expect("parse");
        assert_eq!(p.name.as_deref(), Some("http"));
        assert_eq!(p.port, 9896);
        assert_eq!(p.labels["VIP_0"], "/httpi:3141");
        assert_eq!(parse_port("53/udp").expect("parse").protocol, Protocol::Udp);
        assert!(parse_port("http:99999").is_err());
        assert!(parse_port("1/sctp").is_err());
        assert!(parse_port("1,novalue").is_err());
    }

    #[test]
    fn vips_print_like_ipvsadm() {
        let vips = serde_json::json!([{"vip":"httpi.marathon.l4lb.thisdcos.directory:3141","protocol":"tcp",
            "address":"11.0.0.9","backend":[{"ip":"10.0.0.2","port":9896,"task_id":"t1","node_id":"n1",
            "node_status":"alive","in_use":true}]},
            {"vip":"x.marathon.l4lb.thisdcos.directory:80","protocol":"udp","address":null,"backend":[]}]);
        let out = print_vips(&vips, &serde_json::json!([]));
        assert!(
            out.contains("TCP  httpi.marathon.l4lb.thisdcos.directory:3141 11.0.0.9"),
            "{out}"
        );
        assert!(out.contains("  -> 10.0.0.2:9896"), "{out}");
        assert!(
            out.contains("UDP  x.marathon.l4lb.thisdcos.directory:80 (address pending)"),
            "{out}"
        );
    }

    #[test]
    fn table_aligns() {
        let t = table(&["A", "BB"], vec![vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }
}
