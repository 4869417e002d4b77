//! The protocol core's message handling: a session of messages from four
//! peers (framed as `skein_fuzz::Step`s), each decoded with
//! `skein_proto::wire::decode` and handed to a fresh `Node` with
//! `handle(now, from, body)`, time advancing and `tick` called in between;
//! every transmit and event drained. Signed facts are optionally re-signed
//! for the node they name, so the fuzzer reaches what lies behind the
//! signature checks. Asserts nothing panics and that what the node sends
//! encodes and decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_fuzz::{node, resign, steps, RESIGN, TICK, TICK_ONLY};
use skein_proto::wire::{decode, encode};
use skein_proto::Name;

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let peers = skein_fuzz::PEERS.map(|p| Name::intern(p).expect("name"));
    let mut me = node(skein_fuzz::ME, 0, 0);
    let cluster = me.config().cluster;
    me.join(0, vec![skein_fuzz::addr(1)]);
    let mut now = 0;
    for step in steps(data).take(64) {
        now += u64::from(step.dt_ms) * 1_000;
        if step.flags & (TICK | TICK_ONLY) != 0 {
            me.tick(now);
        }
        if step.flags & TICK_ONLY == 0 {
            if let Ok(mut body) = decode(step.message, cluster, MAX) {
                if step.flags & RESIGN != 0 {
                    resign(&mut body, cluster);
                }
                let from = peers[usize::from(step.flags & 3)];
                me.handle(now, from, body);
            }
        }
        while let Some(t) = me.poll_transmit() {
            let bytes = encode(cluster, &t.body);
            assert!(decode(&bytes, cluster, usize::MAX).is_ok());
        }
        while me.poll_event().is_some() {}
    }
    me.tick(now + 10_000_000);
    while me.poll_transmit().is_some() {}
    while me.poll_event().is_some() {}
});
