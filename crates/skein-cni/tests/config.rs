//! Decoding of the environment and the network configuration: every
//! malformed input maps to the spec's code, with a message that names it.

use std::collections::HashMap;
use std::path::PathBuf;

use skein_cni::{code, parse_request, CniError, CniVersion, Command, Request};

const GOOD: &str = r#"{"cniVersion":"1.0.0","name":"dcos","type":"skein-cni","bridge":"m-dcos","subnet":"9.0.1.0/25","gateway":"9.0.1.1","mtu":1420,"dataDir":"/var/lib/skein/cni"}"#;

fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(pairs: &[(&str, &str)], stdin: &str) -> Result<Request, CniError> {
    let env = env_of(pairs);
    parse_request(&|k: &str| env.get(k).cloned(), stdin.as_bytes())
}

fn add_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn err(pairs: &[(&str, &str)], stdin: &str) -> CniError {
    match parse(pairs, stdin) {
        Ok(r) => panic!("accepted: {r:?}"),
        Err(e) => e,
    }
}

/// A config with `key` replaced (or removed with `None`).
fn with(key: &str, value: Option<serde_json::Value>) -> String {
    let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
    let obj = v.as_object_mut().unwrap();
    match value {
        Some(x) => obj.insert(key.to_string(), x),
        None => obj.remove(key),
    };
    v.to_string()
}

#[test]
fn the_agents_config_decodes() {
    let Request::Run(inv) = parse(&add_env(), GOOD).unwrap() else {
        panic!("not a run");
    };
    assert_eq!(inv.command, Command::Add);
    assert_eq!(inv.container_id, "c1");
    assert_eq!(inv.ifname, "eth0");
    assert_eq!(inv.netns, Some(PathBuf::from("/var/run/netns/c1")));
    assert_eq!(inv.conf.cni_version, CniVersion::V1_0_0);
    assert_eq!(inv.conf.name, "dcos");
    assert_eq!(inv.conf.bridge, "m-dcos");
    assert_eq!(inv.conf.subnet.to_string(), "9.0.1.0/25");
    assert_eq!(inv.conf.gateway.to_string(), "9.0.1.1");
    assert_eq!(inv.conf.mtu, 1420);
    assert_eq!(inv.conf.data_dir, PathBuf::from("/var/lib/skein/cni"));
}

#[test]
fn defaults_and_ignored_keys() {
    let conf = r#"{"cniVersion":"0.4.0","name":"dcos","type":"skein-cni","bridge":"d-dcos",
        "subnet":"9.0.1.128/25","gateway":"9.0.1.129",
        "prevResult":{"ips":[]},"runtimeConfig":{"portMappings":[]},"args":{"cni":{}}}"#;
    let Request::Run(inv) = parse(&add_env(), conf).unwrap() else {
        panic!("not a run");
    };
    assert_eq!(inv.conf.cni_version, CniVersion::V0_4_0);
    assert_eq!(inv.conf.mtu, 1420);
    assert_eq!(inv.conf.data_dir, PathBuf::from("/var/lib/skein/cni"));
}

#[test]
fn version_needs_no_config() {
    let r = parse(&[("CNI_COMMAND", "VERSION")], "").unwrap();
    assert_eq!(r, Request::Version);
}

#[test]
fn bad_json_is_6() {
    for stdin in ["", "{", "not json", r#"{"cniVersion":"1.0.0","name":}"#] {
        let e = err(&add_env(), stdin);
        assert_eq!(e.code, code::DECODE, "{stdin:?}: {e}");
        assert!(e.msg.contains("not valid JSON"), "{e}");
    }
}

#[test]
fn missing_command_is_4() {
    let mut env = add_env();
    env.retain(|(k, _)| *k != "CNI_COMMAND");
    let e = err(&env, GOOD);
    assert_eq!(e.code, code::INVALID_ENV);
    assert!(e.msg.contains("CNI_COMMAND"), "{e}");
    // Empty counts as unset.
    env.push(("CNI_COMMAND", ""));
    assert_eq!(err(&env, GOOD).code, code::INVALID_ENV);
}

#[test]
fn unknown_command_is_4() {
    let mut env = add_env();
    env[0] = ("CNI_COMMAND", "GC");
    let e = err(&env, GOOD);
    assert_eq!(e.code, code::INVALID_ENV);
    assert!(e.msg.contains("unknown CNI_COMMAND \"GC\""), "{e}");
}

