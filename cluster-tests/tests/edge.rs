//! The edge (issue 13) on real agents in namespaces: node1 plays the public
//! agent and runs `skein edge --group external`, reading its agent's
//! routes; real HTTP backends (`skein-httpi`) on node2 and node3 are
//! registered as tasks with Marathon-LB labels; `curl` from a client
//! namespace goes through the edge: a bind port, a virtual host on HTTP and
//! on HTTPS (SNI), a path with proxypass, sticky sessions, balance source,
//! basic auth, a backend made unhealthy and a node killed (no request
//! reaches them afterwards), and the stats CSV.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::{
    curl, head_and_body, header, sh, spawn_in, spawn_in_logged, wait_for, Background, Cluster,
};

const EDGE_HTTP: u16 = 80;
const EDGE_HTTPS: u16 = 443;
const STATS: u16 = 9090;

fn task(app: &str, ip: &str, ports: &[u16], labels: &str, health: Option<usize>) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!(r#"{{"port":{p}}}"#)).collect();
    let health = health
        .map(|i| {
            format!(
                r#","health_check":{{"protocol":"tcp","port_index":{i},"interval_s":1,"timeout_s":1,"unhealthy_after":1}}"#
            )
        })
        .unwrap_or_default();
    format!(
        r#"{{"app":"{app}","ip":"{ip}","ports":[{}],"labels":{{{labels}}}{health}}}"#,
        ports.join(",")
    )
}

/// `n` requests with curl `args` from the client namespace; answers counted
/// by the backend name in the body, failures as "FAILED <code>".
fn hits(ns: &str, args: &[&str], n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let mut a = vec!["-s", "-w", "\n%{http_code}", "--max-time", "3"];
        a.extend_from_slice(args);
        let answer = match curl(ns, &a) {
            Ok(body) => {
                let text = String::from_utf8_lossy(&body).to_string();
                let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "?"));
                if code == "200" {
                    body.trim().to_string()
                } else {
                    format!("FAILED {code}")
                }
            }
            Err(_) => "FAILED curl".to_string(),
        };
        *out.entry(answer).or_insert(0) += 1;
    }
    out
}

/// The edge's routes as its agent serves them.
fn routes(c: &Cluster) -> anyhow::Result<serde_json::Value> {
    c.get(1, "/v1/edge?groups=external")
}

