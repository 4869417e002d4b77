//! Who may pass the entry point: the pure rules (which routes are open,
//! what counts as a credential, how failed attempts slow a client down),
//! with no IO, so that they are tested alone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The session cookie, named as DC/OS's (its UI and CLI send it).
pub const COOKIE: &str = "dcos-acs-auth-cookie";

/// What a request needs to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Open to anyone: the version file and the login form.
    Nothing,
    /// A valid token or session.
    Credential,
}

/// What a route needs: only the version file and the login form are open
/// beyond loopback. From loopback, reads need nothing (as the API's), but
/// only when the request names a loopback host (a page on another site
/// that a browser on the node loads cannot rebind a name of its own onto
/// 127.0.0.1 and read through it) and never for `/service/` (an app's
/// pages, WebSockets included, always need a credential).
pub fn need(path: &str, read: bool, local: bool) -> Need {
    if path == "/dcos-metadata/dcos-version.json" || path == "/login" {
        return Need::Nothing;
    }
    if read && local && !path.starts_with("/service/") {
        return Need::Nothing;
    }
    Need::Credential
}

/// Whether a request comes from loopback *and* names a loopback host
/// (`Host: localhost`, `127.0.0.1`, `[::1]`, with or without a port).
pub fn local(peer: Option<IpAddr>, host: Option<&str>) -> bool {
    let Some(peer) = peer else { return false };
    if !peer.to_canonical().is_loopback() {
        return false;
    }
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The address failures are counted against: IPv4 (mapped or not) as
/// is, IPv6 by its /64 (one host has a whole /64 to pick from).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

/// A credential a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `Authorization: Bearer <token>` or DC/OS's `Authorization: token=<token>`.
    Token(&'a str),
    /// The session cookie's value.
    Session(&'a str),
}

/// The credential of an `Authorization` header value.
pub fn from_authorization(value: &str) -> Option<Credential<'_>> {
    let value = value.trim();
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("token="))?;
    Some(Credential::Token(token.trim()))
}

/// The session cookie's value in a `Cookie` header value (the first).
pub fn from_cookie(value: &str) -> Option<Credential<'_>> {
    sessions_in(value).next().map(Credential::Session)
}

/// Every value of the session cookie in a `Cookie` header value (a page
/// may have set more than one, for other paths).
pub fn sessions_in(value: &str) -> impl Iterator<Item = &str> {
    value.split(';').filter_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == COOKIE && !v.is_empty()).then_some(v)
    })
}

/// Compares without stopping at the first difference (a token is not
/// guessed byte by byte from timings).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A value of an `application/x-www-form-urlencoded` body (the login
/// form's token), decoded; `None` if it is not valid.
pub fn form_value(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Failed attempts per client address: after [`Gate::FREE`] failures
/// within [`Gate::WINDOW`], the address is refused (429) for
/// [`Gate::LOCKOUT`], doubled by every failure after, up to
/// [`Gate::MAX_LOCKOUT`]; a success forgets it. Bounded: beyond
/// [`Gate::MAX_TRACKED`] addresses the quietest are forgotten first.
#[derive(Debug, Default)]
pub struct Gate {
    clients: HashMap<IpAddr, Client>,
}

#[derive(Debug, Clone, Copy)]
struct Client {
    failures: u32,
    first: Instant,
    last: Instant,
    locked_until: Option<Instant>,
}

impl Gate {
    pub const FREE: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(60);
    pub const LOCKOUT: Duration = Duration::from_secs(2);
    pub const MAX_LOCKOUT: Duration = Duration::from_secs(300);
    pub const MAX_TRACKED: usize = 10_000;

    /// `Err(wait)`: refused for that long still.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.clients.get(&ip).and_then(|c| c.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Counts a wrong credential from `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if !self.clients.contains_key(&ip) && self.clients.len() >= Self::MAX_TRACKED {
            self.forget_quietest(now);
        }
        let c = self.clients.entry(ip).or_insert(Client {
            failures: 0,
            first: now,
            last: now,
            locked_until: None,
        });
        if now.duration_since(c.last) > Self::WINDOW && c.locked_until.is_none_or(|u| u <= now) {
            // Quiet for a whole window: old failures are forgiven (a
            // window counted from the first failure would forgive a
            // steady guesser every minute).
            c.failures = 0;
            c.first = now;
        }
        c.failures += 1;
        c.last = now;
        if c.failures > Self::FREE {
            let doublings = (c.failures - Self::FREE - 1).min(16);
            let lockout = Self::LOCKOUT
                .saturating_mul(1 << doublings)
                .min(Self::MAX_LOCKOUT);
            c.locked_until = Some(now + lockout);
        }
    }

    /// A valid credential from `ip`: its failures are forgotten.
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.clients.remove(&ip);
    }

    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    fn forget_quietest(&mut self, now: Instant) {
        // Unlocked ones whose window is over first, then the oldest.
        self.clients.retain(|_, c| {
            c.locked_until.is_some_and(|u| u > now) || now.duration_since(c.first) <= Self::WINDOW
        });
        while self.clients.len() >= Self::MAX_TRACKED {
            let Some(oldest) = self
                .clients
                .iter()
                .min_by_key(|(_, c)| c.last)
                .map(|(ip, _)| *ip)
            else {
                break;
            };
            self.clients.remove(&oldest);
        }
    }
}

/// Sessions made by the login form: random ids, each valid for
/// [`Sessions::LIFETIME`]; at most [`Sessions::MAX`] (the oldest go).
#[derive(Debug, Default)]
pub struct Sessions {
    ids: HashMap<String, Instant>,
}

