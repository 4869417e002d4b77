//! Writes the committed seed corpus, `fuzz/corpus/<target>/`: a few valid
//! inputs per target, from the real encoders where there are some.
//!
//!   cd fuzz && RUSTC_BOOTSTRAP=1 cargo run --example seeds
//!
//! (It links libfuzzer-sys like the targets, hence the flag; it does not
//! fuzz anything.)

use std::fs;
use std::path::Path;

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use skein_fuzz::{write_step, Step};
use skein_proto::wire::encode;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("seed");
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut q = Message::query();
    q.metadata.id = 0x1234;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        q.set_edns(e);
    }
    q
}

fn dns() {
    let asks = [
        ("web.marathon.mesos.", RecordType::A, None),
        ("_web._tcp.marathon.mesos.", RecordType::SRV, Some(1232)),
        (
            "web.marathon.autoip.thisdcos.directory.",
            RecordType::AAAA,
            None,
        ),
        ("mesos.", RecordType::SOA, Some(4096)),
        ("nothing.mesos.", RecordType::A, None),
        ("example.com.", RecordType::A, Some(512)),
    ];
    for (i, (name, qtype, edns)) in asks.iter().enumerate() {
        let q = query(name, *qtype, *edns).to_vec().expect("query");
        let mut input = vec![i as u8];
        input.extend_from_slice(&q);
        write("dns_respond", &format!("query-{i}"), &input);
    }

    // Upstream exchanges: a positive answer, a negative one with an SOA.
    let q = query("example.com.", RecordType::A, Some(1232));
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.message_type = MessageType::Response;
    r.metadata.recursion_desired = true;
    r.add_query(q.queries[0].clone());
    for i in 1..=3 {
        r.add_answer(Record::from_rdata(
            Name::from_ascii("example.com.").expect("name"),
            300,
            RData::A(A::new(93, 184, 216, i)),
        ));
    }
    let mut e = Edns::new();
    e.set_max_payload(1232);
    r.set_edns(e);
    let mut nx = Message::response(q.metadata.id, q.metadata.op_code);
    nx.metadata.response_code = ResponseCode::NXDomain;
    nx.add_query(q.queries[0].clone());
    nx.add_authority(Record::from_rdata(
        Name::from_ascii("com.").expect("name"),
        900,
        RData::SOA(SOA::new(
            Name::from_ascii("a.gtld-servers.net.").expect("name"),
            Name::from_ascii("nstld.verisign-grs.com.").expect("name"),
            1,
            1800,
            900,
            604_800,
            86_400,
        )),
    ));
    let qb = q.to_vec().expect("query");
    for (i, resp) in [r, nx].iter().enumerate() {
        let rb = resp.to_vec().expect("response");
        let mut input = vec![i as u8 * 0x13];
        input.extend_from_slice(&(qb.len() as u16).to_le_bytes());
        input.extend_from_slice(&qb);
        input.extend_from_slice(&rb);
        write("dns_wire_cache", &format!("exchange-{i}"), &input);
    }
}

