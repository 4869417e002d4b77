//! Every node's DNS server answers for the cluster from its own replica,
//! asked with `dig` inside the nodes' namespaces.

use std::time::{Duration, Instant};

use cluster_tests::{sh, wait_for, Cluster};

/// `dig @127.0.0.1 NAME TYPE +short` inside node `i` (plus extra flags).
fn dig(
    c: &Cluster,
    i: usize,
    name: &str,
    qtype: &str,
    extra: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut cmd = vec![
        "ip",
        "netns",
        "exec",
        &c.node(i).netns,
        "dig",
        "@127.0.0.1",
        name,
        qtype,
        "+short",
        "+time=2",
        "+tries=1",
    ];
    cmd.extend_from_slice(extra);
    let out = sh(&cmd)?;
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    Ok(lines)
}

/// The response code dig reports (`NOERROR`, `NXDOMAIN`, ...).
fn status(c: &Cluster, i: usize, name: &str) -> anyhow::Result<String> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(i).netns,
        "dig",
        "@127.0.0.1",
        name,
        "+time=2",
        "+tries=1",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Ok(text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
        .to_string())
}

#[test]
fn cluster_records_are_answered_on_every_node() -> anyhow::Result<()> {
    let mut c = Cluster::new(3)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    assert_eq!(dig(&c, 1, "ready.spartan", "A", &[])?, ["127.0.0.1"]);

    let body = r#"{"app":"/httpi","ip":"10.77.0.2","ports":[{"name":"http","port":9896,"labels":{"VIP_0":"/httpi:3141"}}]}"#;
    let registered = Instant::now();
    assert_eq!(c.put_task(2, "httpi.1", body)?.0, 201);
    for i in [1, 3] {
        wait_for("the A record", Duration::from_secs(10), || {
            Ok((dig(&c, i, "httpi.marathon.mesos", "A", &[])? == ["10.77.0.2"]).then_some(()))
        })?;
        println!(
            "registration on node2 → A answered by node{i}'s DNS after {:?}",
            registered.elapsed()
        );
    }
    let srv = dig(&c, 3, "_httpi._tcp.marathon.mesos", "SRV", &[])?;
    assert_eq!(srv.len(), 1, "{srv:?}");
    assert!(
        srv[0].starts_with("0 1 9896 httpi-") && srv[0].ends_with("-node2.marathon.mesos."),
        "{srv:?}"
    );
    let target = srv[0].rsplit(' ').next().unwrap_or_default().to_string();
    assert_eq!(dig(&c, 1, &target, "A", &[])?, ["10.77.0.2"]);
    let vip = wait_for("the l4lb name", Duration::from_secs(15), || {
        let a = dig(&c, 1, "httpi.marathon.l4lb.thisdcos.directory", "A", &[])?;
        Ok(a.first().cloned())
    })?;
    assert!(vip.starts_with("11."), "{vip}");
    assert_eq!(
        dig(
            &c,
            3,
            "httpi.marathon.agentip.dcos.thisdcos.directory",
            "A",
            &[]
        )?,
        ["10.77.0.2"]
    );
    assert_eq!(
        dig(&c, 3, "httpi.marathon.mesos", "A", &["+tcp"])?,
        ["10.77.0.2"],
        "over TCP too"
    );
    assert_eq!(status(&c, 1, "nothing.marathon.mesos")?, "NXDOMAIN");
    // Mesos-DNS's HTTP API on another node.
    let e = c.get(3, "/v1/enumerate")?;
    let app = &e["frameworks"][0]["tasks"][0];
    assert_eq!(e["frameworks"][0]["name"], "marathon", "{e}");
    assert_eq!(app["name"], "httpi", "{e}");
    assert!(
        app["records"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["rtype"] == "SRV")),
        "{e}"
    );
    let config = c.get(3, "/v1/config")?;
    assert_eq!(config["TTL"], 5);
    assert_eq!(config["Domain"], "mesos");

    // Removing the task removes its records everywhere.
    assert_eq!(c.delete_task(2, "httpi.1")?, 204);
    for i in [1, 3] {
        wait_for("NXDOMAIN after delete", Duration::from_secs(10), || {
            Ok((status(&c, i, "httpi.marathon.mesos")? == "NXDOMAIN").then_some(()))
        })?;
    }

    // A node that goes down takes its tasks' records with it.
    assert_eq!(
        c.put_task(
            3,
            "db.1",
            r#"{"app":"/db","ip":"10.77.0.3","ports":[{"port":5432}]}"#
        )?
        .0,
        201
    );
    wait_for("db on node1", Duration::from_secs(10), || {
        Ok((dig(&c, 1, "db.marathon.mesos", "A", &[])? == ["10.77.0.3"]).then_some(()))
    })?;
    c.kill(3)?;
    let killed = Instant::now();
    wait_for("db gone after node3 died", Duration::from_secs(30), || {
        Ok((status(&c, 1, "db.marathon.mesos")? == "NXDOMAIN").then_some(()))
    })?;
    println!(
        "node3 killed → its records gone from node1's DNS after {:?}",
        killed.elapsed()
    );
    Ok(())
}
