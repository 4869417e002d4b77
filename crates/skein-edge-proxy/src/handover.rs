//! Upgrades without a closed port: a new edge takes the running one's
//! listening sockets over a unix socket (SCM_RIGHTS).
//!
//! Marathon-LB's HAProxy reloads handed over listeners too, but every
//! reload did; here it happens only when the binary itself is replaced
//! (`skein edge --take-over`). The running edge sends every listening
//! socket (HTTP, HTTPS, stats, each bind port) with a manifest naming
//! them, stops accepting and fetching routes, gives up its state-dir lock
//! and finishes its open connections (up to the drain time) before it
//! exits. The new edge serves from the same sockets: a client never finds
//! the port closed, and connections on the old process are not cut.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The socket's name in the state dir.
pub const SOCKET: &str = "handover.sock";
const REQUEST: &[u8] = b"take-over\n";
/// File descriptors per message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 200;

/// Which listener a handed-over socket is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    Http,
    Https,
    Stats,
    Port,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// The sockets of this message, in the order of its descriptors.
    listeners: Vec<(ListenerKind, SocketAddr)>,
    /// Whether another message follows.
    more: bool,
}

/// Listening sockets taken over from a previous edge.
#[derive(Debug, Default)]
pub struct Inherited {
    pub(crate) sockets: HashMap<(ListenerKind, SocketAddr), std::net::TcpListener>,
}

impl Inherited {
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The inherited socket of `kind` bound to `addr` (any port if 0).
    pub(crate) fn take(
        &mut self,
        kind: ListenerKind,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let key = self
            .sockets
            .keys()
            .find(|(k, a)| {
                *k == kind && a.ip() == addr.ip() && (addr.port() == 0 || a.port() == addr.port())
            })?
            .clone();
        self.sockets.remove(&key)
    }

    pub(crate) fn take_port(&mut self, ip: IpAddr, port: u16) -> Option<std::net::TcpListener> {
        self.take(ListenerKind::Port, SocketAddr::new(ip, port))
    }
}

fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call, and the control buffer has CMSG_SPACE bytes for
    // the one header written into it.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
        let sent = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sent = sent as usize;
        // The descriptors went with the first byte; the rest as plain data.
        while sent < data.len() {
            sent += (&*sock).write(&data[sent..])?;
        }
    }
    Ok(())
}

/// Reads one message: `len` bytes of data and the descriptors with them.
fn recv_with_fds(sock: &UnixStream, len: usize) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; len];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * 4) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut fds = Vec::new();
    // SAFETY: the buffers outlive recvmsg; control headers are walked
    // with the CMSG_* macros within msg_controllen, and each descriptor
    // the kernel installed is owned exactly once.
    let got = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let got = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let n = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                let p = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..n {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(std::io::Error::other("descriptors truncated"));
        }
        got as usize
    };
    if got == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    (&*sock).read_exact(&mut data[got..])?;
    Ok((data, fds))
}

/// Sends `listeners` (each with its kind and address) to a new edge.
pub(crate) fn send(
    sock: &UnixStream,
    listeners: &[(ListenerKind, SocketAddr, RawFd)],
) -> anyhow::Result<()> {
    let chunks: Vec<&[(ListenerKind, SocketAddr, RawFd)]> =
        listeners.chunks(FDS_PER_MESSAGE).collect();
    let count = chunks.len().max(1);
    for i in 0..count {
        let chunk = chunks.get(i).copied().unwrap_or(&[]);
        let manifest = Manifest {
            listeners: chunk.iter().map(|(k, a, _)| (k.clone(), *a)).collect(),
            more: i + 1 < count,
        };
        let json = serde_json::to_vec(&manifest)?;
        // Length first (no descriptors), then the manifest with them.
        (&*sock).write_all(&(json.len() as u32).to_le_bytes())?;
        let fds: Vec<RawFd> = chunk.iter().map(|(_, _, fd)| *fd).collect();
        send_with_fds(sock, &json, &fds)?;
    }
    Ok(())
}

/// Asks the edge running with `state_dir` for its listeners.
pub fn receive(state_dir: &Path) -> anyhow::Result<Inherited> {
    let path = state_dir.join(SOCKET);
    let sock = UnixStream::connect(&path)
        .with_context(|| format!("cannot reach the running edge at {}", path.display()))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&sock).write_all(REQUEST)?;
    let mut inherited = Inherited::default();
    loop {
        let mut len = [0u8; 4];
        (&sock)
            .read_exact(&mut len)
            .context("the running edge closed the handover")?;
        let len = u32::from_le_bytes(len) as usize;
        anyhow::ensure!(len <= 16 << 20, "handover manifest too large");
        let (data, fds) = recv_with_fds(&sock, len)?;
        let manifest: Manifest = serde_json::from_slice(&data).context("bad handover manifest")?;
        anyhow::ensure!(
            manifest.listeners.len() == fds.len(),
            "{} listeners named, {} sockets received",
            manifest.listeners.len(),
            fds.len()
        );
        for ((kind, addr), fd) in manifest.listeners.into_iter().zip(fds) {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            inherited.sockets.insert((kind, addr), listener);
        }
        if !manifest.more {
            return Ok(inherited);
        }
    }
}

/// The running edge's side: the socket new edges connect to.
pub(crate) fn listen(state_dir: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    let path = state_dir.join(SOCKET);
    // We hold the state dir's lock: a socket file left is a dead edge's.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    Ok((listener, path))
}

/// Waits for a new edge's request on an accepted connection.
pub(crate) fn read_request(sock: &UnixStream) -> anyhow::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; REQUEST.len()];
    (&*sock).read_exact(&mut buf)?;
    anyhow::ensure!(buf == REQUEST, "not a handover request");
    Ok(())
}
