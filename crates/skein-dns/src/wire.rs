//! Reading DNS messages in wire format without decoding them into hickory
//! types: the question of a query, and where the TTL fields of a response
//! are. Pure and total (any input, no panic), so a cache hit never builds a
//! message: it copies bytes and patches a few of them.

/// Header length.
pub const HEADER: usize = 12;
/// The OPT pseudo-record (EDNS), whose "TTL" holds flags, not a TTL.
pub const TYPE_OPT: u16 = 41;
/// The EDNS COOKIE option (RFC 7873): per client, never served from a cache.
const OPTION_COOKIE: u16 = 10;
/// Longest name in wire format (RFC 1035 §2.3.4).
pub const MAX_NAME: usize = 255;

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    let b = msg.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    let b = msg.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The offset just past the (possibly compressed) name at `at`. Pointers
/// end a name and are not followed: the name is skipped, not read.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    // Each step consumes at least one byte, so this ends.
    loop {
        let len = *msg.get(at)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => at += 1 + usize::from(len),
            0xC0 => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None, // extended label types: not in use
        }
    }
}

/// The length of the uncompressed name at `at` (a query's question name).
fn plain_name_len(msg: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            let n = pos + 1 - at;
            return (n <= MAX_NAME).then_some(n);
        }
        if len > 63 {
            return None; // a pointer or an extended label
        }
        pos += 1 + len;
        if pos - at > MAX_NAME {
            return None;
        }
    }
}

/// What a client asked with EDNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The client's UDP payload size.
    pub payload: u16,
    /// DNSSEC OK.
    pub dnssec_ok: bool,
}

/// A plain query's only question, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Question<'a> {
    /// The whole query.
    pub message: &'a [u8],
    /// The question section as sent: name (uncompressed), type, class.
    pub section: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// The CD bit: a validating upstream answers differently.
    pub checking_disabled: bool,
}

impl Question<'_> {
    /// The question's name in wire format, as sent.
    pub fn name(&self) -> &[u8] {
        &self.section[..self.section.len() - 4]
    }

    /// The largest UDP answer the client takes (at least 512).
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(crate::answer::PLAIN_UDP_SIZE, |e| {
            usize::from(e.payload.max(512))
        })
    }

    /// The cache key: what, besides the name's letter case, changes the
    /// upstream's answer. Written into `out`, which it returns as a slice.
    pub fn key<'k>(&self, out: &'k mut KeyBuf) -> &'k [u8] {
        let flags = u8::from(self.edns.is_some())
            | u8::from(self.edns.is_some_and(|e| e.dnssec_ok)) << 1
            | u8::from(self.checking_disabled) << 2;
        let name = self.name();
        let b = &mut out.0;
        b[0] = flags;
        b[1..3].copy_from_slice(&self.qtype.to_be_bytes());
        b[3..5].copy_from_slice(&self.qclass.to_be_bytes());
        // Label lengths (< 64) are below 'A', so lowercasing the whole wire
        // name only touches letters.
        for (d, s) in b[5..].iter_mut().zip(name) {
            *d = s.to_ascii_lowercase();
        }
        &b[..5 + name.len()]
    }
}

/// Room for a cache key: flags, type, class and a name.
pub struct KeyBuf([u8; 5 + MAX_NAME]);

impl Default for KeyBuf {
    fn default() -> Self {
        KeyBuf([0; 5 + MAX_NAME])
    }
}

/// Reads a standard query with one question and at most an OPT record;
/// `None` for anything else (responses, other opcodes, several questions,
/// records besides OPT, compressed or oversized names, trailing bytes). Those
/// take the slow path, which decodes the message.
pub fn parse_query(msg: &[u8]) -> Option<Question<'_>> {
    let head = msg.get(..HEADER)?;
    let (flags, counts) = (&head[2..4], &head[4..12]);
    // QR = 0 and OPCODE = QUERY (0).
    if flags[0] & 0xF8 != 0 {
        return None;
    }
    if counts[..6] != [0, 1, 0, 0, 0, 0] || counts[6] != 0 || counts[7] > 1 {
        return None;
    }
    let name_len = plain_name_len(msg, HEADER)?;
    let end = HEADER + name_len + 4;
    let section = msg.get(HEADER..end)?;
    let qtype = u16_at(msg, end - 4)?;
    let qclass = u16_at(msg, end - 2)?;
    let mut edns = None;
    let mut pos = end;
    if counts[7] == 1 {
        // Root owner name, then type, class (payload), TTL (flags), RDLENGTH.
        if msg.get(pos) != Some(&0) || u16_at(msg, pos + 1)? != TYPE_OPT {
            return None;
        }
        let payload = u16_at(msg, pos + 3)?;
        let ttl = u32_at(msg, pos + 5)?;
        let rdlength = usize::from(u16_at(msg, pos + 9)?);
        pos += 11 + rdlength;
        edns = Some(Edns {
            payload,
            dnssec_ok: ttl & 0x8000 != 0,
        });
    }
    if pos != msg.len() {
        return None;
    }
    Some(Question {
        message: msg,
        section,
        qtype,
        qclass,
        edns,
        checking_disabled: flags[1] & 0x10 != 0,
    })
}

