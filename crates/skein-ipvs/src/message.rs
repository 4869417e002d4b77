//! The IPVS generic-netlink payload: a command plus nested service and
//! destination attributes, with their byte layout (emit) and parsing.
//!
//! Everything here is pure: no socket, so the layout is unit-tested without
//! a kernel that has IPVS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, NLA_F_NESTED, NLA_TYPE_MASK,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use crate::consts::*;

/// Encodes an address as the kernel's `union nf_inet_addr`: 16 bytes, an
/// IPv4 address in the first 4 and zeros after it.
pub fn inet_addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out.copy_from_slice(&a.octets()),
    }
    out
}

/// Decodes a `union nf_inet_addr` of the given address family.
pub fn inet_addr_from(af: u16, raw: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match af {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
        other => Err(DecodeError::from(format!(
            "unknown address family {other} in an IPVS attribute"
        ))),
    }
}

/// The address family constant of an address.
pub fn af_of(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn raw_addr(payload: &[u8]) -> Result<[u8; 16], DecodeError> {
    // The kernel sends the whole 16-byte union; accept a bare IPv4 too.
    if payload.len() < 4 || payload.len() > 16 {
        return Err(DecodeError::from(format!(
            "IPVS address attribute of {} bytes",
            payload.len()
        )));
    }
    let mut out = [0u8; 16];
    out[..payload.len()].copy_from_slice(payload);
    Ok(out)
}

fn u16_ne(payload: &[u8]) -> Result<u16, DecodeError> {
    let b: [u8; 2] = payload
        .get(..2)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| DecodeError::from("u16 IPVS attribute too short"))?;
    Ok(u16::from_ne_bytes(b))
}

fn u16_be(payload: &[u8]) -> Result<u16, DecodeError> {
    let b: [u8; 2] = payload
        .get(..2)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| DecodeError::from("u16 IPVS attribute too short"))?;
    Ok(u16::from_be_bytes(b))
}

fn u32_ne(payload: &[u8]) -> Result<u32, DecodeError> {
    let b: [u8; 4] = payload
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| DecodeError::from("u32 IPVS attribute too short"))?;
    Ok(u32::from_ne_bytes(b))
}

fn nul_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// `IPVS_SVC_ATTR_*`: the attributes nested in `IPVS_CMD_ATTR_SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvcAttr {
    Af(u16),
    Protocol(u16),
    Addr([u8; 16]),
    /// Host byte order here; emitted in network byte order.
    Port(u16),
    Fwmark(u32),
    SchedName(String),
    Flags {
        flags: u32,
        mask: u32,
    },
    Timeout(u32),
    Netmask(u32),
    /// Anything else (statistics, PE name): kept as raw bytes.
    Other(DefaultNla),
}

