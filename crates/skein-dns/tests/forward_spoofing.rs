//! Forged upstream replies never reach a client or the cache. A test
//! upstream answers every query with a forgery first (wrong id, another
//! name, type or class, the name in other letter case, or the right answer
//! from another address) and the real answer after it: the client gets the
//! real one, and so does the next client, from the cache.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{first_a, load, query, udp_ask};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use skein_dns::server::DnsOptions;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const REAL: [u8; 4] = [192, 0, 2, 1];
const POISON: [u8; 4] = [6, 6, 6, 6];

/// Flips the case of every letter.
fn flip_case(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_lowercase() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

fn reply(id: u16, question: Query, ip: [u8; 4], ttl: u32) -> Vec<u8> {
    let mut r = Message::response(id, hickory_proto::op::OpCode::Query);
    r.metadata.recursion_desired = true;
    r.metadata.recursion_available = true;
    let owner = question.name().clone();
    r.add_query(question);
    r.add_answer(Record::from_rdata(owner, ttl, RData::A(A(ip.into()))));
    r.to_vec().expect("encode")
}

/// What the upstream saw: the id and the name, as sent.
type Seen = (u16, String);

/// Answers each query with the forgery its first label names, then the
/// real answer.
async fn upstream(socket: Arc<UdpSocket>, rogue: UdpSocket, seen: mpsc::UnboundedSender<Seen>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(question) = q.queries.first().cloned() else {
            continue;
        };
        let id = q.metadata.id;
        let name = question.name().to_ascii();
        let _ = seen.send((id, name.clone()));
        let kind = name
            .split('.')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let other_name = |s: &str| {
            let mut q = question.clone();
            q.set_name(Name::from_ascii(s).expect("name"));
            q
        };
        let forged = match kind.as_str() {
            "wrong-id" => Some(reply(id.wrapping_add(1), question.clone(), POISON, 3600)),
            "wrong-name" => Some(reply(id, other_name("evil.spoof.test."), POISON, 3600)),
            "wrong-type" => {
                let mut q = question.clone();
                q.set_query_type(RecordType::AAAA);
                Some(reply(id, q, POISON, 3600))
            }
            "wrong-class" => {
                let mut q = question.clone();
                q.set_query_class(DNSClass::CH);
                Some(reply(id, q, POISON, 3600))
            }
            "wrong-case" => Some(reply(id, other_name(&flip_case(&name)), POISON, 3600)),
            _ => None,
        };
        if let Some(forged) = forged {
            let _ = socket.send_to(&forged, from).await;
        }
        if kind == "wrong-source" {
            // The right answer in every respect, from another address.
            let _ = rogue
                .send_to(&reply(id, question.clone(), POISON, 3600), from)
                .await;
        }
        let _ = socket.send_to(&reply(id, question, REAL, 300), from).await;
    }
}

async fn ask(
    client: &UdpSocket,
    server: SocketAddr,
    id: u16,
    name: &str,
) -> Result<Message, String> {
    let reply = udp_ask(
        client,
        server,
        &query(id, name, RecordType::A),
        Duration::from_secs(3),
    )
    .await
    .ok_or_else(|| format!("{name}: no reply"))?;
    if reply.metadata.id != id {
        return Err(format!("{name}: id {} instead of {id}", reply.metadata.id));
    }
    let asked = reply.queries.first().map(|q| q.name().to_ascii());
    if asked.as_deref() != Some(name) {
        return Err(format!("{name}: question came back as {asked:?}"));
    }
    match first_a(&reply) {
        Some(ip) if ip.octets() == REAL => Ok(reply),
        other => Err(format!(
            "{name}: answered {other:?} ({:?})",
            reply.metadata.response_code
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_upstream_replies_never_reach_clients_or_the_cache() {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("upstream"));
    let rogue = UdpSocket::bind("127.0.0.1:0").await.expect("rogue");
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let up = socket.local_addr().expect("upstream address");
    let task = tokio::spawn(upstream(socket, rogue, seen_tx));
    let server = common::start(&[up], DnsOptions::default()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");

    let mut failures = Vec::new();
    let mut sent_as = Vec::new();
    for (round, kind) in [
        "wrong-id",
        "wrong-name",
        "wrong-type",
        "wrong-class",
        "wrong-case",
        "wrong-source",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("{kind}.Www.Example.Spoof.Test.");
        let id = 1000 + round as u16;
        if let Err(e) = ask(&client, server.addr, id, &name).await {
            failures.push(format!("first ask: {e}"));
        }
        let Ok(upstream_saw) = seen.try_recv() else {
            failures.push(format!("{name}: the upstream was not asked"));
            continue;
        };
        sent_as.push(((id, name.clone()), upstream_saw));
        // The next client, from the cache: the real answer, its own case.
        let again = flip_case(&name);
        if let Err(e) = ask(&client, server.addr, id + 100, &again).await {
            failures.push(format!("cached: {e}"));
        }
        if let Ok(extra) = seen.try_recv() {
            failures.push(format!(
                "{again}: asked upstream again ({extra:?}), not cached"
            ));
        }
    }
    let stats = &server.dns.stats;
    println!(
        "rejected replies: {}; upstream saw (client id, name) -> (id, name): {sent_as:#?}",
        load(&stats.rejected_replies)
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        sent_as.iter().any(|((id, _), (sid, _))| id != sid),
        "every upstream query carried the client's id"
    );
    assert!(
        sent_as.iter().any(|((_, n), (_, sn))| n != sn),
        "every upstream query carried the client's letter case"
    );
    assert!(
        load(&stats.rejected_replies) >= 5,
        "wrong id, name, type, class and case are counted (another source \
         is dropped by the kernel: the upstream sockets are connected)"
    );
    task.abort();
}
