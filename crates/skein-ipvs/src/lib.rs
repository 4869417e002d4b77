//! A small IPVS client over generic netlink, for skein's IPVS dataplane.
//!
//! No maintained IPVS crate exists, so this speaks the kernel's `IPVS`
//! generic-netlink family directly (what `ipvsadm`/libipvs and dcos-net's
//! `gen_netlink` did): resolve the family id with `CTRL_CMD_GETFAMILY`, then
//! add/delete/list services and destinations. Services use the `wlc`
//! scheduler by default and destinations are always masqueraded (NAT),
//! as dcos-net programmed them.
//!
//! [`message`] holds the pure encoding (unit-tested byte for byte),
//! [`diff`] the pure desired-vs-actual reconciliation, and [`Ipvs`] the
//! socket handle. On a kernel without IPVS, [`Ipvs::open`] fails with
//! [`Error::FamilyNotFound`].

pub mod consts;
pub mod diff;
pub mod message;

use std::fmt;
use std::net::IpAddr;

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkMessage, NetlinkPayload, ParseableParametrized, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use consts::*;
pub use diff::{diff, Op, Table};
use message::{af_of, inet_addr_bytes, inet_addr_from, CmdAttr, DestAttr, IpvsMessage, SvcAttr};

/// The scheduler skein uses, as dcos-net did: weighted least-connection.
pub const DEFAULT_SCHEDULER: &str = "wlc";

/// Errors of the IPVS client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no `IPVS` generic-netlink family.
    #[error(
        "IPVS family not found: this kernel has no IPVS generic-netlink family \
         (load the ip_vs module, e.g. `modprobe ip_vs`; kernels built without \
         CONFIG_IP_VS cannot use the ipvs dataplane)"
    )]
    FamilyNotFound,
    /// The netlink socket failed.
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused a request.
    #[error("IPVS {op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's answer could not be decoded.
    #[error("IPVS {op}: undecodable netlink answer: {detail}")]
    Decode { op: &'static str, detail: String },
    /// A value the kernel cannot take (e.g. a scheduler name too long).
    #[error("invalid IPVS request: {0}")]
    Invalid(String),
}

impl Error {
    /// The errno of a kernel refusal (`EEXIST`, `ESRCH`, `ENOENT`, ...).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Transport protocol of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The `IPPROTO_*` number.
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    /// From an `IPPROTO_*` number; `None` for protocols skein does not use.
    pub fn from_number(n: u16) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A virtual service: VIP, port, protocol and scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: String,
}

