//! This node's part in named-VIP address allocation: publish a claim for
//! every named VIP it hosts a backend of (adopting the cluster's winner, or
//! proposing an address), withdraw claims for VIPs it no longer hosts, and
//! report each VIP's address and whether it may be handed out yet.
//!
//! Addresses come from [`alloc::resolve`]: a VIP with a winning claim has
//! that address, and a VIP seen before any claim of it has the address its
//! hosts are claiming, computed from the same view. Both are handed out at
//! once, so a new VIP works on a node as soon as its task is there. Only
//! where something actually conflicts does an address wait: a winning
//! claim that another VIP claims too is used once the loser has claimed
//! anew, or after [`SETTLE`] (or at once if the winning claim is settled: a
//! restarted agent must not drop what it served before); a guess
//! (two new VIPs wanting one address, or a VIP whose every claim lost)
//! waits for the claims. An address once handed out stays so for as long
//! as it stays the VIP's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use skein_l4lb::alloc::{self, Address, Claim, ClaimValue, Standing};
use skein_l4lb::{VipKey, VipTarget};
use skein_state::Replica;

/// Prefix of claim keys in a node's keyspace: `vipip:<name>.<framework>`.
pub(crate) const CLAIM_PREFIX: &str = "vipip:";

/// How long a contested winning claim waits before it is handed out even
/// though the losing VIP's hosts have not claimed anew (they may be down):
/// longer than propagation takes, so that concurrent claims have arrived.
/// The overlay settles leases over the same period, and the realizers wait
/// this long (plus a second) after a restart before rewriting the kernel.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// `name.framework`: one address per named VIP, shared by all its ports.
pub(crate) fn vip_id(key: &VipKey) -> Option<String> {
    match &key.target {
        VipTarget::Named { name, framework } => Some(format!("{name}.{framework}")),
        VipTarget::Ip { .. } => None,
    }
}

/// Every claim published in the replica (down nodes' too: their claims keep
/// the order of VIPs stable until the node is forgotten).
pub(crate) fn claims_in(replica: &Replica) -> Vec<Claim> {
    let mut out = Vec::new();
    for (node, keyspace) in replica.nodes() {
        for (key, value) in keyspace.live() {
            let Some(vip) = key.strip_prefix(CLAIM_PREFIX) else {
                continue;
            };
            match serde_json::from_str::<ClaimValue>(value) {
                Ok(value) => out.push(Claim {
                    vip: vip.to_string(),
                    node: node.clone(),
                    value,
                }),
                Err(e) => tracing::debug!(%node, key, error = %e, "ignoring undecodable VIP claim"),
            }
        }
    }
    out
}

/// IPv4 IP VIPs inside 11.0.0.0/8: taken as given, so never allocated.
pub(crate) fn reserved<'a>(keys: impl Iterator<Item = &'a VipKey>) -> BTreeSet<Ipv4Addr> {
    keys.filter_map(|k| match k.target {
        VipTarget::Ip { ip: IpAddr::V4(ip) } if alloc::in_vip_net(ip) => Some(ip),
        _ => None,
    })
    .collect()
}

/// Decides, per VIP, whether its address may be handed out yet, and
/// remembers what was: an address handed out stays so while it is the
/// VIP's, whatever its standing becomes.
#[derive(Default)]
pub(crate) struct Settling {
    seen: HashMap<String, Seen>,
}

struct Seen {
    ip: Ipv4Addr,
    /// When this address became the VIP's here.
    at: Instant,
    usable: bool,
    /// Since when the VIP has held it by a winning claim (uncontested or
    /// not), without a break.
    won_at: Option<Instant>,
}

