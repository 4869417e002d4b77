use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use skein_state::{Labels, PortMapping, Protocol, TaskSpec};

use super::*;

// ---- The computation before the route cache ---------------------------------
/// An exposed app port on its way to a backend.
struct Candidate<'a> {
    app: &'a str,
    index: usize,
    labels: Arc<PortLabels>,
    app_name: Arc<str>,
    service: Option<ServicePort>,
    tasks: &'a [&'a TaskView],
}

impl Candidate<'_> {
    /// Older first: settled claims, then the oldest; app ports without a
    /// claim yet after every one with, by name.
    /// Ties broken by `(app, index)`.
    fn rank(&self) -> (bool, bool, u64) {
        match self.service {
            Some(s) => (false, !s.settled, s.since),
            None => (true, true, 0),
        }
    }
}

fn ref_problem(app: &str, index: Option<usize>, p: LabelProblem) -> Problem {
    Problem {
        app: app.to_string(),
        port_index: index,
        label: Some(p.label),
        message: p.message,
        disables: p.disables,
    }
}

/// The from-scratch computation as it was before the route cache (labels
/// read for every app, every time): what `compute` must still give.
fn reference(input: &Input<'_>) -> Routes {
    let mut problems = Vec::new();

    // Tasks by app, each app's in (node, id) order: the first task's labels
    // are the app's (tasks of one app normally carry the same).
    // Hashed, not ordered: what comes out is sorted (by age, by name).
    // Sized up front: growing these maps rehashes every entry.
    let mut by_app: FastMap<&str, Vec<&TaskView>> =
        FastMap::with_capacity_and_hasher(input.tasks.len() / 2 + 1, Default::default());
    for t in input.tasks {
        if !t.spec.labels.is_empty() || by_app.contains_key(t.spec.app.as_str()) {
            by_app
                .entry(t.spec.app.as_str())
                .or_insert_with(|| Vec::with_capacity(8))
                .push(t);
        }
    }
    let service_ports: FastMap<(&str, usize), ServicePort> = input
        .service_ports
        .iter()
        .map(|((app, n), p)| ((app.as_str(), *n), *p))
        .collect();
    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(by_app.len());
    let by_app: Vec<(&str, Vec<&TaskView>)> = by_app
        .into_iter()
        .map(|(app, mut tasks)| {
            // An agent's tasks come in (node, id) order already: check
            // before sorting.
            fn key<'t>(t: &&'t TaskView) -> (&'t str, &'t str) {
                (t.node_id.as_str(), t.id.as_str())
            }
            if !tasks.is_sorted_by(|a, b| key(a) <= key(b)) {
                tasks.sort_by(|a, b| key(a).cmp(&key(b)));
            }
            (app, tasks)
        })
        .collect();
    for (app, tasks) in &by_app {
        let first = tasks[0];
        if first.spec.labels.is_empty() {
            continue;
        }
        if let Some(odd) = tasks.iter().find(|t| t.spec.labels != first.spec.labels) {
            problems.push(labels_differ(app, first, odd));
        }
        let app_name: Arc<str> = labels::backend_app_name(&first.spec.app).into();
        for p in labels::app_problems(&first.spec.labels, first.spec.ports.len()) {
            problems.push(ref_problem(app, None, p));
        }
        for index in 0..first.spec.ports.len() {
            match labels::parse_port(&first.spec.labels, index) {
                PortOutcome::NotExposed => {}
                PortOutcome::Disabled { problems: ps } => {
                    problems.extend(ps.into_iter().map(|p| ref_problem(app, Some(index), p)));
                }
                PortOutcome::Exposed {
                    labels,
                    problems: ps,
                } => {
                    let labels = Arc::new(labels);
                    problems.extend(ps.into_iter().map(|p| ref_problem(app, Some(index), p)));
                    let service = service_ports.get(&(*app, index)).copied();
                    candidates.push(Candidate {
                        app,
                        index,
                        labels: labels.clone(),
                        app_name: app_name.clone(),
                        service,
                        tasks,
                    });
                }
            }
        }
    }
    // Indices sorted, not candidates: a candidate is large.
    let mut by_age: Vec<usize> = (0..candidates.len()).collect();
    {
        // Keys computed once, not per comparison.
        let keys: Vec<(bool, bool, u64)> = candidates.iter().map(Candidate::rank).collect();
        by_age.sort_by(|&a, &b| {
            keys[a].cmp(&keys[b]).then_with(|| {
                (candidates[a].app, candidates[a].index)
                    .cmp(&(candidates[b].app, candidates[b].index))
            })
        });
    }

    // First pass, oldest first, by reference: names, bind ports and HTTP
    // routes, each contested one kept by the older app port.
    struct Decided {
        name: String,
        bind_port: Option<u16>,
    }
    let mut decided: Vec<Decided> = Vec::with_capacity(candidates.len());
    let n = candidates.len();
    let mut http_routes: Vec<(i32, u8, usize, usize, usize)> = Vec::with_capacity(n);
    let mut route_keys: Vec<(Option<&str>, Option<&str>)> = Vec::with_capacity(n);
    // Bind port → the index of the backend holding it; likewise routes.
    let mut bound: FastMap<u16, usize> = FastMap::with_capacity_and_hasher(n, Default::default());
    let mut routed: FastMap<(Option<&str>, Option<&str>), usize> =
        FastMap::with_capacity_and_hasher(n, Default::default());
    let mut names: FastSet<u64> = FastSet::with_capacity_and_hasher(n, Default::default());
    for (order, &i) in by_age.iter().enumerate() {
        let c = &candidates[i];
        let wanted_port = c.labels.bind_port.or(c.service.map(|s| s.port));
        // `<app>_<port>`, or `<app>_p<index>` while it has no port; built
        // by hand: this runs for every app port of every view.
        let app_name = &c.app_name;
        let mut name = String::with_capacity(app_name.len() + 8);
        name.push_str(app_name);
        match wanted_port {
            Some(p) => {
                name.push('_');
                push_number(&mut name, p.into());
            }
            None => {
                name.push_str("_p");
                push_number(&mut name, c.index);
            }
        }
        // Two apps whose ids clean to one name (`/a/b`, `/a_b`) on one port:
        // the younger gets its port index appended. Names are remembered by
        // their hash (no copy); a hash shared by two different names only
        // renames the younger, deterministically.
        if !names.insert(fnv(name.as_bytes())) {
            name.push('_');
            push_number(&mut name, c.index);
            names.insert(fnv(name.as_bytes()));
        }
        let mut lose = |label: &str, message: String| {
            problems.push(Problem {
                app: c.app.to_string(),
                port_index: Some(c.index),
                label: Some(format!("HAPROXY_{}_{label}", c.index)),
                message,
                disables: true,
            });
        };
        let bind_port = match wanted_port {
            Some(p) => match bound.get(&p) {
                Some(&holder) => {
                    let holder = &decided[holder].name;
                    lose(
                        "PORT",
                        format!("port {p} is already bound for the older {holder}"),
                    );
                    None
                }
                None => {
                    bound.insert(p, order);
                    Some(p)
                }
            },
            None => None,
        };
        if c.labels.mode == Mode::Http {
            let path = c.labels.path.as_deref();
            let any_host = [None];
            let hosts: Vec<Option<&str>> = if c.labels.vhosts.is_empty() {
                if path.is_some() {
                    any_host.to_vec()
                } else {
                    Vec::new()
                }
            } else {
                c.labels.vhosts.iter().map(|h| Some(&**h)).collect()
            };
            for host in hosts {
                let key = (host, path);
                if let Some(&holder) = routed.get(&key) {
                    let holder = if holder == order {
                        &name
                    } else {
                        &decided[holder].name
                    };
                    let what = match key {
                        (Some(h), Some(p)) => format!("{h}{p}"),
                        (Some(h), None) => h.to_string(),
                        (None, Some(p)) => format!("path {p}"),
                        (None, None) => String::new(),
                    };
                    lose(
                        if host.is_some() { "VHOST" } else { "PATH" },
                        format!("{what} is already routed to the older {holder}"),
                    );
                    continue;
                }
                routed.insert(key, order);
                let specificity = match host {
                    Some(h) if h.starts_with("*.") => 1,
                    Some(_) => 0,
                    None => 2,
                };
                let path_len = path.map_or(0, str::len);
                http_routes.push((
                    -c.labels.backend_weight,
                    specificity,
                    usize::MAX - path_len,
                    order,
                    route_keys.len(),
                ));
                route_keys.push(key);
            }
        }
        decided.push(Decided { name, bind_port });
    }
    http_routes.sort_unstable();
    let http_routes: Vec<HttpRoute> = http_routes
        .into_iter()
        .map(|(_, _, _, order, key)| {
            let (host, path) = route_keys[key];
            HttpRoute {
                host: host.map(Arc::from),
                path: path.map(Arc::from),
                backend: decided[order].name.as_str().into(),
            }
        })
        .collect();
    drop(route_keys);
    drop(routed);

    // Second pass: the backends, taking the labels over.
    let mut slots: Vec<Option<Candidate<'_>>> = candidates.into_iter().map(Some).collect();
    // Node names, one allocation each however many servers they run.
    let mut nodes: FastMap<&str, Arc<str>> = FastMap::default();
    let backends: Vec<Arc<Backend>> = by_age
        .iter()
        .zip(decided)
        .filter_map(|(&i, d)| Some((slots[i].take()?, d)))
        .map(|(c, d)| {
            // The app's tasks are in (node, id) order already.
            let servers: Vec<Server> = c
                .tasks
                .iter()
                .filter_map(|t| {
                    let port = t.spec.ports.get(c.index)?.port;
                    let state = if t.node_status != NodeStatus::Alive {
                        ServerState::NodeDown
                    } else if !t.healthy {
                        ServerState::Unhealthy
                    } else {
                        ServerState::Up
                    };
                    let node = nodes
                        .entry(t.node_id.as_str())
                        .or_insert_with(|| Arc::from(t.node_id.as_str()))
                        .clone();
                    Some(Server {
                        addr: SocketAddr::new(t.spec.ip, port),
                        node,
                        state,
                    })
                })
                .collect();
            Arc::new(Backend {
                name: d.name.into(),
                app: Arc::from(c.app),
                port_index: c.index,
                service_port: c.service.map(|s| s.port),
                bind_port: d.bind_port,
                labels: c.labels,
                servers,
            })
        })
        .collect();
    problems.sort();
    problems.dedup();
    Routes {
        backends,
        http_routes,
        problems,
    }
}

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
    assert_eq!(&*b.name, "httpi_3141");
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
    assert_eq!(&*r.backends[0].name, "a_p0");
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

