//! Asking an upstream resolver over a few long-lived UDP sockets instead of
//! a fresh socket per query, so that a flood of names for a slow upstream
//! costs no file descriptors; and accepting only replies an off-path
//! attacker cannot easily forge.
//!
//! Every query leaves with an id drawn at random among the ids not in
//! flight on its socket, and the caller may have randomised the letter case
//! of its name (DNS 0x20). The sockets are connected, so the kernel drops
//! datagrams from any other address. A reply is taken only when its id is
//! in flight and its question is the one sent, byte for byte (name, letter
//! case, type, class); anything else is dropped and counted, and the query
//! keeps waiting for the real answer. A socket is replaced (a new source
//! port) after some use, and lingers until the queries sent on it are done.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};

use crate::server::{DnsStats, FORWARD_DEADLINE};
use crate::wire::HEADER;

/// UDP sockets per upstream, shared by every query sent to it.
pub const SOCKETS_PER_UPSTREAM: usize = 4;
/// A socket is replaced once it has sent this many queries and is at
/// least [`ROTATE_MIN_AGE`] old, or once it is [`ROTATE_MAX_AGE`] old: the
/// source port does not stay the same for long, and a replaced socket
/// lingers ([`LINGER`]) so at most a few per slot are open at once.
const ROTATE_AFTER: u64 = 256;
const ROTATE_MIN_AGE: Duration = Duration::from_secs(2);
const ROTATE_MAX_AGE: Duration = Duration::from_secs(60);
/// How long a replaced socket still takes replies to the queries sent on
/// it (it closes earlier once none is waiting).
const LINGER: Duration = FORWARD_DEADLINE.saturating_add(Duration::from_secs(1));
/// How often a replaced socket's reader looks whether it is done.
const TICK: Duration = Duration::from_millis(250);
/// The largest UDP message.
const MAX_MESSAGE: usize = 65_535;

/// Numbers an off-path attacker cannot predict: a keyed hash (SipHash,
/// under std's random keys) of a secret seed from the OS and a counter.
pub struct Rng {
    keys: RandomState,
    seed: [u8; 32],
    counter: AtomicU64,
}

impl Default for Rng {
    fn default() -> Self {
        let mut seed = [0u8; 32];
        if let Err(e) = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        {
            // std's keys alone are random too.
            tracing::debug!(error = %e, "no /dev/urandom for the DNS query ids");
        }
        Rng {
            keys: RandomState::new(),
            seed,
            counter: AtomicU64::new(0),
        }
    }
}

impl Rng {
    pub fn next_u64(&self) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write(&self.seed);
        h.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        h.finish()
    }
}

/// Flips the case of each letter of `name` (a wire-format name: its label
/// lengths are below 64, so never letters) at random: DNS 0x20.
pub fn randomize_case(name: &mut [u8], rng: &Rng) {
    let (mut bits, mut left) = (0u64, 0u32);
    for b in name.iter_mut().filter(|b| b.is_ascii_alphabetic()) {
        if left == 0 {
            bits = rng.next_u64();
            left = 64;
        }
        if bits & 1 == 1 {
            *b ^= 0x20;
        }
        bits >>= 1;
        left -= 1;
    }
}

/// What became of a query.
#[derive(Debug)]
pub enum Reply {
    /// The upstream's answer, as received (our id, our letter case).
    Answer(Vec<u8>),
    /// The upstream refused it: an error without a question, or the port
    /// is closed (ICMP).
    Failed,
}

/// Whether `msg` is a response to a standard query whose only question is
/// `question`, byte for byte.
pub fn answers(msg: &[u8], question: &[u8]) -> bool {
    msg.len() >= HEADER
        && msg[2] & 0xF8 == 0x80
        && msg[4..6] == [0, 1]
        && msg.get(HEADER..HEADER + question.len()) == Some(question)
}

/// A response without a question saying the upstream will not answer
/// (FORMERR, SERVFAIL, NOTIMP, REFUSED): nothing to cache, but no reason
/// to wait for the deadline either.
fn refuses(msg: &[u8]) -> bool {
    msg.len() >= HEADER && msg[2] & 0xF8 == 0x80 && msg[4..6] == [0, 0] && {
        let rcode = msg[3] & 0x0F;
        (1..=5).contains(&rcode) && rcode != 3
    }
}

