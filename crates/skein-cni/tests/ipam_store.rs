//! The allocation store on a real directory: the files it leaves, that it
//! agrees with the pure model for any sequence of ADD/DEL, and that the
//! flock keeps concurrent ADDs (threads and separate processes) apart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::TempDir;
use proptest::prelude::*;
use skein_cni::ipam::{choose, owned_by, Allocations, Choice};
use skein_cni::{code, Owner, Pool, Store};

fn pool(subnet: &str, gateway: &str) -> Pool {
    Pool {
        subnet: subnet.parse().unwrap(),
        gateway: gateway.parse().unwrap(),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The allocation directory as name -> content, to compare before/after.
fn listing(dir: &Path) -> BTreeMap<String, String> {
    match std::fs::read_dir(dir) {
        Err(_) => BTreeMap::new(),
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect(),
    }
}

#[test]
fn files_like_host_local() {
    let tmp = TempDir::new("files");
    let store = Store::new(tmp.path(), "dcos", "m-dcos");
    let p = pool("9.0.1.0/25", "9.0.1.1");
    let c1 = Owner::new("c1", "eth0");
    assert_eq!(
        store.allocate(&p, &c1).unwrap(),
        Choice::Fresh(ip("9.0.1.2"))
    );
    assert_eq!(store.dir(), tmp.path().join("dcos/m-dcos"));
    assert_eq!(store.lock_path(), tmp.path().join("dcos/m-dcos.lock"));
    assert!(store.lock_path().exists());
    assert_eq!(
        listing(store.dir()),
        BTreeMap::from([("9.0.1.2".to_string(), "c1\r\neth0".to_string())])
    );
    // Another process (a plugin restart) sees the same state.
    let again = Store::new(tmp.path(), "dcos", "m-dcos");
    assert_eq!(
        again.allocate(&p, &c1).unwrap(),
        Choice::Existing(ip("9.0.1.2"))
    );
    assert_eq!(again.lookup(&c1).unwrap(), Some(ip("9.0.1.2")));
    // Bridges and networks are separate stores.
    let d = Store::new(tmp.path(), "dcos", "d-dcos");
    assert_eq!(
        d.allocate(&pool("9.0.1.128/25", "9.0.1.129"), &c1).unwrap(),
        Choice::Fresh(ip("9.0.1.130"))
    );
    assert_eq!(again.release(&c1).unwrap(), vec![ip("9.0.1.2")]);
    assert!(listing(store.dir()).is_empty());
    assert_eq!(d.lookup(&c1).unwrap(), Some(ip("9.0.1.130")));
}

#[test]
fn stray_files_are_not_allocations_but_garbage_owners_are() {
    let tmp = TempDir::new("stray");
    let store = Store::new(tmp.path(), "dcos", "m-dcos");
    std::fs::create_dir_all(store.dir()).unwrap();
    std::fs::write(store.dir().join(".9.0.1.2.123.tmp"), "x").unwrap();
    std::fs::write(store.dir().join("last_reserved_ip.0"), "9.0.1.9").unwrap();
    std::fs::write(store.dir().join("9.0.1.3"), "").unwrap();
    let p = pool("9.0.1.0/25", "9.0.1.1");
    let a = Owner::new("a", "eth0");
    let b = Owner::new("b", "eth0");
    assert_eq!(store.allocate(&p, &a).unwrap().ip(), ip("9.0.1.2"));
    assert_eq!(store.allocate(&p, &b).unwrap().ip(), ip("9.0.1.4"));
}

#[test]
fn exhaustion_is_101() {
    let tmp = TempDir::new("exhaust");
    let store = Store::new(tmp.path(), "dcos", "m-dcos");
    let p = pool("10.0.0.0/29", "10.0.0.1");
    for i in 0..5 {
        store
            .allocate(&p, &Owner::new(format!("c{i}"), "eth0"))
            .unwrap();
    }
    let e = store.allocate(&p, &Owner::new("c5", "eth0")).unwrap_err();
    assert_eq!(e.code, code::SUBNET_EXHAUSTED);
    assert_eq!(
        e.msg,
        "subnet exhausted: all 5 addresses of 10.0.0.0/29 are allocated"
    );
    let before = listing(store.dir());
    // DEL of something never allocated changes nothing.
    assert!(store.release(&Owner::new("c5", "eth0")).unwrap().is_empty());
    assert!(store.release(&Owner::new("c1", "eth1")).unwrap().is_empty());
    assert_eq!(listing(store.dir()), before);
    assert_eq!(
        store.release(&Owner::new("c3", "eth0")).unwrap(),
        vec![ip("10.0.0.5")]
    );
    assert_eq!(
        store.allocate(&p, &Owner::new("c5", "eth0")).unwrap(),
        Choice::Fresh(ip("10.0.0.5"))
    );
}

#[test]
fn a_held_lock_turns_into_try_again_later() {
    let tmp = TempDir::new("busy");
    let store =
        Store::new(tmp.path(), "dcos", "m-dcos").with_lock_timeout(Duration::from_millis(100));
    store.snapshot().unwrap();
    let f = std::fs::File::open(store.lock_path()).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    let e = store
        .allocate(&pool("10.0.0.0/29", "10.0.0.1"), &Owner::new("c", "eth0"))
        .unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    drop(f);
    assert!(store.snapshot().unwrap().is_empty());
}

/// 20 ADDs at once from 20 threads, each with its own open of the lock file
/// (flock locks are per open file, so they exclude each other like
/// processes do).
#[test]
fn twenty_concurrent_adds_get_twenty_addresses() {
    let tmp = TempDir::new("conc");
    let p = pool("9.0.1.0/25", "9.0.1.1");
    let start = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let dir = tmp.path().to_path_buf();
            let start = start.clone();
            std::thread::spawn(move || {
                let store = Store::new(&dir, "dcos", "m-dcos");
                start.wait();
                store
                    .allocate(&p, &Owner::new(format!("c{i}"), "eth0"))
                    .unwrap()
                    .ip()
            })
        })
        .collect();
    let got: Vec<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_distinct_and_recorded(tmp.path(), &p, &got, |i| format!("c{i}"));
}

