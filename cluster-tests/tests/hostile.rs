//! Peers holding a valid certificate of the cluster that lie or flood:
//! nothing they send changes another node's state on any member, each
//! refusal is counted in /metrics, and the cluster keeps converging.

use std::time::Duration;

use cluster_tests::{curl, spawn_in_logged, wait_for, Cluster, API, GOSSIP_PORT};

fn metrics(c: &Cluster, i: usize) -> anyhow::Result<String> {
    let out = curl(&c.node(i).netns, &["-sf", &format!("{API}/metrics")])?;
    Ok(String::from_utf8_lossy(&out).to_string())
}

/// The value of one sample (`name{labels}` or `name`) in a metrics page.
fn sample(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn total(c: &Cluster, nodes: &[usize], series: &str) -> anyhow::Result<u64> {
    let mut sum = 0;
    for &i in nodes {
        sum += sample(&metrics(c, i)?, series);
    }
    Ok(sum)
}

fn rogue_bin() -> &'static str {
    env!("CARGO_BIN_EXE_skein-rogue")
}

/// Node `of` as node `at` holds it: generation and the value of `key`.
fn held(c: &Cluster, at: usize, of: &str, key: &str) -> anyhow::Result<(u64, String)> {
    let state = c.get(at, "/v1/state")?;
    let node = &state["nodes"][of];
    Ok((
        node["generation"].as_u64().unwrap_or(0),
        node["keys"][key]["value"].to_string(),
    ))
}

