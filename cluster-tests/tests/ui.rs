//! The entry point's UI in a real browser (issue 14): headless Chromium
//! (Debian's `chromium`) loads each page from a running cluster, through
//! node1's entry point on its loopback, and the test asserts what a person
//! would see there: both nodes alive with their components, the VIP and its
//! backends, the overlay's agents and subnets, the DNS records, the edge's
//! frontends and servers, and connection counts: N requests through the
//! VIP with a dead backend among its backends, counted as the client saw
//! them. Each page is also saved as a screenshot
//! (`SKEIN_UI_SCREENSHOTS=<dir>`, else the cluster's temporary dir;
//! docs/ui/ holds the ones this test made).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cluster_tests::{spawn_in, spawn_in_logged, wait_for, Cluster};

const ENTRY: &str = "http://127.0.0.1:8080";
/// `/web:80` as dcos-net names it.
const VIP: &str = "web.marathon.l4lb.thisdcos.directory:80";

/// Page `hash` as the browser renders it (scripts run, data fetched),
/// from inside `ns`; with `shot`, a screenshot of it too.
fn render(ns: &str, profile: &Path, hash: &str, shot: Option<&Path>) -> anyhow::Result<String> {
    let url = format!("{ENTRY}/{hash}");
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        ns.into(),
        cluster_tests::chromium().into(),
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-dev-shm-usage".into(),
        format!("--user-data-dir={}", profile.display()),
        // Scripts and fetches get this much (virtual) time to settle.
        "--virtual-time-budget=6000".into(),
        "--window-size=1280,900".into(),
    ];
    match shot {
        Some(path) => args.push(format!("--screenshot={}", path.display())),
        None => args.push("--dump-dom".into()),
    }
    args.push(url);
    let out = Command::new("ip").args(&args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "chromium failed on {hash}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The text a person reads: the DOM without its tags.
fn visible_text(dom: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for ch in dom.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_ui_shows_the_cluster_in_a_real_browser() -> anyhow::Result<()> {
    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let mut c = Cluster::new(2)?;
    c.start(1, &[], &["--entry-listen", "0.0.0.0:8080"])?;
    c.start(2, &[1], &[])?;
    let (ip1, ip2) = (c.node(1).ip.clone(), c.node(2).ip.clone());
    let (ns1, ns2) = (c.node(1).netns.clone(), c.node(2).netns.clone());
    let _b1 = spawn_in(&ns1, httpi, &[&format!("{ip1}:9000"), "web-1"])?;
    let _b2 = spawn_in(&ns2, httpi, &[&format!("{ip2}:9000"), "web-2"])?;
    for (node, id, ip) in [(1, "web.1", &ip1), (2, "web.2", &ip2)] {
        let body = format!(
            r#"{{"app":"/web","ip":"{ip}","ports":[{{"port":9000,"labels":{{"VIP_0":"/web:80"}}}}],"labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"web.example.com"}}}}"#
        );
        assert_eq!(c.put_task(node, id, &body)?.0, 201);
    }
    // The edge on node1, its stats port where the entry point looks.
    let skein = cluster_tests::skein_bin();
    let edge_state = c.dir.path().join("edge");
    let command = format!(
        "exec {} edge --group external --http-port 80 --https-port 443 --stats-port 9090 \
         --state-dir {} 2>&1",
        skein.display(),
        edge_state.display()
    );
    let _edge = spawn_in_logged(
        &ns1,
        "sh",
        &["-c", &command],
        Some(&c.dir.path().join("edge.log")),
    )?;

    // Ready when the API says what the pages will show.
    wait_for(
        "the VIP with both backends and the overlay's two agents",
        Duration::from_secs(30),
        || {
            let vips = c.get(1, "/v1/vips")?;
            let backends = vips
                .as_array()
                .and_then(|a| a.iter().find(|v| v["vip"] == VIP))
                .and_then(|v| v["backend"].as_array().map(|b| b.len()))
                .unwrap_or(0);
            let overlay = c.get(1, "/overlay-master/state")?;
            let agents = overlay["agents"].as_array().map_or(0, |a| a.len());
            let health = c.get(1, "/v1/health")?;
            let reported = health["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["healthy"] == true));
            Ok((backends == 2 && agents == 2 && reported).then_some(()))
        },
    )?;

    let shots = std::env::var_os("SKEIN_UI_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| c.dir.path().join("screenshots"));
    std::fs::create_dir_all(&shots)?;
    let profile = c.dir.path().join("chromium");
    let page = |hash: &str, name: &str, want: &[&str]| -> anyhow::Result<String> {
        let text = wait_for(
            &format!("the {name} page showing {want:?}"),
            Duration::from_secs(40),
            || {
                let text = visible_text(&render(&ns1, &profile, hash, None)?);
                Ok(want.iter().all(|w| text.contains(w)).then_some(text))
            },
        )?;
        render(
            &ns1,
            &profile,
            hash,
            Some(&shots.join(format!("{name}.png"))),
        )?;
        Ok(text)
    };

    let nodes = page(
        "#/nodes",
        "nodes",
        &["node1", "node2", "alive", "gossip: ok"],
    )?;
    assert!(nodes.contains("the cluster is healthy"), "{nodes}");
    assert!(!nodes.contains("Could not load"), "{nodes}");

    let vips = page("#/vips", "service-addresses", &[VIP, "2 of 2 in use"])?;
    assert!(vips.contains("tcp"), "{vips}");
    let detail = page(
        "#/vips/web.marathon.l4lb.thisdcos.directory%3A80",
        "service-address-detail",
        &[
            &format!("{ip1}:9000"),
            &format!("{ip2}:9000"),
            "web.1",
            "web.2",
            "healthy",
        ],
    )?;
    assert!(
        detail.contains("node1") && detail.contains("node2"),
        "{detail}"
    );

    let nets = page(
        "#/networks",
        "networks",
        &["dcos", "9.0.0.0/8", "node1", "node2", "44.128."],
    )?;
    assert!(nets.contains("Agents on dcos"), "{nets}");
    assert!(
        !nets.contains("error") && !nets.contains("pending"),
        "{nets}"
    );

    page("#/dns", "dns", &["web.marathon.mesos", "A"])?;

    let edge = page("#/edge", "edge", &["Frontends", "web_", "UP"])?;
    assert!(
        edge.contains(&format!("{ip1}:9000")) || edge.contains(&format!("{ip2}:9000")),
        "{edge}"
    );

    // A backend's task removed: the VIP page follows on its next refresh.
    assert_eq!(c.delete_task(2, "web.2")?, 204);
    let after = page("#/vips", "service-addresses-after", &[VIP, "1 of 1 in use"])?;
    assert!(!after.contains("2 of 2"), "{after}");

    // Connection counts: a third backend joins, then its process is
    // killed (no health check: it stays in use); N requests through the
    // VIP from node1 are counted by node1's kernel: the successes the
    // client had and a failure for each refused one, in the API, in
    // /metrics and on the page.
    let dead = format!("{ip2}:9002");
    let web3 = spawn_in(&ns2, httpi, &[&dead, "web-3"])?;
    let body = format!(
        r#"{{"app":"/web","ip":"{ip2}","ports":[{{"port":9002,"labels":{{"VIP_0":"/web:80"}}}}]}}"#
    );
    assert_eq!(c.put_task(2, "web.3", &body)?.0, 201);
    wait_for("web-3 answering", Duration::from_secs(10), || {
        let r = cluster_tests::curl(&ns1, &["-s", &format!("http://{dead}/")]);
        Ok(r.is_ok_and(|b| b.starts_with(b"web-3")).then_some(()))
    })?;
    drop(web3);
    page(
        "#/vips",
        "service-addresses-dead-backend",
        &[VIP, "2 of 2 in use"],
    )?;
    let address = c
        .vip_address(1, VIP)?
        .ok_or_else(|| anyhow::anyhow!("no address for {VIP}"))?;
    const N: usize = 30;
    let (mut ok, mut failed) = (0u64, 0u64);
    for _ in 0..N {
        let got = cluster_tests::curl(
            &ns1,
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{address}:80/"),
            ],
        );
        match got {
            Ok(code) if code == b"200" => ok += 1,
            _ => failed += 1,
        }
    }
    assert!(
        ok > 0 && failed > 0,
        "{ok} answered, {failed} failed: both backends should get some"
    );
    let stats = wait_for(
        "the counts of all N requests",
        Duration::from_secs(10),
        || {
            let v = c.vip_stats(1, VIP)?;
            let m = &v["last_minute"];
            Ok((m["successes"] == ok && m["failures"] == failed).then_some(v))
        },
    )?;
    let backend = |addr: &str| {
        stats["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["backend"] == addr).cloned())
            .unwrap_or_default()
    };
    assert_eq!(backend(&dead)["total"]["failures"], failed, "{stats}");
    assert_eq!(backend(&dead)["total"]["successes"], 0, "{stats}");
    assert_eq!(
        backend(&format!("{ip1}:9000"))["total"]["successes"],
        ok,
        "{stats}"
    );
    let metrics = cluster_tests::curl(&ns1, &["-s", "http://127.0.0.1:62080/metrics"])?;
    let metrics = String::from_utf8_lossy(&metrics);
    let line = format!(
        "skein_vip_connections_total{{vip=\"{VIP}\",backend=\"{dead}\",outcome=\"failure\"}} {failed}"
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    let (oks, fails) = (ok.to_string(), failed.to_string());
    let shown = page(
        "#/vips",
        "service-addresses-counts",
        &[VIP, "Failure %", "p99 connect", &oks, &fails],
    )?;
    assert!(shown.contains("for the past minute"), "{shown}");
    // The successes were timed: the VIP's p99 connect shows in ms.
    assert!(shown.contains(" ms"), "no p99 connect time: {shown}");
    page(
        "#/vips/web.marathon.l4lb.thisdcos.directory%3A80",
        "service-address-counts-detail",
        &[
            &dead,
            "Failures (1 min)",
            "The last hour, per minute",
            &format!("{failed} failures in the last hour"),
        ],
    )?;
    Ok(())
}
