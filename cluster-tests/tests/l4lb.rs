//! VIPs realized with nftables in real kernels: 3 agents in namespaces, real
//! HTTP/UDP backends, `curl` through the VIP address.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::{sh, spawn_in, wait_for, Cluster};

fn task(ip: &str, port: u16, protocol: &str, vip: &str) -> String {
    format!(
        r#"{{"app":"/httpi","ip":"{ip}","ports":[{{"port":{port},"protocol":"{protocol}","labels":{{"VIP_0":"{vip}"}}}}]}}"#
    )
}

/// A task whose agent checks it over HTTP every second.
fn checked_task(ip: &str, port: u16, vip: &str) -> String {
    format!(
        r#"{{"app":"/httpi","ip":"{ip}","ports":[{{"port":{port},"labels":{{"VIP_0":"{vip}"}}}}],"health_check":{{"protocol":"http","path":"/","interval_s":1,"timeout_s":1,"unhealthy_after":2}}}}"#
    )
}

/// `n` requests from node `i` to `url`; answers counted by backend name,
/// failures under "FAILED".
fn hits(c: &Cluster, i: usize, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let answer = cluster_tests::curl(&c.node(i).netns, &["-sf", "--max-time", "2", url])
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_else(|_| "FAILED".to_string());
        *out.entry(answer).or_insert(0) += 1;
    }
    out
}

/// Whether node `i`'s table DNATs `proto` traffic to `backend` (`ip:port`):
/// whether it is a target in the protocol's backend map.
fn dnat_in_kernel(c: &Cluster, i: usize, proto: &str, backend: &str) -> anyhow::Result<bool> {
    let netns = &c.node(i).netns;
    let map = format!("{proto}_backends");
    let Ok(out) = sh(&[
        "ip", "netns", "exec", netns, "nft", "list", "map", "ip", "skein", &map,
    ]) else {
        return Ok(false);
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Some((_, elements)) = text.split_once("elements = {") else {
        return Ok(false);
    };
    let elements = elements.split('}').next().unwrap_or_default();
    // `vip . port . slot : backend . port`, comma-separated, over lines.
    Ok(elements
        .split(',')
        .filter_map(|e| e.split_once(':'))
        .any(|(_, target)| target.trim().replace(" . ", ":") == backend))
}

fn in_kernel(c: &Cluster, i: usize, needle: &str) -> anyhow::Result<bool> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(i).netns,
        "nft",
        "list",
        "table",
        "ip",
        "skein",
    ]);
    Ok(out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(needle)))
}