/// An app's labels as its tasks carry them.
fn labels_of(port_labels: &[PortDraw]) -> Labels {
    let mut labels = Labels::new();
    for (n, (vhost, path, port, group, bad)) in port_labels.iter().enumerate() {
        labels.insert(format!("HAPROXY_{n}_GROUP"), GROUPS[*group as usize]);
        if let Some(v) = vhost {
            labels.insert(format!("HAPROXY_{n}_VHOST"), format!("h{v}.example.com"));
        }
        if let Some(p) = path {
            labels.insert(format!("HAPROXY_{n}_PATH"), format!("/p{p}"));
        }
        if let Some(p) = port {
            labels.insert(
                format!("HAPROXY_{n}_PORT"),
                format!("{}", 3000 + u16::from(*p)),
            );
        }
        if *bad {
            labels.insert(format!("HAPROXY_{n}_BALANCE"), "fastest");
        }
    }
    labels
}

/// Task `t` of an app: on node `n{t}`.
fn task_of(app: &App, t: usize, labels: &Labels) -> TaskView {
    let mut task = task(
        &format!("{}.{t}", &app.name[1..]),
        &format!("n{t}"),
        &app.name,
        &(0..app.ports).map(|p| 8000 + p as u16).collect::<Vec<_>>(),
        &[],
    );
    Arc::make_mut(&mut task.spec).labels = labels.clone();
    task
}

