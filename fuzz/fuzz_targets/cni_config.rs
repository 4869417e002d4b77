//! The CNI plugin's input: the network configuration on stdin
//! (`parse_netconf`, `reply_version`) and a whole ADD request
//! (`parse_request` with a fixed environment). Never panics; a parsed
//! configuration keeps its own invariants (gateway in the subnet).
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_cni::config::{parse_netconf, reply_version};
use skein_cni::{parse_request, CniVersion, Request};

fuzz_target!(|data: &[u8]| {
    let _ = CniVersion::parse(reply_version(data)).expect("a version we speak");
    if let Ok(conf) = parse_netconf(data) {
        assert!(conf.subnet.contains(&conf.gateway));
        assert!(!conf.name.contains('/'));
    }
    let env = |k: &str| {
        Some(
            match k {
                "CNI_COMMAND" => "ADD",
                "CNI_CONTAINERID" => "c0ffee",
                "CNI_IFNAME" => "eth0",
                "CNI_NETNS" => "/var/run/netns/fuzz",
                _ => return None,
            }
            .to_string(),
        )
    };
    if let Ok(Request::Run(inv)) = parse_request(&env, data) {
        assert_eq!(inv.ifname, "eth0");
    }
});
