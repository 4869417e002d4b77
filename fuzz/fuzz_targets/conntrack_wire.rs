//! ctnetlink messages as the kernel sends them (table dumps and events).
//! Never panics; every connection read from events encodes back to bytes
//! that read as the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_conntrack::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_dump(data, 1);
    for e in wire::parse_events(data) {
        let again = wire::parse_events(&wire::encode_event(&e));
        assert_eq!(again, vec![e]);
    }
});
