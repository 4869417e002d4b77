//! How soon a new named VIP works on other nodes: 5 agents in network
//! namespaces (nftables dataplane, DNS on), a TCP backend on every node, and
//! for each new VIP the time from the PUT of its task on one node until
//! another node (a) answers the task's Mesos-DNS A record, (b) answers the
//! VIP's name and (c) carries a TCP connection to `name:8080` through the
//! VIP to the backend, which greets it.
//!
//!   cargo build --release -p skein -p cluster-tests
//!   SKEIN_BIN=target/release/skein target/release/vip-latency-bench --vips 30
//!
//! Shapes: `--vips` VIPs one after another with the task PUT on node1 and
//! measured from node3; as many PUT on node2 and measured from node5; and
//! `--bursts` bursts of `--burst` VIPs PUT at the same moment on different
//! nodes, measured from node3. Every VIP name is new (`lat<k>`). The
//! observer polls every `--poll-ms`: DNS over UDP to its own agent, and a
//! fresh TCP connection per poll (one that started before the VIP's rule
//! existed is never rewritten by the kernel, so each poll is a new one).
//! At the end every node's `/v1/vips` must show the same, distinct address
//! for every VIP.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_tests::{enter_netns, wait_for, Cluster};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::AsyncReadExt;

const NODES: usize = 5;
const BACKEND_PORT: u16 = 9000;
const VIP_PORT: u16 = 8080;
const GREETING: &[u8] = b"skein-lat ";
/// A VIP that does not work within this long fails the bench.
const DEADLINE: Duration = Duration::from_secs(20);

struct Args {
    vips: usize,
    bursts: usize,
    burst: usize,
    poll: Duration,
    interval_ms: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        vips: 30,
        bursts: 4,
        burst: 5,
        poll: Duration::from_millis(2),
        interval_ms: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> anyhow::Result<u64> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--vips" => args.vips = value()? as usize,
            "--bursts" => args.bursts = value()? as usize,
            "--burst" => args.burst = value()? as usize,
            "--poll-ms" => args.poll = Duration::from_millis(value()?.max(1)),
            "--interval-ms" => args.interval_ms = value()?,
            other => bail!(
                "unknown flag {other}; use --vips N --bursts N --burst N --poll-ms MS --interval-ms MS"
            ),
        }
    }
    Ok(args)
}

use cluster_tests::{ms, percentile};

/// Times from the PUT until the observer answered or connected.
#[derive(Clone, Copy)]
struct Sample {
    a_record: Duration,
    vip_name: Duration,
    connect: Duration,
}

static QUERY_ID: AtomicU16 = AtomicU16::new(1);

fn query(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    Ok(q.to_vec()?)
}

/// One A query to the local agent's DNS: the addresses answered (none for
/// NXDOMAIN, NODATA or no answer within 200 ms).
async fn lookup(socket: &tokio::net::UdpSocket, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let id = QUERY_ID.fetch_add(1, Ordering::Relaxed);
    socket.send(&query(id, name)?).await?;
    let mut buf = [0u8; 1500];
    let wait = tokio::time::sleep(Duration::from_millis(200));
    tokio::pin!(wait);
    loop {
        let n = tokio::select! {
            n = socket.recv(&mut buf) => n?,
            _ = &mut wait => return Ok(vec![]),
        };
        if n < 12 || buf[..2] != id.to_be_bytes() {
            continue;
        }
        let reply = Message::from_vec(&buf[..n])?;
        if reply.metadata.response_code != ResponseCode::NoError {
            return Ok(vec![]);
        }
        return Ok(reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect());
    }
}

async fn dns_socket() -> anyhow::Result<tokio::net::UdpSocket> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect("127.0.0.1:53").await?;
    Ok(socket)
}

/// Polls until the observer's DNS answers `name` with `want` (or with
/// anything, when `want` is `None`); the time since `start` and the address.
async fn until_answered(
    name: &str,
    want: Option<Ipv4Addr>,
    start: Instant,
    poll: Duration,
) -> anyhow::Result<(Duration, Ipv4Addr)> {
    let socket = dns_socket().await?;
    loop {
        let ips = lookup(&socket, name).await?;
        let hit = match want {
            Some(w) => ips.contains(&w).then_some(w),
            None => ips.first().copied(),
        };
        if let Some(ip) = hit {
            return Ok((start.elapsed(), ip));
        }
        tokio::time::sleep(poll).await;
    }
}

