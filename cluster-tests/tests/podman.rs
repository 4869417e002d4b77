//! A real container runtime on the overlay (issue 15, must-show 3): Debian's
//! podman (CNI backend) with the reference plugins (containernetworking-
//! plugins) runs containers on the `dcos` network of two agents in
//! namespaces through the static conflist a package installs (`skein-cni`,
//! completed from the node's agent file through `stateFile`, then
//! `portmap`). Each container gets an address in its node's subnet and
//! reaches the one on the other node over VXLAN; `-p HOSTPORT:80` answers
//! on the node's address (portmap set it up from our result, its
//! `prevResult`); `podman rm` frees the address (the next container gets
//! it again), the veth and portmap's rule, and a second DEL of the same
//! container (as a runtime's retry would send) succeeds.
//!
//! CHECK is not exercised here: podman never sends it and Debian ships no
//! `cnitool`; crates/skein-cni/tests covers it.
//!
//! Podman is kept away from the host's: per node its own storage (vfs), run
//! and tmp dirs, file locks (not the host-wide /dev/shm/libpod_lock), and a
//! `containers.conf` of the test's own (`CONTAINERS_CONF`, so nothing from
//! /etc/containers or /usr/share/containers is read). It runs under
//! `nsenter --net` into the node's namespace, keeping the host's mount
//! namespace: `ip netns exec` remounts /sys (runc then finds no cgroup
//! mount) and gives each command a private mount namespace, so the bind
//! mount of a container's network namespace made by `podman run` would be
//! gone for the `podman exec` and `podman rm` after it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_tests::{curl, sh, skein_cni_bin, wait_for, Cluster};
use serde_json::{json, Value};

const IMAGE: &str = "localhost/skein-test-busybox:1";
const HOST_PORT: u16 = 18080;

/// The reference `portmap` plugin, after checking that podman is there: a
/// test of a runtime that is missing must fail, not pass.
fn require_tools() -> PathBuf {
    let podman = Command::new("podman").arg("--version").output();
    assert!(
        podman.as_ref().is_ok_and(|o| o.status.success()),
        "podman is missing (apt-get install podman containernetworking-plugins; \
         scripts/test installs them): {podman:?}"
    );
    let portmap = ["/usr/lib/cni/portmap", "/opt/cni/bin/portmap"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(portmap) = portmap else {
        panic!(
            "the reference CNI plugins are missing: no portmap in /usr/lib/cni or /opt/cni/bin \
             (apt-get install containernetworking-plugins; scripts/test installs it)"
        );
    };
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing (apt-get install busybox-static; scripts/test installs it)"
    );
    portmap
}

/// One node's podman: its own storage and configuration, run inside the
/// node's network namespace.
struct Podman {
    netns: String,
    home: PathBuf,
}

