//! `skein_dns::wire` (the in-place readers) and `skein_dns::cache` (storing
//! an upstream's response and patching it for a client): a query and a
//! response from one input. Never panics; whatever the cache serves is a
//! well-formed message carrying the client's id and question.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use skein_dns::cache::{patch, Cache, Cached};
use skein_dns::wire::{self, KeyBuf, HEADER};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let Some((query, response)) = skein_fuzz::split2(data) else {
        return;
    };
    // The readers on both, whatever they are.
    let _ = wire::question_end(query);
    let _ = wire::question_end(response);
    if let Some(layout) = wire::parse_layout(response) {
        assert!(layout.question_end <= response.len());
        for &at in &layout.ttls {
            assert!(usize::from(at) + 4 <= response.len());
        }
        if let Some(opt) = layout.opt {
            let mut copy = response.to_vec();
            if wire::strip_cookie(&mut copy, opt) && copy.len() != response.len() {
                // Only the OPT record changed: the message still reads.
                wire::parse_layout(&copy).expect("layout after stripping a cookie");
            }
        }
    }
    let Some(question) = wire::parse_query(query) else {
        return;
    };
    assert_eq!(
        wire::question_end(query),
        Some(HEADER + question.section.len())
    );
    let _ = wire::in_our_zones(question.name());
    let mut key = KeyBuf::default();
    let _ = question.key(&mut key);
    let now = Instant::now();
    let later = now + Duration::from_secs(u64::from(ctl & 0x0f));
    let udp = (ctl & 0x10 == 0).then(|| question.udp_limit());
    if let Some(cached) = Cached::new(&question, response.to_vec(), now) {
        let mut out = Vec::new();
        if patch(&cached, &question, later, udp, &mut out) {
            assert_eq!(out[..2], query[..2], "served with another id");
            assert_eq!(
                &out[HEADER..HEADER + question.section.len()],
                question.section
            );
            wire::parse_layout(&out).expect("a served answer is well-formed");
            if let Some(limit) = udp {
                if out.len() > limit {
                    // Only an answer without records can still be too big.
                    assert_eq!(out[6..10], [0, 0, 0, 0]);
                }
            }
        }
    }
    let mut cache = Cache::new(2);
    cache.put(&question, response, now);
    let mut out = Vec::new();
    if cache.get(&question, later, udp, &mut out) {
        assert_eq!(out[..2], query[..2]);
        wire::parse_layout(&out).expect("a served answer is well-formed");
    }
});
