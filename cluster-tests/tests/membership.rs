//! Five real agents in five network namespaces, each told of one seed only.

use std::time::{Duration, Instant};

use cluster_tests::{wait_for, Cluster};

const N: usize = 5;

fn task_body(app: &str, ip: &str) -> String {
    format!(
        r#"{{"app":"{app}","framework":"marathon","ip":"{ip}","ports":[{{"name":"http","port":9896,"protocol":"tcp","labels":{{"VIP_0":"{app}:3141"}}}}]}}"#
    )
}

fn all_see(
    cluster: &Cluster,
    nodes: &[usize],
    want: &[(String, String)],
) -> anyhow::Result<Option<()>> {
    for &i in nodes {
        if cluster.statuses(i)? != want {
            return Ok(None);
        }
    }
    Ok(Some(()))
}

fn expected(statuses: &[&str]) -> Vec<(String, String)> {
    statuses
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("node{}", i + 1), s.to_string()))
        .collect()
}

#[test]
fn five_agents_form_replicate_detect_rejoin_and_heal() -> anyhow::Result<()> {
    let mut c = Cluster::new(N)?;
    // Each node knows one seed: a chain, so membership must spread by gossip.
    c.start(1, &[], &[])?;
    for i in 2..=N {
        c.start(i, &[i - 1], &[])?;
    }
    let t0 = Instant::now();
    wait_for("all 5 alive on all 5", Duration::from_secs(30), || {
        all_see(&c, &[1, 2, 3, 4, 5], &expected(&["alive"; N]))
    })?;
    println!(
        "membership: 5 of 5 alive on every node after {:?}",
        t0.elapsed()
    );

    // A write on node 1 reaches node 5.
    let (code, body) = c.put_task(1, "web.1", &task_body("/web", "10.77.0.1"))?;
    assert_eq!(code, 201, "{body}");
    let t0 = Instant::now();
    wait_for("web.1 on node5", Duration::from_secs(10), || {
        Ok(c.tasks(5)?
            .iter()
            .any(|t| t.0 == "web.1" && t.1 == "node1")
            .then_some(()))
    })?;
    println!(
        "propagation: task on node1 visible on node5 after {:?}",
        t0.elapsed()
    );

    // Node 3 has a task, then dies hard.
    let (code, body) = c.put_task(3, "db.1", &task_body("/db", "10.77.0.3"))?;
    assert_eq!(code, 201, "{body}");
    wait_for("db.1 everywhere", Duration::from_secs(10), || {
        for i in [1, 2, 4, 5] {
            if !c.tasks(i)?.iter().any(|t| t.0 == "db.1") {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    c.kill(3)?;
    let t0 = Instant::now();
    wait_for("node3 down on the others", Duration::from_secs(30), || {
        all_see(
            &c,
            &[1, 2, 4, 5],
            &expected(&["alive", "alive", "down", "alive", "alive"]),
        )
    })?;
    println!(
        "detection: SIGKILLed node3 down on all 4 others after {:?}",
        t0.elapsed()
    );
    for i in [1, 2, 4, 5] {
        let tasks = c.tasks(i)?;
        assert!(
            tasks.contains(&("db.1".into(), "node3".into(), "down".into())),
            "node{i} must report db.1 as on a down node: {tasks:?}"
        );
    }

    // Node 3 comes back with the same data dir (and seeds through node 5).
    c.start(3, &[5], &[])?;
    let t0 = Instant::now();
    wait_for(
        "node3 alive again everywhere",
        Duration::from_secs(30),
        || all_see(&c, &[1, 2, 3, 4, 5], &expected(&["alive"; N])),
    )?;
    wait_for(
        "db.1 back on an alive node3",
        Duration::from_secs(10),
        || {
            for i in 1..=N {
                if !c
                    .tasks(i)?
                    .contains(&("db.1".into(), "node3".into(), "alive".into()))
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    println!(
        "rejoin: node3 alive with its tasks on all nodes after {:?}",
        t0.elapsed()
    );

    // Partition node 1 and write on both sides.
    c.set_link(1, false)?;
    wait_for(
        "node1 down for the majority",
        Duration::from_secs(30),
        || {
            all_see(
                &c,
                &[2, 3, 4, 5],
                &expected(&["down", "alive", "alive", "alive", "alive"]),
            )
        },
    )?;
    assert_eq!(
        c.put_task(1, "lonely.1", &task_body("/lonely", "10.77.0.1"))?
            .0,
        201
    );
    assert_eq!(c.delete_task(1, "web.1")?, 204);
    assert_eq!(
        c.put_task(4, "crowd.1", &task_body("/crowd", "10.77.0.4"))?
            .0,
        201
    );
    assert!(
        !c.tasks(1)?.iter().any(|t| t.0 == "crowd.1"),
        "partitioned node1 cannot know crowd.1 yet"
    );
    c.set_link(1, true)?;
    let t0 = Instant::now();
    let want: Vec<String> = vec!["crowd.1".into(), "db.1".into(), "lonely.1".into()];
    wait_for(
        "the same tasks on all 5 after healing",
        Duration::from_secs(30),
        || {
            for i in 1..=N {
                let ids: Vec<String> = c.tasks(i)?.into_iter().map(|t| t.0).collect();
                if ids != want {
                    return Ok(None);
                }
            }
            all_see(&c, &[1, 2, 3, 4, 5], &expected(&["alive"; N]))
        },
    )?;
    println!("heal: all 5 converged to {want:?} after {:?}", t0.elapsed());

    // The whole replica (every node's keys and versions) is identical too,
    // once in-flight writes (e.g. a realizer's status) have spread.
    let strip = |v: &serde_json::Value| {
        // Status is each observer's own view; compare the data only.
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            for n in m.values_mut() {
                if let Some(o) = n.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        v
    };
    let identical = wait_for(
        "the whole replica identical on all 5",
        Duration::from_secs(10),
        || {
            let states: Vec<serde_json::Value> = (1..=N)
                .map(|i| c.get(i, "/v1/state").map(|s| strip(&s["nodes"])))
                .collect::<anyhow::Result<_>>()?;
            Ok(states.iter().all(|s| *s == states[0]).then_some(()))
        },
    );
    if identical.is_err() {
        for i in 1..=N {
            eprintln!("node{i}: {}", c.get(i, "/v1/state")?["nodes"]);
        }
    }
    identical?;
    Ok(())
}