/// One connection through the VIP: sends the instant the backend's
/// greeting arrived.
async fn attempt(ip: Ipv4Addr, done: tokio::sync::mpsc::UnboundedSender<Instant>) {
    let limit = Duration::from_millis(500);
    let addr = SocketAddr::from((ip, VIP_PORT));
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await
    else {
        return;
    };
    let mut buf = [0u8; 64];
    if let Ok(Ok(n)) = tokio::time::timeout(limit, stream.read(&mut buf)).await {
        if buf[..n].starts_with(GREETING) {
            let _ = done.send(Instant::now());
        }
    }
}

/// Resolves the VIP's name through the observer's DNS, then opens a new
/// connection to it every `poll` until one reaches the backend. Returns
/// when the name first resolved and when a connection first worked.
async fn until_connected(
    name: &str,
    start: Instant,
    poll: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let (resolved, mut ip) = until_answered(name, None, start, poll).await?;
    let socket = dns_socket().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut attempts = tokio::task::JoinSet::new();
    loop {
        attempts.spawn(attempt(ip, tx.clone()));
        tokio::select! {
            biased;
            Some(at) = rx.recv() => {
                attempts.abort_all();
                return Ok((resolved, at.duration_since(start)));
            }
            _ = tokio::time::sleep(poll) => {}
        }
        // Follow the name, should its address change.
        if let Some(now) = lookup(&socket, name).await?.first() {
            ip = *now;
        }
        while attempts.try_join_next().is_some() {}
    }
}

/// Starts observing one VIP from inside `netns`: a thread of its own with
/// a single-threaded runtime, so every socket it opens is in that namespace.
fn observe(
    netns: String,
    app: String,
    backend: Ipv4Addr,
    start: Instant,
    poll: Duration,
) -> std::thread::JoinHandle<anyhow::Result<Sample>> {
    std::thread::spawn(move || {
        enter_netns(&netns)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let a_name = format!("{app}.marathon.mesos.");
            let vip_name = format!("{app}.marathon.l4lb.thisdcos.directory.");
            let both = async {
                tokio::try_join!(
                    until_answered(&a_name, Some(backend), start, poll),
                    until_connected(&vip_name, start, poll)
                )
            };
            match tokio::time::timeout(DEADLINE, both).await {
                Ok(Ok(((a_record, _), (vip_name, connect)))) => Ok(Sample {
                    a_record,
                    vip_name,
                    connect,
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => bail!("{app}: not working from {netns} within {DEADLINE:?}"),
            }
        })
    })
}

/// A TCP backend in node `i`'s namespace that greets every connection.
fn backend(netns: String, ip: String) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let listener = enter_netns(&netns)
            .and_then(|()| Ok(std::net::TcpListener::bind((ip.as_str(), BACKEND_PORT))?));
        let listener = match listener {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        for stream in listener.incoming() {
            use std::io::Write;
            if let Ok(mut s) = stream {
                let _ = s.write_all(GREETING);
                let _ = s.write_all(ip.as_bytes());
            }
        }
    });
    ready_rx.recv().context("backend thread")?
}

struct Api {
    http: ureq::Agent,
    token: String,
    urls: Vec<String>,
}

impl Api {
    fn json(&self, i: usize, path: &str) -> anyhow::Result<serde_json::Value> {
        let mut r = self
            .http
            .get(&format!("{}{path}", self.urls[i - 1]))
            .call()?;
        Ok(r.body_mut().read_json()?)
    }

    fn put(&self, i: usize, path: &str, body: &str) -> anyhow::Result<u16> {
        let r = self
            .http
            .put(&format!("{}{path}", self.urls[i - 1]))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body)?;
        Ok(r.status().as_u16())
    }
}

