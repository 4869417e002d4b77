//! Health checks of this node's own tasks. The verdict is published as
//! `health:<task-id>` so that every node stops sending new connections to
//! an unhealthy backend; established connections are left alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use skein_state::{health_key, HealthCheck, HealthProtocol, TaskSpec, UNHEALTHY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::Agent;

/// One probe: a TCP connect, or an HTTP GET answered with 2xx/3xx.
pub(crate) async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    let limit = Duration::from_secs(u64::from(check.timeout_s));
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        if check.protocol == HealthProtocol::Tcp {
            return Ok(());
        }
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: skein-health\r\n\r\n",
            check.path,
            addr.ip()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 256];
        let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n]);
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                format!(
                    "not an HTTP answer: {:?}",
                    line.lines().next().unwrap_or("")
                )
            })?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    };
    match timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}s", check.timeout_s)),
    }
}

struct State {
    next: Instant,
    failures: u32,
    healthy: bool,
}

/// Probes every own task that has a health check on its interval, and
/// publishes verdict changes. Ends when the agent is dropped.
pub(crate) async fn run(agent: Weak<Agent>) {
    let mut states: HashMap<String, State> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(agent) = agent.upgrade() else { return };
        let own: Vec<(String, TaskSpec)> = agent.own_tasks_snapshot().await;
        // Forget tasks that are gone or no longer checked.
        let checked: Vec<&String> = own
            .iter()
            .filter(|(_, s)| s.health_check.is_some())
            .map(|(id, _)| id)
            .collect();
        let stale: Vec<String> = states
            .keys()
            .filter(|id| !checked.contains(id))
            .cloned()
            .collect();
        for id in stale {
            states.remove(&id);
            agent.gossip.delete(&health_key(&id)).await;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        for (id, spec) in &own {
            let Some(check) = &spec.health_check else {
                continue;
            };
            let Some(port) = spec.ports.get(check.port_index) else {
                continue;
            };
            let state = states.entry(id.clone()).or_insert(State {
                next: now,
                failures: 0,
                healthy: true,
            });
            if state.next <= now {
                state.next = now + Duration::from_secs(u64::from(check.interval_s));
                due.push((
                    id.clone(),
                    SocketAddr::new(spec.ip, port.port),
                    check.clone(),
                ));
            }
        }
        // Probes run concurrently; one slow task does not delay the others.
        let results = futures_join(due).await;
        for (id, result, check) in results {
            let Some(state) = states.get_mut(&id) else {
                continue;
            };
            let was = state.healthy;
            match &result {
                Ok(()) => {
                    state.failures = 0;
                    state.healthy = true;
                }
                Err(_) => {
                    state.failures = state.failures.saturating_add(1);
                    if state.failures >= check.unhealthy_after {
                        state.healthy = false;
                    }
                }
            }
            if state.healthy != was {
                agent
                    .counters
                    .health_changes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match &result {
                    Ok(()) => tracing::info!(task = %id, "task healthy again"),
                    Err(e) => tracing::warn!(task = %id, reason = %e, "task unhealthy"),
                }
                let verdict = if state.healthy { "healthy" } else { UNHEALTHY };
                agent.gossip.set(&health_key(&id), verdict).await;
            }
        }
    }
}

async fn futures_join(
    due: Vec<(String, SocketAddr, HealthCheck)>,
) -> Vec<(String, Result<(), String>, HealthCheck)> {
    let mut set = tokio::task::JoinSet::new();
    for (id, addr, check) in due {
        set.spawn(async move {
            let result = probe(addr, &check).await;
            (id, result, check)
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(r) = joined {
            out.push(r);
        }
    }
    out
}
