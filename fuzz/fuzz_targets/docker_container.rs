//! What the Docker engine sends the provider: a container's description
//! (`GET /containers/{id}/json`) turned into a task, and event lines.
//! Never panics; a container that maps gives a valid task with the
//! container's stable id, whether or not unlabelled containers are taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_docker::client::Event;
use skein_docker::mapping::Container;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        let _ = serde_json::from_slice::<Event>(line);
    }
    let Ok(c) = serde_json::from_slice::<Container>(data) else {
        return;
    };
    let host = std::net::IpAddr::from([192, 0, 2, 7]);
    for all in [false, true] {
        if let Ok(Some(m)) = skein_docker::map(&c, host, all, "dcos") {
            assert!(m.spec.validate().is_ok(), "an invalid task: {:?}", m.spec);
            assert_eq!(m.id, skein_docker::task_id(&c.id));
        }
    }
});
