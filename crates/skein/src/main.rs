//! `skein`: the agent (`skein agent`) and the CLI over its local API.

mod client;
mod config;
mod edge;
mod httpi;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::client::{ApiArgs, Client, TaskAddArgs};
use crate::config::AgentArgs;

/// jemalloc rather than glibc's malloc: the agent's views and the edge's
/// requests allocate and free many small objects, where glibc spent up to
/// a third of the time (docs/BENCHMARKS.md, edge routes).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at its start: two arenas (one per core
/// here). Its default of four per core held a third more memory.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 = &JEMALLOC_CONF[0];
const JEMALLOC_CONF: &[u8] = b"narenas:2\0";

/// For an agent, freed pages go back to the kernel at once (jemalloc keeps
/// them ten seconds by default): an agent frees a whole view, megabytes,
/// per change, and replica-mem-bench held 120 MB with the default where it
/// holds 37 MB with this. Not for `skein edge`: there the same setting
/// gave pages back and faulted them in again on every few requests
/// (HTTP keep-alive through it fell from 1.0 to 0.7 of HAProxy's rate).
fn return_freed_pages_at_once() {
    fn set(name: &str, value: isize) {
        let Ok(name) = std::ffi::CString::new(name) else {
            return;
        };
        let mut value = value;
        // SAFETY: a documented jemalloc control, written with a value of
        // its type (ssize_t); nothing is read back.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&mut value as *mut isize).cast(),
                std::mem::size_of::<isize>(),
            )
        };
        if rc != 0 {
            tracing::debug!(control = ?name, rc, "jemalloc setting refused");
        }
    }
    let mut narenas: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: `arenas.narenas` is an unsigned int, read into one.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arenas.narenas".as_ptr(),
            (&mut narenas as *mut u32).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        narenas = 0;
    }
    for kind in ["dirty", "muzzy"] {
        set(&format!("arenas.{kind}_decay_ms"), 0);
        for i in 0..narenas {
            set(&format!("arena.{i}.{kind}_decay_ms"), 0);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "skein",
    version,
    about = "Decentralised service-networking mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// Cluster CA and node certificates for mutually authenticated gossip.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Members of the cluster and their status.
    Nodes(ApiArgs),
    /// Every task in the cluster and the node it runs on.
    Tasks(ApiArgs),
    /// Register or remove a task on this node.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The local replica: every node's published keys and versions.
    State(ApiArgs),
    /// VIPs and their backends, like `ipvsadm -Ln`.
    Vips(ApiArgs),
    /// Overlay leases and status of every agent (`/overlay-master/state`).
    Overlay(ApiArgs),
    /// Version of this binary and of the agent it talks to.
    Version(ApiArgs),
    /// The edge load balancer (Marathon-LB's labels, ports and endpoints)
    /// serving the agent's edge routes; `skein edge status` shows a running
    /// one.
    Edge(Box<edge::EdgeArgs>),
    /// The seed article's demo app: an HTTP server answering pi to ten
    /// decimals (with the instance's name in `X-Instance`).
    Httpi {
        /// Address to listen on, e.g. 0.0.0.0:9896.
        #[arg(long, default_value = "0.0.0.0:9896")]
        listen: std::net::SocketAddr,
        /// Name reported in the `X-Instance` header.
        #[arg(long, default_value = "httpi")]
        name: String,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a cluster CA in DIR (ca.pem, ca-key.pem).
    Init {
        dir: PathBuf,
        #[arg(long, default_value = "skein")]
        cluster_id: String,
    },
    /// Issue a node certificate signed by the CA in CA_DIR into OUT_DIR
    /// (with the CA dir's CRL, if any). The certificate names the cluster
    /// (URI SAN skein://<cluster-id>/<node-id>); peers of other clusters
    /// refuse it. A copy is kept in CA_DIR/issued/ for `cert revoke`.
    Issue {
        ca_dir: PathBuf,
        node_id: String,
        out_dir: PathBuf,
        /// Lifetime in days (capped at the CA's expiry).
        #[arg(long, default_value_t = skein_tls::DEFAULT_NODE_DAYS)]
        days: u32,
        /// The cluster the certificate is for; default: the CA's (the one
        /// given to `cert init`). Only for one CA serving several clusters.
        #[arg(long)]
        cluster_id: Option<String>,
    },
    /// Revoke a node's certificates (or one by serial): rewrites
    /// CA_DIR/ca.crl.pem. Copy that file to every node's TLS dir, next to
    /// node.pem, as ca.crl.pem; agents pick it up within seconds (or on
    /// SIGHUP) and close open connections of revoked peers.
    Revoke {
        /// The CA dir (ca.pem, ca-key.pem, issued/).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Revoke every certificate issued for this node id.
        #[arg(required_unless_present = "serial", conflicts_with = "serial")]
        node_id: Option<String>,
        /// Revoke one certificate by serial number (hex, colons allowed, as
        /// `openssl x509 -noout -serial` prints it).
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Register (or replace) a task running on this node.
    Add(TaskAddArgs),
    /// Remove a task of this node.
    Rm { id: String },
}

fn main() -> ExitCode {
    // One static binary in the image: installed (or linked) as `skein-cni`
    // it is the CNI plugin, called by container runtimes.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if invoked_as.as_deref() == Some("skein-cni") {
        return skein_cni::cli::cli_main();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => run_agent(*args),
        Command::Cert(CertCommand::Init { dir, cluster_id }) => {
            skein_tls::init_ca(&dir, &cluster_id)?;
            println!("cluster CA for {cluster_id:?} written to {}", dir.display());
            println!(
                "keep {} secret; issue node certificates with `skein cert issue`",
                dir.join("ca-key.pem").display()
            );
            Ok(())
        }
        Command::Cert(CertCommand::Issue {
            ca_dir,
            node_id,
            out_dir,
            days,
            cluster_id,
        }) => {
            let options = skein_tls::IssueOptions { days, cluster_id };
            let issued = skein_tls::issue_node_with(&ca_dir, &node_id, &out_dir, &options)?;
            let days_left = issued
                .not_after
                .duration_since(std::time::SystemTime::now())
                .map_or(0, |d| d.as_secs() / 86_400);
            println!(
                "certificate for node {node_id:?} of cluster {:?} written to {} \
                 (serial {}, valid {days_left} days)",
                issued.cluster_id,
                out_dir.display(),
                issued.serial
            );
            Ok(())
        }
        Command::Cert(CertCommand::Revoke {
            ca_dir,
            node_id,
            serial,
        }) => {
            let target = match (&node_id, &serial) {
                (_, Some(serial)) => skein_tls::RevokeTarget::Serial(serial),
                (Some(node_id), None) => skein_tls::RevokeTarget::Node(node_id),
                (None, None) => anyhow::bail!("name a node id or pass --serial"),
            };
            let revoked = skein_tls::revoke(&ca_dir, target)?;
            if revoked.added.is_empty() {
                println!("already revoked; nothing added");
            }
            for serial in &revoked.added {
                println!("revoked serial {serial}");
            }
            println!(
                "{} (CRL number {}, {} revoked in all): copy it to every node's TLS dir as {}",
                revoked.crl_path.display(),
                revoked.crl_number,
                revoked.total,
                skein_tls::CRL_FILE
            );
            Ok(())
        }
        Command::Nodes(api) => Client::new(&api)?.show("/v1/nodes", client::print_nodes),
        Command::Tasks(api) => Client::new(&api)?.show("/v1/tasks", client::print_tasks),
        Command::Vips(api) => Client::new(&api)?.show_vips(),
        Command::Httpi { listen, name } => httpi::serve(listen, &name),
        Command::Edge(args) => edge::run(*args),
        Command::Overlay(api) => {
            Client::new(&api)?.show("/overlay-master/state", client::print_overlay)
        }
        Command::State(api) => Client::new(&api)?.show("/v1/state", client::print_state),
        Command::Version(api) => Client::new(&api)?.show_version(),
        Command::Task { command, api } => {
            let c = Client::new(&api)?;
            match command {
                TaskCommand::Add(args) => c.add_task(&args),
                TaskCommand::Rm { id } => c.remove_task(&id),
            }
        }
    }
}

fn init_logs() {
    use std::io::IsTerminal;
    // Logs go to stderr, coloured only for a terminal (not for
    // `docker logs` or a journal).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,quinn=warn,chitchat=warn")
            }),
        )
        .init();
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    init_logs();
    let check_only = args.check_config;
    let mut resolved = args.resolve()?;
    if let Some(name) = resolved.docker.as_ref().and_then(|d| d.network.as_ref()) {
        if !skein_docker::network::valid_name(name) {
            anyhow::bail!(
                "--docker-network {name:?}: a Docker network name is letters, digits, '_', '.' and '-', \
                 starting with a letter or digit (or empty: none)"
            );
        }
    }
    if check_only {
        return check_config(&resolved);
    }
    // Every write needs a credential, on every listener: without a token
    // file, the agent's own token in its data dir (mode 0600), which the
    // local CLI reads, so a local process that cannot read the data dir
    // cannot register tasks, take a share of a VIP or delete agents.
    if resolved.api_token.is_none() {
        resolved.api_token = Some(config::local_token(&resolved.agent.data_dir)?);
    }
    skein_agent::tune_allocator();
    return_freed_pages_at_once();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let agent = skein_agent::Agent::start(resolved.agent).await?;
        match resolved.docker.clone() {
            Some(docker) => {
                tokio::spawn(skein_docker::run(std::sync::Arc::downgrade(&agent), docker));
            }
            // The provider was turned off: the containers' tasks it left
            // are no longer followed by anyone, so they go.
            None => {
                for (id, _) in agent.own_tasks_snapshot().await {
                    if id.starts_with(skein_docker::TASK_PREFIX) {
                        match agent.delete_task(&id).await {
                            Ok(()) => tracing::info!(task = %id, "container task removed: no --docker-socket"),
                            Err(e) => tracing::warn!(task = %id, error = %e, "container task not removed"),
                        }
                    }
                }
            }
        }
        let listener = tokio::net::TcpListener::bind(resolved.api_listen)
            .await
            .with_context(|| format!("cannot listen on {} for the API", resolved.api_listen))?;
        tracing::info!(
            api = %resolved.api_listen,
            "API listening"
        );
        if let Some(entry) = resolved.entry_listen {
            let listener = tokio::net::TcpListener::bind(entry)
                .await
                .with_context(|| format!("cannot listen on {entry} for the entry point"))?;
            tracing::info!(entry = %entry, tls = resolved.entry_tls.is_some(), "entry point listening");
            let api = skein_api::router(
                agent.clone(),
                skein_api::ApiAuth {
                    token: resolved.api_token.clone(),
                },
            );
            // The agent's own token when no token file was given.
            let token = resolved.api_token.clone().unwrap_or_default();
            let tls = match &resolved.entry_tls {
                Some((cert, key)) => Some(
                    skein_entry::tls_config(cert, key)
                        .map_err(|e| anyhow::anyhow!("entry point TLS: {e}"))?,
                ),
                None => None,
            };
            let app = skein_entry::router(
                agent.clone(),
                api,
                skein_entry::EntryConfig {
                    token,
                    tls: tls.is_some(),
                    edge_stats: resolved.entry_edge_stats,
                },
            );
            tokio::spawn(async move {
                // Stops with the process (the API's server returning).
                let run = skein_api::serve_tls_with(
                    listener,
                    app,
                    // Proxied downloads, server-sent events and
                    // long-polls through /service/ run longer than the
                    // API's minute.
                    skein_api::Limits {
                        connection_lifetime: std::time::Duration::from_secs(3600),
                        ..skein_api::Limits::default()
                    },
                    Default::default(),
                    tls,
                    std::future::pending(),
                );
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "entry point stopped");
                }
            });
        }
        let app = skein_api::router(
            agent.clone(),
            skein_api::ApiAuth {
                token: resolved.api_token,
            },
        );
        // Every listener is bound and the agent runs: a service manager
        // waiting on us (systemd's Type=notify) may start what needs us.
        sd_notify("READY=1\nSTATUS=agent running, API listening");
        skein_api::serve(listener, app, async {
            shutdown_signal().await;
            sd_notify("STOPPING=1");
        })
        .await?;
        tracing::info!("shutting down");
        Ok(())
    })
}