impl Nla for SvcAttr {
    fn value_len(&self) -> usize {
        match self {
            SvcAttr::Af(_) | SvcAttr::Protocol(_) | SvcAttr::Port(_) => 2,
            SvcAttr::Addr(_) => 16,
            SvcAttr::Fwmark(_) | SvcAttr::Timeout(_) | SvcAttr::Netmask(_) => 4,
            SvcAttr::SchedName(s) => s.len() + 1,
            SvcAttr::Flags { .. } => 8,
            SvcAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            SvcAttr::Af(_) => IPVS_SVC_ATTR_AF,
            SvcAttr::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            SvcAttr::Addr(_) => IPVS_SVC_ATTR_ADDR,
            SvcAttr::Port(_) => IPVS_SVC_ATTR_PORT,
            SvcAttr::Fwmark(_) => IPVS_SVC_ATTR_FWMARK,
            SvcAttr::SchedName(_) => IPVS_SVC_ATTR_SCHED_NAME,
            SvcAttr::Flags { .. } => IPVS_SVC_ATTR_FLAGS,
            SvcAttr::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            SvcAttr::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            SvcAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            SvcAttr::Af(v) | SvcAttr::Protocol(v) => buf[..2].copy_from_slice(&v.to_ne_bytes()),
            SvcAttr::Port(p) => buf[..2].copy_from_slice(&p.to_be_bytes()),
            SvcAttr::Addr(a) => buf[..16].copy_from_slice(a),
            SvcAttr::Fwmark(v) | SvcAttr::Timeout(v) | SvcAttr::Netmask(v) => {
                buf[..4].copy_from_slice(&v.to_ne_bytes())
            }
            SvcAttr::SchedName(s) => {
                buf[..s.len()].copy_from_slice(s.as_bytes());
                buf[s.len()] = 0;
            }
            SvcAttr::Flags { flags, mask } => {
                buf[..4].copy_from_slice(&flags.to_ne_bytes());
                buf[4..8].copy_from_slice(&mask.to_ne_bytes());
            }
            SvcAttr::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for SvcAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let p = buf.value();
        Ok(match buf.kind() {
            IPVS_SVC_ATTR_AF => SvcAttr::Af(u16_ne(p)?),
            IPVS_SVC_ATTR_PROTOCOL => SvcAttr::Protocol(u16_ne(p)?),
            IPVS_SVC_ATTR_ADDR => SvcAttr::Addr(raw_addr(p)?),
            IPVS_SVC_ATTR_PORT => SvcAttr::Port(u16_be(p)?),
            IPVS_SVC_ATTR_FWMARK => SvcAttr::Fwmark(u32_ne(p)?),
            IPVS_SVC_ATTR_SCHED_NAME => SvcAttr::SchedName(nul_string(p)),
            IPVS_SVC_ATTR_FLAGS => SvcAttr::Flags {
                flags: u32_ne(p)?,
                mask: u32_ne(p.get(4..).unwrap_or_default())?,
            },
            IPVS_SVC_ATTR_TIMEOUT => SvcAttr::Timeout(u32_ne(p)?),
            IPVS_SVC_ATTR_NETMASK => SvcAttr::Netmask(u32_ne(p)?),
            _ => SvcAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// `IPVS_DEST_ATTR_*`: the attributes nested in `IPVS_CMD_ATTR_DEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAttr {
    Addr([u8; 16]),
    /// Host byte order here; emitted in network byte order.
    Port(u16),
    FwdMethod(u32),
    Weight(u32),
    UThresh(u32),
    LThresh(u32),
    ActiveConns(u32),
    InactConns(u32),
    PersistConns(u32),
    AddrFamily(u16),
    /// Anything else (statistics, tunnel settings): kept as raw bytes.
    Other(DefaultNla),
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            DestAttr::Addr(_) => 16,
            DestAttr::Port(_) | DestAttr::AddrFamily(_) => 2,
            DestAttr::FwdMethod(_)
            | DestAttr::Weight(_)
            | DestAttr::UThresh(_)
            | DestAttr::LThresh(_)
            | DestAttr::ActiveConns(_)
            | DestAttr::InactConns(_)
            | DestAttr::PersistConns(_) => 4,
            DestAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DestAttr::Addr(_) => IPVS_DEST_ATTR_ADDR,
            DestAttr::Port(_) => IPVS_DEST_ATTR_PORT,
            DestAttr::FwdMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            DestAttr::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            DestAttr::UThresh(_) => IPVS_DEST_ATTR_U_THRESH,
            DestAttr::LThresh(_) => IPVS_DEST_ATTR_L_THRESH,
            DestAttr::ActiveConns(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            DestAttr::InactConns(_) => IPVS_DEST_ATTR_INACT_CONNS,
            DestAttr::PersistConns(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            DestAttr::AddrFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            DestAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            DestAttr::Addr(a) => buf[..16].copy_from_slice(a),
            DestAttr::Port(p) => buf[..2].copy_from_slice(&p.to_be_bytes()),
            DestAttr::AddrFamily(v) => buf[..2].copy_from_slice(&v.to_ne_bytes()),
            DestAttr::FwdMethod(v)
            | DestAttr::Weight(v)
            | DestAttr::UThresh(v)
            | DestAttr::LThresh(v)
            | DestAttr::ActiveConns(v)
            | DestAttr::InactConns(v)
            | DestAttr::PersistConns(v) => buf[..4].copy_from_slice(&v.to_ne_bytes()),
            DestAttr::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let p = buf.value();
        Ok(match buf.kind() {
            IPVS_DEST_ATTR_ADDR => DestAttr::Addr(raw_addr(p)?),
            IPVS_DEST_ATTR_PORT => DestAttr::Port(u16_be(p)?),
            IPVS_DEST_ATTR_FWD_METHOD => DestAttr::FwdMethod(u32_ne(p)?),
            IPVS_DEST_ATTR_WEIGHT => DestAttr::Weight(u32_ne(p)?),
            IPVS_DEST_ATTR_U_THRESH => DestAttr::UThresh(u32_ne(p)?),
            IPVS_DEST_ATTR_L_THRESH => DestAttr::LThresh(u32_ne(p)?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => DestAttr::ActiveConns(u32_ne(p)?),
            IPVS_DEST_ATTR_INACT_CONNS => DestAttr::InactConns(u32_ne(p)?),
            IPVS_DEST_ATTR_PERSIST_CONNS => DestAttr::PersistConns(u32_ne(p)?),
            IPVS_DEST_ATTR_ADDR_FAMILY => DestAttr::AddrFamily(u16_ne(p)?),
            _ => DestAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// `IPVS_CMD_ATTR_*`: the top-level attributes of an IPVS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdAttr {
    Service(Vec<SvcAttr>),
    Dest(Vec<DestAttr>),
    Other(DefaultNla),
}

impl Nla for CmdAttr {
    fn value_len(&self) -> usize {
        match self {
            CmdAttr::Service(attrs) => attrs.as_slice().buffer_len(),
            CmdAttr::Dest(attrs) => attrs.as_slice().buffer_len(),
            CmdAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            CmdAttr::Service(_) => IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED,
            CmdAttr::Dest(_) => IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
            CmdAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            CmdAttr::Service(attrs) => attrs.as_slice().emit(buf),
            CmdAttr::Dest(attrs) => attrs.as_slice().emit(buf),
            CmdAttr::Other(nla) => nla.emit_value(buf),
        }
    }
}

fn parse_nested<A>(payload: &[u8]) -> Result<Vec<A>, DecodeError>
where
    A: for<'b> Parseable<NlaBuffer<&'b [u8]>>,
{
    NlasIterator::new(payload)
        .map(|nla| nla.and_then(|nla| A::parse(&nla)))
        .collect()
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for CmdAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let p = buf.value();
        Ok(match buf.kind() & NLA_TYPE_MASK {
            IPVS_CMD_ATTR_SERVICE => CmdAttr::Service(parse_nested(p)?),
            IPVS_CMD_ATTR_DEST => CmdAttr::Dest(parse_nested(p)?),
            _ => CmdAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// One IPVS generic-netlink message: `genlmsghdr.cmd` and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: u8,
    pub attrs: Vec<CmdAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(IpvsMessage {
            cmd: header.cmd,
            attrs: parse_nested(buf)?,
        })
    }
}
