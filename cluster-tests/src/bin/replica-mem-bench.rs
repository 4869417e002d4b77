//! Memory of an agent that holds a large cluster in its replica.
//!
//!   cargo build --release -p skein -p cluster-tests
//!   SKEIN_BIN=target/release/skein target/release/replica-mem-bench --peers 1000 --vips 10000
//!
//! Issues a certificate per peer from a fresh cluster CA, builds each
//! peer's signed keyspace (metadata and tasks with named VIPs, every entry
//! signed with that peer's key, exactly what gossip would carry), writes
//! them as the persisted replica of a new agent, starts the real `skein
//! agent` on it (loopback only, no kernel dataplane, DNS on a high port),
//! waits until its API reports every task and VIP, and prints its peak RSS
//! over 10 s idle (a client reading `/v1/vips`) and over 10 s of task churn
//! (a task with a new named VIP put and the previous one deleted every
//! 500 ms, each a rebuild of the agent's view).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cluster_tests::{arg, rss_kb};
use skein_proto::{Config, Identity, Name, Node};

fn get(url: &str) -> Option<serde_json::Value> {
    let mut r = ureq::get(url).call().ok()?;
    r.body_mut().read_json().ok()
}

fn main() -> anyhow::Result<()> {
    let peers = arg("--peers", 1000);
    let vips = arg("--vips", 10_000);
    let per_peer = vips.div_ceil(peers.max(1));
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    skein_tls::init_ca(&ca, "bench")?;
    let t0 = Instant::now();
    let mut data = Vec::with_capacity(peers);
    let cfg = Config::new("bench");
    for p in 0..peers {
        let id = format!("peer-{p:05}");
        let tls_dir = dir.path().join("peers").join(&id);
        skein_tls::issue_node(&ca, &id, &tls_dir)?;
        let tls = skein_tls::NodeTls::load(&tls_dir)?;
        let signer = tls.gossip_signer()?;
        let identity = Arc::new(Identity(signer.identity().to_vec()));
        // Loopback addresses nobody listens on: the agent's heartbeats to
        // these peers never leave the machine.
        let ip = format!("127.1.{}.{}", p >> 8 & 255, p & 255);
        let addr = format!("{ip}:62501").parse()?;
        let mut node = Node::new(
            cfg.clone(),
            skein_gossip::CertKeys(signer),
            Name::intern(&id).context("name")?,
            addr,
            identity,
            1,
            p as u64,
            0,
        );
        let meta = format!(
            r#"{{"hostname":"{id}","private_ip":"{ip}","agent_version":"bench","started_ms":1}}"#
        );
        node.write(0, "meta", Some(&meta))
            .map_err(|r| anyhow::anyhow!("{r:?}"))?;
        for t in 0..per_peer {
            let task = format!(
                r#"{{"app":"/svc-{p}-{t}","ip":"{ip}","ports":[{{"port":{},"labels":{{"VIP_0":"/svc-{p}-{t}:80"}}}}]}}"#,
                8000 + t
            );
            node.write(0, &format!("task:svc-{p}-{t}.1"), Some(&task))
                .map_err(|r| anyhow::anyhow!("{r:?}"))?;
        }
        data.push(node.own_data().context("own data")?);
    }
    // What the gossip core itself holds for this replica (an estimate that
    // counts every shared value in full), to tell it from the rest.
    let core_bytes = {
        let dir = dir.path().join("probe");
        skein_tls::issue_node(&ca, "probe", &dir)?;
        let tls = skein_tls::NodeTls::load(&dir)?;
        let signer = tls.gossip_signer()?;
        let identity = Arc::new(Identity(signer.identity().to_vec()));
        let mut probe = Node::new(
            cfg.clone(),
            skein_gossip::CertKeys(signer),
            Name::intern("probe").context("name")?,
            "127.0.0.1:62501".parse()?,
            identity,
            1,
            7,
            0,
        );
        for d in &data {
            probe.restore(0, d.clone());
        }
        probe.mem_estimate()
    };
    let persisted = postcard::to_allocvec(&(1u8, data))?;
    println!(
        "built {peers} peers × {per_peer} tasks with named VIPs ({} VIPs), every entry signed: {:.1} s, persisted replica {:.1} MB",
        peers * per_peer,
        t0.elapsed().as_secs_f64(),
        persisted.len() as f64 / 1e6
    );

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(agent_dir.join("data"))?;
    std::fs::write(agent_dir.join("data").join("replica.postcard"), &persisted)?;
    skein_tls::issue_node(&ca, "agent", &agent_dir.join("tls"))?;
    let p = |x: &Path| x.to_string_lossy().to_string();
    let mut child = std::process::Command::new(cluster_tests::skein_bin())
        .args(["agent", "--node-id", "agent", "--advertise", "127.0.0.1"])
        .args([
            "--gossip-listen",
            "127.0.0.1:62599",
            "--api-listen",
            "127.0.0.1:62599",
        ])
        .args(["--dns-listen", "127.0.0.1:62598", "--cluster-id", "bench"])
        .args(["--l4lb-dataplane", "none", "--overlay-dataplane", "none"])
        .args([
            "--data-dir",
            &p(&agent_dir.join("data")),
            "--tls-dir",
            &p(&agent_dir.join("tls")),
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting the agent")?;
    let pid = child.id();
    let result = (|| -> anyhow::Result<()> {
        let started = Instant::now();
        let expected = peers * per_peer;
        cluster_tests::wait_for(
            "every VIP in the agent's API",
            Duration::from_secs(120),
            || {
                let Some(v) = get("http://127.0.0.1:62599/v1/vips") else {
                    return Ok(None);
                };
                let n = v.as_array().map_or(0, Vec::len);
                Ok((n >= expected).then_some(()))
            },
        )?;
        let loaded = started.elapsed();
        let nodes = get("http://127.0.0.1:62599/v1/nodes")
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        // Idle: sample while a client reads the VIP list.
        let sample = |max: &mut u64| {
            let _ = get("http://127.0.0.1:62599/v1/vips");
            *max = (*max).max(rss_kb(pid).unwrap_or(0));
        };
        let mut idle = 0;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(500));
            sample(&mut idle);
        }
        // Churn: a task with a new named VIP registered and the previous one
        // removed every 500 ms, so that views are rebuilt (and two are
        // alive at once) while sampling.
        let token = std::fs::read_to_string(agent_dir.join("data").join("api-token"))
            .context("the agent's API token")?;
        let auth = format!("Bearer {}", token.trim());
        let mut churn = 0;
        let mut writes = 0;
        for i in 0..20 {
            let body = format!(
                r#"{{"app":"/churn-{i}","ip":"127.0.0.1","ports":[{{"port":9000,"labels":{{"VIP_0":"/churn-{i}:80"}}}}]}}"#
            );
            let put = ureq::put(&format!("http://127.0.0.1:62599/v1/tasks/churn-{i}.1"))
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.as_str());
            writes += usize::from(put.is_ok());
            if i > 0 {
                let del = ureq::delete(&format!(
                    "http://127.0.0.1:62599/v1/tasks/churn-{}.1",
                    i - 1
                ))
                .header("Authorization", &auth)
                .call();
                writes += usize::from(del.is_ok());
            }
            std::thread::sleep(Duration::from_millis(500));
            sample(&mut churn);
        }
        anyhow::ensure!(writes == 39, "only {writes} of 39 task writes succeeded");
        let mb = |kb: u64| kb as f64 / 1024.0;
        let max = mb(idle.max(churn));
        println!(
            "agent holding {} nodes and {expected} VIPs (loaded in {:.1} s): RSS peak {:.1} MB idle over 10 s, {:.1} MB over 10 s of task churn (a VIP added and one removed every 500 ms); max {max:.1} MB (target ≤ 50 MB: {:.2}x); the gossip core's state for this replica ≈ {:.1} MB",
            nodes,
            loaded.as_secs_f64(),
            mb(idle),
            mb(churn),
            max / 50.0,
            core_bytes as f64 / 1e6
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
