//! The standard run: form a cluster, hold it idle, write, kill, partition
//! and heal, measuring each phase.

use std::time::Instant;

use skein_proto::{Config, Event, Micros};

use crate::{NetConfig, Sim};

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub nodes: u32,
    pub seed: u64,
    pub loss: f64,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    /// The idle window, in simulated seconds.
    pub duration_s: f64,
    pub writes: u32,
    pub kills: u32,
    pub partition_frac: f64,
    pub partition_s: f64,
    /// Overrides the dead-node grace (seconds).
    pub grace_s: Option<f64>,
    pub wire: bool,
    /// Bytes of the `meta` key every node publishes at start (0: none).
    pub meta_bytes: usize,
    /// Form the cluster by joins through seeds (`false`: every node starts
    /// from the same persisted replica, as after a whole-cluster restart).
    pub join: bool,
    /// Heartbeat interval (the agent's `--gossip-interval-ms`).
    pub heartbeat_ms: f64,
}

impl Scenario {
    pub fn new(nodes: u32, seed: u64) -> Scenario {
        Scenario {
            nodes,
            seed,
            loss: 0.0,
            latency_ms: 1.0,
            jitter_ms: 0.5,
            duration_s: 10.0,
            writes: 20,
            kills: 1,
            partition_frac: 0.0,
            partition_s: 30.0,
            grace_s: None,
            wire: false,
            meta_bytes: 120,
            join: true,
            heartbeat_ms: 200.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Dist {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub count: usize,
}

impl Dist {
    fn of(mut xs: Vec<f64>) -> Dist {
        if xs.is_empty() {
            return Dist::default();
        }
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((xs.len() as f64 - 1.0) * q).round() as usize];
        Dist {
            p50: at(0.5),
            p99: at(0.99),
            max: xs[xs.len() - 1],
            count: xs.len(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub nodes: u32,
    pub seed: u64,
    pub loss: f64,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    pub form_ms: f64,
    pub settle_ms: f64,
    pub formed: bool,
    pub joined: bool,
    pub idle_s: f64,
    pub idle_mean: f64,
    pub idle_max: f64,
    pub idle_msgs_per_node_per_s: f64,
    pub detect: Dist,
    pub undetected: usize,
    pub false_downs: u64,
    pub write_all: Dist,
    pub writes_incomplete: usize,
    pub heal_converge_ms: Option<f64>,
    pub lost_writes: Option<u64>,
    pub partition_writes: u32,
    pub mem_bytes_per_node: f64,
    pub wall_s: f64,
    pub messages: u64,
    pub bad_signatures: u64,
    /// Every live node ended with the same digest (the same replica).
    pub replicas_equal: bool,
}

impl Report {
    pub fn json(&self) -> String {
        let d = |d: &Dist| serde_json::json!({"p50": d.p50, "p99": d.p99, "max": d.max});
        serde_json::json!({
            "nodes": self.nodes,
            "seed": self.seed,
            "loss": self.loss,
            "idle_bytes_per_node_per_s": {"mean": self.idle_mean, "max": self.idle_max},
            "detect_all_ms": d(&self.detect),
            "false_downs": self.false_downs,
            "write_all_ms": d(&self.write_all),
            "heal_converge_ms": self.heal_converge_ms,
            "lost_writes": self.lost_writes,
            "mem_bytes_per_node": self.mem_bytes_per_node,
            "wall_s": self.wall_s,
        })
        .to_string()
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let d = |d: &Dist| {
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n={})",
                d.p50, d.p99, d.max, d.count
            )
        };
        s += &format!(
            "skein-sim: {} nodes, seed {}, loss {:.1} %, latency {} ± {} ms\n",
            self.nodes,
            self.seed,
            self.loss * 100.0,
            self.latency_ms,
            self.jitter_ms
        );
        s +=
            &format!(
            "  formed:        {} {} ({:.1} s to see every member, digests equal {:.1} s later)\n",
            if self.formed { "yes" } else { "NO" },
            if self.joined { "by joins through 3 seeds" } else { "from persisted replicas" },
            self.form_ms / 1000.0,
            self.settle_ms / 1000.0
        );
        s += &format!(
            "  idle {:.0} s:     {:.0} B/s per node mean, {:.0} max (sent + received, {} B overhead per message), {:.1} messages/s per node\n",
            self.idle_s, self.idle_mean, self.idle_max, crate::OVERHEAD, self.idle_msgs_per_node_per_s
        );
        s += &format!("  false downs:   {}\n", self.false_downs);
        s += &format!("  write → all:   {}", d(&self.write_all));
        if self.writes_incomplete > 0 {
            s += &format!(", {} INCOMPLETE", self.writes_incomplete);
        }
        s += "\n";
        s += &format!("  detect → all:  {}", d(&self.detect));
        if self.undetected > 0 {
            s += &format!(", {} UNDETECTED", self.undetected);
        }
        s += "\n";
        if let Some(h) = self.heal_converge_ms {
            s += &format!(
                "  partition:     converged {:.0} ms after the heal, {} of {} writes lost\n",
                h,
                self.lost_writes.unwrap_or(0),
                self.partition_writes
            );
        }
        s += &format!(
            "  memory:        {:.0} bytes per node (state a real agent would hold)\n",
            self.mem_bytes_per_node
        );
        s += &format!(
            "  replicas:      {}\n",
            if self.replicas_equal {
                "identical on every live node"
            } else {
                "DIFFERENT"
            }
        );
        s += &format!(
            "  bad signatures: {}, messages: {}, wall {:.1} s\n",
            self.bad_signatures, self.messages, self.wall_s
        );
        s
    }
}

/// Writes whose arrival at every other live node is being timed.
struct Tracker {
    prefix: &'static str,
    started: Vec<Micros>,
    seen: Vec<u32>,
    done: Vec<Option<Micros>>,
    target: u32,
}

impl Tracker {
    fn new(prefix: &'static str) -> Tracker {
        Tracker {
            prefix,
            started: Vec::new(),
            seen: Vec::new(),
            done: Vec::new(),
            target: 0,
        }
    }
    fn start(&mut self, now: Micros) -> String {
        self.started.push(now);
        self.seen.push(0);
        self.done.push(None);
        format!("{}{}", self.prefix, self.started.len() - 1)
    }
    fn on_entry(&mut self, now: Micros, key: &str) {
        let Some(j) = key
            .strip_prefix(self.prefix)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return;
        };
        if let Some(seen) = self.seen.get_mut(j) {
            *seen += 1;
            if *seen >= self.target && self.done[j].is_none() {
                self.done[j] = Some(now);
            }
        }
    }
    fn complete(&self) -> bool {
        self.done.iter().all(Option::is_some)
    }
    fn times_ms(&self) -> Vec<f64> {
        self.done
            .iter()
            .zip(&self.started)
            .filter_map(|(d, s)| d.map(|d| (d - s) as f64 / 1000.0))
            .collect()
    }
    fn missing(&self) -> usize {
        self.done.iter().filter(|d| d.is_none()).count()
    }
}

pub fn config_for(s: &Scenario) -> Config {
    let mut cfg = Config::new("sim");
    cfg.heartbeat_interval = (s.heartbeat_ms * MS as f64) as Micros;
    if let Some(g) = s.grace_s {
        cfg.dead_node_grace = (g * SEC as f64) as Micros;
    }
    cfg.max_nodes = (s.nodes as usize + 16).max(cfg.max_nodes);
    cfg
}

pub fn run(s: &Scenario, progress: &mut dyn FnMut(&str)) -> Report {
    let wall = Instant::now();
    let cfg = config_for(s);
    let net = NetConfig {
        loss: s.loss,
        latency: (s.latency_ms * MS as f64) as Micros,
        jitter: (s.jitter_ms * MS as f64) as Micros,
        wire: s.wire,
    };
    let n = s.nodes;
    let mut sim = Sim::new(n, s.seed, net, &cfg);
    if s.meta_bytes > 0 {
        sim.meta = Some("m".repeat(s.meta_bytes));
    }
    let mut r = Report {
        nodes: n,
        seed: s.seed,
        loss: s.loss,
        latency_ms: s.latency_ms,
        jitter_ms: s.jitter_ms,
        ..Report::default()
    };

    // Formation: node 0 founds, the others join through nodes 0..3 over a
    // window that grows with the cluster.
    let window = if s.join {
        let window = ((n as f64 / 1000.0).clamp(1.0, 10.0) * SEC as f64) as Micros;
        for i in 0..n {
            sim.start_at(i, window * Micros::from(i) / Micros::from(n.max(1)));
        }
        window
    } else {
        sim.start_restored();
        0
    };
    r.joined = s.join;
    let mut false_downs_form = 0u64;
    let mut ignore = |_: Micros, _: u32, _: Event| {};
    let deadline = window + 120 * SEC;
    let mut formed_at = None;
    while sim.now < deadline {
        let t = sim.now + 100 * MS;
        sim.run_until(t, &mut |_, _, e| {
            if matches!(e, Event::Down(_)) {
                false_downs_form += 1;
            }
        });
        if sim.now >= window
            && sim
                .slots
                .iter()
                .all(|sl| sl.alive && sl.node.up_count() == n as usize)
        {
            formed_at = Some(sim.now);
            break;
        }
    }
    r.formed = formed_at.is_some();
    let formed_at = formed_at.unwrap_or(sim.now);
    r.form_ms = (formed_at - window.min(formed_at)) as f64 / 1000.0;
    progress(&format!(
        "formed {} nodes at {:.1} s (joins over {:.1} s)",
        n,
        formed_at as f64 / 1e6,
        window as f64 / 1e6
    ));
    // Let anti-entropy finish (every digest equal).
    let settle_deadline = sim.now + 60 * SEC;
    while sim.now < settle_deadline {
        let t = sim.now + 100 * MS;
        sim.run_until(t, &mut ignore);
        let d0 = sim.slots[0].node.digest();
        if sim.slots.iter().all(|sl| sl.node.digest() == d0) {
            break;
        }
    }
    r.settle_ms = (sim.now - formed_at) as f64 / 1000.0;

    // Idle window.
    sim.reset_counters();
    let idle_start = sim.now;
    let mut false_downs = 0u64;
    let idle_end = idle_start + (s.duration_s * SEC as f64) as Micros;
    let mut last_report = idle_start;
    while sim.now < idle_end {
        let t = (sim.now + SEC).min(idle_end);
        sim.run_until(t, &mut |_, _, e| {
            if matches!(e, Event::Down(_)) {
                false_downs += 1;
            }
        });
        if sim.now - last_report >= 60 * SEC {
            last_report = sim.now;
            progress(&format!(
                "idle {:.0}/{:.0} s, false downs so far {}",
                (sim.now - idle_start) as f64 / 1e6,
                s.duration_s,
                false_downs
            ));
        }
    }
    r.idle_s = s.duration_s;
    let secs = s.duration_s.max(1e-9);
    let per_node: Vec<f64> = sim
        .slots
        .iter()
        .map(|sl| (sl.bytes_in + sl.bytes_out) as f64 / secs)
        .collect();
    r.idle_mean = per_node.iter().sum::<f64>() / per_node.len().max(1) as f64;
    r.idle_max = per_node.iter().copied().fold(0.0, f64::max);
    r.idle_msgs_per_node_per_s = sim
        .slots
        .iter()
        .map(|sl| (sl.msgs_out + sl.msgs_in) as f64 / secs)
        .sum::<f64>()
        / n.max(1) as f64;
    r.mem_bytes_per_node = {
        let step = (n as usize / 16).max(1);
        let sample: Vec<usize> = (0..n as usize)
            .step_by(step)
            .map(|i| sim.slots[i].node.mem_estimate())
            .collect();
        sample.iter().sum::<usize>() as f64 / sample.len().max(1) as f64
    };
    progress(&format!(
        "idle: {:.0} B/s per node mean, {:.0} max, {} false downs",
        r.idle_mean, r.idle_max, false_downs
    ));

    // Writes, one every 50 ms at a random live node.
    let mut writes = Tracker::new("w/");
    writes.target = n - 1;
    let value = "v".repeat(64);
    let record = |writes: &mut Tracker, fd: &mut u64, now: Micros, e: Event| match e {
        Event::Entry(entry) => writes.on_entry(now, &entry.key),
        Event::Down(_) => *fd += 1,
        _ => {}
    };
    for _ in 0..s.writes {
        let i = sim.below(n as usize) as u32;
        let key = writes.start(sim.now);
        sim.write(i, &key, Some(&value));
        let t = sim.now + 50 * MS;
        sim.run_until(t, &mut |now, _, e| {
            record(&mut writes, &mut false_downs, now, e)
        });
    }
    let end = sim.now + 30 * SEC;
    while sim.now < end && !writes.complete() {
        let t = sim.now + 50 * MS;
        sim.run_until(t, &mut |now, _, e| {
            record(&mut writes, &mut false_downs, now, e)
        });
    }
    r.write_all = Dist::of(writes.times_ms());
    r.writes_incomplete = writes.missing();
    progress(&format!(
        "writes: p99 {:.0} ms, {} incomplete",
        r.write_all.p99, r.writes_incomplete
    ));

    // Kills, all at once.
    let mut victims = Vec::new();
    while victims.len() < s.kills.min(n.saturating_sub(4)) as usize {
        let i = sim.below(n as usize) as u32;
        if !victims.contains(&i) {
            victims.push(i);
        }
    }
    let killed_at = sim.now;
    for &v in &victims {
        sim.kill(v);
    }
    let survivors = n - victims.len() as u32;
    let names: Vec<_> = victims.iter().map(|&v| crate::name_of(v)).collect();
    let mut downs = vec![0u32; victims.len()];
    let mut detected: Vec<Option<Micros>> = vec![None; victims.len()];
    let end = sim.now + 60 * SEC;
    while sim.now < end && detected.iter().any(Option::is_none) {
        let t = sim.now + 50 * MS;
        sim.run_until(t, &mut |now, _, e| {
            if let Event::Down(who) = e {
                match names.iter().position(|x| *x == who) {
                    Some(k) => {
                        downs[k] += 1;
                        if downs[k] >= survivors && detected[k].is_none() {
                            detected[k] = Some(now);
                        }
                    }
                    None => false_downs += 1,
                }
            }
        });
    }
    r.detect = Dist::of(
        detected
            .iter()
            .flatten()
            .map(|t| (t - killed_at) as f64 / 1000.0)
            .collect(),
    );
    r.undetected = detected.iter().filter(|d| d.is_none()).count();
    r.false_downs = false_downs + false_downs_form;
    progress(&format!(
        "kills: detection p99 {:.0} ms, {} undetected",
        r.detect.p99, r.undetected
    ));

    // Partition and heal, with writes on both sides.
    if s.partition_frac > 0.0 {
        let live: Vec<u32> = sim.live().collect();
        let mut sides = vec![false; n as usize];
        let cut = ((live.len() as f64) * s.partition_frac).round() as usize;
        let mut chosen = 0;
        while chosen < cut {
            let i = live[sim.below(live.len())];
            if !sides[i as usize] {
                sides[i as usize] = true;
                chosen += 1;
            }
        }
        let minority: Vec<u32> = live
            .iter()
            .copied()
            .filter(|&i| sides[i as usize])
            .collect();
        let majority: Vec<u32> = live
            .iter()
            .copied()
            .filter(|&i| !sides[i as usize])
            .collect();
        sim.set_partition(Some(sides));
        let mut pw = Tracker::new("p/");
        pw.target = live.len() as u32 - 1;
        let steps = 20u32;
        let step = (s.partition_s * SEC as f64) as Micros / Micros::from(steps);
        let ignore_downs = |pw: &mut Tracker, now: Micros, e: Event| {
            if let Event::Entry(entry) = e {
                pw.on_entry(now, &entry.key)
            }
        };
        for k in 0..steps {
            let side = if k % 2 == 0 { &minority } else { &majority };
            if !side.is_empty() {
                let i = side[sim.below(side.len())];
                let key = pw.start(sim.now);
                sim.write(i, &key, Some(&value));
            }
            let t = sim.now + step;
            sim.run_until(t, &mut |now, _, e| ignore_downs(&mut pw, now, e));
        }
        r.partition_writes = pw.started.len() as u32;
        sim.set_partition(None);
        let healed = sim.now;
        let expected = live.len();
        let end = sim.now + 120 * SEC;
        let mut converged = None;
        let (mut all_up, mut all_writes) = (None, None);
        while sim.now < end {
            let t = sim.now + 50 * MS;
            sim.run_until(t, &mut |now, _, e| ignore_downs(&mut pw, now, e));
            let up = live
                .iter()
                .all(|&i| sim.slots[i as usize].node.up_count() == expected);
            if up && all_up.is_none() {
                all_up = Some(sim.now - healed);
            }
            if pw.complete() && all_writes.is_none() {
                all_writes = Some(sim.now - healed);
            }
            if pw.complete() && up {
                converged = Some(sim.now);
                break;
            }
        }
        progress(&format!(
            "heal: every node up everywhere after {:?} ms, every write everywhere after {:?} ms",
            all_up.map(|t| t / 1000),
            all_writes.map(|t| t / 1000)
        ));
        r.heal_converge_ms =
            Some(converged.map_or(f64::INFINITY, |c| (c - healed) as f64 / 1000.0));
        r.lost_writes = Some(pw.missing() as u64);
        progress(&format!(
            "partition of {} nodes for {:.0} s: converged {:.0} ms after the heal, {} writes lost",
            minority.len(),
            s.partition_s,
            r.heal_converge_ms.unwrap_or(f64::NAN),
            pw.missing()
        ));
    }

    // Every live node must end with the same replica.
    let end = sim.now + 30 * SEC;
    loop {
        let live: Vec<u64> = sim
            .live()
            .map(|i| sim.slots[i as usize].node.digest())
            .collect();
        if live.windows(2).all(|w| w[0] == w[1]) {
            r.replicas_equal = true;
            break;
        }
        if sim.now >= end {
            break;
        }
        let t = sim.now + 100 * MS;
        sim.run_until(t, &mut ignore);
    }
    r.bad_signatures = sim
        .slots
        .iter()
        .map(|sl| sl.node.stats().bad_signature)
        .sum();
    r.messages = sim.messages;
    let sum = |f: fn(&skein_proto::Stats) -> u64| -> u64 {
        sim.slots.iter().map(|sl| f(sl.node.stats())).sum()
    };
    progress(&format!(
        "totals: {} refutations, {} syncs, {} rumors received ({} new to their receiver)",
        sum(|s| s.refutations),
        sum(|s| s.syncs_started),
        sum(|s| s.rumors_in),
        sum(|s| s.rumors_new)
    ));
    r.wall_s = wall.elapsed().as_secs_f64();
    r
}
