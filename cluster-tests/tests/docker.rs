//! The Docker provider (issue 15) against this machine's Docker engine: an
//! agent in a namespace of the test's, given the engine's socket, turns
//! the containers the test runs (an image built here FROM scratch around a
//! static busybox; nothing is pulled) into its tasks. Labelled containers
//! appear in `/v1/tasks`, in DNS and behind their VIP; `docker stop`
//! takes them out; an agent restart (with containers stopped and started
//! while it was down) and a `docker restart` end with the same set and no
//! duplicates; Docker's health check reaches the VIP's backends; an
//! unlabelled container is left alone. The times from each docker command
//! to the agent's answer are printed.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_tests::{sh, wait_for, Cluster};

const SOCKET: &str = "/var/run/docker.sock";
const IMAGE: &str = "skein-test-busybox:1";

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The engine, or a failure: this test must not pass without one.
fn require_docker() {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the Docker engine is not reachable (docker info failed)"
    );
}

/// `IMAGE`, built from /bin/busybox (Debian's busybox-static).
fn build_image(dir: &std::path::Path) -> anyhow::Result<()> {
    let busybox = std::path::Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing (apt-get install busybox-static; scripts/test installs it)"
    );
    let ctx = dir.join("image");
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy(busybox, ctx.join("busybox"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n",
    )?;
    docker(&["build", "-q", "-t", IMAGE, &ctx.display().to_string()])?;
    Ok(())
}

/// A Docker network removed however the test ends.
struct NetworkGuard(String);

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

/// IPv4 CIDR membership, enough for the assertions here.
mod ipnet_like {
    pub(crate) struct Net(u32, u32);

    impl std::str::FromStr for Net {
        type Err = anyhow::Error;
        fn from_str(s: &str) -> anyhow::Result<Net> {
            let (ip, len) = s
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("{s}: no /"))?;
            let ip: std::net::Ipv4Addr = ip.parse()?;
            let len: u32 = len.parse()?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok(Net(u32::from(ip) & mask, mask))
        }
    }

    impl Net {
        pub(crate) fn contains(&self, ip: &str) -> bool {
            ip.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| u32::from(ip) & self.1 == self.0)
        }
    }
}

/// Containers this test made, removed however it ends.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("docker").args(["rm", "-f", name]).output();
        }
    }
}

impl Containers {
    /// `docker run -d` with `args` (labels, ports) and busybox's httpd.
    fn run(&mut self, name: &str, args: &[&str]) -> anyhow::Result<String> {
        self.0.push(name.to_string());
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        all.extend_from_slice(&[IMAGE, "httpd", "-f", "-p", "80", "-h", "/"]);
        docker(&all)
    }
}

/// Node 1's container tasks: `(task id, app, ip)`, sorted.
fn container_tasks(c: &Cluster) -> anyhow::Result<Vec<(String, String, String)>> {
    let v = c.get(1, "/v1/tasks")?;
    let s = |t: &serde_json::Value, k: &str| t[k].as_str().unwrap_or_default().to_string();
    let mut out: Vec<(String, String, String)> = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| (s(t, "id"), s(t, "app"), s(t, "ip")))
        .filter(|(id, _, _)| id.starts_with("docker-"))
        .collect();
    out.sort();
    Ok(out)
}

fn task_of(container_id: &str) -> String {
    format!("docker-{}", &container_id[..12])
}

/// The A records node 1's DNS server answers for `name`.
fn dig(c: &Cluster, name: &str) -> anyhow::Result<Vec<String>> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(1).netns,
        "dig",
        "@127.0.0.1",
        name,
        "A",
        "+short",
        "+time=2",
        "+tries=1",
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