struct Pending {
    /// Tells this entry from a later one that reuses the id.
    token: u64,
    /// The question section as sent.
    question: Box<[u8]>,
    /// Which of the caller's upstreams this is.
    index: usize,
    tx: mpsc::Sender<(usize, Reply)>,
}

/// One connected UDP socket and the queries waiting on it.
struct Conn {
    socket: UdpSocket,
    pending: Mutex<HashMap<u16, Pending>>,
    opened: Instant,
    sent: AtomicU64,
    /// Set when replaced: the reader ends once nothing waits or after
    /// [`LINGER`].
    retired: Mutex<Option<Instant>>,
    /// Wakes the reader when the socket is replaced.
    wake: Notify,
}

impl Conn {
    fn open(addr: SocketAddr, stats: &Arc<DnsStats>) -> std::io::Result<Arc<Conn>> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(bind)?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        let conn = Arc::new(Conn {
            socket: UdpSocket::from_std(socket)?,
            pending: Mutex::default(),
            opened: Instant::now(),
            sent: AtomicU64::new(0),
            retired: Mutex::default(),
            wake: Notify::new(),
        });
        tokio::spawn(receive(conn.clone(), stats.clone()));
        Ok(conn)
    }

    fn due(&self, now: Instant) -> bool {
        let age = now.saturating_duration_since(self.opened);
        (self.sent.load(Ordering::Relaxed) >= ROTATE_AFTER && age >= ROTATE_MIN_AGE)
            || age >= ROTATE_MAX_AGE
    }

    fn retire(&self, now: Instant) {
        if let Ok(mut r) = self.retired.lock() {
            r.get_or_insert(now);
        }
        self.wake.notify_one();
    }

    fn retired(&self) -> bool {
        self.retired.lock().map_or(true, |r| r.is_some())
    }

    /// Whether the reader may stop: replaced, and nothing waits or it has
    /// lingered long enough.
    fn done(&self) -> bool {
        let Some(since) = self.retired.lock().ok().and_then(|r| *r) else {
            return false;
        };
        since.elapsed() >= LINGER || self.pending.lock().map_or(true, |p| p.is_empty())
    }

    fn deliver(&self, msg: &[u8], stats: &DnsStats) {
        let Some(&[a, b]) = msg.get(..2) else {
            stats.rejected_replies.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let id = u16::from_be_bytes([a, b]);
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let reply = match pending.get(&id) {
            Some(p) if answers(msg, &p.question) => Reply::Answer(msg.to_vec()),
            Some(_) if refuses(msg) => Reply::Failed,
            _ => {
                drop(pending);
                stats.rejected_replies.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    id,
                    len = msg.len(),
                    "upstream reply dropped: unknown id or another question"
                );
                return;
            }
        };
        if let Some(p) = pending.remove(&id) {
            drop(pending);
            let _ = p.tx.try_send((p.index, reply));
        }
    }

    /// The upstream's port is closed: every query waiting here fails.
    fn refused(&self) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        for (_, p) in pending.drain() {
            let _ = p.tx.try_send((p.index, Reply::Failed));
        }
    }
}

async fn receive(conn: Arc<Conn>, stats: Arc<DnsStats>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        if conn.done() {
            return;
        }
        // In use: wait for a reply or the replacement. Replaced: look
        // again every tick whether anything still waits.
        let received = if conn.retired() {
            tokio::time::timeout(TICK, conn.socket.recv(&mut buf)).await
        } else {
            tokio::select! {
                r = conn.socket.recv(&mut buf) => Ok(r),
                _ = conn.wake.notified() => continue,
            }
        };
        match received {
            Err(_) => {}
            Ok(Ok(n)) => conn.deliver(&buf[..n], &stats),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => conn.refused(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream socket receive error");
                // Whatever it is, do not spin on it.
                tokio::time::sleep(TICK / 10).await;
            }
        }
    }
}

/// A query in flight; dropping it forgets the query (a reply that comes
/// later is dropped as unknown).
pub struct InFlight {
    conn: Arc<Conn>,
    id: u16,
    token: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.conn.pending.lock() {
            if pending.get(&self.id).is_some_and(|p| p.token == self.token) {
                pending.remove(&self.id);
            }
        }
    }
}

/// The sockets of one upstream, opened on first use.
pub struct Pool {
    addr: SocketAddr,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.addr)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The readers end once the queries still waiting are done.
        let now = Instant::now();
        for slot in &self.slots {
            if let Some(conn) = slot.lock().ok().and_then(|mut s| s.take()) {
                conn.retire(now);
            }
        }
    }
}

