//! Realizes VIPs in this node's nftables, on the realizer driver
//! (`realize.rs`): the desired table is computed from the view (pure,
//! `skein_l4lb::nft`), and a change is the element operations between two
//! tables, sent as one atomic netlink batch (`skein-nftables`: no process
//! per change). The whole table (at start-up when the kernel holds nothing
//! of ours, or when what it holds is not in our shape) and the rare new
//! backend-count class go through `nft -f`, also atomic. The kernel is
//! behind [`NftKernel`], so the planner and the read-back are tested on a
//! fake.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{bail, Context};
use skein_l4lb::nft::{Change, Service, Table, TABLE};
use skein_nftables::ElementOp;
use skein_state::Protocol;

use crate::realize;
use crate::view::View;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    Nftables,
    Ipvs,
    /// Compute and expose VIPs, change nothing in the kernel.
    None,
}

impl Dataplane {
    /// `auto` picks IPVS where the kernel has it (as DC/OS did), else
    /// nftables.
    pub fn parse(s: &str) -> anyhow::Result<Dataplane> {
        match s {
            "auto" if std::path::Path::new("/proc/net/ip_vs").exists() => Ok(Dataplane::Ipvs),
            "auto" | "nftables" => Ok(Dataplane::Nftables),
            "ipvs" => Ok(Dataplane::Ipvs),
            "none" => Ok(Dataplane::None),
            other => bail!("--l4lb-dataplane must be auto, nftables, ipvs or none, not {other:?}"),
        }
    }
}

pub(crate) fn nft(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    crate::command::run("nft", args, stdin, crate::command::COMMAND_TIMEOUT)
}

/// Our table as read back: every element by set, and its structure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// (set or map, element as nft writes it: `11.0.0.1 . 80 . 0 : 10.0.0.2 . 8080`).
    pub elements: BTreeSet<(String, String)>,
    /// Sets present, by name.
    pub sets: BTreeSet<String>,
    /// Chain → number of rules.
    pub chains: BTreeMap<String, usize>,
}

/// What the nftables realizer reads and writes.
pub trait NftKernel: Send + 'static {
    /// Our table, or `None` when there is none.
    fn list(&mut self) -> anyhow::Result<Option<Listing>>;
    /// Replaces our table with `table` (its structure atomically, then its
    /// elements).
    fn replace(&mut self, table: &Table) -> anyhow::Result<()>;
    /// A change with a structural part, as one `nft -f` transaction.
    fn transaction(&mut self, change: &Change) -> anyhow::Result<()>;
    /// Element operations as one atomic batch.
    fn elements(&mut self, ops: &[ElementOp]) -> anyhow::Result<()>;
}

/// The host's nftables: `nft` for whole tables and listings, netlink for
/// element changes.
#[derive(Default)]
pub struct HostNftables {
    socket: Option<skein_nftables::Nftables>,
}