#[test]
fn containers_become_tasks_and_leave_with_them() -> anyhow::Result<()> {
    require_docker();
    let mut c = Cluster::new(1)?;
    build_image(c.dir.path())?;
    // The Docker network on node1's Docker bridge, under a name of this
    // test's (Docker's networks are the host's; removed at the end).
    let network = format!("skt-net-{}", std::process::id());
    let _network = NetworkGuard(network.clone());
    let agent_args = ["--docker-socket", SOCKET, "--docker-network", &network];
    c.start(1, &[], &agent_args)?;
    let ip = c.node(1).ip.clone();
    let tag = std::process::id();
    let mut made = Containers(Vec::new());
    let mut timings: Vec<(String, Duration)> = Vec::new();

    // A labelled container: a task of node1 within moments, in DNS and
    // behind its VIP, at the host's address with the published port.
    let started = Instant::now();
    let web = made.run(
        &format!("skt-web-{tag}"),
        &[
            "--label",
            "VIP_0=/web:80",
            "--label",
            "skein.app=web",
            "--label",
            "HAPROXY_GROUP=external",
            "-p",
            "80",
        ],
    )?;
    let tasks = wait_for("the container's task", Duration::from_secs(10), || {
        let t = container_tasks(&c)?;
        Ok(t.iter().any(|(id, _, _)| *id == task_of(&web)).then_some(t))
    })?;
    timings.push(("docker run → in /v1/tasks".into(), started.elapsed()));
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].1, "/web");
    assert_eq!(tasks[0].2, ip, "published: the host's address");
    wait_for("web.marathon.mesos in DNS", Duration::from_secs(10), || {
        Ok(dig(&c, "web.marathon.mesos")?.contains(&ip).then_some(()))
    })?;
    timings.push(("docker run → in DNS".into(), started.elapsed()));
    let published: u16 = docker(&["port", &web, "80/tcp"])?
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no published port"))?;
    let vips = c.get(1, "/v1/vips")?;
    let backends: Vec<String> = vips
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|v| v["vip"] == "web.marathon.l4lb.thisdcos.directory:80")
        })
        .and_then(|v| v["backend"].as_array())
        .map(|b| {
            b.iter()
                .map(|b| format!("{}:{}", b["ip"].as_str().unwrap_or(""), b["port"]))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(backends, [format!("{ip}:{published}")], "{vips}");

    // The Docker network follows node1's lease: the second half of its
    // overlay subnet, on its Docker bridge; a container on it is reached
    // at its overlay address.
    let conf_file = c.node(1).data_dir.join("cni/dcos-docker.conf");
    let subnet = wait_for(
        "the Docker network on the overlay",
        Duration::from_secs(20),
        || {
            let Ok(bytes) = std::fs::read(&conf_file) else {
                return Ok(None);
            };
            let conf: serde_json::Value = serde_json::from_slice(&bytes)?;
            let subnet = conf["subnet"].as_str().unwrap_or_default().to_string();
            let got = docker(&[
            "network",
            "inspect",
            &network,
            "--format",
            "{{(index .IPAM.Config 0).Subnet}} {{index .Options \"com.docker.network.bridge.name\"}}",
        ]);
            Ok(got
                .ok()
                .filter(|g| *g == format!("{subnet} d-dcos"))
                .map(|_| subnet))
        },
    )?;
    let on_overlay = made.run(
        &format!("skt-ov-{tag}"),
        &["--label", "VIP_0=/ov:80", "--network", &network],
    )?;
    let overlay_ip = docker(&[
        "inspect",
        "--format",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        &on_overlay,
    ])?;
    let net: ipnet_like::Net = subnet.parse()?;
    assert!(net.contains(&overlay_ip), "{overlay_ip} not in {subnet}");
    wait_for(
        "the overlay container's task at its own address",
        Duration::from_secs(10),
        || {
            let t = container_tasks(&c)?;
            Ok(t.iter()
                .any(|(id, _, ip)| *id == task_of(&on_overlay) && *ip == overlay_ip)
                .then_some(()))
        },
    )?;
    docker(&["rm", "-f", &on_overlay])?;

    // An unlabelled container is left alone.
    let plain = made.run(&format!("skt-plain-{tag}"), &["-p", "80"])?;

    // docker stop: out of the tasks and DNS as soon as Docker is asked
    // (busybox as PID 1 ignores SIGTERM: the command itself waits 10 s
    // for the SIGKILL, and the agent does not wait for it).
    let started = Instant::now();
    let mut stop = Command::new("docker")
        .args(["stop", &web])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    wait_for(
        "the stopped container's task gone",
        Duration::from_secs(20),
        || Ok(container_tasks(&c)?.is_empty().then_some(())),
    )?;
    timings.push(("docker stop → out of /v1/tasks".into(), started.elapsed()));
    wait_for(
        "web.marathon.mesos gone from DNS",
        Duration::from_secs(20),
        || Ok(dig(&c, "web.marathon.mesos")?.is_empty().then_some(())),
    )?;
    timings.push(("docker stop → out of DNS".into(), started.elapsed()));
    assert!(stop.wait()?.success(), "docker stop failed");
    println!("docker stop itself took {:?}", started.elapsed());

    // Agent restart: containers stopped and started while it was down.
    let a = made.run(
        &format!("skt-a-{tag}"),
        &["--label", "VIP_0=/a:80", "-p", "80"],
    )?;
    let b = made.run(
        &format!("skt-b-{tag}"),
        &["--label", "VIP_0=/b:80", "-p", "80"],
    )?;
    let ids = |c: &Cluster| -> anyhow::Result<BTreeSet<String>> {
        Ok(container_tasks(c)?.into_iter().map(|t| t.0).collect())
    };
    wait_for("a and b as tasks", Duration::from_secs(10), || {
        let got = ids(&c)?;
        Ok((got == BTreeSet::from([task_of(&a), task_of(&b)])).then_some(()))
    })?;
    c.kill(1)?;
    docker(&["stop", "-t", "0", &b])?;
    let d = made.run(
        &format!("skt-d-{tag}"),
        &["--label", "VIP_0=/d:80", "-p", "80"],
    )?;
    c.start(1, &[], &agent_args)?;
    let want = BTreeSet::from([task_of(&a), task_of(&d)]);
    wait_for(
        "a and d after the agent's restart, b gone",
        Duration::from_secs(10),
        || Ok((ids(&c)? == want).then_some(())),
    )?;
    let all = container_tasks(&c)?;
    assert_eq!(all.len(), 2, "no duplicates: {all:?}");

    // docker restart: the same task again, once.
    docker(&["restart", "-t", "0", &a])?;
    wait_for(
        "a back after docker restart",
        Duration::from_secs(10),
        || Ok((ids(&c)? == want).then_some(())),
    )?;
    let all = container_tasks(&c)?;
    assert_eq!(all.len(), 2, "no duplicates: {all:?}");
    assert!(
        !all.iter().any(|t| t.0 == task_of(&plain)),
        "unlabelled: {all:?}"
    );

    // Docker's health check reaches the VIP's backends.
    let sick = made.run(
        &format!("skt-sick-{tag}"),
        &[
            "--label",
            "VIP_0=/sick:80",
            "-p",
            "80",
            "--health-cmd",
            "/bin/busybox false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    )?;
    wait_for(
        "the failing health check seen",
        Duration::from_secs(20),
        || {
            let vips = c.get(1, "/v1/vips")?;
            let healthy = vips
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|v| v["vip"] == "sick.marathon.l4lb.thisdcos.directory:80")
                })
                .and_then(|v| v["backend"].as_array().and_then(|b| b.first().cloned()))
                .map(|b| b["healthy"].clone());
            Ok((healthy == Some(serde_json::json!(false))).then_some(()))
        },
    )?;
    assert!(ids(&c)?.contains(&task_of(&sick)));

    for (what, took) in &timings {
        println!("{what}: {} ms", took.as_millis());
    }
    Ok(())
}

