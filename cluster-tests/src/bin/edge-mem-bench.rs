//! Memory of `skein edge` (and its agent) over many route changes (issue 13:
//! "memory flat after 10,000 changes").
//!
//!   cargo build --release -p skein -p cluster-tests
//!   SKEIN_BIN=target/release/skein target/release/edge-mem-bench [--changes 10000] [--apps 50]
//!
//! Starts a real agent (loopback, no kernel dataplane) and a real `skein
//! edge` reading its routes by long poll, as on a public node. Registers
//! `--apps` apps with Marathon-LB labels (a virtual host each, three tasks
//! each), then makes `--changes` changes through the agent's API, each a
//! task added to an app and its oldest task removed (a rolling deploy step:
//! a server joins, another leaves and drains), so the number of routes stays
//! the same while every change is a new route set for the edge. Prints both
//! processes' RSS at intervals and the growth between the first tenth of the
//! changes (caches warm) and the end: flat means no per-change leak. There is
//! no peer to compare with here: Marathon-LB forked a new HAProxy per change
//! (its users' issues #267, #359: hundreds of processes).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cluster_tests::{arg, rss_kb};

fn text(url: &str) -> Option<String> {
    let mut r = ureq::get(url).call().ok()?;
    r.body_mut().read_to_string().ok()
}

/// A Prometheus sample's value by its full name (with labels).
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

