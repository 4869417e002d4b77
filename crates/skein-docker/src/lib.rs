//! The Docker provider (`skein agent --docker-socket`): this node's running
//! containers become this node's tasks, as Registrator or Traefik's Docker
//! provider did. Events first (so nothing between the list and the stream
//! is missed), then a full resync, then every event as it comes and a
//! resync every `--docker-resync-s`. A container is dropped from DNS and
//! every VIP when Docker is asked to stop it (the `kill` event with a
//! terminating signal), before it dies, as Marathon took a task out of its
//! load balancers when it began killing it. Tasks are named by container
//! id (`docker-<12 hex>`), so a restart of the agent, of the container or
//! of Docker finds the same ones: nothing is lost or duplicated. While
//! Docker cannot be reached the tasks stay as they were (no news is not
//! news of death); the next resync settles them.
//!
//! [`mapping`] is the pure part (a container → a task); [`client`] speaks
//! the Engine API over its unix socket.

pub mod client;
pub mod mapping;
pub mod network;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use skein_agent::Agent;

pub use mapping::{map, task_id, Mapped, TASK_PREFIX};

#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    /// Containers without Marathon-style labels too.
    pub all: bool,
    pub resync: Duration,
    /// The Docker network made on the agent's Docker bridge of overlay
    /// `dcos` (`None`: none made; containers on a network of this name are
    /// still reached at their address there).
    pub network: Option<String>,
}

impl Options {
    fn overlay_network(&self) -> &str {
        self.network.as_deref().unwrap_or(mapping::OVERLAY_NETWORK)
    }
}

/// Signals whose `kill` event means the container is being stopped.
fn terminates(signal: &str) -> bool {
    matches!(
        signal.trim_start_matches("SIG"),
        "15" | "9" | "2" | "3" | "TERM" | "KILL" | "INT" | "QUIT"
    )
}

/// How long a container Docker was asked to stop stays out although it
/// still runs: `docker stop`'s default grace (10 s) and then some.
const STOPPING_FOR: Duration = Duration::from_secs(30);

/// The provider's memory between events.
#[derive(Default)]
struct Provider {
    /// Containers Docker was asked to stop, and when: not re-added by a
    /// resync while they still run, for at most [`STOPPING_FOR`] (a
    /// SIGTERM the container ignores and nobody follows with a SIGKILL
    /// leaves it serving; it comes back then).
    stopping: HashMap<String, std::time::Instant>,
    /// Refusals already logged (container, reason): once each.
    refused: HashSet<(String, String)>,
    /// Health last published per task.
    health: HashMap<String, Option<bool>>,
    /// The last reason the Docker network could not be made (logged once).
    network_problem: Option<String>,
}

impl Provider {
    fn is_stopping(&self, id: &str) -> bool {
        self.stopping
            .get(id)
            .is_some_and(|since| since.elapsed() < STOPPING_FOR)
    }

    fn refuse(&mut self, container: &str, reason: String) {
        if self.refused.len() > 10_000 {
            self.refused.clear();
        }
        if self.refused.insert((container.to_string(), reason.clone())) {
            tracing::warn!(container, %reason, "container's labels refused (in part or whole)");
        }
    }

    async fn upsert(&mut self, agent: &Agent, m: Mapped) {
        for note in &m.notes {
            self.refuse(&m.id, note.clone());
        }
        let own = agent.own_tasks_snapshot().await;
        let same = own.iter().any(|(id, spec)| *id == m.id && *spec == m.spec);
        if !same {
            if let Err(e) = agent.put_task(&m.id, m.spec.clone()).await {
                tracing::warn!(task = %m.id, app = %m.spec.app, error = %e, "container not registered");
                return;
            }
        }
        if self.health.get(&m.id) != Some(&m.healthy) {
            agent.set_task_health(&m.id, m.healthy).await;
            self.health.insert(m.id.clone(), m.healthy);
        }
    }

