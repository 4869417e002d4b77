//! The cluster's DNS records, computed from the replica on every node (no
//! central Mesos-DNS to lose). Names follow Mesos-DNS and dcos-dns:
//!
//! - `<app>.<framework>.mesos` A/AAAA → task addresses; an app id
//!   `/group/app` becomes `app-group`;
//! - `_<app>._tcp|_udp.<framework>.mesos` SRV, one per task port, whose
//!   target is the task's own name `<app>-<tag>-<node>.<framework>.mesos`;
//! - `<app>.<framework>.slave.mesos` → the addresses of the agents running it;
//! - `<vip>.<framework>.l4lb.thisdcos.directory` → the VIP's address;
//! - `<app>.<framework>.agentip|containerip|autoip.dcos.thisdcos.directory`;
//! - `ready.spartan` → 127.0.0.1 (a readiness probe).
//!
//! [`Records`] is packed: a name is its first label, stored once, plus an
//! index into a short table of name tails, and record data is fixed-size. A
//! map of owned names to record lists cost ≈ 5 KB per task (eight names,
//! each with its own allocations); packed it is ≈ 0.3 KB
//! (replica-mem-bench, docs/BENCHMARKS.md).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::ser::{SerializeMap, SerializeSeq};
use serde::Serialize;
use skein_state::{NodeView, Protocol, TaskView};

/// Cluster records are short-lived by design: tasks move.
pub const TTL: u32 = 5;
pub const MESOS_ZONE: &str = "mesos.";
pub const DCOS_ZONE: &str = "thisdcos.directory.";
pub const SPARTAN_ZONE: &str = "spartan.";

/// One record's data, borrowed from its [`Records`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "type", rename_all = "UPPERCASE")]
pub enum RData<'a> {
    A {
        ip: Ipv4Addr,
    },
    Aaaa {
        ip: Ipv6Addr,
    },
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: &'a str,
    },
}

impl RData<'static> {
    fn address(ip: IpAddr) -> RData<'static> {
        match ip {
            IpAddr::V4(ip) => RData::A { ip },
            IpAddr::V6(ip) => RData::Aaaa { ip },
        }
    }
}

/// A span of a text arena. `u32`s: an arena past 4 GiB is refused at build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn of(text: &str, span: Span) -> &str {
        text.get(span.start as usize..(span.start as usize + span.len as usize))
            .unwrap_or("")
    }

    /// Appends `s` to `text` and returns where it is.
    fn push(text: &mut String, s: &str) -> Span {
        let start = text.len();
        text.push_str(s);
        Span {
            start: start as u32,
            len: s.len() as u32,
        }
    }
}

/// Record data as stored: fixed size, no allocation of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stored {
    A([u8; 4]),
    Aaaa([u8; 16]),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        /// In `Records::targets`.
        target: Span,
    },
}

/// A name, split after its first label: the label (in `Records::labels`)
/// and the rest (one of `Records::tails`, shared by every name of an app's
/// framework and zone). Its records end at `data_end` in `Records::data`
/// and start where the previous name's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NameRow {
    label_start: u32,
    label_len: u16,
    tail: u16,
    data_end: u32,
}

/// All records: fully qualified lowercase names (with the final dot), each
/// with its data sorted and without duplicates.
///
/// Packed for size: a name is its first label, stored once however many
/// names start with it, plus an index into a short table of the rest
/// (`.marathon.mesos.`, `.marathon.autoip.dcos.thisdcos.directory.`, ...).
/// Names are sorted by (rest, label) so a lookup is a search of the table
/// and then of the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    labels: String,
    tails: Vec<Box<str>>,
    names: Vec<NameRow>,
    data: Vec<Stored>,
    targets: String,
    /// Names that have records below them (`marathon.mesos.` when
    /// `web.marathon.mesos.` exists): they exist without records of their
    /// own (RFC 8020's empty non-terminals), sorted.
    above: Vec<Box<str>>,
    /// A hash of the content: equal records have equal digests, so a reader
    /// can tell a republished set from a changed one without keeping it.
    digest: u64,
}

/// Splits a name after its first label: `("web", ".marathon.mesos.")`.
fn split(name: &str) -> (&str, &str) {
    match name.find('.') {
        Some(i) => name.split_at(i),
        None => (name, ""),
    }
}

/// The records of one name.
#[derive(Debug, Clone, Copy)]
pub struct RecordSet<'a> {
    targets: &'a str,
    data: &'a [Stored],
}