impl Podman {
    /// The plugin dir (skein-cni and portmap), the conflist, containers.conf
    /// and storage.conf for node `i`, and the test image in its storage.
    fn new(c: &Cluster, i: usize, root: &Path, portmap: &Path) -> anyhow::Result<Podman> {
        let home = root.join(format!("node{i}"));
        let p = Podman {
            netns: c.node(i).netns.clone(),
            home,
        };
        std::fs::create_dir_all(p.bin())?;
        std::fs::create_dir_all(p.net_d())?;
        std::os::unix::fs::symlink(skein_cni_bin(), p.bin().join("skein-cni"))?;
        std::os::unix::fs::symlink(portmap, p.bin().join("portmap"))?;
        // The very file packaging/deb installs as
        // /etc/cni/net.d/10-dcos.conflist, pointed at this node's agent
        // file (each node here has its own data dir; on a host the
        // default, /var/lib/skein/cni/dcos.conf, is the agent's).
        let shipped = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/deb/10-dcos.conflist"
        );
        let mut conflist: serde_json::Value = serde_json::from_slice(&std::fs::read(shipped)?)?;
        assert_eq!(conflist["plugins"][0]["type"], "skein-cni", "{conflist}");
        assert_eq!(conflist["plugins"][1]["type"], "portmap", "{conflist}");
        conflist["plugins"][0]["stateFile"] = json!(state_file(c, i));
        std::fs::write(
            p.net_d().join("10-dcos.conflist"),
            serde_json::to_string_pretty(&conflist)?,
        )?;
        std::fs::write(
            p.containers_conf(),
            format!(
                "# The only containers.conf read (CONTAINERS_CONF).\n\
                 [containers]\n\
                 # Podman gives a root container nofile and nproc limits above this\n\
                 # host's hard limits, which runc cannot set without CAP_SYS_RESOURCE.\n\
                 default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                 [engine]\n\
                 # Locks under --tmpdir, not the host-wide /dev/shm/libpod_lock\n\
                 # (a podman with a fresh --tmpdir frees every lock there).\n\
                 lock_type = \"file\"\n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 cni_plugin_dirs = [{:?}]\n",
                p.bin().display().to_string()
            ),
        )?;
        std::fs::write(
            p.storage_conf(),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = {:?}\ngraphroot = {:?}\n",
                p.home.join("run").display().to_string(),
                p.home.join("storage").display().to_string()
            ),
        )?;
        // The image: a root holding only the static busybox.
        let rootfs = p.home.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
        let tar = p.home.join("image.tar");
        sh(&[
            "tar",
            "-C",
            &rootfs.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ])?;
        p.run(&[
            "import",
            "--change",
            r#"ENTRYPOINT ["/bin/busybox"]"#,
            &tar.display().to_string(),
            IMAGE,
        ])?;
        Ok(p)
    }

    fn bin(&self) -> PathBuf {
        self.home.join("cni-bin")
    }

    fn net_d(&self) -> PathBuf {
        self.home.join("net.d")
    }

    fn containers_conf(&self) -> PathBuf {
        self.home.join("containers.conf")
    }

    fn storage_conf(&self) -> PathBuf {
        self.home.join("storage.conf")
    }

    /// `podman <args>` in the node's network namespace with this node's
    /// storage and configuration.
    fn command(&self, args: &[&str]) -> Command {
        let h = |d: &str| self.home.join(d).display().to_string();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("podman")
            .args(["--root", &h("storage"), "--runroot", &h("run")])
            .args(["--tmpdir", &h("tmp"), "--volumepath", &h("volumes")])
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--network-backend", "cni"])
            .args(["--network-config-dir", &self.net_d().display().to_string()])
            .args(args)
            .env("CONTAINERS_CONF", self.containers_conf())
            .env("CONTAINERS_STORAGE_CONF", self.storage_conf())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `podman <args>`; its trimmed stdout, or its stderr as the error.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("cannot run podman {args:?}"))?;
        if !out.status.success() {
            bail!(
                "podman {args:?} in {} failed ({}): {}",
                self.netns,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `podman inspect` of one container.
    fn inspect(&self, name: &str) -> anyhow::Result<Value> {
        let v: Value = serde_json::from_str(&self.run(&["inspect", name])?)?;
        Ok(v[0].clone())
    }

    /// The container's address on `dcos`.
    fn address(&self, name: &str) -> anyhow::Result<String> {
        let v = self.inspect(name)?;
        v["NetworkSettings"]["Networks"]["dcos"]["IPAddress"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .with_context(|| format!("no dcos address for {name}: {}", v["NetworkSettings"]))
    }

    /// busybox's httpd serving the container's root (its /etc/hostname is
    /// `hostname`), started detached with `extra` flags; the container id.
    fn httpd(&self, name: &str, hostname: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            hostname,
            "--network",
            "dcos",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "httpd", "-f", "-p", "80", "-h", "/"]);
        self.run(&args)
    }
}

