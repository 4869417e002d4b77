//! Bad input on the DNS ports: malformed messages, floods of garbage and
//! idle TCP connections. The server answers others all along.

use std::time::Duration;

use cluster_tests::{sh, Cluster};

fn ready(c: &Cluster, tcp: bool) -> anyhow::Result<bool> {
    let netns = &c.node(1).netns;
    let mut cmd = vec![
        "ip",
        "netns",
        "exec",
        netns.as_str(),
        "dig",
        "@127.0.0.1",
        "ready.spartan",
        "+short",
        "+time=2",
        "+tries=1",
    ];
    if tcp {
        cmd.push("+tcp");
    }
    Ok(sh(&cmd).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "127.0.0.1"))
}

#[test]
fn malformed_queries_floods_and_idle_tcp_do_not_stop_the_server() -> anyhow::Result<()> {
    let rogue = env!("CARGO_BIN_EXE_skein-rogue");
    let mut c = Cluster::new(1)?;
    c.start(1, &[], &["--dns-upstream", ""])?;
    let netns = c.node(1).netns.clone();
    assert!(ready(&c, false)?);

    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &netns,
        rogue,
        "dns-weird",
        "127.0.0.1:53",
    ])?;
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{said}");
    let outcome = |case: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(&format!("{case}: ")))
            .unwrap_or("missing")
            .to_string()
    };
    // Too short for a header: silence. Undecodable: FORMERR (1).
    assert_eq!(outcome("empty"), "-");
    assert_eq!(outcome("half-header"), "-");
    for case in [
        "header-only-claims-100-questions",
        "name-over-255-bytes",
        "label-of-64",
        "compression-loop",
    ] {
        assert_eq!(outcome(case), "rcode=1", "{case}");
    }
    assert_eq!(
        outcome("fifty-questions"),
        "rcode=1",
        "one question per query"
    );

    // 20,000 random datagrams, and 200 TCP connections that say nothing.
    let _idle = cluster_tests::spawn_in(&netns, rogue, &["tcp-idle", "127.0.0.1:53", "200", "8"])?;
    sh(&[
        "ip",
        "netns",
        "exec",
        &netns,
        rogue,
        "garbage-udp",
        "127.0.0.1:53",
        "20000",
    ])?;
    for _ in 0..5 {
        assert!(ready(&c, false)?, "UDP answers stopped");
        assert!(ready(&c, true)?, "TCP answers stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
