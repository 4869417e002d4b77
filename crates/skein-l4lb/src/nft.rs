//! The nftables dataplane's pure half: the ruleset a node should have for a
//! set of VIPs, as `nft -f` text. kube-proxy's nftables mode is the model:
//! one private table, a verdict map from `daddr . l4proto . dport` to a
//! per-service chain, which DNATs to `numgen random mod N` over an inline map
//! of backends. One chain per service and none per backend: nft's cost grows
//! with the number of chains (a 10,000-VIP table with a chain per backend
//! took a minute to load here). The whole table is replaced in one `nft -f`
//! transaction, which the kernel applies atomically, at start-up and on
//! drift; changes are small transactions ([`transaction`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};

use skein_state::Protocol;

/// Our private table; nothing else of the host's ruleset is touched.
pub const TABLE: &str = "skein";
/// Packets from a backend to its own VIP get this mark and are masqueraded,
/// so the reply comes back through the DNAT (hairpin).
pub const HAIRPIN_MARK: u32 = 0x5e1_0000;

/// One VIP as the dataplane sees it: where it listens, where it sends.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Service {
    pub address: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
    /// Backends that get new connections (address, port), sorted.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// A stable, short chain name for a service: it keeps its name when its
/// backends change, so a change rewrites one chain in place.
fn service_chain(s: &Service) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("{}/{}/{}", s.address, s.protocol, s.port);
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("svc-{:012x}", h & 0xffff_ffff_ffff)
}

/// The service chain's rules: mark traffic coming from a backend (so that a
/// backend reaching its own VIP is masqueraded and the reply returns through
/// the DNAT), then DNAT to a random backend.
fn service_rules(s: &Service) -> [String; 2] {
    let mut sources: Vec<String> = s.backends.iter().map(|b| b.0.to_string()).collect();
    sources.sort();
    sources.dedup();
    let mark = format!(
        "ip saddr {{ {} }} meta mark set meta mark | {HAIRPIN_MARK:#x}",
        sources.join(", ")
    );
    let dnat = match s.backends.as_slice() {
        [(ip, port)] => format!("meta l4proto {} dnat ip to {ip}:{port}", s.protocol),
        backends => {
            let arms: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, (ip, port))| format!("{i} : {ip} . {port}"))
                .collect();
            format!(
                "meta l4proto {} dnat ip to numgen random mod {} map {{ {} }}",
                s.protocol,
                backends.len(),
                arms.join(", ")
            )
        }
    };
    [mark, dnat]
}

fn element(s: &Service) -> String {
    format!("{} . {} . {}", s.address, s.protocol, s.port)
}