const API: &str = "http://127.0.0.1:62699";
const STATS: &str = "http://127.0.0.1:62697";

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let changes = arg("--changes", 10_000);
    let apps = arg("--apps", 50).max(1);
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    skein_tls::init_ca(&ca, "bench")?;
    skein_tls::issue_node(&ca, "agent", &dir.path().join("tls"))?;
    let p = |x: &Path| x.to_string_lossy().to_string();
    let agent = Kill(
        std::process::Command::new(cluster_tests::skein_bin())
            .args(["agent", "--node-id", "agent", "--advertise", "127.0.0.1"])
            .args([
                "--gossip-listen",
                "127.0.0.1:62699",
                "--api-listen",
                "127.0.0.1:62699",
            ])
            .args(["--dns-listen", "127.0.0.1:62698", "--cluster-id", "bench"])
            .args(["--l4lb-dataplane", "none", "--overlay-dataplane", "none"])
            .args(["--data-dir", &p(&dir.path().join("data"))])
            .args(["--tls-dir", &p(&dir.path().join("tls"))])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the agent")?,
    );
    cluster_tests::wait_for("the agent's API", Duration::from_secs(20), || {
        Ok(text(&format!("{API}/v1/version")))
    })?;
    let edge = Kill(
        std::process::Command::new(cluster_tests::skein_bin())
            .args(["edge", "--agent-api", API, "--bind", "127.0.0.1"])
            .args(["--http-port", "62696", "--https-port", "62695"])
            .args(["--stats-port", "62697", "--service-ports", "10000-10100"])
            .args(["--state-dir", &p(&dir.path().join("edge"))])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the edge")?,
    );
    cluster_tests::wait_for("the edge's stats port", Duration::from_secs(20), || {
        Ok(text(&format!("{STATS}/_haproxy_health_check")))
    })?;
    let token = std::fs::read_to_string(dir.path().join("data").join("api-token"))
        .context("the agent's API token")?;
    let auth = format!("Bearer {}", token.trim());
    let put = |id: &str, app: usize, port: usize| -> anyhow::Result<()> {
        let body = format!(
            r#"{{"app":"/app{app}","ip":"127.0.0.1","ports":[{{"port":{port}}}],
                "labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"app{app}.example.com"}}}}"#
        );
        ureq::put(&format!("{API}/v1/tasks/{id}"))
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body.as_str())
            .with_context(|| format!("PUT {id}"))?;
        Ok(())
    };
    let delete = |id: &str| -> anyhow::Result<()> {
        ureq::delete(&format!("{API}/v1/tasks/{id}"))
            .header("Authorization", &auth)
            .call()
            .with_context(|| format!("DELETE {id}"))?;
        Ok(())
    };
    // Each app runs tasks gen-(k-2), gen-(k-1), gen-k; a change starts the
    // next and stops the oldest.
    let mut generation = vec![2usize; apps];
    for a in 0..apps {
        for g in 0..3 {
            put(&format!("app{a}.{g}"), a, 20_000 + g)?;
        }
    }
    let applied = || {
        text(&format!("{STATS}/metrics"))
            .and_then(|m| metric(&m, "skein_edge_route_applies_total"))
            .unwrap_or(0.0)
    };
    let settle = |what: &str| -> anyhow::Result<()> {
        // Applied everything once the edge's count stops moving.
        let mut last = -1.0;
        cluster_tests::wait_for(what, Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_millis(300));
            let now = applied();
            let done = now == last;
            last = now;
            Ok(done.then_some(()))
        })
    };
    settle("the edge to apply the first routes")?;
    let (edge_pid, agent_pid) = (edge.0.id(), agent.0.id());
    println!(
        "edge-mem-bench: {apps} apps x 3 tasks, {changes} changes (a task started and the oldest stopped, through the agent's API)"
    );
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>10}",
        "changes", "applies", "edge RSS", "agent RSS", "changes/s"
    );
    let report = |done: usize, started: Instant| {
        println!(
            "{:>8} {:>10} {:>9.1} MB {:>9.1} MB {:>10.0}",
            done,
            applied(),
            rss_kb(edge_pid).unwrap_or(0) as f64 / 1024.0,
            rss_kb(agent_pid).unwrap_or(0) as f64 / 1024.0,
            done as f64 / started.elapsed().as_secs_f64().max(1e-9),
        );
    };
    let started = Instant::now();
    report(0, started);
    let (mut at_tenth, mut at_half, mut agent_half) = (0u64, 0u64, 0u64);
    let step = (changes / 10).max(1);
    for i in 1..=changes {
        let a = i % apps;
        generation[a] += 1;
        let g = generation[a];
        put(&format!("app{a}.{g}"), a, 20_000 + g % 1000)?;
        delete(&format!("app{a}.{}", g - 3))?;
        if i % step == 0 {
            if i == step {
                settle("the edge to catch up")?;
                at_tenth = rss_kb(edge_pid).unwrap_or(0);
            }
            if i == step * 5 {
                settle("the edge to catch up")?;
                at_half = rss_kb(edge_pid).unwrap_or(0);
                agent_half = rss_kb(agent_pid).unwrap_or(0);
            }
            report(i, started);
        }
    }
    settle("the edge to catch up")?;
    let end = rss_kb(edge_pid).unwrap_or(0);
    let agent_end = rss_kb(agent_pid).unwrap_or(0);
    report(changes, started);
    let mb = |kb: u64| kb as f64 / 1024.0;
    let growth = |from: u64, to: u64| (to as f64 - from as f64) * 100.0 / (from.max(1) as f64);
    // Flat: the second half of the changes grew the edge by under 5% (the
    // first changes warm the allocator's arenas and the per-server maps).
    println!(
        "edge RSS: {:.1} MB after {step} changes, {:.1} MB after {}, {:.1} MB after {changes}: {:+.1}% over the second half ({}), {:+.1}% from the first tenth",
        mb(at_tenth),
        mb(at_half),
        step * 5,
        mb(end),
        growth(at_half, end),
        if growth(at_half, end) < 5.0 { "flat" } else { "GROWING" },
        growth(at_tenth, end),
    );
    // The agent keeps each deleted task's tombstone for an hour (so peers
    // that missed the delete still learn it): it grows with the deletes and
    // shrinks when they expire.
    println!(
        "agent RSS: {:.1} MB after {}, {:.1} MB after {changes} (the deleted tasks' tombstones are kept for an hour)",
        mb(agent_half),
        step * 5,
        mb(agent_end),
    );
    let routes = text(&format!("{API}/v1/edge?groups=external")).unwrap_or_default();
    let servers = routes.matches("\"addr\"").count();
    println!("routes at the end: {servers} servers (want {})", apps * 3);
    Ok(())
}
