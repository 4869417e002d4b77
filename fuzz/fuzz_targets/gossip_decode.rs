//! `skein_proto::wire::decode` (the `Envelope` behind the version byte and
//! the cluster tag): never panics, and whatever decodes encodes back to a
//! message that decodes to the same body, of the length `encoded_len` says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_proto::wire::{decode, encode, encoded_len};

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let cluster = skein_fuzz::config().cluster;
    let Ok(body) = decode(data, cluster, MAX) else {
        return;
    };
    let bytes = encode(cluster, &body);
    assert_eq!(bytes.len(), encoded_len(cluster, &body));
    let again = decode(&bytes, cluster, MAX).expect("a re-encoded message decodes");
    assert_eq!(again, body);
});
