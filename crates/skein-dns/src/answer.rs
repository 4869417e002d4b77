//! Answering one DNS message from the cluster's records: pure (bytes in,
//! bytes out), so it is unit-tested and fuzzed without sockets. The server
//! around it only moves datagrams and TCP frames.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{Name, RData as HRData, Record, RecordType};

use crate::records::{RData, Records, DCOS_ZONE, MESOS_ZONE, SPARTAN_ZONE, TTL};

/// The zones this node answers with authority, from its own replica.
pub const ZONES: [&str; 3] = [MESOS_ZONE, DCOS_ZONE, SPARTAN_ZONE];
/// Largest UDP answer we send to an EDNS client (the DNS flag day value,
/// safe against fragmentation).
pub const EDNS_UDP_SIZE: u16 = 1232;
/// Without EDNS, classic DNS over UDP.
pub const PLAIN_UDP_SIZE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a message.
#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: the question is for a name outside the cluster zones.
    Forward(Box<Message>),
    /// Not even a header: nothing sensible to answer.
    Drop,
}

/// The zone `name` (lowercase, with the final dot) belongs to, if ours.
pub fn zone_of(name: &str) -> Option<&'static str> {
    ZONES
        .iter()
        .find(|z| {
            name == **z
                || name
                    .strip_suffix(**z)
                    .is_some_and(|rest| rest.ends_with('.'))
        })
        .copied()
}

fn lower_fqdn(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

fn name(s: &str) -> Option<Name> {
    Name::from_ascii(s).ok()
}

fn soa(zone: &str) -> Option<Record> {
    let data = SOA::new(
        name(&format!("ns.{zone}"))?,
        name(&format!("hostmaster.{zone}"))?,
        1,
        60,
        30,
        86_400,
        // Negative answers are cached no longer than positive ones.
        TTL,
    );
    Some(Record::from_rdata(name(zone)?, TTL, HRData::SOA(data)))
}

fn to_record(owner: &Name, data: &RData<'_>) -> Option<Record> {
    let rdata = match data {
        RData::A { ip } => HRData::A(A(*ip)),
        RData::Aaaa { ip } => HRData::AAAA(AAAA(*ip)),
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => HRData::SRV(SRV::new(*priority, *weight, *port, name(target)?)),
    };
    Some(Record::from_rdata(owner.clone(), TTL, rdata))
}

fn matches(qtype: RecordType, data: &RData<'_>) -> bool {
    matches!(
        (qtype, data),
        (RecordType::ANY, _)
            | (RecordType::A, RData::A { .. })
            | (RecordType::AAAA, RData::Aaaa { .. })
            | (RecordType::SRV, RData::Srv { .. })
    )
}

/// Header-only error reply built from the raw id, for messages that do not
/// decode.
fn raw_error(request: &[u8], code: ResponseCode) -> Outcome {
    if request.len() < 12 {
        return Outcome::Drop;
    }
    let id = u16::from_be_bytes([request[0], request[1]]);
    let msg = Message::error_msg(id, OpCode::Query, code);
    msg.to_vec().map_or(Outcome::Drop, Outcome::Reply)
}

/// Answers `request`. `rotate` picks the rotation of multi-record answers
/// (so that clients taking the first address spread over all of them).
pub fn respond(records: &Records, request: &[u8], transport: Transport, rotate: usize) -> Outcome {
    let Ok(query) = Message::from_vec(request) else {
        return raw_error(request, ResponseCode::FormErr);
    };
    if query.metadata.message_type != MessageType::Query {
        return Outcome::Drop; // never answer a response: no reflection loops
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let client_size = match &query.edns {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_UDP_SIZE);
            reply.set_edns(ours);
            usize::from(edns.max_payload().clamp(512, EDNS_UDP_SIZE))
        }
        None => PLAIN_UDP_SIZE,
    };
    if query.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return finish(reply, transport, client_size);
    }
    if query.queries.len() != 1 {
        reply.add_queries(query.queries.iter().cloned());
        reply.metadata.response_code = ResponseCode::FormErr;
        return finish(reply, transport, client_size);
    }
    let question: &Query = &query.queries[0];
    let qname = lower_fqdn(question.name());
    let Some(zone) = zone_of(&qname) else {
        return Outcome::Forward(Box::new(query));
    };
    reply.add_query(question.clone());
    reply.metadata.authoritative = true;
    let qtype = question.query_type();
    let owner = question.name().clone();

    if qname == zone && matches!(qtype, RecordType::SOA | RecordType::NS | RecordType::ANY) {
        if qtype != RecordType::NS {
            reply.add_answers(soa(zone));
        }
        if qtype != RecordType::SOA {
            if let Some(ns) = name(&format!("ns.{zone}")) {
                reply.add_answer(Record::from_rdata(owner.clone(), TTL, HRData::NS(NS(ns))));
            }
        }
        return finish(reply, transport, client_size);
    }

    match records.get(&qname) {
        Some(set) => {
            let mut answers: Vec<RData<'_>> = set.iter().filter(|d| matches(qtype, d)).collect();
            if answers.is_empty() {
                // NODATA: the name exists, not with this type.
                reply.add_authorities(soa(zone));
            } else {
                let n = answers.len();
                answers.rotate_left(rotate % n);
                for data in &answers {
                    reply.add_answers(to_record(&owner, data));
                    // SRV targets' addresses save the client a round trip.
                    if let RData::Srv { target, .. } = data {
                        if let (Some(t), Some(addrs)) = (name(target), records.get(target)) {
                            for a in addrs.iter().filter(|a| !matches!(a, RData::Srv { .. })) {
                                reply.add_additionals(to_record(&t, &a));
                            }
                        }
                    }
                }
            }
        }
        None => {
            // A name with records below it exists (empty non-terminal):
            // NODATA; anything else in our zones does not exist.
            if !records.has_names_below(&qname) {
                reply.metadata.response_code = ResponseCode::NXDomain;
            }
            reply.add_authorities(soa(zone));
        }
    }
    finish(reply, transport, client_size)
}

