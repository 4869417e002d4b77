//! Who may not join, and what may not break a node.

use std::time::Duration;

use cluster_tests::{run_skein, sh, wait_for, Cluster, GOSSIP_PORT};

fn metric(c: &Cluster, i: usize, name: &str) -> anyhow::Result<u64> {
    let out = cluster_tests::curl(
        &c.node(i).netns,
        &["-sf", &format!("{}/metrics", cluster_tests::API)],
    )?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("metric {name} missing"))
}

fn node_ids(c: &Cluster, i: usize) -> anyhow::Result<Vec<String>> {
    Ok(c.statuses(i)?.into_iter().map(|(n, _)| n).collect())
}

fn rogue_bin() -> &'static str {
    env!("CARGO_BIN_EXE_skein-rogue")
}

#[test]
fn foreign_ca_and_certificateless_peers_stay_out() -> anyhow::Result<()> {
    let mut c = Cluster::new(4)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    wait_for("node1 and node2 alive", Duration::from_secs(20), || {
        Ok(
            (c.statuses(1)?.len() == 2 && c.statuses(2)?.iter().all(|s| s.1 == "alive"))
                .then_some(()),
        )
    })?;

    // Node 3 holds a certificate from another CA, for the same cluster id.
    let foreign_ca = c.dir.path().join("foreign-ca");
    let ca = foreign_ca.to_str().expect("utf8");
    run_skein(&["cert", "init", ca, "--cluster-id", "test"])?;
    let tls3 = c.node(3).tls_dir.clone();
    std::fs::remove_dir_all(&tls3)?;
    run_skein(&["cert", "issue", ca, "node3", tls3.to_str().expect("utf8")])?;
    let rejected_before = metric(&c, 1, "skein_gossip_rejected_peers_total")?;
    c.start(3, &[1], &[])?;
    wait_for(
        "node1 to refuse node3's handshake",
        Duration::from_secs(20),
        || {
            Ok(
                (metric(&c, 1, "skein_gossip_rejected_peers_total")? > rejected_before)
                    .then_some(()),
            )
        },
    )?;

    // Node 4 tries without any certificate.
    let ca_pem = c.node(1).tls_dir.join("ca.pem");
    let rejected_before = metric(&c, 1, "skein_gossip_rejected_peers_total")?;
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(4).netns,
        rogue_bin(),
        "quic-no-cert",
        &format!("{}:{GOSSIP_PORT}", c.node(1).ip),
        ca_pem.to_str().expect("utf8"),
    ])?;
    let said = String::from_utf8_lossy(&out.stdout);
    println!("certificate-less client: {}", said.trim());
    assert!(said.starts_with("refused"), "{said}");
    wait_for(
        "node1 to count the certificate-less peer",
        Duration::from_secs(10),
        || {
            Ok(
                (metric(&c, 1, "skein_gossip_rejected_peers_total")? > rejected_before)
                    .then_some(()),
            )
        },
    )?;

    // Give the intruders several gossip rounds, then check every member.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        for i in [1, 2] {
            assert_eq!(
                node_ids(&c, i)?,
                ["node1", "node2"],
                "node{i} admitted an intruder"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // And the foreign node sees nobody but itself.
    assert_eq!(node_ids(&c, 3)?, ["node3"]);
    Ok(())
}

