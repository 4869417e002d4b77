//! Whatever arrives on a gossip stream, decoding returns a body or an error:
//! it never panics. (Property-based fuzzing on stable Rust; the driver counts
//! the errors.) And what a node encodes, its peers decode to the same body.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use skein_gossip::transport::MAX_MESSAGE_SIZE;
use skein_proto::wire::{
    self, Announce, Body, DecodeError, Identity, Leave, OriginData, Probe, Rumor, Sig, SignedEntry,
    Summary, Suspicion, Want, SIG_LEN, WIRE_VERSION,
};
use skein_proto::Name;

const CLUSTER: u64 = 0x5ce1_c1a5_7e00_0001;
/// Variants of [`Body`]: a tag below this gets past the first body byte.
const BODY_VARIANTS: u8 = 9;

fn decode(bytes: &[u8]) -> Result<Body, DecodeError> {
    wire::decode(bytes, CLUSTER, MAX_MESSAGE_SIZE)
}

/// The bytes every message of this cluster starts with: version, then the
/// cluster tag (a postcard varint).
fn header() -> Vec<u8> {
    postcard::to_allocvec(&(WIRE_VERSION, CLUSTER)).unwrap()
}

fn name(s: &str) -> Name {
    Name::intern(s).unwrap()
}

fn sig(fill: u8) -> Sig {
    Sig([fill; SIG_LEN])
}

fn announce(node: &str, identity: bool) -> Arc<Announce> {
    Arc::new(Announce {
        node: name(node),
        gen: 3,
        life: u64::MAX,
        inc: 2,
        addr: "10.0.0.7:62501".parse().unwrap(),
        floor: 17,
        identity: identity.then(|| Arc::new(Identity(vec![0x30, 0x82, 1, 2, 3]))),
        sig: sig(0xa1),
    })
}

fn entry(origin: &str, key: &str, value: Option<&str>) -> Arc<SignedEntry> {
    Arc::new(SignedEntry {
        origin: name(origin),
        gen: 3,
        version: 300,
        key: key.to_owned(),
        value: value.map(std::sync::Arc::from),
        sig: sig(0xe7),
    })
}

/// One of every kind of message, with the edge values of their fields.
fn hand_built() -> Vec<Body> {
    let v6: SocketAddr = "[fd00::1:2]:1".parse().unwrap();
    let suspicion = Arc::new(Suspicion {
        observer: name("node-b"),
        node: name("node-a"),
        gen: 3,
        inc: 0,
        sig: sig(0x55),
    });
    let leave = Arc::new(Leave {
        node: name("node-c"),
        gen: u64::MAX,
        sig: sig(0),
    });
    vec![
        Body::Heartbeat(Probe {
            gen: 0,
            inc: 0,
            digest: 0,
            you_down: None,
            announce: None,
        }),
        Body::Ping(Probe {
            gen: 1,
            inc: 127,
            digest: u64::MAX,
            you_down: Some((1, 128)),
            announce: Some(announce("node-a", false)),
        }),
        Body::Ack(Probe {
            gen: u64::MAX,
            inc: 1 << 35,
            digest: 0x0123_4567_89ab_cdef,
            you_down: Some((0, 0)),
            announce: Some(Arc::new(Announce {
                addr: v6,
                ..(*announce("node-b", true)).clone()
            })),
        }),
        Body::Join(OriginData {
            announce: announce("node-a", true),
            identity: Some(Arc::new(Identity(vec![0xff; 600]))),
            suspicions: vec![],
            leave: None,
            reset: true,
            entries: vec![entry("node-a", "meta", Some("{}"))],
            wm: 300,
        }),
        Body::Rumors(vec![]),
        Body::Rumors(vec![
            Rumor::Alive(announce("node-a", true)),
            Rumor::Suspect(suspicion.clone()),
            Rumor::Entry(entry("node-a", "task:web-1", Some("{\"port\":80}"))),
            Rumor::Entry(entry("node-a", "health:web-1", None)),
            Rumor::Entry(entry("node-b", "ключ/🔑", Some(""))),
            Rumor::Leave(leave.clone()),
        ]),
        Body::SyncStart { buckets: vec![] },
        Body::SyncStart {
            buckets: (0..64).map(|i| u64::MAX >> i).collect(),
        },
        Body::SyncSummaries {
            mask: 1 << 63 | 1,
            summaries: vec![
                Summary {
                    node: name("node-a"),
                    gen: 3,
                    inc: 2,
                    wm: 300,
                    status: 0,
                },
                Summary {
                    node: name("node-c"),
                    gen: 1,
                    inc: 0,
                    wm: 0,
                    status: 3,
                },
            ],
        },
        Body::SyncWant(vec![
            Want {
                node: name("node-a"),
                gen: 3,
                wm: 299,
                identity: false,
            },
            Want {
                node: name("node-b"),
                gen: 0,
                wm: 0,
                identity: true,
            },
        ]),
        Body::SyncData {
            spread: false,
            origins: vec![],
        },
        Body::SyncData {
            spread: true,
            origins: vec![
                OriginData {
                    announce: announce("node-a", false),
                    identity: Some(Arc::new(Identity(vec![1; 3]))),
                    suspicions: vec![suspicion],
                    leave: None,
                    reset: true,
                    entries: vec![entry("node-a", "a", Some("1")), entry("node-a", "b", None)],
                    wm: 300,
                },
                OriginData {
                    announce: announce("node-c", true),
                    identity: None,
                    suspicions: vec![],
                    leave: Some(leave),
                    reset: false,
                    entries: vec![],
                    wm: 0,
                },
            ],
        },
    ]
}