struct Bench<'a> {
    c: &'a Cluster,
    api: &'a Api,
    poll: Duration,
    next: usize,
    created: Vec<String>,
}

impl Bench<'_> {
    /// PUTs new VIPs on `origins` (all at once) and measures each from
    /// `observer`; prints a progress line per VIP.
    fn round(&mut self, origins: &[usize], observer: usize) -> anyhow::Result<Vec<Sample>> {
        let jobs: Vec<(usize, String)> = origins
            .iter()
            .map(|&o| {
                let app = format!("lat{}", self.next);
                self.next += 1;
                (o, app)
            })
            .collect();
        let (c, api, poll) = (self.c, self.api, self.poll);
        let results: Vec<anyhow::Result<Sample>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(origin, app)| {
                    s.spawn(move || -> anyhow::Result<Sample> {
                        let backend_ip = format!("{}.{origin}", c.subnet);
                        let body = format!(
                            r#"{{"app":"/{app}","ip":"{backend_ip}","ports":[{{"port":{BACKEND_PORT},"protocol":"tcp","labels":{{"VIP_0":"/{app}:{VIP_PORT}"}}}}]}}"#
                        );
                        let start = Instant::now();
                        let watcher = observe(
                            c.node(observer).netns.clone(),
                            app.clone(),
                            backend_ip.parse()?,
                            start,
                            poll,
                        );
                        let code = api.put(*origin, &format!("/v1/tasks/{app}.1"), &body)?;
                        if code != 201 {
                            bail!("PUT {app} on node{origin} answered {code}");
                        }
                        watcher
                            .join()
                            .map_err(|_| anyhow::anyhow!("observer of {app} panicked"))?
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("PUT thread panicked")))
                })
                .collect()
        });
        let mut out = Vec::new();
        for ((origin, app), r) in jobs.iter().zip(results) {
            let s = r?;
            println!(
                "  {app:<6} node{origin} → node{observer}: A record {:>9}  VIP name {:>9}  VIP connect {:>9}",
                ms(s.a_record),
                ms(s.vip_name),
                ms(s.connect)
            );
            self.created.push(app.clone());
            out.push(s);
        }
        Ok(out)
    }
}

