//! A bounded cache of forwarded answers (dcos-dns had none). Positive
//! answers live for their smallest TTL, negative ones (NXDOMAIN, NODATA) for
//! the SOA minimum (RFC 2308); served copies carry the remaining TTL. Time
//! is passed in, so the cache is tested without sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;

/// Longest any answer is kept, whatever its TTL says.
pub const MAX_TTL: u32 = 3600;
/// Negative answers without an SOA are kept this long.
pub const DEFAULT_NEGATIVE_TTL: u32 = 30;

type Key = (String, u16, u16);

struct Entry {
    message: Message,
    stored: Instant,
    ttl: u32,
}

pub struct Cache {
    entries: HashMap<Key, Entry>,
    /// Insertion order, for eviction when full.
    order: VecDeque<Key>,
    capacity: usize,
}

fn key(query: &Message) -> Option<Key> {
    let q = query.queries.first()?;
    Some((
        q.name().to_ascii().to_ascii_lowercase(),
        u16::from(q.query_type()),
        u16::from(q.query_class()),
    ))
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

    /// A cached answer to `query`, with its id and remaining TTLs set.
    pub fn get(&mut self, query: &Message, now: Instant) -> Option<Message> {
        let k = key(query)?;
        let entry = self.entries.get(&k)?;
        let age = now.saturating_duration_since(entry.stored);
        if age >= Duration::from_secs(u64::from(entry.ttl)) {
            self.entries.remove(&k);
            return None;
        }
        let elapsed = age.as_secs() as u32;
        let mut m = entry.message.clone();
        m.metadata.id = query.metadata.id;
        m.metadata.recursion_desired = query.metadata.recursion_desired;
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(elapsed);
        }
        Some(m)
    }

    /// Remembers an upstream's answer to `query` if it is cacheable.
    pub fn put(&mut self, query: &Message, answer: &Message, now: Instant) {
        let Some(k) = key(query) else { return };
        if answer.metadata.truncation {
            return;
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
            _ => return, // SERVFAIL, REFUSED...: ask again next time
        }
        .min(MAX_TTL);
        if ttl == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(k.clone());
        self.entries.insert(
            k,
            Entry {
                message: answer.clone(),
                stored: now,
                ttl,
            },
        );
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
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, Record, RecordType};

    fn query(name: &str) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        q
    }

    fn answer(q: &Message, ttl: u32) -> Message {
        let mut a = Message::response(q.metadata.id, q.metadata.op_code);
        a.add_queries(q.queries.clone());
        a.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            ttl,
            RData::A(A([1, 2, 3, 4].into())),
        ));
        a
    }

    #[test]
    fn answers_expire_with_their_ttl_and_count_down() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let q = query("example.com.");
        c.put(&q, &answer(&q, 60), t0);
        let again = query("EXAMPLE.com.");
        let hit = c.get(&again, t0 + Duration::from_secs(20)).expect("hit");
        assert_eq!(hit.metadata.id, again.metadata.id);
        assert_eq!(hit.answers[0].ttl, 40);
        assert!(c.get(&again, t0 + Duration::from_secs(60)).is_none());
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let q = query("nope.example.");
        let mut nx = Message::response(q.metadata.id, q.metadata.op_code);
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
        c.put(&q, &nx, t0);
        assert!(c.get(&q, t0 + Duration::from_secs(9)).is_some());
        assert!(c.get(&q, t0 + Duration::from_secs(10)).is_none());
        let mut fail = Message::response(q.metadata.id, q.metadata.op_code);
        fail.metadata.response_code = ResponseCode::ServFail;
        c.put(&query("x."), &fail, t0);
        assert!(c.get(&query("x."), t0).is_none(), "SERVFAIL is not cached");
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = Cache::new(3);
        let t0 = Instant::now();
        for i in 0..10 {
            let q = query(&format!("n{i}.example."));
            c.put(&q, &answer(&q, 60), t0);
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(&query("n9.example."), t0).is_some());
        assert!(c.get(&query("n0.example."), t0).is_none());
    }
}
