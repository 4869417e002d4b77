//! Forwarding names outside the cluster to real upstream servers in the
//! test's namespaces: racing, a dead upstream, all dead, and the cache.

use std::time::{Duration, Instant};

use cluster_tests::{sh, spawn_in_logged, wait_for, Cluster};

fn dig(c: &Cluster, i: usize, name: &str) -> anyhow::Result<(String, Vec<String>, Duration)> {
    let start = Instant::now();
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(i).netns,
        "dig",
        "@127.0.0.1",
        name,
        "A",
        "+time=5",
        "+tries=1",
    ])?;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
        .to_string();
    let answers = text
        .split(";; ANSWER SECTION:")
        .nth(1)
        .map(|sec| {
            sec.lines()
                .skip(1) // the rest of the header line
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((status, answers, took))
}

fn queries_seen(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.lines().filter(|l| l.starts_with("query")).count())
}

#[test]
fn forwarding_races_upstreams_fails_in_time_and_caches() -> anyhow::Result<()> {
    let fakedns = env!("CARGO_BIN_EXE_skein-fakedns");
    let mut c = Cluster::new(4)?;
    let good_log = c.dir.path().join("good-upstream.log");
    let dead_log = c.dir.path().join("dead-upstream.log");
    // Upstreams live in node 2's and node 3's namespaces (no agents there).
    let good = spawn_in_logged(
        &c.node(2).netns,
        fakedns,
        &["10.77.0.2:53", "example.com.", "93.184.216.34"],
        Some(&good_log),
    )?;
    let _dead = spawn_in_logged(
        &c.node(3).netns,
        fakedns,
        &["10.77.0.3:53", "example.com.", "93.184.216.34", "--silent"],
        Some(&dead_log),
    )?;
    // A zone with its own forwarder, in node 4's namespace.
    let _corp = spawn_in_logged(
        &c.node(4).netns,
        fakedns,
        &["10.77.0.4:53", "db.corp.test.", "10.1.1.1"],
        None,
    )?;
    // The dead one first: the race, not the order, must save the answer.
    c.start(
        1,
        &[],
        &[
            "--dns-upstream",
            "10.77.0.3,10.77.0.2",
            "--dns-forward-zones",
            "corp.test=10.77.0.4",
        ],
    )?;

    let (status, answers, took) = wait_for("a forwarded answer", Duration::from_secs(10), || {
        let r = dig(&c, 1, "example.com")?;
        Ok((r.0 == "NOERROR").then_some(r))
    })?;
    println!("forwarded with one of two upstreams dead: {status} {answers:?} in {took:?}");
    assert_eq!(answers, ["93.184.216.34"]);
    assert!(
        queries_seen(&dead_log) >= 1,
        "the dead upstream was asked too (raced)"
    );
    let (status, _, _) = dig(&c, 1, "missing.example.com")?;
    assert_eq!(status, "NXDOMAIN", "upstream NXDOMAIN passed through");

    // Names under a forwarded zone go to that zone's server only.
    let before = queries_seen(&good_log);
    let (status, answers, _) = dig(&c, 1, "db.corp.test")?;
    assert_eq!(
        (status.as_str(), answers.as_slice()),
        ("NOERROR", &["10.1.1.1".to_string()][..])
    );
    assert_eq!(
        queries_seen(&good_log),
        before,
        "a zone-forwarded name reached the default upstream"
    );
    let metrics = String::from_utf8_lossy(&cluster_tests::curl(
        &c.node(1).netns,
        &["-sf", &format!("{}/metrics", cluster_tests::API)],
    )?)
    .to_string();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("skein_dns_upstream_answers_total{upstream=\"10.77.0.2:53\"}")
            && !l.ends_with(" 0")),
        "per-upstream answers missing:\n{metrics}"
    );

    // Cached: answered again without the upstream hearing of it.
    let before = queries_seen(&good_log);
    let (status, answers, took) = dig(&c, 1, "example.com")?;
    assert_eq!(
        (status.as_str(), answers.as_slice()),
        ("NOERROR", &["93.184.216.34".to_string()][..])
    );
    assert_eq!(
        queries_seen(&good_log),
        before,
        "a cached answer must not reach the upstream"
    );
    println!("cached answer in {took:?}");

    // Every upstream dead: SERVFAIL within the deadline, not a client timeout.
    drop(good);
    let (status, _, took) = dig(&c, 1, "uncached.example.com")?;
    println!("all upstreams dead: {status} after {took:?}");
    assert_eq!(status, "SERVFAIL");
    assert!(took < Duration::from_secs(4), "SERVFAIL took {took:?}");
    // The cluster zones do not depend on upstreams at all.
    let (status, answers, _) = dig(&c, 1, "ready.spartan")?;
    assert_eq!(
        (status.as_str(), answers.as_slice()),
        ("NOERROR", &["127.0.0.1".to_string()][..])
    );
    Ok(())
}
