use std::sync::Arc;

use proptest::prelude::*;
use skein_state::{Labels, PortMapping, Protocol, TaskSpec};

use super::*;

fn task(id: &str, node: &str, app: &str, ports: &[u16], labels: &[(&str, &str)]) -> TaskView {
    TaskView {
        id: id.into(),
        node_id: node.into(),
        node_status: NodeStatus::Alive,
        healthy: true,
        spec: Arc::new(TaskSpec {
            app: app.into(),
            framework: "marathon".into(),
            ip: "10.0.0.9".parse().expect("ip"),
            ports: ports
                .iter()
                .map(|p| PortMapping {
                    name: None,
                    port: *p,
                    protocol: Protocol::Tcp,
                    labels: Labels::new(),
                })
                .collect(),
            health_check: None,
            labels: labels.iter().map(|(k, v)| (*k, *v)).collect(),
        }),
    }
}

fn sp(port: u16, since: u64) -> ServicePort {
    ServicePort {
        port,
        since,
        settled: true,
    }
}

#[test]
fn the_seed_articles_app_and_a_vhost() {
    let tasks = vec![
        task(
            "httpi.1",
            "n2",
            "/httpi",
            &[9896],
            &[
                ("HAPROXY_GROUP", "external"),
                ("HAPROXY_0_MODE", "http"),
                ("HAPROXY_0_PORT", "3141"),
                ("HAPROXY_0_VHOST", "httpi.example.com"),
            ],
        ),
        task(
            "httpi.2",
            "n3",
            "/httpi",
            &[9896],
            &[
                ("HAPROXY_GROUP", "external"),
                ("HAPROXY_0_MODE", "http"),
                ("HAPROXY_0_PORT", "3141"),
                ("HAPROXY_0_VHOST", "httpi.example.com"),
            ],
        ),
        task("plain.1", "n1", "/plain", &[5000], &[]),
    ];
    let ports = BTreeMap::from([(("/httpi".to_string(), 0), sp(10042, 1))]);
    let r = compute(&Input {
        tasks: &tasks,
        service_ports: &ports,
    });
    assert_eq!(r.backends.len(), 1, "{r:?}");
    let b = &r.backends[0];
    // The bind port names the backend, as in Marathon-LB.
    assert_eq!(b.name, "httpi_3141");
    assert_eq!((b.bind_port, b.service_port), (Some(3141), Some(10042)));
    assert_eq!(b.servers.len(), 2);
    assert_eq!(b.servers[0].name(), "n2_10.0.0.9_9896");
    assert_eq!(
        r.http_routes,
        vec![HttpRoute {
            host: Some("httpi.example.com".into()),
            path: None,
            backend: "httpi_3141".into()
        }]
    );
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn unhealthy_and_down_servers_are_marked() {
    let labels = [("HAPROXY_GROUP", "external")];
    let mut sick = task("a.2", "n2", "/a", &[80], &labels);
    sick.healthy = false;
    let mut gone = task("a.3", "n3", "/a", &[80], &labels);
    gone.node_status = NodeStatus::Suspect;
    let tasks = vec![task("a.1", "n1", "/a", &[80], &labels), sick, gone];
    let r = compute(&Input {
        tasks: &tasks,
        service_ports: &BTreeMap::new(),
    });
    let states: Vec<ServerState> = r.backends[0].servers.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        vec![
            ServerState::Up,
            ServerState::Unhealthy,
            ServerState::NodeDown
        ]
    );
    // No service port agreed yet: no port to bind, named by the port index.
    assert_eq!(r.backends[0].name, "a_p0");
    assert_eq!(r.backends[0].bind_port, None);
}

// ---- Properties ------------------------------------------------------------

/// One app of a generated cluster: a few ports, labels drawn from small
/// pools so that conflicts are common.
#[derive(Debug, Clone)]
struct App {
    name: String,
    ports: usize,
    /// Per port: (vhost, path, explicit port, group, a bad label).
    port_labels: Vec<PortDraw>,
    since: Option<u64>,
    tasks: usize,
}

type PortDraw = (Option<u8>, Option<u8>, Option<u8>, u8, bool);
/// (host, path) → who wants it: (age, app).
type Wanted = BTreeMap<(Option<String>, Option<String>), Vec<(Age, String)>>;
type Age = (bool, u64, String, usize);

fn app_strategy(i: usize) -> impl Strategy<Value = App> {
    (
        1usize..=2,
        prop::collection::vec(
            (
                prop::option::of(0u8..3),
                prop::option::of(0u8..2),
                prop::option::of(0u8..3),
                0u8..2,
                prop::bool::weighted(0.15),
            ),
            2,
        ),
        prop::option::of(0u64..20),
        1usize..=3,
    )
        .prop_map(move |(ports, port_labels, since, tasks)| App {
            name: format!("/app{i}"),
            ports,
            port_labels,
            since,
            tasks,
        })
}

