//! The entry point (issue 14) on real agents in namespaces: node1 runs
//! `--entry-listen 0.0.0.0:8080`; requests come from node2's namespace (off
//! loopback: its own address) and from node1's loopback. Checked: only the
//! version file and the login form are open off loopback, a wrong or
//! missing credential gets 401 and no cluster data, the token (both of
//! DC/OS's header forms) and the login form's session cookie let requests
//! through, each mapped route answers in its documented shape,
//! `/service/<name>/` reaches the app's backends with the prefix stripped
//! and fails over when one dies, a loop of wrong tokens is refused (429)
//! after a few, and `/system/health/v1` lists every node's components and
//! a node killed.

use std::time::Duration;

use cluster_tests::{curl, head_and_body, header, spawn_in, wait_for, Cluster};

const ENTRY_PORT: u16 = 8080;

/// Status code and body of one request made with curl `args` from `ns`.
fn request(ns: &str, args: &[&str]) -> anyhow::Result<(u16, String)> {
    let mut a = vec!["-s", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = String::from_utf8_lossy(&curl(ns, &a)?).to_string();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// `args` as curl's argument list.
fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn the_entry_point_guards_routes_and_proxies_services() -> anyhow::Result<()> {
    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let mut c = Cluster::new(2)?;
    let listen = format!("0.0.0.0:{ENTRY_PORT}");
    c.start(1, &[], &["--entry-listen", &listen])?;
    // node2's entry point serves HTTPS, with a certificate for entry.test.
    let (pem, key) = cluster_tests::self_signed(c.dir.path(), "entry.test")?;
    let (pem_s, key_s) = (pem.display().to_string(), key.display().to_string());
    c.start(
        2,
        &[1],
        &[
            "--entry-listen",
            "0.0.0.0:8443",
            "--entry-tls-cert",
            &pem_s,
            "--entry-tls-key",
            &key_s,
        ],
    )?;
    let (ip1, ip2) = (c.node(1).ip.clone(), c.node(2).ip.clone());
    let (ns1, ns2) = (c.node(1).netns.clone(), c.node(2).netns.clone());
    let token = std::fs::read_to_string(c.node(1).data_dir.join("api-token"))?
        .trim()
        .to_string();
    let bearer = format!("Authorization: Bearer {token}");
    let dcos_token = format!("Authorization: token={token}");
    let url = |path: &str| format!("http://{ip1}:{ENTRY_PORT}{path}");

    // A service with a backend on each node.
    let dash1 = spawn_in(&ns1, httpi, &[&format!("{ip1}:9000"), "dash-1"])?;
    let dash2 = spawn_in(&ns2, httpi, &[&format!("{ip2}:9000"), "dash-2"])?;
    for (node, id, ip) in [(1, "dash.1", &ip1), (2, "dash.2", &ip2)] {
        let body = format!(
            r#"{{"app":"/dash","ip":"{ip}","ports":[{{"port":9000}}],"labels":{{"DCOS_SERVICE_NAME":"dashboard"}}}}"#
        );
        assert_eq!(c.put_task(node, id, &body)?.0, 201);
    }

    // Off loopback without a credential: only the version file.
    let (code, body) = request(&ns2, &[&url("/dcos-metadata/dcos-version.json")])?;
    assert_eq!(code, 200, "{body}");
    let version: serde_json::Value = serde_json::from_str(&body)?;
    assert!(version["version"].is_string(), "{body}");
    for path in [
        "/net/v1/vips",
        "/net/v1/nodes",
        "/mesos_dns/v1/enumerate",
        "/overlay-master/state",
        "/metrics",
        "/service/dashboard/",
        "/",
    ] {
        let (code, body) = request(&ns2, &[&url(path)])?;
        assert_eq!(code, 401, "{path} without a token: {body}");
        // Nothing of the cluster in a refusal.
        assert!(
            !body.contains("node1") && !body.contains("10.77.") && !body.contains("dash"),
            "{path}: {body}"
        );
        let refusal: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(refusal.as_object().map(|o| o.len()), Some(1), "{body}");
    }

    // HTTPS on node2's entry point: the version file, the token, and a
    // session cookie marked Secure; plain HTTP on that port gets nothing.
    let resolve = format!("entry.test:8443:{ip2}");
    let tls = |path: &str| format!("https://entry.test:8443{path}");
    let token2 = std::fs::read_to_string(c.node(2).data_dir.join("api-token"))?
        .trim()
        .to_string();
    // curl trusting the certificate, with entry.test resolving to node2.
    let over_tls = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--cacert".to_string(),
            pem_s.clone(),
            "--resolve".to_string(),
            resolve.clone(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = over_tls(&[&tls("/dcos-metadata/dcos-version.json")]);
    let (code, body) = request(&ns1, &refs(&a))?;
    assert_eq!(code, 200, "{body}");
    let a = over_tls(&[&tls("/net/v1/nodes")]);
    assert_eq!(request(&ns1, &refs(&a))?.0, 401);
    let bearer2 = format!("Authorization: Bearer {token2}");
    let a = over_tls(&["-H", &bearer2, &tls("/net/v1/nodes")]);
    let (code, body) = request(&ns1, &refs(&a))?;
    assert_eq!(code, 200, "{body}");
    let form = format!("token={token2}");
    let a = over_tls(&["-X", "POST", "--data-urlencode", &form, &tls("/login")]);
    let r = head_and_body(&ns1, &refs(&a))?;
    assert!(
        header(&r, "set-cookie").is_some_and(|c| c.contains("; Secure")),
        "{r}"
    );
    // curl fails (no HTTP answer) or gets an error status: nothing served.
    let plain_url = format!("http://{ip2}:8443/dcos-metadata/dcos-version.json");
    let plain = request(&ns1, &[&plain_url]);
    assert!(
        plain.as_ref().map_or(true, |(code, _)| *code != 200),
        "plain HTTP on the HTTPS port: {plain:?}"
    );

    // A browser without a session is sent to the login form.
    let r = head_and_body(&ns2, &["-H", "Accept: text/html", &url("/")])?;
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    assert_eq!(header(&r, "location"), Some("/login"));
    let (code, form) = request(&ns2, &[&url("/login")])?;
    assert_eq!(code, 200);
    assert!(form.contains("<form") && !form.contains("node1"), "{form}");

    // With the token, in either form: the routes in their shapes.
    let nodes = wait_for(
        "both nodes through the entry point",
        Duration::from_secs(20),
        || {
            let (code, body) = request(&ns2, &["-H", &bearer, &url("/net/v1/nodes")])?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok((code == 200 && v.as_array().is_some_and(|a| a.len() == 2)).then_some(v))
        },
    )?;
    assert!(nodes[0]["node_id"].is_string(), "{nodes}");
    let (code, body) = request(&ns2, &["-H", &dcos_token, &url("/net/v1/vips")])?;
    assert_eq!(code, 200, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body)?.is_array(),
        "{body}"
    );
    for path in ["/overlay-master/state", "/mesos/overlay-master/state"] {
        let (code, body) = request(&ns2, &["-H", &bearer, &url(path)])?;
        assert_eq!(code, 200, "{path}: {body}");
        let state: serde_json::Value = serde_json::from_str(&body)?;
        assert!(state["agents"].is_array(), "{path}: {body}");
    }
    let (code, body) = request(&ns2, &["-H", &bearer, &url("/mesos_dns/v1/enumerate")])?;
    assert_eq!(code, 200, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body)?.is_object(),
        "{body}"
    );
    let (code, body) = request(&ns2, &["-H", &bearer, &url("/metrics")])?;
    assert_eq!(code, 200);
    assert!(body.contains("# TYPE skein_"), "{body}");
    let (code, _) = request(&ns2, &["-H", &bearer, &url("/no/such/route")])?;
    assert_eq!(code, 404);
    // Writes do not go through the entry point's API routes.
    let (code, _) = request(&ns2, &["-X", "POST", "-H", &bearer, &url("/net/v1/vips")])?;
    assert_eq!(code, 405);

    // From loopback, reads need nothing (as the API's), but only under a
    // loopback host name (no DNS rebinding) and never for an app's pages.
    let local = format!("http://127.0.0.1:{ENTRY_PORT}/net/v1/nodes");
    let (code, body) = request(&ns1, &[&local])?;
    assert_eq!(code, 200, "{body}");
    let (code, _) = request(&ns1, &["-H", "Host: evil.example.com", &local])?;
    assert_eq!(code, 401, "a rebound name on loopback");
    let local_service = format!("http://127.0.0.1:{ENTRY_PORT}/service/dashboard/");
    assert_eq!(request(&ns1, &[&local_service])?.0, 401);

    // The service: both backends, the prefix stripped, the credential
    // not handed on.
    let seen = wait_for("both dashboard backends", Duration::from_secs(20), || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let r = head_and_body(&ns2, &["-H", &bearer, &url("/service/dashboard/a/b?x=1")])?;
            if !r.starts_with("HTTP/1.1 200") {
                return Ok(None);
            }
            assert_eq!(header(&r, "x-path"), Some("/a/b?x=1"), "{r}");
            seen.insert(r.lines().last().unwrap_or("").trim().to_string());
        }
        Ok((seen.len() == 2).then_some(seen))
    })?;
    assert!(
        seen.contains("dash-1") && seen.contains("dash-2"),
        "{seen:?}"
    );
    let r = head_and_body(&ns2, &["-H", &bearer, &url("/service/dashboard")])?;
    assert!(r.starts_with("HTTP/1.1 307"), "{r}");
    assert_eq!(header(&r, "location"), Some("/service/dashboard/"));
    let (code, _) = request(&ns2, &["-H", &bearer, &url("/service/nothing/")])?;
    assert_eq!(code, 404);

    // A backend dies (its task still registered and healthy: no health
    // check): every request still answered, by the other.
    drop(dash2);
    for i in 0..12 {
        let (code, body) = request(&ns2, &["-H", &bearer, &url("/service/dashboard/")])?;
        assert_eq!(
            (code, body.trim()),
            (200, "dash-1"),
            "request {i} after dash-2 died"
        );
    }

    // The login form: a session cookie that works in place of the token.
    let r = head_and_body(
        &ns2,
        &[
            "-X",
            "POST",
            "--data-urlencode",
            &format!("token={token}"),
            &url("/login"),
        ],
    )?;
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let cookie = header(&r, "set-cookie").unwrap_or_default().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default().to_string();
    let (code, body) = request(
        &ns2,
        &["-H", &format!("Cookie: {pair}"), &url("/net/v1/nodes")],
    )?;
    assert_eq!(code, 200, "{body}");
    let (code, _) = request(
        &ns2,
        &[
            "-H",
            "Cookie: dcos-acs-auth-cookie=0000",
            &url("/net/v1/nodes"),
        ],
    )?;
    assert_eq!(code, 401);
    // A browser with a stale session goes to the login form, the cookie
    // cleared; a valid session passes whatever Authorization an app sends.
    let r = head_and_body(
        &ns2,
        &[
            "-H",
            "Accept: text/html",
            "-H",
            "Cookie: dcos-acs-auth-cookie=0000",
            &url("/"),
        ],
    )?;
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    assert!(
        header(&r, "set-cookie").is_some_and(|c| c.contains("Max-Age=0")),
        "{r}"
    );
    let (code, _) = request(
        &ns2,
        &[
            "-H",
            &format!("Cookie: {pair}"),
            "-H",
            "Authorization: Bearer app-jwt",
            &url("/net/v1/nodes"),
        ],
    )?;
    assert_eq!(code, 200, "a session with an app's own bearer token");

    // Brute force: after a few wrong tokens the address is refused, the
    // right token too while it lasts. (A stale session cookie, as above,
    // is not a guess: it does not count.)
    let mut codes = Vec::new();
    for i in 0..20 {
        let wrong = format!("Authorization: Bearer wrong-{i}");
        let r = head_and_body(&ns2, &["-H", &wrong, &url("/net/v1/nodes")])?;
        let code: u16 = r.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        if code == 429 {
            assert!(header(&r, "retry-after").is_some(), "{r}");
        }
        codes.push(code);
    }
    let first_refusal = codes.iter().position(|c| *c == 429);
    assert_eq!(first_refusal, Some(6), "wrong tokens answered {codes:?}");
    assert!(codes[..6].iter().all(|c| *c == 401), "{codes:?}");
    let (code, _) = request(&ns2, &["-H", &bearer, &url("/net/v1/nodes")])?;
    assert_eq!(code, 429, "the right token during the lockout");
    // Another client is not refused.
    let (code, _) = request(&ns1, &["-H", &bearer, &url("/net/v1/nodes")])?;
    assert_eq!(code, 200);

    // The cluster's health: every node with its components, each saying
    // why; a node killed shows as such.
    let health_url = url("/system/health/v1");
    let health = |want: &dyn Fn(&serde_json::Value) -> bool| {
        wait_for("the cluster's health", Duration::from_secs(20), || {
            let (code, body) = request(&ns1, &["-H", &bearer, &health_url])?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok((code == 200 && want(&v)).then_some(v))
        })
    };
    let node = |v: &serde_json::Value, id: &str| {
        v["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node_id"] == id).cloned())
            .unwrap_or_default()
    };
    let both_report = |v: &serde_json::Value| {
        ["node1", "node2"].iter().all(|id| {
            node(v, id)["components"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["id"] == "gossip" && c["healthy"] == true)
            })
        })
    };
    let h = health(&both_report)?;
    for id in ["node1", "node2"] {
        assert!(node(&h, id)["version"].is_string(), "{h}");
        assert!(node(&h, id)["uptime_s"].is_u64(), "{h}");
        for c in node(&h, id)["components"].as_array().into_iter().flatten() {
            assert!(c["reason"].as_str().is_some_and(|r| !r.is_empty()), "{c}");
            assert_eq!(c["health"], if c["healthy"] == true { 0 } else { 1 }, "{c}");
        }
    }
    c.kill(2)?;
    let h = health(&|v| node(v, "node2")["status"] != "alive")?;
    let n2 = node(&h, "node2");
    assert_eq!(
        (n2["healthy"].clone(), h["healthy"].clone()),
        (false.into(), false.into()),
        "{h}"
    );
    assert!(
        n2["reason"]
            .as_str()
            .is_some_and(|r| r.contains("last reported")),
        "{n2}"
    );
    drop(dash1);
    Ok(())
}
