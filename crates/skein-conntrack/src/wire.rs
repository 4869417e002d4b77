//! ctnetlink's messages, encoded and parsed without IO.

use std::net::{Ipv4Addr, SocketAddrV4};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const AF_INET: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_ID: u16 = 12;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// `IPS_SEEN_REPLY`: a packet came back.
pub const SEEN_REPLY: u32 = 1 << 1;
/// `IPS_ASSURED`: traffic both ways past the handshake.
pub const ASSURED: u32 = 1 << 2;

/// A TCP connection's state as conntrack tracks it (`TCP_CONNTRACK_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    Other(u8),
}

impl TcpState {
    pub fn from_u8(v: u8) -> TcpState {
        match v {
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::LastAck,
            7 => TcpState::TimeWait,
            8 => TcpState::Close,
            o => TcpState::Other(o),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            TcpState::SynSent => 1,
            TcpState::SynRecv => 2,
            TcpState::Established => 3,
            TcpState::FinWait => 4,
            TcpState::CloseWait => 5,
            TcpState::LastAck => 6,
            TcpState::TimeWait => 7,
            TcpState::Close => 8,
            TcpState::Other(o) => o,
        }
    }
}

/// One tracked IPv4 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    /// The kernel's id for it (`CTA_ID`): the same while it lives.
    pub id: u32,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Client → the address it asked for (a VIP).
    pub orig_src: SocketAddrV4,
    pub orig_dst: SocketAddrV4,
    /// Who answers (the backend, after DNAT) → the client.
    pub reply_src: SocketAddrV4,
    pub reply_dst: SocketAddrV4,
    /// `IPS_*` bits.
    pub status: u32,
    /// TCP only.
    pub tcp_state: Option<TcpState>,
}

impl Conn {
    pub fn assured(&self) -> bool {
        self.status & ASSURED != 0
    }
}

/// The request for a dump of every IPv4 connection.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&20u32.to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version, resource id (big endian).
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// The attributes in `b`: `(type without flags, payload)`; an attribute
/// that does not fit ends the list.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u16_ne(b, at)? as usize;
        let kind = u16_ne(b, at + 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let payload = b.get(at + 4..at + len)?;
        at += (len + 3) & !3;
        Some((kind, payload))
    })
}

fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// `(proto, src, dst)` of a `CTA_TUPLE_*`.
fn tuple(b: &[u8]) -> Option<(u8, SocketAddrV4, SocketAddrV4)> {
    let ip = find(b, CTA_TUPLE_IP)?;
    let src = Ipv4Addr::from(be32(find(ip, CTA_IP_V4_SRC)?)?);
    let dst = Ipv4Addr::from(be32(find(ip, CTA_IP_V4_DST)?)?);
    let proto = find(b, CTA_TUPLE_PROTO)?;
    let num = *find(proto, CTA_PROTO_NUM)?.first()?;
    // Port-less protocols (ICMP) have none: 0.
    let sport = find(proto, CTA_PROTO_SRC_PORT).and_then(be16).unwrap_or(0);
    let dport = find(proto, CTA_PROTO_DST_PORT).and_then(be16).unwrap_or(0);
    Some((
        num,
        SocketAddrV4::new(src, sport),
        SocketAddrV4::new(dst, dport),
    ))
}

/// One `IPCTNL_MSG_CT_NEW` message's payload (after the netlink header).
fn conn(payload: &[u8]) -> Option<Conn> {
    // nfgenmsg: IPv4 only.
    if *payload.first()? != AF_INET {
        return None;
    }
    let a = payload.get(4..)?;
    let (proto, orig_src, orig_dst) = tuple(find(a, CTA_TUPLE_ORIG)?)?;
    let (_, reply_src, reply_dst) = tuple(find(a, CTA_TUPLE_REPLY)?)?;
    let tcp_state = find(a, CTA_PROTOINFO)
        .and_then(|p| find(p, CTA_PROTOINFO_TCP))
        .and_then(|t| find(t, CTA_PROTOINFO_TCP_STATE))
        .and_then(|s| s.first())
        .map(|s| TcpState::from_u8(*s));
    Some(Conn {
        id: find(a, CTA_ID).and_then(be32).unwrap_or(0),
        proto,
        orig_src,
        orig_dst,
        reply_src,
        reply_dst,
        status: find(a, CTA_STATUS).and_then(be32).unwrap_or(0),
        tcp_state,
    })
}

