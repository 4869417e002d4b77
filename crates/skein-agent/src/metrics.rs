//! Prometheus text exposition of the agent's state. Written by hand: a
//! handful of gauges and counters do not need a metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use skein_state::NodeStatus;

use crate::Agent;

struct Out(String);

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {value}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }
}

pub fn render(agent: &Agent) -> String {
    let snap = agent.view();
    let mut out = Out(String::new());
    let count = |s: NodeStatus| snap.liveness.values().filter(|l| l.status == s).count() as u64;
    out.metric(
        "skein_members",
        "gauge",
        "Nodes in the replica by status as this node sees them.",
        &[
            ("status=\"alive\"", count(NodeStatus::Alive)),
            ("status=\"suspect\"", count(NodeStatus::Suspect)),
            ("status=\"down\"", count(NodeStatus::Down)),
        ],
    );
    let g = agent.gossip_stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    crate::tls::render(&mut out.0, &agent.tls_stats());
    out.metric(
        "skein_gossip_bytes_total",
        "counter",
        "Gossip payload bytes.",
        &[
            ("direction=\"in\"", load(&g.bytes_in)),
            ("direction=\"out\"", load(&g.bytes_out)),
        ],
    );
    out.metric(
        "skein_gossip_messages_total",
        "counter",
        "Gossip messages.",
        &[
            ("direction=\"in\"", load(&g.messages_in)),
            ("direction=\"out\"", load(&g.messages_out)),
        ],
    );
    out.metric(
        "skein_gossip_send_dropped_total",
        "counter",
        "Gossip messages dropped because a peer's send queue was full.",
        &[("", load(&g.send_dropped))],
    );
    out.metric(
        "skein_gossip_decode_errors_total",
        "counter",
        "Gossip streams that did not decode.",
        &[("", load(&g.decode_errors))],
    );
    out.metric(
        "skein_gossip_rejected_peers_total",
        "counter",
        "Connections refused during the TLS handshake (foreign CA, no certificate).",
        &[("", load(&g.rejected_peers))],
    );
    out.metric(
        "skein_gossip_refused_connections_total",
        "counter",
        "Incoming gossip connections refused at the connection cap.",
        &[("", load(&g.refused_connections))],
    );
    out.metric(
        "skein_gossip_stalled_streams_total",
        "counter",
        "Gossip streams a peer opened and did not finish in time (discarded).",
        &[("", load(&g.stalled_streams))],
    );
    out.metric(
        "skein_gossip_refused_messages_total",
        "counter",
        "Gossip messages refused whole: another wire version, or another cluster.",
        &[
            ("reason=\"version\"", load(&g.version_mismatch)),
            ("reason=\"cluster\"", load(&g.wrong_cluster)),
        ],
    );
    out.metric(
        "skein_gossip_refused_facts_total",
        "counter",
        "Relayed facts (entries, announcements, suspicions) the protocol refused.",
        &[
            ("reason=\"bad_signature\"", load(&g.bad_signature)),
            ("reason=\"bad_identity\"", load(&g.bad_identity)),
            ("reason=\"unknown_origin\"", load(&g.unknown_origin)),
            ("reason=\"not_sender\"", load(&g.not_sender)),
            ("reason=\"over_cap\"", load(&g.over_cap)),
        ],
    );
    out.metric(
        "skein_state_nodes",
        "gauge",
        "Node keyspaces in the replica.",
        &[("", snap.replica.nodes().len() as u64)],
    );
    out.metric(
        "skein_state_entries",
        "gauge",
        "Entries (values and tombstones) in the replica.",
        &[("", snap.replica.entry_count() as u64)],
    );
    out.metric(
        "skein_state_tasks",
        "gauge",
        "Tasks in the cluster.",
        &[("", snap.tasks.len() as u64)],
    );
    out.metric(
        "skein_state_invalid_entries",
        "gauge",
        "Published values that did not decode.",
        &[("", snap.invalid.len() as u64)],
    );
    let c = &agent.counters;
    out.metric(
        "skein_task_writes_total",
        "counter",
        "Task registrations accepted on this node.",
        &[("", load(&c.task_writes))],
    );
    out.metric(
        "skein_task_deletes_total",
        "counter",
        "Task removals on this node.",
        &[("", load(&c.task_deletes))],
    );
    out.metric(
        "skein_task_rejected_total",
        "counter",
        "Task writes rejected as invalid.",
        &[("", load(&c.rejected_writes))],
    );
    out.metric(
        "skein_membership_changes_total",
        "counter",
        "Node status changes observed.",
        &[("", load(&c.status_changes))],
    );
    out.metric(
        "skein_health_changes_total",
        "counter",
        "Health verdict changes of this node's tasks.",
        &[("", load(&c.health_changes))],
    );
    out.metric(
        "skein_persist_errors_total",
        "counter",
        "Failures to persist the replica.",
        &[("", load(&c.persist_errors))],
    );
    let l = &agent.l4lb_realizer;
    let programmed =
        agent.config().l4lb_dataplane != crate::l4lb::Dataplane::None && load(&l.ready) == 1;
    let (services, backends) = if programmed {
        let vips = snap.vips.iter().filter(|v| v.address.is_some());
        let mut services = 0;
        let mut backends = 0;
        for v in vips {
            let used = v.backend.iter().filter(|b| b.in_use).count() as u64;
            if used > 0 {
                services += 1;
                backends += used;
            }
        }
        (services, backends)
    } else {
        (0, 0)
    };
    out.metric(
        "skein_l4lb_services",
        "gauge",
        "VIP services (address, protocol, port) with backends, as programmed in the kernel.",
        &[("", services)],
    );
    out.metric(
        "skein_l4lb_backends",
        "gauge",
        "Backends in use across all VIP services.",
        &[("", backends)],
    );
    out.metric(
        "skein_l4lb_rule_applies_total",
        "counter",
        "Changes of the kernel's VIP rules applied (whole tables, transactions, batches).",
        &[("", load(&l.applies))],
    );
    out.metric(
        "skein_l4lb_apply_errors_total",
        "counter",
        "Failed attempts to read or program the kernel's VIP rules.",
        &[("", load(&l.errors))],
    );
    out.metric(
        "skein_l4lb_drift_repaired_total",
        "counter",
        "Times the kernel's VIP rules were found changed behind our back and repaired.",
        &[("", load(&l.drift_repaired))],
    );
    out.metric(
        "skein_l4lb_reconcile_microseconds",
        "gauge",
        "Duration of the last reconcile that changed the kernel.",
        &[("", load(&l.last_apply_us))],
    );
    let mut realizers: Vec<(&str, &crate::realize::RealizerCounters)> =
        match agent.config().l4lb_dataplane {
            crate::l4lb::Dataplane::Nftables => vec![("nftables", &**l)],
            crate::l4lb::Dataplane::Ipvs => vec![("ipvs", &**l)],
            crate::l4lb::Dataplane::None => vec![],
        };
    let o = &agent.overlay_counters;
    if agent.config().overlay_dataplane == crate::vxlan::OverlayDataplane::Vxlan {
        realizers.push(("vxlan", &o.realizer));
    }
    type Field = fn(&crate::realize::RealizerCounters) -> &AtomicU64;
    let fields: [(&str, &str, &str, Field); 6] = [
        (
            "skein_realizer_applies_total",
            "counter",
            "Plans applied to the kernel, by realizer.",
            |c| &c.applies,
        ),
        (
            "skein_realizer_errors_total",
            "counter",
            "Failed kernel reads or applies, by realizer (each retried).",
            |c| &c.errors,
        ),
        (
            "skein_realizer_changes_total",
            "counter",
            "Kernel objects changed (elements, rules, services, addresses), by realizer.",
            |c| &c.changes,
        ),
        (
            "skein_realizer_drift_repaired_total",
            "counter",
            "Times the kernel differed from what was programmed and was repaired, by realizer.",
            |c| &c.drift_repaired,
        ),
        (
            "skein_realizer_observes_total",
            "counter",
            "Kernel read-backs (start, resync, after a failure), by realizer.",
            |c| &c.observes,
        ),
        (
            "skein_realizer_last_apply_microseconds",
            "gauge",
            "Duration of the last apply, planning included, by realizer.",
            |c| &c.last_apply_us,
        ),
    ];
    for (name, kind, help, field) in fields {
        let labels: Vec<(String, u64)> = realizers
            .iter()
            .map(|(r, c)| (format!("realizer=\"{r}\""), load(field(c))))
            .collect();
        let labels: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        out.metric(name, kind, help, &labels);
    }
    let leases = crate::overlay::node_leases(&agent.overlay, &snap.replica)
        .map(|l| l.len() as u64)
        .unwrap_or(0);
    out.metric(
        "skein_overlay_leases",
        "gauge",
        "Agents holding a VTEP lease (and their agent subnets) in this node's view.",
        &[("", leases)],
    );
    out.metric(
        "skein_overlay_peers_programmed",
        "gauge",
        "Remote agents whose neighbour, FDB and route entries are in the kernel.",
        &[("", load(&o.peers_programmed))],
    );
    out.metric(
        "skein_overlay_entries_programmed",
        "gauge",
        "Neighbour + FDB + route entries of ours on vtep1024.",
        &[("", load(&o.entries_programmed))],
    );
    out.metric(
        "skein_overlay_netlink_errors_total",
        "counter",
        "Failed kernel reads or changes while realizing the overlay (each retried).",
        &[("", load(&o.realizer.errors))],
    );
    out.metric(
        "skein_overlay_drift_repaired_total",
        "counter",
        "Times the overlay in the kernel was found changed behind our back and repaired.",
        &[("", load(&o.realizer.drift_repaired))],
    );
    out.metric(
        "skein_overlay_reconciles_total",
        "counter",
        "Overlay changes applied to the kernel.",
        &[("", load(&o.realizer.applies))],
    );
    out.metric(
        "skein_overlay_reconcile_microseconds",
        "gauge",
        "Duration of the last overlay change, planning included.",
        &[("", load(&o.realizer.last_apply_us))],
    );
    let (vips, problems) = (&snap.vips, &snap.vip_problems);
    let unreachable = vips
        .iter()
        .flat_map(|v| v.backend.iter())
        .filter(|b| !b.in_use)
        .count() as u64;
    out.metric(
        "skein_vips",
        "gauge",
        "VIPs declared by the cluster's tasks.",
        &[("", vips.len() as u64)],
    );
    out.metric(
        "skein_vip_backends_unreachable",
        "gauge",
        "VIP backends not used because their node is down.",
        &[("", unreachable)],
    );
    out.metric(
        "skein_vip_problems",
        "gauge",
        "VIP labels that could not be used.",
        &[("", problems.len() as u64)],
    );
    if let Some(dns) = &agent.dns {
        let d = &dns.stats;
        out.metric(
            "skein_dns_queries_total",
            "counter",
            "DNS queries by outcome.",
            &[
                ("result=\"local\"", load(&d.local_answers)),
                ("result=\"nxdomain\"", load(&d.nxdomain)),
                ("result=\"forwarded\"", load(&d.forwarded)),
                ("result=\"servfail\"", load(&d.servfail)),
                ("result=\"dropped\"", load(&d.dropped)),
            ],
        );
        out.metric(
            "skein_dns_cache_total",
            "counter",
            "Forwarded-name lookups answered from the cache (hit) or not (miss).",
            &[
                ("result=\"hit\"", load(&d.cache_hits)),
                ("result=\"miss\"", load(&d.cache_misses)),
            ],
        );
        out.metric(
            "skein_dns_upstream_failures_total",
            "counter",
            "Forwarded queries an upstream failed to answer.",
            &[("", load(&d.upstream_failures))],
        );
        out.metric(
            "skein_dns_forward_saturated_total",
            "counter",
            "Forwarded queries answered SERVFAIL at once: the in-flight forward cap was reached.",
            &[("", load(&d.forward_saturated))],
        );
        out.metric(
            "skein_dns_upstream_rejected_replies_total",
            "counter",
            "Upstream replies dropped: id not in flight (forged or late) or not the question sent.",
            &[("", load(&d.rejected_replies))],
        );
        out.metric(
            "skein_dns_tcp_refused_total",
            "counter",
            "DNS-over-TCP connections closed at once: the connection cap was reached.",
            &[("", load(&d.tcp_refused))],
        );
        out.metric(
            "skein_dns_tcp_accept_errors_total",
            "counter",
            "Failed DNS-over-TCP accepts (e.g. out of file descriptors), retried after a backoff.",
            &[("", load(&d.accept_errors))],
        );
        let labels: Vec<String> = dns
            .forwarders
            .all()
            .map(|u| format!("upstream=\"{}\"", u.addr))
            .collect();
        let per = |f: &dyn Fn(&skein_dns::server::Upstream) -> u64| -> Vec<(&str, u64)> {
            dns.forwarders
                .all()
                .zip(&labels)
                .map(|(u, l)| (l.as_str(), f(u)))
                .collect()
        };
        out.metric(
            "skein_dns_upstream_answers_total",
            "counter",
            "Answers per upstream (the race's winner).",
            &per(&|u| load(&u.answers)),
        );
        out.metric(
            "skein_dns_upstream_errors_total",
            "counter",
            "Failures or silences past the deadline per upstream.",
            &per(&|u| load(&u.failures)),
        );
        out.metric(
            "skein_dns_upstream_latency_microseconds_total",
            "counter",
            "Sum of winning answers' latency per upstream (divide by answers for the mean).",
            &per(&|u| load(&u.latency_us)),
        );
        {
            let records = agent.records();
            let mut zones: std::collections::BTreeMap<&str, u64> = Default::default();
            for (tail, n) in records.records_per_tail() {
                let zone = skein_dns::answer::zone_of(tail).unwrap_or("other");
                *zones.entry(zone).or_default() += n as u64;
            }
            let rows: Vec<String> = zones.keys().map(|z| format!("zone=\"{z}\"")).collect();
            let samples: Vec<(&str, u64)> = rows
                .iter()
                .map(String::as_str)
                .zip(zones.values().copied())
                .collect();
            out.metric(
                "skein_dns_zone_records",
                "gauge",
                "Cluster DNS records per zone.",
                &samples,
            );
        }
    }
    out.metric(
        "skein_dns_records",
        "gauge",
        "Cluster DNS records this node serves.",
        &[("", agent.records().len() as u64)],
    );
    out.metric(
        "skein_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        &[("", agent.uptime().as_secs())],
    );
    let d = &agent.docker;
    if load(&d.running) == 1 {
        out.metric(
            "skein_docker_up",
            "gauge",
            "1 while the Docker provider follows Docker's events and resyncs.",
            &[("", load(&d.up))],
        );
        out.metric(
            "skein_docker_events_total",
            "counter",
            "Docker container events handled.",
            &[("", load(&d.events))],
        );
        out.metric(
            "skein_docker_resyncs_total",
            "counter",
            "Full resyncs with Docker's running containers.",
            &[("", load(&d.resyncs))],
        );
        out.metric(
            "skein_docker_failures_total",
            "counter",
            "Times the Docker provider lost Docker (each retried; tasks kept).",
            &[("", load(&d.failures))],
        );
    }
    if let Some(vips) = agent.vip_stats() {
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        let mut rows = Vec::new();
        for v in &vips {
            for b in &v.backends {
                let base = format!("vip=\"{}\",backend=\"{}\"", esc(&v.vip), esc(&b.backend));
                rows.push((format!("{base},outcome=\"success\""), b.total.successes));
                rows.push((format!("{base},outcome=\"failure\""), b.total.failures));
            }
        }
        let samples: Vec<(&str, u64)> = rows.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        out.metric(
            "skein_vip_connections_total",
            "counter",
            "TCP connections through a VIP to a backend, from conntrack: success once assured, failure when gone without.",
            &samples,
        );
        let s = &agent.vip_stats;
        if let Ok(counts) = s.counts.lock() {
            let name = "skein_vip_connect_seconds";
            let _ = writeln!(out.0, "# HELP {name} TCP connect time through a VIP to a backend (New to assured in conntrack, as the agent reads the events).");
            let _ = writeln!(out.0, "# TYPE {name} histogram");
            for ((vip, backend), t) in counts.connect_totals() {
                let base = format!("vip=\"{}\",backend=\"{}\"", esc(vip), backend);
                let mut cumulative = 0;
                for (le, n) in crate::vip_stats::CONNECT_LE.iter().zip(t.below) {
                    cumulative += n;
                    let _ = writeln!(out.0, "{name}_bucket{{{base},le=\"{le}\"}} {cumulative}");
                }
                let _ = writeln!(out.0, "{name}_bucket{{{base},le=\"+Inf\"}} {}", t.count);
                let _ = writeln!(out.0, "{name}_sum{{{base}}} {}", t.sum_us as f64 / 1e6);
                let _ = writeln!(out.0, "{name}_count{{{base}}} {}", t.count);
            }
        }
        out.metric(
            "skein_vip_conntrack_events_total",
            "counter",
            "Conntrack events read to count VIP connections.",
            &[("", load(&s.events))],
        );
        let lost = s.counts.lock().map(|c| c.lost).unwrap_or(0);
        out.metric(
            "skein_vip_conntrack_lost_total",
            "counter",
            "Times conntrack events were lost (socket buffer full) or open connections forgotten.",
            &[("", lost)],
        );
    }
    out.0
}
