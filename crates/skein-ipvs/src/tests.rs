//! Byte-level tests of the IPVS encoding and decoding, no kernel needed.
//! The expected bytes are written out by hand from `linux/ip_vs.h` and the
//! netlink attribute layout (little-endian host: x86, arm64).

use super::*;
use netlink_packet_core::NLM_F_MULTIPART;

/// A netlink attribute written by hand: len (u16), type (u16), value, pad.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

/// A netlink message written by hand: nlmsghdr + genlmsghdr + attributes.
fn nlmsg(kind: u16, flags: u16, seq: u32, genl_cmd: Option<u8>, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    if let Some(cmd) = genl_cmd {
        payload.extend_from_slice(&[cmd, IPVS_GENL_VERSION, 0, 0]);
    }
    payload.extend_from_slice(body);
    let mut out = Vec::new();
    out.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&4242u32.to_ne_bytes()); // kernel-chosen port id
    out.extend_from_slice(&payload);
    out
}

fn vip() -> Service {
    Service::new("11.1.1.1".parse().unwrap(), 80, Protocol::Tcp)
}

#[test]
#[cfg(target_endian = "little")]
fn add_service_request_layout() {
    let msg = IpvsMessage {
        cmd: IPVS_CMD_NEW_SERVICE,
        attrs: vec![CmdAttr::Service(vip().full_attrs().unwrap())],
    };
    let bytes = encode_request(msg, 0x1c, NLM_F_REQUEST | NLM_F_ACK, 7);
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        // nlmsghdr: len 104, type = family 0x1c, flags REQUEST|ACK, seq 7, pid 0
        104, 0, 0, 0,  0x1c, 0,  0x05, 0,  7, 0, 0, 0,  0, 0, 0, 0,
        // genlmsghdr: cmd NEW_SERVICE (1), version 1, reserved
        1, 1, 0, 0,
        // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED, len 84
        84, 0, 0x01, 0x80,
        //   AF = AF_INET (2), u16 + 2 bytes padding
        6, 0, 1, 0,  2, 0, 0, 0,
        //   PROTOCOL = IPPROTO_TCP (6)
        6, 0, 2, 0,  6, 0, 0, 0,
        //   ADDR: 16-byte nf_inet_addr, IPv4 in the first 4
        20, 0, 3, 0,  11, 1, 1, 1,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
        //   PORT = 80 in network byte order
        6, 0, 4, 0,  0, 80, 0, 0,
        //   SCHED_NAME = "wlc\0"
        8, 0, 6, 0,  b'w', b'l', b'c', 0,
        //   FLAGS = struct ip_vs_flags { flags 0, mask ~0 }
        12, 0, 7, 0,  0, 0, 0, 0,  0xff, 0xff, 0xff, 0xff,
        //   TIMEOUT = 0
        8, 0, 8, 0,  0, 0, 0, 0,
        //   NETMASK = 255.255.255.255
        8, 0, 9, 0,  0xff, 0xff, 0xff, 0xff,
    ];
    assert_eq!(bytes, expected);
}