impl Pool {
    pub fn new(addr: SocketAddr) -> Pool {
        Pool {
            addr,
            slots: (0..SOCKETS_PER_UPSTREAM)
                .map(|_| Mutex::default())
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next socket in turn, opened or replaced (as of `now`) if need
    /// be.
    fn conn(&self, stats: &Arc<DnsStats>, now: Instant) -> std::io::Result<Arc<Conn>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i]
            .lock()
            .map_err(|_| std::io::Error::other("upstream socket slot poisoned"))?;
        match slot.as_ref() {
            Some(conn) if !conn.due(now) => return Ok(conn.clone()),
            _ => {}
        }
        match Conn::open(self.addr, stats) {
            Ok(fresh) => {
                if let Some(old) = slot.replace(fresh.clone()) {
                    old.retire(now);
                }
                Ok(fresh)
            }
            // Out of descriptors, say: keep using the old socket if any.
            Err(e) => slot.clone().ok_or(e),
        }
    }

    /// Sends `query` (whose question section ends at `question_end`) under
    /// a fresh random id; its reply, or its failure, is sent to `tx` with
    /// `index`. The query waits until the returned [`InFlight`] is dropped.
    pub async fn send(
        &self,
        mut query: Vec<u8>,
        question_end: usize,
        index: usize,
        tx: mpsc::Sender<(usize, Reply)>,
        stats: &Arc<DnsStats>,
        rng: &Rng,
    ) -> std::io::Result<InFlight> {
        let question: Box<[u8]> = query
            .get(HEADER..question_end)
            .ok_or_else(|| std::io::Error::other("no question to send"))?
            .into();
        let conn = self.conn(stats, Instant::now())?;
        let token = rng.next_u64();
        let id = {
            let mut pending = conn
                .pending
                .lock()
                .map_err(|_| std::io::Error::other("upstream queries poisoned"))?;
            let id = (0..16)
                .map(|_| rng.next_u64() as u16)
                .find(|id| !pending.contains_key(id))
                .ok_or_else(|| std::io::Error::other("no free query id"))?;
            pending.insert(
                id,
                Pending {
                    token,
                    question,
                    index,
                    tx,
                },
            );
            id
        };
        // From here on, dropping the guard forgets the query.
        let in_flight = InFlight { conn, id, token };
        query[..2].copy_from_slice(&id.to_be_bytes());
        in_flight.conn.sent.fetch_add(1, Ordering::Relaxed);
        in_flight.conn.socket.send(&query).await?;
        Ok(in_flight)
    }