impl Sessions {
    pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
    pub const MAX: usize = 10_000;

    /// Starts a session with id `id` (32 random bytes, hex).
    pub fn start(&mut self, id: String, now: Instant) {
        self.ids.retain(|_, until| *until > now);
        while self.ids.len() >= Self::MAX {
            let Some(first) = self
                .ids
                .iter()
                .min_by_key(|(_, u)| **u)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.ids.remove(&first);
        }
        self.ids.insert(id, now + Self::LIFETIME);
    }

    pub fn valid(&self, id: &str, now: Instant) -> bool {
        // Looked up by the whole id: a map lookup compares hashes first,
        // and an id is 256 random bits.
        self.ids.get(id).is_some_and(|until| *until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_the_version_file_and_the_login_form_are_open_beyond_loopback() {
        assert_eq!(
            need("/service/web/", true, true),
            Need::Credential,
            "an app's pages"
        );
        assert!(local(Some([127, 0, 0, 1].into()), Some("127.0.0.1:8080")));
        assert!(local(Some([127, 0, 0, 1].into()), Some("localhost")));
        assert!(local(Some("::1".parse().expect("ip")), Some("[::1]:8080")));
        assert!(local(
            Some("::ffff:127.0.0.1".parse().expect("ip")),
            Some("localhost:1")
        ));
        assert!(
            !local(Some([127, 0, 0, 1].into()), Some("evil.example.com")),
            "rebinding"
        );
        assert!(!local(Some([127, 0, 0, 1].into()), None));
        assert!(!local(Some([10, 0, 0, 1].into()), Some("localhost")));
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1".parse().expect("ip")),
            "2001:db8:1:2::".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            client_key("::ffff:10.0.0.1".parse().expect("ip")),
            IpAddr::from([10, 0, 0, 1])
        );
        assert_eq!(
            need("/dcos-metadata/dcos-version.json", true, false),
            Need::Nothing
        );
        assert_eq!(need("/login", false, false), Need::Nothing);
        for path in ["/", "/net/v1/vips", "/metrics", "/overlay-master/state"] {
            assert_eq!(need(path, true, false), Need::Credential, "{path}");
            assert_eq!(
                need(path, true, true),
                Need::Nothing,
                "{path} from loopback"
            );
            assert_eq!(
                need(path, false, true),
                Need::Credential,
                "{path} write from loopback"
            );
        }
    }

    #[test]
    fn credentials_as_dcos_clients_send_them() {
        assert_eq!(
            from_authorization("Bearer abc"),
            Some(Credential::Token("abc"))
        );
        assert_eq!(
            from_authorization("token=abc"),
            Some(Credential::Token("abc"))
        );
        assert_eq!(from_authorization("Basic YWJj"), None);
        assert_eq!(
            from_cookie("a=b; dcos-acs-auth-cookie=s1; c=d"),
            Some(Credential::Session("s1"))
        );
        assert_eq!(from_cookie("dcos-acs-auth-cookie="), None);
        assert_eq!(from_cookie("other=x"), None);
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }

    #[test]
    fn form_values_decode() {
        assert_eq!(form_value("a%2Bb+c").as_deref(), Some("a+b c"));
        assert_eq!(form_value("%zz"), None);
        assert_eq!(form_value("%4"), None);
        assert_eq!(form_value("%C3%A9").as_deref(), Some("é"));
        assert_eq!(form_value("%FF"), None);
    }

    #[test]
    fn sessions_expire() {
        let now = Instant::now();
        let mut s = Sessions::default();
        s.start("x".into(), now);
        assert!(s.valid("x", now));
        assert!(!s.valid("y", now));
        assert!(!s.valid("x", now + Sessions::LIFETIME + Duration::from_secs(1)));
    }

    proptest! {
        /// However failures and successes interleave: never locked with
        /// at most FREE failures since the last success or window start,
        /// always locked right after more, and a lockout never exceeds
        /// the maximum.
        #[test]
        fn the_gate_slows_down_only_repeated_failures(
            steps in proptest::collection::vec((0u8..3, 0u64..20_000), 1..200)
        ) {
            let mut gate = Gate::default();
            let ip: IpAddr = [10, 0, 0, 1].into();
            let start = Instant::now();
            let mut now = start;
            let mut since_success = 0u32;
            let mut last_failure = now;
            for (kind, ms) in steps {
                now += Duration::from_millis(ms);
                if let Err(wait) = gate.check(ip, now) {
                    prop_assert!(wait <= Gate::MAX_LOCKOUT);
                    prop_assert!(since_success > Gate::FREE);
                    continue;
                }
                if kind == 0 {
                    gate.succeeded(ip);
                    since_success = 0;
                } else {
                    // Failures are forgiven after a window without any.
                    if now.duration_since(last_failure) > Gate::WINDOW {
                        since_success = 0;
                    }
                    last_failure = now;
                    gate.failed(ip, now);
                    since_success += 1;
                    if since_success > Gate::FREE {
                        prop_assert!(gate.check(ip, now).is_err());
                    } else {
                        prop_assert!(gate.check(ip, now).is_ok());
                    }
                }
            }
        }
    }

    #[test]
    fn the_gate_is_bounded() {
        let mut gate = Gate::default();
        let now = Instant::now();
        for i in 0..(Gate::MAX_TRACKED as u32 + 50) {
            gate.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(gate.tracked() <= Gate::MAX_TRACKED);
    }
}