/// Every node's podman, and the directory of their storage (vfs copies
/// layers whole): the containers are removed and the directory deleted
/// however the test ends, before the cluster's namespaces go (the
/// plugins' DEL runs in them).
struct Runtimes {
    nodes: Vec<Podman>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Runtimes {
    fn drop(&mut self) {
        for p in &self.nodes {
            // busybox as PID 1 ignores SIGTERM: -t 0 kills at once.
            if let Err(e) = p.command(&["rm", "-af", "-t", "0"]).output() {
                eprintln!("podman rm -af on {}: {e}", p.netns);
            }
        }
        // Whatever is still mounted under the storage (a container's
        // /dev/shm) would keep the directory from being deleted.
        if let Some(dir) = &self.dir {
            let root = dir.path().display().to_string();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for point in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
                if point.starts_with(&root) {
                    let _ = Command::new("umount").args(["-l", point]).status();
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("removing {}: {e}", path.display());
            }
        }
    }
}

/// Node `i`'s agent file, which the static configuration names.
fn state_file(c: &Cluster, i: usize) -> String {
    c.node(i)
        .data_dir
        .join("cni/dcos.conf")
        .display()
        .to_string()
}

/// Node `i`'s agent file, once written and its bridge exists.
fn wait_state(c: &Cluster, i: usize) -> anyhow::Result<Value> {
    wait_for(
        &format!("node{i}'s cni/dcos.conf and bridge"),
        Duration::from_secs(30),
        || {
            let Ok(text) = std::fs::read_to_string(state_file(c, i)) else {
                return Ok(None);
            };
            let state: Value = serde_json::from_str(&text)?;
            let bridge = state["bridge"].as_str().context("no bridge")?;
            sh(&["ip", "-n", &c.node(i).netns, "link", "show", bridge])?;
            Ok(Some(state))
        },
    )
}

/// Whether `ip` is inside `cidr` (`9.0.1.0/25`).
fn in_cidr(ip: &str, cidr: &str) -> anyhow::Result<bool> {
    let (net, len) = cidr.split_once('/').context("no prefix length")?;
    let net: std::net::Ipv4Addr = net.parse()?;
    let len: u32 = len.parse()?;
    if len > 32 {
        bail!("{cidr}: prefix length over 32");
    }
    let ip: std::net::Ipv4Addr = ip.parse()?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Ok(u32::from(ip) & mask == u32::from(net) & mask)
}

/// Interfaces on node `i`'s bridge `bridge`.
fn bridge_ports(c: &Cluster, i: usize, bridge: &str) -> anyhow::Result<Vec<String>> {
    let out = sh(&[
        "ip",
        "-n",
        &c.node(i).netns,
        "-j",
        "link",
        "show",
        "master",
        bridge,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    let v: Value = serde_json::from_str(&text)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}

/// Node `i`'s nat table as `iptables -S` prints it (portmap's rules).
fn nat_rules(c: &Cluster, i: usize) -> anyhow::Result<String> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(i).netns,
        "iptables",
        "-t",
        "nat",
        "-S",
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A DEL of container `id` sent straight to the plugin on node `i`, as a
/// runtime sends it in the chain: CNI_* environment (`netns` may be
/// gone, or unset), the conflist's skein-cni entry on stdin. Its stdout
/// and stderr, or the failure.
fn direct_del(
    c: &Cluster,
    i: usize,
    p: &Podman,
    id: &str,
    netns: Option<&str>,
) -> anyhow::Result<(String, String)> {
    use std::io::Write;
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "dcos",
        "type": "skein-cni",
        "stateFile": state_file(c, i),
    })
    .to_string();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", c.node(i).netns))
        .arg(p.bin().join("skein-cni"))
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", p.bin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match netns {
        Some(ns) => cmd.env("CNI_NETNS", ns),
        None => cmd.env_remove("CNI_NETNS"),
    };
    let mut child = cmd.spawn().context("running skein-cni")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    );
    if !out.status.success() {
        bail!("DEL of {id} failed ({}): {stdout} {stderr}", out.status);
    }
    Ok((stdout, stderr))
}

