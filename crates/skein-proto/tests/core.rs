//! The protocol core alone: delivery order, duplication and loss; refutation;
//! restarts; partitions past the grace; hostile peers with valid keys.

mod support;

use std::sync::Arc;

use proptest::prelude::*;
use skein_proto::wire::{Announce, Rumor, SignedEntry, Suspicion};
use skein_proto::{Body, Config, Event, Name, Status};
use support::*;

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;

fn cfg() -> Config {
    Config::new("test")
}

/// The value of `origin`'s `key` as node `n` holds it.
fn value(n: &skein_proto::Node<TestKeys>, origin: Name, key: &str) -> Option<String> {
    n.get(origin, key)
        .and_then(|e| e.value.as_deref().map(String::from))
}

/// The keyspace of `origin` as node `at` holds it: (key, version, value).
fn keyspace(n: &skein_proto::Node<TestKeys>, origin: Name) -> Vec<(String, u64, Option<String>)> {
    n.entries(origin)
        .iter()
        .map(|e| {
            (
                e.key.clone(),
                e.version,
                e.value.as_deref().map(String::from),
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Write {
    origin: usize,
    key: u8,
    value: Option<u8>,
}

fn arb_writes() -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (0..3usize, 0..4u8, prop::option::of(0..4u8)).prop_map(|(origin, key, value)| Write {
            origin,
            key,
            value,
        }),
        1..30,
    )
}

/// Three origins make the writes; every signed entry they produce, in
/// order of creation.
fn produce(
    prefix: &str,
    writes: &[Write],
) -> (Vec<skein_proto::Node<TestKeys>>, Vec<Arc<SignedEntry>>) {
    let mut origins: Vec<_> = (0..3).map(|i| node(prefix, i, 1, &cfg(), 0)).collect();
    let mut produced = Vec::new();
    for w in writes {
        let o = &mut origins[w.origin];
        let key = format!("k{}", w.key);
        let value = w.value.map(|v| format!("v{v}"));
        o.write(0, &key, value.as_deref()).unwrap();
        produced.push(o.get(o.name(), &key).unwrap().clone());
    }
    (origins, produced)
}

fn receiver(prefix: &str, origins: &[skein_proto::Node<TestKeys>]) -> skein_proto::Node<TestKeys> {
    let mut r = node(prefix, 9, 1, &cfg(), 0);
    for o in origins {
        let mut d = o.own_data().unwrap();
        d.entries.clear();
        d.wm = 0;
        r.restore(0, d);
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any order and any duplication of the same rumors gives the same
    /// keyspaces; losing some and then syncing once gives them too.
    #[test]
    fn any_order_duplication_and_loss_end_in_the_same_replica(
        writes in arb_writes(),
        seed in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        lost in prop::collection::vec(any::<bool>(), 30),
    ) {
        let (origins, produced) = produce("ord", &writes);
        let from = origins[0].name();
        let mut shuffled = produced.clone();
        for d in &dups {
            shuffled.push(produced[d.index(produced.len())].clone());
        }
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut a = receiver("ord", &origins);
        for e in &produced {
            a.handle(MS, from, Body::Rumors(vec![Rumor::Entry(e.clone())]));
        }
        let mut b = receiver("ord", &origins);
        b.handle(MS, from, Body::Rumors(shuffled.iter().cloned().map(Rumor::Entry).collect()));
        // Lossy: some never arrive; one sync (each origin's full state) repairs.
        let mut c = receiver("ord", &origins);
        for (i, e) in shuffled.iter().enumerate() {
            if !lost[i % lost.len()] {
                c.handle(MS, from, Body::Rumors(vec![Rumor::Entry(e.clone())]));
            }
        }
        for o in &origins {
            c.restore(2 * MS, o.own_data().unwrap());
        }
        for o in &origins {
            let truth = keyspace(o, o.name());
            prop_assert_eq!(&keyspace(&a, o.name()), &truth);
            prop_assert_eq!(&keyspace(&b, o.name()), &truth);
            prop_assert_eq!(&keyspace(&c, o.name()), &truth);
        }
        prop_assert_eq!(a.digest(), b.digest());
        prop_assert_eq!(a.digest(), c.digest());
    }

    /// A replay of old entries after a newer version (or a delete) never
    /// brings the old value back.
    #[test]
    fn stale_entries_never_win(writes in arb_writes()) {
        let (origins, produced) = produce("stale", &writes);
        let from = origins[0].name();
        let mut r = receiver("stale", &origins);
        for e in &produced {
            r.handle(MS, from, Body::Rumors(vec![Rumor::Entry(e.clone())]));
        }
        for e in produced.iter().rev() {
            r.handle(MS, from, Body::Rumors(vec![Rumor::Entry(e.clone())]));
        }
        for o in &origins {
            prop_assert_eq!(keyspace(&r, o.name()), keyspace(o, o.name()));
        }
    }
}

#[test]
fn a_cluster_forms_and_a_write_reaches_everyone() {
    let mut net = Net::new("form", 8, &cfg());
    net.deliver();
    net.run(2 * SEC, 50 * MS);
    for n in &net.nodes {
        assert_eq!(n.up_count(), 8, "{} sees {}", n.name(), n.up_count());
    }
    net.nodes[3].write(net.now, "task:web", Some("{}")).unwrap();
    net.drain(3);
    net.run(net.now + 100 * MS, 10 * MS);
    let origin = net.nodes[3].name();
    for n in &net.nodes {
        assert_eq!(value(n, origin, "task:web"), Some("{}".into()));
    }
    assert!(net.digests_equal());
}

#[test]
fn a_suspected_live_node_refutes_and_stays_up() {
    let mut net = Net::new("refute", 6, &cfg());
    net.run(2 * SEC, 50 * MS);
    let victim = net.nodes[2].name();
    let inc = net.nodes[2].incarnation();
    // Node 0 (a legitimate observer) suspects node 2 although it is alive.
    let observer = net.nodes[0].name();
    let sig = TestKeys(key_of(&observer.to_string())).sign_suspicion(observer, victim, 1, inc);
    let s = Arc::new(Suspicion {
        observer,
        node: victim,
        gen: 1,
        inc,
        sig,
    });
    net.nodes[1].handle(net.now, observer, Body::Rumors(vec![Rumor::Suspect(s)]));
    net.drain(1);
    net.deliver();
    net.run(net.now + SEC, 50 * MS);
    assert!(net.nodes[2].incarnation() > inc, "node 2 refuted");
    for (i, n) in net.nodes.iter().enumerate() {
        if i != 2 {
            assert!(
                n.status(victim).is_some_and(Status::is_up),
                "{} holds node 2 up",
                n.name()
            );
        }
    }
    assert!(!net
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::Down(n) if *n == victim)));
}

#[test]
fn a_killed_node_is_down_everywhere_and_a_restart_replaces_its_keyspace() {
    let mut net = Net::new("restart", 6, &cfg());
    net.run(2 * SEC, 50 * MS);
    net.nodes[4].write(net.now, "task:old", Some("1")).unwrap();
    net.drain(4);
    net.run(net.now + SEC, 50 * MS);
    let four = net.nodes[4].name();
    net.up[4] = false;
    let killed = net.now;
    net.run(killed + 3 * SEC, 50 * MS);
    for (i, n) in net.nodes.iter().enumerate() {
        if i != 4 {
            assert_eq!(n.status(four), Some(Status::Down), "{}", n.name());
        }
    }
    // Restart with the next generation: the old keyspace goes, the node is up.
    net.nodes[4] = node("restart", 4, 2, &cfg(), net.now);
    net.up[4] = true;
    net.nodes[4].join(net.now, vec![addr(0)]);
    net.nodes[4].write(net.now, "task:new", Some("2")).unwrap();
    net.drain(4);
    net.deliver();
    net.run(net.now + 3 * SEC, 50 * MS);
    for n in &net.nodes {
        assert_eq!(n.status(four), Some(Status::Alive), "{}", n.name());
        assert!(n.get(four, "task:old").is_none());
        assert_eq!(value(n, four, "task:new"), Some("2".into()));
    }
    assert!(net.digests_equal());
}

#[test]
fn a_restart_that_lost_its_generation_moves_above_the_old_one() {
    let mut net = Net::new("lostgen", 5, &cfg());
    net.run(2 * SEC, 50 * MS);
    net.nodes[3].write(net.now, "a", Some("1")).unwrap();
    net.drain(3);
    net.run(net.now + SEC, 50 * MS);
    // Restarted with an old generation (a wiped data dir): it must not be
    // shadowed by its previous life.
    net.nodes[3] = node_seeded("lostgen", 3, 1, &cfg(), net.now, 77);
    net.nodes[3].join(net.now, vec![addr(0)]);
    net.nodes[3].write(net.now, "b", Some("2")).unwrap();
    net.drain(3);
    net.deliver();
    net.run(net.now + 3 * SEC, 50 * MS);
    let three = net.nodes[3].name();
    assert!(net.nodes[3].generation() > 1);
    assert!(net
        .events
        .iter()
        .any(|(i, e)| *i == 3 && matches!(e, Event::Generation(g) if *g > 1)));
    for n in &net.nodes {
        assert_eq!(value(n, three, "b"), Some("2".into()), "{}", n.name());
        assert!(n.get(three, "a").is_none());
    }
}

#[test]
fn a_partition_longer_than_the_grace_heals_with_nothing_lost() {
    let mut c = cfg();
    c.dead_node_grace = 2 * SEC;
    let mut net = Net::new("grace", 8, &c);
    net.run(2 * SEC, 50 * MS);
    let cut: Vec<bool> = (0..8).map(|i| i >= 6).collect();
    net.cut = Some(cut);
    net.nodes[1].write(net.now, "left-side", Some("1")).unwrap();
    net.drain(1);
    net.nodes[7]
        .write(net.now, "right-side", Some("2"))
        .unwrap();
    net.drain(7);
    net.run(net.now + 10 * SEC, 50 * MS);
    let seven = net.nodes[7].name();
    assert_eq!(net.nodes[0].status(seven), Some(Status::Removed));
    assert!(
        net.nodes[0].get(seven, "right-side").is_none(),
        "removed past the grace"
    );
    net.cut = None;
    net.run(net.now + 5 * SEC, 50 * MS);
    let one = net.nodes[1].name();
    for n in &net.nodes {
        assert_eq!(n.up_count(), 8, "{} sees everyone", n.name());
        assert_eq!(value(n, one, "left-side"), Some("1".into()));
        assert_eq!(value(n, seven, "right-side"), Some("2".into()));
    }
    assert!(net.digests_equal());
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = || {
        let mut c = cfg();
        c.dead_node_grace = 2 * SEC;
        let mut net = Net::new("det", 7, &c);
        net.run(2 * SEC, 50 * MS);
        net.up[5] = false;
        net.run(net.now + 4 * SEC, 50 * MS);
        net.events
            .iter()
            .map(|(i, e)| format!("{i}:{e:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn forged_state_from_a_valid_peer_changes_nothing() {
    let mut net = Net::new("forge", 6, &cfg());
    net.run(2 * SEC, 50 * MS);
    net.nodes[2]
        .write(net.now, "task:real", Some("ok"))
        .unwrap();
    net.drain(2);
    net.run(net.now + SEC, 50 * MS);
    let victim = net.nodes[2].name();
    let rogue = net.nodes[5].name();
    let rogue_keys = TestKeys(key_of(&rogue.to_string()));
    let before: Vec<u64> = net.nodes.iter().map(|n| n.digest()).collect();

    // An entry claimed for node 2 but signed by the rogue's own key.
    let forged = rogue_keys.forge_entry(victim, 1, 99, "task:real", Some("hijacked"));
    // A higher generation of node 2, and its departure, likewise.
    let announce = rogue_keys.forge_announce(victim, 7, 0, addr(5));
    let leave = rogue_keys.forge_leave(victim, 1);
    // The rogue's own certificate presented as node 2's identity.
    let mut stolen = (*announce).clone();
    stolen.identity = Some(identity(&rogue.to_string()));
    net.nodes[0].handle(
        net.now,
        rogue,
        Body::Rumors(vec![
            Rumor::Entry(forged),
            Rumor::Alive(announce),
            Rumor::Leave(leave),
            Rumor::Alive(Arc::new(stolen)),
        ]),
    );
    net.drain(0);
    net.deliver();
    net.run(net.now + SEC, 50 * MS);
    let after: Vec<u64> = net.nodes.iter().map(|n| n.digest()).collect();
    assert_eq!(before, after, "no node's state changed");
    for n in &net.nodes {
        assert_eq!(value(n, victim, "task:real"), Some("ok".into()));
        assert_eq!(n.status(victim), Some(Status::Alive));
    }
    let stats = net.nodes[0].stats();
    assert_eq!(stats.bad_signature, 3, "{stats:?}");
    assert_eq!(stats.bad_identity, 1, "{stats:?}");
}

#[test]
fn one_observer_alone_cannot_take_a_node_down() {
    let mut net = Net::new("single", 8, &cfg());
    net.run(2 * SEC, 50 * MS);
    let victim = net.nodes[3].name();
    let rogue = net.nodes[6].name();
    let inc = net.nodes[3].incarnation();
    let sig = TestKeys(key_of(&rogue.to_string())).sign_suspicion(rogue, victim, 1, inc);
    let s = Arc::new(Suspicion {
        observer: rogue,
        node: victim,
        gen: 1,
        inc,
        sig,
    });
    net.nodes[0].handle(net.now, rogue, Body::Rumors(vec![Rumor::Suspect(s)]));
    net.drain(0);
    net.deliver();
    net.run(net.now + 6 * SEC, 50 * MS);
    assert!(!net
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::Down(n) if *n == victim)));
}

#[test]
fn wire_round_trips_and_refuses_other_versions_and_clusters() {
    use skein_proto::wire::{decode, encode, DecodeError, WIRE_VERSION};
    let keys = TestKeys(key_of("wire-0"));
    let a = keys.forge_announce(Name::intern("wire-0").unwrap(), 3, 1, addr(0));
    let body = Body::Rumors(vec![Rumor::Alive(a)]);
    let bytes = encode(7, &body);
    assert_eq!(decode(&bytes, 7, 1 << 20), Ok(body.clone()));
    assert_eq!(decode(&bytes, 8, 1 << 20), Err(DecodeError::Cluster));
    let mut other = bytes.clone();
    other[0] = WIRE_VERSION + 1;
    assert_eq!(
        decode(&other, 7, 1 << 20),
        Err(DecodeError::Version(WIRE_VERSION + 1))
    );
    assert!(matches!(
        decode(&bytes, 7, 10),
        Err(DecodeError::TooLarge(..))
    ));
    assert_eq!(decode(&[], 7, 10), Err(DecodeError::Empty));
    for cut in 1..bytes.len() {
        assert!(decode(&bytes[..cut], 7, 1 << 20).is_err());
    }
}

proptest! {
    /// The decoder never panics, whatever the bytes.
    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = skein_proto::wire::decode(&bytes, 7, 1 << 20);
    }
}

/// Test-only signing of arbitrary facts with a given key (what a rogue
/// holding only its own key can produce).
trait Forge {
    fn sign_suspicion(&self, observer: Name, node: Name, gen: u64, inc: u64) -> skein_proto::Sig;
    fn forge_entry(
        &self,
        origin: Name,
        gen: u64,
        version: u64,
        key: &str,
        value: Option<&str>,
    ) -> Arc<SignedEntry>;
    fn forge_announce(
        &self,
        node: Name,
        gen: u64,
        inc: u64,
        addr: std::net::SocketAddr,
    ) -> Arc<Announce>;
    fn forge_leave(&self, node: Name, gen: u64) -> Arc<skein_proto::wire::Leave>;
}

impl Forge for TestKeys {
    fn sign_suspicion(&self, observer: Name, node: Name, gen: u64, inc: u64) -> skein_proto::Sig {
        let mut buf = Vec::new();
        skein_proto::keys::suspicion_bytes(&mut buf, cfg().cluster, observer, node, gen, inc);
        skein_proto::Keys::sign(self, &buf)
    }
    fn forge_entry(
        &self,
        origin: Name,
        gen: u64,
        version: u64,
        key: &str,
        value: Option<&str>,
    ) -> Arc<SignedEntry> {
        let mut buf = Vec::new();
        skein_proto::keys::entry_bytes(&mut buf, cfg().cluster, origin, gen, version, key, value);
        Arc::new(SignedEntry {
            origin,
            gen,
            version,
            key: key.into(),
            value: value.map(Into::into),
            sig: skein_proto::Keys::sign(self, &buf),
        })
    }
    fn forge_announce(
        &self,
        node: Name,
        gen: u64,
        inc: u64,
        addr: std::net::SocketAddr,
    ) -> Arc<Announce> {
        let mut buf = Vec::new();
        skein_proto::keys::alive_bytes(&mut buf, cfg().cluster, node, gen, 0, inc, addr, 0);
        Arc::new(Announce {
            node,
            gen,
            life: 0,
            inc,
            addr,
            floor: 0,
            identity: None,
            sig: skein_proto::Keys::sign(self, &buf),
        })
    }
    fn forge_leave(&self, node: Name, gen: u64) -> Arc<skein_proto::wire::Leave> {
        let mut buf = Vec::new();
        skein_proto::keys::leave_bytes(&mut buf, cfg().cluster, node, gen);
        Arc::new(skein_proto::wire::Leave {
            node,
            gen,
            sig: skein_proto::Keys::sign(self, &buf),
        })
    }
}
