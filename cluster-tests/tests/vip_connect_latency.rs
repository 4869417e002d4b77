//! p99 connect latency per VIP and per backend (issue 14), against the
//! real kernel: two agents in namespaces, a VIP with a backend on each
//! node. On node2 an nftables rule drops every other SYN to its backend,
//! so each connection there loses its first SYN and completes only when
//! the client sends it again, a second later, as on a lossy path; node1's
//! backend answers at once. Connections through the VIP from node1 are
//! timed by curl (`time_connect`) and by the agent from conntrack; the
//! agent's p99 must follow the slow backend, stay low for the fast one,
//! agree with what curl measured, and reach `/metrics` as a histogram.

use std::time::Duration;

use cluster_tests::{pipe_in, spawn_in, wait_for, Cluster};

const VIP: &str = "web.marathon.l4lb.thisdcos.directory:80";

#[test]
fn p99_connect_latency_follows_the_slow_backend() -> anyhow::Result<()> {
    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let mut c = Cluster::new(2)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    let (ip1, ip2) = (c.node(1).ip.clone(), c.node(2).ip.clone());
    let (ns1, ns2) = (c.node(1).netns.clone(), c.node(2).netns.clone());
    let (fast, slow) = (format!("{ip1}:9000"), format!("{ip2}:9001"));
    let _b1 = spawn_in(&ns1, httpi, &[&fast, "fast"])?;
    let _b2 = spawn_in(&ns2, httpi, &[&slow, "slow"])?;
    // Every other SYN to the slow backend is dropped: connections
    // arrive one after another, so each one's first SYN is the dropped one.
    pipe_in(
        &ns2,
        &["nft", "-f", "-"],
        "table inet slowsyn {
            chain input {
                type filter hook input priority 0;
                tcp dport 9001 tcp flags & (syn | ack) == syn numgen inc mod 2 == 0 drop
            }
        }",
    )?;
    for (node, id, ip, port) in [(1, "web.1", &ip1, 9000), (2, "web.2", &ip2, 9001)] {
        let body = format!(
            r#"{{"app":"/web","ip":"{ip}","ports":[{{"port":{port},"labels":{{"VIP_0":"/web:80"}}}}]}}"#
        );
        assert_eq!(c.put_task(node, id, &body)?.0, 201);
    }
    let address = wait_for(
        "the VIP with both backends on node1",
        Duration::from_secs(30),
        || {
            let vips = c.get(1, "/v1/vips")?;
            let v = vips
                .as_array()
                .and_then(|a| a.iter().find(|v| v["vip"] == VIP).cloned())
                .unwrap_or_default();
            let backends = v["backend"].as_array().map_or(0, |b| b.len());
            Ok((backends == 2)
                .then(|| v["address"].as_str().map(str::to_string))
                .flatten())
        },
    )?;
    // The dataplane is programmed shortly after the view: wait until the
    // VIP answers (these connections are counted too, and timed).
    wait_for("the VIP answering", Duration::from_secs(10), || {
        let r = cluster_tests::curl(&ns1, &["-s", &format!("http://{address}:80/")]);
        Ok(r.is_ok_and(|b| !b.is_empty()).then_some(()))
    })?;

    // (backend, curl's connect time) of each request.
    let mut timed: Vec<(String, f64)> = Vec::new();
    for _ in 0..24 {
        let out = cluster_tests::curl(
            &ns1,
            &[
                "-s",
                "-w",
                " %{time_connect}",
                &format!("http://{address}:80/"),
            ],
        )?;
        let out = String::from_utf8_lossy(&out);
        let (body, connect) = out
            .rsplit_once(' ')
            .ok_or_else(|| anyhow::anyhow!("curl printed {out:?}"))?;
        let who = if body.starts_with("slow") {
            "slow"
        } else if body.starts_with("fast") {
            "fast"
        } else {
            anyhow::bail!("unexpected answer {body:?}");
        };
        timed.push((who.to_string(), connect.trim().parse::<f64>()? * 1000.0));
    }
    let worst = |who: &str| {
        timed
            .iter()
            .filter(|(w, _)| w == who)
            .map(|(_, ms)| *ms)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let (Some(slow_curl), Some(fast_curl)) = (worst("slow"), worst("fast")) else {
        anyhow::bail!("both backends should have answered some of 24: {timed:?}");
    };
    assert!(
        slow_curl > 900.0,
        "curl: the slow backend's connections waited for a second SYN ({slow_curl} ms)"
    );

    let stats = wait_for(
        "p99 connect latency of both backends",
        Duration::from_secs(10),
        || {
            let v = c.vip_stats(1, VIP)?;
            let timed = |addr: &str| {
                v["backends"].as_array().is_some_and(|b| {
                    b.iter()
                        .any(|b| b["backend"] == addr && b["connect_p99_ms"].is_f64())
                })
            };
            Ok((timed(&slow) && timed(&fast)).then_some(v))
        },
    )?;
    let p99 = |addr: &str| -> f64 {
        stats["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["backend"] == addr))
            .and_then(|b| b["connect_p99_ms"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let (slow_p99, fast_p99) = (p99(&slow), p99(&fast));
    let vip_p99 = stats["connect_p99_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "curl's worst connect: slow {slow_curl:.1} ms, fast {fast_curl:.2} ms; \
         the agent's p99: slow {slow_p99} ms, fast {fast_p99} ms, VIP {vip_p99} ms"
    );
    // Buckets are 12.5 % wide; the agent reads its events a little after
    // the kernel sends them, curl a little after the handshake.
    assert!(
        slow_p99 >= slow_curl * 0.9 && slow_p99 <= slow_curl * 1.2 + 20.0,
        "slow backend: agent {slow_p99} ms, curl {slow_curl} ms\n{stats}"
    );
    assert!(
        fast_p99 < 100.0,
        "fast backend: agent {fast_p99} ms (curl {fast_curl} ms)\n{stats}"
    );
    assert!(
        vip_p99 >= slow_p99 * 0.9,
        "more than 1 % of the VIP's connections were slow: its p99 {vip_p99} ms\n{stats}"
    );

    // /metrics: the slow backend's connections all above 0.5 s and below
    // 2.5 s, the fast one's all below 0.1 s.
    let metrics = cluster_tests::curl(&ns1, &["-s", "http://127.0.0.1:62080/metrics"])?;
    let metrics = String::from_utf8_lossy(&metrics);
    let sample = |backend: &str, suffix: &str| -> Option<u64> {
        let head =
            format!("skein_vip_connect_seconds{suffix}{{vip=\"{VIP}\",backend=\"{backend}\"");
        metrics
            .lines()
            .find(|l| l.starts_with(&head))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
    };
    let bucket = |backend: &str, le: &str| -> Option<u64> {
        let head = format!(
            "skein_vip_connect_seconds_bucket{{vip=\"{VIP}\",backend=\"{backend}\",le=\"{le}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&head))
            .and_then(|n| n.parse().ok())
    };
    let slow_count = sample(&slow, "_count").unwrap_or(0);
    assert!(slow_count > 0, "no slow connections in\n{metrics}");
    assert_eq!(bucket(&slow, "0.5"), Some(0), "{metrics}");
    assert_eq!(bucket(&slow, "2.5"), Some(slow_count), "{metrics}");
    let fast_count = sample(&fast, "_count").unwrap_or(0);
    assert!(fast_count > 0, "{metrics}");
    assert_eq!(bucket(&fast, "0.1"), Some(fast_count), "{metrics}");
    Ok(())
}