#[test]
fn garbage_on_the_gossip_port_and_bad_task_bodies_change_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::new(3)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    wait_for("2 alive", Duration::from_secs(20), || {
        Ok(c.statuses(1)?
            .iter()
            .filter(|s| s.1 == "alive")
            .count()
            .eq(&2)
            .then_some(()))
    })?;

    // 20k random datagrams, a third of them QUIC-shaped, from node 3's namespace.
    sh(&[
        "ip",
        "netns",
        "exec",
        &c.node(3).netns,
        rogue_bin(),
        "garbage-udp",
        &format!("{}:{GOSSIP_PORT}", c.node(1).ip),
        "20000",
    ])?;
    // Node 1 keeps gossiping: a new write on node 2 still reaches it.
    let body = r#"{"app":"/after-garbage","ip":"10.77.0.2","ports":[{"port":80}]}"#;
    assert_eq!(c.put_task(2, "after.1", body)?.0, 201);
    wait_for("after.1 on node1", Duration::from_secs(10), || {
        Ok(c.tasks(1)?.iter().any(|t| t.0 == "after.1").then_some(()))
    })?;
    assert!(c.statuses(1)?.iter().all(|s| s.1 == "alive"));

    // Malformed bodies: 400 with a message, nothing changes.
    let before = c.get(2, "/v1/state")?;
    for (id, body, needle) in [
        ("bad.1", "{not json", "invalid task body"),
        ("bad.2", r#"{"app":"/x","ip":"300.1.1.1"}"#, "invalid"),
        (
            "bad.3",
            r#"{"app":"/x","ip":"10.0.0.1","ports":[{"port":0}]}"#,
            "1..=65535",
        ),
        (
            "bad.4",
            r#"{"app":"/x","ip":"10.0.0.1","ports":[{"port":70000}]}"#,
            "invalid value",
        ),
        (
            "bad.5",
            r#"{"app":"/x","ip":"10.0.0.1","bogus":1}"#,
            "unknown field",
        ),
        ("bad%20id", r#"{"app":"/x","ip":"10.0.0.1"}"#, "task id"),
        ("bad.6", "", "invalid task body"),
    ] {
        let (code, text) = c.put_task(2, id, body)?;
        assert_eq!(code, 400, "{id}: {text}");
        let msg: serde_json::Value = serde_json::from_str(&text)?;
        let msg = msg["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{id}: {msg:?} should mention {needle:?}"
        );
    }
    let after = c.get(2, "/v1/state")?;
    assert_eq!(
        before["nodes"]["node2"], after["nodes"]["node2"],
        "a rejected write changed state"
    );
    Ok(())
}

#[test]
fn an_api_beyond_loopback_changes_state_only_with_the_token() -> anyhow::Result<()> {
    let mut c = Cluster::new(2)?;
    let token_file = c.dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n")?;
    let token_path = token_file.to_str().expect("utf8").to_string();
    // Without a token file the agent refuses to expose its API.
    let refused = std::process::Command::new(cluster_tests::skein_bin())
        .args(["agent", "--node-id", "node1", "--advertise", "10.77.0.1"])
        .args(["--api-listen", "10.77.0.1:62080", "--data-dir"])
        .arg(c.dir.path().join("refused"))
        .output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("without a token"), "{stderr}");

    c.start(
        1,
        &[],
        &[
            "--api-listen",
            "10.77.0.1:62080",
            "--api-token-file",
            &token_path,
        ],
    )?;
    let body = r#"{"app":"/a","ip":"10.77.0.1"}"#;
    let (code, text) = c.request(1, "PUT", "/v1/tasks/a.1", Some(body), &[])?;
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("Bearer"), "{text}");
    let (code, _) = c.request(
        1,
        "PUT",
        "/v1/tasks/a.1",
        Some(body),
        &["Authorization: Bearer wrong"],
    )?;
    assert_eq!(code, 401);
    let (code, _) = c.request(1, "DELETE", "/v1/tasks/a.1", None, &[])?;
    assert_eq!(code, 401);
    assert!(
        c.tasks(1)?.is_empty(),
        "an unauthorized write changed state"
    );
    let auth = "Authorization: Bearer s3cret-token-0123456789";
    let (code, text) = c.request(1, "PUT", "/v1/tasks/a.1", Some(body), &[auth])?;
    assert_eq!(code, 201, "{text}");
    // Reads stay open; the write is there.
    assert_eq!(c.tasks(1)?.len(), 1);
    let (code, _) = c.request(1, "DELETE", "/v1/tasks/a.1", None, &[auth])?;
    assert_eq!(code, 204);
    Ok(())
}

