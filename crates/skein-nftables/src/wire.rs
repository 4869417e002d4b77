//! The netlink bytes, pure: encoding a batch of element operations and
//! decoding (and judging) the kernel's answers. No socket here, so every
//! layout is unit-tested, and the reply parser is property-tested never to
//! panic on arbitrary bytes.
//!
//! Layouts (from the kernel's `linux/netfilter/nf_tables.h` and
//! `nfnetlink.h`, checked against what `nft` 1.0.6 sends; see the tests):
//!
//! ```text
//! nlmsghdr { len u32, type u16, flags u16, seq u32, pid u32 }   host order
//! nfgenmsg { family u8, version u8 (0), res_id be16 }
//! BATCH_BEGIN/END: type 0x10/0x11, family AF_UNSPEC, res_id = NFNL_SUBSYS_NFTABLES
//! NEWSETELEM / DELSETELEM: type 10 << 8 | 12 / 14, family NFPROTO_IPV4
//!   NFTA_SET_ELEM_LIST_TABLE  string (NUL-terminated)
//!   NFTA_SET_ELEM_LIST_SET    string
//!   NFTA_SET_ELEM_LIST_ELEMENTS (nested)
//!     NFTA_LIST_ELEM (nested), one per element
//!       NFTA_SET_ELEM_KEY (nested) { NFTA_DATA_VALUE bytes }
//!       NFTA_SET_ELEM_DATA (nested) { NFTA_DATA_VALUE bytes }   maps, add only
//! DELSETELEM without NFTA_SET_ELEM_LIST_ELEMENTS: flush the set
//! ```

use std::ops::Range;

use crate::{Component, ElementOp, Error, OpKind, Result};

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
/// In an `NLMSG_ERROR`: only the original header is echoed.
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an `NLMSG_ERROR`: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

pub const AF_UNSPEC: u8 = 0;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFNETLINK_V0: u8 = 0;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;

pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_DELSETELEM: u16 = 14;

pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_SET_ELEM_DATA: u16 = 2;
pub const NFTA_DATA_VALUE: u16 = 1;

/// `NFT_NAME_MAXLEN`, with the terminating NUL.
pub const NAME_MAX: usize = 256;
/// `NFT_DATA_VALUE_MAXLEN`: a key or data value is at most 64 bytes.
pub const VALUE_MAX: usize = 64;
/// An attribute's length is a u16: the elements of one message stay below
/// this, and a batch with more is split into several messages.
const ELEMENTS_MAX: usize = 60_000;

/// A whole batch, ready to send, and what is needed to read its answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub begin_seq: u32,
    pub end_seq: u32,
    pub messages: Vec<Message>,
}

/// One element message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub seq: u32,
    /// The operations it carries (indices into the list given).
    pub ops: Range<usize>,
    /// Each operation's `NFTA_LIST_ELEM` offset from the message's start
    /// (what an extended ack's `NLMSGERR_ATTR_OFFS` points at).
    pub element_offsets: Vec<u32>,
}

impl Batch {
    /// The message with sequence number `seq`.
    pub fn message(&self, seq: u32) -> Option<&Message> {
        self.messages.iter().find(|m| m.seq == seq)
    }
}

/// A component's bytes in a key or data of `n` components: padded to a
/// 4-byte register when concatenated, natural length alone.
fn value(components: &[Component]) -> Vec<u8> {
    let mut out = Vec::with_capacity(components.len() * 4);
    for c in components {
        out.extend(c.bytes());
        if components.len() > 1 {
            out.resize(align4(out.len()), 0);
        }
    }
    out
}

/// The key's (or data's) value bytes as the kernel stores them.
pub fn value_bytes(components: &[Component]) -> Vec<u8> {
    value(components)
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

/// Writes an attribute header and returns where it starts (for `end_attr`).
fn start_attr(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    put_u16(buf, 0);
    put_u16(buf, kind);
    at
}

/// Sets the attribute's length (unpadded, as netlink wants) and pads.
fn end_attr(buf: &mut Vec<u8>, at: usize) -> Result<()> {
    let len = u16::try_from(buf.len() - at)
        .map_err(|_| Error::Invalid(format!("attribute of {} bytes", buf.len() - at)))?;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    buf.resize(align4(buf.len()), 0);
    Ok(())
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) -> Result<()> {
    let at = start_attr(buf, kind);
    buf.extend_from_slice(payload);
    end_attr(buf, at)
}

fn put_name(buf: &mut Vec<u8>, kind: u16, name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= NAME_MAX || name.contains('\0') {
        return Err(Error::Invalid(format!("name {name:?}")));
    }
    let mut payload = name.as_bytes().to_vec();
    payload.push(0);
    put_attr(buf, kind, &payload)
}

fn start_message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
    put_u32(buf, 0);
    put_u16(buf, kind);
    put_u16(buf, flags);
    put_u32(buf, seq);
    put_u32(buf, 0);
    buf.push(family);
    buf.push(NFNETLINK_V0);
    buf.extend_from_slice(&res_id.to_be_bytes());
}

