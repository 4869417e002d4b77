//! The protocol at a few hundred nodes, several seeds, loss and a
//! partition, asserting what must hold at any scale: every node converges
//! to the same replica, nothing acknowledged is lost, no live node is held
//! down, and per-node traffic does not grow with the cluster.

use skein_sim::scenario::{run, Report, Scenario};

fn quiet(_: &str) {}

fn check(r: &Report) {
    let t = r.text();
    assert!(r.formed, "{t}");
    assert!(r.replicas_equal, "{t}");
    assert_eq!(r.false_downs, 0, "{t}");
    assert_eq!(r.undetected, 0, "{t}");
    assert_eq!(r.writes_incomplete, 0, "{t}");
    assert_eq!(r.bad_signatures, 0, "{t}");
    assert!(r.detect.max < 2_000.0, "detection within 2 s: {t}");
    assert!(r.write_all.p99 < 500.0, "write → all p99 within 0.5 s: {t}");
    if let Some(h) = r.heal_converge_ms {
        assert!(h <= 5_000.0, "heal within 5 s: {t}");
        assert_eq!(r.lost_writes, Some(0), "{t}");
    }
}

fn standard(nodes: u32, seed: u64) -> Scenario {
    Scenario {
        loss: 0.05,
        duration_s: 20.0,
        writes: 30,
        kills: 3,
        partition_frac: 0.1,
        partition_s: 10.0,
        ..Scenario::new(nodes, seed)
    }
}

#[test]
fn two_hundred_nodes_with_loss_and_a_partition_over_three_seeds() {
    for seed in 1..=3 {
        let r = run(&standard(200, seed), &mut quiet);
        println!("{}", r.text());
        check(&r);
    }
}

#[test]
fn wide_area_latency() {
    let s = Scenario {
        latency_ms: 20.0,
        jitter_ms: 10.0,
        ..standard(200, 7)
    };
    let r = run(&s, &mut quiet);
    println!("{}", r.text());
    check(&r);
}

#[test]
fn a_partition_longer_than_the_dead_node_grace() {
    let s = Scenario {
        grace_s: Some(3.0),
        partition_s: 12.0,
        ..standard(120, 11)
    };
    let r = run(&s, &mut quiet);
    println!("{}", r.text());
    check(&r);
}

#[test]
fn idle_traffic_per_node_does_not_grow_with_the_cluster() {
    let idle = |nodes| {
        let s = Scenario {
            loss: 0.05,
            duration_s: 20.0,
            writes: 0,
            kills: 0,
            ..Scenario::new(nodes, 5)
        };
        let r = run(&s, &mut quiet);
        check(&r);
        r
    };
    let small = idle(100);
    let large = idle(600);
    println!(
        "idle bytes/s per node: {:.0} at 100 nodes, {:.0} at 600 (ratio {:.2})",
        small.idle_mean,
        large.idle_mean,
        large.idle_mean / small.idle_mean
    );
    assert!(large.idle_mean <= 10_000.0 && large.idle_max <= 20_000.0);
    assert!(large.idle_mean / small.idle_mean <= 1.2);
}

#[test]
fn every_message_survives_the_wire_format() {
    let s = Scenario {
        wire: true,
        ..standard(60, 3)
    };
    let r = run(&s, &mut quiet);
    check(&r);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let s = standard(80, 9);
    let strip = |r: Report| {
        let mut j: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        j.as_object_mut().unwrap().remove("wall_s");
        (j, r.messages)
    };
    assert_eq!(strip(run(&s, &mut quiet)), strip(run(&s, &mut quiet)));
}

#[test]
fn restored_cluster_behaves_like_a_joined_one() {
    let s = Scenario {
        join: false,
        ..standard(150, 4)
    };
    let r = run(&s, &mut quiet);
    println!("{}", r.text());
    check(&r);
}
