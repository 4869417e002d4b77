//! End to end on the kernel: a "node" namespace with the agent's bridge,
//! container namespaces, and the built `skein-cni` run inside the node
//! namespace exactly as a runtime would run it there. Needs root; skipped
//! (with a message) otherwise.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{describe, netconf, run_plugin, stdout_json, TempDir};
use serde_json::Value;
use skein_cni::netlink::host_veth_name;
use skein_cni::Store;

/// A network namespace of this test, deleted on drop (also on panic).
struct Netns(String);

impl Netns {
    fn add(name: String) -> Netns {
        // A leftover of an aborted earlier run with the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn try_sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn sh(args: &[&str]) -> String {
    let out = try_sh(args);
    assert!(out.status.success(), "{args:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Node<'a> {
    ns: &'a Netns,
    conf: String,
}

impl Node<'_> {
    /// The plugin inside the node namespace, for one container.
    fn cni(&self, command: &str, container: &str, netns: Option<&Netns>, stdin: &str) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.0, env!("CARGO_BIN_EXE_skein-cni")]);
        let netns = netns.map(Netns::path).unwrap_or_default();
        run_plugin(
            cmd,
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "IgnoreUnknown=1"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            stdin,
        )
    }

    fn add(&self, container: &str, netns: &Netns) -> Value {
        let out = self.cni("ADD", container, Some(netns), &self.conf);
        assert!(out.status.success(), "ADD {container}: {}", describe(&out));
        stdout_json(&out)
    }

    fn ok(&self, command: &str, container: &str, netns: Option<&Netns>) -> Output {
        let out = self.cni(command, container, netns, &self.conf);
        assert!(
            out.status.success(),
            "{command} {container}: {}",
            describe(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "{command} {container}: {}",
            describe(&out)
        );
        out
    }

    fn has_link(&self, name: &str) -> bool {
        try_sh(&["ip", "-n", &self.ns.0, "link", "show", name])
            .status
            .success()
    }
}

/// Can `from` reach `addr`, which namespace `owner` holds? With `ping` where
/// the machine has it; where it does not (minimal CI images), a UDP echo
/// between two threads that `setns` into the two namespaces, which takes the
/// same path (ARP, the bridge, the veths).
fn reach(from: &Netns, owner: &Netns, addr: &str) -> bool {
    if have_ping() {
        try_sh(&["ip", "netns", "exec", &from.0, "ping", "-c1", "-W2", addr])
            .status
            .success()
    } else {
        udp_echo(from, owner, addr)
    }
}

