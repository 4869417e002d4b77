//! Health checks of this node's own tasks. The verdict is published as
//! `health:<task-id>` so that every node stops sending new connections to
//! an unhealthy backend; established connections are left alone.
//!
//! Every checked task has a timer of its own (one tokio task probing on the
//! check's interval), so a check that hangs until its timeout delays no
//! other task's verdict. A probe goes only to the task's own address: its
//! `ip` at the TCP port its check names. A check aimed anywhere else (a UDP
//! port, an address no task can hold) is refused: logged, never probed, and
//! the task counts as unchecked.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

use skein_state::{health_key, HealthCheck, HealthProtocol, Protocol, TaskSpec, UNHEALTHY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
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

/// Where a task's health check may probe: the task's `ip` at the port its
/// check names, if that port is TCP and the address one a task can hold.
/// Anything else is refused with the reason.
pub(crate) fn target(spec: &TaskSpec, check: &HealthCheck) -> Result<SocketAddr, String> {
    let port = spec
        .ports
        .get(check.port_index)
        .ok_or_else(|| format!("port_index {} names no port of the task", check.port_index))?;
    if port.protocol != Protocol::Tcp {
        return Err(format!(
            "port {} is {}: a TCP or HTTP probe there would reach a port the task did not declare",
            port.port, port.protocol
        ));
    }
    let ip = spec.ip.to_canonical();
    let refused = match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some("an unspecified address reaches this host, not a task")
            } else if v4.is_broadcast() || v4.is_multicast() {
                Some("a broadcast or multicast address is not a task's")
            } else if v4.is_link_local() {
                Some("a link-local address (the cloud metadata service among them) is not a task's")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("an unspecified address reaches this host, not a task")
            } else if v6.is_multicast() {
                Some("a multicast address is not a task's")
            } else if v6.is_unicast_link_local() {
                Some("a link-local address is not a task's")
            } else {
                None
            }
        }
    };
    match refused {
        Some(why) => Err(format!("{}: {why}", spec.ip)),
        None => Ok(SocketAddr::new(spec.ip, port.port)),
    }
}

/// A verdict of one task's checker, for the loop that publishes it.
#[derive(Debug)]
pub(crate) struct Verdict {
    pub(crate) id: String,
    /// Which checker of the task (a changed check gets a new one).
    epoch: u64,
    pub(crate) healthy: bool,
    /// Differs from the checker's previous verdict (the first one is
    /// compared with "healthy", what an unchecked task counts as).
    pub(crate) changed: bool,
    /// Why the probe behind this verdict failed, if it did.
    pub(crate) reason: Option<String>,
}

struct Entry {
    check: HealthCheck,
    target: Result<SocketAddr, String>,
    epoch: u64,
    /// The checker, none for a refused check.
    checker: Option<AbortHandle>,
}

/// What a [`Checks::reconcile`] stopped or refused: the tasks whose
/// published verdict must go.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Tasks gone, or no longer checked.
    pub(crate) stopped: Vec<String>,
    /// Tasks whose check (new or changed) aims elsewhere than the task, with why.
    pub(crate) refused: Vec<(String, String)>,
}

/// One checker per checked task, each on its own timer, all reporting
/// their verdicts on one channel.
pub(crate) struct Checks {
    entries: HashMap<String, Entry>,
    next_epoch: u64,
    verdicts: mpsc::Sender<Verdict>,
}

impl Checks {
    pub(crate) fn new() -> (Self, mpsc::Receiver<Verdict>) {
        let (tx, rx) = mpsc::channel(1024);
        let checks = Checks {
            entries: HashMap::new(),
            next_epoch: 0,
            verdicts: tx,
        };
        (checks, rx)
    }

    /// Starts a checker for every own task with a new or changed check,
    /// stops those of tasks gone or no longer checked. Must run inside a
    /// tokio runtime.
    pub(crate) fn reconcile(&mut self, own: &[(String, TaskSpec)]) -> Changes {
        let mut changes = Changes::default();
        let mut checked = HashSet::new();
        for (id, spec) in own {
            let Some(check) = &spec.health_check else {
                continue;
            };
            checked.insert(id.as_str());
            let target = target(spec, check);
            if let Some(e) = self.entries.get(id) {
                if e.check == *check && e.target == target {
                    continue;
                }
            }
            if let Some(old) = self.entries.remove(id) {
                stop(old);
            }
            self.next_epoch += 1;
            let epoch = self.next_epoch;
            let checker = match &target {
                Ok(addr) => Some(
                    tokio::spawn(check_task(
                        id.clone(),
                        epoch,
                        *addr,
                        check.clone(),
                        self.verdicts.clone(),
                    ))
                    .abort_handle(),
                ),
                Err(reason) => {
                    changes.refused.push((id.clone(), reason.clone()));
                    None
                }
            };
            self.entries.insert(
                id.clone(),
                Entry {
                    check: check.clone(),
                    target,
                    epoch,
                    checker,
                },
            );
        }
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|id| !checked.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some(old) = self.entries.remove(&id) {
                stop(old);
            }
            changes.stopped.push(id);
        }
        changes
    }

    /// Whether a verdict comes from the task's current checker (not one
    /// stopped since it was sent).
    pub(crate) fn is_current(&self, verdict: &Verdict) -> bool {
        self.entries
            .get(&verdict.id)
            .is_some_and(|e| e.epoch == verdict.epoch && e.checker.is_some())
    }
}

