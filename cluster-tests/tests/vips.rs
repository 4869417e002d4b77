//! The VIP model across real agents: VIPs come from task labels on any node,
//! backends on down nodes stop being used, and bad labels are reported.

use std::time::Duration;

use cluster_tests::{wait_for, Cluster};
use serde_json::Value;

fn task(ip: &str, port: u16, vip: &str) -> String {
    format!(
        r#"{{"app":"/httpi","ip":"{ip}","ports":[{{"name":"http","port":{port},"protocol":"tcp","labels":{{"VIP_0":"{vip}"}}}}]}}"#
    )
}

/// node1's view: backend task id → in_use, for the httpi VIP.
fn httpi_backends(c: &Cluster) -> anyhow::Result<Vec<(String, bool, String)>> {
    let vips = c.get(1, "/v1/vips")?;
    let Some(v) = vips
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["vip"] == "httpi.marathon.l4lb.thisdcos.directory:3141")
    else {
        return Ok(vec![]);
    };
    assert_eq!(v["protocol"], "tcp");
    let mut out: Vec<(String, bool, String)> = v["backend"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["task_id"].as_str().unwrap_or_default().to_string(),
                b["in_use"] == Value::Bool(true),
                format!("{}:{}", b["ip"].as_str().unwrap_or_default(), b["port"]),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn vips_follow_tasks_and_liveness() -> anyhow::Result<()> {
    let mut c = Cluster::new(3)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    assert_eq!(
        c.put_task(2, "httpi.a", &task("10.77.0.2", 9896, "/httpi:3141"))?
            .0,
        201
    );
    assert_eq!(
        c.put_task(2, "httpi.b", &task("10.77.0.2", 9897, "/httpi:3141"))?
            .0,
        201
    );
    assert_eq!(
        c.put_task(3, "httpi.c", &task("10.77.0.3", 9896, "httpi:3141"))?
            .0,
        201
    );
    // A bad label is accepted with the task but reported, and harms no VIP.
    assert_eq!(
        c.put_task(3, "broken.1", &task("10.77.0.3", 80, "/broken:99999"))?
            .0,
        201
    );

    let want = |a: bool, b: bool, c3: bool| {
        vec![
            ("httpi.a".to_string(), a, "10.77.0.2:9896".to_string()),
            ("httpi.b".to_string(), b, "10.77.0.2:9897".to_string()),
            ("httpi.c".to_string(), c3, "10.77.0.3:9896".to_string()),
        ]
    };
    wait_for(
        "3 backends in use on node1",
        Duration::from_secs(20),
        || Ok((httpi_backends(&c)? == want(true, true, true)).then_some(())),
    )?;
    // Every node agrees on one settled address in 11.0.0.0/8 for httpi.
    let address_on = |i: usize, vip: &str| c.vip_address(i, vip);
    let httpi = "httpi.marathon.l4lb.thisdcos.directory:3141";
    let addr = wait_for(
        "httpi's address settled everywhere",
        Duration::from_secs(20),
        || {
            let a: Vec<Option<String>> = (1..=3)
                .map(|i| address_on(i, httpi))
                .collect::<anyhow::Result<_>>()?;
            Ok(match &a[0] {
                Some(x) if a.iter().all(|y| y.as_ref() == Some(x)) => Some(x.clone()),
                _ => None,
            })
        },
    )?;
    assert!(addr.starts_with("11."), "{addr}");
    println!("httpi settled on {addr} on all 3 nodes");
    // The Mesos-DNS-shaped API answers from every node's own replica.
    let hosts = c.get(3, "/v1/hosts/httpi.marathon.mesos")?;
    let mut ips: Vec<&str> = hosts
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["ip"].as_str())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips, ["10.77.0.2", "10.77.0.3"], "{hosts}");
    let services = c.get(1, "/v1/services/_httpi._tcp.marathon.mesos")?;
    let mut ports: Vec<String> = services
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}:{}",
                s["ip"].as_str().unwrap_or(""),
                s["port"].as_str().unwrap_or("")
            )
        })
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [
            "10.77.0.2:9896",
            "10.77.0.2:9897",
            "10.77.0.3:80",
            "10.77.0.3:9896"
        ],
        "{services}"
    );
    let vip_host = c.get(2, "/v1/hosts/httpi.marathon.l4lb.thisdcos.directory")?;
    assert_eq!(
        vip_host[0]["ip"].as_str(),
        Some(addr.as_str()),
        "{vip_host}"
    );
    // Another port of the same name shares the address; another name gets its own.
    assert_eq!(
        c.put_task(1, "httpi.d", &task("10.77.0.1", 8443, "/httpi:443"))?
            .0,
        201
    );
    assert_eq!(
        c.put_task(1, "other.1", &task("10.77.0.1", 8080, "/other:80"))?
            .0,
        201
    );
    let other = wait_for("other's address", Duration::from_secs(20), || {
        let same_port = address_on(3, "httpi.marathon.l4lb.thisdcos.directory:443")?;
        let other = address_on(3, "other.marathon.l4lb.thisdcos.directory:80")?;
        Ok(match (same_port, other) {
            (Some(p), Some(o)) => {
                assert_eq!(p, addr, "two ports of one named VIP must share its address");
                Some(o)
            }
            _ => None,
        })
    })?;
    assert_ne!(other, addr);
    // An IP VIP on httpi's address is refused, and httpi keeps it.
    let clash = format!("{addr}:3141");
    assert_eq!(
        c.put_task(2, "clash.1", &task("10.77.0.2", 7000, &clash))?
            .0,
        201
    );
    wait_for("the clash reported", Duration::from_secs(20), || {
        let p = c.get(1, "/v1/vips/problems")?;
        Ok(p.as_array()
            .into_iter()
            .flatten()
            .any(|x| {
                x["task_id"] == "clash.1"
                    && x["error"].as_str().unwrap_or_default().contains("collides")
            })
            .then_some(()))
    })?;
    assert_eq!(address_on(1, httpi)?, Some(addr.clone()));
    assert_eq!(c.delete_task(2, "clash.1")?, 204);
    assert_eq!(c.delete_task(1, "httpi.d")?, 204);
    assert_eq!(c.delete_task(1, "other.1")?, 204);

    let problems = c.get(1, "/v1/vips/problems")?;
    let problems: Vec<Value> = problems
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["task_id"] != "clash.1")
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["task_id"], "broken.1");
    assert!(
        problems[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("port \"99999\""),
        "{problems:?}"
    );
    // ...and in the logs of the nodes that see it.
    wait_for(
        "the bad label in node1's log",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&c.node(1).log)?;
            Ok(log
                .lines()
                .any(|l| l.contains("VIP label not used") && l.contains("broken.1"))
                .then_some(()))
        },
    )?;

    // Node 3 dies: its backend stays listed but gets no new connections.
    c.kill(3)?;
    wait_for(
        "node3's backend out of use",
        Duration::from_secs(30),
        || Ok((httpi_backends(&c)? == want(true, true, false)).then_some(())),
    )?;
    // Node 2 dies too: every backend is on a down node, so all are kept
    // rather than black-holing the VIP.
    c.kill(2)?;
    wait_for(
        "all backends kept when all are down",
        Duration::from_secs(30),
        || {
            Ok((httpi_backends(&c)? == want(true, true, true)
                && c.statuses(1)?.iter().filter(|s| s.1 == "down").count() == 2)
                .then_some(()))
        },
    )?;
    // Deleting a task removes its backend.
    c.start(2, &[1], &[])?;
    assert_eq!(c.delete_task(2, "httpi.b")?, 204);
    wait_for("httpi.b gone", Duration::from_secs(20), || {
        let b = httpi_backends(&c)?;
        Ok((b.len() == 2 && !b.iter().any(|x| x.0 == "httpi.b")).then_some(()))
    })?;
    Ok(())
}

