//! The overlay network (Navstar's job, without the Mesos master that handed
//! out subnets). This crate starts with the pure part: leases of agent
//! subnets and VTEP addresses that every node agrees on, and what the kernel
//! should hold for them (`realize`); the agent does the netlink IO.

pub mod lease;
pub mod realize;

pub use lease::{vtep_mac, Claim, LeaseError, Pool};