fn assert_distinct_and_recorded(
    data: &Path,
    p: &Pool,
    got: &[Ipv4Addr],
    id: impl Fn(usize) -> String,
) {
    let distinct: BTreeSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), got.len(), "duplicates in {got:?}");
    // Compact: exactly the 20 lowest usable addresses.
    let expect: BTreeSet<Ipv4Addr> = p.usable().take(got.len()).collect();
    assert_eq!(
        distinct.into_iter().copied().collect::<BTreeSet<_>>(),
        expect
    );
    let snap = Store::new(data, "dcos", "m-dcos").snapshot().unwrap();
    assert_eq!(snap.len(), got.len());
    for (i, ip) in got.iter().enumerate() {
        assert_eq!(snap[ip], Some(Owner::new(id(i), "eth0")));
    }
}

/// The same with 20 processes: this test binary re-run as workers (see
/// `worker_allocate`), which is how plugin invocations really race.
#[test]
fn twenty_concurrent_processes_get_twenty_addresses() {
    let tmp = TempDir::new("procs");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..20)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "worker_allocate",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(
                    "SKEIN_CNI_TEST_WORKER",
                    format!("{}|p{i}", tmp.path().display()),
                )
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut got = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("ALLOCATED ").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("worker printed no address: {text}"));
        let (id, addr) = line.split_once(' ').unwrap();
        got.push((
            id.trim_start_matches('p').parse::<usize>().unwrap(),
            ip(addr),
        ));
    }
    got.sort();
    let ips: Vec<Ipv4Addr> = got.iter().map(|(_, ip)| *ip).collect();
    assert_distinct_and_recorded(tmp.path(), &pool("9.0.1.0/25", "9.0.1.1"), &ips, |i| {
        format!("p{i}")
    });
}

/// Not a test on its own: does one ADD when run as a worker of the test
/// above, and nothing otherwise.
#[test]
fn worker_allocate() {
    let Ok(spec) = std::env::var("SKEIN_CNI_TEST_WORKER") else {
        return;
    };
    let (dir, id) = spec.split_once('|').unwrap();
    let store = Store::new(Path::new(dir), "dcos", "m-dcos");
    let got = store
        .allocate(&pool("9.0.1.0/25", "9.0.1.1"), &Owner::new(id, "eth0"))
        .unwrap();
    println!("ALLOCATED {id} {}", got.ip());
}

#[derive(Debug, Clone)]
enum Op {
    Add(usize),
    Del(usize),
}

fn owner(i: usize) -> Owner {
    Owner::new(format!("c{}", i % 4), format!("eth{}", i / 4))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The files agree with the pure model step by step: same answers,
    /// same allocations, DEL of nothing leaves the directory byte-identical.
    #[test]
    fn store_follows_the_model(
        ops in prop::collection::vec(prop_oneof![(0usize..8).prop_map(Op::Add), (0usize..8).prop_map(Op::Del)], 1..40),
        gw in 1u32..7,
    ) {
        let tmp = TempDir::new("prop");
        let store = Store::new(tmp.path(), "dcos", "m-dcos");
        let p = Pool {
            subnet: "10.1.2.8/29".parse().unwrap(),
            gateway: Ipv4Addr::from(u32::from(ip("10.1.2.8")) + gw),
        };
        let mut model = Allocations::new();
        for op in ops {
            match op {
                Op::Add(i) => {
                    let who = owner(i);
                    let expect = choose(&p, &model, &who);
                    let got = store.allocate(&p, &who);
                    match (&expect, &got) {
                        (Ok(e), Ok(g)) => {
                            prop_assert_eq!(e, g);
                            prop_assert!(p.is_usable(g.ip()));
                            model.insert(g.ip(), Some(who));
                        }
                        (Err(e), Err(g)) => {
                            prop_assert_eq!(e.code, code::SUBNET_EXHAUSTED);
                            prop_assert_eq!(g.code, code::SUBNET_EXHAUSTED);
                        }
                        _ => prop_assert!(false, "model {:?} vs store {:?}", expect, got),
                    }
                }
                Op::Del(i) => {
                    let who = owner(i);
                    let expect = owned_by(&model, &who);
                    let before = listing(store.dir());
                    let freed = store.release(&who).unwrap();
                    prop_assert_eq!(&freed, &expect);
                    if expect.is_empty() {
                        prop_assert_eq!(listing(store.dir()), before);
                    }
                    for ip in freed {
                        model.remove(&ip);
                    }
                }
            }
            prop_assert_eq!(store.snapshot().unwrap(), model.clone());
            let live: Vec<_> = model.values().collect();
            let distinct: BTreeSet<_> = live.iter().collect();
            prop_assert_eq!(distinct.len(), live.len(), "an owner holds two addresses");
        }
    }
}