impl NftKernel for HostNftables {
    fn list(&mut self) -> anyhow::Result<Option<Listing>> {
        match nft(&["-j", "list", "table", "ip", TABLE], None) {
            Ok(json) => parse_listing(&json).map(Some),
            // No table of ours: `nft` says "No such file or directory".
            Err(e) if format!("{e:#}").contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn replace(&mut self, table: &Table) -> anyhow::Result<()> {
        // The table without elements through `nft -f` (atomic replacement
        // of whatever table of ours exists), then every element in one
        // netlink batch: 0.3 s at 10,000 VIPs × 10 backends where one
        // `nft -f` of the whole table takes 1.1–1.5 s (docs/BENCHMARKS.md).
        nft(&["-f", "-"], Some(&table.skeleton()))?;
        self.elements(&table.elements())
    }

    fn transaction(&mut self, change: &Change) -> anyhow::Result<()> {
        nft(&["-f", "-"], Some(&change.text)).map(|_| ())
    }

    fn elements(&mut self, ops: &[ElementOp]) -> anyhow::Result<()> {
        if self.socket.is_none() {
            self.socket = Some(skein_nftables::Nftables::open().context("nf_tables netlink")?);
        }
        let socket = self.socket.as_mut().context("nf_tables netlink")?;
        let result = socket.apply(TABLE, ops);
        if result.is_err() {
            // Reopen next time: the socket may be what broke.
            self.socket = None;
        }
        Ok(result?)
    }
}

fn json_scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `{"concat": [..]}` or a single value, as nft's text form.
fn json_element(v: &serde_json::Value) -> Option<String> {
    match v.get("concat") {
        Some(parts) => Some(
            parts
                .as_array()?
                .iter()
                .map(json_scalar)
                .collect::<Option<Vec<_>>>()?
                .join(" . "),
        ),
        None => json_scalar(v),
    }
}

/// Reads `nft -j list table ip skein`.
pub fn parse_listing(json: &str) -> anyhow::Result<Listing> {
    let doc: serde_json::Value = serde_json::from_str(json).context("nft -j output")?;
    let items = doc
        .get("nftables")
        .and_then(|v| v.as_array())
        .context("nft -j output without `nftables`")?;
    let mut out = Listing::default();
    for item in items {
        let (kind, body) = match item.as_object().and_then(|o| o.iter().next()) {
            Some((k, v)) => (k.as_str(), v),
            None => continue,
        };
        match kind {
            "set" | "map" => {
                let name = body
                    .get("name")
                    .and_then(|n| n.as_str())
                    .context("set without a name")?;
                out.sets.insert(name.to_string());
                for e in body
                    .get("elem")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                {
                    let text = match e.as_array() {
                        // A map element: [key, data].
                        Some(pair) if pair.len() == 2 => format!(
                            "{} : {}",
                            json_element(&pair[0]).context("map key")?,
                            json_element(&pair[1]).context("map data")?
                        ),
                        _ => json_element(e).context("set element")?,
                    };
                    let text = if name == "hairpin" {
                        protocol_names(&text)
                    } else {
                        text
                    };
                    out.elements.insert((name.to_string(), text));
                }
            }
            "chain" => {
                if let Some(name) = body.get("name").and_then(|n| n.as_str()) {
                    out.chains.entry(name.to_string()).or_insert(0);
                }
            }
            "rule" => {
                if let Some(chain) = body.get("chain").and_then(|n| n.as_str()) {
                    *out.chains.entry(chain.to_string()).or_insert(0) += 1;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `nft` names an `inet_proto` by number when the host has no
/// `/etc/protocols` (a minimal image without `netbase`): `… . 6 . …` is
/// `… . tcp . …`. Without this, a hairpin element read back never equals the
/// one written, every read-back looks like drift, and each "repair"
/// rewrites the whole table (a moment without VIPs).
fn protocol_names(element: &str) -> String {
    let mut fields: Vec<&str> = element.split(" . ").collect();
    if let Some(proto) = fields.get_mut(2) {
        match *proto {
            "6" => *proto = "tcp",
            "17" => *proto = "udp",
            _ => {}
        }
    }
    fields.join(" . ")
}

fn proto_of(s: &str) -> Option<Protocol> {
    match s {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

/// What [`Table::ruleset`] would list for `table`.
pub fn expected_listing(table: &Table) -> Listing {
    let mut out = Listing::default();
    for op in table.elements() {
        out.elements.insert((op.set.clone(), op.element()));
    }
    for p in ["tcp", "udp"] {
        for k in 1..=table.classes() {
            out.sets.insert(format!("{p}{k}"));
        }
        out.sets.insert(format!("{p}_backends"));
    }
    out.sets.insert("hairpin".into());
    out.chains
        .insert("services".into(), 1 + 2 * table.classes());
    for chain in ["prerouting", "output", "postrouting"] {
        out.chains.insert(chain.into(), 1);
    }
    out
}

/// The table a listing holds, if it is exactly one we could have written;
/// `None` otherwise (the caller then rewrites the whole table).
pub fn table_of(listing: &Listing) -> Option<Table> {
    let backends: BTreeMap<(Protocol, &str), &str> = listing
        .elements
        .iter()
        .filter_map(|(set, e)| {
            let p = proto_of(set.strip_suffix("_backends")?)?;
            let (key, data) = e.split_once(" : ")?;
            Some(((p, key), data))
        })
        .collect();
    let classes = listing
        .sets
        .iter()
        .filter_map(|s| s.strip_prefix("tcp")?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    // A table of ours with k classes lists the sets tcp1..=tcpk and
    // udp1..=udpk: a larger class number (a set `tcp2065476370`, found by
    // fuzzing) is not ours, and building its expected listing would make
    // billions of set names.
    if classes > listing.sets.len() {
        return None;
    }
    let mut services = Vec::new();
    for (set, e) in &listing.elements {
        let Some((p, k)) = ["tcp", "udp"].iter().find_map(|p| {
            let k: usize = set.strip_prefix(p)?.parse().ok()?;
            Some((proto_of(p)?, k))
        }) else {
            continue;
        };
        if k > listing.sets.len() {
            return None; // as above: no such class of ours
        }
        let (address, port) = e.split_once(" . ")?;
        let address: Ipv4Addr = address.parse().ok()?;
        let port: u16 = port.parse().ok()?;
        let mut targets = Vec::with_capacity(k);
        for slot in 0..k {
            let slot_key = format!("{address} . {port} . {slot}");
            let data = backends.get(&(p, slot_key.as_str()))?;
            let (ip, bport) = data.split_once(" . ")?;
            targets.push((ip.parse().ok()?, bport.parse().ok()?));
        }
        services.push(Service {
            address,
            protocol: p,
            port,
            backends: targets,
        });
    }
    let table = Table::with_classes(&services, classes);
    (expected_listing(&table) == *listing).then_some(table)
}

/// How the table moves.
#[derive(Debug)]
pub enum NftPlan {
    /// Write the whole table (nothing of ours, or not in our shape).
    Replace(Table),
    /// A transaction; `classes` is the table's class count after it.
    Change { change: Change, classes: usize },
}

pub struct NftDataplane<K: NftKernel> {
    kernel: K,
    /// Classes the kernel's table has grown to (they are never removed).
    classes: usize,
}

impl<K: NftKernel> NftDataplane<K> {
    pub fn new(kernel: K) -> Self {
        NftDataplane { kernel, classes: 0 }
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }
}

/// The services of a view's VIPs, with the backends this node uses.
pub fn services(view: &View) -> Vec<Service> {
    skein_l4lb::nft::services(view.vips.iter().map(|v| {
        let backends = v
            .backend
            .iter()
            .filter(|b| b.in_use)
            .map(|b| (b.ip, b.port))
            .collect();
        (v.address, v.protocol, v.port, backends)
    }))
}

impl<K: NftKernel> realize::Dataplane for NftDataplane<K> {
    type State = Table;
    type Plan = NftPlan;

    fn name(&self) -> &'static str {
        "nftables"
    }

    fn desired(&mut self, view: &View) -> Table {
        Table::with_classes(&services(view), self.classes)
    }

    fn observe(&mut self) -> anyhow::Result<Option<Table>> {
        let table = self.kernel.list()?.as_ref().and_then(table_of);
        if let Some(t) = &table {
            self.classes = t.classes();
        }
        Ok(table)
    }

    fn plan(&self, from: Option<&Table>, to: &Table) -> Option<NftPlan> {
        let Some(from) = from else {
            return Some(NftPlan::Replace(to.clone()));
        };
        let next: Vec<Service> = to.services().cloned().collect();
        let mut moved = from.clone();
        let change = moved.plan(&next);
        if moved.classes() != to.classes() {
            // Classes only grow: `to` is below what the kernel has.
            return Some(NftPlan::Replace(to.clone()));
        }
        change.map(|change| NftPlan::Change {
            change,
            classes: moved.classes(),
        })
    }

    fn apply(&mut self, plan: &NftPlan) -> anyhow::Result<usize> {
        match plan {
            NftPlan::Replace(table) => {
                self.kernel.replace(table)?;
                self.classes = table.classes();
                Ok(table.elements().len().max(1))
            }
            NftPlan::Change { change, .. } if change.elements_only() => {
                self.kernel.elements(&change.elements)?;
                Ok(change.elements.len())
            }
            NftPlan::Change { change, classes } => {
                self.kernel.transaction(change)?;
                self.classes = *classes;
                Ok(change.elements.len() + 1)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! nftables in memory: our table as a [`Listing`], changed the way the
    //! kernel changes it (atomic batches; deleting a missing element fails).

    use super::*;

    #[derive(Debug, Default)]
    pub(crate) struct FakeNft {
        pub listing: Option<Listing>,
        pub fail_next: bool,
        /// `nft` processes that would have run (whole tables, structural).
        pub processes: usize,
        pub batches: usize,
    }

    impl FakeNft {
        fn fail(&mut self) -> anyhow::Result<()> {
            if std::mem::take(&mut self.fail_next) {
                bail!("injected failure");
            }
            Ok(())
        }
    }

    impl NftKernel for FakeNft {
        fn list(&mut self) -> anyhow::Result<Option<Listing>> {
            Ok(self.listing.clone())
        }

        fn replace(&mut self, table: &Table) -> anyhow::Result<()> {
            self.fail()?;
            self.processes += 1;
            self.listing = Some(expected_listing(table));
            Ok(())
        }

        fn transaction(&mut self, change: &Change) -> anyhow::Result<()> {
            self.fail()?;
            self.processes += 1;
            let mut next = self.listing.clone().context("no table")?;
            for line in change.structural.iter().flat_map(|s| s.lines()) {
                let prefix = format!("add set ip {TABLE} ");
                if let Some(rest) = line.strip_prefix(&prefix) {
                    let name = rest.split_whitespace().next().context("set name")?;
                    next.sets.insert(name.to_string());
                } else if line.starts_with(&format!("add rule ip {TABLE} services ")) {
                    *next.chains.entry("services".into()).or_insert(0) += 1;
                }
            }
            self.listing = Some(next);
            self.batches -= 0;
            let ops = change.elements.clone();
            self.apply_ops(&ops)
        }

        fn elements(&mut self, ops: &[ElementOp]) -> anyhow::Result<()> {
            self.fail()?;
            self.batches += 1;
            self.apply_ops(ops)
        }
    }

    impl FakeNft {
        fn apply_ops(&mut self, ops: &[ElementOp]) -> anyhow::Result<()> {
            let mut next = self.listing.clone().context("no table")?;
            for op in ops {
                let key = (op.set.clone(), op.element());
                match op.kind {
                    skein_nftables::OpKind::Add => {
                        if !next.sets.contains(&op.set) {
                            bail!("no set {}", op.set);
                        }
                        next.elements.insert(key);
                    }
                    skein_nftables::OpKind::Flush => {
                        next.elements.retain(|(s, _)| *s != op.set);
                    }
                    skein_nftables::OpKind::Delete => {
                        // A deletion names the key only: find the element.
                        let prefix = format!("{} : ", key.1);
                        let found = next
                            .elements
                            .iter()
                            .find(|(s, e)| *s == op.set && (*e == key.1 || e.starts_with(&prefix)))
                            .cloned();
                        match found {
                            Some(e) => {
                                next.elements.remove(&e);
                            }
                            // All or nothing, as the kernel: ENOENT.
                            None => bail!("delete {} {}: No such file or directory", op.set, key.1),
                        }
                    }
                }
            }
            self.listing = Some(next);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::fake::FakeNft;
    use super::*;
    use crate::realize::{Driver, Wake};
    use crate::view::test_support::view_with_tasks;

    type D = Driver<NftDataplane<FakeNft>>;

    /// Found by fuzzing (`fuzz/fuzz_targets/l4lb_listing.rs`): a set named
    /// with a huge class number made `table_of` build an expected listing of
    /// billions of sets (out of memory); an element in such a set reserved
    /// room for billions of backends. Neither is a table of ours.
    #[test]
    fn huge_class_numbers_are_not_our_table() {
        let set =
            |name: &str| format!(r#"{{"set":{{"family":"ip","name":"{name}","table":"skein"}}}}"#);
        let listing = parse_listing(&format!(
            r#"{{"nftables":[{},{}]}}"#,
            set("tcp1"),
            set("tcp2065476370")
        ))
        .expect("listing");
        assert!(table_of(&listing).is_none());
        let listing = parse_listing(&format!(
            r#"{{"nftables":[{{"set":{{"name":"udp99999999999","elem":[{{"concat":["11.0.0.1",80]}}]}}}},{}]}}"#,
            set("tcp1")
        ))
        .expect("listing");
        assert!(table_of(&listing).is_none());
        // A table of ours still reads back.
        let table = Table::with_classes(&[], 2);
        assert_eq!(table_of(&expected_listing(&table)), Some(table));
    }

    /// On a host without `/etc/protocols` (the compose image has no
    /// `netbase`), `nft -j` gives a hairpin element's protocol as a number.
    /// The read-back must still equal what was written, or every resync
    /// "repairs" the table by rewriting it whole (a moment without VIPs,
    /// seen as a failed request in faults.sh).
    #[test]
    fn hairpin_protocols_read_back_by_number_or_name() {
        let table = Table::with_classes(
            &[skein_l4lb::nft::Service {
                address: "11.0.0.7".parse().expect("ip"),
                protocol: Protocol::Tcp,
                port: 80,
                backends: vec![("10.0.0.1".parse().expect("ip"), 8080)],
            }],
            1,
        );
        let expected = expected_listing(&table);
        let mut json: Vec<String> = expected
            .sets
            .iter()
            .map(|set| match set.as_str() {
                "hairpin" => {
                    r#"{"set":{"name":"hairpin","elem":[{"concat":["10.0.0.1","11.0.0.7",6,80]}]}}"#
                        .to_string()
                }
                "tcp1" => r#"{"set":{"name":"tcp1","elem":[{"concat":["11.0.0.7",80]}]}}"#.to_string(),
                "tcp_backends" => r#"{"map":{"name":"tcp_backends","elem":[[{"concat":["11.0.0.7",80,0]},{"concat":["10.0.0.1",8080]}]]}}"#
                    .to_string(),
                other => format!(r#"{{"set":{{"name":"{other}"}}}}"#),
            })
            .collect();
        json.sort_by_key(|j| !j.contains("hairpin"));
        for (chain, rules) in expected.chains {
            json.push(format!(r#"{{"chain":{{"name":"{chain}"}}}}"#));
            for _ in 0..rules {
                json.push(format!(r#"{{"rule":{{"chain":"{chain}"}}}}"#));
            }
        }
        let numeric =
            parse_listing(&format!(r#"{{"nftables":[{}]}}"#, json.join(","))).expect("listing");
        assert_eq!(table_of(&numeric), Some(table.clone()), "6 is tcp");
        let named = json[0].replace(",6,", r#","tcp","#);
        json[0] = named;
        let named =
            parse_listing(&format!(r#"{{"nftables":[{}]}}"#, json.join(","))).expect("listing");
        assert_eq!(table_of(&named), Some(table));
    }

    fn driver(kernel: FakeNft) -> D {
        Driver::new(NftDataplane::new(kernel), Arc::default())
    }

    /// `n` backends of VIP `/web:80`, the first `unhealthy` of them unhealthy.
    fn web(n: usize, unhealthy: usize) -> View {
        let ips: Vec<String> = (1..=n).map(|i| format!("10.0.1.{i}")).collect();
        view_with_tasks(
            ips.iter()
                .enumerate()
                .map(|(i, ip)| (format!("t{i}"), ip.as_str(), "/web:80", i >= unhealthy))
                .collect(),
        )
    }

    fn kernel_table(d: &D) -> Option<Table> {
        d.dataplane().kernel().listing.as_ref().and_then(table_of)
    }

    #[test]
    fn cold_start_writes_the_table_then_changes_are_one_batch_each() {
        let mut d = driver(FakeNft::default());
        d.step(&web(3, 0), Wake::View).unwrap();
        assert_eq!(d.dataplane().kernel().processes, 1);
        let t = kernel_table(&d).expect("our shape");
        assert_eq!(t.services().next().unwrap().backends.len(), 3);
        // One backend turns unhealthy: elements only, no process.
        let n = d.step(&web(3, 1), Wake::View).unwrap();
        assert!(n > 0);
        assert_eq!(
            d.dataplane().kernel().processes,
            1,
            "no nft process per change"
        );
        assert_eq!(d.dataplane().kernel().batches, 1);
        let t = kernel_table(&d).unwrap();
        assert_eq!(t.services().next().unwrap().backends.len(), 2);
        assert_eq!(d.counters().observes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn warm_start_changes_nothing() {
        let mut first = driver(FakeNft::default());
        first.step(&web(4, 0), Wake::View).unwrap();
        let listing = first.dataplane().kernel().listing.clone();
        let mut restarted = driver(FakeNft {
            listing,
            ..Default::default()
        });
        assert_eq!(restarted.step(&web(4, 0), Wake::View).unwrap(), 0);
        let k = restarted.dataplane().kernel();
        assert_eq!((k.processes, k.batches), (0, 0));
    }

    #[test]
    fn drift_is_repaired_on_resync() {
        let mut d = driver(FakeNft::default());
        let view = web(3, 0);
        d.step(&view, Wake::View).unwrap();
        let want = d.dataplane().kernel().listing.clone();
        {
            // `nft delete element ip skein tcp_backends { ... }` by hand.
            let listing = d.dataplane_mut().kernel_mut().listing.as_mut().unwrap();
            let victim = listing
                .elements
                .iter()
                .find(|(s, _)| s == "tcp_backends")
                .cloned()
                .unwrap();
            listing.elements.remove(&victim);
        }
        d.step(&view, Wake::Resync).unwrap();
        assert_eq!(d.counters().drift_repaired.load(Ordering::Relaxed), 1);
        assert_eq!(d.dataplane().kernel().listing, want);
        d.step(&view, Wake::Resync).unwrap();
        assert_eq!(d.counters().drift_repaired.load(Ordering::Relaxed), 1);
        // The table deleted altogether comes back too.
        d.dataplane_mut().kernel_mut().listing = None;
        d.step(&view, Wake::Resync).unwrap();
        assert_eq!(d.counters().drift_repaired.load(Ordering::Relaxed), 2);
        assert_eq!(d.dataplane().kernel().listing, want);
    }

    #[test]
    fn a_failed_apply_is_counted_and_retried() {
        let mut d = driver(FakeNft::default());
        d.step(&web(2, 0), Wake::View).unwrap();
        d.dataplane_mut().kernel_mut().fail_next = true;
        assert!(d.step(&web(3, 0), Wake::View).is_err());
        assert_eq!(d.counters().errors.load(Ordering::Relaxed), 1);
        assert!(d.step(&web(3, 0), Wake::Retry).unwrap() > 0);
        assert_eq!(
            kernel_table(&d)
                .unwrap()
                .services()
                .next()
                .unwrap()
                .backends
                .len(),
            3
        );
    }

    #[test]
    fn a_vip_beyond_the_preset_classes_grows_the_table_once() {
        let mut d = driver(FakeNft::default());
        d.step(&web(2, 0), Wake::View).unwrap();
        d.step(&web(20, 0), Wake::View).unwrap();
        assert_eq!(
            d.dataplane().kernel().processes,
            2,
            "one structural transaction"
        );
        assert_eq!(kernel_table(&d).unwrap().classes(), 20);
        // Back to 2 backends: the grown classes stay, no rewrite, no drift.
        d.step(&web(2, 0), Wake::View).unwrap();
        d.step(&web(2, 0), Wake::Resync).unwrap();
        assert_eq!(d.dataplane().kernel().processes, 2);
        assert_eq!(d.counters().drift_repaired.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn reads_what_nft_lists() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
          {"table": {"family": "ip", "name": "skein", "handle": 1}},
          {"set": {"family": "ip", "name": "tcp1", "table": "skein", "type": ["ipv4_addr", "inet_service"], "handle": 1,
                   "elem": [{"concat": ["11.0.0.1", 80]}]}},
          {"map": {"family": "ip", "name": "tcp_backends", "table": "skein", "type": ["ipv4_addr", "inet_service", "integer"],
                   "handle": 3, "map": "ipv4_addr . inet_service",
                   "elem": [[{"concat": ["11.0.0.1", 80, 0]}, {"concat": ["10.0.0.1", 8080]}]]}},
          {"set": {"family": "ip", "name": "hairpin", "table": "skein", "type": ["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"],
                   "handle": 4, "elem": [{"concat": ["10.0.0.1", "11.0.0.1", "tcp", 80]}]}},
          {"chain": {"family": "ip", "table": "skein", "name": "services", "handle": 5}},
          {"rule": {"family": "ip", "table": "skein", "chain": "services", "handle": 6, "expr": []}}]}"#;
        let l = parse_listing(json).unwrap();
        assert!(l
            .elements
            .contains(&("tcp1".into(), "11.0.0.1 . 80".into())));
        assert!(l.elements.contains(&(
            "tcp_backends".into(),
            "11.0.0.1 . 80 . 0 : 10.0.0.1 . 8080".into()
        )));
        assert!(l
            .elements
            .contains(&("hairpin".into(), "10.0.0.1 . 11.0.0.1 . tcp . 80".into())));
        assert_eq!(l.chains["services"], 1);
        // Not a whole table of ours (classes and chains missing): rewrite.
        assert!(table_of(&l).is_none());
        assert!(parse_listing("not json").is_err());
    }
}