fn cluster_strategy() -> impl Strategy<Value = Vec<App>> {
    (1usize..12).prop_flat_map(|n| (0..n).map(app_strategy).collect::<Vec<_>>())
}

const GROUPS: [&str; 2] = ["external", "internal"];

fn tasks_of(apps: &[App]) -> Vec<TaskView> {
    let mut out = Vec::new();
    for app in apps {
        let mut labels: Vec<(String, String)> = Vec::new();
        for (n, (vhost, path, port, group, bad)) in app.port_labels.iter().enumerate() {
            labels.push((format!("HAPROXY_{n}_GROUP"), GROUPS[*group as usize].into()));
            if let Some(v) = vhost {
                labels.push((format!("HAPROXY_{n}_VHOST"), format!("h{v}.example.com")));
            }
            if let Some(p) = path {
                labels.push((format!("HAPROXY_{n}_PATH"), format!("/p{p}")));
            }
            if let Some(p) = port {
                labels.push((
                    format!("HAPROXY_{n}_PORT"),
                    format!("{}", 3000 + u16::from(*p)),
                ));
            }
            if *bad {
                labels.push((format!("HAPROXY_{n}_BALANCE"), "fastest".into()));
            }
        }
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let ports: Vec<u16> = (0..app.ports).map(|p| 8000 + p as u16).collect();
        for t in 0..app.tasks {
            out.push(task(
                &format!("{}.{t}", &app.name[1..]),
                &format!("n{t}"),
                &app.name,
                &ports,
                &pairs,
            ));
        }
    }
    out
}

/// Service ports: app `i` port `n` gets `10000 + 2i + n` claimed at its
/// app's `since` (apps without one have no claim yet).
fn ports_of(apps: &[App]) -> BTreeMap<PortKey, ServicePort> {
    let mut out = BTreeMap::new();
    for (i, app) in apps.iter().enumerate() {
        if let Some(since) = app.since {
            for n in 0..app.ports {
                out.insert(
                    (app.name.clone(), n),
                    ServicePort {
                        port: 10000 + 2 * i as u16 + n as u16,
                        since,
                        settled: false,
                    },
                );
            }
        }
    }
    out
}

fn routes_of(apps: &[App]) -> Routes {
    let tasks = tasks_of(apps);
    let ports = ports_of(apps);
    compute(&Input {
        tasks: &tasks,
        service_ports: &ports,
    })
}