fn have_ping() -> bool {
    Command::new("ping").arg("-V").output().is_ok()
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on an fd we hold; it moves only this (test) thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

fn udp_echo(from: &Netns, owner: &Netns, addr: &str) -> bool {
    let ip: Ipv4Addr = addr.parse().expect("address");
    let (from, owner) = (from.path(), owner.path());
    let (port_tx, port_rx) = mpsc::channel();
    let server = thread::spawn(move || {
        enter(&owner);
        let sock = UdpSocket::bind((ip, 0)).expect("bind in owner netns");
        let _ = port_tx.send(sock.local_addr().expect("local addr").port());
        sock.set_read_timeout(Some(Duration::from_secs(4)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    });
    let port = port_rx.recv().expect("server port");
    let client = thread::spawn(move || {
        enter(&from);
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind in from netns");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        if sock.send_to(b"skein-cni", (ip, port)).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(sock.recv_from(&mut buf), Ok((9, _))) && &buf[..9] == b"skein-cni"
    });
    let ok = client.join().unwrap_or(false);
    let _ = server.join();
    ok
}

fn is_mac(s: &Value) -> bool {
    let s = s.as_str().unwrap_or_default();
    s.len() == 17
        && s.split(':')
            .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok())
}

fn check_result(v: &Value, container: &str, netns: &Netns, address: &str) {
    assert_eq!(v["cniVersion"], "1.0.0", "{v}");
    let ifs = v["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifs.len(), 2, "{v}");
    assert_eq!(ifs[0]["name"], host_veth_name(container, "eth0").as_str());
    assert!(ifs[0].get("sandbox").is_none(), "{v}");
    assert_eq!(ifs[1]["name"], "eth0");
    assert_eq!(ifs[1]["sandbox"], netns.path().as_str());
    assert!(is_mac(&ifs[0]["mac"]) && is_mac(&ifs[1]["mac"]), "{v}");
    assert_eq!(
        v["ips"],
        serde_json::json!([{"address": address, "gateway": "10.99.0.1", "interface": 1}])
    );
    assert_eq!(
        v["routes"],
        serde_json::json!([{"dst": "0.0.0.0/0", "gw": "10.99.0.1"}])
    );
    assert_eq!(v["dns"], serde_json::json!({}));
}

fn check_container(netns: &Netns, address: &str) {
    let addr = sh(&[
        "ip", "-n", &netns.0, "-o", "-4", "addr", "show", "dev", "eth0",
    ]);
    assert!(addr.contains(&format!("inet {address} ")), "{addr}");
    let link = sh(&["ip", "-n", &netns.0, "link", "show", "eth0"]);
    assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");
    let lo = sh(&["ip", "-n", &netns.0, "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let route = sh(&["ip", "-n", &netns.0, "-4", "route", "show", "default"]);
    assert!(route.contains("default via 10.99.0.1 dev eth0"), "{route}");
}

#[test]
fn containers_on_a_bridge() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // A skip must not pass silently where the suite is the proof.
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/netns.rs needs root (network namespaces, veths, bridges), and CI must run it"
        );
        eprintln!("skipping tests/netns.rs: needs root (network namespaces, veths, bridges)");
        return;
    }
    let tag = format!("skcni{}", std::process::id());
    let node_ns = Netns::add(format!("{tag}-node"));
    let c1 = Netns::add(format!("{tag}-c1"));
    let c2 = Netns::add(format!("{tag}-c2"));
    let c3 = Netns::add(format!("{tag}-c3"));
    let c4 = Netns::add(format!("{tag}-c4"));
    let data = TempDir::new("netns");
    if have_ping() {
        eprintln!("reachability checked with ping");
    } else {
        eprintln!(
            "ping is not installed: reachability checked with a UDP echo between the namespaces"
        );
    }

    // What the agent does for one overlay bridge.
    let n = node_ns.0.as_str();
    sh(&[
        "ip", "netns", "exec", n, "ip", "link", "add", "m-test", "type", "bridge",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        n,
        "ip",
        "addr",
        "add",
        "10.99.0.1/25",
        "dev",
        "m-test",
    ]);
    sh(&[
        "ip", "netns", "exec", n, "ip", "link", "set", "m-test", "up",
    ]);
    let node = Node {
        ns: &node_ns,
        conf: netconf(data.path(), "m-test", "10.99.0.0/25", "10.99.0.1"),
    };
    let store = Store::new(data.path(), "dcos", "m-test");

    // Two containers: the two lowest addresses after the gateway.
    let r1 = node.add("ctr-1", &c1);
    check_result(&r1, "ctr-1", &c1, "10.99.0.2/25");
    let r2 = node.add("ctr-2", &c2);
    check_result(&r2, "ctr-2", &c2, "10.99.0.3/25");
    check_container(&c1, "10.99.0.2/25");
    check_container(&c2, "10.99.0.3/25");
    let host1 = host_veth_name("ctr-1", "eth0");
    let host2 = host_veth_name("ctr-2", "eth0");
    let link = sh(&["ip", "-n", n, "link", "show", &host1]);
    assert!(
        link.contains("master m-test") && link.contains("mtu 1420"),
        "{link}"
    );
    assert!(link.contains(",UP"), "{link}");

    assert!(reach(&c1, &c2, "10.99.0.3"), "c1 cannot reach c2");
    assert!(reach(&c2, &c1, "10.99.0.2"), "c2 cannot reach c1");
    assert!(
        reach(&c1, &node_ns, "10.99.0.1"),
        "c1 cannot reach the gateway"
    );

    // ADD again: the same answer, nothing recreated.
    assert_eq!(node.add("ctr-1", &c1), r1);
    assert!(reach(&c1, &c2, "10.99.0.3"));
    node.ok("CHECK", "ctr-1", Some(&c1));

    // DEL c2: veth gone, address free, the next ADD reuses it.
    node.ok("DEL", "ctr-2", Some(&c2));
    assert!(!node.has_link(&host2), "host veth {host2} survived DEL");
    assert!(!try_sh(&["ip", "-n", &c2.0, "link", "show", "eth0"])
        .status
        .success());
    assert!(!store.dir().join("10.99.0.3").exists());
    let out = node.cni("CHECK", "ctr-2", Some(&c2), &node.conf);
    assert_eq!(stdout_json(&out)["code"], 3, "{}", describe(&out));
    let r3 = node.add("ctr-3", &c3);
    check_result(&r3, "ctr-3", &c3, "10.99.0.3/25");
    assert!(reach(&c1, &c3, "10.99.0.3"), "c1 cannot reach c3");

    // DEL of a container never added: exit 0, a note, nobody else touched.
    let before = store.snapshot().unwrap();
    let out = node.ok("DEL", "never-added", Some(&c4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nothing was allocated for container never-added"),
        "{stderr}"
    );
    assert_eq!(store.snapshot().unwrap(), before);
    assert!(reach(&c1, &c3, "10.99.0.3") && reach(&c3, &c1, "10.99.0.2"));
    node.ok("CHECK", "ctr-1", Some(&c1));
    node.ok("CHECK", "ctr-3", Some(&c3));

    // Malformed stdin.
    let out = node.cni("ADD", "ctr-4", Some(&c4), "{\"cniVersion\":");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(stdout_json(&out)["code"], 6);

    // A repeated DEL is fine.
    node.ok("DEL", "ctr-2", Some(&c2));
    node.ok("DEL", "ctr-2", None);

    // ADD into a namespace that already has an eth0 fails and leaves no
    // veth and no allocation behind.
    sh(&["ip", "-n", &c4.0, "link", "add", "eth0", "type", "bridge"]);
    let out = node.cni("ADD", "ctr-4", Some(&c4), &node.conf);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stdout_json(&out);
    assert!(
        err["msg"].as_str().unwrap_or_default().contains("eth0"),
        "{err}"
    );
    assert!(!node.has_link(&host_veth_name("ctr-4", "eth0")));
    assert_eq!(store.snapshot().unwrap(), before);

    // An older runtime's cniVersion gets an older result.
    let mut old: Value = serde_json::from_str(&node.conf).unwrap();
    old["cniVersion"] = "0.4.0".into();
    let out = node.cni("ADD", "ctr-2", Some(&c2), &old.to_string());
    assert!(out.status.success(), "{}", describe(&out));
    let v = stdout_json(&out);
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["ips"][0]["version"], "4");
    assert_eq!(v["ips"][0]["address"], "10.99.0.4/25");

    // DEL after the runtime already destroyed the namespace: just release.
    let c3_path = c3.path();
    drop(c3);
    assert!(!std::path::Path::new(&c3_path).exists());
    let out = node.cni("DEL", "ctr-3", None, &node.conf);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!store.dir().join("10.99.0.3").exists());
    assert!(!node.has_link(&host_veth_name("ctr-3", "eth0")));
    assert!(
        reach(&c1, &c2, "10.99.0.4"),
        "c1 cannot reach the re-added c2"
    );
}
