//! The edges under test, behind one trait: started with the cluster's
//! routes, told of every change, asked how many processes they run.
//!
//! Two implementations: [`crate::haproxy::Haproxy`] (a rendered
//! configuration and a reload per change, as Marathon-LB did) and
//! [`SkeinEdge`] (`skein edge --routes-file`, the file rewritten per change).
//!
//! Extension point: an edge fed by a real agent implements [`Edge`] with
//! `apply` turning each [`Change`] into `PUT /v1/tasks/{id}` (added, or its
//! health changed) or `DELETE /v1/tasks/{id}` (removed) on the agent's API,
//! and starts `skein edge` without `--routes-file` (it then reads the
//! agent's `GET /v1/edge`). The churn driver, client and report need no
//! change: they only see this trait.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::{Change, Cluster};

/// The ports an edge listens on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ports {
    pub(crate) http: u16,
    pub(crate) https: u16,
    pub(crate) stats: u16,
    /// `/web` on `service_base`, then the other apps (see
    /// [`crate::cluster::service_port`]).
    pub(crate) service_base: u16,
}

impl Ports {
    pub(crate) fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }
}

pub(crate) trait Edge {
    /// For reports: `haproxy 2.6.12`, `skein-edge`.
    fn name(&self) -> String;
    /// How a change reaches it: `reloads`, `routes file`.
    fn updated_by(&self) -> &'static str;
    fn ports(&self) -> Ports;
    /// Makes the edge serve `cluster` after `change`.
    fn apply(&mut self, cluster: &Cluster, change: &Change) -> anyhow::Result<()>;
    /// The edge's processes now (HAProxy: the master and every worker,
    /// old ones still draining included).
    fn processes(&self) -> usize;
    /// Threads of the process(es) serving traffic, for the fairness line.
    fn threads(&self) -> String;
    /// Changes applied (HAProxy: reloads signalled).
    fn applies(&self) -> u64;
    /// What the edge's own log says about the run, if anything.
    fn notes(&self) -> Option<String> {
        None
    }
    fn stop(&mut self);
}

/// Waits until `port` on loopback accepts a connection, or `child` exits.
pub(crate) fn wait_for_port(
    port: u16,
    child: &mut Child,
    log: &Path,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&Ports::addr(port), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited ({status}) before listening on {port}; its log:\n{}",
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "not listening on {port} after {within:?}; its log:\n{}",
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a log file.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, then a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `(pid, ppid, comm)` of every process.
pub(crate) fn all_processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parens.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push((pid, ppid, comm));
    }
    out
}

/// The `Threads:` line of a process's status.
pub(crate) fn thread_count(pid: i32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

pub(crate) fn signal(pid: i32, sig: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `skein edge` reading a routes file, rewritten (atomically) per change.
pub(crate) struct SkeinEdge {
    child: Child,
    routes_file: PathBuf,
    ports: Ports,
    applies: u64,
    _dir: tempfile::TempDir,
}

impl SkeinEdge {
    /// Starts `bin edge ...` with the cluster's routes; its tokio runtime
    /// gets `threads` workers (`TOKIO_WORKER_THREADS`).
    pub(crate) fn start(
        bin: &Path,
        cluster: &Cluster,
        ports: Ports,
        threads: usize,
    ) -> anyhow::Result<SkeinEdge> {
        let dir = tempfile::tempdir()?;
        let routes_file = dir.path().join("routes.json");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir)?;
        write_atomic(
            &routes_file,
            &serde_json::to_vec_pretty(&cluster.routes(ports.service_base))?,
        )?;
        let log = dir.path().join("edge.log");
        let out = std::fs::File::create(&log)?;
        let mut child = Command::new(bin)
            .arg("edge")
            .arg("--routes-file")
            .arg(&routes_file)
            .args(["--group", crate::cluster::GROUP, "--bind", "127.0.0.1"])
            .args(["--http-port", &ports.http.to_string()])
            .args(["--https-port", &ports.https.to_string()])
            .args(["--stats-port", &ports.stats.to_string()])
            .arg("--service-ports")
            .arg(format!(
                "{}-{}",
                ports.service_base,
                ports.service_base.saturating_add(49)
            ))
            .arg("--state-dir")
            .arg(&state_dir)
            .env("TOKIO_WORKER_THREADS", threads.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let ready =
            wait_for_port(ports.http, &mut child, &log, Duration::from_secs(15)).and_then(|()| {
                wait_for_port(ports.service_base, &mut child, &log, Duration::from_secs(5))
            });
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context("skein edge"));
        }
        Ok(SkeinEdge {
            child,
            routes_file,
            ports,
            applies: 0,
            _dir: dir,
        })
    }
}

impl Edge for SkeinEdge {
    fn name(&self) -> String {
        "skein-edge".to_string()
    }

    fn updated_by(&self) -> &'static str {
        "routes file"
    }

    fn ports(&self) -> Ports {
        self.ports
    }

    fn apply(&mut self, cluster: &Cluster, _change: &Change) -> anyhow::Result<()> {
        let routes = cluster.routes(self.ports.service_base);
        write_atomic(&self.routes_file, &serde_json::to_vec_pretty(&routes)?)?;
        self.applies += 1;
        Ok(())
    }

    fn processes(&self) -> usize {
        let pid = self.child.id() as i32;
        let alive = usize::from(std::path::Path::new(&format!("/proc/{pid}")).exists());
        alive
            + all_processes()
                .iter()
                .filter(|(_, ppid, _)| *ppid == pid)
                .count()
    }

    fn threads(&self) -> String {
        match thread_count(self.child.id() as i32) {
            Some(n) => format!("skein edge: {n} threads in its process"),
            None => "skein edge: thread count unknown".to_string(),
        }
    }

    fn applies(&self) -> u64 {
        self.applies
    }

    fn stop(&mut self) {
        let _ = signal(self.child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SkeinEdge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
