//! `skein_dns::answer::respond`: any bytes as a query against a fixed record
//! set, over UDP and TCP. Never panics; a reply decodes, keeps the query's id,
//! and over UDP fits the client's size.
#![no_main]

use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use skein_dns::answer::{respond, Outcome, Transport, EDNS_UDP_SIZE};
use skein_dns::Records;

fuzz_target!(|data: &[u8]| {
    static RECORDS: OnceLock<Records> = OnceLock::new();
    let records = RECORDS.get_or_init(skein_fuzz::records);
    let Some((&ctl, query)) = data.split_first() else {
        return;
    };
    let transport = if ctl & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let rotate = usize::from(ctl >> 1);
    if let Outcome::Reply(reply) = respond(records, query, transport, rotate) {
        assert!(reply.len() >= 12, "reply shorter than a header");
        assert_eq!(reply[..2], query[..2], "reply id differs from the query's");
        if transport == Transport::Udp {
            // The client's size: its EDNS payload (512..=1232), else 512.
            let limit = Message::from_vec(query)
                .ok()
                .and_then(|q| q.edns.map(|e| e.max_payload().clamp(512, EDNS_UDP_SIZE)))
                .map_or(512, usize::from);
            assert!(
                reply.len() <= limit,
                "{} bytes over UDP, limit {limit}",
                reply.len()
            );
        }
        Message::from_vec(&reply).expect("our reply decodes");
    }
});
