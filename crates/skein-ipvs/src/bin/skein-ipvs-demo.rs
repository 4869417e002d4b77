//! Programs one IPVS virtual service with its backends over generic netlink,
//! then lists the kernel's table back. Used by `scripts/ipvs-qemu-test`
//! inside a VM whose kernel has IPVS.
//!
//!   skein-ipvs-demo [--udp] [--weight N] [--exercise] VIP:PORT BACKEND:PORT...
//!
//! The whole IPVS table is reconciled to exactly this one service (other
//! services are deleted), a second reconcile must find nothing to do, and
//! the table is printed like `ipvsadm -Ln`. With `--exercise`, it first
//! flushes the table and walks through every kind of change (scheduler and
//! weight updates, destination and service deletion) checking each against
//! the table read back; the `rr` scheduler module must be loaded for that.

use std::net::SocketAddr;
use std::process::ExitCode;

use skein_ipvs::{Destination, Ipvs, Op, Protocol, Service, Table};

const USAGE: &str =
    "usage: skein-ipvs-demo [--udp] [--weight N] [--exercise] VIP:PORT BACKEND:PORT...";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skein-ipvs-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut protocol = Protocol::Tcp;
    let mut weight = 1u32;
    let mut exercise = false;
    let mut addrs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--udp" => protocol = Protocol::Udp,
            "--exercise" => exercise = true,
            "--weight" => {
                let w = args.next().ok_or(USAGE)?;
                weight = w.parse().map_err(|e| format!("--weight {w}: {e}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            a => addrs.push(
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("{a}: {e}\n{USAGE}"))?,
            ),
        }
    }
    let (vip, backends) = addrs.split_first().ok_or(USAGE)?;
    if backends.is_empty() {
        return Err(USAGE.into());
    }
    let service = Service::new(vip.ip(), vip.port(), protocol);
    let dests: Vec<Destination> = backends
        .iter()
        .map(|b| Destination {
            addr: b.ip(),
            port: b.port(),
            weight,
        })
        .collect();

    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    println!("IPVS generic-netlink family id {}", ipvs.family_id());

    let desired = vec![(service, dests)];
    if exercise {
        exercise_changes(&mut ipvs, &desired)?;
    }
    let ops = ipvs.reconcile(&desired).map_err(|e| e.to_string())?;
    println!("reconcile: {} operation(s)", ops.len());
    for op in &ops {
        println!("  {op:?}");
    }
    let again = ipvs.reconcile(&desired).map_err(|e| e.to_string())?;
    if !again.is_empty() {
        return Err(format!(
            "second reconcile wanted {} more operation(s): {again:?}",
            again.len()
        ));
    }
    println!("second reconcile: no changes (listing matches the desired table)");

    println!("IPVS table read back over netlink:");
    for svc in ipvs.services().map_err(|e| e.to_string())? {
        println!("  service {svc}");
        for d in ipvs.destinations(&svc).map_err(|e| e.to_string())? {
            println!("    -> {d} masq");
        }
    }
    Ok(())
}

/// Reconciles to `table`, checks the operations and the table read back.
fn step(ipvs: &mut Ipvs, what: &str, table: &Table, want_ops: usize) -> Result<(), String> {
    let ops = ipvs.reconcile(table).map_err(|e| format!("{what}: {e}"))?;
    let mut back = ipvs.table().map_err(|e| format!("{what}: {e}"))?;
    let mut want = table.clone();
    for t in [&mut back, &mut want] {
        t.sort_by_key(|(s, _)| s.key());
        for (_, d) in t.iter_mut() {
            d.sort_by_key(|d| (d.addr, d.port));
        }
    }
    let kinds: Vec<&str> = ops
        .iter()
        .map(|op| match op {
            Op::DelService(_) => "del-service",
            Op::AddService(_) => "add-service",
            Op::UpdateService(_) => "set-service",
            Op::DelDestination(..) => "del-dest",
            Op::AddDestination(..) => "add-dest",
            Op::UpdateDestination(..) => "set-dest",
        })
        .collect();
    println!("exercise: {what}: {}", kinds.join(" "));
    if ops.len() != want_ops {
        return Err(format!(
            "{what}: {} operation(s), expected {want_ops}: {ops:?}",
            ops.len()
        ));
    }
    if back != want {
        return Err(format!(
            "{what}: table read back {back:?}, expected {want:?}"
        ));
    }
    Ok(())
}

fn exercise_changes(ipvs: &mut Ipvs, desired: &Table) -> Result<(), String> {
    ipvs.flush().map_err(|e| format!("flush: {e}"))?;
    let empty = ipvs.table().map_err(|e| e.to_string())?;
    if !empty.is_empty() {
        return Err(format!("table not empty after flush: {empty:?}"));
    }
    println!("exercise: flush: table empty");
    let n: usize = desired.iter().map(|(_, d)| 1 + d.len()).sum();
    step(ipvs, "add all", desired, n)?;

    // Scheduler and weight changes: one set-service, one set-dest.
    let mut changed = desired.clone();
    changed[0].0.scheduler = "rr".into();
    changed[0].1[0].weight = 0;
    step(ipvs, "rr + drain first backend", &changed, 2)?;

    // Drop the first backend; add a UDP service on the same VIP and port.
    let first = changed[0].1.remove(0);
    let mut udp = changed[0].0.clone();
    udp.protocol = match udp.protocol {
        Protocol::Tcp => Protocol::Udp,
        Protocol::Udp => Protocol::Tcp,
    };
    changed.push((udp, vec![first]));
    step(ipvs, "remove a backend, add a service", &changed, 3)?;

    // Adding an existing service is refused by the kernel (EEXIST).
    match ipvs.add_service(&changed[0].0) {
        Err(e) if e.errno() == Some(17) => println!("exercise: duplicate add refused: {e}"),
        other => return Err(format!("duplicate add_service: {other:?}")),
    }

    // Back to the desired table: del-service, set-service, add-dest.
    step(ipvs, "back to desired", desired, 3)
}
