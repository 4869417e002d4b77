//! The socket, thin: one `NETLINK_NETFILTER` socket per client, a batch
//! sent in one `sendto`, and every answer read back and judged by
//! [`wire::judge`]. The kernel handles a batch inside `sendto` (netlink
//! delivers to the kernel synchronously), so all its answers are queued by
//! the time `sendto` returns; we read until the queue is empty and wait a
//! little longer only if some message is still unanswered.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::wire::{self, Batch, Reply};
use crate::{ElementOp, Error, Result};

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// How long to wait for answers still missing once the queue is empty.
const ANSWER_WAIT_MS: libc::c_int = 1000;
/// Receive buffer: enough for the acks of the largest batches we send.
const RCVBUF: usize = 4 << 20;

/// An nf_tables client: a `NETLINK_NETFILTER` socket in the network
/// namespace it was opened in.
pub struct Nftables {
    fd: OwnedFd,
    seq: u32,
    sndbuf: usize,
    buf: Vec<u8>,
}

fn kernel() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl Nftables {
    /// Opens a client in the calling thread's network namespace.
    pub fn open() -> Result<Nftables> {
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
        let addr = kernel();
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let client = Nftables {
            fd,
            seq: seed(),
            sndbuf: 0,
            buf: vec![0; 128 * 1024],
        };
        // Errors name the failing element (extended ack); acks do not echo
        // the whole request. Both are optional: older kernels lack them.
        let _ = client.set_int(SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = client.set_int(SOL_NETLINK, NETLINK_CAP_ACK, 1);
        client.buffer(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF)?;
        Ok(client)
    }

    /// Opens a client in the network namespace at `path` (e.g.
    /// `/run/netns/NAME`), from a short-lived thread that enters it; the
    /// socket stays in that namespace whichever thread uses it.
    pub fn open_in_netns(path: &Path) -> Result<Nftables> {
        let ns = std::fs::File::open(path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns only reads the descriptor, which `ns` keeps
                // open; it changes this (scoped, about to end) thread only.
                check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
                Nftables::open()
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Io(io::Error::other("netns thread panicked"))))
        })
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
        // SAFETY: `v` is a valid c_int of the size given.
        check(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&v as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    /// Sets a socket buffer: the `*FORCE` option (root, CAP_NET_ADMIN)
    /// beyond the system maximum, else the plain one.
    fn buffer(&self, force: libc::c_int, plain: libc::c_int, size: usize) -> io::Result<()> {
        let v = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        self.set_int(libc::SOL_SOCKET, force, v)
            .or_else(|_| self.set_int(libc::SOL_SOCKET, plain, v))
    }

    /// Applies `ops` to `table ip <table>` as one atomic batch: all of them
    /// or, on any error, none. Returns the first refusal the kernel reported
    /// (naming the operation), or [`Error::Incomplete`] if answers are
    /// missing (then re-read or rewrite the table).
    pub fn apply(&mut self, table: &str, ops: &[ElementOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let batch = wire::encode_batch(table, ops, self.seq)?;
        self.seq = batch.end_seq.wrapping_add(1);
        // The whole batch is one skb: the send buffer must hold it.
        let need = batch.bytes.len() + 4096;
        if need > self.sndbuf {
            self.buffer(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, need.max(1 << 20))?;
            self.sndbuf = need.max(1 << 20);
        }
        self.send(&batch.bytes)?;
        let replies = self.answers(&batch)?;
        wire::judge(table, ops, &batch, &replies)
    }

    /// Makes the kernel track connections in this namespace (see
    /// [`wire::encode_track_connections`]), with `table inet <table>`.
    pub fn track_connections(&mut self, table: &str) -> Result<()> {
        let batch = wire::encode_track_connections(table, self.seq)?;
        self.table_batch(table, batch)
    }

    /// Removes the table of [`Nftables::track_connections`] (no table is
    /// no error).
    pub fn untrack_connections(&mut self, table: &str) -> Result<()> {
        let batch = wire::encode_untrack_connections(table, self.seq)?;
        self.table_batch(table, batch)
    }

    /// Sends a batch of table-level messages and judges the answers.
    fn table_batch(&mut self, table: &str, batch: Batch) -> Result<()> {
        self.seq = batch.end_seq.wrapping_add(1);
        self.send(&batch.bytes)?;
        let replies = self.answers(&batch)?;
        wire::judge(table, &[], &batch, &replies)
    }

    fn send(&self, bytes: &[u8]) -> Result<()> {
        let addr = kernel();
        // SAFETY: `bytes` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        if n as usize != bytes.len() {
            return Err(Error::Io(io::Error::other(format!(
                "sent {n} of {} bytes",
                bytes.len()
            ))));
        }
        Ok(())
    }

    /// Every answer to `batch`: what is queued, then (if a message is still
    /// unanswered and nothing failed) whatever comes within a second.
    fn answers(&mut self, batch: &Batch) -> Result<Vec<Reply>> {
        let mut replies = Vec::new();
        let mut answered = 0;
        let mut waited = false;
        loop {
            match self.recv(libc::MSG_DONTWAIT)? {
                Some(datagram) => {
                    for reply in datagram {
                        let seq = reply.seq();
                        if seq == batch.begin_seq || seq == batch.end_seq {
                            replies.push(reply);
                        } else if batch.message(seq).is_some() {
                            answered += 1;
                            replies.push(reply);
                        }
                    }
                }
                None => {
                    let failed = replies.iter().any(|r| matches!(r, Reply::Error { .. }));
                    if answered >= batch.messages.len() || failed || waited {
                        return Ok(replies);
                    }
                    waited = true;
                    self.wait(ANSWER_WAIT_MS)?;
                }
            }
        }
    }

    fn wait(&self, ms: libc::c_int) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// One datagram from the kernel, parsed; `None` when none is queued.
    fn recv(&mut self, flags: libc::c_int) -> Result<Option<Vec<Reply>>> {
        loop {
            let mut from = kernel();
            let mut len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    flags | libc::MSG_TRUNC,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    // ENOBUFS: answers were dropped, the outcome is unknown.
                    _ => return Err(e.into()),
                }
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(Error::Decode(format!("datagram of {n} bytes truncated")));
            }
            if from.nl_pid != 0 {
                continue; // not from the kernel
            }
            let datagram = self.buf.get(..n).unwrap_or_default();
            return wire::parse_replies(datagram)
                .map(Some)
                .map_err(Error::Decode);
        }
    }
}

/// A starting sequence number that differs between clients, so answers to
/// an earlier client's socket are never mistaken for ours (they cannot
/// reach us anyway: each socket has its own port id).
fn seed() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}