fn finish(reply: Message, transport: Transport, client_size: usize) -> Outcome {
    let Ok(bytes) = reply.to_vec() else {
        return Outcome::Drop;
    };
    if transport == Transport::Udp && bytes.len() > client_size {
        // Too big for the client's UDP buffer: TC set, the client retries
        // over TCP.
        let mut truncated = reply.truncate();
        let Ok(bytes) = truncated.to_vec() else {
            return Outcome::Drop;
        };
        if bytes.len() <= client_size {
            return Outcome::Reply(bytes);
        }
        // The questions alone are too big (a FORMERR echoing several long
        // ones): the header says enough.
        truncated.queries.clear();
        return truncated.to_vec().map_or(Outcome::Drop, Outcome::Reply);
    }
    Outcome::Reply(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Records;
    use proptest::prelude::*;

    fn records() -> Records {
        let mut r = Records::builder();
        for i in 1..=3u8 {
            r.add(
                "httpi.marathon.mesos.",
                RData::A {
                    ip: [10, 0, 0, i].into(),
                },
            );
        }
        r.add(
            "_httpi._tcp.marathon.mesos.",
            RData::Srv {
                priority: 0,
                weight: 1,
                port: 9896,
                target: "httpi-abcde-node1.marathon.mesos.",
            },
        );
        r.add(
            "httpi-abcde-node1.marathon.mesos.",
            RData::A {
                ip: [10, 0, 0, 1].into(),
            },
        );
        r.build()
    }

    fn ask(r: &Records, qname: &str, qtype: RecordType, edns: bool, t: Transport) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(qname).expect("name"), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            q.set_edns(e);
        }
        match respond(r, &q.to_vec().expect("encode"), t, 1) {
            Outcome::Reply(b) => Message::from_vec(&b).expect("decodable reply"),
            other => panic!("{qname}: {other:?}"),
        }
    }

    #[test]
    fn a_reply_over_udp_fits_even_when_its_questions_do_not() {
        // Found by the dns_respond fuzzer: a FORMERR echoing two long
        // questions was 539 bytes over UDP even truncated.
        let mut q = Message::query();
        for c in ["a", "b"] {
            // 255 bytes, nothing in common (no compression).
            let label = c.repeat(63);
            let long = format!("{label}.{label}.{label}.{}.", &label[..61]);
            q.add_query(Query::query(
                Name::from_ascii(&long).expect("name"),
                RecordType::A,
            ));
        }
        let request = q.to_vec().expect("encode");
        let Outcome::Reply(bytes) = respond(&records(), &request, Transport::Udp, 0) else {
            panic!("no reply");
        };
        assert!(bytes.len() <= 512, "{} bytes", bytes.len());
        let reply = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.metadata.truncation);
        // Over TCP the whole reply goes.
        let Outcome::Reply(tcp) = respond(&records(), &request, Transport::Tcp, 0) else {
            panic!("no reply");
        };
        assert!(tcp.len() > 512);
    }

    #[test]
    fn a_srv_nodata_nxdomain() {
        let r = records();
        let a = ask(
            &r,
            "HTTPI.marathon.mesos",
            RecordType::A,
            false,
            Transport::Udp,
        );
        assert!(a.metadata.authoritative);
        assert_eq!(a.answers.len(), 3);
        assert_eq!(a.answers[0].ttl, TTL);
        let srv = ask(
            &r,
            "_httpi._tcp.marathon.mesos.",
            RecordType::SRV,
            false,
            Transport::Udp,
        );
        assert_eq!(srv.answers.len(), 1);
        assert_eq!(srv.additionals.len(), 1, "target address in additional");
        let nodata = ask(
            &r,
            "httpi.marathon.mesos.",
            RecordType::AAAA,
            false,
            Transport::Udp,
        );
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authorities.len(), 1, "SOA in a negative answer");
        let nx = ask(
            &r,
            "nope.marathon.mesos.",
            RecordType::A,
            false,
            Transport::Udp,
        );
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.authorities.len(), 1);
        let ent = ask(&r, "marathon.mesos.", RecordType::A, false, Transport::Udp);
        assert_eq!(
            ent.metadata.response_code,
            ResponseCode::NoError,
            "empty non-terminal"
        );
        let apex = ask(&r, "mesos.", RecordType::SOA, false, Transport::Udp);
        assert_eq!(apex.answers.len(), 1);
    }

    #[test]
    fn answers_rotate() {
        let r = records();
        let first = |rot| {
            let mut q = Message::query();
            q.add_query(Query::query(
                Name::from_ascii("httpi.marathon.mesos.").expect("name"),
                RecordType::A,
            ));
            match respond(&r, &q.to_vec().expect("encode"), Transport::Udp, rot) {
                Outcome::Reply(b) => Message::from_vec(&b).expect("reply").answers[0].clone(),
                other => panic!("{other:?}"),
            }
        };
        assert_ne!(first(0), first(1));
        assert_eq!(first(0), first(3));
    }

    #[test]
    fn big_answers_truncate_over_udp_not_tcp() {
        let mut r = Records::builder();
        // 60 A records: ~1 KB, more than 512, less than 1232.
        for i in 0..60u8 {
            r.add(
                "big.marathon.mesos.",
                RData::A {
                    ip: [10, 1, 0, i].into(),
                },
            );
        }
        let r = r.build();
        let udp = ask(
            &r,
            "big.marathon.mesos.",
            RecordType::A,
            false,
            Transport::Udp,
        );
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let edns = ask(
            &r,
            "big.marathon.mesos.",
            RecordType::A,
            true,
            Transport::Udp,
        );
        assert!(!edns.metadata.truncation, "60 A records fit in 1232 bytes");
        assert!(edns.edns.is_some());
        let tcp = ask(
            &r,
            "big.marathon.mesos.",
            RecordType::A,
            false,
            Transport::Tcp,
        );
        assert_eq!(tcp.answers.len(), 60);
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_is_refused() {
        let r = records();
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("example.com.").expect("n"),
            RecordType::A,
        ));
        assert!(matches!(
            respond(&r, &q.to_vec().expect("e"), Transport::Udp, 0),
            Outcome::Forward(_)
        ));
        assert!(matches!(
            respond(&r, b"short", Transport::Udp, 0),
            Outcome::Drop
        ));
        let mut junk = vec![0xAB, 0xCD];
        junk.extend_from_slice(&[0xFF; 30]);
        match respond(&r, &junk, Transport::Udp, 0) {
            Outcome::Reply(b) => {
                let m = Message::from_vec(&b).expect("reply");
                assert_eq!(m.metadata.id, 0xABCD);
                assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
            }
            other => panic!("{other:?}"),
        }
        // Two questions: FORMERR.
        let mut two = Message::query();
        two.add_query(Query::query(
            Name::from_ascii("a.mesos.").expect("n"),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("b.mesos.").expect("n"),
            RecordType::A,
        ));
        match respond(&r, &two.to_vec().expect("e"), Transport::Udp, 0) {
            Outcome::Reply(b) => assert_eq!(
                Message::from_vec(&b).expect("r").metadata.response_code,
                ResponseCode::FormErr
            ),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        /// Whatever arrives, `respond` returns without panicking, and any
        /// reply it makes decodes and fits a UDP client.
        #[test]
        fn random_packets_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let r = records();
            if let Outcome::Reply(b) = respond(&r, &bytes, Transport::Udp, 0) {
                prop_assert!(b.len() <= EDNS_UDP_SIZE as usize);
                prop_assert!(Message::from_vec(&b).is_ok());
            }
        }
    }
}
