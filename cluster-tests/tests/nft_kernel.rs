//! The nftables dataplane against the real kernel, in namespaces made here:
//! the generated table loads, and applying incremental transactions leaves
//! exactly the table a full rewrite of the same state gives.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use cluster_tests::{require_root, sh};
use skein_l4lb::nft::{ruleset, transaction, Service};
use skein_state::Protocol;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!("sknft{}{tag}", std::process::id() % 100_000);
        sh(&["ip", "netns", "add", &name])?;
        Ok(Netns(name))
    }

    fn nft_stdin(&self, text: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "nft: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The table's lines, trimmed and sorted: chain order may differ
    /// between a full load and a sequence of transactions.
    fn listing(&self) -> anyhow::Result<Vec<String>> {
        let out = sh(&[
            "ip", "netns", "exec", &self.0, "nft", "list", "table", "ip", "skein",
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
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
    let incremental = Netns::new("i")?;
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
    ];
    incremental.nft_stdin(&ruleset(&states[0]))?;
    for pair in states.windows(2) {
        if let Some(tx) = transaction(&pair[0], &pair[1]) {
            incremental.nft_stdin(&tx)?;
        }
        let full = Netns::new("f")?;
        full.nft_stdin(&ruleset(&pair[1]))?;
        assert_eq!(
            incremental.listing()?,
            full.listing()?,
            "after moving to {:?}",
            pair[1]
        );
        // A full rewrite over an existing table also lands on the same table.
        incremental.nft_stdin(&ruleset(&pair[1]))?;
        assert_eq!(incremental.listing()?, full.listing()?);
    }
    Ok(())
}