    async fn remove(&mut self, agent: &Agent, task: &str) {
        let own = agent.own_tasks_snapshot().await;
        if own.iter().any(|(id, _)| id == task) {
            if let Err(e) = agent.delete_task(task).await {
                tracing::warn!(task, error = %e, "container's task not removed");
                return;
            }
        }
        if self.health.remove(task).is_some_and(|h| h.is_some()) {
            agent.set_task_health(task, None).await;
        }
    }

    /// One container, as Docker describes it now.
    async fn refresh(
        &mut self,
        agent: &Agent,
        docker: &client::Docker,
        opts: &Options,
        id: &str,
    ) -> anyhow::Result<()> {
        let task = task_id(id);
        let mapped = match docker.inspect(id).await? {
            Some(c) if !self.is_stopping(&c.id) => {
                match map(&c, agent.advertise(), opts.all, opts.overlay_network()) {
                    Ok(m) => m,
                    Err(reason) => {
                        self.refuse(&c.name, reason);
                        None
                    }
                }
            }
            _ => None,
        };
        match mapped {
            Some(m) => self.upsert(agent, m).await,
            None => self.remove(agent, &task).await,
        }
        Ok(())
    }

    /// The Docker network on the overlay, once the agent's lease has
    /// settled (its file for the Docker bridge exists); whether it is.
    async fn network(&mut self, agent: &Agent, docker: &client::Docker, opts: &Options) -> bool {
        let Some(name) = &opts.network else {
            return true;
        };
        let file = agent.config().data_dir.join("cni/dcos-docker.conf");
        let Ok(bytes) = std::fs::read(&file) else {
            return false;
        };
        let outcome = match network::from_agent_file(name, &bytes) {
            Ok(want) => network::ensure(docker, &want)
                .await
                .map(|done| (done, want)),
            Err(e) => Err(e),
        };
        match outcome {
            Ok((done, want)) => {
                if done != "kept" {
                    tracing::info!(network = %name, subnet = %want.subnet, bridge = %want.bridge, "Docker network {done}");
                }
                self.network_problem = None;
                true
            }
            Err(e) => {
                let why = format!("{e:#}");
                if self.network_problem.as_deref() != Some(why.as_str()) {
                    tracing::warn!(network = %name, error = %why, "Docker network not made");
                    self.network_problem = Some(why);
                }
                false
            }
        }
    }

    /// Every running container against this node's container tasks.
    async fn resync(
        &mut self,
        agent: &Agent,
        docker: &client::Docker,
        opts: &Options,
    ) -> anyhow::Result<()> {
        let running = docker.running().await?;
        self.stopping
            .retain(|id, since| running.contains(id) && since.elapsed() < STOPPING_FOR);
        let mut wanted = HashSet::new();
        for id in &running {
            if self.is_stopping(id) {
                continue;
            }
            let Some(c) = docker.inspect(id).await? else {
                continue;
            };
            match map(&c, agent.advertise(), opts.all, opts.overlay_network()) {
                Ok(Some(m)) => {
                    wanted.insert(m.id.clone());
                    self.upsert(agent, m).await;
                }
                Ok(None) => {}
                Err(reason) => self.refuse(&c.name, reason),
            }
        }
        for (task, _) in agent.own_tasks_snapshot().await {
            if task.starts_with(TASK_PREFIX) && !wanted.contains(&task) {
                self.remove(agent, &task).await;
            }
        }
        Ok(())
    }

