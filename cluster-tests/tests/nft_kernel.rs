//! The nftables dataplane against the real kernel, in namespaces made here:
//! the generated table loads, and applying incremental transactions leaves
//! exactly the table a full rewrite of the same state gives.

use std::net::Ipv4Addr;

use cluster_tests::{require_root, sh, ScratchNetns};
use skein_l4lb::nft::{ruleset, Service, Table, PRESET_CLASSES};
use skein_state::Protocol;

/// The table's lines in a namespace, trimmed and sorted: chain order may
/// differ between a full load and a sequence of transactions.
fn listing(ns: &ScratchNetns) -> anyhow::Result<Vec<String>> {
    let out = sh(&[
        "ip", "netns", "exec", &ns.0, "nft", "list", "table", "ip", "skein",
    ])?;
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|l| {
            l.split(", ")
                .map(|p| p.trim().trim_end_matches(',').to_string())
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    Ok(lines)
}

fn svc(last: u8, port: u16, protocol: Protocol, backends: &[(u8, u16)]) -> Service {
    Service {
        address: Ipv4Addr::new(11, 0, 0, last),
        protocol,
        port,
        backends: backends
            .iter()
            .map(|&(b, p)| (Ipv4Addr::new(10, 0, 0, b), p))
            .collect(),
    }
}

#[test]
fn incremental_transactions_equal_a_full_rewrite_in_the_kernel() -> anyhow::Result<()> {
    require_root();
    let incremental = ScratchNetns::new("i")?;
    let many: Vec<(u8, u16)> = (1..=PRESET_CLASSES as u8 + 1).map(|b| (b, 80)).collect();
    let states: Vec<Vec<Service>> = vec![
        vec![],
        vec![svc(1, 80, Protocol::Tcp, &[(1, 8080)])],
        vec![
            svc(1, 80, Protocol::Tcp, &[(1, 8080), (2, 8080)]),
            svc(2, 53, Protocol::Udp, &[(3, 5353)]),
        ],
        vec![
            svc(1, 80, Protocol::Tcp, &[(2, 8080), (4, 8081), (5, 8082)]),
            svc(2, 53, Protocol::Udp, &[(3, 5353)]),
        ],
        vec![
            svc(2, 53, Protocol::Udp, &[(3, 5353), (6, 5353)]),
            svc(3, 443, Protocol::Tcp, &[(7, 8443)]),
        ],
        vec![svc(3, 443, Protocol::Tcp, &[])],
        vec![],
        // More backends than the preset classes: the class rule is added.
        vec![svc(4, 80, Protocol::Tcp, &many)],
    ];
    let mut table = Table::new(&states[0]);
    incremental.nft(&table.ruleset())?;
    for pair in states.windows(2) {
        if let Some(tx) = table.update(&pair[1]) {
            incremental.nft(&tx)?;
        }
        let full = ScratchNetns::new("f")?;
        full.nft(&ruleset(&pair[1]))?;
        assert_eq!(
            listing(&incremental)?,
            listing(&full)?,
            "after moving to {:?}",
            pair[1]
        );
        // A full rewrite over an existing table also lands on the same table.
        table = Table::new(&pair[1]);
        incremental.nft(&table.ruleset())?;
        assert_eq!(listing(&incremental)?, listing(&full)?);
    }
    Ok(())
}

/// What `nft -j` lists in `ns`, as the agent's realizer reads it back.
fn read_back(ns: &ScratchNetns) -> anyhow::Result<Option<Table>> {
    let out = sh(&[
        "ip", "netns", "exec", &ns.0, "nft", "-j", "list", "table", "ip", "skein",
    ])?;
    let listing = skein_agent::l4lb::parse_listing(&String::from_utf8_lossy(&out.stdout))?;
    Ok(skein_agent::l4lb::table_of(&listing))
}

/// The realizer's drift check reads the kernel's table back into the model:
/// what it programmed must read back as exactly that (or every resync would
/// count drift and rewrite), and a hand edit must not.
#[test]
fn the_realizer_reads_back_exactly_what_it_programmed() -> anyhow::Result<()> {
    require_root();
    let ns = ScratchNetns::new("r")?;
    let many: Vec<(u8, u16)> = (1..=PRESET_CLASSES as u8 + 2).map(|b| (b, 80)).collect();
    let states: Vec<Vec<Service>> = vec![
        vec![],
        vec![
            svc(1, 80, Protocol::Tcp, &[(1, 8080), (2, 8080)]),
            svc(2, 53, Protocol::Udp, &[(3, 5353)]),
        ],
        vec![svc(4, 80, Protocol::Tcp, &many)],
        // Back to few backends: the grown classes stay in the kernel.
        vec![svc(1, 80, Protocol::Tcp, &[(1, 8080)])],
    ];
    let mut table = Table::new(&states[0]);
    ns.nft(&table.ruleset())?;
    assert_eq!(read_back(&ns)?, Some(table.clone()));
    for state in &states[1..] {
        if let Some(change) = table.plan(state) {
            ns.nft(&change.text)?;
        }
        assert_eq!(read_back(&ns)?, Some(table.clone()), "after {state:?}");
    }
    assert!(table.classes() > PRESET_CLASSES);
    // A backend deleted by hand: no longer the table we programmed.
    ns.nft("delete element ip skein tcp_backends { 11.0.0.1 . 80 . 0 }")?;
    assert_ne!(read_back(&ns)?, Some(table.clone()));
    // No table at all.
    ns.nft("delete table ip skein")?;
    assert!(
        sh(&["ip", "netns", "exec", &ns.0, "nft", "-j", "list", "table", "ip", "skein"]).is_err()
    );
    Ok(())
}