#[test]
fn the_edge_routes_by_labels_and_follows_the_cluster() -> anyhow::Result<()> {
    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[edge test] {:>6.2}s {what}", t0.elapsed().as_secs_f64());
    let mut c = Cluster::new(3)?;
    c.start(1, &[], &[])?;
    c.start(2, &[1], &[])?;
    c.start(3, &[1], &[])?;
    let (ip1, ip2, ip3) = (
        c.node(1).ip.clone(),
        c.node(2).ip.clone(),
        c.node(3).ip.clone(),
    );
    let (ns1, ns2, ns3) = (
        c.node(1).netns.clone(),
        c.node(2).netns.clone(),
        c.node(3).netns.clone(),
    );

    // Backends: web on node2 and node3 (port 9000; port 9001 is what
    // node2's health check probes), api on node3, secret on node2.
    let mut backends: Vec<Background> = Vec::new();
    for (ns, ip, name) in [(&ns2, &ip2, "web-2"), (&ns3, &ip3, "web-3")] {
        backends.push(spawn_in(ns, httpi, &[&format!("{ip}:9000"), name])?);
    }
    let web2_health = spawn_in(&ns2, httpi, &[&format!("{ip2}:9001"), "health"])?;
    backends.push(spawn_in(&ns3, httpi, &[&format!("{ip3}:9100"), "api-3"])?);
    backends.push(spawn_in(
        &ns2,
        httpi,
        &[&format!("{ip2}:9200"), "secret-2"],
    )?);
    backends.push(spawn_in(&ns3, httpi, &[&format!("{ip3}:9300"), "tcp-3"])?);

    // TLS for the vhost: a self-signed certificate for web.example.com.
    let (pem, key) = cluster_tests::self_signed(c.dir.path(), "web.example.com")?;
    let mut both = std::fs::read(&pem)?;
    both.extend(std::fs::read(&key)?);
    std::fs::write(&pem, both)?;
    // `openssl passwd -6` makes the crypt(3) SHA-512 hash Marathon-LB took.
    let hash = String::from_utf8(
        sh(&["openssl", "passwd", "-6", "-salt", "skeinedge", "s3cret"])?.stdout,
    )?;
    let hash = hash.trim().replace('$', "\\u0024");

    let web_labels = format!(
        r#""HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"web.example.com","HAPROXY_0_PORT":"3141","HAPROXY_0_STICKY":"true","HAPROXY_0_SSL_CERT":"{}","HAPROXY_1_ENABLED":"false""#,
        pem.display()
    );
    assert_eq!(
        c.put_task(
            2,
            "web.2",
            &task("/web", &ip2, &[9000, 9001], &web_labels, Some(1))
        )?
        .0,
        201
    );
    assert_eq!(
        c.put_task(3, "web.3", &task("/web", &ip3, &[9000], &web_labels, None))?
            .0,
        201
    );
    let api_labels = r#""HAPROXY_GROUP":"external","HAPROXY_0_PATH":"/api","HAPROXY_0_HTTP_BACKEND_PROXYPASS_PATH":"/api","HAPROXY_0_BALANCE":"source""#;
    c.put_task(3, "api.3", &task("/api", &ip3, &[9100], api_labels, None))?;
    let secret_labels = format!(
        r#""HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"secret.example.com","HAPROXY_0_AUTH":"admin:ops:{hash}""#
    );
    c.put_task(
        2,
        "secret.2",
        &task("/secret", &ip2, &[9200], &secret_labels, None),
    )?;
    let tcp_labels = r#""HAPROXY_GROUP":"external""#;
    c.put_task(
        3,
        "tcp.3",
        &task("/db/tcp", &ip3, &[9300], tcp_labels, None),
    )?;
    // Another group: not this edge's.
    c.put_task(
        2,
        "internal.2",
        &task(
            "/internal",
            &ip2,
            &[9000],
            r#""HAPROXY_GROUP":"internal","HAPROXY_0_PORT":"3142""#,
            None,
        ),
    )?;

    // The routes node1's agent computes: web's two servers up, a service
    // port for the TCP app.
    let tcp_port = wait_for("the edge routes", Duration::from_secs(20), || {
        let r = routes(&c)?;
        let backends = r["routes"]["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let web_up = backends.iter().any(|b| {
            b["app"] == "/web"
                && b["servers"]
                    .as_array()
                    .is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["state"] == "up"))
        });
        let tcp = backends
            .iter()
            .find(|b| b["app"] == "/db/tcp")
            .and_then(|b| b["bind_port"].as_u64());
        Ok((web_up && backends.len() == 4).then_some(tcp).flatten())
    })?;
    assert!((10000..=10100).contains(&tcp_port), "{tcp_port}");
    step("routes agreed");

    // The edge on node1, as an operator starts it next to the agent.
    let state_dir = c.dir.path().join("edge");
    let edge_log = c.dir.path().join("edge.log");
    let skein = cluster_tests::skein_bin();
    // Its log (stderr) goes to the file too: `sh -c 'exec ... 2>&1'`.
    let command = format!(
        "exec {} edge --group external --http-port {EDGE_HTTP} --https-port {EDGE_HTTPS} \
         --stats-port {STATS} --state-dir {} 2>&1",
        skein.display(),
        state_dir.display()
    );
    let _edge = spawn_in_logged(&ns1, "sh", &["-c", &command], Some(&edge_log))?;
    let client = &ns1;
    let at = |port: u16, path: &str| format!("http://{ip1}:{port}{path}");
    let dump = || std::fs::read_to_string(&edge_log).unwrap_or_default();
    wait_for("the edge's health check", Duration::from_secs(20), || {
        Ok(curl(client, &["-sf", &at(STATS, "/_haproxy_health_check")]).ok())
    })
    .map_err(|e| e.context(dump()))?;

    // The bind port (HAPROXY_0_PORT=3141): both web servers answer.
    let seen = wait_for("both web servers on :3141", Duration::from_secs(20), || {
        let h = hits(client, &[&at(3141, "/")], 20);
        Ok((h.contains_key("web-2") && h.contains_key("web-3")).then_some(h))
    })?;
    assert_eq!(seen.values().sum::<usize>(), 20, "{seen:?}");

    // The virtual host on the HTTP port; an unknown host gets a 503.
    let vhost = hits(
        client,
        &["-H", "Host: WEB.example.com", &at(EDGE_HTTP, "/")],
        10,
    );
    assert!(vhost.keys().all(|k| k.starts_with("web-")), "{vhost:?}");
    let unknown = hits(
        client,
        &["-H", "Host: nobody.example.com", &at(EDGE_HTTP, "/")],
        1,
    );
    assert_eq!(
        unknown.keys().next().map(String::as_str),
        Some("FAILED 503")
    );

    // HTTPS with SNI, the certificate the label names.
    let resolve = format!("web.example.com:{EDGE_HTTPS}:{ip1}");
    let tls = curl(
        client,
        &[
            "-sf",
            "--cacert",
            pem.to_str().unwrap_or_default(),
            "--resolve",
            &resolve,
            &format!("https://web.example.com:{EDGE_HTTPS}/"),
        ],
    )?;
    assert!(String::from_utf8_lossy(&tls).starts_with("web-"));

    // X-Forwarded-For carries the client's address.
    let response = head_and_body(
        client,
        &["-H", "Host: web.example.com", &at(EDGE_HTTP, "/x")],
    )?;
    assert_eq!(
        header(&response, "X-Seen-Forwarded-For"),
        Some(ip1.as_str()),
        "{response}"
    );

    // Sticky: the edge's cookie pins a client to one server.
    let first = head_and_body(
        client,
        &["-H", "Host: web.example.com", &at(EDGE_HTTP, "/")],
    )?;
    let cookie = header(&first, "Set-Cookie")
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no sticky cookie: {first}"))?;
    let pinned = hits(
        client,
        &[
            "-H",
            "Host: web.example.com",
            "-H",
            &format!("Cookie: {cookie}"),
            &at(EDGE_HTTP, "/"),
        ],
        10,
    );
    assert_eq!(pinned.len(), 1, "sticky: {pinned:?}");

    // A path with proxypass: /api/v1 reaches the backend as /v1; balance
    // source keeps one client on one server.
    let api = head_and_body(client, &[&at(EDGE_HTTP, "/api/v1/x")])?;
    assert!(api.contains("api-3"), "{api}");
    assert_eq!(header(&api, "X-Path"), Some("/v1/x"), "{api}");

    // Basic auth: 401 with the realm without credentials, 200 with them.
    let denied = head_and_body(
        client,
        &["-H", "Host: secret.example.com", &at(EDGE_HTTP, "/")],
    )?;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(denied.contains("realm=\"admin\""), "{denied}");
    let wrong = hits(
        client,
        &[
            "-u",
            "ops:nope",
            "-H",
            "Host: secret.example.com",
            &at(EDGE_HTTP, "/"),
        ],
        1,
    );
    assert_eq!(wrong.keys().next().map(String::as_str), Some("FAILED 401"));
    let allowed = hits(
        client,
        &[
            "-u",
            "ops:s3cret",
            "-H",
            "Host: secret.example.com",
            &at(EDGE_HTTP, "/"),
        ],
        3,
    );
    assert_eq!(allowed.get("secret-2"), Some(&3), "{allowed:?}");

    // The TCP app on its agreed service port.
    let tcp = hits(client, &[&at(tcp_port as u16, "/")], 3);
    assert_eq!(tcp.get("tcp-3"), Some(&3), "{tcp:?}");
    // Another group's app is not served here.
    assert!(curl(client, &["-sf", &at(3142, "/")]).is_err());

    // The CSV: HAProxy's header, a row per frontend, backend and server.
    let csv = String::from_utf8(curl(client, &["-sf", &at(STATS, "/haproxy?stats;csv")])?)?;
    assert!(csv.starts_with("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,"), "{csv}");
    let row = |px: &str, sv: &str| {
        csv.lines()
            .find(|l| l.starts_with(&format!("{px},{sv},")))
            .map(str::to_string)
    };
    assert!(row("web_3141", "BACKEND").is_some(), "{csv}");
    let web2 =
        row("web_3141", &format!("node2_{ip2}_9000")).ok_or_else(|| anyhow::anyhow!("{csv}"))?;
    assert!(web2.contains(",UP,"), "{web2}");

    step("bind port, vhosts, TLS, XFF, sticky, proxypass, auth, TCP, CSV checked");
    // node2's web server made unhealthy (its health port closed; its web
    // port still answers): no request reaches it afterwards.
    drop(web2_health);
    wait_for(
        "web on node2 out of the routes",
        Duration::from_secs(20),
        || {
            let r = routes(&c)?;
            let down = r["routes"]["backends"].as_array().is_some_and(|bs| {
                bs.iter().any(|b| {
                    b["app"] == "/web"
                        && b["servers"].as_array().is_some_and(|s| {
                            s.iter()
                                .any(|s| s["node"] == "node2" && s["state"] == "unhealthy")
                        })
                })
            });
            Ok(down.then_some(()))
        },
    )?;
    wait_for("the edge to follow", Duration::from_secs(10), || {
        let h = hits(client, &[&at(3141, "/")], 10);
        Ok((h.get("web-3") == Some(&10)).then_some(()))
    })?;
    let after = hits(client, &[&at(3141, "/")], 30);
    assert_eq!(
        after.get("web-3"),
        Some(&30),
        "unhealthy server still used: {after:?}"
    );

    step("the unhealthy server left alone");
    // node3 killed (its agent; its backends keep running, as a host cut
    // off would): once its agent is seen down, nothing goes to it.
    c.kill(3)?;
    wait_for("node3 seen down", Duration::from_secs(30), || {
        let r = routes(&c)?;
        let gone = r["routes"]["backends"].as_array().is_some_and(|bs| {
            bs.iter()
                .flat_map(|b| b["servers"].as_array().cloned().unwrap_or_default())
                .all(|s| s["node"] != "node3" || s["state"] == "node_down")
        });
        Ok(gone.then_some(()))
    })?;
    let api_after = hits(client, &[&at(EDGE_HTTP, "/api/")], 5);
    assert!(
        api_after.keys().all(|k| k.starts_with("FAILED 503")),
        "a down node's server is still used: {api_after:?}"
    );
    let csv = String::from_utf8(curl(client, &["-sf", &at(STATS, "/haproxy?stats;csv")])?)?;
    let web3 = csv
        .lines()
        .find(|l| l.starts_with(&format!("web_3141,node3_{ip3}_9000,")))
        .unwrap_or_default();
    assert!(!web3.contains(",UP,"), "{web3}");

    step("the killed node's servers left alone");
    // Problems: a second app claiming web.example.com loses it, reported.
    c.put_task(
        1,
        "copy.1",
        &task(
            "/copy",
            &ip1,
            &[9999],
            r#""HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"web.example.com""#,
            None,
        ),
    )?;
    wait_for("the conflict reported", Duration::from_secs(10), || {
        let p = c.get(1, "/v1/edge/problems")?;
        Ok(p.to_string()
            .contains("already routed to the older web_3141")
            .then_some(()))
    })?;
    drop(backends);
    Ok(())
}