/// The end of a message's question section when it holds one question
/// with an uncompressed name (as every query does): the bytes an upstream's
/// answer must echo. `None` otherwise.
pub fn question_end(msg: &[u8]) -> Option<usize> {
    if msg.get(4..6)? != [0, 1] {
        return None;
    }
    let end = HEADER + plain_name_len(msg, HEADER)? + 4;
    (end <= msg.len()).then_some(end)
}

/// Where things are in a response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// End of the question section.
    pub question_end: usize,
    /// Offsets of the TTL field of every record but OPT.
    pub ttls: Vec<u16>,
    /// The OPT record's byte range, if any.
    pub opt: Option<(usize, usize)>,
}

/// Walks a response's sections; `None` unless every count, name and
/// RDLENGTH fits the message exactly (no trailing bytes).
pub fn parse_layout(msg: &[u8]) -> Option<Layout> {
    if msg.len() < HEADER || msg.len() > usize::from(u16::MAX) {
        return None;
    }
    let count = |i: usize| u16_at(msg, 4 + 2 * i).map(usize::from);
    let (qd, an, ns, ar) = (count(0)?, count(1)?, count(2)?, count(3)?);
    let mut pos = HEADER;
    for _ in 0..qd {
        pos = skip_name(msg, pos)?.checked_add(4)?;
        if pos > msg.len() {
            return None;
        }
    }
    let mut layout = Layout {
        question_end: pos,
        ttls: Vec::with_capacity(an + ns + ar),
        opt: None,
    };
    for i in 0..an + ns + ar {
        let start = pos;
        let fixed = skip_name(msg, pos)?;
        let rtype = u16_at(msg, fixed)?;
        let rdlength = usize::from(u16_at(msg, fixed + 8)?);
        pos = fixed + 10 + rdlength;
        if pos > msg.len() {
            return None;
        }
        if rtype == TYPE_OPT && i >= an + ns {
            if layout.opt.is_some() {
                return None; // at most one OPT (RFC 6891 §6.1.1)
            }
            layout.opt = Some((start, pos));
        } else {
            layout.ttls.push(u16::try_from(fixed + 4).ok()?);
        }
    }
    (pos == msg.len()).then_some(layout)
}

/// Drops COOKIE options from the OPT record when it is the last record (as
/// it is unless the message is signed): a cached copy must not hand one
/// client's server cookie to another. `false` when a cookie had to stay.
pub fn strip_cookie(msg: &mut Vec<u8>, opt: (usize, usize)) -> bool {
    let (start, end) = opt;
    // The OPT record's owner is the root name, one zero byte (RFC 6891
    // §6.1.2); any other owner (a compression pointer, a label) would put
    // the options elsewhere than start + 11: such a message is not touched
    // (nor cached).
    let rdata = start + 11;
    if end != msg.len() || rdata > end || msg.get(start) != Some(&0) {
        return false;
    }
    let mut kept = Vec::new();
    let mut had_cookie = false;
    let mut pos = rdata;
    while pos < end {
        let (Some(code), Some(len)) = (u16_at(msg, pos), u16_at(msg, pos + 2)) else {
            return false;
        };
        let next = pos + 4 + usize::from(len);
        let Some(option) = msg.get(pos..next) else {
            return false;
        };
        if code == OPTION_COOKIE {
            had_cookie = true;
        } else {
            kept.extend_from_slice(option);
        }
        pos = next;
    }
    if had_cookie {
        let Ok(len) = u16::try_from(kept.len()) else {
            return false;
        };
        msg.truncate(rdata);
        msg.extend_from_slice(&kept);
        msg[rdata - 2..rdata].copy_from_slice(&len.to_be_bytes());
    }
    true
}

/// [`crate::answer::ZONES`] in wire format (checked by a test).
const WIRE_ZONES: [&[u8]; 3] = [
    b"\x05mesos\x00",
    b"\x08thisdcos\x09directory\x00",
    b"\x07spartan\x00",
];

