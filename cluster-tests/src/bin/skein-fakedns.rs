//! A tiny upstream DNS server for forwarding tests: answers `NAME A` with
//! `IP` (TTL 60) and NXDOMAIN for anything else, over UDP, printing one line
//! per query so a test can count what reached the upstream. With `--silent`
//! it reads queries and never answers (a dead upstream that drops packets).
//!
//!   skein-fakedns 10.77.0.9:53 example.com. 93.184.216.34 [--silent]
//!
//! NAME `*` answers every A question (for benchmarks of cached names).

use std::io::Write;
use std::net::UdpSocket;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: skein-fakedns ADDR NAME IP [--silent]"
    );
    let socket = UdpSocket::bind(&args[1])?;
    let name = args[2].to_ascii_lowercase();
    let ip: std::net::Ipv4Addr = args[3].parse()?;
    let silent = args.get(4).is_some_and(|a| a == "--silent");
    let mut buf = [0u8; 4096];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(q) = query.queries.first() else {
            continue;
        };
        if name != "*" {
            println!("query {} {}", q.name(), q.query_type());
            let _ = std::io::stdout().flush();
        }
        if silent {
            continue;
        }
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_query(q.clone());
        let asked = q.name().to_ascii().to_ascii_lowercase();
        if (name == "*" || asked == name) && q.query_type() == RecordType::A {
            reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(ip))));
        } else {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        socket.send_to(&reply.to_vec()?, from)?;
    }
}