impl<'a> RecordSet<'a> {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = RData<'a>> + 'a {
        let targets = self.targets;
        self.data.iter().map(move |d| match *d {
            Stored::A(ip) => RData::A { ip: ip.into() },
            Stored::Aaaa(ip) => RData::Aaaa { ip: ip.into() },
            Stored::Srv {
                priority,
                weight,
                port,
                target,
            } => RData::Srv {
                priority,
                weight,
                port,
                target: Span::of(targets, target),
            },
        })
    }

    pub fn to_vec(&self) -> Vec<RData<'a>> {
        self.iter().collect()
    }
}

impl<'a> IntoIterator for RecordSet<'a> {
    type Item = RData<'a>;
    type IntoIter = Box<dyn ExactSizeIterator<Item = RData<'a>> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl Serialize for RecordSet<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for r in self.iter() {
            seq.serialize_element(&r)?;
        }
        seq.end()
    }
}

impl Records {
    pub fn builder() -> RecordsBuilder {
        RecordsBuilder::default()
    }

    fn label(&self, row: &NameRow) -> &str {
        Span::of(
            &self.labels,
            Span {
                start: row.label_start,
                len: u32::from(row.label_len),
            },
        )
    }

    fn tail(&self, row: &NameRow) -> &str {
        self.tails.get(usize::from(row.tail)).map_or("", |t| t)
    }

    fn set(&self, i: usize) -> RecordSet<'_> {
        let start = match i.checked_sub(1) {
            Some(p) => self.names[p].data_end as usize,
            None => 0,
        };
        let end = self.names[i].data_end as usize;
        RecordSet {
            targets: &self.targets,
            data: self.data.get(start..end).unwrap_or(&[]),
        }
    }

    /// The records of `name` (any case; fully qualified, with the final dot).
    pub fn get(&self, name: &str) -> Option<RecordSet<'_>> {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        let (label, tail) = split(name);
        let tail = self.tails.binary_search_by(|t| (**t).cmp(tail)).ok()? as u16;
        let i = self
            .names
            .binary_search_by(|row| row.tail.cmp(&tail).then_with(|| self.label(row).cmp(label)))
            .ok()?;
        Some(self.set(i))
    }

    /// Whether some name lies below `name` (lowercase, fully qualified).
    pub fn has_names_below(&self, name: &str) -> bool {
        self.above.binary_search_by(|s| (**s).cmp(name)).is_ok()
    }

    /// Every name with its records, grouped by all but their first label.
    pub fn iter(&self) -> impl Iterator<Item = (String, RecordSet<'_>)> {
        (0..self.names.len()).map(|i| {
            let row = &self.names[i];
            let mut name = String::with_capacity(usize::from(row.label_len) + self.tail(row).len());
            name.push_str(self.label(row));
            name.push_str(self.tail(row));
            (name, self.set(i))
        })
    }

    /// Each name tail (all but the first label, with its leading dot) with
    /// the number of records under names that end with it.
    pub fn records_per_tail(&self) -> impl Iterator<Item = (&str, usize)> {
        let mut counts = vec![0usize; self.tails.len()];
        let mut start = 0;
        for row in &self.names {
            if let Some(c) = counts.get_mut(usize::from(row.tail)) {
                *c += row.data_end as usize - start;
            }
            start = row.data_end as usize;
        }
        self.tails.iter().map(|t| &**t).zip(counts)
    }

    /// Number of names.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// Number of records (not names).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// A hash of the names and data (the same for equal records).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.labels.capacity()
            + self.tails.iter().map(|t| t.len() + 16).sum::<usize>()
            + self.names.capacity() * std::mem::size_of::<NameRow>()
            + self.data.capacity() * std::mem::size_of::<Stored>()
            + self.targets.capacity()
            + self.above.iter().map(|t| t.len() + 16).sum::<usize>()
    }
}

/// `{"name": [record, ...], ...}`, the shape of the map it replaced.
impl Serialize for Records {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.names.len()))?;
        for (name, set) in self.iter() {
            map.serialize_entry(&name, &set)?;
        }
        map.end()
    }
}

/// Collects records in any order, with duplicates; [`RecordsBuilder::build`]
/// sorts and packs them.
#[derive(Debug, Default)]
pub struct RecordsBuilder {
    /// First labels, as added (duplicates included), and SRV targets.
    text: String,
    tails: HashMap<Box<str>, u16>,
    rows: Vec<Row>,
    /// Scratch for a name being written.
    scratch: String,
}

