//! Constants of the IPVS generic-netlink family, copied from the kernel's
//! UAPI header `include/uapi/linux/ip_vs.h` (values checked against the
//! header of Linux 6.1; the enums there are implicitly numbered from 0).

/// `IPVS_GENL_NAME`: the name the family registers under with `nlctrl`.
pub const IPVS_GENL_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const IPVS_GENL_VERSION: u8 = 0x1;

// enum { IPVS_CMD_UNSPEC = 0, ... }: generic-netlink commands.
/// `IPVS_CMD_NEW_SERVICE`: add a service.
pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
/// `IPVS_CMD_SET_SERVICE`: modify a service.
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
/// `IPVS_CMD_DEL_SERVICE`: delete a service.
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
/// `IPVS_CMD_GET_SERVICE`: get one service, or all with `NLM_F_DUMP`.
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
/// `IPVS_CMD_NEW_DEST`: add a destination (real server).
pub const IPVS_CMD_NEW_DEST: u8 = 5;
/// `IPVS_CMD_SET_DEST`: modify a destination.
pub const IPVS_CMD_SET_DEST: u8 = 6;
/// `IPVS_CMD_DEL_DEST`: delete a destination.
pub const IPVS_CMD_DEL_DEST: u8 = 7;
/// `IPVS_CMD_GET_DEST`: dump the destinations of one service.
pub const IPVS_CMD_GET_DEST: u8 = 8;
/// `IPVS_CMD_FLUSH`: delete every service and destination.
pub const IPVS_CMD_FLUSH: u8 = 17;

// enum { IPVS_CMD_ATTR_UNSPEC = 0, ... }: top-level attributes.
/// `IPVS_CMD_ATTR_SERVICE`: nested service attributes.
pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
/// `IPVS_CMD_ATTR_DEST`: nested destination attributes.
pub const IPVS_CMD_ATTR_DEST: u16 = 2;

// enum { IPVS_SVC_ATTR_UNSPEC = 0, ... }: inside IPVS_CMD_ATTR_SERVICE.
/// `IPVS_SVC_ATTR_AF` (u16): address family.
pub const IPVS_SVC_ATTR_AF: u16 = 1;
/// `IPVS_SVC_ATTR_PROTOCOL` (u16): IPPROTO_TCP / IPPROTO_UDP.
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
/// `IPVS_SVC_ATTR_ADDR` (binary, `union nf_inet_addr`, 16 bytes).
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
/// `IPVS_SVC_ATTR_PORT` (u16, network byte order).
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
/// `IPVS_SVC_ATTR_FWMARK` (u32): firewall-mark services (not used by skein).
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
/// `IPVS_SVC_ATTR_SCHED_NAME` (NUL-terminated string, < 16 bytes).
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
/// `IPVS_SVC_ATTR_FLAGS` (`struct ip_vs_flags { u32 flags; u32 mask; }`).
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
/// `IPVS_SVC_ATTR_TIMEOUT` (u32): persistence timeout in seconds.
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
/// `IPVS_SVC_ATTR_NETMASK` (u32): persistence netmask (IPv6: prefix length).
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;

// enum { IPVS_DEST_ATTR_UNSPEC = 0, ... }: inside IPVS_CMD_ATTR_DEST.
/// `IPVS_DEST_ATTR_ADDR` (binary, `union nf_inet_addr`, 16 bytes).
pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
/// `IPVS_DEST_ATTR_PORT` (u16, network byte order).
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
/// `IPVS_DEST_ATTR_FWD_METHOD` (u32): `IP_VS_CONN_F_*` forwarding method.
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
/// `IPVS_DEST_ATTR_WEIGHT` (u32; the kernel rejects values above i32::MAX).
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
/// `IPVS_DEST_ATTR_U_THRESH` (u32): upper connection threshold, 0 = none.
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
/// `IPVS_DEST_ATTR_L_THRESH` (u32): lower connection threshold, 0 = none.
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
/// `IPVS_DEST_ATTR_ACTIVE_CONNS` (u32, read only).
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
/// `IPVS_DEST_ATTR_INACT_CONNS` (u32, read only).
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
/// `IPVS_DEST_ATTR_PERSIST_CONNS` (u32, read only).
pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
/// `IPVS_DEST_ATTR_ADDR_FAMILY` (u16): the destination's own family.
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_CONN_F_FWD_MASK`: the forwarding-method bits of a connection flag.
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x0007;
/// `IP_VS_CONN_F_MASQ`: masquerading (NAT), the method dcos-net used.
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
/// `IP_VS_SCHEDNAME_MAXLEN`: scheduler names are shorter than this
/// (the NUL terminator included).
pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;

/// `AF_INET` from `<sys/socket.h>`.
pub const AF_INET: u16 = 2;
/// `AF_INET6` from `<sys/socket.h>`.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP` from `<netinet/in.h>`.
pub const IPPROTO_TCP: u16 = 6;
/// `IPPROTO_UDP` from `<netinet/in.h>`.
pub const IPPROTO_UDP: u16 = 17;