/// The smallest transaction that turns the table programmed for `old` into
/// the one for `new`: only services that appeared, disappeared or changed
/// backends are touched. `None` when nothing changed.
pub fn transaction(old: &[Service], new: &[Service]) -> Option<String> {
    type Key = (Ipv4Addr, Protocol, u16);
    let index = |v: &[Service]| -> BTreeMap<Key, Service> {
        v.iter()
            .filter(|s| !s.backends.is_empty())
            .map(|s| ((s.address, s.protocol, s.port), s.clone()))
            .collect()
    };
    let (old, new) = (index(old), index(new));
    let mut out = String::new();
    for (key, s) in &new {
        let chain = service_chain(s);
        match old.get(key) {
            None => {
                let _ = writeln!(out, "add chain ip {TABLE} {chain}");
                for rule in service_rules(s) {
                    let _ = writeln!(out, "add rule ip {TABLE} {chain} {rule}");
                }
                let _ = writeln!(
                    out,
                    "add element ip {TABLE} vips {{ {} : goto {chain} }}",
                    element(s)
                );
            }
            Some(before) if before.backends != s.backends => {
                let _ = writeln!(out, "flush chain ip {TABLE} {chain}");
                for rule in service_rules(s) {
                    let _ = writeln!(out, "add rule ip {TABLE} {chain} {rule}");
                }
            }
            Some(_) => {}
        }
    }
    for (key, s) in &old {
        if !new.contains_key(key) {
            let chain = service_chain(s);
            let _ = writeln!(out, "delete element ip {TABLE} vips {{ {} }}", element(s));
            let _ = writeln!(out, "flush chain ip {TABLE} {chain}");
            let _ = writeln!(out, "delete chain ip {TABLE} {chain}");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The complete desired table. Services without backends are left out: a
/// connection to them is refused by the host (no DNAT) rather than hanging.
pub fn ruleset(services: &[Service]) -> String {
    let mut services: Vec<&Service> = services.iter().filter(|s| !s.backends.is_empty()).collect();
    services.sort();
    let mut out = String::new();
    // `table` + `delete table` + the definition in one file is one
    // transaction: atomic replacement, whether or not the table existed.
    let _ = writeln!(out, "table ip {TABLE} {{}}");
    let _ = writeln!(out, "delete table ip {TABLE}");
    let _ = writeln!(out, "table ip {TABLE} {{");
    let _ = writeln!(
        out,
        "  map vips {{\n    type ipv4_addr . inet_proto . inet_service : verdict"
    );
    if !services.is_empty() {
        let elements: Vec<String> = services
            .iter()
            .map(|s| format!("{} : goto {}", element(s), service_chain(s)))
            .collect();
        let _ = writeln!(out, "    elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "  }}");
    for s in &services {
        let [mark, dnat] = service_rules(s);
        let _ = writeln!(
            out,
            "  chain {} {{\n    {mark}\n    {dnat}\n  }}",
            service_chain(s)
        );
    }
    // Locally generated traffic (output) and traffic routed through this
    // node, e.g. from local containers (prerouting). nft 1.0.6 rejects the
    // `dstnat` keyword on output, hence the numeric priority.
    for hook in ["prerouting", "output"] {
        let _ = writeln!(
            out,
            "  chain {hook} {{\n    type nat hook {hook} priority -100; policy accept;\n    \
             ip daddr . meta l4proto . th dport vmap @vips\n  }}"
        );
    }
    let _ = writeln!(
        out,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
         meta mark & {HAIRPIN_MARK:#x} == {HAIRPIN_MARK:#x} masquerade\n  }}"
    );
    let _ = writeln!(out, "}}");
    out
}

/// Builds the dataplane's services from `/v1/vips`-level data: VIP address
/// (IPv4 only for now), protocol, port and the backends in use.
pub fn services<'a>(
    vips: impl Iterator<Item = (Option<IpAddr>, Protocol, u16, Vec<(IpAddr, u16)>)> + 'a,
) -> Vec<Service> {
    let mut merged: BTreeMap<(Ipv4Addr, Protocol, u16), Vec<(Ipv4Addr, u16)>> = BTreeMap::new();
    for (address, protocol, port, backends) in vips {
        let Some(IpAddr::V4(address)) = address else {
            continue;
        };
        let entry = merged.entry((address, protocol, port)).or_default();
        entry.extend(backends.into_iter().filter_map(|(ip, p)| match ip {
            IpAddr::V4(v4) => Some((v4, p)),
            IpAddr::V6(_) => None,
        }));
    }
    merged
        .into_iter()
        .map(|((address, protocol, port), mut backends)| {
            backends.sort();
            backends.dedup();
            Service {
                address,
                protocol,
                port,
                backends,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(port: u16, backends: &[(u8, u16)]) -> Service {
        Service {
            address: Ipv4Addr::new(11, 1, 2, 3),
            protocol: Protocol::Tcp,
            port,
            backends: backends
                .iter()
                .map(|&(last, p)| (Ipv4Addr::new(10, 0, 0, last), p))
                .collect(),
        }
    }

    #[test]
    fn ruleset_maps_vips_to_random_backends() {
        let text = ruleset(&[svc(3141, &[(2, 9896), (3, 9896)]), svc(80, &[])]);
        assert!(text.contains("11.1.2.3 . tcp . 3141 : goto svc-"), "{text}");
        assert!(
            text.contains(
                "dnat ip to numgen random mod 2 map { 0 : 10.0.0.2 . 9896, 1 : 10.0.0.3 . 9896 }"
            ),
            "{text}"
        );
        assert!(
            text.contains("ip saddr { 10.0.0.2, 10.0.0.3 } meta mark set"),
            "{text}"
        );
        assert!(
            !text.contains(". 80 :"),
            "a VIP without backends gets no rule: {text}"
        );
        assert!(text.contains("type nat hook output priority -100"));
        assert!(text.contains("masquerade"));
        let single = ruleset(&[svc(1, &[(4, 81)])]);
        assert!(
            single.contains("meta l4proto tcp dnat ip to 10.0.0.4:81"),
            "{single}"
        );
    }

    #[test]
    fn ruleset_is_deterministic_and_names_are_stable() {
        let a = ruleset(&[svc(1, &[(2, 1)]), svc(2, &[(3, 1), (4, 1)])]);
        let b = ruleset(&[svc(2, &[(3, 1), (4, 1)]), svc(1, &[(2, 1)])]);
        assert_eq!(a, b);
        assert_eq!(
            service_chain(&svc(1, &[])),
            service_chain(&svc(1, &[(9, 9)])),
            "a service keeps its chain name when its backends change"
        );
    }

    #[test]
    fn transactions_touch_only_what_changed() {
        let many: Vec<Service> = (1..=50).map(|p| svc(p, &[(2, 80)])).collect();
        assert_eq!(transaction(&many, &many), None);
        let mut changed = many.clone();
        changed[9].backends.push((Ipv4Addr::new(10, 0, 0, 9), 81));
        let tx = transaction(&many, &changed).expect("a change");
        // Only the changed service's chain is rewritten: flush + 2 rules.
        assert_eq!(tx.lines().count(), 3, "{tx}");
        assert!(tx.contains("1 : 10.0.0.9 . 81"), "{tx}");
        let removed = transaction(&changed, &many[1..]).expect("a change");
        assert!(
            removed.contains("delete element ip skein vips { 11.1.2.3 . tcp . 1 }"),
            "{removed}"
        );
        assert!(removed.contains("delete chain ip skein svc-"), "{removed}");
    }

    #[test]
    fn empty_ruleset_still_defines_the_table() {
        let text = ruleset(&[]);
        assert!(text.contains("map vips"));
        assert!(!text.contains("elements"));
    }
}
