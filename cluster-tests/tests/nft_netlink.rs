//! The netlink element path (`skein_nftables`) against the real kernel, in
//! namespaces made here: random sequences of VIP states applied through
//! `Table::plan`'s element operations leave exactly the elements that the
//! `nft -f` text of the same changes leaves; a batch with one bad operation
//! changes nothing and says which operation failed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use cluster_tests::{require_root, sh, ScratchNetns};
use skein_l4lb::nft::{Service, Table, TABLE};
use skein_nftables::{Component, ElementOp, Error, Nftables};
use skein_state::Protocol;

/// Every set's and map's elements in the namespace's table, from
/// `nft -j list table`, each element as its JSON text.
fn elements(ns: &ScratchNetns) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let out = sh(&[
        "ip", "netns", "exec", &ns.0, "nft", "-j", "list", "table", "ip", TABLE,
    ])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j")?;
    let mut sets = BTreeMap::new();
    for item in json["nftables"].as_array().context("nftables array")? {
        let Some(set) = item.get("set").or_else(|| item.get("map")) else {
            continue;
        };
        let name = set["name"].as_str().context("set name")?.to_string();
        let elems: BTreeSet<String> = set["elem"]
            .as_array()
            .map(|a| a.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default();
        if !elems.is_empty() {
            sets.insert(name, elems);
        }
    }
    Ok(sets)
}

/// xorshift64*: deterministic random states without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Up to 8 services on a few addresses and ports, 0 to 19 backends each
/// (beyond the 16 preset classes now and then).
fn random_state(rng: &mut Rng) -> Vec<Service> {
    let mut by_key = BTreeMap::new();
    for _ in 0..rng.below(9) {
        let address = Ipv4Addr::new(11, 0, 0, 1 + rng.below(6) as u8);
        let protocol = if rng.below(2) == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let port = [80, 53, 3141][rng.below(3) as usize];
        let n = if rng.below(8) == 0 {
            17 + rng.below(3)
        } else {
            rng.below(6)
        };
        let mut backends: Vec<(Ipv4Addr, u16)> = (0..n)
            .map(|_| {
                (
                    Ipv4Addr::new(10, 0, 0, 1 + rng.below(24) as u8),
                    8000 + rng.below(3) as u16,
                )
            })
            .collect();
        backends.sort();
        backends.dedup();
        by_key.insert(
            (address, protocol, port),
            Service {
                address,
                protocol,
                port,
                backends,
            },
        );
    }
    by_key.into_values().collect()
}

fn client(ns: &ScratchNetns) -> anyhow::Result<Nftables> {
    Ok(Nftables::open_in_netns(Path::new(&format!(
        "/run/netns/{}",
        ns.0
    )))?)
}

#[test]
fn netlink_element_batches_equal_the_nft_text_path() -> anyhow::Result<()> {
    require_root();
    for seed in [1u64, 7, 42] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let by_text = ScratchNetns::new("t")?;
        let by_netlink = ScratchNetns::new("n")?;
        let first = random_state(&mut rng);
        let mut text_table = Table::new(&first);
        let mut plan_table = text_table.clone();
        by_text.nft(&text_table.ruleset())?;
        by_netlink.nft(&plan_table.ruleset())?;
        let mut nl = client(&by_netlink)?;
        let (mut batches, mut structural) = (0, 0);
        for step in 0..25 {
            let next = random_state(&mut rng);
            let text = text_table.update(&next);
            let change = plan_table.plan(&next);
            assert_eq!(text, change.as_ref().map(|c| c.text.clone()));
            if let (Some(text), Some(change)) = (text, change) {
                by_text.nft(&text)?;
                if let Some(s) = &change.structural {
                    by_netlink.nft(s)?;
                    structural += 1;
                }
                nl.apply(TABLE, &change.elements)
                    .with_context(|| format!("seed {seed} step {step}: {next:?}"))?;
                batches += 1;
            }
            assert_eq!(
                elements(&by_netlink)?,
                elements(&by_text)?,
                "seed {seed} step {step}: after moving to {next:?}"
            );
        }
        assert!(batches > 15, "seed {seed}: only {batches} changes");
        eprintln!("seed {seed}: {batches} batches, {structural} with new classes");
    }
    Ok(())
}