/// The age order of the model: claimed app ports first by `since`, then
/// by name and port.
fn age(app: &App, n: usize) -> Age {
    match app.since {
        Some(s) => (false, s, app.name.clone(), n),
        None => (true, 0, app.name.clone(), n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// No two backends bind one port; no two routes take one host and
    /// path; each contested one goes to the oldest app port that wants it
    /// and whose labels are good; the losers are reported.
    #[test]
    fn conflicts_go_to_the_oldest_and_are_reported(apps in cluster_strategy()) {
        let r = routes_of(&apps);
        let mut bound = BTreeSet::new();
        for b in &r.backends {
            if let Some(p) = b.bind_port {
                prop_assert!(bound.insert(p), "port {} bound twice", p);
            }
        }
        let mut keys = BTreeSet::new();
        let by_name: BTreeMap<&str, &Backend> =
            r.backends.iter().map(|b| (b.name.as_str(), b)).collect();
        for route in &r.http_routes {
            prop_assert!(keys.insert((route.host.clone(), route.path.clone())));
            let b = by_name.get(route.backend.as_str());
            prop_assert!(b.is_some_and(|b| b.labels.mode == Mode::Http));
        }
        // The model: who wants each host and path, oldest first.
        let mut wanted: Wanted = BTreeMap::new();
        for app in &apps {
            for n in 0..app.ports {
                let (vhost, path, _, _, bad) = app.port_labels[n];
                if bad || (vhost.is_none() && path.is_none()) {
                    continue;
                }
                let host = vhost.map(|v| format!("h{v}.example.com"));
                let path = path.map(|p| format!("/p{p}"));
                wanted.entry((host, path)).or_default().push((age(app, n), app.name.clone()));
            }
        }
        for (key, mut claimants) in wanted {
            claimants.sort();
            let route = r.http_routes.iter().find(|r| (r.host.clone(), r.path.clone()) == key);
            let route = route.expect("a wanted route is served");
            let winner = by_name[route.backend.as_str()];
            prop_assert_eq!(&winner.app, &claimants[0].1, "{:?}", key);
            for (_, loser) in &claimants[1..] {
                prop_assert!(
                    r.problems.iter().any(|p| &p.app == loser && p.message.contains("already routed")),
                    "{} lost {:?} silently", loser, key
                );
            }
        }
    }

    /// A bad label disables its own app port only: the same cluster with
    /// the bad app ports' labels removed altogether serves exactly the same
    /// backends and routes for every other app port.
    #[test]
    fn bad_labels_are_isolated(apps in cluster_strategy()) {
        let r = routes_of(&apps);
        let mut clean = apps.clone();
        for app in &mut clean {
            for l in &mut app.port_labels {
                if l.4 {
                    // Not exposed at all instead of badly labelled.
                    *l = (None, None, None, l.3, false);
                }
            }
        }
        // Ports that were bad are now plain TCP ports on their group;
        // compare everything else.
        let bad: BTreeSet<(String, usize)> = apps
            .iter()
            .flat_map(|a| (0..a.ports).filter(|n| a.port_labels[*n].4).map(|n| (a.name.clone(), n)))
            .collect();
        let c = routes_of(&clean);
        let keep = |b: &&Backend| !bad.contains(&(b.app.clone(), b.port_index));
        let before: Vec<&Backend> = r.backends.iter().filter(keep).collect();
        let after: Vec<&Backend> = c.backends.iter().filter(keep).collect();
        // The formerly bad ports are plain TCP ports on their own service
        // ports now, which no one else wanted: everything else is equal.
        prop_assert_eq!(before, after);
        prop_assert_eq!(&r.http_routes, &c.http_routes);
        for b in &r.backends {
            prop_assert!(!bad.contains(&(b.app.clone(), b.port_index)), "bad port served: {}", b.name);
        }
        for p in bad {
            prop_assert!(r.problems.iter().any(|x| x.app == p.0 && x.port_index == Some(p.1) && x.disables));
        }
    }

    /// Adding a newer app (its claim after every other) changes nothing
    /// that older app ports hold: bind ports, routes, servers.
    #[test]
    fn a_newer_app_moves_nothing_older(apps in cluster_strategy(), extra in app_strategy(99)) {
        let mut older = apps.clone();
        for a in &mut older {
            a.since = Some(a.since.unwrap_or(0));
        }
        let before = routes_of(&older);
        let mut with = older.clone();
        let mut newest = extra;
        newest.since = Some(1_000);
        with.push(newest);
        let after = routes_of(&with);
        for b in &before.backends {
            let a = after.backends.iter().find(|x| x.name == b.name);
            prop_assert_eq!(Some(b), a, "{} changed", b.name);
        }
        for route in &before.http_routes {
            prop_assert!(after.http_routes.contains(route), "{:?} lost", route);
        }
    }

    /// The label cache changes nothing: after any sequence of clusters,
    /// computing with the cache gives what computing afresh gives.
    #[test]
    fn the_label_cache_is_transparent(steps in prop::collection::vec(cluster_strategy(), 1..5)) {
        let mut cache = LabelCache::default();
        let mut kept: Vec<TaskView> = Vec::new();
        for apps in steps {
            // Keep the previous step's tasks (same specs) where the app is
            // unchanged in name, as an agent shares unchanged specs.
            let mut tasks = tasks_of(&apps);
            for t in tasks.iter_mut() {
                if let Some(old) = kept.iter().find(|o| o.id == t.id && o.spec == t.spec) {
                    t.spec = old.spec.clone();
                }
            }
            let ports = ports_of(&apps);
            let input = Input { tasks: &tasks, service_ports: &ports };
            prop_assert_eq!(compute_cached(&input, &mut cache), compute(&input));
            kept = tasks;
        }
    }

    /// Every node computes the same routes whatever order its tasks are in;
    /// an edge's groups select exactly the backends in them.
    #[test]
    fn deterministic_and_grouped(apps in cluster_strategy(), seed in any::<u64>()) {
        let mut tasks = tasks_of(&apps);
        let ports = ports_of(&apps);
        let r = compute(&Input { tasks: &tasks, service_ports: &ports });
        // A deterministic shuffle.
        let len = tasks.len();
        let mut s = seed;
        for i in (1..len).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            tasks.swap(i, (s >> 33) as usize % (i + 1));
        }
        let shuffled = compute(&Input { tasks: &tasks, service_ports: &ports });
        prop_assert_eq!(&r, &shuffled);
        prop_assert_eq!(r.version(), shuffled.version());
        let external = r.for_groups(&["external".to_string()]);
        prop_assert!(external.backends.iter().all(|b| b.labels.groups.contains(&"external".to_string())));
        let n = r.backends.iter().filter(|b| b.labels.groups.contains(&"external".to_string())).count();
        prop_assert_eq!(external.backends.len(), n);
        prop_assert!(external.http_routes.iter().all(|h| external.backends.iter().any(|b| b.name == h.backend)));
    }
}
