//! Node-local DNS (Spartan / dcos-dns and Mesos-DNS's job). Starts with the
//! pure part: the records every node derives from its replica. The server
//! (hickory), the forwarder and the cache build on it.

pub mod answer;
pub mod cache;
pub mod records;
pub mod server;
pub mod upstream;
pub mod wire;

pub use records::{
    app_label, build, label, RData, RecordSet, Records, RecordsBuilder, VipName, TTL,
};