fn end_message(buf: &mut [u8], at: usize) -> Result<()> {
    let len = u32::try_from(buf.len() - at)
        .map_err(|_| Error::Invalid("netlink message above 4 GiB".into()))?;
    buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    Ok(())
}

/// A `BATCH_BEGIN` or `BATCH_END` message.
fn batch_mark(buf: &mut Vec<u8>, kind: u16, seq: u32) -> Result<()> {
    let at = buf.len();
    start_message(
        buf,
        kind,
        NLM_F_REQUEST,
        seq,
        AF_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    end_message(buf, at)
}

/// One element (`NFTA_LIST_ELEM` with its key and, to add a map element,
/// its data) as bytes.
fn element(op: &ElementOp) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(48);
    let key = value(&op.key);
    if key.is_empty() || key.len() > VALUE_MAX {
        return Err(Error::Invalid(format!(
            "key of {} bytes in `{op}`",
            key.len()
        )));
    }
    let elem = start_attr(&mut buf, NFTA_LIST_ELEM | NLA_F_NESTED);
    let k = start_attr(&mut buf, NFTA_SET_ELEM_KEY | NLA_F_NESTED);
    put_attr(&mut buf, NFTA_DATA_VALUE, &key)?;
    end_attr(&mut buf, k)?;
    if let (OpKind::Add, Some(data)) = (op.kind, &op.data) {
        let data = value(data);
        if data.is_empty() || data.len() > VALUE_MAX {
            return Err(Error::Invalid(format!(
                "data of {} bytes in `{op}`",
                data.len()
            )));
        }
        let d = start_attr(&mut buf, NFTA_SET_ELEM_DATA | NLA_F_NESTED);
        put_attr(&mut buf, NFTA_DATA_VALUE, &data)?;
        end_attr(&mut buf, d)?;
    }
    end_attr(&mut buf, elem)?;
    Ok(buf)
}

