//! What an edge reads and what an agent reads for it: the first byte picks
//! a whole route document (`{"version","routes"}`), a bare route set (a
//! `--routes-file`), a delta (`{"version","base",...}`, also applied to a
//! fixed route set, as `skein edge` applies the agent's), or an app's labels
//! (read port by port as the agent does). Never panics; whatever reads
//! serializes and reads back the same; a delta applied gives routes with
//! every backend it sends, or an error.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use skein_edge::{labels, EdgeDelta, EdgeDoc, Routes};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let doc = serde_json::from_slice::<T>(data).ok()?;
    let json = serde_json::to_vec(&doc).expect("a document serializes");
    let again: T = serde_json::from_slice(&json).expect("a serialized document reads back");
    assert_eq!(again, doc);
    Some(doc)
}

/// A route set a delta may apply to: two backends, one HTTP route.
fn base() -> Routes {
    let json = br#"{"backends":[
        {"name":"web_10000","app":"/web","port_index":0,"service_port":10000,"bind_port":10000,
         "labels":{"groups":["external"],"label_port":null,"bind_addr":null,"mode":"http","vhosts":["web.example.com"],
                   "path":null,"proxypass_path":null,"balance":"roundrobin","sticky":false,"redirect_to_https":false,
                   "ssl_certs":[],"backend_weight":0,"auth":null},
         "servers":[{"addr":"10.0.0.1:80","node":"n1","state":"up"}]},
        {"name":"db_10001","app":"/db","port_index":0,"service_port":10001,"bind_port":10001,
         "labels":{"groups":["external"],"label_port":null,"bind_addr":null,"mode":"tcp","vhosts":[],
                   "path":null,"proxypass_path":null,"balance":"leastconn","sticky":false,"redirect_to_https":false,
                   "ssl_certs":[],"backend_weight":0,"auth":null},
         "servers":[]}],
        "http_routes":[{"host":"web.example.com","backend":"web_10000"}],"problems":[]}"#;
    serde_json::from_slice(json).expect("the base route set reads")
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            round_trip::<EdgeDoc>(json);
        }
        1 => {
            round_trip::<Routes>(json);
        }
        2 => {
            if let Some(delta) = round_trip::<EdgeDelta>(json) {
                let upserted: Vec<Arc<str>> =
                    delta.upsert.iter().map(|b| Arc::from(&*b.name)).collect();
                if let Ok(routes) = delta.apply(&base()) {
                    // Every backend the delta sends is in what it makes.
                    for name in &upserted {
                        assert!(routes.backends.iter().any(|b| b.name == *name));
                    }
                }
            }
        }
        _ => {
            let Ok(app) = serde_json::from_slice::<skein_state::Labels>(json) else {
                return;
            };
            for port in 0..4 {
                let _ = labels::parse_port(&app, port);
            }
            let _ = labels::app_problems(&app, 2);
        }
    }
});
