//! The conntrack reader against the real kernel, in a namespace the test
//! makes: connections to a VIP rewritten by an nftables DNAT rule (as the
//! nftables dataplane does) are read back with the VIP as their original
//! destination and the backend as their reply source. One that exchanged
//! data is assured, in the table and in the events; one refused by a dead
//! backend is gone from the table at once (the kernel drops a connection
//! whose only answer was a reset) and shows only as events, created and
//! destroyed without ever being assured: failures are counted from events.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use cluster_tests::{enter_netns, sh, ScratchNetns};
use skein_conntrack::TcpState;

#[test]
fn vip_connections_read_back_with_their_backend_and_outcome() -> anyhow::Result<()> {
    cluster_tests::require_root();
    let ns = ScratchNetns::new("ct")?;
    // 11.1.1.1 routed locally, so that its packets leave through OUTPUT
    // where the DNAT rule rewrites them.
    sh(&[
        "ip", "-n", &ns.0, "route", "add", "local", "11.1.1.1", "dev", "lo",
    ])?;
    ns.nft(
        "table ip skct {
            chain out {
                type nat hook output priority -100;
                ip daddr 11.1.1.1 tcp dport 80 dnat to 127.0.0.1:8080
                ip daddr 11.1.1.1 tcp dport 81 dnat to 127.0.0.1:8081
            }
        }",
    )?;
    let name = ns.0.clone();
    type Seen = (Vec<skein_conntrack::Conn>, Vec<skein_conntrack::Event>);
    let (conns, events) = std::thread::spawn(move || -> anyhow::Result<Seen> {
        enter_netns(&name)?;
        let mut events = skein_conntrack::Events::open()?;
        let live = TcpListener::bind("127.0.0.1:8080")?;
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut s, _) = live.accept()?;
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf)?;
            s.write_all(b"ok")
        });
        let mut c = TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::new(11, 1, 1, 1), 80).into(),
            Duration::from_secs(2),
        )?;
        c.write_all(b"hi")?;
        let mut answer = [0u8; 2];
        c.read_exact(&mut answer)?;
        drop(c);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        // Nothing listens behind port 81: refused.
        let refused = TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::new(11, 1, 1, 1), 81).into(),
            Duration::from_secs(2),
        );
        assert!(refused.is_err(), "port 81 has no backend");
        let table = skein_conntrack::dump()?;
        // The events, until both outcomes are in (or a deadline).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        let done = |seen: &[skein_conntrack::Event]| {
            let vip = |p| SocketAddrV4::new(Ipv4Addr::new(11, 1, 1, 1), p);
            seen.iter()
                .any(|e| e.conn.orig_dst == vip(80) && e.conn.assured())
                && seen.iter().any(|e| {
                    e.conn.orig_dst == vip(81) && e.kind == skein_conntrack::EventKind::Destroy
                })
        };
        while !done(&seen) && std::time::Instant::now() < deadline {
            let got = events.recv(Duration::from_millis(200))?;
            assert!(!got.lost, "events lost");
            seen.extend(got.events);
        }
        Ok((table, seen))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;

    let to = |port: u16| {
        conns
            .iter()
            .find(|c| c.orig_dst == SocketAddrV4::new(Ipv4Addr::new(11, 1, 1, 1), port))
            .copied()
    };
    let ok = to(80).unwrap_or_else(|| panic!("no connection to the VIP's port 80 in {conns:?}"));
    assert_eq!(ok.reply_src, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
    assert_eq!(ok.proto, 6);
    assert!(ok.assured(), "{ok:?}");
    assert_ne!(ok.id, 0);
    assert_eq!(ok.tcp_state, Some(TcpState::TimeWait), "{ok:?}");
    assert!(
        to(81).is_none(),
        "a refused connection stays in the table: {conns:?}"
    );

    // The events: the served one assured, with the same id as in the table.
    use skein_conntrack::EventKind;
    let vip81 = SocketAddrV4::new(Ipv4Addr::new(11, 1, 1, 1), 81);
    assert!(
        events
            .iter()
            .any(|e| e.conn.id == ok.id && e.conn.assured()),
        "{events:?}"
    );
    let refused: Vec<_> = events.iter().filter(|e| e.conn.orig_dst == vip81).collect();
    let kinds: Vec<EventKind> = refused.iter().map(|e| e.kind).collect();
    assert_eq!(kinds.first(), Some(&EventKind::New), "{refused:?}");
    assert_eq!(kinds.last(), Some(&EventKind::Destroy), "{refused:?}");
    assert!(refused.iter().all(|e| !e.conn.assured()), "{refused:?}");
    let backend81 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081);
    assert!(
        refused.iter().all(|e| e.conn.reply_src == backend81),
        "{refused:?}"
    );
    let _ = sh(&["ip", "netns", "del", &ns.0]);
    Ok(())
}