#[test]
fn hand_built_bodies_round_trip() {
    let header = header();
    for body in hand_built() {
        let bytes = wire::encode(CLUSTER, &body);
        assert!(bytes.starts_with(&header), "{body:?}");
        assert!(bytes[header.len()] < BODY_VARIANTS, "{body:?}");
        assert_eq!(wire::encoded_len(CLUSTER, &body), bytes.len(), "{body:?}");
        assert_eq!(decode(&bytes), Ok(body));
    }
}

#[test]
fn envelope_refusals() {
    let body = hand_built().swap_remove(1);
    let bytes = wire::encode(CLUSTER, &body);
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    // Exactly the cap is accepted, one byte over it is not.
    assert_eq!(wire::decode(&bytes, CLUSTER, bytes.len()), Ok(body.clone()));
    assert_eq!(
        wire::decode(&bytes, CLUSTER, bytes.len() - 1),
        Err(DecodeError::TooLarge(bytes.len(), bytes.len() - 1))
    );
    let mut other_version = bytes.clone();
    other_version[0] = WIRE_VERSION + 1;
    assert_eq!(
        decode(&other_version),
        Err(DecodeError::Version(WIRE_VERSION + 1))
    );
    assert_eq!(
        decode(&wire::encode(CLUSTER + 1, &body)),
        Err(DecodeError::Cluster)
    );
    // Cut anywhere inside, a message is malformed (never a shorter body).
    for cut in 1..bytes.len() {
        assert!(
            matches!(decode(&bytes[..cut]), Err(DecodeError::Malformed(_))),
            "cut at {cut}"
        );
    }
    // A body tag past the last variant.
    let mut unknown = header();
    unknown.push(BODY_VARIANTS);
    assert!(matches!(decode(&unknown), Err(DecodeError::Malformed(_))));
}

/// A node name as the network may carry one (valid, interned on decode).
fn arb_name() -> impl Strategy<Value = Name> {
    "[a-z][a-z0-9-]{0,15}".prop_map(|s| name(&s))
}

fn arb_sig() -> impl Strategy<Value = Sig> {
    prop::collection::vec(any::<u8>(), SIG_LEN).prop_map(|v| Sig(v.try_into().unwrap()))
}

fn arb_identity() -> impl Strategy<Value = Arc<Identity>> {
    prop::collection::vec(any::<u8>(), 0..64).prop_map(|v| Arc::new(Identity(v)))
}

/// Only address and port travel (serde drops an IPv6 flow label and scope).
fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    any::<(IpAddr, u16)>().prop_map(SocketAddr::from)
}

fn arb_announce() -> impl Strategy<Value = Arc<Announce>> {
    (
        arb_name(),
        any::<(u64, u64, u64, u64)>(),
        arb_addr(),
        prop::option::of(arb_identity()),
        arb_sig(),
    )
        .prop_map(|(node, (gen, life, inc, floor), addr, identity, sig)| {
            Arc::new(Announce {
                node,
                gen,
                life,
                inc,
                addr,
                floor,
                identity,
                sig,
            })
        })
}

fn arb_entry() -> impl Strategy<Value = Arc<SignedEntry>> {
    (
        arb_name(),
        any::<(u64, u64)>(),
        ".{0,24}",
        prop::option::of(".{0,48}"),
        arb_sig(),
    )
        .prop_map(|(origin, (gen, version), key, value, sig)| {
            Arc::new(SignedEntry {
                origin,
                gen,
                version,
                key,
                value: value.map(Arc::from),
                sig,
            })
        })
}

fn arb_suspicion() -> impl Strategy<Value = Arc<Suspicion>> {
    (arb_name(), arb_name(), any::<(u64, u64)>(), arb_sig()).prop_map(
        |(observer, node, (gen, inc), sig)| {
            Arc::new(Suspicion {
                observer,
                node,
                gen,
                inc,
                sig,
            })
        },
    )
}

fn arb_leave() -> impl Strategy<Value = Arc<Leave>> {
    (arb_name(), any::<u64>(), arb_sig())
        .prop_map(|(node, gen, sig)| Arc::new(Leave { node, gen, sig }))
}