/// What identifies a service in the kernel: address, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Service {
    /// A service with the default scheduler (`wlc`).
    pub fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        Service {
            addr,
            port,
            protocol,
            scheduler: DEFAULT_SCHEDULER.to_string(),
        }
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: self.addr,
            port: self.port,
            protocol: self.protocol,
        }
    }

    /// The attributes that identify the service (for delete and dump-dests).
    pub fn id_attrs(&self) -> Vec<SvcAttr> {
        vec![
            SvcAttr::Af(af_of(self.addr)),
            SvcAttr::Protocol(self.protocol.number()),
            SvcAttr::Addr(inet_addr_bytes(self.addr)),
            SvcAttr::Port(self.port),
        ]
    }

    /// Every attribute the kernel requires to add or modify a service:
    /// no flags (not persistent), timeout 0, a full netmask.
    pub fn full_attrs(&self) -> Result<Vec<SvcAttr>> {
        if self.scheduler.is_empty()
            || self.scheduler.len() >= IP_VS_SCHEDNAME_MAXLEN
            || self.scheduler.contains('\0')
        {
            return Err(Error::Invalid(format!(
                "scheduler name {:?}",
                self.scheduler
            )));
        }
        let netmask = match self.addr {
            IpAddr::V4(_) => u32::MAX,
            IpAddr::V6(_) => 128,
        };
        let mut attrs = self.id_attrs();
        attrs.extend([
            SvcAttr::SchedName(self.scheduler.clone()),
            SvcAttr::Flags {
                flags: 0,
                mask: u32::MAX,
            },
            SvcAttr::Timeout(0),
            SvcAttr::Netmask(netmask),
        ]);
        Ok(attrs)
    }

    /// Reads a service from the kernel's attributes. `Ok(None)` for services
    /// skein does not model (firewall-mark services, other protocols).
    pub fn from_attrs(attrs: &[SvcAttr]) -> Result<Option<Self>, DecodeError> {
        let (mut af, mut proto, mut addr, mut port, mut sched, mut fwmark) =
            (None, None, None, None, None, None);
        for a in attrs {
            match a {
                SvcAttr::Af(v) => af = Some(*v),
                SvcAttr::Protocol(v) => proto = Some(*v),
                SvcAttr::Addr(v) => addr = Some(*v),
                SvcAttr::Port(v) => port = Some(*v),
                SvcAttr::SchedName(v) => sched = Some(v.clone()),
                SvcAttr::Fwmark(v) => fwmark = Some(*v),
                _ => {}
            }
        }
        if fwmark.is_some_and(|m| m != 0) {
            return Ok(None);
        }
        let af = af.ok_or_else(|| DecodeError::from("IPVS service without address family"))?;
        let Some(protocol) = Protocol::from_number(
            proto.ok_or_else(|| DecodeError::from("IPVS service without protocol"))?,
        ) else {
            return Ok(None);
        };
        let addr = inet_addr_from(
            af,
            &addr.ok_or_else(|| DecodeError::from("IPVS service without address"))?,
        )?;
        Ok(Some(Service {
            addr,
            port: port.ok_or_else(|| DecodeError::from("IPVS service without port"))?,
            protocol,
            scheduler: sched.unwrap_or_default(),
        }))
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.protocol,
            std::net::SocketAddr::new(self.addr, self.port),
            self.scheduler
        )
    }
}

/// A real server behind a service, always masqueraded (NAT).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    /// 0 = no new connections, existing ones kept (draining / unhealthy).
    pub weight: u32,
}

impl Destination {
    /// The attributes that identify the destination (for delete).
    pub fn id_attrs(&self) -> Vec<DestAttr> {
        vec![
            DestAttr::AddrFamily(af_of(self.addr)),
            DestAttr::Addr(inet_addr_bytes(self.addr)),
            DestAttr::Port(self.port),
        ]
    }

    /// Every attribute the kernel requires to add or modify a destination:
    /// masquerading, the weight, no connection thresholds.
    pub fn full_attrs(&self) -> Result<Vec<DestAttr>> {
        if self.weight > i32::MAX as u32 {
            return Err(Error::Invalid(format!(
                "weight {} above {}",
                self.weight,
                i32::MAX
            )));
        }
        let mut attrs = self.id_attrs();
        attrs.extend([
            DestAttr::FwdMethod(IP_VS_CONN_F_MASQ),
            DestAttr::Weight(self.weight),
            DestAttr::UThresh(0),
            DestAttr::LThresh(0),
        ]);
        Ok(attrs)
    }

    /// Reads a destination from the kernel's attributes; `service_af` is used
    /// when the kernel sends no `IPVS_DEST_ATTR_ADDR_FAMILY` (before 4.x).
    pub fn from_attrs(attrs: &[DestAttr], service_af: u16) -> Result<Self, DecodeError> {
        let (mut af, mut addr, mut port, mut weight) = (service_af, None, None, None);
        for a in attrs {
            match a {
                DestAttr::AddrFamily(v) => af = *v,
                DestAttr::Addr(v) => addr = Some(*v),
                DestAttr::Port(v) => port = Some(*v),
                DestAttr::Weight(v) => weight = Some(*v),
                _ => {}
            }
        }
        Ok(Destination {
            addr: inet_addr_from(
                af,
                &addr.ok_or_else(|| DecodeError::from("IPVS destination without address"))?,
            )?,
            port: port.ok_or_else(|| DecodeError::from("IPVS destination without port"))?,
            weight: weight.unwrap_or(0),
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} weight {}",
            std::net::SocketAddr::new(self.addr, self.port),
            self.weight
        )
    }
}

