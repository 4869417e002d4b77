//! The CNI error result. Every failure the plugin reports ends up here: the
//! runtime reads `code` to decide (11 means "try again"), and an operator
//! reads `msg`, so each message names the thing that was wrong.

use serde::Serialize;

/// Error codes. 1-99 are the spec's (CNI 1.0, "Error"), 100 and up are ours.
pub mod code {
    /// The config's `cniVersion` is not one we speak.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// CHECK for a container we hold no allocation for.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A CNI_* environment variable is missing or malformed.
    pub const INVALID_ENV: u32 = 4;
    /// Reading or writing the allocation store failed.
    pub const IO: u32 = 5;
    /// stdin is not JSON.
    pub const DECODE: u32 = 6;
    /// JSON, but not a valid skein-cni network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Transient: the store's lock stayed busy.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// A netlink request failed.
    pub const NETLINK: u32 = 100;
    /// Every address of the subnet is allocated.
    pub const SUBNET_EXHAUSTED: u32 = 101;
    /// The configured bridge is not there (the agent has not created it).
    pub const NO_BRIDGE: u32 = 102;
    /// CHECK found the interfaces not as ADD left them.
    pub const CHECK_FAILED: u32 = 103;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (code {code}){}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn io(what: impl std::fmt::Display, err: std::io::Error) -> CniError {
        CniError::new(code::IO, format!("{what}: {err}"))
    }

    /// The error result the spec asks for on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        let out = Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing strings and integers cannot fail.
        serde_json::to_string(&out).unwrap_or_else(|_| String::from("{}"))
    }
}
