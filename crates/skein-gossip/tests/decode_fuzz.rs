//! Whatever arrives on a gossip stream, decoding returns a value or an
//! error: it never panics, and never claims more bytes than it was given.
//! (Property-based fuzzing on stable Rust; the transport counts the errors.)

use chitchat::{ChitchatMessage, Deserializable, Serializable};
use proptest::prelude::*;

fn decode(bytes: &[u8]) -> anyhow::Result<ChitchatMessage> {
    let mut buf = bytes;
    ChitchatMessage::deserialize(&mut buf)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
    }

    // Starting with a valid message tag gets past the first byte into the
    // digest and delta decoders.
    #[test]
    fn tagged_random_bodies_never_panic(
        tag in 0u8..6,
        body in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&body);
        if let Ok(msg) = decode(&bytes) {
            // Whatever decoded must encode again and decode to itself.
            let again = msg.serialize_to_vec();
            prop_assert_eq!(decode(&again).ok(), Some(msg));
        }
    }

    #[test]
    fn flipped_and_truncated_valid_messages_never_panic(
        flip_at in any::<prop::sample::Index>(),
        flip in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let valid = ChitchatMessage::BadCluster.serialize_to_vec();
        let mut syn = vec![0u8]; // Syn tag
        syn.extend_from_slice(&(5u16).to_le_bytes());
        syn.extend_from_slice(b"hello");
        syn.extend_from_slice(&[0, 0]); // empty digest
        for seed in [valid, syn] {
            let mut bytes = seed.clone();
            let i = flip_at.index(bytes.len());
            bytes[i] ^= flip;
            let _ = decode(&bytes);
            let _ = decode(&seed[..cut.index(seed.len() + 1).min(seed.len())]);
        }
    }
}