/// A real session: `fuzz-0` (the target's node) joins `fuzz-1`, which
/// knows `fuzz-2` and `fuzz-3`; every message to `fuzz-0` is recorded as a
/// step, in order, with the time between them.
fn gossip() {
    use skein_proto::Name as N;
    let names = [skein_fuzz::ME, "fuzz-1", "fuzz-2", "fuzz-3"];
    let mut nodes: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| skein_fuzz::node(n, i, 0))
        .collect();
    let cluster = nodes[0].config().cluster;
    let index = |n: N| names.iter().position(|m| *m == n.as_str());
    let mut session = Vec::new();
    let mut messages = Vec::new();
    let mut queue = std::collections::VecDeque::new();
    let mut last = 0u64;
    let mut now = 0u64;
    for (i, node) in nodes.iter_mut().enumerate().skip(1) {
        node.join(
            0,
            if i == 1 {
                vec![]
            } else {
                vec![skein_fuzz::addr(1)]
            },
        );
    }
    nodes[0].join(0, vec![skein_fuzz::addr(1)]);
    while now <= 3_000_000 {
        for i in 0..nodes.len() {
            nodes[i].tick(now);
            while let Some(t) = nodes[i].poll_transmit() {
                let to = t
                    .addr
                    .ip()
                    .to_string()
                    .rsplit('.')
                    .next()
                    .and_then(|o| o.parse::<usize>().ok());
                if let Some(to) = to.map(|o| o - 1).filter(|&o| o < nodes.len()) {
                    queue.push_back((nodes[i].name(), to, t.body));
                }
            }
            while nodes[i].poll_event().is_some() {}
        }
        while let Some((from, to, body)) = queue.pop_front() {
            if to == 0 {
                let bytes = encode(cluster, &body);
                messages.push(bytes.clone());
                let sender = index(from).expect("known") as u8 - 1;
                let dt = ((now - last) / 1000).min(255) as u8;
                last = now;
                write_step(&mut session, sender, dt, &bytes);
            }
            nodes[to].handle(now, from, body);
            while let Some(t) = nodes[to].poll_transmit() {
                let dest = t
                    .addr
                    .ip()
                    .to_string()
                    .rsplit('.')
                    .next()
                    .and_then(|o| o.parse::<usize>().ok());
                if let Some(d) = dest.map(|o| o - 1).filter(|&o| o < nodes.len()) {
                    queue.push_back((nodes[to].name(), d, t.body));
                }
            }
            while nodes[to].poll_event().is_some() {}
        }
        if now == 1_000_000 {
            nodes[1]
                .write(now, "task:t1", Some(r#"{"app":"/web"}"#))
                .expect("write");
            nodes[2].write(now, "meta", Some("{}")).expect("write");
        }
        now += 100_000;
    }
    // Every distinct kind of message, alone, for the decoder.
    let mut kinds = std::collections::BTreeMap::new();
    for m in &messages {
        let body = skein_proto::wire::decode(m, cluster, usize::MAX).expect("decodes");
        let kind = format!("{body:?}");
        let kind = kind
            .split(['(', ' ', '{'])
            .next()
            .unwrap_or("")
            .to_lowercase();
        kinds.entry(kind).or_insert_with(|| m.clone());
    }
    for (k, m) in &kinds {
        write("gossip_decode", &format!("body-{k}"), m);
    }
    // The session is cut to keep the corpus small (the target reads 64 steps).
    let mut cut = Vec::new();
    for (n, s) in skein_fuzz::steps(&session).enumerate() {
        let Step {
            flags,
            dt_ms,
            message,
        } = s;
        if n >= 48 || cut.len() + message.len() > 16 * 1024 {
            break;
        }
        write_step(&mut cut, flags | skein_fuzz::TICK, dt_ms, message);
    }
    write("gossip_node", "session", &cut);
    // The same session with every fact re-signed on the way in.
    let mut resigned = Vec::new();
    for s in skein_fuzz::steps(&cut) {
        write_step(
            &mut resigned,
            s.flags | skein_fuzz::RESIGN,
            s.dt_ms,
            s.message,
        );
    }
    write("gossip_node", "session-resigned", &resigned);
    println!(
        "gossip: {} messages to fuzz-0, {} kinds",
        messages.len(),
        kinds.len()
    );
}

fn json() {
    write("task_json", "minimal", br#"{"app":"/web","ip":"10.0.0.2"}"#);
    write(
        "task_json",
        "full",
        br#"{"app":"/group/web","framework":"marathon","ip":"10.0.0.2","ports":[{"name":"http","port":8080,"protocol":"tcp","labels":{"VIP_0":"/web:80"}},{"port":53,"protocol":"udp","labels":{"VIP_1":"11.0.0.9:53"}}],"health_check":{"protocol":"http","path":"/ok","port_index":0,"interval_s":2,"timeout_s":1,"unhealthy_after":2}}"#,
    );
    write(
        "task_json",
        "v6",
        br#"{"app":"/v6","ip":"fd01::2","ports":[{"port":80}]}"#,
    );

    let docs: [(u8, &str); 8] = [
        (
            0,
            r#"{"cluster_id":"c","node_id":"node1","version":"0.1.0"}"#,
        ),
        (
            2,
            r#"{"tasks":[{"id":"t1","node_id":"node1","spec":{"app":"/web","framework":"marathon","ip":"10.0.0.2","ports":[]}}]}"#,
        ),
        (
            5,
            r#"{"cluster_id":"c","node_id":"n1","nodes":{"n1":{"generation":3,"keys":{"meta":{"deleted":false,"value":{"ip":"10.0.0.1"},"version":1},"x":{"deleted":true,"value":null,"version":2}},"max_version":2,"status":"alive"}},"removed":{"n9":4}}"#,
        ),
        (
            7,
            r#"[{"task_id":"t1","node_id":"n1","label":"VIP_0","error":"bad"}]"#,
        ),
        (10, r#"{"agents":["n2","n3"]}"#),
        (
            14,
            r#"{"DnsOn":true,"Domain":"mesos","ExternalOn":true,"HttpOn":true,"Listeners":["0.0.0.0:53"],"RefreshSeconds":1,"Resolvers":["8.8.8.8"],"SOAMname":"ns1.mesos","SOARname":"root.ns1.mesos","TTL":5,"Timeout":2,"Zones":["mesos"]}"#,
        ),
        (
            16,
            r#"[{"host":"web-1.marathon.slave.mesos.","ip":"10.0.0.2","port":"31001","service":"_web._tcp.marathon.mesos."}]"#,
        ),
        (17, r#"{"error":"no such task"}"#),
    ];
    for (which, json) in docs {
        let mut input = vec![which];
        input.extend_from_slice(json.as_bytes());
        write("api_docs", &format!("doc-{which}"), &input);
    }

    write(
        "cni_config",
        "agent",
        br#"{"cniVersion":"1.0.0","name":"dcos","type":"skein-cni","bridge":"m-dcos","subnet":"9.0.1.0/25","gateway":"9.0.1.1","mtu":1420,"dataDir":"/var/lib/skein/cni"}"#,
    );
    write(
        "cni_config",
        "old-version",
        br#"{"cniVersion":"0.3.1","name":"dcos6","type":"skein-cni","bridge":"d-dcos","subnet":"9.0.1.128/25","gateway":"9.0.1.129","mtu":1500,"dataDir":"/tmp/cni","prevResult":{}}"#,
    );

    write(
        "l4lb_listing",
        "table",
        br#"{"nftables":[{"metainfo":{"version":"1.0.6","release_name":"Lester Gooch #5","json_schema_version":1}},{"table":{"family":"ip","name":"skein","handle":1}},{"set":{"family":"ip","name":"tcp1","table":"skein","type":["ipv4_addr","inet_service"],"handle":2,"elem":[{"concat":["11.0.0.1",80]}]}},{"map":{"family":"ip","name":"tcp_backends","table":"skein","type":["ipv4_addr","inet_service","integer"],"map":["ipv4_addr","inet_service"],"handle":3,"elem":[[{"concat":["11.0.0.1",80,0]},{"concat":["10.0.0.2",8080]}]]}},{"chain":{"family":"ip","table":"skein","name":"services","handle":4}},{"rule":{"family":"ip","table":"skein","chain":"services","handle":5}}]}"#,
    );
    write("l4lb_listing", "empty", br#"{"nftables":[]}"#);
}

fn netlink() {
    use skein_nftables::wire::{
        NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_ACK_TLVS, NLM_F_CAPPED,
    };
    fn msg(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, payload: &[u8]) {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    fn error(code: i32, echoed: &[u8]) -> Vec<u8> {
        let mut p = code.to_ne_bytes().to_vec();
        p.extend_from_slice(echoed);
        p
    }
    let header = |seq: u32| {
        let mut h = Vec::new();
        h.extend_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        h.extend_from_slice(&0x0a0cu16.to_ne_bytes());
        h.extend_from_slice(&5u16.to_ne_bytes());
        h.extend_from_slice(&seq.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h
    };
    // Every message acknowledged.
    let mut acks = Vec::new();
    for seq in 2..=5 {
        msg(&mut acks, NLMSG_ERROR, 0x100, seq, &error(0, &header(seq)));
    }
    write("nft_replies", "acks", &acks);
    // A refusal with an extended ack: message text and offset.
    let mut refused = Vec::new();
    let mut p = error(-17, &header(3));
    let text = b"Could not process rule: File exists\0";
    let attr_len = 4 + text.len();
    p.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(text);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    p.extend_from_slice(&8u16.to_ne_bytes());
    p.extend_from_slice(&2u16.to_ne_bytes());
    p.extend_from_slice(&40u32.to_ne_bytes());
    msg(
        &mut refused,
        NLMSG_ERROR,
        NLM_F_ACK_TLVS | NLM_F_CAPPED,
        3,
        &p,
    );
    msg(&mut refused, NLMSG_DONE, 0, 6, &[]);
    write("nft_replies", "refused", &refused);
}

fn main() {
    dns();
    gossip();
    json();
    netlink();
}