/// Encodes `ops` on table `ip <table>` as one batch: `BATCH_BEGIN` with
/// sequence number `first_seq`, one message per run of consecutive
/// operations of the same kind on the same set (split below 64 KiB; a
/// flush is a message of its own), each with `NLM_F_ACK`, then `BATCH_END`. Order is kept: a delete and an add of
/// the same key apply in the order given.
pub fn encode_batch(table: &str, ops: &[ElementOp], first_seq: u32) -> Result<Batch> {
    let mut buf = Vec::with_capacity(64 + ops.len() * 64);
    let begin_seq = first_seq;
    let mut seq = first_seq;
    batch_mark(&mut buf, NFNL_MSG_BATCH_BEGIN, seq)?;
    let mut messages = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        let first = &ops[i];
        seq = seq.wrapping_add(1);
        let (kind, flags) = match first.kind {
            OpKind::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
            OpKind::Delete | OpKind::Flush => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let at = buf.len();
        start_message(
            &mut buf,
            NFNL_SUBSYS_NFTABLES << 8 | kind,
            flags,
            seq,
            NFPROTO_IPV4,
            0,
        );
        put_name(&mut buf, NFTA_SET_ELEM_LIST_TABLE, table)?;
        put_name(&mut buf, NFTA_SET_ELEM_LIST_SET, &first.set)?;
        if first.kind == OpKind::Flush {
            // A delete without elements flushes the set.
            end_message(&mut buf, at)?;
            messages.push(Message {
                seq,
                ops: i..i + 1,
                element_offsets: Vec::new(),
            });
            i += 1;
            continue;
        }
        let elements = start_attr(&mut buf, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
        let start = i;
        let mut offsets = Vec::new();
        while let Some(op) = ops.get(i) {
            if op.kind != first.kind || op.set != first.set {
                break;
            }
            let bytes = element(op)?;
            if i > start && buf.len() - elements + bytes.len() > ELEMENTS_MAX {
                break;
            }
            offsets.push((buf.len() - at) as u32);
            buf.extend_from_slice(&bytes);
            i += 1;
        }
        end_attr(&mut buf, elements)?;
        end_message(&mut buf, at)?;
        messages.push(Message {
            seq,
            ops: start..i,
            element_offsets: offsets,
        });
    }
    seq = seq.wrapping_add(1);
    batch_mark(&mut buf, NFNL_MSG_BATCH_END, seq)?;
    Ok(Batch {
        bytes: buf,
        begin_seq,
        end_seq: seq,
        messages,
    })
}

pub const NFPROTO_INET: u8 = 1;
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
pub const NFTA_CT_DREG: u16 = 1;
pub const NFTA_CT_KEY: u16 = 2;
pub const NFT_CT_STATE: u32 = 0;
pub const NFT_REG_1: u32 = 1;

/// `table inet <table> { chain track { ct state } }`, made afresh (add,
/// delete, add: one atomic batch whether or not it was there) and
/// acknowledged message by message. The chain hooks nothing, so the rule
/// never runs: its `ct` expression exists so that the kernel tracks
/// connections in this namespace at all (it does so only while something
/// needs it: NAT, a `ct` match), which IPVS's connections need to show in
/// conntrack's events. As `nft` sends `ct state` (checked by hand with
/// `nft --debug=netlink`).
pub fn encode_track_connections(table: &str, first_seq: u32) -> Result<Batch> {
    encode_conntrack_table(table, first_seq, true)
}

/// The table of [`encode_track_connections`] gone, whether or not it was
/// there (add, delete).
pub fn encode_untrack_connections(table: &str, first_seq: u32) -> Result<Batch> {
    encode_conntrack_table(table, first_seq, false)
}

fn encode_conntrack_table(table: &str, first_seq: u32, keep: bool) -> Result<Batch> {
    let mut buf = Vec::with_capacity(512);
    let mut seq = first_seq;
    batch_mark(&mut buf, NFNL_MSG_BATCH_BEGIN, seq)?;
    let mut messages = Vec::new();
    let steps: [(u16, u16); 5] = [
        (NFT_MSG_NEWTABLE, NLM_F_CREATE),
        (NFT_MSG_DELTABLE, 0),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE),
        (NFT_MSG_NEWCHAIN, NLM_F_CREATE),
        (NFT_MSG_NEWRULE, NLM_F_CREATE | 0x800), // NLM_F_APPEND
    ];
    let steps = if keep { &steps[..] } else { &steps[..2] };
    for &(kind, flags) in steps {
        seq = seq.wrapping_add(1);
        let at = buf.len();
        start_message(
            &mut buf,
            NFNL_SUBSYS_NFTABLES << 8 | kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_INET,
            0,
        );
        match kind {
            NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => put_name(&mut buf, NFTA_TABLE_NAME, table)?,
            NFT_MSG_NEWCHAIN => {
                put_name(&mut buf, NFTA_CHAIN_TABLE, table)?;
                put_name(&mut buf, NFTA_CHAIN_NAME, "track")?;
            }
            _ => {
                put_name(&mut buf, NFTA_RULE_TABLE, table)?;
                put_name(&mut buf, NFTA_RULE_CHAIN, "track")?;
                let exprs = start_attr(&mut buf, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED);
                let elem = start_attr(&mut buf, NFTA_LIST_ELEM | NLA_F_NESTED);
                put_name(&mut buf, NFTA_EXPR_NAME, "ct")?;
                let data = start_attr(&mut buf, NFTA_EXPR_DATA | NLA_F_NESTED);
                put_attr(&mut buf, NFTA_CT_DREG, &NFT_REG_1.to_be_bytes())?;
                put_attr(&mut buf, NFTA_CT_KEY, &NFT_CT_STATE.to_be_bytes())?;
                end_attr(&mut buf, data)?;
                end_attr(&mut buf, elem)?;
                end_attr(&mut buf, exprs)?;
            }
        }
        end_message(&mut buf, at)?;
        messages.push(Message {
            seq,
            ops: 0..0,
            element_offsets: Vec::new(),
        });
    }
    seq = seq.wrapping_add(1);
    batch_mark(&mut buf, NFNL_MSG_BATCH_END, seq)?;
    Ok(Batch {
        bytes: buf,
        begin_seq: first_seq,
        end_seq: seq,
        messages,
    })
}

/// One message of the kernel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `NLMSG_ERROR` with code 0: the request `seq` is acknowledged.
    Ack { seq: u32 },
    /// `NLMSG_ERROR` with a code: the request `seq` failed with `errno`
    /// (positive), with the extended ack's text and the offset of the
    /// offending attribute from the request's start, when given.
    Error {
        seq: u32,
        errno: i32,
        message: Option<String>,
        offset: Option<u32>,
    },
    /// Anything else (`NLMSG_DONE`, `NLMSG_NOOP`, a notification...).
    Other { seq: u32, kind: u16 },
}

