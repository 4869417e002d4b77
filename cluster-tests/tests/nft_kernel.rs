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