/// Serializes one request: netlink header (type = `family`, the given
/// flags, sequence number `seq`, port 0) + genl header + payload.
pub fn encode_request<F>(payload: F, family: u16, flags: u16, seq: u32) -> Vec<u8>
where
    F: GenlFamily + Emitable + fmt::Debug,
{
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family);
    let mut msg = NetlinkMessage::from(genl);
    msg.header.flags = flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// What one received datagram said about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<F> {
    /// Messages of the answer (more may follow in later datagrams).
    Messages(Vec<F>),
    /// The answer is complete (an ACK, or `NLMSG_DONE` after a dump); holds
    /// the messages that came before it in the same datagram.
    Done(Vec<F>),
}

/// Parses one datagram of answers to the request with sequence number
/// `seq`: every netlink message in it, skipping those of other requests.
/// A kernel error (`NLMSG_ERROR` with a code) becomes `Err(errno)`.
pub fn decode_reply<F>(
    buf: &[u8],
    seq: u32,
) -> Result<Result<Reply<F>, std::io::Error>, DecodeError>
where
    F: ParseableParametrized<[u8], GenlHeader> + fmt::Debug,
{
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let msg = NetlinkMessage::<GenlMessage<F>>::deserialize(&buf[offset..])?;
        let len = msg.header.length as usize;
        if len < 16 {
            return Err(DecodeError::from(format!(
                "netlink message of length {len}"
            )));
        }
        offset += (len + 3) & !3;
        if msg.header.sequence_number != seq {
            continue;
        }
        match msg.payload {
            NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
            NetlinkPayload::Done(_) => return Ok(Ok(Reply::Done(out))),
            NetlinkPayload::Error(e) => {
                return Ok(match e.code {
                    None => Ok(Reply::Done(out)),
                    Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
                })
            }
            NetlinkPayload::Noop => {}
            NetlinkPayload::Overrun(_) => return Err(DecodeError::from("netlink overrun")),
            _ => {}
        }
    }
    Ok(Ok(Reply::Messages(out)))
}