fn stop(entry: Entry) {
    if let Some(checker) = entry.checker {
        checker.abort();
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, entry) in self.entries.drain() {
            stop(entry);
        }
    }
}

/// One task's checker: probes on the check's interval (the next probe
/// starts an interval after the previous one started, or when it ended if
/// it took longer) and reports its first verdict and every change.
async fn check_task(
    id: String,
    epoch: u64,
    addr: SocketAddr,
    check: HealthCheck,
    verdicts: mpsc::Sender<Verdict>,
) {
    let interval = Duration::from_secs(u64::from(check.interval_s));
    let mut failures: u32 = 0;
    let mut healthy = true;
    let mut reported = false;
    loop {
        let started = Instant::now();
        let result = probe(addr, &check).await;
        let was = healthy;
        match &result {
            Ok(()) => {
                failures = 0;
                healthy = true;
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                if failures >= check.unhealthy_after {
                    healthy = false;
                }
            }
        }
        // The first verdict is always published: a verdict persisted before
        // a restart must not outlive the task's recovery.
        if !reported || healthy != was {
            reported = true;
            let verdict = Verdict {
                id: id.clone(),
                epoch,
                healthy,
                changed: healthy != was,
                reason: result.err(),
            };
            if verdicts.send(verdict).await.is_err() {
                return;
            }
        }
        tokio::time::sleep_until(started + interval).await;
    }
}