    /// Queries waiting over every socket (for tests).
    pub fn waiting(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.lock().ok()?.clone())
            .map(|c| c.pending.lock().map_or(0, |p| p.len()))
            .sum()
    }

    /// Sockets open now (for tests; lingering replaced ones not counted).
    pub fn open_sockets(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.lock().is_ok_and(|s| s.is_some()))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &[u8]) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
        q
    }

    fn response_to(q: &[u8]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r
    }

    #[test]
    fn only_the_question_sent_byte_for_byte_is_an_answer() {
        let q = query(7, b"\x03Www\x07exAmple\x03com\x00");
        let section = &q[HEADER..];
        assert!(answers(&response_to(&q), section));
        assert!(!answers(&q, section), "a query is no answer");
        let mut other_case = response_to(&q);
        other_case[HEADER + 1] = b'w';
        assert!(!answers(&other_case, section));
        let mut other_type = response_to(&q);
        let n = other_type.len();
        other_type[n - 3] = 28;
        assert!(!answers(&other_type, section));
        let mut two_questions = response_to(&q);
        two_questions[5] = 2;
        assert!(!answers(&two_questions, section));
        let mut opcode = response_to(&q);
        opcode[2] |= 0x10;
        assert!(!answers(&opcode, section));
        for short in 0..response_to(&q).len() {
            assert!(!answers(&response_to(&q)[..short], section));
        }
        let mut refused = response_to(&q)[..HEADER].to_vec();
        refused[5] = 0;
        refused[3] = 5;
        assert!(refuses(&refused));
        refused[3] = 3; // NXDOMAIN needs its question
        assert!(!refuses(&refused));
    }

    #[test]
    fn case_randomisation_touches_letters_only_and_varies() {
        let rng = Rng::default();
        let name = b"\x03www\x07example\x03com\x00".to_vec();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut n = name.clone();
            randomize_case(&mut n, &rng);
            assert!(n.eq_ignore_ascii_case(&name));
            assert_eq!(n.len(), name.len());
            seen.insert(n);
        }
        assert!(seen.len() > 32, "only {} variants in 64", seen.len());
        let mut digits = b"\x011\x012\x00".to_vec();
        randomize_case(&mut digits, &rng);
        assert_eq!(digits, b"\x011\x012\x00");
    }

    #[tokio::test]
    async fn forgotten_queries_leave_nothing_behind_and_late_replies_are_dropped() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("upstream");
        let pool = Pool::new(upstream.local_addr().expect("addr"));
        let stats = Arc::new(DnsStats::default());
        let rng = Rng::default();
        let (tx, mut rx) = mpsc::channel(4);
        let name = b"\x04late\x04test\x00";
        let q = query(1, name);
        let first = pool
            .send(q.clone(), q.len(), 0, tx.clone(), &stats, &rng)
            .await
            .expect("sent");
        let mut buf = [0u8; 512];
        let (n, from) = upstream.recv_from(&mut buf).await.expect("query");
        assert_eq!(&buf[HEADER..n], &q[HEADER..]);
        assert_eq!(pool.waiting(), 1);
        drop(first);
        assert_eq!(pool.waiting(), 0, "a forgotten query leaves no entry");
        // Its reply, late: dropped and counted.
        upstream
            .send_to(&response_to(&buf[..n]), from)
            .await
            .expect("reply");
        // A second query on the same socket gets its own reply through.
        for _ in 1..SOCKETS_PER_UPSTREAM {
            drop(
                pool.send(q.clone(), q.len(), 0, tx.clone(), &stats, &rng)
                    .await,
            );
        }
        let second = pool
            .send(q.clone(), q.len(), 1, tx.clone(), &stats, &rng)
            .await
            .expect("sent");
        let mut seen = 0;
        let (n, from) = loop {
            let (n, from) = upstream.recv_from(&mut buf).await.expect("query");
            seen += 1;
            if seen == SOCKETS_PER_UPSTREAM {
                break (n, from);
            }
        };
        upstream
            .send_to(&response_to(&buf[..n]), from)
            .await
            .expect("reply");
        let (index, reply) = rx.recv().await.expect("a reply");
        assert_eq!(index, 1);
        assert!(matches!(reply, Reply::Answer(a) if a == response_to(&buf[..n])));
        assert_eq!(
            stats.rejected_replies.load(Ordering::Relaxed),
            1,
            "the late reply"
        );
        drop(second);
        assert_eq!(pool.waiting(), 0);
        assert_eq!(pool.open_sockets(), SOCKETS_PER_UPSTREAM);
    }

    #[tokio::test]
    async fn a_replaced_socket_takes_its_replies_then_closes() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("upstream");
        let pool = Pool::new(upstream.local_addr().expect("addr"));
        let stats = Arc::new(DnsStats::default());
        let rng = Rng::default();
        let (tx, mut rx) = mpsc::channel(4);
        let q = query(1, b"\x04slow\x04test\x00");
        let waiting = pool
            .send(q.clone(), q.len(), 0, tx, &stats, &rng)
            .await
            .expect("sent");
        let old = Arc::downgrade(&waiting.conn);
        let mut buf = [0u8; 512];
        let (n, from) = upstream.recv_from(&mut buf).await.expect("query");
        // Slot 0 again, a minute on: replaced, with a new source port.
        for _ in 1..SOCKETS_PER_UPSTREAM {
            pool.conn(&stats, Instant::now()).expect("socket");
        }
        let fresh = pool
            .conn(&stats, Instant::now() + ROTATE_MAX_AGE)
            .expect("socket");
        assert!(!Arc::ptr_eq(&fresh, &waiting.conn));
        assert_ne!(
            fresh.socket.local_addr().expect("addr"),
            waiting.conn.socket.local_addr().expect("addr")
        );
        // The replaced socket still takes the reply to what it sent...
        upstream
            .send_to(&response_to(&buf[..n]), from)
            .await
            .expect("reply");
        let (_, reply) = rx.recv().await.expect("the reply");
        assert!(matches!(reply, Reply::Answer(_)));
        drop(waiting);
        // ...and then closes.
        let start = Instant::now();
        while old.strong_count() > 0 {
            assert!(start.elapsed() < LINGER, "the replaced socket stays open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.open_sockets(), SOCKETS_PER_UPSTREAM);
    }
}
