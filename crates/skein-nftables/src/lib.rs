//! A small nf_tables client over a `NETLINK_NETFILTER` socket: it applies
//! a list of element operations (add / delete element) on the sets and maps
//! of an existing table as ONE atomic netlink batch, the way `nft -f` does,
//! without starting a process. skein's VIP table is flat (a change is only
//! set and map elements, see `skein_l4lb::nft`), so this is all the agent
//! needs on its hot path; anything structural (tables, chains, rules, new
//! sets) still goes through `nft -f`.
//!
//! - [`ElementOp`] / [`Component`]: what to do, typed (pure).
//! - [`wire`]: the netlink encoding of a batch and the decoding of the
//!   kernel's answers (pure, unit-tested byte for byte against what `nft`
//!   1.0.6 sends; the reply parser never panics on arbitrary bytes).
//! - [`Nftables`] (Linux): the socket, thin: send the batch, read every
//!   answer, judge it with [`wire::judge`].
//!
//! A batch is `NFNL_MSG_BATCH_BEGIN`, one `NFT_MSG_NEWSETELEM` or
//! `NFT_MSG_DELSETELEM` message per run of consecutive operations on the
//! same set (split so no attribute exceeds netlink's 64 KiB), each with
//! `NLM_F_ACK`, then `NFNL_MSG_BATCH_END`. The kernel processes the whole
//! batch, reports every failing message (the extended ack names the failing
//! element, which [`Error::Refused`] turns back into the operation), and
//! commits only if none failed.

use std::fmt;
use std::net::Ipv4Addr;

pub mod wire;

#[cfg(target_os = "linux")]
mod socket;
#[cfg(target_os = "linux")]
pub use socket::Nftables;

/// One component of an element's key or data, as nft types it. In a
/// concatenation (more than one component) each takes a 4-byte register,
/// zero-padded after its value; alone it takes only its own length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `ipv4_addr`: 4 bytes, network order.
    Ipv4(Ipv4Addr),
    /// `inet_service` (a port): 2 bytes, big-endian.
    Port(u16),
    /// `inet_proto` (an IP protocol number): 1 byte.
    Proto(u8),
    /// A 32-bit integer in host byte order, e.g. the `numgen random mod 1`
    /// component of a `typeof` key (numgen writes a host-order u32).
    U32(u32),
}

impl Component {
    /// The value's bytes, unpadded.
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            Component::Ipv4(a) => a.octets().to_vec(),
            Component::Port(p) => p.to_be_bytes().to_vec(),
            Component::Proto(p) => vec![p],
            Component::U32(v) => v.to_ne_bytes().to_vec(),
        }
    }
}

impl fmt::Display for Component {
    /// As `nft` writes it (`11.0.0.1`, `80`, `tcp`, `3`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Component::Ipv4(a) => write!(f, "{a}"),
            Component::Port(p) => write!(f, "{p}"),
            Component::Proto(6) => f.write_str("tcp"),
            Component::Proto(17) => f.write_str("udp"),
            Component::Proto(p) => write!(f, "{p}"),
            Component::U32(v) => write!(f, "{v}"),
        }
    }
}

/// Add or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// `add element`: `NLM_F_CREATE` without `NLM_F_EXCL`, as nft sends
    /// it (an identical element already there is not an error).
    Add,
    /// `delete element`: the element must exist (else `ENOENT`).
    Delete,
    /// `flush set`: every element of the set goes (key and data empty).
    Flush,
}

/// One element operation on a set or map of the table the batch targets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ElementOp {
    pub kind: OpKind,
    /// The set's or map's name.
    pub set: String,
    pub key: Vec<Component>,
    /// A map element's data (`backend . port`); `None` for a set. Not sent
    /// for a deletion (the key names the element).
    pub data: Option<Vec<Component>>,
}

impl ElementOp {
    pub fn add(set: &str, key: Vec<Component>, data: Option<Vec<Component>>) -> ElementOp {
        ElementOp {
            kind: OpKind::Add,
            set: set.to_string(),
            key,
            data,
        }
    }

    pub fn delete(set: &str, key: Vec<Component>) -> ElementOp {
        ElementOp {
            kind: OpKind::Delete,
            set: set.to_string(),
            key,
            data: None,
        }
    }

    /// Removes every element of `set` (in the same batch, elements added
    /// after it stay).
    pub fn flush(set: &str) -> ElementOp {
        ElementOp {
            kind: OpKind::Flush,
            set: set.to_string(),
            key: Vec::new(),
            data: None,
        }
    }

    /// The element as nft writes it: `11.0.0.1 . 80 . 0 : 10.0.0.2 . 8080`
    /// (empty for a flush).
    pub fn element(&self) -> String {
        let mut out = join(&self.key);
        if let (OpKind::Add, Some(data)) = (self.kind, &self.data) {
            out.push_str(" : ");
            out.push_str(&join(data));
        }
        out
    }
}

fn join(components: &[Component]) -> String {
    components
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" . ")
}

impl fmt::Display for ElementOp {
    /// As the `nft` command that does the same (without the table).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.kind {
            OpKind::Add => "add",
            OpKind::Delete => "delete",
            OpKind::Flush => return write!(f, "flush set {}", self.set),
        };
        write!(f, "{verb} element {} {{ {} }}", self.set, self.element())
    }
}

/// Errors of the nf_tables client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket failed (open, send, receive).
    #[error("nftables netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// A request this client refuses to encode (empty key, a name or an
    /// element too long for netlink, a batch too large).
    #[error("invalid nftables request: {0}")]
    Invalid(String),
    /// The kernel refused an operation of the batch; nothing of the batch
    /// was applied. `op` is the operation the kernel named (through the
    /// extended ack) or, when it named none, the message's first one.
    #[error(
        "nftables refused `{op}` in table ip {table}{}: {source}{}{}",
        if *exact { "" } else { " (the kernel named its message, not an element)" },
        message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default(),
        if *others > 0 { format!("; {others} more refusals") } else { String::new() }
    )]
    Refused {
        table: String,
        /// The failing operation, as nft would write it.
        op: String,
        /// Its index in the list given to `apply`.
        index: usize,
        /// Whether the kernel named that element (else: only its message).
        exact: bool,
        /// The kernel's extended-ack text, if any.
        message: Option<String>,
        /// Other refusals in the same batch.
        others: usize,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the batch as a whole (e.g. the commit failed, or
    /// the batch was malformed); nothing was applied.
    #[error("nftables batch on table ip {table} failed: {source}")]
    Batch {
        table: String,
        #[source]
        source: std::io::Error,
    },
    /// Not every message of the batch was acknowledged and no error came:
    /// whether the batch was applied is unknown (re-read or rewrite the
    /// table).
    #[error("nftables batch on table ip {table}: {acked} of {expected} messages acknowledged")]
    Incomplete {
        table: String,
        acked: usize,
        expected: usize,
    },
    /// The kernel's answer could not be decoded.
    #[error("nftables: undecodable netlink answer: {0}")]
    Decode(String),
}

impl Error {
    /// The errno of a kernel refusal (`ENOENT`, `EEXIST`, ...).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Refused { source, .. } | Error::Batch { source, .. } => source.raw_os_error(),
            Error::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