/// A record as added: its name's first label (in the builder's text), the
/// rest of its name, its data.
#[derive(Debug, Clone, Copy)]
struct Row {
    label: Span,
    tail: u16,
    data: Stored,
}

/// More distinct name tails than this (never near: one per framework and
/// zone) and more label bytes than `u16` are dropped, not wrapped.
const MAX_TAILS: usize = u16::MAX as usize;

impl RecordsBuilder {
    /// Adds one record of `name` (fully qualified, any case).
    pub fn add(&mut self, name: &str, data: RData<'_>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.push_str(name);
        self.add_scratch(&mut scratch, data);
        self.scratch = scratch;
    }

    /// Adds one record under a name written by `name` (no allocation for
    /// the name beyond the arena).
    fn add_fmt(&mut self, name: std::fmt::Arguments<'_>, data: RData<'_>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let _ = scratch.write_fmt(name);
        self.add_scratch(&mut scratch, data);
        self.scratch = scratch;
    }

    fn add_scratch(&mut self, name: &mut str, data: RData<'_>) {
        name.make_ascii_lowercase();
        let (label, tail) = split(name);
        if label.len() > usize::from(u16::MAX) {
            return;
        }
        let tail = match self.tails.get(tail) {
            Some(&id) => id,
            None if self.tails.len() < MAX_TAILS => {
                let id = self.tails.len() as u16;
                self.tails.insert(tail.into(), id);
                id
            }
            None => return,
        };
        let label = Span::push(&mut self.text, label);
        let data = match data {
            RData::A { ip } => Stored::A(ip.octets()),
            RData::Aaaa { ip } => Stored::Aaaa(ip.octets()),
            RData::Srv {
                priority,
                weight,
                port,
                target,
            } => Stored::Srv {
                priority,
                weight,
                port,
                target: Span::push(&mut self.text, &target.to_ascii_lowercase()),
            },
        };
        self.rows.push(Row { label, tail, data });
    }

    /// Sorts, removes duplicates and packs. A builder holding past 4 GiB of
    /// text (far beyond any cluster's records) builds an empty set rather
    /// than wrap.
    pub fn build(self) -> Records {
        let RecordsBuilder {
            text,
            tails,
            mut rows,
            scratch: _,
        } = self;
        if u32::try_from(text.len()).is_err() {
            return Records::default();
        }
        // Tails in byte order, and each row's tail renumbered to match.
        let mut sorted: Vec<(Box<str>, u16)> = tails.into_iter().collect();
        sorted.sort_unstable();
        let mut renumber = vec![0u16; sorted.len()];
        for (new, (_, old)) in sorted.iter().enumerate() {
            renumber[usize::from(*old)] = new as u16;
        }
        for row in &mut rows {
            row.tail = renumber[usize::from(row.tail)];
        }
        let tails: Vec<Box<str>> = sorted.into_iter().map(|(t, _)| t).collect();

        let key = |d: &Stored| -> DataKey<'_> {
            match *d {
                Stored::A(ip) => {
                    let mut b = [0; 16];
                    b[..4].copy_from_slice(&ip);
                    (0, b, 0, 0, 0, "")
                }
                Stored::Aaaa(ip) => (1, ip, 0, 0, 0, ""),
                Stored::Srv {
                    priority,
                    weight,
                    port,
                    target,
                } => (2, [0; 16], priority, weight, port, Span::of(&text, target)),
            }
        };
        let order = |a: &Row, b: &Row| {
            a.tail
                .cmp(&b.tail)
                .then_with(|| Span::of(&text, a.label).cmp(Span::of(&text, b.label)))
                .then_with(|| key(&a.data).cmp(&key(&b.data)))
        };
        rows.sort_unstable_by(order);
        rows.dedup_by(|b, a| order(a, b).is_eq());

