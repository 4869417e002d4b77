//! Byte-level tests: the batch against what `nft` 1.0.6 sends for the same
//! elements (captured with `strace -e write=3`), the kernel's answers as
//! captured from a 6.x kernel, and a property test that the reply parser
//! never panics.

use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;
use crate::Component::{Ipv4, Port, Proto, U32};

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect()
}

/// `nft -f` of
///
/// ```text
/// add element ip skein tcp2 { 11.1.2.5 . 3141 }
/// add element ip skein tcp_backends { 11.1.2.3 . 3141 . 1 : 10.0.0.2 . 9896 }
/// add element ip skein hairpin { 10.0.0.4 . 11.1.2.3 . tcp . 3141 }
/// delete element ip skein tcp_backends { 11.1.2.3 . 3141 . 1 }
/// ```
///
/// as nft 1.0.6 sent it (x86-64, little-endian host).
const NFT_BATCH: &str = "
14 00 00 00 10 00 01 00  00 00 00 00 00 00 00 00  00 00 00 0a
4c 00 00 00 0c 0a 01 04  01 00 00 00 00 00 00 00  02 00 00 00
  0a 00 01 00 73 6b 65 69 6e 00 00 00
  09 00 02 00 74 63 70 32 00 00 00 00
  08 00 04 00 00 00 00 01
  18 00 03 80 14 00 01 80 10 00 01 80 0c 00 01 00  0b 01 02 05 0c 45 00 00
68 00 00 00 0c 0a 01 04  02 00 00 00 00 00 00 00  02 00 00 00
  0a 00 01 00 73 6b 65 69 6e 00 00 00
  11 00 02 00 74 63 70 5f 62 61 63 6b 65 6e 64 73 00 00 00 00
  08 00 04 00 00 00 00 02
  2c 00 03 80 28 00 01 80 14 00 01 80 10 00 01 00  0b 01 02 03 0c 45 00 00 01 00 00 00
    10 00 02 80 0c 00 01 00 0a 00 00 02 26 a8 00 00
54 00 00 00 0c 0a 01 04  03 00 00 00 00 00 00 00  02 00 00 00
  0a 00 01 00 73 6b 65 69 6e 00 00 00
  0c 00 02 00 68 61 69 72 70 69 6e 00
  08 00 04 00 00 00 00 03
  20 00 03 80 1c 00 01 80 18 00 01 80 14 00 01 00  0a 00 00 04 0b 01 02 03 06 00 00 00 0c 45 00 00
50 00 00 00 0e 0a 01 00  04 00 00 00 00 00 00 00  02 00 00 00
  0a 00 01 00 73 6b 65 69 6e 00 00 00
  11 00 02 00 74 63 70 5f 62 61 63 6b 65 6e 64 73 00 00 00 00
  1c 00 03 80 18 00 01 80 14 00 01 80 10 00 01 00  0b 01 02 03 0c 45 00 00 01 00 00 00
14 00 00 00 11 00 01 00  05 00 00 00 00 00 00 00  00 00 00 0a
";

