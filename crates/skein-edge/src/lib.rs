//! The edge's model, pure: what an edge load balancer serves, computed
//! from the cluster's tasks and their Marathon-LB labels.
//!
//! Marathon-LB rendered an HAProxy configuration from every app's labels
//! and reloaded HAProxy; one bad label made the whole configuration fail,
//! and two apps claiming one virtual host were resolved silently by map
//! order. Here the labels of each app port are read on their own
//! ([`labels::parse_port`]): a bad label disables only its own port and is
//! reported, and [`routes::compute`] resolves every conflict (a bind port,
//! a virtual host and path) by age, the oldest claim winning, and reports
//! the loser. Every agent computes the same [`routes::Routes`] from the same
//! tasks; `skein edge` serves them.

pub mod delta;
pub mod labels;
pub mod routes;

pub use delta::EdgeDelta;
pub use labels::{Balance, Mode, PortLabels};
pub use routes::{
    compute, compute_cached, Backend, EdgeDoc, HttpRoute, Input, LabelCache, Problem, RouteCache,
    Routes, Server, ServerState,
};
