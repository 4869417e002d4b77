//! `skein_agent::l4lb::parse_listing` (`nft -j list table ip skein`) and
//! `table_of`. Never panics; a table read back from a listing lists as
//! exactly that listing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_agent::l4lb::{expected_listing, parse_listing, table_of};

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(listing) = parse_listing(json) else {
        return;
    };
    if let Some(table) = table_of(&listing) {
        assert_eq!(expected_listing(&table), listing);
    }
});