impl Reply {
    pub fn seq(&self) -> u32 {
        match self {
            Reply::Ack { seq } | Reply::Error { seq, .. } | Reply::Other { seq, .. } => *seq,
        }
    }
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Parses one datagram of the kernel's answers. Never panics: a truncated
/// or malformed message is an `Err` naming what is wrong.
pub fn parse_replies(buf: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        let rest = &buf[off..];
        if rest.len() < NLMSG_HDRLEN {
            return Err(format!("{} trailing bytes", rest.len()));
        }
        let len = u32_at(rest, 0).ok_or("short header")? as usize;
        let kind = u16_at(rest, 4).ok_or("short header")?;
        let flags = u16_at(rest, 6).ok_or("short header")?;
        let seq = u32_at(rest, 8).ok_or("short header")?;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(format!(
                "netlink message of length {len} with {} bytes left",
                rest.len()
            ));
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => parse_error(payload, flags, seq)?,
            NLMSG_OVERRUN => return Err("netlink overrun".into()),
            _ => Reply::Other { seq, kind },
        });
        off = off.saturating_add(align4(len));
    }
    Ok(out)
}

/// `struct nlmsgerr { int error; struct nlmsghdr msg; }`, then the
/// request's payload unless capped, then extended-ack attributes.
fn parse_error(payload: &[u8], flags: u16, seq: u32) -> Result<Reply, String> {
    let code = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or("NLMSG_ERROR without an error code")?;
    if code == 0 {
        return Ok(Reply::Ack { seq });
    }
    let mut message = None;
    let mut offset = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The echoed request: its header always, its payload unless capped.
        let orig_len = u32_at(payload, 4).unwrap_or(0) as usize;
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            orig_len.max(NLMSG_HDRLEN)
        };
        let mut at = 4usize.saturating_add(align4(echoed));
        while let (Some(len), Some(kind)) = (u16_at(payload, at), u16_at(payload, at + 2)) {
            let len = len as usize;
            let Some(value) = payload.get(at + 4..at + len.max(4)) else {
                break;
            };
            if len < 4 {
                break;
            }
            match kind & NLA_TYPE_MASK {
                NLMSGERR_ATTR_MSG => {
                    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                    message = Some(String::from_utf8_lossy(&value[..end]).into_owned());
                }
                NLMSGERR_ATTR_OFFS => offset = u32_at(value, 0),
                _ => {}
            }
            at = at.saturating_add(align4(len));
        }
    }
    Ok(Reply::Error {
        seq,
        errno: code.wrapping_neg(),
        message,
        offset,
    })
}

/// Judges a batch by the answers read after sending it: `Ok` when every
/// element message was acknowledged and nothing was refused. Answers to
/// other requests (earlier sequence numbers) are ignored.
pub fn judge(table: &str, ops: &[ElementOp], batch: &Batch, replies: &[Reply]) -> Result<()> {
    let mut acked = vec![false; batch.messages.len()];
    let mut refusals = Vec::new();
    for reply in replies {
        let seq = reply.seq();
        if seq == batch.begin_seq || seq == batch.end_seq {
            if let Reply::Error { errno, .. } = reply {
                return Err(Error::Batch {
                    table: table.to_string(),
                    source: std::io::Error::from_raw_os_error(*errno),
                });
            }
            continue;
        }
        let Some(index) = batch.messages.iter().position(|m| m.seq == seq) else {
            continue;
        };
        match reply {
            Reply::Ack { .. } => acked[index] = true,
            Reply::Error { .. } => refusals.push((index, reply)),
            Reply::Other { .. } => {}
        }
    }
    if let Some(&(
        index,
        Reply::Error {
            errno,
            message,
            offset,
            ..
        },
    )) = refusals.first()
    {
        let m = &batch.messages[index];
        // The element whose attribute holds the offset the kernel named.
        let named = offset.and_then(|o| {
            m.element_offsets
                .iter()
                .rposition(|&start| start <= o)
                .map(|i| m.ops.start + i)
        });
        let op_index = named.unwrap_or(m.ops.start);
        return Err(Error::Refused {
            table: table.to_string(),
            op: ops
                .get(op_index)
                .map(|op| op.to_string())
                .unwrap_or_else(|| format!("message {}", m.seq)),
            index: op_index,
            exact: named.is_some(),
            message: message.clone(),
            others: refusals.len() - 1,
            source: std::io::Error::from_raw_os_error(*errno),
        });
    }
    let n = acked.iter().filter(|a| **a).count();
    if n < acked.len() {
        return Err(Error::Incomplete {
            table: table.to_string(),
            acked: n,
            expected: acked.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