#[test]
fn missing_or_bad_env_is_4() {
    for (drop, needle) in [
        ("CNI_CONTAINERID", "CNI_CONTAINERID"),
        ("CNI_IFNAME", "CNI_IFNAME"),
        ("CNI_NETNS", "CNI_NETNS"),
    ] {
        let mut env = add_env();
        env.retain(|(k, _)| *k != drop);
        let e = err(&env, GOOD);
        assert_eq!(e.code, code::INVALID_ENV, "{drop}");
        assert!(e.msg.contains(needle), "{e}");
    }
    for (key, value) in [
        ("CNI_CONTAINERID", "../etc"),
        ("CNI_IFNAME", "averyveryverylongname"),
        ("CNI_IFNAME", "eth/0"),
        ("CNI_NETNS", "relative/ns"),
    ] {
        let mut env = add_env();
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
        let e = err(&env, GOOD);
        assert_eq!(e.code, code::INVALID_ENV, "{key}={value}");
        assert!(e.msg.contains(key), "{e}");
    }
}

#[test]
fn del_without_netns_is_fine() {
    let mut env = add_env();
    env.retain(|(k, _)| *k != "CNI_NETNS");
    env[0] = ("CNI_COMMAND", "DEL");
    let Request::Run(inv) = parse(&env, GOOD).unwrap() else {
        panic!("not a run");
    };
    assert_eq!(inv.command, Command::Del);
    assert_eq!(inv.netns, None);
}

#[test]
fn bad_subnet_is_7() {
    for subnet in [
        "9.0.1.0",
        "9.0.1.0/33",
        "banana",
        "9.0.1.5/25",
        "9.0.1.0/31",
        "fd00::/64",
    ] {
        let e = err(&add_env(), &with("subnet", Some(subnet.into())));
        assert_eq!(e.code, code::INVALID_CONFIG, "{subnet}: {e}");
        assert!(e.msg.contains("subnet"), "{e}");
    }
}

#[test]
fn gateway_outside_subnet_is_7() {
    let e = err(&add_env(), &with("gateway", Some("9.0.1.129".into())));
    assert_eq!(e.code, code::INVALID_CONFIG);
    assert_eq!(e.msg, "gateway 9.0.1.129 is outside subnet 9.0.1.0/25");
    for gw in ["9.0.1.0", "9.0.1.127", "nope"] {
        let e = err(&add_env(), &with("gateway", Some(gw.into())));
        assert_eq!(e.code, code::INVALID_CONFIG, "{gw}: {e}");
        assert!(e.msg.contains("gateway"), "{e}");
    }
}

#[test]
fn missing_or_bad_fields_are_7() {
    for key in ["name", "bridge", "subnet", "gateway", "cniVersion"] {
        let e = err(&add_env(), &with(key, None));
        assert_eq!(e.code, code::INVALID_CONFIG, "{key}: {e}");
        assert!(e.msg.contains(key), "{e}");
    }
    for (key, value) in [
        ("bridge", serde_json::json!("")),
        ("bridge", serde_json::json!("a-bridge-name-too-long")),
        ("bridge", serde_json::json!(7)),
        ("name", serde_json::json!("../x")),
        ("mtu", serde_json::json!("1420")),
        ("mtu", serde_json::json!(20)),
        ("mtu", serde_json::json!(-1)),
        ("dataDir", serde_json::json!("relative")),
        ("dataDir", serde_json::json!(1)),
    ] {
        let e = err(&add_env(), &with(key, Some(value.clone())));
        assert_eq!(e.code, code::INVALID_CONFIG, "{key}={value}: {e}");
        assert!(e.msg.contains(key), "{e}");
    }
    let e = err(&add_env(), "[1,2]");
    assert_eq!(e.code, code::INVALID_CONFIG);
}

#[test]
fn unsupported_version_is_1() {
    for v in ["0.2.0", "1.1.0", "2.0.0"] {
        let e = err(&add_env(), &with("cniVersion", Some(v.into())));
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}: {e}");
        assert!(e.msg.contains(v), "{e}");
    }
    // CHECK came with 0.4.0.
    let mut env = add_env();
    env[0] = ("CNI_COMMAND", "CHECK");
    let e = err(&env, &with("cniVersion", Some("0.3.1".into())));
    assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    assert!(parse(&env, &with("cniVersion", Some("0.4.0".into()))).is_ok());
}

#[test]
fn error_json_shape() {
    let e = CniError::new(code::DECODE, "bad").with_details("line 1");
    let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"cniVersion":"1.0.0","code":6,"msg":"bad","details":"line 1"})
    );
}