/// The connections in one read of a dump's answers to request `seq`, and
/// whether the dump is over. A kernel error is an error; messages of other
/// requests and unreadable ones are skipped.
pub fn parse_dump(buf: &[u8], seq: u32) -> Result<(Vec<Conn>, bool), String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let (Some(len), Some(kind), Some(mseq)) =
            (u32_ne(buf, at), u16_ne(buf, at + 4), u32_ne(buf, at + 8))
        else {
            break;
        };
        let len = len as usize;
        if len < 16 || at + len > buf.len() {
            return Err(format!(
                "a message of {len} bytes at {at} does not fit in {}",
                buf.len()
            ));
        }
        let payload = &buf[at + 16..at + len];
        if mseq == seq {
            match kind {
                NLMSG_DONE => return Ok((out, true)),
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(i32::from_ne_bytes)
                        .unwrap_or(0);
                    if code != 0 {
                        // An errno is negated; any i32 is reported (i32::MIN too).
                        return Err(format!(
                            "the kernel refused the dump: errno {}",
                            code.unsigned_abs()
                        ));
                    }
                }
                k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                    out.extend(conn(payload));
                }
                _ => {}
            }
        }
        at += (len + 3) & !3;
    }
    Ok((out, false))
}

/// What happened to a connection, as conntrack's events say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    New,
    /// Its state or status changed (e.g. it became assured).
    Update,
    Destroy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub conn: Conn,
}

/// The events in one read of an event socket; unreadable messages are
/// skipped.
pub fn parse_events(buf: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let (Some(len), Some(kind), Some(flags)) =
            (u32_ne(buf, at), u16_ne(buf, at + 4), u16_ne(buf, at + 6))
        else {
            break;
        };
        let len = len as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let payload = &buf[at + 16..at + len];
        let event = match kind {
            k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                if flags & NLM_F_CREATE != 0 {
                    Some(EventKind::New)
                } else {
                    Some(EventKind::Update)
                }
            }
            k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE => {
                Some(EventKind::Destroy)
            }
            _ => None,
        };
        if let Some(kind) = event {
            out.extend(conn(payload).map(|conn| Event { kind, conn }));
        }
        at += (len + 3) & !3;
    }
    out
}

/// Encodes an event as the kernel sends it (for tests and fuzz seeds).
pub fn encode_event(e: &Event) -> Vec<u8> {
    let mut m = encode(&e.conn, 0);
    let (kind, flags) = match e.kind {
        EventKind::New => (IPCTNL_MSG_CT_NEW, NLM_F_CREATE),
        EventKind::Update => (IPCTNL_MSG_CT_NEW, 0),
        EventKind::Destroy => (IPCTNL_MSG_CT_DELETE, 0),
    };
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m
}

/// Encodes `c` as the kernel sends it in a dump (for tests and fuzz seeds).
pub fn encode(c: &Conn, seq: u32) -> Vec<u8> {
    fn attr(kind: u16, nested: bool, payload: &[u8], out: &mut Vec<u8>) {
        let len = 4 + payload.len();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&(kind | if nested { 0x8000 } else { 0 }).to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize((out.len() + 3) & !3, 0);
    }
    fn tuple(proto: u8, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        let mut ip = Vec::new();
        attr(CTA_IP_V4_SRC, false, &src.ip().octets(), &mut ip);
        attr(CTA_IP_V4_DST, false, &dst.ip().octets(), &mut ip);
        let mut p = Vec::new();
        attr(CTA_PROTO_NUM, false, &[proto], &mut p);
        attr(CTA_PROTO_SRC_PORT, false, &src.port().to_be_bytes(), &mut p);
        attr(CTA_PROTO_DST_PORT, false, &dst.port().to_be_bytes(), &mut p);
        let mut t = Vec::new();
        attr(CTA_TUPLE_IP, true, &ip, &mut t);
        attr(CTA_TUPLE_PROTO, true, &p, &mut t);
        t
    }
    let mut a = Vec::new();
    attr(
        CTA_TUPLE_ORIG,
        true,
        &tuple(c.proto, c.orig_src, c.orig_dst),
        &mut a,
    );
    attr(
        CTA_TUPLE_REPLY,
        true,
        &tuple(c.proto, c.reply_src, c.reply_dst),
        &mut a,
    );
    attr(CTA_STATUS, false, &c.status.to_be_bytes(), &mut a);
    if let Some(s) = c.tcp_state {
        let mut st = Vec::new();
        attr(CTA_PROTOINFO_TCP_STATE, false, &[s.to_u8()], &mut st);
        let mut tcp = Vec::new();
        attr(CTA_PROTOINFO_TCP, true, &st, &mut tcp);
        attr(CTA_PROTOINFO, true, &tcp, &mut a);
    }
    attr(CTA_ID, false, &c.id.to_be_bytes(), &mut a);
    let mut m = Vec::new();
    let len = 16 + 4 + a.len();
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
    m.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m.extend_from_slice(&a);
    m
}

