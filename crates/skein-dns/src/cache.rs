//! A bounded cache of forwarded answers (dcos-dns had none), kept in wire
//! format as Unbound does: an upstream's response is stored as received
//! with the offsets of its TTL fields, and a hit is a copy with the id, the
//! RD bit, the question's letter case and the TTLs patched ([`patch`], pure)
//! instead of a decode, clone and re-encode.
//!
//! Positive answers live for their smallest TTL, negative ones (NXDOMAIN,
//! NODATA) for the SOA minimum (RFC 2308); served copies carry the
//! remaining TTL. Time is passed in, so the cache is tested without
//! sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;

use crate::wire::{self, KeyBuf, Layout, Question, HEADER};

/// Longest any answer is kept, whatever its TTL says.
pub const MAX_TTL: u32 = 3600;
/// Negative answers without an SOA are kept this long.
pub const DEFAULT_NEGATIVE_TTL: u32 = 30;

/// One upstream response, ready to be patched for a client.
#[derive(Debug, Clone)]
pub struct Cached {
    /// As received (COOKIE options removed).
    pub bytes: Vec<u8>,
    pub layout: Layout,
    pub stored: Instant,
    /// When the entry dies: `stored` plus its cache TTL.
    pub expires: Instant,
}

/// How long an answer may be cached, by the rules above; `None` when it
/// must not be (truncated, SERVFAIL, REFUSED...).
fn cache_ttl(answer: &Message) -> Option<u32> {
    if answer.metadata.truncation {
        return None;
    }
    let ttl = match answer.metadata.response_code {
        ResponseCode::NoError if !answer.answers.is_empty() => {
            answer.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
        }
        ResponseCode::NoError | ResponseCode::NXDomain => answer
            .authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                _ => None,
            })
            .unwrap_or(DEFAULT_NEGATIVE_TTL),
        _ => return None, // SERVFAIL, REFUSED...: ask again next time
    }
    .min(MAX_TTL);
    (ttl > 0).then_some(ttl)
}

impl Cached {
    /// The upstream's `response` to `question`, if it may be cached: a
    /// well-formed, untruncated answer to that very question.
    pub fn new(question: &Question, mut response: Vec<u8>, now: Instant) -> Option<Cached> {
        let mut layout = wire::parse_layout(&response)?;
        // A response (QR) to a standard query, to the question asked.
        if response[2] & 0xF8 != 0x80 || response[4..6] != [0, 1] {
            return None;
        }
        let asked = question.section;
        if !response
            .get(HEADER..layout.question_end)
            .is_some_and(|s| s.eq_ignore_ascii_case(asked))
        {
            return None;
        }
        if let Some(opt) = layout.opt {
            if !wire::strip_cookie(&mut response, opt) {
                return None;
            }
            layout = wire::parse_layout(&response)?;
        }
        // The full decode checks every record, and finds the TTL.
        let ttl = cache_ttl(&Message::from_vec(&response).ok()?)?;
        Some(Cached {
            bytes: response,
            layout,
            stored: now,
            expires: now + Duration::from_secs(u64::from(ttl)),
        })
    }
}

/// Writes into `out` the cached response as the answer to `question` at
/// `now`: the query's id, RD bit and question bytes (so its letter case),
/// every TTL but OPT's lowered by the whole seconds elapsed (not below 0).
/// Larger than `udp_limit`: TC set and no records, OPT kept, so the client
/// retries over TCP. `false` (and `out` unspecified) when the entry has
/// expired or does not fit the question. Total: never panics.
pub fn patch(
    cached: &Cached,
    question: &Question,
    now: Instant,
    udp_limit: Option<usize>,
    out: &mut Vec<u8>,
) -> bool {
    if now >= cached.expires {
        return false;
    }
    let bytes = &cached.bytes;
    let qend = cached.layout.question_end;
    let (Some(section), Some(query_head)) =
        (bytes.get(HEADER..qend), question.message.get(..HEADER))
    else {
        return false;
    };
    if section.len() != question.section.len() {
        return false;
    }
    out.clear();
    if udp_limit.is_some_and(|limit| bytes.len() > limit) {
        out.extend_from_slice(&bytes[..qend]);
        out[2] |= 0x02; // TC
        let opt = cached.layout.opt.and_then(|(a, b)| bytes.get(a..b));
        out[6..12].copy_from_slice(&[0, 0, 0, 0, 0, u8::from(opt.is_some())]);
        if let Some(opt) = opt {
            out.extend_from_slice(opt);
        }
    } else {
        out.extend_from_slice(bytes);
        let elapsed = now.saturating_duration_since(cached.stored).as_secs();
        let elapsed = u32::try_from(elapsed).unwrap_or(u32::MAX);
        for &at in &cached.layout.ttls {
            let at = usize::from(at);
            let Some(field) = out.get_mut(at..at + 4) else {
                return false;
            };
            let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
            field.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
        }
    }
    out[..2].copy_from_slice(&query_head[..2]);
    out[2] = (out[2] & !0x01) | (query_head[2] & 0x01); // RD as asked
    out[HEADER..qend].copy_from_slice(question.section);
    true
}