#[test]
fn vips_load_balance_through_nftables_and_follow_the_cluster() -> anyhow::Result<()> {
    let rogue = env!("CARGO_BIN_EXE_skein-rogue");
    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let mut c = Cluster::new(3)?;
    let flags = ["--l4lb-resync-s", "2"];
    c.start(1, &[], &flags)?;
    c.start(2, &[1], &flags)?;
    c.start(3, &[1], &flags)?;

    // Real servers: two on node 2, one on node 3 (TCP and UDP on each).
    let server_a = spawn_in(&c.node(2).netns, httpi, &["10.77.0.2:9896", "backend-a"])?;
    let _b = spawn_in(&c.node(2).netns, httpi, &["10.77.0.2:9897", "backend-b"])?;
    let backend_c = spawn_in(&c.node(3).netns, httpi, &["10.77.0.3:9896", "backend-c"])?;
    assert_eq!(
        c.put_task(
            2,
            "httpi.a",
            &checked_task("10.77.0.2", 9896, "/httpi:3141")
        )?
        .0,
        201
    );
    assert_eq!(
        c.put_task(2, "httpi.b", &task("10.77.0.2", 9897, "tcp", "/httpi:3141"))?
            .0,
        201
    );
    assert_eq!(
        c.put_task(3, "httpi.c", &task("10.77.0.3", 9896, "tcp", "/httpi:3141"))?
            .0,
        201
    );
    assert_eq!(
        c.put_task(3, "echo.c", &task("10.77.0.3", 9896, "udp", "/echo:5353"))?
            .0,
        201
    );

    let name = "httpi.marathon.l4lb.thisdcos.directory:3141";
    let addr = wait_for("httpi's VIP address", Duration::from_secs(20), || {
        c.vip_address(1, name)
    })?;
    let url = format!("http://{addr}:3141/");
    wait_for("the VIP in node1's kernel", Duration::from_secs(20), || {
        Ok(
            (in_kernel(&c, 1, &addr)? && dnat_in_kernel(&c, 1, "tcp", "10.77.0.3:9896")?)
                .then_some(()),
        )
    })?;

    // 60 requests from node 1 reach all three backends and none fail.
    let spread = hits(&c, 1, &url, 60);
    println!("node1 → {url} ×60: {spread:?}");
    assert_eq!(spread.get("FAILED"), None, "{spread:?}");
    for b in ["backend-a", "backend-b", "backend-c"] {
        assert!(
            spread.get(b).copied().unwrap_or(0) > 0,
            "{b} never answered: {spread:?}"
        );
    }
    // From a backend's own node (hairpin to its own VIP).
    let from_backend = hits(&c, 2, &url, 30);
    println!("node2 (a backend's node) → VIP ×30: {from_backend:?}");
    assert_eq!(from_backend.get("FAILED"), None, "{from_backend:?}");

    // A UDP VIP.
    let echo = wait_for("echo's VIP address", Duration::from_secs(20), || {
        c.vip_address(1, "echo.marathon.l4lb.thisdcos.directory:5353")
    })?;
    let answer = wait_for(
        "a UDP answer through the VIP",
        Duration::from_secs(20),
        || {
            let out = sh(&[
                "ip",
                "netns",
                "exec",
                &c.node(1).netns,
                rogue,
                "udp-ask",
                &format!("{echo}:5353"),
            ]);
            Ok(out
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()))
        },
    )?;
    assert_eq!(answer, "backend-c");

    // Restarting node 1's agent neither flushes its rules nor breaks an
    // established connection through the VIP.
    let hold = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.node(1).netns,
            rogue,
            "tcp-hold",
            &format!("{addr}:3141"),
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    c.kill(1)?;
    assert!(
        in_kernel(&c, 1, &addr)?,
        "a dead agent's rules must stay in place"
    );
    c.start(1, &[2], &flags)?;
    // New connections keep working right after the restart, too.
    let fresh = hits(&c, 1, &url, 10);
    assert_eq!(fresh.get("FAILED"), None, "{fresh:?}");
    let held = hold.wait_with_output()?;
    let said =
        String::from_utf8_lossy(&held.stdout).to_string() + &String::from_utf8_lossy(&held.stderr);
    println!(
        "connection held across node1's agent restart: {}",
        said.trim()
    );
    assert!(held.status.success(), "{said}");
    assert_eq!(hits(&c, 1, &url, 10).get("FAILED"), None);

    // Backend a's server stops: its health check fails, every node stops
    // sending it new connections, and nothing fails meanwhile.
    drop(server_a);
    let tcp_a = "10.77.0.2:9896";
    wait_for(
        "unhealthy a out of node1's kernel",
        Duration::from_secs(20),
        || Ok((!dnat_in_kernel(&c, 1, "tcp", tcp_a)?).then_some(())),
    )?;
    let while_sick = hits(&c, 1, &url, 30);
    println!("with backend a unhealthy ×30: {while_sick:?}");
    assert_eq!(while_sick.get("backend-a"), None, "{while_sick:?}");
    assert_eq!(while_sick.get("FAILED"), None, "{while_sick:?}");
    let _server_a = spawn_in(&c.node(2).netns, httpi, &["10.77.0.2:9896", "backend-a"])?;
    wait_for(
        "healthy a back in node1's kernel",
        Duration::from_secs(20),
        || Ok(dnat_in_kernel(&c, 1, "tcp", tcp_a)?.then_some(())),
    )?;

    // Deleting a task stops new connections to it.
    assert_eq!(c.delete_task(2, "httpi.b")?, 204);
    wait_for(
        "backend b out of node1's kernel",
        Duration::from_secs(20),
        || Ok((!dnat_in_kernel(&c, 1, "tcp", "10.77.0.2:9897")?).then_some(())),
    )?;
    let after_delete = hits(&c, 1, &url, 30);
    assert_eq!(after_delete.get("backend-b"), None, "{after_delete:?}");
    assert_eq!(after_delete.get("FAILED"), None, "{after_delete:?}");

    // Node 3's agent and its backend die: c leaves every node's rules.
    c.kill(3)?;
    drop(backend_c);
    // (The UDP echo VIP keeps its only backend: when every backend is on a
    // down node they are all kept rather than black-holing the VIP.)
    let tcp_c = "10.77.0.3:9896";
    wait_for(
        "backend c out of node1's and node2's kernels",
        Duration::from_secs(30),
        || {
            Ok(
                (!dnat_in_kernel(&c, 1, "tcp", tcp_c)? && !dnat_in_kernel(&c, 2, "tcp", tcp_c)?)
                    .then_some(()),
            )
        },
    )?;
    assert!(dnat_in_kernel(&c, 1, "udp", "10.77.0.3:9896")?);
    let after_kill = hits(&c, 1, &url, 30);
    assert_eq!(
        after_kill,
        BTreeMap::from([("backend-a".to_string(), 30)]),
        "{after_kill:?}"
    );

    // An operator deletes our table: the next resync puts it back.
    sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(1).netns,
        "nft",
        "delete",
        "table",
        "ip",
        "skein",
    ])?;
    wait_for("the table repaired", Duration::from_secs(20), || {
        Ok(in_kernel(&c, 1, &addr)?.then_some(()))
    })?;
    assert_eq!(hits(&c, 1, &url, 5).get("backend-a"), Some(&5));
    let metrics = String::from_utf8_lossy(&cluster_tests::curl(
        &c.node(1).netns,
        &["-sf", &format!("{}/metrics", cluster_tests::API)],
    )?)
    .to_string();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("skein_l4lb_drift_repaired_total") && !l.ends_with(" 0")),
        "drift repair not counted"
    );
    Ok(())
}