/// Whether the uncompressed wire name `name` is in one of our zones
/// (the same test as [`crate::answer::zone_of`], on wire bytes).
pub fn in_our_zones(name: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&len) = name.get(at) {
        let rest = &name[at..];
        if WIRE_ZONES.iter().any(|z| rest.eq_ignore_ascii_case(z)) {
            return true;
        }
        if len == 0 {
            break;
        }
        at += 1 + usize::from(len);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns as HEdns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;

    fn query(name: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut q = Message::query();
        q.metadata.id = 0x1234;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        if let Some((size, dnssec_ok)) = edns {
            let mut e = HEdns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(dnssec_ok);
            q.set_edns(e);
        }
        q.to_vec().expect("encode")
    }

    #[test]
    fn queries_are_read_in_place() {
        let bytes = query("WWW.Example.com.", RecordType::AAAA, None);
        let q = parse_query(&bytes).expect("plain query");
        assert_eq!(q.name(), b"\x03WWW\x07Example\x03com\x00");
        assert_eq!((q.qtype, q.qclass, q.edns), (28, 1, None));
        assert_eq!(q.udp_limit(), 512);
        let mut k = KeyBuf::default();
        assert_eq!(&q.key(&mut k)[5..], b"\x03www\x07example\x03com\x00");

        let bytes = query("example.com.", RecordType::A, Some((1232, true)));
        let q = parse_query(&bytes).expect("EDNS query");
        assert_eq!(
            q.edns,
            Some(Edns {
                payload: 1232,
                dnssec_ok: true
            })
        );
        assert_eq!(q.udp_limit(), 1232);
        let plain = query("example.com.", RecordType::A, None);
        let (mut k1, mut k2) = (KeyBuf::default(), KeyBuf::default());
        assert_ne!(
            q.key(&mut k1),
            parse_query(&plain).expect("q").key(&mut k2),
            "EDNS/DO is part of the key"
        );

        // Not plain queries: the slow path decides.
        let mut response = bytes.clone();
        response[2] |= 0x80;
        assert!(parse_query(&response).is_none());
        let mut trailing = plain.clone();
        trailing.push(0);
        assert!(parse_query(&trailing).is_none());
        assert!(parse_query(&plain[..plain.len() - 1]).is_none());
    }

    /// The wire form of a dotted name (`mesos.` → `\x05mesos\x00`).
    fn wire_name(dotted: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in dotted.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    #[test]
    fn zones_match_on_label_boundaries() {
        let ours: Vec<Vec<u8>> = crate::answer::ZONES.iter().map(|z| wire_name(z)).collect();
        assert_eq!(ours, WIRE_ZONES.map(<[u8]>::to_vec));
        let wire = |s: &str| wire_name(s);
        for (name, ours) in [
            ("mesos.", true),
            ("app.marathon.MESOS.", true),
            ("x.l4lb.thisdcos.directory.", true),
            ("ready.spartan.", true),
            ("notmesos.", false),
            ("mesos.example.com.", false),
            ("directory.", false),
            (".", false),
        ] {
            assert_eq!(in_our_zones(&wire(name)), ours, "{name}");
            assert_eq!(
                crate::answer::zone_of(&name.to_ascii_lowercase()).is_some(),
                ours,
                "{name}: same as zone_of"
            );
        }
    }

    #[test]
    fn an_opt_record_not_owned_by_the_root_is_left_alone() {
        // Found by the dns_wire_cache fuzzer: an OPT record owned by a name
        // (not the root) had its options read from its fixed fields, found
        // a "cookie" there, and the stripped message no longer parsed.
        let mut msg = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        msg.extend_from_slice(&[7, 101, 120, 97, 109, 112, 216, 3, 0]);
        msg.extend_from_slice(&[0, 41, 4, 208, 0, 0, 0, 10, 0, 0]);
        let layout = parse_layout(&msg).expect("a well-formed message");
        let opt = layout.opt.expect("an OPT record");
        let before = msg.clone();
        assert!(!strip_cookie(&mut msg, opt));
        assert_eq!(msg, before, "left as it was");
        // Owned by the root, with a COOKIE option: the cookie goes, the
        // rest still reads.
        let mut rooted = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        rooted.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 12]);
        rooted.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let opt = parse_layout(&rooted).expect("reads").opt.expect("OPT");
        assert!(strip_cookie(&mut rooted, opt));
        assert_eq!(rooted.len(), 12 + 11);
        parse_layout(&rooted).expect("still reads");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Arbitrary bytes: the parsers answer or decline, never panic, and
        /// whatever offsets they return lie inside the message.
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Some(layout) = parse_layout(&bytes) {
                prop_assert!(layout.question_end <= bytes.len());
                for &t in &layout.ttls {
                    prop_assert!(usize::from(t) + 4 <= bytes.len());
                }
                if let Some(opt) = layout.opt {
                    prop_assert!(opt.0 < opt.1 && opt.1 <= bytes.len());
                    let len = bytes.len();
                    if strip_cookie(&mut bytes, opt) && bytes.len() != len {
                        prop_assert!(parse_layout(&bytes).is_some(), "stripped, still reads");
                    }
                }
            }
            if let Some(end) = question_end(&bytes) {
                prop_assert!(end > HEADER + 4 && end <= bytes.len());
            }
            if let Some(q) = parse_query(&bytes) {
                prop_assert_eq!(question_end(&bytes), Some(HEADER + q.section.len()));
                prop_assert!(q.section.len() >= 5);
                in_our_zones(q.name());
                q.key(&mut KeyBuf::default());
            }
        }

        /// Headers that claim records, with random bodies: the same.
        #[test]
        fn random_bodies_behind_plausible_headers_never_panic(
            counts in prop::array::uniform4(0u16..4),
            body in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = vec![0x12, 0x34, 0x81, 0x80];
            for c in counts {
                bytes.extend_from_slice(&c.to_be_bytes());
            }
            bytes.extend_from_slice(&body);
            if let Some(layout) = parse_layout(&bytes) {
                for &t in &layout.ttls {
                    prop_assert!(usize::from(t) + 4 <= bytes.len());
                }
            }
            let _ = parse_query(&bytes);
        }
    }
}