/// Issue 12, finding 1: on loopback too, a write needs a credential. An
/// agent started without `--api-token-file` creates its own token in its
/// data dir (mode 0600): a local process that cannot read it cannot
/// register a task (and so take a share of a VIP), delete one, or delete
/// agents; the local CLI, which can, works as before.
#[test]
fn loopback_writes_need_the_agents_own_token() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::new(1)?;
    c.start(1, &[], &[])?;
    let token_file = c.node(1).data_dir.join("api-token");
    let mode = std::fs::metadata(&token_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token is readable by its owner only");
    let body = r#"{"app":"/thief","ip":"10.77.0.1","ports":[{"port":80,"labels":{"VIP_0":"/httpi:3141"}}]}"#;
    for (method, path, body) in [
        ("PUT", "/v1/tasks/thief.1", Some(body)),
        ("DELETE", "/v1/tasks/thief.1", None),
        (
            "POST",
            "/overlay-master/agents/delete",
            Some(r#"{"agents":["10.77.0.9"]}"#),
        ),
    ] {
        let (code, text) = c.request(1, method, path, body, &[])?;
        assert_eq!(code, 401, "{method} {path} without a token: {text}");
        let (code, _) = c.request(1, method, path, body, &["Authorization: Bearer guess"])?;
        assert_eq!(code, 401, "{method} {path} with a wrong token");
    }
    assert!(
        c.tasks(1)?.is_empty(),
        "an unauthorized write changed state"
    );
    // With the agent's own token (what the CLI reads as root): accepted.
    assert_eq!(c.put_task(1, "mine.1", body)?.0, 201);
    assert_eq!(c.delete_task(1, "mine.1")?, 204);
    // The CLI finds the token in the data dir by itself.
    let cli = |data_dir: &std::path::Path| {
        sh(&[
            "ip",
            "netns",
            "exec",
            &c.node(1).netns,
            "env",
            &format!("SKEIN_DATA_DIR={}", data_dir.display()),
            cluster_tests::skein_bin().to_str().expect("utf8"),
            "task",
            "rm",
            "nothing.1",
        ])
    };
    let err = format!("{:#}", cli(c.dir.path()).unwrap_err());
    assert!(err.contains("401") && err.contains("api-token"), "{err}");
    let err = format!("{:#}", cli(&c.node(1).data_dir).unwrap_err());
    assert!(
        err.contains("404"),
        "with the token the CLI gets as far as `no such task`: {err}"
    );
    Ok(())
}

#[test]
fn revoked_node_is_cut_off_once_the_crl_is_copied() -> anyhow::Result<()> {
    let mut c = Cluster::new(3)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    for i in [1, 2] {
        c.wait_status(i, "node3", "alive")?;
    }
    let expiry = metric_i64(&c, 1, "skein_tls_cert_expiry_seconds{cert=\"node\"}")?;
    assert!(
        (expiry - 365 * 86_400).abs() < 86_400,
        "node1's certificate expires in {expiry} s, not about a year"
    );

    // What an operator does: revoke with the CLI, copy the CRL next to
    // node.pem on the other nodes. The agents notice within seconds.
    let ca = c.dir.path().join("ca");
    let out = run_skein(&[
        "cert",
        "revoke",
        "--ca-dir",
        ca.to_str().expect("utf8"),
        "node3",
    ])?;
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    for i in [1, 2] {
        std::fs::copy(ca.join("ca.crl.pem"), c.node(i).tls_dir.join("ca.crl.pem"))?;
    }
    for i in [1, 2] {
        wait_for(
            &format!("node{i} to reload its TLS dir"),
            Duration::from_secs(15),
            || Ok((metric(&c, i, "skein_tls_reloads_total{result=\"ok\"}")? == 1).then_some(())),
        )?;
    }
    // Its open connections were closed and its new ones are refused: the
    // others stop hearing it and declare it down.
    wait_for(
        "node1 to refuse node3 as revoked",
        Duration::from_secs(15),
        || {
            Ok((metric(
                &c,
                1,
                "skein_tls_handshakes_refused_total{reason=\"revoked\"}",
            )? > 0)
                .then_some(()))
        },
    )?;
    for i in [1, 2] {
        c.wait_status(i, "node3", "down")?;
    }
    // node1 and node2 still talk to each other.
    assert_eq!(
        c.statuses(1)?
            .iter()
            .find(|(n, _)| n == "node2")
            .map(|(_, s)| s.as_str()),
        Some("alive")
    );

    // A broken CRL is refused and counted; the revocation stays in force.
    std::fs::write(c.node(1).tls_dir.join("ca.crl.pem"), "not a CRL\n")?;
    wait_for(
        "node1 to count the bad reload",
        Duration::from_secs(15),
        || Ok((metric(&c, 1, "skein_tls_reloads_total{result=\"error\"}")? == 1).then_some(())),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.statuses(1)?
            .iter()
            .find(|(n, _)| n == "node3")
            .map(|(_, s)| s.as_str()),
        Some("down")
    );
    Ok(())
}

fn metric_i64(c: &Cluster, i: usize, name: &str) -> anyhow::Result<i64> {
    let out = cluster_tests::curl(
        &c.node(i).netns,
        &["-sf", &format!("{}/metrics", cluster_tests::API)],
    )?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("metric {name} missing"))
}