        let mut out = Records {
            tails,
            data: Vec::with_capacity(rows.len()),
            ..Records::default()
        };
        // Each first label once, however many names start with it.
        let mut labels: HashMap<&str, u32> = HashMap::new();
        for row in &rows {
            let label = Span::of(&text, row.label);
            let same = out
                .names
                .last()
                .is_some_and(|last| last.tail == row.tail && out.label(last) == label);
            if !same {
                let start = *labels
                    .entry(label)
                    .or_insert_with(|| Span::push(&mut out.labels, label).start);
                out.names.push(NameRow {
                    label_start: start,
                    label_len: label.len() as u16,
                    tail: row.tail,
                    data_end: 0,
                });
            }
            let data = match row.data {
                Stored::Srv {
                    priority,
                    weight,
                    port,
                    target,
                } => Stored::Srv {
                    priority,
                    weight,
                    port,
                    target: Span::push(&mut out.targets, Span::of(&text, target)),
                },
                other => other,
            };
            out.data.push(data);
            if let Some(last) = out.names.last_mut() {
                last.data_end = out.data.len() as u32;
            }
        }
        drop(labels);
        // Every proper suffix of a name at a label boundary is a name above
        // it: the tails and their own suffixes (few: one per framework and
        // zone).
        let mut above: Vec<Box<str>> = Vec::new();
        for tail in &out.tails {
            let mut rest: &str = tail;
            while let Some(i) = rest.find('.') {
                rest = &rest[i + 1..];
                if rest.is_empty() {
                    break;
                }
                above.push(rest.into());
            }
        }
        above.sort_unstable();
        above.dedup();
        out.above = above;
        out.labels.shrink_to_fit();
        out.names.shrink_to_fit();
        out.data.shrink_to_fit();
        out.targets.shrink_to_fit();
        out.digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for (name, set) in out.iter() {
                name.hash(&mut h);
                for d in set.iter() {
                    d.hash(&mut h);
                }
            }
            h.finish()
        };
        out
    }
}

/// Sort key of stored data, in the order of [`RData`]'s derived `Ord`:
/// variant, address bytes, then the SRV fields.
type DataKey<'a> = (u8, [u8; 16], u16, u16, u16, &'a str);

/// One DNS label the way Mesos-DNS makes them: lowercase, every character
/// outside `[a-z0-9-]` becomes `-`, no leading or trailing `-`, at most 63
/// characters.
pub fn label(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let cut: String = trimmed.chars().take(63).collect();
    cut.trim_end_matches('-').to_string()
}

/// The name of a Marathon app in DNS: the path segments of its id in
/// reverse order joined by `-` (Marathon's task name for `/group/app` is
/// `app.group`, which Mesos-DNS writes `app-group`).
pub fn app_label(app_id: &str) -> String {
    let reversed: Vec<&str> = app_id.split('/').filter(|s| !s.is_empty()).rev().collect();
    label(&reversed.join("-"))
}

/// A short stable tag of a task id, standing in for Mesos-DNS's random
/// letters in per-task names.
fn task_tag(task_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..5)
        .map(|i| (b'a' + ((h >> (i * 5)) % 26) as u8) as char)
        .collect()
}

/// A named VIP and its settled address, for the l4lb zone.
pub struct VipName<'a> {
    pub name: &'a str,
    pub framework: &'a str,
    pub address: IpAddr,
}

