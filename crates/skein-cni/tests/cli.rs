//! The executable's contract that needs no namespaces: VERSION, error
//! results (JSON on stdout, exit 1), and the DEL/ADD paths that stop before
//! creating anything.

mod common;

use common::{describe, netconf, plugin, run_plugin, stdout_json, TempDir};
use skein_cni::{Owner, Pool, Store};

#[test]
fn version() {
    let out = run_plugin(
        plugin(),
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        stdout_json(&out),
        serde_json::json!({"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]})
    );
}

fn assert_error(out: &std::process::Output, code: u64, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", describe(out));
    let v = stdout_json(out);
    assert_eq!(v["code"], code, "{}", describe(out));
    assert!(v["cniVersion"].is_string());
    let msg = v["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "msg {msg:?} lacks {needle:?}");
    assert!(v.get("details").is_some());
}

fn add_env(netns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", "cli-test".to_string()),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ]
}

fn borrow<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn malformed_stdin_is_6() {
    let env = add_env("/proc/self/ns/net");
    let out = run_plugin(plugin(), &borrow(&env), "{\"cniVersion\": \"1.0.0\", ");
    assert_error(&out, 6, "not valid JSON");
    assert!(!stdout_json(&out)["details"].as_str().unwrap().is_empty());
}

#[test]
fn missing_command_is_4() {
    let out = run_plugin(plugin(), &[], "{}");
    assert_error(&out, 4, "CNI_COMMAND");
}

#[test]
fn unknown_command_is_4() {
    let out = run_plugin(plugin(), &[("CNI_COMMAND", "STATUS")], "{}");
    assert_error(&out, 4, "STATUS");
}

#[test]
fn error_speaks_the_configs_version() {
    let tmp = TempDir::new("cli-ver");
    let mut conf: serde_json::Value =
        serde_json::from_str(&netconf(tmp.path(), "m-dcos", "9.0.1.0/25", "9.0.2.1")).unwrap();
    conf["cniVersion"] = "0.4.0".into();
    let env = add_env("/proc/self/ns/net");
    let out = run_plugin(plugin(), &borrow(&env), &conf.to_string());
    assert_error(&out, 7, "gateway 9.0.2.1 is outside subnet 9.0.1.0/25");
    assert_eq!(stdout_json(&out)["cniVersion"], "0.4.0");
}

#[test]
fn add_without_bridge_is_102_and_leaks_no_address() {
    let tmp = TempDir::new("cli-nobr");
    let bridge = format!("skt{}", std::process::id() % 1_000_000);
    let env = add_env("/proc/self/ns/net");
    let out = run_plugin(
        plugin(),
        &borrow(&env),
        &netconf(tmp.path(), &bridge, "10.99.0.0/25", "10.99.0.1"),
    );
    assert_error(&out, 102, &format!("bridge {bridge} does not exist"));
    let store = Store::new(tmp.path(), "dcos", &bridge);
    assert!(store.snapshot().unwrap().is_empty(), "address leaked");
}

#[test]
fn add_with_missing_netns_is_4() {
    let tmp = TempDir::new("cli-nons");
    let env = add_env("/var/run/netns/skein-cni-test-does-not-exist");
    let out = run_plugin(
        plugin(),
        &borrow(&env),
        &netconf(tmp.path(), "m-dcos", "10.99.0.0/25", "10.99.0.1"),
    );
    assert_error(&out, 4, "skein-cni-test-does-not-exist");
    assert!(Store::new(tmp.path(), "dcos", "m-dcos")
        .snapshot()
        .unwrap()
        .is_empty());
}

#[test]
fn check_of_unknown_container_is_3() {
    let tmp = TempDir::new("cli-check");
    let mut env = add_env("/proc/self/ns/net");
    env[0].1 = "CHECK".to_string();
    let out = run_plugin(
        plugin(),
        &borrow(&env),
        &netconf(tmp.path(), "m-dcos", "10.99.0.0/25", "10.99.0.1"),
    );
    assert_error(&out, 3, "unknown container cli-test");
}

#[test]
fn del_of_unknown_container_succeeds_and_touches_nothing() {
    let tmp = TempDir::new("cli-del");
    let store = Store::new(tmp.path(), "dcos", "m-dcos");
    let pool = Pool {
        subnet: "10.99.0.0/25".parse().unwrap(),
        gateway: "10.99.0.1".parse().unwrap(),
    };
    let other = Owner::new("someone-else", "eth0");
    store.allocate(&pool, &other).unwrap();
    let before = store.snapshot().unwrap();
    for netns in ["", "/var/run/netns/skein-cni-test-gone"] {
        let env = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "never-added"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
        ];
        let out = run_plugin(
            plugin(),
            &env,
            &netconf(tmp.path(), "m-dcos", "10.99.0.0/25", "10.99.0.1"),
        );
        assert!(out.status.success(), "{}", describe(&out));
        assert!(out.stdout.is_empty(), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("nothing was allocated for container never-added"),
            "{stderr}"
        );
        assert_eq!(store.snapshot().unwrap(), before);
    }
}

/// A static configuration (`{"type": "skein-cni", "name": "dcos"}`) with no
/// agent file: ADD is "try again later" naming the file; DEL succeeds
/// (nothing of the overlay to release: a runtime must not retry forever).
#[test]
fn a_static_configuration_without_the_agents_file() {
    let conf = r#"{"cniVersion":"1.0.0","name":"dcos","type":"skein-cni","stateFile":"/nonexistent/skein/cni/dcos.conf"}"#;
    let env = add_env("/proc/self/ns/net");
    let out = run_plugin(plugin(), &borrow(&env), conf);
    assert_error(&out, 11, "/nonexistent/skein/cni/dcos.conf");
    let del = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "cli-test"),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = run_plugin(plugin(), &del, conf);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
}