#[test]
fn a_batch_with_one_bad_operation_changes_nothing() -> anyhow::Result<()> {
    require_root();
    let ns = ScratchNetns::new("a")?;
    let vip = Ipv4Addr::new(11, 0, 0, 1);
    let services = vec![Service {
        address: vip,
        protocol: Protocol::Tcp,
        port: 80,
        backends: vec![(Ipv4Addr::new(10, 0, 0, 2), 8080)],
    }];
    ns.nft(&Table::new(&services).ruleset())?;
    let before = elements(&ns)?;
    let mut nl = client(&ns)?;
    let slot = |s: u32| vec![Component::Ipv4(vip), Component::Port(80), Component::U32(s)];
    let target = Some(vec![
        Component::Ipv4(Ipv4Addr::new(10, 0, 0, 3)),
        Component::Port(8080),
    ]);
    // Good operations around a delete of an element that is not there.
    let ops = vec![
        ElementOp::delete("tcp1", vec![Component::Ipv4(vip), Component::Port(80)]),
        ElementOp::add(
            "tcp2",
            vec![Component::Ipv4(vip), Component::Port(80)],
            None,
        ),
        ElementOp::delete("tcp_backends", slot(0)),
        ElementOp::delete("tcp_backends", slot(5)),
        ElementOp::add("tcp_backends", slot(0), target.clone()),
        ElementOp::add("tcp_backends", slot(1), target.clone()),
    ];
    let err = nl.apply(TABLE, &ops).expect_err("a missing element");
    eprintln!("{err}");
    match &err {
        Error::Refused {
            index, exact, op, ..
        } => {
            assert_eq!((*index, *exact), (3, true), "{err}");
            assert_eq!(op, "delete element tcp_backends { 11.0.0.1 . 80 . 5 }");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(err.errno(), Some(libc::ENOENT));
    assert_eq!(elements(&ns)?, before, "a failed batch changed the table");

    // A set that does not exist: refused, nothing changed.
    let mut bad = ops.clone();
    bad.remove(3);
    bad.push(ElementOp::add("tcp99", slot(0), None));
    let err = nl.apply(TABLE, &bad).expect_err("no such set");
    eprintln!("{err}");
    assert!(matches!(&err, Error::Refused { index: 5, .. }), "{err:?}");
    assert_eq!(elements(&ns)?, before);

    // A key of the wrong length for the set: refused.
    let mut bad = ops.clone();
    bad.remove(3);
    bad.insert(0, ElementOp::add("hairpin", slot(0), None));
    let err = nl.apply(TABLE, &bad).expect_err("wrong key length");
    eprintln!("{err}");
    assert!(matches!(&err, Error::Refused { index: 0, .. }), "{err:?}");
    assert_eq!(elements(&ns)?, before);

    // The same batch without the bad operation applies, all of it.
    let mut good = ops;
    good.remove(3);
    nl.apply(TABLE, &good)?;
    let after = elements(&ns)?;
    assert!(!after.contains_key("tcp1"), "{after:?}");
    assert_eq!(after["tcp2"].len(), 1);
    assert_eq!(after["tcp_backends"].len(), 2);
    // And a table that does not exist is an error, not a hang.
    let err = nl.apply("nosuchtable", &good[..1]).expect_err("no table");
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    Ok(())
}

#[test]
fn skeleton_and_elements_or_a_refill_equal_a_full_rewrite() -> anyhow::Result<()> {
    require_root();
    let mut rng = Rng(0x5eed);
    // At most the preset classes, so every state has the same structure.
    let mut state = || {
        let mut s = random_state(&mut rng);
        for svc in &mut s {
            svc.backends.truncate(16);
        }
        s
    };
    let two_steps = ScratchNetns::new("k")?;
    let first = state();
    let table = Table::new(&first);
    two_steps.nft(&table.skeleton())?;
    let mut nl = client(&two_steps)?;
    nl.apply(TABLE, &table.elements())?;
    let reference = ScratchNetns::new("r")?;
    reference.nft(&table.ruleset())?;
    assert_eq!(elements(&two_steps)?, elements(&reference)?);
    for step in 0..10 {
        let next = Table::new(&state());
        nl.apply(TABLE, &next.refill())?;
        reference.nft(&next.ruleset())?;
        assert_eq!(
            elements(&two_steps)?,
            elements(&reference)?,
            "step {step}: refill to {next:?}"
        );
    }
    // A refill with a bad element changes nothing either.
    let before = elements(&two_steps)?;
    let mut bad = Table::new(&state()).refill();
    bad.push(ElementOp::add("tcp1", vec![Component::Port(1)], None));
    assert!(nl.apply(TABLE, &bad).is_err());
    assert_eq!(elements(&two_steps)?, before);
    Ok(())
}

/// The kernel tracks connections in a namespace only while something needs
/// it; `track_connections` (for the IPVS dataplane's counts) makes it so,
/// is idempotent, and lays out what `nft` would show.
#[test]
fn track_connections_turns_conntrack_on_in_the_namespace() -> anyhow::Result<()> {
    require_root();
    let ns = ScratchNetns::new("ct")?;
    let tracked = |ns: &ScratchNetns| -> anyhow::Result<u64> {
        let name = ns.0.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            cluster_tests::enter_netns(&name)?;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let _c = std::net::TcpStream::connect(listener.local_addr()?)?;
            let n = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")?;
            Ok(n.trim().parse()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
    };
    assert_eq!(tracked(&ns)?, 0, "nothing needs conntrack yet");
    let mut nft = client(&ns)?;
    nft.track_connections("skein_ct")?;
    nft.track_connections("skein_ct")?;
    assert!(tracked(&ns)? >= 1, "a connection is tracked now");
    // A `ct` load with no match after it: nft prints it only as netlink.
    let listed = sh(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "nft",
        "--debug=netlink",
        "list",
        "table",
        "inet",
        "skein_ct",
    ])?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        listed.matches("[ ct load state => reg 1 ]").count(),
        1,
        "one rule after two calls:\n{listed}"
    );
    assert!(listed.contains("chain track"), "{listed}");
    // Undone (the dataplane or --vip-counts changed): the table goes, and
    // undoing again is no error.
    nft.untrack_connections("skein_ct")?;
    nft.untrack_connections("skein_ct")?;
    let listed = sh(&["ip", "netns", "exec", &ns.0, "nft", "list", "tables"])?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains("skein_ct"), "{listed}");
    Ok(())
}
