//! Desired-vs-actual diff: the IPVS operations that turn the kernel's table
//! into the desired one, touching only what differs.

use std::collections::BTreeMap;

use crate::{Destination, Service, ServiceKey};

/// One change to the kernel's IPVS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Delete a service (the kernel drops its destinations with it).
    DelService(Service),
    AddService(Service),
    /// Same address, port and protocol, another scheduler.
    UpdateService(Service),
    DelDestination(Service, Destination),
    AddDestination(Service, Destination),
    /// Same destination address and port, another weight.
    UpdateDestination(Service, Destination),
}

/// A whole IPVS table: every service with its destinations.
pub type Table = Vec<(Service, Vec<Destination>)>;

fn index(
    table: &[(Service, Vec<Destination>)],
) -> BTreeMap<ServiceKey, (&Service, &[Destination])> {
    table
        .iter()
        .map(|(svc, dests)| (svc.key(), (svc, dests.as_slice())))
        .collect()
}

/// The operations that make `actual` equal `desired`, in a safe order:
/// first services that must go, then per service (in key order) the service
/// itself, then its destinations: deletions first, then additions and
/// weight changes in address order.
/// A desired table listing a service or destination twice keeps the last.
pub fn diff(
    desired: &[(Service, Vec<Destination>)],
    actual: &[(Service, Vec<Destination>)],
) -> Vec<Op> {
    let want = index(desired);
    let have = index(actual);
    let mut ops = Vec::new();

    for (key, (svc, _)) in &have {
        if !want.contains_key(key) {
            ops.push(Op::DelService((*svc).clone()));
        }
    }
    for (key, (svc, dests)) in &want {
        let have_dests: &[Destination] = match have.get(key) {
            None => {
                ops.push(Op::AddService((*svc).clone()));
                &[]
            }
            Some((cur, cur_dests)) => {
                if cur.scheduler != svc.scheduler {
                    ops.push(Op::UpdateService((*svc).clone()));
                }
                cur_dests
            }
        };
        let want_d: BTreeMap<_, _> = dests.iter().map(|d| ((d.addr, d.port), d)).collect();
        let have_d: BTreeMap<_, _> = have_dests.iter().map(|d| ((d.addr, d.port), d)).collect();
        for (k, d) in &have_d {
            if !want_d.contains_key(k) {
                ops.push(Op::DelDestination((*svc).clone(), (*d).clone()));
            }
        }
        for (k, d) in &want_d {
            match have_d.get(k) {
                None => ops.push(Op::AddDestination((*svc).clone(), (*d).clone())),
                Some(cur) if cur.weight != d.weight => {
                    ops.push(Op::UpdateDestination((*svc).clone(), (*d).clone()))
                }
                Some(_) => {}
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;

    fn svc(addr: &str, port: u16) -> Service {
        Service::new(addr.parse().unwrap(), port, Protocol::Tcp)
    }

    fn dest(addr: &str, port: u16, weight: u32) -> Destination {
        Destination {
            addr: addr.parse().unwrap(),
            port,
            weight,
        }
    }

    #[test]
    fn empty_to_desired_adds_everything() {
        let desired = vec![(svc("11.1.1.1", 80), vec![dest("10.0.0.1", 8080, 1)])];
        assert_eq!(
            diff(&desired, &[]),
            vec![
                Op::AddService(svc("11.1.1.1", 80)),
                Op::AddDestination(svc("11.1.1.1", 80), dest("10.0.0.1", 8080, 1)),
            ]
        );
    }

    #[test]
    fn equal_tables_need_nothing() {
        let t = vec![
            (
                svc("11.1.1.1", 80),
                vec![dest("10.0.0.1", 8080, 1), dest("10.0.0.2", 8080, 1)],
            ),
            (svc("fd01:c::1", 443), vec![dest("fd00::2", 8443, 3)]),
        ];
        let mut reordered = t.clone();
        reordered.reverse();
        reordered[1].1.reverse();
        assert!(diff(&t, &reordered).is_empty());
    }

    #[test]
    fn changes_only_what_differs() {
        let a = svc("11.1.1.1", 80);
        let gone = svc("11.1.1.2", 53);
        let mut udp = svc("11.1.1.3", 53);
        udp.protocol = Protocol::Udp;
        let mut a_rr = a.clone();
        a_rr.scheduler = "rr".into();
        let actual = vec![
            (
                a_rr,
                vec![
                    dest("10.0.0.1", 8080, 1),
                    dest("10.0.0.2", 8080, 1),
                    dest("10.0.0.3", 8080, 1),
                ],
            ),
            (gone.clone(), vec![dest("10.0.0.9", 53, 1)]),
        ];
        let desired = vec![
            // 10.0.0.1 unchanged, 10.0.0.2 drained to weight 0, 10.0.0.3 gone, 10.0.0.4 new.
            (
                a.clone(),
                vec![
                    dest("10.0.0.1", 8080, 1),
                    dest("10.0.0.2", 8080, 0),
                    dest("10.0.0.4", 8080, 1),
                ],
            ),
            (udp.clone(), vec![dest("10.0.0.5", 53, 1)]),
        ];
        assert_eq!(
            diff(&desired, &actual),
            vec![
                Op::DelService(gone),
                Op::UpdateService(a.clone()),
                Op::DelDestination(a.clone(), dest("10.0.0.3", 8080, 1)),
                Op::UpdateDestination(a.clone(), dest("10.0.0.2", 8080, 0)),
                Op::AddDestination(a.clone(), dest("10.0.0.4", 8080, 1)),
                Op::AddService(udp.clone()),
                Op::AddDestination(udp, dest("10.0.0.5", 53, 1)),
            ]
        );
    }

    #[test]
    fn same_address_and_port_with_other_protocol_is_another_service() {
        let tcp = svc("11.1.1.1", 53);
        let mut udp = tcp.clone();
        udp.protocol = Protocol::Udp;
        let ops = diff(&[(udp.clone(), vec![])], &[(tcp.clone(), vec![])]);
        assert_eq!(ops, vec![Op::DelService(tcp), Op::AddService(udp)]);
    }
}