fn report(what: &str, samples: &[Sample]) {
    let sorted = |f: fn(&Sample) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        v
    };
    let a = sorted(|s| s.a_record);
    let name = sorted(|s| s.vip_name);
    let conn = sorted(|s| s.connect);
    println!("\n{what}, {} VIPs (from the PUT):", samples.len());
    println!("  {:<34} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
    for (label, v) in [
        ("task's A record answered", &a),
        ("VIP name answered", &name),
        ("TCP through the VIP to the backend", &conn),
    ] {
        println!(
            "  {:<34} {:>10} {:>10} {:>10}",
            label,
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0)),
            ms(*v.last().unwrap_or(&Duration::ZERO))
        );
    }
    let ratio =
        |p: f64| percentile(&conn, p).as_secs_f64() / percentile(&a, p).as_secs_f64().max(1e-9);
    println!(
        "  VIP connect / A record: p50 {:.2}x, p99 {:.2}x; VIP connect p99 vs target ≤ 250 ms: {:.2}x of target",
        ratio(50.0),
        ratio(99.0),
        percentile(&conn, 99.0).as_secs_f64() / 0.25
    );
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut c = Cluster::new(NODES)?;
    let token = "bench-token-0123456789abcdef".to_string();
    let token_file = c.dir.path().join("token");
    std::fs::write(&token_file, &token)?;
    let token_path = token_file.to_str().context("utf8")?.to_string();
    let interval = args.interval_ms.to_string();
    for i in 1..=NODES {
        let listen = format!("{}.{i}:62080", c.subnet);
        let flags = [
            "--api-listen",
            &listen,
            "--api-token-file",
            &token_path,
            "--gossip-interval-ms",
            &interval,
            "--l4lb-dataplane",
            "nftables",
            "--dns-upstream",
            "",
        ];
        let seeds: &[usize] = if i == 1 { &[] } else { &[1] };
        c.start(i, seeds, &flags)?;
    }
    for n in &c.nodes {
        backend(n.netns.clone(), n.ip.clone())?;
    }
    c.switch_address()?;
    enter_netns(&c.switch_ns)?;
    let api = Api {
        http: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent(),
        token,
        urls: (1..=NODES)
            .map(|i| format!("http://{}.{i}:62080", c.subnet))
            .collect(),
    };
    let t0 = Instant::now();
    wait_for("all alive everywhere", Duration::from_secs(60), || {
        for i in 1..=NODES {
            let nodes = api.json(i, "/v1/nodes")?;
            let alive = nodes
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| x["status"] == "alive").count());
            if alive != NODES {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    // The nftables realizer writes its table after a warm-up at start.
    wait_for(
        "every node's nftables table",
        Duration::from_secs(30),
        || {
            for n in &c.nodes {
                if cluster_tests::sh(&[
                    "ip", "netns", "exec", &n.netns, "nft", "list", "table", "ip", "skein",
                ])
                .is_err()
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    println!(
        "cluster: {NODES} agents (nftables dataplane, DNS on 127.0.0.1:53 in each namespace, gossip every {} ms), ready after {}; polling every {}",
        args.interval_ms,
        ms(t0.elapsed()),
        ms(args.poll)
    );
    let mut bench = Bench {
        c: &c,
        api: &api,
        poll: args.poll,
        next: 0,
        created: Vec::new(),
    };
    let pause = |k: usize| {
        // Spread the PUTs over the gossip round so every phase is sampled.
        std::thread::sleep(Duration::from_millis(
            50 + (k as u64 * 37) % args.interval_ms.max(1),
        ));
    };
    println!("\nnode1 → node3, one VIP at a time:");
    let mut one_three = Vec::new();
    for k in 0..args.vips {
        pause(k);
        one_three.extend(bench.round(&[1], 3)?);
    }
    println!("\nnode2 → node5, one VIP at a time:");
    let mut two_five = Vec::new();
    for k in 0..args.vips {
        pause(k);
        two_five.extend(bench.round(&[2], 5)?);
    }
    let origins: Vec<usize> = [1, 2, 4, 5].into_iter().cycle().take(args.burst).collect();
    let mut bursts = Vec::new();
    for b in 0..args.bursts {
        pause(b);
        println!(
            "\nburst {b}: {} VIPs at once on nodes {origins:?} → node3:",
            origins.len()
        );
        bursts.extend(bench.round(&origins, 3)?);
    }

    // Every node shows the same, distinct address for every VIP.
    let created = bench.created.clone();
    let agreed = wait_for(
        "every node's addresses agree",
        Duration::from_secs(30),
        || {
            let mut reference: Option<Vec<Option<String>>> = None;
            for i in 1..=NODES {
                let vips = api.json(i, "/v1/vips")?;
                let addresses: Vec<Option<String>> = created
                    .iter()
                    .map(|app| {
                        let vip = format!("{app}.marathon.l4lb.thisdcos.directory:{VIP_PORT}");
                        vips.as_array()
                            .into_iter()
                            .flatten()
                            .find(|v| v["vip"] == vip.as_str())
                            .and_then(|v| v["address"].as_str().map(str::to_string))
                    })
                    .collect();
                if addresses.iter().any(Option::is_none) {
                    return Ok(None);
                }
                match &reference {
                    None => reference = Some(addresses),
                    Some(r) if *r == addresses => {}
                    Some(_) => return Ok(None),
                }
            }
            Ok(reference)
        },
    )?;
    let distinct: std::collections::BTreeSet<&Option<String>> = agreed.iter().collect();
    if distinct.len() != agreed.len() {
        bail!("two VIPs share an address: {agreed:?}");
    }
    println!(
        "\naddresses: all {NODES} nodes show the same address for each of the {} VIPs, all distinct",
        agreed.len()
    );

    report("node1 → node3", &one_three);
    report("node2 → node5", &two_five);
    report(
        &format!("{} bursts of {} at once → node3", args.bursts, args.burst),
        &bursts,
    );
    let mut all = one_three;
    all.extend(two_five);
    all.extend(bursts);
    report("all", &all);
    Ok(())
}
