//! Distributed L4 load balancing (Minuteman / dcos-l4lb's job).
//!
//! This crate starts with the pure VIP model: which VIPs the cluster's
//! tasks declare and their backends. Address allocation for named VIPs and
//! the nftables / IPVS dataplanes build on it.

pub mod alloc;
pub mod nft;
pub mod vip;

pub use vip::{
    clean_name, in_use, parse_label, vips_of, Backend, VipError, VipKey, VipProblem, VipTarget,
};
