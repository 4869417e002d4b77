//! The CNI plugin's input: the network configuration on stdin
//! (`parse_netconf`, `reply_version`) and a whole ADD request
//! (`parse_request` with a fixed environment), and a static configuration
//! completed from an agent's network file (`fill_from_state`, the file's
//! bytes being the same input). Never panics; a parsed configuration keeps
//! its own invariants (gateway in the subnet).
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_cni::config::{fill_from_state, parse_netconf, reply_version};
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
    let state = |_: &std::path::Path| Ok(data.to_vec());
    let stat = br#"{"cniVersion":"1.0.0","name":"dcos","type":"skein-cni"}"#;
    for conf in [&data[..], &stat[..]] {
        if let Ok(filled) = fill_from_state(conf, &state) {
            if let Ok(c) = parse_netconf(&filled) {
                assert!(c.subnet.contains(&c.gateway));
            }
        }
    }
});