/// Builds every cluster record from the tasks, the nodes (for agent
/// addresses) and the settled named-VIP addresses.
pub fn build<'t>(
    tasks: impl IntoIterator<Item = &'t TaskView>,
    nodes: &[NodeView],
    vips: &[VipName<'_>],
) -> Records {
    let mut r = Records::builder();
    let agent_ip: BTreeMap<&str, IpAddr> = nodes
        .iter()
        .filter_map(|n| n.private_ip.map(|ip| (n.node_id.as_str(), ip)))
        .collect();
    r.add_fmt(
        format_args!("ready.{SPARTAN_ZONE}"),
        RData::A {
            ip: Ipv4Addr::LOCALHOST,
        },
    );
    let mut own = String::new();
    for task in tasks {
        let app = app_label(&task.spec.app);
        let framework = label(&task.spec.framework);
        if app.is_empty() || framework.is_empty() {
            continue;
        }
        let task_ip = RData::address(task.spec.ip);
        let agent = agent_ip.get(task.node_id.as_str()).copied();
        let node = label(&task.node_id);
        own.clear();
        let _ = write!(
            own,
            "{app}-{}-{node}.{framework}.{MESOS_ZONE}",
            task_tag(&task.id)
        );
        r.add_fmt(format_args!("{app}.{framework}.{MESOS_ZONE}"), task_ip);
        r.add(&own, task_ip);
        r.add_fmt(
            format_args!("{app}.{framework}.containerip.dcos.{DCOS_ZONE}"),
            task_ip,
        );
        r.add_fmt(
            format_args!("{app}.{framework}.autoip.dcos.{DCOS_ZONE}"),
            task_ip,
        );
        if let Some(agent) = agent {
            r.add_fmt(
                format_args!("{app}.{framework}.slave.{MESOS_ZONE}"),
                RData::address(agent),
            );
            r.add_fmt(
                format_args!("{app}.{framework}.agentip.dcos.{DCOS_ZONE}"),
                RData::address(agent),
            );
        }
        for port in &task.spec.ports {
            let proto = match port.protocol {
                Protocol::Tcp => "_tcp",
                Protocol::Udp => "_udp",
            };
            r.add_fmt(
                format_args!("_{app}.{proto}.{framework}.{MESOS_ZONE}"),
                RData::Srv {
                    priority: 0,
                    weight: 1,
                    port: port.port,
                    target: &own,
                },
            );
        }
    }
    for vip in vips {
        r.add_fmt(
            format_args!(
                "{}.{}.l4lb.{DCOS_ZONE}",
                label(vip.name),
                label(vip.framework)
            ),
            RData::address(vip.address),
        );
    }
    r.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use skein_state::NodeStatus;

    fn task(id: &str, app: &str, ip: &str, node: &str, ports: &[(u16, &str)]) -> TaskView {
        let ports: Vec<String> = ports
            .iter()
            .map(|(p, proto)| format!(r#"{{"port":{p},"protocol":"{proto}"}}"#))
            .collect();
        let spec = serde_json::from_str(&format!(
            r#"{{"app":"{app}","ip":"{ip}","ports":[{}]}}"#,
            ports.join(",")
        ))
        .expect("spec");
        TaskView {
            id: id.into(),
            node_id: node.into(),
            node_status: NodeStatus::Alive,
            healthy: true,
            spec,
        }
    }

    fn node(id: &str, ip: &str) -> NodeView {
        NodeView {
            node_id: id.into(),
            private_ip: Some(ip.parse().expect("ip")),
            hostname: None,
            status: NodeStatus::Alive,
            updated: 0,
            generation: 1,
            version: 1,
        }
    }

    fn a(ip: &str) -> RData<'static> {
        RData::A {
            ip: ip.parse().expect("ip"),
        }
    }

    #[test]
    fn mesos_dns_names_for_apps() {
        assert_eq!(app_label("/httpi"), "httpi");
        assert_eq!(app_label("/group/app"), "app-group");
        assert_eq!(app_label("/prod/web/frontend"), "frontend-web-prod");
        assert_eq!(app_label("/My_Group/App.V2"), "app-v2-my-group");
        assert_eq!(app_label("//a//b/"), "b-a");
        assert_eq!(app_label("/---/"), "");
        assert_eq!(app_label(&format!("/{}", "x".repeat(100))).len(), 63);
    }

    #[test]
    fn records_for_a_task_on_a_node() {
        let tasks = [
            task(
                "httpi.1",
                "/httpi",
                "10.0.0.2",
                "node2",
                &[(9896, "tcp"), (53, "udp")],
            ),
            task("httpi.2", "/httpi", "10.0.0.3", "node3", &[(9896, "tcp")]),
        ];
        let nodes = [node("node2", "192.168.0.2"), node("node3", "192.168.0.3")];
        let vips = [VipName {
            name: "httpi",
            framework: "marathon",
            address: "11.1.2.3".parse().expect("ip"),
        }];
        let r = build(&tasks, &nodes, &vips);
        let app = r.get("httpi.marathon.mesos.").expect("A");
        assert_eq!(app.to_vec(), vec![a("10.0.0.2"), a("10.0.0.3")]);
        let srv = r.get("_httpi._tcp.marathon.mesos.").expect("SRV");
        assert_eq!(srv.len(), 2);
        for rec in srv {
            let RData::Srv { port, target, .. } = rec else {
                panic!("{rec:?}")
            };
            assert_eq!(port, 9896);
            // The SRV target resolves to that task.
            assert!(
                target.starts_with("httpi-") && target.ends_with(".marathon.mesos."),
                "{target}"
            );
            assert_eq!(r.get(target).map(|s| s.len()), Some(1));
        }
        assert_eq!(
            r.get("_httpi._udp.marathon.mesos.").map(|s| s.len()),
            Some(1)
        );
        assert_eq!(
            r.get("httpi.marathon.l4lb.thisdcos.directory.")
                .map(|s| s.to_vec()),
            Some(vec![a("11.1.2.3")])
        );
        assert_eq!(
            r.get("httpi.marathon.agentip.dcos.thisdcos.directory.")
                .map(|s| s.to_vec()),
            Some(vec![a("192.168.0.2"), a("192.168.0.3")])
        );
        assert_eq!(
            r.get("httpi.marathon.containerip.dcos.thisdcos.directory.")
                .map(|s| s.to_vec()),
            Some(vec![a("10.0.0.2"), a("10.0.0.3")])
        );
        assert_eq!(
            r.get("httpi.marathon.slave.mesos.").map(|s| s.len()),
            Some(2)
        );
        assert_eq!(
            r.get("READY.spartan.").map(|s| s.to_vec()),
            Some(vec![a("127.0.0.1")])
        );
        assert!(r.get("nothing.marathon.mesos.").is_none());
        assert!(r.has_names_below("marathon.mesos."));
        assert!(r.has_names_below("mesos."));
        assert!(!r.has_names_below("httpi.marathon.mesos."));
    }

    /// Names and data drawn from small sets so that duplicates and shared
    /// names are common.
    fn entry() -> impl Strategy<Value = (String, u8, u8, u16, u8)> {
        (
            prop::sample::select(vec![
                "a.mesos.",
                "B.mesos.",
                "x.a.mesos.",
                "_s._tcp.a.mesos.",
                "z.",
            ]),
            0u8..3,
            0u8..4,
            0u16..3,
            0u8..3,
        )
            .prop_map(|(n, kind, ip, port, t)| (n.to_string(), kind, ip, port, t))
    }

    const TARGETS: [&str; 3] = ["a.mesos.", "elsewhere.", "x.a.mesos."];

    fn data(kind: u8, ip: u8, port: u16, t: u8) -> RData<'static> {
        match kind {
            0 => RData::A {
                ip: Ipv4Addr::new(10, 0, 0, ip),
            },
            1 => RData::Aaaa {
                ip: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(ip)),
            },
            _ => RData::Srv {
                priority: 0,
                weight: 1,
                port,
                target: TARGETS[usize::from(t)],
            },
        }
    }

    proptest! {
        /// The packed records answer exactly what a map of sorted, unique
        /// lists would, whatever the order and duplication of the adds.
        #[test]
        fn packed_records_equal_a_map(entries in prop::collection::vec(entry(), 0..40)) {
            let mut reference: BTreeMap<String, std::collections::BTreeSet<RData<'static>>> = BTreeMap::new();
            let mut b = Records::builder();
            for (name, kind, ip, port, t) in &entries {
                let d = data(*kind, *ip, *port, *t);
                reference.entry(name.to_ascii_lowercase()).or_default().insert(d);
                b.add(name, d);
            }
            let r = b.build();
            let mut got: Vec<(String, Vec<RData<'_>>)> =
                r.iter().map(|(n, s)| (n, s.to_vec())).collect();
            got.sort();
            let want: Vec<(String, Vec<RData<'_>>)> = reference
                .iter()
                .map(|(n, s)| (n.clone(), s.iter().copied().collect()))
                .collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(r.len(), reference.values().map(|s| s.len()).sum::<usize>());
            for (tail, n) in r.records_per_tail() {
                let want: usize = reference
                    .iter()
                    .filter(|(name, _)| split(name).1 == tail)
                    .map(|(_, s)| s.len())
                    .sum();
                prop_assert_eq!(n, want, "records under {}", tail);
            }
            for (name, set) in &reference {
                let upper = name.to_ascii_uppercase();
                prop_assert_eq!(r.get(&upper).map(|s| s.len()), Some(set.len()));
                for (i, _) in name.match_indices('.') {
                    let above = &name[i + 1..];
                    if !above.is_empty() {
                        prop_assert!(r.has_names_below(above), "{} above {}", above, name);
                    }
                }
            }
            prop_assert!(!r.has_names_below("nothing."));
            prop_assert!(r.get("nothing.").is_none());
        }
    }

    proptest! {
        /// Whatever the app id, a generated name is a valid DNS label.
        #[test]
        fn labels_are_valid(raw in ".{0,200}") {
            let l = app_label(&raw);
            prop_assert!(l.len() <= 63);
            prop_assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!l.starts_with('-') && !l.ends_with('-'));
        }
    }
}
