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
    let problems = c.get(1, "/v1/vips/problems")?;
    let problems = problems.as_array().cloned().unwrap_or_default();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["task_id"], "broken.1");
    assert!(
        problems[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("port \"99999\""),
        "{problems:?}"
    );

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
