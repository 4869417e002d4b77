//! The overlay in real kernels: 3 agents in network namespaces program
//! `vtep1024`, bridges, neighbours, FDB and routes; "containers" (namespaces
//! attached with `skein-cni`, invoked as a container runtime would) on
//! different nodes talk to each other over VXLAN; an agent restart does not
//! disturb them; a hand-deleted route comes back; a deleted agent's entries
//! leave every other node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster_tests::{curl, sh, spawn_in, wait_for, Cluster, ScratchNetns};
use serde_json::Value;

/// node id → (subnet, vtep ip without prefix, vtep mac, status).
fn overlay_view(c: &Cluster, i: usize) -> anyhow::Result<BTreeMap<String, [String; 4]>> {
    let state = c.get(i, "/overlay-master/state")?;
    let mut out = BTreeMap::new();
    for a in state["agents"].as_array().into_iter().flatten() {
        let (Some(node), Some(o)) = (
            a["node_id"].as_str(),
            a["overlays"].as_array().and_then(|o| o.first()),
        ) else {
            continue;
        };
        let vx = &o["backend"]["vxlan"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let vtep = s(&vx["vtep_ip"]);
        out.insert(
            node.to_string(),
            [
                s(&o["subnet"]),
                vtep.split('/').next().unwrap_or_default().to_string(),
                s(&vx["vtep_mac"]).to_lowercase(),
                s(&o["state"]["status"]),
            ],
        );
    }
    Ok(out)
}

fn json_of(args: &[&str]) -> anyhow::Result<Value> {
    let out = sh(args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(vec![]));
    }
    Ok(serde_json::from_str(&text)?)
}

/// What node `i`'s kernel holds of ours: routes (dst, via, onlink),
/// neighbours (ip, mac, permanent) and FDB entries (mac, dst) on vtep1024.
#[derive(Debug, PartialEq, Eq)]
struct Kernel {
    routes: BTreeSet<(String, String)>,
    neighbours: BTreeSet<(String, String)>,
    fdb: BTreeSet<(String, String)>,
}

