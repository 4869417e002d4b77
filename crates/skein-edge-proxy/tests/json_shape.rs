//! The route documents survive JSON (the agent sends them that way):
//! a backend's effective `bind_port` and its labels' `HAPROXY_{n}_PORT`
//! used to share one key, which serde refuses to read.

mod common;

use common::*;
use skein_edge::{Mode, ServerState};
use skein_edge_proxy::EdgeDoc;

#[tokio::test]
async fn backends_with_bind_ports_roundtrip_through_json() {
    let a = http_server("a").await;
    let mut l = labels(Mode::Http);
    l.bind_port = Some(10500);
    let mut b = backend("x_10500", l, Some(10500), vec![server(&a, ServerState::Up)]);
    b.service_port = Some(10001);
    let doc = EdgeDoc {
        version: 1,
        routes: routes(vec![b], vec![]),
    };
    let text = serde_json::to_string(&doc).unwrap();
    assert_eq!(text.matches("\"bind_port\"").count(), 1, "{text}");
    let back: EdgeDoc = serde_json::from_str(&text).unwrap();
    assert_eq!(back, doc);
}