impl Settling {
    /// Updates with the latest addresses; returns VIP → (address, usable).
    pub(crate) fn observe(
        &mut self,
        addresses: &BTreeMap<String, Address>,
        now: Instant,
    ) -> BTreeMap<String, (Ipv4Addr, bool)> {
        self.seen.retain(|vip, _| addresses.contains_key(vip));
        addresses
            .iter()
            .map(|(vip, a)| {
                let fresh = || Seen {
                    ip: a.ip,
                    at: now,
                    usable: false,
                    won_at: None,
                };
                let seen = self.seen.entry(vip.clone()).or_insert_with(fresh);
                if seen.ip != a.ip {
                    *seen = fresh();
                }
                seen.won_at = match a.standing {
                    Standing::Claimed | Standing::Contested { .. } => seen.won_at.or(Some(now)),
                    Standing::Predicted | Standing::Pending => None,
                };
                seen.usable |= match a.standing {
                    Standing::Claimed | Standing::Predicted => true,
                    // A settled winner held the address before (a
                    // restarted agent must not drop what it served).
                    Standing::Contested { settled } => {
                        settled || now.duration_since(seen.at) >= SETTLE
                    }
                    Standing::Pending => false,
                };
                (vip.clone(), (a.ip, seen.usable))
            })
            .collect()
    }

    /// Whether `vip` has held `ip` by a winning claim, here, for
    /// [`SETTLE`] counted from no earlier than `synced_since`.
    fn held(&self, vip: &str, ip: Ipv4Addr, now: Instant, synced_since: Instant) -> bool {
        self.seen.get(vip).is_some_and(|s| {
            s.ip == ip
                && s.usable
                && s.won_at
                    .is_some_and(|t| now.duration_since(t.max(synced_since)) >= SETTLE)
        })
    }
}

/// What [`Allocator::reconcile`] decided.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    /// Claims this node should publish (new or changed), VIP → value.
    pub publish: BTreeMap<String, ClaimValue>,
    /// Claims of this node to withdraw.
    pub withdraw: Vec<String>,
    /// VIP → (address, whether it may be handed to users yet).
    pub addresses: BTreeMap<String, (Ipv4Addr, bool)>,
    /// The winning claim's `(since, settled)` per name that has one: its
    /// age, for whoever orders names by it.
    pub ranks: BTreeMap<String, (u64, bool)>,
    /// Whether time alone changes the next step: an address waits to be
    /// usable, or a claim of this node to be marked settled.
    pub waits_on_time: bool,
}

/// This node's side of named-VIP allocation, as a pure step per refresh.
#[derive(Default)]
pub(crate) struct Allocator {
    settling: Settling,
    /// Since when this node's view has been synced without a break.
    synced_since: Option<Instant>,
}

impl Allocator {
    /// From the replica: the claims this node should publish or withdraw
    /// for the VIPs it hosts, and the cluster's addresses as of `now`.
    #[cfg(test)]
    pub(crate) fn reconcile(
        &mut self,
        me: &str,
        replica: &Replica,
        liveness: &BTreeMap<String, skein_state::Liveness>,
        now: Instant,
        now_unix_ms: u64,
    ) -> Reconciled {
        let (tasks, _) = skein_state::tasks(replica, liveness);
        self.reconcile_tasks(me, replica, &tasks, now, now_unix_ms, true)
    }

    /// The per-refresh step, with the tasks already derived from the
    /// same replica (the agent derives them once per refresh). `synced`:
    /// the replica includes the rest of the cluster (a peer is alive, or
    /// there is nobody to wait for); only then does this node mark its
    /// claims settled (see [`alloc::ClaimValue::settled`]).
    pub(crate) fn reconcile_tasks(
        &mut self,
        me: &str,
        replica: &Replica,
        tasks: &[skein_state::TaskView],
        now: Instant,
        now_unix_ms: u64,
        synced: bool,
    ) -> Reconciled {
        let (vip_map, _) = skein_l4lb::vips_of(tasks);
        let hosted: BTreeSet<String> = vip_map
            .iter()
            .filter(|(_, backends)| backends.iter().any(|b| b.node_id == me))
            .filter_map(|(key, _)| vip_id(key))
            .collect();
        let live: BTreeSet<String> = vip_map.keys().filter_map(vip_id).collect();
        let claims = claims_in(replica);
        let reserved = reserved(vip_map.keys());
        self.reconcile_claims(
            &alloc::Pool::VIPS,
            me,
            &hosted,
            &live,
            &claims,
            &reserved,
            now,
            now_unix_ms,
            synced,
        )
    }