    async fn event(
        &mut self,
        agent: &Agent,
        docker: &client::Docker,
        opts: &Options,
        e: client::Event,
    ) -> anyhow::Result<()> {
        // A container attached to or detached from a network (its address
        // may change): the network's event names the container.
        if e.kind == "network" && matches!(e.action.as_str(), "connect" | "disconnect") {
            if let Some(id) = e.actor.attributes.get("container") {
                self.refresh(agent, docker, opts, id).await?;
            }
            return Ok(());
        }
        let id = e.actor.id.as_str();
        if e.kind != "container" || id.is_empty() {
            return Ok(());
        }
        // `health_status: healthy` and the like carry their status.
        let action = e.action.split(':').next().unwrap_or_default();
        tracing::debug!(container = id, action = %e.action, "Docker event");
        match action {
            "kill" => {
                let signal = e.actor.attributes.get("signal").map_or("", String::as_str);
                if terminates(signal) {
                    self.stopping
                        .insert(id.to_string(), std::time::Instant::now());
                    self.remove(agent, &task_id(id)).await;
                }
            }
            // Not `oom`: a child of the container killed for memory leaves
            // the container running (a `die` follows if it was PID 1).
            "die" | "stop" | "destroy" | "pause" => {
                self.stopping.remove(id);
                self.remove(agent, &task_id(id)).await;
            }
            "start" | "restart" | "unpause" => {
                self.stopping.remove(id);
                self.refresh(agent, docker, opts, id).await?;
            }
            "health_status" | "rename" | "update" | "oom" => {
                self.refresh(agent, docker, opts, id).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs the provider until the agent is gone.
pub async fn run(agent: Weak<Agent>, opts: Options) {
    let docker = client::Docker::new(&opts.socket);
    let mut provider = Provider::default();
    let mut backoff = Duration::from_millis(500);
    let mut reported = false;
    if let Some(a) = agent.upgrade() {
        a.docker.running.store(1, Ordering::Relaxed);
    }
    loop {
        let outcome = async {
            let mut events = docker.events().await?;
            {
                let Some(a) = agent.upgrade() else {
                    return Ok(());
                };
                provider.resync(&a, &docker, &opts).await?;
                a.docker.resyncs.fetch_add(1, Ordering::Relaxed);
                a.docker.up.store(1, Ordering::Relaxed);
                lock(&a.docker.problem).clear();
            }
            // A connection that worked resets the wait for the next one.
            backoff = Duration::from_millis(500);
            if reported {
                tracing::info!(socket = %opts.socket.display(), "Docker reachable again");
                reported = false;
            } else {
                tracing::info!(socket = %opts.socket.display(), "following Docker's containers");
            }
            let mut resync = tokio::time::interval(opts.resync);
            resync.tick().await;
            // Until the network is there, looked at every 2 s (the lease
            // settles a few seconds after the agent starts).
            let mut network_done = false;
            let mut network_tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    e = events.next() => {
                        let Some(e) = e? else {
                            anyhow::bail!("Docker ended its event stream");
                        };
                        let Some(a) = agent.upgrade() else { return Ok(()) };
                        provider.event(&a, &docker, &opts, e).await?;
                        a.docker.events.fetch_add(1, Ordering::Relaxed);
                    }
                    _ = resync.tick() => {
                        let Some(a) = agent.upgrade() else { return Ok(()) };
                        provider.resync(&a, &docker, &opts).await?;
                        a.docker.resyncs.fetch_add(1, Ordering::Relaxed);
                        network_done = provider.network(&a, &docker, &opts).await;
                    }
                    _ = network_tick.tick(), if !network_done => {
                        let Some(a) = agent.upgrade() else { return Ok(()) };
                        network_done = provider.network(&a, &docker, &opts).await;
                    }
                }
            }
        }
        .await;
        if agent.upgrade().is_none() {
            return;
        }
        match outcome {
            Ok(()) => return,
            Err(e) => {
                if let Some(a) = agent.upgrade() {
                    let was_up = a.docker.up.swap(0, Ordering::Relaxed) == 1;
                    if was_up || !reported {
                        a.docker.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    // The outermost context only: stable while the
                    // outage lasts (the node's health is gossiped when its
                    // text changes).
                    *lock(&a.docker.problem) = e.to_string();
                }
                if !reported {
                    tracing::warn!(error = %e, "Docker unreachable: container tasks kept as they are until it answers");
                    reported = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_kill_signals_are_told_apart() {
        for s in ["15", "SIGTERM", "9", "SIGKILL", "2", "3"] {
            assert!(terminates(s), "{s}");
        }
        for s in ["1", "SIGHUP", "10", "SIGUSR1", ""] {
            assert!(!terminates(s), "{s}");
        }
    }
}
