//! Overlay leases across real agents: every node agrees on each agent's
//! subnet and VTEP, they are distinct, and a restarted agent keeps its own
//! (also when its replica cache is damaged); every claim ends settled.

use std::collections::BTreeSet;
use std::time::Duration;

use cluster_tests::{sh, wait_for, Cluster};
use serde_json::Value;

/// node id → (subnet, vtep ip, vtep mac) as node `i` reports them.
fn leases(c: &Cluster, i: usize) -> anyhow::Result<Vec<(String, String, String, String)>> {
    let state = c.get(i, "/overlay-master/state")?;
    let mut out: Vec<(String, String, String, String)> = state["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let o = a["overlays"].as_array()?.first()?;
            let vx = &o["backend"]["vxlan"];
            Some((
                a["node_id"].as_str()?.to_string(),
                o["subnet"].as_str()?.to_string(),
                vx["vtep_ip"].as_str()?.to_string(),
                vx["vtep_mac"].as_str()?.to_string(),
            ))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// node2's generation as node1 sees it.
fn node2_generation(c: &Cluster) -> anyhow::Result<u64> {
    let nodes = c.get(1, "/v1/nodes")?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node_id"] == "node2")
        .and_then(|n| n["generation"].as_u64())
        .unwrap_or(0))
}

#[test]
fn every_node_agrees_on_leases_and_a_restart_keeps_them() -> anyhow::Result<()> {
    let mut c = Cluster::new(3)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    let agreed = wait_for(
        "3 leases, the same on every node",
        Duration::from_secs(20),
        || {
            let views: Vec<_> = (1..=3)
                .map(|i| leases(&c, i))
                .collect::<anyhow::Result<_>>()?;
            Ok(
                (views[0].len() == 3 && views.iter().all(|v| *v == views[0]))
                    .then(|| views[0].clone()),
            )
        },
    )?;
    println!("leases: {agreed:?}");
    let subnets: BTreeSet<&String> = agreed.iter().map(|l| &l.1).collect();
    let vteps: BTreeSet<&String> = agreed.iter().map(|l| &l.2).collect();
    assert_eq!(
        (subnets.len(), vteps.len()),
        (3, 3),
        "leases must be distinct: {agreed:?}"
    );
    for (_, subnet, vtep, mac) in &agreed {
        assert!(
            subnet.starts_with("9.") && subnet.ends_with("/24"),
            "{subnet}"
        );
        assert!(
            vtep.starts_with("44.128.") && vtep.ends_with("/20"),
            "{vtep}"
        );
        assert!(mac.starts_with("70:B3:D5:"), "{mac}");
    }
    let network: Value = c.get(2, "/overlay-master/state")?["network"].clone();
    assert_eq!(network["vtep_subnet"], "44.128.0.0/20");
    assert_eq!(network["overlays"][0]["name"], "dcos");
    let mine = c.get(3, "/overlay-agent/overlay")?;
    assert_eq!(mine["node_id"], "node3");

    // Node 2 restarts with its data dir: same subnet, same VTEP, published
    // by its new generation (not a leftover of the old one).
    let before = node2_generation(&c)?;
    c.kill(2)?;
    c.start(2, &[1], &[])?;
    wait_for(
        "node1 to see node2's new generation",
        Duration::from_secs(20),
        || Ok((node2_generation(&c)? > before).then_some(())),
    )?;
    let state = c.get(1, "/v1/state")?;
    assert!(
        state["nodes"]["node2"]["keys"]["lease:vtep"]["value"].is_object(),
        "the new generation publishes its lease: {}",
        state["nodes"]["node2"]
    );
    wait_for(
        "node2 back with its leases",
        Duration::from_secs(20),
        || Ok((leases(&c, 1)? == agreed && leases(&c, 2)? == agreed).then_some(())),
    )?;
    // Every claim is marked settled once it has won for a while in a synced
    // view: a node claiming before its first sync (a wiped data dir, a
    // lagging clock) then loses to it whatever the clocks say.
    wait_for("every lease claim settled", Duration::from_secs(20), || {
        let state = c.get(1, "/v1/state")?;
        let settled = ["node1", "node2", "node3"].iter().all(|n| {
            ["lease:vtep", "lease:overlay/dcos"]
                .iter()
                .all(|k| state["nodes"][n]["keys"][k]["value"]["settled"] == true)
        });
        Ok(settled.then_some(()))
    })?;
    // Node 2 restarts with its replica cache damaged: the cache is moved
    // aside (kept for a post-mortem), the agent starts, rejoins and keeps
    // its leases.
    c.kill(2)?;
    let cache = c.node(2).data_dir.join("replica.postcard");
    assert!(cache.exists(), "node2 persisted its replica");
    std::fs::write(&cache, b"\x07 not a replica")?;
    c.start(2, &[1], &[])?;
    wait_for(
        "node2 back after a corrupt replica cache",
        Duration::from_secs(20),
        || Ok((leases(&c, 1)? == agreed && leases(&c, 2)? == agreed).then_some(())),
    )?;
    c.wait_status(1, "node2", "alive")?;
    let aside = std::fs::read(c.node(2).data_dir.join("replica.postcard.corrupt"))?;
    assert_eq!(aside, b"\x07 not a replica");
    // Node 3 leaves for good: deleting it frees its leases on every node.
    let delete = r#"{"agents":["10.77.0.3"]}"#;
    let (code, text) = c.write(1, "POST", "/overlay-master/agents/delete", Some(delete))?;
    assert_eq!(code, 400, "an alive agent cannot be deleted: {text}");
    c.kill(3)?;
    c.wait_status(1, "node3", "down")?;
    let (code, text) = c.write(1, "POST", "/overlay-master/agents/delete", Some(delete))?;
    assert_eq!(code, 200, "{text}");
    let bad = r#"{"agents":["nope"]}"#;
    let (code, _) = c.write(1, "POST", "/overlay-master/agents/delete", Some(bad))?;
    assert_eq!(code, 400, "malformed body");
    wait_for(
        "node3 gone from node2's overlay state and members",
        Duration::from_secs(20),
        || {
            let nodes: Vec<String> = leases(&c, 2)?.into_iter().map(|l| l.0).collect();
            let members: Vec<String> = c.statuses(2)?.into_iter().map(|s| s.0).collect();
            Ok((nodes == ["node1", "node2"] && members == ["node1", "node2"]).then_some(()))
        },
    )?;
    Ok(())
}

/// agent node id → (status, error) in node `i`'s `/overlay-master/state`,
/// from the agent-level state or its first overlay's.
fn statuses(c: &Cluster, i: usize) -> anyhow::Result<Vec<(String, String, String)>> {
    let state = c.get(i, "/overlay-master/state")?;
    Ok(state["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let st = if a["state"].is_object() {
                &a["state"]
            } else {
                &a["overlays"][0]["state"]
            };
            (
                a["node_id"].as_str().unwrap_or_default().to_string(),
                st["status"].as_str().unwrap_or_default().to_string(),
                st["error"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

#[test]
fn an_exhausted_overlay_and_a_differently_configured_node_are_reported() -> anyhow::Result<()> {
    let mut c = Cluster::new(4)?;
    // Room for two agent subnets only.
    let tiny = c.dir.path().join("tiny.json");
    std::fs::write(
        &tiny,
        r#"{"vtep_subnet":"44.128.0.0/20","vtep_mac_oui":"70:B3:D5:00:00:00",
            "overlays":[{"name":"dcos","subnet":"9.0.0.0/23","prefix":24}]}"#,
    )?;
    let tiny = tiny.to_string_lossy().to_string();
    let bad = c.dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"vtep_subnet":"44.128.0.0/20","overlays":[]}"#)?;
    // A configuration that cannot be read stops the agent with a clear error.
    let out = std::process::Command::new(cluster_tests::skein_bin())
        .args(["agent", "--advertise", "10.77.0.9", "--node-id", "x"])
        .args(["--overlay-config", &bad.to_string_lossy()])
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("vtep_mac_oui"),
        "{said}"
    );

    let args = ["--overlay-config", tiny.as_str(), "--overlay-resync-s", "1"];
    c.start(1, &[], &args)?;
    c.start(2, &[1], &args)?;
    c.start(3, &[1], &args)?;
    // Node 4 runs DC/OS's default overlay: not the cluster's.
    c.start(4, &[1], &["--overlay-resync-s", "1"])?;
    let seen = wait_for(
        "two agents OK, one out of subnets, node4 mismatched (node1's view)",
        Duration::from_secs(30),
        || {
            let s = statuses(&c, 1)?;
            let ok = s.iter().filter(|x| x.1 == "STATUS_OK").count();
            let exhausted = s
                .iter()
                .filter(|x| x.1 == "STATUS_ERROR" && x.2.contains("leases of the pool are taken"))
                .count();
            let mismatch = s
                .iter()
                .any(|x| x.0 == "node4" && x.1 == "STATUS_CONFIG_MISMATCH");
            Ok((ok == 2 && exhausted == 1 && mismatch).then_some(s))
        },
    )?;
    println!("node1's view: {seen:?}");
    // Node 4 sees the three others as differently configured.
    wait_for("node4 reports the others", Duration::from_secs(20), || {
        let s = statuses(&c, 4)?;
        let others = s
            .iter()
            .filter(|x| x.0 != "node4" && x.1 == "STATUS_CONFIG_MISMATCH")
            .count();
        Ok((others == 3).then_some(()))
    })?;
    // Node 4's claims corrupt nothing: node1 routes only to the other
    // leased node of its own configuration.
    let leased_by_others = seen
        .iter()
        .filter(|x| x.0 != "node1" && x.1 == "STATUS_OK")
        .count();
    let expected_routes = if seen.iter().any(|x| x.0 == "node1" && x.1 == "STATUS_OK") {
        leased_by_others
    } else {
        // node1 is the one without a subnet: it still routes to both.
        2
    };
    // The realizer programs a lease once it has held for its settle time:
    // wait for the kernel to catch up with the statuses, then check exactly.
    let routes = || -> anyhow::Result<String> {
        let out = sh(&["ip", "-n", &c.node(1).netns, "route", "show", "proto", "83"])?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    let _ = wait_for("node1's routes", Duration::from_secs(10), || {
        Ok((routes()?.lines().count() == expected_routes).then_some(()))
    });
    let routes = routes()?;
    assert_eq!(routes.lines().count(), expected_routes, "{routes}");
    assert!(routes.lines().all(|l| l.starts_with("9.0.")), "{routes}");
    Ok(())
}