    /// The step for any pool of slots: `hosted` are the names this node
    /// claims for, `live` every name in use, `claims` every claim seen.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reconcile_claims(
        &mut self,
        pool: &alloc::Pool,
        me: &str,
        hosted: &BTreeSet<String>,
        live: &BTreeSet<String>,
        claims: &[Claim],
        reserved: &BTreeSet<Ipv4Addr>,
        now: Instant,
        now_unix_ms: u64,
        synced: bool,
    ) -> Reconciled {
        let resolution = alloc::resolve_in(pool, live, claims, reserved);
        let addresses = self.settling.observe(&resolution.addresses, now);
        self.synced_since = if synced {
            self.synced_since.or(Some(now))
        } else {
            None
        };
        // A claim is marked settled once its VIP has held the address by a
        // winning claim for SETTLE of synced views (contested too: the loser's
        // claim may stay while its node is down, and the winner is the
        // winner either way).
        let winning = |vip: &str| {
            resolution
                .addresses
                .get(vip)
                .filter(|a| matches!(a.standing, Standing::Claimed | Standing::Contested { .. }))
                .map(|a| a.ip)
        };
        let synced_since = self.synced_since;
        let desired =
            alloc::desired_claims_in(pool, hosted, claims, &resolution, now_unix_ms, |vip| {
                synced_since.is_some_and(|since| {
                    winning(vip).is_some_and(|ip| self.settling.held(vip, ip, now, since))
                })
            });
        let settles_later = synced_since.is_some()
            && desired
                .iter()
                .any(|(vip, v)| !v.settled && winning(vip) == Some(v.ip));
        let published: BTreeMap<String, ClaimValue> = claims
            .iter()
            .filter(|c| c.node == me)
            .map(|c| (c.vip.clone(), c.value.clone()))
            .collect();
        let publish = desired
            .iter()
            .filter(|(vip, value)| published.get(*vip) != Some(value))
            .map(|(vip, value)| (vip.clone(), value.clone()))
            .collect();
        let withdraw = published
            .keys()
            .filter(|v| !desired.contains_key(*v))
            .cloned()
            .collect();
        let waits_on_time = settles_later || addresses.values().any(|(_, usable)| !usable);
        let ranks = resolution
            .allocation
            .assigned
            .iter()
            .map(|(name, v)| (name.clone(), (v.since, v.settled)))
            .collect();
        Reconciled {
            publish,
            withdraw,
            addresses,
            ranks,
            waits_on_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::test_support::{alive, put};

    const T0_MS: u64 = 1_700_000_000_000;

    fn task(replica: &mut Replica, node: &str, app: &str) {
        let spec = format!(
            r#"{{"app":"/{app}","ip":"10.0.0.1","ports":[{{"port":80,"labels":{{"VIP_0":"/{app}:80"}}}}]}}"#
        );
        put(replica, node, &format!("task:{app}.1"), &spec);
    }

    fn publish(replica: &mut Replica, node: &str, r: &Reconciled) {
        for (vip, value) in &r.publish {
            let json = serde_json::to_string(value).expect("claim encodes");
            put(replica, node, &format!("{CLAIM_PREFIX}{vip}"), &json);
        }
    }

    /// Two app names whose VIPs' first probes coincide.
    fn colliding_apps() -> (String, String) {
        let mut first: HashMap<Ipv4Addr, String> = HashMap::new();
        for i in 0.. {
            let app = format!("c{i}");
            let ip = alloc::probe(&format!("{app}.marathon"), 0);
            if let Some(other) = first.insert(ip, app.clone()) {
                return (other, app);
            }
        }
        unreachable!("the probe space is finite")
    }

    #[test]
    fn a_new_vip_is_usable_everywhere_before_its_claim_arrives() {
        let live = alive(&["n1", "n2"]);
        let t0 = Instant::now();
        let mut replica = Replica::new();
        task(&mut replica, "n1", "web");
        // n2 sees the task, not yet a claim: it uses the address at once.
        let mut n2 = Allocator::default();
        let seen = n2.reconcile("n2", &replica, &live, t0, T0_MS);
        assert!(seen.publish.is_empty());
        let (ip, usable) = seen.addresses["web.marathon"];
        assert!(usable);
        // n1, the host, claims that very address.
        let mut n1 = Allocator::default();
        let host = n1.reconcile("n1", &replica, &live, t0, T0_MS);
        assert_eq!(host.publish["web.marathon"].ip, ip);
        assert_eq!(host.addresses["web.marathon"], (ip, true));
        publish(&mut replica, "n1", &host);
        let later = n2.reconcile("n2", &replica, &live, t0, T0_MS + 30);
        assert_eq!(later.addresses["web.marathon"], (ip, true));
        // A restarted agent reading this replica uses it at once too.
        let restarted = Allocator::default().reconcile("n2", &replica, &live, t0, T0_MS + 60);
        assert_eq!(restarted.addresses["web.marathon"], (ip, true));
    }

    #[test]
    fn colliding_new_vips_wait_until_the_claims_decide() {
        let (x, y) = colliding_apps();
        let (xv, yv) = (format!("{x}.marathon"), format!("{y}.marathon"));
        let p = alloc::probe(&xv, 0);
        let live = alive(&["n1", "n2", "n3"]);
        let t0 = Instant::now();
        let mut replica = Replica::new();
        task(&mut replica, "n1", &x);
        task(&mut replica, "n3", &y);
        let mut n2 = Allocator::default();
        let r = n2.reconcile("n2", &replica, &live, t0, T0_MS);
        assert!(!r.addresses[&xv].1 && !r.addresses[&yv].1, "{r:?}");
        // Both hosts, unaware of each other, claim p; y's claim is older.
        let mut n1 = Allocator::default();
        let mut n3 = Allocator::default();
        let mut only_y = Replica::new();
        task(&mut only_y, "n3", &y);
        let claim_y = n3.reconcile("n3", &only_y, &live, t0, T0_MS);
        let mut only_x = Replica::new();
        task(&mut only_x, "n1", &x);
        let claim_x = n1.reconcile("n1", &only_x, &live, t0, T0_MS + 5);
        assert_eq!(claim_x.publish[&xv].ip, p);
        assert_eq!(claim_y.publish[&yv].ip, p);
        publish(&mut replica, "n3", &claim_y);
        publish(&mut replica, "n1", &claim_x);
        let r = n2.reconcile("n2", &replica, &live, t0, T0_MS + 10);
        assert_eq!(r.addresses[&yv], (p, false), "contested: waits");
        assert!(!r.addresses[&xv].1);
        // x's host sees it lost and claims anew; then both are usable.
        let again = n1.reconcile("n1", &replica, &live, t0, T0_MS + 20);
        assert_ne!(again.publish[&xv].ip, p);
        publish(&mut replica, "n1", &again);
        let r = n2.reconcile("n2", &replica, &live, t0, T0_MS + 30);
        assert_eq!(r.addresses[&yv], (p, true));
        assert_eq!(r.addresses[&xv], (again.publish[&xv].ip, true));
    }

    #[test]
    fn a_contested_winner_is_used_after_settling_or_at_once_if_settled() {
        let ip = Ipv4Addr::new(11, 0, 0, 1);
        let contested = |settled| {
            BTreeMap::from([(
                "web.marathon".to_string(),
                Address {
                    ip,
                    standing: Standing::Contested { settled },
                },
            )])
        };
        let t0 = Instant::now();
        let mut s = Settling::default();
        let got = s.observe(&contested(false), t0);
        assert_eq!(got["web.marathon"], (ip, false));
        let got = s.observe(&contested(false), t0 + SETTLE);
        assert_eq!(got["web.marathon"], (ip, true));
        // A restarted agent: a settled winning claim at once.
        let got = Settling::default().observe(&contested(true), t0);
        assert_eq!(got["web.marathon"], (ip, true));
    }

    #[test]
    fn an_address_once_used_stays_used_until_it_changes() {
        let ip = Ipv4Addr::new(11, 0, 0, 1);
        let at =
            |ip, standing| BTreeMap::from([("web.marathon".to_string(), Address { ip, standing })]);
        let t0 = Instant::now();
        let mut s = Settling::default();
        assert_eq!(
            s.observe(&at(ip, Standing::Predicted), t0)["web.marathon"],
            (ip, true)
        );
        // A conflict appears on the same address: it stays in use.
        assert_eq!(
            s.observe(&at(ip, Standing::Pending), t0)["web.marathon"],
            (ip, true)
        );
        // Another address is a new one: it waits like any guess.
        let other = Ipv4Addr::new(11, 0, 0, 2);
        assert_eq!(
            s.observe(&at(other, Standing::Pending), t0)["web.marathon"],
            (other, false)
        );
    }

    #[test]
    fn a_held_address_is_claimed_settled_and_beats_a_lagging_clock() {
        let (x, y) = colliding_apps();
        let (xv, yv) = (format!("{x}.marathon"), format!("{y}.marathon"));
        let p = alloc::probe(&xv, 0);
        let t0 = Instant::now();
        let mut replica = Replica::new();
        task(&mut replica, "n1", &x);
        let mut n1 = Allocator::default();
        let tasks = |r: &Replica| skein_state::tasks(r, &alive(&["n1", "n2", "n3"])).0;
        let first = n1.reconcile_tasks("n1", &replica, &tasks(&replica), t0, T0_MS, true);
        assert!(!first.publish[&xv].settled);
        publish(&mut replica, "n1", &first);
        // Its claim in view: time alone will settle it.
        let claimed = n1.reconcile_tasks("n1", &replica, &tasks(&replica), t0, T0_MS, true);
        assert!(claimed.publish.is_empty());
        assert!(claimed.waits_on_time, "settles with time");
        // Not synced (no peer alive yet): held long enough, still unsettled.
        let alone = n1.reconcile_tasks("n1", &replica, &tasks(&replica), t0 + SETTLE, T0_MS, false);
        assert!(alone.publish.is_empty());
        assert!(!alone.waits_on_time, "only a peer coming up can settle it");
        // Synced again: the hold starts over (held while unsynced proves
        // nothing), a full SETTLE.
        let resynced =
            n1.reconcile_tasks("n1", &replica, &tasks(&replica), t0 + SETTLE, T0_MS, true);
        assert!(resynced.publish.is_empty());
        assert!(resynced.waits_on_time);
        let settled = n1.reconcile_tasks(
            "n1",
            &replica,
            &tasks(&replica),
            t0 + SETTLE * 2,
            T0_MS,
            true,
        );
        assert_eq!(settled.publish[&xv].ip, p);
        assert!(settled.publish[&xv].settled);
        assert!(!settled.waits_on_time);
        publish(&mut replica, "n1", &settled);
        // n3 rejoins with a wiped data dir and a clock a day behind, and
        // claims y at p before it has synced.
        let mut only_y = Replica::new();
        task(&mut only_y, "n3", &y);
        let mut n3 = Allocator::default();
        let lagging = T0_MS - 86_400_000;
        let claim_y = n3.reconcile_tasks("n3", &only_y, &tasks(&only_y), t0, lagging, false);
        assert_eq!(claim_y.publish[&yv].ip, p);
        assert!(claim_y.publish[&yv].since < T0_MS);
        task(&mut replica, "n3", &y);
        publish(&mut replica, "n3", &claim_y);
        // Everyone keeps x at p; y's host moves on.
        let mut n2 = Allocator::default();
        let r = n2.reconcile_tasks("n2", &replica, &tasks(&replica), t0, T0_MS, true);
        assert_eq!(r.addresses[&xv], (p, true), "settled: usable at once");
        assert!(!r.addresses[&yv].1);
        let again = n3.reconcile_tasks("n3", &replica, &tasks(&replica), t0, lagging, true);
        assert_ne!(again.publish[&yv].ip, p);
        assert!(
            again.publish[&yv].since > T0_MS,
            "after every claim n3 has seen"
        );
    }
}
