//! The overlay network (Navstar's job, without the Mesos master that handed
//! out subnets). This crate starts with the pure part: leases of agent
//! subnets and VTEP addresses that every node agrees on.

pub mod lease;

pub use lease::{vtep_mac, Claim, LeaseError, Pool};