/// A task written on `on` is seen by every node in `by` within 10 s.
fn converges(c: &Cluster, on: usize, by: &[usize], id: &str) -> anyhow::Result<()> {
    let body = format!(
        r#"{{"app":"/probe","ip":"{}","ports":[{{"port":80}}]}}"#,
        c.node(on).ip
    );
    let (code, text) = c.put_task(on, id, &body)?;
    anyhow::ensure!(code == 201 || code == 200, "PUT {id}: {code} {text}");
    wait_for(&format!("{id} everywhere"), Duration::from_secs(10), || {
        for &i in by {
            if !c.tasks(i)?.iter().any(|t| t.0 == id) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
}

#[test]
fn a_peer_with_a_valid_certificate_that_lies_changes_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::new(4)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    let live = [1, 2, 3];
    converges(&c, 2, &live, "web.1")?;
    let truth: Vec<(u64, String)> = live
        .iter()
        .map(|&i| held(&c, i, "node2", "task:web.1"))
        .collect::<Result<_, _>>()?;
    assert!(truth.iter().all(|t| *t == truth[0] && t.0 > 0), "{truth:?}");

    // Node 4's namespace and certificate, but no agent: the rogue joins as
    // node4 and forges node2's entries, generation and departure.
    let log = c.dir.path().join("rogue.log");
    let seed = format!("{}:{GOSSIP_PORT}", c.node(1).ip);
    let tls = c.node(4).tls_dir.to_string_lossy().to_string();
    let _rogue = spawn_in_logged(
        &c.node(4).netns,
        rogue_bin(),
        &[
            "impersonate",
            "--tls-dir",
            &tls,
            "--cluster-id",
            "test",
            "--seed",
            &seed,
            "--as",
            "node2",
            "--key",
            "task:web.1",
            "--value",
            r#"{"app":"/evil"}"#,
        ],
        Some(&log),
    )?;
    let bad_sig = "skein_gossip_refused_facts_total{reason=\"bad_signature\"}";
    let bad_id = "skein_gossip_refused_facts_total{reason=\"bad_identity\"}";
    wait_for(
        "forgeries refused and counted",
        Duration::from_secs(20),
        || {
            let sig = total(&c, &live, bad_sig)?;
            let id = total(&c, &live, bad_id)?;
            Ok((sig >= 20 && id >= 3).then_some((sig, id)))
        },
    )?;
    // Meanwhile the cluster keeps converging.
    converges(&c, 3, &live, "during.1")?;
    let mut downs = 0;
    for _ in 0..10 {
        for &i in &live {
            assert_eq!(held(&c, i, "node2", "task:web.1")?, truth[0], "node{i}");
            if c.statuses(i)?
                .iter()
                .any(|(n, s)| n == "node2" && s == "down")
            {
                downs += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(downs, 0, "one observer alone never takes node2 down");
    println!(
        "impersonation: {} forged facts refused (bad signature), {} stolen identities refused; node2 unchanged on every member; {}",
        total(&c, &live, bad_sig)?,
        total(&c, &live, bad_id)?,
        std::fs::read_to_string(&log)?.lines().last().unwrap_or("")
    );
    Ok(())
}

#[test]
fn oversize_other_versions_floods_and_a_wrong_node_id_are_refused() -> anyhow::Result<()> {
    let mut c = Cluster::new(4)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    let live = [1, 2, 3];
    converges(&c, 1, &live, "before.1")?;
    let tls = c.node(4).tls_dir.to_string_lossy().to_string();
    let to = format!("{}:{GOSSIP_PORT}", c.node(1).ip);
    let run = |mode: &str, extra: &[&str]| -> anyhow::Result<String> {
        let mut args = vec![
            "netns",
            "exec",
            &c.node(4).netns,
            rogue_bin(),
            mode,
            "--tls-dir",
            &tls,
            "--to",
            &to,
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new("ip").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };

    let decode = "skein_gossip_decode_errors_total";
    let before = sample(&metrics(&c, 1)?, decode);
    println!("oversize: {}", run("oversize", &[])?);
    wait_for("oversized message counted", Duration::from_secs(10), || {
        Ok((sample(&metrics(&c, 1)?, decode) > before).then_some(()))
    })?;

    let version = "skein_gossip_refused_messages_total{reason=\"version\"}";
    println!("wrong version: {}", run("wrong-version", &[])?);
    wait_for(
        "other wire version counted",
        Duration::from_secs(10),
        || Ok((sample(&metrics(&c, 1)?, version) >= 3).then_some(())),
    )?;

    // A flood of connections with streams that never finish, while the
    // cluster goes on converging.
    let flood = {
        let c = &c;
        let run = &run;
        std::thread::scope(|s| {
            let h = s.spawn(move || run("flood", &["--hold-s", "6"]));
            std::thread::sleep(Duration::from_secs(2));
            let converged = converges(c, 2, &live, "during.flood");
            (h.join(), converged)
        })
    };
    let (printed, converged) = flood;
    converged?;
    println!(
        "flood: {}",
        printed.map_err(|_| anyhow::anyhow!("flood thread panicked"))??
    );
    let refused = sample(&metrics(&c, 1)?, "skein_gossip_refused_connections_total");
    assert!(
        refused > 0,
        "connections beyond the per-host cap are refused and counted"
    );
    wait_for(
        "unfinished streams counted",
        Duration::from_secs(10),
        || Ok((sample(&metrics(&c, 1)?, "skein_gossip_stalled_streams_total") > 0).then_some(())),
    )?;

    // None of it changed anyone's state: every node still holds all three
    // nodes alive and the same tasks.
    for &i in &live {
        let statuses = c.statuses(i)?;
        assert!(
            ["node1", "node2", "node3"]
                .iter()
                .all(|n| statuses.iter().any(|(x, s)| x == n && s == "alive")),
            "node{i}: {statuses:?}"
        );
        assert!(
            !statuses.iter().any(|(x, _)| x == "node4"),
            "node{i}: {statuses:?}"
        );
    }

    // An agent whose certificate names another node id publishes nothing:
    // it refuses to start.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.node(4).netns])
        .arg(cluster_tests::skein_bin())
        .args([
            "agent",
            "--node-id",
            "node2",
            "--advertise",
            &c.node(4).ip,
            "--tls-dir",
            &tls,
        ])
        .args([
            "--data-dir",
            &c.dir.path().join("imposter").to_string_lossy(),
            "--cluster-id",
            "test",
        ])
        .args(["--seeds", &to])
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("does not match the certificate"),
        "{said}"
    );
    println!(
        "wrong node id: refused to start ({})",
        said.lines().last().unwrap_or("")
    );
    Ok(())
}
