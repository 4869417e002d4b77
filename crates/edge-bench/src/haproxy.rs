//! HAProxy driven as Marathon-LB drove it: a configuration rendered from
//! the routes and a reload on every change. HAProxy runs in master-worker
//! mode (`haproxy -W -S <master socket>`) and is reloaded the seamless
//! way, `SIGUSR2` to the master: it re-reads the configuration, starts a
//! new worker that takes the listening sockets over, and tells the old
//! worker to stop once its connections are done (or after
//! `hard-stop-after`, if set).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use skein_edge::{Backend, Mode, Routes, ServerState};

use crate::cluster::{Change, Cluster};
use crate::edge::{all_processes, signal, thread_count, wait_for_port, write_atomic, Edge, Ports};

/// What is rendered besides the routes.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) ports: Ports,
    pub(crate) nbthread: usize,
    /// `hard-stop-after` in seconds; none: old workers live until their
    /// last connection closes (HAProxy's default).
    pub(crate) hard_stop_after: Option<u64>,
    /// `option http-server-close` (Marathon-LB's default: a new server
    /// connection per request); off, HAProxy keeps server connections
    /// alive and reuses them (its own default).
    pub(crate) http_server_close: bool,
    /// For the stats and master sockets.
    pub(crate) dir: PathBuf,
}

/// HAProxy's names allow letters, digits, `-`, `_`, `.` and `:`.
fn ident(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn backend_section(out: &mut String, b: &Backend) {
    let _ = writeln!(out, "backend {}", ident(&b.name));
    let _ = writeln!(out, "  balance {}", b.labels.balance);
    let _ = writeln!(out, "  mode {}", b.labels.mode);
    if b.labels.mode == Mode::Http {
        let _ = writeln!(out, "  option forwardfor");
        let _ = writeln!(
            out,
            "  http-request set-header X-Forwarded-Port %[dst_port]"
        );
        let _ = writeln!(
            out,
            "  http-request add-header X-Forwarded-Proto https if {{ ssl_fc }}"
        );
    }
    // Marathon-LB wrote only healthy tasks' servers.
    for s in b.servers.iter().filter(|s| s.state == ServerState::Up) {
        let _ = writeln!(out, "  server {} {}", ident(&s.name()), s.addr);
    }
    out.push('\n');
}

/// The whole configuration for `routes`.
pub(crate) fn render(routes: &Routes, s: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "global");
    let _ = writeln!(out, "  nbthread {}", s.nbthread);
    let _ = writeln!(out, "  maxconn 8000");
    let _ = writeln!(
        out,
        "  stats socket {}/haproxy.sock mode 600 level admin expose-fd listeners",
        s.dir.display()
    );
    if let Some(secs) = s.hard_stop_after {
        let _ = writeln!(out, "  hard-stop-after {secs}s");
    }
    out.push_str(
        "\ndefaults
  mode http
  retries 3
  option redispatch
  option dontlognull
  timeout connect 3s
  timeout client 30s
  timeout server 30s
  timeout tunnel 3600s
",
    );
    if s.http_server_close {
        out.push_str("  option http-server-close\n");
    }
    out.push('\n');
    let _ = writeln!(out, "listen stats");
    let _ = writeln!(out, "  bind 127.0.0.1:{}", s.ports.stats);
    let _ = writeln!(out, "  mode http");
    let _ = writeln!(out, "  stats enable");
    let _ = writeln!(out, "  stats uri /haproxy?stats");
    let _ = writeln!(out, "  monitor-uri /_haproxy_health_check\n");

    let _ = writeln!(out, "frontend marathon_http_in");
    let _ = writeln!(out, "  bind 127.0.0.1:{}", s.ports.http);
    let _ = writeln!(out, "  mode http");
    for (i, r) in routes.http_routes.iter().enumerate() {
        let backend = ident(&r.backend);
        let mut conds = Vec::new();
        if let Some(h) = &r.host {
            let acl = format!("host_{}_{i}", ident(h).replace(['.', ':'], "_"));
            match h.strip_prefix("*.") {
                Some(domain) => {
                    let _ = writeln!(out, "  acl {acl} hdr_end(host) -i .{domain}");
                }
                None => {
                    let _ = writeln!(out, "  acl {acl} hdr(host) -i {h}");
                }
            }
            conds.push(acl);
        }
        if let Some(p) = &r.path {
            let acl = format!("path_{backend}_{i}");
            let _ = writeln!(out, "  acl {acl} path_beg {p}");
            conds.push(acl);
        }
        if !conds.is_empty() {
            let _ = writeln!(out, "  use_backend {backend} if {}", conds.join(" "));
        }
    }
    out.push('\n');

    for b in &routes.backends {
        if let Some(port) = b.bind_port {
            let _ = writeln!(out, "frontend {}", ident(&b.name));
            let _ = writeln!(out, "  bind 127.0.0.1:{port}");
            let _ = writeln!(out, "  mode {}", b.labels.mode);
            let _ = writeln!(out, "  use_backend {}\n", ident(&b.name));
        }
    }
    for b in &routes.backends {
        backend_section(&mut out, b);
    }
    out
}

pub(crate) struct Haproxy {
    child: Child,
    cfg: PathBuf,
    log: PathBuf,
    settings: Settings,
    version: String,
    reloads: u64,
}