fn kernel(c: &Cluster, i: usize) -> anyhow::Result<Kernel> {
    let ns = &c.node(i).netns;
    let routes = json_of(&["ip", "-n", ns, "-j", "route", "show", "proto", "83"])?;
    let neigh = json_of(&["ip", "-n", ns, "-j", "neigh", "show", "dev", "vtep1024"])?;
    let fdb = json_of(&[
        "ip", "netns", "exec", ns, "bridge", "-j", "fdb", "show", "dev", "vtep1024",
    ])?;
    let mut k = Kernel {
        routes: BTreeSet::new(),
        neighbours: BTreeSet::new(),
        fdb: BTreeSet::new(),
    };
    for r in routes.as_array().into_iter().flatten() {
        let onlink = r["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "onlink"));
        assert!(onlink, "our routes are onlink: {r}");
        assert_eq!(r["dev"], "vtep1024", "{r}");
        k.routes.insert((
            r["dst"].as_str().unwrap_or_default().to_string(),
            r["gateway"].as_str().unwrap_or_default().to_string(),
        ));
    }
    for n in neigh.as_array().into_iter().flatten() {
        let permanent = n["state"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"));
        if permanent {
            k.neighbours.insert((
                n["dst"].as_str().unwrap_or_default().to_string(),
                n["lladdr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    for f in fdb.as_array().into_iter().flatten() {
        let mac = f["mac"].as_str().unwrap_or_default();
        if mac == "00:00:00:00:00:00" || f["dst"].is_null() {
            continue;
        }
        k.fdb.insert((
            mac.to_string(),
            f["dst"].as_str().unwrap_or_default().to_string(),
        ));
    }
    Ok(k)
}

/// What node `i`'s kernel should hold, from the agreed view.
fn expected(c: &Cluster, i: usize, view: &BTreeMap<String, [String; 4]>) -> Kernel {
    let mut k = Kernel {
        routes: BTreeSet::new(),
        neighbours: BTreeSet::new(),
        fdb: BTreeSet::new(),
    };
    for (node, [subnet, vtep, mac, _]) in view {
        if *node == c.node(i).name {
            continue;
        }
        let index: usize = node.trim_start_matches("node").parse().unwrap_or(0);
        k.routes.insert((subnet.clone(), vtep.clone()));
        k.neighbours.insert((vtep.clone(), mac.clone()));
        k.fdb.insert((mac.clone(), c.node(index).ip.clone()));
    }
    k
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    // /24 agent subnets: the first three octets match.
    let prefix = subnet.rsplit_once('.').map(|p| p.0).unwrap_or_default();
    ip.starts_with(&format!("{prefix}."))
}

/// One HTTP exchange from `from` to `ip:port`, with a deadline.
fn fetch(from: &ScratchNetns, ip: &str, port: u16) -> anyhow::Result<String> {
    let body = curl(
        &from.0,
        &["-sf", "--max-time", "2", &format!("http://{ip}:{port}/")],
    )?;
    Ok(String::from_utf8_lossy(&body).trim().to_string())
}

#[test]
fn containers_on_different_nodes_talk_over_vxlan() -> anyhow::Result<()> {
    let mut c = Cluster::new(3)?;
    let fast = ["--overlay-resync-s", "1"];
    c.start(1, &[], &fast)?;
    c.start(2, &[1], &fast)?;
    c.start(3, &[1], &fast)?;

    // Every node realizes its overlay and reports STATUS_OK; all agree.
    let started = Instant::now();
    let view = wait_for(
        "3 agents STATUS_OK, the same on every node",
        Duration::from_secs(30),
        || {
            let views: Vec<_> = (1..=3)
                .map(|i| overlay_view(&c, i))
                .collect::<anyhow::Result<_>>()?;
            let ok = views[0].len() == 3
                && views[0].values().all(|v| v[3] == "STATUS_OK")
                && views.iter().all(|v| *v == views[0]);
            Ok(ok.then(|| views[0].clone()))
        },
    )?;
    println!(
        "overlay realized on 3 nodes after {:?}: {view:?}",
        started.elapsed()
    );

    // Each kernel holds exactly the expected entries, and the device.
    for i in 1..=3 {
        let want = expected(&c, i, &view);
        wait_for(
            &format!("node{i}'s kernel entries"),
            Duration::from_secs(10),
            || Ok((kernel(&c, i)? == want).then_some(())),
        )?;
        let ns = &c.node(i).netns;
        let link = String::from_utf8_lossy(
            &sh(&["ip", "-n", ns, "-d", "link", "show", "vtep1024"])?.stdout,
        )
        .to_string();
        for needle in [
            "vxlan id 1024",
            &format!("local {}", c.node(i).ip),
            "dstport 64000",
            "nolearning",
            "mtu 1450",
        ] {
            assert!(link.contains(needle), "node{i}: {needle:?} in {link}");
        }
        let mine = &view[&c.node(i).name];
        assert!(
            link.contains(&mine[2]),
            "node{i}'s VTEP MAC {}: {link}",
            mine[2]
        );
        let addrs =
            String::from_utf8_lossy(&sh(&["ip", "-n", ns, "-4", "addr"])?.stdout).to_string();
        assert!(addrs.contains(&format!("{}/20", mine[1])), "{addrs}");
        let base = mine[0].trim_end_matches("0/24");
        assert!(
            addrs.contains(&format!("{base}1/25")),
            "m-dcos gateway: {addrs}"
        );
        assert!(
            addrs.contains(&format!("{base}129/25")),
            "d-dcos gateway: {addrs}"
        );
    }
    println!("kernel entries on node1: {:?}", kernel(&c, 1)?);

    // Containers on node 1, 2 and 3, attached with the CNI plugin.
    let c1 = ScratchNetns::new("c1")?;
    let c2 = ScratchNetns::new("c2")?;
    let c3 = ScratchNetns::new("c3")?;
    let ip1 = c.attach(1, "container-1", &c1)?;
    let ip2 = c.attach(2, "container-2", &c2)?;
    let ip3 = c.attach(3, "container-3", &c3)?;
    println!("containers: node1 {ip1}, node2 {ip2}, node3 {ip3}");
    for (ip, node) in [(&ip1, "node1"), (&ip2, "node2"), (&ip3, "node3")] {
        assert!(
            in_subnet(ip, &view[node][0]),
            "{ip} in {node}'s {}",
            view[node][0]
        );
    }
    // TCP across nodes, both ways, and ping.
    let _s3 = spawn_in(
        &c3.0,
        env!("CARGO_BIN_EXE_skein-httpi"),
        &[&format!("{ip3}:8080"), "on-node3"],
    )?;
    let _s2 = spawn_in(
        &c2.0,
        env!("CARGO_BIN_EXE_skein-httpi"),
        &[&format!("{ip2}:8080"), "on-node2"],
    )?;
    let _s1 = spawn_in(
        &c1.0,
        env!("CARGO_BIN_EXE_skein-httpi"),
        &[&format!("{ip1}:8080"), "on-node1"],
    )?;
    let answer = wait_for(
        "container 1 → container 3 over TCP",
        Duration::from_secs(10),
        || Ok(fetch(&c1, &ip3, 8080).ok()),
    )?;
    assert_eq!(answer, "on-node3");
    assert_eq!(fetch(&c3, &ip1, 8080)?, "on-node1");
    let ping = sh(&[
        "ip", "netns", "exec", &c1.0, "ping", "-c", "2", "-W", "2", &ip3,
    ]);
    assert!(ping.is_ok(), "ping container 1 → container 3: {ping:?}");

    // Node 2's agent restarts: same subnet and VTEP, and container 1 keeps
    // talking to container 2 (on node 2) during and after.
    let before = view["node2"].clone();
    let mut sent = 0;
    let mut failed = 0;
    c.kill(2)?;
    let restart_at = Instant::now();
    for _ in 0..10 {
        sent += 1;
        if fetch(&c1, &ip2, 8080).ok().as_deref() != Some("on-node2") {
            failed += 1;
        }
    }
    c.start(2, &[1], &fast)?;
    wait_for(
        "node2 STATUS_OK again with its leases",
        Duration::from_secs(30),
        || {
            let v = overlay_view(&c, 1)?;
            Ok((v.get("node2") == Some(&before)).then_some(()))
        },
    )?;
    for _ in 0..10 {
        sent += 1;
        if fetch(&c1, &ip2, 8080).ok().as_deref() != Some("on-node2") {
            failed += 1;
        }
    }
    println!(
        "node2 restart: {sent} requests container1 → container2, {failed} failed, back in {:?}",
        restart_at.elapsed()
    );
    assert_eq!(failed, 0);
    // Node 2's own view and kernel: the same leases, realized again (its
    // realizer publishes STATUS_OK once it has re-read and matched the
    // kernel, which can come a moment after node 1 saw the leases).
    wait_for(
        "node2's own view and kernel as before the restart",
        Duration::from_secs(30),
        || {
            let same = overlay_view(&c, 2)?.get("node2") == Some(&before)
                && kernel(&c, 2)? == expected(&c, 2, &view);
            Ok(same.then_some(()))
        },
    )?;

    // A route deleted by hand comes back at the next resync.
    let node3_subnet = &view["node3"][0];
    sh(&["ip", "-n", &c.node(1).netns, "route", "del", node3_subnet])?;
    let repaired = Instant::now();
    wait_for(
        "the deleted route restored",
        Duration::from_secs(10),
        || Ok((kernel(&c, 1)? == expected(&c, 1, &view)).then_some(())),
    )?;
    println!("hand-deleted route restored after {:?}", repaired.elapsed());
    assert_eq!(fetch(&c1, &ip3, 8080)?, "on-node3");
    // The device taken down by hand (the kernel drops its routes with it)
    // is brought back up and its routes restored.
    sh(&[
        "ip",
        "-n",
        &c.node(1).netns,
        "link",
        "set",
        "vtep1024",
        "down",
    ])?;
    wait_for(
        "vtep1024 up again with its routes",
        Duration::from_secs(10),
        || {
            let link = sh(&["ip", "-n", &c.node(1).netns, "link", "show", "vtep1024"])?;
            let up = String::from_utf8_lossy(&link.stdout).contains(",UP");
            Ok((up && kernel(&c, 1)? == expected(&c, 1, &view)).then_some(()))
        },
    )?;
    assert_eq!(fetch(&c1, &ip3, 8080)?, "on-node3");
    let metrics = String::from_utf8_lossy(&curl(
        &c.node(1).netns,
        &["-sf", &format!("{}/metrics", c.node(1).api)],
    )?)
    .to_string();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("skein_overlay_drift_repaired_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("skein_overlay_peers_programmed 2"),
        "{metrics}"
    );

    // Bad CNI calls fail clearly and leave the others alone.
    let (ok, err) = c.cni(1, "CHECK", "no-such-container", &c1.0)?;
    assert!(
        !ok && err["msg"].is_string(),
        "CHECK of an unknown container: {err}"
    );
    let (ok, _) = c.cni(1, "DEL", "never-added", &c1.0)?;
    assert!(
        ok,
        "DEL of something never added succeeds (CNI spec: idempotent)"
    );
    assert_eq!(
        fetch(&c3, &ip1, 8080)?,
        "on-node1",
        "container 1 unaffected"
    );

    // Node 3 stops for good and is deleted: its entries leave the others.
    c.kill(3)?;
    drop(_s3);
    c.wait_status(1, "node3", "down")?;
    let (code, text) = c.write(
        1,
        "POST",
        "/overlay-master/agents/delete",
        Some(r#"{"agents":["10.77.0.3"]}"#),
    )?;
    assert_eq!(code, 200, "{text}");
    let mut without3 = view.clone();
    without3.remove("node3");
    for i in 1..=2 {
        wait_for(
            &format!("node3's entries gone from node{i}"),
            Duration::from_secs(20),
            || Ok((kernel(&c, i)? == expected(&c, i, &without3)).then_some(())),
        )?;
    }
    assert_eq!(fetch(&c1, &ip2, 8080)?, "on-node2", "1 ↔ 2 still talk");
    // Detach: the address is free again.
    let (ok, out) = c.cni(1, "DEL", "container-1", &c1.0)?;
    assert!(ok, "{out}");
    assert_eq!(
        c.attach(1, "container-1b", &c1)?,
        ip1,
        "a freed address is reused"
    );
    Ok(())
}