pub struct Cache {
    entries: HashMap<Box<[u8]>, Cached>,
    /// Insertion order, for eviction when full.
    order: VecDeque<Box<[u8]>>,
    capacity: usize,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the cached answer to `question` into `out`; `false` on a
    /// miss (an expired entry is dropped). `udp_limit` is the client's UDP
    /// payload size, `None` over TCP.
    pub fn get(
        &mut self,
        question: &Question,
        now: Instant,
        udp_limit: Option<usize>,
        out: &mut Vec<u8>,
    ) -> bool {
        let mut k = KeyBuf::default();
        let k = question.key(&mut k);
        let Some(entry) = self.entries.get(k) else {
            return false;
        };
        if now >= entry.expires {
            self.entries.remove(k);
            return false;
        }
        patch(entry, question, now, udp_limit, out)
    }

    /// Remembers an upstream's `response` to `question` if it is
    /// cacheable.
    pub fn put(&mut self, question: &Question, response: &[u8], now: Instant) {
        let Some(entry) = Cached::new(question, response.to_vec(), now) else {
            return;
        };
        let mut k = KeyBuf::default();
        let k: Box<[u8]> = question.key(&mut k).into();
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(k.clone());
        self.entries.insert(k, entry);
        // The order queue may hold keys replaced or expired since; keep it
        // from growing past the map.
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_query;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, SOA, TXT};
    use hickory_proto::rr::{Name, Record, RecordType};
    use proptest::prelude::*;

    fn query(name: &str) -> Vec<u8> {
        query_with(name, RecordType::A, None)
    }

