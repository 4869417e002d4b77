//! The nftables dataplane's pure half: the ruleset a node should have for a
//! set of VIPs, as `nft -f` text. kube-proxy's nftables mode is the model:
//! one private table, a verdict map from `daddr . l4proto . dport` to a
//! per-service chain, and in it `numgen random mod N` over per-backend
//! chains that DNAT. The whole table is replaced in one `nft -f`
//! transaction, which the kernel applies atomically.

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

/// A stable, short chain-name suffix for a service or backend.
fn tag(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

fn service_chain(s: &Service) -> String {
    format!(
        "svc-{}",
        tag(&[
            &s.address.to_string(),
            &s.protocol.to_string(),
            &s.port.to_string()
        ])
    )
}

fn backend_chain(s: &Service, backend: &(Ipv4Addr, u16)) -> String {
    format!(
        "be-{}",
        tag(&[
            &s.address.to_string(),
            &s.protocol.to_string(),
            &s.port.to_string(),
            &backend.0.to_string(),
            &backend.1.to_string(),
        ])
    )
}

/// The service chain's one rule: pick a backend chain.
fn dispatch_rule(s: &Service) -> String {
    if s.backends.len() == 1 {
        return format!("goto {}", backend_chain(s, &s.backends[0]));
    }
    let arms: Vec<String> = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : goto {}", backend_chain(s, b)))
        .collect();
    format!(
        "numgen random mod {} vmap {{ {} }}",
        s.backends.len(),
        arms.join(", ")
    )
}

/// A backend chain's rules: mark hairpin traffic, then DNAT.
fn backend_rules(s: &Service, b: &(Ipv4Addr, u16)) -> [String; 2] {
    [
        format!(
            "ip saddr {} meta mark set meta mark | {HAIRPIN_MARK:#x}",
            b.0
        ),
        format!("meta l4proto {} dnat to {}:{}", s.protocol, b.0, b.1),
    ]
}

fn element(s: &Service) -> String {
    format!("{} . {} . {}", s.address, s.protocol, s.port)
}

/// The smallest transaction that turns the table programmed for `old` into
/// the one for `new`: only services whose backends changed are touched, so
/// its size (and the kernel's work) does not grow with the number of VIPs.
/// `None` when nothing changed.
pub fn transaction(old: &[Service], new: &[Service]) -> Option<String> {
    type Key = (Ipv4Addr, Protocol, u16);
    let index = |v: &[Service]| -> BTreeMap<Key, Service> {
        v.iter()
            .filter(|s| !s.backends.is_empty())
            .map(|s| ((s.address, s.protocol, s.port), s.clone()))
            .collect()
    };
    let (old, new) = (index(old), index(new));
    let mut adds = String::new();
    let mut swaps = String::new();
    let mut deletes = String::new();
    let add_backend = |out: &mut String, s: &Service, b: &(Ipv4Addr, u16)| {
        let chain = backend_chain(s, b);
        let [mark, dnat] = backend_rules(s, b);
        let _ = writeln!(out, "add chain ip {TABLE} {chain}");
        let _ = writeln!(out, "add rule ip {TABLE} {chain} {mark}");
        let _ = writeln!(out, "add rule ip {TABLE} {chain} {dnat}");
    };
    let delete_chain = |out: &mut String, chain: &str| {
        let _ = writeln!(out, "flush chain ip {TABLE} {chain}");
        let _ = writeln!(out, "delete chain ip {TABLE} {chain}");
    };
    for (key, s) in &new {
        match old.get(key) {
            None => {
                for b in &s.backends {
                    add_backend(&mut adds, s, b);
                }
                let chain = service_chain(s);
                let _ = writeln!(adds, "add chain ip {TABLE} {chain}");
                let _ = writeln!(adds, "add rule ip {TABLE} {chain} {}", dispatch_rule(s));
                let _ = writeln!(
                    adds,
                    "add element ip {TABLE} vips {{ {} : goto {chain} }}",
                    element(s)
                );
            }
            Some(before) if before.backends != s.backends => {
                for b in s.backends.iter().filter(|b| !before.backends.contains(b)) {
                    add_backend(&mut adds, s, b);
                }
                let chain = service_chain(s);
                let _ = writeln!(swaps, "flush chain ip {TABLE} {chain}");
                let _ = writeln!(swaps, "add rule ip {TABLE} {chain} {}", dispatch_rule(s));
                for b in before.backends.iter().filter(|b| !s.backends.contains(b)) {
                    delete_chain(&mut deletes, &backend_chain(before, b));
                }
            }
            Some(_) => {}
        }
    }
    for (key, s) in &old {
        if !new.contains_key(key) {
            let _ = writeln!(
                deletes,
                "delete element ip {TABLE} vips {{ {} }}",
                element(s)
            );
            delete_chain(&mut deletes, &service_chain(s));
            for b in &s.backends {
                delete_chain(&mut deletes, &backend_chain(s, b));
            }
        }
    }
    let text = adds + &swaps + &deletes;
    (!text.is_empty()).then_some(text)
}

/// The complete desired table. Services without backends are left out: a
/// connection to them is refused by the host (no DNAT) rather than hanging.
pub fn ruleset(services: &[Service]) -> String {
    let mut services: Vec<&Service> = services.iter().filter(|s| !s.backends.is_empty()).collect();
    services.sort();
    let mut out = String::new();
    // `table` + `delete table` + the definition in one file is one
    // transaction: atomic replacement, and it works whether or not the
    // table existed before.
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
            .map(|s| {
                format!(
                    "{} . {} . {} : goto {}",
                    s.address,
                    s.protocol,
                    s.port,
                    service_chain(s)
                )
            })
            .collect();
        let _ = writeln!(out, "    elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "  }}");
    for s in &services {
        let chain = service_chain(s);
        let _ = writeln!(out, "  chain {chain} {{");
        if s.backends.len() == 1 {
            let _ = writeln!(out, "    goto {}", backend_chain(s, &s.backends[0]));
        } else {
            let arms: Vec<String> = s
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : goto {}", backend_chain(s, b)))
                .collect();
            let _ = writeln!(
                out,
                "    numgen random mod {} vmap {{ {} }}",
                s.backends.len(),
                arms.join(", ")
            );
        }
        let _ = writeln!(out, "  }}");
        for b in &s.backends {
            let _ = writeln!(out, "  chain {} {{", backend_chain(s, b));
            let _ = writeln!(
                out,
                "    ip saddr {} meta mark set meta mark | {HAIRPIN_MARK:#x}",
                b.0
            );
            let _ = writeln!(
                out,
                "    meta l4proto {} dnat to {}:{}",
                s.protocol, b.0, b.1
            );
            let _ = writeln!(out, "  }}");
        }
    }
    // Locally generated traffic (output) and traffic routed through this
    // node, e.g. from local containers (prerouting). nft 1.0.6 rejects the
    // `dstnat` keyword on output, hence the numeric priority.
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        let _ = writeln!(
            out,
            "  chain {chain} {{\n    type nat hook {hook} priority -100; policy accept;\n    \
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
            text.contains("numgen random mod 2 vmap { 0 : goto be-"),
            "{text}"
        );
        assert!(text.contains("dnat to 10.0.0.2:9896"), "{text}");
        assert!(text.contains("dnat to 10.0.0.3:9896"), "{text}");
        assert!(
            !text.contains(". 80 :"),
            "a VIP without backends gets no rule: {text}"
        );
        assert!(text.contains("type nat hook output priority -100"));
        assert!(text.contains("masquerade"));
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
        // One new backend chain (3 lines) and the service chain swapped (2).
        assert_eq!(tx.lines().count(), 5, "{tx}");
        assert!(tx.contains("dnat to 10.0.0.9:81"));
        let removed = transaction(&changed, &many[1..]).expect("a change");
        assert!(
            removed.contains("delete element ip skein vips { 11.1.2.3 . tcp . 1 }"),
            "{removed}"
        );
        assert!(removed.contains("delete chain ip skein be-"), "{removed}");
    }

    #[test]
    fn empty_ruleset_still_defines_the_table() {
        let text = ruleset(&[]);
        assert!(text.contains("map vips"));
        assert!(!text.contains("elements"));
    }
}