fn arb_probe() -> impl Strategy<Value = Probe> {
    (
        any::<(u64, u64, u64)>(),
        any::<Option<(u64, u64)>>(),
        prop::option::of(arb_announce()),
    )
        .prop_map(|((gen, inc, digest), you_down, announce)| Probe {
            gen,
            inc,
            digest,
            you_down,
            announce,
        })
}

fn arb_rumor() -> impl Strategy<Value = Rumor> {
    prop_oneof![
        arb_announce().prop_map(Rumor::Alive),
        arb_suspicion().prop_map(Rumor::Suspect),
        arb_entry().prop_map(Rumor::Entry),
        arb_leave().prop_map(Rumor::Leave),
    ]
}

fn arb_origin_data() -> impl Strategy<Value = OriginData> {
    (
        arb_announce(),
        prop::option::of(arb_identity()),
        prop::collection::vec(arb_suspicion(), 0..3),
        prop::option::of(arb_leave()),
        any::<(bool, u64)>(),
        prop::collection::vec(arb_entry(), 0..4),
    )
        .prop_map(
            |(announce, identity, suspicions, leave, (reset, wm), entries)| OriginData {
                announce,
                identity,
                suspicions,
                leave,
                reset,
                entries,
                wm,
            },
        )
}

fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        arb_probe().prop_map(Body::Heartbeat),
        arb_probe().prop_map(Body::Ping),
        arb_probe().prop_map(Body::Ack),
        arb_origin_data().prop_map(Body::Join),
        prop::collection::vec(arb_rumor(), 0..6).prop_map(Body::Rumors),
        prop::collection::vec(any::<u64>(), 0..65).prop_map(|buckets| Body::SyncStart { buckets }),
        (
            any::<u64>(),
            prop::collection::vec(
                (arb_name(), any::<(u64, u64, u64, u8)>()).prop_map(
                    |(node, (gen, inc, wm, status))| Summary {
                        node,
                        gen,
                        inc,
                        wm,
                        status,
                    }
                ),
                0..4
            )
        )
            .prop_map(|(mask, summaries)| Body::SyncSummaries { mask, summaries }),
        prop::collection::vec(
            (arb_name(), any::<(u64, u64, bool)>()).prop_map(|(node, (gen, wm, identity))| Want {
                node,
                gen,
                wm,
                identity,
            }),
            0..4
        )
        .prop_map(Body::SyncWant),
        (
            any::<bool>(),
            prop::collection::vec(arb_origin_data(), 0..3)
        )
            .prop_map(|(spread, origins)| Body::SyncData { spread, origins }),
    ]
}

/// Mostly small bytes: option and enum tags, bools and short lengths are
/// then often valid, so decoding gets deep into a body (uniform bytes fail
/// at the first of them) and sometimes succeeds.
fn body_bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), len).prop_map(|v| {
        v.into_iter()
            .map(|b| if b & 3 == 0 { b } else { b >> 6 })
            .collect()
    })
}

/// The hand-built bodies, encoded once.
fn valid_messages() -> &'static [Vec<u8>] {
    static MESSAGES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        hand_built()
            .iter()
            .map(|b| wire::encode(CLUSTER, b))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(body) = decode(&bytes) {
            // Only a valid header can decode, and what did is a message.
            prop_assert!(bytes.starts_with(&header()));
            prop_assert_eq!(decode(&wire::encode(CLUSTER, &body)), Ok(body));
        }
    }

    // A valid version byte, cluster tag and body tag get past the envelope
    // into the decoders of every kind of message.
    #[test]
    fn random_bodies_behind_a_valid_header_never_panic(
        tag in 0..BODY_VARIANTS,
        rest in body_bytes(0..4096),
    ) {
        let mut bytes = header();
        bytes.push(tag);
        bytes.extend_from_slice(&rest);
        if let Ok(body) = decode(&bytes) {
            // Whatever decoded must encode again and decode to itself.
            prop_assert_eq!(decode(&wire::encode(CLUSTER, &body)), Ok(body));
        }
    }

    #[test]
    fn flipped_and_truncated_valid_messages_never_panic(
        which in any::<prop::sample::Index>(),
        flip_at in any::<prop::sample::Index>(),
        flip in 1..=u8::MAX,
        cut in any::<prop::sample::Index>(),
    ) {
        let seed = which.get(valid_messages());
        let mut bytes = seed.clone();
        bytes[flip_at.index(seed.len())] ^= flip;
        if let Ok(body) = decode(&bytes) {
            prop_assert_eq!(decode(&wire::encode(CLUSTER, &body)), Ok(body));
        }
        let _ = decode(&bytes[..cut.index(bytes.len() + 1)]);
        prop_assert!(decode(&seed[..cut.index(seed.len())]).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn generated_bodies_round_trip(body in arb_body()) {
        let bytes = wire::encode(CLUSTER, &body);
        prop_assert_eq!(wire::encoded_len(CLUSTER, &body), bytes.len());
        prop_assert_eq!(decode(&bytes), Ok(body));
    }
}