fn tasks_of(apps: &[App]) -> Vec<TaskView> {
    let mut out = Vec::new();
    for app in apps {
        let labels = labels_of(&app.port_labels);
        for t in 0..app.tasks {
            out.push(task_of(app, t, &labels));
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
            r.backends.iter().map(|b| (&*b.name, &**b)).collect();
        for route in &r.http_routes {
            prop_assert!(keys.insert((route.host.clone(), route.path.clone())));
            let b = by_name.get(&*route.backend);
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
            let route = r.http_routes.iter().find(|r| {
                (r.host.as_deref().map(str::to_string), r.path.as_deref().map(str::to_string)) == key
            });
            let route = route.expect("a wanted route is served");
            let winner = by_name[&*route.backend];
            prop_assert_eq!(&*winner.app, claimants[0].1.as_str(), "{:?}", key);
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
        let keep = |b: &&Arc<Backend>| !bad.contains(&(b.app.to_string(), b.port_index));
        let before: Vec<&Arc<Backend>> = r.backends.iter().filter(keep).collect();
        let after: Vec<&Arc<Backend>> = c.backends.iter().filter(keep).collect();
        // The formerly bad ports are plain TCP ports on their own service
        // ports now, which no one else wanted: everything else is equal.
        prop_assert_eq!(before, after);
        prop_assert_eq!(&r.http_routes, &c.http_routes);
        for b in &r.backends {
            prop_assert!(!bad.contains(&(b.app.to_string(), b.port_index)), "bad port served: {}", b.name);
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
        prop_assert!(external.http_routes.iter().all(|h| external.backends.iter().any(|b| *b.name == *h.backend)));
    }
}

// ---- The route cache over a sequence of changes ----------------------------

/// A change an agent's next view may bring.
#[derive(Debug, Clone)]
enum Change {
    /// A new app: named afresh, or so that its name cleans to another's
    /// (`/x/y`, `/x_y`), or without labels; `Same` joins an app's id with
    /// other labels (its tasks then disagree).
    AddApp(App, Naming),
    /// An app removed; its service ports kept (the agent's claims lag).
    RemoveApp(usize, bool),
    /// A service port claimed for the app the next `AddApp` adds.
    ServicePortAhead(u64),
    /// Every task of one node decoded anew (new specs, same content), as
    /// the agent's task cache does when that node's keyspace changed.
    Redecode(u8),
    HealthFlip(usize),
    NodeStatus(u8, u8),
    Labels(usize, Vec<PortDraw>),
    /// One task's labels only: its app's tasks disagree.
    OneTaskLabels(usize, Vec<PortDraw>),
    ServicePort(usize, Option<u64>, bool, u8),
    AddTask(usize, usize),
    RemoveTask(usize),
    /// A task moved within the input.
    MoveTask(usize, usize),
    /// Consecutive tasks removed (a node leaving).
    RemoveRun(usize, usize),
}

#[derive(Debug, Clone, Copy)]
enum Naming {
    Fresh,
    Slash,
    Underscore,
    Plain,
    Same,
}

fn draws() -> impl Strategy<Value = Vec<PortDraw>> {
    prop::collection::vec(
        (
            prop::option::of(0u8..3),
            prop::option::of(0u8..2),
            prop::option::of(0u8..3),
            0u8..2,
            prop::bool::weighted(0.15),
        ),
        2,
    )
}

fn change_strategy() -> impl Strategy<Value = Change> {
    let naming = prop_oneof![
        3 => Just(Naming::Fresh),
        1 => Just(Naming::Slash),
        1 => Just(Naming::Underscore),
        1 => Just(Naming::Plain),
        1 => Just(Naming::Same),
    ];
    prop_oneof![
        (app_strategy(0), naming).prop_map(|(a, n)| Change::AddApp(a, n)),
        (any::<usize>(), any::<bool>()).prop_map(|(i, keep)| Change::RemoveApp(i, keep)),
        (0u64..20).prop_map(Change::ServicePortAhead),
        (0u8..4).prop_map(Change::Redecode),
        any::<usize>().prop_map(Change::HealthFlip),
        (0u8..4, 0u8..3).prop_map(|(n, s)| Change::NodeStatus(n, s)),
        (any::<usize>(), draws()).prop_map(|(i, d)| Change::Labels(i, d)),
        (any::<usize>(), draws()).prop_map(|(i, d)| Change::OneTaskLabels(i, d)),
        (
            any::<usize>(),
            prop::option::of(0u64..20),
            any::<bool>(),
            0u8..16
        )
            .prop_map(|(i, s, settled, p)| Change::ServicePort(i, s, settled, p)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, at)| Change::AddTask(i, at)),
        any::<usize>().prop_map(Change::RemoveTask),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Change::MoveTask(a, b)),
        (any::<usize>(), 1usize..6).prop_map(|(a, n)| Change::RemoveRun(a, n)),
    ]
}

/// A cluster changing view by view, as an agent sees it.
struct Changing {
    tasks: Vec<TaskView>,
    ports: BTreeMap<PortKey, ServicePort>,
    /// For unique task ids and app names.
    counter: usize,
}

impl Changing {
    fn new(apps: &[App]) -> Changing {
        Changing {
            tasks: tasks_of(apps),
            ports: ports_of(apps),
            counter: 0,
        }
    }

    fn next(&mut self) -> usize {
        self.counter += 1;
        self.counter
    }

    /// The app of task `i` (modulo), if there are tasks.
    fn app_at(&self, i: usize) -> Option<String> {
        let len = self.tasks.len();
        (len > 0).then(|| self.tasks[i % len].spec.app.clone())
    }

    fn relabel(t: &mut TaskView, labels: &Labels) {
        let mut spec = (*t.spec).clone();
        spec.labels = labels.clone();
        t.spec = Arc::new(spec);
    }

    fn apply(&mut self, change: &Change) {
        let len = self.tasks.len();
        match change {
            Change::AddApp(app, naming) => {
                let k = self.next();
                let mut app = app.clone();
                let mut labels = labels_of(&app.port_labels);
                app.name = match naming {
                    Naming::Fresh => format!("/new{k}"),
                    Naming::Slash => "/x/y".into(),
                    Naming::Underscore => "/x_y".into(),
                    Naming::Plain => {
                        labels = Labels::new();
                        format!("/plain{k}")
                    }
                    Naming::Same => self.app_at(k).unwrap_or_else(|| format!("/new{k}")),
                };
                for t in 0..app.tasks {
                    let mut task = task_of(&app, t, &labels);
                    task.id = format!("t{}", self.next());
                    task.node_id = format!("n{}", (k + t) % 4);
                    self.tasks.push(task);
                }
                if let Some(since) = app.since {
                    for n in 0..app.ports {
                        if self.ports.contains_key(&(app.name.clone(), n)) {
                            continue;
                        }
                        self.ports.insert(
                            (app.name.clone(), n),
                            ServicePort {
                                port: 10000 + ((2 * k + n) % 24) as u16,
                                since,
                                settled: !k.is_multiple_of(3),
                            },
                        );
                    }
                }
            }
            Change::RemoveApp(i, keep_ports) => {
                if let Some(app) = self.app_at(*i) {
                    self.tasks.retain(|t| t.spec.app != app);
                    if !keep_ports {
                        self.ports.retain(|(a, _), _| *a != app);
                    }
                }
            }
            Change::ServicePortAhead(since) => {
                let app = format!("/new{}", self.counter + 1);
                self.ports.insert(
                    (app, 0),
                    ServicePort {
                        port: 10000 + (*since % 24) as u16,
                        since: *since,
                        settled: true,
                    },
                );
            }
            Change::Redecode(n) => {
                let node = format!("n{n}");
                for t in self.tasks.iter_mut().filter(|t| t.node_id == node) {
                    t.spec = Arc::new((*t.spec).clone());
                }
            }
            Change::HealthFlip(i) => {
                if len > 0 {
                    self.tasks[i % len].healthy ^= true;
                }
            }
            Change::NodeStatus(n, s) => {
                let node = format!("n{n}");
                let status =
                    [NodeStatus::Alive, NodeStatus::Suspect, NodeStatus::Down][*s as usize];
                for t in self.tasks.iter_mut().filter(|t| t.node_id == node) {
                    t.node_status = status;
                }
            }
            Change::Labels(i, d) => {
                if let Some(app) = self.app_at(*i) {
                    let labels = labels_of(d);
                    for t in self.tasks.iter_mut().filter(|t| t.spec.app == app) {
                        Self::relabel(t, &labels);
                    }
                }
            }
            Change::OneTaskLabels(i, d) => {
                if len > 0 {
                    Self::relabel(&mut self.tasks[i % len], &labels_of(d));
                }
            }
            Change::ServicePort(i, since, settled, port) => {
                if let Some(app) = self.app_at(*i) {
                    let count = self.tasks[i % len].spec.ports.len();
                    for n in 0..count {
                        let key = (app.clone(), n);
                        match since {
                            Some(since) => {
                                self.ports.insert(
                                    key,
                                    ServicePort {
                                        port: 10000 + u16::from(*port) + n as u16,
                                        since: *since,
                                        settled: *settled,
                                    },
                                );
                            }
                            None => {
                                self.ports.remove(&key);
                            }
                        }
                    }
                }
            }
            Change::AddTask(i, at) => {
                if len > 0 {
                    let k = self.next();
                    let mut t = self.tasks[i % len].clone();
                    t.id = format!("t{k}");
                    t.node_id = format!("n{}", k % 4);
                    t.spec = Arc::new((*t.spec).clone());
                    self.tasks.insert(at % (len + 1), t);
                }
            }
            Change::RemoveTask(i) => {
                if len > 0 {
                    self.tasks.remove(i % len);
                }
            }
            Change::MoveTask(a, b) => {
                if len > 0 {
                    let t = self.tasks.remove(a % len);
                    self.tasks.insert(b % len, t);
                }
            }
            Change::RemoveRun(a, n) => {
                if len > 0 {
                    let start = a % len;
                    self.tasks.drain(start..(start + n).min(len));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// `compute` gives what the computation before the route cache gave.
    #[test]
    fn compute_is_the_reference(apps in cluster_strategy(), seed in any::<u64>()) {
        let mut tasks = tasks_of(&apps);
        let mut s = seed;
        for i in (1..tasks.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            tasks.swap(i, (s >> 33) as usize % (i + 1));
        }
        let ports = ports_of(&apps);
        let input = Input { tasks: &tasks, service_ports: &ports };
        prop_assert_eq!(compute(&input), reference(&input));
    }

    /// The route cache changes nothing: after every change of a sequence
    /// (apps added and removed, nodes' tasks decoded anew, health and node
    /// status, labels, service ports, tasks added, removed and moved, names
    /// and routes in conflict), computing with the cache kept from the
    /// previous views gives what computing afresh gives.
    #[test]
    fn the_route_cache_is_transparent(
        apps in cluster_strategy(),
        changes in prop::collection::vec(change_strategy(), 1..16),
    ) {
        let mut cluster = Changing::new(&apps);
        let mut cache = RouteCache::default();
        let first = Input { tasks: &cluster.tasks, service_ports: &cluster.ports };
        prop_assert_eq!(compute_cached(&first, &mut cache), compute(&first));
        for change in &changes {
            cluster.apply(change);
            let input = Input { tasks: &cluster.tasks, service_ports: &cluster.ports };
            let cached = compute_cached(&input, &mut cache);
            let fresh = compute(&input);
            prop_assert_eq!(&cached, &fresh, "after {:?}", change);
            prop_assert_eq!(cached.version(), fresh.version());
            // The computation before the cache agrees too, unless tasks of
            // one app disagree on having labels at all: it then depended on
            // the input's order (it grouped an app's unlabelled tasks only
            // after a labelled one), `compute` takes the first task's.
            let mut labelled: BTreeMap<&str, BTreeSet<bool>> = BTreeMap::new();
            for t in &cluster.tasks {
                labelled.entry(t.spec.app.as_str()).or_default().insert(t.spec.labels.is_empty());
            }
            if labelled.values().all(|l| l.len() == 1) {
                prop_assert_eq!(&fresh, &reference(&input));
            }
        }
    }
}