/// Keeps one checker per own checked task (looking for changed tasks four
/// times a second) and publishes their verdicts as they come. Ends when the
/// agent is dropped.
pub(crate) async fn run(agent: Weak<Agent>) {
    let (mut checks, mut verdicts) = Checks::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(agent) = agent.upgrade() else { return };
                let own = agent.own_tasks_snapshot().await;
                let changes = checks.reconcile(&own);
                for (id, reason) in &changes.refused {
                    tracing::warn!(
                        task = %id,
                        %reason,
                        "health check refused: it does not aim at the task's own address; \
                         the task counts as unchecked"
                    );
                    agent.gossip.delete(&health_key(id)).await;
                }
                for id in &changes.stopped {
                    agent.gossip.delete(&health_key(id)).await;
                }
            }
            Some(verdict) = verdicts.recv() => {
                if !checks.is_current(&verdict) {
                    continue;
                }
                let Some(agent) = agent.upgrade() else { return };
                if verdict.changed {
                    agent
                        .counters
                        .health_changes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match &verdict.reason {
                        None => tracing::info!(task = %verdict.id, "task healthy again"),
                        Some(e) => tracing::warn!(task = %verdict.id, reason = %e, "task unhealthy"),
                    }
                }
                let value = if verdict.healthy { "healthy" } else { UNHEALTHY };
                agent.gossip.set(&health_key(&verdict.id), value).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use skein_state::PortMapping;
    use tokio::net::TcpListener;

    use super::*;

    fn task(ip: &str, port: u16, protocol: Protocol, check: HealthCheck) -> TaskSpec {
        TaskSpec {
            app: "/app".into(),
            framework: "marathon".into(),
            ip: ip.parse().expect("ip"),
            ports: vec![PortMapping {
                name: None,
                port,
                protocol,
                labels: skein_state::Labels::new(),
            }],
            health_check: Some(check),
            labels: skein_state::Labels::new(),
        }
    }

    fn http_check(timeout_s: u32) -> HealthCheck {
        HealthCheck {
            protocol: HealthProtocol::Http,
            path: "/".into(),
            port_index: 0,
            interval_s: 1,
            timeout_s,
            unhealthy_after: 1,
        }
    }

    /// A listener that accepts, reads the request and never answers,
    /// holding every connection open. Counts connections.
    async fn hanging() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        (port, accepted)
    }

    /// A listener answering its first request with 200 and every later one
    /// with 500. Counts connections.
    async fn answering() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                let reply: &[u8] = if n == 0 {
                    b"HTTP/1.0 200 OK\r\n\r\n"
                } else {
                    b"HTTP/1.0 500 Internal Server Error\r\n\r\n"
                };
                let _ = stream.write_all(reply).await;
            }
        });
        (port, accepted)
    }

    /// The next verdict, or a panic past the deadline.
    async fn next(rx: &mut mpsc::Receiver<Verdict>, within: Duration) -> Verdict {
        timeout(within, rx.recv())
            .await
            .expect("a verdict before the deadline")
            .expect("channel open")
    }

    async fn until(what: &str, within: Duration, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_hanging_check_delays_no_other_task_verdict() {
        let (hang_port, hang_accepted) = hanging().await;
        let (ok_port, _) = answering().await;
        let (mut checks, mut rx) = Checks::new();
        // The hanging task's probe waits 60 s for an answer that never
        // comes; the answering task is probed every second.
        let own = vec![
            (
                "hangs".to_string(),
                task("127.0.0.1", hang_port, Protocol::Tcp, http_check(60)),
            ),
            (
                "answers".to_string(),
                task("127.0.0.1", ok_port, Protocol::Tcp, http_check(1)),
            ),
        ];
        let changes = checks.reconcile(&own);
        assert!(changes.refused.is_empty() && changes.stopped.is_empty());
        until("the hanging task's probe", Duration::from_secs(10), || {
            hang_accepted.load(Ordering::SeqCst) > 0
        })
        .await;

        // Its first verdict (200: healthy) and then, a round later, the
        // change (500: unhealthy) arrive while the other probe still hangs
        // (no verdict can come from it before its 60 s timeout).
        let first = next(&mut rx, Duration::from_secs(15)).await;
        assert_eq!(first.id, "answers");
        assert!(first.healthy && !first.changed);
        assert!(checks.is_current(&first));
        let second = next(&mut rx, Duration::from_secs(15)).await;
        assert_eq!(second.id, "answers");
        assert!(!second.healthy && second.changed);
        assert_eq!(second.reason.as_deref(), Some("HTTP 500"));
        assert!(
            rx.try_recv().is_err(),
            "the hanging task has no verdict yet"
        );

        // A task removed: its checker stops and its verdicts are stale.
        let changes = checks.reconcile(&own[..1]);
        assert_eq!(changes.stopped, vec!["answers".to_string()]);
        assert!(!checks.is_current(&second));
    }

    #[tokio::test]
    async fn a_check_aimed_elsewhere_is_refused_and_never_probed() {
        let (bait_port, bait_accepted) = answering().await;
        let (ok_port, ok_accepted) = answering().await;
        let (mut checks, mut rx) = Checks::new();
        let tcp = |ip: &str| task(ip, ok_port, Protocol::Tcp, http_check(1));
        let own = vec![
            // A UDP port declared, a TCP listener there: not the task's.
            (
                "udp".to_string(),
                task("127.0.0.1", bait_port, Protocol::Udp, http_check(1)),
            ),
            ("metadata".to_string(), tcp("169.254.169.254")),
            ("unspecified".to_string(), tcp("0.0.0.0")),
            ("mapped".to_string(), tcp("::ffff:169.254.169.254")),
            ("v6-unspecified".to_string(), tcp("::")),
            ("multicast".to_string(), tcp("224.0.0.1")),
            ("fine".to_string(), tcp("127.0.0.1")),
        ];
        let changes = checks.reconcile(&own);
        let mut refused: Vec<&str> = changes.refused.iter().map(|(id, _)| id.as_str()).collect();
        refused.sort_unstable();
        assert_eq!(
            refused,
            [
                "mapped",
                "metadata",
                "multicast",
                "udp",
                "unspecified",
                "v6-unspecified"
            ]
        );
        let why = &changes
            .refused
            .iter()
            .find(|(id, _)| id == "udp")
            .expect("udp")
            .1;
        assert!(why.contains("is udp"), "{why}");

        // The task aimed at its own address is probed and judged.
        let verdict = next(&mut rx, Duration::from_secs(15)).await;
        assert_eq!(verdict.id, "fine");
        assert!(ok_accepted.load(Ordering::SeqCst) > 0);
        // Refused once, not again while the task is unchanged; never probed.
        let again = checks.reconcile(&own);
        assert!(again.refused.is_empty() && again.stopped.is_empty());
        assert_eq!(bait_accepted.load(Ordering::SeqCst), 0);

        // Fixed (the port declared TCP), the task is checked.
        let mut fixed = own.clone();
        fixed[0].1.ports[0].protocol = Protocol::Tcp;
        let changes = checks.reconcile(&fixed);
        assert!(changes.refused.is_empty() && changes.stopped.is_empty());
        until("the fixed task's probe", Duration::from_secs(10), || {
            bait_accepted.load(Ordering::SeqCst) > 0
        })
        .await;
    }
}