#[test]
fn podman_runs_containers_on_the_overlay_through_the_static_conflist() -> anyhow::Result<()> {
    let portmap = require_tools();
    let mut c = Cluster::new(2)?;
    let fast = ["--overlay-resync-s", "1"];
    c.start(1, &[], &fast)?;
    c.start(2, &[1], &fast)?;
    let s1 = wait_state(&c, 1)?;
    let s2 = wait_state(&c, 2)?;
    println!("node1's network: {s1}\nnode2's network: {s2}");
    let subnet = |s: &Value| s["subnet"].as_str().unwrap_or_default().to_string();
    let (subnet1, subnet2) = (subnet(&s1), subnet(&s2));
    let bridge1 = s1["bridge"].as_str().context("bridge")?.to_string();
    let ipam1 = PathBuf::from(s1["dataDir"].as_str().context("dataDir")?)
        .join("dcos")
        .join(&bridge1);

    // Declared after the cluster: dropped (containers removed) before it.
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("skein-podman-").tempdir()?;
    let mut rt = Runtimes {
        nodes: Vec::new(),
        dir: None,
    };
    for i in 1..=2 {
        rt.nodes.push(Podman::new(&c, i, dir.path(), &portmap)?);
    }
    rt.dir = Some(dir);
    let (p1, p2) = (&rt.nodes[0], &rt.nodes[1]);
    println!(
        "{} on both nodes, image imported, in {:?}",
        p1.run(&["--version"])?,
        started.elapsed()
    );

    // A on node1 with a host port, B on node2.
    let ports_before = bridge_ports(&c, 1, &bridge1)?;
    let t = Instant::now();
    let port = format!("{HOST_PORT}:80");
    let id_a = p1.httpd("a", "podman-a", &["-p", &port])?;
    let run_a = t.elapsed();
    let t = Instant::now();
    let id_b = p2.httpd("b", "podman-b", &[])?;
    let run_b = t.elapsed();
    let (ip_a, ip_b) = (p1.address("a")?, p2.address("b")?);
    println!("podman run: a {ip_a} on node1 in {run_a:?}, b {ip_b} on node2 in {run_b:?}");
    assert!(in_cidr(&ip_a, &subnet1)?, "a's {ip_a} in node1's {subnet1}");
    assert!(in_cidr(&ip_b, &subnet2)?, "b's {ip_b} in node2's {subnet2}");
    let sandbox_a = p1.inspect("a")?["NetworkSettings"]["SandboxKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let alloc_a = ipam1.join(&ip_a);
    let owner = std::fs::read_to_string(&alloc_a)
        .with_context(|| format!("a's allocation file {}", alloc_a.display()))?;
    assert_eq!(owner, format!("{id_a}\r\neth0"), "{}", alloc_a.display());
    let veth_a: Vec<String> = bridge_ports(&c, 1, &bridge1)?
        .into_iter()
        .filter(|l| !ports_before.contains(l))
        .collect();
    assert_eq!(veth_a.len(), 1, "one new port on {bridge1}: {veth_a:?}");
    let mtu = p1.run(&[
        "exec",
        "a",
        "/bin/busybox",
        "cat",
        "/sys/class/net/eth0/mtu",
    ])?;
    assert_eq!(
        Some(mtu.as_str()),
        s1["mtu"].as_u64().map(|m| m.to_string()).as_deref()
    );

    // A and B talk over the overlay, both ways. (Debian's static busybox
    // wget crashes with `-T`: busybox's `timeout` bounds it instead.)
    let get = |p: &Podman, from: &str, ip: &str| {
        p.run(&[
            "exec",
            from,
            "/bin/busybox",
            "timeout",
            "3",
            "/bin/busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip}/etc/hostname"),
        ])
    };
    let t = Instant::now();
    let answer = wait_for("a → b over the overlay", Duration::from_secs(30), || {
        get(p1, "a", &ip_b).map(Some)
    })?;
    assert_eq!(answer, "podman-b");
    assert_eq!(get(p2, "b", &ip_a)?, "podman-a");
    println!("a ↔ b across nodes after {:?}", t.elapsed());

    // portmap, chained after skein-cni, took a's address from our result
    // (its prevResult): the host port answers on node1's address, from
    // node1 itself (OUTPUT) and from node2 (PREROUTING).
    let rules = nat_rules(&c, 1)?;
    assert!(
        rules.contains(&format!("{ip_a}:80")),
        "portmap's DNAT to {ip_a}:80 on node1: {rules}"
    );
    let url = format!("http://{}:{HOST_PORT}/etc/hostname", c.node(1).ip);
    for from in [1, 2] {
        let body = wait_for(
            &format!("{url} from node{from}"),
            Duration::from_secs(10),
            || Ok(curl(&c.node(from).netns, &["-sf", &url]).ok()),
        )?;
        assert_eq!(String::from_utf8_lossy(&body).trim(), "podman-a");
    }
    println!("host port {HOST_PORT} → a:80 from node1 and node2");

    // podman rm frees the address, the veth and portmap's rule.
    let t = Instant::now();
    p1.run(&["rm", "-f", "-t", "0", "a"])?;
    println!("podman rm a in {:?}", t.elapsed());
    assert!(!alloc_a.exists(), "{} after podman rm", alloc_a.display());
    let left = bridge_ports(&c, 1, &bridge1)?;
    assert!(!left.contains(&veth_a[0]), "{} left: {left:?}", veth_a[0]);
    let rules = nat_rules(&c, 1)?;
    assert!(
        !rules.contains(&format!("{ip_a}:80")),
        "portmap's DNAT gone: {rules}"
    );
    assert!(
        curl(&c.node(1).netns, &["-sf", "--max-time", "2", &url]).is_err(),
        "the host port is closed"
    );

    // DEL again (a runtime retrying): with the namespace gone, and with
    // none at all. Both succeed and print nothing.
    for netns in [Some(sandbox_a.as_str()), None] {
        let (stdout, note) = direct_del(&c, 1, p1, &id_a, netns)?;
        assert_eq!(stdout, "", "DEL prints no result");
        println!("second DEL of a (CNI_NETNS {netns:?}): ok; {note}");
    }

    // The freed address is the lowest free one again: the next container
    // gets it.
    p1.httpd("c", "podman-c", &[])?;
    assert_eq!(p1.address("c")?, ip_a, "a's address is reused");
    p1.run(&["rm", "-f", "-t", "0", "c"])?;
    let left = std::fs::read_dir(&ipam1)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect::<Vec<_>>();
    assert!(left.is_empty(), "node1's allocations after rm: {left:?}");

    p2.run(&["rm", "-f", "-t", "0", "b"])?;
    let alloc_b = PathBuf::from(s2["dataDir"].as_str().context("dataDir")?)
        .join("dcos")
        .join(s2["bridge"].as_str().context("bridge")?)
        .join(&ip_b);
    assert!(!alloc_b.exists(), "{} after podman rm", alloc_b.display());
    println!("b ({id_b}) removed; total {:?}", started.elapsed());
    Ok(())
}
