//! The replicated data model of a skein cluster.
//!
//! Pure and deterministic: no sockets, clocks or files. The gossip layer
//! feeds it observed writes; the API and the realizers read typed views.

pub mod labels;
pub mod replica;
pub mod task;
pub mod view;

pub use labels::Labels;
pub use replica::{Entry, NodeId, NodeKeyspace, Replica, Update};
pub use task::{
    parse_task_body, validate_task_id, HealthCheck, HealthProtocol, PortMapping, Protocol,
    TaskError, TaskSpec,
};
pub use view::{
    health_key, nodes, task_key, tasks, BadEntry, Liveness, NodeMeta, NodeStatus, NodeView,
    TaskCache, TaskView, HEALTH_PREFIX, META_KEY, TASK_PREFIX, UNHEALTHY,
};