/// `haproxy -v`'s version, e.g. `2.6.12`.
pub(crate) fn version(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("-v")
        .output()
        .with_context(|| format!("{} -v (apt-get install haproxy)", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .nth(2)
        .map(|v| v.split('-').next().unwrap_or(v).to_string())
        .unwrap_or_else(|| "?".to_string()))
}

impl Haproxy {
    pub(crate) fn start(
        bin: &Path,
        cluster: &Cluster,
        settings: Settings,
    ) -> anyhow::Result<Haproxy> {
        let version = version(bin)?;
        let cfg = settings.dir.join("haproxy.cfg");
        let routes = cluster.routes(settings.ports.service_base);
        write_atomic(&cfg, render(&routes, &settings).as_bytes())?;
        let check = Command::new(bin).arg("-c").arg("-f").arg(&cfg).output()?;
        if !check.status.success() {
            anyhow::bail!(
                "haproxy -c refuses the rendered configuration:\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = settings.dir.join("haproxy.log");
        let out = std::fs::File::create(&log)?;
        let mut child = Command::new(bin)
            .arg("-W")
            .arg("-S")
            .arg(settings.dir.join("master.sock"))
            .arg("-f")
            .arg(&cfg)
            .arg("-p")
            .arg(settings.dir.join("haproxy.pid"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let ready = wait_for_port(
            settings.ports.http,
            &mut child,
            &log,
            Duration::from_secs(10),
        );
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context("haproxy"));
        }
        Ok(Haproxy {
            child,
            cfg,
            log,
            settings,
            version,
            reloads: 0,
        })
    }

    fn master(&self) -> i32 {
        self.child.id() as i32
    }

    fn workers(&self) -> Vec<i32> {
        let master = self.master();
        all_processes()
            .into_iter()
            .filter(|(_, ppid, comm)| *ppid == master && comm.starts_with("haproxy"))
            .map(|(pid, _, _)| pid)
            .collect()
    }
}

impl Edge for Haproxy {
    fn name(&self) -> String {
        format!("haproxy {}", self.version)
    }

    fn updated_by(&self) -> &'static str {
        "reloads"
    }

    fn ports(&self) -> Ports {
        self.settings.ports
    }

    fn apply(&mut self, cluster: &Cluster, _change: &Change) -> anyhow::Result<()> {
        let routes = cluster.routes(self.settings.ports.service_base);
        write_atomic(&self.cfg, render(&routes, &self.settings).as_bytes())?;
        signal(self.master(), libc::SIGUSR2)?;
        self.reloads += 1;
        Ok(())
    }

    fn processes(&self) -> usize {
        let alive = usize::from(Path::new(&format!("/proc/{}", self.master())).exists());
        alive + self.workers().len()
    }

    fn threads(&self) -> String {
        let workers: Vec<String> = self
            .workers()
            .iter()
            .filter_map(|&w| thread_count(w).map(|n| n.to_string()))
            .collect();
        format!(
            "haproxy: nbthread {}, worker threads now [{}]",
            self.settings.nbthread,
            workers.join(", ")
        )
    }

    fn applies(&self) -> u64 {
        self.reloads
    }

    fn notes(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
        Some(format!(
            "haproxy's log: {} reloads done by the master for {} signalled (signals that arrive during a reload \
             are merged), {} failed to load, {} former workers exited, {} alerts",
            count("Loading success"),
            self.reloads,
            count("Loading failure"),
            count("Former worker"),
            count("[ALERT]")
        ))
    }

    fn stop(&mut self) {
        let workers = self.workers();
        let _ = signal(self.master(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Workers of our master that outlived it.
        let left: Vec<i32> = all_processes()
            .into_iter()
            .filter(|(pid, _, comm)| workers.contains(pid) && comm.starts_with("haproxy"))
            .map(|(pid, _, _)| pid)
            .collect();
        for pid in left {
            let _ = signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Task, STREAM_APP, TCP_APP, WEB_APP};

    #[test]
    fn renders_vhost_acls_service_port_frontends_and_up_servers_only() {
        let mut c = Cluster::default();
        for (id, app, port, healthy) in [
            ("web-1", WEB_APP, 20001, true),
            ("web-2", WEB_APP, 20002, false),
            ("stream-1", STREAM_APP, 20100, true),
            ("tcp-1", TCP_APP, 20100, true),
        ] {
            c.add(Task {
                id: id.to_string(),
                app,
                port,
                healthy,
            });
        }
        let settings = Settings {
            ports: Ports {
                http: 18080,
                https: 18443,
                stats: 19090,
                service_base: 10000,
            },
            nbthread: 1,
            hard_stop_after: None,
            http_server_close: true,
            dir: PathBuf::from("/tmp/x"),
        };
        let cfg = render(&c.routes(10000), &settings);
        assert!(cfg.contains("hdr(host) -i web.example.com"), "{cfg}");
        assert!(cfg.contains("use_backend web_10000 if host_web_example_com_"));
        assert!(cfg.contains("frontend web_10000\n  bind 127.0.0.1:10000\n  mode http"));
        assert!(cfg.contains("frontend stream-tcp_10002\n  bind 127.0.0.1:10002\n  mode tcp"));
        assert!(cfg.contains("127.0.0.1:20001"));
        assert!(
            !cfg.contains("127.0.0.1:20002"),
            "unhealthy server rendered"
        );
        assert!(cfg.contains("timeout connect 3s"));
        assert!(!cfg.contains("hard-stop-after"));
        assert!(cfg.contains("  option http-server-close\n"));
    }
}
