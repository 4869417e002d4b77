//! The typed API documents (`skein_agent::docs`) the CLI reads: the first
//! byte picks a document, the rest is its JSON. Never panics; whatever reads
//! as a document serializes and reads back as the same document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use skein_agent::docs;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let json = serde_json::to_vec(&doc).expect("a document serializes");
    let again: T = serde_json::from_slice(&json).expect("a serialized document reads back");
    assert_eq!(again, doc);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 18 {
        0 => round_trip::<docs::Version>(json),
        1 => round_trip::<docs::Nodes>(json),
        2 => round_trip::<docs::Tasks>(json),
        3 => round_trip::<docs::TaskView>(json),
        4 => round_trip::<docs::PutTaskReply>(json),
        5 => round_trip::<docs::State>(json),
        6 => round_trip::<docs::Vips>(json),
        7 => round_trip::<docs::VipProblems>(json),
        8 => round_trip::<docs::OverlayMasterState>(json),
        9 => round_trip::<docs::OverlayAgent>(json),
        10 => round_trip::<docs::DeleteAgentsRequest>(json),
        11 => round_trip::<docs::DeleteAgentsReply>(json),
        12 => round_trip::<docs::Records>(json),
        13 => round_trip::<docs::Enumerate>(json),
        14 => round_trip::<docs::DnsConfig>(json),
        15 => round_trip::<docs::Hosts>(json),
        16 => round_trip::<docs::Services>(json),
        _ => round_trip::<docs::ErrorBody>(json),
    }
});