/// A new named VIP works on another node as soon as its task is there (no
/// settle period), and two names whose first probes collide, created at
/// the same moment on two nodes, end on distinct addresses every node
/// agrees on, each reaching its own backend.
#[test]
fn new_named_vips_work_at_once_and_colliding_names_agree() -> anyhow::Result<()> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};

    /// Node `i`'s own DNS answer for `name` (first A record), asked over
    /// UDP from a thread inside its namespace.
    fn resolve(c: &Cluster, i: usize, name: &str) -> anyhow::Result<Option<String>> {
        let netns = c.node(i).netns.clone();
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<Option<String>> {
                cluster_tests::enter_netns(&netns)?;
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
                socket.connect("127.0.0.1:53")?;
                socket.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut q = Message::query();
                q.metadata.id = 4242;
                q.metadata.recursion_desired = true;
                q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
                socket.send(&q.to_vec()?)?;
                let mut buf = [0u8; 1500];
                let n = socket.recv(&mut buf)?;
                let reply = Message::from_vec(&buf[..n])?;
                Ok(reply.answers.iter().find_map(|r| match &r.data {
                    RData::A(a) => Some(a.0.to_string()),
                    _ => None,
                }))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("DNS thread panicked"))?
        })
    }

    /// Through node `i`'s DNS and kernel: `app`'s VIP on port 8080 answers
    /// with the backend's name.
    fn reaches(c: &Cluster, i: usize, app: &str) -> anyhow::Result<Option<String>> {
        let name = format!("{app}.marathon.l4lb.thisdcos.directory.");
        let Some(ip) = resolve(c, i, &name)? else {
            return Ok(None);
        };
        let url = format!("http://{ip}:8080/");
        Ok(
            cluster_tests::curl(&c.node(i).netns, &["-sf", "--max-time", "1", &url])
                .ok()
                .map(|b| String::from_utf8_lossy(&b).trim().to_string()),
        )
    }

    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let mut c = Cluster::new(3)?;
    let flags = ["--l4lb-dataplane", "nftables", "--dns-upstream", ""];
    c.start(1, &[], &flags)?;
    c.start(2, &[1], &flags)?;
    c.start(3, &[1], &flags)?;
    let (x, y) = {
        let mut first = std::collections::HashMap::new();
        (0..)
            .find_map(|i| {
                let app = format!("col{i}");
                let ip = skein_l4lb::alloc::probe(&format!("{app}.marathon"), 0);
                first.insert(ip, app.clone()).map(|other| (other, app))
            })
            .expect("the probe space is finite")
    };
    let _fresh = cluster_tests::spawn_in(&c.node(1).netns, httpi, &["10.77.0.1:9100", "fresh"])?;
    let _x = cluster_tests::spawn_in(&c.node(1).netns, httpi, &["10.77.0.1:9101", "backend-x"])?;
    let _y = cluster_tests::spawn_in(&c.node(3).netns, httpi, &["10.77.0.3:9101", "backend-y"])?;

    assert_eq!(
        c.put_task(1, "fresh.1", &task("10.77.0.1", 9100, "/fresh:8080"))?
            .0,
        201
    );
    wait_for(
        "the new VIP answering through node2",
        Duration::from_secs(20),
        || Ok((reaches(&c, 2, "fresh")?.as_deref() == Some("fresh")).then_some(())),
    )?;

    // The colliding pair, PUT at the same moment on node1 and node3.
    let (px, py) = std::thread::scope(|s| {
        let a = s.spawn(|| c.put_task(1, "x.1", &task("10.77.0.1", 9101, &format!("/{x}:8080"))));
        let b = s.spawn(|| c.put_task(3, "y.1", &task("10.77.0.3", 9101, &format!("/{y}:8080"))));
        (a.join(), b.join())
    });
    let code = |r: std::thread::Result<anyhow::Result<(u16, String)>>| {
        r.map_err(|_| anyhow::anyhow!("PUT thread panicked"))?
            .map(|(code, _)| code)
    };
    assert_eq!(code(px)?, 201);
    assert_eq!(code(py)?, 201);
    let vip_of = |app: &str| format!("{app}.marathon.l4lb.thisdcos.directory:8080");
    let (ax, ay) = wait_for(
        "one address per colliding name, agreed by every node",
        Duration::from_secs(20),
        || {
            let mut seen = Vec::new();
            for i in 1..=3 {
                match (
                    c.vip_address(i, &vip_of(&x))?,
                    c.vip_address(i, &vip_of(&y))?,
                ) {
                    (Some(a), Some(b)) => seen.push((a, b)),
                    _ => return Ok(None),
                }
            }
            Ok(seen.iter().all(|s| *s == seen[0]).then(|| seen[0].clone()))
        },
    )?;
    assert_ne!(ax, ay, "{x} and {y} share an address");
    let first = skein_l4lb::alloc::probe(&format!("{x}.marathon"), 0).to_string();
    assert!(
        ax == first || ay == first,
        "one of them keeps the shared first probe {first}: {ax}, {ay}"
    );
    println!("{x} and {y} (first probe {first}) settled on {ax} and {ay} on all 3 nodes");
    for (app, backend) in [(&x, "backend-x"), (&y, "backend-y")] {
        wait_for(
            &format!("{app} reaching {backend} from node2"),
            Duration::from_secs(20),
            || Ok((reaches(&c, 2, app)?.as_deref() == Some(backend)).then_some(())),
        )?;
    }
    Ok(())
}
