//! `skein_nftables::wire::parse_replies`, the kernel's answers to a batch,
//! then `judge` against a fixed batch. Never panics.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use skein_nftables::wire::{encode_batch, judge, parse_replies, Batch};
use skein_nftables::{Component, ElementOp};

const TABLE: &str = "skein";

fn ops() -> Vec<ElementOp> {
    let vip = Component::Ipv4(Ipv4Addr::new(11, 0, 0, 1));
    vec![
        ElementOp::flush("tcp1"),
        ElementOp::add("tcp1", vec![vip, Component::Port(80)], None),
        ElementOp::add(
            "tcp_backends",
            vec![vip, Component::Port(80), Component::U32(0)],
            Some(vec![
                Component::Ipv4(Ipv4Addr::new(10, 0, 0, 2)),
                Component::Port(8080),
            ]),
        ),
        ElementOp::delete("udp1", vec![vip, Component::Port(53)]),
    ]
}

fuzz_target!(|data: &[u8]| {
    static FIXED: OnceLock<(Vec<ElementOp>, Batch)> = OnceLock::new();
    let (ops, batch) = FIXED.get_or_init(|| {
        let ops = ops();
        let batch = encode_batch(TABLE, &ops, 1).expect("batch");
        (ops, batch)
    });
    let Ok(replies) = parse_replies(data) else {
        return;
    };
    let _ = judge(TABLE, ops, batch, &replies);
});