    fn query_with(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut q = Message::query();
        q.metadata.id = rand_id(name);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            q.set_edns(e);
        }
        q.to_vec().expect("encode")
    }

    /// Different names, different ids.
    fn rand_id(name: &str) -> u16 {
        name.bytes()
            .fold(7u16, |h, b| h.wrapping_mul(31).wrapping_add(u16::from(b)))
    }

    fn decode(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).expect("decodable query or answer")
    }

    fn answer(q: &[u8], ttl: u32) -> Vec<u8> {
        let q = decode(q);
        let mut a = Message::response(q.metadata.id, q.metadata.op_code);
        a.metadata.recursion_desired = q.metadata.recursion_desired;
        a.add_queries(q.queries.clone());
        a.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            ttl,
            RData::A(A([1, 2, 3, 4].into())),
        ));
        a.to_vec().expect("encode")
    }

    fn put(c: &mut Cache, q: &[u8], a: &[u8], now: Instant) {
        c.put(&parse_query(q).expect("plain query"), a, now);
    }

    fn get(c: &mut Cache, q: &[u8], now: Instant) -> Option<Message> {
        let mut out = Vec::new();
        c.get(&parse_query(q).expect("plain query"), now, None, &mut out)
            .then(|| decode(&out))
    }

    #[test]
    fn answers_expire_with_their_ttl_and_count_down() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let q = query("example.com.");
        let a = answer(&q, 60);
        assert!(
            a.windows(2).any(|w| w == [0xC0, 0x0C]),
            "the owner name points at the question (so the tests cover compression)"
        );
        put(&mut c, &q, &a, t0);
        let again = query("EXAMPLE.com.");
        let hit = get(&mut c, &again, t0 + Duration::from_secs(20)).expect("hit");
        assert_eq!(hit.metadata.id, decode(&again).metadata.id);
        assert_ne!(hit.metadata.id, decode(&q).metadata.id);
        assert_eq!(hit.answers[0].ttl, 40);
        assert_eq!(
            hit.queries[0].name().to_ascii(),
            "EXAMPLE.com.",
            "the client's letter case"
        );
        assert_eq!(
            get(&mut c, &again, t0 + Duration::from_millis(59_999))
                .expect("hit")
                .answers[0]
                .ttl,
            1,
            "whole seconds elapsed, rounded down"
        );
        assert!(get(&mut c, &again, t0 + Duration::from_secs(60)).is_none());
        assert!(c.is_empty(), "expired entries are dropped");
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let q = query("nope.example.");
        let dq = decode(&q);
        let mut nx = Message::response(dq.metadata.id, dq.metadata.op_code);
        nx.add_queries(dq.queries.clone());
        nx.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(
            Name::from_ascii("ns.example.").expect("n"),
            Name::from_ascii("h.example.").expect("n"),
            1,
            1,
            1,
            1,
            10,
        );
        nx.add_authority(Record::from_rdata(
            Name::from_ascii("example.").expect("n"),
            300,
            RData::SOA(soa),
        ));
        put(&mut c, &q, &nx.to_vec().expect("e"), t0);
        let hit = get(&mut c, &q, t0 + Duration::from_secs(9)).expect("hit");
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(hit.authorities[0].ttl, 291);
        assert!(get(&mut c, &q, t0 + Duration::from_secs(10)).is_none());
        let x = query("x.");
        let dx = decode(&x);
        let mut fail = Message::response(dx.metadata.id, dx.metadata.op_code);
        fail.add_queries(dx.queries.clone());
        fail.metadata.response_code = ResponseCode::ServFail;
        put(&mut c, &x, &fail.to_vec().expect("e"), t0);
        assert!(get(&mut c, &x, t0).is_none(), "SERVFAIL is not cached");
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = Cache::new(3);
        let t0 = Instant::now();
        for i in 0..10 {
            let q = query(&format!("n{i}.example."));
            put(&mut c, &q, &answer(&q, 60), t0);
        }
        assert_eq!(c.len(), 3);
        assert!(get(&mut c, &query("n9.example."), t0).is_some());
        assert!(get(&mut c, &query("n0.example."), t0).is_none());
    }

    #[test]
    fn only_answers_to_the_question_asked_are_cached() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let q = query("example.com.");
        put(&mut c, &q, &answer(&query("other.com."), 60), t0);
        put(&mut c, &q, &q, t0); // a query, not a response
        put(&mut c, &q, b"\x00\x01garbage", t0);
        let mut truncated = answer(&q, 60);
        truncated[2] |= 0x02;
        put(&mut c, &q, &truncated, t0);
        assert!(c.is_empty());
        // AAAA and A are different questions.
        put(&mut c, &q, &answer(&q, 60), t0);
        assert!(get(
            &mut c,
            &query_with("example.com.", RecordType::AAAA, None),
            t0
        )
        .is_none());
    }

    #[test]
    fn edns_answers_are_kept_apart_and_lose_their_cookie() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let q = query_with("example.com.", RecordType::A, Some(1232));
        let mut a = decode(&answer(&q, 60));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.options_mut()
            .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
                10,
                vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            ));
        a.set_edns(e);
        put(&mut c, &q, &a.to_vec().expect("e"), t0);
        assert!(
            get(&mut c, &query("example.com."), t0).is_none(),
            "no OPT for a client without EDNS"
        );
        let hit = get(&mut c, &q, t0).expect("hit");
        let edns = hit.edns.expect("OPT kept");
        assert_eq!(edns.max_payload(), 1232);
        assert!(edns.options().as_ref().is_empty(), "cookie removed");
    }

    #[test]
    fn big_answers_truncate_over_udp_only() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let big = |q: &[u8]| {
            let mut a = decode(&answer(q, 60));
            for i in 0..60u8 {
                a.add_answer(Record::from_rdata(
                    a.queries[0].name().clone(),
                    60,
                    RData::A(A([10, 1, 0, i].into())),
                ));
            }
            if let Some(e) = decode(q).edns {
                a.set_edns(e);
            }
            a.to_vec().expect("e")
        };
        let plain = query("big.example.");
        put(&mut c, &plain, &big(&plain), t0);
        let pq = parse_query(&plain).expect("q");
        let mut out = Vec::new();
        assert!(c.get(&pq, t0, Some(pq.udp_limit()), &mut out));
        let m = decode(&out);
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty() && m.edns.is_none());
        assert_eq!(m.metadata.id, decode(&plain).metadata.id);
        assert_eq!(m.queries.len(), 1);
        assert!(c.get(&pq, t0, None, &mut out), "TCP");
        assert_eq!(decode(&out).answers.len(), 61);

        let edns = query_with("big.example.", RecordType::A, Some(4096));
        put(&mut c, &edns, &big(&edns), t0);
        let eq = parse_query(&edns).expect("q");
        assert!(c.get(&eq, t0, Some(eq.udp_limit()), &mut out));
        assert_eq!(decode(&out).answers.len(), 61, "fits 4096");
        let small = query_with("big.example.", RecordType::A, Some(600));
        let sq = parse_query(&small).expect("q");
        assert!(c.get(&sq, t0, Some(sq.udp_limit()), &mut out));
        let m = decode(&out);
        assert!(m.metadata.truncation && m.answers.is_empty());
        assert!(m.edns.is_some(), "OPT kept in a truncated EDNS answer");
    }

    /// A random name of 1–4 labels of mixed case.
    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec("[a-zA-Z][a-zA-Z0-9-]{0,8}", 1..4).prop_map(|l| l.join(".") + ".")
    }

    fn rdata(n: Name) -> impl Strategy<Value = RData> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| RData::A(A(b.into()))),
            any::<[u8; 16]>().prop_map(|b| RData::AAAA(AAAA(b.into()))),
            Just(RData::CNAME(CNAME(n.clone()))),
            any::<u16>().prop_map(move |p| RData::MX(MX::new(p, n.clone()))),
            Just(RData::NS(NS(Name::from_ascii("ns.example.").expect("n")))),
            "[ -~]{0,40}".prop_map(|t| RData::TXT(TXT::new(vec![t]))),
        ]
    }

    fn records(owner: Name) -> impl Strategy<Value = Vec<Record>> {
        prop::collection::vec((rdata(owner.clone()), 1u32..100_000), 0..5).prop_map(move |v| {
            v.into_iter()
                .map(|(d, ttl)| Record::from_rdata(owner.clone(), ttl, d))
                .collect()
        })
    }

    /// A query and an upstream's response to it (answer, authority and
    /// additional records whose names compress against the question).
    fn exchange() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (name(), any::<u16>(), any::<bool>(), any::<bool>())
            .prop_flat_map(|(qname, id, rd, edns)| {
                let owner = Name::from_ascii(&qname).expect("n");
                (
                    Just((qname, id, rd, edns)),
                    records(owner.clone()),
                    records(owner.clone()),
                    records(Name::from_ascii("extra.example.").expect("n")),
                )
            })
            .prop_map(|((qname, id, rd, edns), an, ns, ar)| {
                let mut q = Message::query();
                q.metadata.id = id;
                q.metadata.recursion_desired = rd;
                q.add_query(Query::query(
                    Name::from_ascii(&qname).expect("n"),
                    RecordType::A,
                ));
                if edns {
                    q.set_edns(Edns::new());
                }
                let mut a = Message::response(id, q.metadata.op_code);
                a.metadata.recursion_desired = rd;
                a.add_queries(q.queries.clone());
                if an.is_empty() {
                    a.metadata.response_code = ResponseCode::NXDomain;
                }
                a.add_answers(an);
                a.add_authorities(ns);
                a.add_additionals(ar);
                if edns {
                    a.set_edns(Edns::new());
                }
                (q.to_vec().expect("q"), a.to_vec().expect("a"))
            })
    }

    /// The same question with its letters' case and the id shuffled.
    fn recased(query: &[u8], flips: &[bool], id: u16, rd: bool) -> Vec<u8> {
        let mut q = query.to_vec();
        q[..2].copy_from_slice(&id.to_be_bytes());
        q[2] = (q[2] & !1) | u8::from(rd);
        let qend = HEADER + parse_query(query).expect("q").section.len();
        for (b, &flip) in q[HEADER..qend - 4].iter_mut().zip(flips.iter().cycle()) {
            if flip && b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        q
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Patched answers decode, carry the asking query's id, RD bit and
        /// letter case, and every TTL is the original minus the seconds
        /// elapsed; the records are otherwise the upstream's.
        #[test]
        fn patched_answers_decode_with_remaining_ttls(
            (query, response) in exchange(),
            flips in prop::collection::vec(any::<bool>(), 1..8),
            id in any::<u16>(),
            rd in any::<bool>(),
            elapsed_ms in 0u64..200_000_000,
        ) {
            let t0 = Instant::now();
            let q = parse_query(&query).expect("plain query");
            // TTLs are at least 1 and NXDOMAIN without SOA keeps the
            // default: every one of these is cacheable.
            let cached = Cached::new(&q, response.clone(), t0);
            prop_assert!(cached.is_some(), "not cached: {:?}", decode(&response));
            let cached = cached.expect("checked");
            let asked = recased(&query, &flips, id, rd);
            let aq = parse_query(&asked).expect("plain query");
            let now = t0 + Duration::from_millis(elapsed_ms);
            let mut out = Vec::new();
            let served = patch(&cached, &aq, now, None, &mut out);
            prop_assert_eq!(served, now < cached.expires);
            if !served {
                return Ok(());
            }
            let elapsed = (elapsed_ms / 1000) as u32;
            let (got, orig, client) = (decode(&out), decode(&response), decode(&asked));
            prop_assert_eq!(got.metadata.id, id);
            prop_assert_eq!(got.metadata.recursion_desired, rd);
            prop_assert_eq!(got.metadata.response_code, orig.metadata.response_code);
            prop_assert_eq!(
                got.queries[0].name().to_ascii(),
                client.queries[0].name().to_ascii()
            );
            prop_assert_eq!(got.edns.is_some(), orig.edns.is_some());
            let sections = |m: &Message| {
                [m.answers.clone(), m.authorities.clone(), m.additionals.clone()]
            };
            for (g, o) in sections(&got).iter().zip(sections(&orig).iter()) {
                prop_assert_eq!(g.len(), o.len());
                for (g, o) in g.iter().zip(o) {
                    prop_assert_eq!(g.ttl, o.ttl.saturating_sub(elapsed));
                    prop_assert_eq!(&g.data, &o.data);
                    prop_assert_eq!(&g.name, &o.name); // case aside
                }
            }
            // Truncated for a small UDP client: header, question, OPT.
            prop_assert!(patch(&cached, &aq, now, Some(HEADER), &mut out));
            let t = decode(&out);
            prop_assert!(t.metadata.truncation);
            prop_assert_eq!(t.metadata.id, id);
            prop_assert!(t.answers.is_empty() && t.authorities.is_empty() && t.additionals.is_empty());
        }

        /// Whatever the cached bytes and offsets, patching never panics.
        #[test]
        fn patching_garbage_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..120),
            ttls in prop::collection::vec(any::<u16>(), 0..6),
            question_end in 0usize..140,
            opt in proptest::option::of((0usize..140, 0usize..140)),
            query in prop::collection::vec(any::<u8>(), 0..60),
            limit in proptest::option::of(0usize..200),
        ) {
            let t0 = Instant::now();
            let cached = Cached {
                bytes,
                layout: Layout { question_end, ttls, opt },
                stored: t0,
                expires: t0 + Duration::from_secs(5),
            };
            let mut q = query.clone();
            q.truncate(12);
            q.resize(12, 0);
            q[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
            q.extend_from_slice(&query);
            let section = q.get(12..(12 + query.len()).min(12 + question_end.saturating_sub(12))).unwrap_or_default();
            let question = Question {
                message: &q,
                section,
                qtype: 1,
                qclass: 1,
                edns: None,
                checking_disabled: false,
            };
            let mut out = Vec::new();
            let _ = patch(&cached, &question, t0, limit, &mut out);
        }
    }
}