/// Docker's socket behind a proxy the test can take away, as a restart of
/// the engine does to the agent: every connection cut (the event stream
/// too) and nothing answering until it is back.
struct SocketProxy {
    path: std::path::PathBuf,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl SocketProxy {
    fn new(path: std::path::PathBuf) -> SocketProxy {
        SocketProxy {
            path,
            up: Default::default(),
            conns: Default::default(),
        }
    }

    fn start(&self) -> anyhow::Result<()> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path)?;
        listener.set_nonblocking(true)?;
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let (up, conns) = (self.up.clone(), self.conns.clone());
        std::thread::spawn(move || {
            while up.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(engine) = UnixStream::connect(SOCKET) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let mut keep = conns.lock().unwrap_or_else(|e| e.into_inner());
                for s in [&client, &engine] {
                    if let Ok(s) = s.try_clone() {
                        keep.push(s);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone(), engine.try_clone()),
                    (engine.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(())
    }

    /// Cuts every connection and stops answering.
    fn stop(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn docker_going_away_loses_nothing_and_its_return_settles_the_rest() -> anyhow::Result<()> {
    require_docker();
    let mut c = Cluster::new(1)?;
    build_image(c.dir.path())?;
    let proxy = SocketProxy::new(c.dir.path().join("docker.sock"));
    proxy.start()?;
    let socket = proxy.path.display().to_string();
    c.start(
        1,
        &[],
        &["--docker-socket", &socket, "--docker-network", ""],
    )?;
    let tag = std::process::id();
    let mut made = Containers(Vec::new());
    let ids = |c: &Cluster| -> anyhow::Result<BTreeSet<String>> {
        Ok(container_tasks(c)?.into_iter().map(|t| t.0).collect())
    };
    let a = made.run(
        &format!("skt-ga-{tag}"),
        &["--label", "VIP_0=/ga:80", "-p", "80"],
    )?;
    let b = made.run(
        &format!("skt-gb-{tag}"),
        &["--label", "VIP_0=/gb:80", "-p", "80"],
    )?;
    wait_for("a and b as tasks", Duration::from_secs(10), || {
        Ok((ids(&c)? == BTreeSet::from([task_of(&a), task_of(&b)])).then_some(()))
    })?;

    // Node1's view of its Docker provider: `skein_docker_up` in /metrics
    // and the `docker` component of its health.
    let docker_state = |c: &Cluster| -> anyhow::Result<(Option<u64>, Option<bool>)> {
        let metrics =
            cluster_tests::curl(&c.node(1).netns, &["-s", "http://127.0.0.1:62080/metrics"])?;
        let up = String::from_utf8_lossy(&metrics).lines().find_map(|l| {
            l.strip_prefix("skein_docker_up ")
                .and_then(|v| v.parse().ok())
        });
        let health = c.get(1, "/v1/health")?;
        let component = health["nodes"]
            .as_array()
            .and_then(|n| n.first())
            .and_then(|n| n["components"].as_array())
            .and_then(|cs| cs.iter().find(|x| x["id"] == "docker"))
            .and_then(|x| x["healthy"].as_bool());
        Ok((up, component))
    };
    wait_for("the provider reported up", Duration::from_secs(10), || {
        Ok((docker_state(&c)? == (Some(1), Some(true))).then_some(()))
    })?;

    // Docker "restarts": the agent notices, and keeps what it had.
    proxy.stop();
    wait_for(
        "the agent noticing Docker gone",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&c.node(1).log)?;
            Ok(log.contains("Docker unreachable").then_some(()))
        },
    )?;
    assert_eq!(
        ids(&c)?,
        BTreeSet::from([task_of(&a), task_of(&b)]),
        "no news is not news of death"
    );
    wait_for(
        "the provider reported down",
        Duration::from_secs(10),
        || Ok((docker_state(&c)? == (Some(0), Some(false))).then_some(())),
    )?;
    // Meanwhile b goes and d comes.
    docker(&["rm", "-f", &b])?;
    let d = made.run(
        &format!("skt-gd-{tag}"),
        &["--label", "VIP_0=/gd:80", "-p", "80"],
    )?;
    proxy.start()?;
    wait_for(
        "a and d once Docker answers again",
        Duration::from_secs(15),
        || Ok((ids(&c)? == BTreeSet::from([task_of(&a), task_of(&d)])).then_some(())),
    )?;
    assert_eq!(container_tasks(&c)?.len(), 2, "no duplicates");
    wait_for(
        "the provider reported up again",
        Duration::from_secs(10),
        || Ok((docker_state(&c)? == (Some(1), Some(true))).then_some(())),
    )?;
    proxy.stop();
    // The provider turned off: nobody follows those containers any more,
    // so their tasks go at the next start.
    c.kill(1)?;
    c.start(1, &[], &[])?;
    wait_for(
        "no container tasks without --docker-socket",
        Duration::from_secs(10),
        || Ok(container_tasks(&c)?.is_empty().then_some(())),
    )?;
    Ok(())
}