/// What we send differs from nft's batch in two ways only: every element
/// message asks for an ack (`NLM_F_ACK`), and we leave out
/// `NFTA_SET_ELEM_LIST_SET_ID` (type 4, the set's id within nft's own
/// batch, used only for sets created in the same batch).
fn as_we_send(nft: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < nft.len() {
        let len = u32::from_ne_bytes(nft[off..off + 4].try_into().unwrap()) as usize;
        let msg = &nft[off..off + len];
        let kind = u16::from_ne_bytes(msg[4..6].try_into().unwrap());
        let mut m = msg[..20].to_vec();
        if kind >> 8 == NFNL_SUBSYS_NFTABLES {
            let flags = u16::from_ne_bytes(m[6..8].try_into().unwrap()) | NLM_F_ACK;
            m[6..8].copy_from_slice(&flags.to_ne_bytes());
            let mut a = 20;
            while a < len {
                let alen = u16::from_ne_bytes(msg[a..a + 2].try_into().unwrap()) as usize;
                let akind = u16::from_ne_bytes(msg[a + 2..a + 4].try_into().unwrap());
                if akind != 4 {
                    m.extend_from_slice(&msg[a..a + align4(alen)]);
                }
                a += align4(alen);
            }
            let new_len = m.len() as u32;
            m[..4].copy_from_slice(&new_len.to_ne_bytes());
        }
        out.extend(m);
        off += align4(len);
    }
    out
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Component {
    Ipv4(Ipv4Addr::new(a, b, c, d))
}

fn captured_ops() -> Vec<ElementOp> {
    vec![
        ElementOp::add("tcp2", vec![ip(11, 1, 2, 5), Port(3141)], None),
        ElementOp::add(
            "tcp_backends",
            vec![ip(11, 1, 2, 3), Port(3141), U32(1)],
            Some(vec![ip(10, 0, 0, 2), Port(9896)]),
        ),
        ElementOp::add(
            "hairpin",
            vec![ip(10, 0, 0, 4), ip(11, 1, 2, 3), Proto(6), Port(3141)],
            None,
        ),
        ElementOp::delete("tcp_backends", vec![ip(11, 1, 2, 3), Port(3141), U32(1)]),
    ]
}

#[test]
#[cfg(target_endian = "little")]
fn batch_is_what_nft_sends() {
    let batch = encode_batch("skein", &captured_ops(), 0).expect("encodes");
    assert_eq!(batch.bytes, as_we_send(&hex(NFT_BATCH)));
    assert_eq!((batch.begin_seq, batch.end_seq), (0, 5));
    assert_eq!(
        batch
            .messages
            .iter()
            .map(|m| m.ops.clone())
            .collect::<Vec<_>>(),
        vec![0..1, 1..2, 2..3, 3..4]
    );
    // The element attribute of the delete, as the kernel's extended ack
    // names it below: after header, nfgenmsg, table and set name, and the
    // ELEMENTS nest header.
    assert_eq!(batch.messages[3].element_offsets, vec![56]);
}

/// `nft flush set ip skein tcp2` as nft 1.0.6 sent it.
const NFT_FLUSH: &str = "
14 00 00 00 10 00 01 00  00 00 00 00 00 00 00 00  00 00 00 0a
2c 00 00 00 0e 0a 01 00  01 00 00 00 00 00 00 00  02 00 00 00
  09 00 02 00 74 63 70 32 00 00 00 00
  0a 00 01 00 73 6b 65 69 6e 00 00 00
14 00 00 00 11 00 01 00  02 00 00 00 00 00 00 00  00 00 00 0a
";

#[test]
#[cfg(target_endian = "little")]
fn flush_is_a_delete_without_elements() {
    let batch = encode_batch("skein", &[ElementOp::flush("tcp2")], 0).expect("encodes");
    // nft names the set before the table (attribute order is free); we ask
    // for an ack.
    let mut nft = hex(NFT_FLUSH);
    let (set, table) = (nft[40..52].to_vec(), nft[52..64].to_vec());
    nft[40..52].copy_from_slice(&table);
    nft[52..64].copy_from_slice(&set);
    nft[26] |= NLM_F_ACK as u8;
    assert_eq!(batch.bytes, nft);
    assert_eq!(ElementOp::flush("tcp2").to_string(), "flush set tcp2");
    // Flushes are never merged, elements around them keep their order.
    let ops = [
        ElementOp::flush("tcp1"),
        ElementOp::flush("tcp1"),
        ElementOp::delete("tcp1", vec![Port(1)]),
        ElementOp::add("tcp1", vec![Port(1)], None),
    ];
    let batch = encode_batch("skein", &ops, 0).expect("encodes");
    let runs: Vec<_> = batch.messages.iter().map(|m| m.ops.clone()).collect();
    assert_eq!(runs, vec![0..1, 1..2, 2..3, 3..4]);
}

#[test]
fn components_take_registers_in_a_concatenation_only() {
    assert_eq!(value_bytes(&[Port(80)]), vec![0, 80]);
    assert_eq!(value_bytes(&[Proto(17)]), vec![17]);
    assert_eq!(
        value_bytes(&[ip(10, 0, 0, 1), Proto(17), Port(53)]),
        vec![10, 0, 0, 1, 17, 0, 0, 0, 0, 53, 0, 0]
    );
    assert_eq!(value_bytes(&[U32(7), Port(1)]), {
        let mut v = 7u32.to_ne_bytes().to_vec();
        v.extend([0, 1, 0, 0]);
        v
    });
}

#[test]
fn consecutive_operations_on_one_set_share_a_message() {
    let ops: Vec<ElementOp> = (0..5u16)
        .map(|p| ElementOp::add("tcp1", vec![ip(11, 0, 0, 1), Port(p)], None))
        .chain([ElementOp::delete("tcp1", vec![ip(11, 0, 0, 1), Port(9)])])
        .chain([ElementOp::add("tcp1", vec![ip(11, 0, 0, 1), Port(9)], None)])
        .collect();
    let batch = encode_batch("skein", &ops, 100).expect("encodes");
    let runs: Vec<_> = batch.messages.iter().map(|m| m.ops.clone()).collect();
    assert_eq!(runs, vec![0..5, 5..6, 6..7]);
    assert_eq!(
        batch.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![101, 102, 103]
    );
    assert_eq!(batch.end_seq, 104);
    // Five elements with 8-byte keys (20 bytes each), after the header and
    // nfgenmsg (20), table (12) and set name (12), the ELEMENTS header (4).
    assert_eq!(
        batch.messages[0].element_offsets,
        vec![48, 68, 88, 108, 128]
    );
}

#[test]
fn large_runs_split_below_64_kib() {
    let ops: Vec<ElementOp> = (0..10_000u32)
        .map(|i| {
            ElementOp::add(
                "tcp_backends",
                vec![Ipv4(Ipv4Addr::from(i)), Port(80), U32(i % 10)],
                Some(vec![ip(10, 0, 0, 1), Port(8080)]),
            )
        })
        .collect();
    let batch = encode_batch("skein", &ops, 0).expect("encodes");
    assert!(batch.messages.len() > 1);
    let mut next = 0;
    for m in &batch.messages {
        assert_eq!(m.ops.start, next);
        next = m.ops.end;
    }
    assert_eq!(next, ops.len());
    // Every message's length is consistent and every attribute fits a u16.
    let mut off = 0;
    let mut count = 0;
    while off < batch.bytes.len() {
        let len = u32::from_ne_bytes(batch.bytes[off..off + 4].try_into().unwrap()) as usize;
        assert!(len < 65_536 + 100, "{len}");
        off += len;
        count += 1;
    }
    assert_eq!(off, batch.bytes.len());
    assert_eq!(count, batch.messages.len() + 2);
}

#[test]
fn invalid_requests_are_refused_before_sending() {
    let empty = ElementOp::add("tcp1", vec![], None);
    assert!(matches!(
        encode_batch("skein", &[empty], 0),
        Err(Error::Invalid(_))
    ));
    let ok = ElementOp::add("tcp1", vec![Port(1)], None);
    assert!(matches!(
        encode_batch("", std::slice::from_ref(&ok), 0),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        encode_batch(&"x".repeat(256), std::slice::from_ref(&ok), 0),
        Err(Error::Invalid(_))
    ));
    let long = ElementOp::add("tcp1", vec![Port(1); 17], None);
    assert!(matches!(
        encode_batch("skein", &[long], 0),
        Err(Error::Invalid(_))
    ));
    // Nothing to do is an empty batch, still well formed.
    let batch = encode_batch("skein", &[], 7).expect("encodes");
    assert_eq!(batch.bytes.len(), 40);
    assert!(batch.messages.is_empty());
}

/// The kernel's answer to the delete above when the element is not there
/// (`nft` sets `NETLINK_EXT_ACK` but not `NETLINK_CAP_ACK`, so the request
/// is echoed in full); sequence number 2.
const KERNEL_ENOENT: &str = "
6c 00 00 00 02 00 00 02  02 00 00 00 8f 3e 00 00
fe ff ff ff
50 00 00 00 0e 0a 01 00 02 00 00 00 00 00 00 00 02 00 00 00
0a 00 01 00 73 6b 65 69 6e 00 00 00
11 00 02 00 74 63 70 5f 62 61 63 6b 65 6e 64 73 00 00 00 00
1c 00 03 80 18 00 01 80 14 00 01 80 10 00 01 00 0b 01 02 03 0c 45 00 00 01 00 00 00
08 00 02 00 38 00 00 00
";

#[test]
#[cfg(target_endian = "little")]
fn kernel_errors_name_the_element() {
    let replies = parse_replies(&hex(KERNEL_ENOENT)).expect("parses");
    assert_eq!(
        replies,
        vec![Reply::Error {
            seq: 2,
            errno: 2,
            message: None,
            offset: Some(56)
        }]
    );
    // Judged against a batch whose second message is that delete.
    let ops = vec![
        ElementOp::add("tcp2", vec![ip(11, 1, 2, 5), Port(3141)], None),
        ElementOp::delete("tcp_backends", vec![ip(11, 1, 2, 3), Port(3141), U32(1)]),
    ];
    let batch = encode_batch("skein", &ops, 0).expect("encodes");
    let mut all = vec![Reply::Ack { seq: 1 }];
    all.extend(replies);
    let err = judge("skein", &ops, &batch, &all).expect_err("refused");
    assert_eq!(err.errno(), Some(2));
    match &err {
        Error::Refused {
            index, exact, op, ..
        } => {
            assert_eq!((*index, *exact), (1, true));
            assert_eq!(op, "delete element tcp_backends { 11.1.2.3 . 3141 . 1 }");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("tcp_backends"), "{err}");
}

fn ack(seq: u32, capped_tlvs: Option<(&str, u32)>, code: i32) -> Vec<u8> {
    let mut b = Vec::new();
    let mut flags = 0;
    let mut tail = Vec::new();
    if let Some((msg, offs)) = capped_tlvs {
        flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
        let mut text = msg.as_bytes().to_vec();
        text.push(0);
        let at = start_attr(&mut tail, NLMSGERR_ATTR_MSG);
        tail.extend(text);
        end_attr(&mut tail, at).unwrap();
        put_attr(&mut tail, NLMSGERR_ATTR_OFFS, &offs.to_ne_bytes()).unwrap();
    }
    put_u32(&mut b, (16 + 4 + 16 + tail.len()) as u32);
    put_u16(&mut b, NLMSG_ERROR);
    put_u16(&mut b, flags);
    put_u32(&mut b, seq);
    put_u32(&mut b, 4242);
    b.extend(code.to_ne_bytes());
    // The echoed request header (capped).
    put_u32(&mut b, 9999);
    put_u16(&mut b, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM);
    put_u16(&mut b, 0);
    put_u32(&mut b, seq);
    put_u32(&mut b, 0);
    b.extend(tail);
    b
}

#[test]
fn judging_a_batch() {
    let ops: Vec<ElementOp> = vec![
        ElementOp::delete("tcp1", vec![ip(11, 0, 0, 1), Port(80)]),
        ElementOp::delete("tcp1", vec![ip(11, 0, 0, 2), Port(80)]),
        ElementOp::add("tcp2", vec![ip(11, 0, 0, 1), Port(80)], None),
    ];
    let batch = encode_batch("skein", &ops, 10).expect("encodes");
    let (del, add) = (&batch.messages[0], &batch.messages[1]);
    assert_eq!((del.seq, add.seq), (11, 12));
    // All acked (in one datagram), a stale answer of an earlier batch ignored.
    let mut dgram = ack(3, None, -2);
    dgram.extend(ack(11, None, 0));
    dgram.extend(ack(12, None, 0));
    let replies = parse_replies(&dgram).expect("parses");
    judge("skein", &ops, &batch, &replies).expect("applied");
    // One missing: unknown outcome.
    let err = judge("skein", &ops, &batch, &replies[..2]).expect_err("incomplete");
    assert!(
        matches!(
            err,
            Error::Incomplete {
                acked: 1,
                expected: 2,
                ..
            }
        ),
        "{err}"
    );
    // The second delete refused, named by its offset, capped with a message.
    let offs = del.element_offsets[1];
    let mut dgram = ack(11, Some(("no such element", offs + 8)), -2);
    dgram.extend(ack(12, None, 0));
    let replies = parse_replies(&dgram).expect("parses");
    match judge("skein", &ops, &batch, &replies).expect_err("refused") {
        Error::Refused {
            index,
            exact,
            message,
            others,
            ..
        } => {
            assert_eq!((index, exact, others), (1, true, 0));
            assert_eq!(message.as_deref(), Some("no such element"));
        }
        other => panic!("{other:?}"),
    }
    // An offset before the elements (the set name): the message's first op.
    let replies = parse_replies(&ack(12, Some(("", 32)), -2)).expect("parses");
    match judge("skein", &ops, &batch, &replies).expect_err("refused") {
        Error::Refused { index, exact, .. } => assert_eq!((index, exact), (2, false)),
        other => panic!("{other:?}"),
    }
    // The batch itself refused (e.g. the commit failed).
    let replies = parse_replies(&ack(10, None, -12)).expect("parses");
    let err = judge("skein", &ops, &batch, &replies).expect_err("failed");
    assert!(matches!(err, Error::Batch { .. }), "{err}");
    assert_eq!(err.errno(), Some(12));
}

#[test]
fn malformed_answers_are_errors() {
    assert!(parse_replies(&[1, 2, 3]).is_err());
    let mut a = ack(1, None, 0);
    a[0] = 200; // longer than the datagram
    assert!(parse_replies(&a).is_err());
    a[0] = 4; // shorter than a header
    assert!(parse_replies(&a).is_err());
    let mut overrun = ack(1, None, 0);
    overrun[4] = NLMSG_OVERRUN as u8;
    assert!(parse_replies(&overrun).is_err());
    assert_eq!(parse_replies(&[]), Ok(vec![]));
}

proptest! {
    #[test]
    fn reply_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_replies(&bytes);
    }

    /// Plausible answers with random corruption: headers that parse, bodies
    /// that may not.
    #[test]
    fn reply_parser_never_panics_on_near_answers(
        seq in any::<u32>(),
        code in any::<i32>(),
        flags in any::<u16>(),
        corrupt in proptest::collection::vec((0usize..200, any::<u8>()), 0..8),
        cut in 0usize..200,
    ) {
        let mut b = ack(seq, Some(("x", 60)), code);
        b[6..8].copy_from_slice(&flags.to_ne_bytes());
        for (at, v) in corrupt {
            if let Some(x) = b.get_mut(at) {
                *x = v;
            }
        }
        b.truncate(cut.max(1));
        if let Ok(replies) = parse_replies(&b) {
            let ops = [ElementOp::add("s", vec![Port(1)], None)];
            let batch = encode_batch("t", &ops, seq.wrapping_sub(1)).expect("encodes");
            let _ = judge("t", &ops, &batch, &replies);
        }
    }
}