#[test]
#[cfg(target_endian = "little")]
fn add_destination_request_layout() {
    let dest = Destination {
        addr: "10.0.0.2".parse().unwrap(),
        port: 8080,
        weight: 3,
    };
    let msg = IpvsMessage {
        cmd: IPVS_CMD_NEW_DEST,
        attrs: vec![
            CmdAttr::Service(vip().id_attrs()),
            CmdAttr::Dest(dest.full_attrs().unwrap()),
        ],
    };
    let bytes = encode_request(msg, 0x1c, NLM_F_REQUEST | NLM_F_ACK, 1);
    let mut body = vec![IPVS_CMD_NEW_DEST, 1, 0, 0];
    let svc = [
        nla(IPVS_SVC_ATTR_AF, &2u16.to_ne_bytes()),
        nla(IPVS_SVC_ATTR_PROTOCOL, &6u16.to_ne_bytes()),
        nla(
            IPVS_SVC_ATTR_ADDR,
            &[11, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        nla(IPVS_SVC_ATTR_PORT, &[0, 80]),
    ]
    .concat();
    body.extend(nla(IPVS_CMD_ATTR_SERVICE | 0x8000, &svc));
    let dst = [
        nla(IPVS_DEST_ATTR_ADDR_FAMILY, &2u16.to_ne_bytes()),
        nla(
            IPVS_DEST_ATTR_ADDR,
            &[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        nla(IPVS_DEST_ATTR_PORT, &[0x1f, 0x90]), // 8080 big-endian
        nla(IPVS_DEST_ATTR_FWD_METHOD, &0u32.to_ne_bytes()), // IP_VS_CONN_F_MASQ
        nla(IPVS_DEST_ATTR_WEIGHT, &3u32.to_ne_bytes()),
        nla(IPVS_DEST_ATTR_U_THRESH, &0u32.to_ne_bytes()),
        nla(IPVS_DEST_ATTR_L_THRESH, &0u32.to_ne_bytes()),
    ]
    .concat();
    body.extend(nla(IPVS_CMD_ATTR_DEST | 0x8000, &dst));
    let mut expected = Vec::new();
    expected.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    expected.extend_from_slice(&[0x1c, 0, 0x05, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend(body);
    assert_eq!(expected.len(), 140);
    assert_eq!(bytes, expected);
}

#[test]
fn ipv6_service_uses_full_address_and_prefix_netmask() {
    let svc = Service::new("fd01:c::7".parse().unwrap(), 443, Protocol::Udp);
    let attrs = svc.full_attrs().unwrap();
    assert!(attrs.contains(&SvcAttr::Af(AF_INET6)));
    assert!(attrs.contains(&SvcAttr::Protocol(IPPROTO_UDP)));
    assert!(attrs.contains(&SvcAttr::Netmask(128)));
    let mut addr = [0u8; 16];
    addr[0] = 0xfd;
    addr[1] = 0x01;
    addr[3] = 0x0c;
    addr[15] = 7;
    assert!(attrs.contains(&SvcAttr::Addr(addr)));
}

#[test]
fn delete_requests_carry_only_the_identity() {
    let d = Destination {
        addr: "10.0.0.1".parse().unwrap(),
        port: 8080,
        weight: 1,
    };
    assert_eq!(vip().id_attrs().len(), 4);
    assert!(!vip()
        .id_attrs()
        .iter()
        .any(|a| matches!(a, SvcAttr::SchedName(_))));
    assert_eq!(d.id_attrs().len(), 3);
}

#[test]
fn flush_and_dump_requests() {
    let flush = encode_request(
        IpvsMessage {
            cmd: IPVS_CMD_FLUSH,
            attrs: vec![],
        },
        0x21,
        NLM_F_REQUEST | NLM_F_ACK,
        3,
    );
    let mut expected = nlmsg(0x21, 0x05, 3, Some(IPVS_CMD_FLUSH), &[]);
    expected[12..16].copy_from_slice(&[0; 4]); // requests go out with port id 0
    assert_eq!(flush, expected);
    let dump = encode_request(
        IpvsMessage {
            cmd: IPVS_CMD_GET_SERVICE,
            attrs: vec![],
        },
        0x21,
        NLM_F_REQUEST | NLM_F_DUMP,
        4,
    );
    // NLM_F_DUMP = ROOT|MATCH = 0x300, plus REQUEST 0x1.
    assert_eq!(&dump[6..8], &0x0301u16.to_ne_bytes());
    assert_eq!(dump[16], IPVS_CMD_GET_SERVICE);
}

#[test]
fn invalid_values_are_refused_before_the_kernel() {
    let mut s = vip();
    s.scheduler = "a-scheduler-name-too-long".into();
    assert!(matches!(s.full_attrs(), Err(Error::Invalid(_))));
    s.scheduler = String::new();
    assert!(matches!(s.full_attrs(), Err(Error::Invalid(_))));
    let d = Destination {
        addr: "10.0.0.1".parse().unwrap(),
        port: 1,
        weight: u32::MAX,
    };
    assert!(matches!(d.full_attrs(), Err(Error::Invalid(_))));
}

/// A service as the kernel dumps it (ip_vs_genl_fill_service): the
/// identity, scheduler, flags, timeout, netmask and nested statistics.
fn kernel_service(addr: [u8; 16], af: u16, proto: u16, port: u16, sched: &str) -> Vec<u8> {
    let mut sched_z = sched.as_bytes().to_vec();
    sched_z.push(0);
    let stats = [nla(1, &5u32.to_ne_bytes()), nla(2, &9u32.to_ne_bytes())].concat();
    let svc = [
        nla(IPVS_SVC_ATTR_AF, &af.to_ne_bytes()),
        nla(IPVS_SVC_ATTR_PROTOCOL, &proto.to_ne_bytes()),
        nla(IPVS_SVC_ATTR_ADDR, &addr),
        nla(IPVS_SVC_ATTR_PORT, &port.to_be_bytes()),
        nla(IPVS_SVC_ATTR_SCHED_NAME, &sched_z),
        nla(IPVS_SVC_ATTR_FLAGS, &[0u8; 8]),
        nla(IPVS_SVC_ATTR_TIMEOUT, &0u32.to_ne_bytes()),
        nla(IPVS_SVC_ATTR_NETMASK, &u32::MAX.to_ne_bytes()),
        nla(10 | 0x8000, &stats), // IPVS_SVC_ATTR_STATS, nested
    ]
    .concat();
    nla(IPVS_CMD_ATTR_SERVICE | 0x8000, &svc)
}

#[test]
fn decode_service_dump() {
    let v4 = [11, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let v6: [u8; 16] = "fd01:c::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let fwmark = nla(
        IPVS_CMD_ATTR_SERVICE,
        &[
            nla(IPVS_SVC_ATTR_AF, &2u16.to_ne_bytes()),
            nla(IPVS_SVC_ATTR_FWMARK, &7u32.to_ne_bytes()),
        ]
        .concat(),
    );
    let multi = NLM_F_MULTIPART;
    let mut datagram = Vec::new();
    datagram.extend(nlmsg(
        0x1c,
        multi,
        9,
        Some(IPVS_CMD_NEW_SERVICE),
        &kernel_service(v4, AF_INET, IPPROTO_TCP, 80, "wlc"),
    ));
    // An answer to another request on the same socket is ignored.
    datagram.extend(nlmsg(
        0x1c,
        multi,
        8,
        Some(IPVS_CMD_NEW_SERVICE),
        &kernel_service(v4, AF_INET, IPPROTO_TCP, 81, "wlc"),
    ));
    datagram.extend(nlmsg(
        0x1c,
        multi,
        9,
        Some(IPVS_CMD_NEW_SERVICE),
        &kernel_service(v6, AF_INET6, IPPROTO_UDP, 53, "rr"),
    ));
    datagram.extend(nlmsg(0x1c, multi, 9, Some(IPVS_CMD_NEW_SERVICE), &fwmark));
    datagram.extend(nlmsg(3, multi, 9, None, &0u32.to_ne_bytes())); // NLMSG_DONE

    let Reply::Done(msgs) = decode_reply::<IpvsMessage>(&datagram, 9).unwrap().unwrap() else {
        panic!("dump not complete");
    };
    assert_eq!(msgs.len(), 3);
    let services: Vec<Service> = msgs
        .iter()
        .flat_map(|m| &m.attrs)
        .filter_map(|a| match a {
            CmdAttr::Service(s) => Service::from_attrs(s).unwrap(),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        vec![
            vip(),
            Service {
                addr: "fd01:c::1".parse().unwrap(),
                port: 53,
                protocol: Protocol::Udp,
                scheduler: "rr".into(),
            },
        ]
    );
}

#[test]
fn decode_destination_dump() {
    let dest = |addr: [u8; 4], with_af: bool| {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&addr);
        let mut attrs = vec![
            nla(IPVS_DEST_ATTR_ADDR, &a),
            nla(IPVS_DEST_ATTR_PORT, &8080u16.to_be_bytes()),
            nla(IPVS_DEST_ATTR_FWD_METHOD, &0u32.to_ne_bytes()),
            nla(IPVS_DEST_ATTR_WEIGHT, &1u32.to_ne_bytes()),
            nla(13, &[0]), // IPVS_DEST_ATTR_TUN_TYPE (u8), unknown to us
            nla(IPVS_DEST_ATTR_ACTIVE_CONNS, &2u32.to_ne_bytes()),
        ];
        if with_af {
            attrs.push(nla(IPVS_DEST_ATTR_ADDR_FAMILY, &AF_INET.to_ne_bytes()));
        }
        nla(IPVS_CMD_ATTR_DEST | 0x8000, &attrs.concat())
    };
    let mut datagram = nlmsg(
        0x1c,
        NLM_F_MULTIPART,
        5,
        Some(IPVS_CMD_NEW_DEST),
        &dest([10, 0, 0, 1], true),
    );
    datagram.extend(nlmsg(
        0x1c,
        NLM_F_MULTIPART,
        5,
        Some(IPVS_CMD_NEW_DEST),
        &dest([10, 0, 0, 2], false),
    ));
    // No NLMSG_DONE yet: the dump goes on in another datagram.
    let Reply::Messages(msgs) = decode_reply::<IpvsMessage>(&datagram, 5).unwrap().unwrap() else {
        panic!("dump ended early");
    };
    let dests: Vec<Destination> = msgs
        .iter()
        .flat_map(|m| &m.attrs)
        .filter_map(|a| match a {
            CmdAttr::Dest(d) => Some(Destination::from_attrs(d, AF_INET).unwrap()),
            _ => None,
        })
        .collect();
    let want = |last: u8| Destination {
        addr: std::net::IpAddr::from([10, 0, 0, last]),
        port: 8080,
        weight: 1,
    };
    assert_eq!(dests, vec![want(1), want(2)]);
}

#[test]
fn ack_and_error_answers() {
    let ack = nlmsg(
        2,
        0,
        4,
        None,
        &[0u32.to_ne_bytes().as_slice(), &[0u8; 16]].concat(),
    );
    assert_eq!(
        decode_reply::<IpvsMessage>(&ack, 4).unwrap().unwrap(),
        Reply::Done(vec![])
    );
    let eexist = nlmsg(
        2,
        0,
        4,
        None,
        &[(-17i32).to_ne_bytes().as_slice(), &[0u8; 16]].concat(),
    );
    let err = decode_reply::<IpvsMessage>(&eexist, 4)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(17));
}

#[test]
fn truncated_answers_are_errors_not_panics() {
    let mut datagram = nlmsg(
        0x1c,
        NLM_F_MULTIPART,
        1,
        Some(IPVS_CMD_NEW_SERVICE),
        &kernel_service(
            [11, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            AF_INET,
            6,
            80,
            "wlc",
        ),
    );
    for cut in 1..datagram.len() {
        let _ = decode_reply::<IpvsMessage>(&datagram[..cut], 1);
    }
    // An attribute claiming more bytes than it has.
    let bad = nlmsg(
        0x1c,
        0,
        1,
        Some(IPVS_CMD_NEW_SERVICE),
        &[200, 0, 1, 0x80, 0, 0, 0, 0],
    );
    assert!(decode_reply::<IpvsMessage>(&bad, 1).is_err());
    // A too-short address inside an otherwise well-formed message.
    datagram = nlmsg(
        0x1c,
        0,
        1,
        Some(IPVS_CMD_NEW_SERVICE),
        &nla(IPVS_CMD_ATTR_SERVICE, &nla(IPVS_SVC_ATTR_ADDR, &[1, 2])),
    );
    assert!(decode_reply::<IpvsMessage>(&datagram, 1).is_err());
}
