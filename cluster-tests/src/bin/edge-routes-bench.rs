//! How long computing an edge's routes takes at scale (issue 13: 10,000
//! apps / 50,000 backends in ≤ 20 ms).
//!
//!   cargo build --release -p cluster-tests
//!   target/release/edge-routes-bench [--apps 10000] [--tasks 5] [--runs 20]
//!
//! Builds the tasks an agent's view holds (each app `--tasks` tasks on as
//! many of 1,000 nodes, Marathon-LB labels), then times
//! `skein_edge::compute` cold (an agent's first view, no route cache), and
//! `compute_cached` with the route cache an agent keeps between views
//! after the two changes a later view typically brings: one node's tasks
//! decoded anew (the agent's task cache gives every task of a node whose
//! keyspace changed a new spec, ~50 here, same content) and one task's
//! health flipped. Also `Routes::for_groups` plus the version digest (what
//! each long-poll answer costs) and the JSON an edge downloads, over three
//! shapes: every app on its own virtual host; two ports per app with
//! paths, a tenth of the apps contending for the same hosts; TCP service
//! ports only. There is no peer here to compare with: Marathon-LB
//! regenerated and reloaded a whole HAProxy config per change (seconds at
//! this size; its issues #563, #544).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_tests::arg;
use skein_edge::routes::{PortKey, ServicePort};
use skein_state::{Labels, NodeStatus, PortMapping, Protocol, TaskSpec, TaskView};

/// The skein binary's allocator, so that the figures are the agent's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// And its settings as an agent runs it (see crates/skein/src/main.rs).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 = &JEMALLOC_CONF[0];
const JEMALLOC_CONF: &[u8] = b"narenas:2,dirty_decay_ms:0,muzzy_decay_ms:0\0";

#[derive(Clone, Copy)]
enum Shape {
    Vhosts,
    PathsContended,
    TcpPorts,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Vhosts => "one vhost per app",
            Shape::PathsContended => "2 ports, paths, 10% contended hosts",
            Shape::TcpPorts => "tcp service ports only",
        }
    }
}

fn cluster(
    apps: usize,
    tasks: usize,
    shape: Shape,
) -> (Vec<TaskView>, BTreeMap<PortKey, ServicePort>) {
    let mut out = Vec::with_capacity(apps * tasks);
    let mut ports = BTreeMap::new();
    for a in 0..apps {
        let app = format!("/team{}/app{a}", a % 50);
        let mut labels = Labels::new();
        labels.insert("HAPROXY_GROUP", "external");
        let port_count = match shape {
            Shape::Vhosts => {
                labels.insert("HAPROXY_0_VHOST", format!("app{a}.example.com"));
                1
            }
            Shape::PathsContended => {
                let host = if a % 10 == 0 { 0 } else { a };
                labels.insert("HAPROXY_0_VHOST", format!("app{host}.example.com"));
                labels.insert("HAPROXY_0_PATH", "/api");
                labels.insert("HAPROXY_1_MODE", "http");
                labels.insert("HAPROXY_1_PATH", format!("/static{a}"));
                2
            }
            Shape::TcpPorts => 1,
        };
        for n in 0..port_count {
            ports.insert(
                (app.clone(), n),
                ServicePort {
                    port: (10_000 + a * port_count + n) as u16,
                    since: a as u64,
                    settled: true,
                },
            );
        }
        for t in 0..tasks {
            out.push(TaskView {
                id: format!("app{a}.{t}"),
                node_id: format!("node{}", (a + t) % 1000),
                node_status: NodeStatus::Alive,
                healthy: t != 0 || a % 7 != 0,
                spec: Arc::new(TaskSpec {
                    app: app.clone(),
                    framework: "marathon".into(),
                    ip: std::net::IpAddr::from([
                        10,
                        (t % 250) as u8,
                        (a / 250 % 250) as u8,
                        (a % 250) as u8,
                    ]),
                    ports: (0..port_count)
                        .map(|n| PortMapping {
                            name: None,
                            port: 8080 + n as u16,
                            protocol: Protocol::Tcp,
                            labels: Labels::new(),
                        })
                        .collect(),
                    health_check: None,
                    labels: labels.clone(),
                }),
            });
        }
    }
    (out, ports)
}