/// A generic-netlink socket bound to the kernel's IPVS family.
pub struct Ipvs {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl Ipvs {
    /// Opens a generic-netlink socket and resolves the `IPVS` family.
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut ipvs = Ipvs {
            socket,
            family: 0,
            seq: 0,
        };
        let ctrl = GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_string())],
        };
        let answers = match ipvs.transact("resolve family", ctrl, NLM_F_REQUEST | NLM_F_ACK) {
            Err(e) if e.errno() == Some(ENOENT) => return Err(Error::FamilyNotFound),
            other => other?,
        };
        ipvs.family = answers
            .iter()
            .flat_map(|m: &GenlCtrl| m.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(Error::FamilyNotFound)?;
        Ok(ipvs)
    }

    /// The generic-netlink family id the kernel gave IPVS.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    fn transact<F>(&mut self, op: &'static str, payload: F, flags: u16) -> Result<Vec<F>>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let family = if payload.family_id() != 0 {
            payload.family_id()
        } else {
            self.family
        };
        let req = encode_request(payload, family, flags, seq);
        self.socket.send(&req, 0)?;
        let mut answers = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            buf.clear();
            let n = self.socket.recv(&mut buf, 0)?;
            let datagram = buf.get(..n).unwrap_or(&buf);
            match decode_reply::<F>(datagram, seq) {
                Err(e) => {
                    return Err(Error::Decode {
                        op,
                        detail: e.to_string(),
                    })
                }
                Ok(Err(source)) => return Err(Error::Kernel { op, source }),
                Ok(Ok(Reply::Messages(m))) => answers.extend(m),
                Ok(Ok(Reply::Done(m))) => {
                    answers.extend(m);
                    return Ok(answers);
                }
            }
        }
    }

    fn command(&mut self, op: &'static str, cmd: u8, attrs: Vec<CmdAttr>) -> Result<()> {
        self.transact(op, IpvsMessage { cmd, attrs }, NLM_F_REQUEST | NLM_F_ACK)?;
        Ok(())
    }

    /// Deletes every service and destination (`IPVS_CMD_FLUSH`).
    pub fn flush(&mut self) -> Result<()> {
        self.command("flush", IPVS_CMD_FLUSH, vec![])
    }

    /// Every TCP/UDP service in the kernel (firewall-mark services skipped).
    pub fn services(&mut self) -> Result<Vec<Service>> {
        let msgs = self.transact(
            "list services",
            IpvsMessage {
                cmd: IPVS_CMD_GET_SERVICE,
                attrs: vec![],
            },
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in msgs {
            for a in m.attrs {
                if let CmdAttr::Service(attrs) = a {
                    let svc = Service::from_attrs(&attrs).map_err(|e| Error::Decode {
                        op: "list services",
                        detail: e.to_string(),
                    })?;
                    out.extend(svc);
                }
            }
        }
        Ok(out)
    }

    /// The destinations of one service.
    pub fn destinations(&mut self, service: &Service) -> Result<Vec<Destination>> {
        let msgs = self.transact(
            "list destinations",
            IpvsMessage {
                cmd: IPVS_CMD_GET_DEST,
                attrs: vec![CmdAttr::Service(service.id_attrs())],
            },
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in msgs {
            for a in m.attrs {
                if let CmdAttr::Dest(attrs) = a {
                    out.push(
                        Destination::from_attrs(&attrs, af_of(service.addr)).map_err(|e| {
                            Error::Decode {
                                op: "list destinations",
                                detail: e.to_string(),
                            }
                        })?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// The whole table: every service with its destinations.
    pub fn table(&mut self) -> Result<Table> {
        let mut out = Vec::new();
        for svc in self.services()? {
            let dests = self.destinations(&svc)?;
            out.push((svc, dests));
        }
        Ok(out)
    }

    pub fn add_service(&mut self, service: &Service) -> Result<()> {
        let attrs = vec![CmdAttr::Service(service.full_attrs()?)];
        self.command("add service", IPVS_CMD_NEW_SERVICE, attrs)
    }

    /// Changes the scheduler of an existing service.
    pub fn update_service(&mut self, service: &Service) -> Result<()> {
        let attrs = vec![CmdAttr::Service(service.full_attrs()?)];
        self.command("update service", IPVS_CMD_SET_SERVICE, attrs)
    }

    pub fn del_service(&mut self, service: &Service) -> Result<()> {
        let attrs = vec![CmdAttr::Service(service.id_attrs())];
        self.command("delete service", IPVS_CMD_DEL_SERVICE, attrs)
    }

    pub fn add_destination(&mut self, service: &Service, dest: &Destination) -> Result<()> {
        let attrs = vec![
            CmdAttr::Service(service.id_attrs()),
            CmdAttr::Dest(dest.full_attrs()?),
        ];
        self.command("add destination", IPVS_CMD_NEW_DEST, attrs)
    }

    /// Changes the weight of an existing destination.
    pub fn update_destination(&mut self, service: &Service, dest: &Destination) -> Result<()> {
        let attrs = vec![
            CmdAttr::Service(service.id_attrs()),
            CmdAttr::Dest(dest.full_attrs()?),
        ];
        self.command("update destination", IPVS_CMD_SET_DEST, attrs)
    }

    pub fn del_destination(&mut self, service: &Service, dest: &Destination) -> Result<()> {
        let attrs = vec![
            CmdAttr::Service(service.id_attrs()),
            CmdAttr::Dest(dest.id_attrs()),
        ];
        self.command("delete destination", IPVS_CMD_DEL_DEST, attrs)
    }

    /// Applies one diff operation.
    pub fn apply(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::DelService(s) => self.del_service(s),
            Op::AddService(s) => self.add_service(s),
            Op::UpdateService(s) => self.update_service(s),
            Op::DelDestination(s, d) => self.del_destination(s, d),
            Op::AddDestination(s, d) => self.add_destination(s, d),
            Op::UpdateDestination(s, d) => self.update_destination(s, d),
        }
    }

    /// Makes the kernel's table equal `desired`; returns the operations done.
    pub fn reconcile(&mut self, desired: &[(Service, Vec<Destination>)]) -> Result<Vec<Op>> {
        let actual = self.table()?;
        let ops = diff(desired, &actual);
        for op in &ops {
            self.apply(op)?;
        }
        Ok(ops)
    }
}

/// `ENOENT`: nlctrl's answer when no family has the name.
const ENOENT: i32 = 2;

#[cfg(test)]
mod tests;
