//! Helpers for multi-node tests: real `skein agent` processes, each in a
//! network namespace the test creates, joined by a bridge in a "switch"
//! namespace of its own. Nothing touches the host's namespace, and dropping
//! the [`Cluster`] kills the agents and deletes every namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// Runs a command, failing with its stderr if it fails.
pub fn sh(cmd: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `skein` binary under test: `$SKEIN_BIN`, else next to the test's
/// own target directory (`cargo build -p skein` first; scripts/test does).
pub fn skein_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SKEIN_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("skein", "skein")
}

/// The CNI plugin under test: `$SKEIN_CNI_BIN`, else next to the tests
/// (`cargo build -p skein-cni` first; scripts/test does).
pub fn skein_cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SKEIN_CNI_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("skein-cni", "skein-cni")
}

fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test lives in target/<profile>/deps/, a benchmark binary in
    // target/<profile>/: the binary under test is in target/<profile>/.
    let dir = exe.parent().expect("executable has a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p {package}` first",
        bin.display()
    );
    bin
}

pub fn require_root() {
    let uid = unsafe_free_uid();
    assert_eq!(
        uid, 0,
        "cluster tests create network namespaces and need root (uid is {uid})"
    );
}

fn unsafe_free_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short prefix unique to this process and cluster: interface names are
/// limited to 15 characters.
fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("sk{:x}{}", std::process::id() % 0xffff, n)
}

pub struct Node {
    pub index: usize,
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub process: Option<Child>,
    pub log: PathBuf,
    /// Base URL of the agent's API (loopback unless started with `--api-listen`).
    pub api: String,
}

pub struct Cluster {
    pub prefix: String,
    pub switch_ns: String,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub subnet: String,
}

pub const GOSSIP_PORT: u16 = 62501;
pub const API: &str = "http://127.0.0.1:62080";