/// The end of a dump's answers to request `seq`.
pub fn done(seq: u32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&20u32.to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0x2u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = SocketAddrV4> {
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(ip.into(), port))
    }

    fn any_conn() -> impl Strategy<Value = Conn> {
        (
            any::<u32>(),
            prop_oneof![Just(6u8), Just(17u8)],
            (addr(), addr(), addr(), addr()),
            any::<u32>(),
            proptest::option::of(1u8..12),
        )
            .prop_map(|(id, proto, (a, b, c, d), status, st)| Conn {
                id,
                proto,
                orig_src: a,
                orig_dst: b,
                reply_src: c,
                reply_dst: d,
                status,
                tcp_state: st.map(TcpState::from_u8),
            })
    }

    proptest! {
        /// Whatever connections a dump holds, in however many messages,
        /// they read back as they were, and the end is seen.
        #[test]
        fn dumps_read_back(conns in proptest::collection::vec(any_conn(), 0..20)) {
            let mut buf = Vec::new();
            for c in &conns {
                buf.extend(encode(c, 7));
            }
            // Another request's answer in between is not ours.
            buf.extend(encode(&conns.first().copied().unwrap_or(Conn {
                id: 1, proto: 6,
                orig_src: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
                orig_dst: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2),
                reply_src: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2),
                reply_dst: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
                status: 0, tcp_state: None,
            }), 8));
            buf.extend(done(7));
            let (got, end) = parse_dump(&buf, 7).expect("parse");
            prop_assert!(end);
            prop_assert_eq!(got, conns);
        }

        /// Garbage never panics.
        #[test]
        fn garbage_is_refused_or_skipped(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_dump(&bytes, 1);
            let _ = parse_events(&bytes);
        }

        /// Events read back as sent, in order, whatever their kinds.
        #[test]
        fn events_read_back(
            evs in proptest::collection::vec(
                (prop_oneof![Just(EventKind::New), Just(EventKind::Update), Just(EventKind::Destroy)], any_conn()),
                0..20,
            )
        ) {
            let events: Vec<Event> = evs.into_iter().map(|(kind, conn)| Event { kind, conn }).collect();
            let buf: Vec<u8> = events.iter().flat_map(encode_event).collect();
            prop_assert_eq!(parse_events(&buf), events);
        }
    }

    #[test]
    fn a_kernel_error_is_an_error() {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&3u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-1i32).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        assert!(parse_dump(&m, 3).unwrap_err().contains("errno 1"));
    }

    #[test]
    fn an_error_code_of_i32_min_is_reported_not_negated() {
        // Found by the fuzz target conntrack_wire.
        let bytes = [
            0x15, 0, 0, 0, 0x02, 0, 0, 0x15, 0x01, 0, 0, 0, 0x80, 0x30, 0, 0, 0, 0, 0, 0x80, 0x30,
        ];
        assert!(parse_dump(&bytes, 1).is_err());
        let _ = parse_events(&bytes);
    }

    #[test]
    fn the_request_asks_for_a_dump_of_ipv4() {
        let r = dump_request(5);
        assert_eq!(r.len(), 20);
        assert_eq!(u16_ne(&r, 4), Some(0x0101));
        assert_eq!(u16_ne(&r, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(r[16], AF_INET);
    }
}
