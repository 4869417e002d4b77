//! `skein-sim`: runs N nodes of skein's gossip core in virtual time and
//! prints what a cluster of that size would see. See `scenario::run` for
//! the phases; `--json` ends the output with one JSON object.

use clap::Parser;
use skein_sim::scenario::{run, Scenario};

#[derive(Parser, Debug)]
#[command(
    name = "skein-sim",
    about = "Deterministic simulation of skein's gossip protocol"
)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// i.i.d. loss probability per message.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    #[arg(long, default_value_t = 1.0)]
    latency_ms: f64,
    #[arg(long, default_value_t = 0.5)]
    jitter_ms: f64,
    /// The idle window (simulated seconds).
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 100)]
    writes: u32,
    #[arg(long, default_value_t = 10)]
    kills: u32,
    #[arg(long, default_value_t = 0.0)]
    partition_frac: f64,
    #[arg(long, default_value_t = 30.0)]
    partition_s: f64,
    /// Dead-node grace in seconds (default: the agent's, one hour).
    #[arg(long)]
    grace_s: Option<f64>,
    /// Send every message through the encoder and decoder.
    #[arg(long)]
    wire: bool,
    /// Size of the metadata key each node publishes.
    #[arg(long, default_value_t = 120)]
    meta_bytes: usize,
    /// How the cluster forms: `join` (every node joins through seeds),
    /// `restore` (all start from the same persisted replica), or `auto`
    /// (join up to 2,000 nodes, restore above: simulating 10,000
    /// simultaneous joins costs ~10^9 message deliveries).
    #[arg(long, default_value = "auto")]
    form: String,
    #[arg(long)]
    json: bool,
}

fn main() {
    let a = Args::parse();
    let scenario = Scenario {
        nodes: a.nodes.max(1),
        seed: a.seed,
        loss: a.loss.clamp(0.0, 1.0),
        latency_ms: a.latency_ms.max(0.0),
        jitter_ms: a.jitter_ms.max(0.0),
        duration_s: a.duration_s.max(0.0),
        writes: a.writes,
        kills: a.kills,
        partition_frac: a.partition_frac.clamp(0.0, 0.5),
        partition_s: a.partition_s.max(0.0),
        grace_s: a.grace_s,
        wire: a.wire,
        meta_bytes: a.meta_bytes,
        join: match a.form.as_str() {
            "join" => true,
            "restore" => false,
            _ => a.nodes <= 2000,
        },
        heartbeat_ms: 200.0,
    };
    let start = std::time::Instant::now();
    let report = run(&scenario, &mut |line| {
        eprintln!("[skein-sim {:6.1}s] {line}", start.elapsed().as_secs_f64())
    });
    print!("{}", report.text());
    if a.json {
        println!("{}", report.json());
    }
}