/// This process's CPU time, every thread's (a first view's apps are built
/// on several): what a figure costs even when other processes share the
/// cores (wall time is printed too).
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One later view's computation with the agent's route cache: wall and
/// CPU time, and the routes (dropped by the caller, outside the timing).
fn timed_view(
    tasks: &[TaskView],
    ports: &BTreeMap<PortKey, ServicePort>,
    cache: &mut skein_edge::RouteCache,
) -> (Duration, Duration, skein_edge::Routes) {
    let (t, c) = (Instant::now(), cpu_now());
    let routes = skein_edge::compute_cached(
        &skein_edge::Input {
            tasks,
            service_ports: ports,
        },
        cache,
    );
    (t.elapsed(), cpu_now().saturating_sub(c), routes)
}

/// Minor page faults of this process so far (fresh pages the kernel zeroed).
fn minor_faults() -> i64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_minflt
}

/// Gives every arena's freed pages back to the kernel.
fn purge() {
    // SAFETY: `arena.<MALLCTL_ARENAS_ALL>.purge` takes no value.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
}

/// Bytes the allocator has handed out and not got back.
fn allocated() -> i64 {
    let read = |name: &std::ffi::CStr| {
        let mut v: usize = 0;
        let mut len = std::mem::size_of::<usize>();
        // SAFETY: jemalloc controls of type size_t / uint64_t, read into one.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut v as *mut usize).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        v
    };
    let mut epoch: u64 = 1;
    // SAFETY: writing `epoch` (a uint64_t) refreshes the statistics.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"epoch".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&mut epoch as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
    read(c"stats.allocated") as i64
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let apps = arg("--apps", 10_000);
    let tasks_per_app = arg("--tasks", 5);
    let runs = arg("--runs", 20).max(1);
    println!("edge-routes-bench: {apps} apps x {tasks_per_app} tasks, median of {runs} runs");
    // EDGE_BENCH_SHAPE=vhosts runs the first shape alone (for profiling).
    let shapes: Vec<Shape> = match std::env::var("EDGE_BENCH_SHAPE").ok().as_deref() {
        Some("vhosts") => vec![Shape::Vhosts],
        _ => vec![Shape::Vhosts, Shape::PathsContended, Shape::TcpPorts],
    };
    for shape in shapes {
        let (tasks, ports) = cluster(apps, tasks_per_app, shape);
        let input = skein_edge::Input {
            tasks: &tasks,
            service_ports: &ports,
        };
        // EDGE_BENCH_COLD=1: first views only (for profiling them).
        if std::env::var_os("EDGE_BENCH_COLD").is_some() {
            let mut cpu = Vec::new();
            let mut wall = Vec::new();
            let mut faulted = Vec::new();
            let mut live = Vec::new();
            for _ in 0..runs {
                let mut first = skein_edge::RouteCache::default();
                // Every freed page given back: the first view runs on
                // fresh memory, as in a new agent, whatever the decay.
                purge();
                let before = allocated();
                let faults = minor_faults();
                let (t, c) = (Instant::now(), cpu_now());
                let fresh = skein_edge::compute_cached(&input, &mut first);
                wall.push(t.elapsed());
                cpu.push(cpu_now().saturating_sub(c));
                faulted.push(minor_faults() - faults);
                live.push(allocated() - before);
                drop((first, fresh));
            }
            faulted.sort_unstable();
            live.sort_unstable();
            println!(
                "  {:<38} first view {:>6.2} ms wall {:>6.2} ms CPU, {} pages faulted in, {:.1} MB kept (routes and cache)",
                shape.name(),
                ms(median(wall)),
                ms(median(cpu)),
                faulted[faulted.len() / 2],
                live[live.len() / 2] as f64 / 1e6,
            );
            continue;
        }
        let mut compute = Vec::new();
        let mut compute_cpu = Vec::new();
        let mut answer = Vec::new();
        let mut node_change = Vec::new();
        let mut node_change_cpu = Vec::new();
        // What an agent sends an edge that has the previous version.
        let mut delta_answer = Vec::new();
        let mut delta_bytes = Vec::new();
        let mut flip = Vec::new();
        let mut flip_cpu = Vec::new();
        let mut added = Vec::new();
        let mut ports = ports.clone();
        // An agent keeps its route cache between views.
        let mut cache = skein_edge::RouteCache::default();
        let mut changing = tasks.clone();
        let mut warm = Some(skein_edge::compute_cached(
            &skein_edge::Input {
                tasks: &changing,
                service_ports: &ports,
            },
            &mut cache,
        ));
        let mut routes = skein_edge::compute(&input);
        for run in 0..runs {
            // An agent's first view: the routes and the route cache it
            // keeps (dropped here outside the timing).
            let mut first = skein_edge::RouteCache::default();
            let (t, c) = (Instant::now(), cpu_now());
            let fresh = skein_edge::compute_cached(&input, &mut first);
            compute.push(t.elapsed());
            compute_cpu.push(cpu_now().saturating_sub(c));
            drop(first);
            // The previous routes are dropped outside the timing, as an
            // agent drops an old view's after the new one is published.
            routes = fresh;
            let t = Instant::now();
            let doc = skein_edge::EdgeDoc::new(routes.for_groups(&["external".to_string()]));
            answer.push(t.elapsed());
            std::hint::black_box(doc);

            // Every task of one node decoded anew, as the agent's task
            // cache does when anything in that node's keyspace changed.
            let node = format!("node{}", (run * 389) % 1000);
            for t in changing.iter_mut().filter(|t| t.node_id == node) {
                t.spec = Arc::new((*t.spec).clone());
            }
            let (wall, cpu, fresh) = timed_view(&changing, &ports, &mut cache);
            node_change.push(wall);
            node_change_cpu.push(cpu);
            drop(warm.replace(fresh));

            // One task's health check flips.
            let i = (run * 7919) % changing.len();
            changing[i].healthy = !changing[i].healthy;
            let (wall, cpu, fresh) = timed_view(&changing, &ports, &mut cache);
            if let Some(before) = &warm {
                let t = Instant::now();
                let delta = skein_edge::EdgeDelta::between(before, 1, &fresh, 2);
                let json = serde_json::to_vec(&delta).unwrap_or_default();
                delta_answer.push(t.elapsed());
                delta_bytes.push(json.len());
            }
            flip.push(wall);
            flip_cpu.push(cpu);
            drop(warm.replace(fresh));

            // A new app (its tasks and its service ports), the newest: the
            // conflict pass runs again over every app port.
            let (new_tasks, new_ports) = cluster(1, tasks_per_app, shape);
            let app = format!("/new/app{run}");
            for mut t in new_tasks {
                Arc::make_mut(&mut t.spec).app = app.clone();
                t.id = format!("new{run}.{}", t.id);
                changing.push(t);
            }
            for ((_, n), mut p) in new_ports {
                p.port = 20_000 + (run * 2 + n) as u16;
                p.since = (apps + run) as u64;
                ports.insert((app.clone(), n), p);
            }
            let c = cpu_now();
            let fresh = skein_edge::compute_cached(
                &skein_edge::Input {
                    tasks: &changing,
                    service_ports: &ports,
                },
                &mut cache,
            );
            added.push(cpu_now().saturating_sub(c));
            drop(warm.replace(fresh));
        }
        // The cached computation gave what computing afresh gives.
        let fresh = skein_edge::compute(&skein_edge::Input {
            tasks: &changing,
            service_ports: &ports,
        });
        assert!(
            warm.as_ref() == Some(&fresh),
            "the route cache changed the routes"
        );
        let servers: usize = routes.backends.iter().map(|b| b.servers.len()).sum();
        let doc = serde_json::to_vec(&routes).unwrap_or_default();
        // What an edge pays to read a whole route document (each change,
        // while the documents are whole).
        let mut parse = Vec::new();
        for _ in 0..runs.min(5) {
            let t = Instant::now();
            let read: Result<skein_edge::Routes, _> = serde_json::from_slice(&doc);
            parse.push(t.elapsed());
            assert!(
                read.is_ok_and(|r| r == routes),
                "the JSON reads back as the routes"
            );
        }
        println!(
            "  {:<38} {:>6} backends {:>6} servers {:>6} routes {:>5} problems, JSON {:.1} MB (read by an edge in {:.1} ms)",
            shape.name(),
            routes.backends.len(),
            servers,
            routes.http_routes.len(),
            routes.problems.len(),
            doc.len() as f64 / 1e6,
            ms(median(parse)),
        );
        println!(
            "      cold compute {:>6.2} ms wall {:>6.2} ms CPU; after one node's tasks re-decoded {:>5.2} ms wall {:>5.2} ms CPU, after a health flip {:>5.2} ms wall {:>5.2} ms CPU, after an app added {:>5.2} ms CPU (target <= 20); long-poll answer {:>6.2} ms; its delta (the health flip) {:>5.2} ms to compute and encode, {} bytes",
            ms(median(compute)),
            ms(median(compute_cpu)),
            ms(median(node_change)),
            ms(median(node_change_cpu)),
            ms(median(flip)),
            ms(median(flip_cpu)),
            ms(median(added)),
            ms(median(answer)),
            ms(median(delta_answer)),
            {
                delta_bytes.sort_unstable();
                delta_bytes.get(delta_bytes.len() / 2).copied().unwrap_or(0)
            },
        );
    }
}