impl Cluster {
    /// Creates the switch namespace, `n` node namespaces wired to it, a CA
    /// and a certificate per node. Agents are not started yet.
    pub fn new(n: usize) -> anyhow::Result<Cluster> {
        require_root();
        let prefix = unique_prefix();
        let switch_ns = format!("{prefix}sw");
        let dir = tempfile::Builder::new()
            .prefix("skein-cluster-")
            .tempdir()?;
        let subnet = "10.77.0".to_string();
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            switch_ns: switch_ns.clone(),
            dir,
            nodes: Vec::new(),
            subnet: subnet.clone(),
        };
        sh(&["ip", "netns", "add", &switch_ns])?;
        sh(&[
            "ip", "-n", &switch_ns, "link", "add", "br0", "type", "bridge",
        ])?;
        sh(&["ip", "-n", &switch_ns, "link", "set", "br0", "up"])?;
        let ca = cluster.dir.path().join("ca");
        run_skein(&["cert", "init", path_str(&ca)?, "--cluster-id", "test"])?;
        for i in 1..=n {
            cluster.add_node(i, &ca)?;
        }
        Ok(cluster)
    }

    fn add_node(&mut self, i: usize, ca: &Path) -> anyhow::Result<()> {
        let netns = format!("{}n{i}", self.prefix);
        let ip = format!("{}.{i}", self.subnet);
        let host_end = format!("{}v{i}", self.prefix);
        sh(&["ip", "netns", "add", &netns])?;
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
        sh(&[
            "ip",
            "link",
            "add",
            &host_end,
            "netns",
            &self.switch_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        sh(&[
            "ip",
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &host_end,
            "master",
            "br0",
            "up",
        ])?;
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
        // Like any host, a default route (it only leads to the test's own
        // bridge): VIP addresses need a route before nftables rewrites them.
        sh(&["ip", "-n", &netns, "route", "add", "default", "dev", "eth0"])?;
        let name = format!("node{i}");
        let data_dir = self.dir.path().join(&name);
        let tls_dir = data_dir.join("tls");
        run_skein(&["cert", "issue", path_str(ca)?, &name, path_str(&tls_dir)?])?;
        self.nodes.push(Node {
            index: i,
            name,
            netns,
            ip,
            log: self.dir.path().join(format!("node{i}.log")),
            data_dir,
            tls_dir,
            process: None,
            api: API.to_string(),
        });
        Ok(())
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Starts node `i`'s agent with the given seeds and extra flags.
    pub fn start(&mut self, i: usize, seeds: &[usize], extra: &[&str]) -> anyhow::Result<()> {
        let seeds: Vec<String> = seeds
            .iter()
            .map(|s| format!("{}.{s}:{GOSSIP_PORT}", self.subnet))
            .collect();
        let node = &mut self.nodes[i - 1];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns])
            .arg(skein_bin())
            .args(["agent", "--node-id", &node.name, "--advertise", &node.ip])
            .args(["--gossip-listen", &format!("0.0.0.0:{GOSSIP_PORT}")])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--tls-dir")
            .arg(&node.tls_dir)
            .args(["--cluster-id", "test"]);
        if !extra.contains(&"--gossip-interval-ms") {
            cmd.args(["--gossip-interval-ms", "100"]);
        }
        if !seeds.is_empty() {
            cmd.args(["--seeds", &seeds.join(",")]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info,quinn=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        node.process = Some(cmd.spawn().context("spawning skein agent")?);
        node.api = match extra.iter().position(|a| *a == "--api-listen") {
            Some(p) => format!(
                "http://{}",
                extra.get(p + 1).context("--api-listen needs a value")?
            ),
            None => API.to_string(),
        };
        // Ready once its API answers.
        let (netns, api) = (node.netns.clone(), node.api.clone());
        wait_for(&format!("node{i}'s API"), Duration::from_secs(15), || {
            Ok(curl(&netns, &["-sf", &format!("{api}/v1/version")]).ok())
        })?;
        Ok(())
    }

    /// Runs `skein-cni` inside node `i`'s namespace exactly as a container
    /// runtime would: CNI_* environment, the network file the agent wrote
    /// (`cni/dcos.conf`) on stdin, for the container namespace `container`.
    /// Returns whether it succeeded and its JSON output (result or error).
    pub fn cni(
        &self,
        i: usize,
        command: &str,
        id: &str,
        container: &str,
    ) -> anyhow::Result<(bool, Value)> {
        let conf = std::fs::read_to_string(self.node(i).data_dir.join("cni/dcos.conf"))
            .context("the agent writes cni/dcos.conf once its lease is settled")?;
        let out = with_stdin(
            Command::new("ip")
                .args(["netns", "exec", &self.node(i).netns])
                .arg(skein_cni_bin())
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", id)
                .env("CNI_NETNS", format!("/var/run/netns/{container}"))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/opt/cni/bin"),
            &conf,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("CNI output {text:?}"))?
        };
        Ok((out.status.success(), value))
    }

    /// CNI ADD of `container` on node `i`; its overlay address.
    pub fn attach(&self, i: usize, id: &str, container: &ScratchNetns) -> anyhow::Result<String> {
        let (ok, result) = self.cni(i, "ADD", id, &container.0)?;
        if !ok {
            bail!("CNI ADD on node{i} failed: {result}");
        }
        let address = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("no address in {result}"))?;
        Ok(address.split('/').next().unwrap_or_default().to_string())
    }

    /// Waits until node `i` sees `node` with `status`.
    pub fn wait_status(&self, i: usize, node: &str, status: &str) -> anyhow::Result<()> {
        wait_for(
            &format!("{node} {status} on node{i}"),
            Duration::from_secs(30),
            || {
                Ok(self
                    .statuses(i)?
                    .contains(&(node.to_string(), status.to_string()))
                    .then_some(()))
            },
        )
    }

    /// SIGKILLs node `i`'s agent.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut p) = self.nodes[i - 1].process.take() {
            p.kill()?;
            p.wait()?;
        }
        Ok(())
    }

    /// Gives the switch's bridge an address (`<subnet>.254`) so that a
    /// process inside the switch namespace (see [`enter_netns`]) reaches
    /// every node directly.
    pub fn switch_address(&self) -> anyhow::Result<String> {
        let ip = format!("{}.254", self.subnet);
        sh(&[
            "ip",
            "-n",
            &self.switch_ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "br0",
        ])?;
        Ok(ip)
    }

    /// Takes node `i`'s only link down (or up): a partition.
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let host_end = format!("{}v{i}", self.prefix);
        sh(&[
            "ip",
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &host_end,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// `GET path` on node `i`'s local API, parsed as JSON.
    pub fn get(&self, i: usize, path: &str) -> anyhow::Result<Value> {
        let node = self.node(i);
        let out = curl(&node.netns, &["-sf", &format!("{}{path}", node.api)])?;
        serde_json::from_slice(&out).with_context(|| format!("GET {path} on node{i}: not JSON"))
    }

    /// Node statuses as node `i` sees them: name → status.
    pub fn statuses(&self, i: usize) -> anyhow::Result<Vec<(String, String)>> {
        let nodes = self.get(i, "/v1/nodes")?;
        let mut out: Vec<(String, String)> = nodes
            .as_array()
            .context("nodes is not an array")?
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap_or_default().to_string(),
                    n["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Task ids as node `i` sees them, with owner and owner status.
    pub fn tasks(&self, i: usize) -> anyhow::Result<Vec<(String, String, String)>> {
        let v = self.get(i, "/v1/tasks")?;
        let mut out: Vec<(String, String, String)> = v["tasks"]
            .as_array()
            .context("tasks is not an array")?
            .iter()
            .map(|t| {
                (
                    t["id"].as_str().unwrap_or_default().to_string(),
                    t["node_id"].as_str().unwrap_or_default().to_string(),
                    t["node_status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Registers a task on node `i` through its API; returns the HTTP code and body.
    pub fn put_task(&self, i: usize, id: &str, body: &str) -> anyhow::Result<(u16, String)> {
        self.write(i, "PUT", &format!("/v1/tasks/{id}"), Some(body))
    }

    pub fn delete_task(&self, i: usize, id: &str) -> anyhow::Result<u16> {
        Ok(self.write(i, "DELETE", &format!("/v1/tasks/{id}"), None)?.0)
    }

    /// The header with node `i`'s own API token (`<data-dir>/api-token`,
    /// which an agent started without `--api-token-file` creates), as the
    /// local CLI would send it.
    pub fn auth_header(&self, i: usize) -> anyhow::Result<String> {
        let path = self.node(i).data_dir.join("api-token");
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(format!("Authorization: Bearer {}", token.trim()))
    }

    /// A state-changing request to node `i` with its own token.
    pub fn write(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let auth = self.auth_header(i)?;
        self.request(i, method, path, body, &[&auth])
    }

    /// Any request to node `i`'s API with curl inside its namespace; returns
    /// the HTTP status and the body.
    pub fn request(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> anyhow::Result<(u16, String)> {
        let node = self.node(i);
        let url = format!("{}{path}", node.api);
        let mut args = vec!["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method];
        if let Some(body) = body {
            args.extend_from_slice(&[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ]);
        }
        for h in headers {
            args.extend_from_slice(&["-H", h]);
        }
        args.push(&url);
        let out = curl(&node.netns, &args)?;
        let text = String::from_utf8_lossy(&out).to_string();
        let (body, code) = text.rsplit_once('\n').context("no status code")?;
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// The settled address node `i` reports for `vip` (`host:port` as in
    /// `/v1/vips`), if any.
    pub fn vip_address(&self, i: usize, vip: &str) -> anyhow::Result<Option<String>> {
        let vips = self.get(i, "/v1/vips")?;
        Ok(vips
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vip"] == vip)
            .and_then(|v| v["address"].as_str().map(str::to_string)))
    }

    /// Node `i`'s connection counts of `vip` (its entry in
    /// `/v1/vips/stats`; null when it has none).
    pub fn vip_stats(&self, i: usize, vip: &str) -> anyhow::Result<Value> {
        let stats = self.get(i, "/v1/vips/stats")?;
        Ok(stats
            .as_array()
            .and_then(|a| a.iter().find(|v| v["vip"] == vip).cloned())
            .unwrap_or_default())
    }

    /// Prints every agent's log tail; call on failure.
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- {} log (last 40 lines) -----", n.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &mut self.nodes {
            if let Some(mut p) = n.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &n.netns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch_ns])
            .status();
    }
}

/// A self-signed certificate for `host` made with openssl as an operator
/// would (P-256, two days): `<dir>/<host>.pem` and `<dir>/<host>.key`.
pub fn self_signed(dir: &Path, host: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let pem = dir.join(format!("{host}.pem"));
    let key = dir.join(format!("{host}.key"));
    let (subject, san) = (format!("/CN={host}"), format!("subjectAltName=DNS:{host}"));
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        &san,
        "-keyout",
        path_str(&key)?,
        "-out",
        path_str(&pem)?,
    ])?;
    Ok((pem, key))
}

/// One request's headers and body (`curl -si` with `args`) from `netns`.
pub fn head_and_body(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut a = vec!["-si"];
    a.extend_from_slice(args);
    Ok(String::from_utf8_lossy(&curl(netns, &a)?).to_string())
}

/// Header `name`'s value in a `curl -si` answer.
pub fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Runs curl inside a namespace; returns stdout.
pub fn curl(netns: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut cmd = vec!["ip", "netns", "exec", netns, "curl", "--max-time", "5"];
    cmd.extend_from_slice(args);
    Ok(sh(&cmd)?.stdout)
}

pub fn run_skein(args: &[&str]) -> anyhow::Result<Output> {
    let bin = skein_bin();
    let out = Command::new(&bin).args(args).output()?;
    if !out.status.success() {
        bail!(
            "skein {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temp path")
}

/// Moves the calling thread (and threads it creates afterwards) into the
/// named network namespace, so that a benchmark can talk to the nodes with
/// an in-process HTTP client instead of spawning `curl` per request.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("no network namespace {name}"))?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A process started inside a test namespace, killed when dropped.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program args...` inside node `netns`.
pub fn spawn_in(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<Background> {
    spawn_in_logged(netns, program, args, None)
}

/// Like [`spawn_in`], with the program's stdout appended to `log`.
pub fn spawn_in_logged(
    netns: &str,
    program: &str,
    args: &[&str],
    log: Option<&Path>,
) -> anyhow::Result<Background> {
    let stdout = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => Stdio::null(),
    };
    let child = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {program} in {netns}"))?;
    Ok(Background(child))
}

/// A bare network namespace for kernel-level tests and benchmarks, deleted
/// when dropped.
pub struct ScratchNetns(pub String);

impl ScratchNetns {
    pub fn new(tag: &str) -> anyhow::Result<ScratchNetns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("sks{}{n}{tag}", std::process::id() % 100_000);
        sh(&["ip", "netns", "add", &name])?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(ScratchNetns(name))
    }

    /// Feeds `text` to `nft -f -` inside the namespace.
    pub fn nft(&self, text: &str) -> anyhow::Result<()> {
        pipe_in(&self.0, &["nft", "-f", "-"], text)
    }
}

/// Runs `cmd` with `text` on its stdin and collects its output (whatever
/// its exit status).
fn with_stdin(cmd: &mut Command, text: &str) -> anyhow::Result<Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// Runs `cmd` inside namespace `ns` with `text` on its stdin; its stderr
/// is the error when it fails.
pub fn pipe_in(ns: &str, cmd: &[&str], text: &str) -> anyhow::Result<()> {
    let out = with_stdin(
        Command::new("ip").args(["netns", "exec", ns]).args(cmd),
        text,
    )?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The `p`th percentile (nearest rank) of `sorted`; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration as milliseconds with one decimal, for bench output.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A benchmark's numeric flag `--name N`, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

/// A process's resident memory in KiB (`VmRSS`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Debian's Chromium for the UI tests, or a failure: a test that cannot
/// look must not pass.
pub fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!("chromium is missing (apt-get install chromium; scripts/test installs it)");
}
