//! The kernel's connection tracking table, read over ctnetlink
//! (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`): for each
//! tracked connection its original tuple (client → VIP), its reply tuple
//! (backend → client, after DNAT), its TCP state and status bits. The VIP
//! counts of the UI and `/metrics` are sampled from it, as dcos-net sampled
//! IPVS's connection table: a connection the kernel marked *assured*
//! (traffic both ways after the handshake) succeeded; one that ended or
//! stalled before that failed.
//!
//! [`wire`] is pure (encoding the dump request, parsing the answers);
//! [`dump`] is the socket.

pub mod wire;

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use wire::{Conn, Event, EventKind, TcpState};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A `NETLINK_NETFILTER` socket bound in the calling thread's network
/// namespace, subscribed to the multicast `groups` (0: none), and the
/// kernel's address.
fn open_socket(groups: u32) -> io::Result<(OwnedFd, libc::sockaddr_nl)> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = groups;
    // SAFETY: `addr` is a valid sockaddr_nl of the size given.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    // The kernel's address: no groups.
    addr.nl_groups = 0;
    Ok((fd, addr))
}

/// Every IPv4 connection the kernel tracks in the calling thread's network
/// namespace.
pub fn dump() -> io::Result<Vec<Conn>> {
    let (fd, addr) = open_socket(0)?;
    let seq = 1;
    let request = wire::dump_request(seq);
    // SAFETY: `request` is valid for its length; `addr` as above.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) as libc::c_int
    })?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut conns = Vec::new();
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let chunk = buf.get(..n as usize).unwrap_or_default();
        match wire::parse_dump(chunk, seq) {
            Ok((mut part, done)) => {
                conns.append(&mut part);
                if done || n == 0 {
                    return Ok(conns);
                }
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Conntrack's events in the network namespace it was opened in: every
/// connection created, changed and destroyed, as it happens (a connection
/// refused by its backend is destroyed at once, so a table dump rarely
/// sees it: failures are counted from these).
pub struct Events {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// What one [`Events::recv`] got.
#[derive(Debug, Default)]
pub struct Received {
    pub events: Vec<Event>,
    /// The kernel dropped events (our socket's buffer was full).
    pub lost: bool,
}

impl Events {
    /// Subscribes to new, update and destroy events in the calling
    /// thread's network namespace.
    pub fn open() -> io::Result<Events> {
        // NF_NETLINK_CONNTRACK_NEW | _UPDATE | _DESTROY.
        let (fd, _) = open_socket(0x1 | 0x2 | 0x4)?;
        let events = Events {
            fd,
            buf: vec![0u8; 256 * 1024],
        };
        // Bursts of short connections: room for tens of thousands of events.
        let size: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: `size` is a valid c_int of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    events.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
        Ok(events)
    }

    /// Waits up to `timeout` for events; returns those of one read.
    pub fn recv(&mut self, timeout: std::time::Duration) -> io::Result<Received> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Received::default())
            } else {
                Err(e)
            };
        }
        if ready == 0 {
            return Ok(Received::default());
        }
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) => Ok(Received {
                    events: Vec::new(),
                    lost: true,
                }),
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Received::default()),
                _ => Err(e),
            };
        }
        let chunk = self.buf.get(..n as usize).unwrap_or_default();
        Ok(Received {
            events: wire::parse_events(chunk),
            lost: false,
        })
    }
}