/// `skein agent --check-config`: what the agent would start with, or why
/// it would not (what `Agent::start` refuses first: the TLS material and
/// its node id), without starting anything.
fn check_config(r: &config::Resolved) -> anyhow::Result<()> {
    let a = &r.agent;
    let tls = skein_agent::load_tls(a)?;
    let until = |t: std::time::SystemTime| {
        t.duration_since(std::time::SystemTime::now())
            .map_or("EXPIRED".to_string(), |d| {
                format!("{} days left", d.as_secs() / 86_400)
            })
    };
    let list = |v: &[std::net::SocketAddr]| {
        if v.is_empty() {
            "off".to_string()
        } else {
            v.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "configuration OK");
    let _ = writeln!(
        out,
        "node          {} of cluster {}",
        a.node_id, a.cluster_id
    );
    let _ = writeln!(out, "advertise     {}", a.advertise);
    let _ = writeln!(out, "gossip        {}", a.gossip_listen);
    let _ = writeln!(
        out,
        "seeds         {}",
        if a.seeds.is_empty() {
            "none (a first node)".to_string()
        } else {
            a.seeds.join(", ")
        }
    );
    let _ = writeln!(out, "API           {}", r.api_listen);
    let _ = match r.entry_listen {
        Some(e) => writeln!(
            out,
            "entry point   {e}{}",
            if r.entry_tls.is_some() {
                " (HTTPS)"
            } else {
                ""
            }
        ),
        None => writeln!(out, "entry point   off"),
    };
    let _ = writeln!(out, "DNS           {}", list(&a.dns_listen));
    let _ = writeln!(out, "data dir      {}", a.data_dir.display());
    let _ = writeln!(
        out,
        "TLS           {}: certificate {}, CA {}",
        a.tls_dir.display(),
        until(tls.not_after()),
        until(tls.ca_not_after())
    );
    let _ = writeln!(
        out,
        "L4LB          {:?}, VIP connection counts {}",
        a.l4lb_dataplane,
        if a.vip_counts { "on" } else { "off" }
    );
    let _ = writeln!(out, "overlay       {:?}", a.overlay_dataplane);
    let _ = match &r.docker {
        Some(d) => writeln!(
            out,
            "docker        {} (network {}, resync {} s{})",
            d.socket.display(),
            d.network.as_deref().unwrap_or("none"),
            d.resync.as_secs(),
            if d.all { ", every container" } else { "" }
        ),
        None => writeln!(out, "docker        off"),
    };
    // A closed stdout (`| head`) is not an error of the configuration.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}

/// Tells the service manager about our state (`sd_notify(3)`'s protocol:
/// one datagram to `$NOTIFY_SOCKET`, a path or, with a leading `@`, an
/// abstract name). Nothing when not run by one.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?path, "cannot tell the service manager our state");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
